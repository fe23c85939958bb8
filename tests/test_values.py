"""Record values valid for their VR (PS3.5 Table 6.2-1), whatever the input holds."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import profiles, values
from mastering.pipeline import Options, master
from mastering.verify import verify

from .conftest import dciodvfy_errors, dcmdump, make_ct

DVD = profiles.load("STD-GEN-USB-JPEG")  # Table H.3-2 keys: birth date, sex, institution


@pytest.mark.parametrize(("vr", "value", "ok"), [
    ("DA", b"20240101", True), ("DA", b"1997.04.24", False), ("DA", b"20241301", False),
    ("DA", b"20240101  ", False), ("TM", b"140438", True), ("TM", b"14:04:38", False),
    ("TM", b"140438.123456 ", True), ("TM", b"250000", False), ("IS", b"12", True),
    ("IS", b"1.5 ", False), ("IS", b"99999999999 ", False), ("DS", b"-1.5e3", True),
    ("DS", b"1,5 ", False), ("CS", b"ORIGINAL\\PRIMARY", True), ("CS", b"lower ", False),
    ("UI", b"1.2.3\0", True), ("UI", b"1.2.03", False), ("UI", b"1.2.3 ", False),
    ("LO", b"A" * 64, True), ("LO", b"A" * 66, False), ("SH", b"ABC\0", False),
    ("PN", b"DOE^JANE^^^ ", True), ("PN", b"A^B^C^D^E^F ", False), ("LT", b"line\r\n  ", True),
    ("AS", b"045Y", True), ("AS", b"45Y ", False),
])
def test_value_formats(vr: str, value: bytes, ok: bool) -> None:
    assert (values.check(0x00091000, vr, value) is None) is ok  # private: no VM


def test_multiplicity_from_the_dictionary() -> None:
    assert values.check(0x00100020, "LO", b"A\\B ") is not None  # Patient ID: VM 1
    assert values.check(0x00080008, "CS", b"ORIGINAL\\PRIMARY") is None  # Image Type: 2-n
    assert values.check(0x00080008, "CS", b"ORIGINAL") is not None
    assert values.check(0x00200032, "DS", b"1\\2 ") is not None  # Image Position: 3


def test_normalizes_only_what_has_one_meaning() -> None:
    assert values.normalize(0x00080020, "DA", b"1997.04.24") == b"19970424"
    assert values.normalize(0x00080030, "TM", b"14:04:38") == b"140438"
    assert values.normalize(0x00080030, "TM", b"14:04:38.25") == b"140438.25 "
    assert values.normalize(0x00081030, "LO", b"ABC\0") == b"ABC "
    assert values.normalize(0x0020000D, "UI", b"1.2.3 ") == b"1.2.3\0"
    assert values.normalize(0x00080020, "DA", b"20240101xyz ") is None  # trailing garbage
    assert values.normalize(0x00100020, "LO", b"A\\B ") is None  # which one?
    assert values.normalize(0x00100020, "LO", b"X" * 70) is None


def _bad_inputs(folder: Path) -> dict[str, Path]:
    """One file per class of invalid value, each its own patient and study."""
    cases = {
        "acr_nema": dict(StudyDate="1997.04.24", StudyTime="14:04:38",
                         PatientBirthDate="1960.01.02", SeriesDate="1997.04.24"),
        "multi_id": dict(patient_id="A1\\B2"),
        "long_id": dict(patient_id="X" * 70),
        "garbage": dict(StudyDate="20240101xyz", InstitutionName="CLINIC\0\0",
                        AccessionNumber="A" * 20),
        "bad_is": dict(SeriesNumber="1.5"),
        "type3": dict(PatientSex="female", PixelSpacing=[0.5, 0.5, 0.5]),
    }
    paths = {}
    for i, (name, kw) in enumerate(cases.items()):
        if "patient_id" not in kw:
            kw["patient_id"] = f"P{i}"
        paths[name] = make_ct(folder, f"{name}.dcm", study_uid=f"1.2.3.7.{i}",
                              series_uid=f"1.2.3.7.{i}.1", instance=1, **kw)
    # a key encoded with another text VR than the dictionary's (LO written as SH)
    ds = pydicom.dcmread(make_ct(folder, "vr.dcm", patient_id="P9", study_uid="1.2.3.7.9",
                                 series_uid="1.2.3.7.9.1"))
    ds.add_new(0x00081030, "SH", "A DESCRIPTION TOO LONG FOR SH")
    ds.save_as(folder / "vr.dcm")
    paths["vr"] = folder / "vr.dcm"
    return paths


@pytest.mark.oracle
def test_invalid_values_never_reach_the_dicomdir(tmp_path: Path) -> None:
    paths = _bad_inputs(tmp_path / "in")
    before = {p: p.read_bytes() for p in paths.values()}
    report = master([tmp_path / "in"], tmp_path / "out", Options(DVD, workers=1),
                    kind="folder")
    assert report.instances == len(paths) and not report.invalid
    dicomdir = tmp_path / "out" / "DICOMDIR"
    assert dciodvfy_errors(dicomdir) == []
    dcmdump(dicomdir)
    assert len(list(FileSet(dicomdir))) == len(paths)
    result = verify(tmp_path / "out", DVD)
    assert result.ok, result.violations
    assert all(p.read_bytes() == data for p, data in before.items())  # files untouched
    fixed = {(Path(f["path"]).stem, f["key"]): f for f in report.filled if "reason" in f}
    assert fixed["acr_nema", "StudyDate"]["value"] == "19970424"
    assert fixed["acr_nema", "StudyTime"]["value"] == "140438"
    assert "ACR-NEMA" in fixed["acr_nema", "PatientBirthDate"]["reason"]
    assert fixed["multi_id", "PatientID"]["value"].startswith("NOID")
    assert "derived" in fixed["long_id", "PatientID"]["reason"]
    assert fixed["garbage", "StudyDate"]["value"] == "19000101"
    assert fixed["garbage", "InstitutionName"]["value"] == "CLINIC"
    assert fixed["garbage", "AccessionNumber"]["value"] == ""  # Type 2: left empty
    assert fixed["bad_is", "SeriesNumber"]["value"] == "1"  # running number
    assert fixed["type3", "PixelSpacing"]["reason"].endswith("left out")
    assert "encoded as SH" in fixed["vr", "StudyDescription"]["reason"]
    records = {r.DirectoryRecordType: r for r in pydicom.dcmread(dicomdir).DirectoryRecordSequence
               if r.get("PatientID") == "P0" or r.get("StudyDate") == "19970424"}
    assert records["STUDY"].StudyTime == "140438"
    assert records["PATIENT"].PatientBirthDate == "19600102"


def test_verify_checks_record_values(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm", StudyDate="20240101")
    master([tmp_path / "in"], tmp_path / "out", Options(DVD), kind="folder")
    assert verify(tmp_path / "out", DVD).ok
    dicomdir = tmp_path / "out" / "DICOMDIR"
    data = dicomdir.read_bytes()
    dicomdir.write_bytes(data.replace(b"DA\x08\x0020240101", b"DA\x08\x002024.1.1"))
    result = verify(tmp_path / "out", DVD)
    assert {v.code for v in result.violations} == {"record-value"}
    assert "StudyDate" in result.violations[0].message
    assert dciodvfy_errors(dicomdir)  # the oracle agrees


@pytest.mark.oracle
@pytest.mark.parametrize("encoding", ["explicit", "implicit", "big_endian"])
def test_binary_values_that_look_like_padding_are_values(tmp_path: Path, encoding: str) -> None:
    """Rows 32 is the bytes 20 00, Columns 8192 is 00 20 and 8224 is 20 20: values, not
    padding (32x32 spectroscopy and NM matrices are common)."""
    from . import encodings as enc

    sizes = {"a": (32, 32), "b": (1, 8192), "c": (1, 8224)}
    for name, (rows, columns) in sizes.items():
        path = make_ct(tmp_path / "src", f"{name}.dcm", rows=rows, Columns=columns,
                       PixelData=bytes(2 * rows * columns), implicit=encoding == "implicit",
                       instance=ord(name))
        if encoding == "big_endian":
            enc.big_endian(path, tmp_path / "in" / path.name)
        else:
            (tmp_path / "in").mkdir(exist_ok=True)
            (tmp_path / "in" / path.name).write_bytes(path.read_bytes())
    report = master([tmp_path / "in"], tmp_path / "out", Options(DVD, workers=1),
                    kind="folder")
    assert report.instances == 3 and not report.invalid
    dicomdir = tmp_path / "out" / "DICOMDIR"
    found = {(r.Rows, r.Columns) for r in pydicom.dcmread(dicomdir).DirectoryRecordSequence
             if r.DirectoryRecordType == "IMAGE"}
    assert found == set(sizes.values())
    assert dciodvfy_errors(dicomdir) == []
    assert verify(tmp_path / "out", DVD).ok
