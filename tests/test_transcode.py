"""Tests for mastering.transcode, on pydicom's bundled test files.

Each family of source transfer syntax is converted and the result is checked against the source:
meta header, transfer syntax, SOP Instance UID, every non-pixel element, and the decoded pixels
(also against the uncompressed twin file where pydicom ships one). dcmdump, dciodvfy and DCMTK's
decoders act as independent oracles (marked ``oracle``).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import RLELossless

from mastering import transcode as tc
from mastering.transcode import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    TranscodeError,
    TranscodeResult,
    needs_transcode,
    transcode,
)

ELE = EXPLICIT_VR_LITTLE_ENDIAN
ILE = "1.2.840.10008.1.2"
EBE = "1.2.840.10008.1.2.2"
DEFLATE = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"

GENERAL = (ELE,)  # STD-GEN-CD / -DVD-RAM / -BD
JPEG_PROFILE = (ELE, JPEG_LOSSLESS_SV1, JPEG_BASELINE, JPEG_EXTENDED)  # STD-GEN-*-JPEG
J2K_PROFILE = (ELE, J2K_LOSSLESS, J2K)  # STD-GEN-*-J2K

IMPL_UID = "2.25.176416913538478125325407209347861129393"
IMPL_VERSION = "MASTERING_010"

#: Elements decoding may change (PS3.3 C.7.6.3, C.7.6.1.1.5); compared separately.
DECODING_IMPLIED = {
    0x00280004,  # Photometric Interpretation
    0x00280006,  # Planar Configuration
    0x00280008,  # Number of Frames
    0x00282110,  # Lossy Image Compression
    0x00282112,  # Lossy Image Compression Ratio
    0x00282114,  # Lossy Image Compression Method
}
SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- helpers -------------------------------------------------------------------------------


def data(name: str) -> Path:
    return Path(get_testdata_file(name))


def read(path: Path | io.BytesIO) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def run(
    source: Path, allowed: tuple[str, ...] = GENERAL, tmp_path: Path | None = None
) -> tuple[TranscodeResult, bytes]:
    buffer = io.BytesIO()
    result = transcode(
        source,
        buffer,
        allowed,
        implementation_class_uid=IMPL_UID,
        implementation_version_name=IMPL_VERSION,
    )
    payload = buffer.getvalue()
    assert result.bytes_written == len(payload)
    if tmp_path is not None:
        (tmp_path / "out.dcm").write_bytes(payload)
    return result, payload


def pixels(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def walk(ds: Dataset, path: tuple = ()) -> Iterator[tuple[tuple, pydicom.DataElement]]:
    for elem in ds:
        yield (*path, elem.tag), elem
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                yield from walk(item, (*path, elem.tag, index))


def native(elem: pydicom.DataElement, big_endian: bool) -> object:
    """Value in a form that does not depend on the byte order it was read in."""
    if elem.VR in SWAP and isinstance(elem.value, bytes) and big_endian:
        width = SWAP[elem.VR]
        return np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()
    return elem.value


def assert_same_elements(src: Dataset, out: Dataset, ignore: set[int] = frozenset()) -> None:
    """Every source element is in `out` with the same value; nothing was added."""
    big_endian = src.original_encoding[1] is False
    src_elems = {
        key: e
        for key, e in walk(src)
        if key[-1] >> 16 not in (0, 2) and key[-1] & 0xFFFF and key[-1] not in ignore
    }
    out_elems = {key: e for key, e in walk(out) if key[-1] not in ignore}
    assert set(out_elems) == set(src_elems)
    for key, elem in src_elems.items():
        if elem.VR == "SQ" or elem.tag == 0x7FE00010:
            continue
        assert native(out_elems[key], False) == native(elem, big_endian), key


def assert_part10(payload: bytes, ts: str, src: Dataset) -> Dataset:
    """Preamble, 'DICM', meta header as PS3.10 7.1 requires, transfer syntax `ts`."""
    assert payload[:128] == b"\x00" * 128
    assert payload[128:132] == b"DICM"
    out = read(io.BytesIO(payload))
    meta = out.file_meta
    assert meta.TransferSyntaxUID == ts
    assert meta.MediaStorageSOPClassUID == src.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
    assert meta.ImplementationClassUID == IMPL_UID
    assert meta.ImplementationVersionName == IMPL_VERSION
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert out.SOPInstanceUID == src.SOPInstanceUID
    assert body_encoding(out) == (False, True)
    return out


def body_encoding(ds: Dataset) -> tuple[bool, bool]:
    """(implicit VR, little endian) the body was really read in (raw elements know it)."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, pydicom.dataelem.RawDataElement):
            return elem.is_implicit_VR, elem.is_little_endian
    raise AssertionError("no raw element left")


def assert_native_pixel_vr(out: Dataset) -> None:
    """PS3.5 A.2: OW for Bits Allocated > 8, OB or OW otherwise; even length."""
    elem = out["PixelData"]
    assert not elem.is_undefined_length
    assert len(elem.value) % 2 == 0
    assert elem.VR == "OW" if out.BitsAllocated > 8 else elem.VR in ("OB", "OW")


# --- needs_transcode -----------------------------------------------------------------------


def test_needs_transcode_jpeg_allowed_by_jpeg_profile() -> None:
    assert not needs_transcode(JPEG_BASELINE, JPEG_PROFILE)
    assert not needs_transcode(JPEG_BASELINE + "\x00", JPEG_PROFILE)
    assert needs_transcode(JPEG_BASELINE, GENERAL)
    assert needs_transcode(JPEG_BASELINE, J2K_PROFILE)


@pytest.mark.parametrize("ts", [ILE, EBE, DEFLATE, RLE, JLS_LOSSLESS, JLS_NEAR, J2K])
def test_needs_transcode_not_in_any_jpeg_profile(ts: str) -> None:
    assert needs_transcode(ts, JPEG_PROFILE)


def test_needs_transcode_ele_never() -> None:
    for profile in (GENERAL, JPEG_PROFILE, J2K_PROFILE):
        assert not needs_transcode(ELE, profile)


# --- rule 2: re-encoding without pixel decoding --------------------------------------------


@pytest.mark.parametrize(
    ("name", "twin", "source_ts"),
    [
        ("MR_small_implicit.dcm", "MR_small.dcm", ILE),
        ("rtdose.dcm", None, ILE),  # 32-bit, 15 frames
        ("MR_small_bigendian.dcm", "MR_small.dcm", EBE),  # OW 16-bit
        ("rtdose_expb.dcm", "rtdose.dcm", EBE),  # OW 32-bit, 15 frames
        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm", EBE),  # 8-bit OW, odd
        ("liver_expb_1frame.dcm", "liver_1frame.dcm", EBE),  # 1-bit OB
        ("ExplVR_BigEnd.dcm", None, EBE),
        ("image_dfl.dcm", None, DEFLATE),
        ("CT_small.dcm", None, ELE),  # already allowed: rewritten with a fresh meta header
    ],
)
def test_reencode_lossless(name: str, twin: str | None, source_ts: str) -> None:
    src = read(data(name))
    result, payload = run(data(name))
    assert result == TranscodeResult(source_ts, ELE, "reencode", None, len(payload))
    out = assert_part10(payload, ELE, src)
    assert_same_elements(src, out)
    assert_native_pixel_vr(out)
    assert np.array_equal(pixels(out), pixels(src))
    if twin:
        assert np.array_equal(pixels(out), pixels(read(data(twin))))


def test_big_endian_pixel_bytes_match_little_endian_twin() -> None:
    _, payload = run(data("MR_small_bigendian.dcm"))
    assert read(io.BytesIO(payload)).PixelData == read(data("MR_small.dcm")).PixelData


def test_big_endian_other_vrs_are_swapped(tmp_path: Path) -> None:
    """OW/OF/OL/OD values, also inside sequences, come out as the same numbers."""
    words = np.arange(1, 9, dtype=np.uint16)
    floats = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    longs = np.array([1, 70000], dtype=np.uint32)
    doubles = np.array([0.1, -1e300], dtype=np.float64)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.add_new(0x7FE00010, "OW", np.array([1, 2, 3, 0xABCD], ">u2").tobytes())
    item = Dataset()
    item.LUTDescriptor = [8, 0, 16]
    item.add_new(0x00283006, "OW", words.astype(">u2").tobytes())
    ds.ModalityLUTSequence = [item]
    ds.add_new(0x00660016, "OF", floats.astype(">f4").tobytes())
    ds.add_new(0x00660040, "OL", longs.astype(">u4").tobytes())
    ds.add_new(0x00660022, "OD", doubles.astype(">f8").tobytes())
    source = tmp_path / "be.dcm"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EBE
    ds.save_as(source, enforce_file_format=True)

    result, payload = run(source)
    assert result.source_ts == EBE
    out = read(io.BytesIO(payload))
    lut = out.ModalityLUTSequence[0][0x00283006]
    assert lut.VR == "OW"
    assert np.array_equal(np.frombuffer(lut.value, "<u2"), words)
    assert np.array_equal(np.frombuffer(out[0x00660016].value, "<f4"), floats)
    assert np.array_equal(np.frombuffer(out[0x00660040].value, "<u4"), longs)
    assert np.array_equal(np.frombuffer(out[0x00660022].value, "<f8"), doubles)
    assert pixels(out).ravel().tolist() == [1, 2, 3, 0xABCD]
    assert out.ModalityLUTSequence[0].LUTDescriptor == [8, 0, 16]


# --- rule 6: no meta header ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source_ts"),
    [("rtstruct.dcm", ILE), ("ExplVR_LitEndNoMeta.dcm", ELE), ("ExplVR_BigEndNoMeta.dcm", EBE)],
)
def test_no_meta_header(name: str, source_ts: str) -> None:
    src = read(data(name))
    assert not src.file_meta
    result, payload = run(data(name))
    assert (result.source_ts, result.target_ts, result.action) == (source_ts, ELE, "reencode")
    assert_same_elements(src, assert_part10(payload, ELE, src))


def test_no_meta_implicit_image(tmp_path: Path) -> None:
    """A bare implicit VR data set (PS3.5 A.1) with pixels, as some archives export."""
    twin = read(data("MR_small.dcm"))
    bare = Dataset(twin)
    source = tmp_path / "bare.dcm"
    pydicom.dcmwrite(source, bare, implicit_vr=True, little_endian=True)
    assert source.read_bytes()[:2] == b"\x08\x00"  # no preamble, no meta
    result, payload = run(source)
    assert (result.source_ts, result.action) == (ILE, "reencode")
    out = assert_part10(payload, ELE, twin)
    assert out.PixelData == twin.PixelData
    assert_same_elements(twin, out)


# --- VR switch: body disagrees with the meta header ------------------------------------------


def test_vr_switch_jpeg_decompressed_for_general_profile() -> None:
    """SC_rgb_jpeg.dcm: meta says JPEG Baseline (explicit VR), the body is implicit VR."""
    src = read(data("SC_rgb_jpeg.dcm"))
    assert body_encoding(src) == (True, True)
    result, payload = run(data("SC_rgb_jpeg.dcm"))
    assert (result.source_ts, result.action) == (JPEG_BASELINE, "decompress")
    out = assert_part10(payload, ELE, src)
    assert np.array_equal(pixels(out), pixels(src))
    assert_same_elements(src, out, ignore=DECODING_IMPLIED)


def test_vr_switch_jpeg_kept_compressed_for_jpeg_profile() -> None:
    src = read(data("SC_rgb_jpeg.dcm"))
    result, payload = run(data("SC_rgb_jpeg.dcm"), JPEG_PROFILE)
    assert result == TranscodeResult(JPEG_BASELINE, JPEG_BASELINE, "reencode", None, len(payload))
    out = assert_part10(payload, JPEG_BASELINE, src)
    assert out["PixelData"].is_undefined_length and out["PixelData"].VR == "OB"
    assert out.PixelData == src.PixelData
    assert_same_elements(src, out)


def test_vr_switch_meta_explicit_body_implicit(tmp_path: Path) -> None:
    """Meta says Explicit VR LE, body is implicit: the body's syntax is reported and fixed."""
    raw = data("MR_small_implicit.dcm").read_bytes()
    src = read(data("MR_small_implicit.dcm"))
    offset = 132 + 12 + src.file_meta.FileMetaInformationGroupLength
    meta = FileMetaDataset(src.file_meta)
    meta.TransferSyntaxUID = ELE
    header = DicomBytesIO()
    write_file_meta_info(header, meta)
    lying = tmp_path / "lying.dcm"
    lying.write_bytes(b"\x00" * 128 + b"DICM" + header.getvalue() + raw[offset:])
    result, payload = run(lying)
    assert (result.source_ts, result.target_ts) == (ILE, ELE)
    out = assert_part10(payload, ELE, src)
    assert_same_elements(src, out)
    assert np.array_equal(pixels(out), pixels(read(data("MR_small.dcm"))))


# --- rule 3: decompression -----------------------------------------------------------------

DECOMPRESS_CASES = [
    # name, lossless twin, source TS, expected decoder, lossy
    ("SC_rgb_jpeg_dcmtk.dcm", None, JPEG_BASELINE, "gdcm", True),  # YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", None, JPEG_BASELINE, "gdcm", True),  # YBR_FULL_422
    ("SC_rgb_small_odd_jpeg.dcm", None, JPEG_BASELINE, "gdcm", True),  # odd length
    ("examples_ybr_color.dcm", None, JPEG_BASELINE, "gdcm", True),  # 30 frames
    ("JPGExtended.dcm", None, JPEG_EXTENDED, "pylibjpeg", True),  # 12-bit
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", JPEG_LOSSLESS_SV1, "gdcm", False),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", JLS_LOSSLESS, "gdcm", False),
    ("JPEGLSNearLossless_16.dcm", None, JLS_NEAR, "gdcm", True),
    ("SC_rgb_jls_lossy_line.dcm", None, JLS_NEAR, "gdcm", True),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", J2K_LOSSLESS, "gdcm", False),
    ("GDCMJ2K_TextGBR.dcm", None, J2K_LOSSLESS, "gdcm", False),  # YBR_RCT
    ("JPEG2000.dcm", None, J2K, "gdcm", True),
    ("SC_rgb_gdcm_KY.dcm", None, J2K, "gdcm", True),
    ("MR_small_RLE.dcm", "MR_small.dcm", RLE, "pylibjpeg", False),
    ("SC_rgb_rle_16bit_2frame.dcm", None, RLE, "pylibjpeg", False),
    ("rtdose_rle.dcm", "rtdose.dcm", RLE, "pylibjpeg", False),  # 32-bit, 15 frames
]


@pytest.mark.parametrize(("name", "twin", "source_ts", "decoder", "lossy"), DECOMPRESS_CASES)
def test_decompress(name: str, twin: str | None, source_ts: str, decoder: str, lossy: bool) -> None:
    src = read(data(name))
    expected = pixels(src)
    result, payload = run(data(name))
    assert result == TranscodeResult(source_ts, ELE, "decompress", decoder, len(payload))
    out = assert_part10(payload, ELE, src)
    assert_native_pixel_vr(out)
    assert np.array_equal(pixels(out), expected)
    if twin:
        assert np.array_equal(pixels(out), pixels(read(data(twin))))
    assert_same_elements(src, out, ignore=DECODING_IMPLIED)
    if src.SamplesPerPixel > 1:
        assert out.PlanarConfiguration == 0
        assert out.PhotometricInterpretation in ("RGB", src.PhotometricInterpretation)
    else:
        assert out.PhotometricInterpretation == src.PhotometricInterpretation
    assert out.get("NumberOfFrames") == src.get("NumberOfFrames")
    if lossy:
        assert out.LossyImageCompression == "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in src:
                assert out[keyword].value == src[keyword].value
    else:
        assert out.get("LossyImageCompression") == src.get("LossyImageCompression")
        assert "LossyImageCompressionMethod" not in out


def test_decompressed_ybr_becomes_rgb() -> None:
    src = read(data("SC_rgb_dcmtk_+eb+cy+np.dcm"))
    assert src.PhotometricInterpretation == "YBR_FULL_422"
    _, payload = run(data("SC_rgb_dcmtk_+eb+cy+np.dcm"))
    out = read(io.BytesIO(payload))
    assert out.PhotometricInterpretation == "RGB"
    assert len(out.PixelData) == 100 * 100 * 3


def test_decompressed_j2k_rct_becomes_rgb() -> None:
    _, payload = run(data("GDCMJ2K_TextGBR.dcm"))
    assert read(io.BytesIO(payload)).PhotometricInterpretation == "RGB"


def test_sop_instance_uid_is_kept_by_decompression() -> None:
    src = read(data("SC_rgb_jpeg_dcmtk.dcm"))
    _, payload = run(data("SC_rgb_jpeg_dcmtk.dcm"))
    out = read(io.BytesIO(payload))
    assert out.SOPInstanceUID == src.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID


def test_lossless_ybr_full_is_kept_bit_exact(tmp_path: Path) -> None:
    """RLE holding YBR_FULL: a lossless source is not colour-converted (that would round)."""
    ds = read(data("SC_rgb_small_odd.dcm"))
    rgb = pixels(ds)
    ybr = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL")
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = ybr.tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    source = tmp_path / "ybr_rle.dcm"
    ds.save_as(source, enforce_file_format=True)
    result, payload = run(source)
    assert result.action == "decompress"
    out = read(io.BytesIO(payload))
    assert out.PhotometricInterpretation == "YBR_FULL"
    assert out.PixelData[: ybr.size] == ybr.tobytes()
    assert "LossyImageCompression" not in out


def test_nested_icon_pixel_data_is_decoded(tmp_path: Path) -> None:
    """An RLE Icon Image Sequence inside an RLE image is decoded too (PS3.5 A.4)."""
    ds = read(data("MR_small_RLE.dcm"))
    rgb = read(data("SC_rgb_rle.dcm"))
    icon = Dataset()
    for keyword in (
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    ):
        icon[keyword] = rgb[keyword]
    ds.IconImageSequence = [icon]
    source = tmp_path / "with_icon.dcm"
    ds.save_as(source)
    _, payload = run(source)
    out = read(io.BytesIO(payload))
    out_icon = out.IconImageSequence[0]
    assert not out_icon["PixelData"].is_undefined_length
    icon_pixels = np.frombuffer(out_icon.PixelData, np.uint8).reshape(100, 100, 3)
    assert np.array_equal(icon_pixels, pixels(rgb))
    assert out_icon["PixelData"].VR == "OB"
    assert np.array_equal(pixels(out), pixels(read(data("MR_small.dcm"))))


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "ISO_10918_1"),
        ("JPEG2000.dcm", "ISO_15444_1"),  # irreversible 9-7 wavelet
        ("JPEGLSNearLossless_08.dcm", "ISO_14495_1"),  # NEAR = 2
    ],
)
def test_lossy_source_without_history_is_flagged(name: str, method: str, tmp_path: Path) -> None:
    ds = read(data(name))
    for keyword in (
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    ):
        if keyword in ds:
            del ds[keyword]
    source = tmp_path / "nohistory.dcm"
    ds.save_as(source)
    _, payload = run(source)
    out = read(io.BytesIO(payload))
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == method
    assert float(out.LossyImageCompressionRatio) > 1


def test_lossy_ratio_is_kept_and_method_added() -> None:
    src = read(data("JPEG2000.dcm"))
    assert "LossyImageCompressionMethod" not in src
    _, payload = run(data("JPEG2000.dcm"))
    out = read(io.BytesIO(payload))
    assert out.LossyImageCompressionRatio == src.LossyImageCompressionRatio
    assert out.LossyImageCompressionMethod == "ISO_15444_1"


def test_allowed_compressed_syntax_is_kept() -> None:
    for name, profile, ts in [
        ("SC_rgb_jpeg_dcmtk.dcm", JPEG_PROFILE, JPEG_BASELINE),
        ("MR_small_jp2klossless.dcm", J2K_PROFILE, J2K_LOSSLESS),
    ]:
        src = read(data(name))
        result, payload = run(data(name), profile)
        assert (result.action, result.target_ts, result.decoder) == ("reencode", ts, None)
        out = assert_part10(payload, ts, src)
        assert out.PixelData == src.PixelData
        assert_same_elements(src, out)


def test_disallowed_jpeg_in_j2k_profile_is_decompressed() -> None:
    result, _ = run(data("SC_rgb_jpeg_dcmtk.dcm"), J2K_PROFILE)
    assert (result.action, result.target_ts) == ("decompress", ELE)


# --- rule 4: DCMTK fallback ----------------------------------------------------------------


def dcmtk_pixels(tool: str, source: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / f"{tool}.dcm"
    subprocess.run([tool, "+ud", "+te", str(source), str(out)], check=True, capture_output=True)
    return pixels(read(out))


@pytest.mark.oracle
def test_jpeg_12bit_falls_back_to_dcmdjpeg(tmp_path: Path) -> None:
    """JPEG-lossy.dcm: gdcm refuses 12-bit, libjpeg rejects its SOS; dcmdjpeg decodes it."""
    src = read(data("JPEG-lossy.dcm"))
    with pytest.raises(RuntimeError):
        pixels(src)
    result, payload = run(data("JPEG-lossy.dcm"))
    assert result == TranscodeResult(JPEG_EXTENDED, ELE, "decompress", "dcmdjpeg", len(payload))
    out = assert_part10(payload, ELE, src)
    assert_native_pixel_vr(out)
    assert_same_elements(src, out, ignore=DECODING_IMPLIED)
    assert out.LossyImageCompression == "01"
    assert np.array_equal(pixels(out), dcmtk_pixels("dcmdjpeg", data("JPEG-lossy.dcm"), tmp_path))
    # JPGExtended.dcm is the repaired copy: libjpeg's IDCT differs by at most one grey level
    fixed = pixels(read(data("JPGExtended.dcm")))
    assert np.abs(pixels(out).astype(int) - fixed).max() <= 1


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("name", "twin", "tool"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", "dcmdjpls"),
        ("JPEGLSNearLossless_08.dcm", None, "dcmdjpls"),
        ("MR_small_RLE.dcm", "MR_small.dcm", "dcmdrle"),
        ("SC_rgb_rle_2frame.dcm", None, "dcmdrle"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "dcmdjpeg"),
    ],
)
def test_dcmtk_fallback_when_no_plugin_decodes(
    name: str, twin: str | None, tool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_plugin(ds: Dataset, ts: str, errors: list[str]) -> None:
        errors.append("simulated: no plugin")

    monkeypatch.setattr(tc, "_decode_python", no_plugin)
    src = read(data(name))
    result, payload = run(data(name))
    assert (result.action, result.decoder) == ("decompress", tool)
    out = assert_part10(payload, ELE, src)
    assert np.array_equal(pixels(out), pixels(src))
    if twin:
        assert np.array_equal(pixels(out), pixels(read(data(twin))))
    assert_same_elements(src, out, ignore=DECODING_IMPLIED)


# --- rule 7: errors --------------------------------------------------------------------------


def test_undecodable_pixel_data_raises() -> None:
    name = data("JPEG2000-embedded-sequence-delimiter.dcm")
    buffer = io.BytesIO(b"keep")
    buffer.seek(4)
    with pytest.raises(TranscodeError) as info:
        transcode(
            name,
            buffer,
            GENERAL,
            implementation_class_uid=IMPL_UID,
            implementation_version_name=IMPL_VERSION,
        )
    assert str(info.value).startswith(f"{name}: ")
    assert buffer.getvalue() == b"keep"


@pytest.mark.parametrize("content", [b"", b"not a dicom file at all" * 10])
def test_not_dicom_raises(content: bytes, tmp_path: Path) -> None:
    source = tmp_path / "junk.dcm"
    source.write_bytes(content)
    with pytest.raises(TranscodeError, match=r"junk\.dcm: "):
        run(source)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TranscodeError, match="missing.dcm: "):
        run(tmp_path / "missing.dcm")


def test_no_sop_instance_uid_raises() -> None:
    with pytest.raises(TranscodeError, match="SOPInstanceUID"):
        run(data("meta_missing_tsyntax.dcm"))


def test_unknown_transfer_syntax_raises(tmp_path: Path) -> None:
    ds = read(data("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    source = tmp_path / "private_ts.dcm"
    ds.save_as(source, implicit_vr=False, little_endian=True)
    with pytest.raises(TranscodeError, match="unsupported transfer syntax 1.2.3.4.5"):
        run(source)


def test_ele_not_allowed_raises() -> None:
    with pytest.raises(TranscodeError, match="never re-compressed"):
        run(data("MR_small_implicit.dcm"), (JPEG_BASELINE,))


def test_partial_output_is_truncated(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tc, "dcmwrite", broken)
    buffer = io.BytesIO()
    with pytest.raises(TranscodeError, match="disk full"):
        run_into(data("MR_small.dcm"), buffer)
    assert buffer.getvalue() == b""


def run_into(source: Path, dst: object) -> TranscodeResult:
    return transcode(
        source,
        dst,
        GENERAL,
        implementation_class_uid=IMPL_UID,
        implementation_version_name=IMPL_VERSION,
    )


def test_bad_implementation_values() -> None:
    with pytest.raises(ValueError):
        transcode(
            data("CT_small.dcm"),
            io.BytesIO(),
            GENERAL,
            implementation_class_uid=IMPL_UID,
            implementation_version_name="X" * 17,
        )


def test_non_seekable_destination() -> None:
    class Sink:
        def __init__(self) -> None:
            self.chunks: list[bytes] = []

        def write(self, chunk: bytes) -> int:
            self.chunks.append(bytes(chunk))
            return len(chunk)

    sink = Sink()
    result = run_into(data("MR_small_RLE.dcm"), sink)
    payload = b"".join(sink.chunks)
    assert result.bytes_written == len(payload)
    assert np.array_equal(pixels(read(io.BytesIO(payload))), pixels(read(data("MR_small.dcm"))))


# --- independent oracles ---------------------------------------------------------------------

ORACLE_FILES = [
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "rtdose_expb.dcm",
    "image_dfl.dcm",
    "SC_rgb_jpeg.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "examples_ybr_color.dcm",
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "rtdose_rle.dcm",
    "rtstruct.dcm",
]


@pytest.mark.oracle
@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump not installed")
@pytest.mark.parametrize("name", ORACLE_FILES)
def test_dcmdump_parses_output(name: str, tmp_path: Path) -> None:
    result, _ = run(data(name), tmp_path=tmp_path)
    proc = subprocess.run(["dcmdump", str(tmp_path / "out.dcm")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    assert result.target_ts == ELE
    assert "(0002,0010) UI =LittleEndianExplicit" in proc.stdout
    assert "# Used TransferSyntax: Little Endian Explicit" in proc.stdout


@pytest.mark.oracle
@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump not installed")
def test_dcmdump_parses_rewrapped_jpeg(tmp_path: Path) -> None:
    """The implicit-VR body of SC_rgb_jpeg.dcm rewritten as real JPEG Baseline (explicit VR)."""
    run(data("SC_rgb_jpeg.dcm"), JPEG_PROFILE, tmp_path=tmp_path)
    proc = subprocess.run(["dcmdump", str(tmp_path / "out.dcm")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    assert "=JPEGBaseline" in proc.stdout
    assert "(0028,0010) US 256" in proc.stdout


def dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return {line for line in proc.stderr.splitlines() if line.startswith("Error")}


@pytest.mark.oracle
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "examples_ybr_color.dcm",
        "JPEG-lossy.dcm",
        "JPEGLSNearLossless_08.dcm",
        "MR_small_RLE.dcm",
    ],
)
def test_dciodvfy_finds_no_new_errors(name: str, tmp_path: Path) -> None:
    run(data(name), tmp_path=tmp_path)
    before = dciodvfy_errors(data(name))
    after = dciodvfy_errors(tmp_path / "out.dcm")
    assert after <= before, after - before
