"""Check a medium against an application profile, whoever wrote it (our writer, dcmmkdir, pydicom).

The checks follow the rules in ``shared/spec`` (PS3.10 ch. 8, PS3.3 Annex F, PS3.11, PS3.12);
each problem becomes a :class:`Violation` with one of these codes:

==================== ====================================================================
code                 rule
==================== ====================================================================
medium               the path is not a folder, DICOMDIR or ISO 9660 image
dicomdir             exactly one DICOMDIR, in the root, Part 10, SOP Class 1.2.840.10008.1.3.10,
                     File-set UID present, File-set Consistency Flag 0000H (PS3.10 8.6, F.3-2)
dicomdir-ts          the DICOMDIR is Explicit VR Little Endian (PS3.10 8.6, PS3.11 D/H/M)
fileset-id           (0004,1130) present, 0-16 characters of A-Z 0-9 _ (PS3.10 8.5, F.3-2)
volume-id            ISO PVD Volume Identifier = File-set ID on CD/DVD (PS3.12 F.1.1)
offset               every offset hits a record's Item tag, no cycles, every record reachable,
                     (0004,1202) names the last root record (PS3.3 F.3-3)
hierarchy            root -> PATIENT -> STUDY -> SERIES -> leaf, records present (F.4-1, PS3.11)
record-key           Type 1 keys non-empty, Type 2 keys present, profile 1C keys copied when the
                     instance has them, 0004,15xx present on references (F.3-3, F.5, PS3.11)
record-value         every value in a record is valid for its VR and multiplicity, nested ones
                     too (PS3.5 Table 6.2-1, PS3.6)
duplicate-key        Patient ID and Series Instance UID unique per File-set (F.5.3, PS3.11)
file-id              File ID components A-Z 0-9 _, 1-8 characters, at most 8 (PS3.10 8.2) and
                     at most the profile's components; stored name matches on ISO media
missing-file         every Referenced File ID exists on the medium (PS3.10 8.6)
duplicate-reference  no file is referenced by two records (F.3-3, 0004,1500)
sop-mismatch         the file's SOP Class/Instance/Transfer Syntax equal 0004,1510/1511/1512
record-type          the record type fits the file's SOP class (F.4, PS3.4 B.5)
record-mismatch      Patient ID, Study and Series Instance UID of the PATIENT/STUDY/SERIES
                     records equal those of the files below them (F.5: keys are copies)
transfer-syntax      the file's transfer syntax is allowed by the profile (PS3.11 tables) and
                     is the one its body really uses
part10               the referenced file has a preamble, 'DICM' and a meta group (PS3.10 7.1)
corrupt              the referenced file is structurally sound (no truncation; PS3.5 7)
orphan               every DICOM file on the medium is referenced (PS3.11 D.3.3, H.3.3)
level1               ISO 9660 Level 1 names when the profile asks for it (PS3.12 F.1.2.1, F.2.2)
depth                at most 8 ISO 9660 directory levels, root included (PS3.12 F.1.2.1)
capacity             the image (or folder) fits the profile's capacity (PS3.12 F.2.1)
unsafe-file          a folder medium holds only files and folders: no symbolic link out of
                     it, no FIFO or device (none of them is read) (PS3.10 8.1, PS3.12 R)
==================== ====================================================================

Only headers are read: files are walked by :mod:`mastering.part10` (memory-mapped) and parsed by
pydicom up to the pixel data. Messages name records by their byte offset in the DICOMDIR and never
quote patient names or IDs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from . import part10, records
from .profiles import Profile
from .reader import (
    DICOMDIR,
    IN_USE,
    LOWER,
    NEXT,
    RECORD_TYPE,
    MediaError,
    Medium,
    RecordTree,
    TreeNode,
    build_tree,
    dicomdir_name,
    hierarchy,
    name_key,
    open_medium,
    read_dicomdir_checked,
    uint,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
FILESET_ID, CONSISTENCY_FLAG, PRIVATE_RECORD_UID = 0x00041130, 0x00041212, 0x00041432
REF_SOP_CLASS, REF_SOP_INSTANCE, REF_TS = 0x00041510, 0x00041511, 0x00041512
VERIFICATION_DATETIME = 0x0040A030
#: the key that identifies each upper-level record; it must match every file below it
IDENTITY = {"PATIENT": 0x00100020, "STUDY": 0x0020000D, "SERIES": 0x0020000E}
FILESET_ID_RE = re.compile(r"[A-Z0-9_]{0,16}")
LEVEL1_FILE_RE = re.compile(r"(?=[^.;]|\.[^;])[A-Z0-9_]{0,8}\.[A-Z0-9_]{0,3};1")
LEVEL1_DIR_RE = re.compile(r"[A-Z0-9_]{1,8}")
DICOM_MAX_COMPONENTS = 8  # PS3.10 8.2
ISO_MAX_LEVELS = 8  # PS3.12 F.1.2.1, root = level 1
NOTE_LIST = 10  # file names quoted in a note
MEDIUM = "(medium)"  # Violation.path of rules about the whole medium


@dataclass(frozen=True)
class Violation:
    """One broken rule: a code from the module table, where (file or DICOMDIR@offset), why."""

    code: str
    path: str
    message: str


@dataclass
class VerifyResult:
    """Everything :func:`verify` found. Notes are observations that break no rule."""

    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    records: int = 0
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations and not self.cancelled

    @property
    def codes(self) -> set[str]:
        return {v.code for v in self.violations}

    def add(self, code: str, path: str, message: str) -> None:
        self.violations.append(Violation(code, path, message))


def verify(
    path: Path,
    profile: Profile,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> VerifyResult:
    """Check the medium at path (ISO image, folder or DICOMDIR) against profile.

    progress(done, total) is called after each file; setting cancel stops the run early with
    ``cancelled`` set (the result is then never ``ok``).
    """
    result = VerifyResult()
    try:
        medium = open_medium(Path(path))
    except MediaError as exc:
        result.add("medium", str(path), str(exc))
        return result
    with medium:
        _Run(medium, profile, result, progress, cancel).run()
    log.debug("verified %s: %d violations", path, len(result.violations))
    return result


def _record_path(node: TreeNode | int) -> str:
    offset = node.offset if isinstance(node, TreeNode) else node
    return f"{DICOMDIR}@{offset}"


def _filled(ds: Dataset, tag: int) -> bool:
    """The element is present with a non-empty value (values converted by pydicom)."""
    if tag not in ds:
        return False
    try:
        return not ds[tag].is_empty
    except Exception:  # an unconvertible value is still a value
        return True




class _Run:
    """One verification: the medium, the profile, and the result being filled."""

    def __init__(self, medium: Medium, profile: Profile, result: VerifyResult,
                 progress: Progress | None, cancel: threading.Event | None) -> None:
        self.medium, self.profile, self.result = medium, profile, result
        self.progress, self.cancel = progress, cancel
        self.done = self.total = 0
        self.case_only: list[str] = []
        self.reported: set[tuple[int, int]] = set()  # (record offset, tag) already reported

    def add(self, code: str, path: str, message: str) -> None:
        self.result.add(code, path, message)

    def note(self, text: str) -> None:
        self.result.notes.append(text)

    def run(self) -> None:
        self.check_medium()
        ds = self.check_dicomdir()
        if ds is None:
            return
        try:
            tree = build_tree(ds)
        except MediaError as exc:
            self.add("dicomdir", DICOMDIR, str(exc))
            return
        self.result.records = len(tree.by_offset)
        self.check_links(tree)
        self.check_hierarchy(tree)
        self.check_keys(tree)
        referenced = self.check_references(tree)
        if referenced is not None:
            self.check_orphans(referenced)

    def step(self) -> bool:
        """Count one file; False (and the result marked cancelled) once cancel is set."""
        if self.cancel is not None and self.cancel.is_set():
            if not self.result.cancelled:
                self.result.cancelled = True
                self.note(f"verification cancelled after {self.done} of {self.total} files")
            return False
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return True

    # -- 6. the medium: ISO 9660 names, depth, capacity (PS3.12 Annex F/P) -------------------

    def check_medium(self) -> None:
        for fault in self.medium.damage():
            self.add("medium", MEDIUM, fault)
        if self.medium.kind == "iso":
            if self.profile.interchange_level == 1:
                self.check_level1()
            self.check_depth()
            extensions = self.medium.extensions()
            if extensions:
                self.note(f"ISO image also carries {', '.join(extensions)}; File IDs were read "
                          "from the ISO 9660 names (PS3.12 F.1.2.1)")
            if self.profile.filesystem == "fat":
                self.note(f"profile {self.profile.id} is for FAT media, the medium is an ISO image")
        self.check_capacity()
        self.medium.files()
        for name, why in getattr(self.medium, "unsafe", ()):
            self.add("unsafe-file", name, why)

    def check_level1(self) -> None:
        """ISO 9660 Level 1: d-characters, 8.3 file names with version 1, 8-char directories."""
        for raw in self.medium.iso_names():
            leaf = raw.rsplit("/", 1)[-1]
            is_file = ";" in leaf
            regex = LEVEL1_FILE_RE if is_file else LEVEL1_DIR_RE
            if not regex.fullmatch(leaf):
                kind = "file name" if is_file else "directory name"
                self.add("level1", raw, f"{kind} {leaf!r} is not ISO 9660 Level 1 "
                                        "(A-Z 0-9 _, 8.3, ';1'; PS3.12 F.1.2.1)")

    def check_depth(self) -> None:
        for raw in self.medium.iso_names():
            parts = raw.strip("/").split("/")
            if ";" in parts[-1]:
                continue  # files: their directory is checked
            levels = len(parts) + 1
            if levels > ISO_MAX_LEVELS:
                self.add("depth", raw, f"directory at level {levels} (root = 1); ISO 9660 "
                                       f"allows {ISO_MAX_LEVELS} (PS3.12 F.1.2.1)")

    def check_capacity(self) -> None:
        limit = self.profile.capacity_bytes
        used = self.medium.image_size()
        if limit and used > limit:
            what = "image" if self.medium.kind == "iso" else "files"
            self.add("capacity", MEDIUM, f"{what} take {used} bytes; {self.profile.id} media hold "
                                     f"{limit} bytes (PS3.12)")

    # -- 1. the DICOMDIR itself (PS3.10 8.6, PS3.3 F.3) --------------------------------------

    def check_dicomdir(self) -> Dataset | None:
        if not self.check_dicomdir_count():
            return None
        name = dicomdir_name(self.medium)
        if not self.check_dicomdir_layout(name):
            return None
        try:
            ds, repaired = read_dicomdir_checked(self.medium)
        except MediaError as exc:
            self.add("dicomdir", name, str(exc))
            return None
        for fault in repaired:
            self.add("dicomdir", name, fault)
        self.check_dicomdir_meta(name, ds)
        self.check_fileset_id(name, ds)
        flag = uint(ds, CONSISTENCY_FLAG)
        if flag != 0:
            shown = "absent" if flag is None else f"{flag:04X}H"
            self.add("dicomdir", name, f"File-set Consistency Flag (0004,1212) is {shown}, "
                                       "must be 0000H (PS3.3 F.3-3)")
        return ds

    def check_dicomdir_count(self) -> bool:
        """Exactly one DICOMDIR, in the root: one File-set per medium (PS3.12 F.1.1, R.1)."""
        found = [n for n in self.medium.files() if name_key(n.rsplit("/", 1)[-1]) == DICOMDIR]
        in_root = [n for n in found if "/" not in n]
        for other in found:
            if "/" in other:
                self.add("dicomdir", other, "DICOMDIR outside the root: a second File-set "
                                            "(one File-set per medium, PS3.12)")
        if not in_root:
            self.add("dicomdir", DICOMDIR, "no DICOMDIR in the root directory (PS3.10 8.6)")
            return False
        if len(in_root) > 1:
            self.add("dicomdir", DICOMDIR, f"{len(in_root)} DICOMDIR files in the root")
        return True

    def check_dicomdir_layout(self, name: str) -> bool:
        """Part 10 file in Explicit VR Little Endian (PS3.10 7.1, 8.6)."""
        self.result.files_checked += 1
        try:
            layout = self.medium.inspect(name)
        except part10.NotDicomError as exc:
            self.add("dicomdir", name, f"not a DICOM file: {exc}")
            return False
        except part10.StructureError as exc:
            self.add("dicomdir", name, f"structurally broken: {exc}")
            return True
        except OSError as exc:
            self.add("dicomdir", name, f"cannot be read: {exc}")
            return False
        if not layout.has_preamble or not layout.has_meta:
            self.add("dicomdir", name, "not a Part 10 file (preamble, 'DICM' and meta group)")
        self.check_group_length(name, layout)
        if layout.meta_ts != part10.EXPLICIT_LE or layout.body_disagrees:
            self.add("dicomdir-ts", name, f"transfer syntax {layout.meta_ts or 'none'} (body "
                                          f"{layout.body_ts}); a DICOMDIR is always Explicit VR "
                                          "Little Endian (PS3.10 8.6)")
        return True

    def check_dicomdir_meta(self, name: str, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None) or Dataset()
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        if sop_class != MEDIA_STORAGE_DIRECTORY:
            self.add("dicomdir", name, f"meta SOP Class is {sop_class or 'absent'}, not "
                                       f"{MEDIA_STORAGE_DIRECTORY} (PS3.10 8.6)")
        if not str(meta.get("MediaStorageSOPInstanceUID", "")):
            self.add("dicomdir", name, "no File-set UID (0002,0003) in the meta (PS3.10 8.1)")

    def check_fileset_id(self, name: str, ds: Dataset) -> None:
        """File-set ID: Type 2, 0-16 of A-Z 0-9 _; on CD/DVD also the Volume Identifier."""
        if FILESET_ID not in ds:
            self.add("fileset-id", name, "File-set ID (0004,1130) is absent (Type 2, F.3-2)")
        fsid = records.text_value(ds, FILESET_ID)
        if not FILESET_ID_RE.fullmatch(fsid):
            self.add("fileset-id", name, f"File-set ID {fsid!r} is not 0-16 characters of "
                                         "A-Z 0-9 _ (PS3.10 8.5)")
        volume = self.medium.volume_id()
        if volume is None or volume == fsid:
            return
        if self.profile.media_kind in ("cd", "dvd"):
            self.add("volume-id", MEDIUM, f"ISO Volume Identifier {volume!r} differs from the "
                                      f"File-set ID {fsid!r} (PS3.12 F.1.1)")
        else:
            self.note(f"ISO Volume Identifier {volume!r} differs from the File-set ID {fsid!r}")

    # -- 2. offsets and hierarchy (PS3.3 F.3-3, F.4) ----------------------------------------

    def check_links(self, tree: RecordTree) -> None:
        for problem in tree.problems:
            self.add("offset", _record_path(problem.offset), problem.message)

    def check_hierarchy(self, tree: RecordTree) -> None:
        if not tree.roots:
            self.add("hierarchy", DICOMDIR, "the DICOMDIR has no records; the profiles need "
                                            "PATIENT, STUDY, SERIES and leaf records (PS3.11)")
        allowed = hierarchy()
        inactive = empty = 0
        for node, ancestors in tree.walk():
            if not node.in_use:
                inactive += 1
                continue
            parent = ancestors[-1].rtype if ancestors else ""
            if node.rtype not in allowed:
                self.add("hierarchy", _record_path(node),
                         f"unknown or retired record type {node.rtype!r} (PS3.3 F.4)")
            elif node.rtype not in allowed.get(parent, frozenset()):
                where = f"under a {parent} record" if parent else "at the root"
                self.add("hierarchy", _record_path(node),
                         f"{node.rtype} record {where} (PS3.3 Table F.4-1)")
            if node.rtype in records.LEVELS and not any(c.in_use for c in node.children):
                empty += 1
        if inactive:
            self.note(f"{inactive} inactive record(s) (Record In-use Flag 0000H) were ignored")
        if empty:
            self.note(f"{empty} PATIENT/STUDY/SERIES record(s) have no lower-level records")

    # -- 3. record keys (PS3.3 F.5, PS3.11 extra keys) --------------------------------------

    def check_keys(self, tree: RecordTree) -> None:
        unique: dict[tuple[str, str], int] = {}
        for node, _ in tree.walk():
            if not node.in_use:
                continue
            self.check_record_keys(node)
            key = {"PATIENT": "PatientID", "SERIES": "SeriesInstanceUID"}.get(node.rtype)
            value = node.text(key) if key else ""
            if not value:
                continue
            first = unique.setdefault((node.rtype, value), node.offset)
            if first != node.offset:
                self.add("duplicate-key", _record_path(node),
                         f"{key} of this {node.rtype} record repeats the record at byte {first} "
                         "(unique per File-set, PS3.11)")

    def check_record_keys(self, node: TreeNode) -> None:
        record = node.record
        for tag in (NEXT, IN_USE, LOWER, RECORD_TYPE):
            if tag not in record:
                self.add("record-key", _record_path(node), f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
                                                           " is missing (Type 1, F.3-3)")
        if node.rtype == "PRIVATE" and not _filled(record, PRIVATE_RECORD_UID):
            self.add("record-key", _record_path(node), "PRIVATE record without (0004,1432)")
        self.check_record_values(node)
        spec = records.key_spec(node.rtype, self.profile)
        for tag in spec.of("1"):
            if not _filled(record, tag):
                self.add("record-key", _record_path(node),
                         f"{node.rtype} Type 1 key {_name(tag)} is missing or empty "
                         "(PS3.3 F.5, profile keys)")
        for tag in spec.of("2"):
            if tag not in record:
                self.add("record-key", _record_path(node),
                         f"{node.rtype} Type 2 key {_name(tag)} is absent (PS3.3 F.5)")
        if node.rtype == "SR DOCUMENT" and node.text("VerificationFlag") == "VERIFIED" \
                and not _filled(record, VERIFICATION_DATETIME):
            self.add("record-key", _record_path(node), "SR DOCUMENT record says VERIFIED "
                                                       "without Verification DateTime (1C, "
                                                       "PS3.3 F.5.24)")

    def check_record_values(self, node: TreeNode) -> None:
        """Every element of the record, as stored, valid for its VR (PS3.5 Table 6.2-1)."""
        record = node.record
        charsets = records.dataset_charsets(record)
        for tag in record.keys():  # noqa: SIM118 - keys only: values stay raw
            try:
                element = records.encode_element(record, tag)
            except Exception as exc:  # noqa: BLE001 - an unencodable value is a violation
                self.add("record-value", _record_path(node), f"{_name(tag)} cannot be read: "
                                                             f"{exc}")
                continue
            if element is None:
                continue
            result = records.check_element(tag, element, charsets)
            if result.changed:
                self.add("record-value", _record_path(node),
                         f"{node.rtype} key {_name(tag)}: {result.reason}")

    # -- 4. referenced files (PS3.10 8.2, 8.6; PS3.11) --------------------------------------

    def check_references(self, tree: RecordTree) -> set[str] | None:
        """Check every referenced file; the stored names referenced, None if cancelled."""
        refs = []
        for node, ancestors in tree.walk():
            if not node.in_use:
                continue
            if node.file_id is not None:
                refs.append((node, ancestors))
            elif node.rtype not in records.LEVELS and node.rtype != "PRIVATE":
                self.add("record-key", _record_path(node), f"{node.rtype} record references no "
                                                           "file (0004,1500 absent)")
        self.total = max(len(refs), len(self.medium.files()) - 1)  # refined in check_orphans
        seen: dict[str, int] = {}
        for node, ancestors in refs:
            if not self.step():
                return None
            stored = self.resolve(node)
            if stored is None:
                continue
            if stored in seen:
                self.add("duplicate-reference", stored, f"also referenced by the record at byte "
                                                        f"{seen[stored]} (F.3-3)")
                continue
            seen[stored] = node.offset
            self.check_file(stored, node, ancestors)
        if self.case_only:
            self.note(f"{len(self.case_only)} File ID(s) matched only ignoring case, e.g. "
                      f"{self.case_only[0]}: the names are lower case on this folder (a Linux "
                      "ISO 9660 mount shows them so); the medium itself may be fine")
        return set(seen)

    def resolve(self, node: TreeNode) -> str | None:
        """Check the File ID's form and find the file; None if it is not on the medium."""
        components = node.file_id or ()
        name = "/".join(components)
        self.check_file_id(node, components)
        stored = self.medium.resolve(name) if components else None
        if stored is None:
            self.add("missing-file", name or _record_path(node),
                     f"referenced by the record at byte {node.offset} but not on the medium")
        elif stored != name and self.medium.kind == "folder":
            self.case_only.append(stored)
        elif stored != name:
            self.add("file-id", stored, f"stored name differs from the File ID {name!r}")
        return stored

    def check_file_id(self, node: TreeNode, components: tuple[str, ...]) -> None:
        where = "/".join(components) or _record_path(node)
        bad = [c for c in components if not self.profile.component_ok(c)]
        if bad or not components:
            self.add("file-id", where, f"component(s) {bad} are not 1-"
                                       f"{self.profile.max_component_length} characters of "
                                       "A-Z 0-9 _ (PS3.10 8.2, 8.5)" if bad else "empty File ID")
        count = len(components)
        if count > DICOM_MAX_COMPONENTS:
            self.add("file-id", where, f"{count} components; PS3.10 8.2 allows at most "
                                       f"{DICOM_MAX_COMPONENTS}")
        elif count > self.profile.max_components:
            self.add("file-id", where, f"{count} components; {self.profile.id} allows at most "
                                       f"{self.profile.max_components} (DICOM allows "
                                       f"{DICOM_MAX_COMPONENTS})")

    def check_file(self, name: str, node: TreeNode, ancestors: tuple[TreeNode, ...]) -> None:
        """Structure, Part 10 meta, transfer syntax and identity of one referenced file."""
        self.result.files_checked += 1
        try:
            layout = self.medium.inspect(name)
        except (part10.StructureError, part10.NotDicomError, OSError) as exc:
            self.add("corrupt", name, str(exc))
            return
        if not layout.has_preamble or not layout.has_meta:
            self.add("part10", name, "no preamble, 'DICM' or meta group (PS3.10 7.1)")
        self.check_group_length(name, layout)
        self.check_transfer_syntax(name, layout)
        extra = [*self.conditional_tags(node, ancestors), *IDENTITY.values()]
        if any(t in records.FUNCTIONAL_GROUP_KEYS and t not in node.record for t in extra):
            extra += [records.SHARED_GROUPS, records.PER_FRAME_GROUPS]  # enhanced MF images
        try:
            header = self.medium.read_header(name, extra)
        except Exception as exc:  # pydicom failed although the structure walk passed
            self.add("corrupt", name, f"header cannot be parsed: {exc}")
            return
        self.check_identity(name, node, header, layout)
        self.check_conditional(node, ancestors, header)
        self.check_upper_keys(name, ancestors, header)

    def first_time(self, rec: TreeNode, tag: int) -> bool:
        """True the first time a (record, key) problem is seen: one report per record."""
        if (rec.offset, tag) in self.reported:
            return False
        self.reported.add((rec.offset, tag))
        return True

    def check_upper_keys(self, name: str, ancestors: tuple[TreeNode, ...],
                         header: Dataset) -> None:
        """The PATIENT/STUDY/SERIES keys above a file are the file's own (values not quoted)."""
        for rec in ancestors:
            tag = IDENTITY.get(rec.rtype)
            if tag is None or tag not in header:
                continue
            in_file = records.text_value(header, tag)
            in_record = records.text_value(rec.record, tag)
            if not _usable(header, tag):
                continue  # invalid in the file: the record derives its own (PS3.3 F.5)
            if in_file and in_record and in_file != in_record and self.first_time(rec, tag):
                self.add("record-mismatch", _record_path(rec),
                         f"{rec.rtype} record's {_name(tag)} differs from that of {name}")

    def check_group_length(self, name: str, layout: part10.Layout) -> None:
        if layout.meta_length is not None:
            declared, actual = layout.meta_length
            self.add("part10", name, f"File Meta Information Group Length (0002,0000) is "
                                     f"{declared}, the group holds {actual} bytes (PS3.10 7.1)")

    def check_transfer_syntax(self, name: str, layout: part10.Layout) -> None:
        if layout.body_disagrees:
            self.add("transfer-syntax", name, f"meta says {layout.meta_ts} but the body is "
                                              f"encoded as {layout.body_ts}")
        ts = layout.meta_ts or layout.body_ts
        if ts not in self.profile.transfer_syntaxes:
            self.add("transfer-syntax", name, f"transfer syntax {ts} is not allowed by "
                                              f"{self.profile.id} (PS3.11)")

    def check_identity(self, name: str, node: TreeNode, header: Dataset,
                       layout: part10.Layout) -> None:
        """0004,1510/1511/1512 against the file's meta and data set (PS3.3 F.3-3)."""
        meta = getattr(header, "file_meta", None) or Dataset()
        pairs = (
            (REF_SOP_CLASS, "SOP Class UID", (meta.get("MediaStorageSOPClassUID"),
                                              header.get("SOPClassUID"))),
            (REF_SOP_INSTANCE, "SOP Instance UID", (meta.get("MediaStorageSOPInstanceUID"),
                                                    header.get("SOPInstanceUID"))),
            (REF_TS, "Transfer Syntax UID", (layout.meta_ts,)),
        )
        for tag, label, found in pairs:
            expected = records.text_value(node.record, tag)
            if not expected:
                self.add("record-key", _record_path(node), f"Referenced {label} in File "
                                                           f"({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                                                           "is missing")
                continue
            values = {str(v) for v in found if v}
            if values - {expected}:
                self.add("sop-mismatch", name, f"record says {label} {expected}, the file has "
                                               f"{' / '.join(sorted(values))}")
        self.check_record_type(name, node, str(header.get("SOPClassUID") or ""))

    def check_record_type(self, name: str, node: TreeNode, sop_class: str) -> None:
        sop_class = sop_class or records.text_value(node.record, REF_SOP_CLASS)
        expected = records.record_type(sop_class)
        if expected is None:
            self.add("record-type", name, f"SOP Class {sop_class} is not a storage class "
                                          "with a directory record type (PS3.4 B.5)")
        elif expected != node.rtype:
            self.add("record-type", name, f"{node.rtype} record for a SOP Class that needs a "
                                          f"{expected} record (PS3.3 F.4)")

    def conditional_tags(self, node: TreeNode, ancestors: Iterable[TreeNode]) -> list[int]:
        """The profile's 1C keys of the record and its ancestors (copied if the file has them)."""
        tags: list[int] = []
        for rec in (*ancestors, node):
            tags += [t for kw in self.profile.extra_keys.get(rec.rtype, {}).get("1C", ())
                     if (t := tag_for_keyword(kw)) is not None]
        return tags

    def check_conditional(self, node: TreeNode, ancestors: tuple[TreeNode, ...],
                          header: Dataset) -> None:
        """PS3.11 (e.g. Table H.3-2) 1C keys: required when a referenced instance has a value."""
        for rec in (*ancestors, node):
            for kw in self.profile.extra_keys.get(rec.rtype, {}).get("1C", ()):
                tag = tag_for_keyword(kw)
                if tag is None or _filled(rec.record, tag):
                    continue
                shared = None if _filled(header, tag) else records.functional_group_key(
                    header, tag, per_frame=False)
                if not _filled(header, tag) and not shared:
                    continue  # neither at the top level nor shared by the frames (H.3-2)
                if not _usable(header, tag, shared):
                    continue  # invalid for its VR in the file: a record leaves it out
                if not self.first_time(rec, tag):
                    continue
                self.add("record-key", _record_path(rec), f"{rec.rtype} key {kw} is 1C in "
                                                          f"{self.profile.id}: a referenced "
                                                          "instance has a value, the record "
                                                          "has none")

    # -- 5. orphans and non-DICOM files (PS3.11 D.3.3 / H.3.3) ------------------------------

    def check_orphans(self, referenced: set[str]) -> None:
        others: list[str] = []
        candidates: list[str] = []
        for name in self.medium.files():
            if name in referenced or name_key(name.rsplit("/", 1)[-1]) == DICOMDIR:
                continue
            candidates.append(name)
        self.total = self.done + len(candidates)
        for name in candidates:
            if not self.step():
                return
            self.result.files_checked += 1
            if self.is_dicom(name):
                self.add("orphan", name, "DICOM file not referenced by any DICOMDIR record "
                                         "(PS3.11: every DICOM file is referenced)")
            else:
                others.append(name)
        if others:
            shown = ", ".join(others[:NOTE_LIST]) + (", ..." if len(others) > NOTE_LIST else "")
            self.note(f"{len(others)} non-DICOM file(s), allowed on the medium: {shown}")

    def is_dicom(self, name: str) -> bool:
        """part10 accepts it, or it is broken but carries the 'DICM' prefix."""
        try:
            self.medium.inspect(name)
        except (part10.NotDicomError, OSError):
            return False
        except part10.StructureError:
            with self.medium.open(name) as fp:
                head = fp.read(part10.PREAMBLE_LEN + 4)
            return head[part10.PREAMBLE_LEN :] == part10.MAGIC
        return True


def _usable(ds: Dataset, tag: int, element: bytes | None = None) -> bool:
    """The file's value of tag (or `element`, the encoded value the file has elsewhere, in
    its Shared Functional Groups) can be a record key: valid for its VR, or normalizable."""
    try:
        element = element or records.encode_element(ds, tag)
    except Exception:  # noqa: BLE001 - a value pydicom cannot encode is not usable
        return False
    charsets = records.dataset_charsets(ds)
    return element is None or records.check_element(tag, element, charsets).element is not None


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
