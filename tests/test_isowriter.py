"""isowriter: file bodies put into the image by kernel-side copies at the extents pycdlib
assigns. The image must be byte for byte the one pycdlib writes through its own copy loop,
and what xorriso and isoinfo read out of it must be the files' content."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

import pytest

from mastering import content, directio, inplace, isosource, isowriter, profiles
from mastering.pipeline import Options, master

from .conftest import extract_iso, isoinfo_listing, make_ct, need, sample

EPOCH = 1_700_000_000


def _inputs(tmp: Path) -> list[Path]:
    """Every kind of body: copied as is, Implicit VR re-encoded (new header + source pixels),
    meta header rebuilt, transcoded from a staged copy; sizes not multiples of a sector."""
    src = tmp / "in"
    for i in range(1, 4):
        make_ct(src / "a", f"{i}.dcm", instance=i, rows=40 + i, value=i)
        make_ct(src / "b", f"{i}.dcm", instance=i, implicit=True, series_uid="1.2.3.4.1.2",
                SeriesNumber=2, rows=33, value=20 + i)
    no_meta = src / "c" / "raw.dcm"
    no_meta.parent.mkdir(parents=True)
    no_meta.write_bytes(make_ct(tmp / "x", "m.dcm", series_uid="1.2.3.4.1.3", SeriesNumber=3,
                                instance=1).read_bytes()[128 + 4:])  # no preamble
    return [src, sample("MR_small_bigendian.dcm"), sample("image_dfl.dcm")]


def _write(tmp: Path, name: str, profile: profiles.Profile, inputs: list[Path], **kw) -> Path:
    out = tmp / name
    master(inputs, out, Options(profile, source_date_epoch=EPOCH, workers=1, **kw))
    return out


@pytest.mark.parametrize("tree", ["iso9660", "joliet", "udf", "viewer"])
def test_three_ways_of_writing_give_one_image(tmp_path: Path, monkeypatch, tree: str) -> None:
    """Direct writes, kernel copies into the page cache (where a file system refuses direct
    writes) and pycdlib's own copy loop write the same bytes, durable or not. Joliet and
    UDF (the BD profiles) give every file a second record sharing its inode: its body is
    written once. With web
    content: pages (bytes) and spooled JPEGs (ranges of the workers' spool files).
    SOURCE_DATE_EPOCH: no clock reaches either tree."""
    base = profiles.load("STD-GEN-BD" if tree == "udf" else "STD-GEN-DVD-JPEG")
    profile = dataclasses.replace(base, joliet=tree == "joliet")
    inputs = _inputs(tmp_path)
    calls, streamed = [], []
    real, real_stream = content.copy_segments, directio.stream

    def counted(parts, out, offset):
        calls.append(offset)
        return real(parts, out, offset)

    def counted_stream(fd, total, metadata, bodies, **kw):
        streamed.extend(at for at, _body in bodies)
        return real_stream(fd, total, metadata, bodies, **kw)

    monkeypatch.setattr(isowriter, "copy_segments", counted)
    monkeypatch.setattr(directio, "stream", counted_stream)
    viewer = tree == "viewer"
    direct = _write(tmp_path, "direct.iso", profile, inputs, label=True, viewer=viewer)
    files = len(isoinfo_listing(direct))
    assert len(streamed) == files and not calls  # each body once, all by direct writes
    assert files == 10 or (viewer and files > 30)
    quick = _write(tmp_path, "quick.iso", profile, inputs, viewer=viewer, sync=False)
    assert len(streamed) == 2 * files and not calls  # --no-sync: direct writes too
    monkeypatch.setattr(directio, "open_direct", lambda path: None)  # as on tmpfs
    kernel = _write(tmp_path, "kernel.iso", profile, inputs, viewer=viewer, sync=False)
    assert sorted(calls) == sorted(streamed[:files])
    monkeypatch.setattr(isowriter.Image, "kernel_copy", False)
    slow = _write(tmp_path, "slow.iso", profile, inputs, label=True, viewer=viewer)
    assert len(calls) == files and len(streamed) == 2 * files
    assert direct.read_bytes() == quick.read_bytes() == kernel.read_bytes() == slow.read_bytes()
    monkeypatch.undo()
    time.sleep(1.1)  # a clock that leaks into the image now shows
    again = _write(tmp_path, "again.iso", profile, inputs, viewer=viewer)
    assert again.read_bytes() == direct.read_bytes()


def test_direct_writes_span_windows(tmp_path: Path, monkeypatch) -> None:
    """Bodies and metadata that cross the writer's windows, zeros between them."""
    monkeypatch.setattr(directio, "WINDOW", 3 * 4096)
    monkeypatch.setattr(directio, "_ZEROS", bytes(3 * 4096))
    src = tmp_path / "s.bin"
    src.write_bytes(bytes(range(256)) * 200)  # 51,200 bytes
    fd = directio.open_direct(tmp_path / "o.bin")
    if fd is None:
        pytest.skip("the file system of the test folder takes no direct writes")
    metadata = [(0, b"M" * 5000), (20_000, b"N" * 100)]
    bodies = [(22_528, isowriter.Body(b"HEAD" + src.read_bytes()[7:30_007], 30_004)),
              (53_248, isowriter.Body(content.Range(str(src), 0, 51_200), 51_200))]
    seen = []
    directio.stream(fd, 106_496, metadata, bodies, progress=lambda d, t: seen.append(d))
    os.close(fd)
    data = (tmp_path / "o.bin").read_bytes()
    want = bytearray(106_496)
    want[0:5000], want[20_000:20_100] = b"M" * 5000, b"N" * 100
    want[22_528:52_532] = b"HEAD" + src.read_bytes()[7:30_007]
    want[53_248:104_448] = src.read_bytes()
    assert data == bytes(want) and seen[0] == 0 and seen[-1] == 106_496
    fd = directio.open_direct(tmp_path / "p.bin")  # regions; zeros to the end of the first
    directio.stream(fd, 106_496, metadata, bodies, regions=[(0, 20_480), (53_248, 106_496)])
    os.close(fd)
    want[20_480:53_248] = bytes(32_768)  # not written: a hole (the early data area's place)
    assert (tmp_path / "p.bin").read_bytes() == bytes(want)


@pytest.mark.oracle
def test_xorriso_and_isoinfo_read_the_file_bodies(tmp_path: Path) -> None:
    """Every file of the image, extracted by xorriso and by isoinfo, is the content planned
    for it: the source bytes, or the new header followed by the source's pixel data."""
    from pydicom.fileset import FileSet

    iso = _write(tmp_path, "o.iso", profiles.load("STD-GEN-CD"), _inputs(tmp_path))
    root = extract_iso(iso, tmp_path / "x")
    files = {name for name, _extent in isoinfo_listing(iso)}
    fs = FileSet(root / "DICOMDIR")
    assert len(fs) == 9
    for inst in fs:
        rel = Path(inst.path).relative_to(root)
        iso_name = "/" + rel.as_posix() + ".;1"
        assert iso_name in files
        by_isoinfo = subprocess.run([need("isoinfo"), "-i", str(iso), "-x", iso_name],
                                    capture_output=True, check=True).stdout
        assert by_isoinfo == (root / rel).read_bytes()
    by_uid = {i.SOPInstanceUID: Path(i.path) for i in fs}
    for path in sorted((tmp_path / "in").rglob("*.dcm")):
        import pydicom

        ds = pydicom.dcmread(path, force=True)
        written = by_uid[ds.SOPInstanceUID].read_bytes()
        if path.parent.name == "a":
            assert written == path.read_bytes()  # copied as it is
        else:
            # re-encoded or re-wrapped: the pixel data bytes are the source's, at the end
            assert written.endswith(path.read_bytes()[-len(ds.PixelData):])


def test_copy_segments_writes_at_the_offset_and_checks_the_source(tmp_path: Path) -> None:
    src = tmp_path / "s.bin"
    src.write_bytes(bytes(range(256)) * 64)
    st = src.stat()
    stamp = isosource.stat_stamp(st)
    out = tmp_path / "o.bin"
    with open(out, "xb+", buffering=0) as fh:
        parts = [b"HEAD", content.Range(str(src), 100, 5000, stamp)]
        done = list(content.copy_segments(parts, fh.fileno(), 3000))
        assert sum(done) == 5004 and fh.tell() == 0  # the file position is not moved
    data = out.read_bytes()
    assert data[:3000] == bytes(3000) and data[3000:] == b"HEAD" + src.read_bytes()[100:5100]
    src.write_bytes(src.read_bytes()[:1000])  # shrunk since the scan
    with open(tmp_path / "p.bin", "xb+") as fh, pytest.raises(content.SourceChanged):
        list(content.copy_segments(parts, fh.fileno(), 0))


def test_copy_segments_falls_back_where_the_kernel_cannot(tmp_path: Path, monkeypatch) -> None:
    """Another file system (EXDEV), no support (EOPNOTSUPP): read and write instead."""
    import errno
    import os

    def refuse(*_args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src = tmp_path / "s.bin"
    src.write_bytes(b"x" * 3_000_000)
    with open(tmp_path / "o.bin", "xb+") as fh:
        done = list(content.copy_segments([content.Range(str(src), 1, 2_999_999)], fh.fileno(),
                                          7))
    assert sum(done) == 2_999_999
    assert (tmp_path / "o.bin").read_bytes() == bytes(7) + b"x" * 2_999_999


@pytest.mark.oracle
def test_folder_and_image_carry_the_same_web_content(tmp_path: Path) -> None:
    """The spooled JPEGs (byte ranges of the workers' spool files) reach a File-set folder
    as they reach an image: the web tree of both, the image's read back by xorriso, is the
    same file for file."""
    inputs = _inputs(tmp_path)
    iso = _write(tmp_path, "o.iso", profiles.load("STD-GEN-DVD-JPEG"), inputs, viewer=True)
    folder = tmp_path / "usb"
    master(inputs, folder, Options(profiles.load("STD-GEN-USB-JPEG"), source_date_epoch=EPOCH,
                                   workers=2, viewer=True), kind="folder")
    root = extract_iso(iso, tmp_path / "extracted")

    def tree(top: Path) -> dict[str, bytes]:
        return {p.relative_to(top).as_posix(): p.read_bytes() for p in sorted(top.rglob("*"))
                if p.is_file() and not p.relative_to(top).as_posix().startswith("DICOM")}

    web = tree(root)
    assert sum(n.endswith(".JPG") for n in web) >= 8 and "INDEX.HTM" in web
    on_stick = tree(folder)  # and the manifest a later in-place --replace reads
    assert on_stick.pop(inplace.MANIFEST).startswith(inplace.MANIFEST_MAGIC.encode())
    assert on_stick == web
