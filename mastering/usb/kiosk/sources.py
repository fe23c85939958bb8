"""Where the kiosk's studies come from: a small interface, :class:`StudySource`.

Implemented: :class:`FolderSource`, every study below a configured folder, found by the core's
intake (headers only). Extension point: the burning daemon's spool and queue (issue 8) become
one more ``StudySource`` whose :meth:`~StudySource.studies` lists the spooled studies and whose
:meth:`~StudySource.files` returns their files; the kiosk needs nothing else from it, so the
daemon's spool layout stays the daemon's business. Register it in :func:`from_config`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ... import intake
from ...profiles import Profile
from ..devices import human_size

log = logging.getLogger(__name__)


@dataclass
class Study:
    """One study offered for export (shown to the staff; never logged)."""

    id: str  # stable key for the page: source + Study Instance UID, hashed
    source: str
    patient_name: str
    patient_id: str
    birth_date: str
    date: str
    description: str
    modalities: list[str]
    images: int
    bytes: int
    files: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"id": self.id, "source": self.source, "patient_name": person(self.patient_name),
                "patient_id": self.patient_id, "birth_date": _date(self.birth_date),
                "date": _date(self.date), "description": self.description,
                "modalities": self.modalities, "images": self.images,
                "size_text": human_size(self.bytes)}


def person(name: str) -> str:
    """A DICOM PN (Family^Given^Middle^Prefix^Suffix, first component group) as people write
    it: 'DOE, JANE'."""
    parts = [p.strip() for p in name.split("=", 1)[0].split("^")]
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix, suffix = parts[:5]
    rest = " ".join(p for p in (prefix, given, middle) if p)
    text = f"{family}, {rest}" if family and rest else family or rest
    return f"{text}, {suffix}" if suffix else text


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() \
        else value


class StudySource(ABC):
    """Something that offers studies for export."""

    name: str

    @abstractmethod
    def studies(self) -> list[Study]:
        """The studies available now."""

    @abstractmethod
    def refresh(self) -> None:
        """Look again (the source changed)."""

    def files(self, study: Study) -> list[Path]:
        return [Path(f) for f in study.files]


class FolderSource(StudySource):
    """Every study in the DICOM files below one folder."""

    def __init__(self, folder: Path, profile: Profile):
        self.folder, self.profile, self.name = folder, profile, folder.name or str(folder)
        self._studies: list[Study] = []
        self._lock = threading.Lock()

    def studies(self) -> list[Study]:
        with self._lock:
            return list(self._studies)

    def refresh(self) -> None:
        if not self.folder.is_dir():
            log.warning("study folder %s does not exist", self.folder)
            found: list[Study] = []
        else:
            scanned = intake.scan([self.folder], self.profile, workers=1)
            found = self._group(scanned.instances)
        with self._lock:
            self._studies = found

    def _group(self, instances: list[intake.Instance]) -> list[Study]:
        by_study: dict[str, list[intake.Instance]] = defaultdict(list)
        for inst in instances:
            by_study[inst.study_uid].append(inst)
        out = []
        for uid, items in by_study.items():
            head = pydicom.dcmread(items[0].path, stop_before_pixels=True, force=True)
            key = hashlib.sha256(f"{self.folder}\x1f{uid}".encode()).hexdigest()[:16]
            modalities = sorted({str(pydicom.dcmread(i.path, stop_before_pixels=True,
                                                     force=True, specific_tags=["Modality"])
                                     .get("Modality", "")) for i in _one_per_series(items)})
            out.append(Study(
                id=key, source=self.name, patient_name=str(head.get("PatientName", "")),
                patient_id=str(head.get("PatientID", "")),
                birth_date=str(head.get("PatientBirthDate", "")),
                date=str(head.get("StudyDate", "")),
                description=str(head.get("StudyDescription", "")),
                modalities=[m for m in modalities if m], images=len(items),
                bytes=sum(i.size for i in items), files=[i.path for i in items]))
        return sorted(out, key=lambda s: (s.patient_name, s.date, s.id))


def _one_per_series(items: list[intake.Instance]) -> list[intake.Instance]:
    seen: dict[str, intake.Instance] = {}
    for inst in items:
        seen.setdefault(inst.series_uid, inst)
    return list(seen.values())


def from_config(folders: tuple[Path, ...], profile: Profile) -> list[StudySource]:
    """The configured sources (the daemon's spool will be added here as its own source)."""
    return [FolderSource(f, profile) for f in folders]
