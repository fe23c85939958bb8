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
from tests.conftest import CT_IMAGE_STORAGE, ct_series, make_ct

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


def test_commitment_fails_an_object_the_sender_had_refused(daemon, tmp_path):
    """Object A under UID X is stored (0000); object B under the same UID, other pixels, is
    refused (C111). The sender's commitment for X fails (0110): B, the copy it would delete,
    was never stored. Sending A again makes X committable again (the last object decides);
    another sender whose own X was accepted gets X committed throughout."""
    d = daemon(assembly={"quiet_seconds": 300})
    a = make_ct(tmp_path / "a", "a.dcm", sop_uid="1.2.3.9.50", value=1)
    b = make_ct(tmp_path / "b", "b.dcm", sop_uid="1.2.3.9.50", value=2)
    reports: queue.Queue = queue.Queue()

    def on_report(event):
        reports.put(event.event_information)
        return 0x0000, None

    def commit(assoc, tuid):
        status, _ = assoc.send_n_action(_commit_request(["1.2.3.9.50"], tuid), 1, PUSH_MODEL,
                                        PUSH_MODEL_INSTANCE)
        assert status.Status == 0
        info = reports.get(timeout=20)
        assert info.TransactionUID == tuid
        failed = [(f.ReferencedSOPInstanceUID, f.FailureReason)
                  for f in info.get("FailedSOPSequence", [])]
        ok = [i.ReferencedSOPInstanceUID for i in info.get("ReferencedSOPSequence", [])]
        return ok, failed

    other = scu_ae(CT_IMAGE_STORAGE, PUSH_MODEL, ae_title="CT2").associate(
        "127.0.0.1", d.port, ae_title="BURNER",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert send(other, a) == 0  # CT2 sends A first: stored
    ae = scu_ae(CT_IMAGE_STORAGE, PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert send(assoc, a) == 0  # MODALITY's A: the same object, acknowledged again
    assert commit(assoc, "1.2.3.77.50") == (["1.2.3.9.50"], [])
    assert assoc.send_c_store(pydicom.dcmread(b)).Status == 0xC111
    assert commit(assoc, "1.2.3.77.51") == ([], [("1.2.3.9.50", 0x0110)])
    assert commit(other, "1.2.3.77.52") == (["1.2.3.9.50"], [])  # CT2's object is stored
    assert send(assoc, a) == 0  # MODALITY sends A again: its last object is the stored one
    assert commit(assoc, "1.2.3.77.53") == (["1.2.3.9.50"], [])
    assoc.release()
    other.release()


def test_watchdog_stays_regular_while_a_commitment_peer_hangs(daemon, tmp_path):
    """The modality's report address accepts TCP connections and never answers. Reports to
    it are tried from delivery threads: the main loop's WATCHDOG=1 pings keep their period,
    and a study still becomes ready after quiet_seconds."""
    import socket
    import threading
    import time

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(50)
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    pings: list[float] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            try:
                msg = sock.recv(4096).decode()
            except (TimeoutError, OSError):
                continue
            if "WATCHDOG=1" in msg:
                pings.append(time.monotonic())

    threading.Thread(target=listen, daemon=True).start()
    try:
        d = daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"},
                   scp={"acse_timeout": 3},
                   commitment={"retry_seconds": 0.5, "connect_timeout": 2, "report_delay": 1,
                               "peers": {"MODALITY": f"127.0.0.1:{hole.getsockname()[1]}"}},
                   assembly={"quiet_seconds": 1}, drives=[])
        assoc = scu_ae(PUSH_MODEL).associate("127.0.0.1", d.port, ae_title="BURNER")
        for i in range(6):
            status, _ = assoc.send_n_action(_commit_request([f"1.2.3.88.{i}"], f"1.2.3.87.{i}"),
                                            1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
            assert status.Status == 0
        assoc.release()  # the reports must go on new associations: into the hole
        t0 = time.monotonic()
        time.sleep(2)
        assert storescu(d.port, ct_series(tmp_path / "in", 1, 1)).returncode == 0
        store = d.store()
        wait_for(lambda: (j := job_of_study(store, "1.2.3.4.1")) and j.state == "ready", 10,
                 message="the quiet study to become ready")
        ready_after = time.monotonic() - t0
        time.sleep(max(0.0, 6.5 - ready_after))
        seen = [p for p in pings if p > t0]
        gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        assert len(seen) >= 10 and max(gaps) < 2.0, gaps  # pings every 0.25 s here
        assert ready_after < 6
        assert "no association to MODALITY" in d.log  # the reports were tried, and wait
        assert store.request("1.2.3.87.0").state == "pending"
    finally:
        stop.set()
        sock.close()
        hole.close()


def _mcm_for(assoc, uids: list[str], copies: int = 1) -> str:
    uid = generate_uid()
    ds = Dataset()
    items = []
    for u in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, u
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    status, _ = assoc.send_n_create(ds, MCM_CLASS, uid)
    assert status.Status == 0
    status, _ = assoc.send_n_action(_initiate(copies, "MED"), 1, MCM_CLASS, uid)
    assert status.Status == 0
    return uid


def test_media_creation_requests_make_one_job_each(daemon, tmp_path):
    """Many requests initiated while the main loop polls fast: the claim of a request and
    its job are one transaction, so each request has exactly one job."""
    d = daemon(daemon={"tick_seconds": 0.005}, assembly={"auto": False}, drives=[])
    files, uids = _refs(ct_series(tmp_path / "in", 1, 10))
    assoc = scu_ae(MCM_CLASS, CT_IMAGE_STORAGE).associate("127.0.0.1", d.port,
                                                          ae_title="BURNER")
    for f in files:
        assert send(assoc, f) == 0
    requests = [_mcm_for(assoc, uids) for _ in range(60)]
    assoc.release()
    store = d.store()
    wait_for(lambda: all(store.request(u).job_id for u in requests), 20,
             message="every request to have its job")
    jobs = [j for j in store.jobs() if j.source == "mcm"]
    assert len(jobs) == len(requests)
    assert sorted(store.request(u).job_id for u in requests) == sorted(j.id for j in jobs)


def test_media_creation_with_auto_assembly_burns_once(daemon, fake_drive, tmp_path):
    """With the defaults (assembly on, MCM on) a study sent and then asked for by MCM goes
    onto the requested disc only: its instances leave the assembled job, which is cancelled
    as empty. A second study, already burning when its request comes, is burned twice, and
    N-GET says so (Execution Status Info ALSO_ASSEMBLED)."""
    drive = fake_drive()
    d = daemon(assembly={"quiet_seconds": 2},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    files, uids = _refs(ct_series(tmp_path / "in", 1, 6))
    assoc = scu_ae(MCM_CLASS, CT_IMAGE_STORAGE).associate("127.0.0.1", d.port,
                                                          ae_title="BURNER")
    for f in files:
        assert send(assoc, f) == 0
    store = d.store()
    assembled = job_of_study(store, "1.2.3.4.1")
    uid = _mcm_for(assoc, uids)
    wait_for(lambda: _get(assoc, uid)[1].ExecutionStatus == "DONE",
             message="the requested disc")
    assert store.job(assembled.id).state == "cancelled" and store.job(assembled.id).instances == 0
    assert "media creation" in store.job(assembled.id).reason
    code, ds = _get(assoc, uid)
    assert ds.ExecutionStatusInfo == "NORMAL" and ds.TotalNumberOfPiecesOfMediaCreated == 1
    # a study whose assembled job is already being burned when the request comes
    drive.set(write_rate=150_000)
    files2, uids2 = _refs(ct_series(tmp_path / "in2", 1, 4, rows=128, study_uid="1.2.3.4.2"))
    for f in files2:
        assert send(assoc, f) == 0
    wait_for(lambda: (j := job_of_study(store, "1.2.3.4.2")) and j.state == "burning",
             message="the second study's burn")
    uid2 = _mcm_for(assoc, uids2)
    wait_for(lambda: _get(assoc, uid2)[1].ExecutionStatus in ("PENDING", "CREATING"), 10,
             message="the second request")
    drive.set()
    wait_for(lambda: _get(assoc, uid2)[1].ExecutionStatus == "DONE", message="its disc")
    assert _get(assoc, uid2)[1].ExecutionStatusInfo == "ALSO_ASSEMBLED"
    assert job_of_study(store, "1.2.3.4.2").state == "done"  # left alone, burned too
    assoc.release()
    mcm_jobs = [j for j in store.jobs() if j.source == "mcm"]
    assert len(mcm_jobs) == 2 and all(j.state == "done" for j in mcm_jobs)


def test_media_creation_cancel_in_progress_and_denied(daemon, fake_drive, tmp_path):
    """Cancel while the request's disc is being burned: C202, and the disc is finished.
    Cancel from an AE that did not create the request: C203. The creator's cancel of a
    queued request succeeds."""
    drive = fake_drive()
    drive.set(write_rate=200_000)
    d = daemon(assembly={"auto": False},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    files, uids = _refs(ct_series(tmp_path / "in", 1, 4, rows=128))
    assoc = scu_ae(MCM_CLASS, CT_IMAGE_STORAGE).associate("127.0.0.1", d.port,
                                                          ae_title="BURNER")
    for f in files:
        assert send(assoc, f) == 0
    uid = _mcm_for(assoc, uids)
    intruder = scu_ae(MCM_CLASS, ae_title="OTHER").associate("127.0.0.1", d.port,
                                                               ae_title="BURNER")
    status, _ = intruder.send_n_action(None, 2, MCM_CLASS, uid)
    assert status.Status == 0xC203
    wait_for(lambda: _get(assoc, uid)[1].ExecutionStatus == "CREATING",
             message="the burn of the requested disc")
    status, _ = assoc.send_n_action(None, 2, MCM_CLASS, uid)
    assert status.Status == 0xC202
    drive.set()
    wait_for(lambda: _get(assoc, uid)[1].ExecutionStatus == "DONE", message="the disc")
    queued = _mcm_for(assoc, ["1.2.3.999.9"])  # waits for an instance that is not there
    status, _ = intruder.send_n_action(None, 2, MCM_CLASS, queued)
    assert status.Status == 0xC203
    status, _ = assoc.send_n_action(None, 2, MCM_CLASS, queued)
    assert status.Status == 0x0000 and _get(assoc, queued)[0] == 0x0112
    intruder.release()
    assoc.release()
    assert "C203" in d.log and "C202" in d.log


def test_media_creation_counts_only_discs_of_the_current_images(tmp_path):
    """A disc verified from an earlier image of the job (mastered again since) is not one of
    the request's pieces of media."""
    from mastering.daemon.mcm import MediaCreation
    from mastering.daemon.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    store.add_request("1.2.3.55", "mcm", "PENDING", "PACS", "127.0.0.1",
                      {"refs": [], "status": "PENDING", "info": "QUEUED"})
    job_id, _ = store.start_request_job("1.2.3.55", [], source="mcm", actor="mcm:PACS")
    image = {"index": 1, "count": 1, "sha256": "new", "fileset_id": "F", "fileset_uid": "1.2"}
    store.update(job_id, images=[image])
    for sha in ("old", "new"):
        medium = store.start_medium(job_id, 1, 1, "fd")
        assert store.finish_medium(medium, "verified", sha256=sha)
    for state in ("mastering", "burning", "verifying", "done"):
        store.transition(job_id, state)
    ds = MediaCreation(store, "STD-GEN-CD", 60).status(store.request("1.2.3.55"))
    assert ds.ExecutionStatus == "DONE" and ds.TotalNumberOfPiecesOfMediaCreated == 1
    assert [m.StorageMediaFileSetID for m in ds.ReferencedStorageMediaSequence] == ["F"]
