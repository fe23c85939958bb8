"""Are two files the same object? Compared by value, whatever their encodings.

Two files with one SOP Instance UID are one object (PS3.3 C.12.1.1.1) when their data sets
hold the same values: the transfer syntax is only an encoding (PS3.5 chapter 10), so a big
endian copy, an implicit VR copy, a deflated copy and a losslessly compressed copy of one
image are the same object. What is compared:

* every data element but the File Meta Information (group 0002, the wrapper), group lengths
  (retired, PS3.5 7.2), Data Set Trailing Padding (FFFC,FFFC: "no meaning", PS3.10 7.2) and
  the pixel data, by its decoded value: numbers as numbers, text as text, OW/OF/OD/OL/OV words
  in their own byte order (PS3.5 7.3), UN as the VR its twin has (PS3.5 6.2.2);
* the pixel data frame by frame as decoded values (pydicom's ``iter_pixels``: one frame of
  each file in memory at a time, never the whole pixel data); identical compressed fragments
  are compared as bytes, streamed. Attributes that only describe an encoding (Planar
  Configuration, a Derivation Description naming the lossless compression, YBR_RCT/YBR_ICT
  for the RGB they decode to) are judged by the pixels.

A lossy transfer syntax is never "the same" as another encoding: it has other values.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.uid import UID

Opener = Callable[[str], BinaryIO]

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
PADDING = 0xFFFCFFFC
#: attributes that describe an encoding of the pixels rather than the object, compared only
#: between files of one transfer syntax: Planar Configuration (PS3.3 C.7.6.3.1.3) and the
#: Derivation Description encoders such as dcmcjpeg add for a lossless compression
ENCODING_ONLY = frozenset({0x00280006, 0x00082111})
SAME_COLOUR = {"YBR_RCT": "RGB", "YBR_ICT": "RGB"}  # PS3.5 8.2.4: decode to RGB
_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_LOSSY = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 52, 53, 54, 55, 56, 59, 60, 61,
                                                         62, 63, 64, 81, 91, 100, 101, 102,
                                                         103, 104, 105, 106, 107, 108, 203))
CHUNK = 1 << 20
DEFLATED = "1.2.840.10008.1.2.1.99"


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _same(a, b, opener)
    except Exception:  # noqa: BLE001 - what cannot be read is not provably the same
        return False


def _same(a: str, b: str, opener: Opener) -> bool:
    with ExitStack() as stack:
        fa, fb = stack.enter_context(opener(a)), stack.enter_context(opener(b))
        da = pydicom.dcmread(fa, force=True, stop_before_pixels=True)
        db = pydicom.dcmread(fb, force=True, stop_before_pixels=True)
        ta, tb = _syntax(da), _syntax(db)
        if ta != tb and (ta in _LOSSY or tb in _LOSSY):
            return False  # lossy coding changed the values
        if DEFLATED in (ta, tb):
            return _same_loaded(a, b, opener, ta != tb)
        skip = ENCODING_ONLY if ta != tb else frozenset()
        starts = fa.tell(), fb.tell()
        pixels = _pixel_tag(da, fa), _pixel_tag(db, fb)
        if pixels[0] != pixels[1] or not _same_items(da, db, skip, ta != tb):
            return False
        if pixels[0] is not None:  # pydicom stopped before the pixels: compare what follows
            tails = [_tail(ds, fh, pos) for ds, fh, pos in ((da, fa, starts[0]),
                                                             (db, fb, starts[1]))]
            if None in tails or not _same_items(tails[0], tails[1], frozenset(), False):
                return False
    return pixels[0] is None or _same_pixels(a, b, opener, ta == tb)


def _same_loaded(a: str, b: str, opener: Opener, colours: bool) -> bool:
    """Deflated data sets have no file offsets to stream from: read whole (one file each)."""
    with opener(a) as fa, opener(b) as fb:
        da, db = pydicom.dcmread(fa, force=True), pydicom.dcmread(fb, force=True)
        skip = ENCODING_ONLY if colours else frozenset()
        if not _same_items(da, db, skip, colours) or (("PixelData" in da) != ("PixelData" in db)):
            return False
        if "PixelData" not in da:
            return True
        frames = zip(pydicom.pixels.iter_pixels(da, raw=True),
                     pydicom.pixels.iter_pixels(db, raw=True), strict=True)
        return all(x.shape == y.shape and np.array_equal(x, y) for x, y in frames)


def _tail(ds: Dataset, fh: BinaryIO, pixel_start: int) -> Dataset | None:
    """The elements after the pixel data (private groups, signatures), padding included."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    end = _element_end(fh, ds, pixel_start)
    if end is None:
        return None
    fh.seek(end)
    rest = fh.read()
    return read_dataset(BytesIO(rest), ds.is_implicit_VR, not _big(ds)) if rest else Dataset()


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return ts or ("1.2.840.10008.1.2" if ds.is_implicit_VR else "1.2.840.10008.1.2.1")


def _big(ds: Dataset) -> bool:
    return ds.original_encoding[1] is False


def _pixel_tag(ds: Dataset, fh: BinaryIO) -> int | None:
    """The pixel data tag that follows the header (pydicom stopped just before it)."""
    head = fh.read(4)
    if len(head) < 4:
        return None
    fmt = ">HH" if _big(ds) else "<HH"
    group, elem = struct.unpack(fmt, head)
    tag = group << 16 | elem
    return tag if tag in PIXEL_TAGS else None


# -- elements -------------------------------------------------------------------------------


def _same_items(da: Dataset, db: Dataset, skip: frozenset[int], colours: bool) -> bool:
    tags = {t for t in (*da.keys(), *db.keys()) if _compared(t) and t not in skip}
    for tag in sorted(tags):
        if tag not in da or tag not in db:
            return False
        if not _same_element(da, db, tag, colours):
            return False
    return True


def _compared(tag: int) -> bool:
    group = tag >> 16
    return not (group == 0x0002 or tag & 0xFFFF == 0 or tag == PADDING or tag in PIXEL_TAGS)


def _same_element(da: Dataset, db: Dataset, tag: int, colours: bool) -> bool:
    ea, eb = _element(da, tag), _element(db, tag)
    if ea.VR == "UN" and eb.VR != "UN":
        ea = _as_vr(ea, eb.VR, da)
    elif eb.VR == "UN" and ea.VR != "UN":
        eb = _as_vr(eb, ea.VR, db)
    if ea.VR == "SQ" or eb.VR == "SQ":
        items_a, items_b = list(ea.value or []), list(eb.value or [])
        return len(items_a) == len(items_b) and all(
            _same_items(x, y, frozenset(), False) for x, y in zip(items_a, items_b, strict=True))
    va, vb = _value(ea, da), _value(eb, db)
    if colours and tag == 0x00280004:
        va, vb = SAME_COLOUR.get(va, va), SAME_COLOUR.get(vb, vb)
    return va == vb


def _element(ds: Dataset, tag: int) -> DataElement:
    return ds[tag]


def _as_vr(elem: DataElement, vr: str, ds: Dataset) -> DataElement:
    """A UN element read as the VR its twin has (implicit VR private data, PS3.5 6.2.2)."""
    raw = elem.value if isinstance(elem.value, bytes) else b""
    converted = convert_raw_data_element(
        RawDataElement(elem.tag, vr, len(raw), raw, 0, False, True),
        encoding=getattr(ds, "_character_set", None), ds=ds)
    return converted


def _value(elem: DataElement, ds: Dataset) -> object:
    value = elem.value
    if elem.VR in _SWAP and isinstance(value, bytes) and _big(ds):
        width = _SWAP[elem.VR]
        return np.frombuffer(value, f">u{width}").astype(f"<u{width}").tobytes()
    if isinstance(value, bytes):
        return value.rstrip(b"\0") if elem.VR in ("OB", "UN") else value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    return _plain(value)


def _plain(value: object) -> object:
    if isinstance(value, str):
        return value.rstrip(" \0")
    if hasattr(value, "original_string") or type(value).__name__ in ("PersonName",):
        return str(value).rstrip(" \0")
    return value


# -- pixel data -----------------------------------------------------------------------------


def _same_pixels(a: str, b: str, opener: Opener, same_syntax: bool) -> bool:
    """Frames compared one at a time; identical fragments streamed first (same syntax)."""
    with ExitStack() as stack:
        fa, fb = stack.enter_context(opener(a)), stack.enter_context(opener(b))
        if same_syntax and _same_raw_pixels(a, b, opener):
            return True
        fa.seek(0)
        fb.seek(0)
        frames_a = pydicom.pixels.iter_pixels(fa, raw=True)
        frames_b = pydicom.pixels.iter_pixels(fb, raw=True)
        try:
            for x, y in _zip_all(frames_a, frames_b):
                if x is None or y is None or x.shape != y.shape or not np.array_equal(x, y):
                    return False
        finally:  # before the files close: the generators seek back on exit
            frames_a.close()
            frames_b.close()
    return True


def _zip_all(a: Iterator, b: Iterator) -> Iterator[tuple]:
    sentinel = object()
    while True:
        x, y = next(a, sentinel), next(b, sentinel)
        if x is sentinel and y is sentinel:
            return
        yield (None if x is sentinel else x), (None if y is sentinel else y)


def _same_raw_pixels(a: str, b: str, opener: Opener) -> bool:
    """The pixel data values byte for byte, streamed from where each file has them."""
    spans = [_pixel_span(p, opener) for p in (a, b)]
    if None in spans or spans[0][1] != spans[1][1]:
        return False
    with opener(a) as fa, opener(b) as fb:
        (sa, length), (sb, _) = spans
        fa.seek(sa)
        fb.seek(sb)
        while length > 0:
            n = min(CHUNK, length)
            if fa.read(n) != fb.read(n):
                return False
            length -= n
    return True


def _pixel_span(path: str, opener: Opener) -> tuple[int, int] | None:
    """(offset, length) of the pixel data element's value bytes, fragments included."""
    with opener(path) as fh:
        ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True)
        start = fh.tell()
        end = _element_end(fh, ds, start)
        return (start, end - start) if end is not None else None


def _element_end(fh: BinaryIO, ds: Dataset, pos: int) -> int | None:
    """Where the element at pos ends (defined length, or fragments up to the delimiter)."""
    little = not _big(ds)
    fh.seek(pos)
    head = fh.read(12)
    if len(head) < 8:
        return None
    if ds.is_implicit_VR:
        length, value = struct.unpack_from("<I" if little else ">I", head, 4)[0], pos + 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        length, value = struct.unpack_from("<I" if little else ">I", head, 8)[0], pos + 12
    else:
        length, value = struct.unpack_from("<H" if little else ">H", head, 6)[0], pos + 8
    if length != 0xFFFFFFFF:
        return value + length
    cur = value
    while True:  # encapsulated: items until the sequence delimiter (PS3.5 A.4)
        fh.seek(cur)
        item = fh.read(8)
        if len(item) < 8:
            return None
        group, elem, size = struct.unpack("<HHI", item)
        cur += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return cur
        cur += size


def is_lossy(transfer_syntax: str) -> bool:
    return str(UID(transfer_syntax)) in _LOSSY
