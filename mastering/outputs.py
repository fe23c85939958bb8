"""Where a run writes, and the proof of what it wrote.

A run to ``OUT`` (an image ``OUT.iso`` or a File-set folder ``OUT``) keeps three things of its
own beside the output, all hidden and named after it:

* ``.OUT.lock``, held with ``flock`` for the whole run: a second run to the same output refuses
  at once. The kernel drops the lock when its holder dies, so the file a killed run leaves is
  simply taken over by the next run.
* ``.OUT.XXXXXXXX.partial/``, the run's work folder, on the output's file system so that
  finished volumes are renamed, not copied, into place. It holds a marker naming the output;
  the next run to the same output (holding the lock, so no live run owns it) removes a killed
  run's folder.
* ``.OUT.mastering.json``, the files the last run published (name, device, inode, size, mtime).
  A later run removes the ones it does not replace (``OUT-3.iso`` after a two-volume run) only
  while they are exactly as written, and never overwrites a file that is not in it. Nothing is
  ever deleted for matching a name pattern: ``-o scan.dcm`` must not touch the user's
  ``scan-1.dcm``.

Every file of our own is created exclusively (``O_EXCL``/``O_NOFOLLOW``): a link planted under
one of these names is refused, never written through. No patient data goes into any of them:
names of our own files, numbers and a process ID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RUN_MARKER = ".mastering-run"
PARTIAL_SUFFIX = ".partial"
#: the random part of a work folder's name (tempfile.mkdtemp's alphabet and length)
_RANDOM = r"[a-z0-9_]{8}"
_WORK_NAME = re.compile(rf"^\..+\.{_RANDOM}\.partial$")
_LOCK_TEXT = re.compile(r"^pid \d+ on ")
#: sidecar names stay well inside NAME_MAX (255) whatever the output's name
_MAX_BASE = 180
#: names a mounted file system brings along (ext4); ignored when empty
_FS_OWN = frozenset({"lost+found"})


class OutputError(Exception):
    """The output cannot be written as asked; exit_code says how the CLI reports it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Busy(OutputError):
    """Another run holds the output's lock."""


@dataclass(frozen=True)
class Published:
    """One file a run put in place, as it was when it was put there."""

    name: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, name: str | None = None) -> Published:
        st = os.lstat(path)
        return cls(name or path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def unchanged(self, folder: Path) -> bool:
        try:
            return Published.of(folder / self.name) == self
        except OSError:
            return False


# -- the output and its sidecars -------------------------------------------------------------


@dataclass
class Target:
    """The output of one run and the hidden files kept beside it."""

    output: Path  # absolute, as the user named it
    kind: str  # "iso" | "folder"
    #: folders this run created to reach the output (removed again if the run fails)
    made: list[Path] = field(default_factory=list)
    #: kind "inplace": the output is an existing folder written into (a stick's root; see
    #: mastering.inplace), not a new one renamed into place
    in_place: bool = field(init=False)
    #: where the lock and the record go: beside the output, or for an in-place output whose
    #: parent this user cannot write (a desktop's /media/USER/STICK) the temporary folder,
    #: never the medium itself: a lock held open there keeps it from being unmounted for
    #: the read-back (an in-place run keeps no record)
    sidecars: Path = field(init=False)
    #: where the work folder goes: beside the output (its file system), or for an in-place
    #: output under an unwritable parent the system's temporary folder (a service's private
    #: /tmp); never inside the medium, whose every file is checked
    work_parent: Path = field(init=False)

    def __post_init__(self) -> None:
        self.in_place = self.kind == "inplace"
        parent_ok = os.access(self.folder, os.W_OK | os.X_OK) if self.folder.exists() else True
        self.sidecars = self.folder if parent_ok else Path(tempfile.gettempdir())
        self.work_parent = self.folder if parent_ok else Path(tempfile.gettempdir())

    @property
    def folder(self) -> Path:
        return self.output.parent

    @property
    def base(self) -> str:
        name = self.output.name
        if self.sidecars != self.folder:  # in a shared folder: named after the whole path
            digest = hashlib.sha256(os.fsencode(os.path.realpath(self.output))).hexdigest()
            return f"mastering-{digest[:24]}"
        if len(name.encode()) <= _MAX_BASE:
            return name
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        return os.fsdecode(os.fsencode(name)[:_MAX_BASE - 17]) + "." + digest

    @property
    def lock_path(self) -> Path:
        return self.sidecars / f".{self.base}.lock"

    @property
    def record_path(self) -> Path:
        return self.sidecars / f".{self.base}.mastering.json"

    def is_own_work(self, name: str) -> bool:
        return re.match(rf"^\.{re.escape(self.base)}\.{_RANDOM}\.partial$", name) is not None

    def derived(self, name: str) -> bool:
        """True for names this output's runs write: OUT, OUT-n, their labels, the sidecars."""
        out = self.output
        stem, suffix = (out.stem, out.suffix) if out.suffix else (out.name, "")
        pattern = (rf"^{re.escape(stem)}(-\d+)?({re.escape(suffix)}|\.label\.svg|\.label\.png)$"
                   rf"|^\.{re.escape(self.base)}\.(lock|mastering\.json|{_RANDOM}\.partial)$")
        return re.match(pattern, name) is not None

    def ours_inside(self, name: str) -> bool:
        """Names inside an output folder that do not make it 'not empty'."""
        return self.is_own_work(name)

    def prepare(self) -> None:
        """Create the folders up to the output's parent, remembering which were new."""
        missing = []
        cur = self.folder
        while not cur.exists():
            missing.append(cur)
            cur = cur.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            self.made.append(folder)

    def unprepare(self) -> None:
        """Remove the folders prepare() created, if they are still empty."""
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.made.clear()


def is_mount(path: Path) -> bool:
    """A mount point, also a bind mount of the same file system (which st_dev cannot tell)."""
    real = os.path.realpath(path)
    if os.path.ismount(real):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            points = {_unescape(line.split()[4]) for line in fh if len(line.split()) > 4}
    except OSError:
        return False
    return real in points


def _unescape(field_: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def empty_but_ours(target: Target, folder: Path, work: Path | None = None) -> bool:
    """True if folder holds nothing but this run's own things (and an empty lost+found)."""
    for entry in os.scandir(folder):
        if work is not None and entry.name == work.name:
            continue
        if target.ours_inside(entry.name) and folder == target.output:
            continue
        if entry.name in _FS_OWN and entry.is_dir(follow_symlinks=False) and not any(
                os.scandir(entry.path)):
            continue
        return False
    return True


# -- the lock --------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(target: Target) -> Iterator[None]:
    """Hold the output's lock for the duration; raise Busy at once if another run has it."""
    path = target.lock_path
    while True:
        fd, writable = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_small(fd)
            os.close(fd)
            raise Busy(f"{target.output}: another mastering run is writing this output "
                       f"({holder or 'process unknown'}); try again when it has finished",
                       7) from None
        # the holder before us may have removed the file after we opened it: lock the one
        # that is there now, or we would share the output with the next run
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if writable:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still ours: nobody else can hold it while we do
        os.close(fd)


def _open_lock(path: Path) -> tuple[int, bool]:
    """Open (or create) the lock file; a stale lock of another user's may only be readable,
    which is enough to lock it. Anything but our own lock file is refused."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644), True
    except PermissionError:
        try:
            fd, writable = os.open(path, os.O_RDONLY | flags), False
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file beside the output: "
                              f"{exc.strerror or exc}", 6) from exc
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise OutputError(f"{path}: cannot use it as the lock file: {why}", 6) from exc
    st = os.fstat(fd)
    text = _read_small(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (text and not _LOCK_TEXT.match(text)):
        os.close(fd)
        raise OutputError(f"{path}: is not a lock file of this program (a link, or another "
                          "file under its name); move it away", 6)
    return fd, writable


def _read_small(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


# -- the work folder -------------------------------------------------------------------------


def make_work(target: Target) -> Path:
    """A new hidden work folder on the output's file system, marked as this run's."""
    work = Path(tempfile.mkdtemp(prefix=f".{target.base}.", suffix=PARTIAL_SUFFIX,
                                 dir=target.work_parent))
    _write_marker(work, {"output": str(target.output), "pid": os.getpid()})
    return work


def _write_marker(work: Path, data: dict) -> None:
    _write_new(work / RUN_MARKER, json.dumps(data) + "\n")


def is_work_folder(path: str | Path) -> bool:
    """A folder some run of this program is working in (or was, when it was killed): our
    name pattern and a marker that says so, not merely a file called like the marker."""
    path = Path(path)
    return _WORK_NAME.match(path.name) is not None and _marker(path) is not None


def remove_stale_work(target: Target) -> list[str]:
    """Remove the work folders killed runs to this output left (an in-place run's files on
    the medium are mastering.inplace's: its journal). Only called while holding the lock, so
    no live run owns any of it. Returns what was removed."""
    removed: list[str] = []
    parents = [target.work_parent]
    for parent in parents:
        try:
            names = sorted(os.listdir(parent))
        except OSError:
            continue
        for name in names:
            path = parent / name
            if not target.is_own_work(name) or path.is_symlink() or not path.is_dir():
                continue
            marker = _marker(path)
            if marker is None:
                if _only_unfinished_marker(path):  # killed between making and marking it
                    shutil.rmtree(path)
                    removed.append(str(path))
                continue  # not provably ours: leave it
            if marker.get("output") != str(target.output):
                continue
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


def _only_unfinished_marker(path: Path) -> bool:
    """An empty folder of our name, or one holding only a half-written marker."""
    try:
        return all(n.startswith(RUN_MARKER) for n in os.listdir(path))
    except OSError:
        return False


def _marker(path: Path) -> dict | None:
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        data = json.loads((path / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("output"), str) else None


# -- publishing ------------------------------------------------------------------------------


def read_record(target: Target) -> list[Published]:
    try:
        data = json.loads(target.record_path.read_text(encoding="utf-8"))
        return [Published(**item) for item in data.get("files", [])
                if "/" not in str(item.get("name", "/"))]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def _write_record(target: Target, files: Iterable[Published]) -> None:
    data = {"output": target.output.name, "files": [vars(f) for f in files]}
    _replace_atomically(target.record_path, json.dumps(data, indent=1) + "\n")


def check_finals(target: Target, finals: Sequence[Path], inputs: set[tuple[int, int]],
                 work: Path, *, folders: bool) -> None:
    """Before anything is written: every final path of this run can be put in place. A final
    file that exists must be the output itself (the name the user gave) or a file the earlier
    run published, unchanged; a final folder must be empty (but for this run's own things)."""
    earlier = {p.name: p for p in read_record(target)}
    for final in finals:
        if not final.exists() and not final.is_symlink():
            continue
        if _identity(final) in inputs:
            raise OutputError(f"{final}: is one of the inputs; nothing was written", 2)
        if folders != final.is_dir():
            raise OutputError(f"{final}: exists and is {'a' if final.is_dir() else 'not a'} "
                              "folder", 6)
        if final.is_dir():
            if not empty_but_ours(target, final, work):
                raise OutputError(f"{final}: exists and is not an empty folder", 6)
            continue
        if final == target.output:
            continue
        if final.name not in earlier or not earlier[final.name].unchanged(final.parent):
            raise OutputError(f"{final}: exists and was not written by an earlier run to "
                              f"{target.output.name}; move it away or choose another output "
                              "name", 6)


def plan_publish(target: Target, files: Sequence[tuple[Path, Path]],
                 inputs: set[tuple[int, int]], work: Path) -> tuple[list[Published], list[str]]:
    """Check every (temporary, final) path once more; return the earlier run's files to
    remove and warnings about look-alike files and folders left alone."""
    for tmp, final in files:
        check_finals(target, [final], inputs, work, folders=tmp.is_dir())
    earlier = read_record(target)
    new_names = {final.name for _tmp, final in files}
    stale = [p for p in earlier if p.name not in new_names
             and p.unchanged(target.folder) and (p.dev, p.ino) not in inputs]
    keep = new_names | {p.name for p in stale}
    try:
        names = sorted(os.listdir(target.folder))
    except OSError:  # a drop folder we may write but not list: no look-alikes to report
        names = []
    warnings = []
    for name in names:
        if name.startswith(".") or name in keep or not target.derived(name):
            continue
        path = target.folder / name
        if path.is_dir() and not path.is_symlink() and target.kind == "folder":
            warnings.append(f"{path}: a volume folder of an earlier run, left in place "
                            "(folders are never removed)")
        elif _looks_ours(path):
            warnings.append(f"{path}: looks like an image of an earlier set but was not "
                            "provably written by it; left in place")
    return stale, warnings


def _looks_ours(path: Path) -> bool:
    """An ISO 9660 image whose Application Identifier (PVD bytes 574-701) names this program."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            fh.seek(16 * 2048)
            pvd = fh.read(2048)
    except OSError:
        return False
    return pvd[1:6] == b"CD001" and b"DICOM MASTERING" in pvd[574:702]


def publish(target: Target, files: Sequence[tuple[Path, Path]], stale: Sequence[Published],
            *, sync: bool = True) -> list[str]:
    """Put every finished file in place and remove the earlier run's leftovers, recording
    first what will be there, so that a run killed half-way leaves only recorded files.
    Returns warnings (the record could not be brought up to date after the moves)."""
    mine = [(tmp, final) for tmp, final in files
            if tmp.is_file() and final.parent == target.folder]
    if mine or stale or target.record_path.exists():
        _write_record(target, [*(Published.of(t, f.name) for t, f in mine), *stale])
    for old in stale:
        with contextlib.suppress(FileNotFoundError):
            (target.folder / old.name).unlink()
    for tmp, final in files:
        move(tmp, final)
    warnings = []
    if mine:
        try:  # a file copied across file systems has a new inode: record it as it is now
            _write_record(target, [Published.of(final) for _tmp, final in mine])
        except OSError as exc:
            warnings.append(f"{target.record_path}: could not be updated ({exc.strerror}); "
                            "a later run will not remove this run's files")
    if sync:
        sync_dir(target.folder)
    return warnings


def move(src: Path, dst: Path) -> None:
    """Rename src to dst; across file systems (EXDEV), copy to a temporary name beside dst,
    fsync and rename, then remove src."""
    try:
        os.replace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV or src.is_dir():
            raise
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name[:100]}.", suffix=".tmp", dir=dst.parent)
    try:
        with open(src, "rb") as fin, open(fd, "wb", closefd=True) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    src.unlink()


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# -- small files of our own ------------------------------------------------------------------


def _write_new(path: Path, text: str) -> None:
    """Create path exclusively (never through a link or over another file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with open(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _replace_atomically(path: Path, text: str) -> None:
    """Write a new file under a fresh temporary name beside path, fsync, rename over path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8", closefd=True) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomically(path: Path, text: str) -> None:
    """The report: written beside the file a link points to (the link stays a link), under
    a fresh temporary name, fsynced and renamed. check_report_path has made sure it is a
    regular file, or nothing yet, in a folder we can write."""
    _replace_atomically(Path(os.path.realpath(path)), text)


# -- outputs against inputs ------------------------------------------------------------------


def check_against_inputs(paths: Sequence[Path], inputs: Sequence[Path],
                         read_only: Sequence[Path] = ()) -> None:
    """Refuse (exit 2) an output path that is an input, lies inside an input folder (it would
    be scanned, and written over), or is the same path as another output. read_only: other
    files the run reads (site settings), which must not be written over either."""
    real_inputs = [(Path(os.path.realpath(i)), i) for i in inputs]
    seen: dict[Path, Path] = {}
    for path in paths:
        real = Path(os.path.realpath(path))
        if real in seen:
            raise OutputError(f"{path}: is also the output {seen[real]}", 2)
        seen[real] = path
        for real_in, given in real_inputs:
            if real == real_in:
                raise OutputError(f"{path}: is the input {given}; nothing was written", 2)
            if given.is_dir() and real.is_relative_to(real_in):
                raise OutputError(f"{path}: lies inside the input folder {given}, which "
                                  "would be scanned and written into; choose an output "
                                  "outside it", 2)
        for other in read_only:
            if real == Path(os.path.realpath(other)):
                raise OutputError(f"{path}: is the input {other}; nothing was written", 2)
        if path.exists() and _identity(path) in _identities(inputs):
            raise OutputError(f"{path}: is the same file as an input; nothing was written", 2)


def _identities(paths: Sequence[Path]) -> set[tuple[int, int]]:
    found = set()
    for p in paths:
        with contextlib.suppress(OSError):
            found.add(_identity(p))
    return found


def check_walked(paths: Sequence[Path], walked: set[tuple[int, int]]) -> None:
    """After the walk: no output may sit in a folder the walk entered (through a followed
    link, a DICOMDIR's File-set), and none may be a scanned file (a hard link to an input)."""
    for path in paths:
        cur = path
        while not cur.exists() and not cur.is_symlink():
            cur = cur.parent
        if cur == path and path.is_file():
            if _identity(path) in walked:
                raise OutputError(f"{path}: is the same file as an input; nothing was "
                                  "written", 2)
            cur = path.parent
        for folder in (cur, *cur.parents):
            with contextlib.suppress(OSError):
                if _identity(folder) in walked:
                    raise OutputError(f"{path}: lies inside {folder}, which is scanned as "
                                      "input; choose an output outside it", 2)


def check_report_path(path: Path) -> None:
    """The report must be writable before the run starts, not found unwritable after it: a
    regular file (or a link to one) or nothing yet, in a folder we can write (it is replaced
    by rename). A device, FIFO or folder is refused: /dev/null must stay a device."""
    real = Path(os.path.realpath(path))
    if real.exists():
        if not real.is_file():
            raise OutputError(f"{path}: is not a regular file; give a file name for the "
                              "report (--json prints it on stdout)", 6)
        if not os.access(real, os.W_OK):
            raise OutputError(f"{path}: the report file is not writable", 6)
    parent = real.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder for the report does not exist", 6)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder for the report is not writable", 6)
