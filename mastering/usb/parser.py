"""The ``usb`` and ``kiosk`` command lines: parsers only, so that ``mastering --help`` loads
neither pyudev nor the pipeline (:mod:`.cli` runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path

COMMANDS = ("usb", "kiosk")
EXIT_NO_STICK = 7


def add_parsers(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("usb", help="write studies onto a USB stick: detect it safely, write in "
                       "place, verify, power off")
    u.add_argument("inputs", nargs="*", type=Path, help="DICOM files and folders")
    u.add_argument("--profile", default="STD-GEN-USB-JPEG", help="a USB application profile")
    where = u.add_mutually_exclusive_group()
    where.add_argument("--device", help="the stick: /dev/sdX, /dev/sdX1 or a /dev/disk/by-* "
                       "link (default: the only eligible stick)")
    where.add_argument("--wait", action="store_true", help="wait until a stick is inserted")
    u.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    mode = u.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add to the File-set on the stick")
    mode.add_argument("--replace", action="store_true", help="replace the File-set on the stick")
    u.add_argument("--format", action="store_true", help="format an exFAT/NTFS/empty stick "
                   "to FAT32 first (erases it; asks for confirmation)")
    u.add_argument("--yes", action="store_true", help="with --format: do not ask")
    u.add_argument("--viewer", action="store_true", help="IHE PDI web content on the stick")
    u.add_argument("--fileset-id", default="DICOM_MEDIA", help="File-set ID of a new File-set")
    u.add_argument("--skip-invalid", action="store_true", help="leave invalid files out")
    u.add_argument("--workers", type=int, help="processes for scanning and conversion")
    u.add_argument("--config", type=Path, help="kiosk configuration: its [usb] policy applies")
    u.add_argument("--list", action="store_true", help="list the disks and whether they may be "
                   "written, and why not")
    u.add_argument("--all", action="store_true", help="with --list: every disk, not only USB")
    u.add_argument("--json", action="store_true", help="JSON on stdout")
    u.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    k = sub.add_parser("kiosk", help="the USB export kiosk: a touch-screen web application")
    k.add_argument("--config", type=Path, required=True, help="kiosk configuration (TOML)")


