"""An ISO 9660 image as input: read in place with pycdlib, exactly as a folder is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import content, intake, isosource, profiles
from mastering.pipeline import MasteringError, Options, master
from mastering.verify import verify

from . import encodings as enc
from .conftest import ct_series, dciodvfy_errors, dcmdump, extract_iso, make_ct, need, pycdlib_iso

CD = profiles.load("STD-GEN-CD")


def _uids(root: Path) -> dict[str, bytes]:
    return {r.ReferencedSOPInstanceUIDInFile: Path(r.path).read_bytes()
            for r in FileSet(root / "DICOMDIR")}


@pytest.fixture(scope="module")
def old_cd(tmp_path_factory) -> Path:
    """A patient CD image made by this program (files named by File IDs, a DICOMDIR)."""
    tmp = tmp_path_factory.mktemp("oldcd")
    ct_series(tmp / "in", 2, 3, rows=16)
    master([tmp / "in"], tmp / "old-cd.iso", Options(CD, fileset_id="OLD"))
    return tmp / "old-cd.iso"


@pytest.mark.oracle
def test_reburn_a_disc_image(old_cd: Path, tmp_path: Path) -> None:
    report = master([old_cd], tmp_path / "new.iso", Options(CD, verify=True))
    assert report.instances == 6 and not report.invalid and not report.ignored
    assert report.conversions == {"copy": 6}
    paths = [i.path for i in intake.scan([old_cd], CD, workers=1).instances]
    assert len(paths) == 6 and all(p.startswith(f"{old_cd}/dicom/pt") and ";" not in p
                                   for p in paths)  # as a Linux mount shows them
    old = _uids(extract_iso(old_cd, tmp_path / "a"))
    new_root = extract_iso(tmp_path / "new.iso", tmp_path / "b")
    assert _uids(new_root) == old  # every instance once, byte for byte
    assert dciodvfy_errors(new_root / "DICOMDIR") == []
    dcmdump(new_root / "DICOMDIR")
    assert verify(tmp_path / "new.iso", CD).ok


def test_members_are_ranges_of_the_image(old_cd: Path) -> None:
    """Copies come straight from the image file (copy_file_range), not a staged copy."""
    res = intake.scan([old_cd], CD, workers=1)
    assert len(res.indexes) == 1 and len(res.instances) == 6
    inst = res.instances[0]
    assert not Path(inst.path).exists()
    member = isosource.locate(inst.path)
    assert member is not None and member.image == str(old_cd)
    from mastering.plan import FileEntry

    (part,) = content.segments(FileEntry(inst, "copy", inst.size))
    assert part.path == str(old_cd) and part.offset == member.offset and part.offset % 2048 == 0
    with open(old_cd, "rb") as fh, isosource.open_any(inst.path) as member_fh:
        fh.seek(part.offset)
        assert fh.read(part.length) == member_fh.read()


@pytest.mark.oracle
def test_other_tools_images_with_conversions(tmp_path: Path) -> None:
    """pycdlib (plain ISO 9660) and xorriso (Rock Ridge) images of a folder with files that
    need converting: implicit VR (streamed from the image), big endian and JPEG-LS
    (transcoded reading from the image), a non-DICOM file, a DICOMDIR-less layout."""
    src = tmp_path / "src"
    folder = tmp_path / "folder"
    make_ct(folder / "CT", "IMPLICIT", implicit=True, instance=1)
    enc.big_endian(make_ct(src, "b.dcm", instance=2), folder / "CT" / "BIGEND")
    enc.jpeg_ls(make_ct(src, "j.dcm", instance=3), folder / "CT" / "JPEGLS")
    (folder / "README.TXT").write_text("patient disc\n")
    images = {"pycdlib": pycdlib_iso(folder, tmp_path / "p.iso", "PLAIN")}
    res = subprocess.run([need("xorriso"), "-as", "mkisofs", "-quiet", "-R", "-o",
                          str(tmp_path / "x.iso"), str(folder)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    images["xorriso"] = tmp_path / "x.iso"
    shown = {"pycdlib": "ct/implicit", "xorriso": "CT/IMPLICIT"}  # ISO 9660 lower / RR names
    for tool, image in images.items():
        report = master([image], tmp_path / f"{tool}.iso", Options(CD, workers=1, verify=True))
        assert report.instances == 3 and not report.invalid, (tool, report.invalid)
        assert [Path(i["path"]).name.lower() for i in report.ignored] == ["readme.txt"]
        assert f"{image}/{shown[tool]}" in {c["path"] for c in report.converted}
        root = extract_iso(tmp_path / f"{tool}.iso", tmp_path / f"x{tool}")
        assert dciodvfy_errors(root / "DICOMDIR") == []
        for rec in FileSet(root / "DICOMDIR"):
            ds = rec.load()
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            assert ds.pixel_array.shape == (8, 8)


def test_dicomdir_inside_the_image_is_an_index(tmp_path: Path) -> None:
    fs = FileSet()
    for i in range(2):
        fs.add(make_ct(tmp_path / "src", f"{i}.dcm", instance=i + 1))
    fs.write(tmp_path / "cd")
    victim = next(p for p in sorted((tmp_path / "cd").rglob("*")) if p.is_file()
                  and p.name != "DICOMDIR")
    victim.unlink()  # referenced by the DICOMDIR, not on the disc
    image = pycdlib_iso(tmp_path / "cd", tmp_path / "cd.iso", "CD")
    res = intake.scan([image], CD, workers=1)
    assert len(res.instances) == 1 and len(res.indexes) == 1
    assert [p.kind for p in res.invalid] == ["missing"]


def test_many_members_scanned_by_worker_processes(tmp_path: Path) -> None:
    ct_series(tmp_path / "in", 1, 70, rows=4)
    master([tmp_path / "in"], tmp_path / "big.iso", Options(CD))
    res = intake.scan([tmp_path / "big.iso"], CD, workers=2)
    assert len(res.instances) == 70 and not res.invalid


def test_truncated_image_as_input_is_refused(old_cd: Path, tmp_path: Path) -> None:
    data = old_cd.read_bytes()
    (tmp_path / "cut.iso").write_bytes(data[: len(data) - 3 * 2048])
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "cut.iso"], tmp_path / "o.iso", Options(CD))
    assert err.value.exit_code == 3
    assert any("truncated" in i["reason"] for i in err.value.report.invalid)


def test_cli_reads_an_iso(old_cd: Path, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "mastering", "iso", str(old_cd), "-o",
                          str(tmp_path / "new.iso"), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert '"instances": 6' in run.stdout


def test_viewer_pages_from_an_iso(old_cd: Path, tmp_path: Path) -> None:
    report = master([old_cd], tmp_path / "v.iso", Options(CD, viewer=True, workers=1))
    assert report.web["images"] == 6 and not report.web["unreadable"]
    ds = pydicom.dcmread(extract_iso(tmp_path / "v.iso", tmp_path / "x") / "DICOMDIR")
    assert len([r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]) == 6


# -- names that collide, relocated directories, images that cannot be read -----------------

USB = profiles.load("STD-GEN-USB-JPEG")


def _image(tmp_path: Path, level: int, names: list[str]) -> Path:
    """A pycdlib image holding one different instance under each ISO 9660 name."""
    import io

    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=level)
    for i, name in enumerate(names, 1):
        data = make_ct(tmp_path / "src", f"{i}.dcm", instance=i).read_bytes()
        iso.add_fp(io.BytesIO(data), len(data), name)
    iso.write(str(tmp_path / "names.iso"))
    iso.close()
    return tmp_path / "names.iso"


@pytest.mark.oracle
@pytest.mark.parametrize(("level", "names"), [
    (1, ["/IM1.;1", "/IM1.;2"]),  # two versions of one name
    (1, ["/IM1.;1", "/IM1;1"]),  # with and without the dot of an empty extension
    (4, ["/IM1;1", "/im1;1"]),  # names that differ only in case
])
def test_names_that_collide_are_all_read(tmp_path: Path, level: int, names: list[str]) -> None:
    image = _image(tmp_path, level, names)
    paths = [i.path for i in intake.scan([image], CD, workers=1).instances]
    assert len(paths) == len(set(paths)) == 2
    report = master([image], tmp_path / "fs", Options(USB, workers=1), kind="folder")
    assert report.instances == 2 and not report.invalid and not report.duplicates
    assert len(list(FileSet(tmp_path / "fs" / "DICOMDIR"))) == 2
    assert dciodvfy_errors(tmp_path / "fs" / "DICOMDIR") == []


def test_versions_are_named_as_linux_shows_them(tmp_path: Path) -> None:
    image = _image(tmp_path, 1, ["/IM1.;1", "/IM1.;2"])
    assert sorted(isosource.members(image)[0]) == [f"{image}/im1", f"{image}/im1..2"]


@pytest.mark.oracle
def test_rock_ridge_relocated_directories_are_followed(tmp_path: Path) -> None:
    """genisoimage -R moves trees deeper than 8 levels to RR_MOVED and leaves a placeholder
    (a CL entry) where they were; a mounted disc shows them in place."""
    deep = tmp_path / "disc" / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h" / "i"
    make_ct(deep, "IM1", instance=1)
    make_ct(deep / "j", "IM2", instance=2)
    make_ct(tmp_path / "disc" / "a", "IM3", instance=3)
    res = subprocess.run([need("genisoimage"), "-quiet", "-R", "-o", str(tmp_path / "rr.iso"),
                          str(tmp_path / "disc")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert any("RR_MOVED" in n for n in isosource.open_image(tmp_path / "rr.iso").iso_names())
    report = master([tmp_path / "rr.iso"], tmp_path / "fs", Options(USB, workers=1),
                    kind="folder")
    assert report.instances == 3 and not report.invalid
    shown = {p.removeprefix(f"{tmp_path / 'rr.iso'}/") for p in (
        i.path for i in intake.scan([tmp_path / "rr.iso"], CD, workers=1).instances)}
    assert shown == {"a/IM3", "a/b/c/d/e/f/g/h/i/IM1", "a/b/c/d/e/f/g/h/i/j/IM2"}
    assert dciodvfy_errors(tmp_path / "fs" / "DICOMDIR") == []


def test_an_image_inside_a_folder_says_so(old_cd: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "disc.iso").write_bytes(old_cd.read_bytes())
    make_ct(tmp_path / "in", "a.dcm")
    res = intake.scan([tmp_path / "in"], CD, workers=1)
    (ignored,) = res.ignored
    assert ignored.reason == ("an ISO image inside a folder is not opened; name it on the "
                              "command line")


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_an_image_pycdlib_cannot_open_is_invalid_input(old_cd: Path, tmp_path: Path,
                                                       damage: str) -> None:
    data = bytearray(old_cd.read_bytes())
    if damage == "cut":
        data = data[: 17 * 2048]  # the volume descriptors are cut off
    else:
        data[16 * 2048 + 7] ^= 0xFF  # the PVD's unused byte after its type (ECMA-119 8.4.4)
    bad = tmp_path / "bad.iso"
    bad.write_bytes(bytes(data))
    run = subprocess.run([sys.executable, "-m", "mastering", "iso", str(bad), "-o",
                          str(tmp_path / "o.iso")], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert f"{bad}: not a readable ISO 9660 image" in run.stderr + run.stdout
    make_ct(tmp_path / "in", "a.dcm")
    report = master([bad, tmp_path / "in"], tmp_path / "o.iso",
                    Options(CD, skip_invalid=True))
    assert report.instances == 1 and [s["path"] for s in report.skipped] == [str(bad)]
