"""The daemon's process: recovery, the SCP, one worker per drive, and the main loop.

Start-up order (READY=1 is sent only after all of it): owner-only umask; the job store and
the spool; recovery (temporary files removed, unrecorded instances adopted, interrupted jobs
requeued: a job killed while mastering is mastered again from its spool files, a job killed
while burning or verifying has its disc reported as spoiled and is burned again on a new
disc); the SCP listening; the drive workers. The main loop then marks quiet jobs ready,
starts Media Creation requests whose instances arrived, re-delivers Storage Commitment
reports, takes watched folders, releases the spool of done jobs past their retention, and
pings the systemd watchdog with a STATUS line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

from .. import profiles
from . import assembly, scp
from .burner import make_drive
from .commitment import Commitments
from .config import Config, peer_address
from .mcm import MediaCreation
from .notify import Notifier
from .spool import Spool
from .store import open_store
from .worker import Worker

log = logging.getLogger("mastering.daemon")


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stopping = threading.Event()
        self.store = None
        self.server = None
        self.workers: list[Worker] = []
        self._every: dict[str, float] = {}

    # -- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        os.umask(0o077)  # spool, database and images hold patient data
        cfg = self.cfg
        profile = profiles.load(cfg.media.profile)
        self.store = open_store(cfg.database)
        self.spool = Spool(cfg.daemon.spool, self.store, profile,
                           group_by=cfg.assembly.group_by, auto=cfg.assembly.auto,
                           min_free_bytes=cfg.scp.min_free_mb * 1_000_000)
        self.recover()
        self.ae = ae = scp.build_ae(cfg)
        peers = {ae_title: peer_address(cfg, ae_title) for ae_title in cfg.commitment.peers}
        self.commitments = Commitments(self.store, ae, peers, cfg.commitment.report_delay) \
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
        for job in store.jobs(("mastering",)):
            shutil.rmtree(self.spool.job_dir(job.id) / "image", ignore_errors=True)
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
                             reason="interrupted while burning: burned again on a new disc")
            log.warning("recovery: job %d was interrupted while %s; %s", job.id, job.state,
                        target)

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
        now = time.time() if now is None else now
        store, cfg = self.store, self.cfg
        assembly.ready_quiet(store, cfg.assembly.quiet_seconds, now)
        if self.mcm is not None:
            self.mcm.step(now)
        if self._due("ian", 2.0, now):
            self._pending_ian()
        if self.commitments is not None and self._due("commit", 15.0, now):
            self.commitments.retry_pending()
        if cfg.watch.folder is not None and self._due("watch", cfg.watch.poll_seconds, now):
            from .watch import scan_watch_folder

            scan_watch_folder(self)
        if self._due("retention", 60.0, now):
            self.release_expired(now)
        if self._due("status", cfg.daemon.status_seconds, now):
            self.notifier.status(self.status_text())

    def _due(self, key: str, every: float, now: float) -> bool:
        if now - self._every.get(key, 0.0) >= every:
            self._every[key] = now
            return True
        return False

    def _pending_ian(self) -> None:
        for req in self.store.requests("ian", ("pending",)):
            ready, missing = assembly.ian_ready(self.store, req.data["refs"], req.calling_ae)
            if not missing:
                self.store.update_request(req.uid, state="done")
            elif time.time() - req.created_at > self.cfg.mcm.instance_timeout:
                self.store.update_request(req.uid, state="expired")

    def release_expired(self, now: float) -> int:
        cutoff = now - self.cfg.daemon.retention_days * 86400
        n = 0
        for job in self.store.done_before(cutoff):
            n += purge(self.store, self.spool, job.id, "retention")
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
        for w in self.workers:
            w.join(timeout=30)
        if self.store is not None:
            self.store.close()
        log.info("stopped")


def purge(store, spool: Spool, job_id: int, actor: str) -> int:
    """Release a done job's spool: its instance files (unless another job needs them) and its
    images; the job row and its audit trail stay (without patient data)."""
    files = store.purge_job(job_id, actor)
    n = spool.release(files)
    job_dir = spool.job_dir(job_id)
    if job_dir.is_dir() and job_dir.parent == spool.jobs:
        shutil.rmtree(job_dir)
    log.info("job %d purged: %d spool file(s) removed", job_id, n)
    return n


def run(cfg: Config) -> int:
    daemon = Daemon(cfg)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    try:
        daemon.start()
    except (OSError, profiles.ProfileError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    daemon.run()
    return 0


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    # pynetdicom logs data sets at debug and chatters at info; pydicom's warnings quote values
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


