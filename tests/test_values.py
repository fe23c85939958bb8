"""Record values valid for their VR (PS3.5 Table 6.2-1), whatever the input holds."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import intake, profiles, values
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


# -- Specific Character Set, VRs, repertoires and meanings -----------------------------------


def _patch(path: Path, old: bytes, new: bytes) -> Path:
    """Replace bytes in a file (same length: no element length changes)."""
    data = path.read_bytes()
    assert old in data and len(old) == len(new), old
    path.write_bytes(data.replace(old, new))
    return path


CHARSET_ELEMENT = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"


def _with_charset(path: Path, value: bytes) -> Path:
    value += b" " * (len(value) % 2)
    data = path.read_bytes()
    new = b"\x08\x00\x05\x00CS" + len(value).to_bytes(2, "little") + value
    path.write_bytes(data.replace(CHARSET_ELEMENT, new))
    return path


def _master_checked(folder: Path, out: Path) -> tuple:
    report = master([folder], out, Options(DVD, workers=1, verify=True), kind="folder")
    dicomdir = out / "DICOMDIR"
    assert dciodvfy_errors(dicomdir) == []
    dcmdump(dicomdir)
    assert len(list(FileSet(dicomdir))) == report.instances
    fixes = {(Path(f["path"]).stem, f["key"]): f for f in report.filled if "reason" in f}
    return report, fixes, pydicom.dcmread(dicomdir)


def _one(index: int, folder: Path, name: str, **kw) -> Path:
    kw.setdefault("patient_id", f"P{index}")
    return make_ct(folder, f"{name}.dcm", study_uid=f"1.2.3.8.{index}",
                   series_uid=f"1.2.3.8.{index}.1", **kw)


@pytest.mark.oracle
def test_specific_character_set_is_written_as_its_defined_term(tmp_path: Path) -> None:
    spellings = {"hyphen": b"ISO-IR 100", "lower": b"iso_ir 100", "joined": b"ISO_IR100",
                 "padded": b"ISO_IR 100" + b" " * 10}
    for i, (name, value) in enumerate(spellings.items()):
        _with_charset(_one(i, tmp_path / "in", name, patient_name="MÜLLER^JÜRGEN"), value)
    report, fixes, dd = _master_checked(tmp_path / "in", tmp_path / "out")
    assert report.instances == len(spellings) and not report.invalid
    assert {r.SpecificCharacterSet for r in dd.DirectoryRecordSequence} == {"ISO_IR 100"}
    assert {str(r.PatientName) for r in dd.DirectoryRecordSequence if "PatientName" in r} \
        == {"MÜLLER^JÜRGEN"}  # decoded through the normalized term
    for name in spellings:
        assert "Defined Term" in fixes[name, "SpecificCharacterSet"]["reason"]


@pytest.mark.parametrize("value", [b"ISO_IR 999", b"LATIN1", b"ISO_IR 100 (LATIN-1)"])
def test_an_unknown_character_set_refuses_the_file(tmp_path: Path, value: bytes) -> None:
    path = _with_charset(make_ct(tmp_path, "a.dcm"), value)
    res = intake.scan_file(str(path), DVD)
    assert isinstance(res, intake.Problem) and "Specific Character Set" in res.reason
    assert "not a Defined Term (PS3.3 C.12.1.1.2)" in res.reason


@pytest.mark.oracle
def test_numbers_encoded_with_a_binary_vr_become_text(tmp_path: Path) -> None:
    """Series Number as US, Instance Number as SS, Pixel Spacing as FD: the IS/DS text of the
    same numbers; a Patient ID as OB has no one meaning and is derived (Type 1)."""
    path = _one(0, tmp_path / "in", "binary")
    ds = pydicom.dcmread(path)
    ds.add_new(0x00200011, "US", 7)
    ds.add_new(0x00200013, "SS", 3)
    ds.add_new(0x00280030, "FD", [0.5, 0.25])
    ds.add_new(0x00100020, "OB", b"PID1")
    ds.save_as(path)
    report, fixes, dd = _master_checked(tmp_path / "in", tmp_path / "out")
    assert report.instances == 1
    by_type = {r.DirectoryRecordType: r for r in dd.DirectoryRecordSequence}
    assert by_type["SERIES"]["SeriesNumber"].VR == "IS" and by_type["SERIES"].SeriesNumber == 7
    assert by_type["IMAGE"]["InstanceNumber"].VR == "IS" and by_type["IMAGE"].InstanceNumber == 3
    assert by_type["IMAGE"].PixelSpacing == [0.5, 0.25]
    assert by_type["PATIENT"].PatientID.startswith("NOID")
    assert "encoded as US, not IS" in fixes["binary", "SeriesNumber"]["reason"]
    assert "encoded as OB, not LO" in fixes["binary", "PatientID"]["reason"]


@pytest.mark.oracle
def test_bytes_outside_the_repertoire_never_reach_a_record(tmp_path: Path) -> None:
    """Latin-1 names without a Specific Character Set (old files), DEL, C1 controls under
    ISO_IR 100, Latin-1 under ISO_IR 192: Type 2 keys left empty, 1C keys left out."""
    latin = _one(0, tmp_path / "in", "latin", patient_name="MUELLER^JUERGEN",
                 SpecificCharacterSet=None, InstitutionName="KLINIK KOELN",
                 StudyDescription="SCHAEDEL", StudyID="KOELN1")
    _patch(latin, b"MUELLER^JUERGEN ", "Müller^Jürgen".encode("latin-1") + b"   ")
    _patch(latin, b"KLINIK KOELN", "Klinik Köln ".encode("latin-1"))
    _patch(latin, b"SCHAEDEL", "Schädel ".encode("latin-1"))
    _patch(latin, b"KOELN1", "KÖLN01".encode("latin-1"))  # a Type 1 key: derived
    controls = _one(1, tmp_path / "in", "controls", patient_name="DEL^X",
                    InstitutionName="C1 CHARS")
    _patch(controls, b"DEL^X ", b"DEL\x7fX ")
    _patch(controls, b"C1 CHARS", b"C1\x85CHARS")
    utf8 = _with_charset(_one(2, tmp_path / "in", "utf8", patient_name="MUELLER^X"),
                         b"ISO_IR 192")
    _patch(utf8, b"MUELLER^X ", "Müller^X  ".encode("latin-1"))
    before = {p: p.read_bytes() for p in (latin, controls, utf8)}
    report, fixes, dd = _master_checked(tmp_path / "in", tmp_path / "out")
    assert report.instances == 3 and not report.invalid
    for name, key, outcome in [("latin", "StudyID", "derived as for a missing key"),
                               ("latin", "PatientName", "left empty"),
                               ("latin", "StudyDescription", "left empty"),
                               ("latin", "InstitutionName", "left out"),
                               ("controls", "PatientName", "left empty"),
                               ("controls", "InstitutionName", "left out"),
                               ("utf8", "PatientName", "left empty")]:
        assert fixes[name, key]["reason"].endswith(outcome), (name, key)
    names = [str(r.PatientName) for r in dd.DirectoryRecordSequence if "PatientName" in r]
    assert sorted(names) == ["", "", ""]
    assert all(p.read_bytes() == data for p, data in before.items())  # files untouched


def test_a_patient_id_outside_the_repertoire_is_derived(tmp_path: Path) -> None:
    """An old file's "MÜLLER01" in Latin-1 without a Specific Character Set: the record gets
    a Patient ID derived from that value (the same for every file of the patient, issue 7:
    "a Type 1 key that cannot be normalized is derived as for a missing one"), reported; the
    file keeps its bytes, and the disc can still be made."""
    for i in range(2):
        path = make_ct(tmp_path / "in", f"{i}.dcm", patient_id="MUELLER01", instance=i + 1,
                       SpecificCharacterSet=None)
        _patch(path, b"MUELLER01 ", "MÜLLER01  ".encode("latin-1"))
    report, fixes, dd = _master_checked(tmp_path / "in", tmp_path / "out")
    assert report.instances == 2 and report.patients == 1
    patient = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    assert patient.PatientID.isascii() and "MÜLLER01" not in str(patient.PatientID)
    assert "default repertoire" in fixes["0", "PatientID"]["reason"]


ORIENTATIONS = {"zeros": [0, 0, 0, 0, 0, 0], "not_unit": [0.707, 0.707, 0, 0, 0, -1],
                "long": [1.1, 0, 0, 0, 1, 0], "skew": [1, 0, 0, 0.01, 1, 0],
                "oblique": ["0.7071", "0.7071", 0, 0, 0, -1], "axial": [1, 0, 0, 0, 1, 0]}


@pytest.mark.oracle
def test_image_orientation_must_be_two_orthogonal_unit_vectors(tmp_path: Path) -> None:
    for i, (name, value) in enumerate(ORIENTATIONS.items()):
        _one(i, tmp_path / "in", name, ImageOrientationPatient=value)
    report, fixes, dd = _master_checked(tmp_path / "in", tmp_path / "out")
    assert report.instances == len(ORIENTATIONS)
    kept = {tuple(r.ReferencedFileID) for r in dd.DirectoryRecordSequence
            if "ImageOrientationPatient" in r}
    assert len(kept) == 2
    for name in ("zeros", "not_unit", "long", "skew"):
        reason = fixes[name, "ImageOrientationPatient"]["reason"]
        assert "C.7.6.2.1.1" in reason and reason.endswith("left out")
    assert ("oblique", "ImageOrientationPatient") not in fixes


#: a record value changed as other tools' media have it: (bytes, changed to, key, whether
#: dciodvfy reports it as an error too)
RECORD_FAULTS = {
    "character set spelling": (b"ISO_IR 100", b"iso_ir 100", "SpecificCharacterSet", True),
    "character set unknown": (b"ISO_IR 100", b"ISO_IR 999", "SpecificCharacterSet", False),
    "binary VR": (b"\x20\x00\x11\x00IS\x02\x001 ", b"\x20\x00\x11\x00US\x02\x00\x01\x00",
                  "SeriesNumber", True),
    "DEL in a name": (b"DOE^JANE", b"DOE\x7fJANE", "PatientName", True),
    "orientation": (b"1.0\\0.0\\0.0\\0.0\\1.0\\0.0 ", b"1.0\\0.0\\0.0\\0.0\\0.0\\0.0 ",
                    "ImageOrientationPatient", True),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(RECORD_FAULTS))
def test_verify_flags_record_values(tmp_path: Path, case: str) -> None:
    old, new, key, oracle = RECORD_FAULTS[case]
    make_ct(tmp_path / "in", "a.dcm", patient_name="DOE^JANE")
    master([tmp_path / "in"], tmp_path / "out", Options(DVD), kind="folder")
    dicomdir = tmp_path / "out" / "DICOMDIR"
    _patch(dicomdir, old, new)
    result = verify(tmp_path / "out", DVD)
    assert {v.code for v in result.violations} == {"record-value"}
    assert all(key in v.message for v in result.violations)
    assert bool(dciodvfy_errors(dicomdir)) == oracle
