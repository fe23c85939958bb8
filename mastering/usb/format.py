"""FAT32 formatting of a stick, only when a person asks for it (``--format``, or the kiosk's
confirmed button), never by itself.

Only a disk the policy would write apart from its file system (state ``needs-format``: an
exFAT, NTFS, FAT12 or empty stick) is formatted; a refused disk never is. The first partition
(or the whole unpartitioned device) gets a FAT file system through udisks2 ``Block.Format``
("vfat", partition type updated to 0x0c), which picks FAT32 for sticks of 512 MiB and more and
FAT16 below (both allowed by PS3.12 R.1.1); mount(8) mode runs ``mkfs.vfat -F 32``. The label
is kept when FAT can hold it, else ``DICOM``.
"""

from __future__ import annotations

import re
import subprocess
import time

from .devices import Disk, Policy, find
from .mount import Mounter

FAT_LABEL = re.compile(r"[A-Z0-9_ !#$%&'()@^`{}~-]{1,11}")
DEFAULT_LABEL = "DICOM"


class FormatRefused(ValueError):
    """The disk may not be formatted (refused by the policy, or it changed)."""


def fat_label(label: str) -> str:
    """The volume label to give: the old one in upper case if FAT can hold it."""
    candidate = label.upper().strip()
    return candidate if FAT_LABEL.fullmatch(candidate) else DEFAULT_LABEL


def describe(disk: Disk) -> str:
    """What a person must see before agreeing (label, size, what it holds)."""
    label = f", label {disk.label!r}" if disk.label else ""
    return (f"{disk.title}{label}, holding {disk.filesystem_text}: formatting it to FAT32 "
            "erases everything on it")


def format_stick(disk: Disk, mounter: Mounter, policy: Policy, *,
                 identity: str | None = None, timeout: float = 20) -> Disk:
    """Format the stick the person agreed to (disk, as it was shown: identity defaults to
    its own) to FAT; returns the disk as udev sees it afterwards. The disk is looked up
    again right before formatting: another stick in its place, one that changed (label,
    file system) or one that may not be formatted now (mounted meanwhile) is refused."""
    expected = identity or disk.identity
    try:
        now = find(policy, disk.node)
    except LookupError as exc:
        raise FormatRefused("the stick is not there any more; nothing was formatted") from exc
    if now.identity != expected:
        raise FormatRefused("another stick was inserted meanwhile; nothing was formatted")
    if describe(now) != describe(disk):
        raise FormatRefused("the stick changed since it was shown; nothing was formatted")
    if now.state != "needs-format":
        raise FormatRefused(now.reason or "this stick needs no formatting")
    mounter.format(now, fat_label(now.label))
    deadline = time.monotonic() + timeout
    while True:  # wait for udev to probe the new file system
        subprocess.run(["udevadm", "settle", "--timeout=5"], capture_output=True)
        after = find(policy, now.node)
        if after.fs_type == "vfat" or time.monotonic() > deadline:
            return after
        time.sleep(0.2)
