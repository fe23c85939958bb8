"""Shared fixtures: sample data (pydicom's bundled files, generated data sets) and the external
oracles (dciodvfy, dcmdump, xorriso, isoinfo) that judge our output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from mastering import profiles

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def sample(name: str) -> Path:
    return Path(get_testdata_file(name))


@pytest.fixture
def cd_profile() -> profiles.Profile:
    return profiles.load("STD-GEN-CD")


def make_ct(folder: Path, name: str, *, patient_id: str = "PID1", patient_name: str = "DOE^JANE",
            study_uid: str | None = None, series_uid: str | None = None, instance: int | None = 1,
            implicit: bool = False, rows: int = 8, value: int = 0, **extra) -> Path:
    """A small, valid CT Image written as a Part 10 file; extra keywords override/add."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = extra.pop("sop_uid", None) or generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate, ds.StudyTime, ds.Modality = "20240101", "120000", "CT"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID = study_uid or "1.2.3.4.1"
    ds.SeriesInstanceUID = series_uid or "1.2.3.4.1.1"
    ds.StudyID, ds.SeriesNumber = "1", 1
    if instance is not None:
        ds.InstanceNumber = instance
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = "1.2.3.4.9", ""
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, instance or 0], [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.PixelSpacing = 1, [1, 1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = 0, 1, 120
    ds.AcquisitionNumber = 1
    ds.PixelData = bytes([value & 0xFF, 0]) * rows * rows
    for key, val in extra.items():
        if val is None:
            delattr(ds, key) if key in ds else None
        else:
            setattr(ds, key, val)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def lower_case_copy(src: Path, dst: Path) -> Path:
    """A copy of a medium with every name in lower case, as Linux mounts ISO 9660 volumes."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src).as_posix().lower()
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return dst


def pycdlib_iso(folder: Path, iso: Path, vol_ident: str, level: int = 1) -> Path:
    """An ISO 9660 image of folder made directly with pycdlib, not with the project's writer
    (PS3.12 F.1.2.1: a File ID becomes '/C1/.../CN.;1')."""
    import io

    import pycdlib

    image = pycdlib.PyCdlib()
    image.new(interchange_level=level, vol_ident=vol_ident)
    for path in sorted(folder.rglob("*")):
        rel = "/" + path.relative_to(folder).as_posix()
        if path.is_dir():
            image.add_directory(rel)
        else:
            data = path.read_bytes()
            name = rel if "." in path.name else rel + "."
            image.add_fp(io.BytesIO(data), len(data), name + ";1")
    image.write(str(iso))
    image.close()
    return iso


def ct_series(folder: Path, series: int, per: int, rows: int = 64, first: int = 0,
              **extra) -> Path:
    """series x per small CT files, one folder and Series Instance UID per series (numbered
    from first)."""
    for s in range(first, first + series):
        for i in range(1, per + 1):
            make_ct(folder / f"s{s}", f"{i}.dcm", rows=rows, instance=i,
                    series_uid=f"1.2.3.4.1.{s + 10}", SeriesNumber=s + 1, **extra)
    return folder


# -- oracles --------------------------------------------------------------------------------


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # the README's test command installs it; missing means a broken setup
        pytest.fail(f"{tool} is not installed: run scripts/test (it installs the Debian tools)")
    return path


def dciodvfy_raw_errors(path: Path) -> list[str]:
    """dciodvfy (dicom3tools) error lines as it prints them; warnings are not errors."""
    res = subprocess.run([need("dciodvfy"), str(path)], capture_output=True)
    # dciodvfy quotes values in their own character set (ISO 8859-5 names, say): not UTF-8
    lines = (res.stdout + res.stderr).decode("latin-1").splitlines()
    return [line for line in lines if line.startswith("Error")]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors, less its three documented departures from PS3.5 (tests/oracles.py:
    lengths counted in bytes, GB18030 and ISO_IR 13 not decoded, the leap second)."""
    from .oracles import errors

    return errors(dciodvfy_raw_errors(path), path)


def dcmdump(path: Path) -> str:
    res = subprocess.run([need("dcmdump"), "-q", str(path)], capture_output=True, text=True,
                         errors="replace")  # values in their own character sets
    assert res.returncode == 0, f"dcmdump failed on {path}: {res.stderr}"
    assert "E:" not in res.stderr, res.stderr
    return res.stdout


def extract_iso(iso: Path, dest: Path) -> Path:
    """Extract an image with xorriso: if xorriso cannot read it, the test fails."""
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([need("xorriso"), "-osirrox", "on", "-indev", str(iso),
                          "-extract", "/", str(dest)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return dest


def isoinfo_listing(iso: Path) -> list[tuple[str, int]]:
    """(ISO 9660 path with version, first extent) of every file, from isoinfo -l."""
    res = subprocess.run([need("isoinfo"), "-l", "-i", str(iso)], capture_output=True, text=True,
                         check=True)
    out, folder = [], "/"
    for line in res.stdout.splitlines():
        if line.startswith("Directory listing of "):
            folder = line[len("Directory listing of "):].strip()
        elif line.startswith("-"):
            extent = int(line.split("[")[1].split()[0])
            name = line.split("]", 1)[1].strip()
            out.append((folder + name, extent))
    return out


def load(path: Path) -> pydicom.FileDataset:
    return pydicom.dcmread(path)


@pytest.fixture
def streamed(monkeypatch):
    """Every run with enough files streams (mastering.earlyiso); counts the runs whose early
    layout was used."""
    from mastering import directio, earlyiso

    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
    monkeypatch.setattr(earlyiso, "RESERVE_SHARE", 1e9)
    monkeypatch.setattr(directio, "WINDOW", 3 * 4096)  # bodies and zeros across windows
    monkeypatch.setattr(directio, "_ZEROS", bytes(3 * 4096))
    used: list[int] = []
    real = earlyiso.EarlyImage.placement

    def placement(self, entries):
        placed = real(self, entries)
        used.append(len(placed or ()))
        return placed

    monkeypatch.setattr(earlyiso.EarlyImage, "placement", placement)
    return used


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    """A folder standing for a stick's root (in-place writes), with a file of the owner's."""
    root = tmp_path / "stick"
    root.mkdir()
    (root / "NOTES.TXT").write_text("not ours\n")
    return root
