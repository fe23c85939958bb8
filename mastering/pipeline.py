"""The whole job: intake -> plan -> stage conversions -> write volumes -> check, as one call.

Front-ends (the CLI, the burning daemon, the USB kiosk) call :func:`master`; it keeps no global
state, reports progress through a callback and stops when the cancel event is set. Nothing that
looks finished is left behind on failure: every output is written under a temporary name next to
its final place and renamed only when all volumes are complete.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from . import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    dicomdir,
    earlyiso,
    folderwriter,
    isowriter,
    outputs,
    plan,
    reencode,
)
from . import intake as intake_mod
from . import workers as workers_mod
from .cancel import Cancelled
from .content import output_size
from .intake import IntakeResult, Problem
from .part10 import EXPLICIT_LE, IMPLICIT_LE
from .profiles import Profile

if TYPE_CHECKING:
    from . import pdi

ProgressFn = Callable[[str, int, int], None]
FILESET_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
SITE_MAX_BYTES = 1 << 20  # a site file is a few lines of TOML; /dev/zero is not one


class MasteringError(Exception):
    """The run was refused or failed; nothing was written. `report` says why. outputs_ok is
    False when an output path itself was refused: then no side output (a report) may be
    written either, it could be the very input the refusal protects."""

    def __init__(self, message: str, report: Report, exit_code: int, outputs_ok: bool = True):
        super().__init__(message)
        self.report = report
        self.exit_code = exit_code
        self.outputs_ok = outputs_ok


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
    follow_links: bool = False  # follow symbolic links that leave the given inputs
    #: different objects with one SOP Instance UID: "refuse" the run, "skip" them all, or
    #: keep the "newest" (Instance Creation Date/Time, else the latest file)
    on_conflict: str = "refuse"
    fileset_uid: str | None = None  # a File-set UID given by the requester (MCM); one volume only
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
    filled: list[dict] = field(default_factory=list)  # {"path", "key", "value"[, "reason"]}
    ignored: list[dict] = field(default_factory=list)  # non-DICOM files
    invalid: list[dict] = field(default_factory=list)  # refused files and why
    skipped: list[dict] = field(default_factory=list)  # invalid files left out (--skip-invalid)
    duplicates: list[dict] = field(default_factory=list)  # {"kept", "merged"}
    #: one SOP Instance UID, different objects: {"uid", "policy", "files", "kept"}
    conflicts: list[dict] = field(default_factory=list)
    #: meta headers that disagreed with their data set: {"path", "uid", "meta", "dataset",
    #: "repair"}; the data set's UIDs are used everywhere
    repaired: list[dict] = field(default_factory=list)
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
           progress: ProgressFn | None = None, cancel: Event | None = None,
           side_outputs: Sequence[Path] = (),
           on_publish: Callable[[Report], None] | None = None) -> Report:
    """Master the inputs onto media of options.profile; kind is "iso", "folder" or "inplace"
    (into the existing folder output, e.g. a stick's root: see mastering.inplace). A "folder"
    output that is a mount point is filled in place: a rename cannot replace a mount.

    side_outputs: other files the caller writes (a report), refused like the output if they
    are, or lie inside, an input. on_publish: called with the finished report once every
    volume is complete, before anything gets its final name; if it raises, nothing is
    published. From then on the run is finished: a cancellation no longer stops it."""
    profile = options.profile
    report = Report(profile=profile.id, output=str(output))
    check_fileset_id(options.fileset_id)
    if options.volume_id not in (None, options.fileset_id) and profile.media_kind in ("cd", "dvd"):
        report.warnings.append("the volume ID differs from the File-set ID; PS3.12 F.1.1 asks "
                               "for them to be equal, so verify will report it")
    if kind == "iso" and not profile.writes_iso:
        raise MasteringError(f"profile {profile.id} is for {profile.filesystem.upper()} media: "
                             "use 'mastering fileset' and copy the folder to the stick", report, 2)
    if kind == "folder" and output.is_dir() and outputs.is_mount(output) and \
            outputs.empty_but_ours(outputs.Target(output.absolute(), "inplace"), output):
        kind = "inplace"  # an empty stick's root: a rename cannot replace a mount point
    target = outputs.Target(output.absolute(), kind)
    try:
        _check_outputs(inputs, target, side_outputs, options)
    except outputs.OutputError as exc:
        report.error = str(exc)
        raise MasteringError(report.error, report, exc.exit_code, outputs_ok=False) from exc
    try:
        target.prepare()
        try:
            with outputs.locked(target):
                outputs.remove_stale_work(target)
                _check_folder_free(target)
                return _run(inputs, target, options, report, progress, cancel, side_outputs,
                            on_publish)
        finally:
            if not report.ok:
                target.unprepare()
    except outputs.OutputError as exc:
        report.error = str(exc)
        raise MasteringError(report.error, report, exc.exit_code) from exc


def _check_outputs(inputs: Sequence[Path], target: outputs.Target, side_outputs: Sequence[Path],
                   options: Options) -> None:
    """No output over an input, inside an input folder, on another output's name or inside
    a volume folder; site settings and templates that cannot be read refuse the run now, not
    after the scan."""
    read_only = [options.site] if options.site else []
    outputs.check_against_inputs([target.output, *side_outputs], inputs, read_only)
    for side in side_outputs:
        side = Path(os.path.abspath(side))
        if not side.is_relative_to(target.folder) or side == target.folder:
            continue
        first = side.relative_to(target.folder).parts[0]
        if target.derived(first):
            raise outputs.OutputError(f"{side}: is, or lies inside, a name the output "
                                      f"{target.output.name} uses for its volumes, labels or "
                                      "lock", 2)
    labels = options.label or (options.viewer and target.kind != "inplace")  # none in place
    if labels and target.folder.exists() and not os.access(
            target.folder, os.W_OK | os.X_OK):
        raise outputs.OutputError(f"{target.folder}: the labels go beside the output and "
                                  "this folder is not writable", 6)
    _check_site(options)


def _check_site(options: Options) -> None:
    for folder in options.templates:
        if not Path(folder).is_dir():
            raise outputs.OutputError(f"{folder}: the template folder does not exist", 2)
    if options.site is None:
        return
    from .webcontent import load_site  # the templates load only when asked for

    site = Path(options.site)
    if not site.is_file():
        raise outputs.OutputError(f"{site}: the site settings are not a regular file", 2)
    if site.stat().st_size > SITE_MAX_BYTES:
        raise outputs.OutputError(f"{site}: site settings of more than {SITE_MAX_BYTES} "
                                  "bytes", 2)
    try:
        load_site(site)
    except (OSError, ValueError, TypeError) as exc:  # TOML, JSON and UTF-8 errors are ValueErrors
        raise outputs.OutputError(f"{site}: {exc}", 2) from exc


def _check_folder_free(target: outputs.Target) -> None:
    """Refuse at once what would be refused after all the work: an image over a folder, a
    File-set into a file or a folder that holds something."""
    out = target.output
    if target.kind == "inplace" or not (out.exists() or out.is_symlink()):
        return  # in place: mastering.inplace decides what the folder may hold
    if target.kind == "iso":
        if out.is_dir():
            raise outputs.OutputError(f"{out}: is a folder", 6)
        return
    if not out.is_dir():
        raise outputs.OutputError(f"{out}: exists and is not a folder", 6)
    if not outputs.empty_but_ours(target, out):
        raise outputs.OutputError(f"{out}: exists and is not an empty folder", 6)


def _run(inputs: Sequence[Path], target: outputs.Target, options: Options, report: Report,
         progress: ProgressFn | None, cancel: Event | None, side_outputs: Sequence[Path],
         on_publish: Callable[[Report], None] | None) -> Report:
    work = outputs.make_work(target)  # before the scan: bodies are written while it runs
    early = _early_writer(target, work, options)
    render = None
    try:
        render = _early_render(work, options)  # pictures rendered while the scan runs
        return _scan_plan_write(inputs, target, options, report, progress, cancel,
                                side_outputs, on_publish, work, early, render)
    finally:
        if render is not None:
            render.close()
        if early is not None:
            early.close()
        shutil.rmtree(work, ignore_errors=True)


def _early_writer(target: outputs.Target, work: Path, options: Options
                  ) -> earlyiso.EarlyImage | earlyiso.EarlyFolder | None:
    """What writes bodies while the scan runs: into the image, or copies on the new folder's
    file system. None in place: that writer copies straight onto the medium (the work
    folder is on another file system), so copies made early would only be removed again."""
    if target.kind == "iso":
        return earlyiso.EarlyImage(work / "vol1", options.profile, options.sync)
    if target.kind == "folder":
        return earlyiso.EarlyFolder(work / "early", options.profile)
    return None


def _scan_plan_write(inputs: Sequence[Path], target: outputs.Target, options: Options,
                     report: Report, progress: ProgressFn | None, cancel: Event | None,
                     side_outputs: Sequence[Path], on_publish: Callable[[Report], None] | None,
                     work: Path, early: earlyiso.EarlyImage | earlyiso.EarlyFolder | None,
                     render: pdi.EarlyRender | None) -> Report:
    t0 = time.monotonic()
    scanned = intake_mod.scan(inputs, options.profile, progress=progress, cancel=cancel,
                              workers=options.workers, follow_links=options.follow_links,
                              on_conflict=options.on_conflict,
                              observer=intake_mod.Observers(render, early))
    if early is not None:
        early.finish()
    report.seconds["scan"] = round(time.monotonic() - t0, 3)
    try:
        outputs.check_walked([target.output, *(p.absolute() for p in side_outputs)],
                             scanned.walked)
    except outputs.OutputError as exc:
        report.error = str(exc)
        raise MasteringError(report.error, report, exc.exit_code, outputs_ok=False) from exc
    _record_intake(report, scanned)
    _refuse_undecided(report, scanned)
    if scanned.invalid and not options.skip_invalid:
        report.error = f"{len(scanned.invalid)} invalid input file(s); nothing was written"
        raise MasteringError(report.error, report, 3)
    report.skipped = (report.invalid if options.skip_invalid else []) + report.skipped
    if not scanned.instances:
        report.error = "no DICOM instances found in the input"
        raise MasteringError(report.error, report, 3)
    return _plan_and_write(scanned, target, options, report, work, progress, cancel,
                           on_publish, early, render)


def _leave_out(report: Report, options: Options, problems: list[dict],
               recorded: bool = False) -> None:
    """Files refused after the scan (a series under two studies, a failed conversion): in
    "invalid" with their reason and, under --skip-invalid, in "skipped" as every file left
    out is."""
    if not recorded:
        report.invalid += problems
    if options.skip_invalid:
        report.skipped += problems


def _refuse_undecided(report: Report, scanned: IntakeResult) -> None:
    """Different objects with one SOP Instance UID that nothing decided between (refused,
    or a tie --on-conflict newest cannot break): --skip-invalid does not skip them, that
    would leave every copy out."""
    undecided = [c for c in scanned.conflicts if c["kept"] is None and c["policy"] != "skip"]
    if not undecided:
        return
    how = ("--on-conflict newest cannot tell which is newest" if any(
        c.get("tie") for c in undecided) else "choose --on-conflict skip or newest")
    report.error = (f"{len(undecided)} SOP Instance UID(s) used by different objects; {how}; "
                    "nothing was written")
    raise MasteringError(report.error, report, 3)


def _record_intake(report: Report, scanned: IntakeResult) -> None:
    report.files_seen = scanned.files_seen
    report.warnings += scanned.warnings
    report.ignored = _problems(scanned.ignored)
    report.invalid = _problems(scanned.invalid)
    for inst in scanned.instances:
        report.duplicates += [{"kept": inst.path, "merged": d} for d in inst.duplicates]
        report.repaired += [{"path": inst.path, **r} for r in inst.repairs]
    report.conflicts = list(scanned.conflicts)
    report.skipped += _problems(scanned.left_out)  # --on-conflict skip / newest


def _plan_and_write(scanned: IntakeResult, target: outputs.Target, options: Options,
                    report: Report, work: Path, progress: ProgressFn | None,
                    cancel: Event | None, on_publish: Callable[[Report], None] | None,
                    early: earlyiso.EarlyImage | earlyiso.EarlyFolder | None = None,
                    render: pdi.EarlyRender | None = None) -> Report:
    profile, output, kind = options.profile, target.output, target.kind
    place = None
    if kind == "inplace":  # what the folder holds: refused, appended to or to be replaced
        from .inplace import Target

        place = Target(output, options, report)
        place.join(scanned, progress, cancel)
    t0 = time.monotonic()
    conflicts: list[tuple[str, str]] = []
    tree, roots = plan.build_tree(scanned.instances, profile, report.warnings, conflicts)
    _leave_out(report, options, [{"path": p, "kind": "conflict", "reason": r}
                                 for p, r in conflicts])
    if conflicts and not options.skip_invalid:
        report.error = f"{len(report.invalid)} invalid input file(s); nothing was written"
        raise MasteringError(report.error, report, 3)
    entries = [e for p in tree for st in p.studies for se in st.series for e in se.entries] + roots
    known = len(report.invalid)
    _stage(entries, profile, work, report, options, progress, cancel)
    _leave_out(report, options, report.invalid[known:], recorded=True)
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
    web = _web_stage(entries, work, options, report, progress, cancel, render)
    volumes = _pack(tree, roots, options, report, web)
    if place is not None:
        volumes = [place.adopt(volumes)]
    _fill_report(report, scanned, volumes)
    t0 = time.monotonic()
    if place is not None:
        return _write_in_place(place, volumes[0], output, web, work, report, progress, cancel,
                               t0, on_publish)
    finals = output_paths(output, len(volumes))
    _check_finals(target, finals, options, scanned, work)
    temps = [work / f"vol{v.index}" for v in volumes]
    labels: list[tuple[Path, Path]] = []
    for vol, tmp, final in zip(volumes, temps, finals, strict=True):
        extra = _volume_web(vol, web, work, final, labels, cancel)
        size = _write_volume(vol, tmp, final, kind, extra, options, report, progress, cancel,
                             early)
        report.volumes.append(_volume_report(vol, final, size))
        if options.verify:
            _verify(tmp, final, profile, report, progress, cancel)
    files = [*zip(temps, finals, strict=True), *labels]
    stale, warnings = outputs.plan_publish(target, files, scanned.walked, work)
    report.warnings += warnings
    report.labels = [str(dst) for _src, dst in labels]
    report.seconds["write"] = round(time.monotonic() - t0, 3)
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before the output was put in place")
    report.ok = True
    try:
        if on_publish:
            on_publish(report)
    except BaseException:
        report.ok = False
        raise
    # the point of no return: from here the run finishes, whatever signal comes
    try:
        report.warnings += outputs.publish(target, files, stale, sync=options.sync)
    except OSError as exc:
        report.ok = False
        report.error = (f"the output could not be put in place: {exc.filename or ''}: "
                        f"{exc.strerror or exc}")
        raise MasteringError(report.error, report, 6) from exc
    return report


def _check_finals(target: outputs.Target, finals: list[Path], options: Options,
                  scanned: IntakeResult, work: Path) -> None:
    """Before a byte is written: every volume and label can go where it must."""
    try:
        outputs.check_finals(target, finals, scanned.walked, work,
                             folders=target.kind == "folder")
        if options.label or options.viewer:
            from .label import label_paths  # the renderer loads only for labels

            outputs.check_finals(target, [p for f in finals for p in label_paths(f)],
                                 scanned.walked, work, folders=False)
    except outputs.OutputError as exc:
        raise MasteringError(str(exc), Report(options.profile.id, str(target.output),
                                              error=str(exc)), exc.exit_code) from exc


def _write_in_place(place, vol: plan.Volume, output: Path, web: _Web | None, work: Path,
                    report: Report, progress: ProgressFn | None, cancel: Event | None,
                    t0: float, on_publish: Callable[[Report], None] | None) -> Report:
    """kind="inplace": write into the folder itself, then read it back and check it. The
    DICOMDIR's rename is this kind's "final name" (mastering.inplace); the report follows
    the check, so that it says what the medium holds."""
    extra = _volume_web(vol, web, work, output, [], cancel)  # no label: beside a stick is outside
    dd = dicomdir.encode(vol)
    size = place.write(vol, dd, extra, label=f"write {output.name}", progress=progress,
                       cancel=cancel)
    report.volumes.append(_volume_report(vol, output, size))
    if place.options.verify or place.options.reread is not None:
        place.check(vol, dd, extra, progress, cancel)
    report.seconds["write"] = round(time.monotonic() - t0, 3)
    report.ok = True
    if on_publish:
        on_publish(report)
    return report


@dataclass
class _Web:
    """The PDI stage's state between planning and writing."""

    settings: pdi.Settings
    headers: pdi.Headers
    web: bool


def _early_render(work: Path, options: Options) -> pdi.EarlyRender | None:
    """With web content or a label: the renderings, started while the scan runs."""
    if not (options.viewer or options.label):
        return None
    from . import pdi, webcontent  # rendering and templates load only when asked for

    site = webcontent.load_site(options.site) if options.site else webcontent.Site()
    return pdi.EarlyRender(work, pdi.Settings(
        web=options.viewer, site=site, template_dirs=options.templates,
        epoch=options.source_date_epoch, workers=options.workers))


def _web_stage(entries: list[plan.FileEntry], work: Path, options: Options, report: Report,
               progress: ProgressFn | None, cancel: Event | None,
               render: pdi.EarlyRender | None = None) -> _Web | None:
    """Render and summarise every instance for the web content and the label."""
    if render is None:
        render = _early_render(work, options)
        if render is None:
            return None
    from . import webcontent

    t0 = time.monotonic()
    settings = render.settings
    headers = _prepare_web(entries, work, settings, options, progress, cancel, render)
    items = [e.web.item for e in entries if e.web is not None]
    report.web = {"images": sum(isinstance(i, webcontent.WebImage) for i in items),
                  "objects": sum(isinstance(i, webcontent.WebObject) for i in items),
                  "unreadable": [e.instance.path for e in entries if e.web is None],
                  "bytes": sum(e.web_bytes for e in entries)}
    report.seconds["render"] = round(time.monotonic() - t0, 3)
    return _Web(settings, headers, options.viewer)


def _prepare_web(entries, work, settings, options, progress, cancel, render):  # noqa: ANN001
    from . import pdi

    try:
        return pdi.prepare(entries, work, settings, workers=options.workers,
                           progress=progress, cancel=cancel,
                           early=render if render.executor is not None else None)
    finally:
        render.close()  # its workers are not needed any more


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
                labels: list[tuple[Path, Path]],
                cancel: Event | None) -> list[tuple[tuple[str, ...], bytes | Path]]:
    """One volume's web files (each index covers its own volume) and its label."""
    if web is None:
        return []
    from . import pdi

    patients = pdi.patients_of(vol, web.headers)

    def label() -> None:  # drawn while the workers make the pages
        for src in pdi.write_labels(work / final.name, patients, vol, web.settings):
            labels.append((src, final.parent / src.name))

    if not web.web:
        label()
        return []
    return pdi.volume_files(patients, vol, web.settings, meanwhile=label, cancel=cancel)


def _write_volume(vol: plan.Volume, tmp: Path, final: Path, kind: str, extra: list,
                  options: Options, report: Report, progress: ProgressFn | None,
                  cancel: Event | None,
                  early: earlyiso.EarlyImage | earlyiso.EarlyFolder | None = None) -> int:
    profile = options.profile
    label = f"write {final.name}"
    dd = tmp.with_name(f"{tmp.name}.DICOMDIR")  # in the work folder, not held in memory
    dicomdir.write(vol, dd)
    for entry in vol.entries():  # the records are written: their keys are not needed again
        entry.instance.leaf = b""
    if kind != "iso":
        if extra:  # the web content's manifest: a later --replace knows these files as ours
            from .inplace import with_manifest

            extra = with_manifest(extra)
        return folderwriter.write(vol, dd, tmp, extra, label=label, sync=options.sync,
                                  progress=progress, cancel=cancel,
                                  early=early if isinstance(early, earlyiso.EarlyFolder)
                                  else None)
    image, early = _image(vol, dd, extra, options, tmp,
                          early if isinstance(early, earlyiso.EarlyImage) else None)
    if options.source_date_epoch is not None:
        isowriter.set_dates(image, options.source_date_epoch)
    size = isowriter.write(image, tmp, label=label, sync=options.sync,
                           epoch=options.source_date_epoch, progress=progress, cancel=cancel,
                           early=early)
    image.close()
    if profile.capacity_bytes and size > profile.capacity_bytes:
        raise MasteringError(f"{final.name}: image of {size} bytes exceeds the capacity "
                             f"{profile.capacity_bytes}", report, 4)
    return size


def _image(vol: plan.Volume, dd: Path, extra: list, options: Options, tmp: Path,
           early: earlyiso.EarlyImage | None):
    """The volume's pycdlib image: with the bodies the scan already wrote into tmp where
    they can stay (the only volume, its metadata fits before them), else the ordinary way."""
    volume_id = _volume_id(options, vol)
    usable = early is not None and early.active and vol.count == 1 and early.path == tmp
    placed = early.placement(vol.entries()) if usable else None
    if placed is not None:
        image = isowriter.build(vol, dd, options.profile, extra, volume_id=volume_id,
                                early=(placed, early.start, early.end))
        image._reshuffle_extents()
        size = image.pvd.space_size * image.logical_block_size
        capacity = options.profile.capacity_bytes
        # the early layout keeps the slots of left-out files and the reserve's unused part:
        # where that does not fit, the ordinary layout may
        if not image.overflow and not (capacity and size > capacity):
            return image, early
        image.close()
    if early is not None and early.active:
        early.abandon()
    return isowriter.build(vol, dd, options.profile, extra, volume_id=volume_id), None


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
        if options.fileset_uid and len(packed) == 1:  # a split set gets new UIDs (PS3.4 S)
            vol.fileset_uid = options.fileset_uid
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
            report.filled += _filled(e.instance)


def _filled(inst: intake_mod.Instance) -> list[dict]:
    """Filled-in keys and keys changed because their value was invalid for its VR, each
    with the value the record has and, for the changed ones, why."""
    why = {k: reason for k, _v, reason in inst.fixes}
    out = [{"path": inst.path, "key": k, "value": v, **({"reason": why[k]} if k in why else {})}
           for k, v in inst.filled]
    done = {k for k, _v in inst.filled}
    return out + [{"path": inst.path, "key": k, "value": v, "reason": r}
                  for k, v, r in inst.fixes if k not in done]


def _volume_report(vol: plan.Volume, final: Path, size: int) -> VolumeReport:
    return VolumeReport(
        path=str(final), fileset_id=vol.fileset_id, fileset_uid=vol.fileset_uid,
        patients=len(vol.patients), studies=sum(len(p.studies) for p in vol.patients),
        series=sum(len(s.series) for p in vol.patients for s in p.studies),
        instances=len(vol.entries()), bytes=size)


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
             e.instance.stamp, profile)
            for i, e in enumerate(todo)]
    workers = min(options.workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        with workers_mod.pool(workers) as pool:
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
        intake_mod.adopt_leaf(entry.instance, res.pop("leaf"))  # keys of the file written
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

    src, dst, allowed, sop_class, sop_uid, pixel_offset, stamp, profile = job
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
                                      implementation_version_name=IMPLEMENTATION_VERSION_NAME,
                                      opener=intake_mod.open_source,
                                      scratch=Path(dst).parent)
        if intake_mod.file_stamp(src) != stamp:
            return "the file changed while it was being converted"
        leaf = intake_mod.leaf_keys(dst, profile)
    except Exception as exc:  # noqa: BLE001 - reported per file, the run decides
        return str(exc)
    return {"source_ts": res.source_ts, "target_ts": res.target_ts, "action": res.action,
            "decoder": res.decoder, "bytes": os.path.getsize(dst), "leaf": leaf}


def _drop_failed(tree: list[plan.Patient], roots: list[plan.FileEntry]):
    """With --skip-invalid, files that failed conversion leave the tree (and empty nodes go)."""
    for patient in tree:
        for study in patient.studies:
            for se in study.series:
                se.entries = [e for e in se.entries if e.action != "failed"]
            study.series = [s for s in study.series if s.entries]
        patient.studies = [s for s in patient.studies if s.series]
    return [p for p in tree if p.studies], [e for e in roots if e.action != "failed"]
