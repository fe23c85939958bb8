"""The streamed implicit -> explicit re-encoding equals the full transcode, element by element."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mastering import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, part10, reencode
from mastering.transcode import transcode

from .conftest import make_ct, sample


def _streamed(src: Path, raw: bool = False) -> bytes:
    layout = part10.inspect(src)
    ds = pydicom.dcmread(src, stop_before_pixels=True, force=True)
    done = reencode.reencode(str(src), ds.SOPClassUID, ds.SOPInstanceUID,
                             layout.pixel_data_offset, layout.dataset_start if raw else -1)
    assert done is not None
    data = src.read_bytes()
    return done.head + data[done.pixel_offset:done.pixel_offset + done.pixel_length]


@pytest.mark.parametrize("raw", [False, True], ids=["pydicom", "bytes"])
@pytest.mark.parametrize("maker", ["generated", "MR_small_implicit.dcm", "rtdose.dcm",
                                   "nested_priv_SQ.dcm"])
def test_streamed_equals_transcoded(tmp_path: Path, maker: str, raw: bool) -> None:
    if maker == "generated":
        src = make_ct(tmp_path, "i.dcm", implicit=True, rows=32, value=7)
    elif maker == "nested_priv_SQ.dcm":  # private sequences, nested items: add pixels to it
        src = make_ct(tmp_path, "p.dcm", implicit=True, rows=4, SmallestImagePixelValue=0,
                      ReferencedImageSequence=pydicom.dcmread(sample("rtplan.dcm"))
                      .ReferencedStructureSetSequence)
    else:
        src = sample(maker)
    streamed = tmp_path / "s.dcm"
    streamed.write_bytes(_streamed(src, raw))
    full = io.BytesIO()
    transcode(src, full, ["1.2.840.10008.1.2.1"], implementation_class_uid=IMPLEMENTATION_CLASS_UID,
              implementation_version_name=IMPLEMENTATION_VERSION_NAME)
    a, b = pydicom.dcmread(streamed), pydicom.dcmread(io.BytesIO(full.getvalue()))
    assert a.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert not a.original_encoding[0]  # explicit VR
    assert part10.inspect(streamed).meta_complete
    assert [e.tag for e in a] == [e.tag for e in b]
    for elem in b:
        assert a[elem.tag].value == elem.value, elem
    assert np.array_equal(a.pixel_array, pydicom.dcmread(src, force=True).pixel_array)


def test_not_applicable_to_encapsulated(tmp_path: Path) -> None:
    src = sample("SC_rgb_jpeg.dcm")  # implicit VR body with JPEG fragments
    layout = part10.inspect(src)
    ds = pydicom.dcmread(src, stop_before_pixels=True, force=True)
    assert reencode.reencode(str(src), ds.SOPClassUID, ds.SOPInstanceUID,
                             layout.pixel_data_offset) is None


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "rtdose.dcm"])
def test_byte_level_path_is_taken(name: str) -> None:
    """The byte-level encoder must handle ordinary files itself, not hand them to pydicom."""
    src = sample(name)
    layout = part10.inspect(src)
    body = src.read_bytes()[layout.dataset_start:layout.pixel_data_offset]
    head = reencode.explicit_header(body, 16)
    assert head is not None and head.endswith(b"\xe0\x7f\x10\x00OW\x00\x00\x10\x00\x00\x00")


def test_ambiguous_vr_falls_back() -> None:
    """LUT Data is 'US or OW': left to pydicom, which knows the rules."""
    body = b"\x28\x00\x06\x30\x04\x00\x00\x00\x01\x00\x02\x00"
    assert reencode.explicit_header(body, 2) is None


def test_private_creator_is_lo_and_odd_values_are_padded(tmp_path: Path) -> None:
    src = make_ct(tmp_path, "p.dcm", implicit=True, rows=4, StudyDescription="ABCD")
    ds = pydicom.dcmread(src)
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "private value")
    ds.save_as(src)
    data = src.read_bytes()
    # make Study Description odd-length (ABCD -> ABC), as some modalities write it
    odd = data.replace(b"\x08\x00\x30\x10\x04\x00\x00\x00ABCD",
                       b"\x08\x00\x30\x10\x03\x00\x00\x00ABC")
    assert odd != data
    src.write_bytes(odd)
    layout = part10.inspect(src)
    body = odd[layout.dataset_start:layout.pixel_data_offset]
    head = reencode.explicit_header(body, 32)
    assert head is not None
    assert b"\x09\x00\x10\x00LO\x08\x00ACME 1.0" in head  # creator: LO, not UN
    assert b"\x08\x00\x30\x10LO\x04\x00ABC " in head  # padded to even length
