"""Read-back verification: a disc is good only if what the drive returns is the image.

Two checks, both before a job may become ``done`` (issue 8 point 7):

1. SHA-256 over the image's size read from the medium (never the whole device: the written
   area is padded past the image, devices.md §1), compared with the image's checksum taken
   when it was mastered; the page cache is bypassed (O_DIRECT on block devices,
   POSIX_FADV_DONTNEED on files) so the bytes come from the medium, not from memory.
2. The core's :func:`mastering.verify.verify` against the profile, on the medium itself:
   DICOMDIR, records, every referenced file's structure, as a viewer would read it.

The time of each is measured and recorded against the burn's, so the cost of verification is
known per disc (``mastering jobs show``, BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from threading import Event

from ..profiles import Profile
from ..verify import verify

BLOCK = 1 << 20
SECTOR = 2048  # an optical disc's logical block; O_DIRECT lengths are multiples of it


@dataclass
class Readback:
    ok: bool
    reason: str = ""
    sha256: str = ""
    checksum_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.checksum_seconds + self.verify_seconds


def medium_checksum(path: Path, size: int) -> str:
    """SHA-256 of the first size bytes of the medium at path, past the page cache."""
    mode = os.stat(path).st_mode
    if stat.S_ISBLK(mode):
        return _direct_checksum(path, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return _hash_fd(fd, size)
    finally:
        os.close(fd)


def _hash_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    left = size
    while left > 0:
        chunk = os.read(fd, min(BLOCK, left))
        if not chunk:
            raise OSError(f"the medium ends {left} bytes before the image")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _direct_checksum(path: Path, size: int) -> str:
    """O_DIRECT needs aligned buffers (an anonymous mmap is page aligned) and lengths in
    whole sectors. Never a byte past the image's last sector: on a CD written track-at-once
    the run-out blocks after the short pad are unreadable, and a read reaching into them
    fails although every sector of the image is good."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    view = memoryview(buf)
    try:
        left = size
        while left > 0:
            want = min(BLOCK, -(-left // SECTOR) * SECTOR)  # whole 2048-byte sectors
            n = os.readv(fd, [view[:want]])
            if n <= 0:
                raise OSError(f"the medium ends {left} bytes before the image")
            take = min(n, left)
            h.update(view[:take])
            left -= take
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return h.hexdigest()


def read_back(medium: Path, image_size: int, image_sha256: str, profile: Profile,
              cancel: Event | None = None) -> Readback:
    t0 = time.monotonic()
    try:
        got = medium_checksum(medium, image_size)
    except OSError as exc:
        return Readback(False, f"read-back failed: {exc}", "", time.monotonic() - t0)
    t1 = time.monotonic()
    if got != image_sha256:
        return Readback(False, "read-back checksum over the written size differs from the "
                        "image", got, t1 - t0)
    try:  # the medium is longer than the image (padding); the image's size was checked
        result = verify(medium, profile.with_capacity(0), cancel=cancel)
    except OSError as exc:
        return Readback(False, f"read-back verify could not read the medium: {exc}", got,
                        t1 - t0, time.monotonic() - t1)
    t2 = time.monotonic()
    if not result.ok:
        first = result.violations[0] if result.violations else None
        why = f"{first.code}: {first.message}" if first else "cancelled"
        return Readback(False, f"read-back verify: {len(result.violations)} violation(s), "
                        f"{why}", got, t1 - t0, t2 - t1)
    return Readback(True, "", got, t1 - t0, t2 - t1)
