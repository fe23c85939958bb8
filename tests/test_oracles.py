"""The dciodvfy allow-list (tests/oracles.py) lets through exactly its three departures from
PS3.5, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from mastering import profiles
from mastering.pipeline import Options, master
from mastering.verify import verify

from . import oracles
from .conftest import dciodvfy_errors, dciodvfy_raw_errors, make_ct

USB = profiles.load("STD-GEN-USB-JPEG")


def _one(folder: Path, index: int, **kw) -> Path:
    return make_ct(folder, f"{index}.dcm", patient_id=f"P{index}", study_uid=f"1.2.3.6.{index}",
                   series_uid=f"1.2.3.6.{index}.1", **kw)


@pytest.mark.oracle
def test_standard_values_dciodvfy_rejects_are_allowed(tmp_path: Path) -> None:
    """Records with characters of more than one byte, JIS X 0201 Katakana, GB18030 and a
    leap second: valid by PS3.5, kept in the records, errors to dciodvfy, allowed here."""
    inputs = tmp_path / "in"
    _one(inputs, 1, SpecificCharacterSet="ISO_IR 192", patient_name="\u00c4" * 40,
         StudyDescription="\u00fc" * 60, AccessionNumber="\u00f6" * 16)
    _one(inputs, 2, SpecificCharacterSet="GB18030", patient_name="\u738b" * 30,
         StudyDescription="\u4e2d" * 50, AccessionNumber="\u6587" * 16)
    _one(inputs, 3, SpecificCharacterSet="GBK", patient_name="\u738b" * 20)
    _one(inputs, 4, SpecificCharacterSet="ISO_IR 13", patient_name="\uff71" * 40,
         AccessionNumber="\uff73" * 16)
    _one(inputs, 5, StudyTime="235960", SeriesTime="235960.5")
    report = master([inputs], tmp_path / "out", Options(USB, workers=1), kind="folder")
    assert report.instances == 5 and not report.filled  # every value kept as it is
    dicomdir = tmp_path / "out" / "DICOMDIR"
    assert verify(tmp_path / "out", USB).ok
    raw = dciodvfy_raw_errors(dicomdir)
    for pattern in (oracles.LENGTH, oracles.REPERTOIRE, oracles.LEAP_SECOND):
        assert any(pattern.fullmatch(line) for line in raw), pattern.pattern
    assert oracles.SUMMARY in raw
    assert {line for line in raw if line != oracles.SUMMARY} <= {
        line for line in raw if any(p.fullmatch(line) for p in (
            oracles.LENGTH, oracles.REPERTOIRE, oracles.LEAP_SECOND))}
    assert dciodvfy_errors(dicomdir) == []
    names = {str(r.PatientName) for r in pydicom.dcmread(dicomdir).DirectoryRecordSequence
             if "PatientName" in r}
    assert "\u00c4" * 40 in names and "\u738b" * 30 in names and "\uff71" * 40 in names


def _patched(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    path.write_bytes(data.replace(old, new))
    return path


#: files where dciodvfy's message has the same form as an allowed one but is a real error
CONTROLS = {
    "ascii name of 70 characters": lambda d: make_ct(d, "a.dcm", patient_name="A" * 70),
    "UTF-8 name of 70 characters": lambda d: make_ct(
        d, "b.dcm", SpecificCharacterSet="ISO_IR 192", patient_name="\u00c4" * 70),
    "ISO_IR 13 byte outside JIS X 0201": lambda d: _patched(make_ct(
        d, "c.dcm", SpecificCharacterSet="ISO_IR 13", patient_name="ABCD"), b"ABCD",
        b"\xb1\xe0\xb1\xe0"),
    "GB18030 byte that is no character": lambda d: _patched(make_ct(
        d, "d.dcm", SpecificCharacterSet="GB18030", patient_name="ABCD"), b"ABCD",
        b"\xd6\xd0\xff\xff"),
    "minute 60": lambda d: make_ct(d, "e.dcm", StudyTime="236000"),
    "hour 24 with second 60": lambda d: make_ct(d, "f.dcm", StudyTime="245960"),
    "missing Type 1C": lambda d: make_ct(d, "g.dcm", Modality=None),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(CONTROLS))
def test_nothing_else_is_allowed(tmp_path: Path, case: str) -> None:
    path = CONTROLS[case](tmp_path)
    raw = dciodvfy_raw_errors(path)
    assert raw, "dciodvfy reports nothing: not a control"
    assert dciodvfy_errors(path) == raw, case  # every line kept, the summary line included
