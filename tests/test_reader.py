"""reader: folders, DICOMDIR paths and ISO images; the record tree as linked by the offsets."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from mastering import reader
from mastering.reader import MediaError, build_tree, open_medium, read_dicomdir, summarize

from .conftest import lower_case_copy, pycdlib_iso

FSID = "READERFS"
CT_FILE = "PT000000/ST000000/SE000000/IM000000"
NAMES = {"ISO_IR 100": "Müller^Jürgen", "ISO_IR 192": "山田^太郎"}
NEXT_AT = 16  # value of (0004,1400) after a record's Item tag


def _dataset(name: str, charset: str, patient_id: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = charset
    ds.PatientName = NAMES[charset]
    ds.PatientID = patient_id
    return ds


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two patients whose names need two different character sets (pydicom's own records)."""
    folder = tmp_path_factory.mktemp("reader") / "fs"
    fs = FileSet()
    fs.ID = FSID
    fs.add(_dataset("CT_small.dcm", "ISO_IR 100", "P1"))
    fs.add(_dataset("MR_small.dcm", "ISO_IR 192", "P2"))
    fs.write(folder)
    (folder / "README.TXT").write_text("readme\n")
    return folder


@pytest.fixture
def folder(master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(master, tmp_path / "fs"))


def make_iso(folder: Path, iso: Path) -> Path:
    return pycdlib_iso(folder, iso, FSID)


def patch_ul(path: Path, pos: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos : pos + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


def patients(dicomdir: Path) -> list[int]:
    seq = pydicom.dcmread(dicomdir).DirectoryRecordSequence
    return [i.seq_item_tell for i in seq if i.DirectoryRecordType == "PATIENT"]


# -- media ---------------------------------------------------------------------------------


def test_folder_and_dicomdir_path(folder: Path) -> None:
    for path in (folder, folder / "DICOMDIR"):
        with open_medium(path) as medium:
            assert medium.kind == "folder"
            assert medium.volume_id() is None and medium.iso_names() == []
            assert "DICOMDIR" in medium.files() and CT_FILE in medium.files()
            with medium.open("README.TXT") as fp:
                assert fp.read() == b"readme\n"


def test_iso_names_and_volume(folder: Path, tmp_path: Path) -> None:
    with open_medium(make_iso(folder, tmp_path / "x.iso")) as medium:
        assert medium.kind == "iso"
        assert medium.volume_id() == FSID
        assert medium.files() == sorted(reader.FolderMedium(folder).files())
        assert "/DICOMDIR.;1" in medium.iso_names() and "/README.TXT;1" in medium.iso_names()
        assert f"/{CT_FILE}.;1" in medium.iso_names() and "/PT000000" in medium.iso_names()
        assert medium.size(CT_FILE) == (folder / CT_FILE).stat().st_size
        with medium.open(CT_FILE) as fp:
            assert fp.read() == (folder / CT_FILE).read_bytes()


def test_iso_member_inspected_and_read_in_place(folder: Path, tmp_path: Path) -> None:
    with open_medium(make_iso(folder, tmp_path / "x.iso")) as medium:
        assert medium.inspect(CT_FILE) == reader.FolderMedium(folder).inspect(CT_FILE)
        header = medium.read_header(CT_FILE)
    assert "PixelData" not in header and header.SOPClassUID == pydicom.uid.CTImageStorage


def test_not_a_medium(tmp_path: Path) -> None:
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"x" * 70_000)
    with pytest.raises(MediaError):
        open_medium(junk)
    with pytest.raises(MediaError):
        open_medium(tmp_path / "absent")


def test_dicomdir_absent_or_garbage(folder: Path) -> None:
    (folder / "DICOMDIR").unlink()
    with open_medium(folder) as medium, pytest.raises(MediaError):
        read_dicomdir(medium)
    (folder / "DICOMDIR").write_bytes(b"not a dicomdir at all" * 10)
    with open_medium(folder) as medium, pytest.raises(MediaError):
        read_dicomdir(medium)


# -- summary -------------------------------------------------------------------------------


def test_summary(folder: Path, tmp_path: Path) -> None:
    with open_medium(folder) as medium:
        summary = summarize(medium)
    assert summary["fileset_id"] == FSID
    assert summary["fileset_uid"] == pydicom.dcmread(folder / "DICOMDIR").file_meta[
        "MediaStorageSOPInstanceUID"].value
    assert summary["counts"] == {"patients": 2, "studies": 2, "series": 2, "instances": 2}
    first = summary["patients"][0]
    assert first["id"] == "P1"
    study = first["studies"][0]
    assert study["date"] == "20040119" and study["uid"].startswith("1.3.6.1.4.1.5962")
    series = study["series"][0]
    assert series["modality"] == "CT" and series["number"] == "1"
    assert series["instances"] == 1 and series["record_types"] == {"IMAGE": 1}
    with open_medium(make_iso(folder, tmp_path / "x.iso")) as medium:
        assert summarize(medium) == summary


def test_names_decoded_by_each_records_character_set(folder: Path) -> None:
    with open_medium(folder) as medium:
        names = [p["name"] for p in summarize(medium)["patients"]]
    assert names == [NAMES["ISO_IR 100"], NAMES["ISO_IR 192"]]


def test_tree_follows_offsets_not_sequence_order(folder: Path) -> None:
    dicomdir = folder / "DICOMDIR"
    first, second = patients(dicomdir)
    data = dicomdir.read_bytes()
    root = data.index(b"\x04\x00\x00\x12UL\x04\x00") + 8  # (0004,1200); 1202 follows
    patch_ul(dicomdir, root, second)
    patch_ul(dicomdir, root + 12, first)
    patch_ul(dicomdir, second + NEXT_AT, first)
    patch_ul(dicomdir, first + NEXT_AT, 0)
    with open_medium(folder) as medium:
        assert [p["id"] for p in summarize(medium)["patients"]] == ["P2", "P1"]


def test_broken_offset(folder: Path) -> None:
    dicomdir = folder / "DICOMDIR"
    first = patients(dicomdir)[0]
    patch_ul(dicomdir, first + NEXT_AT, first + 4)
    with open_medium(folder) as medium:
        tree = build_tree(read_dicomdir(medium))
        assert any("not the position" in p.message for p in tree.problems)
        assert any("not reachable" in p.message for p in tree.problems)
        summary = summarize(medium)  # read what can be read, say what is wrong
        assert not summary["complete"]
        assert any("not the position" in f["fault"] for f in summary["faults"])


def test_undefined_length_record_sequence(folder: Path) -> None:
    """Re-encoded with an undefined-length sequence: only a delimiter is added at the end."""
    dicomdir = folder / "DICOMDIR"
    ds = pydicom.dcmread(dicomdir)
    ds["DirectoryRecordSequence"].is_undefined_length = True
    ds.save_as(dicomdir)
    assert dicomdir.read_bytes().endswith(b"\xfe\xff\xdd\xe0\0\0\0\0")
    with open_medium(folder) as medium:
        assert summarize(medium)["counts"]["instances"] == 2


def test_cycle_is_reported_not_followed(folder: Path) -> None:
    dicomdir = folder / "DICOMDIR"
    first = patients(dicomdir)[0]
    patch_ul(dicomdir, first + NEXT_AT, first)
    with open_medium(folder) as medium:
        tree = build_tree(read_dicomdir(medium))
    assert any("second time" in p.message for p in tree.problems)


def test_lower_case_folder_resolves(folder: Path, tmp_path: Path) -> None:
    """A Linux ISO 9660 mount shows lower-case names; File IDs still resolve."""
    lower = lower_case_copy(folder, tmp_path / "mnt")
    with open_medium(lower) as medium:
        assert medium.resolve(CT_FILE) == CT_FILE.lower()
        assert medium.resolve("DICOMDIR") == "dicomdir"
        assert medium.resolve("NOPE") is None
        assert summarize(medium)["counts"]["instances"] == 2


# -- oracle --------------------------------------------------------------------------------


@pytest.mark.oracle
def test_offsets_agree_with_dcmdump(folder: Path) -> None:
    tool = shutil.which("dcmdump")
    if tool is None:
        pytest.skip("dcmdump not installed")
    dump = subprocess.run([tool, str(folder / "DICOMDIR")], capture_output=True, check=True,
                          timeout=60).stdout.decode("latin-1")
    dcmtk = {int(m) for m in re.findall(r"offset=\$([0-9]+)", dump)}  # decimal
    with open_medium(folder) as medium:
        tree = build_tree(read_dicomdir(medium))
    assert not tree.problems
    assert {node.offset for node, _ in tree.walk()} == dcmtk == set(tree.by_offset)
