"""``mastering usb`` and ``mastering kiosk``: registered by :func:`add_parsers` in the main CLI.

Exit codes besides the core's (README): 7 = no stick to write (none, several, or the one named
is refused: the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path

from .. import profiles
from ..pipeline import Options, check_fileset_id
from ..terminal import Printer, printable
from . import devices, export
from . import format as fmt
from .devices import Disk, Policy
from .mount import MountError, mounter
from .parser import COMMANDS, EXIT_NO_STICK, add_parsers  # noqa: F401 - re-exported


def run(args: argparse.Namespace) -> int:
    if args.command == "kiosk":
        from .kiosk.server import serve

        return serve(args.config)
    policy = load_policy(args.config)
    if args.list:
        return _list(policy, args)
    if not args.inputs:
        _error(Printer(sys.stderr), "give the DICOM files or folders to write")
        return 2
    return _write(policy, args)


def load_policy(config: Path | None) -> Policy:
    if config is None:
        return Policy()
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    return Policy.from_config(data.get("usb", {}))


def _list(policy: Policy, args: argparse.Namespace) -> int:
    disks = devices.list_disks(policy, every=args.all)
    if args.json:
        print(json.dumps([d.to_json() for d in disks], indent=2))
        return 0
    out = Printer(sys.stdout)
    if not disks:
        out.line("no USB disks")
    for d in disks:
        verdict = {"eligible": ("can be written", "green"),
                   "needs-format": ("needs formatting", "yellow")}.get(d.state, ("refused", "red"))
        out.line(printable(f"{d.node}  {d.title}  {d.filesystem_text}  "), verdict)
        if d.reason:
            out.line(printable(f"    {d.reason}"))
    return 0


def _error(err: Printer, message: object) -> None:
    err.line(("error:", "red"), " ", printable(message))


def _pick(policy: Policy, args: argparse.Namespace, err: Printer) -> Disk | None:
    if args.device:
        try:
            disk = devices.find(policy, args.device)
        except LookupError as exc:
            _error(err, f"{exc}")
            return None
        return disk if disk.eligible or (disk.state == "needs-format" and args.format) \
            else _refused(disk, err)
    if args.wait:
        return _wait(policy, args, err)
    disks = devices.list_disks(policy)
    return _choose(disks, args, err, quiet=False)


def _refused(disk: Disk, err: Printer) -> None:
    hint = " (use --format)" if disk.state == "needs-format" else ""
    err.line((printable(disk.node), "red"), printable(f" {disk.title}: {disk.reason}{hint}"))
    return None


def _choose(disks: list[Disk], args: argparse.Namespace, err: Printer, *,
            quiet: bool) -> Disk | None:
    usable = [d for d in disks if d.eligible or (d.state == "needs-format" and args.format)]
    if len(usable) == 1:
        return usable[0]
    if quiet:
        return None
    if usable:
        _error(err, f"{len(usable)} sticks could be written: name one with --device")
        for d in usable:
            err.line(printable(f"  {d.node}  {d.title}"))
        return None
    _error(err, "no USB stick that can be written")
    for d in disks:
        _refused(d, err)
    return None


def _wait(policy: Policy, args: argparse.Namespace, err: Printer) -> Disk | None:
    changed = threading.Event()
    observer = devices.watch(lambda action, name: changed.set())
    deadline = time.monotonic() + args.timeout if args.timeout else None
    told: set[str] = set()
    err.line("waiting for a USB stick ...")
    try:
        while True:
            disks = devices.list_disks(policy)
            found = _choose(disks, args, err, quiet=True)
            if found is not None:
                return found
            for d in disks:
                if d.identity not in told:
                    told.add(d.identity)
                    _refused(d, err)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _error(err, "no USB stick was inserted")
                return None
            changed.wait(timeout=1 if left is None else min(1, left))
            changed.clear()
    finally:
        observer.stop()


def _confirm_format(disk: Disk, args: argparse.Namespace, err: Printer) -> bool:
    err.line(printable(f"Formatting {fmt.describe(disk)}."))
    if args.yes:
        return True
    if not sys.stdin.isatty():
        _error(err, "--format needs --yes when there is no terminal to ask")
        return False
    return input("Type yes to format it: ").strip().lower() == "yes"


def _write(policy: Policy, args: argparse.Namespace) -> int:
    err = Printer(sys.stderr)
    try:
        profile = profiles.load(args.profile)
        check_fileset_id(args.fileset_id)
    except (profiles.ProfileError, ValueError) as exc:
        _error(err, f"{exc}")
        return 2
    if profile.filesystem != "fat":
        _error(err, f"{profile.id} is not a USB profile")
        return 2
    disk = _pick(policy, args, err)
    if disk is None:
        return EXIT_NO_STICK
    try:
        how = mounter(policy.mounter)
    except MountError as exc:
        _error(err, f"{exc}")
        return 6
    if disk.state == "needs-format":
        if not _confirm_format(disk, args, err):
            return EXIT_NO_STICK
        try:
            disk = fmt.format_stick(disk, how, policy)
        except (fmt.FormatRefused, MountError) as exc:
            _error(err, f"{exc}")
            return 6
    options = Options.from_env(profile, fileset_id=args.fileset_id, viewer=args.viewer,
                               skip_invalid=args.skip_invalid, workers=args.workers,
                               update="append" if args.append else
                               ("replace" if args.replace else ""))
    cancel = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: cancel.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    lines = _Lines(err, enabled=not args.json)
    try:
        outcome = export.export(disk, args.inputs, options, how, policy,
                                progress=lines.progress, cancel=cancel, stage=lines.stage)
    finally:
        how.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _emit(outcome, disk, args, err)


class _Lines:
    """One line per stage (grep-able, off a terminal too) and a rich bar on a terminal."""

    def __init__(self, printer: Printer, enabled: bool):
        self.printer, self.enabled = printer, enabled
        self.bar = None
        self.task = None
        self.current = ""

    def stage(self, name: str) -> None:
        if self.enabled:
            self._stop()
            self.printer.line(printable(f"{name} ..."))

    def progress(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or self.printer.console is None:  # a bar on a terminal only
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        if stage != self.current:
            self._stop()
            self.current = stage
            from rich.markup import escape

            self.bar = Progress(TextColumn(escape(f"{stage:<22}")), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.printer.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(stage, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.current = None, ""


def _emit(outcome: export.Outcome, disk: Disk, args: argparse.Namespace, err: Printer) -> int:
    if args.json:
        import dataclasses

        data = {"ok": outcome.ok, "message": outcome.message, "detail": outcome.detail,
                "exit_code": outcome.exit_code, "powered_off": outcome.powered_off,
                "removed": outcome.removed, "device": disk.to_json(),
                "report": dataclasses.asdict(outcome.report) if outcome.report else None}
        print(json.dumps(data, indent=2))
        return outcome.exit_code
    out = Printer(sys.stdout)
    if outcome.ok:
        r = outcome.report
        assert r is not None
        out.line(("✓ ", "green"), printable(
            f"{disk.title}: {r.patients} patient(s), {r.studies} study(ies), "
            f"{r.instances} instance(s) on the stick, verified"))
        for w in r.warnings:
            out.line(("  warning: ", "yellow"), printable(w))
        out.line((printable(outcome.message), "bold"))
        return 0
    _error(err, f"{outcome.message}")
    if outcome.detail and outcome.detail not in outcome.message:
        err.line("  " + printable(outcome.detail))
    if outcome.report is not None:
        for item in outcome.report.invalid:
            err.line(printable(f"  {item['path']}: {item['reason']}"))
        for v in outcome.report.violations:
            err.line(printable(f"  {v['code']} {v['path']}: {v['message']}"))
    return outcome.exit_code
