"""earlyiso: bodies written into the image while the scan runs. The thresholds are lowered so
small inputs take that way; xorriso and isoinfo read the result back, file by file against an
image written the ordinary way."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.fileset import FileSet

from mastering import directio, earlyiso, profiles
from mastering.content import SourceChanged
from mastering.pipeline import MasteringError, Options, master

from .conftest import dciodvfy_errors, extract_iso, isoinfo_listing, make_ct, need, sample

EPOCH = 1_700_000_000
MARK = bytes(range(7, 251)) * 8  # pixels only the conflicting file has


def _inputs(tmp: Path) -> list[Path]:
    src = tmp / "in"
    for i in range(1, 5):  # names sort against the instance numbers: scan order differs
        make_ct(src / "a", f"{9 - i}.dcm", instance=i, rows=40 + i, value=i)
        make_ct(src / "b", f"{i}.dcm", instance=i, implicit=True, series_uid="1.2.3.4.1.2",
                SeriesNumber=2, rows=33, value=20 + i)
    dup = (src / "a" / "8.dcm").read_bytes()
    (src / "c").mkdir()
    (src / "c" / "copy.dcm").write_bytes(dup)  # the same object twice: merged
    make_ct(src / "d", "x.dcm", sop_uid="1.2.3.99", value=1, series_uid="1.2.3.4.1.5")
    make_ct(src / "e", "y.dcm", sop_uid="1.2.3.99", series_uid="1.2.3.4.1.5", rows=16,
            PixelData=MARK[:512])  # one UID, another object: both left out
    return [src, sample("MR_small_bigendian.dcm")]  # and a transcode, placed after the data


def _run(tmp: Path, name: str, **kw) -> Path:
    out = tmp / name
    master(_inputs(tmp) if not (tmp / "in").exists() else [tmp / "in",
                                                            sample("MR_small_bigendian.dcm")],
           out, Options(profiles.load("STD-GEN-DVD-JPEG"), source_date_epoch=EPOCH, workers=2,
                        on_conflict="skip", skip_invalid=True, **kw))
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.oracle
def test_streamed_image_holds_the_same_files(tmp_path: Path, streamed, monkeypatch) -> None:
    early = _run(tmp_path, "early.iso", sync=False)
    assert streamed == [8]  # 8 files in place (the duplicate merged, the conflict left out)
    again = _run(tmp_path, "again.iso")  # durable this time: the same bytes
    assert again.read_bytes() == early.read_bytes()
    with monkeypatch.context() as patch:  # no direct writes (tmpfs): into the page cache
        patch.setattr(directio, "open_direct", lambda path: None)
        cached = _run(tmp_path, "cached.iso")
    assert cached.read_bytes() == early.read_bytes()
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 1 << 60)  # the ordinary way
    plain = _run(tmp_path, "plain.iso")
    assert streamed == [8, 8, 8] and plain.read_bytes() != early.read_bytes()
    a, b = extract_iso(early, tmp_path / "xa"), extract_iso(plain, tmp_path / "xb")
    assert _tree(a) == _tree(b)  # the same files, placed differently
    assert dciodvfy_errors(a / "DICOMDIR") == [] and len(FileSet(a / "DICOMDIR")) == 9
    extents = dict(isoinfo_listing(early))
    assert extents["/DICOMDIR.;1"] == min(extents.values())
    for name in extents:  # isoinfo reads every file as xorriso does
        data = subprocess.run([need("isoinfo"), "-i", str(early), "-x", name],
                              capture_output=True, check=True).stdout
        assert data == (a / name.lstrip("/").removesuffix(".;1")).read_bytes()
    assert MARK[:512] not in early.read_bytes()  # the object left out left nothing behind


def test_metadata_that_does_not_fit_takes_the_ordinary_way(tmp_path: Path, streamed,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(earlyiso, "RESERVE_FIXED", 0)
    monkeypatch.setattr(earlyiso, "RESERVE_PER_FILE", 0)
    monkeypatch.setattr(earlyiso, "RESERVE_PER_FOLDER", 0)
    squeezed = _run(tmp_path, "squeezed.iso")
    assert streamed == [8]  # tried, then found too small
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 1 << 60)
    assert _run(tmp_path, "plain.iso").read_bytes() == squeezed.read_bytes()
    assert not list(tmp_path.glob(".*.partial"))


def test_spanned_volumes_take_the_ordinary_way(tmp_path: Path, streamed,
                                              monkeypatch) -> None:
    """The walk's sizes fit one medium, the plan needs two: the early writes are dropped."""
    for name in ("RESERVE_FIXED", "RESERVE_PER_FILE", "RESERVE_PER_FOLDER"):
        monkeypatch.setattr(earlyiso, name, 0)
    for i in range(6):
        make_ct(tmp_path / "in" / f"s{i}", "1.dcm", rows=128, series_uid=f"1.2.3.4.7.{i}",
                SeriesNumber=i + 1)
    total = sum(p.stat().st_size for p in (tmp_path / "in").rglob("*.dcm"))
    prof = profiles.load("STD-GEN-CD").with_capacity(int(total * 1.03))
    report = master([tmp_path / "in"], tmp_path / "o.iso", Options(prof, workers=1))
    assert len(report.volumes) >= 2 and streamed == []
    for n, iso in enumerate(sorted(tmp_path.glob("o-*.iso"))):
        assert dciodvfy_errors(extract_iso(iso, tmp_path / f"x{n}") / "DICOMDIR") == []
    assert not list(tmp_path.glob(".*.partial"))


def test_a_source_changed_after_its_copy_fails_the_run(tmp_path: Path, streamed) -> None:
    _inputs(tmp_path)
    victim = tmp_path / "in" / "a" / "5.dcm"

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and not hasattr(progress, "done"):
            progress.done = True
            victim.write_bytes(victim.read_bytes()[:-10])

    with pytest.raises((SourceChanged, MasteringError)):
        master([tmp_path / "in"], tmp_path / "o.iso",
               Options(profiles.load("STD-GEN-DVD-JPEG"), on_conflict="skip", workers=1),
               progress=progress)
    assert not (tmp_path / "o.iso").exists() and not list(tmp_path.glob(".*.partial"))
    assert streamed == [8]


def test_fileset_folder_from_early_copies(tmp_path: Path, streamed, monkeypatch) -> None:
    """The USB path: copies made while the scan runs are renamed to their File IDs; the
    folder is the one the ordinary way writes, file for file; a source changed after its
    copy fails the run."""
    _inputs(tmp_path)
    opts = dict(source_date_epoch=EPOCH, workers=2, on_conflict="skip", skip_invalid=True)
    usb = profiles.load("STD-GEN-USB-JPEG")
    renamed = []
    real = earlyiso.EarlyFolder.take

    def take(self, entry, target):
        done = real(self, entry, target)
        renamed.append(done)
        return done

    monkeypatch.setattr(earlyiso.EarlyFolder, "take", take)
    master([tmp_path / "in"], tmp_path / "early", Options(usb, **opts), kind="folder")
    assert renamed.count(True) == 8
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 1 << 60)
    master([tmp_path / "in"], tmp_path / "plain", Options(usb, **opts), kind="folder")
    assert renamed.count(True) == 8 and len(renamed) == 16
    assert _tree(tmp_path / "early") == _tree(tmp_path / "plain")
    assert dciodvfy_errors(tmp_path / "early" / "DICOMDIR") == []
    monkeypatch.setattr(earlyiso, "MIN_BYTES", 0)
    victim = tmp_path / "in" / "a" / "5.dcm"

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and not hasattr(progress, "done"):
            progress.done = True
            victim.write_bytes(victim.read_bytes()[:-10])

    with pytest.raises(SourceChanged):
        master([tmp_path / "in"], tmp_path / "third", Options(usb, **opts), kind="folder",
               progress=progress)
    assert not (tmp_path / "third").exists() and not list(tmp_path.glob(".*.partial"))


def test_early_renderings_make_the_web_content_late_ones_make(tmp_path: Path,
                                                             monkeypatch) -> None:
    """Pictures rendered while the scan runs: the same image as rendered after planning,
    also where the first file of a series in scan order is left out (its header must not
    head the series' pages) and where a series' files are scanned out of their order."""
    from mastering import pdi

    src = tmp_path / "in"
    make_ct(src / "s", "0.dcm", sop_uid="1.2.3.98", patient_name="WRONG^ONE", value=3,
            WindowCenter="40", WindowWidth="400")  # scanned first, then left out
    make_ct(src / "t", "0.dcm", sop_uid="1.2.3.98", value=4)  # its conflicting twin
    for i in range(1, 5):
        make_ct(src / "s", f"{9 - i}.dcm", instance=i, rows=48, value=i, WindowCenter="40",
                WindowWidth="400")
    opts = Options(profiles.load("STD-GEN-CD"), source_date_epoch=EPOCH, workers=2,
                   viewer=True, on_conflict="skip")
    used = []
    real = pdi.prepare

    def prepare(*args, **kw):
        used.append(kw.get("early") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(pdi, "prepare", prepare)
    master([src], tmp_path / "early.iso", opts)
    monkeypatch.setattr(pdi.EarlyRender, "walked", lambda self, paths: None)
    master([src], tmp_path / "late.iso", opts)
    assert used == [True, False]
    assert (tmp_path / "early.iso").read_bytes() == (tmp_path / "late.iso").read_bytes()
    index = (extract_iso(tmp_path / "early.iso", tmp_path / "x") / "INDEX.HTM").read_text()
    assert "WRONG" not in index and "DOE" in index
