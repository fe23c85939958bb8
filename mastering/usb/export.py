"""The export to one stick, for ``mastering usb`` and the kiosk: a thin shell over
:func:`mastering.pipeline.master` with ``kind="inplace"``.

1. the stick is checked again (still there, still the same, eligible);
2. mounted (udisks2 or mount(8)); the core refuses before writing if the content does not
   fit, breaks the FAT rules or the stick already holds a File-set without append/replace;
3. the File-set is written in place (every file fsynced, the DICOMDIR last, by rename);
4. read back from the device (:class:`ReadBack`, the core's ``Options.reread``): unmounted
   (never lazily: a lazy unmount keeps the file system and its cache alive), checked to be
   the same stick, the device's cached pages dropped, mounted again, then the core's verify
   and a byte compare with every source; finally the device's read counter must show that
   at least those bytes were read from it. Anything less is "not verified", a failure;
5. unmounted (again never lazily) and powered off: only now does the person hear "safe to
   remove".

Failures end in plain words (:data:`MESSAGES`), never in "done"; a stick pulled mid-write is
detected by the error and by the stick having gone, and that comes first: a watcher that saw
the stick go also cancels the run, and the person must hear "removed", not "cancelled".
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from threading import Event

from ..intake import Cancelled
from ..pipeline import MasteringError, Options, Report, master
from . import devices
from .devices import Disk, Policy
from .mount import SECTOR, Mounter, MountError, drop_cache, held_elsewhere, sectors_read

StageFn = Callable[[str], None]
ProgressFn = Callable[[str, int, int], None]

REMOVED = ("The stick was removed before the copy finished. Nothing on it can be trusted; "
           "insert it again to retry.")
FAILED_IO = ("The stick stopped working before the copy finished. Nothing on it can be "
             "trusted; insert it again to retry, or use another stick.")
MESSAGES = {
    3: "Some of the chosen images cannot be copied (they are damaged or conflict with "
       "images on the stick). Nothing was copied.",
    4: "The chosen studies do not fit on this stick. Nothing was copied; use a larger stick "
       "or choose fewer studies.",
    5: "The copy on the stick does not read back correctly: the stick may be faulty. Its "
       "new files were removed; use another stick.",
    6: "This stick already holds images. Choose to add to them or to replace them.",
}
SAFE = "Safe to remove the stick."
NOT_VERIFIED = ("The copy could not be checked on the stick itself (it could not be read back "
                "from the device). Its new files were removed; nothing on it can be trusted. "
                "Try again, or use another stick.")
CANCELLED = "The copy was cancelled; nothing of it was left on the stick."
CANCELLED_AFTER_REMOVAL = ("The copy was cancelled after the stick's earlier images had been "
                           "removed: the stick now holds neither those nor the new ones.")
OLD_GONE = " The stick's earlier images had already been removed."
GONE_ERRNOS = {errno.EIO, errno.ENODEV, errno.ENXIO, errno.ENOTCONN, errno.ESHUTDOWN,
               errno.EROFS, errno.ENOMEDIUM if hasattr(errno, "ENOMEDIUM") else errno.EIO}


@dataclass
class Outcome:
    """How an export ended."""

    ok: bool
    message: str  # for the person at the desk
    exit_code: int = 0
    detail: str = ""  # for the log and the CLI: the core's error
    report: Report | None = None
    powered_off: bool = False
    removed: bool = False
    stages: list[str] = field(default_factory=list)


class ReadBackError(MountError):
    """The read-back could not be made from the device; the copy is not verified.
    ``unmounted``: the stick was unmounted already (nothing can be undone there now)."""

    def __init__(self, message: str, *, unmounted: bool = False):
        super().__init__(message)
        self.unmounted = unmounted


class _Stick:
    """The mount of one export, followed through the read-back remount."""

    def __init__(self, disk: Disk, mounter: Mounter, stage: StageFn, policy: Policy):
        self.disk, self.mounter, self.stage, self.policy = disk, mounter, stage, policy
        self.point: Path | None = None
        self.notes: list[str] = []  # for the report: what the read-back could not do

    def mount(self) -> Path:
        self.point = self.mounter.mount(self.disk)
        return self.point

    def unmount(self, *, lazy: bool = True) -> None:
        if self.point is not None:
            self.mounter.unmount(self.disk, self.point, lazy=lazy)
            self.point = None


class ReadBack:
    """Options.reread for a stick: what is read next comes from the device, and
    :meth:`confirm` proves it afterwards by the device's read counter."""

    def __init__(self, stick: _Stick):
        self.stick = stick
        self.before: int | None = None
        self.problem = ""  # found at the remount, raised by confirm (after the undo point)

    def __call__(self, point: Path) -> Path:
        stick = self.stick
        stick.stage("verifying")
        try:
            stick.unmount(lazy=False)
        except MountError as exc:
            raise ReadBackError(f"the stick could not be unmounted for the read-back ({exc}); "
                                "a lazy unmount would keep its content in memory") from exc
        if still_there(stick.disk, stick.policy) is None:
            raise ReadBackError("the stick went, or another took its place, before the "
                                "read-back", unmounted=True)
        if held_elsewhere(stick.disk.target):
            self.problem = ("the stick's file system stayed alive after the unmount (mounted "
                            "elsewhere, e.g. in another mount namespace): the read-back would "
                            "come from memory")
        for node in dict.fromkeys((stick.disk.target, stick.disk.node)):
            stick.notes += drop_cache(node)
        try:
            new = stick.mount()
        except MountError as exc:
            raise ReadBackError(f"the stick could not be mounted again for the read-back: "
                                f"{exc}", unmounted=True) from exc
        self.before = sectors_read(stick.disk.target)  # after the mount's own probing
        return new

    def confirm(self, nbytes: int) -> None:
        """At least nbytes (what the check compared) were read from the device since the
        remount; else the check read memory, not the stick."""
        if self.problem:
            raise ReadBackError(self.problem)
        target = self.stick.disk.target
        after = sectors_read(target)
        if self.before is None or after is None:
            raise ReadBackError(f"{target}: the kernel does not say how much was read from "
                                "it; the read-back cannot be shown to come from the stick")
        got = (after - self.before) * SECTOR
        if got < nbytes:
            raise ReadBackError(f"the read-back read {got} bytes from {target} for {nbytes} "
                                "bytes of files: the rest came from memory (the file system "
                                "stayed alive, e.g. mounted elsewhere)")
        if self.stick.notes:
            self.stick.notes.append(f"the read-back still came from the device ({got} bytes "
                                    "read from it)")


def still_there(disk: Disk, policy: Policy, own: Sequence[tuple[int, int]] = ()) -> Disk | None:
    """The same stick as udev sees it now, or None if it went (or another took its place)."""
    try:
        now = devices.find(policy, disk.node, own=own)
    except (LookupError, OSError):
        return None
    return now if now.identity == disk.identity and now.size else None


def export(disk: Disk, inputs: Sequence[Path], options: Options, mounter: Mounter,
           policy: Policy, *, progress: ProgressFn | None = None, cancel: Event | None = None,
           stage: StageFn | None = None, removed: Event | None = None) -> Outcome:
    """Write the inputs to the stick; every path ends in an Outcome, none in an exception
    (except KeyboardInterrupt). `removed` is set by a watcher that saw the stick go."""
    stages: list[str] = []

    def say(name: str) -> None:
        stages.append(name)
        if stage:
            stage(name)

    now = still_there(disk, policy)
    if now is None:
        return Outcome(False, REMOVED, 6, "the stick is not there any more", removed=True)
    if not now.eligible:
        return Outcome(False, now.reason, 2, now.reason)
    stick = _Stick(now, mounter, say, policy)
    opts = replace(options, verify=True, reread=ReadBack(stick))
    say("mounting")
    try:
        point = stick.mount()
    except MountError as exc:
        return Outcome(False, f"The stick cannot be opened: {exc}", 6, str(exc))
    say("writing")
    try:
        report = master(inputs, point, opts, kind="inplace", progress=progress, cancel=cancel)
    except (MasteringError, Cancelled, OSError) as exc:
        return _failed(exc, stick, policy, removed, stages)
    report.warnings += stick.notes
    say("unmounting")
    try:
        stick.unmount(lazy=False)  # a lazily detached stick is not safe to pull yet
        say("powering off")
        powered = mounter.power_off(now)
    except (MountError, OSError) as exc:
        if still_there(now, policy) is None:
            powered = True  # it went: as good as powered off, the data was verified
        else:
            return Outcome(False, "The copy is complete and checked, but the stick could not "
                           f"be closed ({exc}); do not remove it yet.", 6, str(exc), report,
                           stages=stages)
    say("safe")
    return Outcome(True, SAFE, 0, "", report, powered_off=powered, stages=stages)


def _failed(exc: BaseException, stick: _Stick, policy: Policy, removed: Event | None,
            stages: list[str]) -> Outcome:
    report = exc.report if isinstance(exc, MasteringError) else None
    with contextlib.suppress(MountError, OSError):
        stick.unmount()
    gone = (removed is not None and removed.is_set()) or still_there(stick.disk, policy) is None
    old_gone = getattr(exc, "old_removed", False)
    if gone:  # before "cancelled": a watcher that saw the stick go cancels the run too
        return Outcome(False, REMOVED, 6, str(exc), report, removed=True, stages=stages)
    if isinstance(exc, Cancelled):
        return Outcome(False, CANCELLED_AFTER_REMOVAL if old_gone else CANCELLED, 130,
                       str(exc), report, stages=stages)
    if isinstance(exc, ReadBackError):
        return Outcome(False, NOT_VERIFIED + (OLD_GONE if old_gone else ""), 5, str(exc),
                       report, stages=stages)
    io = _io_errno(exc)
    if io in GONE_ERRNOS:
        return Outcome(False, FAILED_IO, 6, str(exc), report, stages=stages)
    if not isinstance(exc, MasteringError):
        return Outcome(False, f"The copy failed: {exc}. Nothing on the stick can be trusted.",
                       6, str(exc), report, stages=stages)
    code = exc.exit_code
    message = MESSAGES.get(code, f"The copy failed: {exc}")
    if code == 6 and "--append" not in str(exc):
        message = f"The copy failed: {exc}"
    return Outcome(False, message + (OLD_GONE if old_gone else ""), code, str(exc), report,
                   stages=stages)


def _io_errno(exc: BaseException) -> int | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None
