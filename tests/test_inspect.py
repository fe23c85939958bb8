"""inspect is a tolerant File-set Reader; verify stays strict."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from mastering import profiles
from mastering.pipeline import Options, master
from mastering.verify import verify

from .conftest import ct_series, dcmdump

CD = profiles.load("STD-GEN-CD")


def _inspect(medium: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mastering", "inspect", str(medium), "--json"],
                          capture_output=True, text=True)


@pytest.fixture
def fileset(tmp_path: Path) -> Path:
    for p in range(2):  # two patients: two root records
        ct_series(tmp_path / "in" / f"p{p}", 1, 2, rows=8, patient_id=f"PID{p}",
                  study_uid=f"1.2.3.9.{p}", first=p)
    master([tmp_path / "in"], tmp_path / "fs", Options(profiles.load("STD-GEN-USB-JPEG")),
           kind="folder")
    return tmp_path / "fs"


def _gdcmgendir_last_offset(dicomdir: Path) -> None:
    """(0004,1202) pointing at the last record of the sequence, not the last root record,
    as gdcmgendir writes it."""
    ds = pydicom.dcmread(dicomdir)
    last_item = ds.DirectoryRecordSequence[-1].seq_item_tell
    data = bytearray(dicomdir.read_bytes())
    at = data.index(b"\x04\x00\x02\x12UL\x04\x00") + 8
    data[at:at + 4] = struct.pack("<I", last_item)
    dicomdir.write_bytes(bytes(data))


@pytest.mark.oracle
def test_wrong_last_root_offset_is_read_and_reported(fileset: Path, tmp_path: Path) -> None:
    _gdcmgendir_last_offset(fileset / "DICOMDIR")
    dcmdump(fileset / "DICOMDIR")
    run = _inspect(fileset)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["counts"]["instances"] == 4 and summary["complete"]
    assert any("(0004,1202)" in f["fault"] and f["harmless"] for f in summary["faults"])
    human = subprocess.run([sys.executable, "-m", "mastering", "inspect", str(fileset)],
                           capture_output=True, text=True)
    assert human.returncode == 0 and "(0004,1202)" in human.stderr
    assert {v.code for v in verify(fileset, profiles.load("STD-GEN-USB-JPEG")).violations} \
        == {"offset"}
    again = master([fileset / "DICOMDIR"], tmp_path / "again.iso", Options(CD))
    assert again.instances == 4  # intake reads the whole File-set too


def test_truncated_iso_fails_inspect_and_verify(tmp_path: Path) -> None:
    ct_series(tmp_path / "in", 2, 3, rows=64)
    master([tmp_path / "in"], tmp_path / "o.iso", Options(CD))
    data = (tmp_path / "o.iso").read_bytes()
    (tmp_path / "cut.iso").write_bytes(data[: len(data) - 6 * 2048])
    run = _inspect(tmp_path / "cut.iso")
    assert run.returncode == 5, run.stdout
    summary = json.loads(run.stdout)
    assert not summary["complete"] and any("truncated" in f["fault"] for f in summary["faults"])
    result = verify(tmp_path / "cut.iso", CD)
    assert "medium" in {v.code for v in result.violations}
    assert _inspect(tmp_path / "o.iso").returncode == 0


def _verify_cli(medium: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mastering", "verify", str(medium),
                           "--profile", "STD-GEN-USB-JPEG", "--json"],
                          capture_output=True, text=True)


@pytest.mark.parametrize("element", [b"\x10\x00\x10\x00PN", b"\x04\x00\x00\x14UL",
                                     b"\x04\x00\x00\x15CS", b"\x04\x00\x11\x15UI"])
def test_a_corrupt_vr_in_a_record_is_a_fault_not_a_crash(fileset: Path,
                                                         element: bytes) -> None:
    """Patient's Name, the next-record offset, the File ID, the SOP Instance UID: a VR byte
    that is no VR. Read with the dictionary's VR and reported (exit 0: nothing lost), or,
    where pydicom took the element's length another way and records were lost, reported
    with exit 5; verify fails the medium. Never a traceback."""
    dicomdir = fileset / "DICOMDIR"
    data = dicomdir.read_bytes()
    at = data.index(element) + 4
    dicomdir.write_bytes(data[:at] + b"Q\x01" + data[at + 2:])
    run = _inspect(fileset)
    assert run.returncode in (0, 5) and not run.stderr, run.stderr
    summary = json.loads(run.stdout)
    assert summary["faults"] and summary["complete"] == (run.returncode == 0)
    tag = f"({element[1]:02X}{element[0]:02X},{element[3]:02X}{element[2]:02X})"
    if run.returncode == 0:
        assert summary["counts"]["instances"] == 4
        assert any(tag in f["fault"] and "'Q\\x01'" in f["fault"] for f in summary["faults"])
    checked = _verify_cli(fileset)
    assert checked.returncode == 5 and not checked.stderr, checked.stderr
    assert json.loads(checked.stdout)["violations"]


@pytest.mark.parametrize("rtype", [b"STUDY", b"PATIENT"])
def test_a_corrupt_record_type_loses_its_subtree_loudly(fileset: Path, rtype: bytes) -> None:
    dicomdir = fileset / "DICOMDIR"
    data = dicomdir.read_bytes()
    at = data.index(rtype)
    dicomdir.write_bytes(data[:at] + rtype[:2] + b"\x02" + rtype[3:] + data[at + len(rtype):])
    run = _inspect(fileset)
    assert run.returncode == 5, run.stdout
    summary = json.loads(run.stdout)
    assert not summary["complete"] and summary["counts"]["instances"] == 2
    (fault,) = [f for f in summary["faults"] if "Table F.4-1" in f["fault"]]
    assert "2 referenced file(s)" in fault["fault"] and not fault["harmless"]
    checked = _verify_cli(fileset)
    assert checked.returncode == 5
    assert "hierarchy" in {v["code"] for v in json.loads(checked.stdout)["violations"]}
