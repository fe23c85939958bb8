"""In-place writing into an existing folder and the File-set Updater (--append / --replace),
judged by dciodvfy, dcmdump and pydicom's FileSet; the CLI's `fileset --append` end to end."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from threading import Event

import pydicom
import pytest
from pydicom.fileset import FileSet

from mastering import inplace, profiles
from mastering.intake import Cancelled
from mastering.pipeline import MasteringError, Options, master

from .conftest import ct_series, dciodvfy_errors, dcmdump, make_ct, sample

USB = "STD-GEN-USB-JPEG"


def _options(**kw) -> Options:
    return Options(profiles.load(USB), workers=1, **kw)


def _tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _judge(root: Path, instances: int) -> FileSet:
    assert dciodvfy_errors(root / "DICOMDIR") == []
    assert "(0004,1220)" in dcmdump(root / "DICOMDIR")
    fs = FileSet(root / "DICOMDIR")
    assert len(list(fs)) == instances
    for inst in fs:  # every referenced file is there and loads
        assert inst.load().SOPInstanceUID == inst.SOPInstanceUID
    from mastering.verify import verify

    result = verify(root, profiles.load(USB))
    assert result.ok, result.violations
    return fs


@pytest.mark.oracle
def test_write_in_place_then_append(tmp_path: Path, stick: Path) -> None:
    first = ct_series(tmp_path / "a", 2, 3)
    r1 = master([first], stick, _options(fileset_id="STICK", verify=True), kind="inplace")
    assert r1.ok and r1.instances == 6
    fs1 = _judge(stick, 6)
    uid = fs1.UID
    assert not (stick / inplace.JOURNAL).exists() and not list(stick.rglob("*.TMP"))
    before = {k: v for k, v in _tree(stick).items() if k != "DICOMDIR"}

    # a new study of the same patient, one new patient, and a copy of an instance already there
    second = tmp_path / "b"
    for i in range(1, 3):
        make_ct(second, f"n{i}.dcm", instance=i, study_uid="1.2.3.9", series_uid="1.2.3.9.1")
    make_ct(second, "other.dcm", patient_id="PID2", patient_name="ROE^RICHARD",
            study_uid="1.2.3.8", series_uid="1.2.3.8.1")
    again = next((tmp_path / "a" / "s0").iterdir())
    r2 = master([second, again], stick, _options(update="append", verify=True), kind="inplace")
    assert r2.ok and r2.conversions["existing"] == 6 and len(r2.duplicates) == 1
    fs2 = _judge(stick, 9)
    assert uid == fs2.UID and fs2.ID == "STICK"  # the File-set keeps its UID and ID
    after = _tree(stick)
    assert all(after[k] == v for k, v in before.items())  # existing files untouched
    assert after["NOTES.TXT"] == before["NOTES.TXT"]
    assert len(fs2.find(PatientID="PID2")) == 1
    # one PATIENT record for PID1 with two studies
    ds = pydicom.dcmread(stick / "DICOMDIR")
    patients = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert sorted(p.PatientID for p in patients) == ["PID1", "PID2"]


def test_existing_fileset_refused_without_a_mode(tmp_path: Path, stick: Path) -> None:
    master([ct_series(tmp_path / "a", 1, 2)], stick, _options(), kind="inplace")
    before = _tree(stick)
    with pytest.raises(MasteringError) as err:
        master([make_ct(tmp_path / "b", "x.dcm", sop_uid="1.2.9.9")], stick, _options(),
               kind="inplace")
    assert err.value.exit_code == 6 and "--append" in str(err.value)
    assert _tree(stick) == before


def test_append_refuses_a_uid_conflict(tmp_path: Path, stick: Path) -> None:
    make_ct(tmp_path / "a", "1.dcm", sop_uid="1.2.3.77", value=1)
    master([tmp_path / "a"], stick, _options(), kind="inplace")
    before = _tree(stick)
    make_ct(tmp_path / "b", "1.dcm", sop_uid="1.2.3.77", value=2)  # another object, same UID
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "b"], stick, _options(update="append"), kind="inplace")
    assert err.value.exit_code == 3
    assert "already on the medium" in err.value.report.invalid[0]["reason"]
    assert _tree(stick) == before


@pytest.mark.oracle
def test_replace_removes_the_old_fileset_and_nothing_else(tmp_path: Path, stick: Path) -> None:
    master([ct_series(tmp_path / "a", 2, 2)], stick, _options(), kind="inplace")
    old = set(_tree(stick)) - {"DICOMDIR", "NOTES.TXT"}
    (stick / "DICOM" / "MINE.TXT").write_text("the owner's file inside DICOM/")
    make_ct(tmp_path / "b", "1.dcm", patient_id="PID9", study_uid="1.9", series_uid="1.9.1")
    r = master([tmp_path / "b"], stick, _options(update="replace", verify=True), kind="inplace")
    assert r.ok
    _judge(stick, 1)
    now = set(_tree(stick))
    assert not (old & now)  # every old File-set file is gone
    assert {"NOTES.TXT", "DICOM/MINE.TXT"} <= now  # and nothing else


def test_does_not_fit_refused_before_writing(tmp_path: Path, stick: Path, monkeypatch) -> None:
    src = ct_series(tmp_path / "a", 1, 3, rows=256)
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_frsize = self.f_bsize = 32768
            self.f_blocks, self.f_bavail = 1000, 4  # 128 KiB free; 3 files of 128 KiB need more
    monkeypatch.setattr(inplace.os, "statvfs", lambda p: Small(real(p)))
    with pytest.raises(MasteringError) as err:
        master([src], stick, _options(), kind="inplace")
    assert err.value.exit_code == 4
    assert _tree(stick) == {"NOTES.TXT": hashlib.sha256(b"not ours\n").hexdigest()}


def test_cancel_mid_write_removes_what_was_written(tmp_path: Path, stick: Path) -> None:
    cancel = Event()

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        master([ct_series(tmp_path / "a", 1, 5)], stick, _options(), kind="inplace",
               progress=progress, cancel=cancel)
    assert sorted(_tree(stick)) == ["NOTES.TXT"] and not (stick / "DICOM").exists()


def test_interrupted_run_is_cleaned_by_the_next(tmp_path: Path, stick: Path, monkeypatch) -> None:
    """A run killed mid-write leaves its journal and files, but no DICOMDIR. The owner then
    saves files of their own under names the journal lists (README.TXT; a DICOM path): the
    next run removes only what provably came from the killed run (its temporary names, and
    files matching their journal record), leaves the owner's alone and says so."""
    src = ct_series(tmp_path / "a", 1, 4)
    monkeypatch.setattr(inplace.Target, "undo", lambda self: None)  # as if the power went
    monkeypatch.setattr(inplace, "BATCH_FILES", 2)  # some files get their names, some not

    def die(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        master([src], stick, _options(viewer=True), kind="inplace", progress=die)
    monkeypatch.undo()
    journal = (stick / inplace.JOURNAL).read_text()
    assert not (stick / "DICOMDIR").exists() and "= " in journal
    series = stick / "DICOM" / "PT000000" / "ST000000" / "SE000000"
    assert (series / "IM000001").exists() and list(series.glob("*.TMP"))  # named, and not yet
    # the owner saves their own files under names the journal lists
    (stick / "README.TXT").write_text("the owner's own README\n")
    (series / "IM000001").write_bytes(b"the owner's notes, not DICOM\n")
    (series / "IM000003").write_bytes(b"another note of the owner's\n")
    mine = {k: v for k, v in _tree(stick).items()
            if k in ("README.TXT", "NOTES.TXT") or k.endswith(("IM000001", "IM000003"))}

    r = master([src], stick, _options(verify=True), kind="inplace")
    _judge(stick, 4)
    after = _tree(stick)
    assert all(after[k] == v for k, v in mine.items())  # the owner's files: untouched
    assert not (stick / inplace.JOURNAL).exists() and not list(stick.rglob("*.TMP"))
    assert not (stick / "INDEX.HTM").exists() and not (stick / "IHE_PDI").exists()
    assert not (series / "IM000000").exists()  # the killed run's own file: removed
    left = [w for w in r.warnings if "left alone" in w]
    assert len(left) == 3 and any(w.startswith("README.TXT") for w in left)
    assert any("interrupted earlier copy left" in w for w in r.warnings)


def test_interrupted_replace_is_finished_by_the_next_run(tmp_path: Path, stick: Path,
                                                          monkeypatch) -> None:
    """Power lost while --replace removes the old File-set (its DICOMDIR gone, some files
    left): the journal's removal records (size, SOP Instance UID) let the next run remove
    the rest, which no DICOMDIR lists any more, instead of refusing them as stray DICOM."""
    master([ct_series(tmp_path / "a", 1, 3)], stick, _options(), kind="inplace")
    old = sorted(p for p in stick.rglob("IM*"))

    def lose_power(self) -> None:
        os.unlink(self.root / "DICOMDIR")
        old[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(inplace.Target, "_remove_old", lose_power)
    monkeypatch.setattr(inplace.Target, "undo", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        master([sample("CT_small.dcm")], stick, _options(update="replace"), kind="inplace")
    monkeypatch.undo()
    assert "- " in (stick / inplace.JOURNAL).read_text() and old[1].exists()
    r = master([sample("CT_small.dcm")], stick, _options(verify=True), kind="inplace")
    _judge(stick, 1)
    assert not any(p.exists() for p in old) and "NOTES.TXT" in _tree(stick)
    assert any("interrupted earlier copy left 2 file(s)" in w for w in r.warnings)


def test_owner_files_with_our_fixed_names_refuse_the_write(stick: Path) -> None:
    """The owner's README.TXT: the web content would need its name. Refused before anything
    is written, and the owner's file is never touched (it was not created by this run)."""
    (stick / "README.TXT").write_text("the owner's own notes\n")
    before = _tree(stick)
    with pytest.raises(MasteringError) as err:
        master([sample("CT_small.dcm")], stick, _options(viewer=True), kind="inplace")
    assert err.value.exit_code == 6 and "README.TXT is already on the medium" in str(err.value)
    assert _tree(stick) == before and sorted(p.name for p in stick.iterdir()) == \
        ["NOTES.TXT", "README.TXT"]


@pytest.mark.oracle
def test_replace_with_the_viewer_replaces_our_web_pages_and_nothing_else(stick: Path) -> None:
    """A stick written with the web content, replaced with and without it: this program's old
    pages go with the old File-set (their manifest proves them ours); the owner's file in
    IHE_PDI/ and a page the owner changed stay."""
    master([sample("CT_small.dcm")], stick, _options(viewer=True), kind="inplace")
    assert (stick / inplace.MANIFEST).read_text().startswith(inplace.MANIFEST_MAGIC)
    (stick / "IHE_PDI" / "MINE.TXT").write_text("the owner's\n")
    r = master([sample("MR_small.dcm")], stick,
               _options(viewer=True, update="replace", verify=True), kind="inplace")
    _judge(stick, 1)
    readme = (stick / "README.TXT").read_text()
    assert "MR1" in readme and "CT1" not in readme  # the new patient's pages only
    assert "CT1" not in "".join(p.read_text(errors="replace") for p in stick.rglob("*.HTM"))
    assert (stick / "IHE_PDI" / "MINE.TXT").exists() and (stick / "NOTES.TXT").exists()
    assert r.ok
    changed = stick / "INDEX.HTM"
    changed.write_bytes(changed.read_bytes() + b"<!-- edited by the owner -->")
    r = master([sample("CT_small.dcm")], stick, _options(update="replace"), kind="inplace")
    _judge(stick, 1)
    left = set(_tree(stick))
    assert left == {"DICOMDIR", "NOTES.TXT", "IHE_PDI/MINE.TXT", "INDEX.HTM"} | {
        n for n in left if n.startswith("DICOM/")}
    assert any(w.startswith("INDEX.HTM") and "left alone" in w for w in r.warnings)


@pytest.mark.oracle
def test_a_new_fileset_with_the_viewer_can_be_replaced_later(tmp_path: Path) -> None:
    """``mastering fileset -o DIR --viewer`` writes the web content's manifest too, so a later
    ``--replace --viewer`` into DIR knows the old pages as this program's and replaces them."""
    out = tmp_path / "usb"
    master([sample("CT_small.dcm")], out, _options(viewer=True), kind="folder")
    lines = (out / inplace.MANIFEST).read_text().splitlines()
    assert lines[0] == inplace.MANIFEST_MAGIC
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines[1:]}
    assert "INDEX.HTM" in listed and all(
        hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
        for name, digest in listed.items())
    r = master([sample("MR_small.dcm")], out, _options(viewer=True, update="replace"),
               kind="inplace")
    assert r.ok
    _judge(out, 1)
    assert "MR1" in (out / "README.TXT").read_text()


def test_replace_refuses_a_record_that_points_at_a_non_dicom_file(tmp_path: Path,
                                                                  stick: Path) -> None:
    """A record whose Referenced File ID names the owner's JPEG: --replace refuses (and
    removes nothing) instead of deleting the photo."""
    master([ct_series(tmp_path / "a", 1, 2)], stick, _options(), kind="inplace")
    ours = b"DICOM\\PT000000\\ST000000\\SE000000\\IM000001"
    photo = b"PHOTOS\\HOLIDAY\\BEACH\\SUMMER24\\IMG00001\\A1"
    assert len(photo) == len(ours)
    data = (stick / "DICOMDIR").read_bytes()
    assert data.count(ours) == 1
    (stick / "DICOMDIR").write_bytes(data.replace(ours, photo))
    (stick.joinpath(*ours.decode().split("\\"))).unlink()
    jpeg = stick.joinpath(*photo.decode().split("\\"))
    jpeg.parent.mkdir(parents=True)
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    before = _tree(stick)
    with pytest.raises(MasteringError) as err:
        master([sample("CT_small.dcm")], stick, _options(update="replace"), kind="inplace")
    assert err.value.exit_code == 6 and "not a DICOM Part 10 file" in str(err.value)
    assert "PHOTOS/HOLIDAY/BEACH" in str(err.value)
    assert _tree(stick) == before


def test_append_refuses_records_that_do_not_match_their_files(tmp_path: Path,
                                                              stick: Path) -> None:
    """Two records on one file, or a record whose SOP Instance UID is not its file's: the
    append is refused with the reason (a record would be lost, or the medium mislabelled)."""
    master([ct_series(tmp_path / "a", 1, 2)], stick, _options(), kind="inplace")
    series = stick / "DICOM" / "PT000000" / "ST000000" / "SE000000"
    before = _tree(stick)
    data = (stick / "DICOMDIR").read_bytes()
    (stick / "DICOMDIR").write_bytes(data.replace(b"SE000000\\IM000001",
                                                  b"SE000000\\IM000000"))
    moved = (series / "IM000001").rename(tmp_path / "IM000001")
    new = make_ct(tmp_path / "b", "1.dcm", study_uid="1.5", series_uid="1.5.1")
    with pytest.raises(MasteringError) as err:
        master([new], stick, _options(update="append"), kind="inplace")
    assert err.value.exit_code == 6 and "2 records of the DICOMDIR reference one file" in \
        str(err.value)
    (stick / "DICOMDIR").write_bytes(data)
    moved.rename(series / "IM000001")
    assert _tree(stick) == before
    a, b = (series / "IM000000").read_bytes(), (series / "IM000001").read_bytes()
    (series / "IM000000").write_bytes(b)  # the two files swapped
    (series / "IM000001").write_bytes(a)
    with pytest.raises(MasteringError) as err:
        master([new], stick, _options(update="append"), kind="inplace")
    assert err.value.exit_code == 6 and "but its DICOMDIR record names" in str(err.value)


def test_append_neither_opens_fifos_nor_follows_links(tmp_path: Path) -> None:
    """A FIFO and a link in a folder File-set: `fileset --append` reads neither (a FIFO once
    blocked it for ever) and reports both."""
    folder = tmp_path / "set"
    cmd = [sys.executable, "-m", "mastering", "fileset"]
    subprocess.run([*cmd, str(sample("CT_small.dcm")), "-o", str(folder)], check=True,
                   capture_output=True)
    os.mkfifo(folder / "DICOM" / "PIPE")
    (folder / "LINK").symlink_to(make_ct(tmp_path / "elsewhere", "x.dcm", sop_uid="1.2.9.1"))
    res = subprocess.run([*cmd, str(sample("MR_small.dcm")), "-o", str(folder), "--append"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "DICOM/PIPE: not a regular file" in out and "LINK: a symbolic link" in out
    assert len(list(FileSet(folder / "DICOMDIR"))) == 2


def test_foreign_dicom_files_refused(tmp_path: Path, stick: Path) -> None:
    make_ct(stick / "LOOSE", "IMG1", sop_uid="1.2.5.5")  # someone else's unindexed file
    with pytest.raises(MasteringError) as err:
        master([make_ct(tmp_path, "a.dcm")], stick, _options(), kind="inplace")
    assert err.value.exit_code == 6 and "LOOSE/IMG1" in str(err.value)


def test_read_back_mismatch_undoes_the_write(tmp_path: Path, stick: Path) -> None:
    """A medium that returns other bytes than were written (a fake-capacity stick) fails the
    check; the run's files and DICOMDIR are removed, the earlier DICOMDIR restored."""
    master([ct_series(tmp_path / "a", 1, 2)], stick, _options(), kind="inplace")
    before = _tree(stick)

    def corrupt(root: Path) -> Path:
        victim = sorted(p for p in root.rglob("IM*") if p.stat().st_mtime_ns > mark)[0]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        return root

    mark = max(p.stat().st_mtime_ns for p in stick.rglob("*"))
    make_ct(tmp_path / "b", "1.dcm", study_uid="1.5", series_uid="1.5.1")
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "b"], stick, _options(update="append", reread=corrupt),
               kind="inplace")
    assert err.value.exit_code == 5
    assert _tree(stick) == before


@pytest.mark.oracle
def test_fat_rules_refuse_long_names(tmp_path: Path, stick: Path) -> None:
    from mastering import fat

    assert fat.short_name_ok("IM000001") and fat.short_name_ok("README.TXT")
    assert not fat.short_name_ok("im000001") and not fat.short_name_ok("LONGNAME1")
    assert not fat.short_name_ok("CON") and not fat.short_name_ok("A.HTML")
    assert fat.size_problems([(("BIG",), 2**32)]) and not fat.size_problems([(("OK",), 2**32 - 1)])


@pytest.mark.oracle
def test_cli_fileset_append(tmp_path: Path, stick: Path) -> None:
    cmd = [sys.executable, "-m", "mastering", "fileset"]
    stick = stick.parent / "folder"  # a File-set folder made as usual, then appended to
    a = subprocess.run([*cmd, str(sample("CT_small.dcm")), "-o", str(stick), "--verify"],
                       capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    b = subprocess.run([*cmd, str(sample("MR_small.dcm")), "-o", str(stick)],
                       capture_output=True, text=True)
    assert b.returncode == 6 and "--append" in b.stderr
    c = subprocess.run([*cmd, str(sample("MR_small.dcm")), "-o", str(stick), "--append",
                        "--verify"], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    _judge(stick, 2)


def _records(journal: str) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) of the journal's records of written files."""
    found = {}
    for line in journal.splitlines():
        if line.startswith("= "):
            _mark, size, proof, name = line.split(" ")
            found[name] = (int(size), proof.removeprefix("sha256:"))
    return found


def test_journal_proofs_match_the_bytes_on_disk(tmp_path: Path, stick: Path,
                                                monkeypatch) -> None:
    """Every file written (images and web content, copied and hashed on worker threads) has
    a record whose size and SHA-256 are those of the file on the medium."""
    seen: list[str] = []
    remove = inplace.Journal.remove

    def keep(self) -> None:
        seen.append((self.root / inplace.JOURNAL).read_text())
        remove(self)

    monkeypatch.setattr(inplace.Journal, "remove", keep)
    master([ct_series(tmp_path / "a", 2, 5)], stick, _options(viewer=True), kind="inplace")
    records = _records(seen[0])
    written = {k: v for k, v in _tree(stick).items() if k not in ("NOTES.TXT", "DICOMDIR")}
    assert set(records) == set(written) and len(records) > 10
    for name, (size, digest) in records.items():
        assert (stick / name).stat().st_size == size and written[name] == digest


@pytest.mark.parametrize("power_lost", [False, True])
def test_interrupted_mid_batch_with_copies_in_flight(tmp_path: Path, stick: Path,
                                                     monkeypatch, power_lost: bool) -> None:
    """Ctrl-C while several copies run on the pool's threads, in the middle of a batch: no
    copy thread is left running; a plain interruption leaves only the owner's file, and a
    lost power (no undo) only files the journal proves this run's, which the next run
    removes."""
    import threading

    src = ct_series(tmp_path / "a", 2, 10)
    monkeypatch.setattr(inplace, "BATCH_FILES", 6)
    if power_lost:
        monkeypatch.setattr(inplace.Target, "undo", lambda self: None)

    def die(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        master([src], stick, _options(), kind="inplace", progress=die)
    assert not [t for t in threading.enumerate() if t.name.startswith("inplace-copy")]
    assert not (stick / "DICOMDIR").exists()
    if not power_lost:
        assert sorted(_tree(stick)) == ["NOTES.TXT"] and not (stick / "DICOM").exists()
        return
    monkeypatch.undo()
    journal = (stick / inplace.JOURNAL).read_text()
    token = journal.splitlines()[2].removeprefix("temp ")
    records = _records(journal)
    left = {k: v for k, v in _tree(stick).items() if k not in ("NOTES.TXT", inplace.JOURNAL)}
    named = {k for k in left if not k.endswith(".TMP")}
    assert 6 <= len(named) < 20 and any(k.endswith(".TMP") for k in left)
    assert all(k.rsplit("/", 1)[-1].startswith(token) for k in left if k.endswith(".TMP"))
    assert all(records[k][1] == left[k] for k in named)  # each named file: its proof holds
    r = master([src], stick, _options(verify=True), kind="inplace")
    _judge(stick, 20)
    assert not list(stick.rglob("*.TMP")) and not (stick / inplace.JOURNAL).exists()
    assert any("interrupted earlier copy left" in w for w in r.warnings)


def test_source_changed_while_copied_in_place_names_it(tmp_path: Path, stick: Path,
                                                       monkeypatch) -> None:
    """A source another program appends to while a copy thread copies it fails the run with
    an error naming the file; nothing of the run is left on the stick."""
    from mastering import content
    from mastering.content import SourceChanged

    src = ct_series(tmp_path / "a", 1, 6)
    victim = sorted(src.rglob("*.dcm"))[3]
    real = content._kernel_copy

    def copy(fd_in: int, fd_out: int, count: int, offset: int, at: int) -> int:
        n = real(fd_in, fd_out, count, offset, at)
        if os.fstat(fd_in).st_ino == victim.stat().st_ino and offset == 0:
            with open(victim, "ab") as fh:
                fh.write(b"\0\0\0\0")
        return n

    monkeypatch.setattr(content, "_kernel_copy", copy)
    with pytest.raises(SourceChanged, match=str(victim)):
        master([src], stick, _options(), kind="inplace")
    assert sorted(_tree(stick)) == ["NOTES.TXT"]
