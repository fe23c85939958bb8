"""Intake: find the DICOM instances among the inputs, reading headers only.

Every file is checked structurally first (:mod:`mastering.part10`: truncation, broken sequences),
then its header is read with pydicom up to the pixel data and reduced to what the later stages
need: identity, encoding, layout and the directory record keys already encoded. Nothing of the
pixel data is read. Non-DICOM files are ignored and listed; invalid DICOM files (corrupt,
truncated, not a storable instance, conflicting) are reported with the reason.

An existing File-set among the inputs is an index, not an instance: a DICOMDIR adds the files it
references (PS3.10 8.6), which are scanned like any other file.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from threading import Event

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from . import part10, records, reencode
from .profiles import Profile

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LEAF = "LEAF"
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
RUNNING = ("SeriesNumber", "InstanceNumber")
#: PATIENT keys that must agree between files with one Patient ID (dcmtk warns likewise)
PATIENT_CONSISTENT = {0x00100010: "Patient's Name", 0x00100030: "Patient's Birth Date",
                      0x00100040: "Patient's Sex"}
#: record types whose keys need pydicom (nested SR content)
NEEDS_PYDICOM = frozenset({"SR DOCUMENT", "KEY OBJECT DOC"})


class Cancelled(Exception):
    """The caller's cancellation event was set."""


@dataclass(slots=True)
class Instance:
    """One SOP instance found in the inputs, reduced to what planning and writing need."""

    path: str
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str  # the body's real encoding
    meta_complete: bool  # preamble + meta naming that encoding: the file can go as it is
    dataset_start: int
    record_type: str
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: str
    instance_number: str
    #: encoded keys of the upper records by level ("PATIENT", "STUDY", "SERIES"), tag -> bytes;
    #: kept for the first instance of each series only
    keys: dict[str, dict[int, bytes]]
    #: the leaf record's keys, encoded in Explicit VR LE and concatenated in tag order
    leaf: bytes = b""
    filled: list[tuple[str, str]] = field(default_factory=list)  # (keyword, value) filled in
    duplicates: list[str] = field(default_factory=list)  # identical copies merged into this one
    pixel_data_offset: int = -1
    #: implicit VR files the profile does not take: the streamed re-encoding, made while the
    #: header is at hand (see mastering.reencode); None otherwise
    reencoded: object | None = None
    #: (device, inode, size, mtime ns) at scan time: the writer refuses a file that changed
    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)
    #: File ID of an instance already in the File-set being updated (PS3.10 8.3 File-set
    #: Updater): it stays where it is, untouched; () for input to be written
    on_medium: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Problem:
    """A file that does not become part of the File-set, and why."""

    path: str
    kind: str  # "not-dicom" | "invalid" | "conflict" | "missing"
    reason: str


@dataclass(frozen=True, slots=True)
class DirectoryIndex:
    """A DICOMDIR found among the inputs: the files it references."""

    path: str
    referenced: tuple[str, ...]
    missing: tuple[str, ...]
    refused: tuple[str, ...] = ()  # File IDs that are not File IDs (.., absolute, odd names)


@dataclass
class IntakeResult:
    instances: list[Instance]
    ignored: list[Problem]  # not DICOM
    invalid: list[Problem]  # corrupt, truncated, not storable, conflicting, missing
    indexes: list[DirectoryIndex]
    files_seen: int = 0
    warnings: list[str] = field(default_factory=list)  # no patient values quoted


ProgressFn = Callable[[str, int, int], None]


# -- finding files ---------------------------------------------------------------------------


def expand(inputs: Iterable[Path]) -> tuple[list[str], list[Problem]]:
    """Regular files below the inputs, depth first in sorted order (deterministic), following
    folder links once (a link loop is walked once); anything else (FIFOs, devices, broken
    links) is listed, never opened: reading a FIFO would block the run for ever."""
    files: list[str] = []
    skipped: list[Problem] = []
    seen_dirs: set[tuple[int, int]] = set()
    for item in inputs:
        if item.is_dir():
            for root, dirs, names in os.walk(item, followlinks=True):
                st = os.stat(root)
                if (st.st_dev, st.st_ino) in seen_dirs:
                    dirs[:] = []
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                dirs.sort()
                for name in sorted(names):
                    _classify(os.path.join(root, name), files, skipped)
        elif item.exists() or item.is_symlink():
            _classify(str(item), files, skipped)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files, skipped


def _classify(path: str, files: list[str], skipped: list[Problem]) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        skipped.append(Problem(path, "not-dicom", f"cannot be read: {exc.strerror or exc}"))
        return
    if stat.S_ISREG(mode):
        files.append(path)
    else:
        skipped.append(Problem(path, "not-dicom", "not a regular file"))


# -- scanning one file (runs in worker processes) --------------------------------------------


def file_stamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def scan_file(path: str, profile: Profile) -> Instance | Problem | DirectoryIndex:
    try:
        stamp = file_stamp(path)
        layout = part10.inspect(Path(path), collect=_wanted(profile))
    except part10.NotDicomError as exc:
        return Problem(path, "not-dicom", str(exc))
    except part10.StructureError as exc:
        return Problem(path, "invalid", f"corrupt DICOM: {exc}")
    except OSError as exc:
        return Problem(path, "invalid", f"cannot read: {exc.strerror or exc}")
    try:
        hdr = _header(path, layout)
        sop_class = hdr.text(SOP_CLASS_UID)
        if sop_class == MEDIA_STORAGE_DIRECTORY or (
            sop_class == "" and _meta_class(path) == MEDIA_STORAGE_DIRECTORY
        ):
            return _directory_index(path, _read(path))
        inst = _instance(path, layout, hdr, profile)
    except _Invalid as exc:
        return Problem(path, "invalid", str(exc))
    inst.stamp = stamp
    if file_stamp(path) != stamp:
        return Problem(path, "invalid", "the file changed while it was being read")
    return inst


class _Invalid(Exception):
    pass


def _read(path: str) -> Dataset:
    """The header through pydicom, for what the raw walk does not cover."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # VR switches etc. are handled, not news
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise _Invalid(f"pydicom cannot parse the header: {exc}") from exc


def _meta_class(path: str) -> str:
    ds = _read(path)
    return str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if ds.file_meta else ""


def _header(path: str, layout: part10.Layout) -> records.Header:
    """Raw keys from the walk for little endian bodies; pydicom for everything else."""
    if layout.elements is not None and layout.body_ts in (part10.EXPLICIT_LE, part10.IMPLICIT_LE):
        explicit = layout.body_ts == part10.EXPLICIT_LE
        hdr = records.RawHeader(layout.elements, explicit, lambda: _read(path),
                                layout.oversized)
        if records.record_type(hdr.text(SOP_CLASS_UID)) not in NEEDS_PYDICOM:
            return hdr
    return records.PydicomHeader(_read(path))


@cache
def _wanted_cached(extra: tuple) -> frozenset[int]:
    tags = {SOP_CLASS_UID, SOP_INSTANCE_UID, records.SPECIFIC_CHARACTER_SET}
    for table in records.record_keys().values():
        if isinstance(table, dict):
            tags.update(records._tag(kw) for kws in table.values() for kw in kws)
    for _rtype, table in extra:
        tags.update(records._tag(kw) for _req, kws in table for kw in kws)
    for keyword, rule in records.fill_rules().items():
        tags.add(records._tag(keyword))
        tags.update(records._tag(kw) for kw in (*rule.get("copy", ()), *rule.get("from", ())))
    return frozenset(tags)


def _wanted(profile: Profile) -> frozenset[int]:
    extra = tuple(sorted((r, tuple(sorted(t.items()))) for r, t in profile.extra_keys.items()))
    return _wanted_cached(extra)


def _instance(path: str, layout: part10.Layout, hdr: records.Header,
              profile: Profile) -> Instance:
    sop_class = hdr.text(SOP_CLASS_UID)
    sop_uid = hdr.text(SOP_INSTANCE_UID)
    if not sop_class or not sop_uid:
        raise _Invalid("not a storable instance: no SOP Class UID or SOP Instance UID")
    if not UID_RE.match(sop_uid) or len(sop_uid) > 64:
        raise _Invalid(f"not a valid SOP Instance UID: {sop_uid!r}")
    rtype = records.record_type(sop_class)
    if rtype is None:
        raise _Invalid(f"not a storable instance: SOP Class {sop_class} is not a storage class")
    meta_uid = layout.meta_sop_instance_uid
    if meta_uid and meta_uid != sop_uid:
        raise _Invalid(
            f"file meta Media Storage SOP Instance UID {meta_uid} differs from the data set's "
            f"SOP Instance UID {sop_uid}"
        )
    if rtype == "IMAGE" and layout.pixel_data_offset < 0:
        raise _Invalid("an image without Pixel Data: the file is probably truncated")
    keys, filled = _keys(hdr, rtype, profile)
    leaf = records.concatenate(keys.pop(LEAF))
    values = dict(filled)

    def value(kw: str) -> str:
        return values.get(kw) or hdr.text(records._tag(kw))

    reencoded = None
    if (not profile.allows(layout.body_ts) and part10.EXPLICIT_LE in profile.transfer_syntaxes
            and reencode.applicable(layout.body_ts, layout.pixel_data_offset)):
        reencoded = reencode.reencode(path, sop_class, sop_uid, layout.pixel_data_offset,
                                      layout.dataset_start)
    return Instance(
        reencoded=reencoded,
        path=path,
        size=layout.size,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        transfer_syntax=layout.body_ts,
        # a meta header that lacks a Type 1 element or names another SOP Class is rebuilt
        meta_complete=(layout.meta_complete and bool(meta_uid)
                       and layout.meta_sop_class_uid == sop_class),
        dataset_start=layout.dataset_start,
        record_type=rtype,
        patient_id=value("PatientID"),
        study_uid=value("StudyInstanceUID"),
        series_uid=value("SeriesInstanceUID"),
        series_number=value("SeriesNumber"),
        instance_number=value("InstanceNumber"),
        keys=keys,
        leaf=leaf,
        filled=filled,
        pixel_data_offset=layout.pixel_data_offset,
    )


def _keys(
    hdr: records.Header, rtype: str, profile: Profile
) -> tuple[dict[str, dict[int, bytes]], list[tuple[str, str]]]:
    """Encoded keys per level, filling Type 1 keys the instance lacks (reported, never written
    into the file)."""
    levels = () if records.is_root_level(rtype) else records.LEVELS
    keys: dict[str, dict[int, bytes]] = {}
    filled: list[tuple[str, str]] = []
    known: dict[str, str] = {}
    charset = hdr.encoded(records.SPECIFIC_CHARACTER_SET)
    for level in (*levels, LEAF):
        spec = records.key_spec(rtype if level == LEAF else level, profile)
        found: dict[int, bytes | None] = {}
        if charset and hdr.has(records.SPECIFIC_CHARACTER_SET):
            found[records.SPECIFIC_CHARACTER_SET] = charset
        for tag in spec.of("1"):
            found[tag] = _type1(hdr, tag, known, filled)
        for tag in spec.of("2"):
            found[tag] = hdr.encoded(tag) or records.encode_text(
                tag, records.dictionary_VR(tag), b""
            )
        for tag in (*spec.of("1C"), *spec.of("3")):
            found[tag] = _conditional(hdr, tag, rtype)
        keys[level] = {t: v for t, v in found.items() if v is not None}
    return keys, filled


def _type1(hdr: records.Header, tag: int, known: dict[str, str], filled: list) -> bytes | None:
    if hdr.has(tag):
        return hdr.encoded(tag)
    keyword = pydicom.datadict.keyword_for_tag(tag)
    value = records.derive(keyword, hdr, known)
    if value is None:
        raise _Invalid(f"lacks the Type 1 directory key {keyword} and it cannot be derived")
    known[keyword] = value
    filled.append((keyword, value))
    if value == "":  # a running number: the planner assigns it
        return None
    return records.encode_value(tag, value)


def _conditional(hdr: records.Header, tag: int, rtype: str) -> bytes | None:
    """1C/3 keys; SR Content Sequence keeps only the HAS CONCEPT MOD items (F.5.24, F.5.25)."""
    if rtype in NEEDS_PYDICOM and tag in (0x0040A730, 0x0040A030):
        assert isinstance(hdr, records.PydicomHeader)
        return _sr_key(hdr.ds, tag, rtype)
    return hdr.encoded(tag) if hdr.has(tag) else None


def _sr_key(ds: Dataset, tag: int, rtype: str) -> bytes | None:
    if tag == 0x0040A730:
        items = [i for i in ds.get("ContentSequence", [])
                 if i.get("RelationshipType") == "HAS CONCEPT MOD"]
        if not items:
            return None
        sub = Dataset()
        sub.SpecificCharacterSet = ds.get("SpecificCharacterSet", "ISO_IR 6")
        sub.ContentSequence = Sequence(items)
        return records.encode_element(sub, tag)
    observers = ds.get("VerifyingObserverSequence")  # Verification DateTime, if VERIFIED
    if rtype == "SR DOCUMENT" and ds.get("VerificationFlag") == "VERIFIED" and observers:
        last = observers[-1]
        if "VerificationDateTime" in last:
            return records.encode_element(last, tag)
    return None


FILE_ID_COMPONENT = re.compile(r"^[A-Za-z0-9_]{1,8}$")


def _directory_index(path: str, ds: Dataset) -> DirectoryIndex:
    """The files a DICOMDIR references. A Referenced File ID must be a File ID (PS3.10 8.2:
    1-8 components of A-Z 0-9 _) inside the File-set (8.6): '..', absolute paths or other
    names could otherwise pull any file of this machine onto a patient's disc."""
    base = Path(path).parent
    referenced, missing, refused = [], [], []
    for rec in ds.get("DirectoryRecordSequence", []):
        if rec.get("RecordInUseFlag", 0xFFFF) == 0 or "ReferencedFileID" not in rec:
            continue
        parts = rec.ReferencedFileID
        parts = [str(parts)] if isinstance(parts, str) else [str(p) for p in parts]
        if not 1 <= len(parts) <= 8 or not all(FILE_ID_COMPONENT.match(p) for p in parts):
            refused.append("\\".join(parts))
            continue
        found = _resolve(base, parts)
        (referenced if found else missing).append(str(found or base.joinpath(*parts)))
    return DirectoryIndex(path, tuple(referenced), tuple(missing), tuple(refused))


def _resolve(base: Path, parts: list[str]) -> Path | None:
    """A File ID below base; media mounted with lower-case names (or with ';1' versions and
    trailing dots, map=off) resolve case-insensitively. Never leaves base."""
    path = base.joinpath(*parts)
    if not path.is_file():
        cur = base
        for part in parts:
            try:
                cur = next(p for p in cur.iterdir() if _plain(p.name) == part.upper())
            except (StopIteration, OSError):
                return None
        path = cur
    real, root = os.path.realpath(path), os.path.realpath(base)
    if not path.is_file() or os.path.commonpath([real, root]) != root:
        return None
    return path


def _plain(name: str) -> str:
    """An ISO 9660 name as a File ID component: no ';1' version, no empty extension."""
    return name.split(";")[0].rstrip(".").upper()


# -- the whole intake ------------------------------------------------------------------------


def scan(
    inputs: Iterable[Path],
    profile: Profile,
    *,
    progress: ProgressFn | None = None,
    cancel: Event | None = None,
    workers: int | None = None,
) -> IntakeResult:
    """Scan inputs (files and folders, recursively) and return instances and problems."""
    paths, skipped = expand(inputs)
    result = IntakeResult([], skipped, [], [], 0)
    seen = {os.path.realpath(p) for p in paths}
    merger = _Merger(result)
    queue = paths
    while queue:
        extra: list[str] = []
        for item in _scan_all(queue, profile, progress, cancel, workers):
            result.files_seen += 1
            if isinstance(item, DirectoryIndex):
                result.indexes.append(item)
                result.invalid.extend(
                    Problem(m, "missing", f"referenced by {item.path} but not found")
                    for m in item.missing
                )
                result.invalid.extend(
                    Problem(item.path, "invalid", f"references {r!r}, which is not a File ID "
                            "inside its File-set (PS3.10 8.2, 8.6)") for r in item.refused
                )
                for ref in item.referenced:
                    if os.path.realpath(ref) not in seen:
                        seen.add(os.path.realpath(ref))
                        extra.append(ref)
            elif isinstance(item, Problem):
                (result.ignored if item.kind == "not-dicom" else result.invalid).append(item)
            else:
                merger.add(item)
        queue = extra
    merger.finish()
    return result


def _scan_all(
    paths: list[str],
    profile: Profile,
    progress: ProgressFn | None,
    cancel: Event | None,
    workers: int | None,
) -> Iterator[Instance | Problem | DirectoryIndex]:
    workers = workers or os.cpu_count() or 1
    total = len(paths)
    if workers <= 1 or total < 64:
        results: Iterable = (scan_file(p, profile) for p in paths)
        yield from _tick(results, total, progress, cancel)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(scan_file, paths, [profile] * total, chunksize=32)
        try:
            yield from _tick(results, total, progress, cancel)
        except Cancelled:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _tick(results: Iterable, total: int, progress: ProgressFn | None, cancel: Event | None):
    for done, item in enumerate(results, 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled during intake")
        if progress:
            progress("scan", done, total)
        yield item


class _Merger:
    """Merges identical copies of one instance; two different objects with one UID conflict.

    Also keeps the PATIENT/STUDY/SERIES keys only once per series, so memory per instance is
    its leaf record and identity, not its whole header.
    """

    def __init__(self, result: IntakeResult):
        self.result = result
        self.by_uid: dict[str, Instance] = {}
        self.conflicts: dict[str, list[str]] = {}
        self.series_first: dict[tuple[str, str, str], Instance] = {}

    def add(self, inst: Instance) -> None:
        other = self.by_uid.get(inst.sop_instance_uid)
        if other is None:
            self.by_uid[inst.sop_instance_uid] = inst
            self._share_levels(inst)
            return
        if inst.sop_instance_uid in self.conflicts:
            self.conflicts[inst.sop_instance_uid].append(inst.path)
        elif same_object(other.path, inst.path):
            other.duplicates.append(inst.path)
        else:
            self.conflicts[inst.sop_instance_uid] = [other.path, inst.path]

    def _share_levels(self, inst: Instance) -> None:
        key = (inst.patient_id, inst.study_uid, inst.series_uid)
        first = self.series_first.get(key)
        if first is None:
            self.series_first[key] = inst
            return
        self._compare_patient(first, inst)
        for level in records.LEVELS:  # 1C keys: take them from any instance that has them
            for tag, enc in inst.keys.get(level, {}).items():
                first.keys[level].setdefault(tag, enc)
            inst.keys.pop(level, None)

    def _compare_patient(self, first: Instance, inst: Instance) -> None:
        """Files of one series that disagree on the patient are worth a warning: the record
        keeps the first file's values (the planner does the same across series)."""
        mine, theirs = first.keys.get("PATIENT", {}), inst.keys.get("PATIENT", {})
        for tag, name in PATIENT_CONSISTENT.items():
            a, b = mine.get(tag), theirs.get(tag)
            if a is not None and b is not None and a[8:].rstrip(b" ") != b[8:].rstrip(b" "):
                self.result.warnings.append(
                    f"{inst.path}: {name} differs from {first.path} under the same Patient "
                    "ID; the directory record keeps the first")

    def finish(self) -> None:
        for uid, paths in self.conflicts.items():
            inst = self.by_uid.pop(uid)
            self._unshare(inst)
            for path in paths:
                others = ", ".join(p for p in paths if p != path)
                self.result.invalid.append(
                    Problem(path, "conflict", f"SOP Instance UID {uid} is also used by a "
                            f"different object in {others}")
                )
        self.result.instances = list(self.by_uid.values())

    def _unshare(self, inst: Instance) -> None:
        """A conflicting instance leaves; if it carried its series' keys, hand them on."""
        key = (inst.patient_id, inst.study_uid, inst.series_uid)
        if self.series_first.get(key) is not inst:
            return
        heir = next((i for i in self.by_uid.values()
                     if (i.patient_id, i.study_uid, i.series_uid) == key), None)
        del self.series_first[key]
        if heir is not None:
            for level in records.LEVELS:
                heir.keys[level] = inst.keys[level]
            self.series_first[key] = heir


def same_object(a: str, b: str) -> bool:
    """True if two files hold the same data set: identical bytes, or equal after parsing
    (the same instance stored in two encodings). Only called when SOP Instance UIDs collide."""
    if _digest(a) == _digest(b):
        return True
    try:
        da, db = pydicom.dcmread(a, force=True), pydicom.dcmread(b, force=True)
    except Exception:  # noqa: BLE001 - unreadable means not provably the same
        return False
    return da == db


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
