"""An existing File-set, read for a File-set Updater (PS3.10 8.3, 8.6; shared/spec fileset.md 6).

An updater adds files and rewrites the DICOMDIR but never changes an existing DICOM file. To
add instances to a File-set the planner needs what is there: its File-set UID (kept for ever,
PS3.10 8.1) and ID, the File ID of every referenced file, and each instance as intake sees it,
so the new DICOMDIR is built by the one DICOMDIR encoder from the files themselves, under the
current profile's key rules. The DICOMDIR is read through :mod:`mastering.reader` (its record
offsets, not the sequence order) and the referenced files through :mod:`mastering.intake`
(headers only).

What cannot be carried over refuses the update: broken offsets, referenced files that are
missing or invalid, one SOP Instance UID in two files, records this program does not write
(PRIVATE, or leaf records without a file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

from . import intake, reader, records
from .intake import Instance
from .profiles import Profile

ProgressFn = Callable[[str, int, int], None]


class UpdateRefused(ValueError):
    """The existing File-set cannot be updated; nothing was changed."""


@dataclass
class Existing:
    """The File-set found in a folder (a mounted stick's root)."""

    root: Path
    fileset_uid: str
    fileset_id: str
    dicomdir_name: str  # as stored (FAT may show it in another case)
    dicomdir: bytes  # the old DICOMDIR, to restore if an update fails its check
    files: dict[str, tuple[str, ...]]  # stored name ('/'-joined) -> File ID in the DICOMDIR
    problems: list[str] = field(default_factory=list)  # why it cannot be appended to
    instances: list[Instance] = field(default_factory=list)  # filled by scan()
    patients: int = 0
    studies: int = 0

    @property
    def by_uid(self) -> dict[str, Instance]:
        return {i.sop_instance_uid: i for i in self.instances}

    def allocated(self, unit: int) -> int:
        """Bytes the referenced files and the DICOMDIR take (freed by --replace)."""
        from .fat import allocated

        sizes = [os.path.getsize(self.root / n) for n in (*self.files, self.dicomdir_name)]
        return sum(allocated(s, unit) for s in sizes)


def stored_names(root: Path) -> set[str]:
    """Every file and folder below root, '/'-joined relative paths in upper case."""
    names: set[str] = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        for name in (*dirs, *files):
            names.add((rel / name).as_posix().upper())
    return names


def find(root: Path) -> Existing | None:
    """The File-set whose DICOMDIR is in root; None if there is none. Reads the DICOMDIR only."""
    medium = reader.FolderMedium(root)
    name = medium.resolve(reader.DICOMDIR)
    if name is None:
        return None
    try:
        ds = reader.read_dicomdir(medium)
        tree = reader.build_tree(ds)
    except reader.MediaError as exc:
        raise UpdateRefused(f"the existing DICOMDIR cannot be read: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("MediaStorageSOPInstanceUID", "")) if meta else ""
    files: dict[str, tuple[str, ...]] = {}
    missing: list[str] = []
    for node, _ancestors in tree.walk():
        if not node.in_use or node.file_id is None:
            continue
        stored = medium.resolve("/".join(node.file_id))
        if stored is None:
            missing.append("/".join(node.file_id))
        else:
            files[stored] = node.file_id
    found = Existing(root, uid, records.text_value(ds, 0x00041130), name,
                     (root / name).read_bytes(), files, _problems(tree, uid, missing))
    found.patients = sum(1 for n in tree.roots if n.in_use and n.rtype == "PATIENT")
    found.studies = sum(1 for n, _a in tree.walk() if n.in_use and n.rtype == "STUDY")
    return found


def _problems(tree: reader.RecordTree, uid: str, missing: list[str]) -> list[str]:
    """Why this File-set cannot be appended to (it can still be replaced)."""
    out = [p.message for p in tree.problems]
    if not uid:
        out.append("the DICOMDIR has no File-set UID (0002,0003)")
    if missing:
        out.append(f"{len(missing)} file(s) the DICOMDIR lists are not there, e.g. {missing[0]}")
    for node, _ancestors in tree.walk():
        if not node.in_use:
            continue
        if node.rtype == "PRIVATE" or (node.file_id is None and node.rtype not in records.LEVELS):
            out.append(f"the DICOMDIR has a {node.rtype} record (at byte {node.offset}) that "
                       "this program cannot carry over")
            break
    return out


def scan(found: Existing, profile: Profile, *, workers: int | None = None,
         progress: ProgressFn | None = None, cancel: Event | None = None) -> None:
    """Read the header of every referenced file into found.instances (for --append)."""
    if found.problems:
        raise UpdateRefused(f"the existing File-set cannot be added to: {found.problems[0]}")
    paths = [found.root / n for n in found.files]
    result = intake.scan(paths, profile, progress=progress, cancel=cancel, workers=workers)
    bad = result.invalid + result.ignored
    if bad:
        raise UpdateRefused(f"the existing File-set cannot be added to: {bad[0].path}: "
                            f"{bad[0].reason}")
    doubled = [i for i in result.instances if i.duplicates]
    if doubled:
        raise UpdateRefused(f"the existing File-set holds SOP Instance UID "
                            f"{doubled[0].sop_instance_uid} in two files")
    for inst in result.instances:
        inst.on_medium = found.files[Path(inst.path).relative_to(found.root).as_posix()]
    found.instances = result.instances


def join(found: Existing, new: list[Instance]) -> tuple[list[Instance], list[dict], list[dict]]:
    """The existing instances (first, so they win every conflict the planner finds) and the
    new ones that are not there yet. Returns (instances, already there, conflicts): an
    instance already on the medium (the same object, in any encoding) is not written again;
    another object with an existing SOP Instance UID is a conflict (PS3.10: UIDs are unique)."""
    there = found.by_uid
    keep, same, conflicts = list(found.instances), [], []
    for inst in new:
        old = there.get(inst.sop_instance_uid)
        if old is None:
            keep.append(inst)
        elif intake.same_object(old.path, inst.path):
            same.append({"kept": old.path, "merged": inst.path})
        else:
            conflicts.append({"path": inst.path, "kind": "conflict",
                              "reason": f"SOP Instance UID {inst.sop_instance_uid} is already "
                                        f"on the medium as a different object ({old.path})"})
    return keep, same, conflicts
