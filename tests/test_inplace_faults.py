"""Adversarial review of the parallel in-place writer (inplace._copy_files, hashcopy).

Faults injected at exact points; each test states the invariant it checks (DEVELOPERS.md:
nothing lost, nothing altered, nothing destroyed; delete only what this program wrote)."""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from pathlib import Path

import pytest

from mastering import hashcopy, inplace, syscalls
from mastering.pipeline import master

from .conftest import ct_series
from .test_inplace import USB, _options, _tree  # noqa: F401 - shared helpers


def _dirs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())


def _copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("inplace-copy")
            and t.is_alive()]


def _referenced_missing(root: Path) -> list[str]:
    """Files the DICOMDIR on root references that are not there."""
    import pydicom

    if not (root / "DICOMDIR").exists():
        return []
    ds = pydicom.dcmread(root / "DICOMDIR")
    refs = ["/".join(r.ReferencedFileID) if r["ReferencedFileID"].VM > 1
            else str(r.ReferencedFileID)
            for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    return [n for n in refs if not (root / n).is_file()]


def _power_lost_at_replace(monkeypatch, when) -> None:  # noqa: ANN001
    """os.replace in inplace raises Boom (the power goes) where when(src, dst) says so."""
    real = inplace.os.replace

    def replace(src, dst, *a, **kw):
        if when(Path(src), Path(dst)):
            raise Boom("power lost before the rename")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(inplace.os, "replace", replace)


class Boom(KeyboardInterrupt):
    """The injected Ctrl-C."""


def _inject(monkeypatch, owner, attr: str, nth: int, after: bool) -> list[int]:
    """Raise Boom at the nth call of owner.attr, before or after the real call."""
    real = getattr(owner, attr)
    calls = [0]
    if nth == 0:  # the last call: as many submits as files
        real_copy = inplace.Target._copy_files

        def copy_files(self, files, *a, **kw):
            target[0] = len(files)
            return real_copy(self, files, *a, **kw)

        target = [0]
        monkeypatch.setattr(inplace.Target, "_copy_files", copy_files)

    def wrapper(*a, **kw):
        calls[0] += 1
        if nth == 0:
            wrapper.nth = target[0]
        else:
            wrapper.nth = nth
        if calls[0] == wrapper.nth and not after:
            raise Boom(attr)
        out = real(*a, **kw)
        if calls[0] == wrapper.nth and after:
            raise Boom(attr)
        return out

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


POINTS = [
    # (owner, attribute, nth call, after the real call)
    (hashcopy.Pool, "submit", 1, False),
    (hashcopy.Pool, "submit", 3, True),   # copies in flight, between submit and result
    (hashcopy.Pool, "submit", 0, True),  # the last submit
    (inplace.Target, "_took", 1, False),
    (inplace.Target, "_took", 4, True),
    (inplace.Target, "_commit", 1, False),
    (inplace.Target, "_commit", 2, True),
    (inplace, "_sync_data", 1, False),
    (inplace, "_sync_data", 2, True),
    (inplace.Journal, "flush", 1, False),
    (inplace.Journal, "flush", 1, True),
    (inplace, "_rename_noreplace", 1, False),
    (inplace.Target, "_temp_for", 5, True),
    (inplace.Target, "_publish_dicomdir", 1, False),
]


@pytest.mark.parametrize("mode", ["", "append", "replace"])
@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{getattr(p[0], '__name__', p[0])}."
                         f"{p[1]}#{p[2]}{'after' if p[3] else 'before'}")
def test_fault_at_every_point_leaves_the_stick_as_it_was(tmp_path: Path, stick: Path,
                                                         monkeypatch, mode, point) -> None:
    """Ctrl-C at each point of _copy_files/_commit: no copy thread outlives the call, and the
    stick holds what it held before (append), or the owner's file only (replace, "")."""
    if mode:
        master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    before, before_dirs = _tree(stick), _dirs(stick)
    monkeypatch.setattr(inplace, "BATCH_FILES", 3)
    owner, attr, nth, after = point
    calls = _inject(monkeypatch, owner, attr, nth, after)
    src = ct_series(tmp_path / "new", 2, 5, first=5)
    with pytest.raises(Boom):
        master([src], stick, _options(update=mode, viewer=not mode), kind="inplace")
    assert calls[0] >= nth
    assert not _copy_threads()
    if mode == "append":
        assert _tree(stick) == before and _dirs(stick) == before_dirs
    else:
        assert sorted(_tree(stick)) == ["NOTES.TXT"] and _dirs(stick) == []


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p[1]}#{p[2]}{'a' if p[3] else 'b'}")
def test_power_lost_at_every_point_next_run_cleans_only_ours(tmp_path: Path, stick: Path,
                                                             monkeypatch, point) -> None:
    """The same points with no undo (power lost): every file left is provably this run's
    (temporary name with its token, or matches its record); the next run removes exactly
    those and finishes; the owner's file is untouched."""
    monkeypatch.setattr(inplace, "BATCH_FILES", 3)
    monkeypatch.setattr(inplace.Target, "undo", lambda self: None)
    owner, attr, nth, after = point
    _inject(monkeypatch, owner, attr, nth, after)
    src = ct_series(tmp_path / "new", 2, 5)
    with pytest.raises(Boom):
        master([src], stick, _options(viewer=True), kind="inplace")
    monkeypatch.undo()
    time.sleep(0.05)
    assert not _copy_threads()
    assert _referenced_missing(stick) == []
    master([src], stick, _options(), kind="inplace")
    assert not list(stick.rglob("*.TMP")) and not (stick / inplace.JOURNAL).exists()
    assert (stick / "NOTES.TXT").read_text() == "not ours\n"
    assert not (stick / "INDEX.HTM").exists()  # the killed run's web content: removed


@pytest.mark.parametrize("nth", [1, 4])
def test_interrupt_right_after_a_rename_leaks_nothing(tmp_path: Path, stick: Path,
                                                      monkeypatch, nth: int) -> None:
    """Ctrl-C delivered after renameat2 returned but before _commit moved the name from
    temps to made_files (the next bytecode): undo must still remove that file, and must not
    drop the journal while a file of this run stays on the stick."""
    monkeypatch.setattr(inplace, "BATCH_FILES", 3)
    _inject(monkeypatch, inplace, "_rename_noreplace", nth, after=True)
    with pytest.raises(Boom):
        master([ct_series(tmp_path / "a", 1, 6)], stick, _options(), kind="inplace")
    leaked = sorted(_tree(stick))
    assert not (stick / inplace.JOURNAL).exists()  # undo dropped the only proof
    assert leaked == ["NOTES.TXT"], f"a file of this run leaked, journal gone: {leaked}"


@pytest.mark.parametrize("mode", ["", "append"])
def test_interrupt_right_after_the_dicomdir_rename(tmp_path: Path, stick: Path, monkeypatch,
                                                   mode: str) -> None:
    """Ctrl-C after os.replace(tmp, DICOMDIR) returned, before wrote_dicomdir was set: undo
    removes the run's files but leaves the new DICOMDIR, which then references missing files
    (append: the old DICOMDIR is not restored)."""
    if mode:
        master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    old = (stick / "DICOMDIR").read_bytes() if mode else None
    import os as _os

    real = _os.replace

    def replace(src, dst, *a, **kw):
        real(src, dst, *a, **kw)
        if Path(dst).name == "DICOMDIR" and Path(dst).parent == stick:
            raise Boom("after DICOMDIR")

    monkeypatch.setattr(inplace.os, "replace", replace)
    with pytest.raises(Boom):
        master([ct_series(tmp_path / "a", 1, 4, first=5)], stick, _options(update=mode),
               kind="inplace")
    monkeypatch.undo()
    assert _referenced_missing(stick) == [], "the DICOMDIR lists files that undo removed"
    if mode:
        assert (stick / "DICOMDIR").read_bytes() == old
    else:
        assert not (stick / "DICOMDIR").exists()


def test_durability_order_data_then_records_then_renames(tmp_path: Path, stick: Path,
                                                         monkeypatch) -> None:
    """Every record is flushed only after a _sync_data that covered its file (data durable
    first), and every rename comes after the flush of its record; progress is monotonic."""
    monkeypatch.setattr(inplace, "BATCH_FILES", 3)
    events: list[tuple[str, object]] = []
    real_sync, real_flush, real_rename = (inplace._sync_data, inplace.Journal.flush,
                                          inplace._rename_noreplace)

    def sync(root, names):
        events.append(("sync", set(names)))
        return real_sync(root, names)

    def flush(self):
        pending = [p[0] for p in self.pending]
        out = real_flush(self)
        events.append(("flush", set(pending)))
        return out

    def rename(src, dst):
        events.append(("rename", Path(src).relative_to(stick).as_posix()))
        return real_rename(src, dst)

    monkeypatch.setattr(inplace, "_sync_data", sync)
    monkeypatch.setattr(inplace.Journal, "flush", flush)
    monkeypatch.setattr(inplace, "_rename_noreplace", rename)
    seen: list[tuple[int, int]] = []
    master([ct_series(tmp_path / "a", 2, 5)], stick, _options(viewer=True), kind="inplace",
           progress=lambda s, d, t: seen.append((d, t)) if s.startswith("write") else None)
    synced: set = set()
    flushed: set = set()
    for kind, what in events:
        if kind == "sync":
            synced |= what
        elif kind == "flush":
            assert what <= synced, f"records before their data was synced: {what - synced}"
            flushed |= what
        else:
            assert what in flushed, f"{what} renamed before its record was durable"
    assert seen and all(b[0] >= a[0] for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1][0] == seen[-1][1] == 10


def _fake_libc_eio():
    class Lib:
        def syncfs(self, fd: int) -> int:
            ctypes.set_errno(errno.EIO)
            return -1

    return Lib()


def test_syncfs_eio_is_not_ignored(tmp_path: Path, stick: Path, monkeypatch) -> None:
    """syncfs(2) failing with EIO (the stick could not write back) must fail the run; today
    syscalls.syncfs folds every failure into False and the writer falls back to fdatasync
    of each file on fresh descriptors, so the error syncfs reported is dropped."""
    monkeypatch.setattr(syscalls, "libc", _fake_libc_eio)
    with pytest.raises(OSError):
        master([ct_series(tmp_path / "a", 1, 3)], stick, _options(), kind="inplace")


def test_next_run_keeps_an_owner_file_that_looks_like_a_temp_name(tmp_path: Path, stick: Path,
                                                                  monkeypatch) -> None:
    """The owner's file QQQQ0000.TMP is already there when a run draws the token QQQQ: the
    run draws another, so the next run's cleanup of its temporary names cannot take the
    owner's file for one of them."""
    (stick / "QQQQ0000.TMP").write_text("the owner's own temp file\n")
    letters = iter("QQQQ" * 2 + "RRRR" * 1000)  # QQQQ for the first run, then QQQQ again
    monkeypatch.setattr(inplace.secrets, "choice", lambda chars: next(letters))
    monkeypatch.setattr(inplace.Target, "undo", lambda self: None)  # power lost
    _inject(monkeypatch, inplace.Target, "_took", 2, after=False)
    with pytest.raises(Boom):
        master([ct_series(tmp_path / "a", 1, 3)], stick, _options(viewer=True),
               kind="inplace")
    monkeypatch.undo()
    master([ct_series(tmp_path / "a", 1, 3)], stick, _options(), kind="inplace")
    assert (stick / "QQQQ0000.TMP").exists(), "the owner's file was removed as ours"


def test_second_ctrl_c_while_waiting_for_copies(tmp_path: Path, stick: Path,
                                                monkeypatch) -> None:
    """A second Ctrl-C while pool.close() waits for its threads: it still waits for every
    thread before it raises, so none holds a descriptor on the medium while undo runs."""
    from mastering import content

    real_copy = content._kernel_copy

    def slow(*a):
        time.sleep(0.05)
        return real_copy(*a)

    monkeypatch.setattr(content, "_kernel_copy", slow)
    from concurrent.futures import ThreadPoolExecutor

    real_shutdown = ThreadPoolExecutor.shutdown

    pressed = []

    def shutdown(self, wait=True, *, cancel_futures=False):
        if wait and not pressed:  # the second Ctrl-C arrives while Thread.join() waits
            pressed.append(1)
            real_shutdown(self, wait=False, cancel_futures=cancel_futures)
            raise Boom("second Ctrl-C while waiting for the copy threads")
        real_shutdown(self, wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(ThreadPoolExecutor, "shutdown", shutdown)
    _inject(monkeypatch, inplace.Target, "_took", 2, after=False)
    with pytest.raises(Boom):
        master([ct_series(tmp_path / "a", 1, 8)], stick, _options(), kind="inplace")
    alive = _copy_threads()
    for t in alive:
        t.join(5)
    assert sorted(_tree(stick)) == ["NOTES.TXT"]  # nothing leaked once they stopped
    assert not alive, "copy threads still running (descriptors on the medium) after it raised"


def test_power_lost_while_undo_restores_the_old_dicomdir(tmp_path: Path, stick: Path,
                                                         monkeypatch) -> None:
    """--append fails after its DICOMDIR was published; undo restores the old DICOMDIR
    through a temporary name. Power lost before that rename: the leftover copy carries the
    journal's token, so the next run knows it as ours and can append."""

    master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    _inject(monkeypatch, inplace.Journal, "remove", 1, after=False)  # after the DICOMDIR
    renames = []  # the first one to DICOMDIR publishes, the second is undo's restore
    _power_lost_at_replace(monkeypatch, lambda src, dst: dst.name == "DICOMDIR"
                           and len(renames.append(src) or renames) == 2)
    with pytest.raises(Boom):
        master([ct_series(tmp_path / "a", 1, 3, first=5)], stick, _options(update="append"),
               kind="inplace")
    assert len(renames) == 2  # the power went at undo's restore
    monkeypatch.undo()
    master([ct_series(tmp_path / "b", 1, 2, first=7)], stick, _options(update="append"),
           kind="inplace")
    assert not list(stick.glob("*.TMP"))


def test_power_lost_between_unlinking_lowercase_dicomdir_and_the_rename(
        tmp_path: Path, stick: Path, monkeypatch) -> None:
    """--append onto a folder whose DICOMDIR is stored as 'dicomdir' (case-sensitive file
    system): power lost before the new DICOMDIR is renamed in must not leave the old
    File-set without one (the old one is removed only after the rename)."""

    master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    (stick / "DICOMDIR").rename(stick / "dicomdir")
    monkeypatch.setattr(inplace.Target, "undo", lambda self: None)
    _power_lost_at_replace(monkeypatch, lambda src, dst: dst.name == "DICOMDIR")
    with pytest.raises(Boom):
        master([ct_series(tmp_path / "a", 1, 3, first=5)], stick, _options(update="append"),
               kind="inplace")
    monkeypatch.undo()
    assert (stick / "dicomdir").exists() or (stick / "DICOMDIR").exists(), \
        "the old File-set lost its DICOMDIR"


def test_replace_leaves_an_old_dicomdir_changed_since_it_was_read(
        tmp_path: Path, stick: Path, monkeypatch) -> None:
    """--replace removes the old DICOMDIR only as it was read when the run planned: one
    changed meanwhile stays, the run fails, nothing of the old File-set is removed."""
    from mastering.pipeline import MasteringError

    master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    before = _tree(stick)
    real = inplace.Target._remove_old

    def remove_old(self):
        (stick / "DICOMDIR").write_bytes((stick / "DICOMDIR").read_bytes() + b"\0\0")
        return real(self)

    monkeypatch.setattr(inplace.Target, "_remove_old", remove_old)
    with pytest.raises(MasteringError, match="DICOMDIR changed on the medium"):
        master([ct_series(tmp_path / "a", 1, 2, first=5)], stick,
               _options(update="replace"), kind="inplace")
    after = _tree(stick)
    assert after.pop("DICOMDIR") != before.pop("DICOMDIR")  # the changed one, kept
    assert after == before


def test_append_keeps_a_lowercase_dicomdir_changed_since_it_was_read(
        tmp_path: Path, stick: Path, monkeypatch) -> None:
    """--append onto 'dicomdir' (case-sensitive file system) that someone changes while the
    run writes: it stays as it is, the new DICOMDIR and this run's files go."""
    from mastering.pipeline import MasteringError

    master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    (stick / "DICOMDIR").rename(stick / "dicomdir")
    before = _tree(stick)
    real = inplace.Target._publish_dicomdir

    def publish(self, dicomdir):
        (stick / "dicomdir").write_bytes((stick / "dicomdir").read_bytes() + b"\0\0")
        return real(self, dicomdir)

    monkeypatch.setattr(inplace.Target, "_publish_dicomdir", publish)
    with pytest.raises(MasteringError, match="dicomdir changed on the medium"):
        master([ct_series(tmp_path / "a", 1, 2, first=5)], stick,
               _options(update="append"), kind="inplace")
    after = _tree(stick)
    assert after.pop("dicomdir") != before.pop("dicomdir")
    assert after == before  # no DICOMDIR beside it, none of this run's files


def test_a_name_taken_during_the_write_is_left_alone(tmp_path: Path, stick: Path,
                                                     monkeypatch) -> None:
    """Another program saves a file at one of the run's final names while it writes: the
    rename never replaces it, the run fails naming it, and that file is untouched."""
    from mastering.pipeline import MasteringError

    real = inplace._sync_data
    taken = stick / "DICOM" / "PT000000" / "ST000000" / "SE000000" / "IM000001"

    def sync(root, names):
        if not taken.exists():
            taken.write_bytes(b"someone else's\n")
        return real(root, names)

    monkeypatch.setattr(inplace, "_sync_data", sync)
    with pytest.raises(MasteringError, match="appeared on the medium"):
        master([ct_series(tmp_path / "a", 1, 4)], stick, _options(), kind="inplace")
    assert taken.read_bytes() == b"someone else's\n"
    assert sorted(_tree(stick)) == ["DICOM/PT000000/ST000000/SE000000/IM000001", "NOTES.TXT"]


def test_a_torn_last_journal_line_is_skipped() -> None:
    """The docstring of _parse_journal: 'A torn last line ... proves nothing and is skipped'.
    A journal cut inside its last line (no newline) still yields that line's prefix."""
    text = "\n".join([inplace.JOURNAL_MAGIC, "run x", "temp QQQQ", "+ DICOM/PT000000/IM",
                      "= 12 sha256:" + "0" * 64 + " DICOM/PT0"])  # torn: no final newline
    _token, planned, proofs = inplace._parse_journal(text)
    assert not [p for p in proofs if p.name == "DICOM/PT0"], "a torn record was parsed"


@pytest.mark.parametrize("mode", ["", "append"])
def test_every_renamed_entry_is_durable_before_the_dicomdir(tmp_path: Path, stick: Path,
                                                           monkeypatch, mode: str) -> None:
    """A rename changes its folder's entries: the folder (or the whole file system, syncfs)
    must be made durable after the last rename in it and before the new DICOMDIR is renamed
    into place, or a power loss can leave a durable DICOMDIR that lists a file still under
    its temporary name (vfat: fsync of the root does not write a subfolder's entries).
    --append writes into folders that existed before the run (not in made_dirs)."""
    import os as _os

    if mode:
        master([ct_series(tmp_path / "old", 1, 3)], stick, _options(), kind="inplace")
    events: list[tuple[str, str]] = []
    real_fsync, real_sync, real_rename, real_replace = (
        inplace._fsync, inplace._sync_data, inplace._rename_noreplace, _os.replace)

    def fsync(path):
        events.append(("fsync", Path(path).relative_to(stick).as_posix()))
        return real_fsync(path)

    def sync(root, names):
        events.append(("syncfs", ""))
        return real_sync(root, names)

    def rename(src, dst):
        events.append(("rename", Path(dst).parent.relative_to(stick).as_posix()))
        return real_rename(src, dst)

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "DICOMDIR":
            events.append(("dicomdir", ""))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(inplace, "_fsync", fsync)
    monkeypatch.setattr(inplace, "_sync_data", sync)
    monkeypatch.setattr(inplace, "_rename_noreplace", rename)
    monkeypatch.setattr(inplace.os, "replace", replace)
    # the same series again under new UIDs: a new series in the old patient/study folders
    master([ct_series(tmp_path / "a", 1, 3, first=5)], stick, _options(update=mode),
           kind="inplace")
    cut = events.index(("dicomdir", ""))
    dirty: set[str] = set()
    for kind, what in events[:cut]:
        if kind == "rename":
            dirty.add(what)  # (a made folder's own entry: written by its fsync on vfat)
        elif kind == "fsync":
            dirty.discard(what)
        elif kind == "syncfs":
            dirty.clear()
    assert not dirty, f"renamed entries not durable before the DICOMDIR: {sorted(dirty)}"
