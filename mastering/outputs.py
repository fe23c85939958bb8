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

No patient data goes into any of them: names of our own files, numbers and a process ID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RUN_MARKER = ".mastering-run"
PARTIAL_SUFFIX = ".partial"


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
    #: a folder output that is an existing folder on another file system than its parent (a
    #: mounted stick): the work folder goes inside it and the finished volume's entries are
    #: moved up at the end, because a rename cannot cross file systems
    in_place: bool = field(init=False)

    def __post_init__(self) -> None:
        out = self.output
        self.in_place = (self.kind == "folder" and out.is_dir() and not out.is_symlink()
                         and os.stat(out).st_dev != os.stat(out.parent).st_dev)

    @property
    def folder(self) -> Path:
        return self.output.parent

    @property
    def lock_path(self) -> Path:
        return self.folder / f".{self.output.name}.lock"

    @property
    def record_path(self) -> Path:
        return self.folder / f".{self.output.name}.mastering.json"

    @property
    def work_parent(self) -> Path:
        return self.output if self.in_place else self.folder

    def derived(self, name: str) -> bool:
        """True for names this output's runs write: OUT, OUT-n, their labels, the sidecars."""
        out = self.output
        stem, suffix = (out.stem, out.suffix) if out.suffix else (out.name, "")
        pattern = (rf"^{re.escape(stem)}(-\d+)?({re.escape(suffix)}|\.label\.svg|\.label\.png)$"
                   rf"|^\.{re.escape(out.name)}\.(lock|mastering\.json|[^/]*\.partial)$")
        return re.match(pattern, name) is not None

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


# -- the lock --------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(target: Target) -> Iterator[None]:
    """Hold the output's lock for the duration; raise Busy at once if another run has it."""
    path = target.lock_path
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file beside the output: "
                              f"{exc.strerror or exc}", 6) from exc
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
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still ours: nobody else can hold it while we do
        os.close(fd)


def _read_small(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


# -- the work folder -------------------------------------------------------------------------


def make_work(target: Target) -> Path:
    """A new hidden work folder on the output's file system, marked as this run's."""
    work = Path(tempfile.mkdtemp(prefix=f".{target.output.name}.", suffix=PARTIAL_SUFFIX,
                                 dir=target.work_parent))
    _write_marker(work, {"output": target.output.name, "pid": os.getpid()})
    return work


def _write_marker(work: Path, data: dict) -> None:
    tmp = work / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, work / RUN_MARKER)


def is_work_folder(path: str | Path) -> bool:
    """A folder some run of this program is working in (or was, when it was killed)."""
    return os.path.isfile(os.path.join(path, RUN_MARKER)) and not os.path.islink(path)


def remove_stale_work(target: Target) -> list[str]:
    """Remove what killed runs to this output left: their work folders and, for a folder
    output that was being filled in place, what they had already moved into it. Only called
    while holding the lock, so no live run owns any of it. Returns what was removed."""
    removed: list[str] = []
    prefix = f".{target.output.name}."
    parents = {target.folder}
    if target.output.is_dir() and not target.output.is_symlink():
        parents.add(target.output)
    for parent in parents:
        try:
            names = sorted(os.listdir(parent))
        except OSError:
            continue
        for name in names:
            path = parent / name
            if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
                continue
            marker = _marker(path)
            if marker is None:
                if _only_unfinished_marker(path):  # killed between making and marking it
                    shutil.rmtree(path)
                    removed.append(str(path))
                continue  # not provably ours: leave it
            if marker.get("output") != target.output.name:
                continue
            for moved in marker.get("moving", []):
                _remove(target.output / moved)
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


def _only_unfinished_marker(path: Path) -> bool:
    """An empty folder of our name, or one holding only a half-written marker."""
    try:
        return not path.is_symlink() and set(os.listdir(path)) <= {RUN_MARKER + ".tmp"}
    except OSError:
        return False


def _marker(path: Path) -> dict | None:
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        data = json.loads((path / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- publishing ------------------------------------------------------------------------------


def read_record(target: Target) -> list[Published]:
    try:
        data = json.loads(target.record_path.read_text(encoding="utf-8"))
        return [Published(**item) for item in data.get("files", [])]
    except (OSError, ValueError, TypeError):
        return []


def _write_record(target: Target, files: Iterable[Published]) -> None:
    path = target.record_path
    data = {"output": target.output.name, "files": [vars(f) for f in files]}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def plan_publish(target: Target, files: Sequence[tuple[Path, Path]],
                 inputs: set[tuple[int, int]], work: Path) -> tuple[list[Published], list[str]]:
    """Check that every (temporary, final) path can go in place; return the earlier run's
    files to remove and warnings about look-alike files left alone. A final file that exists
    must be the output itself (the name the user gave) or a file the earlier run published,
    unchanged; a final folder must be empty (but for this run's work folder in it)."""
    earlier = {p.name: p for p in read_record(target)}
    new_names = {final.name for _tmp, final in files}
    for tmp, final in files:
        if not final.exists() and not final.is_symlink():
            continue
        if _identity(final) in inputs:
            raise OutputError(f"{final}: is one of the inputs; nothing was written", 2)
        if tmp.is_dir() != final.is_dir():
            raise OutputError(f"{final}: exists and is {'a' if final.is_dir() else 'not a'} "
                              "folder", 6)
        if final.is_dir():
            if any(e.name != work.name for e in os.scandir(final)):
                raise OutputError(f"{final}: exists and is not an empty folder", 6)
            continue
        if final == target.output:
            continue
        if final.name not in earlier or not earlier[final.name].unchanged(final.parent):
            raise OutputError(f"{final}: exists and was not written by an earlier run to "
                              f"{target.output.name}; move it away or choose another output "
                              "name", 6)
    stale = [p for name, p in earlier.items() if name not in new_names
             and p.unchanged(target.folder) and (p.dev, p.ino) not in inputs]
    stale_names = {p.name for p in stale}
    warnings = [f"{target.folder / name}: looks like an image of an earlier set but was not "
                "provably written by it; left in place"
                for name in sorted(os.listdir(target.folder))
                if target.derived(name) and not name.startswith(".") and name not in new_names
                and name not in stale_names and _looks_ours(target.folder / name)]
    return stale, warnings


def _looks_ours(path: Path) -> bool:
    """An ISO 9660 image whose Application Identifier (PVD bytes 574-701) names this program."""
    try:
        with open(path, "rb") as fh:
            fh.seek(16 * 2048)
            pvd = fh.read(2048)
    except OSError:
        return False
    return pvd[1:6] == b"CD001" and b"DICOM MASTERING" in pvd[574:702]


def publish(target: Target, files: Sequence[tuple[Path, Path]], stale: Sequence[Published],
            *, sync: bool = True) -> None:
    """Put every finished file in place and remove the earlier run's leftovers, recording
    first what will be there, so that a run killed half-way leaves only recorded files."""
    mine = [(tmp, final) for tmp, final in files
            if tmp.is_file() and final.parent == target.folder]
    _write_record(target, [*(Published.of(t, f.name) for t, f in mine), *stale])
    for old in stale:
        with contextlib.suppress(FileNotFoundError):
            (target.folder / old.name).unlink()
    for tmp, final in files:
        move(tmp, final)
    _write_record(target, [Published.of(final) for _tmp, final in mine])  # copies: new inodes
    if sync:
        sync_dir(target.folder)


def move(src: Path, dst: Path) -> None:
    """Rename src to dst; across file systems (EXDEV), copy to a temporary name beside dst,
    fsync and rename, then remove src."""
    try:
        os.replace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV or src.is_dir():
            raise
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    src.unlink()


def fill_in_place(target: Target, volume: Path, work: Path, *, sync: bool = True,
                  last: str = "DICOMDIR") -> None:
    """Move a finished volume folder's entries into the (empty) output folder, the DICOMDIR
    last, so that the folder never looks finished before it is. The marker lists the entries
    first: a run killed half-way is cleaned up by the next run to this output."""
    names = sorted(os.listdir(volume), key=lambda n: (n == last, n))
    marker = _marker(work) or {}
    _write_marker(work, {**marker, "moving": names})
    for name in names:
        os.replace(volume / name, target.output / name)
    if sync:
        sync_dir(target.output)


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


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
    link, say), and none may be a scanned file (a hard link to an input)."""
    for path in paths:
        cur = path
        while not cur.exists():
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
    """The report must be writable before the run starts, not found unwritable after it."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a report file", 6)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path}: the report file is not writable", 6)
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder for the report does not exist", 6)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder for the report is not writable", 6)


def write_atomically(path: Path, text: str) -> None:
    """Write a small file under a temporary name beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
