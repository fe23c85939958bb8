"""Data safety: a run never destroys a user's file, never drops one in silence, and dies cleanly.

Every case builds its own situation: tmpfs mounts for other and full file systems, a non-root
user (setpriv) for permissions, real signals to a real ``mastering`` process. Each checks that
the user's files are byte-identical afterwards and that nothing of the run is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mastering import profiles
from mastering.pipeline import MasteringError, Options, master

from .conftest import dciodvfy_errors, dcmdump, make_ct

NOBODY = 65534


# -- helpers ---------------------------------------------------------------------------------


def run(*args: str, user: int | None = None, timeout: float = 120,
        **kw) -> subprocess.CompletedProcess:
    """The real command line, off a terminal (pipes), as root or as another user."""
    cmd = [sys.executable, "-m", "mastering", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                          **kw)


def start(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mastering", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                            **kw)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file, link and folder below roots (links not followed), with a content hash."""
    out: dict[str, str] = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            for name in dirs + names:
                path = Path(folder, name)
                if path.is_symlink():
                    out[str(path)] = "link:" + os.readlink(path)
                elif path.is_dir():
                    out[str(path)] = "dir"
                elif path.is_file():
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    out[str(path)] = "special"
    return out


def leftovers(*folders: Path) -> list[str]:
    """Our temporary things: work folders, locks, temporary files."""
    found = []
    for folder in folders:
        for path in folder.rglob(".*"):
            if re.search(r"\.(partial|lock|tmp)$", path.name):
                found.append(str(path))
    return found


@contextlib.contextmanager
def tmpfs(size: str, mode: str = "755") -> Iterator[Path]:
    """A small file system of our own (another device, or one that fills up)."""
    mnt = Path(tempfile.mkdtemp(prefix="mastering-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs",
                    str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="mastering-shared-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def many(folder: Path, count: int, rows: int = 32) -> Path:
    """count distinct instances from one file: its SOP Instance UID (meta and data set) gets
    a new last digit run of the same length, so the bytes stay valid DICOM."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    data = make_ct(folder / "_t", "t.dcm", rows=rows, sop_uid=uid).read_bytes()
    shutil.rmtree(folder / "_t")
    src = folder / "in"
    src.mkdir(parents=True)
    for i in range(count):
        new = uid[:-6] + f"{i:06d}"
        (src / f"c{i:05d}.dcm").write_bytes(data.replace(uid.encode(), new.encode()))
    return src


def children(pid: int) -> list[int]:
    """PIDs whose parent is pid (the run's worker processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout: float = 30, step: float = 0.002) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


# -- 1. only delete what is provably ours ----------------------------------------------------


@pytest.mark.parametrize("out_name, users", [
    ("scan.dcm", ["scan-1.dcm", "scan-2.dcm", "scan-3.dcm"]),
    ("IM", ["IM-0001", "IM-0002", "IM-1"]),
    ("disc.iso", ["disc-1.iso", "disc-2.iso", "disc-1.label.svg"]),
])
def test_user_files_with_lookalike_names_survive(tmp_path: Path, out_name: str,
                                                 users: list[str]) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    out = tmp_path / "out"
    out.mkdir()
    for name in users:
        (out / name).write_bytes(f"the user's own {name}".encode())
    before = snapshot(tmp_path / "in", *(out / n for n in users))
    res = run("iso", str(tmp_path / "in"), "-o", str(out / out_name))
    assert res.returncode == 0, res.stderr
    assert snapshot(tmp_path / "in", *(out / n for n in users)) == before
    assert all((out / n).read_bytes() == f"the user's own {n}".encode() for n in users)
    assert leftovers(out) == []


def test_a_spanned_run_never_overwrites_user_files(tmp_path: Path) -> None:
    """OUT-2.iso that an earlier run did not write is the user's: refuse, write nothing."""
    for s in range(3):
        for i in range(3):
            make_ct(tmp_path / "in" / f"s{s}", f"{i}.dcm", instance=i + 1, rows=64,
               series_uid=f"1.2.3.4.1.{s + 10}", SeriesNumber=s + 1)
    (tmp_path / "o-2.iso").write_bytes(b"mine")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "o.iso"), "--capacity",
              "150000")
    assert res.returncode == 6, res.stderr
    assert "o-2.iso: exists and was not written by an earlier run" in res.stderr
    assert (tmp_path / "o-2.iso").read_bytes() == b"mine"
    assert not (tmp_path / "o-1.iso").exists() and leftovers(tmp_path) == []


def test_earlier_set_removed_only_while_unchanged(tmp_path: Path) -> None:
    """A 3-volume run, then a 1-volume run: the earlier volumes go, except one the user has
    replaced since (it is theirs now), which stays and is named in a warning."""
    for s in range(3):
        for i in range(3):
            make_ct(tmp_path / "in" / f"s{s}", f"{i}.dcm", instance=i + 1, rows=64,
               series_uid=f"1.2.3.4.1.{s + 10}", SeriesNumber=s + 1)
    small = profiles.load("STD-GEN-CD").with_capacity(150_000)
    first = master([tmp_path / "in"], tmp_path / "o.iso", Options(small, label=True))
    count = len(first.volumes)
    assert count >= 3
    replaced = tmp_path / f"o-{count}.iso"
    data = replaced.read_bytes()
    replaced.unlink()
    replaced.write_bytes(data)  # the same bytes, but a file the user put there
    second = master([tmp_path / "in"], tmp_path / "o.iso", Options(profiles.load("STD-GEN-CD")))
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted([".o.iso.mastering.json", "o.iso", replaced.name])
    assert any(replaced.name in w and "not provably written" in w for w in second.warnings)


# -- 2. no output over an input --------------------------------------------------------------


def test_no_output_over_an_input(tmp_path: Path) -> None:
    a = make_ct(tmp_path / "in", "a.dcm")
    b = make_ct(tmp_path / "solo", "b.dcm", instance=2)
    os.link(b, tmp_path / "hardlink.dcm")
    (tmp_path / "linked_out").symlink_to(tmp_path / "in")
    before = snapshot(tmp_path)
    cases = [
        ("iso", str(b), "-o", str(b)),  # -o is an input file
        ("iso", str(tmp_path / "in"), "-o", str(a)),  # -o is a file inside an input folder
        ("iso", str(tmp_path / "in"), "-o", str(tmp_path / "in" / "new.iso")),  # would be scanned
        ("iso", str(b), "-o", str(tmp_path / "hardlink.dcm")),  # the same file by another name
        ("iso", str(tmp_path / "in"), "-o", str(tmp_path / "linked_out" / "x.iso")),
        ("iso", str(b), "-o", str(tmp_path / "x.iso"), "--report", str(b)),
        ("iso", str(b), "-o", str(tmp_path / "x.iso"), "--report", str(tmp_path / "x.iso")),
        ("iso", str(b), "-o", str(tmp_path / "x.iso"), "--report",
         str(tmp_path / "x.label.svg")),
        ("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--report",
         str(tmp_path / "in" / "r.json")),
        ("fileset", str(tmp_path / "in"), "-o", str(tmp_path / "in" / "USB")),
        ("fileset", str(tmp_path / "in"), "-o", str(tmp_path / "in")),
    ]
    for args in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and "error:" in res.stderr, res.stderr
        assert snapshot(tmp_path) == before, args
    assert not (tmp_path / "x.iso").exists()


def test_followed_link_puts_a_folder_into_the_scan(tmp_path: Path) -> None:
    """With --follow-links the linked folder is scanned input: no output may go there."""
    make_ct(tmp_path / "in", "a.dcm")
    make_ct(tmp_path / "elsewhere", "b.dcm", instance=2)
    (tmp_path / "in" / "more").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    res = run("iso", str(tmp_path / "in"), "--follow-links", "-o",
              str(tmp_path / "elsewhere" / "x.iso"))
    assert res.returncode == 2, res.stderr
    assert "scanned as input" in res.stderr and snapshot(tmp_path) == before


# -- 3. another file system, a full one ------------------------------------------------------


def test_fileset_and_iso_onto_another_file_system(tmp_path: Path) -> None:
    for i in range(3):
        make_ct(tmp_path / "in", f"{i}.dcm", instance=i + 1, rows=64)
    before = snapshot(tmp_path / "in")
    with tmpfs("32m") as mnt:
        res = run("fileset", str(tmp_path / "in"), "-o", str(mnt / "DIR"))
        assert res.returncode == 0, res.stderr
        assert dciodvfy_errors(mnt / "DIR" / "DICOMDIR") == []
        assert len(list(_fileset(mnt / "DIR"))) == 3
        res = run("iso", str(tmp_path / "in"), "-o", str(mnt / "x.iso"), "--label")
        assert res.returncode == 0, res.stderr
        assert leftovers(mnt) == []
    assert snapshot(tmp_path / "in") == before


def test_fileset_onto_a_mounted_file_system_itself(tmp_path: Path) -> None:
    """-o the mount point: a rename cannot replace a mount, so the File-set is written in
    place (mastering.inplace: journal, files, DICOMDIR last); nothing of the run is left."""
    for i in range(3):
        make_ct(tmp_path / "in", f"{i}.dcm", instance=i + 1, rows=64)
    with tmpfs("32m") as mnt:
        res = run("fileset", str(tmp_path / "in"), "-o", str(mnt), "--viewer")
        assert res.returncode == 0, res.stderr
        names = sorted(p.name for p in mnt.iterdir())
        assert names == ["DICOM", "DICOMDIR", "IHE_PDI", "IHE_PDI.SHA", "INDEX.HTM",
                         "README.TXT", "VIEWER"]  # IHE_PDI.SHA: mastering.inplace.MANIFEST
        assert dciodvfy_errors(mnt / "DICOMDIR") == [] and len(list(_fileset(mnt))) == 3
        assert not (mnt.parent / f".{mnt.name}.lock").exists() and leftovers(mnt) == []
        assert not any(p.name.startswith(f".{mnt.name}.") for p in mnt.parent.iterdir())


def test_full_disk_leaves_nothing_behind(tmp_path: Path) -> None:
    for i in range(4):
        make_ct(tmp_path / "in", f"{i}.dcm", instance=i + 1, rows=256)  # 128 KB each
    before = snapshot(tmp_path / "in")
    with tmpfs("300k") as mnt:
        for args in (("iso", "-o", str(mnt / "x.iso")), ("fileset", "-o", str(mnt / "DIR"))):
            res = run(args[0], str(tmp_path / "in"), *args[1:])
            assert res.returncode == 6, res.stderr
            # one line that names the output and says what happened
            assert res.stderr.startswith(f"error: {args[2]}: No space left on device"), \
                res.stderr
            assert list(mnt.iterdir()) == []
    assert snapshot(tmp_path / "in") == before


def _fileset(root: Path):
    from pydicom.fileset import FileSet

    return FileSet(root / "DICOMDIR")


# -- 4. never skip in silence: errors of the walk --------------------------------------------


def test_unreadable_subfolder_refuses_the_run(shared: Path) -> None:
    make_ct(shared / "in", "a.dcm")
    make_ct(shared / "in" / "locked", "b.dcm", instance=2)
    (shared / "in" / "locked").chmod(0)
    out = shared / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    try:
        res = run("iso", str(shared / "in"), "-o", str(out / "x.iso"), user=NOBODY)
        assert res.returncode == 3, res.stderr
        assert f"{shared / 'in' / 'locked'}: cannot read the folder: Permission denied" \
            in res.stderr
        assert list(out.iterdir()) == []
        res = run("iso", str(shared / "in"), "-o", str(out / "x.iso"), "--skip-invalid",
                  "--json", user=NOBODY)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["instances"] == 1
        assert [s["path"] for s in report["skipped"]] == [str(shared / "in" / "locked")]
    finally:
        (shared / "in" / "locked").chmod(0o755)


def test_unreadable_file_refuses_the_run(shared: Path) -> None:
    make_ct(shared / "in", "a.dcm")
    secret = make_ct(shared / "in", "b.dcm", instance=2)
    secret.chmod(0)
    out = shared / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    res = run("iso", str(shared / "in"), "-o", str(out / "x.iso"), user=NOBODY)
    assert res.returncode == 3, res.stderr
    assert f"{secret}: cannot read" in res.stderr and list(out.iterdir()) == []


def test_path_longer_than_path_max_refuses_the_run(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    make_ct(tmp_path / "near", "b.dcm", instance=2)
    fd = _deep_folder(tmp_path / "in", 4200)  # no path that long can name it: a handle does
    try:
        os.link(tmp_path / "near" / "b.dcm", "b.dcm", dst_dir_fd=fd)
    finally:
        os.close(fd)
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"))
    assert res.returncode == 3, res.stderr
    assert "File name too long" in res.stderr and not (tmp_path / "x.iso").exists()
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--skip-invalid")
    assert res.returncode == 0 and "File name too long" in res.stdout


def _deep_folder(base: Path, length: int) -> int:
    """A handle on the last of a chain of folders whose path is longer than length."""
    fd = os.open(base, os.O_RDONLY)
    path_length = len(str(base))
    while path_length <= length:
        name = "d" * 200
        os.mkdir(name, dir_fd=fd)
        new = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path_length = new, path_length + 1 + len(name)
    return fd


# -- 5. tiny non-DICOM files -----------------------------------------------------------------


def test_tiny_files_are_not_corrupt_dicom(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    for name, data in (("empty", b""), ("one", b"x"), ("two.txt", b"hi"), ("seven", b"1234567"),
                       ("note.txt", b"hello\n"), (".DS_Store", b"\0\0\0\1Bud1")):
        (tmp_path / "in" / name).write_bytes(data)
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["instances"] == 1 and len(report["ignored"]) == 6
    (tmp_path / "in" / "cut").write_bytes(b"\x08\x00\x05\x00")  # the start of a data set
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "y.iso"))
    assert res.returncode == 3 and "cut: corrupt DICOM" in res.stderr


# -- 6. killed runs --------------------------------------------------------------------------


def test_sigkill_takes_the_workers_along(tmp_path: Path) -> None:
    """kill -9 of the run: its workers die too and release the caller's pipe at once."""
    src = many(tmp_path, 4000, rows=8)
    proc = start("iso", str(src), "-o", str(tmp_path / "x.iso"), "--workers", "2")
    assert wait_for(lambda: len(children(proc.pid)) >= 2), "no workers seen"
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    proc.communicate(timeout=10)  # EOF on stdout and stderr: nobody holds the pipe
    assert time.monotonic() - t0 < 5
    assert wait_for(lambda: not any(alive(w) for w in workers), timeout=5)


def test_next_run_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    src = many(tmp_path, 1500, rows=64)
    out = tmp_path / "out"
    out.mkdir()
    proc = start("iso", str(src), "-o", str(out / "x.iso"), "--workers", "1")
    assert wait_for(lambda: any(p.name.endswith(".partial") for p in out.iterdir()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert any(p.name.endswith(".partial") for p in out.iterdir())
    assert (out / ".x.iso.lock").exists()  # a stale lock: nobody holds it
    (out / ".x.iso.keep.partial").mkdir()  # not our name pattern: stays
    (out / ".x.iso.abcd1234.partial").mkdir()  # our pattern, but no marker and not empty
    (out / ".x.iso.abcd1234.partial" / "notes.txt").write_text("someone's")
    res = run("iso", str(src), "-o", str(out / "x.iso"))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".x.iso.abcd1234.partial", ".x.iso.keep.partial", ".x.iso.mastering.json", "x.iso"]


def test_interrupt_after_publishing_is_success(tmp_path: Path) -> None:
    """SIGINT once the image is in place (a burst of them, until the process is gone, so
    that every moment after publishing gets one): the run has finished and says so."""
    src = many(tmp_path, 300, rows=32)
    for _ in range(2):
        (tmp_path / "x.iso").unlink(missing_ok=True)
        proc = start("iso", str(src), "-o", str(tmp_path / "x.iso"), "--report",
                     str(tmp_path / "r.json"))
        assert wait_for(lambda: (tmp_path / "x.iso").exists(), step=0.0005)
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            time.sleep(0.001)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "✓ STD-GEN-CD" in out
        assert json.loads((tmp_path / "r.json").read_text())["ok"]


def test_interrupt_during_the_run_leaves_nothing(tmp_path: Path) -> None:
    src = many(tmp_path, 1500, rows=64)
    out = tmp_path / "out"
    out.mkdir()
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = start("iso", str(src), "-o", str(out / "x.iso"))
        assert wait_for(lambda: any(p.name.endswith(".partial") for p in out.iterdir()))
        proc.send_signal(sig)
        _stdout, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "cancelled" in err
        assert list(out.iterdir()) == []


# -- 7. two runs, one output -----------------------------------------------------------------


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_second_run_to_the_same_output_refuses(tmp_path: Path) -> None:
    src = many(tmp_path, 300, rows=32)
    first = start("iso", str(src), "-o", str(tmp_path / "x.iso"))
    lock = tmp_path / ".x.iso.lock"
    try:
        # held once the holder has written its pid: the file exists a moment before that
        assert wait_for(lambda: _text(lock).startswith("pid"))
        os.kill(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        second = run("iso", str(src), "-o", str(tmp_path / "x.iso"))
        assert time.monotonic() - t0 < 10
        assert second.returncode == 7, second.stderr
        assert "another mastering run is writing this output" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert leftovers(tmp_path) == []


# -- 8. no tracebacks ------------------------------------------------------------------------


def test_control_characters_in_values_with_labels_and_pages(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm", StudyDescription="line one\nline two\r\n\ttab\x1b[31m",
       PatientName="DOE^JANE\x0c")
    for extra in (["--label"], ["--viewer"]):
        res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), *extra)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr


def test_long_record_key_is_left_out_of_the_record(tmp_path: Path) -> None:
    """A Study Description of 70,000 bytes (Implicit VR holds it) cannot go into a DICOMDIR
    record (16-bit length in Explicit VR): the record gets it empty, the file keeps it."""
    text = "d" * 70000
    make_ct(tmp_path / "in", "a.dcm", implicit=True, StudyDescription=text)
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--json")
    assert res.returncode == 0, res.stderr
    filled = json.loads(res.stdout)["filled"]
    assert [f["key"] for f in filled] == ["StudyDescription"]
    from .conftest import extract_iso

    root = extract_iso(tmp_path / "x.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    import pydicom

    image = next(p for p in (root / "DICOM").rglob("*") if p.is_file())
    value = pydicom.dcmread(image)["StudyDescription"].value  # UN: PS3.5 6.2.2
    assert bytes(value).rstrip(b" ") == text.encode()


def test_long_text_value_in_implicit_vr(tmp_path: Path) -> None:
    """An Implicit VR text value over 64 KiB cannot keep its VR in Explicit VR (16-bit
    length): it becomes UN, as PS3.5 6.2.2 says, its bytes unchanged."""
    text = "y" * 70001
    make_ct(tmp_path / "in", "a.dcm", implicit=True, ImageComments=text)
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--json")
    assert res.returncode == 0, res.stderr
    from .conftest import extract_iso

    root = extract_iso(tmp_path / "x.iso", tmp_path / "x")
    image = next(p for p in (root / "DICOM").rglob("*") if p.is_file())
    dcmdump(image)
    import pydicom

    value = pydicom.dcmread(image)["ImageComments"].value  # UN: PS3.5 6.2.2
    assert bytes(value).rstrip(b" ") == text.encode()


def test_brackets_in_paths_are_printed_as_they_are(tmp_path: Path) -> None:
    folder = tmp_path / "MRI [t2]" / "[bold]x[red]"
    make_ct(folder, "a.dcm")
    (folder / "bad.dcm").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR")
    out = tmp_path / "out [1]" / "o.iso"
    res = run("iso", str(tmp_path / "MRI [t2]"), "-o", str(out), "--skip-invalid", "--label")
    assert res.returncode == 0, res.stderr
    assert f"{folder / 'bad.dcm'}: corrupt DICOM" in res.stdout
    assert f"label: {out.with_name('o.label.svg')}" in res.stdout
    assert str(out) in res.stdout


def test_unwritable_report_is_refused_before_the_run(shared: Path) -> None:
    make_ct(shared / "in", "a.dcm")
    out = shared / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    ro = shared / "ro"
    ro.mkdir()
    for report in (ro / "r.json", shared / "missing" / "r.json", out):
        res = run("iso", str(shared / "in"), "-o", str(out / "x.iso"), "--report", str(report),
                  user=NOBODY)
        assert res.returncode == 6, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert list(out.iterdir()) == []


# -- 9. bounded time -------------------------------------------------------------------------


@pytest.mark.slow
def test_label_time_does_not_grow_with_the_text(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm", StudyDescription="d" * 60000, PatientName="N" * 30000,
       InstitutionName="I" * 60)
    t0 = time.monotonic()
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--viewer",
              timeout=60)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 20


def test_every_label_line_fits_and_is_cut_with_an_ellipsis() -> None:
    from mastering import label

    assert label.line_text("a\nb\tc\x1b") == "a b c"
    cut = label.line_text("x" * 100000)
    assert len(cut) == label.MAX_LINE_CHARS and cut.endswith("\u2026")
    fonts = label.Fonts()
    t0 = time.monotonic()
    text, _size = label._fit(fonts, "W" * 50000, 30.0, False, 400.0)
    assert time.monotonic() - t0 < 2
    assert text.endswith("\u2026") and fonts.width(text, _size, False) <= 400.0


# -- 10. messages that survive a pipe --------------------------------------------------------


def test_off_a_terminal_one_line_per_file(tmp_path: Path) -> None:
    deep = tmp_path / "in" / ("long_folder_name_" * 8) / ("series_" * 10)
    make_ct(tmp_path / "in", "a.dcm")
    bad = deep / "broken.dcm"
    deep.mkdir(parents=True)
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"))
    assert res.returncode == 3
    assert "\x1b[" not in res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert any(line.startswith(f"{bad}: corrupt DICOM") for line in lines), lines
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--skip-invalid")
    assert res.returncode == 0
    assert f"    {bad}: corrupt DICOM" in res.stdout.splitlines()[-1]


def test_file_names_are_escaped(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    forged = "x\n✓ STD-GEN-CD: 9 patient(s), all fine\n.dcm"
    ansi = "\x1b[2J\x1b[31mred.dcm"
    for name in (forged, ansi):
        (tmp_path / "in" / name).write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--skip-invalid")
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    assert "\x1b" not in text and "\\x1b[2J\\x1b[31mred.dcm" in text
    assert not any(line.startswith("✓ STD-GEN-CD: 9") for line in text.splitlines())
    assert "x\\n✓ STD-GEN-CD: 9 patient(s), all fine\\n.dcm" in text


# -- 11. symbolic links ----------------------------------------------------------------------


def test_links_out_of_the_inputs_are_listed_not_followed(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    make_ct(tmp_path / "other_patient", "b.dcm", patient_id="PID2", patient_name="OTHER^ONE",
       study_uid="1.2.3.9", series_uid="1.2.3.9.1")
    (tmp_path / "in" / "to_other").symlink_to(tmp_path / "other_patient")
    (tmp_path / "in" / "to_file.dcm").symlink_to(tmp_path / "other_patient" / "b.dcm")
    (tmp_path / "in" / "to_etc").symlink_to("/etc")
    (tmp_path / "in" / "self").symlink_to(tmp_path / "in")  # inside: a loop, walked once
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["instances"] == 1 and report["patients"] == 1
    links = sorted(Path(i["path"]).name for i in report["ignored"] if i["kind"] == "link")
    assert links == ["to_etc", "to_file.dcm", "to_other"]
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"))
    assert res.returncode == 0 and "link not followed:" in res.stdout
    res = run("iso", str(tmp_path / "in" / "to_other"), str(tmp_path / "in"), "-o",
              str(tmp_path / "y.iso"), "--json")
    assert json.loads(res.stdout)["instances"] == 2  # a link named as an input is followed


def test_verify_reads_nothing_outside_the_medium(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    medium = tmp_path / "medium"
    master([tmp_path / "in"], medium, Options(profiles.load("STD-GEN-USB-JPEG")), kind="folder")
    image = next(p for p in (medium / "DICOM").rglob("*") if p.is_file())
    os.mkfifo(tmp_path / "fifo")  # opening it would block verify for ever
    image.unlink()
    image.symlink_to(tmp_path / "fifo")
    (medium / "EXTRA").symlink_to("/etc/passwd")
    for command in ("verify", "inspect"):
        args = [command, str(medium)] + (["--profile", "STD-GEN-USB-JPEG", "--json"]
                                         if command == "verify" else [])
        res = run(*args, timeout=30)
        if command == "verify":
            assert res.returncode == 5
            codes = {(v["code"], v["path"]) for v in json.loads(res.stdout)["violations"]}
            rel = image.relative_to(medium).as_posix()
            assert {("unsafe-file", rel), ("unsafe-file", "EXTRA"), ("missing-file", rel)} <= codes


def test_api_refuses_like_the_cli(tmp_path: Path) -> None:
    """The daemon and the kiosk call master() directly: the same refusals, as exit codes."""
    a = make_ct(tmp_path / "in", "a.dcm")
    before = snapshot(tmp_path)
    with pytest.raises(MasteringError) as err:
        master([tmp_path / "in"], a, Options(profiles.load("STD-GEN-CD")))
    assert err.value.exit_code == 2 and snapshot(tmp_path) == before


# -- found in review -------------------------------------------------------------------------


def test_dicomdir_input_protects_its_file_set(tmp_path: Path) -> None:
    """A DICOMDIR given as input: the files it references and its File-set folder are input
    too; no output, report or label may go over or into them."""
    for i in range(2):
        make_ct(tmp_path / "in", f"{i}.dcm", instance=i + 1)
    fs = tmp_path / "fs"
    master([tmp_path / "in"], fs, Options(profiles.load("STD-GEN-USB-JPEG")), kind="folder")
    member = next(p for p in (fs / "DICOM").rglob("*") if p.is_file())
    before = snapshot(fs)
    for extra in (["-o", str(member)], ["-o", str(tmp_path / "x.iso"), "--report", str(member)],
                  ["-o", str(fs / "x.iso")], ["-o", str(fs / "DICOM" / "x.iso")]):
        res = run("iso", str(fs / "DICOMDIR"), *extra)
        assert res.returncode == 2, (extra, res.stderr)
        assert snapshot(fs) == before, extra


def test_report_onto_special_files_and_links(shared: Path) -> None:
    make_ct(shared / "in", "a.dcm")
    fifo = shared / "fifo"
    os.mkfifo(fifo)
    res = run("iso", str(shared / "in"), "-o", str(shared / "x.iso"), "--report", str(fifo))
    assert res.returncode == 6 and "not a regular file" in res.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (shared / "x.iso").exists()
    (shared / "reports").mkdir()
    (shared / "reports" / "2026.json").write_text("old")
    (shared / "latest.json").symlink_to(shared / "reports" / "2026.json")
    res = run("iso", str(shared / "in"), "-o", str(shared / "x.iso"), "--report",
              str(shared / "latest.json"))
    assert res.returncode == 0, res.stderr
    assert (shared / "latest.json").is_symlink()  # the link stays, its target is written
    assert json.loads((shared / "reports" / "2026.json").read_text())["ok"]
    logs = shared / "logs"
    logs.mkdir()
    (logs / "r.json").write_text("")
    os.chown(logs / "r.json", NOBODY, NOBODY)  # writable file in a folder nobody can't write
    out = shared / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    res = run("iso", str(shared / "in"), "-o", str(out / "x.iso"), "--report",
              str(logs / "r.json"), user=NOBODY)
    assert res.returncode == 6 and "not writable" in res.stderr
    assert list(out.iterdir()) == []


def test_report_inside_a_folder_output_is_refused(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    (tmp_path / "OUT").mkdir()
    (tmp_path / "OUT-2").mkdir()
    for report in (tmp_path / "OUT" / "r.json", tmp_path / "OUT-2" / "r.json"):
        res = run("fileset", str(tmp_path / "in"), "-o", str(tmp_path / "OUT"), "--report",
                  str(report))
        assert res.returncode == 2, res.stderr
    assert list((tmp_path / "OUT").iterdir()) == [] and leftovers(tmp_path) == []


def test_planted_lock_and_marker_are_not_trusted(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".x.iso.lock").symlink_to(victim)
    res = run("iso", str(tmp_path / "in"), "-o", str(out / "x.iso"))
    assert res.returncode == 6 and "lock file" in res.stderr
    (out / ".x.iso.lock").unlink()
    os.link(victim, out / ".x.iso.lock")  # a hard link to someone's file
    res = run("iso", str(tmp_path / "in"), "-o", str(out / "x.iso"))
    assert res.returncode == 6 and victim.read_text() == "precious"
    (out / ".x.iso.lock").unlink()
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "mine.txt").write_text("mine")
    st = os.stat(home)
    with tmpfs("8m") as mnt:  # a work folder of our name beside a mounted output
        planted = mnt.parent / f".{mnt.name}.abcdefgh.partial"
        planted.mkdir()
        (planted / ".mastering-run").write_text(json.dumps({"output": str(mnt), "moving": [
            {"path": "../../" + str(home.relative_to("/")), "dev": st.st_dev,
             "ino": st.st_ino, "dir": True},
            {"path": str(home / "docs" / "mine.txt"), "dev": 0, "ino": 0}]}))
        res = run("fileset", str(tmp_path / "in"), "-o", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not planted.exists()
    assert (home / "docs" / "mine.txt").read_text() == "mine" and victim.read_text() == "precious"


def test_fileset_onto_a_link_to_a_mount_and_a_bind_mount(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    with tmpfs("16m") as mnt:
        (tmp_path / "usb").symlink_to(mnt)  # as Debian's usbmount links /media/usb
        res = run("fileset", str(tmp_path / "in"), "-o", str(tmp_path / "usb"))
        assert res.returncode == 0, res.stderr
        assert (mnt / "DICOMDIR").is_file() and leftovers(mnt, tmp_path) == []
    bind = tmp_path / "bind"
    (tmp_path / "real").mkdir()
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "real"), str(bind)], check=True)
    try:
        res = run("fileset", str(tmp_path / "in"), "-o", str(bind))
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "real" / "DICOMDIR").is_file()
    finally:
        subprocess.run(["umount", "-l", str(bind)], check=False)


def test_a_users_own_stick_under_a_root_owned_folder(shared: Path) -> None:
    """/media/USER/STICK: the stick is the user's, its parent is root's. The lock goes onto
    the stick for the run and is gone afterwards."""
    make_ct(shared / "in", "a.dcm")
    media = shared / "media"
    media.mkdir()
    stick = media / "STICK"
    stick.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=16m,uid={NOBODY},gid={NOBODY}",
                    "tmpfs", str(stick)], check=True)
    try:
        res = run("fileset", str(shared / "in"), "-o", str(stick), user=NOBODY)
        assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in stick.iterdir()) == ["DICOM", "DICOMDIR"]
        assert list(media.iterdir()) == [stick]
    finally:
        subprocess.run(["umount", "-l", str(stick)], check=False)


def test_type1_key_too_long_for_a_record_refuses_the_file(tmp_path: Path) -> None:
    """A derived Patient ID would disagree with the file: refuse, do not invent."""
    make_ct(tmp_path / "in", "a.dcm", implicit=True, patient_id="P" * 70000)
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"))
    assert res.returncode == 3 and "PatientID is longer than a directory record" in res.stderr


def test_a_closed_stdout_after_publishing_is_not_a_failure(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    proc = subprocess.Popen([sys.executable, "-m", "mastering", "iso", str(tmp_path / "in"),
                             "-o", str(tmp_path / "x.iso")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    proc.stdout.close()  # as `| true` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and (tmp_path / "x.iso").is_file()


def test_a_folder_with_a_marker_named_file_is_scanned(tmp_path: Path) -> None:
    make_ct(tmp_path / "in" / "series", "a.dcm")
    (tmp_path / "in" / "series" / ".mastering-run").write_text("{}")
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["instances"] == 1


def test_bad_site_settings_and_templates_refuse_before_the_scan(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    (tmp_path / "site.toml").write_text("institution = [unclosed")
    for extra in (["--site", str(tmp_path / "site.toml")], ["--site", "/dev/zero"],
                  ["--templates", str(tmp_path / "nowhere")]):
        res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / "x.iso"), "--label", *extra,
                  timeout=30)
        assert res.returncode == 2, (extra, res.stderr)
        assert res.stderr.count("\n") == 1 and "internal error" not in res.stderr
    assert leftovers(tmp_path) == [] and not (tmp_path / "x.iso").exists()


def test_long_output_names(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm")
    name = "n" * 245 + ".iso"
    res = run("iso", str(tmp_path / "in"), "-o", str(tmp_path / name))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / name).is_file() and leftovers(tmp_path) == []


def test_multi_volume_fileset_refused_before_writing(tmp_path: Path) -> None:
    for s in range(3):
        for i in range(3):
            make_ct(tmp_path / "in" / f"s{s}", f"{i}.dcm", instance=i + 1, rows=64,
                    series_uid=f"1.2.3.4.1.{s + 10}", SeriesNumber=s + 1)
    args = ("fileset", str(tmp_path / "in"), "-o", str(tmp_path / "OUT"), "--capacity",
            "150000")
    assert run(*args).returncode == 0
    before = snapshot(tmp_path)
    res = run(*args)
    assert res.returncode == 6 and "OUT-1: exists and is not an empty folder" in res.stderr
    assert snapshot(tmp_path) == before


def test_fileset_into_a_mounted_disk_that_holds_files_is_refused(tmp_path: Path) -> None:
    """A mount point is written in place only when it is empty: a disk holding someone's
    files is refused like any folder that is not empty (mastering usb has its own policy)."""
    make_ct(tmp_path / "in", "a.dcm")
    with tmpfs("8m") as mnt:
        (mnt / "taxes.xls").write_bytes(b"mine")
        res = run("fileset", str(tmp_path / "in"), "-o", str(mnt))
        assert res.returncode == 6 and "not an empty folder" in res.stderr
        assert [p.name for p in mnt.iterdir()] == ["taxes.xls"]
