"""Plan: apply a profile's rules to the scanned instances.

Builds the PATIENT/STUDY/SERIES tree in a deterministic order, assigns File IDs (PS3.10 8.2: up
to 8 components of 1-8 characters A-Z 0-9 _; we use 5, no patient data in them), numbers the
running keys instances lack, decides per file how it reaches the medium (as it is, with a new
meta header, or transcoded) and splits the content into volumes that fit the medium, each a
self-contained File-set (PS3.11: spanning is not supported).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import records
from .intake import PATIENT_CONSISTENT, Instance
from .profiles import Profile

SECTOR = 2048
#: ISO 9660 system area (16 sectors), PVD, terminator, path tables and root: a safe floor.
ISO_BASE_SECTORS = 32
#: a directory record is 33 bytes + name (+ pad); 8.3 names and ";1" keep it under 48
DIR_RECORD_BYTES = 48
#: structural elements of a directory record item (offsets, flags, type, file ID, UIDs)
RECORD_OVERHEAD = 320


class PlanError(ValueError):
    """The content cannot be placed on the medium under the profile's rules."""


@dataclass(slots=True)
class FileEntry:
    """One instance on the medium."""

    instance: Instance
    action: str  # "copy" | "remeta" | "reencode" | "transcode" | "existing" (on the medium)
    out_size: int  # bytes on the medium (known after staging for transcoded files)
    file_id: tuple[str, ...] = ()
    staged: str | None = None  # path of the transcoded copy
    out_ts: str = ""
    web: object | None = None  # pdi.Piece: this instance's web content (with --viewer)
    web_bytes: int = 0  # what that web content takes on the medium
    head: bytes = b""  # "reencode": new meta and header, then the source's pixel data
    pixel_range: tuple[int, int] = (0, 0)  # "reencode": (offset, length) in the source


@dataclass
class Series:
    uid: str
    keys: dict[int, bytes]
    entries: list[FileEntry] = field(default_factory=list)


@dataclass
class Study:
    uid: str
    keys: dict[int, bytes]
    series: list[Series] = field(default_factory=list)


@dataclass
class Patient:
    id: str
    keys: dict[int, bytes]
    studies: list[Study] = field(default_factory=list)


@dataclass
class Volume:
    """One self-contained File-set, one medium."""

    index: int
    count: int
    fileset_id: str
    fileset_uid: str
    patients: list[Patient]
    root_entries: list[FileEntry]  # root-level records (hanging protocols, palettes, ...)

    def entries(self) -> list[FileEntry]:
        """Files in DICOMDIR order (which is also their order on the medium)."""
        out = [e for p in self.patients for st in p.studies for se in st.series for e in se.entries]
        return out + self.root_entries

    @property
    def content_bytes(self) -> int:
        return sum(e.out_size for e in self.entries())


def action_for(inst: Instance, profile: Profile) -> str:
    if inst.on_medium:
        return "existing"  # already in the File-set being updated: never rewritten
    if not profile.allows(inst.transfer_syntax):
        return "transcode"
    return "copy" if inst.meta_complete else "remeta"


# -- tree -----------------------------------------------------------------------------------


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")


def build_tree(
    instances: Iterable[Instance], profile: Profile, warnings: list[str] | None = None,
    conflicts: list[tuple[str, str]] | None = None,
) -> tuple[list[Patient], list[FileEntry]]:
    """Group instances into a sorted patient tree; root-level instances come back apart.
    Files that disagree on a patient's name or birth date under one Patient ID are reported in
    warnings (without the values): the record takes the first file's. A Series Instance UID
    must have one SERIES record per File-set (PS3.3 F.5.3): a file that puts a series under
    another patient or study is left out and listed in conflicts as (path, reason)."""
    warnings = [] if warnings is None else warnings
    conflicts = [] if conflicts is None else conflicts
    first_file: dict[str, str] = {}
    series_home: dict[str, tuple[str, str, str]] = {}  # series UID -> (patient, study, path)
    study_home: dict[str, tuple[str, str]] = {}  # study UID -> (patient, path)
    patients: dict[str, Patient] = {}
    studies: dict[tuple[str, str], Study] = {}
    series: dict[tuple[str, str, str], Series] = {}
    roots: list[FileEntry] = []
    for inst in instances:
        entry = FileEntry(inst, action_for(inst, profile), inst.size)
        if records.is_root_level(inst.record_type):
            roots.append(entry)
            continue
        pk, sk, ek = inst.patient_id, (inst.patient_id, inst.study_uid), (
            inst.patient_id, inst.study_uid, inst.series_uid)
        home = series_home.setdefault(inst.series_uid, (*sk, inst.path))
        if home[:2] != sk:
            conflicts.append((inst.path, f"Series Instance UID {inst.series_uid} is also in "
                              f"{home[2]} under another patient or study"))
            continue
        owner = study_home.setdefault(inst.study_uid, (pk, inst.path))
        if owner[0] != pk and owner[1] != "":
            warnings.append(f"{inst.path}: Study Instance UID {inst.study_uid} is also in "
                            f"{owner[1]} under another Patient ID; each gets a STUDY record")
            study_home[inst.study_uid] = (owner[0], "")  # say it once
        if pk not in patients:
            patients[pk] = Patient(pk, {})
        if sk not in studies:
            studies[sk] = Study(inst.study_uid, {})
            patients[pk].studies.append(studies[sk])
        if ek not in series:
            series[ek] = Series(inst.series_uid, {})
            studies[sk].series.append(series[ek])
        first_file.setdefault(pk, inst.path)
        _check_patient(patients[pk], inst, first_file[pk], warnings)
        for level, node in (("PATIENT", patients[pk]), ("STUDY", studies[sk]),
                            ("SERIES", series[ek])):
            for tag, enc in inst.keys.pop(level, {}).items():
                node.keys.setdefault(tag, enc)
        series[ek].entries.append(entry)
    tree = sorted(patients.values(), key=lambda p: p.id)
    for patient in tree:
        patient.studies.sort(key=lambda s: (_text(s.keys, 0x00080020), _text(s.keys, 0x00080030),
                                            s.uid))
        for study in patient.studies:
            _number_series(study)
            for se in study.series:
                _number_instances(se)
    roots.sort(key=lambda e: e.instance.sop_instance_uid)
    return tree, roots


def _check_patient(patient: Patient, inst: Instance, first: str, warnings: list[str]) -> None:
    mine = inst.keys.get("PATIENT", {})
    for tag, name in PATIENT_CONSISTENT.items():
        a, b = patient.keys.get(tag), mine.get(tag)
        if a is not None and b is not None and a[8:].rstrip(b" ") != b[8:].rstrip(b" "):
            warnings.append(f"{inst.path}: {name} differs from {first} under the same Patient "
                            "ID; the directory record keeps the first")


def _text(keys: dict[int, bytes], tag: int) -> str:
    enc = keys.get(tag)
    if not enc:
        return ""
    return enc[8:].decode("latin-1").strip(" \0")


def _number_series(study: Study) -> None:
    """Sort series by number then UID; number the ones without a Series Number."""
    study.series.sort(key=lambda s: (_num(s.entries[0].instance.series_number), s.uid))
    taken = [int(_num(s.entries[0].instance.series_number)) for s in study.series
             if _num(s.entries[0].instance.series_number) != float("inf")]
    nxt = max(taken, default=0) + 1
    for se in study.series:
        if 0x00200011 in se.keys:
            continue
        se.keys[0x00200011] = records.encode_value(0x00200011, str(nxt))
        for e in se.entries:
            _report_fill(e.instance, "SeriesNumber", str(nxt))
        nxt += 1


def _number_instances(series: Series) -> None:
    series.entries.sort(key=lambda e: (_num(e.instance.instance_number),
                                       e.instance.sop_instance_uid))
    numbers = [_num(e.instance.instance_number) for e in series.entries]
    nxt = int(max((n for n in numbers if n != float("inf")), default=0)) + 1
    for entry in series.entries:
        if not any(k == "InstanceNumber" and not v for k, v in entry.instance.filled):
            continue
        leaf = records.split(entry.instance.leaf)
        leaf[0x00200013] = records.encode_value(0x00200013, str(nxt))
        entry.instance.leaf = records.concatenate(leaf)
        _report_fill(entry.instance, "InstanceNumber", str(nxt))
        nxt += 1


def _report_fill(inst: Instance, keyword: str, value: str) -> None:
    inst.filled = [(k, value if k == keyword and not v else v) for k, v in inst.filled]


# -- File IDs -------------------------------------------------------------------------------


def assign_file_ids(volume: Volume, profile: Profile) -> None:
    """DICOM/PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn, counters in DICOMDIR order, so a name-sorted
    ISO 9660 directory walk puts the data on the disc in DICOMDIR order."""
    for p, patient in enumerate(volume.patients):
        for s, study in enumerate(patient.studies):
            for e, se in enumerate(study.series):
                folder = ("DICOM", f"PT{p:06d}", f"ST{s:06d}", f"SE{e:06d}")  # one per series
                for i, entry in enumerate(se.entries):
                    entry.file_id = (*folder, f"IM{i:06d}")
    for i, entry in enumerate(volume.root_entries):
        entry.file_id = ("DICOM", "ROOTRECS", f"OB{i:06d}")
    _check_file_ids(volume, profile)


def _check_file_ids(volume: Volume, profile: Profile) -> None:
    for entry in volume.entries():
        if entry.action == "existing":
            continue  # an updater never renames what is there (verify judges it)
        if len(entry.file_id) > profile.max_components or not all(
            profile.component_ok(c) for c in entry.file_id
        ):
            raise PlanError(f"File ID {'/'.join(entry.file_id)} breaks the profile's naming rules")


def assign_update_ids(volume: Volume, profile: Profile, taken: set[str]) -> None:
    """File IDs for a File-set Updater (PS3.10 8.3): instances already on the medium keep
    theirs; new ones go into folders no file or folder on the medium uses yet (taken: every
    stored path there, '/'-joined and upper case, as FAT compares names), so nothing is
    overwritten and a later reader sees one File ID per file (PS3.11 C.3.3.2)."""
    fresh = _FreshNames(taken)

    def new_entries(series: Series) -> list[FileEntry]:
        return [e for e in series.entries if e.action != "existing"]

    for patient in volume.patients:
        studies = [[se for se in st.series if new_entries(se)] for st in patient.studies]
        studies = [s for s in studies if s]
        if not studies:
            continue
        base = fresh.folder(("DICOM",), "PT")  # a new folder per patient with new files
        for s, series_list in enumerate(studies):
            for e, series in enumerate(series_list):
                for i, entry in enumerate(new_entries(series)):
                    entry.file_id = (*base, f"ST{s:06d}", f"SE{e:06d}", f"IM{i:06d}")
    made_roots = [e for e in volume.root_entries if e.action != "existing"]
    if made_roots:
        base = fresh.folder(("DICOM",), "RR")
        for i, entry in enumerate(made_roots):
            entry.file_id = (*base, f"OB{i:06d}")
    for entry in volume.entries():
        if entry.action == "existing":
            entry.file_id = entry.instance.on_medium
    _check_file_ids(volume, profile)


class _FreshNames:
    """Folder names that nothing on the medium uses (compared ignoring case)."""

    def __init__(self, taken: set[str]):
        self.taken = {t.upper() for t in taken}
        self.counters: dict[tuple[str, ...], int] = {}

    def folder(self, parent: tuple[str, ...], prefix: str) -> tuple[str, ...]:
        n = self.counters.get((*parent, prefix), 0)
        while True:
            path = (*parent, f"{prefix}{n:06d}")
            n += 1
            if "/".join(path) not in self.taken:
                self.counters[(*parent, prefix)] = n
                self.taken.add("/".join(path))
                return path


# -- volumes --------------------------------------------------------------------------------


def _sectors(size: int) -> int:
    return -(-size // SECTOR)


def _entry_cost(entry: FileEntry) -> int:
    """Bytes an instance costs on the medium: its sectors, its record, its directory entry."""
    keys = len(entry.instance.leaf)
    return (_sectors(entry.out_size) * SECTOR + keys + RECORD_OVERHEAD + DIR_RECORD_BYTES
            + entry.web_bytes)


def _node_cost(keys: dict[int, bytes]) -> int:
    """A PATIENT/STUDY/SERIES record plus its directory (one extra sector for the listing),
    and as much again for its twin directory under IHE_PDI/ and its page when there is web
    content (counted for every node: a little generous without it)."""
    return 2 * (sum(len(v) for v in keys.values()) + RECORD_OVERHEAD + 2 * SECTOR
                + DIR_RECORD_BYTES)


def split_volumes(
    tree: list[Patient], roots: list[FileEntry], profile: Profile, *, extra_bytes: int = 0
) -> list[list[Patient] | list[FileEntry]]:
    """Pack series into volumes of the profile's capacity, in DICOMDIR order, keeping a series on
    one volume where it fits. Returns per volume (patients, root entries)."""
    capacity = profile.capacity_bytes
    base = ISO_BASE_SECTORS * SECTOR + extra_bytes + 2 * SECTOR  # + the DICOM/ directory
    if capacity and base > capacity:
        raise PlanError("the profile's capacity is smaller than an empty File-set")
    volumes: list[tuple[list[Patient], list[FileEntry]]] = []
    packer = _Packer(capacity, base)
    for patient in tree:
        for study in patient.studies:
            for se in study.series:
                packer.add_series(patient, study, se)
    for entry in roots:
        packer.add_root(entry)
    volumes = packer.finish()
    return volumes


class _Packer:
    def __init__(self, capacity: int, base: int):
        self.capacity, self.base = capacity, base
        self.volumes: list[tuple[list[Patient], list[FileEntry]]] = []
        self._new()

    def _new(self) -> None:
        self.patients: list[Patient] = []
        self.roots: list[FileEntry] = []
        self.used = self.base
        self.volumes.append((self.patients, self.roots))

    def _empty(self) -> bool:
        return not self.patients and not self.roots

    def _fits(self, cost: int) -> bool:
        return not self.capacity or self.used + cost <= self.capacity

    def _path_cost(self, patient: Patient, study: Study) -> int:
        cost = _node_cost({}) * 1  # the series
        cur_p = self.patients[-1] if self.patients and self.patients[-1].id == patient.id else None
        if cur_p is None:
            cost += _node_cost(patient.keys)
        if cur_p is None or not cur_p.studies or cur_p.studies[-1].uid != study.uid:
            cost += _node_cost(study.keys)
        return cost

    def add_series(self, patient: Patient, study: Study, se: Series) -> None:
        costs = [_entry_cost(e) for e in se.entries]
        whole = sum(costs) + self._path_cost(patient, study) + sum(len(v) for v in se.keys.values())
        if not self._fits(whole) and not self._empty():
            self._new()  # start the series on a fresh volume: keep it whole where it fits
        target = self._place(patient, study, se)
        self.used += self._path_cost_used
        for entry, cost in zip(se.entries, costs, strict=True):
            if not self._fits(cost):
                if not target.entries:
                    raise PlanError(
                        f"{entry.instance.path}: {entry.out_size} bytes do not fit on one medium"
                    )
                self._new()  # the series is larger than a volume: continue it on the next
                target = self._place(patient, study, se)
                self.used += self._path_cost_used
                if not self._fits(cost):
                    raise PlanError(
                        f"{entry.instance.path}: {entry.out_size} bytes do not fit on one medium"
                    )
            target.entries.append(entry)
            self.used += cost

    def _place(self, patient: Patient, study: Study, se: Series) -> Series:
        keys = sum(len(v) for v in se.keys.values())
        self._path_cost_used = self._path_cost(patient, study) + keys
        if not self.patients or self.patients[-1].id != patient.id:
            self.patients.append(Patient(patient.id, patient.keys))
        cur = self.patients[-1]
        if not cur.studies or cur.studies[-1].uid != study.uid:
            cur.studies.append(Study(study.uid, study.keys))
        new = Series(se.uid, se.keys)
        cur.studies[-1].series.append(new)
        return new

    def add_root(self, entry: FileEntry) -> None:
        cost = _entry_cost(entry)
        if not self._fits(cost) and not self._empty():
            self._new()
        if not self._fits(cost):
            raise PlanError(
                f"{entry.instance.path}: {entry.out_size} bytes do not fit on one medium")
        self.roots.append(entry)
        self.used += cost

    def finish(self) -> list[tuple[list[Patient], list[FileEntry]]]:
        return [v for v in self.volumes if v[0] or v[1]]


# -- identifiers ----------------------------------------------------------------------------


def fileset_uid(volume_entries: list[FileEntry], fileset_id: str, index: int,
                reproducible: bool) -> str:
    """The File-set UID (PS3.10 8.6): content-derived when reproducible, else a fresh UUID."""
    if not reproducible:
        return f"2.25.{uuid.uuid4().int}"
    h = hashlib.sha256(f"{fileset_id}\x1f{index}".encode())
    for e in volume_entries:
        h.update(e.instance.sop_instance_uid.encode() + b"\x1f" + "/".join(e.file_id).encode())
    return "2.25." + str(int.from_bytes(h.digest()[:16], "big"))


def volume_fileset_id(base: str, index: int, count: int, limit: int = 16) -> str:
    """The File-set ID of volume index (1-based): base, or base_n when spanning and it fits."""
    if count == 1:
        return base
    suffix = f"_{index}"
    return (base + suffix) if len(base + suffix) <= limit else base
