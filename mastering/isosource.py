"""ISO 9660 images as input: the File-set on an old patient disc's image, read in place.

``mastering iso old-cd.iso -o new.iso`` reads the image with pycdlib (no mount, no root, no
extraction) exactly as it reads a folder: every file in the image is an input file, and a
DICOMDIR among them is an index (PS3.10 8.6). A file inside an image is named by the image's
path and its name as a mounted disc shows it, ``old-cd.iso/dicom/pt000000/im000000``: Rock
Ridge names where the image has them, else Joliet names, else the ISO 9660 name without its
``;1`` version and trailing dot and in lower case, as Linux mounts ISO 9660 (``map=normal``).

Files on an ISO 9660 volume are one contiguous extent (ECMA-119 6.5.1), so a file inside an
image is a byte range of the image file: :func:`locate` gives (image, offset, length), which
the writers copy with ``copy_file_range`` like any other file range, and :func:`open_any`
gives a seekable stream over the range (``pread`` on the image, never a copy in memory).
Worker processes open an image once and keep it (:func:`_image`).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from pycdlib.pycdlibexception import PyCdlibException

from . import part10
from .reader import IsoMedium, MediaError, _is_iso, name_key


@dataclass(frozen=True, slots=True)
class Member:
    """A file inside an image: `length` bytes of the image file `image` from `offset`."""

    image: str
    name: str  # as stored in the ISO 9660 namespace, without version (IsoMedium's name)
    offset: int
    length: int


class IsoSource(IsoMedium):
    """An input image: IsoMedium's reading, plus the names a mounted disc would show."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self.shown = self._shown_names()  # ISO 9660 name -> name as mounted
        except PyCdlibException as exc:
            self.close()
            raise MediaError(f"{path.name}: unreadable directory: {exc}") from exc
        self.by_shown = {v: k for k, v in self.shown.items()}

    def _shown_names(self) -> dict[str, str]:
        """Each file's name as mounted; names that would collide (Linux shows ``IM1.;1`` and
        ``IM1;1`` both as ``im1``) are shown as their ISO 9660 paths instead, as a mount with
        ``map=off`` shows them, so that every file of the image is an input of its own."""
        shown = self._mounted_names()
        count = Counter(shown.values())
        return {name: (self._entries[name].iso_path.lstrip("/") if count[s] > 1 else s)
                for name, s in shown.items()}

    def _mounted_names(self) -> dict[str, str]:
        iso = self._iso
        if iso.has_rock_ridge():  # relocated directories shown where they belong (RRIP PL)
            return {name: iso.full_path_from_dirrecord(rec, rockridge=True).lstrip("/")
                    for name, rec in self._records.items()}
        if iso.has_joliet():
            by_extent = {}
            for root, _dirs, files in iso.walk(joliet_path="/"):
                for f in files:
                    jpath = f"{root.rstrip('/')}/{f}"
                    rec = iso.get_record(joliet_path=jpath)
                    by_extent[rec.extent_location() * iso.logical_block_size] = jpath
            return {n: by_extent.get(e.start, n).lstrip("/") for n, e in self._entries.items()}
        return {n: "/".join(map(_linux_name, e.iso_path.strip("/").split("/")))
                for n, e in self._entries.items()}

    def member(self, shown: str) -> Member | None:
        name = self.by_shown.get(shown)
        if name is None:
            return None
        entry = self._entries[name]
        return Member(str(self.path), name, entry.start, entry.size)


def _linux_name(raw: str) -> str:
    """An ISO 9660 identifier as Linux shows it (isofs ``map=normal``): lower case, a final
    ``;1`` or ``.;1`` dropped, any other ``;`` shown as ``.`` (``IM1.;2`` is ``im1..2``)."""
    name = raw.lower()
    for tail in (".;1", ";1"):
        if name.endswith(tail):
            return name[: -len(tail)].replace(";", ".")
    return name.replace(";", ".")


def is_image(path: Path) -> bool:
    """An ISO 9660 image file ("CD001" in the first volume descriptor, ECMA-119 8.4)."""
    return path.is_file() and _is_iso(path)


@lru_cache(maxsize=4)
def _image(path: str, stamp: Stamp) -> IsoSource:
    """The open image, once per process and version of the file."""
    return IsoSource(Path(path))


Stamp = tuple[int, int, int, int, int]


def stat_stamp(st: os.stat_result) -> Stamp:
    """(device, inode, size, mtime ns, ctime ns): what says a file is still the one that was
    read. The change time is in it because a rewrite can put the size and modification time
    back (``rsync --inplace -t``, a restore), but no program can set the change time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _stamp(path: str) -> Stamp:
    return stat_stamp(os.stat(path))


def open_image(path: Path) -> IsoSource:
    return _image(str(path), _stamp(str(path)))


def members(image: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Input paths of every file in the image, sorted, and (path, why) for damage that
    loses files (a truncated image)."""
    src = open_image(image)
    paths = sorted(f"{image}/{src.shown[n]}" for n in src.files())
    return paths, [(str(image), fault) for fault in src.damage()]


def locate(path: str) -> Member | None:
    """The image and byte range of an input path inside an image; None for plain files."""
    if os.path.lexists(path):
        return None
    parent, rest = os.path.split(path)
    parts = [rest]
    while parent and parent != os.path.dirname(parent):
        if os.path.isfile(parent):
            if not _is_iso(Path(parent)):
                return None
            return open_image(Path(parent)).member("/".join(reversed(parts)))
        parent, rest = os.path.split(parent)
        parts.append(rest)
    return None


def stamp(path: str) -> Stamp:
    """The :func:`stat_stamp` of the file holding path: the image for members."""
    found = locate(path)
    return _stamp(found.image if found else path)


def open_any(path: str) -> BinaryIO:
    """A seekable stream of an input path, inside an image or not."""
    found = locate(path)
    if found is None:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    return io.BufferedReader(_Window(found), buffer_size=1 << 16)  # type: ignore[return-value]


def inspect(path: str, collect: frozenset[int]) -> part10.Layout:
    """part10's structural walk over the member's bytes in the mapped image (no copy)."""
    found = locate(path)
    if found is None:
        raise FileNotFoundError(path)
    src = open_image(Path(found.image))
    with src._view(found.name) as view:
        if len(view) < 8:
            raise part10.StructureError(f"only {len(view)} bytes: not a DICOM file")
        if len(view) < found.length:
            raise part10.StructureError(f"the image is truncated: {len(view)} of "
                                        f"{found.length} bytes of this file are in it")
        return part10._inspect(view, len(view), collect)  # type: ignore[arg-type]


def resolve(dicomdir: str, parts: list[str]) -> str | None:
    """The input path of a Referenced File ID below a DICOMDIR inside an image: matched
    ignoring case, in the ISO 9660 names (PS3.12 F.1.2) or the names shown."""
    found = locate(dicomdir)
    if found is None:
        return None
    src = open_image(Path(found.image))
    iso_folder = found.name.rpartition("/")[0]
    stored = src.resolve("/".join([*filter(None, [iso_folder]), *parts]))
    if stored is None:  # names shown (Rock Ridge / Joliet) that differ from the ISO names
        shown_folder = src.shown[found.name].rpartition("/")[0]
        want = name_key("/".join([*filter(None, [shown_folder]), *parts]))
        stored = next((n for n, s in src.shown.items() if name_key(s) == want), None)
    return f"{found.image}/{src.shown[stored]}" if stored else None


class _Window(io.RawIOBase):
    """A read-only, seekable window on a byte range of a file, read with pread."""

    def __init__(self, member: Member) -> None:
        super().__init__()
        self._fd = os.open(member.image, os.O_RDONLY)
        self._start, self._length, self._pos = member.offset, member.length, 0
        self.name = f"{member.image}/{member.name}"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - buffer protocol
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        memoryview(buffer).cast("B")[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
