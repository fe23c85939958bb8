"""Record keys come from the file as written onto the medium, for every conversion kind."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from mastering import profiles
from mastering.pipeline import Options, master
from mastering.verify import verify

from . import encodings as enc
from .conftest import dciodvfy_errors, make_ct

#: IMAGE keys of PS3.11 Table H.3-2 that a conversion may change or add
CHANGED_BY_DECODING = ("LossyImageCompressionRatio", "NumberOfFrames", "ImageType", "Rows")


def _inputs(folder: Path) -> dict[str, Path]:
    """One file per conversion kind a JPEG profile makes (sources kept out of folder)."""
    src = folder.parent / "src"
    out = {"copy": make_ct(folder, "copy.dcm", instance=1),
           "remeta": folder / "remeta.dcm",
           "reencode": make_ct(folder, "implicit.dcm", implicit=True, instance=3),
           "big_endian": enc.big_endian(make_ct(src, "b.dcm", instance=4), folder / "be.dcm"),
           "deflated": enc.deflated(make_ct(src, "d.dcm", instance=7), folder / "dfl.dcm"),
           "near_lossless": enc.without_ratio(enc.jpeg_ls(enc.with_noise(
               make_ct(src, "n.dcm", rows=64, instance=5)), folder / "jls_near.dcm", near=6)),
           "lossless_jls": enc.jpeg_ls(enc.with_noise(make_ct(src, "l.dcm", rows=64,
                                                              instance=6)),
                                       folder / "jls.dcm")}
    ds = pydicom.dcmread(make_ct(src, "r.dcm", instance=2))
    ds.preamble = None
    ds.save_as(out["remeta"], enforce_file_format=False)  # no preamble: a new meta header
    return out


@pytest.mark.oracle
def test_records_describe_the_converted_files(tmp_path: Path) -> None:
    """Near-lossless JPEG-LS decoded for a JPEG profile gets a Lossy Image Compression
    Ratio; its IMAGE record must carry it, or the medium fails verify (and --verify)."""
    inputs = _inputs(tmp_path / "in")
    profile = profiles.load("STD-GEN-USB-JPEG")
    report = master([tmp_path / "in"], tmp_path / "usb", Options(profile, workers=1,
                                                                  verify=True), kind="folder")
    assert report.ok and report.instances == len(inputs)
    kinds = {c["path"]: c["action"] for c in report.converted}
    assert kinds[str(inputs["near_lossless"])] == "decompress"
    dicomdir = tmp_path / "usb" / "DICOMDIR"
    assert dciodvfy_errors(dicomdir) == []
    assert verify(tmp_path / "usb", profile).ok
    dd = pydicom.dcmread(dicomdir)
    checked = 0
    for rec in dd.DirectoryRecordSequence:
        if rec.DirectoryRecordType != "IMAGE":
            continue
        ds = pydicom.dcmread(tmp_path / "usb" / Path(*rec.ReferencedFileID),
                             stop_before_pixels=True)
        for kw in CHANGED_BY_DECODING:
            assert (kw in rec) == (kw in ds), (kw, ds.SOPInstanceUID)
            if kw in ds:
                assert rec[kw].value == ds[kw].value
        checked += 1
        if ds.get("LossyImageCompression") == "01":
            assert float(rec.LossyImageCompressionRatio) > 1
    assert checked == len(inputs)
    assert any("LossyImageCompressionRatio" in r for r in dd.DirectoryRecordSequence)


@pytest.mark.oracle
def test_lossy_jpeg_decoded_for_j2k_profile_keeps_its_ratio(tmp_path: Path) -> None:
    src = enc.with_noise(make_ct(tmp_path / "src", "a.dcm", rows=64))
    (tmp_path / "in").mkdir()
    enc.dcmtk("dcmcjpeg", "+eb", src, tmp_path / "in" / "jpeg.dcm")
    enc.without_ratio(tmp_path / "in" / "jpeg.dcm")
    profile = profiles.load("STD-GEN-DVD-J2K")
    report = master([tmp_path / "in"], tmp_path / "d.iso", Options(profile, verify=True))
    assert report.ok
    assert verify(tmp_path / "d.iso", profile).ok


@pytest.mark.oracle
def test_keys_the_conversion_made_valid_are_taken_from_the_converted_file(
        tmp_path: Path) -> None:
    """A big endian source whose Image Orientation holds a TAB (invalid, left out of its
    record); the converted file holds it valid: its record carries it, as the file has it."""
    be = enc.big_endian(make_ct(tmp_path / "src", "a.dcm", instance=None),
                        tmp_path / "in" / "be.dcm")
    data = be.read_bytes()
    old = b"1.0\\0.0\\0.0\\0.0\\1.0\\0.0 "
    assert old in data
    be.write_bytes(data.replace(old, b"1\\0\\0\\0\\1.0\t\\0".ljust(len(old), b" ")))
    profile = profiles.load("STD-GEN-USB-JPEG")
    report = master([tmp_path / "in"], tmp_path / "usb", Options(profile, workers=1,
                                                                  verify=True), kind="folder")
    assert report.ok and report.conversions == {"transcode": 1}
    (image,) = [r for r in pydicom.dcmread(tmp_path / "usb" / "DICOMDIR").DirectoryRecordSequence
                if r.DirectoryRecordType == "IMAGE"]
    written = pydicom.dcmread(tmp_path / "usb" / Path(*image.ReferencedFileID))
    assert image.ImageOrientationPatient == written.ImageOrientationPatient
    assert image.InstanceNumber == 1  # the running number the planner gave the source
    assert not [f for f in report.filled if f["key"] == "ImageOrientationPatient"]
    assert dciodvfy_errors(tmp_path / "usb" / "DICOMDIR") == []
