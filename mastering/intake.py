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

import contextlib
import errno
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from threading import Event
from typing import BinaryIO, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from . import isosource, part10, records, reencode, sameness
from . import workers as workers_mod
from .cancel import Cancelled
from .outputs import is_work_folder
from .profiles import Profile
from .reader import MediaError

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LEAF = "LEAF"
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
#: Instance Creation Date and Time, Timezone Offset From UTC: which copy is newest
CREATION_TAGS = (0x00080012, 0x00080013, 0x00080201)
TIMEZONE_OFFSET = 0x00080201
RUNNING = ("SeriesNumber", "InstanceNumber")
#: PATIENT keys that must agree between files with one Patient ID (dcmtk warns likewise)
PATIENT_CONSISTENT = {0x00100010: "Patient's Name", 0x00100030: "Patient's Birth Date",
                      0x00100040: "Patient's Sex"}
#: record types whose keys need pydicom (nested SR content)
NEEDS_PYDICOM = frozenset({"SR DOCUMENT", "KEY OBJECT DOC"})


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
    #: the next four are lists as made, and the one empty tuple once compacted (see _compact)
    filled: Seq[tuple[str, str]] = field(default_factory=list)  # (keyword, value) filled
    #: keys changed for the record because their value is not valid for its VR:
    #: (keyword, value in the record or "", why), PS3.5 Table 6.2-1
    fixes: Seq[tuple[str, str, str]] = field(default_factory=list)
    #: meta header UIDs that disagreed with the data set: {"uid", "meta", "dataset", "repair"}
    repairs: Seq[dict[str, str]] = field(default_factory=list)
    duplicates: Seq[str] = field(default_factory=list)  # identical copies merged into it
    pixel_data_offset: int = -1
    #: implicit VR files the profile does not take: the streamed re-encoding, made while the
    #: header is at hand (see mastering.reencode); None otherwise
    reencoded: object | None = None
    #: (device, inode, size, mtime ns) at scan time: the writer refuses a file that changed
    stamp: isosource.Stamp = (0, 0, 0, 0, 0)  # isosource.stat_stamp of the file
    #: Instance Creation Date and Time as YYYYMMDDHHMMSS.ffffff ("" if absent or invalid)
    created: str = ""
    #: File ID of an instance already in the File-set being updated (PS3.10 8.3 File-set
    #: Updater): it stays where it is, untouched; () for input to be written
    on_medium: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Problem:
    """A file that does not become part of the File-set, and why."""

    path: str
    kind: str  # "not-dicom" | "link" | "invalid" | "conflict" | "missing"
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
    walked: set[tuple[int, int]] = field(default_factory=set)  # folders and files scanned
    #: SOP Instance UIDs held by different objects: {"uid", "policy", "files", "kept"}
    conflicts: list[dict] = field(default_factory=list)
    left_out: list[Problem] = field(default_factory=list)  # by --on-conflict skip/newest


ProgressFn = Callable[[str, int, int], None]


# -- finding files ---------------------------------------------------------------------------


@dataclass
class Walk:
    """What the folder walk found. Problems of kind "invalid" (a folder or file that cannot be
    read, a path too long to open) refuse the run unless --skip-invalid; the rest are listed."""

    files: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: (device, inode) of every folder entered and file found: no output may be one of them
    walked: set[tuple[int, int]] = field(default_factory=set)


def expand(inputs: Iterable[Path], *, follow_links: bool = False) -> Walk:
    """Regular files below the inputs, depth first in sorted order (deterministic).

    Symbolic links inside the input folders are followed only where they stay inside the
    given inputs (their targets are scanned under their own names there) unless follow_links;
    the others are listed, never read: a link to /etc, or to another patient's folder, must
    not bring its files onto a disc. FIFOs, devices and broken links are listed, never opened
    (reading a FIFO would block the run for ever); the work folder of a mastering run is not
    scanned. Errors of the walk itself are problems, never silently skipped folders."""
    inputs = list(inputs)
    walk = Walk()
    roots = [os.path.realpath(i) for i in inputs if os.path.exists(i)]
    for item in inputs:
        if item.is_dir():
            _walk_folder(str(item), walk, roots, follow_links)
        elif item.exists() or item.is_symlink():
            _classify(str(item), walk)  # a file named on the command line is taken as named
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return walk


def _walk_folder(top: str, walk: Walk, roots: list[str], follow_links: bool) -> None:
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            walk.problems.append(Problem(folder, "invalid",
                                         f"cannot read the folder: {exc.strerror or exc}"))
            continue
        if (st.st_dev, st.st_ino) in walk.walked:
            continue  # a loop through followed links: walked once
        walk.walked.add((st.st_dev, st.st_ino))
        subdirs: list[str] = []
        for entry in entries:
            _entry(entry, walk, roots, follow_links, subdirs)
        stack.extend(reversed(subdirs))


def _entry(entry: os.DirEntry, walk: Walk, roots: list[str], follow_links: bool,
           subdirs: list[str]) -> None:
    path = entry.path
    try:
        link = entry.is_symlink()
        is_dir = entry.is_dir(follow_symlinks=False)
    except OSError as exc:
        walk.problems.append(Problem(path, "invalid", f"cannot be read: {exc.strerror or exc}"))
        return
    if link:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            walk.problems.append(Problem(path, "not-dicom", "broken symbolic link"))
            return
        if _inside(real, roots):
            return  # its target is inside the inputs and scanned there, under its own name
        is_dir = os.path.isdir(real)
        if not follow_links:
            what = "a folder" if is_dir else "a file"
            walk.problems.append(Problem(path, "link", f"symbolic link to {what} outside the "
                                         "inputs: not followed (--follow-links follows it)"))
            return
    if is_dir:
        if is_work_folder(path):
            walk.problems.append(Problem(path, "not-dicom", "the work folder of a mastering "
                                         "run: not scanned"))
        else:
            subdirs.append(path)
        return
    _classify(path, walk)


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def _classify(path: str, walk: Walk) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            walk.problems.append(Problem(path, "not-dicom", "broken symbolic link"))
        else:
            walk.problems.append(Problem(path, "invalid",
                                         f"cannot be read: {exc.strerror or exc}"))
        return
    if stat.S_ISREG(st.st_mode):
        walk.files.append(path)
        walk.walked.add((st.st_dev, st.st_ino))
    else:
        walk.problems.append(Problem(path, "not-dicom", "not a regular file (a FIFO, device "
                                     "or socket): not opened"))


# -- scanning one file (runs in worker processes) --------------------------------------------


def file_stamp(path: str) -> isosource.Stamp:
    """:func:`isosource.stat_stamp` of the file (for a file inside an ISO image: the image's)."""
    if not os.path.lexists(path):
        return isosource.stamp(path)
    return isosource.stat_stamp(os.stat(path))


def _layout(path: str, collect: frozenset[int]) -> part10.Layout:
    if not os.path.lexists(path) and isosource.locate(path) is not None:
        return isosource.inspect(path, collect)
    return part10.inspect(Path(path), collect=collect)


def scan_file(path: str, profile: Profile) -> Instance | Problem | DirectoryIndex:
    try:
        stamp = file_stamp(path)
        layout = _layout(path, _wanted(profile))
    except part10.NotDicomError as exc:
        return Problem(path, "not-dicom", _not_dicom(path, exc))
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
    except OSError as exc:
        return Problem(path, "invalid", f"cannot read: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - one odd file must not end the run untold
        return Problem(path, "invalid", f"cannot read the header ({type(exc).__name__}: "
                       f"{_first_line(exc)})")
    inst.stamp = stamp
    if file_stamp(path) != stamp:
        return Problem(path, "invalid", "the file changed while it was being read")
    return inst


class _Invalid(Exception):
    pass


def _not_dicom(path: str, exc: part10.NotDicomError) -> str:
    """Why a file is not an instance; an ISO image found in a folder is said to be one: it is
    not opened (an image of another patient's disc could sit in any export folder)."""
    if os.path.lexists(path) and isosource.is_image(Path(path)):
        return "an ISO image inside a folder is not opened; name it on the command line"
    return str(exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _read(path: str) -> Dataset:
    """The header through pydicom, for what the raw walk does not cover."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # VR switches etc. are handled, not news
            with open_source(path) as fh:
                return pydicom.dcmread(fh, stop_before_pixels=True, force=True)
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
    tags = {SOP_CLASS_UID, SOP_INSTANCE_UID, records.SPECIFIC_CHARACTER_SET,
            records.SHARED_GROUPS, records.PER_FRAME_GROUPS, *CREATION_TAGS}
    for table in records.record_keys().values():
        if isinstance(table, dict):
            tags.update(records._tag(kw) for kws in table.values() for kw in kws)
    for _rtype, table in extra:
        tags.update(records._tag(kw) for _req, kws in table for kw in kws)
    for keyword, rule in records.fill_rules().items():
        tags.add(records._tag(keyword))
        tags.update(records._tag(kw) for kw in (*rule.get("copy", ()), *rule.get("from", ()),
                                                *rule.get("invalid_from", ())))
    return frozenset(tags)


def _wanted(profile: Profile) -> frozenset[int]:
    extra = tuple(sorted((r, tuple(sorted(t.items()))) for r, t in profile.extra_keys.items()))
    return _wanted_cached(extra)


def _instance(path: str, layout: part10.Layout, hdr: records.Header,
              profile: Profile) -> Instance:
    sop_class, sop_uid, repairs = identity(hdr, layout)
    if layout.meta_length is not None:
        declared, actual = layout.meta_length
        repairs.append({"uid": "File Meta Information Group Length (0002,0000)",
                        "meta": str(declared), "dataset": f"{actual} (the group's bytes)",
                        "repair": "the meta header is rebuilt (PS3.10 7.1)"})
    if not sop_class or not sop_uid:
        raise _Invalid("not a storable instance: no SOP Class UID or SOP Instance UID in the "
                       "data set or its meta header")
    if not UID_RE.match(sop_uid) or len(sop_uid) > 64:
        raise _Invalid(f"not a valid SOP Instance UID: {sop_uid!r}")
    rtype = records.record_type(sop_class)
    if rtype is None:
        raise _Invalid(f"not a storable instance: SOP Class {sop_class} is not a storage class")
    meta_uid = layout.meta_sop_instance_uid
    if rtype == "IMAGE" and layout.pixel_data_offset < 0:
        raise _Invalid("an image without Pixel Data: the file is probably truncated")
    fixes: list[tuple[str, str, str]] = []
    keys, filled = _keys(hdr, rtype, profile, fixes)
    leaf = records.concatenate(keys.pop(LEAF))
    values = dict(filled)

    def value(kw: str) -> str:
        return values[kw] if kw in values else hdr.text(records._tag(kw))

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
        meta_complete=(layout.meta_complete and meta_uid == sop_uid
                       and layout.meta_sop_class_uid == sop_class),
        repairs=repairs,
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
        fixes=fixes,
        pixel_data_offset=layout.pixel_data_offset,
        created=_created(hdr),
    )


def _created(hdr: records.Header) -> str:
    """Instance Creation Date/Time (PS3.3 C.12.1) in UTC by the Timezone Offset From UTC
    (C.12.1.1.8; without one the time is taken as it is), as comparable text; the ACR-NEMA
    forms (1997.04.24, 14:04:38) have one meaning and are read as such; "" if absent or
    invalid."""
    from . import values

    parts = []
    for tag, vr in ((0x00080012, "DA"), (0x00080013, "TM")):
        raw = hdr.text(tag).encode("latin-1")
        raw += b" " * (len(raw) % 2)
        if raw and values.check(tag, vr, raw) is not None:
            raw = values.normalize(tag, vr, raw) or b""
        parts.append(raw.decode("ascii", "replace").strip())
    date, time = parts
    if not date:
        return ""
    moment = values.instant(date + time, hdr.text(TIMEZONE_OFFSET))
    if moment is None:
        moment = values.instant(date, hdr.text(TIMEZONE_OFFSET))  # an invalid time: the day
    return moment.strftime("%Y%m%d%H%M%S.%f") if moment is not None else ""


@dataclass(frozen=True, slots=True)
class LeafKeys:
    """The leaf record's keys of a file this program wrote, with what was filled in or
    changed for them (as Instance.filled and Instance.fixes, leaf keys only)."""

    leaf: bytes
    filled: tuple[tuple[str, str], ...]
    fixes: tuple[tuple[str, str, str], ...]
    keywords: frozenset[str]  # every leaf key of the record type


def leaf_keys(path: str, profile: Profile) -> LeafKeys:
    """The leaf record's keys of a file this program wrote (a transcoded copy): decoding
    changes keys (Lossy Image Compression Ratio, Number of Frames) and may make a value
    valid that was not (pydicom writes numbers anew), so a record describes the file on the
    medium, not its source (PS3.3 F.5)."""
    layout = part10.inspect(Path(path), collect=_wanted(profile))
    hdr = _header(path, layout)
    rtype = records.record_type(hdr.text(SOP_CLASS_UID))
    if rtype is None:
        raise _Invalid("the converted file has no storage SOP Class")
    fixes: list[tuple[str, str, str]] = []
    keys, filled = _keys(hdr, rtype, profile, fixes)
    spec = records.key_spec(rtype, profile)
    keywords = frozenset(pydicom.datadict.keyword_for_tag(t) for t in spec.all_tags())
    return LeafKeys(records.concatenate(keys[LEAF]),
                    tuple(f for f in filled if f[0] in keywords),
                    tuple(f for f in fixes if f[0] in keywords), keywords)


def adopt_leaf(inst: Instance, converted: LeafKeys) -> None:
    """Take the leaf keys of the converted file, and its account of what was filled in or
    changed for them. Only a key the converted file still lacks keeps the value given to
    the source (a running Instance Number stays the one the planner assigned)."""
    old, new = records.split(inst.leaf), records.split(converted.leaf)
    still_filled = {k for k, _v in converted.filled}
    for keyword, _value in inst.filled:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None or keyword not in converted.keywords:
            continue
        if keyword in still_filled and tag in old:
            new[tag] = old[tag]
    inst.leaf = records.concatenate(new)
    leaf_level = converted.keywords
    source_filled = {k for k, _v in inst.filled}
    inst.filled = [f for f in inst.filled if f[0] not in leaf_level or f[0] in still_filled]
    inst.filled += [f for f in converted.filled if f[0] not in source_filled]
    inst.fixes = [f for f in inst.fixes if f[0] not in leaf_level] + list(converted.fixes)


def identity(hdr: records.Header, layout: part10.Layout
             ) -> tuple[str, str, list[dict[str, str]]]:
    """SOP Class and Instance UID of the object, and the meta header repairs they imply.

    The data set is the object and the meta header its wrapper (PS3.10 7.1: the meta's
    Media Storage SOP Class/Instance UID are copies of the data set's). Anonymizers often
    change the data set's UIDs and leave the meta as it was: the data set's UIDs win and the
    meta header is rebuilt (the data set's bytes are copied unchanged). Only a data set
    without a UID takes the meta header's."""
    repairs: list[dict[str, str]] = []
    found = []
    for tag, name, meta in ((SOP_CLASS_UID, "SOP Class UID", layout.meta_sop_class_uid),
                            (SOP_INSTANCE_UID, "SOP Instance UID",
                             layout.meta_sop_instance_uid)):
        mine = hdr.text(tag)
        if not mine and meta:
            repairs.append({"uid": name, "meta": meta, "dataset": "",
                            "repair": "the data set has none: the meta header's is used"})
            mine = meta
        elif meta and mine and meta != mine:
            repairs.append({"uid": name, "meta": meta, "dataset": mine,
                            "repair": "the meta header is rebuilt from the data set"})
        found.append(mine)
    return found[0], found[1], repairs


def _keys(
    hdr: records.Header, rtype: str, profile: Profile, fixes: list[tuple[str, str, str]]
) -> tuple[dict[str, dict[int, bytes]], list[tuple[str, str]]]:
    """Encoded keys per level, filling Type 1 keys the instance lacks (reported, never written
    into the file). Every value is checked against its VR (PS3.5 Table 6.2-1): one that can
    be normalized is, in the record only; a Type 1 key that cannot is derived as if absent,
    a Type 2 key is left empty and a 1C/3 key out; each is listed in fixes as (keyword, value
    in the record, why)."""
    levels = () if records.is_root_level(rtype) else records.LEVELS
    keys: dict[str, dict[int, bytes]] = {}
    filled: list[tuple[str, str]] = []
    known: dict[str, str] = {}
    charset = _charset(hdr, fixes)
    check = _Checker(records.charsets_of(charset), fixes)
    for level in (*levels, LEAF):
        spec = records.key_spec(rtype if level == LEAF else level, profile)
        found: dict[int, bytes | None] = {}
        if charset and hdr.has(records.SPECIFIC_CHARACTER_SET):
            found[records.SPECIFIC_CHARACTER_SET] = charset
        for tag in spec.of("1"):
            found[tag] = _type1(hdr, tag, known, filled, check)
        for tag in spec.of("2"):
            found[tag] = check(tag, _encoded(hdr, tag, check, "left empty"),
                               "left empty") or records.encode_text(
                tag, records.dictionary_VR(tag), b"")
        for tag in (*spec.of("1C"), *spec.of("3")):
            found[tag] = check(tag, _conditional(hdr, tag, rtype, check), "left out")
            if found[tag] is None and level == LEAF and _enhanced(hdr):
                found[tag] = check(tag, records.functional_group_key(_dataset(hdr), tag),
                                   "left out")
        keys[level] = {t: v for t, v in found.items() if v is not None}
    return keys, filled


class _Checker:
    """Checks key elements against their VR and notes every change (no values quoted)."""

    def __init__(self, charsets: tuple[str, ...], fixes: list[tuple[str, str, str]]):
        self.charsets, self.fixes = charsets, fixes

    def __call__(self, tag: int, element: bytes | None, refused: str) -> bytes | None:
        if element is None:
            return None
        result = records.check_element(tag, element, self.charsets)
        if result.changed:
            keyword = pydicom.datadict.keyword_for_tag(tag) or f"{tag:08X}"
            shown = records.value_text(result.element) if result.element else ""
            what = result.reason if result.element else f"{result.reason}; {refused}"
            self.fixes.append((keyword, shown, what))
        return result.element


def _charset(hdr: records.Header, fixes: list[tuple[str, str, str]]) -> bytes | None:
    """Specific Character Set goes into every record, written as its Defined Terms where the
    spelling has one clear meaning (reported); one that cannot be a record key (not CS, not
    Defined Terms, over 64 KiB) refuses the file rather than every record."""
    try:
        charset = hdr.encoded(records.SPECIFIC_CHARACTER_SET)
    except records.ValueTooLong as exc:
        raise _Invalid("Specific Character Set is longer than a directory record can hold") \
            from exc
    if charset is None or not hdr.has(records.SPECIFIC_CHARACTER_SET):
        return charset
    result = records.check_element(records.SPECIFIC_CHARACTER_SET, charset, ())
    if result.element is None:
        shown = records.value_bytes(charset).decode("latin-1")
        raise _Invalid(f"Specific Character Set {shown!r} cannot be read: {result.reason}")
    if result.changed:
        fixes.append(("SpecificCharacterSet", records.value_text(result.element),
                      result.reason))
    return result.element


def _encoded(hdr: records.Header, tag: int, check: _Checker,
             refused: str = "") -> bytes | None:
    """The key as encoded for the record; None, and noted, when it is longer than any record
    element can be (over 64 KiB: an Implicit VR file can hold it, PS3.5 7.1.2)."""
    try:
        return hdr.encoded(tag)
    except records.ValueTooLong:
        keyword = pydicom.datadict.keyword_for_tag(tag) or f"{tag:08X}"
        check.fixes.append((keyword, "", f"longer than a directory record can hold; {refused}"))
        return None


def _enhanced(hdr: records.Header) -> bool:
    """An enhanced multi-frame image (PS3.3 C.7.6.16): keys may sit in functional groups."""
    return hdr.has(records.SHARED_GROUPS) or hdr.has(records.PER_FRAME_GROUPS)


def _dataset(hdr: records.Header) -> Dataset:
    return hdr.ds if isinstance(hdr, records.PydicomHeader) else hdr.pydicom().ds


@cache
def _keyword(tag: int) -> str:
    return pydicom.datadict.keyword_for_tag(tag)


def _type1(hdr: records.Header, tag: int, known: dict[str, str], filled: list,
           check: _Checker) -> bytes | None:
    keyword = _keyword(tag)
    why, invalid = "", None
    encoded = _encoded(hdr, tag, _Checker(check.charsets, [])) if hdr.has(tag) else None
    if hdr.has(tag) and encoded is None:  # a derived value would disagree with the file
        raise _Invalid(f"the Type 1 directory key {keyword} is longer than a directory "
                       "record can hold (over 64 KiB)")
    if encoded is not None:
        result = records.check_element(tag, encoded, check.charsets)
        if result.element is not None:
            if result.changed:
                check.fixes.append((keyword, records.value_text(result.element),
                                    result.reason))
            return result.element
        why, invalid = result.reason, records.value_bytes(encoded)
    value = records.derive(keyword, hdr, known, invalid)
    if value is None:
        if why:
            raise _Invalid(f"the Type 1 directory key {keyword} is not valid for its VR "
                           f"({why}) and cannot be derived")
        raise _Invalid(f"lacks the Type 1 directory key {keyword} and it cannot be derived")
    known[keyword] = value
    filled.append((keyword, value))
    if why:
        how = ("derived from the file's value, the same for every file with it"
               if "invalid_from" in records.fill_rules().get(keyword, {})
               else "derived as for a missing key")
        check.fixes.append((keyword, value, f"{why}; {how}"))
    if value == "":  # a running number: the planner assigns it
        return None
    return records.encode_value(tag, value)


def _conditional(hdr: records.Header, tag: int, rtype: str, check: _Checker) -> bytes | None:
    """1C/3 keys; SR Content Sequence keeps only the HAS CONCEPT MOD items (F.5.24, F.5.25)."""
    if rtype in NEEDS_PYDICOM and tag in (0x0040A730, 0x0040A030):
        assert isinstance(hdr, records.PydicomHeader)
        return _sr_key(hdr.ds, tag, rtype, check)
    return _encoded(hdr, tag, check, "left out") if hdr.has(tag) else None


def _sr_key(ds: Dataset, tag: int, rtype: str, check: _Checker) -> bytes | None:
    if tag == 0x0040A730:
        items = [i for i in ds.get("ContentSequence", [])
                 if i.get("RelationshipType") == "HAS CONCEPT MOD"]
        if not items:
            return None
        sub = Dataset()
        sub.SpecificCharacterSet = ds.get("SpecificCharacterSet", "ISO_IR 6")
        sub.ContentSequence = Sequence(items)
        return records.encode_element(sub, tag)
    if rtype == "SR DOCUMENT" and ds.get("VerificationFlag") == "VERIFIED":
        return _verification_datetime(ds, check)
    return None


def _verification_datetime(ds: Dataset, check: _Checker) -> bytes:
    """Verification DateTime of a VERIFIED SR document's record (PS3.3 F.5.24, 1C): the
    latest valid one among the Verifying Observers (PS3.3 C.17.2: one item per verifier);
    without any, derived by the rule in fill_rules.json; reported unless it is the last
    observer's, as dcmtk takes it."""
    from . import values

    tag = 0x0040A030
    observers = list(ds.get("VerifyingObserverSequence") or [])
    found = []
    for i, observer in enumerate(observers):
        element = records.encode_element(observer, tag)
        text = records.value_text(element) if element else ""
        moment = values.instant(text) if element and records.check_element(
            tag, element, ()).element == element else None
        if moment is not None:
            found.append((moment, i, element))
    if found:
        _moment, i, element = max(found)
        if i != len(observers) - 1:
            check.fixes.append(("VerificationDateTime", records.value_text(element),
                                "taken from the latest Verifying Observer that has a valid "
                                "one (PS3.3 F.5.24)"))
        return element
    rule = records.fill_rules()["VerificationDateTime"]
    value, why = rule["default"], "the default of fill_rules.json"
    for date_kw, time_kw in rule["datetime_from"]:
        date, time = ds.get(date_kw), ds.get(time_kw)
        text = f"{date or ''}{time or ''}".strip()
        if date and values.instant(text) is not None and records.check_element(
                tag, records.encode_text(tag, "DT", text.encode("ascii", "replace")),
                ()).element is not None:
            value, why = text, f"{date_kw} and {time_kw}"
            break
    check.fixes.append(("VerificationDateTime", value, "VERIFIED, but no Verifying Observer "
                        f"has a valid Verification DateTime; derived from {why} "
                        "(fill_rules.json)"))
    return records.encode_text(tag, "DT", value.encode("ascii"))


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
        found = (isosource.resolve(path, parts) if not os.path.lexists(path)
                 else _resolve(base, parts))
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
    follow_links: bool = False,
    on_conflict: str = "refuse",
    observer: Observer | None = None,
) -> IntakeResult:
    """Scan inputs (files and folders, recursively) and return instances and problems.
    on_conflict: what to do with different objects that share a SOP Instance UID.
    observer: told the walked files, then every instance as it is scanned (before merging:
    the result says which are kept), so a writer can start while the scan runs."""
    inputs = list(inputs)
    images = [i for i in inputs if isosource.is_image(i)]  # read in place (isosource)
    walk = expand([i for i in inputs if i not in images], follow_links=follow_links)
    paths = walk.files
    damaged: list[Problem] = []
    for image in images:
        try:
            inside, damage = isosource.members(image)
        except MediaError as exc:  # pycdlib cannot read it: no file of it can be read
            damaged.append(Problem(str(image), "invalid",
                                   str(exc).removeprefix(f"{image.name}: ")))
            continue
        paths += inside
        damaged += [Problem(p, "invalid", why) for p, why in damage]
        st = os.stat(image)
        walk.walked.add((st.st_dev, st.st_ino))  # no output may be written over the image
    result = IntakeResult([], [p for p in walk.problems if p.kind in ("not-dicom", "link")],
                          [p for p in walk.problems if p.kind == "invalid"] + damaged, [], 0,
                          walked=walk.walked)
    if observer is not None:
        observer.walked(paths)  # members of an image included: they are no plain files
    seen: set[str] | None = None  # real paths scanned: made when a DICOMDIR first asks
    merger = _Merger(result, profile, on_conflict)
    shared: dict = {}
    queue = paths
    while queue:
        extra: list[str] = []
        for item in _scan_all(queue, profile, progress, cancel, workers):
            result.files_seen += 1
            if isinstance(item, DirectoryIndex):
                if seen is None:
                    seen = {os.path.realpath(p) for p in paths}
                result.indexes.append(item)
                result.invalid.extend(
                    Problem(m, "missing", f"referenced by {item.path} but not found")
                    for m in item.missing
                )
                result.invalid.extend(
                    Problem(item.path, "invalid", f"references {r!r}, which is not a File ID "
                            "inside its File-set (PS3.10 8.2, 8.6)") for r in item.refused
                )
                _add_identity(result.walked, os.path.dirname(item.path))  # its File-set
                for ref in item.referenced:
                    _add_identity(result.walked, ref)
                    if os.path.realpath(ref) not in seen:
                        seen.add(os.path.realpath(ref))
                        extra.append(ref)
            elif isinstance(item, Problem):
                (result.ignored if item.kind == "not-dicom" else result.invalid).append(item)
            else:
                merger.add(_compact(item, shared))
                if observer is not None:
                    observer.add(item)
        queue = extra
    merger.finish()
    return result


def _add_identity(walked: set[tuple[int, int]], path: str) -> None:
    """A folder or file read as input: no output may be written over or into it."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        walked.add((st.st_dev, st.st_ino))


#: string fields that repeat from instance to instance (a series' UIDs, the SOP Class ...)
_REPEATED = ("sop_class_uid", "transfer_syntax", "record_type", "patient_id", "study_uid",
             "series_uid", "series_number", "instance_number", "created", "dataset_start",
             "pixel_data_offset")
#: list fields that are empty for nearly every instance
_MOSTLY_EMPTY = ("filled", "fixes", "repairs", "duplicates")


def _compact(inst: Instance, shared: dict) -> Instance:
    """An instance from a worker arrives with its own copy of every value: the values that
    repeat (strings, offsets, the device number) are shared, one object per distinct value,
    and empty lists become the one empty tuple. What remains per instance is its own (its
    path, UID, leaf keys): about 0.8 KB less an instance (BENCHMARKS.md)."""
    for name in _REPEATED:
        value = getattr(inst, name)
        setattr(inst, name, shared.setdefault(value, value))
    for name in _MOSTLY_EMPTY:
        if not getattr(inst, name):
            setattr(inst, name, ())
    dev, ino, size, mtime, ctime = inst.stamp  # (a file inside an image: the image's)
    if size == inst.size:
        inst.size = size
    inst.stamp = (shared.setdefault(dev, dev), ino, size, mtime, ctime)
    return inst


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
    with workers_mod.pool(workers) as pool:
        results = pool.map(scan_file, paths, [profile] * total, chunksize=32)
        yield from _tick(results, total, progress, cancel)


def _tick(results: Iterable, total: int, progress: ProgressFn | None, cancel: Event | None):
    for done, item in enumerate(results, 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled during intake")
        if progress:
            progress("scan", done, total)
        yield item


class Observer(Protocol):
    """What scan tells while it runs (mastering.earlyiso.EarlyImage)."""

    def walked(self, paths: list[str]) -> None: ...

    def add(self, inst: Instance) -> None: ...


class Observers:
    """Several observers as one (the early image or folder, the early renderings)."""

    def __init__(self, *items: Observer | None):
        self.items = [i for i in items if i is not None]

    def walked(self, paths: list[str]) -> None:
        for item in self.items:
            item.walked(paths)

    def add(self, inst: Instance) -> None:
        for item in self.items:
            item.add(inst)


ON_CONFLICT = ("refuse", "skip", "newest")


class _Merger:
    """Merges copies of one object; different objects with one SOP Instance UID conflict.

    Copies are found by value (:mod:`mastering.sameness`: any two encodings of one data set),
    and the copy the profile takes as it is is the one kept. Conflicts follow the policy:
    refuse (every file is invalid input), skip (all left out) or newest (the latest Instance
    Creation Date/Time, else the latest file, is kept); each is reported with every file.

    Also keeps the PATIENT/STUDY/SERIES keys only once per series, so memory per instance is
    its leaf record and identity, not its whole header.
    """

    def __init__(self, result: IntakeResult, profile: Profile | None = None,
                 policy: str = "refuse"):
        if policy not in ON_CONFLICT:
            raise ValueError(f"on-conflict policy {policy!r}: one of {', '.join(ON_CONFLICT)}")
        self.result, self.profile, self.policy = result, profile, policy
        self.by_uid: dict[str, Instance] = {}
        #: the distinct objects of a UID, when there is more than one (first = by_uid's)
        self.variants: dict[str, list[Instance]] = {}
        self.series_first: dict[tuple[str, str, str], Instance] = {}

    def add(self, inst: Instance) -> None:
        other = self.by_uid.get(inst.sop_instance_uid)
        if other is None:
            self.by_uid[inst.sop_instance_uid] = inst
            self._share_levels(inst)
            return
        group = self.variants.get(inst.sop_instance_uid, [other])
        for i, known in enumerate(group):
            if sameness.same_object(known.path, inst.path, open_source):
                group[i] = self._merge(known, inst)
                return
        group.append(inst)
        self.variants[inst.sop_instance_uid] = group

    def _merge(self, known: Instance, inst: Instance) -> Instance:
        """One object twice: keep the copy that can go onto the medium as it is."""
        if not (self._as_is(inst) and not self._as_is(known)):
            known.duplicates = [*known.duplicates, inst.path]
            return known
        inst.duplicates = [*known.duplicates, known.path]
        if self.by_uid.get(known.sop_instance_uid) is known:
            self._replace(known, inst)
        return inst

    def _as_is(self, inst: Instance) -> bool:
        return (self.profile is not None and self.profile.allows(inst.transfer_syntax)
                and inst.meta_complete)

    def _replace(self, old: Instance, new: Instance) -> None:
        """new takes old's place, including the series keys old may carry."""
        self.by_uid[old.sop_instance_uid] = new
        key = (old.patient_id, old.study_uid, old.series_uid)
        if self.series_first.get(key) is old:
            for level in records.LEVELS:
                new.keys[level] = old.keys.get(level, {})
            self.series_first[key] = new
        else:
            for level in records.LEVELS:
                new.keys.pop(level, None)

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
        for uid, group in self.variants.items():
            if len(group) > 1:
                self._conflict(uid, group)
        self.result.instances = list(self.by_uid.values())

    def _conflict(self, uid: str, group: list[Instance]) -> None:
        kept = _newest(group) if self.policy == "newest" else None
        tie = self.policy == "newest" and kept is None
        files = [p for inst in group for p in (inst.path, *inst.duplicates)]
        self.result.conflicts.append({"uid": uid, "policy": self.policy, "files": files,
                                      "kept": kept.path if kept else None,
                                      **({"tie": True} if tie else {})})
        current = self.by_uid.pop(uid)
        if kept is not None:
            self.by_uid[uid] = current
            if kept is not current:
                self._swap_in(current, kept)
        else:
            self._unshare(current)
        for inst in group:
            if inst is kept:
                continue
            for path in (inst.path, *inst.duplicates):
                others = ", ".join(p for p in files if p != path)
                reason = (f"SOP Instance UID {uid} is also used by a different object in "
                          f"{others}")
                if kept is not None:
                    reason += f"; --on-conflict newest kept {kept.path}"
                elif tie:
                    reason += ("; --on-conflict newest cannot choose: the same Instance "
                               "Creation Date/Time and the same file time")
                elif self.policy == "skip":
                    reason += "; left out (--on-conflict skip)"
                problem = Problem(path, "conflict", reason)
                (self.result.invalid if self.policy == "refuse" or tie
                 else self.result.left_out).append(problem)

    def _swap_in(self, current: Instance, kept: Instance) -> None:
        """A later variant wins: it becomes the instance of its own series."""
        self._unshare(current)
        self.by_uid[kept.sop_instance_uid] = kept
        self._share_levels(kept)

    def _unshare(self, inst: Instance) -> None:
        """A conflicting instance leaves; if it carried its series' keys, hand them on."""
        key = (inst.patient_id, inst.study_uid, inst.series_uid)
        if self.series_first.get(key) is not inst:
            return
        heir = next((i for i in self.by_uid.values()
                     if i is not inst and (i.patient_id, i.study_uid, i.series_uid) == key),
                    None)
        del self.series_first[key]
        if heir is not None:
            for level in records.LEVELS:
                heir.keys[level] = inst.keys[level]
            self.series_first[key] = heir


def _newest(group: list[Instance]) -> Instance | None:
    """The variant with the latest Instance Creation Date/Time in UTC (PS3.3 C.12.1); a
    variant with one beats a variant without; among equals (or none dated) the latest file
    (modification time). None when that still leaves more than one: a tie is not guessed."""
    def rank(inst: Instance) -> tuple[bool, str, int]:
        return bool(inst.created), inst.created, inst.stamp[3]

    best = max(rank(i) for i in group)
    top = [i for i in group if rank(i) == best]
    return top[0] if len(top) == 1 else None


def same_object(a: str, b: str) -> bool:
    """True if two files hold the same data set, in whatever encodings (see sameness)."""
    return sameness.same_object(a, b, open_source)


def open_source(path: str) -> BinaryIO:
    """A readable, seekable stream of an input file (a plain file or one inside an image)."""
    return isosource.open_any(path)
