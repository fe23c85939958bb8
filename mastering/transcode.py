"""Lossless transfer-syntax conversion of one DICOM file for a media profile.

The general-purpose media profiles (PS3.11 Annexes D, H, J, M) allow only a few transfer
syntaxes in the files of a File-set. A file in any other syntax is rewritten here as a complete
DICOM File Format file (PS3.10 section 7) in **Explicit VR Little Endian** (PS3.5 A.2):

* Implicit VR Little Endian (PS3.5 A.1), Explicit VR Big Endian (retired, PS3.5 A.3) and
  Deflated Explicit VR Little Endian (PS3.5 A.5) are *re-encoded*: every element keeps its value,
  only the encoding changes. Big endian OW/OF/OL/OD/OV values are byte-swapped here, because
  pydicom only converts the numeric VRs (US, SS, UL, FL, ...) itself.
* Encapsulated pixel data (PS3.5 A.4: JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE) is *decompressed* with
  pydicom's decoding plugins, and if none of them can decode it, with DCMTK's ``dcmdjpeg``,
  ``dcmdjpls`` or ``dcmdrle``. Nothing is ever compressed, and the SOP Instance UID is kept:
  decompression does not change the pixel values a reader sees (PS3.4 and PS3.3 C.12.1.1.1).
  Only what decoding implies changes: Pixel Data, Photometric Interpretation (YCbCr -> RGB where
  the decoder converts colour), Planar Configuration, Number of Frames (if the decoder found more
  than one frame) and the lossy-compression history of PS3.3 C.7.6.1.1.5.

Group length elements (gggg,0000) are not written: they are retired (PS3.5 7.2) and would be
wrong after re-encoding. Elements of group 0000 or 0002 found in the data set are not allowed
there (PS3.10 7.1) and are dropped as well.
"""

from __future__ import annotations

import io
import logging
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import UID
from pydicom.valuerep import VR

LOGGER = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

_JPEG_PREFIX = "1.2.840.10008.1.2.4."
#: JPEG processes (PS3.5 A.4.1, PS3.6 Table A-1) that are lossy: DCT based, incl. retired ones.
_JPEG_LOSSY = frozenset(
    _JPEG_PREFIX + str(n) for n in (50, 51, 52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)
)
_JPEG_ALL = frozenset(_JPEG_PREFIX + str(n) for n in range(50, 71))
_JPEG_LS = frozenset({_JPEG_PREFIX + "80", _JPEG_PREFIX + "81"})
_JPEG_LS_NEAR_LOSSLESS = _JPEG_PREFIX + "81"
#: JPEG 2000 / HTJ2K syntaxes whose code-stream may be irreversible (PS3.5 A.4.4, A.4.11).
_J2K_MAYBE_LOSSY = MappingProxyType(
    {_JPEG_PREFIX + "91": "ISO_15444_1", _JPEG_PREFIX + "203": "ISO_15444_15"}
)
_JPEG_LOSSLESS_SYNTAXES = frozenset(
    _JPEG_PREFIX + str(n) for n in (57, 58, 65, 66, 70, 80, 90, 201, 202)
) | {RLE_LOSSLESS}

#: DCMTK command-line decoders used when no Python plugin decodes a syntax. ``+ud`` keeps the
#: SOP Instance UID, ``+te`` writes Explicit VR Little Endian, ``+px`` colour-by-pixel.
_DCMTK_JPEG = ("dcmdjpeg", "+ud", "+te", "+cp", "+px")
_DCMTK_JPEG_LS = ("dcmdjpls", "+ud", "+te", "+px")
_DCMTK_RLE = ("dcmdrle", "+ud", "+te")
_DCMTK_TIMEOUT_S = 900

#: Bytes per swapped unit of the "other" VRs in big endian (PS3.5 7.3 and Table 6.2-1).
_SWAP_WIDTH = MappingProxyType({"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8})
_PIXEL_DATA = 0x7FE00010
_PREAMBLE = b"\x00" * 128


class TranscodeError(Exception):
    """A file could not be converted; the message is ``"<path>: <reason>"``."""


@dataclass(frozen=True)
class TranscodeResult:
    """What :func:`transcode` did with one file."""

    source_ts: str  # transfer syntax the source was read in (the body's, after VR-switch detection)
    target_ts: str  # transfer syntax written
    action: str  # "reencode" (no pixel decode) or "decompress"
    decoder: str | None  # "pylibjpeg", "gdcm", "pydicom", "dcmdjpeg", "dcmdjpls", "dcmdrle" or None
    bytes_written: int


@dataclass(frozen=True)
class _Plan:
    """Source syntax, target syntax and the kind of conversion for one data set."""

    source_ts: str
    pixel_ts: str | None  # syntax of encapsulated pixel data that must be decoded, else None
    target_ts: str


@dataclass(frozen=True)
class _LossyInfo:
    """Lossy-compression history to record after decoding (PS3.3 C.7.6.1.1.5)."""

    method: str
    ratio: str | None


def needs_transcode(ts: str, allowed: Sequence[str]) -> bool:
    """True if files in `ts` must be converted for a profile allowing `allowed`.

    PS3.11 profiles list the syntaxes a File-set may contain (e.g. Annex D: Explicit VR Little
    Endian only; Annex H/J: plus the JPEG or the JPEG 2000 set). Only the Transfer Syntax UID is
    compared; a body that disagrees with its meta header is detected by :func:`transcode`.
    """
    return _clean_uid(ts) not in {_clean_uid(a) for a in allowed}


def transcode(
    src: Path,
    dst: BinaryIO,
    allowed: Sequence[str],
    *,
    implementation_class_uid: str,
    implementation_version_name: str,
    opener: Callable[[str], BinaryIO] | None = None,
    scratch: Path | None = None,
) -> TranscodeResult:
    """Write src as a complete Part 10 file (128-byte zero preamble, 'DICM', group 0002 meta with
    Media Storage SOP Class/Instance UID taken from the data set, Transfer Syntax = target,
    Implementation Class UID / Version Name as given) into dst, in a transfer syntax in `allowed`.

    A source already in an allowed syntax (and whose body matches its meta header) is rewritten
    in that syntax with a fresh meta header (``action == "reencode"``, ``target_ts ==
    source_ts``). Otherwise the target is Explicit VR Little Endian (PS3.5 A.2).

    Raises :class:`TranscodeError` (``"<path>: <reason>"``) on any failure. Bytes may already
    have reached `dst` then: a seekable `dst` is truncated back to where it started, anything
    else must be discarded by the caller.
    """
    _check_implementation(implementation_class_uid, implementation_version_name)
    src = Path(src)
    allowed_set = frozenset(_clean_uid(a) for a in allowed)
    start = _tell_or_none(dst)
    out = _CountingWriter(dst)
    try:
        result = _transcode(
            src, out, allowed_set, implementation_class_uid, implementation_version_name,
            opener, scratch
        )
    except Exception as exc:
        _rollback(dst, start)
        if isinstance(exc, TranscodeError):
            raise
        raise TranscodeError(f"{src}: {_reason(exc)}") from exc
    LOGGER.debug(
        "%s: %s %s -> %s (%s), %d bytes",
        src,
        result.action,
        result.source_ts,
        result.target_ts,
        result.decoder,
        result.bytes_written,
    )
    return result


def _transcode(
    src: Path, out: _CountingWriter, allowed: frozenset[str], impl_uid: str, impl_version: str,
    opener: Callable[[str], BinaryIO] | None = None, scratch: Path | None = None,
) -> TranscodeResult:
    """Read, convert and write one file; raise on any problem. `opener` reads sources that
    are not plain files (a file inside an ISO image)."""
    if opener is None:
        ds = dcmread(src, force=True)
    else:
        with opener(str(src)) as fh:
            ds = dcmread(fh, force=True)
    _sync_body_encoding(ds)
    sop_instance_uid = _required_uid(ds, "SOPInstanceUID")
    _required_uid(ds, "SOPClassUID")
    plan = _plan(ds, allowed)
    decoder: str | None = None
    if plan.pixel_ts is None:
        _reencode(ds)
    else:
        ds, decoder = _decompress(ds, src, plan.pixel_ts, opener, scratch)
    if _required_uid(ds, "SOPInstanceUID") != sop_instance_uid:
        raise RuntimeError("the SOP Instance UID changed while decoding")
    _write(out, ds, plan.target_ts, impl_uid, impl_version)
    action = "reencode" if plan.pixel_ts is None else "decompress"
    return TranscodeResult(plan.source_ts, plan.target_ts, action, decoder, out.count)


# --- planning -----------------------------------------------------------------------------


def _plan(ds: Dataset, allowed: frozenset[str]) -> _Plan:
    """Decide the source syntax, the target syntax and whether pixel data must be decoded.

    The body's encoding is taken from what pydicom actually read (it detects a VR switch,
    PS3.5 A.1/A.2), so a meta header that lies about implicit/explicit VR is corrected.
    """
    body_ts = _body_ts(ds)
    meta_ts = _clean_uid(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if not meta_ts:
        return _plan_native(body_ts, allowed)
    uid = UID(meta_ts)
    if not uid.is_transfer_syntax:
        raise ValueError(f"unsupported transfer syntax {meta_ts}")
    if uid.is_deflated:
        deflated_ok = body_ts == EXPLICIT_VR_LITTLE_ENDIAN
        return _plan_native(meta_ts if deflated_ok else body_ts, allowed)
    if not uid.is_encapsulated:
        return _plan_native(body_ts, allowed)
    if meta_ts in allowed:
        if body_ts != EXPLICIT_VR_LITTLE_ENDIAN:
            LOGGER.debug("encapsulated data set body is %s; rewriting it explicit VR", body_ts)
        return _Plan(meta_ts, None, meta_ts)
    if not _has_encapsulated_pixels(ds):
        if "PixelData" in ds:
            raise ValueError(f"pixel data is not encapsulated although the syntax is {meta_ts}")
        return _Plan(meta_ts, None, _ele_target(allowed))
    return _Plan(meta_ts, meta_ts, _ele_target(allowed))


def _plan_native(source_ts: str, allowed: frozenset[str]) -> _Plan:
    """Plan for a data set without encapsulated pixel data."""
    if source_ts in allowed:
        return _Plan(source_ts, None, source_ts)
    return _Plan(source_ts, None, _ele_target(allowed))


def _ele_target(allowed: frozenset[str]) -> str:
    """Explicit VR Little Endian, the only target (PS3.11 profiles; never lossy)."""
    if EXPLICIT_VR_LITTLE_ENDIAN not in allowed:
        raise ValueError(
            "the profile does not allow Explicit VR Little Endian (never re-compressed)"
        )
    return EXPLICIT_VR_LITTLE_ENDIAN


def _sync_body_encoding(ds: Dataset) -> None:
    """Make ``original_encoding`` tell how the body was really read.

    pydicom detects a VR switch (meta says explicit, body is implicit or the reverse) when it
    parses the elements, but the top-level data set keeps the meta header's encoding. The
    still-raw elements know the truth; the writer needs it to convert them.
    """
    for tag in ds.keys():  # noqa: SIM118 - Dataset iteration would decode every element
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            found = (bool(elem.is_implicit_VR), bool(elem.is_little_endian))
            if found != ds.original_encoding:
                LOGGER.debug("body encoding %s differs from the meta header", found)
                ds.set_original_encoding(*found)
            return


def _body_ts(ds: Dataset) -> str:
    """The uncompressed syntax the body was actually decoded in."""
    implicit, little = ds.original_encoding
    if implicit:
        return IMPLICIT_VR_LITTLE_ENDIAN
    return EXPLICIT_VR_LITTLE_ENDIAN if little in (True, None) else EXPLICIT_VR_BIG_ENDIAN


def _has_encapsulated_pixels(ds: Dataset) -> bool:
    """True if (7FE0,0010) is present with undefined length (PS3.5 A.4)."""
    return "PixelData" in ds and ds["PixelData"].is_undefined_length


# --- re-encoding ---------------------------------------------------------------------------


def _reencode(ds: Dataset) -> None:
    """Prepare a data set for writing in another uncompressed encoding.

    pydicom converts the numeric VRs itself; big endian OB/OW-like values are byte-swapped here
    (PS3.5 7.3). Implicit VR values keep their bytes; pydicom resolves the ambiguous VRs
    (PS3.5 A.1 Pixel Data OW, US/SS by Pixel Representation) when writing.
    """
    if ds.original_encoding[1] is False:
        _swap_big_endian(ds)


def _swap_big_endian(ds: Dataset) -> None:
    """Byte-swap every OW/OF/OL/OD/OV value (and big endian Pixel Data) in `ds`, recursively."""
    for elem in ds:  # iterating converts raw elements into decoded data elements
        if elem.VR == VR.SQ:
            for item in elem.value:
                _swap_big_endian(item)
        elif elem.tag == _PIXEL_DATA and not elem.is_undefined_length:
            elem.value = _swap(elem.value, _pixel_swap_width(ds, elem.VR))
        elif elem.VR in _SWAP_WIDTH and elem.value:
            elem.value = _swap(elem.value, _SWAP_WIDTH[elem.VR])
        elif elem.VR == VR.UN and elem.value:
            LOGGER.debug("big endian UN element %s kept as read", elem.tag)


def _pixel_swap_width(ds: Dataset, vr: str) -> int:
    """Swap unit for big endian native Pixel Data, matching pydicom's reading of it.

    Pixel cells wider than 8 bits are big endian integers of Bits Allocated (the OW of a 32-bit
    image is swapped per 32-bit cell, as pydicom and the Big Endian test data do); 1- and 8-bit
    data is only swapped when held as OW (16-bit words, PS3.5 A.3).
    """
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if bits > 8:
        return bits // 8
    return 2 if vr == VR.OW else 1


def _swap(value: bytes, width: int) -> bytes:
    """Reverse the byte order of each `width`-byte unit in `value`."""
    if width == 1 or not value:
        return value
    if len(value) % width:
        raise ValueError(f"big endian value of {len(value)} bytes is not a multiple of {width}")
    return np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


# --- decompression -------------------------------------------------------------------------


def _decompress(ds: Dataset, src: Path, ts: str,
                opener: Callable[[str], BinaryIO] | None = None,
                scratch: Path | None = None) -> tuple[Dataset, str]:
    """Decode all encapsulated pixel data; return the data set and the decoder used."""
    lossy = _lossy_info(ds, ts)
    errors: list[str] = []
    plugin = _decode_python(ds, ts, errors)
    if plugin is not None:
        _decode_nested(ds, ts)
        _record_lossy(ds, lossy)
        return ds, plugin
    tool = _dcmtk_tool(ts)
    if tool is None:
        raise RuntimeError(f"no decoder for {UID(ts).name}: " + "; ".join(errors))
    del ds["PixelData"]  # free the compressed data before DCMTK's output is read
    decoded = _decode_dcmtk(src, tool, errors, opener, scratch)
    _record_lossy(decoded, lossy)
    return decoded, tool[0]


def _decode_python(ds: Dataset, ts: str, errors: list[str]) -> str | None:
    """Decode the Pixel Data of `ds` with the first pydicom plugin that succeeds, or None."""
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError as exc:
        errors.append(_reason(exc))
        return None
    for name in _plugin_order(decoder):
        try:
            _decode_into(ds, ts, decoder, name)
        except Exception as exc:  # noqa: BLE001 - every plugin failure means "try the next"
            errors.append(f"{name}: {_reason(exc)}")
            continue
        return name
    if not errors:
        errors.append("no pydicom decoding plugin is installed")
    return None


def _decode_nested(ds: Dataset, ts: str) -> None:
    """Decode encapsulated pixel data inside sequences (e.g. Icon Image Sequence)."""
    for item in _nested_items(ds):
        errors: list[str] = []
        if _has_encapsulated_pixels(item) and _decode_python(item, ts, errors) is None:
            raise RuntimeError("cannot decode nested pixel data: " + "; ".join(errors))


def _nested_items(ds: Dataset) -> Iterator[Dataset]:
    """Every sequence item below `ds`, depth first."""
    for elem in ds:
        if elem.VR == VR.SQ:
            for item in elem.value:
                yield item
                yield from _nested_items(item)


def _plugin_order(decoder: Any) -> list[str]:
    """Plugins in pydicom's own order of preference (so results match ``pixel_array``)."""
    preferred = list(getattr(decoder, "_available", {}))
    return preferred or list(decoder.available_plugins)


def _decode_into(ds: Dataset, ts: str, decoder: Any, plugin: str) -> None:
    """Replace encapsulated Pixel Data in `ds` by its decoded native form (PS3.5 8.1, 8.2)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    # Colour conversion is lossy; keep YCbCr when the source itself is lossless.
    as_rgb = not (ts in _JPEG_LOSSLESS_SYNTAXES and photometric.startswith("YBR_FULL"))
    arr, pixel = decoder.as_array(ds, decoding_plugin=plugin, as_rgb=as_rgb)
    frames = int(pixel.get("number_of_frames", 1) or 1)
    bits = int(ds.BitsAllocated)
    data = pack_bits(arr) if bits == 1 else arr.tobytes()
    del arr
    if len(data) % 2:
        data += b"\x00"  # PS3.5 8.1.1: even length
    elem = ds["PixelData"]
    elem.value = data
    elem.VR = VR.OW if bits > 8 else VR.OB
    elem.is_undefined_length = False
    _update_image_pixel(ds, pixel, frames)


def _update_image_pixel(ds: Dataset, pixel: dict[str, Any], frames: int) -> None:
    """Apply the Image Pixel changes decoding implies (PS3.3 C.7.6.3)."""
    photometric = str(pixel.get("photometric_interpretation") or ds.PhotometricInterpretation)
    if photometric == "YBR_FULL_422":
        photometric = "YBR_FULL"  # decoders up-sample; native 4:2:2 has another layout
    if photometric != ds.get("PhotometricInterpretation"):
        ds.PhotometricInterpretation = photometric
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = int(pixel.get("planar_configuration", 0) or 0)
    changed = str(ds.get("NumberOfFrames", "")).strip() != str(frames)
    if changed and ("NumberOfFrames" in ds or frames > 1):
        ds.NumberOfFrames = frames


def _dcmtk_tool(ts: str) -> tuple[str, ...] | None:
    """The DCMTK decoder command for `ts`, or None."""
    if ts in _JPEG_ALL:
        return _DCMTK_JPEG
    if ts in _JPEG_LS:
        return _DCMTK_JPEG_LS
    if ts == RLE_LOSSLESS:
        return _DCMTK_RLE
    return None


def _decode_dcmtk(src: Path, tool: tuple[str, ...], errors: list[str],
                  opener: Callable[[str], BinaryIO] | None = None,
                  scratch: Path | None = None) -> Dataset:
    """Decode `src` with a DCMTK tool into a temporary file and read that back. A source
    that is not a plain file is copied next to it first (DCMTK reads files by name). The
    temporary files hold patient data: they go into scratch (the run's work folder, on the
    output's file system and removed with it), the system's temporary folder only without."""
    exe = shutil.which(tool[0])
    if exe is None:
        raise RuntimeError("; ".join([*errors, f"{tool[0]} is not installed"]))
    with tempfile.TemporaryDirectory(prefix="transcode-", dir=scratch) as tmp:
        out = Path(tmp) / "decoded.dcm"
        if opener is not None and not src.exists():
            local = Path(tmp) / "source.dcm"
            with opener(str(src)) as fh, open(local, "wb") as copy:
                shutil.copyfileobj(fh, copy, 1 << 20)
            src = local
        proc = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            [exe, *tool[1:], str(src), str(out)],
            capture_output=True,
            timeout=_DCMTK_TIMEOUT_S,
            check=False,
        )
        LOGGER.debug(
            "%s exit %d: %s",
            tool[0],
            proc.returncode,
            proc.stderr.decode("utf-8", "replace").strip(),
        )
        if proc.returncode != 0 or not out.is_file():
            message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = message[-1] if message else f"exit status {proc.returncode}"
            raise RuntimeError("; ".join([*errors, f"{tool[0]}: {detail}"]))
        decoded = dcmread(out)
    ts = _clean_uid(decoded.file_meta.get("TransferSyntaxUID", ""))
    if ts != EXPLICIT_VR_LITTLE_ENDIAN or _has_encapsulated_pixels(decoded):
        raise RuntimeError(f"{tool[0]} did not write uncompressed Explicit VR Little Endian")
    return decoded


# --- lossy compression history (PS3.3 C.7.6.1.1.5) ------------------------------------------


def _lossy_info(ds: Dataset, ts: str) -> _LossyInfo | None:
    """The Lossy Image Compression Method for `ts`, or None if the source is lossless."""
    method = _lossy_method(ts, _first_fragment(ds))
    if method is None:
        return None
    return _LossyInfo(method, _compression_ratio(ds))


def _lossy_method(ts: str, fragment: bytes) -> str | None:
    """PS3.3 C.7.6.1.1.5.1 defined term for a lossy source, None if it is lossless."""
    if ts in _JPEG_LOSSY:
        return "ISO_10918_1"
    if ts == _JPEG_LS_NEAR_LOSSLESS:
        near = _jpeg_ls_near(fragment)
        return None if near == 0 else "ISO_14495_1"
    if ts in _J2K_MAYBE_LOSSY:
        reversible = _j2k_reversible(fragment)
        return None if reversible else _J2K_MAYBE_LOSSY[ts]
    return None


def _record_lossy(ds: Dataset, lossy: _LossyInfo | None) -> None:
    """Record a lossy source in the General Image Module (PS3.3 C.7.6.1.1.5).

    Lossy Image Compression becomes "01". Existing Method/Ratio values are kept (they may list
    earlier lossy steps); a missing Method is added when it can be paired with the Ratio
    values, and a missing Ratio is computed only when both are missing.
    """
    if lossy is None:
        return
    if ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
    if ds.get("LossyImageCompressionMethod"):
        return
    ratio = ds.get("LossyImageCompressionRatio")
    if not ratio:
        ds.LossyImageCompressionMethod = lossy.method
        if lossy.ratio is not None:
            ds.LossyImageCompressionRatio = lossy.ratio
    elif ds["LossyImageCompressionRatio"].VM == 1:
        ds.LossyImageCompressionMethod = lossy.method


def _first_fragment(ds: Dataset) -> bytes:
    """The first fragment of encapsulated Pixel Data (holds the code-stream's main header)."""
    try:
        buffer = DicomBytesIO(ds.PixelData)
        buffer.is_little_endian = True
        parse_basic_offsets(buffer)
        return next(generate_fragments(buffer), b"")
    except (AttributeError, TypeError, ValueError):
        return b""


def _compression_ratio(ds: Dataset) -> str | None:
    """Uncompressed size over compressed size, as a DS value (PS3.3 C.7.6.1.1.5.2)."""
    try:
        buffer = DicomBytesIO(ds.PixelData)
        buffer.is_little_endian = True
        parse_basic_offsets(buffer)
        compressed = sum(len(fragment) for fragment in generate_fragments(buffer))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if compressed <= 0 or bits <= 0:
        return None
    return f"{bits / 8 / compressed:.2f}"[:16]


def _jpeg_ls_near(stream: bytes) -> int | None:
    """NEAR parameter of the first JPEG-LS scan (ISO 14495-1 C.2.3), None if not found."""
    pos = 2 if stream[:2] == b"\xff\xd8" else 0
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", stream[pos + 2 : pos + 4])
        if marker == 0xDA:
            count = stream[pos + 4] if pos + 4 < len(stream) else 0
            near_at = pos + 5 + 2 * count
            return stream[near_at] if near_at < len(stream) else None
        pos += 2 + length
    return None


def _j2k_reversible(stream: bytes) -> bool | None:
    """True if the JPEG 2000 COD segment names the reversible 5-3 wavelet (ISO 15444-1 A.6.1).

    None if the main header cannot be read (then the source is treated as lossy).
    """
    pos = stream.find(b"\xff\x4f\xff\x51")
    if pos < 0:
        return None
    pos += 2
    while pos + 4 <= len(stream):
        marker, length = struct.unpack(">HH", stream[pos : pos + 4])
        if marker == 0xFF52:  # COD: Scod, SGcod (4), SPcod: levels, xcb, ycb, style, transform
            transform_at = pos + 4 + 9
            return stream[transform_at] == 1 if transform_at < len(stream) else None
        if marker == 0xFF90 or marker < 0xFF00:  # SOT: end of the main header
            return None
        pos += 2 + length
    return None


# --- writing -------------------------------------------------------------------------------


def _write(out: _CountingWriter, ds: Dataset, ts: str, impl_uid: str, impl_version: str) -> None:
    """Write `ds` as a PS3.10 file: preamble, 'DICM', group 0002, data set in `ts`."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = _required_uid(ds, "SOPClassUID")
    meta.MediaStorageSOPInstanceUID = _required_uid(ds, "SOPInstanceUID")
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = impl_uid
    meta.ImplementationVersionName = impl_version
    _drop_foreign_groups(ds)
    _fix_pixel_vr(ds, ts)
    ds.file_meta = meta
    ds.preamble = _PREAMBLE
    dcmwrite(out, ds, enforce_file_format=True)


def _drop_foreign_groups(ds: Dataset) -> None:
    """Remove group 0000/0002 elements from the data set body (PS3.10 7.1)."""
    for group in (0x0000, 0x0002):
        for elem in ds.group_dataset(group):
            LOGGER.debug("dropping %s from the data set body", elem.tag)
            del ds[elem.tag]


def _fix_pixel_vr(ds: Dataset, ts: str) -> None:
    """Native Pixel Data is OW when Bits Allocated > 8 (PS3.5 A.2)."""
    elem = ds.get("PixelData")
    if not isinstance(elem, DataElement) or elem.is_undefined_length or UID(ts).is_encapsulated:
        return
    if elem.VR == VR.OB and int(ds.get("BitsAllocated", 8) or 8) > 8:
        elem.VR = VR.OW


# --- helpers -------------------------------------------------------------------------------


class _CountingWriter:
    """Forward writes to a binary stream, counting bytes; seek/tell as pydicom needs them."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        while view:
            written = self._raw.write(view)
            written = len(view) if written is None else written
            if written <= 0:
                raise OSError("short write to the destination stream")
            view = view[written:]
            self.count += written
        return len(data)

    def tell(self) -> int:
        return self.count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.count + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target != self.count:
            raise io.UnsupportedOperation("the destination stream is written sequentially")
        return self.count


def _check_implementation(uid: str, version: str) -> None:
    """Reject values PS3.10 7.1 does not allow in (0002,0012) and (0002,0013)."""
    if not uid or len(uid) > 64 or not UID(uid).is_valid:
        raise ValueError(f"invalid Implementation Class UID {uid!r}")
    if not version or len(version) > 16:
        raise ValueError(f"Implementation Version Name must be 1-16 characters: {version!r}")


def _required_uid(ds: Dataset, keyword: str) -> str:
    """A UID the data set must have (SOP Common Module, PS3.3 C.12.1)."""
    value = _clean_uid(str(ds.get(keyword, "") or ""))
    if not value:
        raise ValueError(f"no {keyword} in the data set")
    return value


def _clean_uid(value: str) -> str:
    """A UID without the NUL/space padding some writers leave (PS3.5 9.1)."""
    return str(value).strip().rstrip("\x00").strip()


def _tell_or_none(stream: BinaryIO) -> int | None:
    """Current position of a seekable stream, else None."""
    try:
        return stream.tell() if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _rollback(stream: BinaryIO, start: int | None) -> None:
    """Cut a seekable stream back to `start` after a failure (best effort)."""
    if start is None:
        return
    try:
        stream.seek(start)
        stream.truncate()
    except (AttributeError, OSError, ValueError):
        LOGGER.debug("could not truncate the destination after a failure")


def _reason(exc: BaseException) -> str:
    """One-line description of an exception."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
