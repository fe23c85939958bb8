"""A disc drive for the tests: a FUSE file system holding one file, ``disc``, that xorriso
burns as a ``stdio:`` pseudo-drive. It writes at a set speed (so a test can kill the daemon
while a burn is under way), fails with EIO after a set number of bytes (a drive failing
mid-write), returns corrupted data when read (a disc failing read-back), fails reads that
reach past a set offset (the unreadable run-out blocks of a CD written track-at-once), and
reports a set capacity (the medium's size). Behaviour comes from ``control.json`` in the
backing folder, re-read when it changes, so a test can change the "medium" while the file
system runs.

Run as ``python fakedrive.py BACKING MOUNTPOINT`` (foreground; unmount with
``fusermount3 -u`` or by ending the process).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time

import mfusepy as fuse

NAME = "disc"


class FakeDrive(fuse.Operations):
    use_ns = True
    def __init__(self, backing: str):
        self.backing = backing
        self.path = os.path.join(backing, NAME)
        self.control_path = os.path.join(backing, "control.json")
        self._control: dict = {}
        self._mtime = 0.0
        self.written = 0

    def control(self) -> dict:
        try:
            m = os.stat(self.control_path).st_mtime_ns
        except FileNotFoundError:
            return self._control
        if m != self._mtime:
            self._mtime = m
            with open(self.control_path, encoding="utf-8") as fh:
                self._control = json.load(fh)
        return self._control

    def _real(self, path: str) -> str:
        if path.strip("/") != NAME:
            raise fuse.FuseOSError(errno.ENOENT)
        return self.path

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        st = os.lstat(self._real(path))
        return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_nlink", "st_uid",
                                            "st_gid", "st_atime", "st_mtime", "st_ctime")}

    def readdir(self, path, fh):
        return [".", ".."] + ([NAME] if os.path.exists(self.path) else [])

    def statfs(self, path):
        cap = int(self.control().get("capacity", 700 * 1024 * 1024))
        used = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        bs = 2048
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": cap // bs,
                "f_bfree": max(cap - used, 0) // bs, "f_bavail": max(cap - used, 0) // bs,
                "f_namemax": 255}

    def create(self, path, mode, fi=None):
        self.written = 0
        return os.open(self._real(path), os.O_RDWR | os.O_CREAT, 0o600)

    def open(self, path, flags):
        self.written = 0
        return os.open(self._real(path), flags & ~(os.O_DIRECT | os.O_EXCL))

    def read(self, path, size, offset, fh):
        bad = int(self.control().get("unreadable_from", -1))
        if bad >= 0 and offset + size > bad:  # a CD's run-out blocks past the pad
            raise fuse.FuseOSError(errno.EIO)
        data = os.pread(fh, size, offset)
        rate = float(self.control().get("read_rate", 0))
        if rate:
            time.sleep(len(data) / rate)
        lo = int(self.control().get("corrupt_from", -1))
        if lo >= 0 and offset + len(data) > lo:
            at = max(lo - offset, 0)
            data = data[:at] + bytes(b ^ 0xFF for b in data[at:at + 16]) + data[at + 16:]
        return data

    def write(self, path, data, offset, fh):
        ctl = self.control()
        rate = float(ctl.get("write_rate", 0))
        if rate:
            time.sleep(len(data) / rate)
        fail = int(ctl.get("fail_after", -1))
        if fail >= 0 and self.written + len(data) > fail:
            raise fuse.FuseOSError(errno.EIO)
        self.written += len(data)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self._real(path), length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def unlink(self, path):
        os.unlink(self._real(path))

    def chmod(self, path, mode):
        return 0

    def chown(self, path, uid, gid):
        return 0

    def utimens(self, path, times=None):
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    fuse.FUSE(FakeDrive(backing), mountpoint, foreground=True, nothreads=True,
              allow_other=False)


if __name__ == "__main__":
    main()
