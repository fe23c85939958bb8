"""The structural checker must catch what pydicom silently accepts: truncation anywhere."""

from __future__ import annotations

import zlib
from pathlib import Path

import pydicom
import pytest

from mastering import intake, part10, profiles
from mastering.part10 import NotDicomError, StructureError

from .conftest import make_ct, sample


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "rtplan.dcm",
                                  "JPEG2000.dcm", "SC_rgb_rle.dcm", "test-SR.dcm",
                                  "image_dfl.dcm", "rtstruct.dcm", "UN_sequence.dcm"])
def test_sound_files_pass(name: str) -> None:
    layout = part10.inspect(sample(name))
    assert layout.size == sample(name).stat().st_size


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm", "SC_rgb_rle.dcm"])
def test_every_truncation_is_detected(name: str, tmp_path: Path, cd_profile) -> None:
    """Cut an image at many points past the meta header: intake must refuse each cut, although
    pydicom reads most of them without complaint. A cut that falls exactly between two elements
    leaves a well-formed but shorter data set; for images the missing Pixel Data gives it away."""
    data = sample(name).read_bytes()
    start = part10.inspect(sample(name)).dataset_start
    silent = 0
    cuts = sorted(set(range(start + 1, len(data), max(1, (len(data) - start) // 150))))
    for cut in cuts:
        path = tmp_path / "cut.dcm"
        path.write_bytes(data[:cut])
        found = intake.scan_file(str(path), cd_profile)
        assert isinstance(found, intake.Problem), f"cut at {cut} of {len(data)} not detected"
        assert found.kind == "invalid"
        try:
            pydicom.dcmread(path, force=True)
            silent += 1
        except Exception:  # noqa: BLE001
            pass
    assert silent > 0  # pydicom really does read some of these silently


def test_pydicoms_truncated_files_are_refused() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(StructureError, match="truncated"):
            part10.inspect(sample(name))


def test_non_dicom_is_told_apart(tmp_path: Path) -> None:
    for name, data in (("a.txt", b"hello world, not DICOM at all" * 10),
                       ("b.json", b'{"00100010": {"vr": "PN"}}' * 5)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(NotDicomError):
            part10.inspect(tmp_path / name)
    for data in (b"", b"\0", b"\0\0", b"hi", b"hello\n"):  # too short to be anything
        (tmp_path / "tiny").write_bytes(data)
        with pytest.raises(NotDicomError):
            part10.inspect(tmp_path / "tiny")
    for data in (b"\x08\x00", b"\x02\x00\x00\x00UL", b"\x00\x08\x00\x05"):  # DICOM, cut
        (tmp_path / "tiny").write_bytes(data)
        with pytest.raises(StructureError):
            part10.inspect(tmp_path / "tiny")
    (tmp_path / "prefix").write_bytes(b"\0" * 128 + b"DICM\x02\x00")  # prefix, no meta
    with pytest.raises(StructureError):
        part10.inspect(tmp_path / "prefix")


def test_body_disagreeing_with_meta(tmp_path: Path) -> None:
    """Meta says explicit, body is implicit: the body's encoding wins (as in pydicom)."""
    layout = part10.inspect(sample("SC_rgb_jpeg.dcm"))
    assert layout.meta_ts == "1.2.840.10008.1.2.4.50"
    assert layout.body_ts == part10.IMPLICIT_LE
    assert layout.body_disagrees and not layout.meta_complete


def test_no_meta_and_no_preamble() -> None:
    layout = part10.inspect(sample("rtstruct.dcm"))
    assert not layout.has_preamble and layout.meta_ts is None
    assert layout.body_ts == part10.IMPLICIT_LE
    layout = part10.inspect(sample("ExplVR_BigEndNoMeta.dcm"))
    assert layout.body_ts == part10.EXPLICIT_BE


def test_deflated_truncation(tmp_path: Path) -> None:
    data = sample("image_dfl.dcm").read_bytes()
    (tmp_path / "d.dcm").write_bytes(data[:-40])
    with pytest.raises(StructureError, match="deflate"):
        part10.inspect(tmp_path / "d.dcm")
    assert zlib  # the module inflates with zlib; nothing else to check here


def test_trailing_garbage_is_refused(tmp_path: Path) -> None:
    path = make_ct(tmp_path, "a.dcm")
    path.write_bytes(path.read_bytes() + b"\x01\x02\x03")
    with pytest.raises(StructureError):
        part10.inspect(path)


def test_build_meta_is_read_back_by_pydicom(tmp_path: Path) -> None:
    src = make_ct(tmp_path, "a.dcm")
    layout = part10.inspect(src)
    ds = pydicom.dcmread(src)
    meta = part10.build_meta(ds.SOPClassUID, ds.SOPInstanceUID, part10.EXPLICIT_LE, "1.2.3", "X")
    out = tmp_path / "b.dcm"
    out.write_bytes(meta + src.read_bytes()[layout.dataset_start:])
    back = pydicom.dcmread(out)
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.FileMetaInformationGroupLength == len(meta) - 132 - 12
    assert part10.inspect(out).meta_complete


def test_nested_elements_are_not_top_level(tmp_path: Path) -> None:
    """A Patient ID inside a defined-length item (Other Patient IDs Sequence) and an icon's
    Pixel Data must not be taken for the data set's own."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    src = sample("CT_small.dcm")
    ds = pydicom.dcmread(src)
    other, icon = Dataset(), Dataset()
    other.PatientID = "NESTED-ID"
    icon.Rows = icon.Columns = 2
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.PixelData = b"\0" * 4
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.IconImageSequence = Sequence([icon])
    ds.save_as(tmp_path / "n.dcm")
    layout = part10.inspect(tmp_path / "n.dcm", collect=frozenset({0x00100020}))
    assert layout.elements[0x00100020][1].endswith(b"1CT1")
    data = (tmp_path / "n.dcm").read_bytes()
    assert data[layout.pixel_data_offset:layout.pixel_data_offset + 4] == b"\xe0\x7f\x10\x00"
    assert layout.pixel_data_offset > data.index(b"NESTED-ID")
    found = intake.scan_file(str(tmp_path / "n.dcm"), profiles.load("STD-GEN-CD"))
    assert found.patient_id == "1CT1"
