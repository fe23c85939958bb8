"""The watched folder: a study folder dropped into ``watch.folder`` becomes a job once a
marker file (``watch.marker``, default ``READY``) in it says the folder is complete.

Every file below the folder goes through the same durable receive as a C-STORE (structural
check, quarantine, duplicate rules); the job is made of what was accepted. The folder is the
user's input: it is never changed or deleted; the store remembers which folders (by device,
inode and the marker's time) were taken, so one is never taken twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("mastering.daemon.watch")


def scan_watch_folder(daemon) -> list[int]:
    cfg = daemon.cfg.watch
    root = Path(cfg.folder)
    made = []
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        log.warning("watch folder %s: %s", root, exc.strerror or exc)  # the configured root
        return made
    for folder in entries:
        marker = folder / cfg.marker
        if not marker.is_file():
            continue
        st, mt = folder.stat(), marker.stat()
        key = f"watch:{st.st_dev}:{st.st_ino}:{mt.st_mtime_ns}"
        if daemon.store.request(key) is not None:
            continue
        job_id = take(daemon, folder, marker, key)
        if job_id is not None:
            made.append(job_id)
    return made


def take(daemon, folder: Path, marker: Path, key: str) -> int | None:
    """Folder names often carry patient names (PACS exports): logs and the request row name
    the folder by its inode only; the job keeps the path (owner-only) until it is purged."""
    uids, refused = [], 0
    where = f"watched folder (inode {folder.stat().st_ino})"
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path == marker or not path.is_file():
                continue
            out = daemon.spool.receive_file(path, "WATCH", where, auto=False)
            if out.status == 0 and out.sop_uid:
                uids.append(out.sop_uid)
            else:
                refused += 1
                log.warning("%s: a file was refused (0x%04X): %s", where, out.status,
                            out.comment)
    daemon.store.add_request(key, "watch", "taken", "WATCH", where,
                             {"instances": len(uids), "refused": refused})
    if not uids:
        log.warning("%s: no instance accepted; no job", where)
        return None
    job_id = daemon.store.create_job(sorted(set(uids)), source="watch", actor="watch",
                                     group_kind="folder", group_key=str(folder),
                                     ready_by="watch folder marker")
    log.info("%s: job %d with %d instance(s), %d refused", where, job_id, len(uids), refused)
    return job_id
