"""Type 1 keys filled in for the record (PS3.3 F.5, _standard/fill_rules.json): instances that
belong together stay together, whatever is missing or invalid."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import profiles
from mastering.pipeline import Options, master
from mastering.verify import verify

from .conftest import dciodvfy_errors, dcmdump, make_ct

USB = profiles.load("STD-GEN-USB-JPEG")


def _records(dicomdir: Path, rtype: str) -> list[pydicom.Dataset]:
    return [r for r in pydicom.dcmread(dicomdir).DirectoryRecordSequence
            if r.DirectoryRecordType == rtype]


def _check(out: Path) -> None:
    dicomdir = out / "DICOMDIR"
    assert dciodvfy_errors(dicomdir) == []
    dcmdump(dicomdir)
    assert len(list(FileSet(dicomdir))) == len(_records(dicomdir, "IMAGE"))
    result = verify(out, USB)
    assert result.ok, result.violations


@pytest.mark.oracle
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("key", ["study_uid", "series_uid"])
def test_an_invalid_uid_keeps_its_series_together(tmp_path: Path, key: str, skip: bool) -> None:
    """Three images of one series with an invalid Study (or Series) Instance UID: one study,
    one series, three instances; another series with another invalid value stays apart."""
    for i in range(1, 4):
        make_ct(tmp_path / "in" / "s", f"{i}.dcm", instance=i, **{key: "1.2.03.4"})
    make_ct(tmp_path / "in" / "t", "1.dcm", instance=1, SeriesNumber=2,
            **{key: "1.2.03.5", **({"series_uid": "1.2.3.4.1.2"} if key == "study_uid"
                                   else {})})
    report = master([tmp_path / "in"], tmp_path / "out", Options(USB, skip_invalid=skip),
                    kind="folder")
    assert report.instances == 4 and not report.invalid and not report.skipped
    assert (report.studies, report.series) == ((2, 2) if key == "study_uid" else (1, 2))
    derived = {f["value"] for f in report.filled if f["path"].startswith(
        str(tmp_path / "in" / "s"))}
    assert len(derived) == 1 and derived.pop().startswith("2.25.")
    _check(tmp_path / "out")


@pytest.mark.oracle
def test_missing_uids_are_derived_from_their_own_level(tmp_path: Path) -> None:
    """No Study and Series Instance UID at all: the instances of one study and series (the
    same study and series attributes) get one derived UID each."""
    for i in range(1, 4):
        make_ct(tmp_path / "in", f"{i}.dcm", instance=i, StudyInstanceUID=None,
                SeriesInstanceUID=None)
    report = master([tmp_path / "in"], tmp_path / "out", Options(USB), kind="folder")
    assert (report.instances, report.studies, report.series) == (3, 1, 1)
    _check(tmp_path / "out")


def test_an_invalid_patient_id_keeps_its_patient_together(tmp_path: Path) -> None:
    for study in range(2):
        make_ct(tmp_path / "in", f"{study}.dcm", patient_id="A1\\B2",
                study_uid=f"1.2.3.4.{study}", series_uid=f"1.2.3.4.{study}.1")
    report = master([tmp_path / "in"], tmp_path / "out", Options(USB), kind="folder")
    assert report.patients == 1 and report.studies == 2
    (patient,) = _records(tmp_path / "out" / "DICOMDIR", "PATIENT")
    assert patient.PatientID.startswith("NOID")


def _sr(folder: Path, name: str, edit) -> Path:
    from .conftest import sample

    ds = pydicom.dcmread(sample("test-SR.dcm"))
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{len(name)}"
    edit(ds)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name)
    return folder / name


def _last_without(ds: pydicom.Dataset) -> None:
    ds.VerifyingObserverSequence[0].VerificationDateTime = "20010213184700"
    del ds.VerifyingObserverSequence[-1].VerificationDateTime


def _all_invalid(ds: pydicom.Dataset) -> None:
    for observer in ds.VerifyingObserverSequence:
        observer.VerificationDateTime = "2001021318474X"


def _no_observers(ds: pydicom.Dataset) -> None:
    del ds.VerifyingObserverSequence
    ds.ContentDate, ds.ContentTime = "20240102", "030405"


@pytest.mark.oracle
@pytest.mark.parametrize(("edit", "expected", "reason"), [
    (_last_without, "20010213184700", "latest Verifying Observer"),
    (_all_invalid, "20010213184746", "derived from ContentDate and ContentTime"),
    (_no_observers, "20240102030405", "derived from ContentDate and ContentTime"),
])
def test_verified_sr_records_have_a_verification_datetime(tmp_path: Path, edit, expected: str,
                                                          reason: str) -> None:
    _sr(tmp_path / "in", "sr.dcm", edit)
    cd = profiles.load("STD-GEN-CD")
    report = master([tmp_path / "in"], tmp_path / "out", Options(cd, verify=True),
                    kind="folder")
    (record,) = _records(tmp_path / "out" / "DICOMDIR", "SR DOCUMENT")
    assert record.VerificationFlag == "VERIFIED" and record.VerificationDateTime == expected
    (fix,) = [f for f in report.filled if f["key"] == "VerificationDateTime"]
    assert reason in fix["reason"]
    assert dciodvfy_errors(tmp_path / "out" / "DICOMDIR") == []


def test_verify_flags_a_verified_sr_record_without_its_datetime(tmp_path: Path) -> None:
    _sr(tmp_path / "in", "sr.dcm", lambda ds: None)
    cd = profiles.load("STD-GEN-CD")
    master([tmp_path / "in"], tmp_path / "out", Options(cd), kind="folder")
    dicomdir = tmp_path / "out" / "DICOMDIR"
    data = dicomdir.read_bytes()
    old = b"\x40\x00\x30\xa0DT\x0e\x0020010213184746"
    assert old in data
    dicomdir.write_bytes(data.replace(old, b"\x40\x00\x31\xa0" + old[4:]))  # another tag
    result = verify(tmp_path / "out", cd)
    assert any(v.code == "record-key" and "Verification DateTime" in v.message
               for v in result.violations)
