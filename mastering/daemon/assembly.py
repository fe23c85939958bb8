"""Study assembly: when a job (one study, patient or calling AE, see ``assembly.group_by``)
is complete enough to burn.

The spool puts every stored instance into the open job of its group (or a follow-up job when
the group's job has started: its own disc, labelled as a supplement). A job becomes ready at
the first of:

* ``quiet_seconds`` without a new instance for it (the fallback, as storescp ``-tos``);
* a Storage Commitment request whose referenced instances are all durably stored;
* an Instance Availability Notification (PS3.4 Annex R) whose ONLINE instances are all stored;
* a Media Creation Management request (its own job, see :mod:`.mcm`);
* ``mastering jobs submit STUDY_UID``.
"""

from __future__ import annotations

import logging
import time

from .store import OPEN, JobStore

log = logging.getLogger("mastering.daemon.assembly")


def ready_quiet(store: JobStore, quiet_seconds: float, now: float | None = None) -> list[int]:
    """Jobs that have had no new instance for quiet_seconds become ready."""
    done = []
    for job_id in store.quiet_jobs(quiet_seconds, time.time() if now is None else now):
        if store.transition(job_id, "ready", expect=("received",), ready_by="quiet",
                            detail=f"no new instance for {quiet_seconds:g} s"):
            log.info("job %d ready: no new instance for %g s", job_id, quiet_seconds)
            done.append(job_id)
    return done


def ready_for(store: JobStore, sop_uids: list[str], why: str, actor: str) -> list[int]:
    """The assembled jobs holding these (all durably stored) instances become ready."""
    done = []
    for job_id in sorted(store.jobs_of_instances(sop_uids)):
        job = store.job(job_id)
        if job.source == "assembly" and job.state == "received" and store.transition(
                job_id, "ready", expect=("received",), ready_by=why, actor=actor):
            log.info("job %d ready: %s", job_id, why)
            done.append(job_id)
    return done


def submit_study(store: JobStore, study_uid: str, actor: str) -> int:
    """`jobs submit`: the study's open job becomes ready; without one, a new job of every
    spooled instance of the study is made (a second disc of a study already burned)."""
    for job in store.jobs(OPEN):
        if job.study_uid == study_uid and job.group_kind == "study" and job.source == "assembly":
            store.transition(job.id, "ready", expect=OPEN, ready_by="submit", actor=actor)
            return job.id
    uids = store.study_instances(study_uid)
    if not uids:
        raise LookupError(f"no instance of study {study_uid} is in the spool")
    return store.create_job(uids, source="submit", actor=actor, group_kind="study",
                            group_key=study_uid, study_uid=study_uid, ready_by="submit")


def ian_ready(store: JobStore, refs: list[tuple[str, str, str]], actor: str) -> tuple[list[int],
                                                                                      list[str]]:
    """An Instance Availability Notification: refs are (class, instance, availability). If
    every ONLINE instance it lists is stored, their jobs become ready. Returns (jobs made
    ready, instances still missing)."""
    online = [uid for _cls, uid, avail in refs if avail in ("ONLINE", "")]
    present = store.instances_present(online)
    missing = [u for u in online if u not in present]
    if missing:
        return [], missing
    return ready_for(store, online, "instance availability notification", actor), []
