"""A File-set as a folder (PS3.12 Annex A/R: on a PC file system the File ID is the path).

This is what goes onto a USB stick: the caller points it at a folder on the mounted FAT
partition, or at a local folder to copy later. Files are written into a temporary sibling folder
that is renamed into place once complete, so an interrupted run never leaves a File-set that
looks finished.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from . import syscalls
from .cancel import Cancelled
from .content import Range, copy_segments, copy_to
from .plan import Volume

if TYPE_CHECKING:
    from .earlyiso import EarlyFolder

ProgressFn = Callable[[str, int, int], None]


def write(volume: Volume, dicomdir: bytes | Path, tmp: Path,
          extra_files: list[tuple[tuple[str, ...], bytes | Path | Range]] = (), *,
          label: str = "write",
          sync: bool = True, progress: ProgressFn | None = None,
          cancel: Event | None = None, early: EarlyFolder | None = None) -> int:
    """Write the volume below tmp (which must not exist yet); returns the bytes written.
    early: copies made while the scan ran, renamed into place where they are what the plan
    wants (mastering.earlyiso.EarlyFolder)."""
    tmp.mkdir(parents=False)
    entries = volume.entries()
    if isinstance(dicomdir, Path):
        shutil.copyfile(dicomdir, tmp / "DICOMDIR")
    else:
        (tmp / "DICOMDIR").write_bytes(dicomdir)
    total = (tmp / "DICOMDIR").stat().st_size
    for comps, data in extra_files:
        target = tmp.joinpath(*comps)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Range):  # spooled web content
            with open(target, "xb", buffering=0) as out:
                for _n in copy_segments([data], out.fileno(), 0):
                    pass
        elif isinstance(data, Path):
            shutil.copyfile(data, target)
        else:
            target.write_bytes(data)
        total += target.stat().st_size
    made: set[Path] = set()
    for done, entry in enumerate(entries, 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled while writing the File-set")
        target = tmp.joinpath(*entry.file_id)
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        if early is None or not early.take(entry, target):
            copy_to(entry, str(target))
        total += entry.out_size
        if progress:
            progress(label, done, len(entries))
    if early is not None:
        early.check_sources()
    if sync:
        _sync_tree(tmp)
    return total


def _sync_tree(root: Path) -> None:
    """Make the File-set durable: a stick pulled after we report success must hold the data.
    syncfs(2) writes back the whole file system the folder is on in one pass and one journal
    commit (what ``sync`` does, for that file system only); an fsync per file and folder
    costs a commit each, seconds for thousands of files. Where there is no syncfs, or it
    fails, every file and folder is fsynced."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syscalls.syncfs(fd):
            return
    finally:
        os.close(fd)
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
