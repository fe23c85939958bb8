"""Implicit VR Little Endian -> Explicit VR Little Endian without copying the pixel data twice.

Both encodings are little endian, so native pixel data is the same bytes in both (PS3.5 A.1,
A.2): only the element headers differ. For such a file the medium gets a new meta header and the
re-encoded elements before Pixel Data, built here in memory (a few KB), followed by the source's
pixel data value streamed straight from the source into the image. The staged full copy that
:mod:`mastering.transcode` makes is kept for everything else (big endian, deflate, compressed
pixel data, elements after Pixel Data).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset

from . import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, isosource
from .part10 import EXPLICIT_LE, IMPLICIT_LE, PIXEL_DATA, UNDEFINED, build_meta


@dataclass(frozen=True, slots=True)
class Reencoded:
    """The new file = head (meta + elements + Pixel Data header) + source[offset:offset+length]."""

    head: bytes
    pixel_offset: int
    pixel_length: int

    @property
    def size(self) -> int:
        return len(self.head) + self.pixel_length


def applicable(transfer_syntax: str, pixel_data_offset: int) -> bool:
    return transfer_syntax == IMPLICIT_LE and pixel_data_offset >= 0


def reencode(path: str, sop_class_uid: str, sop_instance_uid: str,
             pixel_data_offset: int, dataset_start: int = -1) -> Reencoded | None:
    """The streamed re-encoding of an implicit VR file, or None when it does not apply
    (encapsulated or float pixel data, elements after Pixel Data). With dataset_start, the
    header is re-encoded straight from the bytes (:func:`explicit_header`); pydicom does it
    when that meets something it leaves to pydicom."""
    with isosource.open_any(path) as fh:  # a plain file or a file inside an ISO image
        size = fh.seek(0, 2)
        fh.seek(pixel_data_offset)
        tag_group, tag_elem, length = struct.unpack("<HHI", fh.read(8))
        if (tag_group << 16 | tag_elem) != PIXEL_DATA or length == UNDEFINED:
            return None
        value_offset = pixel_data_offset + 8
        if value_offset + length != size or length % 2:
            return None
        head = None
        if dataset_start >= 0:
            fh.seek(dataset_start)
            head = explicit_header(fh.read(pixel_data_offset - dataset_start), length)
    meta = build_meta(sop_class_uid, sop_instance_uid, EXPLICIT_LE, IMPLEMENTATION_CLASS_UID,
                      IMPLEMENTATION_VERSION_NAME)
    if head is not None:
        return Reencoded(meta + head, value_offset, length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    for elem in list(ds):
        if elem.tag.element == 0 or elem.tag.group in (0x0000, 0x0002):
            del ds[elem.tag]  # group lengths are retired (PS3.5 7.2) and would be wrong now
    correct_ambiguous_vr(ds, is_little_endian=True)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    vr = b"OW" if int(ds.get("BitsAllocated", 16)) > 8 else b"OB"
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length)
    meta = build_meta(sop_class_uid, sop_instance_uid, EXPLICIT_LE, IMPLEMENTATION_CLASS_UID,
                      IMPLEMENTATION_VERSION_NAME)
    return Reencoded(meta + fp.getvalue() + pixel_header, value_offset, length)


# -- straight from the bytes -----------------------------------------------------------------

#: "US or SS" elements whose VR follows Pixel Representation (PS3.3 C.7.6.3.1, C.7.5.1.1.2)
_BY_PIXEL_REPRESENTATION = frozenset(
    {0x00280104, 0x00280105, 0x00280106, 0x00280107, 0x00280108, 0x00280109, 0x00280110,
     0x00280111, 0x00280120, 0x00280121})
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_TEXT = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQ_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


class _Fallback(Exception):
    """Something this byte-level encoder leaves to pydicom."""


def explicit_header(body: bytes, pixel_length: int) -> bytes | None:
    """Implicit VR LE elements (everything before Pixel Data) as Explicit VR LE, values copied
    byte for byte (both are little endian), followed by the Pixel Data element header.

    VRs come from the data dictionary; private elements become UN (PS3.5 6.2.2); sequences and
    items are written with undefined length so no length has to be recomputed; group lengths
    (retired, PS3.5 7.2) are dropped. Returns None for what it leaves to pydicom: ambiguous VRs
    other than Pixel Representation's, values too long for a 16-bit length.
    """
    state = {"bits": 16, "pixrep": 0}
    out: list[bytes] = []
    try:
        _elements(memoryview(body), 0, len(body), out, state, top=True)
    except (_Fallback, struct.error, IndexError):
        return None
    vr = b"OW" if state["bits"] > 8 else b"OB"
    out.append(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, pixel_length))
    return b"".join(out)


def _elements(buf: memoryview, pos: int, end: int, out: list[bytes], state: dict,
              top: bool) -> int:
    while pos < end:
        group, elem, length = struct.unpack_from("<HHI", buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        pos += 8
        vr = _vr(tag, state, length)
        if vr == "SQ":
            out.append(struct.pack("<HH2sHI", group, elem, b"SQ", 0, UNDEFINED))
            pos = _items(buf, pos, length, out, state)
            out.append(_SEQ_DELIMITER)
            continue
        if length == UNDEFINED:
            raise _Fallback
        value = buf[pos:pos + length]
        if len(value) != length:
            raise _Fallback
        pos += length
        if elem == 0 or group in (0x0000, 0x0002):
            continue  # group lengths, command and stray meta elements are not carried over
        if top and tag in (0x00280100, 0x00280103) and length == 2:
            state["bits" if tag == 0x00280100 else "pixrep"] = struct.unpack("<H", value)[0]
        value = bytes(value)
        if length % 2:  # not allowed (PS3.5 7.1.1) but seen: pad as PS3.5 6.2 says
            if vr not in _TEXT:
                raise _Fallback
            value += b"\0" if vr == "UI" else b" "
        if vr in _LONG:
            out.append(struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)))
        elif len(value) > 0xFFFF:
            raise _Fallback
        else:
            out.append(struct.pack("<HH2sH", group, elem, vr.encode(), len(value)))
        out.append(value)
    return pos


def _items(buf: memoryview, pos: int, length: int, out: list[bytes], state: dict) -> int:
    end = len(buf) if length == UNDEFINED else pos + length
    while pos < end:
        group, elem, item_length = struct.unpack_from("<HHI", buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Fallback
        out.append(_UNDEFINED_ITEM)
        if item_length == UNDEFINED:
            pos = _elements(buf, pos, len(buf), out, state, top=False)
        else:
            _elements(buf, pos, pos + item_length, out, state, top=False)
            pos += item_length
        out.append(_ITEM_DELIMITER)
    if length == UNDEFINED:
        raise _Fallback  # ran off the end: not closed
    return pos


def _vr(tag: int, state: dict, length: int) -> str:
    if (tag >> 16) & 1:  # private: creators are LO (PS3.5 7.8.1); the rest UN or a sequence
        if 0x0010 <= tag & 0xFFFF <= 0x00FF:
            return "LO"
        return "SQ" if length == UNDEFINED else "UN"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "SQ" if length == UNDEFINED else "UN"
    if " or " not in vr:
        return vr
    if tag in _BY_PIXEL_REPRESENTATION:
        return "SS" if state["pixrep"] else "US"
    raise _Fallback
