"""One drive's worker: takes a ready job and carries it to ``done`` (or back to the queue).

Every change of state it makes names the state it expects the job to be in; if the store
refuses (someone else moved the job: an operator's command, a daemon that should not be
there), the worker stops working on it at once and says so, it never writes over them.

mastering: the job's spooled instances go through :func:`mastering.pipeline.master` (kind
"iso"), the only DICOMDIR/ISO code path; each image's size and SHA-256 are recorded with the
change to ``burning`` (an image is reused after a crash only if it still has that checksum).
burning/verifying: every volume x copy is burned on its own blank disc (the operator is asked
for the next one; the drive ejects between discs) and read back before it counts; a disc that
fails to burn or to read back is recorded as spoiled and the job is retried with backoff on a
new disc. Permanent faults (invalid input, content that does not fit) fail at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

from .. import profiles
from ..intake import Cancelled
from ..pipeline import MasteringError, Options, master
from .burner import PAD_BYTES, BurnError, DiscDrive, ImageFolder, MediaState
from .readback import read_back
from .spool import sha256_file
from .store import ACTIVE

log = logging.getLogger("mastering.daemon.worker")


class Transient(Exception):
    """Worth another try later (drive busy, a spoiled disc, spool I/O)."""


class Permanent(Exception):
    """Retrying will not help (invalid input, does not fit, unknown profile)."""


class Shutdown(Exception):
    """The daemon is stopping: leave the job as it is; recovery at the next start redoes it."""


class Lost(Exception):
    """The job is no longer in the state this worker left it in: someone else owns it now."""


class Unconvertible(Permanent):
    """Mastering could not convert some instances (a compressed data set that will not
    decode): (SOP Instance UID, reason) for each."""

    def __init__(self, message: str, instances: list[tuple[str, str]]):
        super().__init__(message)
        self.instances = instances


def fileset_id(job) -> str:
    if job.supplement_of:
        return f"JOB{job.supplement_of:06d}_S{job.supplement_no}"[:16]
    return f"JOB{job.id:06d}"


def options_for(cfg, job) -> Options:
    o = job.options
    try:
        profile = profiles.load(o.get("profile") or cfg.media.profile)
    except profiles.ProfileError as exc:
        raise Permanent(str(exc)) from exc
    if cfg.media.capacity:
        profile = profile.with_capacity(cfg.media.capacity)
    return Options(profile, fileset_id=o.get("fileset_id") or fileset_id(job),
                   span=o.get("span", cfg.media.span), label=o.get("label", cfg.media.label),
                   viewer=o.get("viewer", cfg.media.viewer), site=cfg.media.site,
                   workers=cfg.media.workers, sync=True, fileset_uid=o.get("fileset_uid"))


class Worker(threading.Thread):
    def __init__(self, daemon, drive: DiscDrive | ImageFolder):
        super().__init__(name=f"drive-{drive.name}", daemon=True)
        self.d = daemon
        self.drive = drive
        self.status = "idle"
        self.job_id: int | None = None
        self._warned = ""

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        while not self.d.stopping.is_set():
            try:
                if not self.step():
                    self.d.stopping.wait(self.d.cfg.daemon.tick_seconds)
            except Exception:  # keep the drive serving; the job's state says what happened
                log.exception("drive %s: unexpected error", self.drive.name)
                self.d.stopping.wait(5)

    def step(self) -> bool:
        store = self.d.store
        if not store.has_ready(time.time()):
            self.status = "idle"
            return False
        if isinstance(self.drive, DiscDrive):
            why = self._medium_problem()
            if why:
                self.status = f"waiting: {why}"
                self.d.stopping.wait(self.drive.cfg.poll_seconds)
                return True
        job = store.claim_ready(self.drive.name, time.time())
        if job is None:
            return False
        self.run_job(job)
        return True

    def _medium_problem(self) -> str:
        try:
            state = self.drive.media_state()
        except BurnError as exc:
            return str(exc)
        why = self.drive.usable(state, 0)
        if why and why != self._warned:
            log.warning("drive %s: %s", self.drive.name, why)
        self._warned = why
        return why

    # -- one job ----------------------------------------------------------------------------

    def move(self, job_id: int, to: str, expect: tuple[str, ...], **fields) -> None:
        """A change of state of a job this worker runs; Lost if it is not where we left it."""
        if not self.d.store.transition(job_id, to, expect=expect, **fields):
            raise Lost(f"job {job_id} was moved by someone else (now "
                       f"{self.d.store.job(job_id).state}); drive {self.drive.name} leaves it")

    def finish(self, medium: int, state: str, **fields) -> None:
        """The outcome of a disc this worker burns; Lost if someone else reported on it."""
        if not self.d.store.finish_medium(medium, state, **fields):
            raise Lost(f"medium {medium} was reported on by someone else; drive "
                       f"{self.drive.name} leaves its job")

    def run_job(self, job) -> None:
        self.job_id = job.id
        cancel = threading.Event()
        watcher = threading.Thread(target=self._watch_cancel, args=(job.id, cancel),
                                   daemon=True)
        watcher.start()
        store = self.d.store
        try:
            try:
                images = self.master(job, cancel)
                self.burn_all(store.job(job.id), images, cancel)
                self.move(job.id, "done", ("verifying",), drive=self.drive.name, reason="")
                log.info("job %d done on drive %s", job.id, self.drive.name)
            except Shutdown:
                log.info("job %d interrupted by shutdown; it is redone at the next start",
                         job.id)
            except (Cancelled, _CancelledBurn):
                if self.d.stopping.is_set():
                    log.info("job %d interrupted by shutdown", job.id)
                else:
                    self.move(job.id, "cancelled", ACTIVE, reason="cancelled by the operator",
                              drive=self.drive.name)
                    log.info("job %d cancelled", job.id)
            except Unconvertible as exc:
                for uid, why in exc.instances:  # recorded before the state that reports it
                    store.audit(job.id, "unconvertible", drive=self.drive.name,
                                detail=f"instance {uid}: {why}")
                self.move(job.id, "failed", ACTIVE, reason=str(exc), drive=self.drive.name)
                log.error("job %d failed: %s", job.id, exc)
            except Permanent as exc:
                self.move(job.id, "failed", ACTIVE, reason=str(exc), drive=self.drive.name)
                log.error("job %d failed: %s", job.id, exc)
            except Transient as exc:
                self.backoff(job.id, str(exc))
            except Lost:
                raise
            except Exception as exc:  # a bug or an unforeseen fault: the job must not hang
                log.exception("job %d: unexpected error", job.id)
                self.backoff(job.id, f"unexpected error: {exc}")
        except Lost as exc:
            log.error("%s", exc)
        finally:
            cancel.set()
            self.job_id = None
            self.status = "idle"

    def _watch_cancel(self, job_id: int, cancel: threading.Event) -> None:
        while not cancel.wait(0.25):
            if self.d.stopping.is_set():
                cancel.set()
                return
            try:
                if self.d.store.job(job_id).cancel_requested:
                    cancel.set()
            except Exception:  # noqa: BLE001 - a busy database: look again next second
                pass

    def backoff(self, job_id: int, reason: str) -> None:
        store, retry = self.d.store, self.d.cfg.retry
        job = store.job(job_id)
        attempts = job.attempts + 1
        if job.cancel_requested:  # asked while the attempt ran: no next attempt
            self.move(job_id, "cancelled", ACTIVE, attempts=attempts, drive=self.drive.name,
                      reason="cancelled by the operator")
            log.info("job %d cancelled (its attempt had failed: %s)", job_id, reason)
            return
        if attempts >= retry.max_attempts:
            self.move(job_id, "failed", ACTIVE, attempts=attempts, drive=self.drive.name,
                      reason=f"gave up after {attempts} attempts: {reason}")
            log.error("job %d failed after %d attempts: %s", job_id, attempts, reason)
            return
        delay = min(retry.backoff_seconds * 2 ** (attempts - 1), retry.max_backoff_seconds)
        self.move(job_id, "ready", ACTIVE, attempts=attempts, not_before=time.time() + delay,
                  reason=f"attempt {attempts} failed: {reason}", drive=self.drive.name)
        log.warning("job %d: attempt %d failed (%s); next try in %.0f s", job_id, attempts,
                    reason, delay)

    # -- mastering --------------------------------------------------------------------------

    def master(self, job, cancel: threading.Event) -> list[dict]:
        store = self.d.store
        image_dir = self.d.spool.job_dir(job.id) / "image"
        if job.images and all(_intact(img) for img in job.images):
            self.move(job.id, "burning", ("mastering",),
                      detail="image(s) from the earlier attempt, checksums intact")
            return job.images
        shutil.rmtree(image_dir, ignore_errors=True)  # our own job folder: a killed run's
        image_dir.mkdir(parents=True, mode=0o700)
        records = store.job_files(job.id)
        missing = [r.sop_uid for r in records if not Path(r.path).is_file()]
        if missing or not records:
            raise Permanent(f"{len(missing)} spooled instance(s) missing (first: "
                            f"{missing[0] if missing else 'none in the job'})")
        options = options_for(self.d.cfg, job)
        cap = options.profile.capacity_bytes
        if isinstance(self.drive, DiscDrive) and cap:  # a disc holds the image and the pad
            options.profile = options.profile.with_capacity(max(cap - PAD_BYTES, 1))
        self.status = f"mastering job {job.id}"
        try:
            report = master_in_child([Path(r.path) for r in records],
                                     image_dir / f"{options.fileset_id}.iso", options, cancel)
        except Unconvertible as exc:  # name them, and the operator's way out
            uids = [u for u, _why in exc.instances]
            raise Unconvertible(
                f"{exc}: {len(uids)} instance(s) cannot be converted for profile "
                f"{options.profile.id} (first: {uids[0]}: {exc.instances[0][1]}); nothing "
                f"was burned. To burn the rest: mastering jobs retry {job.id} "
                + " ".join(f"--leave-out {u}" for u in uids), exc.instances) from None
        if self.d.stopping.is_set():
            raise Shutdown()
        images = []
        for i, vol in enumerate(report.volumes, 1):
            stem = Path(vol.path).name.removesuffix(".iso")
            images.append({"index": i, "count": len(report.volumes), "path": vol.path,
                           "bytes": vol.bytes, "sha256": sha256_file(vol.path),
                           "fileset_id": vol.fileset_id, "fileset_uid": vol.fileset_uid,
                           "instances": vol.instances,
                           "labels": [p for p in report.labels
                                      if Path(p).name.startswith(stem + ".label")]})
        self.move(job.id, "burning", ("mastering",), images=images,
                  detail=f"{len(images)} volume(s), {report.instances} instance(s), "
                  f"{report.bytes} bytes", checksum=images[0]["sha256"])
        log.info("job %d mastered: %d volume(s), %d instance(s)", job.id, len(images),
                 report.instances)
        return images

    # -- burning and read-back --------------------------------------------------------------

    def burn_all(self, job, images: list[dict], cancel: threading.Event) -> None:
        profile = options_for(self.d.cfg, job).profile
        if isinstance(self.drive, ImageFolder):
            self._publish(job, images, profile, cancel)
            return
        sums = {img["index"]: img["sha256"] for img in images}
        good = {(m["volume"], m["copy"]) for m in self.d.store.media(job.id)  # of these images
                if m["state"] == "verified" and m["sha256"] == sums.get(m["volume"])}
        copies = self.copies(job)
        discs = [(img, c) for img in images for c in range(1, copies + 1)
                 if (img["index"], c) not in good]
        for n, (img, copy) in enumerate(discs, 1):
            state = self._wait_for_disc(job, img, copy, cancel, first=n == 1)
            self._burn_one(job, img, copy, state, profile, cancel)
        if not discs:  # every disc verified before a crash: only the final state is missing
            self.move(job.id, "verifying", ("burning", "verifying"))

    def copies(self, job) -> int:
        """An MCM request says its own Number of Copies; other jobs take media.copies."""
        return job.copies if job.source == "mcm" else self.d.cfg.media.copies

    def _wait_for_disc(self, job, img: dict, copy: int, cancel: threading.Event,
                       first: bool) -> MediaState:
        label = f"disc {img['index']} of {img['count']}, copy {copy} of {self.copies(job)}"
        told = ""
        while True:
            if cancel.is_set():
                self._raise_cancel()
            try:
                state = self.drive.media_state()
                why = self.drive.usable(state, img["bytes"])
            except BurnError as exc:
                why, state = str(exc), None
            if not why:
                return state
            self.status = f"job {job.id}: waiting for {label}: {why}"
            if why != told:
                log.warning("drive %s, job %d: %s needed: %s", self.drive.name, job.id, label,
                            why)
                self.d.store.audit(job.id, "waiting-for-disc", drive=self.drive.name,
                                   detail=f"{label}: {why}")
                told = why
            cancel.wait(self.drive.cfg.poll_seconds)

    def _raise_cancel(self):
        if self.d.stopping.is_set():
            raise Shutdown()
        raise _CancelledBurn()

    def _burn_one(self, job, img: dict, copy: int, state: MediaState, profile,
                  cancel: threading.Event) -> None:
        store, name = self.d.store, self.drive.name
        if store.job(job.id).state == "verifying":  # the next disc of the job
            self.move(job.id, "burning", ("verifying",), drive=name)
        medium = store.start_medium(job.id, img["index"], copy, name)
        disc = f"medium {medium}: volume {img['index']}/{img['count']} copy {copy}"
        store.audit(job.id, "burn-start", drive=name, disc=disc, checksum=img["sha256"],
                    detail=state.describe())
        self.status = f"burning job {job.id} ({disc})"

        def progress(text: str) -> None:
            self.status = f"burning job {job.id} ({disc}): {text}"

        try:
            seconds = self.drive.burn(Path(img["path"]), state, cancel, progress)
        except BurnError as exc:
            if exc.written:
                self.finish(medium, "spoiled", detail=str(exc))
                store.audit(job.id, "disc-spoiled", drive=name, disc=disc, detail=str(exc))
            else:  # nothing reached it: not a spoiled disc, the wrong one
                self.finish(medium, "unused", detail=str(exc))
                store.audit(job.id, "disc-refused", drive=name, disc=disc, detail=str(exc))
            self.drive.eject()
            if cancel.is_set():
                self._raise_cancel()
            raise Transient(str(exc)) from exc
        self.move(job.id, "verifying", ("burning",), drive=name, disc=disc,
                  checksum=img["sha256"], detail=f"burned in {seconds:.1f} s")
        self.status = f"verifying job {job.id} ({disc})"
        rb = read_back(self.drive.read_path, img["bytes"], img["sha256"], profile, cancel)
        if cancel.is_set():
            self.finish(medium, "spoiled", detail="read-back interrupted")
            self._raise_cancel()
        if not rb.ok:
            self.finish(medium, "failed-readback", detail=rb.reason, sha256=rb.sha256,
                                burn_seconds=seconds, verify_seconds=rb.seconds)
            store.audit(job.id, "disc-spoiled", drive=name, disc=disc, detail=rb.reason)
            self.drive.eject()
            raise Transient(f"{disc} failed read-back: {rb.reason}")
        self.finish(medium, "verified", sha256=rb.sha256, bytes=img["bytes"],
                            burn_seconds=seconds, verify_seconds=rb.seconds)
        store.audit(job.id, "disc-verified", drive=name, disc=disc, checksum=rb.sha256,
                    detail=f"burn {seconds:.2f} s, read-back {rb.seconds:.2f} s "
                    f"(checksum {rb.checksum_seconds:.2f} s, verify {rb.verify_seconds:.2f} s)")
        log.info("job %d: %s verified (burn %.2f s, read-back %.2f s)", job.id, disc, seconds,
                 rb.seconds)
        self.drive.eject()

    def _publish(self, job, images: list[dict], profile, cancel: threading.Event) -> None:
        store, name = self.d.store, self.drive.name
        t0 = time.monotonic()
        try:
            out = self.drive.publish(job.id, images, self.copies(job),
                                     {"label_text": job.options.get("label_text", ""),
                                      "supplement_of": job.supplement_of})
        except OSError as exc:
            raise Transient(f"image folder {self.drive.folder}: {exc.strerror or exc}") from exc
        seconds = time.monotonic() - t0
        self.move(job.id, "verifying", ("burning",), drive=name)
        for img, path in zip(images, out, strict=True):
            medium = store.start_medium(job.id, img["index"], 1, name)
            rb = read_back(path, img["bytes"], img["sha256"], profile, cancel)
            if not rb.ok:
                self.finish(medium, "failed-readback", detail=rb.reason)
                raise Transient(f"{path.name} failed read-back: {rb.reason}")
            self.finish(medium, "verified", sha256=rb.sha256, bytes=img["bytes"],
                                burn_seconds=seconds, verify_seconds=rb.seconds)
            store.audit(job.id, "image-published", drive=name, disc=path.name,
                        checksum=rb.sha256)


class _CancelledBurn(Exception):
    pass


# -- mastering in a child process -------------------------------------------------------------


def master_in_child(paths: list[Path], output: Path, options: Options,
                    cancel: threading.Event):
    """pipeline.master() in a fresh (spawned) process: the SCP keeps the GIL to itself (C-ECHO
    and C-STORE stay prompt while a big job is mastered), the memory a job needs goes back to
    the system when it ends, and the child dies with the daemon (PR_SET_PDEATHSIG), so a
    killed daemon leaves no mastering run behind to race its successor."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    proc = ctx.Process(target=_master_child, args=(paths, output, options, stop, sender),
                       name="mastering")
    proc.start()
    sender.close()
    try:
        while not receiver.poll(0.2):
            if cancel.is_set():
                stop.set()
            if not proc.is_alive() and not receiver.poll(0.2):
                raise Transient(f"the mastering process ended with exit code {proc.exitcode}")
        kind, payload = receiver.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    if kind == "ok":
        return payload
    if kind == "cancelled":
        raise Cancelled(payload)
    if kind == "invalid":
        raise Permanent(payload)
    if kind == "unconvertible":
        raise Unconvertible(*payload)
    raise Transient(payload)


def _master_child(paths, output, options, stop, conn) -> None:
    _die_with_parent()
    try:
        result = ("ok", master(paths, output, options, kind="iso", cancel=stop))
    except MasteringError as exc:
        failed = [(Path(p["path"]).name.removesuffix(".dcm"), p["reason"])
                  for p in exc.report.invalid if p["reason"].startswith("cannot convert")]
        first = exc.report.invalid[0]["reason"] if exc.report.invalid else ""
        result = ("unconvertible", (str(exc), failed)) if failed else \
            ("invalid", f"{exc}{': ' + first if first else ''}")
    except Cancelled as exc:
        result = ("cancelled", str(exc))
    except OSError as exc:
        result = ("io", f"mastering: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - reported to the daemon, which retries
        result = ("error", f"mastering failed: {exc}")
    conn.send(result)
    conn.close()


def _die_with_parent() -> None:
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the daemon died before prctl: do not run on our own
        os._exit(1)


def _intact(img: dict) -> bool:
    path = Path(img["path"])
    return path.is_file() and path.stat().st_size == img["bytes"] and \
        sha256_file(path) == img["sha256"]
