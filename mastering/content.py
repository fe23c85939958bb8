"""What each file on the medium contains, streamed from its source without a staging copy.

A file that needs no conversion is its source file, byte for byte. A file whose only fault is a
missing or incomplete meta header (PS3.10 7.1) is a new meta header followed by the source's data
set bytes: :class:`SegmentReader` joins the two while the writer reads, so the data set is read
once, from the source, straight into the image. Transcoded files come from their staged copy.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, isosource
from .part10 import build_meta
from .plan import FileEntry


@dataclass(frozen=True, slots=True)
class Range:
    """length bytes of the file at path, from offset; stamp: the file's
    :func:`isosource.stat_stamp` when it was scanned (None for our own staged files)."""

    path: str
    offset: int
    length: int
    stamp: isosource.Stamp | None = None


class SourceChanged(OSError):
    """A source file is not the one that was scanned: its record would describe another."""


def check_stamp(part: Range, fd: int) -> None:
    if part.stamp is None:
        return
    st = os.fstat(fd)
    if isosource.stat_stamp(st) != part.stamp:
        raise SourceChanged(f"{part.path}: changed after it was scanned; nothing was written")


Segment = bytes | Range


def source_range(path: str, offset: int, length: int,
                 stamp: isosource.Stamp | None) -> Range:
    """length bytes of an input from offset, as a range of a real file: a file inside an
    ISO image is a range of the image (isosource), so it is copied like any other."""
    member = isosource.locate(path) if not os.path.lexists(path) else None
    if member is None:
        return Range(path, offset, length, stamp)
    return Range(member.image, member.offset + offset, length, stamp)


def segments(entry: FileEntry) -> list[Segment]:
    """The pieces that make up the file on the medium."""
    inst = entry.instance
    if entry.action in ("copy", "existing"):
        return [source_range(inst.path, 0, inst.size, inst.stamp)]
    if entry.action == "reencode":
        offset, length = entry.pixel_range
        return [entry.head, source_range(inst.path, offset, length, inst.stamp)]
    if entry.action == "transcode":
        if entry.staged is None:
            raise ValueError(f"{inst.path}: transcoded copy missing")
        return [Range(entry.staged, 0, entry.out_size)]
    meta = build_meta(inst.sop_class_uid, inst.sop_instance_uid, inst.transfer_syntax,
                      IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    return [meta, source_range(inst.path, inst.dataset_start, inst.size - inst.dataset_start,
                               inst.stamp)]


def output_size(entry: FileEntry) -> int:
    return sum(len(s) if isinstance(s, bytes) else s.length for s in segments(entry))


class SegmentReader(io.RawIOBase):
    """A read-only, seekable stream over segments; opens a source file only while reading it,
    so thousands of entries never hold thousands of descriptors."""

    def __init__(self, parts: list[Segment]):
        super().__init__()
        self.parts = parts
        self.starts: list[int] = []
        pos = 0
        for part in parts:
            self.starts.append(pos)
            pos += len(part) if isinstance(part, bytes) else part.length
        self.length = pos
        self.pos = 0
        self._fh: io.BufferedReader | None = None
        self._fh_path = ""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:  # noqa: ANN001 - buffer protocol
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self.pos < self.length:
            n = self._read_some(view[done:])
            if n == 0:
                raise OSError(f"{self._fh_path}: source changed size while being written")
            done += n
            self.pos += n
        if self.pos >= self.length:
            self._close_fh()
        return done

    def _read_some(self, view: memoryview) -> int:
        idx = max(i for i, s in enumerate(self.starts) if s <= self.pos)
        part, within = self.parts[idx], self.pos - self.starts[idx]
        if isinstance(part, bytes):
            chunk = part[within : within + len(view)]
            view[: len(chunk)] = chunk
            return len(chunk)
        want = min(len(view), part.length - within)
        fh = self._open(part)
        fh.seek(part.offset + within)
        return fh.readinto(view[:want]) or 0

    def _open(self, part: Range) -> io.BufferedReader:
        if self._fh is None or self._fh_path != part.path:
            self._close_fh()
            self._fh, self._fh_path = open(part.path, "rb", buffering=0), part.path  # noqa: SIM115
            self._part = part
            check_stamp(part, self._fh.fileno())
        return self._fh

    def _close_fh(self) -> None:
        """Close the open source, checking it did not change while it was read."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                check_stamp(self._part, fh.fileno())
            finally:
                fh.close()

    def close(self) -> None:
        self._close_fh()
        super().close()


def copy_to(entry: FileEntry, dst: str) -> None:
    """Write the entry's content to dst: kernel-side copies for file ranges (one read, one
    write, no Python buffers), the meta header written directly."""
    with open(dst, "xb", buffering=0) as out:
        for _n in copy_segments(segments(entry), out.fileno(), 0):
            pass


#: bytes per kernel copy call: large enough to cost nothing, small enough for progress and
#: cancellation to be seen within a large file
KERNEL_CHUNK = 8 << 20


def copy_segments(parts: list[Segment], out: int, offset: int) -> Iterator[int]:
    """Write the segments into the file out (a descriptor) from byte offset on, without
    moving its file position; yields the bytes written as it goes. File ranges are copied
    inside the kernel (copy_file_range: the bytes never enter this process), each source
    checked against its scan stamp before and after, and a short source is an error."""
    for part in parts:
        if isinstance(part, bytes):
            _pwrite_all(out, part, offset)
            offset += len(part)
            yield len(part)
            continue
        for n in _copy_range(part, out, offset):
            offset += n
            yield n


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(part: Range, out: int, at: int) -> Iterator[int]:
    with open(part.path, "rb", buffering=0) as src:
        check_stamp(part, src.fileno())
        left, offset = part.length, part.offset
        while left:
            n = _kernel_copy(src.fileno(), out, min(left, KERNEL_CHUNK), offset, at)
            if n == 0:
                break
            left, offset, at = left - n, offset + n, at + n
            yield n
        # fall back: another file system, no kernel support, or the source shrank
        for chunk in _chunks(src, offset, left):
            _pwrite_all(out, chunk, at)
            left, at = left - len(chunk), at + len(chunk)
            yield len(chunk)
        if left:
            raise SourceChanged(f"{part.path}: source changed size while being written")
        check_stamp(part, src.fileno())


#: copy_file_range cannot do this pair of files: another file system (EXDEV; Linux 5.19 and
#: later refuse most cross-file-system copies), a file system without support (EOPNOTSUPP,
#: EINVAL on some FUSE and network file systems), or a kernel without the call (ENOSYS)
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL,
                             errno.ENOTSUP})


def _kernel_copy(src: int, dst: int, count: int, offset: int, at: int) -> int:
    """Bytes copied inside the kernel from src at offset to dst at at, or 0 where it cannot
    copy (the caller reads and writes instead)."""
    if not hasattr(os, "copy_file_range"):
        return 0
    try:
        return os.copy_file_range(src, dst, count, offset, at)
    except OSError as exc:
        if exc.errno in _NO_KERNEL_COPY:
            return 0
        raise


def _chunks(fh: io.FileIO, offset: int, left: int, size: int = 1 << 20) -> Iterator[bytes]:
    while left > 0:
        chunk = os.pread(fh.fileno(), min(size, left), offset)
        if not chunk:
            return
        left, offset = left - len(chunk), offset + len(chunk)
        yield chunk
