"""The command line: exit codes, --json, --report, profiles; run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_ct, sample


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mastering", *args], capture_output=True,
                          text=True, env=env)


def test_profiles_lists_every_file() -> None:
    res = run("profiles", "--json")
    assert res.returncode == 0
    ids = {p["id"] for p in json.loads(res.stdout)}
    assert {"STD-GEN-CD", "STD-GEN-DVD-JPEG", "STD-GEN-DVD-J2K", "STD-GEN-USB-JPEG",
            "STD-GEN-USB-J2K", "STD-GEN-BD"} <= ids
    assert run("profiles").returncode == 0


def test_iso_json_and_report(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "a.iso"), "--json",
              "--report", str(tmp_path / "r.json"), "--fileset-id", "CLI_TEST")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] and out["instances"] == 1
    assert out["volumes"][0]["fileset_id"] == "CLI_TEST"
    assert json.loads((tmp_path / "r.json").read_text()) == out


def test_volume_id_option(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "a.iso"), "--fileset-id", "FS",
              "--volume-id", "HOSPITAL_DISC_0042")
    assert res.returncode == 0, res.stderr
    info = subprocess.run(["isoinfo", "-d", "-i", str(tmp_path / "a.iso")], capture_output=True,
                          text=True, check=True).stdout
    assert "Volume id: HOSPITAL_DISC_0042" in info
    assert run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "b.iso"), "--volume-id",
               "lower").returncode == 2


def test_human_summary(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "a.iso"))
    assert res.returncode == 0
    assert "1 patient(s), 1 study(ies), 1 series, 1 instance(s)" in res.stdout


@pytest.mark.parametrize("case,code", [("invalid", 3), ("nofit", 4), ("usage", 2),
                                       ("badid", 2), ("empty", 3), ("missing", 6)])
def test_exit_codes(tmp_path: Path, case: str, code: int) -> None:
    src = tmp_path / "in"
    make_ct(src, "a.dcm", rows=64)
    out = str(tmp_path / "o.iso")
    args = {
        "invalid": ["iso", str(sample("MR_truncated.dcm")), str(src), "-o", out],
        "nofit": ["iso", str(src), "-o", out, "--capacity", "70000", "--no-span"],
        "usage": ["iso", str(src), "-o", out, "--profile", "NO-SUCH-PROFILE"],
        "badid": ["iso", str(src), "-o", out, "--fileset-id", "lower case"],
        "empty": ["iso", str(sample("README.txt")), "-o", out],
        "missing": ["iso", str(tmp_path / "nothing-here"), "-o", out],
    }[case]
    res = run(*args)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert not Path(out).exists()


def test_invalid_run_names_file_and_reason(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    res = run("iso", str(tmp_path / "in"), str(sample("MR_truncated.dcm")), "-o",
              str(tmp_path / "o.iso"), "--json")
    assert res.returncode == 3
    report = json.loads(res.stdout)
    (bad,) = report["invalid"]
    assert bad["path"].endswith("MR_truncated.dcm") and "truncated" in bad["reason"]
    res = run("iso", str(tmp_path / "in"), str(sample("MR_truncated.dcm")), "-o",
              str(tmp_path / "o.iso"), "--skip-invalid")
    assert res.returncode == 0 and "MR_truncated.dcm" in res.stdout.replace("\n", "")


def test_fileset_command(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    res = run("fileset", str(tmp_path / "in"), "-o", str(tmp_path / "usb"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "usb" / "DICOMDIR").is_file()


def test_no_patient_data_in_output_or_logs(tmp_path: Path) -> None:
    """Names never reach the terminal: not in the summary, not through pydicom's warnings."""
    make_ct(tmp_path / "in", "a.dcm", patient_name="SECRET^PATIENTNAME", patient_id="SECRETID")
    make_ct(tmp_path / "in", "b.dcm", patient_name="SECRET^PATIENTNAME", implicit=True,
            instance=2, PatientID="SECRETID")
    bad = tmp_path / "in" / "c.dcm"
    bad.write_bytes((tmp_path / "in" / "a.dcm").read_bytes()[:-10])
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "a.iso"), "--skip-invalid")
    assert res.returncode == 0, res.stderr
    assert "SECRET" not in res.stdout + res.stderr
