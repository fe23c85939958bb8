"""File bodies written into the image (or the File-set folder) while the scan still runs.

The image of a large single-volume run is mostly file bodies, and each can be written as soon
as its header is scanned, while the scan of the others goes on in the workers: copying and
scanning then overlap instead of following each other (measured in BENCHMARKS.md). This needs
a layout that is known before the scan ends:

* the metadata comes first as always (volume descriptors, path tables, directory records,
  then the DICOMDIR, so the DICOMDIR is still the first file on the disc), in an area whose
  size is bounded from what the folder walk found (RESERVE_* below), rounded to 4 KiB;
* after it, the data area: the bodies of the DICOM files in the order the scan delivers them
  (sorted paths: a series' files stay together), each at a sector boundary;
* after that, whatever is made later: transcoded files, the web content.

Physical order is then scan order, not DICOMDIR order (the File IDs are still assigned in
DICOMDIR order), and the unused part of the reserve is zeros: a fraction of a percent of the
image, which is why this is only done where the reserve is under RESERVE_SHARE of the data.

Everything is checked when the volume is known: a body written early is used only if it is
exactly the content the plan wants for that file (same segments), the metadata must fit the
reserve and the volume must be the only one; otherwise the early writes are dropped and the
image is written the ordinary way. A slot whose file did not make it onto the medium (a
duplicate, a conflict left out, a file that failed) is overwritten with zeros. The layout is a
function of the inputs alone (the scan delivers results in walk order), so the image is
reproducible under SOURCE_DATE_EPOCH like any other.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import directio, isosource, plan, syscalls
from .content import Range, Segment, SourceChanged, copy_segments, copy_to, segments
from .plan import FileEntry

SECTOR = 2048
ALIGN = 4096
RESERVE_FIXED = 1 << 20  # descriptors, path tables, the root and DICOM folders
RESERVE_PER_FILE = 1024  # its directory record (44 bytes) and its DICOMDIR record (~0.5 KB)
RESERVE_PER_FOLDER = 3 * 2 * SECTOR  # a source folder may become a PT, ST and SE folder
RESERVE_SHARE = 0.01  # stream only where the reserve is at most this share of the data
MIN_BYTES = 64 << 20  # below this the overlap is not worth a second code path
STREAMED = frozenset({"copy", "remeta", "reencode"})  # bodies known at scan time


@dataclass(frozen=True, slots=True)
class Slot:
    extent: int  # first sector
    length: int
    key: tuple  # what was written there (see _key)


def _key(parts: list[Segment]) -> tuple:
    return tuple((p.path, p.offset, p.length, p.stamp) if isinstance(p, Range)
                 else (len(p), zlib.crc32(p)) for p in parts)


def _sectors(n: int) -> int:
    return -(-n // SECTOR)


def plan_reserve(paths: list[str]) -> tuple[int, int] | None:
    """(first sector of the data area, bytes of data) for these walked files, or None if
    streaming is not worth it here (small runs, small files, files inside images)."""
    total = 0
    folders: set[str] = set()
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            return None  # not a plain file (a member of an ISO image): the ordinary way
        folders.add(os.path.dirname(path))
    reserve = RESERVE_FIXED + len(paths) * RESERVE_PER_FILE + len(folders) * RESERVE_PER_FOLDER
    if total < MIN_BYTES or reserve > total * RESERVE_SHARE:
        return None
    return -(-reserve // ALIGN) * ALIGN // SECTOR, total


class _Copier:
    """Threads that make the copies queued while the scan runs (kernel-side copies: the
    bytes never enter this process); a failed copy fails the run when it is finished."""

    NAME = "early-copy"
    THREADS = 1  # copies into one file take turns in the kernel anyway

    def __init__(self) -> None:
        self.jobs: queue.Queue[tuple | None] = queue.Queue(maxsize=256)
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self.active = False
        self.stopped = False  # cancelled or failed: the queued copies are skipped

    def _queue(self, job: tuple) -> None:
        """The threads start with the first copy: by then the scan's (and the renderings')
        worker processes are forked, none of them from a process with these threads in it."""
        if not self.threads:
            self.threads = [threading.Thread(target=self._run, name=self.NAME, daemon=True)
                            for _ in range(self.THREADS)]
            for thread in self.threads:
                thread.start()
        self.jobs.put(job)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None or self.stopped:
                continue
            try:
                self._copy(job)
            except BaseException as exc:  # noqa: BLE001 - raised in the run by finish()
                self.error = exc

    def _copy(self, job: tuple) -> None:
        raise NotImplementedError

    def _join(self) -> None:
        for _thread in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []

    def finish(self) -> None:
        """The scan is over: wait for the copies; a failed copy fails the run."""
        self._join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop: the queued copies are skipped."""
        self.stopped = True
        self._join()


class EarlyImage(_Copier):
    """The image file of the only volume, its data area filled as instances arrive.

    It is written straight to the disk (mastering.directio: the data area is one stream of
    windows, in slot order); where the file system refuses direct writes, by kernel copies
    into the page cache at each slot."""

    def __init__(self, path: Path, profile, sync: bool):  # noqa: ANN001 - Profile
        super().__init__()
        self.path, self.profile, self.sync = path, profile, sync
        self.start = 0  # first sector of the data area, set by walked()
        self.next = 0
        self.slots: dict[str, Slot] = {}
        self.uids: set[str] = set()  # SOP Instance UIDs with a slot
        self.fd: int | None = None
        self.used: set[int] = set()
        self.direct = False
        self._writer: directio._Writer | None = None
        self._window: directio._Window | None = None

    # -- during the scan (intake calls these) ---------------------------------------------

    def walked(self, paths: list[str]) -> None:
        """The folder walk is done: decide, open the image, start the writer."""
        reserve = plan_reserve(paths)
        if reserve is None or self.profile.joliet or self.profile.rock_ridge or self.profile.udf:
            return
        self.start, total = reserve
        if self.profile.capacity_bytes and (self.start * SECTOR + total * 1.02
                                            > self.profile.capacity_bytes):
            return  # may need a second volume: the plan decides, the ordinary way
        self.next = self.start
        self.fd = directio.open_direct(self.path)
        self.direct = self.fd is not None and _takes_direct_writes(self.fd)
        if not self.direct and self.fd is not None:  # opened, but refuses the writes
            os.close(self.fd)
            self.path.unlink()
            self.fd = None
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o666)
        try:
            syscalls.allocate(self.fd, self.start * SECTOR + int(total * 1.02))
        except OSError as exc:
            # the walk counted every file (non-DICOM ones, duplicates): the image may still
            # fit written the ordinary way, which decides
            os.close(self.fd)
            self.fd = None
            self.path.unlink()  # ours: created exclusively above
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return
            raise
        self.active = True

    def add(self, inst) -> None:  # noqa: ANN001 - intake.Instance
        """An instance was scanned: write its body into the next slot of the data area."""
        if not self.active or self.error is not None:
            return
        entry = _entry(inst, self.profile)
        if entry is None or inst.path in self.slots or inst.sop_instance_uid in self.uids:
            return  # a second copy of an object: the plan keeps one, the ordinary way
        self.uids.add(inst.sop_instance_uid)
        parts = segments(entry)
        length = sum(len(p) if isinstance(p, bytes) else p.length for p in parts)
        self.slots[inst.path] = Slot(self.next, length, _key(parts))
        self._queue((parts, self.next * SECTOR))
        self.next += max(1, _sectors(length))

    def _copy(self, job: tuple) -> None:
        parts, at = job
        if not self.direct:
            for _n in copy_segments(parts, self.fd, at):
                pass
            return
        if self._window is None:
            self._writer = directio._Writer(self.fd).__enter__()
            self._window = directio._Window(self._writer, self.start * SECTOR, 1 << 62, 0)
        self._window.put_segments(at, parts)

    def _join(self) -> None:
        """The copies are done; in direct mode the data area's last window goes out too."""
        super()._join()
        window, writer, self._window, self._writer = self._window, self._writer, None, None
        if writer is None:
            return
        try:
            if window is not None and self.error is None and not self.stopped:
                window.end = self.end * SECTOR
                window.finish()
        except BaseException as exc:  # noqa: BLE001 - raised by finish()
            self.error = self.error or exc
        finally:
            try:
                writer.__exit__(None, None, None)
            except BaseException as exc:  # noqa: BLE001 - raised by finish()
                self.error = self.error or exc

    # -- when the volume is known ---------------------------------------------------------

    def placement(self, entries: Iterable[FileEntry]) -> dict[int, int] | None:
        """id(entry) -> first sector, for the entries whose body is already in place; None
        (and the early writes dropped) when none is usable."""
        if not self.active:
            return None
        placed = {}
        for entry in entries:
            slot = self.slots.get(entry.instance.path)
            if slot is not None and entry.action in STREAMED and _key(segments(entry)) == \
                    slot.key:
                placed[id(entry)] = slot.extent
        if not placed:
            self.abandon()
            return None
        self.used = {extent for extent in placed.values()}
        return placed

    def check_sources(self) -> None:
        """Every source of a body in the image is still the file that was scanned, as the
        ordinary writer checks while it reads: a file swapped or cut after the scan fails the
        run, whenever its bytes were copied."""
        for slot in self.slots.values():
            if slot.extent not in self.used:
                continue
            for part in slot.key:
                if len(part) == 4 and part[3] is not None:
                    _check_stamp(part[0], part[3])

    @property
    def end(self) -> int:
        """First sector after the data area (a 4 KiB boundary: later writes never share a
        block with the early ones)."""
        return -(-self.next * SECTOR // ALIGN) * ALIGN // SECTOR

    def clear_unused(self, size: int) -> None:
        """Zeros over every slot whose file is not on the medium: nothing of a dropped file
        (a conflicting object of another patient, say) stays in the image (of size bytes:
        slots past its end are already gone). Through the page cache: a slot need not be
        aligned as direct writes want (the sync that follows writes them back)."""
        zeros = bytes(1 << 20)
        unused = [slot for slot in self.slots.values() if slot.extent not in self.used]
        if not unused:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC) if self.direct else self.fd
        try:
            for slot in unused:
                at = slot.extent * SECTOR
                left = min(max(SECTOR, _sectors(slot.length) * SECTOR), size - at)
                while left > 0:
                    n = os.pwrite(fd, zeros[:min(left, len(zeros))], at)
                    left, at = left - n, at + n
        finally:
            if fd != self.fd:
                os.close(fd)

    def abandon(self) -> None:
        """Not used after all: the file goes, the ordinary writer makes the image."""
        fd = self.fd
        self.close()
        if fd is not None:
            self.path.unlink(missing_ok=True)  # ours: created exclusively above
        self.active = False

    def close(self) -> None:
        super().close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _takes_direct_writes(fd: int) -> bool:
    """Some file systems open with O_DIRECT and refuse the writes: try the first block
    (zeros, as the system area of every image begins)."""
    import mmap

    block = mmap.mmap(-1, ALIGN)
    try:
        return os.pwrite(fd, block, 0) == ALIGN
    except OSError:
        return False
    finally:
        block.close()


def _entry(inst, profile) -> FileEntry | None:  # noqa: ANN001
    """The entry the plan will make of inst, where its body is known now."""
    action = plan.action_for(inst, profile)
    entry = FileEntry(inst, action, inst.size)
    if action == "transcode" and inst.reencoded is not None:  # header re-encoded in the scan
        res = inst.reencoded
        entry.action, entry.head = "reencode", res.head
        entry.pixel_range = (res.pixel_offset, res.pixel_length)
    return entry if entry.action in STREAMED else None


class EarlyFolder(_Copier):
    """The File-set folder's counterpart: bodies copied into the work folder (on the output's
    file system) while the scan runs, and renamed to their File IDs when the volume is
    written. A copy the plan does not want as it is (another action, a dropped file) is
    left in the work folder, which goes with the run. Copies into separate files go on
    side by side in the kernel: two threads (measured: 1.6 times one on 2 cores)."""

    THREADS = 2
    #: folders the copies are spread over: files made one after the other go into different
    #: folders, so the two threads do not queue for one folder's lock
    SHARDS = 16

    def _place(self, number: int) -> Path:
        return self.folder / f"{number % self.SHARDS:02d}" / f"{number:07d}"

    def __init__(self, folder: Path, profile):  # noqa: ANN001 - Profile
        super().__init__()
        self.folder, self.profile = folder, profile
        self.slots: dict[str, tuple[int, tuple]] = {}  # path -> (number, key)
        self.uids: set[str] = set()  # SOP Instance UIDs with a copy
        self.used: set[str] = set()
        self.full = False  # the medium filled up during the early copies

    def walked(self, paths: list[str]) -> None:
        total = 0
        for path in paths:
            try:
                total += os.stat(path).st_size
            except OSError:
                return
        if total < MIN_BYTES:
            return
        self.folder.mkdir()
        for shard in range(self.SHARDS):
            (self.folder / f"{shard:02d}").mkdir()
        self.active = True

    def add(self, inst) -> None:  # noqa: ANN001 - intake.Instance
        if not self.active or self.error is not None or inst.path in self.slots \
                or inst.sop_instance_uid in self.uids:  # a second copy: the plan keeps one
            return
        entry = _entry(inst, self.profile)
        if entry is None:
            return
        self.uids.add(inst.sop_instance_uid)
        number = len(self.slots)
        self.slots[inst.path] = (number, _key(segments(entry)))
        self._queue((entry, str(self._place(number))))

    def _copy(self, job: tuple) -> None:
        try:
            copy_to(*job)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.full, self.stopped = True, True  # the ordinary writer decides; see finish

    def finish(self) -> None:
        """As _Copier.finish; a medium that filled up during the early copies gets them
        removed (our work folder) and the File-set is written the ordinary way, which fails
        only if the content itself does not fit."""
        super().finish()
        if self.full:
            shutil.rmtree(self.folder)
            self.slots.clear()
            self.active = False

    def take(self, entry: FileEntry, target: Path) -> bool:
        """Rename the early copy of entry to target if it is the content the plan wants."""
        slot = self.slots.get(entry.instance.path) if self.active else None
        if slot is None or entry.action not in STREAMED or _key(segments(entry)) != slot[1]:
            return False
        os.rename(self._place(slot[0]), target)
        self.used.add(entry.instance.path)
        return True

    def check_sources(self) -> None:
        """As EarlyImage.check_sources: the sources of the copies used are unchanged."""
        for path in self.used:
            for part in self.slots[path][1]:
                if len(part) == 4 and part[3] is not None:
                    _check_stamp(part[0], part[3])

def _check_stamp(path: str, stamp: tuple) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceChanged(f"{path}: changed after it was scanned; nothing was written") from exc
    if isosource.stat_stamp(st) != stamp:
        raise SourceChanged(f"{path}: changed after it was scanned; nothing was written")
