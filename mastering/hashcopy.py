"""Copies that take their own proof, on worker threads: each file copied inside the kernel
(:func:`mastering.content.copy_segments`), then read back through its descriptor for its
size and SHA-256, then fdatasynced; results handed back in the order they were submitted.

The in-place writer (:mod:`mastering.inplace`) journals the size and SHA-256 of every file
before the file gets its name. copy_file_range, os.preadv and hashlib (on blocks over 2 KiB)
release the GIL, so two threads copy and hash side by side on 2 cores; the caller keeps the
journal, the renames and the progress in its own thread, in file order. (Hashing while
copying through a user-space buffer, reading each block once, was measured too: it cost
twice the system CPU of the kernel copy and the read-back on ext4, and was slower.)

Sources are checked against their scan stamps before and after they are copied, and a
source that ends early is an error naming it (content.copy_segments): a record then never
describes a file other than the one that was scanned.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from threading import Event

from .content import Segment, copy_segments

BLOCK = 1 << 20
#: writer threads: measured on 2 cores (see BENCHMARKS.md, the in-place rows)
THREADS = 2
_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class Stopped(Exception):
    """The copy was abandoned (the run failed or was cancelled elsewhere)."""


@dataclass(frozen=True, slots=True)
class Written:
    size: int
    sha256: str


def write_hashed(parts: list[Segment], dst: str, *, sync: bool, buf: bytearray,
                 created: Callable[[], None] = lambda: None,
                 stopped: Callable[[], bool] = lambda: False) -> Written:
    """Create dst (never over an existing name), copy the parts into it, and return the size
    and SHA-256 of the file as written, read back through its descriptor (from the page
    cache); fdatasync it if sync (the data and the size: what the proof needs). created()
    is called once dst exists, so that the caller counts it as its own even if the copy
    then fails."""
    fd = os.open(dst, _NEW, 0o666)
    try:
        created()
        for _n in copy_segments(parts, fd, 0):  # sources checked against their stamps
            if stopped():
                raise Stopped(dst)
        size, digest = _digest(fd, memoryview(buf), stopped)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return Written(size, digest)


def _digest(fd: int, view: memoryview, stopped: Callable[[], bool]) -> tuple[int, str]:
    digest, offset = hashlib.sha256(), 0
    while n := os.preadv(fd, [view], offset):
        if stopped():
            raise Stopped(str(fd))
        digest.update(view[:n])
        offset += n
    return offset, digest.hexdigest()


class Pool:
    """write_hashed on `threads` threads, each with its own buffer. A set cancel stops the
    copies at their next block; close() stops those still running and waits for them: after
    it no thread of this pool creates or writes anything."""

    def __init__(self, threads: int = THREADS, *, sync: bool, cancel: Event | None = None):
        self.sync = sync
        self.stop = Event()
        self.cancel = cancel
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="inplace-copy")

    def submit(self, parts: list[Segment], dst: str,
               created: Callable[[], None]) -> Future[Written]:
        return self._executor.submit(self._run, parts, dst, created)

    def _run(self, parts: list[Segment], dst: str, created: Callable[[], None]) -> Written:
        if self._stopped():
            raise Stopped(dst)
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(BLOCK)
        return write_hashed(parts, dst, sync=self.sync, buf=buf, created=created,
                            stopped=self._stopped)

    def _stopped(self) -> bool:
        return self.stop.is_set() or (self.cancel is not None and self.cancel.is_set())

    def close(self) -> None:
        """Stop and wait; a second Ctrl-C while waiting is held until every thread has
        ended (the caller then undoes what they wrote, with no descriptor left open)."""
        self.stop.set()
        interrupt: KeyboardInterrupt | None = None
        while True:
            try:
                self._executor.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt as exc:
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt
