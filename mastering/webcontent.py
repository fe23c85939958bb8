"""IHE PDI web content ("DICOM PLUS WEB"), INDEX.HTM and README.TXT for one volume.

IHE RAD TF-3 4.47.4.1.2 (Portable Media Creator; Web Content Option), as summarised in the
project's PDI checklist:

* README.TXT and INDEX.HTM in the root of the medium (PDI-07, PDI-08, PDI-09);
* all web content in ``IHE_PDI/`` and nothing else there (PDI-10): XHTML pages, JPEG images,
  the style sheet, the logo and encapsulated PDF documents;
* only what the DICOM content holds (PDI-11); XHTML and JPEG, relative links, nothing loaded
  from outside the medium (PDI-12);
* upper-case ISO 9660 8.3 names everywhere (PDI-13, PS3.12 Annex F), at most 7 components;
* the optional interactive viewer lives in ``VIEWER/``, outside ``DICOM/`` and ``IHE_PDI/``
  (PDI-14), and is never started automatically (PDI-15): every page works without it.

Layout on the medium (the counters are 0-based like the DICOM File IDs of mastering.plan, so
``IHE_PDI/PT000000/ST000001/SE000002`` shows ``DICOM/PT000000/ST000001/SE000002`` when the
patients are passed in volume order)::

    README.TXT, INDEX.HTM
    IHE_PDI/STYLE.CSS, IHE_PDI/LOGO.JPG or LOGO.PNG
    IHE_PDI/PTnnnnnn/STnnnnnn/SEnnnnnn/SERIES.HTM    the series: first image, presets, all images
                                      THUMB.JPG     its thumbnail (shown in INDEX.HTM)
                                      A0000001.HTM  one page per frame; A = the default window,
                                      A0000001.JPG  B, C, ... = further window presets
                                      D0000001.PDF  encapsulated PDF documents
    VIEWER/VIEWER.JS, VIEWER/VIEWER.CSS             the interactive viewer (progressive)

Everything is rendered from Jinja2 templates: a user folder is searched before the bundled
``templates/``; wording comes from ``templates/messages/<language>.toml`` and the site settings.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from threading import Event
from typing import Any

import jinja2
from markupsafe import Markup
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from . import __version__
from .cancel import check
from .content import Range, copy_segments

log = logging.getLogger(__name__)

#: what goes into a file: its bytes, a file to stream them from, or a byte range of a file
#: (a worker's spool file: mastering.pdi)
Content = bytes | Path | Range
#: one file on the medium: its path components and its content
MediumFile = tuple[tuple[str, ...], Content]

SECTOR = 2048
#: an ISO 9660 directory record with an 8.3 name and ";1" stays under 48 bytes
DIR_RECORD_BYTES = 48
#: ISO 9660 Level 1 as pycdlib writes it: at most 7 path components
MAX_COMPONENTS = 7
FILE_NAME = re.compile(r"[A-Z0-9_]{1,8}(\.[A-Z0-9_]{1,3})?")
DIR_NAME = re.compile(r"[A-Z0-9_]{1,8}")
BUNDLED_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
WEB_DIR = "IHE_PDI"
VIEWER_DIR = "VIEWER"
DEFAULT_LETTER = "A"
PRESET_LETTERS = "BCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_VIEWS = 9_999_999
PRODUCT = f"dicom-mastering {__version__}"
#: IHE RAD TF-3 4.47.4.1.2: the label says which kind of PDI medium it is
KIND_WEB, KIND_DICOM = "DICOM PLUS WEB", "DICOM ONLY"
#: C0/C1 controls other than TAB, LF, CR: not allowed in XML 1.0, noise in a text file
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
_AUTOESCAPE = ("htm", "html", "xml", "svg")

PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
RT_PREFIX = "1.2.840.10008.5.1.4.1.1.481."
WAVEFORM_PREFIX = "1.2.840.10008.5.1.4.1.1.9."
ECG_PREFIX = "1.2.840.10008.5.1.4.1.1.9.1."
SR_ITEM_LIMIT = 200
#: Rendering.summary keys shown elsewhere (heading, position), not in the image annotation
ANNOTATION_SKIP = {"rows", "columns", "frames", "modality", "instance_number",
                   "series_description"}
#: ... and not in an image page's details table either
DETAILS_SKIP = {"frames", "instance_number"}


# -- the content model -----------------------------------------------------------------------


@dataclass
class WebImage:
    """One image instance: a JPEG per frame, rendered elsewhere (mastering.render).

    ``presets`` maps further window presets to one JPEG per frame; ``preset`` names the window
    of ``jpegs``; ``windows`` gives a preset's (center, width) where known.
    """

    sop_instance_uid: str
    number: str = ""
    jpegs: list[Content] = field(default_factory=list)
    presets: dict[str, list[Content]] = field(default_factory=dict)
    thumbnail: Content | None = None
    summary: dict[str, str] = field(default_factory=dict)
    preset: str = ""
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    file_id: tuple[str, ...] = ()


@dataclass
class WebObject:
    """A non-image instance (SR, RT, waveform, encapsulated document): listed with a summary;
    an encapsulated PDF is placed on the medium as a .PDF file."""

    kind: str
    title: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    pdf: Content | None = None
    sop_instance_uid: str = ""
    file_id: tuple[str, ...] = ()


@dataclass
class WebSeries:
    uid: str
    number: str = ""
    modality: str = ""
    description: str = ""
    date: str = ""
    time: str = ""
    images: list[WebImage] = field(default_factory=list)
    objects: list[WebObject] = field(default_factory=list)


@dataclass
class WebStudy:
    uid: str
    date: str = ""
    time: str = ""
    description: str = ""
    accession: str = ""
    institution: str = ""
    referring_physician: str = ""
    modalities: list[str] = field(default_factory=list)
    study_id: str = ""
    series: list[WebSeries] = field(default_factory=list)


@dataclass
class WebPatient:
    """Display strings: the name already formatted (:func:`format_name`), dates YYYY-MM-DD."""

    name: str
    id: str
    birth_date: str = ""
    sex: str = ""
    studies: list[WebStudy] = field(default_factory=list)


@dataclass(frozen=True)
class Site:
    """Who makes the media, and how the content reads (``site.toml``, see :func:`load_site`)."""

    institution: str = ""
    department: str = ""
    address: str = ""
    phone: str = ""
    email: str = ""
    language: str = "en"
    logo: Path | None = None
    product: str = PRODUCT
    template_dirs: tuple[Path, ...] = ()
    messages: Mapping[str, str] = field(default_factory=dict)


_SITE_KEYS = {"institution", "department", "address", "phone", "email", "language", "logo",
              "product", "templates", "messages"}


def load_site(path: Path) -> Site:
    """Read site settings from TOML (``.toml``) or JSON; relative paths (``logo``,
    ``templates``) are relative to the file. Unknown keys are refused (typos show up)."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    unknown = set(data) - _SITE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    base = path.parent
    address = data.get("address", "")
    if isinstance(address, list):
        address = "\n".join(str(line) for line in address)
    templates = data.get("templates", [])
    templates = [templates] if isinstance(templates, str) else list(templates)
    logo = data.get("logo")
    site = Site(
        institution=str(data.get("institution", "")), department=str(data.get("department", "")),
        address=str(address), phone=str(data.get("phone", "")), email=str(data.get("email", "")),
        language=str(data.get("language", "en")), logo=base / logo if logo else None,
        product=str(data.get("product", PRODUCT)),
        template_dirs=tuple(base / t for t in templates),
        messages={str(k): str(v) for k, v in dict(data.get("messages", {})).items()},
    )
    check_site(site)
    return site


def check_site(site: Site) -> None:
    """Refuse settings that would break the medium: bad language tag, logo not JPEG/PNG."""
    if not _LANGUAGE.fullmatch(site.language):
        raise ValueError(f"language {site.language!r}: use a tag like 'en' or 'de-CH'")
    if site.logo is not None:
        if logo_name(site.logo) is None:
            raise ValueError(f"logo {site.logo}: must be a .jpg, .jpeg or .png file")
        if not site.logo.is_file():
            raise ValueError(f"logo {site.logo}: no such file")


def logo_name(logo: Path) -> str | None:
    """LOGO.JPG or LOGO.PNG by the logo file's suffix; None for anything else."""
    suffix = logo.suffix.lower()
    return {".jpg": "LOGO.JPG", ".jpeg": "LOGO.JPG", ".png": "LOGO.PNG"}.get(suffix)


# -- values from DICOM ---------------------------------------------------------------------


def format_name(value: object) -> str:
    """A PN value (PS3.5 6.2) for display: each component group (alphabetic = ideographic =
    phonetic) as "Family, Given Middle"; further groups in parentheses."""
    groups = [_format_group(g) for g in str(value or "").split("=")]
    groups = [g for g in groups if g]
    if not groups:
        return ""
    return groups[0] + (f" ({'; '.join(groups[1:])})" if len(groups) > 1 else "")


def _format_group(group: str) -> str:
    family, given, middle, prefix, suffix = ([p.strip() for p in group.split("^")] + [""] * 5)[:5]
    first = " ".join(p for p in (prefix, given, middle) if p)
    name = ", ".join(p for p in (family, first) if p)
    return " ".join(p for p in (name, suffix) if p)


def format_date(value: object) -> str:
    """DA (YYYYMMDD, or the old YYYY.MM.DD) as YYYY-MM-DD; anything else as it is."""
    text = str(value or "").strip()
    digits = text.replace(".", "")
    if len(digits) == 8 and digits.isdigit():
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"
    return text


def format_time(value: object) -> str:
    """TM (HH, HHMM, HHMMSS.FFFFFF, or the old HH:MM:SS) as HH:MM or HH:MM:SS."""
    text = str(value or "").strip().replace(":", "").split(".")[0]
    if not text.isdigit() or len(text) not in (2, 4, 6):
        return str(value or "").strip()
    parts = [text[i:i + 2] for i in range(0, len(text), 2)] + (["00"] if len(text) == 2 else [])
    return ":".join(parts)


def _text(ds: Dataset, keyword: str) -> str:
    """A value as display text ("" when absent); multiple values joined by a backslash."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _values(ds: Dataset, keyword: str) -> list[str]:
    """A multi-valued element (e.g. Modalities in Study) as a list of non-empty strings."""
    value = ds.get(keyword)
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def patient_from_dataset(ds: Dataset) -> WebPatient:
    """Patient module values, names decoded by (0008,0005) Specific Character Set (pydicom)."""
    return WebPatient(name=format_name(ds.get("PatientName")), id=_text(ds, "PatientID"),
                      birth_date=format_date(ds.get("PatientBirthDate")),
                      sex=_text(ds, "PatientSex"))


def study_from_dataset(ds: Dataset) -> WebStudy:
    return WebStudy(
        uid=_text(ds, "StudyInstanceUID"), date=format_date(ds.get("StudyDate")),
        time=format_time(ds.get("StudyTime")), description=_text(ds, "StudyDescription"),
        accession=_text(ds, "AccessionNumber"), institution=_text(ds, "InstitutionName"),
        referring_physician=format_name(ds.get("ReferringPhysicianName")),
        modalities=_values(ds, "ModalitiesInStudy"), study_id=_text(ds, "StudyID"),
    )


def series_from_dataset(ds: Dataset) -> WebSeries:
    return WebSeries(uid=_text(ds, "SeriesInstanceUID"), number=_text(ds, "SeriesNumber"),
                     modality=_text(ds, "Modality"), description=_text(ds, "SeriesDescription"),
                     date=format_date(ds.get("SeriesDate")), time=format_time(ds.get("SeriesTime")))


def image_from_rendering(ds: Dataset, rendering: Any, *,
                         file_id: tuple[str, ...] = ()) -> WebImage:
    """A WebImage from a mastering.render Rendering (``frames``, ``presets``, ``extra``,
    ``thumbnail``, ``summary``), read by attribute so any object of that shape will do."""
    return image_from_values(_text(ds, "SOPInstanceUID"), _text(ds, "InstanceNumber"),
                             rendering, file_id=file_id)


def image_from_values(sop_instance_uid: str, number: str, rendering: Any, *,
                      file_id: tuple[str, ...] = ()) -> WebImage:
    """:func:`image_from_rendering` with the instance's UID and number as text."""
    frames = list(rendering.frames)
    presets = list(getattr(rendering, "presets", []) or [])
    default = str(getattr(frames[0], "preset", "") or "") if frames else ""
    if default == "default" and presets:  # the file's first window: show its name
        default = str(presets[0].name)
    extra = {str(name): [f.jpeg for f in fr]
             for name, fr in dict(getattr(rendering, "extra", {}) or {}).items() if name != default}
    windows = {str(p.name): (float(p.center), float(p.width)) for p in presets}
    return WebImage(
        sop_instance_uid=sop_instance_uid, number=number,
        jpegs=[f.jpeg for f in frames], presets=extra,
        thumbnail=getattr(rendering, "thumbnail", None) or None,
        summary={str(k): str(v) for k, v in dict(getattr(rendering, "summary", {})).items()},
        preset=default, windows=windows, file_id=tuple(file_id))


def object_from_dataset(ds: Dataset, *, file_id: tuple[str, ...] = ()) -> WebObject:
    """A readable summary of a non-image instance: SR content tree, RT plan/structure set/dose,
    waveform channels, encapsulated PDF (PS3.3 A.45.1; the document becomes a .PDF file)."""
    sop = _text(ds, "SOPClassUID")
    if sop == PDF_STORAGE:
        obj = _pdf_object(ds)
    elif sop.startswith(SR_PREFIX):
        obj = _sr_object(ds)
    elif sop.startswith(RT_PREFIX):
        obj = _rt_object(ds)
    elif sop.startswith(WAVEFORM_PREFIX):
        obj = _waveform_object(ds, sop)
    else:
        obj = WebObject(kind=_text(ds, "Modality") or "OBJECT",
                        title=_text(ds, "SeriesDescription") or _sop_name(sop))
    obj.summary = _common_summary(ds, sop) + obj.summary
    obj.sop_instance_uid, obj.file_id = _text(ds, "SOPInstanceUID"), tuple(file_id)
    return obj


def _sop_name(sop: str) -> str:
    return UID(sop).name if sop else ""


def _common_summary(ds: Dataset, sop: str) -> list[tuple[str, str]]:
    date = format_date(ds.get("ContentDate") or ds.get("InstanceCreationDate"))
    time = format_time(ds.get("ContentTime") or ds.get("InstanceCreationTime"))
    items = [("Object", _sop_name(sop)), ("Date", f"{date} {time}".strip())]
    return [(k, v) for k, v in items if v]


def _meaning(seq: Any) -> str:
    return str(seq[0].get("CodeMeaning", "")) if seq else ""


def _pdf_object(ds: Dataset) -> WebObject:
    data = bytes(ds.get("EncapsulatedDocument") or b"")
    length = ds.get("EncapsulatedDocumentLength")
    if length:
        data = data[:int(length)]
    elif data.endswith(b"\0"):
        data = data[:-1]  # the pad byte to even length (PS3.5 7.1.1)
    summary = [("MIME type", _text(ds, "MIMETypeOfEncapsulatedDocument") or "application/pdf"),
               ("Size", _size_text(len(data)))]
    return WebObject(kind="PDF", title=_text(ds, "DocumentTitle") or _meaning(
        ds.get("ConceptNameCodeSequence")) or "PDF", summary=summary, pdf=data or None)


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    return f"{size / 1024:.0f} KiB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MiB"


def _sr_object(ds: Dataset) -> WebObject:
    """PS3.3 C.17.3: document title from the root concept name, then the content tree."""
    summary = [(k, _text(ds, kw)) for k, kw in (("Completion", "CompletionFlag"),
                                                ("Verification", "VerificationFlag"))]
    items: list[tuple[str, str]] = []
    _sr_items(ds.get("ContentSequence") or [], 0, items)
    return WebObject(kind="SR", title=_meaning(ds.get("ConceptNameCodeSequence"))
                     or _text(ds, "SeriesDescription") or "Structured report",
                     summary=[(k, v) for k, v in summary if v] + items)


def _sr_items(seq: Iterable[Dataset], depth: int, out: list[tuple[str, str]]) -> None:
    for item in seq:
        if len(out) >= SR_ITEM_LIMIT:
            return
        name = _meaning(item.get("ConceptNameCodeSequence"))
        value = _sr_value(item)
        if name or value:
            out.append(("\u203a " * depth + name, value))
        _sr_items(item.get("ContentSequence") or [], depth + 1, out)


def _sr_value(item: Dataset) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return _text(item, "TextValue")
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        mv = item.get("MeasuredValueSequence") or []
        if not mv:
            return ""
        units = mv[0].get("MeasurementUnitsCodeSequence") or []
        unit = str(units[0].get("CodeValue", "")) if units else ""
        return f"{mv[0].get('NumericValue', '')} {unit}".strip()
    if kind == "DATE":
        return format_date(item.get("Date"))
    if kind == "TIME":
        return format_time(item.get("Time"))
    if kind == "DATETIME":
        value = _text(item, "DateTime")
        return f"{format_date(value[:8])} {format_time(value[8:14])}".strip()
    if kind == "PNAME":
        return format_name(item.get("PersonName"))
    if kind == "UIDREF":
        return _text(item, "UID")
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        refs = item.get("ReferencedSOPSequence") or []
        return _sop_name(str(refs[0].get("ReferencedSOPClassUID", ""))) if refs else ""
    return ""


def _rt_object(ds: Dataset) -> WebObject:
    modality = _text(ds, "Modality")
    kind = {"RTPLAN": "RT PLAN", "RTSTRUCT": "RT STRUCT", "RTDOSE": "RT DOSE",
            "RTRECORD": "RT RECORD", "RTIMAGE": "RT IMAGE"}.get(modality, modality or "RT")
    summary: list[tuple[str, str]] = []
    if modality == "RTPLAN":
        summary = _rt_plan(ds)
    elif modality == "RTSTRUCT":
        rois = [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence") or []]
        summary = [("Label", _text(ds, "StructureSetLabel")), ("ROIs", ", ".join(rois))]
    elif modality == "RTDOSE":
        summary = [("Dose units", _text(ds, "DoseUnits")), ("Dose type", _text(ds, "DoseType")),
                   ("Summation", _text(ds, "DoseSummationType"))]
    title = (_text(ds, "RTPlanLabel") or _text(ds, "StructureSetLabel")
             or _text(ds, "SeriesDescription") or _sop_name(_text(ds, "SOPClassUID")))
    return WebObject(kind=kind, title=title, summary=[(k, v) for k, v in summary if v])


def _rt_plan(ds: Dataset) -> list[tuple[str, str]]:
    beams = ds.get("BeamSequence") or ds.get("IonBeamSequence") or []
    groups = ds.get("FractionGroupSequence") or []
    fractions = str(groups[0].get("NumberOfFractionsPlanned", "")) if groups else ""
    doses = [f"{float(d.TargetPrescriptionDose):g}" for d in ds.get("DoseReferenceSequence") or []
             if d.get("TargetPrescriptionDose") is not None]
    return [("Plan", _text(ds, "RTPlanName")), ("Plan date", format_date(ds.get("RTPlanDate"))),
            ("Intent", _text(ds, "PlanIntent")), ("Beams", str(len(beams)) if beams else ""),
            ("Fractions", fractions), ("Prescription (Gy)", ", ".join(doses)),
            ("Approval", _text(ds, "ApprovalStatus"))]


def _waveform_object(ds: Dataset, sop: str) -> WebObject:
    """PS3.3 C.10.9: per multiplex group the channels, sampling rate and duration."""
    summary: list[tuple[str, str]] = []
    for n, group in enumerate(ds.get("WaveformSequence") or [], 1):
        channels = int(group.get("NumberOfWaveformChannels", 0) or 0)
        samples = int(group.get("NumberOfWaveformSamples", 0) or 0)
        rate = float(group.get("SamplingFrequency", 0) or 0)
        labels = [_meaning(c.get("ChannelSourceSequence"))
                  for c in group.get("ChannelDefinitionSequence") or []]
        seconds = f", {samples / rate:.1f} s" if rate else ""
        summary.append((f"Group {n}", f"{channels} channels, {rate:g} Hz{seconds}"))
        if any(labels):
            summary.append((f"Group {n} channels", ", ".join(x for x in labels if x)))
    kind = "ECG" if sop.startswith(ECG_PREFIX) or _text(ds, "Modality") == "ECG" else "WAVEFORM"
    return WebObject(kind=kind, title=_text(ds, "SeriesDescription") or _sop_name(sop),
                     summary=summary)


class Collector:
    """Groups instances into patients, studies and series in the order they are added (add
    them in DICOMDIR order so the web counters match the DICOM File IDs).

    With ``spool`` set, JPEG bytes are written to files in that folder and kept as paths, so a
    large volume does not hold every JPEG in memory.
    """

    def __init__(self, spool: Path | None = None):
        self._spool = spool
        self._count = 0
        self.patients: list[WebPatient] = []
        self._patients: dict[str, WebPatient] = {}
        self._studies: dict[tuple[str, str], WebStudy] = {}
        self._series: dict[tuple[str, str, str], WebSeries] = {}

    def add(self, ds: Dataset, rendering: Any = None, *, file_id: tuple[str, ...] = ()) -> None:
        """Add one instance; with a rendering that has frames it is an image, else an object."""
        series = self._series_for(ds)
        if rendering is not None and list(rendering.frames):
            image = image_from_rendering(ds, rendering, file_id=file_id)
            self._spool_image(image)
            series.images.append(image)
        else:
            obj = object_from_dataset(ds, file_id=file_id)
            if obj.pdf is not None:
                obj.pdf = self._keep(obj.pdf, "PDF")
            series.objects.append(obj)

    def _series_for(self, ds: Dataset) -> WebSeries:
        pid, suid, euid = (_text(ds, "PatientID"), _text(ds, "StudyInstanceUID"),
                           _text(ds, "SeriesInstanceUID"))
        if pid not in self._patients:
            self._patients[pid] = patient_from_dataset(ds)
            self.patients.append(self._patients[pid])
        if (pid, suid) not in self._studies:
            self._studies[pid, suid] = study_from_dataset(ds)
            self._patients[pid].studies.append(self._studies[pid, suid])
        study = self._studies[pid, suid]
        if (pid, suid, euid) not in self._series:
            self._series[pid, suid, euid] = series_from_dataset(ds)
            study.series.append(self._series[pid, suid, euid])
        series = self._series[pid, suid, euid]
        if series.modality and series.modality not in study.modalities:
            study.modalities.append(series.modality)
        return series

    def _spool_image(self, image: WebImage) -> None:
        image.jpegs = [self._keep(j, "JPG") for j in image.jpegs]
        image.presets = {k: [self._keep(j, "JPG") for j in v] for k, v in image.presets.items()}
        if image.thumbnail is not None:
            image.thumbnail = self._keep(image.thumbnail, "JPG")

    def _keep(self, content: Content, suffix: str) -> Content:
        if self._spool is None or not isinstance(content, bytes):
            return content
        self._count += 1
        path = self._spool / f"{self._count:08d}.{suffix}"
        path.write_bytes(content)
        return path


# -- layout: which file holds what -----------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A window preset of a series: its letter in file names, its name, its window values."""

    letter: str
    name: str
    title: str = ""


@dataclass(frozen=True)
class View:
    """One frame of one image: ``A0000001.HTM`` / ``.JPG`` and the same stem for presets."""

    n: int
    image: WebImage
    frame: int
    frames: int
    annotation: str
    letters: tuple[str, ...]
    details: tuple[tuple[str, str], ...] = ()

    @property
    def stem(self) -> str:
        return f"{self.n:07d}"

    def page(self, letter: str = DEFAULT_LETTER) -> str:
        return f"{letter}{self.stem}.HTM"

    def jpeg_name(self, letter: str = DEFAULT_LETTER) -> str:
        """The JPEG shown for a preset: the default one where the image lacks that preset."""
        shown = letter if letter == DEFAULT_LETTER or letter in self.letters else DEFAULT_LETTER
        return f"{shown}{self.stem}.JPG"


@dataclass
class SeriesNode:
    series: WebSeries
    path: tuple[str, ...]
    presets: list[Preset]
    views: list[View]
    thumb: Content | None
    docs: list[tuple[WebObject, str | None]]
    counts: str = ""  # "12 images, 1 document" in the site's wording

    @property
    def root(self) -> str:
        """From this series' folder back to the root of the medium."""
        return "../" * len(self.path)

    @property
    def href(self) -> str:
        return "/".join(self.path) + "/SERIES.HTM"

    @property
    def thumb_href(self) -> str:
        """The thumbnail from the root: THUMB.JPG, or the middle frame where there is none."""
        if self.thumb is not None:
            return "/".join(self.path) + "/THUMB.JPG"
        if self.views:
            return "/".join(self.path) + "/" + self.views[len(self.views) // 2].jpeg_name()
        return ""


@dataclass
class StudyNode:
    study: WebStudy
    series: list[SeriesNode]
    modalities: list[str]


@dataclass
class PatientNode:
    patient: WebPatient
    studies: list[StudyNode]


def layout(patients: Sequence[WebPatient], messages: Mapping[str, str]) -> list[PatientNode]:
    """Assign folders and file names; counters are 0-based, in the given order."""
    tree = []
    for p, patient in enumerate(patients):
        studies = []
        for s, study in enumerate(patient.studies):
            nodes = [_series_node(se, (WEB_DIR, f"PT{p:06d}", f"ST{s:06d}", f"SE{e:06d}"),
                                  messages) for e, se in enumerate(study.series)]
            modalities = study.modalities or list(dict.fromkeys(
                se.modality for se in study.series if se.modality))
            studies.append(StudyNode(study, nodes, modalities))
        tree.append(PatientNode(patient, studies))
    return tree


def _series_node(series: WebSeries, path: tuple[str, ...],
                 messages: Mapping[str, str]) -> SeriesNode:
    presets = _presets(series, messages)
    letters = {p.name: p.letter for p in presets[1:]}
    views: list[View] = []
    for image in series.images:
        has = tuple(letters[name] for name in image.presets if name in letters)
        details = tuple((_summary_label(k, messages), _summary_value(k, v))
                        for k, v in image.summary.items() if v and k not in DETAILS_SKIP)
        for f in range(len(image.jpegs)):
            note = _annotation(image, f + 1, len(image.jpegs), messages)
            views.append(View(len(views) + 1, image, f + 1, len(image.jpegs), note, has,
                              details))
    if len(views) > MAX_VIEWS:
        raise ValueError(f"series {series.uid}: {len(views)} frames, at most {MAX_VIEWS}")
    with_thumbs = [i for i in series.images if i.thumbnail is not None]
    thumb = with_thumbs[len(with_thumbs) // 2].thumbnail if with_thumbs else None
    docs = []
    for obj in series.objects:
        pdf = f"D{len(docs) + 1:07d}.PDF" if obj.pdf is not None else None
        docs.append((obj, pdf))
    return SeriesNode(series, path, presets, views, thumb, docs,
                      _counts(len(series.images), len(views), len(docs), messages))


def _counts(images: int, frames: int, docs: int, messages: Mapping[str, str]) -> str:
    def count(n: int, key: str) -> str:
        return messages[f"{key}_one"] if n == 1 else _fmt(messages[key], count=n)

    parts = [count(images, "image_count")] if images else []
    if frames > images:
        parts[-1] += f" ({_fmt(messages['frame_count'], count=frames)})"
    if docs:
        parts.append(count(docs, "document_count"))
    return ", ".join(parts)


def _presets(series: WebSeries, messages: Mapping[str, str]) -> list[Preset]:
    """A = the window the JPEGs were rendered with; B.. = further presets in first-seen order."""
    first = series.images[0] if series.images else None
    name = first.preset if first else ""
    shown = {"": messages["window_default"], "default": messages["window_default"],
             "auto": messages["window_auto"]}.get(name, name)
    out = [Preset(DEFAULT_LETTER, shown, _window_title(first, name))]
    names = list(dict.fromkeys(n for i in series.images for n in i.presets))
    if len(names) > len(PRESET_LETTERS):
        log.debug("series %s: %d presets, keeping %d", series.uid, len(names), len(PRESET_LETTERS))
    for letter, n in zip(PRESET_LETTERS, names, strict=False):
        holder = next(i for i in series.images if n in i.presets)
        out.append(Preset(letter, n, _window_title(holder, n)))
    return out


def _window_title(image: WebImage | None, name: str) -> str:
    if image is None or name not in image.windows:
        return ""
    center, width = image.windows[name]
    return f"C {center:g} W {width:g}"


def _annotation(image: WebImage, frame: int, frames: int, messages: Mapping[str, str]) -> str:
    parts = [f"{messages['instance']} {image.number}"] if image.number else []
    if frames > 1:
        parts.append(f"{messages['frame']} {frame}/{frames}")
    parts += [f"{_summary_label(k, messages)}: {_summary_value(k, v)}"
              for k, v in image.summary.items() if v and k not in ANNOTATION_SKIP]
    return " \u00b7 ".join(parts)


def _summary_label(key: str, messages: Mapping[str, str]) -> str:
    """A Rendering.summary key in the site's wording (``summary_<key>``), else as it is."""
    return messages.get(f"summary_{key}", key)


def _summary_value(key: str, value: str) -> str:
    if key == "slice_location":
        try:
            return f"{float(value):.2f}"
        except ValueError:
            return value
    return value


# -- templates -----------------------------------------------------------------------------


def clean(value: Any) -> Any:
    """Jinja2 finalize: None prints nothing, control characters are dropped (XML 1.0 forbids
    them); markup made by the templates themselves passes unchanged."""
    if value is None:
        return ""
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return _CONTROL.sub("", value)


def _fmt(template: str, **values: Any) -> str:
    """``{{ t.volume_of | fmt(volume=1, volumes=2) }}``: str.format with named fields only."""
    return str(template).format_map({k: clean(v) for k, v in values.items()})


def environment(template_dirs: Sequence[Path] = ()) -> jinja2.Environment:
    """Templates from the user folders first, then the bundled ``templates/``; autoescape for
    .htm/.html/.xml/.svg, none for .txt/.css/.js (which escape by their own filters)."""
    dirs = [str(d) for d in template_dirs] + [str(BUNDLED_TEMPLATES)]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(dirs),
        autoescape=jinja2.select_autoescape(_AUTOESCAPE, default_for_string=True),
        finalize=clean, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True, auto_reload=False)
    env.filters["fmt"] = _fmt
    return env


def messages(env: jinja2.Environment, site: Site) -> dict[str, str]:
    """The wording: messages/en.toml, then the site's language (``de``, then ``de-CH``), then
    the site's own ``[messages]``; each from the first template folder that has the file."""
    tags = ["en"]
    parts = site.language.split("-")
    tags += ["-".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out: dict[str, str] = {}
    for tag in dict.fromkeys(tags):
        try:
            source = env.loader.get_source(env, f"messages/{tag}.toml")[0]
        except jinja2.TemplateNotFound:
            continue
        out.update({k: str(v) for k, v in tomllib.loads(source).items()})
    out.update(site.messages)
    return out


def created_at(created: dt.datetime | None = None) -> dt.datetime:
    """The creation time shown: the given one, else SOURCE_DATE_EPOCH, else now (UTC)."""
    if created is not None:
        return created
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return dt.datetime.fromtimestamp(int(epoch), dt.UTC)
    return dt.datetime.now(dt.UTC)


@dataclass
class Renderer:
    """Templates plus the context every page shares."""

    env: jinja2.Environment
    common: dict[str, Any]

    @classmethod
    def create(cls, site: Site, template_dirs: Sequence[Path], *, volume: int, volumes: int,
               web: bool, created: dt.datetime | None) -> Renderer:
        check_site(site)
        if not 1 <= volume <= volumes:
            raise ValueError(f"volume {volume} of {volumes}")
        env = environment([*template_dirs, *site.template_dirs])
        common = {"site": site, "t": messages(env, site), "lang": site.language,
                  "volume": volume, "volumes": volumes, "web": web,
                  "kind": KIND_WEB if web else KIND_DICOM, "use_viewer": web,
                  "created": created_at(created).strftime("%Y-%m-%d"),
                  "logo": logo_name(site.logo) if site.logo and web else None}
        return cls(env, common)

    @property
    def t(self) -> dict[str, str]:
        return self.common["t"]

    def render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render({**self.common, **context})

    def page(self, name: str, **context: Any) -> bytes:
        return self.render(name, **context).encode("utf-8")

    def text(self, name: str, **context: Any) -> bytes:
        """Plain text with CRLF line ends; UTF-8, with a BOM only when not plain ASCII (so
        older Windows editors pick the right encoding)."""
        text = self.render(name, **context).replace("\r\n", "\n").replace("\n", "\r\n")
        data = text.encode("utf-8")
        return data if data.isascii() else b"\xef\xbb\xbf" + data


# -- the medium -----------------------------------------------------------------------------


#: runs a function over a list of arguments, in order (map, or a process pool's map)
Mapper = Callable[[Callable[[Any], Any], list], Iterable]


def build(patients: Sequence[WebPatient], *, volume: int = 1, volumes: int = 1,
          site: Site | None = None, template_dirs: Sequence[Path] = (), web: bool = True,
          viewer: bool = True, created: dt.datetime | None = None,
          cancel: Event | None = None, mapper: Mapper | None = None) -> list[MediumFile]:
    """Every non-DICOM file of one volume: README.TXT and INDEX.HTM, and with ``web`` the
    IHE_PDI tree and (with ``viewer``) VIEWER/ and the pages' reference to its script. Pass
    only what is on this volume (each volume's index covers its own content). Content is
    bytes, a Path or a Range to stream from. mapper: how the series' pages are made, one
    call per series (a process pool's map makes them in parallel; default here, in order)."""
    created = created_at(created)  # one date on every page, whichever process makes it
    spec = _Spec(site or Site(), tuple(template_dirs), volume, volumes, web, web and viewer,
                 created)
    r = _renderer(spec)
    tree = layout(patients, r.t)
    files: list[MediumFile] = [
        (("README.TXT",), r.text("readme.txt", tree=tree)),
        (("INDEX.HTM",), r.page("index.htm", tree=tree, root="",
                                inline_css=None if web else _inline_css(r))),
    ]
    if web:
        files += _web_files(r, tree, cancel, spec, mapper)
    check_names(files)
    return files


@dataclass(frozen=True)
class _Spec:
    """What a Renderer is made from: sent to the processes that make pages."""

    site: Site
    template_dirs: tuple[Path, ...]
    volume: int
    volumes: int
    web: bool
    use_viewer: bool
    created: dt.datetime


_RENDERERS: dict[str, Renderer] = {}  # per process: templates are compiled once


def _renderer(spec: _Spec) -> Renderer:
    key = repr(spec)
    r = _RENDERERS.get(key)
    if r is None:
        r = Renderer.create(spec.site, spec.template_dirs, volume=spec.volume,
                            volumes=spec.volumes, web=spec.web, created=spec.created)
        r.common["use_viewer"] = spec.use_viewer
        _RENDERERS.clear()  # one volume at a time
        _RENDERERS[key] = r
    return r


def _series_job(job: tuple[_Spec, WebPatient, WebStudy, SeriesNode]) -> list[MediumFile]:
    spec, patient, study, node = job
    return _series_files(_renderer(spec), patient, study, node)


def _inline_css(r: Renderer) -> Markup:
    """The style sheet inside <style> (DICOM ONLY media have no IHE_PDI/STYLE.CSS): only
    when it holds neither '<' nor '&', which XML and HTML would read differently."""
    css = r.render("style.css")
    if "<" in css or "&" in css:
        raise ValueError("style.css must not contain '<' or '&' (it is inlined in INDEX.HTM)")
    return Markup(css)


def _web_files(r: Renderer, tree: list[PatientNode], cancel: Event | None, spec: _Spec,
               mapper: Mapper | None) -> list[MediumFile]:
    site: Site = r.common["site"]
    files: list[MediumFile] = [((WEB_DIR, "STYLE.CSS"), r.render("style.css").encode())]
    if site.logo is not None:
        files.append(((WEB_DIR, logo_name(site.logo) or ""), site.logo))
    if r.common["use_viewer"]:
        files += [((VIEWER_DIR, "VIEWER.JS"), r.render("viewer.js").encode("utf-8")),
                  ((VIEWER_DIR, "VIEWER.CSS"), r.render("viewer.css").encode("utf-8"))]
    # each job carries its patient and study without their other studies and series: the
    # pages show only their own fields, and a job is then the size of its own series
    jobs = [(spec, replace(pn.patient, studies=[]), replace(sn.study, series=[]), node)
            for pn in tree for sn in pn.studies for node in sn.series]
    for made in (mapper or map)(_series_job, jobs):
        check(cancel, "while building the web pages")
        files += made
    return files


def _series_files(r: Renderer, patient: WebPatient, study: WebStudy,
                  node: SeriesNode) -> list[MediumFile]:
    ctx = {"patient": patient, "study": study, "node": node, "root": node.root,
           "viewer": r.common["use_viewer"]}
    files: list[MediumFile] = [(node.path + ("SERIES.HTM",), r.page("series.htm", **ctx))]
    if node.thumb is not None:
        files.append((node.path + ("THUMB.JPG",), node.thumb))
    image_page = r.env.get_template("image.htm")
    base = {**r.common, **ctx}
    for i, view in enumerate(node.views):
        prev = node.views[i - 1] if i else None
        nxt = node.views[i + 1] if i + 1 < len(node.views) else None
        for preset in node.presets:
            page = image_page.render({**base, "view": view, "prev": prev, "next": nxt,
                                      "current": preset.letter})
            files.append((node.path + (view.page(preset.letter),), page.encode("utf-8")))
            jpeg = _jpeg(view, preset)
            if jpeg is not None:
                files.append((node.path + (view.jpeg_name(preset.letter),), jpeg))
    files += [(node.path + (pdf,), obj.pdf) for obj, pdf in node.docs
              if pdf is not None and obj.pdf is not None]
    return files


def _jpeg(view: View, preset: Preset) -> Content | None:
    """The JPEG file a preset adds for a view (None where the view falls back to A)."""
    if preset.letter == DEFAULT_LETTER:
        return view.image.jpegs[view.frame - 1]
    if preset.letter not in view.letters:
        return None
    frames = view.image.presets[preset.name]
    return frames[min(view.frame, len(frames)) - 1]


def check_names(files: Sequence[MediumFile]) -> None:
    """PS3.12 / ISO 9660 Level 1 (PDI-13): upper-case 8.3 names, at most 7 components, no
    AUTORUN (PDI-15), no duplicates."""
    seen: set[tuple[str, ...]] = set()
    for comps, _content in files:
        where = "/".join(comps)
        if len(comps) > MAX_COMPONENTS or not FILE_NAME.fullmatch(comps[-1]) or not all(
                DIR_NAME.fullmatch(c) for c in comps[:-1]):
            raise ValueError(f"{where}: not an ISO 9660 Level 1 name")
        if comps[-1].startswith("AUTORUN"):
            raise ValueError(f"{where}: no auto-run files on PDI media")
        if comps in seen:
            raise ValueError(f"{where}: written twice")
        seen.add(comps)


def content_size(content: Content) -> int:
    if isinstance(content, Range):
        return content.length
    return content.stat().st_size if isinstance(content, Path) else len(content)


def medium_bytes(files: Sequence[MediumFile], sector: int = SECTOR) -> int:
    """Bytes the files take on the medium: whole sectors per file, a directory record per
    file, a sector and a record per directory."""
    dirs = {comps[:i] for comps, _ in files for i in range(1, len(comps))}
    used = sum(-(-content_size(c) // sector) * sector + DIR_RECORD_BYTES for _, c in files)
    return used + len(dirs) * (sector + DIR_RECORD_BYTES)


def estimate_bytes(patients: Sequence[WebPatient], *, volume: int = 1, volumes: int = 1,
                   site: Site | None = None, template_dirs: Sequence[Path] = (),
                   web: bool = True, viewer: bool = True, sector: int = SECTOR) -> int:
    """What :func:`build` adds to a volume, in bytes on the medium (sector-rounded): the JPEGs
    and PDFs as given plus the rendered pages. Exact for the given content; the part that
    does not depend on series is ``estimate_bytes([])``; a series costs about
    ``estimate_bytes([one patient, one study, that series]) - estimate_bytes([])``."""
    files = build(patients, volume=volume, volumes=volumes, site=site,
                  template_dirs=template_dirs, web=web, viewer=viewer,
                  created=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    return medium_bytes(files, sector)


def write_files(files: Iterable[MediumFile], root: Path) -> None:
    """Write the files below root (a USB folder, or a test); paths are streamed."""
    for comps, content in files:
        target = root.joinpath(*comps)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Range):
            with open(target, "wb", buffering=0) as dst:
                for _n in copy_segments([content], dst.fileno(), 0):
                    pass
        elif isinstance(content, Path):
            with content.open("rb") as src, target.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        else:
            target.write_bytes(content)
