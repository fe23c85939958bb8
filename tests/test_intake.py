"""Intake: what is an instance, what is not, and why."""

from __future__ import annotations

from pathlib import Path

import pydicom

from mastering import intake, profiles
from mastering.intake import Instance, Problem

from .conftest import make_ct, sample

CD = profiles.load("STD-GEN-CD")


def _scan(*paths: Path) -> intake.IntakeResult:
    return intake.scan(list(paths), CD, workers=1)


def test_every_pydicom_file_is_classified() -> None:
    """pydicom's test files: every one ends up an instance, ignored or invalid, with a reason."""
    folder = sample("CT_small.dcm").parent
    res = intake.scan([folder], CD, workers=2)
    assert res.files_seen >= 80
    assert len(res.instances) > 30
    reasons = {Path(p.path).name: p.reason for p in res.invalid}
    assert "truncated" in reasons["MR_truncated.dcm"]
    assert "truncated" in reasons["rtplan_truncated.dcm"]
    assert {Path(p.path).name for p in res.ignored} >= {"README.txt", "zipMR.gz"}
    for p in res.invalid + res.ignored:
        assert p.reason


def test_dicomdir_is_an_index(tmp_path: Path) -> None:
    ddir = sample("CT_small.dcm").parent / "dicomdirtests" / "DICOMDIR"
    res = intake.scan([ddir], CD, workers=1)
    assert len(res.indexes) == 1 and res.indexes[0].referenced
    assert all(not i.path.endswith("DICOMDIR") for i in res.instances)
    assert len(res.instances) + len(res.invalid) == len(res.indexes[0].referenced)


def test_missing_file_referenced_by_dicomdir(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(make_ct(tmp_path / "src", "a.dcm"))
    fs.add(make_ct(tmp_path / "src", "b.dcm", instance=2))
    fs.write(tmp_path / "fs")
    victim = next(p for p in (tmp_path / "fs").rglob("*") if p.is_file() and p.name != "DICOMDIR")
    victim.unlink()
    res = _scan(tmp_path / "fs" / "DICOMDIR")
    assert len(res.instances) == 1
    assert [p.kind for p in res.invalid] == ["missing"]


def test_raw_and_pydicom_paths_agree(tmp_path: Path) -> None:
    """Explicit and implicit copies of one data set give the same encoded record keys."""
    a = make_ct(tmp_path, "e.dcm", sop_uid="1.2.3.5", PatientName="Müller^Jürgen")
    b = make_ct(tmp_path / "i", "i.dcm", sop_uid="1.2.3.5", implicit=True,
                PatientName="Müller^Jürgen")
    ea, eb = intake.scan_file(str(a), CD), intake.scan_file(str(b), CD)
    assert isinstance(ea, Instance) and isinstance(eb, Instance)
    assert ea.keys == eb.keys and ea.leaf == eb.leaf
    hdr = intake.records.PydicomHeader(pydicom.dcmread(a, stop_before_pixels=True))
    for keys in ea.keys.values():
        for tag, enc in keys.items():
            expected = hdr.encoded(tag)
            if expected is not None:  # absent Type 2 keys are written empty
                assert expected == enc


def test_not_storable_and_bad_uids(tmp_path: Path) -> None:
    p = make_ct(tmp_path, "a.dcm", SOPClassUID="1.2.840.10008.5.1.4.31")  # worklist: no storage
    res = intake.scan_file(str(p), CD)
    assert isinstance(res, Problem) and "not a storage class" in res.reason
    p = make_ct(tmp_path, "b.dcm", sop_uid="1.2.03.4")
    res = intake.scan_file(str(p), CD)
    assert isinstance(res, Problem) and "not a valid SOP Instance UID" in res.reason


def test_fills_are_derived_from_the_file(tmp_path: Path) -> None:
    a = make_ct(tmp_path, "a.dcm", patient_id="", StudyID=None, StudyDate=None,
                SeriesDate="20230304")
    one, two = intake.scan_file(str(a), CD), intake.scan_file(str(a), CD)
    assert isinstance(one, Instance)
    filled = dict(one.filled)
    assert filled["PatientID"].startswith("NOID") and filled == dict(two.filled)
    assert filled["StudyDate"] == "20230304"  # from the series date, as dcmtk does
    assert filled["StudyID"].startswith("ST")


def test_pixel_data_missing_means_truncated(tmp_path: Path) -> None:
    p = make_ct(tmp_path, "a.dcm", PixelData=None)
    res = intake.scan_file(str(p), CD)
    assert isinstance(res, Problem) and "Pixel Data" in res.reason


def test_lower_case_cd_mount_resolves(tmp_path: Path) -> None:
    """A CD mounted on Linux shows lower-case names; the DICOMDIR still says upper case."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(make_ct(tmp_path / "src", "a.dcm"))
    fs.write(tmp_path / "cd")
    for path in sorted((tmp_path / "cd").rglob("*"), key=lambda p: -len(p.parts)):
        if path.name != "DICOMDIR":
            path.rename(path.with_name(path.name.lower()))
    res = _scan(tmp_path / "cd" / "DICOMDIR")
    assert len(res.instances) == 1 and not res.invalid


def test_dicomdir_cannot_reach_outside_its_fileset(tmp_path: Path) -> None:
    """A Referenced File ID with '..' must not pull a file from elsewhere on the machine."""
    from pydicom.fileset import FileSet

    secret = make_ct(tmp_path / "secret", "OTHERPAT", patient_id="OTHER")
    fs = FileSet()
    fs.add(make_ct(tmp_path / "src", "a.dcm"))
    fs.write(tmp_path / "cd")
    dd = pydicom.dcmread(tmp_path / "cd" / "DICOMDIR")
    leaf = next(r for r in dd.DirectoryRecordSequence if "ReferencedFileID" in r)
    leaf.ReferencedFileID = ["..", "secret", "OTHERPAT"]
    dd.save_as(tmp_path / "cd" / "DICOMDIR")
    res = intake.scan([tmp_path / "cd" / "DICOMDIR"], CD, workers=1)
    assert all(i.path != str(secret) for i in res.instances)
    assert any("not a File ID" in p.reason for p in res.invalid)


def test_incomplete_meta_is_rebuilt(tmp_path: Path) -> None:
    """A meta group missing Type 1 elements, or naming another SOP Class, gets a new one."""
    p = make_ct(tmp_path, "a.dcm")
    ds = pydicom.dcmread(p)
    del ds.file_meta.ImplementationClassUID
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=False)
    inst = intake.scan_file(str(tmp_path / "b.dcm"), CD)
    assert isinstance(inst, Instance) and not inst.meta_complete
    ds = pydicom.dcmread(p)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, data set is CT
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=False)
    inst = intake.scan_file(str(tmp_path / "c.dcm"), CD)
    assert isinstance(inst, Instance) and not inst.meta_complete
    assert intake.scan_file(str(p), CD).meta_complete


def test_oversized_keys(tmp_path: Path) -> None:
    """A key too large for the walk's collection (a 100 KB Referenced Image Sequence) is
    still taken, through pydicom."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    refs = []
    for i in range(1200):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = f"1.2.3.4.5.6.7.{i}"
        refs.append(item)
    p = make_ct(tmp_path, "a.dcm", ReferencedImageSequence=Sequence(refs))
    inst = intake.scan_file(str(p), CD)
    assert isinstance(inst, Instance)
    assert 0x00081140 in intake.records.split(inst.leaf)


def test_non_ascii_accession_is_not_copied_into_study_id(tmp_path: Path) -> None:
    p = make_ct(tmp_path, "a.dcm", StudyID=None, AccessionNumber="ÄB12")
    inst = intake.scan_file(str(p), CD)
    assert isinstance(inst, Instance)
    assert dict(inst.filled)["StudyID"].startswith("ST")


def test_links_fifos_and_broken_links(tmp_path: Path) -> None:
    """A link out of the inputs is listed, not followed (unless asked, then once), a link
    loop inside them is walked once, a FIFO is listed and never opened, a broken link is
    listed: none of them stops or hangs the run."""
    import os

    make_ct(tmp_path / "in", "a.dcm")
    make_ct(tmp_path / "elsewhere", "b.dcm", instance=2)
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "linked")
    os.symlink(tmp_path / "in", tmp_path / "in" / "loop")
    os.mkfifo(tmp_path / "in" / "pipe")
    os.symlink(tmp_path / "nowhere", tmp_path / "in" / "dangling")
    res = _scan(tmp_path / "in")
    assert len(res.instances) == 1 and not res.invalid
    assert {Path(p.path).name: p.kind for p in res.ignored} == {
        "pipe": "not-dicom", "dangling": "not-dicom", "linked": "link"}
    res = intake.scan([tmp_path / "in"], profiles.load("STD-GEN-CD"), follow_links=True)
    assert len(res.instances) == 2 and not res.invalid
    assert {Path(p.path).name for p in res.ignored} == {"pipe", "dangling"}
