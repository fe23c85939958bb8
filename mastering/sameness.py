"""Are two files the same object? Compared by value, whatever their encodings.

Two files with one SOP Instance UID are one object (PS3.3 C.12.1.1.1) when their data sets
hold the same values: the transfer syntax is only an encoding (PS3.5 chapter 10), so a big
endian copy, an implicit VR copy, a deflated copy and a losslessly compressed copy of one
image are the same object. Anything else that differs makes them two objects: keeping one
"copy" would lose the other's content. What is compared:

* every data element but the File Meta Information (group 0002, the wrapper), group lengths
  (retired, PS3.5 7.2) and Data Set Trailing Padding (FFFC,FFFC: "no meaning", PS3.10 7.2), by
  its encoded value: text byte for byte with its padding removed (PS3.5 6.2; "1" and "1.0" are
  different values), numbers and OW/OF/OD/OL/OV/AT words byte for byte in little endian order
  (PS3.5 7.3: only the byte order is the encoding; -0.0 is not 0.0), OB and UN byte for byte
  (UN read as the VR its twin has, PS3.5 6.2.2), sequences item by item, nested pixel data
  (an Icon Image Sequence) included;
* the top-level pixel data as stored when it is native: every byte of the value, bits above
  Bits Stored and bytes after the last frame included, words in little endian order and colour
  samples by pixel (Planar Configuration, PS3.3 C.7.6.3.1.3, only orders them). Encapsulated
  pixel data is compared by its fragments (identical bytes) or else frame by frame as decoded
  values, one frame of each file in memory at a time. Attributes that only describe an
  encoding (Planar Configuration; a Derivation Description naming the lossless compression
  and YBR_RCT/YBR_ICT for the RGB they decode to, between different transfer syntaxes) are
  judged by the pixels.

A deflated data set (PS3.5 A.5) is inflated into an unnamed temporary file and compared from
there, so memory does not grow with the size of the object. A lossy transfer syntax is never
"the same" as another encoding: it has other values.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID

Opener = Callable[[str], BinaryIO]

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
PADDING = 0xFFFCFFFC
PLANAR_CONFIGURATION = 0x00280006
#: describes an encoding, compared only between files of one transfer syntax: the
#: Derivation Description encoders such as dcmcjpeg add for a lossless compression
ENCODING_ONLY = frozenset({0x00082111})
SAME_COLOUR = {b"YBR_RCT": b"RGB", b"YBR_ICT": b"RGB"}  # PS3.5 8.2.4: decode to RGB
LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
#: byte-order unit of the binary VRs (PS3.5 7.3); AT is a pair of 16-bit numbers
WIDTHS = {"AT": 2, "FD": 8, "FL": 4, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2, "SL": 4,
          "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
_LOSSY = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 52, 53, 54, 55, 56, 59, 60, 61,
                                                         62, 63, 64, 81, 91, 100, 101, 102,
                                                         103, 104, 105, 106, 107, 108, 203))
IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                         "1.2.840.10008.1.2.2")
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED})
CHUNK = 1 << 20


def _open(path: str) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - closed by the caller's ExitStack


def digest(path: str, opener: Opener = _open) -> str:
    h = hashlib.sha256()
    with opener(path) as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def same_object(a: str, b: str, opener: Opener = _open) -> bool:
    """True if the files at a and b hold the same data set (see the module text)."""
    if digest(a, opener) == digest(b, opener):
        return True
    try:
        with warnings.catch_warnings(), ExitStack() as stack:
            warnings.simplefilter("ignore")
            sa = _Source.open(stack, opener(a))
            sb = _Source.open(stack, opener(b))
            return _same(sa, sb)
    except Exception:  # noqa: BLE001 - what cannot be read is not provably the same
        return False


def is_lossy(transfer_syntax: str) -> bool:
    return str(UID(transfer_syntax)) in _LOSSY


# -- one file -------------------------------------------------------------------------------


@dataclass
class _Source:
    """One file opened for comparison: the header up to the pixel data, its encoding and
    where the pixel data element starts (-1 without pixel data)."""

    fh: BinaryIO
    syntax: str  # as the file says (DEFLATED for a deflated file, read inflated)
    ds: Dataset
    pixel_start: int
    big: bool
    implicit: bool

    @classmethod
    def open(cls, stack: ExitStack, fh: BinaryIO) -> _Source:
        stack.enter_context(fh)
        meta, body = _meta(fh)
        syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        if syntax == DEFLATED:
            fh = stack.enter_context(_inflated(fh, meta, body))
        fh.seek(0)
        ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True)
        pixel_start = fh.tell() if _pixel_tag(fh, ds) is not None else -1
        big = ds.original_encoding[1] is False
        syntax = syntax or (IMPLICIT_LE if ds.is_implicit_VR else
                            EXPLICIT_BE if big else EXPLICIT_LE)
        return cls(fh, syntax, ds, pixel_start, big, bool(ds.is_implicit_VR))

    def int(self, keyword: str, default: int = 0) -> int:
        value = self.ds.get(keyword)
        try:
            return int(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            return default


def _meta(fh: BinaryIO) -> tuple[FileMetaDataset | None, int]:
    """The File Meta Information and where the data set starts."""
    fh.seek(0)
    read_preamble(fh, force=True)
    start = fh.tell()
    head = fh.read(2)
    fh.seek(start)
    if head != b"\x02\x00":
        return None, start
    return _read_file_meta_info(fh), fh.tell()


def _inflated(fh: BinaryIO, meta: FileMetaDataset, body: int) -> BinaryIO:
    """A deflated file (PS3.5 A.5) as an Explicit VR Little Endian one, in an unnamed
    temporary file (never visible, gone when closed), inflated a block at a time."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the caller's ExitStack
    out.write(b"\0" * 128 + b"DICM")
    plain = FileMetaDataset(meta)
    plain.TransferSyntaxUID = EXPLICIT_LE
    target = DicomFileLike(out)
    target.is_little_endian, target.is_implicit_VR = True, False
    write_file_meta_info(target, plain, enforce_standard=False)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    fh.seek(body)
    while not inflater.eof and (chunk := fh.read(CHUNK)):
        while chunk and not inflater.eof:
            out.write(inflater.decompress(chunk, CHUNK))
            chunk = inflater.unconsumed_tail
    out.write(inflater.flush())
    out.seek(0)
    return out


def _pixel_tag(fh: BinaryIO, ds: Dataset) -> int | None:
    """The pixel data tag that follows the header (pydicom stopped just before it)."""
    pos = fh.tell()
    head = fh.read(4)
    fh.seek(pos)
    if len(head) < 4:
        return None
    group, elem = struct.unpack(">HH" if ds.original_encoding[1] is False else "<HH", head)
    tag = group << 16 | elem
    return tag if tag in PIXEL_TAGS else None


# -- the comparison -------------------------------------------------------------------------


def _same(a: _Source, b: _Source) -> bool:
    if a.syntax != b.syntax and (a.syntax in _LOSSY or b.syntax in _LOSSY):
        return False  # lossy coding changed the values
    other_syntax = a.syntax != b.syntax
    skip = ENCODING_ONLY if other_syntax else frozenset()
    if (a.pixel_start < 0) != (b.pixel_start < 0):
        return False
    if not _same_items(a.ds, b.ds, _Pair(a.big, b.big, other_syntax), skip, top=True):
        return False
    if a.pixel_start < 0:
        return True
    pa, pb = _element_at(a), _element_at(b)
    if pa is None or pb is None or pa.tag != pb.tag:
        return False
    tails = _tail(a, pa.end), _tail(b, pb.end)
    if None in tails or not _same_items(tails[0], tails[1], _Pair(a.big, b.big, False),
                                        frozenset(), top=True):
        return False
    return _same_pixels(a, pa, b, pb)


@dataclass(frozen=True)
class _Pair:
    big_a: bool
    big_b: bool
    colours: bool  # different transfer syntaxes: YBR_RCT/ICT count as the RGB they decode to


def _same_items(da: Dataset, db: Dataset, pair: _Pair, skip: frozenset[int],
                top: bool) -> bool:
    tags = {t for t in (*da.keys(), *db.keys()) if _compared(t, top) and t not in skip}
    return all(t in da and t in db and _same_element(da, db, t, pair) for t in sorted(tags))


def _compared(tag: int, top: bool) -> bool:
    if tag & 0xFFFF == 0 or tag == PADDING:
        return False  # group lengths, trailing padding
    # at the top: the wrapper, and the pixels (compared on their own, samples by pixel)
    return not (top and (tag >> 16 == 0x0002 or tag in PIXEL_TAGS
                         or tag == PLANAR_CONFIGURATION))


def _same_element(da: Dataset, db: Dataset, tag: int, pair: _Pair) -> bool:
    vr_a, va = _raw(da, tag)
    vr_b, vb = _raw(db, tag)
    un_a, un_b = vr_a in ("", "UN"), vr_b in ("", "UN")
    known = next((v for v in (vr_a, vr_b) if v and v != "UN"), "") or _dictionary_vr(tag)
    vr_a = known if vr_a in ("", "UN") else vr_a
    vr_b = known if vr_b in ("", "UN") else vr_b
    if "SQ" in (vr_a, vr_b):
        items_a, items_b = _items(da, tag, va, un_a), _items(db, tag, vb, un_b)
        if items_a is None or items_b is None or len(items_a) != len(items_b):
            return False
        return all(_same_items(x, y, pair, frozenset(), top=False)
                   for x, y in zip(items_a, items_b, strict=True))
    if not isinstance(va, bytes) or not isinstance(vb, bytes):
        return False
    na, nb = _norm(vr_a, va, pair.big_a), _norm(vr_b, vb, pair.big_b)
    if pair.colours and tag == 0x00280004:
        na, nb = SAME_COLOUR.get(na, na), SAME_COLOUR.get(nb, nb)
    return na == nb


def _raw(ds: Dataset, tag: int) -> tuple[str, object]:
    """(VR as encoded, "" if implicit; the value as read: bytes, or items for SQ)."""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return elem.VR or "", elem.value if elem.value is not None else b""
    vr = str(elem.VR or "")
    if vr == "SQ":
        return vr, elem.value
    return vr, _reencoded(ds, elem)  # converted on reading (Specific Character Set)


def _reencoded(ds: Dataset, elem: DataElement) -> bytes:
    """A value pydicom converted while reading, encoded again (little endian, as the other
    values are compared)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, getattr(ds, "_character_set", None) or ["iso8859"])
    data = fp.getvalue()
    return data[12:] if elem.VR in LONG_VRS else data[8:]


def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr if " or " not in vr else "OB"  # ambiguous ones only occur implicit: LE bytes


def _items(ds: Dataset, tag: int, value: object, unknown: bool) -> list[Dataset] | None:
    """A sequence's items; a sequence read as UN (implicit VR LE items, PS3.5 6.2.2) too."""
    if unknown and isinstance(value, bytes):
        try:
            elem = convert_raw_data_element(
                RawDataElement(tag, "SQ", len(value), value, 0, True, True), ds=ds)
            return list(elem.value)
        except Exception:  # noqa: BLE001 - not a sequence after all
            return None
    value = ds[tag].value
    return list(value) if isinstance(value, Sequence | list) else None


def _norm(vr: str, value: bytes, big: bool) -> bytes:
    """A value in the form that does not depend on the encoding."""
    if vr in TEXT_VRS:
        return value.rstrip(b" \0")  # PS3.5 6.2: trailing padding only
    width = WIDTHS.get(vr, 1)
    if big and width > 1:
        return _swap(value, width)
    return value


def _swap(data: bytes, width: int) -> bytes:
    whole = len(data) - len(data) % width
    swapped = np.frombuffer(data, f">u{width}", count=whole // width).astype(f"<u{width}")
    return swapped.tobytes() + data[whole:]


# -- pixel data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Element:
    tag: int
    vr: str
    value: int  # offset of the value
    length: int  # -1: undefined (encapsulated)
    end: int


def _element_at(src: _Source) -> _Element | None:
    """The pixel data element's header (PS3.5 7.1), and where the element ends."""
    fh = src.fh
    fh.seek(src.pixel_start)
    head = fh.read(12)
    if len(head) < 8:
        return None
    order = ">" if src.big else "<"
    group, elem = struct.unpack_from(order + "HH", head)
    if src.implicit:
        vr, length, value = "", struct.unpack_from(order + "I", head, 4)[0], src.pixel_start + 8
    else:
        vr = head[4:6].decode("latin-1")
        if len(head) < 12:
            return None
        length, value = struct.unpack_from(order + "I", head, 8)[0], src.pixel_start + 12
    if length != 0xFFFFFFFF:
        return _Element(group << 16 | elem, vr, value, length, value + length)
    end = _fragments_end(fh, value)
    return None if end is None else _Element(group << 16 | elem, vr, value, -1, end)


def _fragments_end(fh: BinaryIO, pos: int) -> int | None:
    """Encapsulated pixel data: items until the sequence delimiter (PS3.5 A.4)."""
    while True:
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            return None
        group, elem, size = struct.unpack("<HHI", item)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        pos += size


def _tail(src: _Source, end: int) -> Dataset | None:
    """The elements after the pixel data (private groups, signatures), padding included."""
    src.fh.seek(end)
    rest = src.fh.read()
    if not rest:
        return Dataset()
    try:
        return read_dataset(BytesIO(rest), src.implicit, not src.big)
    except Exception:  # noqa: BLE001 - unreadable: not provably the same
        return None


def _same_pixels(a: _Source, pa: _Element, b: _Source, pb: _Element) -> bool:
    native = a.syntax in NATIVE, b.syntax in NATIVE
    if all(native):
        return _same_streams(_native_chunks(a, pa), _native_chunks(b, pb))
    if a.syntax == b.syntax and _same_streams(_raw_chunks(a, pa), _raw_chunks(b, pb)):
        return True  # identical fragments
    frames_a = _native_frames(a, pa) if native[0] else _decoded_frames(a)
    frames_b = _native_frames(b, pb) if native[1] else _decoded_frames(b)
    try:
        for x, y in _zip_all(frames_a, frames_b):
            if x is None or y is None or x.size != y.size:
                return False
            if not np.array_equal(x.reshape(-1), y.reshape(-1)):
                return False
    finally:  # before the files close: the generators seek back on exit
        frames_a.close()
        frames_b.close()
    return True


def _raw_chunks(src: _Source, elem: _Element) -> Iterator[bytes]:
    """The element's value bytes as stored, a block at a time."""
    start = elem.value
    left = elem.end - start
    while left > 0:
        src.fh.seek(start)
        chunk = src.fh.read(min(CHUNK, left))
        if not chunk:
            raise EOFError("pixel data cut short")
        start, left = start + len(chunk), left - len(chunk)
        yield chunk


def _pixel_width(src: _Source, elem: _Element) -> int:
    """Byte-order unit of native pixel data (PS3.5 8.1.1, 8.2: OW words; a cell of Bits
    Allocated; OF floats, OD doubles)."""
    if elem.tag == 0x7FE00008:
        return 4
    if elem.tag == 0x7FE00009:
        return 8
    allocated = src.int("BitsAllocated", 8)
    if allocated in (16, 32, 64):
        return allocated // 8
    return 2 if elem.vr == "OW" else 1


def _native_chunks(src: _Source, elem: _Element) -> Iterator[bytes]:
    """Native pixel data, every byte, in little endian order and with colour samples by
    pixel: what does not depend on the encoding."""
    width = _pixel_width(src, elem) if src.big else 1
    frame = _frame_bytes(src)
    by_plane = src.int("SamplesPerPixel", 1) > 1 and src.int("PlanarConfiguration") == 1
    step = frame if by_plane and frame else CHUNK - CHUNK % max(width, 1)
    pending = b""
    for chunk in _raw_chunks(src, elem):
        pending += chunk
        while len(pending) >= step:
            block, pending = pending[:step], pending[step:]
            yield _by_pixel(src, _swap(block, width)) if by_plane else _swap(block, width)
    if pending:
        yield _swap(pending, width)  # bytes after the last whole frame: compared as they are


def _frame_bytes(src: _Source) -> int:
    allocated = src.int("BitsAllocated", 8)
    if allocated % 8:
        return 0
    return (src.int("Rows") * src.int("Columns") * src.int("SamplesPerPixel", 1)
            * allocated // 8)


def _by_pixel(src: _Source, frame: bytes) -> bytes:
    """One frame of colour-by-plane samples (R..R G..G B..B) in colour-by-pixel order."""
    samples = src.int("SamplesPerPixel", 1)
    unit = src.int("BitsAllocated", 8) // 8
    cells = np.frombuffer(frame, f"<u{unit}").reshape(samples, -1)
    return np.ascontiguousarray(cells.T).tobytes()


def _native_frames(src: _Source, elem: _Element) -> Iterator[np.ndarray]:
    """Native frames as values, for comparison with decoded compressed frames; bytes after
    the last frame (other than the one byte padding an odd length) make it another object."""
    allocated = src.int("BitsAllocated", 8)
    frame, count = _frame_bytes(src), src.int("NumberOfFrames", 1)
    if not frame or elem.tag != 0x7FE00010:
        raise ValueError("not comparable with a decoded frame")
    kind = "i" if src.int("PixelRepresentation") == 1 else "u"
    seen = 0
    pending = b""
    for block in _native_chunks(src, elem):
        pending += block
        while len(pending) >= frame and seen < count:
            cells, pending = pending[:frame], pending[frame:]
            seen += 1
            yield np.frombuffer(cells, f"<{kind}{allocated // 8}")
    if pending not in (b"", b"\0"):
        yield None  # type: ignore[misc] - more data than frames: not the same


def _decoded_frames(src: _Source) -> Iterator[np.ndarray]:
    src.fh.seek(0)
    return pydicom.pixels.iter_pixels(src.fh, raw=True)


def _same_streams(a: Iterator[bytes], b: Iterator[bytes]) -> bool:
    """Two byte streams, chunked differently, compared without holding either whole."""
    buf_a = buf_b = b""
    while True:
        if not buf_a:
            buf_a = next(a, b"")
        if not buf_b:
            buf_b = next(b, b"")
        if not buf_a or not buf_b:
            return not buf_a and not buf_b and next(a, b"") == b"" and next(b, b"") == b""
        n = min(len(buf_a), len(buf_b))
        if buf_a[:n] != buf_b[:n]:
            return False
        buf_a, buf_b = buf_a[n:], buf_b[n:]


def _zip_all(a: Iterator, b: Iterator) -> Iterator[tuple]:
    sentinel = object()
    while True:
        x, y = next(a, sentinel), next(b, sentinel)
        if x is sentinel and y is sentinel:
            return
        yield (None if x is sentinel else x), (None if y is sentinel else y)
