"""The DICOMDIR: a Basic Directory IOD (PS3.3 F.3) in a Part 10 file (PS3.10 8.6).

Written here byte by byte rather than through pydicom's FileSet, which re-reads and copies every
instance: the records are assembled from the keys intake already encoded, in Explicit VR Little
Endian (the only syntax a DICOMDIR may use), and the offsets (0004,1200/1202/1400/1420) are
absolute byte positions of each record's Item tag, counted from the first byte of the file,
preamble included (PS3.3 F.3-3).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, records
from .part10 import EXPLICIT_LE, build_meta
from .plan import FileEntry, Volume

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
ITEM_HEADER = 8
IN_USE = 0xFFFF


@dataclass
class _Record:
    rtype: str
    keys: dict[int, bytes] | bytes  # bytes: already concatenated (leaf records)
    entry: FileEntry | None = None
    children: list[_Record] = field(default_factory=list)
    offset: int = 0  # of the Item tag, from the start of the file

    def body(self, next_offset: int) -> bytes:
        lower = self.children[0].offset if self.children else 0
        head = [
            _ul(0x00041400, next_offset),
            _us(0x00041410, IN_USE),
            _ul(0x00041420, lower),
            records.encode_text(0x00041430, "CS", self.rtype.encode()),
        ]
        if self.entry is not None:
            inst = self.entry.instance
            head += [
                records.encode_text(0x00041500, "CS", "\\".join(self.entry.file_id).encode()),
                records.encode_text(0x00041510, "UI", inst.sop_class_uid.encode()),
                records.encode_text(0x00041511, "UI", inst.sop_instance_uid.encode()),
                records.encode_text(0x00041512, "UI", self.entry.out_ts.encode()),
            ]
        keys = self.keys if isinstance(self.keys, bytes) else records.concatenate(self.keys)
        return b"".join(head) + keys


def _ul(tag: int, value: int) -> bytes:
    return records.element_header(tag, "UL", 4) + struct.pack("<I", value)


def _us(tag: int, value: int) -> bytes:
    return records.element_header(tag, "US", 2) + struct.pack("<H", value)


def _tree(volume: Volume) -> list[_Record]:
    roots: list[_Record] = []
    for patient in volume.patients:
        p = _Record("PATIENT", patient.keys)
        for study in patient.studies:
            s = _Record("STUDY", study.keys)
            for series in study.series:
                se = _Record("SERIES", series.keys)
                se.children = [_leaf(e) for e in series.entries]
                s.children.append(se)
            p.children.append(s)
        roots.append(p)
    roots += [_leaf(e) for e in volume.root_entries]
    return roots


def _leaf(entry: FileEntry) -> _Record:
    return _Record(entry.instance.record_type, entry.instance.leaf, entry)


def _preorder(recs: list[_Record]) -> list[tuple[_Record, int]]:
    """Records in sequence order (parent before children) with the index of the next sibling."""
    out: list[tuple[_Record, _Record | None]] = []

    def walk(level: list[_Record]) -> None:
        for i, rec in enumerate(level):
            out.append((rec, level[i + 1] if i + 1 < len(level) else None))
            walk(rec.children)

    walk(recs)
    return out


def encode(volume: Volume) -> bytes:
    """The complete DICOMDIR file for a planned volume."""
    return b"".join(chunks(volume))


def write(volume: Volume, path: Path) -> int:
    """The DICOMDIR written to path (created exclusively) piece by piece: at 50,000
    instances it is 21 MB that need not be held while the medium is written. Its size."""
    with open(path, "xb") as fh:
        fh.writelines(chunks(volume))
        return fh.tell()


def chunks(volume: Volume) -> Iterator[bytes]:
    """The DICOMDIR file in pieces, in order."""
    meta = build_meta(MEDIA_STORAGE_DIRECTORY, volume.fileset_uid, EXPLICIT_LE,
                      IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    roots = _tree(volume)
    order = _preorder(roots)
    fsid = records.encode_text(0x00041130, "CS", volume.fileset_id.encode("ascii"))
    # The fixed part before the sequence: File-set ID, two root offsets, consistency flag.
    fixed_len = len(fsid) + 12 + 12 + 10
    seq_header_len = 12
    # Pass 1: sizes (UL offsets are fixed-width, so values do not change lengths).
    start = pos = len(meta) + fixed_len + seq_header_len
    for rec, _ in order:
        rec.offset = pos
        pos += ITEM_HEADER + len(rec.body(0))
    first = roots[0].offset if roots else 0
    last = roots[-1].offset if roots else 0
    yield b"".join((
        meta,
        fsid,
        _ul(0x00041200, first),
        _ul(0x00041202, last),
        _us(0x00041212, 0x0000),
        records.element_header(0x00041220, "SQ", pos - start),
    ))
    # Pass 2: the records with the real offsets.
    for rec, nxt in order:
        body = rec.body(nxt.offset if nxt else 0)
        yield struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
