"""Durable receive: a data set becomes Success only once it is on disk and in the queue.

Order (issue 8 point 2): written under a temporary name in ``tmp/``, fsynced, checked by the
core's structural check (:func:`mastering.intake.scan_file`, the same walk and header reading
``mastering iso`` uses), renamed to ``instances/<SOP Instance UID>.dcm``, the directory fsynced,
and recorded in the job store (a durable SQLite commit). A failure at any step answers a
failure status and keeps nothing half-done: a corrupt data set is moved to ``quarantine/``
with a ``.txt`` naming the peer and the reason. File names carry UIDs only, never patient data.

The same instance twice is an idempotent success (byte-identical, or the same data set in
another encoding); a different object under a known SOP Instance UID is refused and the first
one kept. A spool without room for the data set plus the configured reserve answers Out of
Resources before a byte is written.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import intake
from ..intake import Instance
from ..profiles import Profile
from .store import InstanceRecord, JobStore

log = logging.getLogger("mastering.daemon.spool")

# C-STORE statuses (PS3.4 B.2.3; network.md §1); UID conflicts have no standard code
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UID_CONFLICT = 0xC111  # C000-CFFF "cannot understand"; 0111 = duplicate SOP instance (PS3.7)


@dataclass(frozen=True)
class Outcome:
    status: int
    comment: str = ""  # Error Comment (0000,0902) for the peer: no patient data
    job_id: int | None = None
    duplicate: bool = False
    sop_uid: str = ""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path | str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = limit
        while left is None or left > 0:
            chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


class Spool:
    """The spool folder: ``tmp/``, ``instances/``, ``quarantine/``, ``jobs/``."""

    def __init__(self, root: Path, store: JobStore, profile: Profile | None, *,
                 group_by: str = "study", auto: bool = True, min_free_bytes: int = 0,
                 create: bool = True):
        self.root = Path(root)
        self.store, self.profile = store, profile
        self.group_by, self.auto, self.min_free = group_by, auto, min_free_bytes
        self.tmp = self.root / "tmp"
        self.instances = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.jobs = self.root / "jobs"
        for d in (self.root, self.tmp, self.instances, self.quarantine_dir, self.jobs):
            if create:  # `jobs purge` only needs the paths
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.chmod(d, 0o700)
        self._commit = threading.Lock()  # duplicate check + rename + record, per instance
        self._names = itertools.count()

    # -- receiving ----------------------------------------------------------------------------

    def has_room(self, nbytes: int) -> bool:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize >= nbytes + self.min_free

    def receive(self, data: bytes, sop_class: str | None, sop_uid: str | None,
                calling_ae: str, peer: str, auto: bool | None = None) -> Outcome:
        """Store one C-STORE data set (preamble + meta + body as received). Without
        sop_class/sop_uid (a watched folder's file) the data set's own are taken."""
        if not self.has_room(len(data)):
            log.warning("refused %s from %s@%s: spool full (0xA700)", sop_uid, calling_ae, peer)
            return Outcome(OUT_OF_RESOURCES, "spool full")
        tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{next(self._names)}.part"
        try:
            digest = self._write(tmp, data)
        except OSError as exc:
            _unlink(tmp)
            log.error("refused %s from %s@%s: spool write failed: %s (0xA700)", sop_uid,
                      calling_ae, peer, exc.strerror or exc)
            return Outcome(OUT_OF_RESOURCES, "spool write failed")
        try:
            return self._admit(tmp, digest, len(data), sop_class, sop_uid, calling_ae, peer,
                               self.auto if auto is None else auto)
        finally:
            _unlink(tmp)

    @staticmethod
    def _write(tmp: Path, data: bytes) -> str:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return ""  # hashed only when a duplicate needs comparing (1.3 ms per CT slice)

    def _admit(self, tmp: Path, digest: str, size: int, sop_class: str | None,
               sop_uid: str | None, calling_ae: str, peer: str, auto: bool) -> Outcome:
        found = intake.scan_file(str(tmp), self.profile)
        if isinstance(found, Instance) and sop_uid is None:
            sop_class, sop_uid = found.sop_class_uid, found.sop_instance_uid
        if not isinstance(found, Instance):
            reason = getattr(found, "reason", "a directory (DICOMDIR), not a storable instance")
            status = DATASET_MISMATCH if "differs from the data set" in reason \
                else CANNOT_UNDERSTAND
            return self._refuse(tmp, status, reason, sop_uid or "", calling_ae, peer)
        if found.sop_instance_uid != sop_uid or found.sop_class_uid != sop_class:
            reason = (f"data set SOP Class/Instance {found.sop_class_uid}/"
                      f"{found.sop_instance_uid} differs from the C-STORE request's "
                      f"{sop_class}/{sop_uid}")
            return self._refuse(tmp, DATASET_MISMATCH, reason, sop_uid, calling_ae, peer)
        with self._commit:
            known = self.store.instance(sop_uid)
            if known is not None:
                return self._duplicate(tmp, digest, known, calling_ae, peer)
            final = self.instances / f"{sop_uid}.dcm"
            try:
                os.replace(tmp, final)
                fsync_dir(self.instances)
                rec = InstanceRecord(sop_uid, sop_class, found.study_uid, found.series_uid,
                                     found.patient_id, calling_ae.strip(), peer, str(final),
                                     size, digest, time.time())
                job_id = self.store.add_instance(rec, self.group_by, self.group_key(rec), auto)
            except Exception as exc:  # OSError, sqlite3.OperationalError (disk full)
                _unlink(final)
                log.error("refused %s from %s@%s: could not be made durable: %s (0xA700)",
                          sop_uid, calling_ae, peer, exc)
                return Outcome(OUT_OF_RESOURCES, "spool write failed")
        log.info("stored %s (study %s) from %s@%s into job %s", sop_uid, found.study_uid,
                 calling_ae.strip(), peer, job_id)
        return Outcome(SUCCESS, job_id=job_id, sop_uid=sop_uid)

    def group_key(self, rec: InstanceRecord) -> str:
        if self.group_by == "patient":
            return rec.patient_key
        if self.group_by == "calling_ae":
            return rec.calling_ae
        return rec.study_uid

    def _duplicate(self, tmp: Path, digest: str, known: InstanceRecord, calling_ae: str,
                   peer: str) -> Outcome:
        if intake.same_object(known.path, str(tmp)):  # same bytes, or the same data set
            log.info("duplicate %s from %s@%s: already stored, acknowledged again",
                     known.sop_uid, calling_ae.strip(), peer)
            return Outcome(SUCCESS, duplicate=True, sop_uid=known.sop_uid)
        reason = (f"SOP Instance UID {known.sop_uid} is already stored with different content; "
                  "the first object is kept")
        log.warning("refused %s from %s@%s: %s", known.sop_uid, calling_ae.strip(), peer,
                    reason)
        self._keep(tmp, reason, known.sop_uid, calling_ae, peer)
        return Outcome(UID_CONFLICT, "UID already stored with different content; first kept")

    def _refuse(self, tmp: Path, status: int, reason: str, sop_uid: str, calling_ae: str,
                peer: str) -> Outcome:
        where = self._keep(tmp, reason, sop_uid, calling_ae, peer)
        log.warning("refused %s from %s@%s (0x%04X): %s; kept as %s", sop_uid,
                    calling_ae.strip(), peer, status, reason, where)
        return Outcome(status, reason[:1000])

    def _keep(self, tmp: Path, reason: str, sop_uid: str, calling_ae: str, peer: str) -> str:
        """Move a refused data set to quarantine/ with its reason; never a silent drop."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{os.getpid()}-{next(self._names)}"
        dst = self.quarantine_dir / f"{name}.dcm"
        try:
            os.replace(tmp, dst)
            note = (f"peer: {calling_ae.strip()}@{peer}\nrequested SOP Instance UID: "
                    f"{sop_uid}\nreason: {reason}\n")
            fd = os.open(self.quarantine_dir / f"{name}.txt",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(note)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self.quarantine_dir)
            self.store.quarantine(calling_ae.strip(), peer, sop_uid, str(dst), reason)
        except OSError as exc:
            log.error("could not keep the refused data set %s in quarantine: %s", sop_uid, exc)
            return "(not kept: quarantine write failed)"
        return str(dst)

    # -- recovery -----------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """After a crash: remove our temporary files; adopt instance files that were renamed
        into place but not yet recorded (never acknowledged, but valid and checked). Returns
        (temporary files removed, instances adopted)."""
        removed = 0
        for p in self.tmp.iterdir():
            if p.suffix == ".part":
                _unlink(p)
                removed += 1
        known = self.store.known_paths()
        adopted = 0
        for p in sorted(self.instances.iterdir()):
            if str(p) in known or p.suffix != ".dcm":
                continue
            found = intake.scan_file(str(p), self.profile)
            if not isinstance(found, Instance) or f"{found.sop_instance_uid}.dcm" != p.name:
                continue
            rec = InstanceRecord(found.sop_instance_uid, found.sop_class_uid, found.study_uid,
                                 found.series_uid, found.patient_id, "", "recovered", str(p),
                                 p.stat().st_size, sha256_file(p), time.time())
            self.store.add_instance(rec, self.group_by, self.group_key(rec), self.auto)
            adopted += 1
        return removed, adopted

    def job_dir(self, job_id: int) -> Path:
        return self.jobs / f"{job_id:06d}"

    def release(self, paths: list[str]) -> int:
        """Delete spool files the store has released (only inside instances/)."""
        n = 0
        for p in paths:
            path = Path(p)
            if path.parent == self.instances:
                _unlink(path)
                n += 1
        if n:
            fsync_dir(self.instances)
        return n


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.error("could not remove %s: %s", path, exc)
