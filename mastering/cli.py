"""``mastering``: the command-line front-end. Thin: it parses, shows progress and prints.

Exit codes (also in the README):
  0  success
  1  internal error (a bug, or a worker process that died): one line says what
  2  usage error (bad option, unknown profile, profile/medium mismatch)
  3  invalid input: corrupt, truncated, not storable, conflicting or unconvertible files,
     or no DICOM instance at all; nothing was written
  4  the content does not fit: a file larger than the medium, or several volumes with --no-span
  5  verification found violations
  6  input/output error (unreadable input, disk full, output exists)
  7  busy: another run is writing the same output
  130 cancelled (Ctrl-C); nothing was left behind
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from . import __version__, profiles
from .cancel import Cancelled
from .daemon import cli as daemon_cli
from .terminal import Printer, printable

if TYPE_CHECKING:  # the pipeline (pydicom, numpy) and rich load only for the commands that
    from rich.console import Console  # use them: --help and profiles start in a blink
    from rich.text import Text

    from .pipeline import Options, Report

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INVALID, EXIT_FIT, EXIT_VERIFY, EXIT_IO = (
    0, 1, 2, 3, 4, 5, 6)
EXIT_BUSY, EXIT_CANCEL = 7, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mastering", description="DICOM patient media: File-sets, "
                                "DICOMDIR and ISO images under PS3.11 application profiles.")
    p.add_argument("--version", action="version", version=f"mastering {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("iso", "write ISO 9660 image(s) for CD, DVD or BD"),
                        ("fileset", "write the File-set as a folder (what goes onto a USB stick)")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("inputs", nargs="+", type=Path, help="DICOM files and folders")
        c.add_argument("-o", "--output", type=Path, required=True,
                       help="OUT.iso (several volumes: OUT-1.iso, OUT-2.iso ...) or a folder")
        c.add_argument("--profile", default="STD-GEN-CD" if name == "iso" else "STD-GEN-USB-JPEG",
                       help="application profile ID or TOML file (see 'mastering profiles')")
        c.add_argument("--fileset-id", default="DICOM_MEDIA", type=_fileset_id,
                       help="File-set ID, 0-16 of A-Z 0-9 _ (also the ISO volume identifier)")
        c.add_argument("--volume-id", type=_volume_id, help="ISO 9660 Volume Identifier, up to "
                       "32 of A-Z 0-9 _ (default: the File-set ID, as PS3.12 F.1.1 asks)")
        c.add_argument("--capacity", type=int, help="medium capacity in bytes (overrides the "
                       "profile; 0 = unlimited)")
        c.add_argument("--no-span", action="store_true",
                       help="refuse instead of splitting into several volumes")
        c.add_argument("--skip-invalid", action="store_true",
                       help="leave invalid files out (listed) instead of refusing the run")
        c.add_argument("--workers", type=int, help="processes for scanning and conversion")
        c.add_argument("--follow-links", action="store_true", help="follow symbolic links that "
                       "lead out of the given inputs (listed and left alone otherwise)")
        c.add_argument("--on-conflict", choices=("refuse", "skip", "newest"), default="refuse",
                       help="different objects with one SOP Instance UID: refuse the run "
                       "(default), skip them all, or keep the newest (Instance Creation "
                       "Date/Time, else the latest file)")
        c.add_argument("--viewer", action="store_true", help="IHE PDI web content (INDEX.HTM, "
                       "README.TXT, IHE_PDI/ pages and JPEGs) and a disc label")
        c.add_argument("--label", action="store_true", help="a printable disc label beside each "
                       "output (OUT.label.svg/.png), also without --viewer")
        c.add_argument("--site", type=Path, help="site settings for pages and labels (TOML or "
                       "JSON: institution, address, logo, language)")
        c.add_argument("--templates", type=Path, action="append", default=[],
                       help="template folder searched before the bundled templates/")
        c.add_argument("--verify", action="store_true", help="read every volume back and check "
                       "it against the profile before it gets its final name")
        c.add_argument("--no-sync", action="store_true", help="do not fsync the output before "
                       "renaming it into place (faster; a crash may then leave a damaged file)")
        c.add_argument("--report", type=Path, help="write the full report as JSON to this file")
        c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
        c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if name == "fileset":  # the PS3.10 File-set Updater, in place (see mastering.inplace)
            mode = c.add_mutually_exclusive_group()
            mode.add_argument("--append", action="store_true", help="add to the File-set in "
                              "the output folder (same File-set UID, existing files untouched)")
            mode.add_argument("--replace", action="store_true", help="replace the File-set in "
                              "the output folder (its DICOMDIR and the files it references)")
    sub.add_parser("profiles", help="list the application profiles").add_argument(
        "--json", action="store_true")
    ins = sub.add_parser("inspect", help="show the patient/study/series tree of a medium")
    ins.add_argument("medium", type=Path, help="ISO image, folder or DICOMDIR")
    ins.add_argument("--json", action="store_true")
    ver = sub.add_parser("verify", help="check a medium against a profile")
    ver.add_argument("medium", type=Path, help="ISO image, folder or DICOMDIR")
    ver.add_argument("--profile", default="STD-GEN-CD")
    ver.add_argument("--json", action="store_true")
    daemon_cli.add_commands(sub)
    from .usb import parser as usb_parser

    usb_parser.add_parsers(sub)  # usb, kiosk
    return p


def _fileset_id(value: str) -> str:
    from .pipeline import check_fileset_id

    try:
        return check_fileset_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _volume_id(value: str) -> str:
    if len(value) > 32 or not set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"):
        raise argparse.ArgumentTypeError(f"volume ID {value!r}: at most 32 of A-Z, 0-9 and _")
    return value


def _quiet_libraries() -> None:
    """pydicom warns and logs with element values (patient data) at warning level: keep that
    to debug logging, which a user turns on deliberately."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    if args.command in daemon_cli.COMMANDS:
        return daemon_cli.dispatch(args)
    for stream in (sys.stdout, sys.stderr):  # a name no encoding can show must not crash us
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    out, err = Printer(sys.stdout), Printer(sys.stderr)
    try:
        if args.command == "profiles":
            return _profiles(args, out)
        if args.command == "inspect":
            return _inspect(args, out, err)
        if args.command == "verify":
            return _verify(args, out, err)
        if args.command in ("usb", "kiosk"):
            from .usb import cli as usb_cli

            return usb_cli.run(args)
        return _master(args, out, err)
    except profiles.ProfileError as exc:
        _error(err, exc)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug must still end in one line and a code
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        err.line(("internal error:", "bold red"), f" {type(exc).__name__}: "
                 f"{printable(_first_line(exc))} (please report this)")
        return EXIT_INTERNAL


def _error(err: Printer, message: object) -> None:
    err.line(("error:", "bold red"), " ", printable(message))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


# -- iso / fileset --------------------------------------------------------------------------


def _master(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    # Ctrl-C and systemd's SIGTERM both cancel: the run cleans up and leaves nothing behind
    # (set before the pipeline's modules load, so a signal during the imports cancels too).
    # Once master() has returned the outcome is decided (the output is in place, or nothing
    # was written): a late signal must change nothing, so it is ignored from then on, down
    # to the interpreter's exit (which would put the default, killing, action back).
    cancel = Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        signal.signal(sig, lambda *_: cancel.set())

    from .outputs import OutputError, check_report_path
    from .pipeline import Options

    profile = profiles.load(args.profile)
    if args.capacity is not None:
        profile = profile.with_capacity(args.capacity)
    options = Options.from_env(profile, fileset_id=args.fileset_id, skip_invalid=args.skip_invalid,
                               span=not args.no_span, workers=args.workers,
                               sync=not args.no_sync, volume_id=args.volume_id,
                               verify=args.verify, viewer=args.viewer, label=args.label,
                               site=args.site, templates=tuple(args.templates),
                               follow_links=args.follow_links,
                               on_conflict=args.on_conflict,
                               update=_update_mode(args))
    if args.report is not None:
        try:
            check_report_path(args.report)
        except OutputError as exc:
            _error(err, exc)
            return exc.exit_code
    return _run_master(args, options, cancel, out, err,
                       decided=lambda: [signal.signal(sig, signal.SIG_IGN) for sig in signals])


def _run_master(args: argparse.Namespace, options: Options, cancel: Event, out: Printer,
                err: Printer, decided: Callable[[], object]) -> int:
    from .outputs import write_atomically
    from .pipeline import MasteringError, master
    from .workers import WorkerDied

    show = not args.quiet and not args.json and err.terminal
    code, report, written = EXIT_OK, None, False

    def write_report(rep: Report) -> None:  # before the output gets its final name
        nonlocal written
        if args.report is not None:
            write_atomically(args.report, json.dumps(dataclasses.asdict(rep), indent=2) + "\n")
            written = True

    try:
        with _Bar(err.console, show) as bar:
            report = master(args.inputs, args.output, options,
                            kind=_kind(args),
                            progress=bar.update, cancel=cancel,
                            side_outputs=[args.report] if args.report else [],
                            on_publish=write_report)
    except MasteringError as exc:
        code, report = exc.exit_code, exc.report
        report.error = report.error or str(exc)
        # rewrite a report that said "ok" if putting the output in place failed after it;
        # a refused path is never written to at all
        written = not exc.outputs_ok
    except Cancelled:
        err.line(("cancelled:", "yellow"), " nothing was written")
        return EXIT_CANCEL
    except WorkerDied as exc:
        _error(err, exc)
        return EXIT_INTERNAL
    except OSError as exc:
        _error(err, _os_message(exc, args.output))
        return EXIT_IO
    finally:
        decided()
    try:
        _emit(report, args, out, err, report_written=written)
    except BrokenPipeError:  # the reader went away (| head): the run's outcome stands
        _silence(sys.stdout)
    return code


def _silence(stream: object) -> None:
    """Point a stream whose reader has gone at /dev/null, so that the interpreter's final
    flush does not fail again."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_message(exc: OSError, output: Path | None = None) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if output is not None and exc.errno in _FULL:  # a write to a descriptor: no file name
        return (f"{output}: {exc.strerror}: the output does not fit on its file system; "
                "nothing was written")
    if output is not None and exc.strerror:
        return f"{output}: {exc.strerror} while writing it; nothing was written"
    return str(exc)


def _update_mode(args: argparse.Namespace) -> str:
    return "append" if getattr(args, "append", False) else (
        "replace" if getattr(args, "replace", False) else "")


def _kind(args: argparse.Namespace) -> str:
    """fileset: in place for --append/--replace and for a folder that holds a File-set (which
    then needs --append or --replace); else a new folder (master() fills a mount point, a
    stick's root, in place too)."""
    if args.command == "iso":
        return "iso"
    if _update_mode(args) or (args.output / "DICOMDIR").is_file():
        return "inplace"
    return "folder"


class _Bar:
    """A rich progress bar per stage (scan, convert, write ...), only on a terminal."""

    def __init__(self, console: Console | None, enabled: bool):
        from rich import progress as bars

        self.enabled = enabled and console is not None
        self.progress = bars.Progress(
            bars.TextColumn("{task.description:<22}"), bars.BarColumn(),
            bars.MofNCompleteColumn(), bars.TimeRemainingColumn(), console=console,
            transient=True) if self.enabled else None
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, stage: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if stage not in self.tasks:
            from rich.markup import escape

            self.tasks[stage] = self.progress.add_task(escape(printable(stage)), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _emit(report: Report, args: argparse.Namespace, out: Printer, err: Printer, *,
          report_written: bool) -> None:
    from .outputs import write_atomically

    data = dataclasses.asdict(report)
    if args.report and not report_written:
        try:
            write_atomically(args.report, json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            _error(err, f"the report could not be written: {_os_message(exc)}")
    if args.json:
        print(json.dumps(data, indent=2))
        return
    _summary(report, out if report.ok else err)


def _summary(r: Report, con: Printer) -> None:
    if r.invalid and not r.ok:
        _problem_list(con, "Invalid input", r.invalid)
    for v in r.violations:
        con.line((v["code"], "red"), f" {printable(v['path'])}: {printable(v['message'])}")
    if not r.ok:
        _error(con, r.error)
        if r.invalid:
            con.line("Use --skip-invalid to leave these files out.")
        return
    con.line(("✓", "green"), f" {r.profile}: {r.patients} patient(s), {r.studies} study(ies), "
             f"{r.series} series, {r.instances} instance(s), {_size(r.bytes)}")
    for v in r.volumes:
        con.line(f"  {printable(v.path)}  ", (f"{v.fileset_id}  {v.instances} instances  "
                                              f"{_size(v.bytes)}", "dim"))
    conv = ", ".join(f"{n} {a}" for a, n in sorted(r.conversions.items()))
    con.line(f"  files: {conv}")
    if r.web:
        con.line(f"  web content: {r.web['images']} image(s) rendered, {r.web['objects']} "
                 f"other object(s) listed, {_size(r.web['bytes'])}")
        for path in r.web["unreadable"]:
            con.line(("  not shown in the web pages: ", "yellow"), printable(path))
    for path in r.labels:
        con.line(f"  label: {printable(path)}")
    if r.filled:
        keys = sorted({f["key"] for f in r.filled})
        con.line(f"  filled-in directory keys: {len(r.filled)} ({', '.join(keys)})")
    if r.duplicates:
        con.line(f"  identical copies merged: {len(r.duplicates)}")
    for c in r.conflicts:
        kept = f"kept {printable(c['kept'])}" if c["kept"] else "all left out"
        files = ", ".join(printable(f) for f in c["files"])
        con.line(("  conflict: ", "yellow"), f"SOP Instance UID {c['uid']} in "
                 f"{len(c['files'])} files ({files}): {kept}")
    for fix in r.repaired:
        con.line(f"  meta header repaired: {printable(fix['path'])}: {fix['uid']} "
                 f"{printable(fix['meta'])} in the meta, {printable(fix['dataset'] or 'none')} "
                 f"in the data set; {fix['repair']}")
    links = [i for i in r.ignored if i["kind"] == "link"]
    ignored = [i for i in r.ignored if i["kind"] != "link"]
    if ignored:
        con.line(f"  non-DICOM files ignored: {len(ignored)}")
    for item in links:
        con.line(("  link not followed: ", "yellow"), f"{printable(item['path'])}: "
                 f"{printable(item['reason'])}")
    for w in r.warnings:
        con.line(("  warning: ", "yellow"), printable(w))
    if r.invalid:
        con.line((f"  invalid files left out: {len(r.invalid)}", "yellow"))
        for item in r.invalid:
            con.line(f"    {printable(item['path'])}: {printable(item['reason'])}")


def _problem_list(con: Printer, title: str, items: list[dict]) -> None:
    """A table on a terminal; elsewhere one 'PATH: reason' line per file, for grep."""
    if not con.terminal:
        for item in items:
            con.line(f"{printable(item['path'])}: {printable(item['reason'])}")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for item in items:
        table.add_row(Text(printable(item["path"])), Text(printable(item["reason"])))
    con.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# -- profiles / inspect / verify ------------------------------------------------------------


def _profiles(args: argparse.Namespace, out: Printer) -> int:
    found = profiles.available()
    if args.json:
        print(json.dumps([{"id": p.id, "title": p.title, "media": p.media_kind,
                           "capacity_bytes": p.capacity_bytes, "filesystem": p.filesystem,
                           "transfer_syntaxes": list(p.transfer_syntaxes),
                           "file": str(p.path)} for p in found.values()], indent=2))
        return EXIT_OK
    if not out.terminal:
        for p in found.values():
            capacity = _size(p.capacity_bytes) if p.capacity_bytes else "device"
            out.line(f"{p.id}\t{p.media_kind} ({p.filesystem})\t{capacity}\t"
                     f"{','.join(p.transfer_syntaxes)}\t{p.standard}")
        return EXIT_OK
    from rich.table import Table

    table = Table("profile", "media", "capacity", "transfer syntaxes", "standard")
    for p in found.values():
        table.add_row(p.id, f"{p.media_kind} ({p.filesystem})",
                      _size(p.capacity_bytes) if p.capacity_bytes else "device",
                      "\n".join(_ts_name(t) for t in p.transfer_syntaxes), p.standard)
    out.print(table)
    return EXIT_OK


def _ts_name(uid: str) -> str:
    """The standard's name of a transfer syntax (PS3.6 Table A-1, kept as data so that this
    command does not load pydicom)."""
    from importlib import resources

    table = resources.files("mastering._standard").joinpath("transfer_syntaxes.json")
    return json.loads(table.read_text("utf-8"))["names"].get(uid, uid)


def _inspect(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    from .reader import MediaError, open_medium, summarize

    try:
        with open_medium(args.medium) as medium:
            summary = summarize(medium)
    except MediaError as exc:
        _error(err, exc)
        return EXIT_VERIFY
    code = EXIT_OK if summary.get("complete", True) else EXIT_VERIFY
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return code
    _print_tree(summary, out)
    for fault in summary.get("faults", []):  # read what can be read, say what is wrong
        kind = "note" if fault["harmless"] else "fault"
        err.line((f"{kind}:", "yellow"), f" {printable(fault['fault'])}")
    return code


def _print_tree(summary: dict, out: Printer) -> None:
    """Patients, studies and series: a tree on a terminal, indented lines elsewhere. Every
    value is from the medium, so it is escaped and never read as markup."""
    from rich.text import Text

    c = summary.get("counts", {})
    head = (f"File-set {printable(summary.get('fileset_id') or '(no ID)')}: "
            f"{c.get('patients', 0)} patient(s), {c.get('studies', 0)} study(ies), "
            f"{c.get('series', 0)} series, {c.get('instances', 0)} instance(s)")
    rows: list[tuple[int, Text]] = []
    for p in summary.get("patients", []):
        rows.append((1, Text.assemble((printable(p.get("name") or "(no name)"), "bold"),
                                      f"  ID {printable(p.get('id'))}")))
        for st in p.get("studies", []):
            rows.append((2, Text(printable(f"study {st.get('date') or ''} "
                                           f"{st.get('description') or ''}".rstrip()))))
            for se in st.get("series", []):
                rows.append((3, Text(printable(
                    f"series {se.get('number')} {se.get('modality') or ''} "
                    f"{se.get('description') or ''}: {se.get('instances')} instance(s)"))))
    if not out.terminal:
        out.line(head)
        for depth, text in rows:
            out.line("  " * depth + text.plain)
        return
    from rich.tree import Tree

    nodes = [Tree(head)]
    for depth, text in rows:
        del nodes[depth:]
        nodes.append(nodes[depth - 1].add(text))
    out.print(nodes[0])


def _verify(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    from .reader import MediaError
    from .verify import verify

    profile = profiles.load(args.profile)
    try:
        result = verify(args.medium, profile)
    except MediaError as exc:
        _error(err, exc)
        return EXIT_VERIFY
    if args.json:
        print(json.dumps({"ok": result.ok, "profile": profile.id, "files_checked":
                          result.files_checked, "records": result.records,
                          "violations": [dataclasses.asdict(v) for v in result.violations],
                          "notes": result.notes}, indent=2))
    else:
        for v in result.violations:
            err.line((v.code, "red"), f" {printable(v.path)}: {printable(v.message)}")
        for n in result.notes:
            out.line(("note:", "dim"), f" {printable(n)}")
        verdict = (("conforms", "green") if result.ok
                   else (f"{len(result.violations)} violation(s)", "red"))
        out.line(f"{printable(args.medium)}: ", verdict, f" to {profile.id} "
                 f"({result.files_checked} files, {result.records} records)")
    return EXIT_OK if result.ok else EXIT_VERIFY


if __name__ == "__main__":
    sys.exit(main())
