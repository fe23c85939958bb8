"""A meta header that disagrees with its data set (anonymizer output): the data set wins."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import intake, part10, profiles
from mastering.pipeline import MasteringError, Options, master
from mastering.verify import verify

from .conftest import dciodvfy_errors, dcmdump, make_ct

CD = profiles.load("STD-GEN-CD")
MR = "1.2.840.10008.5.1.4.1.1.4"


def anonymized(folder: Path, name: str, *, new_uid: str | None = None,
               new_class: str | None = None, implicit: bool = False, **kw) -> Path:
    """A file whose data set got new UIDs while the meta header kept the old ones, as
    anonymizers leave them (written without pydicom's meta consistency fix-ups)."""
    src = make_ct(folder / "orig", name, implicit=implicit, **kw)
    ds = pydicom.dcmread(src)
    old = ds.file_meta.MediaStorageSOPInstanceUID
    if new_uid:
        ds.SOPInstanceUID = new_uid
    if new_class:
        ds.SOPClassUID = new_class
    assert ds.file_meta.MediaStorageSOPInstanceUID == old
    out = folder / name
    ds.save_as(out, enforce_file_format=False)
    return out


def test_data_set_uids_win_and_are_reported(tmp_path: Path) -> None:
    path = anonymized(tmp_path, "a.dcm", new_uid="1.2.826.0.1.99.1", new_class=MR)
    inst = intake.scan_file(str(path), CD)
    assert isinstance(inst, intake.Instance)
    assert inst.sop_instance_uid == "1.2.826.0.1.99.1" and inst.sop_class_uid == MR
    assert not inst.meta_complete  # the meta header is rebuilt
    assert {r["uid"] for r in inst.repairs} == {"SOP Instance UID", "SOP Class UID"}
    fix = next(r for r in inst.repairs if r["uid"] == "SOP Instance UID")
    assert fix["dataset"] == "1.2.826.0.1.99.1" and fix["meta"] != fix["dataset"]


def test_uid_only_in_the_meta_header_is_used(tmp_path: Path) -> None:
    src = make_ct(tmp_path / "o", "a.dcm")
    ds = pydicom.dcmread(src)
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=False)
    inst = intake.scan_file(str(tmp_path / "a.dcm"), CD)
    assert isinstance(inst, intake.Instance) and inst.sop_instance_uid == uid
    assert inst.repairs[0]["dataset"] == ""


def test_no_uid_anywhere_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(make_ct(tmp_path / "o", "a.dcm"))
    del ds.SOPInstanceUID
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=False)
    res = intake.scan_file(str(tmp_path / "a.dcm"), CD)
    assert isinstance(res, intake.Problem) and "no SOP Class UID or SOP Instance UID" in res.reason


@pytest.mark.oracle
@pytest.mark.parametrize("implicit", [False, True])
def test_anonymized_study_next_to_its_original(tmp_path: Path, implicit: bool) -> None:
    """The original and its anonymized copy (new data set UID, old meta UID) are two objects;
    the medium's meta headers and records carry each data set's UIDs; data sets unchanged."""
    orig = make_ct(tmp_path / "in", "orig.dcm", sop_uid="1.2.826.0.1.5.1", implicit=implicit)
    anon = anonymized(tmp_path / "in" / "anon", "anon.dcm", new_uid="1.2.826.0.1.5.2",
                      sop_uid="1.2.826.0.1.5.1", implicit=implicit, instance=2)
    assert pydicom.dcmread(anon).file_meta.MediaStorageSOPInstanceUID == "1.2.826.0.1.5.1"
    report = master([orig, anon], tmp_path / "o.iso", Options(CD, workers=1))
    assert report.instances == 2 and not report.invalid
    assert [r["path"] for r in report.repaired] == [str(anon)]
    assert report.repaired[0]["meta"] == "1.2.826.0.1.5.1"
    assert report.repaired[0]["dataset"] == "1.2.826.0.1.5.2"
    from .conftest import extract_iso

    root = extract_iso(tmp_path / "o.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    dcmdump(root / "DICOMDIR")
    assert verify(tmp_path / "o.iso", CD).ok
    found = {}
    for rec in FileSet(root / "DICOMDIR"):
        ds = rec.load()
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert rec.ReferencedSOPInstanceUIDInFile == ds.SOPInstanceUID
        found[ds.SOPInstanceUID] = Path(rec.path)
    assert set(found) == {"1.2.826.0.1.5.1", "1.2.826.0.1.5.2"}
    if not implicit:  # the data set's bytes are copied after the new meta header
        src, out = anon.read_bytes(), found["1.2.826.0.1.5.2"].read_bytes()
        start = part10.inspect(anon).dataset_start
        assert out.endswith(src[start:])


def test_two_anonymized_copies_with_one_meta_uid_conflict_by_data_set(tmp_path: Path) -> None:
    """Duplicate and conflict detection use the data set's UID, not the meta header's."""
    a = anonymized(tmp_path / "a", "x.dcm", new_uid="1.2.826.0.1.6.1", sop_uid="1.2.826.0.1.6")
    b = anonymized(tmp_path / "b", "x.dcm", new_uid="1.2.826.0.1.6.2", sop_uid="1.2.826.0.1.6",
                   instance=2)
    report = master([a, b], tmp_path / "o.iso", Options(CD, workers=1))
    assert report.instances == 2
    c = anonymized(tmp_path / "c", "x.dcm", new_uid="1.2.826.0.1.6.2", sop_uid="1.2.826.0.1.7",
                   instance=3, value=9)
    with pytest.raises(MasteringError) as err:
        master([a, b, c], tmp_path / "p.iso", Options(CD, workers=1))
    assert "1.2.826.0.1.6.2" in err.value.report.invalid[0]["reason"]


def _wrong_group_length(path: Path, by: int = 2) -> Path:
    """(0002,0000) File Meta Information Group Length off by `by` bytes (PS3.10 7.1)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(b"\x02\x00\x00\x00UL\x04\x00") + 8
    (length,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at, length + by)
    path.write_bytes(bytes(data))
    return path


def _group_length_right(path: Path) -> bool:
    layout = part10.inspect(path)
    return layout.meta_length is None and layout.has_meta


@pytest.mark.oracle
def test_a_wrong_group_length_is_rebuilt_and_reported(tmp_path: Path) -> None:
    src = _wrong_group_length(make_ct(tmp_path / "in", "a.dcm"))
    assert not _group_length_right(src)
    before = src.read_bytes()
    report = master([tmp_path / "in"], tmp_path / "o.iso", Options(CD, workers=1, verify=True))
    assert report.conversions == {"remeta": 1}
    (fix,) = report.repaired
    assert fix["uid"].startswith("File Meta Information Group Length")
    from .conftest import extract_iso

    root = extract_iso(tmp_path / "o.iso", tmp_path / "x")
    (rec,) = list(FileSet(root / "DICOMDIR"))
    written = Path(rec.path)
    assert _group_length_right(written)
    start = part10.inspect(src).dataset_start
    assert written.read_bytes().endswith(before[start:])  # the data set as it was
    assert src.read_bytes() == before
    assert dciodvfy_errors(root / "DICOMDIR") == []
    assert not [e for e in dcmdump(written).splitlines() if "E:" in e]


def test_verify_flags_a_wrong_group_length(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    usb = profiles.load("STD-GEN-USB-JPEG")
    master([tmp_path / "in"], tmp_path / "fs", Options(usb), kind="folder")
    (image,) = [p for p in (tmp_path / "fs").rglob("IM*") if p.is_file()]
    _wrong_group_length(image)
    result = verify(tmp_path / "fs", usb)
    assert [(v.code, "(0002,0000)" in v.message) for v in result.violations] \
        == [("part10", True)]
    _wrong_group_length(tmp_path / "fs" / "DICOMDIR", by=-4)
    assert "DICOMDIR" in {v.path for v in verify(tmp_path / "fs", usb).violations}
