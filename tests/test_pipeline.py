"""End to end: inputs -> ISO or folder, judged by tools this project did not write."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from threading import Event

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import pipeline, profiles
from mastering.intake import Cancelled
from mastering.pipeline import MasteringError, Options, master

from .conftest import (
    ct_series,
    dciodvfy_errors,
    dcmdump,
    extract_iso,
    isoinfo_listing,
    make_ct,
    need,
    sample,
)

LEVEL1 = re.compile(r"^(/[A-Z0-9_]{1,8})*/[A-Z0-9_]{1,8}\.[A-Z0-9_]{0,3};1$")
PYDICOM_FILES = ["CT_small.dcm", "test-SR.dcm", "waveform_ecg.dcm", "MR_small_bigendian.dcm",
                 "rtstruct.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm", "image_dfl.dcm",
                 "examples_palette.dcm"]


def _inputs(tmp: Path) -> list[Path]:
    gen = tmp / "in"
    for i in range(1, 4):
        make_ct(gen / "a", f"ct{i}.dcm", instance=i, value=i)
        make_ct(gen / "b", f"ct{i}.dcm", instance=i, series_uid="1.2.3.4.1.2", implicit=True,
                value=10 + i, SeriesNumber=2)
    return [gen, *(sample(n) for n in PYDICOM_FILES)]


def _uids(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID for p in paths}


@pytest.fixture(scope="module")
def cd_image(tmp_path_factory) -> tuple[Path, Path, pipeline.Report, list[Path]]:
    tmp = tmp_path_factory.mktemp("cd")
    inputs = _inputs(tmp)
    report = master(inputs, tmp / "out.iso", Options(profiles.load("STD-GEN-CD"),
                                                      fileset_id="TEST_CD", workers=1))
    return tmp / "out.iso", extract_iso(tmp / "out.iso", tmp / "x"), report, inputs


@pytest.mark.oracle
def test_iso_names_are_level1_and_volume_id(cd_image) -> None:
    iso, _root, _report, _ = cd_image
    names = [name for name, _ in isoinfo_listing(iso)]
    assert "/DICOMDIR.;1" in names
    assert all(LEVEL1.match(n) for n in names), [n for n in names if not LEVEL1.match(n)]
    info = subprocess.run([need("isoinfo"), "-d", "-i", str(iso)], capture_output=True,
                          text=True, check=True).stdout
    assert re.search(r"^Volume id: TEST_CD$", info, re.M)
    assert "NO Joliet present" in info and "NO Rock Ridge present" in info


@pytest.mark.oracle
def test_dicomdir_passes_dciodvfy_and_dcmdump(cd_image) -> None:
    _iso, root, _report, _ = cd_image
    assert dciodvfy_errors(root / "DICOMDIR") == []
    dump = dcmdump(root / "DICOMDIR")
    assert "MediaStorageDirectoryStorage" in dump or "1.2.840.10008.1.3.10" in dump


@pytest.mark.oracle
def test_every_instance_exactly_once_and_intact(cd_image) -> None:
    _iso, root, report, inputs = cd_image
    fs = FileSet(root / "DICOMDIR")
    by_uid = {}
    for inst in fs:
        ds = inst.load()
        assert ds.SOPInstanceUID == inst.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert inst.ReferencedTransferSyntaxUIDInFile == ds.file_meta.TransferSyntaxUID
        by_uid[ds.SOPInstanceUID] = Path(inst.path)
    sources = [p for i in inputs for p in ([i] if i.is_file() else sorted(i.rglob("*.dcm")))]
    assert set(by_uid) == _uids(sources)
    assert report.instances == len(sources)
    for src in sources:
        a = pydicom.dcmread(src, force=True)
        b = pydicom.dcmread(by_uid[a.SOPInstanceUID])
        if a.file_meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.1" and src.read_bytes()[
                128:132] == b"DICM":
            assert by_uid[a.SOPInstanceUID].read_bytes() == src.read_bytes()  # copied as is
        for elem in a:
            if elem.tag in (0x7FE00010, 0x00280004, 0x00280006, 0x00282110, 0x00282114):
                continue
            assert b[elem.tag].value == elem.value, (src.name, elem)
        if "PixelData" in a:
            assert np.array_equal(a.pixel_array, b.pixel_array), src.name


@pytest.mark.oracle
def test_data_placed_in_dicomdir_order(cd_image) -> None:
    iso, root, _report, _ = cd_image
    extents = dict(isoinfo_listing(iso))
    assert extents["/DICOMDIR.;1"] == min(extents.values())
    order = [inst.path for inst in FileSet(root / "DICOMDIR")]
    files = ["/" + str(Path(p).relative_to(root)) + ".;1" for p in order]
    placed = [extents[f] for f in files]
    assert placed == sorted(placed)


def test_report_counts_conversions_and_fills(cd_image) -> None:
    _iso, _root, report, _ = cd_image
    assert report.ok and report.patients >= 5 and len(report.volumes) == 1
    assert report.conversions["transcode"] >= 5  # implicit, big endian, deflate, RLE, J2K
    assert any(f["key"] == "PatientID" for f in report.filled)


def test_reproducible_with_source_date_epoch(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    opts = Options(profiles.load("STD-GEN-CD"), source_date_epoch=1700000000, workers=1)
    master(inputs, tmp_path / "a.iso", opts)
    time.sleep(1.1)  # a clock that leaks into the image now shows
    master(inputs, tmp_path / "b.iso", opts)
    assert (tmp_path / "a.iso").read_bytes() == (tmp_path / "b.iso").read_bytes()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial")
                  or p.suffix == ".iso")


def test_invalid_input_refuses_whole_run(tmp_path: Path) -> None:
    good = make_ct(tmp_path / "in", "good.dcm")
    bad = tmp_path / "in" / "cut.dcm"
    bad.write_bytes(make_ct(tmp_path / "src", "x.dcm").read_bytes()[:-100])
    make_ct(tmp_path / "in", "clash1.dcm", sop_uid="1.2.3.99", value=1)
    make_ct(tmp_path / "in", "clash2.dcm", sop_uid="1.2.3.99", value=2)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "in"], out / "x.iso", Options(profiles.load("STD-GEN-CD")))
    assert err.value.exit_code == 3
    reasons = {Path(i["path"]).name: i["reason"] for i in err.value.report.invalid}
    assert "truncated" in reasons["cut.dcm"]
    assert "1.2.3.99" in reasons["clash1.dcm"] and "clash2.dcm" in reasons["clash1.dcm"]
    assert [Path(i["path"]).name for i in err.value.report.ignored] == ["notes.txt"]
    assert _leftovers(out) == []
    with pytest.raises(MasteringError) as err:  # a conflict is not skipped by default
        master([tmp_path / "in"], out / "x.iso",
               Options(profiles.load("STD-GEN-CD"), skip_invalid=True))
    assert "--on-conflict" in err.value.report.error and _leftovers(out) == []
    report = master([tmp_path / "in"], out / "x.iso",
                    Options(profiles.load("STD-GEN-CD"), skip_invalid=True, on_conflict="skip"))
    assert report.instances == 1 and len(report.invalid) == 1 and len(report.skipped) == 3
    assert _uids([good]) == {i.SOPInstanceUID for i in FileSet(
        extract_iso(out / "x.iso", tmp_path / "x") / "DICOMDIR")}


def test_identical_copies_merge(tmp_path: Path) -> None:
    a = make_ct(tmp_path / "in", "a.dcm", sop_uid="1.2.3.77")
    (tmp_path / "in" / "copy").mkdir()
    (tmp_path / "in" / "copy" / "a.dcm").write_bytes(a.read_bytes())
    report = master([tmp_path / "in"], tmp_path / "o.iso", Options(profiles.load("STD-GEN-CD")))
    assert report.instances == 1 and len(report.duplicates) == 1


@pytest.mark.oracle
def test_spanning_makes_self_contained_volumes(tmp_path: Path) -> None:
    ct_series(tmp_path / "in", 3, 4)
    prof = profiles.load("STD-GEN-CD").with_capacity(200_000)
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "in"], tmp_path / "o.iso", Options(prof, span=False))
    assert err.value.exit_code == 4 and not list(tmp_path.glob("o*.iso"))
    report = master([tmp_path / "in"], tmp_path / "o.iso", Options(prof))
    isos = sorted(tmp_path.glob("o-*.iso"))
    assert len(isos) == len(report.volumes) >= 2
    seen: list[str] = []
    for n, iso in enumerate(isos):
        assert iso.stat().st_size <= 200_000
        root = extract_iso(iso, tmp_path / f"x{n}")
        assert dciodvfy_errors(root / "DICOMDIR") == []
        series = {}
        for inst in FileSet(root / "DICOMDIR"):
            seen.append(inst.SOPInstanceUID)
            series.setdefault(inst.SeriesInstanceUID, 0)
            series[inst.SeriesInstanceUID] += 1
        assert all(v == 4 for v in series.values())  # a series stays whole where it fits
    assert len(seen) == len(set(seen)) == 12


@pytest.mark.oracle
def test_fileset_folder(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    out = tmp_path / "stick"
    master(inputs, out, Options(profiles.load("STD-GEN-USB-JPEG"), workers=1), kind="folder")
    assert dciodvfy_errors(out / "DICOMDIR") == []
    assert len(list(FileSet(out / "DICOMDIR"))) == 15
    with pytest.raises(MasteringError, match="not an empty folder") as err:
        master(inputs, out, Options(profiles.load("STD-GEN-USB-JPEG"), workers=1), kind="folder")
    assert err.value.exit_code == 6


def test_verify_option_checks_each_volume(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    report = master(inputs, tmp_path / "v.iso", Options(profiles.load("STD-GEN-CD"), verify=True))
    assert report.ok and not report.violations
    from mastering.verify import verify

    assert verify(tmp_path / "v.iso", profiles.load("STD-GEN-CD")).ok


def test_usb_profile_refuses_iso(tmp_path: Path) -> None:
    with pytest.raises(MasteringError) as err:
        master([make_ct(tmp_path, "a.dcm")], tmp_path / "a.iso",
               Options(profiles.load("STD-GEN-USB-J2K")))
    assert err.value.exit_code == 2


def test_cancel_leaves_nothing(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    cancel = Event()

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write"):
            cancel.set()

    with pytest.raises(Cancelled):
        master(inputs, tmp_path / "o.iso", Options(profiles.load("STD-GEN-CD"), workers=1),
               progress=progress, cancel=cancel)
    assert _leftovers(tmp_path) == []


@pytest.mark.oracle
def test_remastering_an_existing_fileset(cd_image, tmp_path: Path) -> None:
    """A DICOMDIR among the inputs is an index: its files come in, it does not."""
    _iso, root, first, _ = cd_image
    report = master([root / "DICOMDIR"], tmp_path / "again.iso",
                    Options(profiles.load("STD-GEN-CD"), workers=1))
    assert report.instances == first.instances
    assert report.conversions == {"copy": first.instances}


@pytest.mark.oracle
def test_filled_keys_leave_the_file_untouched(tmp_path: Path) -> None:
    src = make_ct(tmp_path / "in", "a.dcm", patient_id="", instance=None, StudyDate=None,
                  StudyID=None)
    opts = Options(profiles.load("STD-GEN-CD"))
    r1 = master([src], tmp_path / "a.iso", opts)
    r2 = master([src], tmp_path / "b.iso", opts)
    assert r1.filled == r2.filled
    assert {f["key"] for f in r1.filled} == {"PatientID", "StudyDate", "StudyID",
                                             "InstanceNumber"}
    root = extract_iso(tmp_path / "a.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    (inst,) = list(FileSet(root / "DICOMDIR"))
    assert Path(inst.path).read_bytes() == src.read_bytes()


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["chrH31.dcm", "chrRuss.dcm", "chrGreek.dcm", "chrX1.dcm",
                                  "chrH32.dcm", "chrArab.dcm"])
def test_names_keep_their_character_set(tmp_path: Path, name: str) -> None:
    src = Path(pydicom.data.get_charset_files(name)[0])
    ds = pydicom.dcmread(src)
    report = master([src], tmp_path / "c.iso", Options(profiles.load("STD-GEN-CD")),)
    assert report.ok
    root = extract_iso(tmp_path / "c.iso", tmp_path / "x")
    dd = pydicom.dcmread(root / "DICOMDIR")
    patient = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    assert patient.SpecificCharacterSet == ds.SpecificCharacterSet
    assert patient.PatientName == ds.PatientName
    assert patient.get_item(0x00100010).value == ds.get_item(0x00100010).value  # raw bytes


@pytest.mark.oracle
def test_dvd_profile_keys_and_jpeg_copied(tmp_path: Path) -> None:
    src = sample("SC_rgb_jpeg_dcmtk.dcm")
    master([src], tmp_path / "d.iso", Options(profiles.load("STD-GEN-DVD-JPEG")))
    root = extract_iso(tmp_path / "d.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    (inst,) = list(FileSet(root / "DICOMDIR"))
    assert Path(inst.path).read_bytes() == src.read_bytes()  # allowed: byte for byte
    assert inst.Rows == 100 and inst.Columns == 100


def test_verify_failure_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    """A DICOMDIR that lost its last record leaves an orphan: --verify must refuse the volume."""
    from mastering import dicomdir

    real = dicomdir.chunks

    def broken(volume):
        import copy

        shown = copy.deepcopy(volume)
        shown.patients[0].studies[0].series[0].entries.pop()
        return real(shown)

    monkeypatch.setattr(dicomdir, "chunks", broken)
    make_ct(tmp_path / "in", "a.dcm", instance=1)
    make_ct(tmp_path / "in", "b.dcm", instance=2)
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "in"], tmp_path / "o.iso",
               Options(profiles.load("STD-GEN-CD"), verify=True))
    assert err.value.exit_code == 5
    assert {v["code"] for v in err.value.report.violations} == {"orphan"}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["iso", "folder"])
@pytest.mark.parametrize("change", ["replace", "shrink"])
def test_source_changed_after_scan_fails_the_run(tmp_path: Path, kind: str, change: str) -> None:
    """A file swapped for another patient's (same size), or cut short, between the scan and
    the write must fail the run: its directory record would describe something else."""
    from mastering.content import SourceChanged

    make_ct(tmp_path / "in", "a.dcm", instance=1)
    a = make_ct(tmp_path / "in", "b.dcm", instance=2, patient_name="ALICE^A")  # written last
    other = make_ct(tmp_path / "other", "b.dcm", instance=2, patient_name="BOBBY^B")
    assert other.stat().st_size == a.stat().st_size

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and a.exists() and not hasattr(progress, "done"):
            progress.done = True
            data = other.read_bytes() if change == "replace" else a.read_bytes()[:-100]
            a.write_bytes(data)

    out = tmp_path / ("o.iso" if kind == "iso" else "usb")
    prof = profiles.load("STD-GEN-CD" if kind == "iso" else "STD-GEN-USB-JPEG")
    with pytest.raises(SourceChanged):
        master([tmp_path / "in"], out, Options(prof, workers=1), kind=kind, progress=progress)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_new_run_replaces_the_whole_earlier_set(tmp_path: Path) -> None:
    """After a 3-volume run, a 1-volume run to the same name leaves only its own image."""
    ct_series(tmp_path / "in", 3, 3)
    small = profiles.load("STD-GEN-CD").with_capacity(150_000)
    report = master([tmp_path / "in"], tmp_path / "o.iso", Options(small, label=True))
    assert len(report.volumes) >= 2 and (tmp_path / "o-2.label.svg").exists()
    (tmp_path / "other.iso").write_bytes(b"not ours")
    master([tmp_path / "in"], tmp_path / "o.iso", Options(profiles.load("STD-GEN-CD")))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        ".o.iso.mastering.json", "o.iso", "other.iso"]


def test_files_left_out_after_the_scan_are_listed_as_skipped(tmp_path: Path) -> None:
    """A series under two studies: the second file is refused when the tree is planned; with
    --skip-invalid it is in "invalid" (why) and in "skipped" (left out), like every other."""
    make_ct(tmp_path / "in", "a.dcm", study_uid="1.2.3.4.1", series_uid="1.2.3.4.9")
    make_ct(tmp_path / "in", "b.dcm", study_uid="1.2.3.4.2", series_uid="1.2.3.4.9",
            instance=2)
    make_ct(tmp_path / "in", "c.dcm", study_uid="1.2.3.4.3", series_uid="1.2.3.4.8")
    report = master([tmp_path / "in"], tmp_path / "o.iso",
                    Options(profiles.load("STD-GEN-CD"), skip_invalid=True))
    assert report.instances == 2
    assert [i["path"] for i in report.invalid] == [str(tmp_path / "in" / "b.dcm")]
    assert report.skipped == report.invalid
