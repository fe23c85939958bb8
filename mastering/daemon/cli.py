"""``mastering daemon`` and ``mastering jobs``: registered in :mod:`mastering.cli` by
:func:`add_commands`; :func:`dispatch` runs them. The ``jobs`` commands open the job store
directly, so they work while the daemon runs (SQLite WAL) and while it is stopped.

Output: a table on a terminal; off a terminal one line per job (grep-friendly); ``--json``
for scripts. No patient names or IDs are shown, only job numbers, UIDs and counts: a job's
group key (the Patient ID when grouping by patient, a watched folder's path) is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "/etc/mastering/daemon.toml"
COMMANDS = ("daemon", "jobs")


def add_commands(sub) -> None:
    d = sub.add_parser("daemon", help="run the patient-disc burning daemon (DICOM receive, "
                       "queue, burn, read back)")
    _config_arg(d)
    j = sub.add_parser("jobs", help="the burning daemon's job queue (works with the daemon "
                       "running or stopped)")
    _config_arg(j)
    j.add_argument("--json", action="store_true", help="JSON for scripts")
    jsub = j.add_subparsers(dest="jobs_command")
    s = jsub.add_parser("show", help="one job: state, instances, discs, audit trail")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true", dest="json_sub")
    r = jsub.add_parser("retry", help="queue a failed, cancelled or done job again")
    r.add_argument("id", type=int)
    r.add_argument("--leave-out", action="append", default=[], metavar="SOP_INSTANCE_UID",
                   help="master the job without this instance (one that cannot be converted, "
                   "say); repeatable; audited")
    jsub.add_parser("cancel", help="cancel a job (a running one stops)").add_argument(
        "id", type=int)
    jsub.add_parser("submit", help="burn a study now (its open job, or a new job of every "
                    "spooled instance)").add_argument("study_uid")
    p = jsub.add_parser("purge", help="remove done jobs' spooled instances and images")
    p.add_argument("--done-older-than", type=float, required=True, metavar="DAYS")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        default=Path(os.environ.get("MASTERING_DAEMON_CONFIG", DEFAULT_CONFIG)),
                        help=f"daemon configuration (TOML; default {DEFAULT_CONFIG} or "
                        "$MASTERING_DAEMON_CONFIG)")


def dispatch(args: argparse.Namespace) -> int:
    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "daemon":
        from .service import run, setup_logging

        setup_logging(cfg.daemon.log_level)
        return run(cfg)
    try:
        return _jobs(args, cfg)
    except BrokenPipeError:  # `mastering jobs | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _jobs(args: argparse.Namespace, cfg) -> int:
    from .store import StoreError, open_store

    if not cfg.database.exists():
        print(f"error: no job store at {cfg.database} (has the daemon ever run?)",
              file=sys.stderr)
        return 6
    store = open_store(cfg.database)
    actor = f"cli:{os.environ.get('SUDO_USER') or os.environ.get('USER') or os.getuid()}"
    try:
        cmd = args.jobs_command
        if cmd is None:
            return _list(store, args.json)
        if cmd == "show":
            return _show(store, args.id, args.json or args.json_sub)
        if cmd == "retry":
            store.retry(args.id, actor, args.leave_out)
            left = f", {len(args.leave_out)} instance(s) left out" if args.leave_out else ""
            print(f"job {args.id}: queued again{left}")
        elif cmd == "cancel":
            state = store.request_cancel(args.id, actor)
            print(f"job {args.id}: " + ("cancelled" if state == "cancelled" else
                                       f"{state}; the daemon stops it and cancels it"))
        elif cmd == "submit":
            from .assembly import submit_study

            job_id = submit_study(store, args.study_uid, actor)
            print(f"study {args.study_uid}: job {job_id} ready")
        elif cmd == "purge":
            return _purge(store, cfg, args.done_older_than, actor)
        return 0
    except (StoreError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _row(job) -> dict:
    d = dataclasses.asdict(job)
    d.pop("images", None)
    d.pop("group_key", None)  # a Patient ID or a folder path (names): not for output
    return d


def _list(store, as_json: bool) -> int:
    jobs = store.jobs()
    if as_json:
        print(json.dumps([_row(j) for j in jobs], indent=2))
        return 0
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from ..terminal import printable

        table = Table("job", "state", "instances", "study / group", "ready by", "drive",
                      "updated", "reason")
        for j in jobs:  # cells as Text: a reason or a path is never read as markup
            table.add_row(*(Text(printable(c or "")) for c in (
                str(j.id), j.state, str(j.instances), _group(j), j.ready_by, j.drive,
                _when(j.updated_at), j.reason)))
        Console().print(table)
        return 0
    for j in jobs:
        print(f"job {j.id} {j.state} instances={j.instances} {_group(j)} ready_by={j.ready_by!r} "
              f"drive={j.drive!r} updated={_when(j.updated_at)} reason={j.reason!r}")
    return 0


def _group(job) -> str:
    what = job.study_uid or f"{job.group_kind}:{job.source}"
    if job.supplement_of:
        what += f" (supplement {job.supplement_no} of job {job.supplement_of})"
    return what


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else ""


def _show(store, job_id: int, as_json: bool) -> int:
    job = store.job(job_id)
    data = {"job": {k: v for k, v in dataclasses.asdict(job).items() if k != "group_key"},
            "media": store.media(job_id),
            "audit": store.audit_trail(job_id), "instances": store.job_uids(job_id)}
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"job {job.id}: {job.state}  {_group(job)}")
    print(f"  instances: {job.instances}  copies: {job.copies}  attempts: {job.attempts}  "
          f"source: {job.source}  ready by: {job.ready_by or '-'}")
    if job.reason:
        print(f"  reason: {job.reason}")
    for img in job.images:
        print(f"  image {img['index']}/{img['count']}: {img['fileset_id']} {img['bytes']} bytes "
              f"sha256 {img['sha256']}")
    for m in data["media"]:
        burn = f"{m['burn_seconds']:.2f} s" if m["burn_seconds"] is not None else "-"
        ver = f"{m['verify_seconds']:.2f} s" if m["verify_seconds"] is not None else "-"
        print(f"  disc {m['id']}: volume {m['volume']} copy {m['copy']} on {m['drive']}: "
              f"{m['state']} (burn {burn}, read-back {ver}) {m['detail']}")
    for a in data["audit"]:
        moved = f"{a['from_state']} -> {a['to_state']}" if a["event"] == "state" else a["event"]
        extra = " ".join(f"{k}={a[k]}" for k in ("drive", "disc", "checksum") if a[k])
        print(f"  {_when(a['at'])} {moved} by {a['actor']} {extra} {a['detail']}".rstrip())
    return 0


def _purge(store, cfg, days: float, actor: str) -> int:
    """With the daemon stopped this process takes the spool lock and removes the files
    itself; with the daemon running the spool is the daemon's: the purges are recorded (the
    files tombstoned) and the daemon removes them within a second or two, which is awaited."""
    from .service import purge
    from .spool import Spool, SpoolBusy, SpoolLock

    spool = Spool(cfg.daemon.spool, store, None, create=False)
    cutoff = time.time() - days * 86400
    jobs = store.done_before(cutoff)
    try:
        lock = SpoolLock(cfg.daemon.spool).acquire()
    except SpoolBusy:
        lock = None
    if lock is not None:
        try:
            files = sum(purge(store, spool, j.id, actor) for j in jobs)
        finally:
            lock.release()
        print(f"purged {len(jobs)} job(s), {files} spool file(s) removed")
        left = store.tombstones()
        if left:
            print(f"{len(left)} spool file(s) could not be removed (see above); the daemon "
                  "tries again when it runs", file=sys.stderr)
            return 1
        return 0
    files = sum(len(store.begin_purge(j.id, actor)) for j in jobs)
    end = time.monotonic() + 60
    while (store.purging() or store.tombstones()) and time.monotonic() < end:
        time.sleep(0.2)
    if store.purging() or store.tombstones():
        print(f"purge of {len(jobs)} job(s) recorded; the daemon has not finished removing "
              f"{len(store.tombstones())} spool file(s) yet (see its log)", file=sys.stderr)
        return 1
    print(f"purged {len(jobs)} job(s), {files} spool file(s) removed (by the running daemon)")
    return 0
