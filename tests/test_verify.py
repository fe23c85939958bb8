"""verify: each rule broken on its own, on media made by pydicom's FileSet, dcmmkdir and xorriso.

The good medium is a pydicom FileSet (custom records carrying every key STD-GEN-CD asks for)
with a README.TXT; each test copies it, breaks exactly one rule (mostly by patching DICOMDIR
bytes in place, same length, so every other offset stays valid) and expects that rule's code.
"""

from __future__ import annotations

import copy
import io
import shutil
import struct
import subprocess
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet, RecordNode
from pydicom.uid import ImplicitVRLittleEndian

from mastering import profiles
from mastering.verify import VerifyResult, verify

from .conftest import lower_case_copy, pycdlib_iso

FSID = "TESTFS"
CD = profiles.load("STD-GEN-CD")
CT_FILE = "PT000000/ST000000/SE000000/IM000000"
MR_FILE = "PT000001/ST000000/SE000000/IM000000"
CT_ID = b"PT000000\\ST000000\\SE000000\\IM000000 "  # as stored: odd length, space padded
# values of (0004,1400), (0004,1410), (0004,1420), counted from a record's Item tag
NEXT_AT, IN_USE_AT, LOWER_AT = 16, 28, 38


# -- building media ------------------------------------------------------------------------


def dataset(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not installed"
    return pydicom.dcmread(path)


def _node(rtype: str, ds: Dataset, keywords: Iterable[str], drop: Iterable[str]) -> RecordNode:
    record = Dataset()
    record.DirectoryRecordType = rtype
    for kw in keywords:
        if kw not in drop:
            setattr(record, kw, ds.get(kw, ""))
    if rtype not in ("PATIENT", "STUDY", "SERIES"):  # pydicom wants the instance key first
        record.ReferencedSOPInstanceUIDInFile = ds.SOPInstanceUID
    return RecordNode(record)


def leaf_for(ds: Dataset, drop: Iterable[str] = (), leaf: str = "IMAGE") -> RecordNode:
    """PATIENT/STUDY/SERIES/leaf records with the Annex F and STD-GEN-CD keys, minus drop."""
    levels = [
        ("PATIENT", ["PatientID", "PatientName"]),
        ("STUDY", ["StudyDate", "StudyTime", "StudyID", "StudyInstanceUID", "StudyDescription",
                   "AccessionNumber"]),
        ("SERIES", ["Modality", "SeriesInstanceUID", "SeriesNumber"]),
        (leaf, ["InstanceNumber", "ImageType", "Rows", "Columns"]),
    ]
    parent = None
    for rtype, keywords in levels:
        present = keywords if rtype != leaf else [k for k in keywords if k in ds]
        node = _node(rtype, ds, present, drop)
        if parent is not None:
            node.parent = parent
        parent = node
    assert parent is not None
    return parent


def write_fileset(folder: Path, datasets: Iterable[Dataset], drop: Iterable[str] = (),
                  fsid: str = FSID) -> Path:
    """A File-set folder written by pydicom, plus a non-DICOM README.TXT."""
    fs = FileSet()
    fs.ID = fsid
    for ds in datasets:
        fs.add_custom(ds, leaf_for(ds, drop))
    fs.write(folder)
    (folder / "README.TXT").write_text("Test medium. DICOM files are listed in DICOMDIR.\n")
    return folder


def to_iso(folder: Path, iso: Path, vol_ident: str = FSID, level: int = 1) -> Path:
    return pycdlib_iso(folder, iso, vol_ident, level)


@pytest.fixture(scope="module")
def good_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("master") / "fs"
    return write_fileset(folder, [dataset("CT_small.dcm"), dataset("MR_small.dcm")])


@pytest.fixture
def medium(good_master: Path, tmp_path: Path) -> Path:
    """A private copy of the good File-set folder."""
    return Path(shutil.copytree(good_master, tmp_path / "medium"))


# -- patching ------------------------------------------------------------------------------


def patch(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first occurrence of old by new (same length: no offset moves)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data, old
    path.write_bytes(data.replace(old, new, 1))


def patch_ul(path: Path, pos: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos : pos + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


def offsets(dicomdir: Path) -> dict[str, list[int]]:
    """Record offsets by record type, in sequence order."""
    found: dict[str, list[int]] = {}
    for item in pydicom.dcmread(dicomdir).DirectoryRecordSequence:
        found.setdefault(item.DirectoryRecordType, []).append(item.seq_item_tell)
    return found


def root_offset_pos(dicomdir: Path) -> int:
    return dicomdir.read_bytes().index(b"\x04\x00\x00\x12UL\x04\x00") + 8


def codes(result: VerifyResult) -> set[str]:
    return result.codes


# -- good media ----------------------------------------------------------------------------


def test_good_folder_passes(medium: Path) -> None:
    result = verify(medium, CD)
    assert result.ok, result.violations
    assert result.records == 8 and result.files_checked == 4
    assert any("README.TXT" in n for n in result.notes)


def test_good_dicomdir_path_and_iso_pass(medium: Path, tmp_path: Path) -> None:
    assert verify(medium / "DICOMDIR", CD).ok
    result = verify(to_iso(medium, tmp_path / "good.iso"), CD)
    assert result.ok, result.violations


def test_not_a_medium(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 4096)
    assert codes(verify(junk, CD)) == {"medium"}


# -- 1. the DICOMDIR -----------------------------------------------------------------------


def test_missing_dicomdir(medium: Path) -> None:
    (medium / "DICOMDIR").unlink()
    assert codes(verify(medium, CD)) == {"dicomdir"}


def test_second_dicomdir_in_a_subfolder(medium: Path) -> None:
    shutil.copy(medium / "DICOMDIR", medium / "PT000000" / "DICOMDIR")
    assert codes(verify(medium, CD)) == {"dicomdir"}


def test_dicomdir_in_implicit_vr(tmp_path: Path) -> None:
    fs = FileSet()
    fs.ID = FSID
    ct = dataset("CT_small.dcm")
    fs.add_custom(ct, leaf_for(ct))
    with warnings.catch_warnings():  # pydicom warns that it should not do this
        warnings.simplefilter("ignore")
        fs.write(tmp_path / "fs", force_implicit=True)
    assert codes(verify(tmp_path / "fs", CD)) == {"dicomdir-ts"}


def test_dicomdir_wrong_sop_class(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"1.2.840.10008.1.3.10", b"1.2.840.10008.1.3.11")
    assert codes(verify(medium, CD)) == {"dicomdir"}


def test_fileset_id_with_forbidden_characters(medium: Path) -> None:
    patch(medium / "DICOMDIR", FSID.encode(), b"test-f")
    assert codes(verify(medium, CD)) == {"fileset-id"}


def test_consistency_flag_not_zero(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"\x04\x00\x12\x12US\x02\x00\x00\x00",
          b"\x04\x00\x12\x12US\x02\x00\xff\xff")
    assert codes(verify(medium, CD)) == {"dicomdir"}


def test_volume_id_must_equal_fileset_id_on_cd(medium: Path, tmp_path: Path) -> None:
    iso = to_iso(medium, tmp_path / "x.iso", vol_ident="OTHER")
    assert codes(verify(iso, CD)) == {"volume-id"}
    bd = verify(iso, profiles.load("STD-GEN-BD"))  # BD: location not verified, a note only
    assert "volume-id" not in codes(bd)
    assert any("Volume Identifier" in n for n in bd.notes)


# -- 2. offsets and hierarchy --------------------------------------------------------------


def test_root_offset_not_at_a_record(medium: Path) -> None:
    dicomdir = medium / "DICOMDIR"
    patient = offsets(dicomdir)["PATIENT"][0]
    patch_ul(dicomdir, root_offset_pos(dicomdir), patient + 2)
    result = verify(medium, CD)
    assert "offset" in codes(result)
    assert any("is not the position" in v.message for v in result.violations)


def test_offset_cycle(medium: Path) -> None:
    dicomdir = medium / "DICOMDIR"
    found = offsets(dicomdir)
    patch_ul(dicomdir, found["IMAGE"][0] + LOWER_AT, found["PATIENT"][0])
    result = verify(medium, CD)
    assert "offset" in codes(result)
    assert any("cycle" in v.message for v in result.violations)


def test_unreachable_record(medium: Path) -> None:
    dicomdir = medium / "DICOMDIR"
    first_patient = offsets(dicomdir)["PATIENT"][0]
    patch_ul(dicomdir, first_patient + NEXT_AT, 0)  # second patient no longer linked
    result = verify(medium, CD)
    assert {"offset", "orphan"} <= codes(result)
    assert any("not reachable" in v.message for v in result.violations)


def test_record_under_the_wrong_parent(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"CS\x06\x00SERIES", b"CS\x06\x00STUDY ")
    result = verify(medium, CD)
    assert "hierarchy" in codes(result)


def test_unknown_record_type(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"CS\x06\x00IMAGE ", b"CS\x06\x00VISIT ")
    assert "hierarchy" in codes(verify(medium, CD))


def test_inactive_record_is_ignored(medium: Path) -> None:
    """Record In-use Flag 0000H: the record does not count, so its file is an orphan."""
    dicomdir = medium / "DICOMDIR"
    image = offsets(dicomdir)["IMAGE"][0]
    data = bytearray(dicomdir.read_bytes())
    data[image + IN_USE_AT : image + IN_USE_AT + 2] = b"\0\0"
    dicomdir.write_bytes(bytes(data))
    result = verify(medium, CD)
    assert codes(result) == {"orphan"}
    assert any("inactive" in n for n in result.notes)


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    FileSet().write(tmp_path / "empty")
    assert codes(verify(tmp_path / "empty", CD)) == {"hierarchy"}


# -- 3. record keys ------------------------------------------------------------------------


@pytest.mark.parametrize(("drop", "profile"), [("StudyID", CD), ("AccessionNumber", CD),
                                               ("ImageType", profiles.load("STD-GEN-DVD-JPEG"))])
def test_record_key_missing(tmp_path: Path, drop: str, profile) -> None:
    """Type 1 (Study ID), Type 2 (Accession Number), Table H.3-2 1C (Image Type on DVD)."""
    folder = write_fileset(tmp_path / "fs", [dataset("CT_small.dcm")], drop=[drop])
    result = verify(folder, profile)
    assert "record-key" in codes(result)
    assert any(drop in v.message for v in result.violations if v.code == "record-key")


def test_pydicom_default_records_pass_std_gen_cd(tmp_path: Path) -> None:
    """pydicom's IMAGE records carry no Image Type: PS3.11 D.3.3.1 adds no required keys for
    CD (Image Type is Type 3 there), so the medium conforms."""
    fs = FileSet()
    fs.add(dataset("CT_small.dcm"))
    fs.write(tmp_path / "fs")
    result = verify(tmp_path / "fs", CD)
    assert result.ok, result.violations
    dd = pydicom.dcmread(tmp_path / "fs" / "DICOMDIR")
    assert all("ImageType" not in r for r in dd.DirectoryRecordSequence)  # really without


def test_duplicate_patient_id(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"LO\x04\x004MR1", b"LO\x04\x001CT1")
    result = verify(medium, CD)  # the MR file's own Patient ID now differs from its record
    assert codes(result) == {"duplicate-key", "record-mismatch"}
    assert "4MR1" not in str(result) and "1CT1" not in str(result)  # no patient data quoted


def test_series_record_differs_from_its_file(medium: Path) -> None:
    uid = dataset("CT_small.dcm").SeriesInstanceUID.encode()
    patch(medium / "DICOMDIR", uid, uid[:-1] + b"9")
    result = verify(medium, CD)
    assert codes(result) == {"record-mismatch"}
    assert result.violations[0].message.startswith("SERIES record's SeriesInstanceUID")


def test_duplicate_series_uid(tmp_path: Path) -> None:
    ct = dataset("CT_small.dcm")
    other = copy.deepcopy(ct)
    other.PatientID = "OTHER1"
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID + ".9"
    assert codes(verify(write_fileset(tmp_path / "fs", [ct, other]), CD)) == {"duplicate-key"}


# -- 4. referenced files -------------------------------------------------------------------


def test_lower_case_file_id(medium: Path) -> None:
    patch(medium / "DICOMDIR", CT_ID, CT_ID.lower())
    result = verify(medium, CD)
    # the file is still found, ignoring case; lower case is not CS (PS3.5 Table 6.2-1)
    assert codes(result) == {"file-id", "record-value"}


def test_file_id_component_too_long(medium: Path) -> None:
    patch(medium / "DICOMDIR", CT_ID, b"PT0000000ST000000\\SE000000\\IM000000 ")
    assert "file-id" in codes(verify(medium, CD))


@pytest.mark.parametrize(("file_id", "limit"), [
    (b"AAAA\\BBBB\\CCCC\\DDDD\\EEE\\FFF\\GGG\\HHH ", "allows at most 7"),
    (b"AAA\\BBB\\CCC\\DDD\\EEE\\FFF\\GGG\\HHH\\III ", "PS3.10 8.2 allows at most 8"),
])
def test_too_many_components(medium: Path, file_id: bytes, limit: str) -> None:
    parts = file_id.decode().strip().split("\\")
    target = medium.joinpath(*parts)
    target.parent.mkdir(parents=True)
    (medium / CT_FILE).rename(target)
    patch(medium / "DICOMDIR", CT_ID, file_id)
    result = verify(medium, CD)
    assert "file-id" in codes(result) <= {"file-id", "record-value"}  # 9 values: VM 1-8
    assert any(limit in v.message for v in result.violations)


def test_missing_file(medium: Path) -> None:
    (medium / CT_FILE).unlink()
    assert codes(verify(medium, CD)) == {"missing-file"}


def test_file_referenced_twice(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"PT000001\\ST000000", b"PT000000\\ST000000")
    assert codes(verify(medium, CD)) == {"duplicate-reference", "orphan"}


def test_sop_instance_mismatch(medium: Path) -> None:
    uid = dataset("CT_small.dcm").SOPInstanceUID.encode()
    patch(medium / "DICOMDIR", uid, uid[:-1] + b"9")
    assert codes(verify(medium, CD)) == {"sop-mismatch"}


def test_transfer_syntax_mismatch_with_record(medium: Path) -> None:
    ref_ts = b"\x04\x00\x12\x15UI\x14\x00"  # (0004,1512) UI, 20 bytes
    patch(medium / "DICOMDIR", ref_ts + b"1.2.840.10008.1.2.1\0", ref_ts + b"1.2.840.10008.1.2.2\0")
    assert codes(verify(medium, CD)) == {"sop-mismatch"}


def test_record_type_does_not_fit_sop_class(medium: Path) -> None:
    patch(medium / "DICOMDIR", b"CS\x06\x00IMAGE ", b"CS\x06\x00PLAN  ")
    assert codes(verify(medium, CD)) == {"record-type"}


def test_implicit_vr_file_under_std_gen_cd(tmp_path: Path) -> None:
    ct = dataset("CT_small.dcm")
    ct.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    result = verify(write_fileset(tmp_path / "fs", [ct]), CD)
    assert codes(result) == {"transfer-syntax"}


def test_jpeg2000_allowed_only_by_j2k_profiles(tmp_path: Path) -> None:
    folder = write_fileset(tmp_path / "fs", [dataset("JPEG2000.dcm")])
    assert "transfer-syntax" in codes(verify(folder, profiles.load("STD-GEN-USB-JPEG")))
    assert "transfer-syntax" not in codes(verify(folder, profiles.load("STD-GEN-USB-J2K")))


def test_truncated_file(medium: Path) -> None:
    target = medium / CT_FILE
    target.write_bytes(target.read_bytes()[:-1000])
    result = verify(medium, CD)
    assert codes(result) == {"corrupt"}
    assert "truncated" in result.violations[0].message


def test_file_without_part10_header(medium: Path) -> None:
    target = medium / CT_FILE
    ds = pydicom.dcmread(target)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None  # a bare data set: no preamble, no 'DICM', no meta group
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    target.write_bytes(buffer.getvalue())
    assert codes(verify(medium, CD)) == {"part10"}


# -- 5. orphans ----------------------------------------------------------------------------


def test_orphan_dicom_file(medium: Path) -> None:
    shutil.copy(medium / CT_FILE, medium / "EXTRA")
    (medium / "INDEX.HTM").write_text("<html></html>")
    result = verify(medium, CD)
    assert codes(result) == {"orphan"}
    assert result.violations[0].path == "EXTRA"
    assert any("INDEX.HTM" in n and "README.TXT" in n for n in result.notes)


def test_truncated_orphan_is_still_an_orphan(medium: Path) -> None:
    (medium / "BROKEN").write_bytes((medium / CT_FILE).read_bytes()[:300])
    assert codes(verify(medium, CD)) == {"orphan"}


# -- 6. ISO 9660 ---------------------------------------------------------------------------


def test_names_not_level1(medium: Path, tmp_path: Path) -> None:
    (medium / "readme_long.txt").write_text("x")
    iso = to_iso(medium, tmp_path / "x.iso", level=4)
    result = verify(iso, CD)
    assert codes(result) == {"level1"}
    assert result.violations[0].path == "/readme_long.txt;1"


def test_directories_too_deep(medium: Path, tmp_path: Path) -> None:
    deep = medium.joinpath(*[f"D{i}" for i in range(8)])  # root + 8 = 9 levels
    deep.mkdir(parents=True)
    (deep / "NOTE.TXT").write_text("x")
    assert codes(verify(to_iso(medium, tmp_path / "x.iso", level=4), CD)) == {"depth"}


def test_capacity(medium: Path, tmp_path: Path) -> None:
    iso = to_iso(medium, tmp_path / "x.iso")
    assert codes(verify(iso, CD.with_capacity(100_000))) == {"capacity"}
    assert codes(verify(medium, CD.with_capacity(50_000))) == {"capacity"}


# -- reading conditions --------------------------------------------------------------------


def test_lower_case_mount_is_only_a_note(medium: Path, tmp_path: Path) -> None:
    """Linux shows ISO 9660 names in lower case: File IDs still resolve, a note says so."""
    lower = lower_case_copy(medium, tmp_path / "mnt")
    result = verify(lower, CD)
    assert result.ok, result.violations
    assert any("lower case" in n for n in result.notes)


def test_progress_and_cancel(medium: Path) -> None:
    calls: list[tuple[int, int]] = []
    assert verify(medium, CD, progress=lambda d, t: calls.append((d, t))).ok
    assert calls and calls[-1][0] == calls[-1][1] == len(calls)
    cancel = threading.Event()
    cancel.set()
    result = verify(medium, CD, cancel=cancel)
    assert result.cancelled and not result.ok


# -- oracles: media made by other tools ----------------------------------------------------


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(args[0])
    if tool is None:
        pytest.skip(f"{args[0]} not installed")
    return subprocess.run([tool, *args[1:]], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=60)


@pytest.mark.oracle
def test_dcmmkdir_medium(tmp_path: Path) -> None:
    """dcmmkdir (STD-GEN-CD) passes; the files it refuses stay behind as orphans."""
    folder = tmp_path / "dk"
    (folder / "DICOM").mkdir(parents=True)
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm"]):
        shutil.copy(get_testdata_file(name), folder / "DICOM" / f"IM{i:06d}")
    done = _run("dcmmkdir", "+F", FSID, "+r", "+id", ".", "DICOM", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert verify(folder, CD).ok
    assert verify(to_iso(folder, tmp_path / "dk.iso"), CD).ok
    shutil.copy(get_testdata_file("JPEG2000.dcm"), folder / "DICOM" / "IM000002")
    (folder / "DICOMDIR").unlink()
    _run("dcmmkdir", "+F", FSID, "+r", "+id", ".", "DICOM", cwd=folder)  # refuses JPEG 2000
    result = verify(folder, CD)
    assert codes(result) == {"orphan"}
    assert result.violations[0].path == "DICOM/IM000002"


@pytest.mark.oracle
@pytest.mark.parametrize("tool", ["xorriso", "genisoimage"])
def test_iso_made_by_other_tools(medium: Path, tmp_path: Path, tool: str) -> None:
    iso = tmp_path / "x.iso"
    if tool == "xorriso":
        done = _run("xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", FSID, str(medium))
    else:
        done = _run("genisoimage", "-quiet", "-iso-level", "1", "-o", str(iso), "-V", FSID,
                    str(medium))
    assert done.returncode == 0, done.stderr
    result = verify(iso, CD)
    assert result.ok, result.violations
    assert (tool == "xorriso") == any("Rock Ridge" in n for n in result.notes)
