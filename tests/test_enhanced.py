"""Enhanced multi-frame images: PS3.11 Table H.3-2 IMAGE keys from the functional groups."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mastering import profiles
from mastering.pipeline import Options, master
from mastering.verify import verify

from .conftest import dciodvfy_errors, make_ct

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
DVD = profiles.load("STD-GEN-USB-JPEG")


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def enhanced(folder: Path, name: str, frames: int, *, shared: bool, positions_differ: bool,
             **extra) -> Path:
    """An Enhanced CT with the plane keys only inside the functional group macros."""
    path = make_ct(folder, name, rows=8, SOPClassUID=ENHANCED_CT, ImagePositionPatient=None,
                   ImageOrientationPatient=None, PixelSpacing=None, **extra)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    ds.PixelData = ds.PixelData * frames
    orientation = _item(PlaneOrientationSequence=Sequence(
        [_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]))
    measures = _item(PixelMeasuresSequence=Sequence([_item(PixelSpacing=[0.5, 0.5],
                                                           SliceThickness=1)]))
    per_frame = []
    for f in range(frames):
        item = _item(PlanePositionSequence=Sequence(
            [_item(ImagePositionPatient=[0, 0, f if positions_differ else 0])]))
        if not shared:
            item.PlaneOrientationSequence = orientation.PlaneOrientationSequence
            item.PixelMeasuresSequence = measures.PixelMeasuresSequence
        per_frame.append(item)
    shared_item = Dataset()
    if shared:
        shared_item.PlaneOrientationSequence = orientation.PlaneOrientationSequence
        shared_item.PixelMeasuresSequence = measures.PixelMeasuresSequence
    ds.SharedFunctionalGroupsSequence = Sequence([shared_item])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(path)
    return path


@pytest.mark.oracle
@pytest.mark.parametrize("shared", [True, False])
def test_plane_keys_come_from_the_functional_groups(tmp_path: Path, shared: bool) -> None:
    enhanced(tmp_path / "in", "a.dcm", 3, shared=shared, positions_differ=True,
             sop_uid="1.2.3.8.1")
    enhanced(tmp_path / "in", "b.dcm", 2, shared=shared, positions_differ=False,
             sop_uid="1.2.3.8.2", instance=2)
    report = master([tmp_path / "in"], tmp_path / "fs", Options(DVD), kind="folder")
    assert report.ok
    dd = pydicom.dcmread(tmp_path / "fs" / "DICOMDIR")
    images = {r.ReferencedSOPInstanceUIDInFile: r for r in dd.DirectoryRecordSequence
              if r.DirectoryRecordType == "IMAGE"}
    for rec in images.values():
        assert rec.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
        assert rec.PixelSpacing == [0.5, 0.5]
    assert "ImagePositionPatient" not in images["1.2.3.8.1"]  # frames differ: no one value
    assert images["1.2.3.8.2"].ImagePositionPatient == [0, 0, 0]  # all frames agree
    assert dciodvfy_errors(tmp_path / "fs" / "DICOMDIR") == []
    assert verify(tmp_path / "fs", DVD).ok


def test_verify_wants_the_shared_keys(tmp_path: Path) -> None:
    enhanced(tmp_path / "in", "a.dcm", 2, shared=True, positions_differ=True)
    master([tmp_path / "in"], tmp_path / "fs", Options(DVD), kind="folder")
    dicomdir = tmp_path / "fs" / "DICOMDIR"
    ds = pydicom.dcmread(dicomdir)
    image = next(r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE")
    data = dicomdir.read_bytes()
    spacing = image["PixelSpacing"]
    old = b"\x28\x00\x30\x00DS" + len(b"0.5\\0.5 ").to_bytes(2, "little")
    assert old in data and spacing.value == [0.5, 0.5]
    dicomdir.write_bytes(data.replace(old, b"\x28\x00\x31\x00" + old[4:]))  # Zoom Factor
    result = verify(tmp_path / "fs", DVD)
    assert any("PixelSpacing" in v.message and v.code == "record-key"
               for v in result.violations)


def _dcmmkdir(folder: Path) -> None:
    """dcmmkdir's DICOMDIR for the USB profile over every file below folder (File IDs)."""
    import subprocess

    from .conftest import need

    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    res = subprocess.run([need("dcmmkdir"), "-Pfl", "+I", *files], cwd=folder,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.oracle
def test_per_frame_keys_are_not_demanded_of_other_tools_media(tmp_path: Path) -> None:
    """Every frame has the same orientation, spacing and position, but only per frame:
    dcmmkdir writes no such keys, and Table H.3-2 asks only for the top level or the Shared
    Functional Groups; we write them, and demand neither."""
    enhanced(tmp_path / "D", "IM2", 3, shared=False, positions_differ=False)
    _dcmmkdir(tmp_path / "D")
    result = verify(tmp_path / "D", DVD)
    assert result.ok, result.violations
    report = master([tmp_path / "D" / "IM2"], tmp_path / "fs", Options(DVD), kind="folder")
    assert report.ok and verify(tmp_path / "fs", DVD).ok
    (image,) = [r for r in pydicom.dcmread(tmp_path / "fs" / "DICOMDIR").DirectoryRecordSequence
                if r.DirectoryRecordType == "IMAGE"]
    assert image.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]  # written all the same


def _referenced(ds: pydicom.Dataset) -> None:
    ref = _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                ReferencedSOPInstanceUID="1.2.3.8.99")
    ds.SharedFunctionalGroupsSequence[0].ReferencedImageSequence = Sequence([ref])


@pytest.mark.oracle
def test_referenced_image_sequence_comes_from_the_shared_groups(tmp_path: Path,
                                                                 monkeypatch) -> None:
    path = enhanced(tmp_path / "in", "a.dcm", 2, shared=True, positions_differ=True)
    ds = pydicom.dcmread(path)
    _referenced(ds)
    ds.save_as(path)
    report = master([tmp_path / "in"], tmp_path / "fs", Options(DVD), kind="folder")
    assert report.ok
    dicomdir = tmp_path / "fs" / "DICOMDIR"
    (image,) = [r for r in pydicom.dcmread(dicomdir).DirectoryRecordSequence
                if r.DirectoryRecordType == "IMAGE"]
    assert image.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.8.99"
    assert dciodvfy_errors(dicomdir) == []
    assert verify(tmp_path / "fs", DVD).ok
    # a medium whose records lack it (as this program wrote them before): verify notices
    from mastering import records

    without = {k: v for k, v in records.FUNCTIONAL_GROUP_KEYS.items() if k != 0x00081140}
    monkeypatch.setattr(records, "FUNCTIONAL_GROUP_KEYS", without)
    master([tmp_path / "in"], tmp_path / "old", Options(DVD), kind="folder")
    monkeypatch.undo()
    result = verify(tmp_path / "old", DVD)
    assert [(v.code, "ReferencedImageSequence" in v.message) for v in result.violations] \
        == [("record-key", True)]
    # dcmmkdir copies it too: its medium passes
    folder = tmp_path / "D"
    folder.mkdir()
    (folder / "IM1").write_bytes(path.read_bytes())
    _dcmmkdir(folder)
    assert verify(folder, DVD).ok
