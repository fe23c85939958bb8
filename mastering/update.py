"""An existing File-set, read for a File-set Updater (PS3.10 8.3, 8.6; shared/spec fileset.md 6).

An updater adds files and rewrites the DICOMDIR but never changes an existing DICOM file. To
add instances to a File-set the planner needs what is there: its File-set UID (kept for ever,
PS3.10 8.1) and ID, the File ID of every referenced file, and each instance as intake sees it,
so the new DICOMDIR is built by the one DICOMDIR encoder from the files themselves, under the
current profile's key rules. The DICOMDIR is read through :mod:`mastering.reader` (its record
offsets, not the sequence order) and the referenced files through :mod:`mastering.intake`
(headers only).

What cannot be carried over refuses the update: broken offsets, referenced files that are
missing or invalid, one SOP Instance UID in two files, two records referencing one file, a
file whose SOP Instance UID is not the one its record names, records this program does not
write (PRIVATE, or leaf records without a file).

``--replace`` removes the referenced files only when each one is provably the DICOM instance
its record describes (:func:`removable`): a regular file, Part 10 (preamble, 'DICM', file
meta information) and with the record's Referenced SOP Instance UID in File (0004,1511) as its
Media Storage SOP Instance UID. A record that points at anything else (the owner's photo, a
link) refuses the replacement before anything is removed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

from . import intake, part10, reader, records
from .intake import Instance
from .profiles import Profile

ProgressFn = Callable[[str, int, int], None]
REF_UID = 0x00041511  # Referenced SOP Instance UID in File


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
    #: stored name -> the Referenced SOP Instance UID in File of every record naming it
    uids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def by_uid(self) -> dict[str, Instance]:
        return {i.sop_instance_uid: i for i in self.instances}


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
    uids: dict[str, list[str]] = {}
    missing: list[str] = []
    for node, _ancestors in tree.walk():
        if not node.in_use or node.file_id is None:
            continue
        stored = medium.resolve("/".join(node.file_id))
        if stored is None:
            missing.append("/".join(node.file_id))
        else:
            files[stored] = node.file_id
            uids.setdefault(stored, []).append(records.text_value(node.record, REF_UID))
    problems = _problems(tree, uid, missing)
    doubled = [n for n, refs in uids.items() if len(refs) > 1]
    if doubled:
        problems.append(f"{len(uids[doubled[0]])} records of the DICOMDIR reference one file, "
                        f"{doubled[0]}; appending would keep only one of them")
    found = Existing(root, uid, records.text_value(ds, 0x00041130), name,
                     (root / name).read_bytes(), files, problems, uids=uids)
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
        name = Path(inst.path).relative_to(found.root).as_posix()
        named = found.uids.get(name, [])
        if named and inst.sop_instance_uid not in named:
            raise UpdateRefused(f"the existing File-set cannot be added to: {name} holds SOP "
                                f"Instance UID {inst.sop_instance_uid} but its DICOMDIR record "
                                f"names {named[0]}")
        inst.on_medium = found.files[name]
    found.instances = result.instances


def removable(found: Existing) -> list[tuple[str, int, str]]:
    """(stored name, size, SOP Instance UID) of every referenced file, each proven to be the
    DICOM instance its records name; raise UpdateRefused naming the first that is not."""
    out = []
    for name in found.files:
        path = found.root / name
        named = set(found.uids.get(name, []))
        why = ""
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                why = "is not a regular file (a link, or a special file)"
            elif len(named) != 1 or "" in named:
                why = ("is referenced by records naming different SOP Instance UIDs" if
                       len(named) > 1 else "is referenced by a record naming no SOP Instance UID")
            else:
                layout = part10.inspect(path)
                if not layout.has_preamble or not layout.has_meta:
                    why = "is not a DICOM Part 10 file"
                elif layout.meta_sop_instance_uid != next(iter(named)):
                    why = (f"holds SOP Instance UID {layout.meta_sop_instance_uid or '(none)'}, "
                           f"not {next(iter(named))} as its record says")
        except (part10.NotDicomError, part10.StructureError):
            why = "is not a DICOM Part 10 file"
        except OSError as exc:
            why = f"cannot be read: {exc.strerror or exc}"
        if why:
            raise UpdateRefused(f"the DICOMDIR references {name}, which {why}: it is not "
                                "removed, and the File-set is not replaced")
        out.append((name, st.st_size, next(iter(named))))
    return out


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
