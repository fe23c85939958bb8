"""Storage Commitment (PS3.4 J), Media Creation Management (PS3.4 S) and Instance
Availability Notification (PS3.4 R), each driven by a pynetdicom SCU against the daemon."""

from __future__ import annotations

import queue

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from mastering.daemon.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE
from mastering.daemon.mcm import MCM_CLASS
from tests.conftest import CT_IMAGE_STORAGE, ct_series

from .conftest import free_port, job_of_study, scu_ae, send, storescu, wait_for


def _refs(folder):
    files = sorted(folder.rglob("*.dcm"))
    return files, [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]


def _commit_request(uids: list[str], tuid: str) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = tuid
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, uid
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


def test_storage_commitment_on_the_same_association(daemon, tmp_path):
    """Only what is durably stored is committed; the rest fails with 0112; a complete
    commitment makes the study's job ready at once (no waiting for quiet_seconds)."""
    d = daemon(assembly={"quiet_seconds": 300})
    files, uids = _refs(ct_series(tmp_path / "in", 1, 3))
    reports: queue.Queue = queue.Queue()

    def on_report(event):
        reports.put((event.event_type, event.event_information))
        return 0x0000, None

    ae = scu_ae(CT_IMAGE_STORAGE, PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    for f in files:
        assert send(assoc, f) == 0
    missing = "1.2.3.999.1"
    status, _ = assoc.send_n_action(_commit_request(uids + [missing], "1.2.3.77.1"), 1,
                                    PUSH_MODEL, PUSH_MODEL_INSTANCE)
    assert status.Status == 0
    event_type, info = reports.get(timeout=20)
    assert event_type == 2 and info.TransactionUID == "1.2.3.77.1"
    assert {i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence} == set(uids)
    failed = info.FailedSOPSequence
    assert [(f.ReferencedSOPInstanceUID, f.FailureReason) for f in failed] == [(missing, 0x0112)]
    store = d.store()
    assert job_of_study(store, "1.2.3.4.1").state == "received"  # incomplete: no burn yet
    status, _ = assoc.send_n_action(_commit_request(uids, "1.2.3.77.2"), 1, PUSH_MODEL,
                                    PUSH_MODEL_INSTANCE)
    event_type, info = reports.get(timeout=20)
    assoc.release()
    assert event_type == 1 and "FailedSOPSequence" not in info
    job = wait_for(lambda: (j := job_of_study(store, "1.2.3.4.1")).state == "done" and j,
                   message="the committed study to be burned")
    assert job.ready_by == "storage commitment"


def test_storage_commitment_on_a_new_association(daemon, tmp_path):
    """The modality closes its association right after the N-ACTION: the report comes on a
    new association to the address in commitment.peers, the daemon in the SCP role."""
    port = free_port()
    reports: queue.Queue = queue.Queue()

    def on_report(event):
        reports.put((event.event_type, event.event_information, event.assoc.requestor.ae_title))
        return 0x0000, None

    modality = AE(ae_title="MODALITY")
    modality.add_supported_context(PUSH_MODEL, scu_role=True, scp_role=True)
    server = modality.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        d = daemon(commitment={"report_delay": 1.0,
                               "peers": {"MODALITY": f"127.0.0.1:{port}"}})
        files, uids = _refs(ct_series(tmp_path / "in", 1, 2))
        assert storescu(d.port, *files).returncode == 0
        ae = scu_ae(PUSH_MODEL)
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = PUSH_MODEL, True, True
        assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER", ext_neg=[role])
        status, _ = assoc.send_n_action(_commit_request(uids, "1.2.3.77.3"), 1, PUSH_MODEL,
                                        PUSH_MODEL_INSTANCE)
        assoc.release()
        assert status.Status == 0
        event_type, info, caller = reports.get(timeout=30)
        assert event_type == 1 and info.TransactionUID == "1.2.3.77.3"
        assert caller.strip() == "BURNER"
        store = d.store()
        wait_for(lambda: store.request("1.2.3.77.3").state == "reported", 10,
                 message="the delivery to be recorded")
    finally:
        server.shutdown()


def _mcm_request(uids: list[str], fsid: str = "PATIENT_DISC") -> Dataset:
    ds = Dataset()
    ds.StorageMediaFileSetID = fsid
    ds.StorageMediaFileSetUID = "1.2.3.88.1"
    ds.LabelUsingInformationExtractedFromInstances = "YES"
    ds.LabelText = "follow-up"
    ds.AllowMediaSplitting = "NO"
    ds.IncludeDisplayApplication = "NO"
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, uid
        item.RequestedMediaApplicationProfile = "STD-GEN-CD"
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


def _initiate(copies: int = 1, priority: str = "HIGH") -> Dataset:
    ds = Dataset()
    ds.NumberOfCopies, ds.RequestPriority = copies, priority
    return ds


def _get(assoc, uid):
    status, ds = assoc.send_n_get([0x21000020, 0x21000030, 0x2200000B, 0x00081198,
                                   0x2200000D], MCM_CLASS, uid)
    return status.Status, ds


def test_media_creation_management(daemon, tmp_path):
    """N-CREATE before the instances arrive, Initiate (A510 the second time), N-GET through
    PENDING to DONE with the requested File-set ID/UID, Cancel after DONE is C201; an
    unknown request is 0112; a request whose instances never come fails with NO_INSTANCE."""
    d = daemon(assembly={"auto": False}, mcm={"instance_timeout": 2})
    files, uids = _refs(ct_series(tmp_path / "in", 1, 3))
    ae = scu_ae(MCM_CLASS, CT_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    uid = generate_uid()
    status, reply = assoc.send_n_create(_mcm_request(uids), MCM_CLASS, uid)
    assert status.Status == 0 and reply.StorageMediaFileSetID == "PATIENT_DISC"
    assert _get(assoc, uid)[1].ExecutionStatus == "IDLE"
    status, _ = assoc.send_n_action(_initiate(), 1, MCM_CLASS, uid)
    assert status.Status == 0
    status, _ = assoc.send_n_action(_initiate(), 1, MCM_CLASS, uid)
    assert status.Status == 0xA510
    code, ds = _get(assoc, uid)
    assert (ds.ExecutionStatus, ds.ExecutionStatusInfo) == ("PENDING", "QUEUED")
    for f in files:  # the instances arrive after the request
        assert send(assoc, f) == 0

    def done():
        return _get(assoc, uid)[1].ExecutionStatus == "DONE"

    wait_for(done, message="the media creation request to be done")
    code, ds = _get(assoc, uid)
    assert ds.ExecutionStatusInfo == "NORMAL" and ds.TotalNumberOfPiecesOfMediaCreated == 1
    media = ds.ReferencedStorageMediaSequence
    assert [(m.StorageMediaFileSetID, m.StorageMediaFileSetUID) for m in media] == \
        [("PATIENT_DISC", "1.2.3.88.1")]
    status, _ = assoc.send_n_action(None, 2, MCM_CLASS, uid)
    assert status.Status == 0xC201
    assert _get(assoc, "1.2.3.404")[0] == 0x0112
    store = d.store()
    job = [j for j in store.jobs() if j.source == "mcm"][0]
    assert job.priority == 2 and job.options["fileset_id"] == "PATIENT_DISC"
    assert job.options["span"] is False
    # instances that never arrive: FAILURE / NO_INSTANCE with the Failed SOP Sequence
    late = generate_uid()
    status, _ = assoc.send_n_create(_mcm_request(["1.2.3.999.5"], "LATE"), MCM_CLASS, late)
    assoc.send_n_action(_initiate(), 1, MCM_CLASS, late)
    wait_for(lambda: _get(assoc, late)[1].ExecutionStatus == "FAILURE", 15,
             message="the timeout")
    code, ds = _get(assoc, late)
    assert ds.ExecutionStatusInfo == "NO_INSTANCE"
    assert [(f.ReferencedSOPInstanceUID, f.FailureReason) for f in ds.FailedSOPSequence] == \
        [("1.2.3.999.5", 0x0112)]
    # cancelling a request that has not started deletes it
    idle = generate_uid()
    assoc.send_n_create(_mcm_request(uids, "IDLE"), MCM_CLASS, idle)
    status, _ = assoc.send_n_action(None, 2, MCM_CLASS, idle)
    assert status.Status == 0 and _get(assoc, idle)[0] == 0x0112
    assoc.release()


def test_instance_availability_notification_makes_the_job_ready(daemon, tmp_path):
    ian_class = "1.2.840.10008.5.1.4.33"
    d = daemon(assembly={"quiet_seconds": 300})
    files, uids = _refs(ct_series(tmp_path / "in", 1, 2))
    assert storescu(d.port, *files).returncode == 0
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3.4.1"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4.1.10"
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, uid
        item.InstanceAvailability = "ONLINE"
        items.append(item)
    series.ReferencedSOPSequence = Sequence(items)
    ds.ReferencedSeriesSequence = Sequence([series])
    ae = scu_ae(ian_class)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    status, _ = assoc.send_n_create(ds, ian_class, generate_uid())
    assoc.release()
    assert status.Status == 0
    store = d.store()
    job = wait_for(lambda: (j := job_of_study(store, "1.2.3.4.1")).state == "done" and j,
                   message="the notified study to be burned")
    assert job.ready_by == "instance availability notification"
