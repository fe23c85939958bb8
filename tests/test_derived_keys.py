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
