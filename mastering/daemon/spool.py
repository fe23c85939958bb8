"""Durable receive: a data set becomes Success only once it is on disk and in the queue.

Order (issue 8 point 2): written under a temporary name in ``tmp/`` (pynetdicom streams a
C-STORE's data set there PDU by PDU, so memory per association does not grow with the
instance), fsynced, checked by the core's structural check (:func:`mastering.intake.scan_file`,
the same walk and header reading ``mastering iso`` uses) and, for a compressed transfer syntax
the profile does not allow, decoded once by the core's converter (what mastering would have
to do), renamed to ``instances/<SOP Instance UID>.dcm``, the directory fsynced, and recorded
in the job store (a durable SQLite commit). A failure at any step answers a failure status
and keeps nothing half-done: a refused data set is moved to ``quarantine/`` with a ``.txt``
naming the peer and the reason. File names carry UIDs only, never patient data.

The same instance twice is an idempotent success (byte-identical, or the same data set in
another encoding); a different object under a known SOP Instance UID is refused and the first
one kept. Each outcome is recorded per sender, so Storage Commitment never vouches for an
object it refused. A spool without the configured reserve left answers Out of Resources.

Releasing spool files (a purge, retention) is crash-safe: the store tombstones the files in
the transaction that forgets them, the files are removed next, the tombstones last; recovery
finishes what a crash interrupted and never adopts a tombstoned file. The spool is owned by
one process at a time (:class:`SpoolLock`), taken before recovery.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
#: compressed syntaxes whose pixel data mastering must decode when the profile does not allow
#: them (deflate, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE ...): decoded once at receive
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


@dataclass(frozen=True)
class Outcome:
    status: int
    comment: str = ""  # Error Comment (0000,0902) for the peer: no patient data
    job_id: int | None = None
    duplicate: bool = False
    sop_uid: str = ""


class SpoolBusy(OSError):
    """Another process (a second daemon, or `mastering jobs purge`) owns the spool."""


class SpoolLock:
    """An exclusive flock(2) on ``<spool>/lock``, held for the owner's lifetime (the kernel
    drops it when the process dies, kill -9 included). The owner's pid is written in it for
    the message the next one gets."""

    def __init__(self, root: Path, name: str = "lock"):
        self.path = Path(root) / name
        self.fd = -1

    def acquire(self) -> SpoolLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolBusy(errno.EBUSY, f"{self.path} is held by process {holder} "
                                "(another mastering daemon on this spool, or `mastering jobs "
                                "purge`); one daemon per spool") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path | str, limit: int | None = None) -> str:
    import hashlib

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


class Incoming:
    """Where pynetdicom writes a C-STORE data set as it arrives (in place of its
    NamedTemporaryFile, see :mod:`.scp`): a file in the spool's ``tmp/``, written with
    unbuffered os.write per PDV. A write error (disk full) is kept, not raised: raised in
    pynetdicom's reader thread it would abort the association; kept, the handler answers
    A700 with the reason."""

    def __init__(self, path: Path, owner: object):
        self.name = str(path)
        self.path = path
        self.owner = owner  # the association's reader thread: its files go when it closes
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.file = self  # pynetdicom calls .file.flush()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        n = len(data)
        if self.error is None and self.fd >= 0:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:
                self.error = exc
            else:
                self.size += n
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Null:
    """A sink for the decode check: the converter's output is counted, not kept."""

    def write(self, data) -> int:
        return len(data)

    def seekable(self) -> bool:
        return False


class Spool:
    """The spool folder: ``tmp/``, ``instances/``, ``quarantine/``, ``jobs/``."""

    def __init__(self, root: Path, store: JobStore, profile: Profile | None, *,
                 group_by: str = "study", auto: bool = True, min_free_bytes: int = 0,
                 quarantine_max_bytes: int = 0, create: bool = True):
        self.root = Path(root)
        self.store, self.profile = store, profile
        self.group_by, self.auto, self.min_free = group_by, auto, min_free_bytes
        self.quarantine_max = quarantine_max_bytes
        self.tmp = self.root / "tmp"
        self.instances = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.jobs = self.root / "jobs"
        for d in (self.root, self.tmp, self.instances, self.quarantine_dir, self.jobs):
            if create:  # `jobs purge` only needs the paths
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.chmod(d, 0o700)
        self._commit = threading.Lock()  # duplicate check + rename + record; a file's removal
        self._names = itertools.count()
        self._incoming: dict[str, Incoming] = {}
        self._incoming_lock = threading.Lock()
        self._quarantined = -1  # bytes in quarantine/, counted on first use
        self._unremovable: set[str] = set()
        self._sync_pool: ThreadPoolExecutor | None = None

    # -- receiving ----------------------------------------------------------------------------

    def has_room(self, nbytes: int) -> bool:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize >= nbytes + self.min_free

    def _temp_name(self) -> Path:
        return self.tmp / f"{os.getpid()}-{threading.get_ident()}-{next(self._names)}.part"

    def incoming(self, **_ignored) -> Incoming:
        """pynetdicom's NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")."""
        f = Incoming(self._temp_name(), threading.current_thread())
        with self._incoming_lock:
            self._incoming[f.name] = f
        return f

    def take_incoming(self, path: Path | str) -> Incoming | None:
        with self._incoming_lock:
            return self._incoming.pop(str(path), None)

    def drop_incoming(self, owner: object) -> int:
        """An association ended: data sets it left unfinished (an abort mid-transfer) go."""
        with self._incoming_lock:
            left = [f for f in self._incoming.values() if f.owner is owner]
            for f in left:
                del self._incoming[f.name]
        for f in left:
            f.close()
            _unlink(f.path)
        return len(left)

    def receive(self, data: bytes, sop_class: str | None, sop_uid: str | None,
                calling_ae: str, peer: str, auto: bool | None = None) -> Outcome:
        """Store one data set given as bytes (preamble + meta + body)."""
        tmp = self._temp_name()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink(tmp)
            return self._no_room(sop_uid, calling_ae, peer, exc)
        return self._take(tmp, len(data), sop_class, sop_uid, calling_ae, peer, auto)

    def receive_file(self, src: Path, calling_ae: str, peer: str,
                     auto: bool | None = None) -> Outcome:
        """Store a copy of a file (a watched folder's), streamed: never whole in memory."""
        tmp = self._temp_name()
        try:
            with open(src, "rb") as fi, open(tmp, "xb") as fo:
                os.chmod(tmp, 0o600)
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            size = tmp.stat().st_size
        except OSError as exc:
            _unlink(tmp)
            if not src.exists() or exc.filename == str(src):
                return Outcome(CANNOT_UNDERSTAND, f"cannot read: {exc.strerror or exc}")
            return self._no_room(None, calling_ae, peer, exc)
        return self._take(tmp, size, None, None, calling_ae, peer, auto)

    def receive_incoming(self, f: Incoming, sop_class: str, sop_uid: str, calling_ae: str,
                         peer: str) -> Outcome:
        """Store a C-STORE data set pynetdicom has streamed into f. Its fsync runs while the
        structural check reads it (one waits on the disk, the other on the CPU); both end
        before the file is renamed into place."""
        if f.error is not None:
            f.close()
            _unlink(f.path)
            return self._no_room(sop_uid, calling_ae, peer, f.error)
        synced = self._syncer().submit(os.fsync, f.fd)

        def durable() -> None:
            synced.result()

        try:
            return self._take(f.path, f.size, sop_class, sop_uid, calling_ae, peer, None,
                              durable)
        finally:
            with contextlib.suppress(OSError):
                synced.result()
            f.close()

    def _syncer(self) -> ThreadPoolExecutor:
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        return self._sync_pool

    def _take(self, tmp: Path, size: int, sop_class: str | None, sop_uid: str | None,
              calling_ae: str, peer: str, auto: bool | None,
              durable: Callable[[], None] = lambda: None) -> Outcome:
        if not self.has_room(0):  # the reserve is for mastering and the job store
            _unlink(tmp)
            log.warning("refused %s from %s@%s: spool full (0xA700)", sop_uid, calling_ae, peer)
            self._sent(calling_ae, sop_uid, False)
            return Outcome(OUT_OF_RESOURCES, "spool full")
        try:
            return self._admit(tmp, size, sop_class, sop_uid, calling_ae, peer,
                               self.auto if auto is None else auto, durable)
        finally:
            _unlink(tmp)

    def _no_room(self, sop_uid: str | None, calling_ae: str, peer: str,
                 exc: OSError) -> Outcome:
        log.error("refused %s from %s@%s: spool write failed: %s (0xA700)", sop_uid,
                  calling_ae, peer, exc.strerror or exc)
        self._sent(calling_ae, sop_uid, False)
        return Outcome(OUT_OF_RESOURCES, "spool write failed")

    def _sent(self, calling_ae: str, sop_uid: str | None, accepted: bool) -> None:
        """Best effort where the spool itself failed (the store may be on the full disk)."""
        if not sop_uid:
            return
        try:
            self.store.record_sent(calling_ae, sop_uid, accepted)
        except Exception as exc:  # noqa: BLE001 - sqlite3.OperationalError on a full disk
            log.error("could not record the outcome of %s from %s: %s", sop_uid, calling_ae,
                      exc)

    def _admit(self, tmp: Path, size: int, sop_class: str | None, sop_uid: str | None,
               calling_ae: str, peer: str, auto: bool,
               durable: Callable[[], None] = lambda: None) -> Outcome:
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
        why = self.cannot_carry(tmp, found)
        if why:
            return self._refuse(tmp, CANNOT_UNDERSTAND, why, sop_uid, calling_ae, peer)
        try:
            durable()  # the data is on the disk before its name is
        except OSError as exc:
            return self._no_room(sop_uid, calling_ae, peer, exc)
        with self._commit:
            known = self.store.instance(sop_uid)
            if known is not None:
                return self._duplicate(tmp, known, calling_ae, peer)
            final = self.instances / f"{sop_uid}.dcm"
            try:
                self._clear_tombstone(final)
                os.replace(tmp, final)
                fsync_dir(self.instances)
                rec = InstanceRecord(sop_uid, sop_class, found.study_uid, found.series_uid,
                                     found.patient_id, calling_ae.strip(), peer, str(final),
                                     size, "", time.time())
                job_id = self.store.add_instance(rec, self.group_by, self.group_key(rec), auto)
            except Exception as exc:  # OSError, sqlite3.OperationalError (disk full)
                _unlink(final)
                log.error("refused %s from %s@%s: could not be made durable: %s (0xA700)",
                          sop_uid, calling_ae, peer, exc)
                self._sent(calling_ae, sop_uid, False)
                return Outcome(OUT_OF_RESOURCES, "spool write failed")
        log.info("stored %s (study %s) from %s@%s into job %s", sop_uid, found.study_uid,
                 calling_ae.strip(), peer, job_id)
        return Outcome(SUCCESS, job_id=job_id, sop_uid=sop_uid)

    def cannot_carry(self, path: Path, found: Instance) -> str:
        """Why the profile cannot carry this instance, if that shows at receive: a compressed
        transfer syntax the profile does not allow must be decoded when mastering, so it is
        decoded here once, by the same converter (PS3.11: the File-set holds only the
        profile's syntaxes). '' if it can be carried."""
        from .. import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, transcode

        ts = found.transfer_syntax
        if self.profile is None or ts in _UNCOMPRESSED or self.profile.allows(ts):
            return ""
        try:
            transcode.transcode(path, _Null(), list(self.profile.transfer_syntaxes),
                                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                implementation_version_name=IMPLEMENTATION_VERSION_NAME,
                                scratch=self.tmp)
        except transcode.TranscodeError as exc:
            why = str(exc).removeprefix(f"{path}: ")
            return (f"pixel data cannot be decoded ({ts}) for profile {self.profile.id}: "
                    f"{why}")
        return ""

    def group_key(self, rec: InstanceRecord) -> str:
        if self.group_by == "patient":
            return rec.patient_key
        if self.group_by == "calling_ae":
            return rec.calling_ae
        return rec.study_uid

    def _duplicate(self, tmp: Path, known: InstanceRecord, calling_ae: str,
                   peer: str) -> Outcome:
        if intake.same_object(known.path, str(tmp)):  # same bytes, or the same data set
            log.info("duplicate %s from %s@%s: already stored, acknowledged again",
                     known.sop_uid, calling_ae.strip(), peer)
            self.store.record_sent(calling_ae, known.sop_uid, True)
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
        """Move a refused data set to quarantine/ with its reason; never a silent drop. Over
        the quarantine's size limit the data set is not kept, but its refusal and reason are
        (a peer sending bad data must not fill the spool)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{os.getpid()}-{next(self._names)}"
        dst = self.quarantine_dir / f"{name}.dcm"
        size = _size(tmp)
        kept = ""
        try:
            if self._quarantine_room(size):
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
                self._quarantined += size
                kept = str(dst)
            else:
                reason += " (not kept: the quarantine is over scp.quarantine_max_mb)"
            self.store.quarantine(calling_ae.strip(), peer, sop_uid, kept, reason)
        except Exception as exc:  # noqa: BLE001 - OSError, or the store on a full disk
            log.error("could not keep the refused data set %s in quarantine: %s", sop_uid, exc)
            self._sent(calling_ae, sop_uid, False)
            return "(not kept: quarantine write failed)"
        return kept or "(not kept: quarantine full)"

    def _quarantine_room(self, size: int) -> bool:
        if not self.quarantine_max:
            return True
        if self._quarantined < 0:
            self._quarantined = sum(_size(p) for p in self.quarantine_dir.iterdir())
        return self._quarantined + size <= self.quarantine_max

    # -- releasing ----------------------------------------------------------------------------

    def _clear_tombstone(self, final: Path) -> None:
        """A purged instance's file may still be waiting for removal under the name a new
        instance of that UID takes: it goes first (under the commit lock, in the only
        process that owns the spool)."""
        if self.store.is_tombstoned(str(final)):
            _unlink(final, strict=True)
            self.store.drop_tombstone(str(final))

    def release(self, paths: list[str]) -> int:
        """Remove tombstoned spool files (only inside instances/); each tombstone goes once
        its file is gone. A file that cannot be removed keeps its tombstone and is tried
        again later. Returns the files removed."""
        n = 0
        for p in paths:
            path = Path(p)
            with self._commit:
                if not self.store.is_tombstoned(p):
                    continue  # a new instance took the name meanwhile
                if path.parent == self.instances:
                    try:
                        _unlink(path, strict=True)
                    except OSError as exc:
                        if p not in self._unremovable:  # said once, tried every round
                            self._unremovable.add(p)
                            log.error("could not remove the released spool file %s: %s; "
                                      "tried again later", path, exc.strerror or exc)
                        continue
                    self._unremovable.discard(p)
                    n += 1
                self.store.drop_tombstone(p)
        if n:
            fsync_dir(self.instances)
        return n

    def purge_quarantine(self, cutoff: float) -> int:
        """Refused data sets and their notes older than cutoff (mtime) are removed, and
        their quarantine rows with them."""
        gone: list[str] = []
        for p in sorted(self.quarantine_dir.iterdir()):
            try:
                if p.stat().st_mtime >= cutoff:
                    continue
                size = p.stat().st_size
                _unlink(p, strict=True)
            except OSError as exc:
                log.error("could not remove %s from the quarantine: %s", p.name,
                          exc.strerror or exc)
                continue
            if self._quarantined >= 0:
                self._quarantined = max(self._quarantined - size, 0)
            gone.append(str(p))
        if gone:
            fsync_dir(self.quarantine_dir)
        self.store.forget_quarantined(gone, cutoff)
        return len(gone)

    # -- recovery -----------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """After a crash (the caller owns the spool lock, so everything in tmp/ is a dead
        process's): remove the temporary files; finish removing tombstoned files; adopt
        instance files that were renamed into place but not yet recorded (never
        acknowledged, but valid and checked). Returns (temporary files removed, instances
        adopted)."""
        removed = 0
        for p in self.tmp.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                _unlink(p)
            removed += 1
        self.release(self.store.tombstones())
        known = self.store.known_paths()
        dead = set(self.store.tombstones())  # could not be removed: never taken back
        adopted = 0
        for p in sorted(self.instances.iterdir()):
            if str(p) in known or str(p) in dead or p.suffix != ".dcm":
                continue
            found = intake.scan_file(str(p), self.profile)
            if not isinstance(found, Instance) or f"{found.sop_instance_uid}.dcm" != p.name:
                continue
            rec = InstanceRecord(found.sop_instance_uid, found.sop_class_uid, found.study_uid,
                                 found.series_uid, found.patient_id, "", "recovered", str(p),
                                 p.stat().st_size, "", time.time())
            self.store.add_instance(rec, self.group_by, self.group_key(rec), self.auto)
            adopted += 1
        return removed, adopted

    def job_dir(self, job_id: int) -> Path:
        return self.jobs / f"{job_id:06d}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unlink(path: Path, strict: bool = False) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if strict:
            raise
        log.error("could not remove %s: %s", path, exc)
