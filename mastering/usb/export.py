"""The export to one stick, for ``mastering usb`` and the kiosk: a thin shell over
:func:`mastering.pipeline.master` with ``kind="inplace"``.

1. the stick is checked again (still there, still the same, eligible);
2. mounted (udisks2 or mount(8)); the core refuses before writing if the content does not
   fit, breaks the FAT rules or the stick already holds a File-set without append/replace;
3. the File-set is written in place (every file fsynced, the DICOMDIR last, by rename);
4. read back from the device: unmounted, the device's cached pages dropped, mounted again,
   then the core's verify and a byte compare with every source (``Options.reread``);
5. unmounted and powered off: only now does the person hear "safe to remove".

Failures end in plain words (:data:`MESSAGES`), never in "done"; a stick pulled mid-write is
detected by the error and by the stick having gone.
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
from .mount import Mounter, MountError, drop_cache

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


class _Stick:
    """The mount of one export, followed through the read-back remount."""

    def __init__(self, disk: Disk, mounter: Mounter, stage: StageFn):
        self.disk, self.mounter, self.stage = disk, mounter, stage
        self.point: Path | None = None

    def mount(self) -> Path:
        self.point = self.mounter.mount(self.disk)
        return self.point

    def reread(self, point: Path) -> Path:
        """Options.reread: what is read next comes from the stick, not from memory."""
        self.stage("verifying")
        self.unmount()
        drop_cache(self.disk.target)
        drop_cache(self.disk.node)
        return self.mount()

    def unmount(self) -> None:
        if self.point is not None:
            point, self.point = self.point, None
            self.mounter.unmount(self.disk, point)


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
    stick = _Stick(now, mounter, say)
    opts = replace(options, verify=True, reread=stick.reread)
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
    say("unmounting")
    try:
        stick.unmount()
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
    if isinstance(exc, Cancelled):
        return Outcome(False, "The copy was cancelled; nothing of it was left on the stick.",
                       130, str(exc), report, removed=gone, stages=stages)
    io = _io_errno(exc)
    if gone:
        return Outcome(False, REMOVED, 6, str(exc), report, removed=True, stages=stages)
    if io in GONE_ERRNOS:
        return Outcome(False, FAILED_IO, 6, str(exc), report, stages=stages)
    if not isinstance(exc, MasteringError):
        return Outcome(False, f"The copy failed: {exc}. Nothing on the stick can be trusted.",
                       6, str(exc), report, stages=stages)
    code = exc.exit_code
    message = MESSAGES.get(code, f"The copy failed: {exc}")
    if code == 6 and "--append" not in str(exc):
        message = f"The copy failed: {exc}"
    return Outcome(False, message, code, str(exc), report, stages=stages)


def _io_errno(exc: BaseException) -> int | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None
