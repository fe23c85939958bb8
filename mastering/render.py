"""JPEG renderings of DICOM images for the web content of IHE PDI "DICOM PLUS WEB" media.

Every frame is taken through the display pipeline of PS3.4 N.2 (grayscale) or PS3.3 C.7.6.3.1.2
(colour) to an 8-bit image a browser shows without a DICOM viewer:

* **Decode** (PS3.5 Section 8, Annex A): the file is read once with pydicom and the frames are
  decoded with pydicom's decoders (native, RLE, JPEG, JPEG-LS, JPEG 2000 through gdcm or
  pylibjpeg). pydicom 3 returns YBR_FULL/YBR_FULL_422 as RGB and the JPEG 2000 decoders undo
  the YBR_ICT/YBR_RCT component transform; the *Photometric Interpretation the decoder reports*
  is what decides the rest of the pipeline, and whatever is still YCbCr is converted here.
* **Modality LUT** (PS3.3 C.11.1): Rescale Slope/Intercept or a Modality LUT Sequence
  (pydicom ``apply_modality_lut``); for enhanced multi-frame objects the Pixel Value
  Transformation macro of the shared/per-frame functional groups (PS3.3 C.7.6.16.2.9).
* **VOI LUT** (PS3.3 C.11.2): the first VOI LUT Sequence item, else the first Window
  Center/Width pair, is the default; further items/pairs are *presets*, named by LUT
  Explanation / Window Center & Width Explanation. VOI LUT Function LINEAR, LINEAR_EXACT and
  SIGMOID follow C.11.2.1.2 and C.11.2.1.3 exactly (tested against pydicom's
  ``apply_windowing``). With no VOI in the file the window is computed: the **0.5th to 99.5th
  percentile of the modality values**, Pixel Padding Value (PS3.3 C.7.5.1.1.2) excluded, taken
  from the representative frame and used for every frame (LINEAR_EXACT, so the percentiles map
  to black and white); if that range is empty the min-max range is used.
* **Polarity** (PS3.3 C.7.6.3.1.2, C.11.6): MONOCHROME1, or Presentation LUT Shape INVERSE, is
  inverted after the VOI so that the lowest values are brightest.
* **Colour**: PALETTE COLOR through its palette (PS3.3 C.7.6.3.1.5, pydicom ``apply_color_lut``,
  segmented palettes included), RGB as is; samples of more than 8 bits are scaled to 8.
* **Geometry** (PS3.3 C.7.6.2.1.1, C.7.6.3.1.7): pixels are made square using Pixel Spacing
  (Imager / Nominal Scanned Pixel Spacing, Pixel Aspect Ratio as fallbacks) by stretching the
  coarser axis; the result is then reduced, never enlarged, to fit ``max_size``.
* **Encode**: Pillow, baseline sequential JPEG (SOF0), Huffman tables optimised, 8-bit grey (L)
  or RGB (4:4:4, no chroma subsampling, so burned-in colour annotations stay legible).

Grey stored values of up to 16 bits go through one 8-bit lookup table per frame and preset:
modality and VOI transformations are evaluated only for the stored values present (min..max),
then the frame is mapped with a single ``numpy.take``. Float and 32-bit data are transformed
directly. The source file is only read, never written.

``render_job`` is a picklable top-level wrapper for ``ProcessPoolExecutor.map``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.utils import as_pixel_options, get_nr_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

log = logging.getLogger(__name__)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
YCBCR = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_ICT"})  # YBR_ICT uses the YBR_FULL matrix
WINDOW_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
AUTO_PERCENTILES = (0.5, 99.5)
AUTO_SAMPLE = 1 << 20  # values sampled for the computed window of float / 32-bit data
ASPECT_LIMITS = (0.1, 10.0)  # pixel aspect ratios outside are treated as broken (1:1)
RESIZE_GAP = 3.0  # Pillow reducing_gap: integer box reduction first, then Lanczos
THUMB_GAP = 1.0  # thumbnails: integer box reduction, then Lanczos for the remainder
DEFAULT, AUTO = "default", "auto"
# Attributes the functional group macros replace per frame (PS3.3 C.7.6.16.2.1, .9, .10)
FG_MACROS = ("PixelMeasuresSequence", "PixelValueTransformationSequence", "FrameVOILUTSequence")
VIEW_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
                 "VOILUTSequence", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
                 "VOILUTFunction", "PixelSpacing", "ImagerPixelSpacing",
                 "NominalScannedPixelSpacing", "PixelAspectRatio")
SUMMARY_KEYWORDS = (("modality", "Modality"), ("instance_number", "InstanceNumber"),
                    ("slice_location", "SliceLocation"), ("image_comments", "ImageComments"),
                    ("series_description", "SeriesDescription"))


# -- public types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A VOI preset the file offers (PS3.3 C.11.2).

    For windows ``center``/``width`` are Window Center/Width and ``function`` the VOI LUT
    Function; for a VOI LUT Sequence item ``function`` is ``"LUT"`` and ``center``/``width``
    describe the input range the LUT covers (First Mapped Value + entries / 2, entries).
    """

    name: str
    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class RenderedFrame:
    """One frame as a baseline JPEG.

    ``preset`` is ``"default"`` for the file's first VOI LUT / window, ``"auto"`` for the
    computed percentile window, a preset name in ``Rendering.extra`` and ``None`` for colour.
    """

    frame: int  # 1-based frame number
    jpeg: bytes
    width: int
    height: int
    preset: str | None


@dataclass(frozen=True)
class Rendering:
    """Everything the web content needs of one instance.

    ``extra`` holds, per preset beyond the default (at most ``max_presets`` of them), the same
    frames rendered with that preset. ``summary`` always has rows, columns and frames; the
    other keys (modality, instance_number, slice_location, image_comments,
    series_description) only when the file has a non-empty value, decoded by pydicom using
    Specific Character Set.
    """

    frames: list[RenderedFrame]
    presets: list[Preset]
    extra: dict[str, list[RenderedFrame]]
    thumbnail: bytes
    summary: dict[str, str]


class RenderError(Exception):
    """The instance cannot be shown: ``"<path>: <reason>"``."""


class _Unrenderable(Exception):
    """Internal: the reason, without the path (``render`` adds it)."""


@dataclass(frozen=True)
class _Options:
    max_size: int
    thumb_size: int
    quality: int
    max_presets: int
    max_frames: int | None
    optimize: bool = True

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.thumb_size < 1:
            raise ValueError("max_size and thumb_size must be at least 1")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be 1..100")
        if self.max_presets < 0 or (self.max_frames is not None and self.max_frames < 1):
            raise ValueError("max_presets must be >= 0 and max_frames >= 1")


@dataclass(frozen=True, eq=False)
class _Voi:
    """One VOI transformation: a window, or item ``index`` of ``source``'s VOI LUT Sequence."""

    name: str
    center: float
    width: float
    function: str  # LINEAR | LINEAR_EXACT | SIGMOID | LUT
    source: Dataset | None = field(default=None, repr=False)
    index: int = 0

    def preset(self) -> Preset:
        return Preset(self.name, self.center, self.width, self.function)


# -- entry points ----------------------------------------------------------------------------


def renderable(ds_or_path: Dataset | str | os.PathLike[str]) -> bool:
    """True if the instance has pixel data this module can show (PS3.3 C.7.6.3).

    Images of any kind, RT Dose, segmentations and multi-frame objects qualify when the
    Photometric Interpretation is supported and a decoder for the transfer syntax is installed.
    A path is read without loading large values. Decoding can still fail on a damaged or
    exotic code stream; ``render`` then raises ``RenderError``.
    """
    try:
        if isinstance(ds_or_path, Dataset):
            ds = ds_or_path
        else:
            ds = pydicom.dcmread(ds_or_path, force=True, defer_size=4096)
        return _why_not(ds) is None
    except Exception:  # a file we cannot even read is simply not renderable
        log.debug("renderable: cannot read %s", ds_or_path, exc_info=True)
        return False


def render(path: Path | str, *, max_size: int = 1024, thumb_size: int = 128,
           quality: int = 85, max_presets: int = 3, max_frames: int | None = None,
           optimize: bool = True) -> Rendering:
    """Render every frame (up to ``max_frames``) of the DICOM file at ``path``.

    ``optimize=False`` skips libjpeg's extra Huffman statistics pass: about 1 ms less per
    512x512 CT frame (of about 6 ms in all) for files about 5 % larger.

    Raises ``RenderError("<path>: <reason>")`` for files without showable pixel data, an
    undecodable transfer syntax or broken lookup tables; ``ValueError`` for bad arguments.
    """
    opts = _Options(max_size, thumb_size, quality, max_presets, max_frames, optimize)
    try:
        ds = _read(Path(path))
        rendering = _render(ds, opts)
    except _Unrenderable as exc:
        raise RenderError(f"{path}: {exc}") from exc
    log.debug("rendered %s: %d frame(s)", path, len(rendering.frames))
    return rendering


def read(path: Path | str) -> pydicom.FileDataset:
    """The whole file, as :func:`render_dataset` wants it (read once, use for everything);
    a file inside an ISO image is read from the image (isosource)."""
    from . import isosource

    try:
        if not os.path.lexists(path) and isosource.locate(str(path)) is not None:
            with isosource.open_any(str(path)) as fh:
                return _read(fh)  # type: ignore[arg-type]
        return _read(Path(path))
    except _Unrenderable as exc:
        raise RenderError(f"{path}: {exc}") from exc


def render_dataset(ds: Dataset, *, source: str = "", max_size: int = 1024,
                   thumb_size: int = 128, quality: int = 85, max_presets: int = 3,
                   max_frames: int | None = None, optimize: bool = True,
                   native: np.ndarray | None = None) -> Rendering:
    """:func:`render` for a data set already read with :func:`read`; source names it in
    errors. native: the frame as :func:`read_native` read it (ds is then the header)."""
    opts = _Options(max_size, thumb_size, quality, max_presets, max_frames, optimize)
    try:
        return _render(ds, opts, native)
    except _Unrenderable as exc:
        raise RenderError(f"{source}: {exc}") from exc


# -- the native fast path --------------------------------------------------------------------

NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


def read_native(path: str, pixel_offset: int, body_ts: str
                ) -> tuple[Dataset, np.ndarray] | None:
    """The header (pydicom, up to the pixel data) and the pixel array read straight from the
    file, for the most common images: one frame of native little endian grey pixels
    (PS3.5 8.1.1, 8 or 16 bits allocated, one sample) in a plain file whose Pixel Data
    element is at pixel_offset (from intake). No decoder is set up and the pixel bytes are
    read once, with no copy; bits above Bits Stored are cleared, or sign-extended for signed
    data, as pydicom's decoder does. None for anything else (the caller reads the whole
    file with :func:`read`): compressed, big endian, colour, multi-frame, float, enhanced."""
    if body_ts not in NATIVE_SYNTAXES or pixel_offset < 0 or not os.path.lexists(path):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        shape = _native_shape(ds)
        if shape is None:
            return None
        rows, columns, bits, stored, signed = shape
        header = 8 if body_ts == ImplicitVRLittleEndian else 12
        nbytes = rows * columns * bits // 8
        with open(path, "rb", buffering=0) as fh:
            head = os.pread(fh.fileno(), header, pixel_offset)
            if head[:4] != PIXEL_DATA_TAG or int.from_bytes(head[-4:], "little") not in (
                    nbytes, nbytes + 1):
                return None
            data = os.pread(fh.fileno(), nbytes, pixel_offset + header)
    except (OSError, ValueError, EOFError, InvalidDicomError):
        return None
    if len(data) != nbytes:
        return None
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    arr = np.frombuffer(data, dtype=dtype).reshape(rows, columns)
    return ds, _clear_unused_bits(arr, stored, signed)


#: what decides how a plain grey frame is shown (PS3.3 C.7.6.3, C.11.1, C.11.2, C.7.6.2): two
#: files that agree on all of them (the slices of a series, as a rule) are shown the same way
DISPLAY_TAGS = (
    0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280030, 0x00280034,
    0x00280100, 0x00280101, 0x00280102, 0x00280103, 0x00281050, 0x00281051, 0x00281052,
    0x00281053, 0x00281054, 0x00281055, 0x00281056, 0x00283000, 0x00283010, 0x00286010,
    0x00280120, 0x00280121, 0x20500020, 0x00181164, 0x00182010, 0x52009229, 0x52009230,
    0x7FE00008, 0x7FE00009,
)
#: per image: what the web content shows of it (webcontent.WebImage, Rendering.summary)
IMAGE_TAGS = (0x00080005, 0x00080018, 0x00200013, 0x00080060, 0x00201041, 0x00204000,
              0x0008103E)
_SUMMARY_TAGS = {"modality": 0x00080060, "instance_number": 0x00200013,
                 "slice_location": 0x00201041, "image_comments": 0x00204000,
                 "series_description": 0x0008103E}
_COLLECT = frozenset(DISPLAY_TAGS + IMAGE_TAGS)


@dataclass(frozen=True, eq=False)
class _Display:
    """How one kind of plain grey frame is shown, worked out once: the lookup table of each
    VOI over every stored bit pattern (cleared or sign-extended to Bits Stored first, as
    pydicom's decoder does), and the geometry."""

    rows: int
    columns: int
    bits: int
    size: tuple[int, int]
    label: str
    vois: list[_Voi]  # the default, then the extra presets
    presets: list[_Voi]
    luts: list[np.ndarray]


class SeriesRenderer:
    """Renders one frame of plain grey images a series at a time (the web content's case):
    the header is taken from a structural walk (:func:`mastering.part10.inspect`) instead
    of pydicom, and a file whose display attributes (DISPLAY_TAGS, byte for byte) equal an
    earlier file's is shown with that file's lookup tables: the per-image work is reading
    the pixels once, one table lookup per preset and the JPEG encodings. The images are the
    ones :func:`render` makes (tested). Anything else returns None from :meth:`render`."""

    LIMIT = 16  # kinds of display remembered

    def __init__(self, **options: Any):
        self.opts = _Options(**{"max_size": 1024, "thumb_size": 128, "quality": 85,
                                "max_presets": 3, "max_frames": None, **options})
        self.known: dict[bytes, _Display | None] = {}

    def render(self, path: str, pixel_offset: int, body_ts: str
               ) -> tuple[Rendering, dict[int, tuple[bytes, bytes]]] | None:
        """The rendering and the raw elements of the file (tag -> (VR as read, element): see
        :func:`mastering.part10.inspect`), or None."""
        if body_ts not in NATIVE_SYNTAXES or pixel_offset < 0 or not os.path.lexists(path):
            return None
        from . import part10

        try:
            layout = part10.inspect(Path(path), collect=_COLLECT)
        except (OSError, ValueError):
            return None
        elements = layout.elements or {}
        if (layout.body_ts != body_ts or layout.pixel_data_offset != pixel_offset
                or layout.oversized):
            return None
        key = body_ts.encode() + b"".join(
            struct.pack("<I", t) + elements[t][1] for t in DISPLAY_TAGS if t in elements)
        if key not in self.known:
            self._learn(key, path, pixel_offset, body_ts)
        display = self.known[key]
        if display is None:
            return None
        pixels = self._pixels(path, pixel_offset, body_ts, display)
        if pixels is None:
            return None
        return self._paint(display, pixels, elements), elements

    def _learn(self, key: bytes, path: str, pixel_offset: int, body_ts: str) -> None:
        if len(self.known) >= self.LIMIT:
            self.known.pop(next(iter(self.known)))
        self.known[key] = None
        native = read_native(path, pixel_offset, body_ts)
        if native is None:
            return
        ds, arr = native
        pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        try:
            painter = _Painter.create(ds, 0, arr, pi, self.opts)
        except _Unrenderable:
            return
        if painter.colour or painter.auto is not None:  # a window from this frame's pixels
            return
        shape = _native_shape(ds)
        assert shape is not None  # read_native checked it
        rows, columns, bits, stored, signed = shape
        size = _display_size(rows, columns, _aspect(ds), self.opts.max_size)
        vois = [painter.presets[0], *painter.extras]
        raw = np.arange(1 << bits, dtype=np.int64)
        values = raw & ((1 << stored) - 1)
        if signed:
            values = np.where(values >= 1 << (stored - 1), values - (1 << stored), values)
        modality = _modality(values, ds)
        luts = [_display(modality, voi, painter.invert) for voi in vois]
        self.known[key] = _Display(rows, columns, bits, size, DEFAULT, vois,
                                   list(painter.presets), luts)

    @staticmethod
    def _pixels(path: str, offset: int, body_ts: str, d: _Display) -> np.ndarray | None:
        header = 8 if body_ts == ImplicitVRLittleEndian else 12
        nbytes = d.rows * d.columns * d.bits // 8
        try:
            with open(path, "rb", buffering=0) as fh:
                head = os.pread(fh.fileno(), header, offset)
                data = os.pread(fh.fileno(), nbytes, offset + header)
        except OSError:
            return None
        if (head[:4] != PIXEL_DATA_TAG or len(data) != nbytes
                or int.from_bytes(head[-4:], "little") not in (nbytes, nbytes + 1)):
            return None
        return np.frombuffer(data, dtype=f"<u{d.bits // 8}").reshape(d.rows, d.columns)

    def _paint(self, d: _Display, pixels: np.ndarray,
               elements: dict[int, tuple[bytes, bytes]]) -> Rendering:
        opts = self.opts
        frames: list[RenderedFrame] = []
        extra: dict[str, list[RenderedFrame]] = {}
        thumbnail = b""
        for i, (voi, lut) in enumerate(zip(d.vois, d.luts, strict=True)):
            image = _resize(Image.fromarray(lut.take(pixels)), d.size)
            done = RenderedFrame(1, _jpeg(image, opts), image.width, image.height,
                                 d.label if i == 0 else voi.name)
            if i == 0:
                thumbnail = _jpeg(_fit(image, opts.thumb_size, THUMB_GAP), opts)
                frames.append(done)
            else:
                extra[voi.name] = [done]
        summary = {"rows": str(d.rows), "columns": str(d.columns), "frames": "1"}
        charsets = raw_charsets(elements)
        for name, tag in _SUMMARY_TAGS.items():
            text = raw_text(elements, tag, charsets)
            if text:
                summary[name] = text
        return Rendering(frames=frames, presets=[v.preset() for v in d.presets], extra=extra,
                         thumbnail=thumbnail, summary=summary)


def raw_charsets(elements: dict[int, tuple[bytes, bytes]]) -> tuple[str, ...]:
    from .records import charsets_of

    item = elements.get(0x00080005)  # CS: an 8-byte header, explicit or implicit
    return charsets_of(item[1]) if item else ()


def raw_text(elements: dict[int, tuple[bytes, bytes]], tag: int,
             charsets: tuple[str, ...]) -> str:
    """The text of a raw little endian element as :func:`part10.inspect` collects it,
    decoded by Specific Character Set (PS3.5 6.1), padding and spaces stripped."""
    from . import values

    item = elements.get(tag)
    if item is None:
        return ""
    return values._decode(_raw_value(*item), charsets).strip(" \0")


def _raw_value(vr: bytes, element: bytes) -> bytes:
    """The value of a collected element: after a 12-byte header for the explicit VRs with a
    4-byte length (PS3.5 7.1.2), else after 8 (explicit short, or implicit: vr is b"")."""
    from .part10 import LONG_VRS

    return element[12:] if vr in LONG_VRS else element[8:]


def _native_shape(ds: Dataset) -> tuple[int, int, int, int, bool] | None:
    """(rows, columns, bits allocated, bits stored, signed) where the fast path applies."""
    if any(k in ds for k in ("FloatPixelData", "DoubleFloatPixelData", "ModalityLUTSequence",
                             "VOILUTSequence", "SharedFunctionalGroupsSequence",
                             "PerFrameFunctionalGroupsSequence")):
        return None
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits, stored = int(ds.BitsAllocated), int(ds.get("BitsStored") or ds.BitsAllocated)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if pi not in GREY or samples != 1 or frames != 1 or bits not in (8, 16):
        return None
    if rows < 1 or columns < 1 or not 1 <= stored <= bits:
        return None
    return rows, columns, bits, stored, signed


def _clear_unused_bits(arr: np.ndarray, stored: int, signed: bool) -> np.ndarray:
    """PS3.5 8.1.1: only Bits Stored bits are the value; a copy only where others are set."""
    bits = arr.dtype.itemsize * 8
    if stored == bits:
        return arr
    if signed:
        low, high = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
        if arr.min() >= low and arr.max() <= high:
            return arr
        shift = bits - stored
        return (arr << shift) >> shift
    mask = (1 << stored) - 1
    return arr if arr.max() <= mask else arr & mask


def render_job(args: tuple[Any, ...]) -> Rendering | str:
    """``render(*args[:1], **args[1])`` for a process pool; errors come back as the message.

    ``args`` is ``(path,)`` or ``(path, {keyword: value})``. Besides ``RenderError`` any other
    exception is returned as ``"<path>: internal error: ..."`` so that one bad file cannot
    break a ``map`` over thousands.
    """
    path = args[0]
    kwargs: dict[str, Any] = args[1] if len(args) > 1 else {}
    try:
        return render(path, **kwargs)
    except RenderError as exc:
        return str(exc)
    except Exception as exc:
        log.debug("render_job: unexpected failure on %s", path, exc_info=True)
        return f"{path}: internal error: {type(exc).__name__}: {exc}"


# -- reading and checks ----------------------------------------------------------------------


def _read(path: Path) -> pydicom.FileDataset:
    """Read the whole file once (PS3.10 7.1); files without a meta header are accepted."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise _Unrenderable(f"cannot read as DICOM: {type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:  # our in-memory copy only, never the file
        ds.file_meta.TransferSyntaxUID = _guess_syntax(ds)
    return ds


def _guess_syntax(ds: Dataset) -> UID:
    """Transfer syntax of a data set read without File Meta Information (PS3.5 A.1-A.3)."""
    implicit, little = ds.original_encoding
    if implicit or implicit is None:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _why_not(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be rendered, or None (PS3.3 C.7.6.3 Image Pixel Module)."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        sop = UID(str(ds.get("SOPClassUID", ""))).name or "unknown SOP Class"
        return f"no pixel data ({sop})"
    if not ds.get("Rows") or not ds.get("Columns"):
        return "Rows/Columns missing or zero"
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = ds.get("SamplesPerPixel", 1)
    if not ((pi in GREY and samples == 1) or (pi in COLOUR and samples in (1, 3))):
        return f"unsupported Photometric Interpretation {pi!r} with {samples} sample(s)"
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax = UID(str(syntax)) if syntax else _guess_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"no decoder for transfer syntax {syntax.name or syntax}"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        return f"no decoder installed for {syntax.name} ({missing})"
    return None


# -- the pipeline ----------------------------------------------------------------------------


def _render(ds: Dataset, opts: _Options, native: np.ndarray | None = None) -> Rendering:
    """Decode the selected frames one at a time, representative frame first; a native frame
    read by :func:`read_native` needs no decoding."""
    if native is None and (reason := _why_not(ds)):
        raise _Unrenderable(reason)
    count = 1 if native is not None else _frame_count(ds)
    selected = range(count if opts.max_frames is None else min(count, opts.max_frames))
    rep = _representative(ds, count)
    order = [rep, *(i for i in selected if i != rep)]
    painter: _Painter | None = None
    frames: dict[str, dict[int, RenderedFrame]] = {}
    thumbnail = b""
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    decoded = [(0, native, pi)] if native is not None else _decode(ds, order)
    for index, arr, pi in decoded:
        painter = painter or _Painter.create(ds, index, arr, pi, opts)
        for name, image in painter.images(index, arr, pi, extras=index in selected):
            if index == rep and name is None:
                thumbnail = _jpeg(_fit(image, opts.thumb_size, THUMB_GAP), opts)
            if index in selected:
                jpeg = _jpeg(image, opts)
                shown = painter.label if name is None else name
                done = RenderedFrame(index + 1, jpeg, image.width, image.height, shown)
                frames.setdefault(name or "", {})[index] = done
    assert painter is not None  # order is never empty: count >= 1
    default = frames.pop("", {})
    return Rendering(
        frames=[default[i] for i in sorted(default)],
        presets=[voi.preset() for voi in painter.presets],
        extra={name: [done[i] for i in sorted(done)] for name, done in frames.items()},
        thumbnail=thumbnail,
        summary=_summary(ds, count),
    )


def _frame_count(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent (PS3.3 C.7.6.6)."""
    try:
        count = int(get_nr_frames(ds, warn=False))
    except (TypeError, ValueError) as exc:
        raise _Unrenderable(f"invalid Number of Frames {ds.get('NumberOfFrames')!r}") from exc
    if count < 1:
        raise _Unrenderable(f"invalid Number of Frames {count}")
    return count


def _representative(ds: Dataset, count: int) -> int:
    """0-based index of Representative Frame Number (0028,6010), else the middle frame."""
    try:
        number = int(ds.get("RepresentativeFrameNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number - 1 if 1 <= number <= count else count // 2


def _decode(ds: Dataset, order: Sequence[int]) -> Iterator[tuple[int, np.ndarray, str]]:
    """Yield (index, native-endian array, Photometric Interpretation of the array)."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        decoder = get_decoder(syntax)
        # a view saves a copy, but pydicom must copy to clear unused high bits (PS3.5 8.1.1)
        # and warns if asked for a view then
        view_only = ds.get("BitsStored") == ds.get("BitsAllocated")
        frames = decoder.iter_array(ds, indices=order, view_only=view_only,
                                    **as_pixel_options(ds))
        for index, (arr, meta) in zip(order, frames, strict=True):
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            yield index, arr, str(meta.get("photometric_interpretation", "")).upper()
    except Exception as exc:  # pydicom and its plugins raise many types
        name = syntax.name or syntax
        raise _Unrenderable(f"cannot decode pixel data ({name}): {exc}") from exc


def _summary(ds: Dataset, count: int) -> dict[str, str]:
    """Display annotations, as str (pydicom decodes by Specific Character Set, PS3.5 6.1)."""
    out = {"rows": str(ds.Rows), "columns": str(ds.Columns), "frames": str(count)}
    for key, keyword in SUMMARY_KEYWORDS:
        value = ds.get(keyword)
        text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value or "")
        if text.strip():
            out[key] = text.strip()
    return out


# -- frame painting --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Painter:
    """Per-file state: the display mode, presets and output geometry."""

    ds: Dataset
    opts: _Options
    colour: bool
    label: str | None  # RenderedFrame.preset of the default frames
    presets: list[_Voi]  # presets the file offers (first = default); empty for colour
    extras: list[_Voi]  # the presets rendered besides the default
    auto: _Voi | None  # computed window when the file has no VOI
    invert: bool
    palette: np.ndarray | None  # PALETTE COLOR: (entries, 3) uint8 table ...
    first_mapped: int  # ... and the stored value of its first entry

    @classmethod
    def create(cls, ds: Dataset, index: int, arr: np.ndarray, pi: str,
               opts: _Options) -> _Painter:
        """Set up from the representative frame (its presets, its computed window)."""
        if pi not in GREY:
            palette, first = _palette(ds) if pi == "PALETTE COLOR" else (None, 0)
            return cls(ds, opts, True, None, [], [], None, False, palette, first)
        view = _frame_view(ds, index)
        presets = _presets(view)
        auto = None if presets else _auto_window(arr, view, ds)
        shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
        invert = pi == "MONOCHROME1" or shape == "INVERSE"
        extras = presets[1:1 + opts.max_presets]
        label = DEFAULT if presets else AUTO
        return cls(ds, opts, False, label, presets, extras, auto, invert, None, 0)

    def images(self, index: int, arr: np.ndarray, pi: str,
               extras: bool = True) -> Iterator[tuple[str | None, Image.Image]]:
        """(None, default image) then (preset name, image) per extra preset, display-sized.

        The default is the frame's own first VOI (enhanced objects may window each frame),
        else the representative frame's; extra presets apply the same values to every frame.
        """
        view = _frame_view(self.ds, index)
        size = _display_size(arr.shape[0], arr.shape[1], _aspect(view), self.opts.max_size)
        if self.colour:
            yield None, _resize(Image.fromarray(self._colour(arr, pi)), size)
            return
        own = _presets(view) if view is not self.ds else self.presets
        default = own[0] if own else self.presets[0] if self.presets else self.auto
        assert default is not None  # create() computes auto when there are no presets
        vois = [default, *(self.extras if extras else ())]
        for i, grey in enumerate(_grey(arr, view, vois, self.invert)):
            yield (vois[i].name if i else None), _resize(Image.fromarray(grey), size)

    def _colour(self, arr: np.ndarray, pi: str) -> np.ndarray:
        """RGB uint8 from RGB, YCbCr or palette data (PS3.3 C.7.6.3.1.2, C.7.6.3.1.5)."""
        if self.palette is not None:
            entries = len(self.palette)
            idx = np.clip(arr.astype(np.int64) - self.first_mapped, 0, entries - 1)
            return self.palette[idx]
        return _rgb(arr, pi, int(self.ds.get("BitsStored") or arr.dtype.itemsize * 8))


def _rgb(arr: np.ndarray, pi: str, bits: int) -> np.ndarray:
    """8-bit RGB from what the decoder returned: RGB, or YCbCr it left unconverted
    (PS3.3 C.7.6.3.1.2; YBR_ICT uses the YBR_FULL equations)."""
    if pi in YCBCR:
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif pi != "RGB":
        raise _Unrenderable(f"decoder returned unsupported colour space {pi!r}")
    return _to_8bit(arr, bits)


def _to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned samples of ``bits`` bits to 8 bits."""
    if arr.dtype == np.uint8:
        return arr
    shift = max(bits - 8, 0)
    return np.minimum(arr >> shift, 255).astype(np.uint8)


def _palette(ds: Dataset) -> tuple[np.ndarray, int]:
    """The palette as an (entries, 3) uint8 table and its first mapped value (C.7.6.3.1.5).

    pydicom expands normal and segmented LUT data; entries declared 16 bits but holding
    8-bit values (a common error) are taken as 8-bit.
    """
    try:
        entries, first, _bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        entries = entries or 65536
        table = apply_color_lut(np.arange(first, first + entries), ds)[..., :3]
    except Exception as exc:
        raise _Unrenderable(f"bad palette colour lookup table: {exc}") from exc
    if table.dtype != np.uint8 and table.max() > 255:
        table = table >> 8
    return np.ascontiguousarray(table, dtype=np.uint8), first


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The attributes that drive display of frame ``index`` (PS3.3 C.7.6.16).

    Enhanced multi-frame objects carry Pixel Spacing, rescale and windows in the shared and
    per-frame functional groups; these override the top level, per-frame winning. Other
    objects are returned unchanged.
    """
    shared = _item(ds.get("SharedFunctionalGroupsSequence"), 0)
    frame = _item(ds.get("PerFrameFunctionalGroupsSequence"), index)
    if shared is None and frame is None:
        return ds
    view = Dataset()
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # LUT Data in OW needs the byte order
    for keyword in VIEW_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    for group in (shared, frame):
        for macro in FG_MACROS:
            for elem in _item(group.get(macro) if group else None, 0) or ():
                view[elem.tag] = elem
    return view


def _item(seq: Any, index: int) -> Dataset | None:
    return seq[index] if seq and 0 <= index < len(seq) else None


# -- grey pipeline (PS3.4 N.2) ---------------------------------------------------------------


def _grey(arr: np.ndarray, view: Dataset, vois: Sequence[_Voi], invert: bool) -> list[np.ndarray]:
    """uint8 images of one grey frame, one per VOI: Modality LUT, VOI, polarity.

    Integer data of up to 16 bits is mapped through a lookup table built over the stored
    values present; other data (float, 32-bit) is transformed directly.
    """
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        domain = np.arange(int(arr.min()), int(arr.max()) + 1, dtype=np.int64)
        modality = _modality(domain, view)
        index = arr.view(f"u{arr.dtype.itemsize}")
        slots = domain & ((1 << (8 * arr.dtype.itemsize)) - 1)  # two's complement position
        out = []
        for voi in vois:
            lut = np.zeros(1 << (8 * arr.dtype.itemsize), dtype=np.uint8)
            lut[slots] = _display(modality, voi, invert)
            out.append(lut.take(index))
        return out
    modality = np.nan_to_num(_modality(arr, view).astype(np.float64))
    return [_display(modality, voi, invert) for voi in vois]


def _modality(values: np.ndarray, view: Dataset) -> np.ndarray:
    """Modality LUT (PS3.3 C.11.1): rescale or Modality LUT Sequence, via pydicom."""
    try:
        return apply_modality_lut(values, view)
    except Exception as exc:
        raise _Unrenderable(f"bad Modality LUT: {exc}") from exc


def _display(values: np.ndarray, voi: _Voi, invert: bool) -> np.ndarray:
    """VOI transformation to 0..255, then MONOCHROME1 / INVERSE polarity (C.7.6.3.1.2)."""
    if voi.function == "LUT":
        level = _voi_lut(values, voi)
    else:
        level = _window(values, voi.center, voi.width, voi.function)
    if invert:
        level = 255.0 - level
    return (level + 0.5).astype(np.uint8)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window Center/Width to 0..255 (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.1 SIGMOID,
    C.11.2.1.3.2 LINEAR_EXACT)."""
    x = x.astype(np.float64, copy=False)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows to inf far below the center: 0
            return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0) * 255.0
    if width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
        return np.where(x > center - 0.5, 255.0, 0.0)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0


def _voi_lut(values: np.ndarray, voi: _Voi) -> np.ndarray:
    """VOI LUT Sequence item to 0..255 (PS3.3 C.11.2.1.1): inputs outside the LUT take the
    first/last entry; output has LUT Descriptor bits (raised if the data exceed them)."""
    assert voi.source is not None
    item = voi.source.VOILUTSequence[voi.index]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    inputs = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
    try:
        out = apply_voi(inputs, voi.source, index=voi.index).astype(np.float64)
    except Exception as exc:
        raise _Unrenderable(f"bad VOI LUT: {exc}") from exc
    top = float(out.max()) if out.size else 0.0
    full = float((1 << max(bits, 1)) - 1)
    if top > full:
        full = float((1 << int(top).bit_length()) - 1)
    return out * (255.0 / full)


def _presets(view: Dataset) -> list[_Voi]:
    """VOI LUT Sequence items, then Window Center/Width pairs (PS3.3 C.11.2); names unique."""
    vois = _voi_luts(view) + _windows(view)
    seen: set[str] = set()
    out = []
    for voi in vois:
        name, n = voi.name, 2
        while name in seen or name in (DEFAULT, AUTO):
            name, n = f"{voi.name} ({n})", n + 1
        seen.add(name)
        out.append(voi if name == voi.name else _Voi(name, voi.center, voi.width, voi.function,
                                                     voi.source, voi.index))
    return out


def _voi_luts(view: Dataset) -> list[_Voi]:
    out = []
    for i, item in enumerate(view.get("VOILUTSequence") or ()):
        desc = item.get("LUTDescriptor")
        if not desc or len(desc) != 3 or "LUTData" not in item:
            continue
        entries, first = int(desc[0]) or 65536, int(desc[1])
        name = str(item.get("LUTExplanation") or "").strip() or f"LUT {i + 1}"
        out.append(_Voi(name, first + entries / 2, float(entries), "LUT", view, i))
    return out


def _windows(view: Dataset) -> list[_Voi]:
    """Valid (finite, width > 0) Window Center/Width pairs, named by their Explanation."""
    centers = _numbers(view.get("WindowCenter"))
    widths = _numbers(view.get("WindowWidth"))
    names = _texts(view.get("WindowCenterWidthExplanation"))
    function = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        log.debug("unknown VOI LUT Function %r, using LINEAR", function)
        function = "LINEAR"
    out = []
    for i, (center, width) in enumerate(zip(centers, widths, strict=False)):
        if math.isfinite(center) and math.isfinite(width) and width > 0:
            name = names[i] if i < len(names) and names[i] else f"Window {i + 1}"
            out.append(_Voi(name, center, width, function))
    return out


def _numbers(value: Any) -> list[float]:
    """Numeric values of a DS/IS/US element value, NaN for the unreadable ones."""
    out: list[float] = []
    for v in _values(value):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _texts(value: Any) -> list[str]:
    return [str(v).strip() for v in _values(value)]


def _values(value: Any) -> list[Any]:
    """An element value as a list (empty for None, one item for a single value)."""
    if value is None:
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _auto_window(arr: np.ndarray, view: Dataset, ds: Dataset) -> _Voi:
    """Window over the 0.5th-99.5th percentile of the modality values, padding excluded."""
    values, counts = _histogram(arr, view, _padding(ds))
    if counts.sum() == 0:
        values, counts = _histogram(arr, view, None)
    lo, hi = _percentiles(values, counts)
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    return _Voi(AUTO, (lo + hi) / 2, hi - lo, "LINEAR_EXACT")


def _padding(ds: Dataset) -> tuple[int, int] | None:
    """Stored-value range of Pixel Padding Value / Range Limit (PS3.3 C.7.5.1.1.2)."""
    try:
        value = ds.get("PixelPaddingValue")
        if value is None:
            return None
        limit = ds.get("PixelPaddingRangeLimit", value)
        return min(int(value), int(limit)), max(int(value), int(limit))
    except (TypeError, ValueError):
        return None


def _histogram(arr: np.ndarray, view: Dataset,
               padding: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(modality value, pixel count) pairs of a grey frame, padding values left out."""
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        bits = 8 * arr.dtype.itemsize
        domain = np.arange(int(arr.min()), int(arr.max()) + 1, dtype=np.int64)
        counts = np.bincount(arr.view(f"u{arr.dtype.itemsize}").ravel(), minlength=1 << bits)
        counts = counts[domain & ((1 << bits) - 1)]
        if padding is not None:
            counts[(domain >= padding[0]) & (domain <= padding[1])] = 0
        keep = counts > 0
        return _modality(domain[keep], view).astype(np.float64), counts[keep]
    flat = arr.ravel()[:: max(1, arr.size // AUTO_SAMPLE)]
    if padding is not None and flat.dtype.kind in "iu":
        flat = flat[(flat < padding[0]) | (flat > padding[1])]
    values = _modality(flat, view).astype(np.float64)
    values = values[np.isfinite(values)]
    return values, np.ones(values.shape, dtype=np.int64)


def _percentiles(values: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """AUTO_PERCENTILES of a weighted sample; min-max if that range is empty."""
    if values.size == 0:
        return math.nan, math.nan
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(counts[order])
    picks = np.searchsorted(cum, np.asarray(AUTO_PERCENTILES) / 100.0 * cum[-1], side="left")
    lo, hi = (float(values[min(i, values.size - 1)]) for i in picks)
    if hi <= lo:
        lo, hi = float(values[0]), float(values[-1])
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


# -- geometry and encoding -------------------------------------------------------------------


def _aspect(view: Dataset) -> float:
    """Vertical / horizontal pixel size: Pixel Spacing (row, column spacing; C.7.6.2.1.1),
    Imager or Nominal Scanned Pixel Spacing, else Pixel Aspect Ratio (C.7.6.3.1.7)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing",
                    "PixelAspectRatio"):
        pair = _numbers(view.get(keyword))
        if len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair):
            ratio = pair[0] / pair[1]
            if ASPECT_LIMITS[0] <= ratio <= ASPECT_LIMITS[1]:
                return 1.0 if abs(ratio - 1.0) < 0.01 else ratio
            return 1.0
    return 1.0


def _display_size(rows: int, columns: int, aspect: float, max_size: int) -> tuple[int, int]:
    """(width, height) with square pixels, reduced (never enlarged) to fit ``max_size``."""
    width, height = float(columns), float(rows)
    if aspect > 1.0:
        height *= aspect
    else:
        width /= aspect
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize(image: Image.Image, size: tuple[int, int], gap: float = RESIZE_GAP) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=gap)


def _fit(image: Image.Image, limit: int, gap: float) -> Image.Image:
    """``image`` reduced so that its longest side is at most ``limit``."""
    scale = min(1.0, limit / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return _resize(image, size, gap)


def _jpeg(image: Image.Image, opts: _Options) -> bytes:
    """Baseline sequential JPEG (ISO 10918-1 SOF0), Huffman tables optimised by default."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=opts.quality, optimize=opts.optimize,
               progressive=False, subsampling=0)
    return buf.getvalue()
