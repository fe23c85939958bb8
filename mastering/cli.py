"""``mastering``: the command-line front-end. Thin: it parses, shows progress and prints.

Exit codes (also in the README):
  0  success
  2  usage error (bad option, unknown profile, profile/medium mismatch)
  3  invalid input: corrupt, truncated, not storable, conflicting or unconvertible files,
     or no DICOM instance at all; nothing was written
  4  the content does not fit: a file larger than the medium, or several volumes with --no-span
  5  verification found violations
  6  input/output error (unreadable input, disk full, output exists)
  130 cancelled (Ctrl-C); nothing was left behind
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import warnings
from pathlib import Path
from threading import Event

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__, profiles
from .intake import Cancelled
from .pipeline import MasteringError, Options, Report, check_fileset_id, master

EXIT_OK, EXIT_USAGE, EXIT_INVALID, EXIT_FIT, EXIT_VERIFY, EXIT_IO, EXIT_CANCEL = (
    0, 2, 3, 4, 5, 6, 130)


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
    from .usb import cli as usb_cli

    usb_cli.add_parsers(sub)  # usb, kiosk
    return p


def _fileset_id(value: str) -> str:
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
    err = Console(stderr=True)
    out = Console()
    try:
        if args.command == "profiles":
            return _profiles(args, out)
        if args.command == "inspect":
            return _inspect(args, out)
        if args.command == "verify":
            return _verify(args, out, err)
        if args.command in ("usb", "kiosk"):
            from .usb import cli as usb_cli

            return usb_cli.run(args)
        return _master(args, out, err)
    except profiles.ProfileError as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE


# -- iso / fileset --------------------------------------------------------------------------


def _master(args: argparse.Namespace, out: Console, err: Console) -> int:
    profile = profiles.load(args.profile)
    if args.capacity is not None:
        profile = profile.with_capacity(args.capacity)
    options = Options.from_env(profile, fileset_id=args.fileset_id, skip_invalid=args.skip_invalid,
                               span=not args.no_span, workers=args.workers,
                               sync=not args.no_sync, volume_id=args.volume_id,
                               verify=args.verify, viewer=args.viewer, label=args.label,
                               site=args.site, templates=tuple(args.templates),
                               update=_update_mode(args))
    cancel = Event()
    # Ctrl-C and systemd's SIGTERM both cancel: the run cleans up and leaves nothing behind
    previous = {sig: signal.signal(sig, lambda *_: cancel.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    show = not args.quiet and not args.json and err.is_terminal
    code, report = EXIT_OK, None
    try:
        with _Bar(err, show) as bar:
            report = master(args.inputs, args.output, options,
                            kind=_kind(args),
                            progress=bar.update, cancel=cancel)
    except MasteringError as exc:
        code, report = exc.exit_code, exc.report
        report.error = report.error or str(exc)
    except Cancelled:
        err.print("[yellow]cancelled[/]: nothing was written")
        return EXIT_CANCEL
    except (OSError, FileExistsError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_IO
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _emit(report, args, out, err)
    return code


def _update_mode(args: argparse.Namespace) -> str:
    return "append" if getattr(args, "append", False) else (
        "replace" if getattr(args, "replace", False) else "")


def _kind(args: argparse.Namespace) -> str:
    """fileset: in place for --append/--replace, a mount point (a stick's root, which cannot
    be replaced by a rename) and a folder that holds a File-set (which then needs --append or
    --replace); else a new folder renamed into place."""
    if args.command == "iso":
        return "iso"
    out = args.output
    if _update_mode(args) or out.is_mount() or (out / "DICOMDIR").is_file():
        return "inplace"
    return "folder"


class _Bar:
    """A rich progress bar per stage (scan, convert, write ...), only on a terminal."""

    def __init__(self, console: Console, enabled: bool):
        self.enabled = enabled
        self.progress = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _emit(report: Report, args: argparse.Namespace, out: Console, err: Console) -> None:
    data = dataclasses.asdict(report)
    if args.report:
        args.report.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=2))
        return
    _summary(report, out if report.ok else err)


def _summary(r: Report, con: Console) -> None:
    if r.invalid and not r.ok:
        table = Table(title="Invalid input", title_justify="left", show_lines=False)
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for item in r.invalid:
            table.add_row(item["path"], item["reason"])
        con.print(table)
    for v in r.violations:
        con.print(f"[red]{v['code']}[/] {v['path']}: {v['message']}", highlight=False)
    if not r.ok:
        con.print(f"[red]error:[/] {r.error}")
        if r.invalid:
            con.print("Use --skip-invalid to leave these files out.")
        return
    con.print(f"[green]✓[/] {r.profile}: {r.patients} patient(s), {r.studies} study(ies), "
              f"{r.series} series, {r.instances} instance(s), {_size(r.bytes)}")
    for v in r.volumes:
        con.print(f"  {v.path}  [dim]{v.fileset_id}  {v.instances} instances  "
                  f"{_size(v.bytes)}[/]")
    conv = ", ".join(f"{n} {a}" for a, n in sorted(r.conversions.items()))
    con.print(f"  files: {conv}")
    if r.web:
        con.print(f"  web content: {r.web['images']} image(s) rendered, {r.web['objects']} "
                  f"other object(s) listed, {_size(r.web['bytes'])}")
        for path in r.web["unreadable"]:
            con.print(f"  [yellow]not shown in the web pages:[/] {path}", highlight=False)
    for path in r.labels:
        con.print(f"  label: {path}", highlight=False)
    if r.filled:
        keys = sorted({f["key"] for f in r.filled})
        con.print(f"  filled-in directory keys: {len(r.filled)} ({', '.join(keys)})")
    if r.duplicates:
        con.print(f"  identical copies merged: {len(r.duplicates)}")
    if r.ignored:
        con.print(f"  non-DICOM files ignored: {len(r.ignored)}")
    for w in r.warnings:
        con.print(f"  [yellow]warning:[/] {w}", highlight=False)
    if r.invalid:
        con.print(f"  [yellow]invalid files left out: {len(r.invalid)}[/]")
        for item in r.invalid:
            con.print(f"    {item['path']}: {item['reason']}", highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# -- profiles / inspect / verify ------------------------------------------------------------


def _profiles(args: argparse.Namespace, out: Console) -> int:
    found = profiles.available()
    if args.json:
        print(json.dumps([{"id": p.id, "title": p.title, "media": p.media_kind,
                           "capacity_bytes": p.capacity_bytes, "filesystem": p.filesystem,
                           "transfer_syntaxes": list(p.transfer_syntaxes),
                           "file": str(p.path)} for p in found.values()], indent=2))
        return EXIT_OK
    table = Table("profile", "media", "capacity", "transfer syntaxes", "standard")
    for p in found.values():
        table.add_row(p.id, f"{p.media_kind} ({p.filesystem})",
                      _size(p.capacity_bytes) if p.capacity_bytes else "device",
                      "\n".join(_ts_name(t) for t in p.transfer_syntaxes), p.standard)
    out.print(table)
    return EXIT_OK


def _ts_name(uid: str) -> str:
    from pydicom.uid import UID

    return f"{UID(uid).name}"


def _inspect(args: argparse.Namespace, out: Console) -> int:
    from .reader import MediaError, open_medium, summarize

    try:
        with open_medium(args.medium) as medium:
            summary = summarize(medium)
    except MediaError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        return EXIT_VERIFY
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    _print_tree(summary, out)
    return EXIT_OK


def _print_tree(summary: dict, out: Console) -> None:
    from rich.tree import Tree

    c = summary.get("counts", {})
    root = Tree(f"File-set {summary.get('fileset_id') or '(no ID)'}: {c.get('patients', 0)} "
                f"patient(s), {c.get('studies', 0)} study(ies), {c.get('series', 0)} series, "
                f"{c.get('instances', 0)} instance(s)")
    for p in summary.get("patients", []):
        pn = root.add(f"[bold]{p.get('name') or '(no name)'}[/]  ID {p.get('id')}",
                      highlight=False)
        for st in p.get("studies", []):
            sn = pn.add(f"study {st.get('date') or ''} {st.get('description') or ''}".rstrip())
            for se in st.get("series", []):
                sn.add(f"series {se.get('number')} {se.get('modality') or ''} "
                       f"{se.get('description') or ''}: {se.get('instances')} instance(s)")
    out.print(root)


def _verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .reader import MediaError
    from .verify import verify

    profile = profiles.load(args.profile)
    try:
        result = verify(args.medium, profile)
    except MediaError as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_VERIFY
    if args.json:
        print(json.dumps({"ok": result.ok, "profile": profile.id, "files_checked":
                          result.files_checked, "records": result.records,
                          "violations": [dataclasses.asdict(v) for v in result.violations],
                          "notes": result.notes}, indent=2))
    else:
        for v in result.violations:
            err.print(f"[red]{v.code}[/] {v.path}: {v.message}", highlight=False)
        for n in result.notes:
            out.print(f"[dim]note:[/] {n}", highlight=False)
        verdict = "[green]conforms[/]" if result.ok else f"[red]{len(result.violations)} " \
                                                          "violation(s)[/]"
        out.print(f"{args.medium}: {verdict} to {profile.id} ({result.files_checked} files, "
                  f"{result.records} records)")
    return EXIT_OK if result.ok else EXIT_VERIFY


if __name__ == "__main__":
    sys.exit(main())
