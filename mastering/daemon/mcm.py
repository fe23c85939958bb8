"""Media Creation Management SCP (PS3.4 Annex S, PS3.3 C.22.1; SOP Class 1.2.840.10008.5.1.1.33).

N-CREATE stores a Media Creation Request (IDLE). N-ACTION 1 (Initiate, with Number of Copies
and Request Priority) queues it (PENDING/QUEUED); once every referenced instance is durably
in the spool it becomes a job of its own, mastered with the request's profile, File-set ID/UID,
splitting and display-application choices. Instances that do not arrive within
``mcm.instance_timeout`` fail the request with NO_INSTANCE and the Failed SOP Sequence.
N-ACTION 2 (Cancel) answers C201 (already completed), C202 (in progress: being mastered,
burned or read back) or C203 (denied: only the AE that created the request may cancel it).
N-GET reports Execution Status (IDLE, PENDING, CREATING, DONE, FAILURE) and its Info, Total
Number of Pieces of Media Created, Failed SOP Sequence and Referenced Storage Media Sequence,
computed from the job's state and the media recorded for it (discs of the job's current
images only).

A request's job is made once, atomically (:meth:`JobStore.start_request_job`), and takes its
instances out of the assembled jobs (``assembly.auto``) that have not started, so they are
burned once, on the requested disc; an assembled job left empty is cancelled. If an
assembled job holding some of them had already started, both discs are made and N-GET says
so: Execution Status Info ALSO_ASSEMBLED (our Defined Term, in the conformance statement)
where it would say NORMAL.
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .. import profiles
from ..pipeline import check_fileset_id
from .store import ACTIVE, JobStore, StoreError

log = logging.getLogger("mastering.daemon.mcm")

MCM_CLASS = "1.2.840.10008.5.1.1.33"
INITIATE, CANCEL = 1, 2
ALSO_ASSEMBLED = "ALSO_ASSEMBLED"  # Execution Status Info: an assembled disc holds them too
ALREADY_INITIATED = 0xA510
CANCEL_COMPLETED, CANCEL_IN_PROGRESS, CANCEL_DENIED = 0xC201, 0xC202, 0xC203
NO_SUCH_INSTANCE, INVALID_VALUE, MISSING_ATTRIBUTE, NO_SUCH_ACTION = 0x0112, 0x0106, 0x0120, \
    0x0123
PRIORITY = {"HIGH": 2, "MED": 1, "LOW": 0}
#: N-CREATE attributes kept and echoed (keyword -> default)
OPTIONAL = ("StorageMediaFileSetID", "StorageMediaFileSetUID",
            "LabelUsingInformationExtractedFromInstances", "LabelText", "LabelStyleSelection",
            "BarcodeValue", "BarcodeSymbology", "MediaDisposition", "AllowMediaSplitting",
            "AllowLossyCompression", "IncludeNonDICOMObjects", "IncludeDisplayApplication",
            "PreserveCompositeInstancesAfterMediaCreation", "SpecificCharacterSet")


class MediaCreation:
    """The three DIMSE handlers and the main loop's step, over the job store."""

    def __init__(self, store: JobStore, default_profile: str, instance_timeout: float):
        self.store = store
        self.default_profile = default_profile
        self.instance_timeout = instance_timeout

    # -- N-CREATE ---------------------------------------------------------------------------

    def handle_create(self, event) -> tuple[int, Dataset | None]:
        ds = event.attribute_list
        calling = event.assoc.requestor.ae_title.strip()
        peer = event.assoc.requestor.address
        uid = event.request.AffectedSOPInstanceUID or generate_uid()
        try:
            data = self._parse(ds)
        except ValueError as exc:
            log.warning("media creation request from %s@%s refused: %s", calling, peer, exc)
            status = MISSING_ATTRIBUTE if "missing" in str(exc) else INVALID_VALUE
            return status, None
        if not self.store.add_request(str(uid), "mcm", "IDLE", calling, peer, data):
            return 0x0111, None  # duplicate SOP instance (PS3.7 C.4.1)
        log.info("media creation request %s from %s@%s: %d instance(s), profile %s", uid,
                 calling, peer, len(data["refs"]), data["profile"])
        reply = Dataset()
        for key in OPTIONAL:
            if key in ds:
                setattr(reply, key, ds[key].value)
        reply.ReferencedSOPSequence = ds.ReferencedSOPSequence
        if event.request.AffectedSOPInstanceUID is None:
            reply.AffectedSOPInstanceUID = uid
        return 0x0000, reply

    def _parse(self, ds: Dataset) -> dict:
        if "ReferencedSOPSequence" not in ds or not ds.ReferencedSOPSequence:
            raise ValueError("Referenced SOP Sequence (0008,1199) is missing or empty")
        refs = []
        for item in ds.ReferencedSOPSequence:
            if "ReferencedSOPClassUID" not in item or "ReferencedSOPInstanceUID" not in item:
                raise ValueError("a Referenced SOP Sequence item is missing its UIDs")
            refs.append([str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID),
                         str(item.get("RequestedMediaApplicationProfile", "") or "")])
        fsid = str(ds.get("StorageMediaFileSetID", "") or "")
        if fsid:
            try:
                check_fileset_id(fsid)
            except ValueError as exc:
                raise ValueError(str(exc)) from exc
        return {"refs": refs, "profile": refs[0][2] or self.default_profile,
                "fileset_id": fsid,
                "fileset_uid": str(ds.get("StorageMediaFileSetUID", "") or ""),
                "label_text": str(ds.get("LabelText", "") or ""),
                "label": _yes(ds, "LabelUsingInformationExtractedFromInstances", True),
                "span": _yes(ds, "AllowMediaSplitting", True),
                "viewer": _yes(ds, "IncludeDisplayApplication", False),
                "status": "IDLE", "info": "NORMAL"}

    # -- N-ACTION ---------------------------------------------------------------------------

    def handle_action(self, event) -> tuple[int, Dataset | None]:
        req = event.request
        uid = str(req.RequestedSOPInstanceUID)
        mcm = self.store.request(uid)
        if mcm is None or mcm.kind != "mcm":
            return NO_SUCH_INSTANCE, None
        if req.ActionTypeID == INITIATE:
            return self._initiate(mcm, event.action_information), None
        if req.ActionTypeID == CANCEL:
            return self._cancel(mcm, event.assoc.requestor.ae_title.strip(),
                                event.assoc.requestor.address), None
        return NO_SUCH_ACTION, None

    def _initiate(self, mcm, info: Dataset | None) -> int:
        if mcm.state != "IDLE":
            return ALREADY_INITIATED
        copies = int(info.get("NumberOfCopies", 1) or 1) if info is not None else 1
        priority = str(info.get("RequestPriority", "MED") or "MED") if info is not None else "MED"
        if copies < 1 or priority not in PRIORITY:
            return INVALID_VALUE
        data = {**mcm.data, "copies": copies, "priority": priority, "status": "PENDING",
                "info": "QUEUED"}
        if not self.store.update_request(mcm.uid, expect=("IDLE",), state="PENDING", data=data,
                                         deadline=time.time() + self.instance_timeout):
            return ALREADY_INITIATED
        log.info("media creation request %s initiated: %d copies, priority %s", mcm.uid, copies,
                 priority)
        started = self.store.request(mcm.uid)
        if started is not None and started.job_id is None:
            self._try_start(started, time.time())  # at once if its instances are all here
        return 0x0000

    def _cancel(self, mcm, actor: str, address: str) -> int:
        if actor != mcm.calling_ae:
            log.warning("media creation request %s: cancel from %s@%s refused (C203): only "
                        "%s, which created it, may cancel it", mcm.uid, actor, address,
                        mcm.calling_ae)
            return CANCEL_DENIED
        if mcm.job_id is None:
            if mcm.state in ("DONE", "FAILURE"):
                return CANCEL_COMPLETED
            self.store.delete_request(mcm.uid)  # "Cancel deletes the instance"
            log.info("media creation request %s cancelled before it started", mcm.uid)
            return 0x0000
        job = self.store.job(mcm.job_id)
        if job.state in ("done", "failed", "cancelled"):
            return CANCEL_COMPLETED
        if job.state in ACTIVE:
            log.info("media creation request %s: cancel refused (C202), job %d is %s",
                     mcm.uid, job.id, job.state)
            return CANCEL_IN_PROGRESS
        try:
            self.store.request_cancel(job.id, f"mcm:{actor}")
        except StoreError:
            return CANCEL_DENIED
        self.store.delete_request(mcm.uid)
        log.info("media creation request %s cancelled (job %d)", mcm.uid, job.id)
        return 0x0000

    # -- the main loop: waiting for instances -------------------------------------------------

    def step(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for mcm in self.store.requests("mcm", ("PENDING",)):
            if mcm.job_id is None:
                self._try_start(mcm, now)

    def _try_start(self, mcm, now: float) -> None:
        refs = mcm.data["refs"]
        uids = [u for _c, u, _p in refs]
        failure = self._refused(refs)
        if failure:
            self._fail(mcm, failure, [])
            return
        present = self.store.instances_present(uids)
        missing = [[c, u] for c, u, _p in refs if u not in present]
        if missing:
            if now >= mcm.deadline:
                self._fail(mcm, "NO_INSTANCE", missing)
            return
        data = mcm.data
        options = {k: data[k] for k in ("profile", "fileset_id", "fileset_uid", "label",
                                         "span", "viewer", "label_text") if data.get(k) != ""}
        job_id, started = self.store.start_request_job(
            mcm.uid, uids, source="mcm", actor=f"mcm:{mcm.calling_ae}", options=options,
            copies=data.get("copies", 1), priority=PRIORITY[data.get("priority", "MED")],
            ready_by="media creation request")
        if job_id is None:  # another thread started it first
            return
        log.info("media creation request %s: all instances stored, job %d", mcm.uid, job_id)
        if started:
            self.store.update_request(mcm.uid, data={**data, "also_on": started})
            self.store.audit(job_id, "also-assembled", actor=f"mcm:{mcm.calling_ae}",
                             detail="instances also on assembled job(s) "
                             + ", ".join(map(str, started)) + " (already started)")
            log.warning("media creation request %s: some of its instances are also on "
                        "assembled job(s) %s, which had already started: they are burned "
                        "twice", mcm.uid, ", ".join(map(str, started)))

    def _refused(self, refs: list[list[str]]) -> str:
        uids = [u for _c, u, _p in refs]
        if len(set(uids)) != len(uids):
            return "DUPL_REF_INST"
        wanted = {p or self.default_profile for _c, _u, p in refs}
        if len(wanted) > 1:
            return "INST_AP_CONFLICT"
        try:
            profile = profiles.load(wanted.pop())
        except profiles.ProfileError:
            return "NOT_SUPPORTED"
        return "" if profile.writes_iso else "NOT_SUPPORTED"

    def _fail(self, mcm, info: str, missing: list[list[str]]) -> None:
        data = {**mcm.data, "status": "FAILURE", "info": info,
                "failed": [[c, u, NO_SUCH_INSTANCE] for c, u in missing]}
        self.store.update_request(mcm.uid, state="FAILURE", data=data)
        log.warning("media creation request %s failed: %s (%d instance(s) missing)", mcm.uid,
                    info, len(missing))

    # -- N-GET --------------------------------------------------------------------------------

    def handle_get(self, event) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        mcm = self.store.request(uid)
        if mcm is None or mcm.kind != "mcm":
            return NO_SUCH_INSTANCE, None
        return 0x0000, self.status(mcm)

    def status(self, mcm) -> Dataset:
        status, info, pieces = mcm.data.get("status", mcm.state), mcm.data.get("info",
                                                                               "NORMAL"), 0
        failed = [[c, u, r] for c, u, r in mcm.data.get("failed", [])]
        media: list[tuple[str, str]] = []
        if mcm.job_id is not None:
            job = self.store.job(mcm.job_id)
            status, info = _job_status(job)
            if info == "NORMAL" and mcm.data.get("also_on"):
                info = ALSO_ASSEMBLED
            by_volume = {v["index"]: v for v in job.images}
            good = [m for m in self.store.media(job.id) if m["state"] == "verified"
                    and m["sha256"] == by_volume.get(m["volume"], {}).get("sha256")]
            pieces = len(good)
            for m in good:
                vol = by_volume[m["volume"]]
                media.append((vol.get("fileset_id", ""), vol.get("fileset_uid", "")))
            if status == "FAILURE":
                failed = [[c, u, 0x0110] for c, u, _p in mcm.data["refs"]]
        ds = Dataset()
        ds.ExecutionStatus, ds.ExecutionStatusInfo = status, info
        ds.TotalNumberOfPiecesOfMediaCreated = pieces
        ds.FailedSOPSequence = Sequence([_failed(c, u, r) for c, u, r in failed])
        items = []
        for fsid, fsuid in media:
            item = Dataset()
            item.StorageMediaFileSetID, item.StorageMediaFileSetUID = fsid, fsuid
            items.append(item)
        ds.ReferencedStorageMediaSequence = Sequence(items)
        return ds


def _job_status(job) -> tuple[str, str]:
    if job.state in ("received", "ready"):
        return "PENDING", "QUEUED"
    if job.state in ACTIVE:
        return "CREATING", "NORMAL"
    if job.state == "done":
        return "DONE", "NORMAL"
    if job.state == "cancelled":
        return "FAILURE", "UNKNOWN"
    reason = job.reason.lower()
    if "does not fit" in reason or "volumes" in reason:
        return "FAILURE", "SET_OVERSIZED"
    if "drive" in reason or "burn" in reason or "read-back" in reason:
        return "FAILURE", "MCD_FAILURE"
    return "FAILURE", "PROC_FAILURE"


def _failed(cls: str, uid: str, reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
    item.FailureReason = reason
    return item


def _yes(ds: Dataset, key: str, default: bool) -> bool:
    value = str(ds.get(key, "") or "").strip().upper()
    return default if not value else value == "YES"
