"""Adversarial tests of the speed work (issue 10): the early image and File-set, direct
writes, kernel copies, ``intake._compact``, the render fast path and spooled web content,
judged by extracting the output and comparing it with the inputs.

Tests whose docstring starts with ``DEFECT`` reproduce a defect found in the review of that
work (each failed on the reviewed commit); the others are attacks that held up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mastering import directio, earlyiso, profiles
from mastering.pipeline import Options, master

from .conftest import extract_iso, make_ct, sample

EPOCH = 1_700_000_000


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_early_layout_near_capacity_with_duplicates_fails_a_run_that_fits(
        tmp_path: Path, streamed) -> None:
    """DEFECT: the early check counts the walked bytes, but the early image also keeps the
    slots of duplicates (zeroed) and puts transcoded files after them. A run whose plan fits
    one medium then fails with 'image ... exceeds the capacity' instead of falling back to
    the ordinary layout (which fits)."""
    src = tmp_path / "in"
    for i in range(1, 11):
        make_ct(src / "a", f"{i}.dcm", instance=i, rows=256, value=i)
    shutil.copytree(src / "a", src / "dup")  # the same study twice: merged by the scan
    shutil.copy(sample("image_dfl.dcm"), src / "dfl.dcm")  # deflated: inflated on STD-GEN-CD
    paths = [str(p) for p in sorted(src.rglob("*.dcm"))]
    start, total = earlyiso.plan_reserve(paths)
    cap = start * 2048 + int(total * 1.02) + 2048  # passes the early check with room to spare
    prof = profiles.load("STD-GEN-CD").with_capacity(cap)
    with pytest.MonkeyPatch.context() as patch:  # the ordinary way: one volume that fits
        patch.setattr(earlyiso, "MIN_BYTES", 1 << 60)
        plain = master([src], tmp_path / "plain.iso", Options(prof, workers=1, sync=False))
    assert len(plain.volumes) == 1 and (tmp_path / "plain.iso").stat().st_size <= cap
    report = master([src], tmp_path / "o.iso", Options(prof, workers=1, sync=False))
    assert len(report.volumes) == 1  # the plan fits one volume
    assert (tmp_path / "o.iso").stat().st_size <= cap


def _render_cases():
    import numpy as np

    rng = np.random.default_rng(11)
    u12 = lambda n: rng.integers(0, 4095, n, dtype="<u2")  # noqa: E731
    return {
        "odd8": (63, 65, dict(BitsAllocated=8, BitsStored=8, HighBit=7),
                 rng.integers(0, 255, 63 * 65, dtype="u1")),
        "odd8_7bits": (33, 31, dict(BitsAllocated=8, BitsStored=7, HighBit=6),
                       rng.integers(0, 255, 33 * 31, dtype="u1")),
        "slope": (40, 50, dict(RescaleSlope="0.5", RescaleIntercept="-100.25"), u12(2000)),
        "signed_slope": (30, 30, dict(PixelRepresentation=1, RescaleSlope="2.5",
                                      RescaleIntercept="10"),
                         rng.integers(-2048, 2047, 900).astype("<i2")),
        "signed10_garbage": (20, 20, dict(PixelRepresentation=1, BitsStored=10, HighBit=9),
                             rng.integers(-32768, 32767, 400).astype("<i2")),
        "sigmoid_mono1": (20, 24, dict(PhotometricInterpretation="MONOCHROME1",
                                       VOILUTFunction="SIGMOID"), u12(480)),
        "linear_exact": (24, 20, dict(VOILUTFunction="LINEAR_EXACT", WindowWidth="1"),
                         u12(480)),
        "padding": (16, 16, dict(PixelPaddingValue=0), u12(256)),
        "aspect": (40, 20, dict(PixelSpacing=[0.5, 2.0]), u12(800)),
        "big": (1100, 700, {}, u12(1100 * 700)),
        "presentation_inverse": (16, 16, dict(PresentationLUTShape="INVERSE"), u12(256)),
    }


@pytest.mark.parametrize("name", list(_render_cases()))
def test_series_renderer_equals_render(tmp_path: Path, name: str) -> None:
    """The fast path's images are the general path's, byte for byte (odd sizes, 8 bits with
    padding, slopes, signed data with garbage above Bits Stored, VOI functions, aspect)."""
    from mastering import intake
    from mastering.render import SeriesRenderer, render

    rows, cols, attrs, pixels = _render_cases()[name]
    attrs = {"WindowCenter": "40", "WindowWidth": "400", **attrs}
    fast = SeriesRenderer(optimize=False)
    profile = profiles.load("STD-GEN-DVD-JPEG")
    for i in (1, 2):
        raw = pixels.tobytes()
        path = make_ct(tmp_path, f"{i}.dcm", instance=i, rows=rows, Columns=cols,
                       PixelData=raw + (b"\0" if len(raw) % 2 else b""), **attrs)
        inst = intake.scan_file(str(path), profile)
        done = fast.render(str(path), inst.pixel_data_offset, inst.transfer_syntax)
        slow = render(path, optimize=False)
        assert done is not None, name  # each case takes the fast path
        got = done[0]
        assert (got.frames, got.extra, got.thumbnail, got.summary, got.presets) == (
            slow.frames, slow.extra, slow.thumbnail, slow.summary, slow.presets), name


OLD_MARK = bytes(range(3, 253)) * 4
NEW_MARK = bytes(range(251, 1, -1)) * 4


def _conflict_inputs(src: Path) -> None:
    for i in range(1, 6):
        make_ct(src / "a", f"{i}.dcm", instance=i, rows=48, value=i)
    # one SOP Instance UID, two objects: the newer one (scanned first) is kept
    make_ct(src / "b", "new.dcm", sop_uid="1.2.3.77", instance=9, rows=32,
            series_uid="1.2.3.4.1.9", SeriesNumber=9, PixelData=NEW_MARK[:2048],
            InstanceCreationDate="20240102", InstanceCreationTime="101010")
    make_ct(src / "c", "old.dcm", sop_uid="1.2.3.77", instance=9, rows=32,
            series_uid="1.2.3.4.1.9", SeriesNumber=9, PixelData=OLD_MARK[:2048],
            InstanceCreationDate="20230102", InstanceCreationTime="101010")
    shutil.copy(src / "a" / "3.dcm", src / "a3copy.dcm")  # a duplicate


@pytest.mark.parametrize("sync", [False, True])
def test_newest_conflict_with_early_image_keeps_only_the_newest_bytes(
        tmp_path: Path, streamed, sync: bool) -> None:
    from pydicom.fileset import FileSet

    src = tmp_path / "in"
    _conflict_inputs(src)
    out = tmp_path / "o.iso"
    report = master([src], out, Options(profiles.load("STD-GEN-DVD-JPEG"), workers=1,
                                        on_conflict="newest", sync=sync,
                                        source_date_epoch=EPOCH))
    assert streamed and streamed[-1] == 6  # the early layout was used
    image = out.read_bytes()
    assert OLD_MARK[:2048] not in image and NEW_MARK[:2048] in image
    tree = extract_iso(out, tmp_path / "x")
    fs = FileSet(tree / "DICOMDIR")
    assert len(fs) == 6 and report.instances == 6
    by_uid = {inst.SOPInstanceUID: inst for inst in fs}
    got = Path(by_uid["1.2.3.77"].path).read_bytes()
    assert got == (src / "b" / "new.dcm").read_bytes()
    for i in range(1, 6):  # every other file byte for byte at its File ID
        data = (src / "a" / f"{i}.dcm").read_bytes()
        import pydicom

        uid = pydicom.dcmread(src / "a" / f"{i}.dcm").SOPInstanceUID
        assert Path(by_uid[uid].path).read_bytes() == data


def test_newest_conflict_with_early_folder(tmp_path: Path, streamed) -> None:
    from pydicom.fileset import FileSet

    src = tmp_path / "in"
    _conflict_inputs(src)
    out = tmp_path / "fs"
    master([src], out, Options(profiles.load("STD-GEN-USB-JPEG"), workers=2,
                               on_conflict="newest"), kind="folder")
    fs = FileSet(out / "DICOMDIR")
    assert len(fs) == 6
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 7  # six instances and the DICOMDIR, nothing else
    assert not any(OLD_MARK[:2048] in p.read_bytes() for p in files)
    assert not list(tmp_path.glob(".*"))  # no work folder left beside the output


@pytest.mark.parametrize("early", [False, True])
def test_a_source_rewritten_in_place_with_its_mtime_kept_fails_the_run(
        tmp_path: Path, monkeypatch, early: bool) -> None:
    """DEFECT (not new with issue 10; the early copies' checks have it too): the scan stamp is
    (device, inode, size, mtime). A file rewritten in place to the same size with its
    modification time put back (``rsync --inplace -t``, ``cp --preserve=timestamps`` onto
    it, a restore tool) passes every check: the disc gets the new bytes under a DICOMDIR
    record made from the old ones (here Patient's Name JOHN in the file, JANE in the
    record). The inode change time (st_ctime_ns), which no user call can set back, would
    catch it. early=False: rewritten after the scan, before the write; early=True: rewritten
    after its scan, before its early copy (the copier's queue)."""
    import os

    from mastering.content import SourceChanged
    from mastering.pipeline import MasteringError

    src = tmp_path / "in"
    for i in range(1, 4):
        make_ct(src, f"{i}.dcm", instance=i, rows=32, value=i)
    victim = src / "2.dcm"
    original = victim.read_bytes()
    assert original.count(b"DOE^JANE") == 1

    def rewrite() -> None:
        st = victim.stat()
        with open(victim, "r+b") as fh:  # same inode, same size
            fh.write(original.replace(b"DOE^JANE", b"DOE^JOHN"))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))

    def progress(stage: str, done: int, total: int) -> None:
        if not early and stage.startswith("write") and not hasattr(progress, "done"):
            progress.done = True
            rewrite()

    if early:
        monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
        monkeypatch.setattr(earlyiso, "RESERVE_SHARE", 1e9)
        real = earlyiso.EarlyImage.add

        def add(self, inst):
            if inst.path == str(victim):
                rewrite()
            return real(self, inst)

        monkeypatch.setattr(earlyiso.EarlyImage, "add", add)
    else:
        monkeypatch.setattr(earlyiso, "MIN_BYTES", 1 << 60)
    out = tmp_path / "o.iso"
    try:
        master([src], out, Options(profiles.load("STD-GEN-CD"), workers=1),
               progress=progress)
    except (SourceChanged, MasteringError):
        assert not out.exists()
        return
    image = out.read_bytes()
    pytest.fail(f"run succeeded; JOHN (new bytes) on the image {image.count(b'DOE^JOHN')} "
                f"time(s), the DICOMDIR record says JANE")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of 10 MiB as the output's file system (needs root, as the USB tests do)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _twelve(src: Path) -> None:
    for i in range(1, 13):  # 12 x 525 KB = 6.3 MB of DICOM
        make_ct(src / "a", f"{i}.dcm", instance=i, rows=512, value=i)


def test_iso_with_non_dicom_files_beside_fits_the_disk(tmp_path: Path, small_disk,
                                                        monkeypatch) -> None:
    """DEFECT: EarlyImage.walked fallocates start + 1.02 x the bytes of EVERY walked file
    (non-DICOM files and duplicates included) and lets ENOSPC fail the run during the scan.
    6.3 MB of DICOM beside an 8 MB video onto a 10 MB disk: 'No space left on device',
    though the 6.4 MB image the ordinary way writes fits (checked first)."""
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
    monkeypatch.setattr(earlyiso, "RESERVE_SHARE", 1e9)
    src = tmp_path / "in"
    _twelve(src)
    (src / "video.mp4").write_bytes(bytes(8 << 20))  # not DICOM: ignored by the scan
    prof = profiles.load("STD-GEN-DVD-JPEG")
    with monkeypatch.context() as patch:
        patch.setattr(earlyiso, "MIN_BYTES", 1 << 60)  # the ordinary way fits
        master([src], small_disk / "plain.iso", Options(prof, workers=1, sync=False))
    (small_disk / "plain.iso").unlink()
    master([src], small_disk / "o.iso", Options(prof, workers=1, sync=False))
    assert (small_disk / "o.iso").stat().st_size < 7 << 20


def test_fileset_of_a_study_given_twice_fits_the_disk(tmp_path: Path, small_disk,
                                                       monkeypatch) -> None:
    """DEFECT: EarlyFolder copies every scanned instance into the work folder on the output's
    file system, identical copies too (merged only after the scan), and holds them all until
    the write: a study given twice (a patient CD and its copied folder) needs twice the
    space. 6.3 MB onto a 10 MB stick: 'No space left on device', though the File-set the
    ordinary way writes fits (checked first)."""
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
    src = tmp_path / "in"
    _twelve(src)
    shutil.copytree(src / "a", src / "again")
    prof = profiles.load("STD-GEN-USB-JPEG")
    with monkeypatch.context() as patch:
        patch.setattr(earlyiso, "MIN_BYTES", 1 << 60)  # the ordinary way fits
        master([src], small_disk / "plain", Options(prof, workers=2, sync=False),
               kind="folder")
    shutil.rmtree(small_disk / "plain")
    report = master([src], small_disk / "fs", Options(prof, workers=2, sync=False),
                    kind="folder")
    assert report.instances == 12 and len(report.duplicates) == 12


@pytest.fixture
def no_direct_fs(tmp_path: Path):
    """ramfs: refuses O_DIRECT with EINVAL, as tmpfs before Linux 6.6 (Debian 12's 6.1),
    FUSE and some network file systems do. The kernel creates the file before it refuses
    the flag."""
    import subprocess

    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_open_direct_leaves_nothing_where_it_is_refused(no_direct_fs: Path) -> None:
    """DEFECT: directio.open_direct returns None on EINVAL but leaves the file the kernel
    created; every caller then creates the same path exclusively and fails (EEXIST)."""
    path = no_direct_fs / "image"
    assert directio.open_direct(path) is None
    assert not path.exists()


@pytest.mark.parametrize("early", [False, True])
def test_iso_onto_a_file_system_without_direct_writes(tmp_path: Path, no_direct_fs: Path,
                                                      monkeypatch, early: bool) -> None:
    """DEFECT: every ISO run onto such a file system fails with '.../vol1: File exists'
    (durable or --no-sync, the ordinary and the early image alike), instead of writing
    through the page cache."""
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0 if early else 1 << 60)
    monkeypatch.setattr(earlyiso, "RESERVE_SHARE", 1e9)
    src = tmp_path / "in"
    for i in range(1, 4):
        make_ct(src, f"{i}.dcm", instance=i, rows=64, value=i)
    out = no_direct_fs / "o.iso"
    master([src], out, Options(profiles.load("STD-GEN-CD"), workers=1, sync=False))
    tree = extract_iso(out, tmp_path / "x")
    assert len([p for p in tree.rglob("IM*") if p.is_file()]) == 3


@pytest.mark.parametrize("kind", ["iso", "folder"])
@pytest.mark.parametrize("how", ["truncate", "replace", "grow"])
def test_a_source_changed_before_its_early_copy_fails_naming_it(
        tmp_path: Path, streamed, monkeypatch, kind: str, how: str) -> None:
    """Held up: a file cut, replaced (rename over it) or grown after its scan and before
    its early copy fails the run with an error naming it; no output, nothing left beside."""
    import os

    from mastering.content import SourceChanged
    from mastering.pipeline import MasteringError

    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
    src = tmp_path / "in"
    for i in range(1, 5):
        make_ct(src, f"{i}.dcm", instance=i, rows=64, value=i)
    victim = src / "3.dcm"
    cls = earlyiso.EarlyImage if kind == "iso" else earlyiso.EarlyFolder
    real = cls.add

    def add(self, inst):
        if inst.path == str(victim):
            data = victim.read_bytes()
            if how == "truncate":
                victim.write_bytes(data[:-100])
            elif how == "grow":
                with open(victim, "ab") as fh:
                    fh.write(b"\0\0\0\0")
            else:
                (src / "new.tmp").write_bytes(data.replace(b"DOE^JANE", b"DOE^JOHN"))
                os.replace(src / "new.tmp", victim)
        return real(self, inst)

    monkeypatch.setattr(cls, "add", add)
    out = tmp_path / ("o.iso" if kind == "iso" else "fs")
    prof = profiles.load("STD-GEN-CD" if kind == "iso" else "STD-GEN-USB-JPEG")
    with pytest.raises((SourceChanged, MasteringError)) as info:
        master([src], out, Options(prof, workers=1), kind=kind)
    assert str(victim) in str(info.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_spanned_fileset_folders_from_early_copies(tmp_path: Path, streamed) -> None:
    """Held up: a File-set split over three folders takes the early copies into each; every
    instance is on exactly one volume, byte for byte, nothing else is left."""
    import pydicom
    from pydicom.fileset import FileSet

    src = tmp_path / "in"
    for s in range(6):
        for i in range(1, 4):
            make_ct(src / f"s{s}", f"{i}.dcm", instance=i, rows=128, value=s * 10 + i,
                    series_uid=f"1.2.3.4.8.{s}", SeriesNumber=s + 1)
    shutil.copy(src / "s0" / "1.dcm", src / "dup.dcm")
    total = sum(p.stat().st_size for p in src.rglob("*.dcm"))
    prof = profiles.load("STD-GEN-USB-JPEG").with_capacity(total // 3 + 4096)
    report = master([src], tmp_path / "fs", Options(prof, workers=2), kind="folder")
    assert len(report.volumes) >= 3
    want = {pydicom.dcmread(p).SOPInstanceUID: p.read_bytes()
            for p in src.rglob("s*/*.dcm")}
    got: dict[str, list[bytes]] = {}
    for vol in report.volumes:
        root = Path(vol.path)
        for inst in FileSet(root / "DICOMDIR"):
            got.setdefault(inst.SOPInstanceUID, []).append(Path(inst.path).read_bytes())
        files = [p for p in root.rglob("*") if p.is_file()]
        assert len(files) == len(FileSet(root / "DICOMDIR")) + 1
    assert got == {uid: [data] for uid, data in want.items()}
    assert not list(tmp_path.glob(".*.partial"))  # no work folder left


def test_a_full_medium_during_early_copies_falls_back(tmp_path: Path, monkeypatch) -> None:
    """The stick fills up while the File-set's copies are made during the scan: the early
    copies are removed (our work folder) and the File-set is written the ordinary way, every
    file once, nothing left behind."""
    import errno

    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
    src = tmp_path / "in"
    _twelve(src)
    calls = []
    real = earlyiso.copy_to

    def copy_to(entry, dst):  # noqa: ANN001, ANN202
        calls.append(dst)
        if len(calls) == 5:
            with open(dst, "xb") as out:
                out.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        real(entry, dst)

    monkeypatch.setattr(earlyiso, "copy_to", copy_to)
    out = tmp_path / "out" / "fs"
    out.parent.mkdir()
    report = master([src], out, Options(profiles.load("STD-GEN-USB-JPEG"), workers=1,
                                        sync=False), kind="folder")
    assert report.instances == 12 and len(calls) >= 5
    written = {p.read_bytes() for p in (out / "DICOM").rglob("*") if p.is_file()}
    assert written == {p.read_bytes() for p in (src / "a").iterdir()}
    assert sorted(p.name for p in out.parent.iterdir()) == ["fs"]  # no work folder left

