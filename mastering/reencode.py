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
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset

from . import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
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
             pixel_data_offset: int) -> Reencoded | None:
    """The streamed re-encoding of an implicit VR file, or None when it does not apply
    (encapsulated or float pixel data, elements after Pixel Data)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(pixel_data_offset)
        tag_group, tag_elem, length = struct.unpack("<HHI", fh.read(8))
    if (tag_group << 16 | tag_elem) != PIXEL_DATA or length == UNDEFINED:
        return None
    value_offset = pixel_data_offset + 8
    if value_offset + length != size or length % 2:
        return None
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
