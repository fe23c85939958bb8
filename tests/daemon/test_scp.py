"""The Storage SCP as a real process, driven by DCMTK storescu/echoscu and pynetdicom: the
first burn end to end (judged by dciodvfy, dcmdump, pydicom's FileSet), association policy,
duplicates, UID conflicts, corrupt data sets, transfer syntaxes, limits."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pydicom
import pytest
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
