"""A File-set written IN PLACE into an existing folder: the root of a mounted USB stick.

A stick's root is a mount point: a File-set cannot be built beside it and renamed into place,
as :mod:`mastering.folderwriter` does. So the order of writes carries the safety instead:

1. nothing is touched until every name this run writes is known to be free (or to be
   removed by this run as provably its own, below) and the content is known to fit;
2. what an interrupted run provably left is removed (below);
3. a journal (``DICOMDIR.JNL``, created exclusively) lists every file this run will create
   and, for ``--replace``, every file it will remove with the proof that it may; fsynced;
4. ``--replace``: the old DICOMDIR first, then the files it references, then this program's
   own web content of the old File-set;
5. every file is written under a temporary name of this run (``TTTTnnnn.TMP``: a random token
   in the journal and a counter) and read back for its SHA-256, on :mod:`mastering.hashcopy`'s
   threads; its size and SHA-256 are appended to the journal in file order, and only once
   that record is durable the file is renamed to its name (never over an existing file). The
   files are made durable in batches (one syncfs of the medium), then the batch's records
   (one fsync of the journal), then the batch is renamed;
6. the DICOMDIR is written under a temporary name, fsynced, renamed to ``DICOMDIR``, the
   folders fsynced; the journal is removed.

A stick pulled at any point therefore never carries a DICOMDIR that references missing files:
either the old DICOMDIR (or none) is there, or the new one with everything it lists. And every
file an interrupted run leaves is provably its own: a temporary name with the journal's token,
or a name whose journal record (size and SHA-256, or for a removal of ``--replace`` the size
and SOP Instance UID of the DICOM file) matches the file byte for byte. The next run removes
those and nothing else; a file that only bears a name the journal lists (the owner saved
their own README.TXT there afterwards) is left alone and reported.

Web content (README.TXT, INDEX.HTM, IHE_PDI/, VIEWER/) gets a manifest on the medium
(:data:`MANIFEST`, the ``sha256sum`` format under a first line naming this program), so that a
later ``--replace`` can recognise this program's own pages of the old File-set and remove them
with it (another patient's pages must not stay on a reused stick), and nothing else: a page
changed since, or another program's, is left alone; if the new content needs its name, the
run is refused before anything is removed.

The File-set Updater role (PS3.10 8.3) lives here too: ``append`` keeps the existing File-set
UID and files (:mod:`mastering.update` reads them) and replaces the DICOMDIR only in step 6;
``replace`` removes the old DICOMDIR and the files it references (only Part 10 files whose
SOP Instance UID matches their record), and nothing else. Before anything is written the
content must fit the free space, counted in the file system's allocation units, and on FAT
media obey :mod:`mastering.fat`.

After writing, :meth:`Target.check` reads the medium back (after the caller's ``reread`` hook,
which for a stick unmounts it, drops the device's cached pages and mounts it again), runs the
core :func:`mastering.verify.verify` on it and compares every written file with its source;
a hook with a ``confirm(nbytes)`` method is then asked to confirm that those bytes came from
the device. If any of that fails the run's files are removed again and the previous DICOMDIR
restored (unless the hook's exception says ``unmounted``: the medium is not there to undo
on; the journal lets the next run clean up). An exception that leaves a ``--replace`` run
after the old File-set was removed carries ``old_removed = True``: the medium then holds
neither File-set.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import stat
import string
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from . import fat, hashcopy, part10, plan, syscalls, update
from .content import Range, Segment, SegmentReader, segments
from .intake import Cancelled, IntakeResult
from .outputs import sync_dir as _fsync  # fsync of a file or folder
from .pipeline import MasteringError

if TYPE_CHECKING:
    from .pipeline import Options, Report

ProgressFn = Callable[[str, int, int], None]
Extra = list[tuple[tuple[str, ...], bytes | Path | Range]]
JOURNAL = "DICOMDIR.JNL"
JOURNAL_MAGIC = "mastering in-place journal 2"
#: the web content's manifest in the root (sha256sum lines after this first line)
MANIFEST = "IHE_PDI.SHA"
MANIFEST_MAGIC = "# web content written by mastering (IHE PDI); sha256sum -c reads the rest"
#: where this program's web content lives (IHE PDI, PDI-07 to PDI-14)
WEB_ROOT_FILES = frozenset({"README.TXT", "INDEX.HTM"})
WEB_FOLDERS = frozenset({"IHE_PDI", "VIEWER"})
CHUNK = 1 << 20
MODES = ("", "append", "replace")
#: a batch of written files is recorded durably (one journal fsync) at least this often
BATCH_FILES = 64
BATCH_SECONDS = 0.5
#: copies submitted ahead of the one whose record is taken next (hashcopy.Pool's threads)
IN_FLIGHT = 2 * hashcopy.THREADS
_TOKEN_CHARS = string.ascii_uppercase
_COUNTER_CHARS = string.digits + string.ascii_uppercase
_JOURNAL_MAX = 64 << 20  # a journal of a million files is still far below this


def _error(message: str, report: Report, code: int) -> Exception:
    report.error = message
    return MasteringError(message, report, code)


@dataclass(frozen=True)
class Proof:
    """What shows that a file on the medium is the one this program wrote or means: its size
    and SHA-256, or (a DICOM file of an old File-set) its size and SOP Instance UID."""

    name: str  # '/'-joined, as stored
    size: int
    kind: str  # "sha256" | "uid"
    value: str

    def line(self, mark: str) -> str:
        return f"{mark} {self.size} {self.kind}:{self.value} {self.name}"

    def holds(self, root: Path) -> bool:
        """The file at name is a regular file (not a link) that still matches."""
        path = root / self.name
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != self.size:
            return False
        try:
            if self.kind == "sha256":
                return sha256_of(path) == self.value
            layout = part10.inspect(path)
        except (OSError, ValueError):
            return False
        return layout.has_preamble and layout.meta_sop_instance_uid == self.value


@dataclass
class Leftovers:
    """What an interrupted run left (found through its journal)."""

    journal: str | None = None  # the journal's stored name
    ours: list[str] = field(default_factory=list)  # provably that run's: removed
    kept: list[tuple[str, str]] = field(default_factory=list)  # (name, why) left alone
    blocked: str = ""  # a DICOMDIR.JNL that is not ours: the run cannot go on

    @property
    def names(self) -> list[str]:
        return [*self.ours, *([self.journal] if self.journal else [])]


@dataclass
class OldWeb:
    """This program's web content of an earlier File-set, recognised by its manifest."""

    manifest: str | None = None
    files: list[Proof] = field(default_factory=list)  # still as written: removed with it
    kept: list[tuple[str, str]] = field(default_factory=list)  # changed, or not ours


class Target:
    """One in-place write into `root` under `options` (``options.update``: "" refuses an
    existing File-set, "append" adds to it, "replace" replaces it)."""

    def __init__(self, root: Path, options: Options, report: Report):
        self.root, self.options, self.report = root, options, report
        self.mode = options.update
        if self.mode not in MODES:
            raise ValueError(f"update mode {self.mode!r}: one of {MODES}")
        self.existing: update.Existing | None = None
        self.leftovers = Leftovers()
        self.removals: list[Proof] = []  # --replace: the old File-set's files and web pages
        self.old_manifest: str | None = None
        self.old_removed = False
        self.made_dirs: list[str] = []  # '/'-joined, relative to root
        self.folders: set[str] = set()  # known to be folders (made or checked) in this run
        self.made_files: list[str] = []  # created by this run under their final names
        self.temps: list[str] = []  # created by this run under a temporary name
        self.wrote_dicomdir = False
        self.renaming: tuple[str, str] | None = None  # (temporary, final) during a rename
        self.publishing: bytes | None = None  # the new DICOMDIR while it is renamed in
        self.extra: Extra | None = None  # the web content as written (with its manifest)
        self.journal: Journal | None = None

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
        if self.leftovers.blocked:
            raise _error(self.leftovers.blocked, self.report, 6)
        self.report.warnings += [f"{name}: {why}" for name, why in self.leftovers.kept]
        if self.mode == "replace":
            self._plan_removal()
        known = referenced | set(self.leftovers.names)
        if self.existing is not None:
            known.add(self.existing.dicomdir_name)
        strangers, odd = foreign_dicom(self.root, known)
        self.report.warnings += [f"{name}: {why}" for name, why in odd]
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
        if self.mode == "append" and (self.root / "INDEX.HTM").exists():
            self.report.warnings.append("the web pages on the medium (INDEX.HTM) show only the "
                                        "earlier studies")

    def _plan_removal(self) -> None:
        """--replace: what may be removed, proven now, before anything is touched."""
        if self.existing is not None:
            try:
                self.removals = [Proof(n, size, "uid", uid) for n, size, uid in
                                 update.removable(self.existing)]
            except update.UpdateRefused as exc:
                raise _error(f"{exc}; nothing was removed or written", self.report, 6) from exc
        web = our_web(self.root)
        self.old_manifest = web.manifest
        self.removals += web.files
        self.report.warnings += [f"{name}: {why}" for name, why in web.kept]

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
        taken = update.stored_names(self.root) - _upper(self._freed())
        try:
            plan.assign_update_ids(vol, self.options.profile, taken)
        except plan.PlanError as exc:
            raise _error(str(exc), self.report, 2) from exc
        if self.options.source_date_epoch is not None and self.mode != "append":
            vol.fileset_uid = plan.fileset_uid(vol.entries(), vol.fileset_id, 1, True)
        return vol

    def _freed(self) -> list[str]:
        """Names this run removes before it writes: an interrupted run's, --replace's."""
        names = self.leftovers.names + [p.name for p in self.removals]
        if self.mode == "replace" and self.existing is not None:
            names.append(self.existing.dicomdir_name)
        if self.old_manifest:
            names.append(self.old_manifest)
        return names

    def _check_names(self, planned: list[tuple[str, ...]]) -> None:
        """Every file this run creates has a free name, and every folder on its way is a
        folder (not a file, not a link); refuse before anything is touched."""
        entries = _entries(self.root)
        freed = _upper(self._freed())
        problems = []
        for comps in planned:
            for depth in range(1, len(comps)):
                kind = entries.get("/".join(comps[:depth]).upper(), ("", None))[1]
                if kind not in (None, "dir"):
                    problems.append(f"{'/'.join(comps[:depth])} is on the medium and is not a "
                                    f"folder ({kind}); {'/'.join(comps)} would go inside it")
            name = "/".join(comps)
            if name.upper() in entries and name.upper() not in freed:
                problems.append(f"{name} is already on the medium and was not written there by "
                                "this program (or was changed since)")
        if problems:
            hint = ("; use --replace to replace web pages this program wrote" if
                    not self.mode and any(c[0] in WEB_ROOT_FILES | WEB_FOLDERS | {MANIFEST}
                                          for c in planned) else "")
            raise _error(f"{problems[0]}: nothing was removed or written (remove or rename "
                         f"it, or write without --viewer){hint}"
                         + (f" ({len(problems)} name(s) in all)" if len(problems) > 1 else ""),
                         self.report, 6)

    def _fit(self, vol: plan.Volume, dicomdir: bytes, extra: Extra) -> None:
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
        need += 2 * fat.allocated(len(dicomdir), unit) + 2 * unit  # + temporary name, journal
        free = st.f_bavail * st.f_frsize
        free += sum(fat.allocated(_lsize(self.root / n), unit) for n in self._freed())
        if need > free:
            raise _error(f"the content needs {need} bytes and the medium has {free} free; "
                         "nothing was written", self.report, 4)

    # -- writing ----------------------------------------------------------------------------

    def write(self, vol: plan.Volume, dicomdir: bytes, extra: Extra, *, label: str = "write",
              progress: ProgressFn | None = None, cancel: Event | None = None) -> int:
        """Name and fit checks, cleanup of an interrupted run, the journal, --replace's
        removal, then the writes in the order of the module docstring. Returns the bytes
        written."""
        extra = self.extra = with_manifest(extra)
        new = [e for e in vol.entries() if e.action != "existing"]
        planned = [e.file_id for e in new] + [comps for comps, _ in extra]
        self._check_names(planned)
        self._fit(vol, dicomdir, extra)
        try:
            self._remove_leftovers()
            self.journal = Journal.create(self.root, planned, self.removals,
                                          sync=self.options.sync)
            if self.mode == "replace":
                self._remove_old()
            return self._write_all(new, dicomdir, extra, label, progress, cancel)
        except BaseException as exc:
            self._mark(exc)
            self.undo()
            raise

    def _mark(self, exc: BaseException) -> None:
        if self.old_removed:
            exc.old_removed = True  # type: ignore[attr-defined]
            gone = "the earlier File-set had already been removed from the medium"
            if isinstance(exc, MasteringError) and gone not in self.report.warnings:
                self.report.warnings.append(gone)

    def _remove_leftovers(self) -> None:
        """What an interrupted run provably left, then its journal."""
        if not self.leftovers.journal:
            return
        _remove_files(self.root, self.leftovers.ours)
        os.unlink(self.root / self.leftovers.journal)
        _fsync(self.root)
        if self.leftovers.ours:
            self.report.warnings.append(f"an interrupted earlier copy left "
                                        f"{len(self.leftovers.ours)} file(s) of its own; they "
                                        "were removed")

    def _remove_old(self) -> None:
        """--replace: the old DICOMDIR first (so no DICOMDIR ever lists a removed file), then
        its files and this program's old web content, then the folders left empty."""
        if self.existing is not None:
            self._unlink_old_dicomdir(self.root / self.existing.dicomdir_name)
            self.old_removed = True
            _fsync(self.root)
        names = [p.name for p in self.removals] + ([self.old_manifest] if self.old_manifest
                                                   else [])
        _remove_files(self.root, names)

    def _write_all(self, new: list[plan.FileEntry], dicomdir: bytes, extra: Extra,
                   label: str, progress: ProgressFn | None, cancel: Event | None) -> int:
        journal = self.journal
        assert journal is not None
        files = [(comps, _parts(data), False) for comps, data in extra] + [
            (entry.file_id, segments(entry), True) for entry in new]
        total = self._copy_files(files, label, progress, cancel)
        self._commit()
        if self.options.sync:
            for folder in sorted(set(self.made_dirs), key=lambda p: -p.count("/")):
                _fsync(self.root / folder)
        self._publish_dicomdir(dicomdir)
        journal.remove()
        self.journal = None
        _fsync(self.root)
        return total + len(dicomdir)

    def _copy_files(self, files: list[tuple[tuple[str, ...], list, bool]], label: str,
                    progress: ProgressFn | None, cancel: Event | None) -> int:
        """Each file written under a temporary name and hashed as it is written, on
        hashcopy.THREADS threads; the records, renames and progress here, in file order.
        Whatever happens, no copy is still running when this returns or raises."""
        pool = hashcopy.Pool(sync=False, cancel=cancel)  # made durable by batch: _commit
        inflight: deque[tuple[str, str, bool, Future[hashcopy.Written]]] = deque()
        total, done, counted = 0, 0, sum(1 for *_c, c in files if c)
        try:
            for comps, parts, count in files:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled while writing the File-set")
                rel = self._temp_for(comps)
                future = pool.submit(parts, str(self.root / rel),
                                     lambda rel=rel: self.temps.append(rel))
                inflight.append((rel, "/".join(comps), count, future))
                while inflight and (len(inflight) > IN_FLIGHT or inflight[0][3].done()):
                    total, done = self._took(inflight.popleft(), total, done, cancel)
                    if progress and done:
                        progress(label, done, counted)
            while inflight:
                total, done = self._took(inflight.popleft(), total, done, cancel)
                if progress:
                    progress(label, done, counted)
        finally:
            pool.close()
        return total

    def _took(self, job: tuple[str, str, bool, Future[hashcopy.Written]], total: int,
              done: int, cancel: Event | None) -> tuple[int, int]:
        """A finished copy: its record goes into the journal (committed when due)."""
        rel, name, count, future = job
        try:
            written = future.result()
        except hashcopy.Stopped:
            written = None
        if cancel is not None and cancel.is_set():  # before any further record or rename
            raise Cancelled("cancelled while writing the File-set")
        if written is None:
            raise hashcopy.Stopped(rel)
        journal = self.journal
        assert journal is not None
        journal.pending.append((rel, name, written.size, written.sha256))
        if journal.due():
            self._commit()
        return total + written.size, done + count

    def _temp_for(self, comps: tuple[str, ...]) -> str:
        """A temporary name of this run in the file's folder (made where missing)."""
        journal = self.journal
        assert journal is not None
        folder = self._folder(comps[:-1])
        tmp = journal.temp_name(self.root / folder)
        return f"{folder}/{tmp}" if folder else tmp

    def _commit(self) -> None:
        """Record the pending files durably, then give each its name (never over another)."""
        journal = self.journal
        assert journal is not None
        if self.options.sync and journal.pending:
            _sync_data(self.root, [rel for rel, *_rest in journal.pending])
        pending = journal.flush()
        for rel, name, _size, _digest in pending:
            self.renaming = (rel, name)  # an interrupt may land right after the rename
            try:
                _rename_noreplace(self.root / rel, self.root / name)
            except FileExistsError as exc:
                self.renaming = None  # not renamed: the name is someone else's
                raise _error(f"{name} appeared on the medium while this run wrote it; it was "
                             "left alone and this run's files were removed", self.report,
                             6) from exc
            self.made_files.append(name)
            self.temps.remove(rel)
            self.renaming = None

    def _folder(self, parts: tuple[str, ...]) -> str:
        """The '/'-joined folder for a new file, made where missing (remembered once made);
        never through a link or over a file."""
        cur = ""
        for part in parts:
            cur = f"{cur}/{part}" if cur else part
            if cur in self.folders:
                continue
            path = self.root / cur
            try:
                os.mkdir(path)
                self.made_dirs.append(cur)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise _error(f"{cur} is on the medium and is not a folder; nothing is "
                                 "written through it", self.report, 6) from None
            self.folders.add(cur)
        return cur

    def _publish_dicomdir(self, dicomdir: bytes) -> None:
        journal = self.journal
        assert journal is not None
        tmp = journal.temp_name(self.root)
        self.temps.append(tmp)
        with open(self.root / tmp, "xb") as out:
            out.write(dicomdir)
            out.flush()
            if self.options.sync:
                os.fsync(out.fileno())
        self.publishing = dicomdir  # an interrupt may land right after the rename
        os.replace(self.root / tmp, self.root / "DICOMDIR")
        self.wrote_dicomdir = True
        self.temps.remove(tmp)
        self.publishing = None
        old = self.existing.dicomdir_name if self.existing is not None else "DICOMDIR"
        if old != "DICOMDIR" and self.mode == "append":  # 'dicomdir' on a folder: removed
            _fsync(self.root)  # after the new one is in place (both for a moment, never none)
            lower, upper = self.root / old, self.root / "DICOMDIR"
            if os.path.lexists(lower) and not os.path.samefile(lower, upper):  # (FAT: one)
                self._unlink_old_dicomdir(lower)
        _fsync(self.root)

    def _unlink_old_dicomdir(self, path: Path) -> None:
        """Remove the File-set's old DICOMDIR, only as it was read when this run planned
        (its records are in the new one); one changed since is left alone, and the run
        stops before anything of the old File-set is removed."""
        assert self.existing is not None
        try:
            same = path.read_bytes() == self.existing.dicomdir
        except OSError:
            same = False
        if not same:
            raise _error(f"{path.name} changed on the medium while this run wrote it; it was "
                         "left alone and this run's files were removed", self.report, 6)
        os.unlink(path)

    # -- checking ---------------------------------------------------------------------------

    def check(self, vol: plan.Volume, dicomdir: bytes, extra: Extra,
              progress: ProgressFn | None, cancel: Event | None) -> None:
        """Read the medium back (after options.reread) and check it with the core verify and
        against every source; on failure undo this run's writes."""
        from .verify import verify

        extra = self.extra if self.extra is not None else extra
        reread = self.options.reread
        try:
            if reread is not None:
                self.root = reread(self.root)
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
            confirm = getattr(reread, "confirm", None)
            if confirm is not None:
                new = [e for e in vol.entries() if e.action != "existing"]
                confirm(sum(e.out_size for e in new) + sum(_size(d) for _c, d in extra)
                        + len(dicomdir))
        except BaseException as exc:
            self._mark(exc)
            if not getattr(exc, "unmounted", False):  # else nothing is there to undo now
                self.undo()
            raise

    # -- undoing ----------------------------------------------------------------------------

    def _old_dicomdir_still_there(self) -> bool:
        """--append onto a 'dicomdir' of another case on a case-sensitive file system, the
        old one not removed yet: it stays, and the new DICOMDIR beside it goes."""
        if self.existing is None or self.existing.dicomdir_name == "DICOMDIR":
            return False
        lower, upper = self.root / self.existing.dicomdir_name, self.root / "DICOMDIR"
        try:
            return os.path.lexists(lower) and not os.path.samefile(lower, upper)
        except OSError:
            return False

    def _settle_interrupted_renames(self) -> None:
        """An interrupt between a rename and its bookkeeping: the file (or the DICOMDIR) is
        at its final name already, and is this run's to undo."""
        if self.renaming is not None:
            rel, name = self.renaming
            if not os.path.lexists(self.root / rel) and os.path.lexists(self.root / name):
                self.made_files.append(name)  # renamed (never over another: NOREPLACE)
            self.renaming = None
        if self.publishing is not None and not self.wrote_dicomdir:
            with contextlib.suppress(OSError):
                if (self.root / "DICOMDIR").read_bytes() == self.publishing:
                    self.wrote_dicomdir = True
            self.publishing = None

    def undo(self) -> None:
        """Best effort: remove what this run wrote and restore the earlier DICOMDIR. A pulled
        stick cannot be cleaned; its journal lets the next run do it."""
        try:
            self._settle_interrupted_renames()
            if self.wrote_dicomdir:
                if self._old_dicomdir_still_there():
                    (self.root / "DICOMDIR").unlink()  # ours: the old one kept its name
                elif self.existing is not None and self.mode == "append":
                    # a name of this run's journal: if the power goes now, the next run
                    # knows the copy as ours
                    tmp = self.root / (self.journal.temp_name(self.root) if self.journal
                                       is not None else f"{uuid.uuid4().hex[:8].upper()}.TMP")
                    with open(tmp, "xb") as out:
                        out.write(self.existing.dicomdir)
                    _fsync(tmp)
                    os.replace(tmp, self.root / "DICOMDIR")
                else:
                    (self.root / "DICOMDIR").unlink(missing_ok=True)
                self.wrote_dicomdir = False
                _fsync(self.root)
            _remove_files(self.root, [*self.temps, *self.made_files])
            self.temps, self.made_files = [], []
            if self.journal is not None:
                self.journal.remove()
                self.journal = None
            _remove_empty(self.root, self.made_dirs)
            _fsync(self.root)
        except OSError:
            pass
        finally:
            if self.journal is not None:  # left for the next run; never held open (a
                self.journal.close()  # descriptor on the medium keeps it mounted)


# -- the journal ----------------------------------------------------------------------------


class Journal:
    """This run's journal: what it will create and remove (fsynced before the first change),
    then a record (size, SHA-256) of every file written, durable before the file is renamed
    to its name. No patient data: File IDs carry no meaning (PS3.10), web content names are
    fixed."""

    def __init__(self, root: Path, fd: int, token: str, sync: bool):
        self.root, self.fd, self.token, self.sync = root, fd, token, sync
        self.counter = 0
        self.pending: list[tuple[str, str, int, str]] = []  # (temp, name, size, sha256)
        self.since = time.monotonic()

    @classmethod
    def create(cls, root: Path, planned: Iterable[tuple[str, ...]], removals: list[Proof], *,
               sync: bool = True) -> Journal:
        planned = list(planned)
        taken = _tokens_in_use(root, planned)
        for _try in range(1000):  # a name of the owner's already looks like ours: another
            token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(4))
            if token not in taken:
                break
        fd = os.open(root / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o644)
        journal = cls(root, fd, token, sync)
        lines = [JOURNAL_MAGIC, f"run {uuid.uuid4()}", f"temp {token}",
                 *(p.line("-") for p in removals), *(f"+ {'/'.join(c)}" for c in planned)]
        journal._append(lines)
        if sync:
            os.fsync(fd)
            _fsync(root)
        return journal

    def temp_name(self, folder: Path) -> str:
        """A name no file in folder has: the token and a counter (FAT 8.3)."""
        while True:
            n, digits = self.counter, []
            self.counter += 1
            for _ in range(4):
                n, d = divmod(n, len(_COUNTER_CHARS))
                digits.append(_COUNTER_CHARS[d])
            name = f"{self.token}{''.join(reversed(digits))}.TMP"
            if not os.path.lexists(folder / name):
                return name

    def due(self) -> bool:
        return len(self.pending) >= BATCH_FILES or \
            time.monotonic() - self.since >= BATCH_SECONDS

    def flush(self) -> list[tuple[str, str, int, str]]:
        """Append the pending records and make them durable; returns them."""
        pending, self.pending = self.pending, []
        self.since = time.monotonic()
        if pending:
            self._append([Proof(name, size, "sha256", digest).line("=")
                          for _tmp, name, size, digest in pending])
            if self.sync:
                os.fsync(self.fd)
        return pending

    def _append(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("ascii")
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        os.unlink(self.root / JOURNAL)


def _tokens_in_use(root: Path, planned: list[tuple[str, ...]]) -> set[str]:
    """Tokens of names like ours (``TTTTnnnn.TMP``) already in the folders this run writes
    to: the run takes another, so that the next run's cleanup (which removes this run's
    temporary names) can never take one of them for ours."""
    shape = re.compile(r"([A-Za-z]{4})[0-9A-Za-z]{4}\.TMP", re.IGNORECASE)
    folders = {root} | {root.joinpath(*c[:i]) for c in planned for i in range(1, len(c))}
    taken: set[str] = set()
    for folder in folders:
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if m := shape.fullmatch(name):
                    taken.add(m.group(1).upper())
    return taken


def _parse_journal(text: str) -> tuple[str, list[str], list[Proof]] | None:
    """(token, planned names, records and removals) of a journal of ours; None if not ours.
    A torn last line (the stick went while it was appended) proves nothing and is skipped."""
    lines = text.split("\n")
    if lines and lines[-1]:  # no newline at the end: the last line is torn
        lines.pop()
    if len(lines) < 3 or lines[0] != JOURNAL_MAGIC or not lines[2].startswith("temp "):
        return None
    token = lines[2][5:]
    if not re.fullmatch(r"[A-Z]{4}", token):
        return None
    planned: list[str] = []
    proofs: list[Proof] = []
    for line in lines[3:]:
        if line.startswith("+ ") and _plain_name(line[2:]):
            planned.append(line[2:])
        m = re.fullmatch(r"[-=] (\d+) (sha256:[0-9a-f]{64}|uid:[0-9.]{1,64}) (\S+)", line)
        if m and _plain_name(m.group(3)):
            kind, value = m.group(2).split(":")
            proofs.append(Proof(m.group(3), int(m.group(1)), kind, value))
    return token, planned, proofs


def _plain_name(name: str) -> bool:
    """A relative '/'-joined name below the root: no '..', no empty or absolute parts."""
    parts = name.split("/")
    return all(p and p not in (".", "..") for p in parts)


def interrupted(root: Path, referenced: set[str]) -> Leftovers:
    """What an interrupted in-place run left, through its journal: files under its temporary
    names, and files whose journal record (size and SHA-256, or size and SOP Instance UID for
    a --replace removal) they still match; never a file the DICOMDIR there now references.
    Files that only bear a name the journal lists are kept and reported."""
    index = _Index(root)
    name = index.get(JOURNAL, kind=None)
    if name is None:
        return Leftovers()
    path = root / name
    not_ours = Leftovers(blocked=f"{name} is on the medium but is not the journal of an "
                                 "interrupted copy of this program; nothing was written "
                                 "(remove it)")
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _JOURNAL_MAX:
            return not_ours
        parsed = _parse_journal(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        return not_ours
    if parsed is None:
        return not_ours
    token, planned, proofs = parsed
    refs = _upper(referenced)
    left = Leftovers(journal=name)
    done: set[str] = set()
    for proof in proofs:
        stored = index.get(proof.name)
        if stored is None or stored.upper() in refs or stored.upper() in done:
            continue
        done.add(stored.upper())
        if Proof(stored, proof.size, proof.kind, proof.value).holds(root):
            left.ours.append(stored)
        else:
            left.kept.append((stored, "an interrupted copy of this program listed it, but it "
                                      "is not what that copy wrote: left alone"))
    folders = {""} | {n.rsplit("/", 1)[0].upper() for n in planned if "/" in n}
    pattern = re.compile(rf"{token}[0-9A-Z]{{4}}\.TMP", re.IGNORECASE)
    for stored, kind in index.entries.values():  # this run's temporary names, where it wrote
        folder, _, base = stored.rpartition("/")
        if kind == "file" and folder.upper() in folders and pattern.fullmatch(base):
            left.ours.append(stored)
    for planned_name in planned:
        stored = index.get(planned_name)
        if stored is not None and stored.upper() not in refs and stored.upper() not in done:
            done.add(stored.upper())
            left.kept.append((stored, "an interrupted copy of this program meant to write it "
                                      "but had not: left alone (it may be yours)"))
    return left


# -- the web content's manifest -------------------------------------------------------------


def is_web_name(name: str) -> bool:
    """A name of this program's web content (IHE PDI layout): README.TXT, INDEX.HTM, or below
    IHE_PDI/ or VIEWER/."""
    parts = name.upper().split("/")
    return (len(parts) == 1 and parts[0] in WEB_ROOT_FILES) or (
        len(parts) > 1 and parts[0] in WEB_FOLDERS)


def with_manifest(extra: Extra) -> Extra:
    """The web content and its manifest (none without web content)."""
    if not extra:
        return extra
    lines = [MANIFEST_MAGIC]
    for comps, data in extra:
        with _reader(data) as src:
            digest = hashlib.file_digest(src, "sha256").hexdigest()
        lines.append(f"{digest}  {'/'.join(comps)}")
    return [*extra, ((MANIFEST,), ("\n".join(lines) + "\n").encode("ascii"))]


def our_web(root: Path) -> OldWeb:
    """This program's web content on the medium: the files its manifest lists (in the web
    layout only) that are still as written. Changed files are kept and reported."""
    found = OldWeb()
    index = _Index(root)
    name = index.get(MANIFEST)
    if name is None:
        return found
    try:
        if os.lstat(root / name).st_size > _JOURNAL_MAX:
            return found
        lines = (root / name).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return found
    if not lines or lines[0] != MANIFEST_MAGIC:
        return found  # not ours: never removed
    found.manifest = name
    for line in lines[1:]:
        m = re.fullmatch(r"([0-9a-f]{64})  (\S+)", line)
        if not m or not _plain_name(m.group(2)) or not is_web_name(m.group(2)):
            continue
        stored = index.get(m.group(2))
        if stored is None:
            continue
        proof = Proof(stored, _lsize(root / stored), "sha256", m.group(1))
        if proof.holds(root):
            found.files.append(proof)
        else:
            found.kept.append((stored, "web content of the earlier copy, changed since it was "
                                       "written: left alone"))
    return found


# -- helpers --------------------------------------------------------------------------------


def _upper(names: Iterable[str]) -> set[str]:
    return {n.upper() for n in names}


def _size(data: bytes | Path | Range) -> int:
    if isinstance(data, Range):
        return data.length
    return len(data) if isinstance(data, bytes) else os.path.getsize(data)


def _parts(data: bytes | Path | Range) -> list[Segment]:
    """The web content as segments: bytes, a file, or a range of a spooled file."""
    if isinstance(data, Path):
        data = Range(str(data), 0, os.path.getsize(data))
    return [data]


def _reader(data: bytes | Path | Range) -> SegmentReader:
    """The web content as a stream: bytes, a file, or a range of a spooled file."""
    return SegmentReader(_parts(data))


def _lsize(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _sync_data(root: Path, names: list[str]) -> None:
    """Make these files' data durable before their records are: one syncfs(2) of the
    medium's file system for the whole batch (one write-back and, on a journalling file
    system, one commit, instead of one per file), else an fdatasync of each."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syscalls.syncfs(fd):
            return
    finally:
        os.close(fd)
    for name in names:
        fd = os.open(root / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that never replaces dst (renameat2 RENAME_NOREPLACE). File systems without
    the flag (older FUSE ones: EINVAL) get a check first; the medium is mounted for this run
    alone, so nothing else creates a name there meanwhile."""
    call = getattr(_libc, "renameat2", None)
    if call is not None:
        if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _new_folders(files: list[tuple[tuple[str, ...], int]], root: Path) -> dict[str, int]:
    """Folders the files need that are not there yet, with their number of entries."""
    counts: dict[str, int] = {}
    for comps, _ in files:
        for depth in range(1, len(comps)):
            folder = "/".join(comps[:depth])
            counts[folder] = counts.get(folder, 0) + (depth == len(comps) - 1)
    return {f: n for f, n in counts.items() if not (root / f).is_dir()}


def _entries(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry below root: '/'-joined upper-case name (FAT compares names so) -> (the
    stored name, its kind: "dir", "file", "link", "other" or "unlisted" for a folder that
    cannot be read); links are not followed."""
    found: dict[str, tuple[str, str]] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        try:
            with os.scandir(root / rel if rel else root) as it:
                listed = sorted(it, key=lambda e: e.name)
        except OSError:
            if rel:
                found[rel.upper()] = (rel, "unlisted")
            continue
        for entry in listed:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_symlink():
                kind = "link"
            elif entry.is_dir(follow_symlinks=False):
                kind = "dir"
                todo.append(name)
            elif entry.is_file(follow_symlinks=False):
                kind = "file"
            else:
                kind = "other"
            found.setdefault(name.upper(), (name, kind))
    return found


class _Index:
    """Names on the medium, looked up ignoring case (FAT), read once."""

    def __init__(self, root: Path):
        self.entries = _entries(root) if root.is_dir() else {}

    def get(self, name: str, kind: str | None = "file") -> str | None:
        """The stored name of a '/'-joined path of that kind (None: any kind)."""
        found = self.entries.get(name.upper())
        if found is None or (kind is not None and found[1] != kind):
            return None
        return found[0]


def foreign_dicom(root: Path, known: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """DICOM files (128-byte preamble + 'DICM') in root that are not in known, and the
    entries that were not read: only regular files are opened (never a FIFO, which would
    block, a device, or a link, which may lead out of the medium)."""
    known_upper = _upper(known)
    found: list[str] = []
    odd: list[tuple[str, str]] = []
    why = {"link": "a symbolic link: not followed, not read",
           "other": "not a regular file (a FIFO, device or socket): not read",
           "unlisted": "a folder that cannot be read: what it holds was not checked"}
    for upper, (name, kind) in _entries(root).items():
        if kind in why:
            odd.append((name, why[kind]))
        elif kind == "file" and upper not in known_upper and _is_dicom(root / name):
            found.append(name)
    return sorted(found), sorted(odd)


def _is_dicom(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.pread(fd, part10.PREAMBLE_LEN + 4, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return head[part10.PREAMBLE_LEN:] == part10.MAGIC


def _remove_files(root: Path, names: Iterable[str]) -> None:
    """Unlink these regular files (never a link's target, never a folder), then the folders
    that held them if they are empty now."""
    folders: set[str] = set()
    for name in names:
        path = root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            path.unlink()
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    _remove_empty(root, folders)


def _remove_empty(root: Path, folders: Iterable[str]) -> None:
    for folder in sorted(set(folders), key=lambda p: -p.count("/")):
        with contextlib.suppress(OSError):  # only if empty: others' files keep their folder
            os.rmdir(root / folder)
    _fsync(root)


def compare(vol: plan.Volume, dicomdir: bytes, extra: Extra, root: Path,
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
        with _reader(data) as src:
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
