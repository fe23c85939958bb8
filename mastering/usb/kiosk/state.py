"""What the kiosk knows and does, apart from HTTP: the sticks (kept current by a pyudev monitor),
what each eligible stick holds (a short read-only mount), the studies of the sources, and the
one export (or format) running at a time, in a worker thread over :mod:`mastering.usb.export`.

Every change bumps :attr:`Kiosk.version` and calls the listeners (the web app pushes a new
snapshot to every open page). Logging here never carries patient data: studies are counted,
not named, and the core's messages (which name files) go to debug level only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ... import reader, update
from ...pipeline import Options
from .. import devices, export
from ..devices import Disk, human_size
from ..format import FormatRefused, describe, format_stick
from ..mount import MountError, mounter
from .config import KioskConfig
from .sources import StudySource, from_config, person

log = logging.getLogger("mastering.kiosk")
#: Kiosk.stop waits this long for a running export to end (cancelled) and unmount the stick
STOP_WAIT = 10.0

#: export stage or core progress label -> (share of the bar where it starts, where it ends)
PHASES = {"mounting": (0.0, 0.02), "scan": (0.02, 0.10), "convert": (0.10, 0.20),
          "render": (0.10, 0.20), "write": (0.20, 0.75), "verifying": (0.75, 0.76),
          "verify": (0.76, 0.85), "read back": (0.85, 0.97), "unmounting": (0.97, 0.98),
          "powering off": (0.98, 0.99), "safe": (1.0, 1.0)}
WORDS = {"mounting": "Opening the stick", "scan": "Reading the studies",
         "convert": "Preparing the images", "render": "Preparing the images",
         "write": "Copying to the stick", "verifying": "Checking the copy",
         "verify": "Checking the copy", "read back": "Checking the copy",
         "unmounting": "Closing the stick", "powering off": "Closing the stick",
         "safe": export.SAFE, "formatting": "Formatting the stick"}


class KioskError(Exception):
    """A request the kiosk cannot do now; the message is for the person at the screen."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass
class StickInfo:
    """What an eligible stick holds, read while it was mounted read-only for a moment."""

    free: int | None = None
    total: int | None = None
    patients: list[str] = field(default_factory=list)  # names, shown on the screen only
    studies: int = 0
    holds_fileset: bool = False
    error: str = ""


@dataclass
class Job:
    id: str
    kind: str  # "export" | "format"
    identity: str
    title: str
    studies: int = 0
    mode: str = ""
    state: str = "running"  # running | done | failed
    phase: str = "mounting"
    fraction: float = 0.0
    started: float = field(default_factory=time.monotonic)
    message: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    removed: threading.Event = field(default_factory=threading.Event)

    def advance(self, phase: str, done: int = 0, total: int = 0) -> None:
        key = phase.split(" ", 1)[0] if phase.startswith("write") else phase
        lo, hi = PHASES.get(key, (self.fraction, self.fraction))
        share = lo + (hi - lo) * (done / total if total else 0.0)
        if key in WORDS and lo >= PHASES.get(self.phase, (0.0, 0.0))[0]:
            self.phase = key  # never back to an earlier stage
        self.fraction = max(self.fraction, min(share, 1.0))

    def to_json(self) -> dict:
        elapsed = time.monotonic() - self.started
        eta = None
        if self.state == "running" and self.fraction > 0.05:
            eta = round(elapsed * (1 - self.fraction) / self.fraction)
        return {"id": self.id, "kind": self.kind, "identity": self.identity,
                "title": self.title, "studies": self.studies, "mode": self.mode,
                "state": self.state, "phase": self.phase,
                "phase_text": WORDS.get(self.phase, ""),
                "percent": round(100 * self.fraction), "eta_seconds": eta,
                "message": self.message}


class Kiosk:
    def __init__(self, cfg: KioskConfig, sources: list[StudySource] | None = None):
        self.cfg = cfg
        self.sources = sources if sources is not None else from_config(cfg.folders,
                                                                        cfg.profile)
        self.lock = threading.RLock()
        self.disks: list[Disk] = []
        self.info: dict[str, StickInfo] = {}
        self.own: set[tuple[int, int]] = set()  # devices we have mounted right now
        self.finished: set[str] = set()  # "safe to remove": never touched again until it goes
        self.job: Job | None = None
        self.version = 0
        self.listeners: list[Callable[[], None]] = []
        self.scanning = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer = None
        self._threads: list[threading.Thread] = []
        self._workers: list[tuple[threading.Thread, Disk]] = []  # exports, formats, reads

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._observer = devices.watch(lambda action, name: self._wake.set())
        for target, name in ((self._device_loop, "kiosk-devices"),
                             (self._source_loop, "kiosk-sources")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._wake.set()

    def stop(self, wait: float = STOP_WAIT) -> None:
        """Stop watching; cancel a running export and wait (at most `wait` seconds) until it
        has ended and unmounted the stick. A stick still mounted then is unmounted here."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.send_stop()  # no join: the process is ending anyway
        if self.job is not None:
            self.job.cancel.set()
        deadline = time.monotonic() + wait
        with self.lock:
            workers = list(self._workers)
        for thread, disk in workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not end in %.0f s; unmounting %s", thread.name, wait,
                            disk.node)
                self._force_unmount(disk)

    def _force_unmount(self, disk: Disk) -> None:
        points = _mount_points(disk)
        if not points:
            return
        try:
            with contextlib.closing(mounter(self.cfg.policy.mounter)) as how:
                for point in points:
                    how.unmount(disk, Path(point), lazy=True)
        except (MountError, OSError) as exc:
            log.error("unmounting %s failed: %s", disk.node, exc)

    def _worker(self, target, disk: Disk, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=(disk, *args), daemon=True, name=name)
        with self.lock:
            self._workers = [(t, d) for t, d in self._workers if t.is_alive()]
            self._workers.append((thread, disk))
        thread.start()

    def changed(self) -> None:
        with self.lock:
            self.version += 1
        for listener in list(self.listeners):
            listener()

    # -- sticks -----------------------------------------------------------------------------

    def _device_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5)  # events, and a slow poll in case one is missed
            self._wake.clear()
            time.sleep(0.15)  # udev sends several events per stick: take them together
            try:
                self.refresh_devices()
            except Exception:  # noqa: BLE001 - keep watching whatever one listing did
                log.exception("listing the disks failed")

    def refresh_devices(self) -> None:
        with self.lock:
            own = set(self.own)
        disks = devices.list_disks(self.cfg.policy, own=own)
        with self.lock:
            before = [(d.identity, d.state, d.reason) for d in self.disks]
            self.disks = disks
            present = {d.identity for d in disks}
            job = self.job
            if job is not None and job.identity not in present:
                if job.state == "running":
                    job.removed.set()  # the export reports it: never "done"
                    job.cancel.set()
                elif job.kind == "export" and job.state == "done":
                    self.job = None  # the stick was taken away: ready for the next one
            for key in set(self.info) - present:
                del self.info[key]
            self.finished &= present
            todo = [d for d in disks if d.eligible and d.identity not in self.info
                    and d.identity not in self.finished
                    and (self.job is None or self.job.state != "running")]
            for d in todo:
                self.info[d.identity] = StickInfo(error="reading")
        if [(d.identity, d.state, d.reason) for d in disks] != before or todo:
            log.info("sticks: %s", ", ".join(f"{d.name} {d.state}" for d in disks) or "none")
            self.changed()
        for disk in todo:
            self._worker(self._inspect, disk, f"read-{disk.name}")

    def _inspect(self, disk: Disk) -> None:
        info = StickInfo()
        how = None
        try:
            how = mounter(self.cfg.policy.mounter)
            with self.lock:
                self.own.add(disk.devnum)
                self.own.update(_partition_numbers(disk))
            point = how.mount(disk, read_only=True)
            try:
                st = os.statvfs(point)
                info.free, info.total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
                found = update.find(point)
                if found is not None:
                    info.holds_fileset, info.studies = True, found.studies
                    with contextlib.suppress(reader.MediaError), \
                            reader.FolderMedium(point) as medium:
                        info.patients = [person(p["name"]) or p["id"] for p in
                                         reader.summarize(medium)["patients"]]
            finally:
                how.unmount(disk, point)
        except (MountError, OSError, update.UpdateRefused) as exc:
            info.error = "The stick's content cannot be read."
            info.holds_fileset = isinstance(exc, update.UpdateRefused)
            log.debug("reading %s failed: %s", disk.node, exc)
        finally:
            with self.lock:
                self.own.difference_update({disk.devnum, *_partition_numbers(disk)})
            if how is not None:
                how.close()
        with self.lock:
            if any(d.identity == disk.identity for d in self.disks):
                self.info[disk.identity] = info
        self.changed()

    # -- studies ----------------------------------------------------------------------------

    def _source_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh_sources()
            self._stop.wait(timeout=self.cfg.rescan_seconds)

    def refresh_sources(self) -> None:
        with self.lock:
            self.scanning = True
        self.changed()
        for source in self.sources:
            try:
                source.refresh()
            except Exception:  # noqa: BLE001 - one broken source must not stop the others
                log.exception("reading the study source %s failed", source.name)
        with self.lock:
            self.scanning = False
        log.info("studies: %d", sum(len(s.studies()) for s in self.sources))
        self.changed()

    def studies(self) -> dict:
        return {study.id: (source, study) for source in self.sources
                for study in source.studies()}

    # -- the page's view --------------------------------------------------------------------

    def snapshot(self) -> dict:
        with self.lock:
            sticks = []
            for d in self.disks:
                data = d.to_json()
                info = self.info.get(d.identity)
                if info is not None:
                    data.update(free=info.free, free_text=human_size(info.free)
                                if info.free is not None else "", holds_fileset=
                                info.holds_fileset, holds_patients=info.patients,
                                holds_studies=info.studies, reading=info.error == "reading",
                                read_error="" if info.error == "reading" else info.error)
                if d.state == "needs-format":
                    data["format_text"] = describe(d)
                sticks.append({k: v for k, v in data.items() if k not in ("sys_path",
                                                                          "usb_device")})
            return {"version": self.version, "sticks": sticks, "scanning": self.scanning,
                    "studies": [s.to_json() for _src, s in self.studies().values()],
                    "job": self.job.to_json() if self.job else None}

    # -- actions ----------------------------------------------------------------------------

    def _disk(self, identity: str) -> Disk:
        with self.lock:
            disk = next((d for d in self.disks if d.identity == identity), None)
        if disk is None:
            raise KioskError("That stick is not there any more; insert it again.")
        return disk

    def _busy(self) -> None:
        if self.job is not None and self.job.state == "running":
            raise KioskError("Please wait: a copy is running.")

    def start_export(self, identity: str, study_ids: list[str], mode: str = "") -> Job:
        with self.lock:
            self._busy()
            disk = self._disk(identity)
            if not disk.eligible:
                raise KioskError(disk.reason)
            info = self.info.get(identity)
            if info is not None and info.error == "reading":
                raise KioskError("Please wait: the stick is still being read.")
            if mode not in ("", "append", "replace"):
                raise KioskError("Unknown choice.", 400)
            known = self.studies()
            chosen = [known[i] for i in study_ids if i in known]
            if not chosen or len(chosen) != len(set(study_ids)):
                raise KioskError("Choose the studies to copy first.", 400)
            files = [f for source, study in chosen for f in source.files(study)]
            job = Job(uuid.uuid4().hex[:12], "export", identity, disk.title, len(chosen), mode)
            self.job = job
        log.info("export %s started: %d study(ies), %d file(s), to %s (%s)", job.id,
                 len(chosen), len(files), disk.node, mode or "new")
        self._worker(self._run_export, disk, f"export-{job.id}", job, files)
        self.changed()
        return job

    def _run_export(self, disk: Disk, job: Job, files: list) -> None:
        last = [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            job.advance(stage, done, total)
            now = time.monotonic()
            if now - last[0] > 0.2 or done == total:
                last[0] = now
                self.changed()

        def stage(name: str) -> None:
            job.advance(name)
            self.changed()

        options = Options.from_env(self.cfg.profile, fileset_id=self.cfg.fileset_id,
                                   viewer=self.cfg.viewer and job.mode != "append",
                                   site=self.cfg.site, update=job.mode, workers=1)
        try:
            with self.lock:
                self.own.update({disk.devnum, *_partition_numbers(disk)})
            with contextlib.closing(mounter(self.cfg.policy.mounter)) as how:
                outcome = export.export(disk, files, options, how, self.cfg.policy,
                                        progress=progress, cancel=job.cancel, stage=stage,
                                        removed=job.removed)
        except MountError as exc:
            outcome = export.Outcome(False, f"The stick cannot be opened: {exc}", 6, str(exc))
        except Exception as exc:  # noqa: BLE001 - the person must hear an ending
            log.exception("export %s crashed", job.id)
            outcome = export.Outcome(False, "The copy failed. Nothing on the stick can be "
                                     "trusted; insert it again to retry.", 1, str(exc))
        finally:
            with self.lock:
                self.own.difference_update({disk.devnum, *_partition_numbers(disk)})
        job.state, job.message = ("done" if outcome.ok else "failed"), outcome.message
        if outcome.ok:
            job.fraction, job.phase = 1.0, "safe"
        log.info("export %s %s (exit %d)", job.id, job.state, outcome.exit_code)
        log.debug("export %s detail: %s", job.id, outcome.detail)
        with self.lock:
            self.info.pop(disk.identity, None)  # it holds something else now
            if outcome.ok:
                self.finished.add(disk.identity)  # powered off: read it only when back
        self._wake.set()
        self.changed()

    def start_format(self, identity: str) -> Job:
        with self.lock:
            self._busy()
            disk = self._disk(identity)
            if disk.state != "needs-format":
                raise KioskError(disk.reason or "This stick needs no formatting.")
            job = Job(uuid.uuid4().hex[:12], "format", identity, disk.title, phase="formatting")
            self.job = job
        log.info("format %s started on %s", job.id, disk.node)
        self._worker(self._run_format, disk, f"format-{job.id}", job)
        self.changed()
        return job

    def _run_format(self, disk: Disk, job: Job) -> None:
        try:  # format_stick looks the stick up again: the one confirmed, as it was shown
            with contextlib.closing(mounter(self.cfg.policy.mounter)) as how:
                format_stick(disk, how, self.cfg.policy, identity=job.identity)
            job.state, job.message = "done", "The stick is formatted and ready."
        except (FormatRefused, MountError, OSError, LookupError) as exc:
            job.state, job.message = "failed", f"The stick could not be formatted: {exc}"
        job.fraction = 1.0
        log.info("format %s %s", job.id, job.state)
        self._wake.set()
        self.changed()

    def cancel(self) -> None:
        if self.job is not None and self.job.state == "running" and self.job.kind == "export":
            self.job.cancel.set()

    def dismiss(self) -> None:
        with self.lock:
            if self.job is not None and self.job.state != "running":
                self.job = None
        self.changed()


def _mount_points(disk: Disk) -> list[str]:
    """Where the stick's file system is mounted now (by device number, not by node name)."""
    numbers = {disk.devnum, *_partition_numbers(disk)}
    points = devices.Mounts.read().points
    return [p for n in numbers for p in points.get(n, [])]


def _partition_numbers(disk: Disk) -> set[tuple[int, int]]:
    """The target's device number (the partition we mount)."""
    try:
        rdev = os.stat(disk.target).st_rdev
    except OSError:
        return set()
    return {(os.major(rdev), os.minor(rdev))}
