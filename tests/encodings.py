"""One data set written in other encodings (PS3.5 A.1-A.5), for the tests that need the same
object twice: big endian with its pixel words swapped, implicit VR, deflated, and lossless
or near-lossless JPEG-LS / JPEG made with DCMTK's encoders."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from .conftest import need

_WORDS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(ds: pydicom.Dataset) -> None:
    """Other-word values (bytes to pydicom) in big endian order, nested ones too (PS3.5 7.3)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_words(item)
        elif elem.VR in _WORDS and isinstance(elem.value, bytes) and elem.tag != 0x7FE00010:
            width = _WORDS[elem.VR]
            elem.value = np.frombuffer(elem.value, f"<u{width}").astype(f">u{width}").tobytes()


def big_endian(src: Path, dst: Path) -> Path:
    """The same object in Explicit VR Big Endian (PS3.5 A.3): OW pixel words and other word
    values byte-swapped, numbers swapped by pydicom."""
    ds = pydicom.dcmread(src)
    _swap_words(ds)
    if "PixelData" in ds and int(ds.BitsAllocated) > 8:
        width = int(ds.BitsAllocated) // 8
        ds.PixelData = np.frombuffer(ds.PixelData, f"<u{width}").astype(f">u{width}").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(dst, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    return dst


def implicit(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(dst, ds, implicit_vr=True, little_endian=True, force_encoding=True)
    return dst


def deflated(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def dcmtk(tool: str, *args: str | Path) -> None:
    res = subprocess.run([need(tool), *map(str, args)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def jpeg_ls(src: Path, dst: Path, near: int = 0) -> Path:
    """JPEG-LS lossless (near=0) or near-lossless with that maximum deviation (dcmcjpls)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dcmtk("dcmcjpls", *(("+en", "+md", str(near)) if near else ()), src, dst)
    return dst


def jpeg_lossless(src: Path, dst: Path) -> Path:
    """JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1, dcmcjpeg)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dcmtk("dcmcjpeg", "+e1", src, dst)
    return dst


def with_noise(path: Path, seed: int = 7) -> Path:
    """Fill the pixel data with noise, so lossy coding really loses something."""
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4000, (ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    ds.save_as(path)
    return path


def without_ratio(path: Path) -> Path:
    """Drop Lossy Image Compression Method and Ratio (PS3.3 C.7.6.1.1.5), as many encoders
    leave them out: decoding then has to add them."""
    ds = pydicom.dcmread(path)
    for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if kw in ds:
            delattr(ds, kw)
    ds.save_as(path)
    return path
