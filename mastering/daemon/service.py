"""The daemon's process: recovery, the SCP, one worker per drive, and the main loop.

Start-up order (READY=1 is sent only after all of it): owner-only umask; the spool lock (an
exclusive flock: a second daemon on the same spool refuses at once, before it could touch
anything); every image folder checked writable; the job store and the spool; recovery
(temporary files removed, interrupted purges finished, unrecorded instances adopted,
interrupted jobs requeued: a job killed while mastering is mastered again from its spool
files, a job killed while burning or verifying has its disc reported as spoiled and is
burned again on a new disc, a job the operator cancelled meanwhile is cancelled); the SCP
listening; the drive workers. The main loop then marks quiet jobs ready, starts Media
Creation requests whose instances arrived, settles cancels, queues undelivered Storage
Commitment reports, and pings the systemd watchdog with a STATUS line; anything that may
take long (watched folders, purges, retention, commitment delivery) runs in threads of its
own, so the watchdog pings stay regular whatever a peer or a disk does.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from .. import profiles
from . import assembly, scp
from .burner import make_drive
from .commitment import Commitments
from .config import Config, peer_address
from .mcm import MediaCreation
from .notify import Notifier
from .spool import Spool, SpoolLock
from .store import open_store
from .worker import Worker

log = logging.getLogger("mastering.daemon")


class CannotStart(Exception):
    """A configured output the daemon cannot use (said before READY=1, not at the first job)."""


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stopping = threading.Event()
        self.store = None
        self.server = None
        self.commitments = None
        self.workers: list[Worker] = []
        self.locks: list[SpoolLock] = []
        self._every: dict[str, float] = {}
        self._tasks: dict[str, threading.Thread] = {}

    # -- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        os.umask(0o077)  # spool, database and images hold patient data
        cfg = self.cfg
        profile = profiles.load(cfg.media.profile)
        self.locks = lock_spool(cfg)
        check_outputs(cfg)
        self.store = open_store(cfg.database)
        self.spool = Spool(cfg.daemon.spool, self.store, profile,
                           group_by=cfg.assembly.group_by, auto=cfg.assembly.auto,
                           min_free_bytes=cfg.scp.min_free_mb * 1_000_000,
                           quarantine_max_bytes=cfg.scp.quarantine_max_mb * 1_000_000)
        self.recover()
        self.ae = ae = scp.build_ae(cfg)
        peers = {ae_title: peer_address(cfg, ae_title) for ae_title in cfg.commitment.peers}
        self.commitments = Commitments(self.store, ae, peers, cfg.commitment.report_delay,
                                       cfg.commitment.connect_timeout) \
            if cfg.commitment.enabled else None
        self.mcm = MediaCreation(self.store, cfg.media.profile, cfg.mcm.instance_timeout) \
            if cfg.mcm.enabled else None
        services = scp.Services(cfg, self.store, self.spool, self.commitments, self.mcm)
        self.server = scp.start(ae, services)
        host, port = self.server.server_address[:2]
        log.info("listening on %s:%d as %s", host, port, cfg.scp.ae_title)
        self.workers = [Worker(self, make_drive(d)) for d in cfg.drives]
        for w in self.workers:
            w.start()
        self.notifier.ready(self.status_text())

    def recover(self) -> None:
        store = self.store
        removed, adopted = self.spool.recover()
        if removed or adopted:
            log.info("recovery: %d temporary file(s) removed, %d unrecorded instance(s) "
                     "adopted", removed, adopted)
        finish_purges(store, self.spool, "recovery")
        for job in store.jobs(("mastering",)):
            shutil.rmtree(self.spool.job_dir(job.id) / "image", ignore_errors=True)
            if job.cancel_requested:
                store.transition(job.id, "cancelled", actor="recovery", images=[],
                                 reason="cancelled by the operator")
                log.info("recovery: job %d, interrupted while mastering, was cancelled", job.id)
                continue
            store.transition(job.id, "ready", actor="recovery", images=[],
                             reason="interrupted while mastering: mastered again")
            log.warning("recovery: job %d was interrupted while mastering; queued again",
                        job.id)
        for job in store.jobs(("burning", "verifying")):
            for m in store.media(job.id):
                if m["state"] == "burning":
                    store.finish_medium(m["id"], "spoiled",
                                        detail="interrupted burn or read-back (daemon stopped)")
                    store.audit(job.id, "disc-spoiled", actor="recovery", drive=m["drive"],
                                disc=f"medium {m['id']}", detail="interrupted; the disc in "
                                "the drive must not be handed out")
                    log.warning("recovery: job %d, medium %d on drive %s spoiled by the "
                                "interruption", job.id, m["id"], m["drive"])
            target = "cancelled" if job.cancel_requested else "ready"
            store.transition(job.id, target, actor="recovery",
                             reason="cancelled by the operator" if job.cancel_requested
                             else "interrupted while burning: burned again on a new disc")
            log.warning("recovery: job %d was interrupted while %s; %s", job.id, job.state,
                        target)
        for job_id in store.settle_cancels("recovery"):
            log.info("recovery: job %d cancelled (asked while the daemon was stopped)", job_id)

    # -- the main loop ----------------------------------------------------------------------

    def run(self) -> None:
        tick = self.cfg.daemon.tick_seconds
        while not self.stopping.is_set():
            self.notifier.watchdog()
            try:
                self.step()
            except Exception:  # the loop must go on: the watchdog says if it stops
                log.exception("main loop step failed")
            self.stopping.wait(tick)
        self.shutdown()

    def step(self, now: float | None = None) -> None:
        """Short database work only; anything that may block goes to a thread."""
        now = time.time() if now is None else now
        store, cfg = self.store, self.cfg
        assembly.ready_quiet(store, cfg.assembly.quiet_seconds, now)
        if self.mcm is not None:
            self.mcm.step(now)
        if self._due("cancels", 1.0, now):
            for job_id in store.settle_cancels():
                log.info("job %d cancelled", job_id)
        if self._due("ian", 2.0, now):
            self._pending_ian()
        if self.commitments is not None and self._due("commit", cfg.commitment.retry_seconds,
                                                      now):
            self.commitments.retry_pending()
        if cfg.watch.folder is not None and self._due("watch", cfg.watch.poll_seconds, now):
            from .watch import scan_watch_folder

            self._background("watch", scan_watch_folder, self)
        if self._due("purges", 1.0, now) and (store.purging() or store.tombstones()):
            self._background("purge", finish_purges, store, self.spool, "daemon")
        if self._due("checkpoint", 5.0, now) and store.checkpoint_owed:
            self._background("checkpoint", store.checkpoint)  # a reader held the last one
        if self._due("retention", self._retention_every, now):
            self._background("purge", self.release_expired, now)
        if self._due("poll", 1.0, now):
            scp.slow_idle(self.ae)
        if self._due("status", cfg.daemon.status_seconds, now):
            self.notifier.status(self.status_text())

    @property
    def _retention_every(self) -> float:
        """Every minute; more often when a retention is shorter than ten minutes."""
        d = self.cfg.daemon
        shortest = min(d.retention_days, d.unfinished_retention_days,
                       d.quarantine_retention_days) * 86400
        return min(60.0, max(1.0, shortest / 10))

    def _due(self, key: str, every: float, now: float) -> bool:
        if now - self._every.get(key, 0.0) >= every:
            self._every[key] = now
            return True
        return False

    def _background(self, key: str, fn, *args) -> bool:
        """Run fn in a thread of its own unless the last run under this key still runs."""
        running = self._tasks.get(key)
        if running is not None and running.is_alive():
            return False

        def guarded():
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("%s failed", key)

        t = threading.Thread(target=guarded, name=key, daemon=True)
        self._tasks[key] = t
        t.start()
        return True

    def _pending_ian(self) -> None:
        for req in self.store.requests("ian", ("pending",)):
            ready, missing = assembly.ian_ready(self.store, req.data["refs"], req.calling_ae)
            if not missing:
                self.store.update_request(req.uid, state="done")
            elif time.time() - req.created_at > self.cfg.mcm.instance_timeout:
                self.store.update_request(req.uid, state="expired")

    def release_expired(self, now: float) -> int:
        """Retention: done jobs after retention_days; failed and cancelled jobs and
        instances in no job after unfinished_retention_days; the quarantine after
        quarantine_retention_days."""
        d, store, spool = self.cfg.daemon, self.store, self.spool
        n = 0
        for job_id in store.expired(now - d.retention_days * 86400,
                                    now - d.unfinished_retention_days * 86400):
            n += purge(store, spool, job_id, "retention", checkpoint=False)
        orphans = store.release_orphans(now - d.unfinished_retention_days * 86400)
        if orphans:
            gone = spool.release(orphans)
            log.info("retention: %d instance(s) in no job released", gone)
            n += gone
        q = spool.purge_quarantine(now - d.quarantine_retention_days * 86400)
        if n or q:
            store.checkpoint()
        return n

    def status_text(self) -> str:
        counts = self.store.counts()
        queue = ", ".join(f"{counts[s]} {s}" for s in ("received", "ready", "mastering",
                                                        "burning", "verifying", "failed")
                          if counts.get(s))
        drives = "; ".join(f"{w.drive.name} {w.status}" for w in self.workers)
        return f"queue: {queue or 'empty'} | drives: {drives or 'none'}"

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, *_args) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        self.notifier.stopping()
        if self.server is not None:
            for assoc in self.ae.active_associations:  # a peer left hanging gets an A-ABORT
                assoc.abort()
            self.server.shutdown()
        if self.commitments is not None:
            self.commitments.close()
        for w in self.workers:
            w.join(timeout=30)
        if self.store is not None:
            self.store.close()
        for lock in self.locks:
            lock.release()
        log.info("stopped")


def lock_spool(cfg: Config) -> list[SpoolLock]:
    """The spool's lock, and the job store's when it lives elsewhere."""
    locks = [SpoolLock(cfg.daemon.spool).acquire()]
    if cfg.database.parent.absolute() != Path(cfg.daemon.spool).absolute():
        try:
            locks.append(SpoolLock(cfg.database.parent, cfg.database.name + ".lock").acquire())
        except OSError:
            locks[0].release()
            raise
    return locks


def check_outputs(cfg: Config) -> None:
    """Each image folder must take files now: under systemd's ProtectSystem=strict a hot
    folder outside ReadWritePaths= is read-only, and every publish would fail."""
    for d in cfg.drives:
        if d.kind != "image_folder":
            continue
        folder = Path(d.folder)
        probe = folder / f".mastering-probe-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise CannotStart(
                f"drives {d.name}: the image folder {folder} is not writable "
                f"({exc.strerror or exc}); under systemd give it to the service with a "
                "drop-in (ReadWritePaths=, see systemd/mastering-daemon.service.d/"
                "image-folder.conf.example)") from exc


def purge(store, spool: Spool, job_id: int, actor: str, checkpoint: bool = True) -> int:
    """Release a finished job's spool: its instance files (unless another job holds them)
    and its images; the job row and its audit trail stay (without patient data). Crash-safe:
    the files are tombstoned first (:meth:`JobStore.begin_purge`), removed, then the
    tombstones and the job's purge closed; recovery finishes an interrupted one."""
    files = store.begin_purge(job_id, actor)
    n = spool.release(files)
    finish_purges(store, spool, actor, checkpoint=checkpoint)
    log.info("job %d purged: %d spool file(s) removed", job_id, n)
    return n


def finish_purges(store, spool: Spool, actor: str, checkpoint: bool = True) -> int:
    """Remove what purges left tombstoned (a crash, a file that could not be removed, a
    purge asked for by `mastering jobs purge` while the daemon runs), then close those
    purges whose files are all gone; the WAL is checkpointed so no purged row stays in it."""
    spool.release(store.tombstones())
    n = 0
    for job_id in store.purging():
        job_dir = spool.job_dir(job_id)
        if job_dir.parent == spool.jobs:
            shutil.rmtree(job_dir, ignore_errors=True)
        if not job_dir.exists() and store.end_purge(job_id, actor):
            n += 1
    if n and checkpoint:
        store.checkpoint()
    return n


def run(cfg: Config) -> int:
    daemon = Daemon(cfg)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    try:
        daemon.start()
    except (OSError, profiles.ProfileError, CannotStart) as exc:
        log.error("cannot start: %s", exc)
        for lock in daemon.locks:
            lock.release()
        return 1
    daemon.run()
    return 0


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    # pynetdicom logs data sets at debug and chatters at info; pydicom's warnings quote values
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


