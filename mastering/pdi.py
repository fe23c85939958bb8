"""IHE PDI (RAD TF-2 4.47, RAD TF-3): the web content and label of each volume.

A stage between planning and writing. :func:`prepare` reads every instance once more — this
time with its pixel data — in worker processes, renders images to JPEG (:mod:`mastering.render`)
and summarises the rest (:mod:`mastering.webcontent`), spooling the JPEGs to files in the work
folder so memory holds paths, not pictures. The planner counts each instance's share against
the medium's capacity; :func:`volume_files` then lays out one volume's INDEX.HTM, README.TXT,
IHE_PDI/ and VIEWER/ for exactly what that volume holds, and :func:`write_labels` its label.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from threading import Event

import pydicom

from . import isosource, label, render, webcontent
from . import workers as workers_mod
from .cancel import Cancelled
from .content import Range
from .plan import SECTOR, FileEntry, Volume

ProgressFn = Callable[[str, int, int], None]
#: an XHTML page per frame and preset: a sector, two with a long details table
PAGE_BYTES = 2 * SECTOR
#: optimize=False: no extra Huffman pass, about 1 ms less per frame for files ~5 % larger
RENDER_OPTIONS = {"max_size": 1024, "thumb_size": 128, "max_presets": 3, "optimize": False}


@dataclass
class Settings:
    """What the operator chose: web content and/or a label, the site, template overrides."""

    web: bool = True  # DICOM PLUS WEB; False = DICOM ONLY (README.TXT + INDEX.HTM, a label)
    site: webcontent.Site = field(default_factory=webcontent.Site)
    template_dirs: tuple[Path, ...] = ()
    epoch: int | None = None  # SOURCE_DATE_EPOCH: dates on pages and labels
    workers: int | None = None  # processes for rendering and pages (default: every CPU)


@dataclass
class Piece:
    """One instance's share of the web content; headers only for the first of a series."""

    item: webcontent.WebImage | webcontent.WebObject
    medium_bytes: int
    headers: tuple[webcontent.WebPatient, webcontent.WebStudy, webcontent.WebSeries] | None


# -- per instance (worker processes) --------------------------------------------------------


_SERIES: list[render.SeriesRenderer] = []  # per worker process


def _series_renderer() -> render.SeriesRenderer:
    if not _SERIES:
        _SERIES.append(render.SeriesRenderer(**RENDER_OPTIONS))
    return _SERIES[0]


def _job(args: tuple[str, str, int, bool, bool, int, str]) -> Piece | str:
    """Read, render and spool one instance; errors come back as text. The slices of a
    series take the fast way (render.SeriesRenderer); the first of each series, whose
    header the pages need whole, and anything unusual are read through pydicom."""
    path, spool, index, web, headers, pixel_offset, body_ts = args
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            done = (_series_renderer().render(path, pixel_offset, body_ts)
                    if web and not headers else None)
            if done is not None:
                rendering, elements = done
                image = webcontent.image_from_values(
                    render.raw_text(elements, 0x00080018, ()),
                    render.raw_text(elements, 0x00200013, ()), rendering)
                item = _spool_image(image, Path(spool), index)
                return Piece(item, _bytes(item), None)
            native = render.read_native(path, pixel_offset, body_ts) if web else None
            if native is not None:  # the header, and the pixels straight from the file
                ds, pixels = native
                item = _item(path, ds, Path(spool), index, pixels)
            elif web:  # one read of the whole file serves the pages and the pictures
                ds = render.read(path)
                item = _item(path, ds, Path(spool), index)
            else:
                with isosource.open_any(path) as fh:  # plain or inside an ISO image
                    ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
                item = webcontent.WebObject(kind="", title="")
    except Exception as exc:  # noqa: BLE001 - reported per file
        return f"{path}: {type(exc).__name__}: {exc}"
    trio = (webcontent.patient_from_dataset(ds), webcontent.study_from_dataset(ds),
            webcontent.series_from_dataset(ds)) if headers else None
    return Piece(item, _bytes(item), trio)


def _item(path: str, ds: pydicom.Dataset, spool: Path, index: int, pixels=None):  # noqa: ANN001
    if pixels is not None or render.renderable(ds):
        try:
            result = render.render_dataset(ds, source=path, native=pixels, **RENDER_OPTIONS)
        except render.RenderError:
            result = None  # listed as an object instead: the DICOM file is still there
        if result is not None:
            image = webcontent.image_from_rendering(ds, result)
            return _spool_image(image, spool, index)
    obj = webcontent.object_from_dataset(ds)
    if obj.pdf is not None and isinstance(obj.pdf, bytes):
        obj.pdf = _keep(obj.pdf, spool)
    return obj


def _spool_image(image: webcontent.WebImage, spool: Path, index: int) -> webcontent.WebImage:
    image.jpegs = [_keep(j, spool) for j in image.jpegs]
    image.presets = {name: [_keep(j, spool) for j in jpegs]
                     for name, jpegs in image.presets.items()}
    if isinstance(image.thumbnail, bytes):
        image.thumbnail = _keep(image.thumbnail, spool)
    return image


_SPOOL: dict[tuple[int, str], int] = {}  # (process, spool folder) -> its open spool file


def _keep(content: webcontent.Content, spool: Path) -> webcontent.Content:
    """Bytes go to the end of this worker process's own spool file in the work folder and
    are kept as a byte range of it: one file per worker instead of two per image (their
    creation and removal cost as much as the encoding), and the ISO writer copies ranges
    inside the kernel like any other file."""
    if not isinstance(content, bytes):
        return content
    key = (os.getpid(), str(spool))
    fd = _SPOOL.get(key)
    if fd is None:
        path = spool / f"W{os.getpid()}.SPL"
        # appended to: a later pool's worker that gets the same process number goes on
        fd = _SPOOL[key] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    offset = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view):]
    return Range(str(spool / f"W{os.getpid()}.SPL"), offset, len(content))


def _rounded(content: bytes | Path | None) -> int:
    if content is None:
        return 0
    return -(-webcontent.content_size(content) // SECTOR) * SECTOR + 48


def _bytes(item: webcontent.WebImage | webcontent.WebObject) -> int:
    """Sectors the instance's files and pages take on the medium (with directory entries)."""
    if isinstance(item, webcontent.WebObject):
        return _rounded(item.pdf) + (PAGE_BYTES if item.pdf is not None else 0)
    frames = len(item.jpegs)
    jpegs = sum(_rounded(j) for j in item.jpegs) + _rounded(item.thumbnail)
    jpegs += sum(_rounded(j) for js in item.presets.values() for j in js)
    return jpegs + frames * (1 + len(item.presets)) * PAGE_BYTES


Headers = dict[tuple[str, str, str], tuple]


def prepare(entries: list[FileEntry], work: Path, settings: Settings, *, workers: int | None,
            progress: ProgressFn | None = None, cancel: Event | None = None,
            early: EarlyRender | None = None) -> Headers:
    """Attach a Piece to every entry (``entry.web``; None if the file could not be read) and
    return the patient/study/series headers by series key. early: renderings started while
    the scan ran; what they do not cover is rendered now."""
    spool = work / "web"
    spool.mkdir(exist_ok=True)
    keys = [(e.instance.patient_id, e.instance.study_uid, e.instance.series_uid)
            for e in entries]
    headed = early.headed(entries, keys) if early is not None else set()
    jobs, seen = [], set(headed)
    for i, (e, key) in enumerate(zip(entries, keys, strict=True)):
        jobs.append(_job_args(e.instance, str(spool), i, settings.web, key not in seen))
        seen.add(key)
    if early is not None:
        results = early.results(jobs)
    else:
        workers = max(1, min(workers or settings.workers or os.cpu_count() or 1, len(jobs)))
        pool = workers_mod.pool(workers)
        results = _mapped(pool, jobs)
    headers: Headers = {}
    for i, result in enumerate(results):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled while rendering")
        if progress:
            progress("render", i + 1, len(jobs))
        entries[i].web = result if isinstance(result, Piece) else None
        entries[i].web_bytes = result.medium_bytes if isinstance(result, Piece) else 0
        if isinstance(result, Piece) and result.headers is not None:
            headers.setdefault(keys[i], result.headers)
            result.headers = None
    return headers


def _mapped(pool, jobs: list[tuple]) -> Iterator[Piece | str]:  # noqa: ANN001 - a pool
    with pool as executor:
        yield from executor.map(_job, jobs, chunksize=8)


def _job_args(inst, spool: str, index: int, web: bool, headers: bool) -> tuple:  # noqa: ANN001
    return (inst.path, spool, index, web, headers, inst.pixel_data_offset, inst.transfer_syntax)


def _batch(jobs: list[tuple]) -> list[Piece | str]:
    return [_job(job) for job in jobs]


class EarlyRender:
    """Renderings started while the scan runs (an intake observer): each scanned instance
    is rendered at once, in batches, in a pool of its own, so rendering overlaps the scan
    and the early copies instead of following them. prepare() takes the results of the
    instances that made it into the plan and renders whatever else it needs."""

    BATCH = 8

    def __init__(self, work: Path, settings: Settings):
        self.spool = work / "web"
        self.settings = settings
        self.futures: dict[tuple, object] = {}  # job arguments but the index -> future
        self.pending: list[tuple] = []
        self.seen: set[tuple[str, str, str]] = set()
        self.pool = None
        self.executor = None

    def walked(self, paths: list[str]) -> None:
        self.spool.mkdir(exist_ok=True)
        workers = max(1, min(self.settings.workers or os.cpu_count() or 1, len(paths) or 1))
        self.pool = workers_mod.pool(workers)
        self.executor = self.pool.__enter__()
        self.executor.submit(os.getpid)  # forks the workers now, before any thread is started

    def add(self, inst) -> None:  # noqa: ANN001 - intake.Instance
        key = (inst.patient_id, inst.study_uid, inst.series_uid)
        job = _job_args(inst, str(self.spool), 0, self.settings.web, key not in self.seen)
        self.seen.add(key)
        self.pending.append(job)
        if len(self.pending) >= self.BATCH:
            self._submit()

    def _submit(self) -> None:
        if not self.pending or self.executor is None:
            return
        batch, self.pending = self.pending, []
        future = self.executor.submit(_batch, batch)
        for n, job in enumerate(batch):
            self.futures[_ident(job)] = (future, n, job[4])

    def headed(self, entries: list[FileEntry], keys: list) -> set:
        """The series whose headers an early rendering of one of these entries brings (a
        series whose early headers came from a file that was left out gets them anew)."""
        wanted = {e.instance.path: key for e, key in zip(entries, keys, strict=True)}
        return {wanted[ident[0]] for ident, (_f, _n, headers) in self.futures.items()
                if headers and ident[0] in wanted}

    def results(self, jobs: list[tuple]) -> Iterator[Piece | str]:
        """Each job's result: the early one where the same rendering was made (a header
        asked for now that the early job did not bring is rendered again), else new."""
        self._submit()
        todo = [job for job in jobs if not self._covers(job)]
        later = {}
        for start in range(0, len(todo), self.BATCH):
            batch = todo[start:start + self.BATCH]
            future = self.executor.submit(_batch, batch)
            for n, job in enumerate(batch):
                later[job[2]] = (future, n)
        for job in jobs:
            held = later.get(job[2]) or self.futures.get(_ident(job))
            future, n = held[0], held[1]
            try:
                yield future.result()[n]
            except BrokenProcessPool as exc:
                raise workers_mod.WorkerDied("a worker process died unexpectedly (out of "
                                             "memory, or a crash in a decoder); nothing was "
                                             "written") from exc

    def _covers(self, job: tuple) -> bool:
        held = self.futures.get(_ident(job))
        return held is not None and (held[2] or not job[4])

    def close(self) -> None:
        """Cancel what has not started, let the running batches end, stop the workers."""
        for held in self.futures.values():
            held[0].cancel()
        if self.pool is not None:
            self.pool.__exit__(None, None, None)
            self.pool = self.executor = None
        self.futures.clear()


def _ident(job: tuple) -> tuple:
    """A rendering's arguments but its index (unused since spools are per worker)."""
    return (job[0], job[1], job[3], job[5], job[6])


# -- per volume ------------------------------------------------------------------------------


def created(settings: Settings) -> dt.datetime | None:
    if settings.epoch is None:
        return None
    return dt.datetime.fromtimestamp(settings.epoch, tz=dt.UTC)


def base_bytes(settings: Settings) -> int:
    """What every volume carries whatever its content: README, INDEX, style, viewer, logo."""
    return webcontent.estimate_bytes([], site=settings.site, template_dirs=settings.template_dirs,
                                     web=settings.web)


def patients_of(volume: Volume, headers: Headers) -> list[webcontent.WebPatient]:
    """The web model of one volume, in DICOMDIR order (each volume's index covers its own
    content); a series split over volumes gets its headers on each."""
    out: list[webcontent.WebPatient] = []
    for patient in volume.patients:
        wp = None
        for study in patient.studies:
            ws = None
            for series in study.series:
                trio = headers.get((patient.id, study.uid, series.uid))
                if trio is None:
                    continue
                if wp is None:
                    wp = replace(trio[0], studies=[])
                    out.append(wp)
                if ws is None:
                    ws = replace(trio[1], series=[], modalities=[])
                    wp.studies.append(ws)
                we = replace(trio[2], images=[], objects=[])
                ws.series.append(we)
                if we.modality and we.modality not in ws.modalities:
                    ws.modalities.append(we.modality)
                _add_items(we, series.entries)
    return out


def _add_items(we: webcontent.WebSeries, entries: list[FileEntry]) -> None:
    for entry in entries:
        piece = entry.web
        if piece is None:
            continue
        piece.item.file_id = entry.file_id
        if isinstance(piece.item, webcontent.WebImage):
            we.images.append(piece.item)
        elif piece.item.kind:
            we.objects.append(piece.item)


def volume_files(patients: list[webcontent.WebPatient], volume: Volume, settings: Settings,
                 meanwhile: Callable[[], object] | None = None,
                 cancel: Event | None = None) -> list[webcontent.MediumFile]:
    """The volume's web files; the pages of its series are made in worker processes, and
    meanwhile (the label, say) is done here while they work."""
    series = sum(len(st.series) for p in patients for st in p.studies)
    workers = max(1, min(settings.workers or os.cpu_count() or 1, series))
    if not settings.web or workers == 1:
        if meanwhile is not None:
            meanwhile()
        return _volume_files(patients, volume, settings, None, cancel)

    with workers_mod.pool(workers) as pool:
        def mapper(fn, jobs):  # noqa: ANN001, ANN202 - webcontent.Mapper
            results = pool.map(fn, jobs, chunksize=1)  # submitted: the workers start
            if meanwhile is not None:
                meanwhile()
            return results

        return _volume_files(patients, volume, settings, mapper, cancel)


def _volume_files(patients: list[webcontent.WebPatient], volume: Volume, settings: Settings,
                  mapper: webcontent.Mapper | None,
                  cancel: Event | None) -> list[webcontent.MediumFile]:
    return webcontent.build(patients, volume=volume.index, volumes=volume.count,
                            site=settings.site, template_dirs=settings.template_dirs,
                            web=settings.web, created=created(settings), mapper=mapper,
                            cancel=cancel)


def write_labels(target: Path, patients: list[webcontent.WebPatient], volume: Volume,
                 settings: Settings) -> tuple[Path, Path]:
    """The label of one volume, written at target (a work path renamed later)."""
    return label.write_label(target, patients, volume=volume.index, volumes=volume.count,
                             site=settings.site, web=settings.web,
                             template_dirs=settings.template_dirs, created=created(settings))
