"""The whole job: intake -> plan -> stage conversions -> write volumes -> check, as one call.

Front-ends (the CLI, the burning daemon, the USB kiosk) call :func:`master`; it keeps no global
state, reports progress through a callback and stops when the cancel event is set. Nothing that
looks finished is left behind on failure: every output is written under a temporary name next to
its final place and renamed only when all volumes are complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from . import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    dicomdir,
    folderwriter,
    isowriter,
    plan,
    reencode,
)
from . import intake as intake_mod
from .content import output_size
from .intake import Cancelled, IntakeResult, Problem
from .part10 import EXPLICIT_LE, IMPLICIT_LE
from .profiles import Profile

if TYPE_CHECKING:
    from . import pdi

ProgressFn = Callable[[str, int, int], None]
FILESET_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class MasteringError(Exception):
    """The run was refused or failed; nothing was written. `report` says why."""

    def __init__(self, message: str, report: Report, exit_code: int):
        super().__init__(message)
        self.report = report
        self.exit_code = exit_code


@dataclass
class Options:
    profile: Profile
    fileset_id: str = "DICOM_MEDIA"
    volume_id: str | None = None  # ISO volume identifier, default: the File-set ID
    skip_invalid: bool = False
    span: bool = True
    workers: int | None = None
    source_date_epoch: int | None = None  # reproducible output when set
    sync: bool = True  # fsync every output before it is renamed into place
    verify: bool = False  # read every volume back and check it against the profile first
    viewer: bool = False  # IHE PDI web content (DICOM PLUS WEB) and a label
    label: bool = False  # a disc label beside each output (DICOM ONLY unless viewer)
    site: Path | None = None  # site settings (institution, logo, language): TOML or JSON
    templates: tuple[Path, ...] = ()  # template folders searched before the bundled ones
    #: kind="inplace" only: an existing File-set in the folder is refused (""), added to
    #: ("append", the PS3.10 File-set Updater) or replaced ("replace")
    update: str = ""
    #: kind="inplace" only: called with the folder after writing, before the check; makes the
    #: next reads come from the device (unmount, drop cached pages, mount) and returns the folder
    reread: Callable[[Path], Path] | None = None

    @classmethod
    def from_env(cls, profile: Profile, **kw) -> Options:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        return cls(profile, source_date_epoch=int(epoch) if epoch else None, **kw)


@dataclass
class VolumeReport:
    path: str
    fileset_id: str
    fileset_uid: str
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int


@dataclass
class Report:
    """What the run did, for the human summary and ``--report FILE.json``."""

    profile: str
    output: str
    ok: bool = False
    error: str = ""
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    bytes: int = 0
    files_seen: int = 0
    conversions: dict[str, int] = field(default_factory=dict)  # action -> count
    converted: list[dict] = field(default_factory=list)  # per transcoded file
    filled: list[dict] = field(default_factory=list)  # {"path", "key", "value"}
    ignored: list[dict] = field(default_factory=list)  # non-DICOM files
    invalid: list[dict] = field(default_factory=list)  # refused files and why
    skipped: list[dict] = field(default_factory=list)  # invalid files left out (--skip-invalid)
    duplicates: list[dict] = field(default_factory=list)  # {"kept", "merged"}
    volumes: list[VolumeReport] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)  # from --verify
    warnings: list[str] = field(default_factory=list)  # inconsistent input, no values quoted
    web: dict = field(default_factory=dict)  # --viewer: images, objects, unreadable, bytes
    labels: list[str] = field(default_factory=list)  # label files written beside the output
    seconds: dict[str, float] = field(default_factory=dict)


def _problems(items: Sequence[Problem]) -> list[dict]:
    return [{"path": p.path, "kind": p.kind, "reason": p.reason} for p in items]


def check_fileset_id(value: str) -> str:
    """PS3.10 8.5 / Table F.3-2: 0-16 characters of A-Z 0-9 _."""
    if len(value) > 16 or not set(value) <= FILESET_ID_CHARS:
        raise ValueError(f"File-set ID {value!r}: at most 16 characters of A-Z, 0-9 and _")
    return value


def output_paths(output: Path, count: int) -> list[Path]:
    """OUT.iso for one volume; OUT-1.iso, OUT-2.iso ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


def master(inputs: Sequence[Path], output: Path, options: Options, *, kind: str = "iso",
           progress: ProgressFn | None = None, cancel: Event | None = None) -> Report:
    """Master the inputs onto media of options.profile; kind is "iso", "folder" or "inplace"
    (into the existing folder output, e.g. a stick's root: see mastering.inplace)."""
    profile = options.profile
    report = Report(profile=profile.id, output=str(output))
    check_fileset_id(options.fileset_id)
    if options.volume_id not in (None, options.fileset_id) and profile.media_kind in ("cd", "dvd"):
        report.warnings.append("the volume ID differs from the File-set ID; PS3.12 F.1.1 asks "
                               "for them to be equal, so verify will report it")
    if kind == "iso" and not profile.writes_iso:
        raise MasteringError(f"profile {profile.id} is for {profile.filesystem.upper()} media: "
                             "use 'mastering fileset' and copy the folder to the stick", report, 2)
    t0 = time.monotonic()
    scanned = intake_mod.scan(inputs, profile, progress=progress, cancel=cancel,
                              workers=options.workers)
    report.seconds["scan"] = round(time.monotonic() - t0, 3)
    _record_intake(report, scanned)
    if scanned.invalid and not options.skip_invalid:
        report.error = f"{len(scanned.invalid)} invalid input file(s); nothing was written"
        raise MasteringError(report.error, report, 3)
    report.skipped = report.invalid if options.skip_invalid else []
    if not scanned.instances:
        report.error = "no DICOM instances found in the input"
        raise MasteringError(report.error, report, 3)

    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial",
                                 dir=None if kind == "inplace" else output.parent))
    try:
        return _plan_and_write(scanned, output, options, kind, report, work, progress, cancel)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record_intake(report: Report, scanned: IntakeResult) -> None:
    report.files_seen = scanned.files_seen
    report.warnings += scanned.warnings
    report.ignored = _problems(scanned.ignored)
    report.invalid = _problems(scanned.invalid)
    for inst in scanned.instances:
        report.duplicates += [{"kept": inst.path, "merged": d} for d in inst.duplicates]


def _plan_and_write(scanned: IntakeResult, output: Path, options: Options, kind: str,
                    report: Report, work: Path, progress: ProgressFn | None,
                    cancel: Event | None) -> Report:
    profile = options.profile
    target = None
    if kind == "inplace":  # what the folder holds: refused, appended to or to be replaced
        from .inplace import Target

        target = Target(output, options, report)
        target.join(scanned, progress, cancel)
    t0 = time.monotonic()
    conflicts: list[tuple[str, str]] = []
    tree, roots = plan.build_tree(scanned.instances, profile, report.warnings, conflicts)
    report.invalid += [{"path": p, "kind": "conflict", "reason": r} for p, r in conflicts]
    if conflicts and not options.skip_invalid:
        report.error = f"{len(report.invalid)} invalid input file(s); nothing was written"
        raise MasteringError(report.error, report, 3)
    entries = [e for p in tree for st in p.studies for se in st.series for e in se.entries] + roots
    _stage(entries, profile, work, report, options, progress, cancel)
    if report.invalid and not options.skip_invalid:
        report.error = "conversion failed; nothing was written"
        raise MasteringError(report.error, report, 3)
    tree, roots = _drop_failed(tree, roots)
    entries = [e for e in entries if e.action != "failed"]
    for entry in entries:
        if entry.action in ("copy", "remeta"):
            entry.out_size = output_size(entry)
            entry.out_ts = entry.instance.transfer_syntax
        report.conversions[entry.action] = report.conversions.get(entry.action, 0) + 1
    report.seconds["plan"] = round(time.monotonic() - t0, 3)
    web = _web_stage(entries, work, options, report, progress, cancel)
    volumes = _pack(tree, roots, options, report, web)
    if target is not None:
        volumes = [target.adopt(volumes)]
    _fill_report(report, scanned, volumes)
    t0 = time.monotonic()
    if target is not None:
        return _write_in_place(target, volumes[0], output, web, work, report, progress, cancel, t0)
    finals = output_paths(output, len(volumes))
    temps = [work / f"vol{v.index}" for v in volumes]
    labels: list[tuple[Path, Path]] = []
    for vol, tmp, final in zip(volumes, temps, finals, strict=True):
        extra = _volume_web(vol, web, work, final, labels)
        size = _write_volume(vol, tmp, final, kind, extra, options, report, progress, cancel)
        report.volumes.append(_volume_report(vol, final, size))
        if options.verify:
            _verify(tmp, final, profile, report, progress, cancel)
    _publish(temps, finals, kind, labels)
    report.labels = [str(dst) for src, dst in labels]
    for src, dst in labels:
        os.replace(src, dst)
    report.seconds["write"] = round(time.monotonic() - t0, 3)
    report.ok = True
    return report


def _write_in_place(target, vol: plan.Volume, output: Path, web: _Web | None, work: Path,
                    report: Report, progress: ProgressFn | None, cancel: Event | None,
                    t0: float) -> Report:
    """kind="inplace": write into the folder itself, then read it back and check it."""
    extra = _volume_web(vol, web, work, output, [])  # no label: it would go beside the folder
    dd = dicomdir.encode(vol)
    size = target.write(vol, dd, extra, label=f"write {output.name}", progress=progress,
                        cancel=cancel)
    report.volumes.append(_volume_report(vol, output, size))
    if target.options.verify or target.options.reread is not None:
        target.check(vol, dd, extra, progress, cancel)
    report.seconds["write"] = round(time.monotonic() - t0, 3)
    report.ok = True
    return report


@dataclass
class _Web:
    """The PDI stage's state between planning and writing."""

    settings: pdi.Settings
    headers: pdi.Headers
    web: bool


def _web_stage(entries: list[plan.FileEntry], work: Path, options: Options, report: Report,
               progress: ProgressFn | None, cancel: Event | None) -> _Web | None:
    """Render and summarise every instance for the web content and the label."""
    if not (options.viewer or options.label):
        return None
    from . import pdi, webcontent  # rendering and templates load only when asked for

    t0 = time.monotonic()
    site = webcontent.load_site(options.site) if options.site else webcontent.Site()
    settings = pdi.Settings(web=options.viewer, site=site, template_dirs=options.templates,
                            epoch=options.source_date_epoch)
    headers = pdi.prepare(entries, work, settings, workers=options.workers, progress=progress,
                          cancel=cancel)
    items = [e.web.item for e in entries if e.web is not None]
    report.web = {"images": sum(isinstance(i, webcontent.WebImage) for i in items),
                  "objects": sum(isinstance(i, webcontent.WebObject) for i in items),
                  "unreadable": [e.instance.path for e in entries if e.web is None],
                  "bytes": sum(e.web_bytes for e in entries)}
    report.seconds["render"] = round(time.monotonic() - t0, 3)
    return _Web(settings, headers, options.viewer)


def _pack(tree, roots, options: Options, report: Report, web: _Web | None) -> list[plan.Volume]:
    profile = options.profile
    extra = 0
    if web and web.web:
        from . import pdi

        extra = pdi.base_bytes(web.settings)
    try:
        packed = plan.split_volumes(tree, roots, profile, extra_bytes=extra)
    except plan.PlanError as exc:
        report.error = str(exc)
        raise MasteringError(report.error, report, 4) from exc
    if len(packed) > 1 and not options.span:
        report.error = (f"the content needs {len(packed)} volumes of {profile.capacity_bytes} "
                        "bytes and --no-span was given; nothing was written")
        raise MasteringError(report.error, report, 4)
    return _volumes(packed, options, profile)


def _volume_web(vol: plan.Volume, web: _Web | None, work: Path, final: Path,
                labels: list[tuple[Path, Path]]) -> list[tuple[tuple[str, ...], bytes | Path]]:
    """One volume's web files (each index covers its own volume) and its label."""
    if web is None:
        return []
    from . import pdi

    patients = pdi.patients_of(vol, web.headers)
    for src in pdi.write_labels(work / final.name, patients, vol, web.settings):
        labels.append((src, final.parent / src.name))
    return pdi.volume_files(patients, vol, web.settings) if web.web else []


def _write_volume(vol: plan.Volume, tmp: Path, final: Path, kind: str, extra: list,
                  options: Options, report: Report, progress: ProgressFn | None,
                  cancel: Event | None) -> int:
    profile = options.profile
    label = f"write {final.name}"
    dd = dicomdir.encode(vol)
    if kind != "iso":
        return folderwriter.write(vol, dd, tmp, extra, label=label, sync=options.sync,
                                  progress=progress, cancel=cancel)
    image = isowriter.build(vol, dd, profile, extra, volume_id=_volume_id(options, vol))
    if options.source_date_epoch is not None:
        isowriter.set_dates(image, options.source_date_epoch)
    size = isowriter.write(image, tmp, label=label, sync=options.sync,
                           epoch=options.source_date_epoch, progress=progress, cancel=cancel)
    image.close()
    if profile.capacity_bytes and size > profile.capacity_bytes:
        raise MasteringError(f"{final.name}: image of {size} bytes exceeds the capacity "
                             f"{profile.capacity_bytes}", report, 4)
    return size


def _volume_id(options: Options, vol: plan.Volume) -> str | None:
    if options.volume_id is None:
        return None
    return plan.volume_fileset_id(options.volume_id, vol.index, vol.count, limit=32)


def _verify(tmp: Path, final: Path, profile: Profile, report: Report,
            progress: ProgressFn | None, cancel: Event | None) -> None:
    """Read the finished volume back, as any reader would, before it gets its final name."""
    from .verify import verify

    def tick(done: int, total: int) -> None:
        if progress:
            progress(f"verify {final.name}", done, total)

    result = verify(tmp, profile, progress=tick, cancel=cancel)
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled during verification")
    if not result.ok:
        report.violations = [{"volume": str(final), "code": v.code, "path": v.path,
                              "message": v.message} for v in result.violations]
        report.error = f"{final.name}: {len(result.violations)} violation(s); nothing was written"
        raise MasteringError(report.error, report, 5)


def _volumes(packed, options: Options, profile: Profile) -> list[plan.Volume]:
    volumes = []
    for i, (patients, roots) in enumerate(packed, 1):
        fsid = plan.volume_fileset_id(options.fileset_id, i, len(packed))
        vol = plan.Volume(i, len(packed), fsid, "", patients, roots)
        try:
            plan.assign_file_ids(vol, profile)
        except plan.PlanError as exc:  # a profile whose naming rules our layout cannot meet
            raise MasteringError(str(exc), Report(profile.id, ""), 2) from exc
        vol.fileset_uid = plan.fileset_uid(vol.entries(), fsid, i,
                                           options.source_date_epoch is not None)
        volumes.append(vol)
    return volumes


def _fill_report(report: Report, scanned: IntakeResult, volumes: list[plan.Volume]) -> None:
    """Counts over the whole run: a patient or series spread over two volumes counts once."""
    patients = {p.id for v in volumes for p in v.patients}
    studies = {(p.id, st.uid) for v in volumes for p in v.patients for st in p.studies}
    series = {se.uid for v in volumes for p in v.patients for st in p.studies for se in st.series}
    report.patients, report.studies, report.series = len(patients), len(studies), len(series)
    for vol in volumes:
        for e in vol.entries():
            report.instances += 1
            report.bytes += e.out_size
            report.filled += [{"path": e.instance.path, "key": k, "value": v}
                              for k, v in e.instance.filled]


def _volume_report(vol: plan.Volume, final: Path, size: int) -> VolumeReport:
    return VolumeReport(
        path=str(final), fileset_id=vol.fileset_id, fileset_uid=vol.fileset_uid,
        patients=len(vol.patients), studies=sum(len(p.studies) for p in vol.patients),
        series=sum(len(s.series) for p in vol.patients for s in p.studies),
        instances=len(vol.entries()), bytes=size)


def _publish(temps: list[Path], finals: list[Path], kind: str,
             labels: list[tuple[Path, Path]] = ()) -> None:
    """Rename every finished volume into place, after checking that every rename can be done
    (a non-empty folder is never replaced). Images of an earlier run to the same name that
    this run does not replace (OUT-3.iso after a 2-volume run) are removed with their labels,
    so a set on disk is always one run's: a burner picking up OUT*.iso cannot mix patients."""
    for final in finals:
        if kind == "folder" and final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise FileExistsError(f"{final}: exists and is not an empty folder")
        if kind == "iso" and final.is_dir():
            raise FileExistsError(f"{final}: is a folder")
    if kind == "iso":
        for stale in _earlier_set(finals, {dst.name for _src, dst in labels}):
            stale.unlink()
    for tmp, final in zip(temps, finals, strict=True):
        if kind == "folder" and final.is_dir():
            final.rmdir()
        os.replace(tmp, final)
    _sync_dir(finals[0].parent)


def _earlier_set(finals: list[Path], labels: set[str]) -> list[Path]:
    """Files of an earlier run of the same output name that this run will not replace."""
    first = finals[0]
    stem = first.stem.rsplit("-", 1)[0] if len(finals) > 1 else first.stem
    pattern = re.compile(rf"^{re.escape(stem)}(-\d+)?"
                         rf"({re.escape(first.suffix)}|\.label\.svg|\.label\.png)$")
    keep = {f.name for f in finals} | labels
    return [p for p in first.parent.iterdir() if pattern.match(p.name) and p.is_file()
            and p.name not in keep]


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- conversions ----------------------------------------------------------------------------


def _stage(entries: list[plan.FileEntry], profile: Profile, work: Path, report: Report,
           options: Options, progress: ProgressFn | None, cancel: Event | None) -> None:
    """Transcode what the profile does not allow into the work folder, in parallel. Implicit
    VR files that intake already re-encoded (header in memory, pixels streamed) need no job."""
    done = [e for e in entries if e.action == "transcode" and e.instance.reencoded is not None]
    for entry in done:
        _use_reencoded(entry, entry.instance.reencoded, report)
        entry.instance.reencoded = None
    todo = [e for e in entries if e.action == "transcode"]
    if not todo:
        return
    staging = work / "staged"
    staging.mkdir()
    jobs = [(e.instance.path, str(staging / f"{i:07d}"), profile.transfer_syntaxes,
             e.instance.sop_class_uid, e.instance.sop_instance_uid,
             e.instance.pixel_data_offset if reencode.applicable(
                 e.instance.transfer_syntax, e.instance.pixel_data_offset) else -1,
             e.instance.stamp)
            for i, e in enumerate(todo)]
    workers = min(options.workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_transcode_job, jobs, chunksize=4)
            _collect(todo, jobs, results, report, progress, cancel)
    else:
        _collect(todo, jobs, map(_transcode_job, jobs), report, progress, cancel)


def _collect(todo, jobs, results, report: Report, progress, cancel) -> None:
    for done, (entry, job, res) in enumerate(zip(todo, jobs, results, strict=True), 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled during conversion")
        if progress:
            progress("convert", done, len(todo))
        if isinstance(res, str):
            entry.action = "failed"
            report.invalid.append({"path": entry.instance.path, "kind": "invalid",
                                   "reason": f"cannot convert: {res}"})
            continue
        if isinstance(res, reencode.Reencoded):
            _use_reencoded(entry, res, report)
            continue
        entry.staged, entry.out_ts, entry.out_size = job[1], res["target_ts"], res["bytes"]
        report.converted.append({"path": entry.instance.path, **res})


def _use_reencoded(entry: plan.FileEntry, res: reencode.Reencoded, report: Report) -> None:
    entry.action, entry.head = "reencode", res.head
    entry.pixel_range = (res.pixel_offset, res.pixel_length)
    entry.out_ts, entry.out_size = EXPLICIT_LE, res.size
    report.converted.append({"path": entry.instance.path, "source_ts": IMPLICIT_LE,
                             "target_ts": EXPLICIT_LE, "action": "reencode", "decoder": None,
                             "bytes": res.size})


def _transcode_job(job: tuple) -> dict | str | reencode.Reencoded:
    """One conversion: the streamed re-encoding where it applies, else a staged transcode."""
    from . import transcode

    src, dst, allowed, sop_class, sop_uid, pixel_offset, stamp = job
    try:
        if intake_mod.file_stamp(src) != stamp:
            return "the file changed after it was scanned"
        if pixel_offset >= 0 and EXPLICIT_LE in allowed:
            done = reencode.reencode(src, sop_class, sop_uid, pixel_offset)
            if done is not None:
                return done
        with open(dst, "xb") as out:
            res = transcode.transcode(Path(src), out, list(allowed),
                                      implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                      implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        if intake_mod.file_stamp(src) != stamp:
            return "the file changed while it was being converted"
    except Exception as exc:  # noqa: BLE001 - reported per file, the run decides
        return str(exc)
    return {"source_ts": res.source_ts, "target_ts": res.target_ts, "action": res.action,
            "decoder": res.decoder, "bytes": os.path.getsize(dst)}


def _drop_failed(tree: list[plan.Patient], roots: list[plan.FileEntry]):
    """With --skip-invalid, files that failed conversion leave the tree (and empty nodes go)."""
    for patient in tree:
        for study in patient.studies:
            for se in study.series:
                se.entries = [e for e in se.entries if e.action != "failed"]
            study.series = [s for s in study.series if s.entries]
        patient.studies = [s for s in patient.studies if s.series]
    return [p for p in tree if p.studies], [e for e in roots if e.action != "failed"]
