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


# -- what makes two objects, whatever the encodings ------------------------------------------


def _icon(ds: pydicom.Dataset, value: int) -> None:
    from pydicom.sequence import Sequence

    icon = pydicom.Dataset()
    icon.Rows = icon.Columns = 2
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated = icon.BitsStored = 8
    icon.HighBit, icon.PixelRepresentation = 7, 0
    icon.PixelData = bytes([value, 1, 2, 3])
    ds.IconImageSequence = Sequence([icon])


def _private(ds: pydicom.Dataset, vr: str, value: object) -> None:
    ds.add_new(0x00090010, "LO", "SAMENESS TEST")
    ds.add_new(0x00091001, vr, value)


def _high_bit(ds: pydicom.Dataset) -> None:
    pixels = bytearray(ds.PixelData)
    pixels[1] |= 0x80  # a bit above Bits Stored (12) of the first pixel
    ds.PixelData = bytes(pixels)


#: (what the first file has, what the second has instead): different objects
DIFFERENCES = {
    "bits above Bits Stored": (lambda ds: None, _high_bit),
    "icon pixels": (lambda ds: _icon(ds, 1), lambda ds: _icon(ds, 2)),
    "trailing NULs in OB": (lambda ds: _private(ds, "OB", b"ab"),
                            lambda ds: _private(ds, "OB", b"ab\0\0")),
    "bytes after the last frame": (lambda ds: None,
                                   lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\1\2")),
    "DS 1 and 1.0": (lambda ds: setattr(ds, "SliceThickness", "1"),
                     lambda ds: setattr(ds, "SliceThickness", "1.0")),
    "FD 0.0 and -0.0": (lambda ds: ds.add_new(0x00189087, "FD", 0.0),
                        lambda ds: ds.add_new(0x00189087, "FD", -0.0)),
}


def _edited(src: Path, dst: Path, edit) -> Path:
    ds = pydicom.dcmread(src)
    edit(ds)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize("case", sorted(DIFFERENCES))
def test_differences_in_any_encoding_make_two_objects(tmp_path: Path, case: str) -> None:
    first, second = DIFFERENCES[case]
    src = make_ct(tmp_path, "src.dcm", sop_uid=UID)
    a = _edited(src, tmp_path / "a.dcm", first)
    b = _edited(src, tmp_path / "b.dcm", second)
    copies = {"be": enc.big_endian, "implicit": enc.implicit, "deflated": enc.deflated}
    for kind, encode in copies.items():
        assert sameness.same_object(str(a), str(encode(a, tmp_path / kind / "a.dcm"))), kind
        other = encode(b, tmp_path / kind / "b.dcm")
        assert not sameness.same_object(str(a), str(other)), (case, kind)
    assert not sameness.same_object(str(a), str(b)), case


def test_planar_configuration_only_orders_the_samples(tmp_path: Path) -> None:
    """One RGB image by pixel and by plane in one transfer syntax: the same values."""
    import numpy as np

    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    src = make_ct(tmp_path, "rgb.dcm", sop_uid=UID, rows=4, SamplesPerPixel=3,
                  PhotometricInterpretation="RGB", PlanarConfiguration=0, BitsAllocated=8,
                  BitsStored=8, HighBit=7)
    by_pixel = _edited(src, tmp_path / "pixel.dcm",
                       lambda ds: setattr(ds, "PixelData", rgb.tobytes()))

    def by_plane(ds: pydicom.Dataset) -> None:
        ds.PlanarConfiguration = 1
        ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()

    planes = _edited(src, tmp_path / "plane.dcm", by_plane)
    assert sameness.same_object(str(by_pixel), str(planes))
    assert sameness.same_object(str(enc.big_endian(planes, tmp_path / "be.dcm")), str(by_pixel))
    swapped = rgb.copy()
    swapped[0, 0] = swapped[0, 0, ::-1]  # one pixel's samples in another order
    other = _edited(src, tmp_path / "other.dcm",
                    lambda ds: setattr(ds, "PixelData", swapped.tobytes()))
    assert not sameness.same_object(str(other), str(planes))


def test_other_word_values_are_compared_in_their_byte_order(tmp_path: Path) -> None:
    """A palette's OW table words (not pixel data) in big endian are the same numbers."""
    import numpy as np

    words = np.arange(0x0102, 0x0102 + 16, dtype="<u2").tobytes()
    src = make_ct(tmp_path, "src.dcm", sop_uid=UID)
    a = _edited(src, tmp_path / "a.dcm", lambda ds: _private(ds, "OW", words))
    big = enc.big_endian(a, tmp_path / "a_be.dcm")
    raw = big.read_bytes()
    assert np.frombuffer(words, "<u2").astype(">u2").tobytes() in raw  # really swapped
    assert sameness.same_object(str(a), str(big))
    changed = bytearray(words)
    changed[0:2] = changed[1::-1]  # one word with its bytes in the other order
    b = _edited(src, tmp_path / "b.dcm", lambda ds: _private(ds, "OW", bytes(changed)))
    assert not sameness.same_object(str(b), str(big))


def test_deflated_copies_are_compared_in_flat_memory(tmp_path: Path) -> None:
    """A 32 MB image against its deflated copy: memory stays near one block, not the object."""
    src = make_ct(tmp_path, "big.dcm", sop_uid=UID, rows=4096)
    deflated = enc.deflated(src, tmp_path / "big_deflated.dcm")
    code = ("import resource, sys\n"
            "from mastering import sameness\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "same = sameness.same_object(sys.argv[1], sys.argv[2])\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(same, (after - before) // 1024)\n")
    run = subprocess.run([sys.executable, "-c", code, str(src), str(deflated)],
                         capture_output=True, text=True, check=True)
    same, grown_mb = run.stdout.split()
    assert same == "True"
    assert int(grown_mb) < 16, f"comparing grew the process by {grown_mb} MB"


# -- --on-conflict newest: which variant is newest -------------------------------------------


def _variant(folder: Path, name: str, mtime: float, **created) -> Path:
    path = make_ct(folder, f"{name}.dcm", sop_uid=UID, patient_name=f"DOE^{name.upper()}",
                   **created)
    os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize(("older", "newer"), [
    # 10:00 at UTC+1 is 09:00 UTC: before 09:30 UTC
    (dict(InstanceCreationDate="20250101", InstanceCreationTime="100000",
          TimezoneOffsetFromUTC="+0100"),
     dict(InstanceCreationDate="20250101", InstanceCreationTime="093000",
          TimezoneOffsetFromUTC="+0000")),
    # a file with a creation date beats one without, whatever the file times
    ({}, dict(InstanceCreationDate="20250101", InstanceCreationTime="000000")),
    # ACR-NEMA forms have one meaning
    (dict(InstanceCreationDate="20240101", InstanceCreationTime="120000"),
     dict(InstanceCreationDate="2025.01.01", InstanceCreationTime="10:00:00")),
])
def test_newest_compares_creation_moments(tmp_path: Path, older: dict, newer: dict) -> None:
    old = _variant(tmp_path / "a", "old", 2_000_000_000, **older)  # the newer file
    new = _variant(tmp_path / "b", "new", 1_000_000_000, **newer)
    report = master([old, new], tmp_path / "o.iso", Options(CD, on_conflict="newest"))
    assert report.conflicts[0]["kept"] == str(new)
    assert [s["path"] for s in report.skipped] == [str(old)]


@pytest.mark.parametrize("skip", [False, True])
def test_newest_refuses_a_tie(tmp_path: Path, skip: bool) -> None:
    created = dict(InstanceCreationDate="20250101", InstanceCreationTime="100000")
    a = _variant(tmp_path / "a", "a", 1_500_000_000, **created)
    b = _variant(tmp_path / "b", "b", 1_500_000_000, **created)
    with pytest.raises(MasteringError) as err:
        master([a, b], tmp_path / "o.iso", Options(CD, on_conflict="newest",
                                                    skip_invalid=skip))
    assert err.value.exit_code == 3 and not (tmp_path / "o.iso").exists()
    (conflict,) = err.value.report.conflicts
    assert conflict["kept"] is None and conflict["tie"]
    assert all("cannot choose" in i["reason"] for i in err.value.report.invalid)
    assert "cannot tell which is newest" in err.value.report.error
