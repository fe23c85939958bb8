"""The Storage SCP as a real process, driven by DCMTK storescu/echoscu and pynetdicom: the
first burn end to end (judged by dciodvfy, dcmdump, pydicom's FileSet), association policy,
duplicates, UID conflicts, corrupt data sets, transfer syntaxes, limits."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from tests.conftest import dciodvfy_errors, dcmdump, extract_iso, make_ct, sample

from .conftest import (
    body_of,
    echoscu,
    job_of_study,
    scu_ae,
    send,
    send_raw,
    storescu,
    wait_for,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.oracle
def test_first_burn_end_to_end(daemon, tmp_path):
    """storescu sends a study, the job becomes ready after quiet_seconds, is burned to a
    pseudo-drive and read back; the disc holds every instance exactly once, intact, and its
    DICOMDIR passes dciodvfy, dcmdump and pydicom."""
    d = daemon()
    src = tmp_path / "in"
    sent = {}
    for i in range(1, 6):
        p = make_ct(src / "s1", f"{i}.dcm", instance=i, patient_name="SECRET^NAME",
                    patient_id="SECRETPID", series_uid="1.2.3.4.1.1")
        sent[pydicom.dcmread(p).SOPInstanceUID] = p
    make_ct(src / "s2", "1.dcm", instance=1, implicit=True, series_uid="1.2.3.4.1.2",
            patient_name="SECRET^NAME", patient_id="SECRETPID")
    assert echoscu(d.port).returncode == 0
    res = storescu(d.port, src)
    assert res.returncode == 0, res.stderr
    store = d.store()
    job = wait_for(lambda: (j := job_of_study(store, "1.2.3.4.1")) and j.state == "done" and j,
                   message="the job to be done")
    assert job.instances == 6 and job.ready_by == "quiet"
    media = store.media(job.id)
    assert [m["state"] for m in media] == ["verified"]
    assert media[0]["sha256"] == job.images[0]["sha256"]
    disc = tmp_path / "disc.img"
    files = extract_iso(disc, tmp_path / "x")
    dd = files / "DICOMDIR"
    assert dciodvfy_errors(dd) == []
    assert "DirectoryRecordSequence" in dcmdump(dd)
    fs = FileSet(dd)
    assert len(fs) == 6
    on_disc = {inst.SOPInstanceUID: inst.load() for inst in fs}
    for uid, path in sent.items():  # Explicit VR files go onto the disc byte for byte
        assert on_disc[uid].PixelData == pydicom.dcmread(path).PixelData
    for inst in fs:  # the data set bytes after the meta group are the sender's, unchanged
        if inst.SOPInstanceUID in sent:
            assert body_of(Path(inst.path)) == body_of(sent[inst.SOPInstanceUID])
    # privacy: the log at info names UIDs and job numbers, never the patient
    assert "SECRET" not in d.log and "1.2.3.4.1" in d.log
    assert "job 1" in d.log


def test_association_policy(daemon):
    d = daemon(scp={"allowed_calling_aets": ["CT1", "PACS"]})
    assert echoscu(d.port, aet="CT1").returncode == 0
    bad = echoscu(d.port, aet="INTRUDER")
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr or "reject" in bad.stderr.lower()
    wait_for(lambda: "INTRUDER@127.0.0.1" in d.log and "calling AE title not recognised"
             in d.log, 5, message="the rejection to be logged")
    assert echoscu(d.port, aet="CT1", aec="OTHER").returncode != 0
    wait_for(lambda: "(1/1/7)" in d.log, 5, message="the called AE rejection")
    d.stop()
    d2 = daemon(scp={"allowed_peers": ["10.0.0.0/8"]})
    assert echoscu(d2.port).returncode != 0
    wait_for(lambda: "peer address not allowed" in d2.log, 5, message="the peer rejection")


def test_association_limit(daemon):
    from pynetdicom.sop_class import Verification

    d = daemon(scp={"max_associations": 1, "max_pdu": 32768})
    ae = scu_ae(Verification)
    first = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    assert first.is_established
    assert first.acceptor.maximum_length == 32768  # our maximum PDU, as negotiated
    second = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    assert second.is_rejected
    rj = second.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, too many
    first.release()
    third = wait_for(lambda: (a := ae.associate("127.0.0.1", d.port, ae_title="BURNER"))
                     .is_established and a, 10, message="a free association")
    third.release()


def test_duplicates_conflicts_and_corrupt_data_sets(daemon, tmp_path):
    d = daemon(assembly={"quiet_seconds": 300})
    a = make_ct(tmp_path / "a", "a.dcm", sop_uid="1.2.3.9.1")
    twin = make_ct(tmp_path / "b", "a.dcm", sop_uid="1.2.3.9.1", value=99)  # same UID, other
    shutil.copy(a, tmp_path / "copy.dcm")
    ae = scu_ae()
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    assert assoc.is_established
    assert send(assoc, a) == 0
    assert send(assoc, tmp_path / "copy.dcm") == 0  # the same instance again: idempotent
    status = assoc.send_c_store(pydicom.dcmread(twin))
    assert status.Status == 0xC111 and "different content" in status.ErrorComment
    assoc.release()
    store = d.store()
    rec = store.instance("1.2.3.9.1")
    assert rec is not None and body_of(Path(rec.path)) == body_of(a)  # the first object is kept
    # a truncated data set: failure status, kept in quarantine with its reason
    good = make_ct(tmp_path / "c", "t.dcm", sop_uid="1.2.3.9.2", rows=64)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    status = send_raw(assoc, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.9.2", body_of(good)[:-1000])
    assoc.release()
    assert status == 0xC000
    assert store.instance("1.2.3.9.2") is None
    q = store.quarantined()
    assert any(x["sop_uid"] == "1.2.3.9.2" and "truncated" in x["reason"] for x in q)
    kept = next(x for x in q if x["sop_uid"] == "1.2.3.9.2")
    assert Path(kept["path"]).is_file()
    assert "truncated" in Path(kept["path"]).with_suffix(".txt").read_text()
    assert "MODALITY@127.0.0.1" in d.log and "refused 1.2.3.9.2" in d.log
    # spool and database are owner-only
    spool = Path(store.path).parent
    assert oct(spool.stat().st_mode & 0o777) == "0o700"
    assert oct(Path(store.path).stat().st_mode & 0o777) == "0o600"
    assert oct(Path(rec.path).stat().st_mode & 0o777) == "0o600"


def test_compressed_transfer_syntaxes_are_accepted(daemon):
    """JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate, implicit and big
    endian, each on a context of its own transfer syntax: stored as received."""
    from pynetdicom import AE

    names = ["SC_jpeg_no_color_transform.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_gdcm.dcm",
             "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_08.dcm",
             "GDCMJ2K_TextGBR.dcm", "693_J2KI.dcm", "MR_small_RLE.dcm", "image_dfl.dcm",
             "MR_small_implicit.dcm", "ExplVR_BigEnd.dcm"]
    by_uid = {}
    for n in names:  # pydicom's samples share UIDs between some files: one file per UID
        f = sample(n)
        by_uid.setdefault(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID, f)
    files = list(by_uid.values())
    d = daemon(assembly={"quiet_seconds": 1})
    ae = AE(ae_title="MODALITY")
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    assert assoc.is_established
    tss = set()
    for f in files:
        ds = pydicom.dcmread(f)
        tss.add(ds.file_meta.TransferSyntaxUID)
        assert assoc.send_c_store(ds).Status == 0, f.name
    assoc.release()
    assert len(tss) >= 9
    store = d.store()
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        rec = store.instance(uid)
        assert rec is not None, f.name
        assert pydicom.dcmread(rec.path).file_meta.TransferSyntaxUID == \
            pydicom.dcmread(f).file_meta.TransferSyntaxUID


def test_mismatched_sop_class_is_refused(daemon, tmp_path):
    """A data set whose SOP Class differs from the C-STORE's Affected SOP Class: A900, and
    nothing stored."""
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    d = daemon()
    ae = scu_ae(CTImageStorage, MRImageStorage)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    body = body_of(make_ct(tmp_path, "y.dcm", sop_uid="1.2.3.9.8"))  # a CT data set ...
    assert send_raw(assoc, MRImageStorage, "1.2.3.9.8", body) == 0xA900  # ... sent as MR
    assoc.release()
    assert d.store().instance("1.2.3.9.8") is None
    wait_for(lambda: "0xA900" in d.log, 5, message="the refusal to be logged")


def _undecodable_jpeg(folder: Path) -> Path:
    """pydicom's JPEG baseline sample with its entropy-coded data scrambled: the structure
    (and the JPEG markers up to SOS) is intact, the pixels cannot be decoded."""
    raw = bytearray(sample("SC_rgb_jpeg_dcmtk.dcm").read_bytes())
    sos = raw.find(b"\xff\xda")
    for k in range(sos + 20, len(raw) - 200, 3):
        raw[k] = 0xFF if raw[k] != 0xFF else 0x00
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.dcm"
    path.write_bytes(bytes(raw))
    return path


def _store_as_is(port: int, path: Path, aet: str = "MODALITY") -> Dataset:
    """C-STORE a file in its own transfer syntax (a context of just that syntax)."""
    from pynetdicom import AE

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="BURNER")
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def test_undecodable_compressed_data_set_is_refused_at_receive(daemon, tmp_path):
    """With STD-GEN-CD (Explicit VR Little Endian only) a JPEG data set must be decoded on
    its way to the disc: one that cannot be is refused at C-STORE (C000, kept in quarantine
    with the reason) instead of being acknowledged and failing the whole study's disc; the
    decodable one is stored and the study is burned."""
    d = daemon(assembly={"quiet_seconds": 1, "group_by": "calling_ae"})
    bad = _undecodable_jpeg(tmp_path / "bad")
    status = _store_as_is(d.port, bad)
    assert status.Status == 0xC000 and "cannot be decoded" in status.ErrorComment
    store = d.store()
    uid = pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID
    assert store.instance(uid) is None
    q = [x for x in store.quarantined() if x["sop_uid"] == uid]
    assert q and "1.2.840.10008.1.2.4.50" in q[0]["reason"] and Path(q[0]["path"]).is_file()
    good_ct = make_ct(tmp_path / "ct", "ct.dcm")
    assert _store_as_is(d.port, good_ct).Status == 0
    assert _store_as_is(d.port, sample("SC_rgb_jpeg_dcmtk.dcm")).Status == 0  # decodable
    job = wait_for(lambda: (j := store.jobs()) and j[0].state in ("done", "failed") and j[0],
                   message="the disc")
    assert job.state == "done" and job.instances == 2, job.reason


def test_a_conversion_that_fails_at_mastering_names_the_instance(daemon, tmp_path):
    """The profile of the receive (STD-GEN-DVD-JPEG) carries JPEG as it is, so the bad
    instance is stored; a Media Creation request for STD-GEN-CD must decode it and cannot.
    The job fails naming the instance and the way out; `jobs retry ID --leave-out UID`
    masters the rest, audited."""
    import subprocess
    import sys

    from mastering.daemon.mcm import MCM_CLASS

    from .conftest import REPO

    d = daemon(assembly={"auto": False}, media={"profile": "STD-GEN-DVD-JPEG"})
    bad = _undecodable_jpeg(tmp_path / "bad")
    assert _store_as_is(d.port, bad).Status == 0
    cts = [make_ct(tmp_path / "ct", f"{i}.dcm", instance=i) for i in (1, 2)]
    for f in cts:
        assert _store_as_is(d.port, f).Status == 0
    files = [bad, *cts]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    classes = [pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID for f in files]
    req = Dataset()
    items = []
    for cls, uid in zip(classes, uids, strict=True):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
        item.RequestedMediaApplicationProfile = "STD-GEN-CD"
        items.append(item)
    req.ReferencedSOPSequence = items
    ae = scu_ae(MCM_CLASS)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    mcm_uid = "1.2.3.66.1"
    assert assoc.send_n_create(req, MCM_CLASS, mcm_uid)[0].Status == 0
    assert assoc.send_n_action(None, 1, MCM_CLASS, mcm_uid)[0].Status == 0
    assoc.release()
    store = d.store()
    job = wait_for(lambda: (j := [x for x in store.jobs() if x.source == "mcm"])
                   and j[0].state in ("failed", "done") and j[0], message="the MCM job")
    assert job.state == "failed"
    assert uids[0] in job.reason and f"retry {job.id} --leave-out {uids[0]}" in job.reason
    assert all(u not in job.reason for u in uids[1:])
    assert any(a["event"] == "unconvertible" and uids[0] in a["detail"]
               for a in store.audit_trail(job.id))
    res = subprocess.run([sys.executable, "-m", "mastering", "jobs", "--config", str(d.config),
                          "retry", str(job.id), "--leave-out", uids[0]], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0 and "1 instance(s) left out" in res.stdout, res.stderr
    wait_for(lambda: store.job(job.id).state == "done", message="the rest on a disc")
    assert store.job(job.id).instances == 2
    left = [a for a in store.audit_trail(job.id) if a["event"] == "left-out"]
    assert len(left) == 1 and uids[0] in left[0]["detail"] and left[0]["actor"].startswith("cli:")
    fs = FileSet(extract_iso(tmp_path / "disc.img", tmp_path / "x") / "DICOMDIR")
    assert sorted(i.SOPInstanceUID for i in fs) == sorted(uids[1:])


def test_memory_per_association_does_not_grow_with_the_instance(daemon, tmp_path):
    """A 67 MB instance is streamed into the spool as it arrives: the daemon's peak memory
    grows by a small fraction of it (it held the whole data set twice before)."""
    big = make_ct(tmp_path / "big", "big.dcm", rows=5800, value=7, study_uid="1.2.3.444")
    size = big.stat().st_size
    d = daemon(assembly={"quiet_seconds": 300}, scp={"max_pdu": 0})

    def hwm() -> int:
        for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    assert echoscu(d.port).returncode == 0  # the association machinery has run once
    before = hwm()
    res = storescu(d.port, big)
    assert res.returncode == 0, res.stderr
    grown = hwm() - before
    rec = d.store().instance(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    assert rec is not None and body_of(Path(rec.path)) == body_of(big)
    assert grown < size / 4, f"peak memory grew by {grown / 1e6:.0f} MB for {size / 1e6:.0f} MB"
