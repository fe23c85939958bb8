"""The job store: received instances, jobs and their audit trail, in SQLite.

This is the ONLY module that speaks SQL. Everything else uses :class:`JobStore`, a small
interface a later shared multi-station store can implement instead. The SQLite file runs in
WAL mode with ``synchronous=FULL``: a commit is on disk before the call returns, so a state
change is durable before the daemon acts on it (and before a DICOM peer hears Success).
``secure_delete`` overwrites what ``purge`` removes, because the rows name studies.

Job states (issue 8 point 5)::

    received -> ready -> mastering -> burning -> verifying -> done
         any active state -> failed (reason) | cancelled;  failed -> ready (retry)

Every change of state writes an audit row in the same transaction: who (the peer or the
operator's command), when, which drive, which disc, which image checksum.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("received", "ready", "mastering", "burning", "verifying", "done", "failed", "cancelled")
ACTIVE = ("mastering", "burning", "verifying")
OPEN = ("received", "ready")  # a job new instances may still join
FINAL = ("done", "failed", "cancelled")
TRANSITIONS = {
    "received": {"ready", "cancelled", "failed"},
    "ready": {"mastering", "cancelled", "failed", "received"},
    "mastering": {"burning", "ready", "failed", "cancelled"},
    "burning": {"verifying", "burning", "ready", "failed", "cancelled"},
    "verifying": {"done", "burning", "ready", "failed", "cancelled"},
    "failed": {"ready", "cancelled"},
    "done": {"ready"},  # `jobs retry` of a done job burns it again
    "cancelled": {"ready"},
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances(
  sop_uid TEXT PRIMARY KEY, sop_class TEXT NOT NULL, study_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL, patient_key TEXT NOT NULL, calling_ae TEXT NOT NULL,
  peer TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
  received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY AUTOINCREMENT, group_kind TEXT NOT NULL, group_key TEXT NOT NULL,
  study_uid TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
  ready_by TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
  not_before REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL,
  last_instance_at REAL NOT NULL, copies INTEGER NOT NULL DEFAULT 1,
  priority INTEGER NOT NULL DEFAULT 0, supplement_of INTEGER, supplement_no INTEGER
  NOT NULL DEFAULT 0, drive TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',
  options TEXT NOT NULL DEFAULT '{}', images TEXT NOT NULL DEFAULT '[]',
  cancel_requested INTEGER NOT NULL DEFAULT 0, finished_at REAL, purged INTEGER NOT NULL
  DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_group ON jobs(group_kind, group_key);
CREATE TABLE IF NOT EXISTS job_instances(
  job_id INTEGER NOT NULL, sop_uid TEXT NOT NULL, PRIMARY KEY(job_id, sop_uid));
CREATE INDEX IF NOT EXISTS job_instances_uid ON job_instances(sop_uid);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER, at REAL NOT NULL, event TEXT NOT NULL,
  from_state TEXT NOT NULL DEFAULT '', to_state TEXT NOT NULL DEFAULT '',
  actor TEXT NOT NULL DEFAULT '', drive TEXT NOT NULL DEFAULT '', disc TEXT NOT NULL
  DEFAULT '', checksum TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS audit_job ON audit(job_id);
CREATE TABLE IF NOT EXISTS media(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, volume INTEGER NOT NULL,
  copy INTEGER NOT NULL, drive TEXT NOT NULL, state TEXT NOT NULL, sha256 TEXT NOT NULL
  DEFAULT '', bytes INTEGER NOT NULL DEFAULT 0, started_at REAL NOT NULL, finished_at REAL,
  burn_seconds REAL, verify_seconds REAL, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS quarantine(
  id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, calling_ae TEXT NOT NULL,
  peer TEXT NOT NULL, sop_uid TEXT NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests(
  uid TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, calling_ae TEXT NOT NULL,
  peer TEXT NOT NULL, created_at REAL NOT NULL, deadline REAL NOT NULL DEFAULT 0,
  data TEXT NOT NULL DEFAULT '{}', job_id INTEGER);
CREATE TABLE IF NOT EXISTS senders(
  calling_ae TEXT NOT NULL, sop_uid TEXT NOT NULL, accepted INTEGER NOT NULL,
  at REAL NOT NULL, PRIMARY KEY(calling_ae, sop_uid));
CREATE TABLE IF NOT EXISTS tombstones(
  path TEXT PRIMARY KEY, job_id INTEGER, at REAL NOT NULL);
"""

#: jobs.purged: the spool of a job is kept, being released (its files are tombstoned: marked
#: for deletion durably before the first unlink), or released
KEPT, PURGED, PURGING = 0, 1, 2


class StoreError(Exception):
    """A request the store refuses (unknown job, a change of state that is not allowed)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One durably spooled instance. patient_key is the Patient ID (grouping by patient)."""

    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    patient_key: str
    calling_ae: str
    peer: str
    path: str
    size: int
    sha256: str
    received_at: float = 0.0


@dataclass
class Job:
    id: int
    group_kind: str
    group_key: str
    study_uid: str
    state: str
    reason: str
    ready_by: str
    attempts: int
    not_before: float
    created_at: float
    updated_at: float
    last_instance_at: float
    copies: int
    priority: int
    supplement_of: int | None
    supplement_no: int
    drive: str
    source: str
    options: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    cancel_requested: bool = False
    finished_at: float | None = None
    purged: int = 0  # KEPT, PURGING or PURGED
    instances: int = 0


@dataclass(frozen=True)
class Request:
    """A Storage Commitment transaction, an Instance Availability Notification or a Media
    Creation Management request, kept until it is answered."""

    uid: str
    kind: str
    state: str
    calling_ae: str
    peer: str
    created_at: float
    deadline: float
    data: dict
    job_id: int | None


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["options"] = json.loads(d["options"])
    d["images"] = json.loads(d["images"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


def _request(row: sqlite3.Row) -> Request:
    d = dict(row)
    d["data"] = json.loads(d["data"])
    return Request(**d)


class JobStore:
    """The job store interface, backed by one SQLite file (thread-safe within a process;
    the ``mastering jobs`` commands open the same file while the daemon runs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.path.exists()
        if fresh:  # owner-only before SQLite writes a byte of it
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.RLock()
        self.checkpoint_owed = False  # a checkpoint after a purge could not finish yet
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON",
                       "busy_timeout=30000"):
            self._db.execute(f"PRAGMA {pragma}")
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (durably) on leaving the block."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- instances ------------------------------------------------------------------------

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        rows = self._read("SELECT * FROM instances WHERE sop_uid=?", (sop_uid,))
        return InstanceRecord(**dict(rows[0])) if rows else None

    def instances_present(self, sop_uids: list[str]) -> dict[str, InstanceRecord]:
        found: dict[str, InstanceRecord] = {}
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._read(f"SELECT * FROM instances WHERE sop_uid IN ({marks})",
                                  tuple(chunk)):
                found[row["sop_uid"]] = InstanceRecord(**dict(row))
        return found

    def study_instances(self, study_uid: str) -> list[str]:
        return [r[0] for r in self._read("SELECT sop_uid FROM instances WHERE study_uid=?",
                                         (study_uid,))]

    def known_paths(self) -> set[str]:
        return {r[0] for r in self._read("SELECT path FROM instances")}

    def add_instance(self, rec: InstanceRecord, group_kind: str, group_key: str,
                     auto: bool = True) -> int | None:
        """Record a durably spooled instance and, with auto assembly, put it into the open
        job of its group; a group whose job has already started gets a follow-up job.
        Returns the job's number (None without auto assembly)."""
        now = rec.received_at or time.time()
        with self._tx() as db:
            db.execute("INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (rec.sop_uid, rec.sop_class, rec.study_uid, rec.series_uid,
                        rec.patient_key, rec.calling_ae, rec.peer, rec.path, rec.size,
                        rec.sha256, now))
            self._sent(db, rec.calling_ae, rec.sop_uid, True, now)
            db.execute("DELETE FROM tombstones WHERE path=?", (rec.path,))
            if not auto:
                return None
            job_id = self._open_job(db, group_kind, group_key, rec, now)
            db.execute("INSERT OR IGNORE INTO job_instances VALUES (?,?)", (job_id, rec.sop_uid))
            # a ready job waiting for a retry has an image without this instance: master again
            db.execute("UPDATE jobs SET images='[]' WHERE id=? AND images<>'[]'", (job_id,))
            db.execute("UPDATE jobs SET last_instance_at=?, updated_at=? WHERE id=?",
                       (now, now, job_id))
            return job_id

    def _open_job(self, db: sqlite3.Connection, kind: str, key: str, rec: InstanceRecord,
                  now: float) -> int:
        rows = db.execute("SELECT id, state, cancel_requested FROM jobs WHERE group_kind=? "
                          "AND group_key=? AND source='assembly' ORDER BY id",
                          (kind, key)).fetchall()
        for row in rows:  # a job the operator asked to cancel takes no new instance
            if row["state"] in OPEN and not row["cancel_requested"]:
                return row["id"]
        started = [r for r in rows if r["state"] != "cancelled"]
        first = started[0]["id"] if started else None
        study = rec.study_uid if kind == "study" else ""
        cur = db.execute(
            "INSERT INTO jobs(group_kind, group_key, study_uid, state, created_at, updated_at, "
            "last_instance_at, supplement_of, supplement_no, source) "
            "VALUES (?,?,?,?,?,?,?,?,?,'assembly')",
            (kind, key, study, "received", now, now, now, first, len(started)))
        job_id = cur.lastrowid
        detail = f"follow-up of job {first}" if first else ""
        self._audit(db, job_id, "created", "", "received", f"{rec.calling_ae}@{rec.peer}",
                    detail=detail)
        return job_id

    def remove_instances(self, sop_uids: list[str]) -> None:
        with self._tx() as db:
            for uid in sop_uids:
                db.execute("DELETE FROM instances WHERE sop_uid=?", (uid,))
                db.execute("DELETE FROM job_instances WHERE sop_uid=?", (uid,))

    def quarantine(self, calling_ae: str, peer: str, sop_uid: str, path: str,
                   reason: str) -> None:
        """A refused data set (kept at path, or path '' when it could not be kept). The
        sender's last object under sop_uid is now a refused one (see :meth:`refused_by`)."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO quarantine(at, calling_ae, peer, sop_uid, path, reason) "
                       "VALUES (?,?,?,?,?,?)", (now, calling_ae, peer, sop_uid, path, reason))
            if sop_uid:
                self._sent(db, calling_ae, sop_uid, False, now)

    def quarantined(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM quarantine ORDER BY id")]

    def forget_quarantined(self, paths: list[str], before: float) -> None:
        """Quarantine rows whose files were removed (and rows older than `before` whose data
        set was never kept): the reasons name UIDs and peers."""
        with self._tx() as db:
            db.executemany("DELETE FROM quarantine WHERE path=?", [(p,) for p in paths])
            db.execute("DELETE FROM quarantine WHERE path='' AND at<?", (before,))
            # a refusal matters while some object under that UID is stored (commitment)
            db.execute("DELETE FROM senders WHERE accepted=0 AND at<? AND sop_uid NOT IN "
                       "(SELECT sop_uid FROM instances)", (before,))

    # -- what each sender sent (Storage Commitment answers per sender and object) ----------

    @staticmethod
    def _sent(db: sqlite3.Connection, calling_ae: str, sop_uid: str, accepted: bool,
              now: float) -> None:
        db.execute("INSERT INTO senders VALUES (?,?,?,?) ON CONFLICT(calling_ae, sop_uid) "
                   "DO UPDATE SET accepted=excluded.accepted, at=excluded.at",
                   (calling_ae.strip(), sop_uid, int(accepted), now))

    def record_sent(self, calling_ae: str, sop_uid: str, accepted: bool) -> None:
        """The last object calling_ae sent under sop_uid was accepted (stored, or the same
        object again) or refused (a different object, corrupt, of another class)."""
        with self._tx() as db:
            self._sent(db, calling_ae, sop_uid, accepted, time.time())

    def refused_by(self, calling_ae: str, sop_uids: list[str]) -> set[str]:
        """Those of sop_uids whose last object from calling_ae was refused."""
        found: set[str] = set()
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found |= {r[0] for r in self._read(
                f"SELECT sop_uid FROM senders WHERE calling_ae=? AND accepted=0 AND sop_uid IN "
                f"({marks})", (calling_ae.strip(), *chunk))}
        return found

    # -- jobs -----------------------------------------------------------------------------

    def create_job(self, sop_uids: list[str], *, source: str, actor: str, state: str = "ready",
                   group_kind: str = "request", group_key: str = "", study_uid: str = "",
                   options: dict | None = None, copies: int = 1, priority: int = 0,
                   ready_by: str = "") -> int:
        with self._tx() as db:
            return self._insert_job(db, sop_uids, source=source, actor=actor, state=state,
                                    group_kind=group_kind, group_key=group_key,
                                    study_uid=study_uid, options=options, copies=copies,
                                    priority=priority, ready_by=ready_by)

    def _insert_job(self, db: sqlite3.Connection, sop_uids: list[str], *, source: str,
                    actor: str, state: str = "ready", group_kind: str = "request",
                    group_key: str = "", study_uid: str = "", options: dict | None = None,
                    copies: int = 1, priority: int = 0, ready_by: str = "") -> int:
        now = time.time()
        cur = db.execute(
            "INSERT INTO jobs(group_kind, group_key, study_uid, state, created_at, "
            "updated_at, last_instance_at, source, options, copies, priority, ready_by) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (group_kind, group_key, study_uid, state, now, now, now, source,
             json.dumps(options or {}), copies, priority, ready_by))
        job_id = cur.lastrowid
        # only what is (still) in the spool joins: retention may have released an instance
        # between the caller's look and this transaction
        db.executemany("INSERT OR IGNORE INTO job_instances SELECT ?, sop_uid FROM instances "
                       "WHERE sop_uid=?", [(job_id, u) for u in sop_uids])
        self._audit(db, job_id, "created", "", state, actor, detail=ready_by)
        return job_id

    def start_request_job(self, uid: str, sop_uids: list[str], *, source: str, actor: str,
                          **job) -> tuple[int | None, list[int]]:
        """A pending Media Creation request becomes its job, atomically: the claim (the
        request's job_id, set only while it is NULL) and the job are one transaction, so a
        request makes one job however many threads try. Its instances leave the assembled
        jobs that have not started (an emptied one is cancelled): they are burned once, on
        the disc that was asked for. Returns (the new job, or None if the request was taken
        already or is no longer pending; the assembled jobs that had already started with
        some of these instances)."""
        with self._tx() as db:
            row = db.execute("SELECT state, job_id FROM requests WHERE uid=?", (uid,)).fetchone()
            if row is None or row["job_id"] is not None or row["state"] != "PENDING":
                return None, []
            job_id = self._insert_job(db, sop_uids, source=source, actor=actor, **job)
            db.execute("UPDATE requests SET job_id=? WHERE uid=? AND job_id IS NULL",
                       (job_id, uid))
            return job_id, self._take_from_assembly(db, job_id, sop_uids, actor)

    def _take_from_assembly(self, db: sqlite3.Connection, job_id: int, sop_uids: list[str],
                            actor: str) -> list[int]:
        holders: dict[int, tuple[str, list[str]]] = {}
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for r in db.execute(
                    "SELECT ji.job_id, j.state, ji.sop_uid FROM job_instances ji JOIN jobs j "
                    f"ON j.id=ji.job_id WHERE j.source='assembly' AND ji.sop_uid IN ({marks})",
                    tuple(chunk)):
                holders.setdefault(r[0], (r[1], []))[1].append(r[2])
        started = []
        now = time.time()
        for other, (state, uids) in sorted(holders.items()):
            if state in ACTIVE or state == "done":
                started.append(other)
                continue
            if state not in OPEN:  # failed or cancelled: it burns nothing unless retried
                continue
            db.executemany("DELETE FROM job_instances WHERE job_id=? AND sop_uid=?",
                           [(other, u) for u in uids])
            db.execute("UPDATE jobs SET images='[]', updated_at=? WHERE id=?", (now, other))
            self._audit(db, other, "instances-taken", state, state, actor,
                        detail=f"{len(uids)} instance(s) went to media creation job {job_id}")
            left = db.execute("SELECT count(*) FROM job_instances WHERE job_id=?",
                              (other,)).fetchone()[0]
            if not left:
                db.execute("UPDATE jobs SET state='cancelled', finished_at=?, updated_at=?, "
                           "reason=? WHERE id=?", (now, now, "all its instances went to media "
                                                   f"creation job {job_id}", other))
                self._audit(db, other, "state", state, "cancelled", actor,
                            detail=f"emptied by media creation job {job_id}")
        return started

    def job(self, job_id: int) -> Job:
        rows = self._read("SELECT j.*, (SELECT count(*) FROM job_instances WHERE job_id=j.id) "
                          "AS instances FROM jobs j WHERE id=?", (job_id,))
        if not rows:
            raise StoreError(f"no job {job_id}")
        return _job(rows[0])

    def jobs(self, states: tuple[str, ...] = STATES) -> list[Job]:
        marks = ",".join("?" * len(states))
        return [_job(r) for r in self._read(
            "SELECT j.*, (SELECT count(*) FROM job_instances WHERE job_id=j.id) AS instances "
            f"FROM jobs j WHERE state IN ({marks}) ORDER BY id", states)]

    def job_files(self, job_id: int) -> list[InstanceRecord]:
        return [InstanceRecord(**dict(r)) for r in self._read(
            "SELECT i.* FROM instances i JOIN job_instances ji ON ji.sop_uid=i.sop_uid "
            "WHERE ji.job_id=? ORDER BY i.sop_uid", (job_id,))]

    def job_uids(self, job_id: int) -> list[str]:
        return [r[0] for r in self._read("SELECT sop_uid FROM job_instances WHERE job_id=?",
                                         (job_id,))]

    def jobs_of_instances(self, sop_uids: list[str]) -> set[int]:
        found: set[int] = set()
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found |= {r[0] for r in self._read(
                f"SELECT job_id FROM job_instances WHERE sop_uid IN ({marks})", tuple(chunk))}
        return found

    def transition(self, job_id: int, to: str, *, expect: tuple[str, ...] | None = None,
                   actor: str = "daemon", reason: str | None = None, drive: str = "",
                   disc: str = "", checksum: str = "", detail: str = "", **fields) -> bool:
        """Change a job's state (and fields) with an audit row, atomically. False if the job
        is not in one of the expected states (someone else moved it first)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            state = row["state"]
            if expect is not None and state not in expect:
                return False
            if to != state and to not in TRANSITIONS[state]:
                raise StoreError(f"job {job_id} is {state}: it cannot become {to}")
            sets = {"state": to, "updated_at": now, **fields}
            if reason is not None:
                sets["reason"] = reason
            if to in FINAL:
                sets["finished_at"] = now
            for key in ("options", "images"):
                if key in sets:
                    sets[key] = json.dumps(sets[key])
            assign = ", ".join(f"{k}=?" for k in sets)
            db.execute(f"UPDATE jobs SET {assign} WHERE id=?", (*sets.values(), job_id))
            self._audit(db, job_id, "state", state, to, actor, drive, disc, checksum,
                        detail or (reason or ""))
            return True

    def update(self, job_id: int, **fields) -> None:
        """Fields that are not a change of state (images recorded, the drive's progress)."""
        for key in ("options", "images"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        fields["updated_at"] = time.time()
        assign = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {assign} WHERE id=?", (*fields.values(), job_id))

    def quiet_jobs(self, quiet_seconds: float, now: float) -> list[int]:
        return [r[0] for r in self._read(
            "SELECT id FROM jobs WHERE state='received' AND last_instance_at<=?",
            (now - quiet_seconds,))]

    def has_ready(self, now: float) -> bool:
        return bool(self._read("SELECT 1 FROM jobs WHERE state='ready' AND not_before<=? "
                               "AND cancel_requested=0 LIMIT 1", (now,)))

    def claim_ready(self, drive: str, now: float) -> Job | None:
        """The next ready job (priority, then age), moved to mastering for this drive."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state='ready' AND not_before<=? "
                             "AND cancel_requested=0 ORDER BY priority DESC, id LIMIT 1",
                             (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='mastering', drive=?, updated_at=? WHERE id=?",
                       (drive, now, row["id"]))
            self._audit(db, row["id"], "state", "ready", "mastering", "daemon", drive)
        return self.job(row["id"])

    def settle_cancels(self, actor: str = "daemon") -> list[int]:
        """Jobs the operator asked to cancel that are not running (the daemon was stopped
        when the cancel came, or the job went back to the queue at that moment) become
        cancelled; nothing else ever takes them."""
        now = time.time()
        ask = ("SELECT id, state FROM jobs WHERE cancel_requested=1 AND state IN "
               "('received', 'ready')")
        if not self._read(ask):  # the main loop asks every second: no write without need
            return []
        with self._tx() as db:
            rows = db.execute(ask).fetchall()
            for r in rows:
                db.execute("UPDATE jobs SET state='cancelled', finished_at=?, updated_at=?, "
                           "reason='cancelled by the operator' WHERE id=?", (now, now, r["id"]))
                self._audit(db, r["id"], "state", r["state"], "cancelled", actor,
                            detail="cancel requested while it was not running")
        return [r["id"] for r in rows]

    def request_cancel(self, job_id: int, actor: str) -> str:
        """Cancel at once if nothing runs for the job; else ask the daemon (it stops the
        work and cancels). Returns the job's state after the call."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            state = row["state"]
            if state in ("done", "cancelled"):
                raise StoreError(f"job {job_id} is {state}: nothing to cancel")
            if state in ACTIVE:
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
                self._audit(db, job_id, "cancel-requested", state, state, actor)
                return state
            db.execute("UPDATE jobs SET state='cancelled', finished_at=?, updated_at=? "
                       "WHERE id=?", (time.time(), time.time(), job_id))
            self._audit(db, job_id, "state", state, "cancelled", actor)
            return "cancelled"

    def retry(self, job_id: int, actor: str, leave_out: list[str] | tuple = ()) -> None:
        """Queue a finished job again. leave_out: instances the operator decided to leave off
        the discs (one that cannot be converted, say); each is audited, and stays in the
        spool until retention releases it."""
        with self._tx() as db:
            row = db.execute("SELECT state, purged FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            if row["state"] not in ("failed", "cancelled", "done"):
                raise StoreError(f"job {job_id} is {row['state']}: only failed, cancelled or "
                                 "done jobs can be retried")
            if row["purged"] != KEPT:
                raise StoreError(f"job {job_id} was purged: its spool files are gone")
            if leave_out:
                have = {r[0] for r in db.execute(
                    "SELECT sop_uid FROM job_instances WHERE job_id=?", (job_id,))}
                unknown = [u for u in leave_out if u not in have]
                if unknown:
                    raise StoreError(f"job {job_id} has no instance {unknown[0]}")
                if have <= set(leave_out):
                    raise StoreError(f"job {job_id}: nothing would be left to master")
                for uid in dict.fromkeys(leave_out):
                    db.execute("DELETE FROM job_instances WHERE job_id=? AND sop_uid=?",
                               (job_id, uid))
                    self._audit(db, job_id, "left-out", row["state"], row["state"], actor,
                                detail=f"instance {uid} left out by the operator")
                db.execute("UPDATE jobs SET images='[]' WHERE id=?", (job_id,))
            db.execute("UPDATE jobs SET state='ready', attempts=0, not_before=0, reason='', "
                       "cancel_requested=0, finished_at=NULL, updated_at=? WHERE id=?",
                       (time.time(), job_id))
            # the discs made so far are handed out or kept: a retry makes a whole new set
            db.execute("UPDATE media SET state='superseded' WHERE job_id=? AND state='verified'",
                       (job_id,))
            self._audit(db, job_id, "state", row["state"], "ready", actor, detail="retry")

    def done_before(self, cutoff: float) -> list[Job]:
        return [_job(r) for r in self._read(
            "SELECT j.*, 0 AS instances FROM jobs j WHERE state='done' AND purged=0 "
            "AND finished_at<=? ORDER BY id", (cutoff,))]

    def expired(self, done_before: float, unfinished_before: float) -> list[int]:
        """Jobs whose spool retention has passed: done ones finished before done_before,
        failed and cancelled ones before unfinished_before."""
        return [r[0] for r in self._read(
            "SELECT id FROM jobs WHERE purged=0 AND ((state='done' AND finished_at<=?) OR "
            "(state IN ('failed', 'cancelled') AND finished_at<=?)) ORDER BY id",
            (done_before, unfinished_before))]

    # -- releasing the spool: tombstones first, files next, rows last -----------------------

    def begin_purge(self, job_id: int, actor: str) -> list[str]:
        """Release a finished job's spool, first step: its instances that no other job still
        holds are forgotten and their files tombstoned in one durable transaction, before a
        single file is removed (a crash then leaves tombstones, never unrecorded instance
        files that recovery would take for new ones). The job row loses its group key (a
        Patient ID or a folder path); it and its audit trail stay. Returns the files to
        remove; :meth:`end_purge` closes the purge once they are all gone."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, purged FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            if row["purged"] == PURGED:
                return []
            if row["state"] not in FINAL:
                raise StoreError(f"job {job_id} is {row['state']}: only finished jobs are "
                                 "purged")
            uids = [r[0] for r in db.execute(
                "SELECT sop_uid FROM job_instances WHERE job_id=?", (job_id,))]
            free: list[str] = []
            for uid in uids:
                other = db.execute(
                    "SELECT 1 FROM job_instances ji JOIN jobs j ON j.id=ji.job_id WHERE "
                    "ji.sop_uid=? AND j.id<>? AND j.purged=0 LIMIT 1", (uid, job_id)).fetchone()
                if other is None:
                    free += self._forget(db, uid, job_id, now)
            db.execute("DELETE FROM job_instances WHERE job_id=?", (job_id,))
            db.execute("UPDATE jobs SET purged=?, images='[]', group_key='', updated_at=? "
                       "WHERE id=?", (PURGING, now, job_id))
            self._audit(db, job_id, "purge-started", row["state"], row["state"], actor,
                        detail=f"{len(free)} spool file(s) to release")
            return free

    def _forget(self, db: sqlite3.Connection, uid: str, job_id: int | None,
                now: float) -> list[str]:
        path = db.execute("SELECT path FROM instances WHERE sop_uid=?", (uid,)).fetchone()
        db.execute("DELETE FROM instances WHERE sop_uid=?", (uid,))
        db.execute("DELETE FROM senders WHERE sop_uid=?", (uid,))
        if not path:
            return []
        db.execute("INSERT OR REPLACE INTO tombstones VALUES (?,?,?)", (path[0], job_id, now))
        return [path[0]]

    def release_orphans(self, cutoff: float) -> list[str]:
        """Instances in no job, received before cutoff (assembly off and never submitted,
        left out of a retried job, taken from an emptied job): forgotten and tombstoned like
        a purged job's. Returns the files to remove."""
        now = time.time()
        with self._tx() as db:
            uids = [r[0] for r in db.execute(
                "SELECT sop_uid FROM instances i WHERE received_at<? AND NOT EXISTS "
                "(SELECT 1 FROM job_instances ji WHERE ji.sop_uid=i.sop_uid)", (cutoff,))]
            free: list[str] = []
            for uid in uids:
                free += self._forget(db, uid, None, now)
            return free

    def tombstones(self) -> list[str]:
        return [r[0] for r in self._read("SELECT path FROM tombstones ORDER BY path")]

    def is_tombstoned(self, path: str) -> bool:
        return bool(self._read("SELECT 1 FROM tombstones WHERE path=?", (path,)))

    def drop_tombstone(self, path: str) -> None:
        """The file is gone (or a new instance now has its path)."""
        with self._tx() as db:
            db.execute("DELETE FROM tombstones WHERE path=?", (path,))

    def purging(self) -> list[int]:
        return [r[0] for r in self._read("SELECT id FROM jobs WHERE purged=? ORDER BY id",
                                         (PURGING,))]

    def end_purge(self, job_id: int, actor: str) -> bool:
        """Close a purge whose files are all gone; False while some are still tombstoned."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM tombstones WHERE job_id=? LIMIT 1",
                          (job_id,)).fetchone():
                return False
            row = db.execute("SELECT state, purged FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["purged"] != PURGING:
                return False
            db.execute("UPDATE jobs SET purged=?, updated_at=? WHERE id=?",
                       (PURGED, time.time(), job_id))
            self._audit(db, job_id, "purged", row["state"], row["state"], actor,
                        detail="spool released")
            return True

    def checkpoint(self, wait: float = 2.0) -> bool:
        """Copy the WAL into the database file and truncate it: what a purge overwrote
        (secure_delete) is then gone from both. On a connection of its own, waiting at most
        `wait` seconds for readers (writers wait for it meanwhile); False if it could not
        finish, the next purge or retention round tries again."""
        con = sqlite3.connect(self.path, timeout=wait, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            row = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            done = row is not None and row[0] == 0
        except sqlite3.OperationalError:
            done = False
        finally:
            con.close()
        self.checkpoint_owed = not done  # the daemon tries again every few seconds
        return done

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._read("SELECT state, count(*) FROM jobs "
                                               "WHERE purged=0 GROUP BY state")}

    # -- media and audit ------------------------------------------------------------------

    def start_medium(self, job_id: int, volume: int, copy: int, drive: str) -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO media(job_id, volume, copy, drive, state, started_at) "
                             "VALUES (?,?,?,?, 'burning', ?)",
                             (job_id, volume, copy, drive, time.time()))
            return cur.lastrowid

    def finish_medium(self, medium_id: int, state: str, **fields) -> bool:
        """The outcome of a disc being burned; False if it is no longer being burned (someone
        else has reported on it)."""
        sets = {"state": state, "finished_at": time.time(), **fields}
        assign = ", ".join(f"{k}=?" for k in sets)
        with self._tx() as db:
            cur = db.execute(f"UPDATE media SET {assign} WHERE id=? AND state='burning'",
                             (*sets.values(), medium_id))
            return cur.rowcount == 1

    def media(self, job_id: int) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM media WHERE job_id=? ORDER BY id",
                                            (job_id,))]

    def all_media(self, state: str) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM media WHERE state=? ORDER BY id",
                                            (state,))]

    def audit(self, job_id: int | None, event: str, actor: str = "daemon", **fields) -> None:
        with self._tx() as db:
            self._audit(db, job_id, event, fields.pop("from_state", ""),
                        fields.pop("to_state", ""), actor, **fields)

    def audit_trail(self, job_id: int) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM audit WHERE job_id=? ORDER BY id",
                                            (job_id,))]

    @staticmethod
    def _audit(db: sqlite3.Connection, job_id: int | None, event: str, from_state: str,
               to_state: str, actor: str, drive: str = "", disc: str = "", checksum: str = "",
               detail: str = "") -> None:
        db.execute("INSERT INTO audit(job_id, at, event, from_state, to_state, actor, drive, "
                   "disc, checksum, detail) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (job_id, time.time(), event, from_state, to_state, actor, drive, disc,
                    checksum, detail))

    # -- DICOM requests (commitment, availability, media creation) ------------------------

    def add_request(self, uid: str, kind: str, state: str, calling_ae: str, peer: str,
                    data: dict, deadline: float = 0.0) -> bool:
        """False if a request with this UID exists already."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM requests WHERE uid=?", (uid,)).fetchone():
                return False
            db.execute("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,NULL)",
                       (uid, kind, state, calling_ae, peer, time.time(), deadline,
                        json.dumps(data)))
            return True

    def request(self, uid: str) -> Request | None:
        rows = self._read("SELECT * FROM requests WHERE uid=?", (uid,))
        return _request(rows[0]) if rows else None

    def requests(self, kind: str, states: tuple[str, ...]) -> list[Request]:
        marks = ",".join("?" * len(states))
        return [_request(r) for r in self._read(
            f"SELECT * FROM requests WHERE kind=? AND state IN ({marks}) ORDER BY created_at",
            (kind, *states))]

    def update_request(self, uid: str, *, expect: tuple[str, ...] | None = None,
                       **fields) -> bool:
        if "data" in fields:
            fields["data"] = json.dumps(fields["data"])
        with self._tx() as db:
            row = db.execute("SELECT state FROM requests WHERE uid=?", (uid,)).fetchone()
            if row is None or (expect is not None and row["state"] not in expect):
                return False
            assign = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE requests SET {assign} WHERE uid=?", (*fields.values(), uid))
            return True

    def delete_request(self, uid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM requests WHERE uid=?", (uid,))


def open_store(path: Path) -> JobStore:
    """The store the daemon and the ``jobs`` commands use (one place to swap it later)."""
    return JobStore(path)
