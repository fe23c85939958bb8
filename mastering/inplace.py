"""A File-set written IN PLACE into an existing folder: the root of a mounted USB stick.

A stick's root is a mount point: a File-set cannot be built beside it and renamed into place,
as :mod:`mastering.folderwriter` does. So the order of writes carries the safety instead:

1. a journal (``DICOMDIR.JNL``) lists every file and folder this run will create; fsynced;
2. every file is written (never over an existing one), then every file and folder fsynced;
3. the DICOMDIR is written as ``DICOMDIR.TMP``, fsynced, renamed to ``DICOMDIR``, root fsynced;
4. the journal is removed.

A stick pulled at any point therefore never carries a DICOMDIR that references missing files:
either the old DICOMDIR (or none) is there, or the new one with everything it lists. The next
run reads the journal and removes what an interrupted run left (and only that: what the
journal lists and no DICOMDIR references).

The File-set Updater role (PS3.10 8.3) lives here too: ``append`` keeps the existing File-set
UID and files (:mod:`mastering.update` reads them) and replaces the DICOMDIR only in step 3;
``replace`` removes the old DICOMDIR and the files it references, and nothing else, once the
new content is known to fit. Before anything is written the content must fit the free space,
counted in the file system's allocation units, and on FAT media obey :mod:`mastering.fat`.

After writing, :meth:`Target.check` reads the medium back (after the caller's ``reread`` hook,
which for a stick unmounts it, drops the device's cached pages and mounts it again), runs the
core :func:`mastering.verify.verify` on it and compares every written file with its source. If
that fails the run's files are removed again and the previous DICOMDIR restored.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from . import fat, plan, update
from .content import SegmentReader, copy_to, segments
from .intake import Cancelled, IntakeResult
from .outputs import sync_dir as _fsync  # fsync of a file or folder
from .part10 import MAGIC, PREAMBLE_LEN
from .pipeline import MasteringError

if TYPE_CHECKING:
    from .pipeline import Options, Report

ProgressFn = Callable[[str, int, int], None]
JOURNAL = "DICOMDIR.JNL"
TEMP = "DICOMDIR.TMP"
JOURNAL_MAGIC = "mastering in-place journal 1"
CHUNK = 1 << 20
MODES = ("", "append", "replace")


def _error(message: str, report: Report, code: int) -> Exception:
    report.error = message
    return MasteringError(message, report, code)


class Target:
    """One in-place write into `root` under `options` (``options.update``: "" refuses an
    existing File-set, "append" adds to it, "replace" replaces it)."""

    def __init__(self, root: Path, options: Options, report: Report):
        self.root, self.options, self.report = root, options, report
        self.mode = options.update
        if self.mode not in MODES:
            raise ValueError(f"update mode {self.mode!r}: one of {MODES}")
        self.existing: update.Existing | None = None
        self.leftovers: list[str] = []  # files an interrupted run of ours left
        self.made_dirs: list[Path] = []
        self.made_files: list[Path] = []
        self.wrote_dicomdir = False

    # -- before planning --------------------------------------------------------------------

    def join(self, scanned: IntakeResult, progress: ProgressFn | None,
             cancel: Event | None) -> None:
        """Look at what is in the folder; refuse, or add the existing File-set's instances."""
        if not self.root.is_dir():
            raise _error(f"{self.root}: not a folder (mount the stick first)", self.report, 6)
        if self.options.label:
            raise _error("--label writes beside the output, which for a stick is outside it; "
                         "leave --label out", self.report, 2)
        try:
            self.existing = update.find(self.root)
        except update.UpdateRefused as exc:
            if self.mode != "replace":
                raise _error(f"{exc}; --replace would replace it", self.report, 6) from exc
            raise _error(str(exc), self.report, 6) from exc
        self._refuse_existing()
        referenced = set(self.existing.files) if self.existing else set()
        self.leftovers = interrupted(self.root, referenced)
        known = referenced | set(self.leftovers)
        if self.existing is not None:
            known.add(self.existing.dicomdir_name)
        strangers = foreign_dicom(self.root, known)
        if strangers:
            raise _error(f"{self.root} holds {len(strangers)} DICOM file(s) that no DICOMDIR "
                         f"lists, e.g. {strangers[0]}: a File-set here would not conform "
                         "(every DICOM file must be referenced); remove them or format the "
                         "stick", self.report, 6)
        if self.mode == "append" and self.existing is not None:
            self._append(scanned, progress, cancel)

    def _refuse_existing(self) -> None:
        found = self.existing
        if found is None:
            return
        what = (f"a File-set ({found.patients} patient(s), {found.studies} study(ies), "
                f"{len(found.files)} file(s))")
        if not self.mode:
            raise _error(f"{self.root} already holds {what}; use --append to add to it or "
                         "--replace to replace it", self.report, 6)
        if self.mode == "append" and self.options.viewer:
            raise _error("--viewer with --append: the web pages on the medium would not show "
                         "the earlier studies; append without --viewer", self.report, 2)
        self.report.warnings.append(f"the output held {what}; "
                                    f"{'added to it' if self.mode == 'append' else 'replaced'}")

    def _append(self, scanned: IntakeResult, progress: ProgressFn | None,
                cancel: Event | None) -> None:
        found = self.existing
        assert found is not None
        try:
            update.scan(found, self.options.profile, workers=self.options.workers,
                        progress=progress, cancel=cancel)
        except update.UpdateRefused as exc:
            raise _error(str(exc), self.report, 6) from exc
        ours = {i.patient_id for i in scanned.instances}
        theirs = {i.patient_id for i in found.instances}
        if ours - theirs and theirs:
            self.report.warnings.append("the medium already holds another patient's images; "
                                        "the new ones are added beside them")
        instances, same, conflicts = update.join(found, scanned.instances)
        self.report.duplicates += same
        self.report.invalid += conflicts
        if conflicts and not self.options.skip_invalid:
            raise _error(f"{len(conflicts)} input file(s) conflict with the File-set on the "
                         "medium; nothing was written", self.report, 3)
        scanned.instances = instances
        if not any(not i.on_medium for i in instances):
            raise _error("every input instance is already on the medium; nothing to add",
                         self.report, 3)

    # -- after planning ---------------------------------------------------------------------

    def adopt(self, volumes: list[plan.Volume]) -> plan.Volume:
        """One volume (a stick is one medium), with the existing File-set's UID and ID and
        File IDs that do not collide with anything in the folder."""
        if len(volumes) != 1:
            raise _error(f"the content needs {len(volumes)} media of the given capacity; a "
                         "stick holds one File-set (split the studies)", self.report, 4)
        vol = volumes[0]
        for entry in vol.entries():
            if entry.action == "existing":  # as it is on the medium
                entry.out_ts = entry.instance.transfer_syntax
        if self.mode == "append" and self.existing is not None:
            vol.fileset_uid = self.existing.fileset_uid  # never changed (PS3.10 8.1)
            vol.fileset_id = self.existing.fileset_id
        taken = update.stored_names(self.root)
        if self.mode == "replace" and self.existing is not None:
            taken -= {n.upper() for n in self.existing.files}
        try:
            plan.assign_update_ids(vol, self.options.profile, taken - set(_upper(self.leftovers)))
        except plan.PlanError as exc:
            raise _error(str(exc), self.report, 2) from exc
        if self.options.source_date_epoch is not None and self.mode != "append":
            vol.fileset_uid = plan.fileset_uid(vol.entries(), vol.fileset_id, 1, True)
        return vol

    def _fit(self, vol: plan.Volume, dicomdir: bytes,
             extra: list[tuple[tuple[str, ...], bytes | Path]]) -> None:
        """Refuse before writing anything if the content breaks FAT rules or does not fit."""
        new = [e for e in vol.entries() if e.action != "existing"]
        files = [(e.file_id, e.out_size) for e in new] + [
            (comps, _size(data)) for comps, data in extra]
        profile = self.options.profile
        if profile.filesystem == "fat":
            problems = fat.name_problems(c for c, _ in files)
            limit = min(profile.max_file_bytes or fat.MAX_FILE_BYTES, fat.MAX_FILE_BYTES)
            problems += fat.size_problems(files, limit)
            if problems:
                raise _error(f"{len(problems)} file(s) break the FAT rules: {problems[0]}",
                             self.report, 4)
        st = os.statvfs(self.root)
        if st.f_blocks == 0:  # a file system that reports no sizes (fusefat): cannot tell
            self.report.warnings.append("the medium does not report its free space; the fit "
                                        "was not checked before writing")
            return
        unit = st.f_frsize or st.f_bsize
        need = sum(fat.allocated(size, unit) for _, size in files)
        need += sum(fat.folder_bytes(n, unit) for n in _new_folders(files, self.root).values())
        need += 2 * fat.allocated(len(dicomdir), unit) + unit  # new + temporary name, journal
        free = st.f_bavail * st.f_frsize
        free += sum(fat.allocated(_size(self.root / n), unit) for n in self.leftovers)
        if self.mode == "replace" and self.existing is not None:
            free += self.existing.allocated(unit)
        if need > free:
            raise _error(f"the content needs {need} bytes and the medium has {free} free; "
                         "nothing was written", self.report, 4)

    # -- writing ----------------------------------------------------------------------------

    def write(self, vol: plan.Volume, dicomdir: bytes,
              extra: list[tuple[tuple[str, ...], bytes | Path]], *, label: str = "write",
              progress: ProgressFn | None = None, cancel: Event | None = None) -> int:
        """Fit check, cleanup of an interrupted run, --replace removal, then the write in the
        journal order of the module docstring. Returns the bytes written."""
        self._fit(vol, dicomdir, extra)
        self._remove(self.leftovers)
        if self.mode == "replace" and self.existing is not None:
            remove_fileset(self.root, self.existing)
        new = [e for e in vol.entries() if e.action != "existing"]
        planned = [e.file_id for e in new] + [comps for comps, _ in extra]
        try:
            total = self._write_all(new, planned, dicomdir, extra, label, progress, cancel)
        except BaseException:
            self.undo()
            raise
        return total

    def _write_all(self, new: list[plan.FileEntry], planned: list[tuple[str, ...]],
                   dicomdir: bytes, extra: list[tuple[tuple[str, ...], bytes | Path]],
                   label: str, progress: ProgressFn | None, cancel: Event | None) -> int:
        _write_journal(self.root, planned)
        total = 0
        for comps, data in extra:
            target = self._create(comps)
            _write_content(target, data)
            total += target.stat().st_size
        for done, entry in enumerate(new, 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled while writing the File-set")
            target = self._create(entry.file_id)
            copy_to(entry, str(target))
            total += entry.out_size
            if progress:
                progress(label, done, len(new))
        if self.options.sync:
            for path in self.made_files:
                _fsync(path)
            for folder in sorted(set(self.made_dirs), key=lambda p: -len(p.parts)):
                _fsync(folder)
        self._publish_dicomdir(dicomdir)
        (self.root / JOURNAL).unlink()
        _fsync(self.root)
        return total + len(dicomdir)

    def _create(self, comps: tuple[str, ...]) -> Path:
        """The path for a new file; folders made on the way are remembered; never an existing
        file (open with 'x' refuses it as well)."""
        target = self.root.joinpath(*comps)
        folder = self.root
        for part in comps[:-1]:
            folder = folder / part
            if not folder.is_dir():
                folder.mkdir()
                self.made_dirs.append(folder)
        self.made_files.append(target)
        return target

    def _publish_dicomdir(self, dicomdir: bytes) -> None:
        tmp = self.root / TEMP
        with open(tmp, "wb") as out:
            out.write(dicomdir)
            out.flush()
            if self.options.sync:
                os.fsync(out.fileno())
        if self.existing is not None and self.existing.dicomdir_name != "DICOMDIR":
            os.unlink(self.root / self.existing.dicomdir_name)  # 'dicomdir' on a folder
        os.replace(tmp, self.root / "DICOMDIR")
        self.wrote_dicomdir = True
        _fsync(self.root)

    # -- checking ---------------------------------------------------------------------------

    def check(self, vol: plan.Volume, dicomdir: bytes,
              extra: list[tuple[tuple[str, ...], bytes | Path]],
              progress: ProgressFn | None, cancel: Event | None) -> None:
        """Read the medium back (after options.reread) and check it with the core verify and
        against every source; on failure undo this run's writes."""
        from .verify import verify

        try:
            if self.options.reread is not None:
                self.root = self.options.reread(self.root)
            if progress:
                progress("verify", 0, 1)
            result = verify(self.root, self.options.profile,
                            progress=lambda d, t: progress and progress("verify", d, t),
                            cancel=cancel)
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled during verification")
            if not result.ok:
                self.report.violations = [{"volume": str(self.root), "code": v.code,
                                           "path": v.path, "message": v.message}
                                          for v in result.violations]
                raise _error(f"the medium does not pass verification ({len(result.violations)} "
                             "violation(s)); this run's files were removed", self.report, 5)
            bad = compare(vol, dicomdir, extra, self.root, progress, cancel)
            if bad:
                self.report.violations = [{"volume": str(self.root), "code": "read-back",
                                           "path": p, "message": m} for p, m in bad]
                raise _error(f"{len(bad)} file(s) read back from the medium differ from what "
                             f"was written, e.g. {bad[0][0]}: the medium cannot be trusted",
                             self.report, 5)
        except BaseException:
            self.undo()
            raise

    # -- undoing ----------------------------------------------------------------------------

    def undo(self) -> None:
        """Best effort: remove what this run wrote and restore the earlier DICOMDIR. A pulled
        stick cannot be cleaned; its journal lets the next run do it."""
        try:
            if self.wrote_dicomdir:
                if self.existing is not None and self.mode == "append":
                    tmp = self.root / TEMP
                    tmp.write_bytes(self.existing.dicomdir)
                    _fsync(tmp)
                    os.replace(tmp, self.root / "DICOMDIR")
                else:
                    (self.root / "DICOMDIR").unlink(missing_ok=True)
                _fsync(self.root)
            rel = [p.relative_to(self.root).as_posix() for p in self.made_files]
            self._remove(rel + [TEMP])
            (self.root / JOURNAL).unlink(missing_ok=True)
            _fsync(self.root)
        except OSError:
            pass

    def _remove(self, names: Iterable[str]) -> None:
        _remove_files(self.root, names)


# -- helpers --------------------------------------------------------------------------------


def _upper(names: Iterable[str]) -> set[str]:
    return {n.upper() for n in names}


def _size(data: bytes | Path) -> int:
    return len(data) if isinstance(data, bytes) else os.path.getsize(data)


def _write_content(target: Path, data: bytes | Path) -> None:
    with open(target, "xb") as out:
        if isinstance(data, bytes):
            out.write(data)
        else:
            with open(data, "rb") as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)


def _new_folders(files: list[tuple[tuple[str, ...], int]], root: Path) -> dict[str, int]:
    """Folders the files need that are not there yet, with their number of entries."""
    counts: dict[str, int] = {}
    for comps, _ in files:
        for depth in range(1, len(comps)):
            folder = "/".join(comps[:depth])
            counts[folder] = counts.get(folder, 0) + (depth == len(comps) - 1)
    return {f: n for f, n in counts.items() if not (root / f).is_dir()}


def _write_journal(root: Path, planned: list[tuple[str, ...]]) -> None:
    """What this run will create, fsynced before the first file: no patient data, only
    File IDs (PS3.10 File IDs carry no meaning) and the temporary DICOMDIR name."""
    lines = [JOURNAL_MAGIC, str(uuid.uuid4()), TEMP, *("/".join(c) for c in planned)]
    with open(root / JOURNAL, "w", encoding="ascii", newline="\n") as out:
        out.write("\n".join(lines) + "\n")
        out.flush()
        os.fsync(out.fileno())
    _fsync(root)


def interrupted(root: Path, referenced: set[str]) -> list[str]:
    """Files an interrupted in-place run left: listed in its journal, present, and not
    referenced by the DICOMDIR that is there now (so provably that run's)."""
    journal = next((p for p in root.iterdir() if p.name.upper() == JOURNAL), None) \
        if root.is_dir() else None
    if journal is None:
        return []
    try:
        lines = journal.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    if not lines or lines[0] != JOURNAL_MAGIC:
        return []  # not ours: leave it alone
    refs = _upper(referenced)
    left = [journal.name]
    for name in lines[2:]:
        if name and name.upper() not in refs and _lookup(root, name) is not None:
            left.append(_lookup(root, name))  # type: ignore[arg-type]
    return left


def _lookup(root: Path, name: str) -> str | None:
    """The stored name of a '/'-joined path below root, ignoring case (FAT)."""
    cur, parts = root, []
    for part in name.split("/"):
        if not cur.is_dir():
            return None
        match = next((p for p in cur.iterdir() if p.name.upper() == part.upper()), None)
        if match is None:
            return None
        cur = match
        parts.append(match.name)
    return "/".join(parts) if cur.is_file() else None


def foreign_dicom(root: Path, known: set[str]) -> list[str]:
    """DICOM files (128-byte preamble + 'DICM') in root that are not in known."""
    known_upper = _upper(known)
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel.upper() in known_upper:
                continue
            try:
                with open(path, "rb") as fh:
                    head = fh.read(PREAMBLE_LEN + 4)
            except OSError:
                continue
            if head[PREAMBLE_LEN:] == MAGIC:
                found.append(rel)
    return sorted(found)


def remove_fileset(root: Path, existing: update.Existing) -> None:
    """--replace: the old DICOMDIR first (so no DICOMDIR ever lists a removed file), then
    the files it references, then the folders that held them if they are empty now.
    Nothing else is touched."""
    os.unlink(root / existing.dicomdir_name)
    _fsync(root)
    _remove_files(root, existing.files)


def _remove_files(root: Path, names: Iterable[str]) -> None:
    folders: set[Path] = set()
    for name in names:
        path = root / name
        if path.is_file():
            path.unlink()
            folders.update(p for p in path.parents if p != root and root in p.parents)
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):  # only if empty: others' files keep their folder
            folder.rmdir()
    _fsync(root)


def compare(vol: plan.Volume, dicomdir: bytes,
            extra: list[tuple[tuple[str, ...], bytes | Path]], root: Path,
            progress: ProgressFn | None = None, cancel: Event | None = None
            ) -> list[tuple[str, str]]:
    """Every file this run wrote, read back from root and compared with its source byte by
    byte; returns (path, why) for each that differs."""
    bad = []
    if (root / "DICOMDIR").read_bytes() != dicomdir:
        bad.append(("DICOMDIR", "differs from the DICOMDIR that was written"))
    new = [e for e in vol.entries() if e.action != "existing"]
    for done, entry in enumerate(new, 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled during read-back")
        name = "/".join(entry.file_id)
        with SegmentReader(segments(entry)) as src:
            why = _same(root / name, src)
        if why:
            bad.append((name, why))
        if progress:
            progress("read back", done, len(new))
    for comps, data in extra:
        name = "/".join(comps)
        if isinstance(data, bytes):
            import io

            why = _same(root / name, io.BytesIO(data))
        else:
            with open(data, "rb") as src:
                why = _same(root / name, src)
        if why:
            bad.append((name, why))
    return bad


def _same(path: Path, src) -> str:  # noqa: ANN001 - a readable binary stream
    try:
        with open(path, "rb") as got:
            while True:
                a, b = got.read(CHUNK), src.read(CHUNK)
                if a != b:
                    return "content differs from the source"
                if not a:
                    return ""
    except OSError as exc:
        return f"cannot be read back: {exc.strerror or exc}"
