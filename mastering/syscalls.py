"""Linux calls the os module lacks (fallocate(2), syncfs(2)), through the C library.

Each does nothing and says so where the call or the file system is missing: the caller then
takes the portable way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os


@functools.cache
def libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def allocate(fd: int, size: int) -> bool:
    """fallocate(2) the first size bytes of fd (they read as zeros). Where the file system
    cannot (EOPNOTSUPP: FAT on older kernels, some FUSE and network file systems), nothing
    is done (glibc's posix_fallocate would write every block instead) and False returned.
    ENOSPC and the like are raised: the file does not fit."""
    lib = libc()
    if lib is None or size <= 0 or not hasattr(lib, "fallocate"):
        return False
    lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if lib.fallocate(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        raise OSError(err, os.strerror(err))
    return False


def syncfs(fd: int) -> bool:
    """syncfs(2): write back everything of the file system fd is on; False where the call is
    missing (the caller fsyncs file by file). A write-back error (EIO, ENOSPC: Linux 5.8 and
    later report them here) is raised: a per-file fsync afterwards would not see it."""
    lib = libc()
    if lib is None or not hasattr(lib, "syncfs"):
        return False
    if lib.syncfs(fd) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))
