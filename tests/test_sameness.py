"""The same object in two encodings merges; different objects with one UID follow
--on-conflict."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import profiles, sameness
from mastering.pipeline import MasteringError, Options, master

from . import encodings as enc
from .conftest import dciodvfy_errors, extract_iso, make_ct

CD = profiles.load("STD-GEN-CD")
UID = "1.2.826.0.1.3680043.2.1.77"


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("enc")
    src = enc.with_noise(make_ct(d / "src", "le.dcm", rows=32, sop_uid=UID))
    return {"le": src, "be": enc.big_endian(src, d / "be" / "x.dcm"),
            "implicit": enc.implicit(src, d / "imp" / "x.dcm"),
            "deflated": enc.deflated(src, d / "dfl" / "x.dcm"),
            "jpeg_ls": enc.jpeg_ls(src, d / "jls" / "x.dcm"),
            "jpeg_lossless": enc.jpeg_lossless(src, d / "jpl" / "x.dcm"),
            "near_lossless": enc.jpeg_ls(src, d / "near" / "x.dcm", near=3)}


@pytest.mark.parametrize("kind", ["be", "implicit", "deflated", "jpeg_ls", "jpeg_lossless"])
def test_every_lossless_encoding_is_the_same_object(variants, kind: str) -> None:
    assert sameness.same_object(str(variants["le"]), str(variants[kind]))
    assert sameness.same_object(str(variants["be"]), str(variants[kind]))


def test_trailing_padding_means_nothing(variants, tmp_path: Path) -> None:
    ds = pydicom.dcmread(variants["le"])
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 256)
    ds.save_as(tmp_path / "padded.dcm")
    assert sameness.same_object(str(variants["be"]), str(tmp_path / "padded.dcm"))


def test_differences_are_found(variants, tmp_path: Path) -> None:
    assert not sameness.same_object(str(variants["le"]), str(variants["near_lossless"]))
    ds = pydicom.dcmread(variants["le"])
    pixels = bytearray(ds.PixelData)
    pixels[100] ^= 1
    ds.PixelData = bytes(pixels)
    ds.save_as(tmp_path / "pixel.dcm")
    for other in ("le", "be", "jpeg_ls"):
        assert not sameness.same_object(str(variants[other]), str(tmp_path / "pixel.dcm"))
    ds = pydicom.dcmread(variants["le"])
    ds.PatientName = "OTHER^NAME"
    enc.big_endian(ds.save_as(tmp_path / "name.dcm") or tmp_path / "name.dcm",
                   tmp_path / "name_be.dcm")
    assert not sameness.same_object(str(variants["le"]), str(tmp_path / "name_be.dcm"))


@pytest.mark.oracle
def test_two_encodings_of_one_image_merge_and_the_ready_copy_is_kept(variants,
                                                                      tmp_path: Path) -> None:
    """A big endian copy next to the original: one instance, the copy that needs no
    conversion goes onto the disc byte for byte, the other is listed as merged."""
    inputs = [variants["be"], variants["implicit"], variants["le"], variants["jpeg_ls"]]
    report = master(inputs, tmp_path / "o.iso", Options(CD, workers=1))
    assert report.instances == 1 and not report.invalid and not report.conflicts
    assert report.duplicates and {d["kept"] for d in report.duplicates} == {str(variants["le"])}
    root = extract_iso(tmp_path / "o.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    (rec,) = list(FileSet(root / "DICOMDIR"))
    assert Path(rec.path).read_bytes() == variants["le"].read_bytes()


def _two_objects(folder: Path) -> tuple[Path, Path]:
    """A re-export with corrected headers next to the old disc's copy: one UID, two objects."""
    old = make_ct(folder / "old", "a.dcm", sop_uid=UID, patient_name="DOE^JON",
                  InstanceCreationDate="20200101", InstanceCreationTime="101010")
    new = make_ct(folder / "new", "a.dcm", sop_uid=UID, patient_name="DOE^JOHN",
                  InstanceCreationDate="20240202", InstanceCreationTime="090000")
    os.utime(old, (time.time(), time.time()))  # the older object is the newer file
    return old, new


def test_on_conflict_refuse_is_the_default(tmp_path: Path) -> None:
    old, new = _two_objects(tmp_path)
    for skip in (False, True):
        with pytest.raises(MasteringError) as err:
            master([old, new], tmp_path / "o.iso", Options(CD, skip_invalid=skip))
        assert err.value.exit_code == 3
        (conflict,) = err.value.report.conflicts
        assert conflict["files"] == [str(old), str(new)] and conflict["kept"] is None


@pytest.mark.oracle
def test_on_conflict_newest_keeps_the_latest_creation(tmp_path: Path) -> None:
    old, new = _two_objects(tmp_path)
    report = master([old, new], tmp_path / "o.iso", Options(CD, on_conflict="newest"))
    assert report.instances == 1
    assert report.conflicts == [{"uid": UID, "policy": "newest", "files": [str(old), str(new)],
                                 "kept": str(new)}]
    assert [s["path"] for s in report.skipped] == [str(old)]
    root = extract_iso(tmp_path / "o.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    (rec,) = list(FileSet(root / "DICOMDIR"))
    assert Path(rec.path).read_bytes() == new.read_bytes()


def test_on_conflict_newest_without_creation_time_takes_the_latest_file(tmp_path: Path) -> None:
    a = make_ct(tmp_path / "a", "x.dcm", sop_uid=UID, value=1)
    b = make_ct(tmp_path / "b", "x.dcm", sop_uid=UID, value=2)
    os.utime(a, (1_000_000, 1_000_000))
    report = master([a, b], tmp_path / "o.iso", Options(CD, on_conflict="newest"))
    assert report.conflicts[0]["kept"] == str(b)


def test_on_conflict_skip_leaves_all_out_and_says_so(tmp_path: Path) -> None:
    old, new = _two_objects(tmp_path)
    other = make_ct(tmp_path / "other", "b.dcm", instance=2)
    report = master([old, new, other], tmp_path / "o.iso", Options(CD, on_conflict="skip"))
    assert report.instances == 1 and not report.invalid
    assert {s["path"] for s in report.skipped} == {str(old), str(new)}
    assert all("--on-conflict skip" in s["reason"] for s in report.skipped)


def test_cli_on_conflict(tmp_path: Path) -> None:
    old, new = _two_objects(tmp_path)
    run = subprocess.run([sys.executable, "-m", "mastering", "iso", str(old), str(new), "-o",
                          str(tmp_path / "o.iso"), "--on-conflict", "newest"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"kept {new}" in run.stdout.replace("\n", "")
