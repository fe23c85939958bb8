"""The image written straight to the disk (``O_DIRECT``).

A durable image is one the disk holds before it gets its name. Through the page cache that
costs every byte twice: copied into cache pages, then written back while the run waits in
``fsync`` (on this project's machine the page cache, not the disk, is the slow part, and an
image of 5 GB fills it to the dirty limit: see BENCHMARKS.md). Written with ``O_DIRECT`` the
bytes go from this process's buffer to the device and the final ``fsync`` has only the
file's metadata left to do; with --no-sync there is no fsync, and the run still takes less
CPU than through the page cache, which the scan's workers use.

pycdlib still lays the image out and produces every descriptor, path table and directory
record: they are captured in memory (:class:`Capture`, a few MB for 50,000 files), and the
file bodies are noted with their extents instead of written (:class:`mastering.isowriter.Image`
in capture mode). The image is then streamed in order, window by window: each window is
filled with the captured metadata, the bodies read from their sources (one copy, from the
page cache into the window), and zeros between them, and a second thread writes the
previous window while the next is filled. Sources are checked against their scan stamps
before and after they are read, as everywhere else. The bytes are the ones pycdlib writes
(the tests compare the three ways of writing an image).

Where the file system refuses ``O_DIRECT`` (tmpfs, some FUSE and network file systems)
:func:`open_direct` returns None and the caller writes through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .content import Range, Segment, SourceChanged, check_stamp

SECTOR = 2048
WINDOW = 4 << 20  # bytes per write: large for the device, small for memory (2 in use)
ALIGN = 4096  # O_DIRECT lengths and offsets: a multiple of any logical block size in use

ProgressFn = Callable[[int, int], None]


class Capture:
    """A write-only stand-in for the image file while pycdlib writes it: metadata writes are
    kept by sector (the bytes written and their span within the sector), bodies are noted
    by the image (see isowriter.Image) and only move the end of the file."""

    mode = "wb+"  # what pycdlib checks a file object for

    def __init__(self) -> None:
        self.sectors: dict[int, tuple[bytearray, list[int]]] = {}
        self.pos = 0
        self.size = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes) -> int:
        view, pos = memoryview(data), self.pos
        while view:
            sector, within = divmod(pos, SECTOR)
            n = min(len(view), SECTOR - within)
            buf, span = self.sectors.setdefault(sector, (bytearray(SECTOR), [within, within]))
            buf[within:within + n] = view[:n]
            span[0], span[1] = min(span[0], within), max(span[1], within + n)
            view, pos = view[n:], pos + n
        self.pos = pos
        self.size = max(self.size, pos)
        return len(data)

    def read(self, size: int) -> bytes:
        out = bytearray()
        while size > 0 and self.pos < self.size:
            sector, within = divmod(self.pos, SECTOR)
            n = min(size, SECTOR - within, self.size - self.pos)
            held = self.sectors.get(sector)
            out += held[0][within:within + n] if held else bytes(n)
            self.pos, size = self.pos + n, size - n
        return bytes(out)

    def note(self, offset: int, length: int) -> None:
        """A body of length bytes will be at offset."""
        self.size = max(self.size, offset + length)

    def flush(self) -> None:
        pass

    def pieces(self) -> list[tuple[int, bytes]]:
        """The metadata as (offset, bytes), in order, adjacent sectors joined."""
        out: list[tuple[int, bytearray]] = []
        for sector in sorted(self.sectors):
            buf, (lo, hi) = self.sectors[sector]
            at = sector * SECTOR + lo
            if out and out[-1][0] + len(out[-1][1]) == at:
                out[-1][1].extend(buf[lo:hi])
            else:
                out.append((at, bytearray(buf[lo:hi])))
        return [(at, bytes(data)) for at, data in out]


def open_direct(path: Path) -> int | None:
    """path created exclusively for direct writes, or None where the file system cannot
    (then nothing is left at path). The file is created first and O_DIRECT asked for after:
    a file system that refuses it (ramfs, tmpfs before Linux 6.6, some FUSE and network
    ones) would otherwise refuse the open only after creating the file."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | direct)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)  # created just now by this call (O_EXCL): ours
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return fd


class DirectUnsupported(OSError):
    """The file system took the file but refused the first direct write."""


class Body(Protocol):
    """A file's content to be written (isowriter.Body): its segments, made on demand."""

    length: int

    def parts(self) -> list[Segment]: ...


def stream(fd: int, total: int, metadata: list[tuple[int, bytes]],
           bodies: list[tuple[int, Body]], progress: ProgressFn | None = None,
           check: Callable[[], None] | None = None,
           regions: list[tuple[int, int]] | None = None) -> None:
    """Write the image of total bytes to fd (opened by open_direct): metadata and bodies
    (offset, body), none overlapping, zeros everywhere else. A body's segments are made
    when it is written, not all at once (memory: 50,000 files are 50,000 lists). regions:
    only these (start, end) byte ranges (starts a multiple of ALIGN) are written, what lies
    outside them is left as it is (the early image's data area)."""
    pieces: list[tuple[int, bytes | Body]] = [*metadata, *bodies]
    pieces.sort(key=lambda p: p[0])
    if progress:
        progress(0, total)
    with _Writer(fd) as writer:
        for start, end in regions or [(0, total)]:
            window = _Window(writer, start, end, total, progress, check)
            for at, what in pieces:
                if not start <= at < end:
                    continue
                if isinstance(what, bytes):
                    window.put_bytes(at, what)
                else:
                    window.put_segments(at, what.parts())
            window.finish()
    os.ftruncate(fd, total)  # the last window was written rounded up to ALIGN


class _Window:
    """The part of the image being filled: WINDOW bytes from base, in a run of windows
    from start to end (end may be moved while the run is filled, see EarlyImage)."""

    def __init__(self, writer: _Writer, start: int, end: int, total: int,
                 progress: ProgressFn | None = None, check: Callable[[], None] | None = None):
        self.writer, self.end, self.total = writer, end, total
        self.progress, self.check = progress, check
        self.base, self.filled = start, 0  # filled: bytes of this window already set
        self.buf = writer.take()

    def _advance(self) -> None:
        """Zero the rest of the window, hand it to the writer, start the next one."""
        end = min(WINDOW, self.end - self.base)
        _zero(self.buf, self.filled, end)
        self.writer.give(self.buf, self.base, end)
        if self.progress:
            self.progress(self.base + end, self.total)
        if self.check:
            self.check()
        self.base += WINDOW
        self.filled = 0
        self.buf = self.writer.take()

    def _seek(self, at: int) -> None:
        if at < self.base + self.filled:
            raise ValueError(f"overlapping pieces at byte {at}")
        while at >= self.base + WINDOW:
            self._advance()
        _zero(self.buf, self.filled, at - self.base)
        self.filled = at - self.base

    def put_bytes(self, at: int, data: bytes) -> None:
        view = memoryview(data)
        self._seek(at)
        while view:
            n = min(len(view), WINDOW - self.filled)
            self.buf[self.filled:self.filled + n] = view[:n]
            self.filled += n
            view = view[n:]
            if view:
                self._advance()

    def put_segments(self, at: int, parts: list[Segment]) -> None:
        self._seek(at)
        for part in parts:
            if isinstance(part, bytes):
                self.put_bytes(self.base + self.filled, part)
            else:
                self._put_range(part)

    def _put_range(self, part: Range) -> None:
        with open(part.path, "rb", buffering=0) as src:
            check_stamp(part, src.fileno())
            left, offset = part.length, part.offset
            while left:
                if self.filled == WINDOW:
                    self._advance()
                room = memoryview(self.buf)[self.filled:min(WINDOW, self.filled + left)]
                n = os.preadv(src.fileno(), [room], offset)
                if n == 0:
                    raise SourceChanged(f"{part.path}: source changed size while being written")
                self.filled, left, offset = self.filled + n, left - n, offset + n
            check_stamp(part, src.fileno())

    def finish(self) -> None:
        while self.end - self.base > WINDOW:  # zeros (or the rounding) past this window
            self._advance()
        end = self.end - self.base
        if end > 0:
            _zero(self.buf, self.filled, end)
            self.writer.give(self.buf, self.base, end)
            if self.progress:
                self.progress(self.end, self.total)
        else:
            self.writer.put_back(self.buf)


_ZEROS = bytes(WINDOW)


def _zero(buf: mmap.mmap, start: int, end: int) -> None:
    if end > start:
        buf[start:end] = _ZEROS[:end - start]


class _Writer:
    """A thread that writes filled windows while the next one is filled (3 buffers)."""

    BUFFERS = 2  # one filled while the other is written

    def __init__(self, fd: int):
        self.fd = fd
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        self.full: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        for _ in range(self.BUFFERS):
            self.free.put(mmap.mmap(-1, WINDOW))  # page-aligned, as O_DIRECT wants
        self.error: BaseException | None = None
        self.first = True
        self.thread = threading.Thread(target=self._run, name="iso-direct-writer", daemon=True)

    def __enter__(self) -> _Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.full.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def take(self) -> mmap.mmap:
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                continue

    def put_back(self, buf: mmap.mmap) -> None:
        self.free.put(buf)

    def give(self, buf: mmap.mmap, offset: int, length: int) -> None:
        if self.error is not None:
            raise self.error
        self.full.put((buf, offset, length))

    def _run(self) -> None:
        while (item := self.full.get()) is not None:
            buf, offset, length = item
            try:
                if self.error is None:
                    self._write(memoryview(buf)[:-(-length // ALIGN) * ALIGN], offset)
            except BaseException as exc:  # noqa: BLE001 - handed to the filling thread
                self.error = exc
            finally:
                self.free.put(buf)

    def _write(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as exc:
                if self.first and exc.errno == errno.EINVAL:
                    raise DirectUnsupported(exc.errno, "direct writes refused") from exc
                raise
            self.first = False
            view, offset = view[n:], offset + n
