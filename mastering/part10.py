"""Structural check of a DICOM file (PS3.10 chapter 7, PS3.5 chapter 7), reading headers only.

pydicom happily returns a data set from a truncated file: the last element simply gets fewer bytes
than its length says. This module walks every element header of the file instead (tag, VR,
length), recursing into sequences and encapsulated pixel data, and checks that each declared
length ends inside the file, that every undefined-length sequence, item and fragment list is
closed, and that the data set ends exactly at the end of the file. Values are skipped, not read:
a 500 KB CT slice costs a few dozen small reads through a memory map.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydicom.datadict import dictionary_VR

PREAMBLE_LEN = 128
MAGIC = b"DICM"
UNDEFINED = 0xFFFFFFFF
COLLECT_LIMIT = 1 << 16  # larger key elements are left to pydicom
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, PIXEL_DATA)  # float, double float, integer

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
VALID_VRS = LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)


class StructureError(ValueError):
    """The file is not a well-formed DICOM file; the message says where and why."""


class NotDicomError(ValueError):
    """The file does not look like DICOM at all (no preamble and an implausible first tag)."""

#: Groups a data set without preamble may plausibly start with (meta, directory, identifying).
_FIRST_GROUPS = (0x0002, 0x0004, 0x0008)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the parts of a DICOM file are, and how its data set is encoded."""

    size: int
    has_preamble: bool  # 128-byte preamble + "DICM"
    meta_start: int  # offset of the first group 0002 element (or dataset start if none)
    dataset_start: int  # offset of the first element after the meta group
    meta_ts: str | None  # (0002,0010) as written ("" if absent), None without a meta group
    body_ts: str  # the encoding the body really uses (VR switch detected)
    pixel_data_offset: int  # offset of the pixel data element header, -1 if none
    #: top-level elements asked for with `collect`: tag -> (VR as read or b"", element bytes)
    elements: dict[int, tuple[bytes, bytes]] | None = None
    meta_sop_instance_uid: str = ""
    meta_sop_class_uid: str = ""
    meta_missing: bool = False  # a Type 1 meta element is absent (PS3.10 Table 7.1-1)
    oversized: frozenset[int] = frozenset()  # asked-for elements too large to collect
    #: (declared, actual) when (0002,0000) File Meta Information Group Length is not the
    #: length of the group's elements after it (PS3.10 7.1); None when it is right or absent
    meta_length: tuple[int, int] | None = None

    @property
    def has_meta(self) -> bool:
        return self.meta_ts is not None

    @property
    def body_disagrees(self) -> bool:
        return self.meta_ts is not None and self.meta_ts != self.body_ts

    @property
    def meta_complete(self) -> bool:
        """Preamble, DICM and a meta group naming the body's real transfer syntax."""
        return (self.has_preamble and bool(self.meta_ts) and not self.body_disagrees
                and not self.meta_missing and self.meta_length is None)


class _Walker:
    """Walks element headers of one encoding over a buffer."""

    def __init__(self, buf: bytes | mmap.mmap, explicit: bool, little: bool, origin: str,
                 collect: frozenset[int] = frozenset()):
        self.buf, self.explicit, self.little, self.origin = buf, explicit, little, origin
        self.collect = collect
        self.collected: dict[int, tuple[bytes, bytes]] = {}
        self.oversized: set[int] = set()
        self.end = len(buf)
        self._u16 = struct.Struct("<H" if little else ">H").unpack_from
        self._u32 = struct.Struct("<I" if little else ">I").unpack_from
        self._explicit = struct.Struct("<HH2sH" if little else ">HH2sH").unpack_from
        self._implicit = struct.Struct("<HHI" if little else ">HHI").unpack_from
        self.pixel_data_offset = -1

    def fail(self, pos: int, why: str) -> StructureError:
        return StructureError(f"{why} at byte {pos} of the {self.origin}")

    def tag_at(self, pos: int) -> int:
        if pos + 4 > self.end:
            raise self.fail(pos, "truncated element tag")
        return (self._u16(self.buf, pos)[0] << 16) | self._u16(self.buf, pos + 2)[0]

    def header(self, pos: int, in_sequence: bool) -> tuple[int, bytes, int, int]:
        """(tag, vr, length, value offset) of the element at pos: one unpack per header."""
        if pos + 8 > self.end:
            raise self.fail(pos, "truncated element header")
        if not self.explicit:
            group, elem, length = self._implicit(self.buf, pos)
            tag = group << 16 | elem
            return tag, b"" if group == 0xFFFE else _implicit_vr(tag), length, pos + 8
        group, elem, vr, short = self._explicit(self.buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:  # item / delimiter tags never carry a VR
            return tag, b"", self._u32(self.buf, pos + 4)[0], pos + 8
        if vr in LONG_VRS:
            if pos + 12 > self.end:
                raise self.fail(pos, "truncated element header")
            return tag, vr, self._u32(self.buf, pos + 8)[0], pos + 12
        if vr not in VALID_VRS:
            raise self.fail(pos, f"invalid VR {vr!r} for ({group:04X},{elem:04X})")
        return tag, vr, short, pos + 8

    def dataset(self, pos: int, stop: int, in_item: bool, nested: bool = False) -> int:
        """Walk elements from pos; returns the offset after the data set (or its item end).
        in_item: an undefined-length item, closed by an item delimiter; nested: inside any
        sequence item (only top-level elements are collected or taken as the Pixel Data)."""
        top = not (in_item or nested)
        while pos < stop:
            tag, vr, length, value = self.header(pos, in_item)
            if tag == ITEM_END:
                if not in_item:
                    raise self.fail(pos, "item delimiter outside an item")
                return value
            if tag == SEQ_END:
                raise self.fail(pos, "sequence delimiter where an element was expected")
            if tag == ITEM:
                raise self.fail(pos, "item tag where an element was expected")
            if tag in PIXEL_TAGS and top:
                self.pixel_data_offset = pos
            start, pos = pos, self.element_value(tag, vr, length, value)
            if top and tag in self.collect:
                if pos - start <= COLLECT_LIMIT:
                    self.collected[tag] = (vr if self.explicit else b"",
                                           bytes(self.buf[start:pos]))
                else:
                    self.oversized.add(tag)
        if pos > stop:
            raise self.fail(stop, "element runs past the end of its container")
        if in_item and stop == self.end:
            raise self.fail(pos, "undefined-length item is not closed")
        return pos

    def element_value(self, tag: int, vr: bytes, length: int, value: int) -> int:
        if length != UNDEFINED:
            end = value + length
            if end > self.end:
                raise self.fail(
                    value,
                    f"({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes but the file "
                    f"ends {self.end - value} bytes later (truncated)",
                )
            if vr == b"SQ":
                self.items(value, end)
            return end
        if vr == b"SQ":
            return self.items(value, self.end, undefined=True)
        if vr == b"UN":  # PS3.5 6.2.2: an undefined-length UN holds implicit VR LE items
            inner = _Walker(self.buf, explicit=False, little=True, origin=self.origin)
            return inner.items(value, self.end, undefined=True)
        if tag == PIXEL_DATA or vr in (b"OB", b"OW"):
            return self.fragments(value)
        raise self.fail(value, f"undefined length on ({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr!r}")

    def items(self, pos: int, stop: int, undefined: bool = False) -> int:
        while pos < stop:
            tag, _, length, value = self.header(pos, True)
            if tag == SEQ_END:
                if not undefined:
                    raise self.fail(pos, "sequence delimiter in a defined-length sequence")
                return value
            if tag != ITEM:
                raise self.fail(pos, f"expected an item tag, found {tag:08X}")
            if length == UNDEFINED:
                pos = self.dataset(value, self.end, in_item=True)
            else:
                if value + length > stop:
                    raise self.fail(pos, "item runs past the end of its sequence (truncated)")
                self.dataset(value, value + length, in_item=False, nested=True)
                pos = value + length
        if undefined:
            raise self.fail(pos, "undefined-length sequence is not closed (truncated)")
        if pos != stop:
            raise self.fail(pos, "items do not fill their sequence")
        return pos

    def fragments(self, pos: int) -> int:
        """Encapsulated pixel data (PS3.5 A.4): items, then a sequence delimiter."""
        while True:
            tag, _, length, value = self.header(pos, True)
            if tag == SEQ_END:
                return value
            if tag != ITEM or length == UNDEFINED:
                raise self.fail(pos, "malformed encapsulated pixel data fragment")
            if value + length > self.end:
                raise self.fail(pos, "pixel data fragment runs past the end of the file "
                                "(truncated)")
            pos = value + length


@cache
def _implicit_vr(tag: int) -> bytes:
    """VR from the data dictionary; private and unknown tags count as UN (PS3.5 6.2.2)."""
    if tag & 0xFFFF == 0 or (tag >> 16) & 1:
        return b"UL" if tag & 0xFFFF == 0 else b"UN"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return b"UN"
    return b"SQ" if vr == "SQ" else vr[:2].encode()


def _looks_explicit(buf: bytes | mmap.mmap, pos: int) -> bool:
    """pydicom's test for the body encoding: a valid VR after the first tag means explicit."""
    return bytes(buf[pos + 4 : pos + 6]) in VALID_VRS


#: Type 1 elements of the File Meta Information (PS3.10 Table 7.1-1)
META_TYPE1 = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010,
                        0x00020012})


@dataclass(frozen=True, slots=True)
class _Meta:
    end: int
    ts: str  # "" = a meta group without (0002,0010): the body decides
    sop_instance_uid: str
    sop_class_uid: str
    missing: bool  # a Type 1 element is absent
    length: tuple[int, int] | None = None  # (declared, actual) group length when they differ


def _read_meta(buf: mmap.mmap, pos: int, origin: str) -> _Meta:
    """Walk the group 0002 elements (always explicit VR LE, PS3.10 7.1)."""
    walker = _Walker(buf, explicit=True, little=True, origin=origin)
    texts: dict[int, str] = {}
    seen: set[int] = set()
    declared, counted_from = None, 0
    while pos + 4 <= len(buf) and walker.tag_at(pos) >> 16 == 0x0002:
        tag, vr, length, value = walker.header(pos, False)
        if length == UNDEFINED or value + length > len(buf):
            raise walker.fail(pos, "file meta information runs past the end of the file")
        seen.add(tag)
        if tag in (0x00020002, 0x00020003, 0x00020010):
            raw = bytes(buf[value : value + length]).rstrip(b"\0 ")
            texts[tag] = raw.decode("ascii", "replace")
        if tag == 0x00020000 and length == 4:
            declared, counted_from = struct.unpack_from("<I", buf, value)[0], value + 4
        pos = value + length
    wrong = (declared, pos - counted_from) if declared not in (None, pos - counted_from) \
        else None
    return _Meta(pos, texts.get(0x00020010, ""), texts.get(0x00020003, ""),
                 texts.get(0x00020002, ""), not seen >= META_TYPE1, wrong)


def _encoding(ts: str) -> tuple[bool, bool]:
    """(explicit VR, little endian) of a transfer syntax; compressed ones are explicit LE."""
    if ts == IMPLICIT_LE:
        return False, True
    if ts == EXPLICIT_BE:
        return True, False
    return True, True


def inspect(path: Path, collect: frozenset[int] = frozenset()) -> Layout:
    """Check the structure of the file at path and return its layout; raise StructureError.
    The top-level elements whose tags are in `collect` come back raw in Layout.elements."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 8:
            fh.seek(0)
            _tiny(fh.read(), size)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _inspect(buf, size, collect)
            except (struct.error, IndexError) as exc:  # a read past the end the walk missed
                raise StructureError(f"truncated: {exc}") from exc


def _tiny(head: bytes, size: int) -> None:
    """A file shorter than one element header: corrupt DICOM only if it starts like DICOM
    (a plausible first group), else simply not DICOM (an empty file, a two-byte note)."""
    starts_like = len(head) >= 2 and (struct.unpack_from("<H", head)[0] in _FIRST_GROUPS
                                      or struct.unpack_from(">H", head)[0] in _FIRST_GROUPS)
    if starts_like:
        raise StructureError(f"only {size} bytes: a truncated DICOM file")
    raise NotDicomError("empty file" if size == 0 else f"only {size} bytes: not DICOM")


def _inspect(buf: mmap.mmap, size: int, collect: frozenset[int] = frozenset()) -> Layout:
    has_preamble = size >= PREAMBLE_LEN + 4 and buf[PREAMBLE_LEN : PREAMBLE_LEN + 4] == MAGIC
    meta_start = PREAMBLE_LEN + 4 if has_preamble else 0
    if has_preamble and size < meta_start + 8:
        raise StructureError("'DICM' prefix but no file meta information (truncated)")
    meta_ts, meta = None, _Meta(meta_start, "", "", "", True)
    start = meta_start
    first_group = struct.unpack_from("<H", buf, meta_start)[0]
    if not has_preamble and first_group not in _FIRST_GROUPS and (
        struct.unpack_from(">H", buf, meta_start)[0] not in _FIRST_GROUPS
    ):
        raise NotDicomError("no DICM preamble and no plausible first data element")
    if first_group == 0x0002:
        meta = _read_meta(buf, meta_start, "file meta information")
        start, meta_ts = meta.end, meta.ts
    elif has_preamble:
        raise StructureError("'DICM' prefix but no file meta information group")
    if start >= size:
        raise StructureError("file meta information but no data set (empty body)")
    if meta_ts == DEFLATED_LE:
        return _inspect_deflated(buf, size, has_preamble, meta_start, start, meta)
    body_ts = _body_ts(buf, start, meta_ts)
    explicit, little = _encoding(body_ts)
    walker = _Walker(buf, explicit, little, origin="file",
                     collect=collect if little else frozenset())
    end = walker.dataset(start, size, in_item=False)
    if end != size:
        raise StructureError(f"data set ends at byte {end} but the file has {size} bytes")
    return Layout(size, has_preamble, meta_start, start, meta_ts, body_ts,
                  walker.pixel_data_offset, walker.collected, meta.sop_instance_uid,
                  meta.sop_class_uid, meta.missing, frozenset(walker.oversized), meta.length)


def _body_ts(buf: mmap.mmap, start: int, meta_ts: str | None) -> str:
    """The body's real encoding: the meta's, unless the first element shows a VR switch."""
    explicit = _looks_explicit(buf, start)
    if meta_ts is None:
        little = struct.unpack_from("<H", buf, start)[0] < 0x0100 or explicit is False
        if not little and explicit:
            return EXPLICIT_BE
        return EXPLICIT_LE if explicit else IMPLICIT_LE
    if not meta_ts:
        return _body_ts(buf, start, None)
    meta_explicit, little = _encoding(meta_ts)
    if explicit == meta_explicit:
        return meta_ts
    if not explicit:
        return IMPLICIT_LE  # pydicom makes the same switch (implicit bodies are always LE)
    return EXPLICIT_LE if little else EXPLICIT_BE


def _inspect_deflated(
    buf: mmap.mmap, size: int, has_preamble: bool, meta_start: int, start: int, meta: _Meta
) -> Layout:
    """Deflated bodies (PS3.5 A.5) cannot be walked in place: inflate and walk the result."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(buf[start:]) + inflater.flush()
    except zlib.error as exc:
        raise StructureError(f"deflated data set does not inflate: {exc}") from exc
    if not inflater.eof:
        raise StructureError("deflated data set is truncated (deflate stream not finished)")
    walker = _Walker(body, explicit=True, little=True, origin="inflated data set")
    end = walker.dataset(0, len(body), in_item=False)
    if end != len(body):
        raise StructureError("inflated data set has trailing bytes")
    # the pixel data offset is one in the inflated body: only its presence means anything
    return Layout(size, has_preamble, meta_start, start, DEFLATED_LE, DEFLATED_LE,
                  walker.pixel_data_offset, None, meta.sop_instance_uid, meta.sop_class_uid,
                  meta.missing, meta_length=meta.length)


# -- writing ---------------------------------------------------------------------------------


def _ele(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (the meta group is always ELE, PS3.10 7.1)."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def build_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
               implementation_class_uid: str, implementation_version_name: str) -> bytes:
    """Preamble, 'DICM' and a File Meta Information group (PS3.10 7.1, Table 7.1-1)."""
    body = b"".join((
        _ele(0x00020001, b"OB", b"\0\1"),
        _ele(0x00020002, b"UI", sop_class_uid.encode("ascii")),
        _ele(0x00020003, b"UI", sop_instance_uid.encode("ascii")),
        _ele(0x00020010, b"UI", transfer_syntax.encode("ascii")),
        _ele(0x00020012, b"UI", implementation_class_uid.encode("ascii")),
        _ele(0x00020013, b"SH", implementation_version_name.encode("ascii")),
    ))
    group_length = _ele(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * PREAMBLE_LEN + MAGIC + group_length + body
