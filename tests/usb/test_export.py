"""The export on the real stack: our own udevd, system D-Bus and udisksd, loop devices over
image files. ext4 stands in for FAT (this kernel has no vfat driver; the FAT layout itself is
tested through fusefat and mtools in test_fat.py): mount through udisks2 -> write in place ->
unmount, drop the cache, mount -> verify and compare -> unmount; append and replace; a stick
pulled mid-write; formatting an exFAT stick through udisks2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from threading import Event

import pytest
from pydicom.fileset import FileSet

from mastering import profiles
from mastering.pipeline import Options
from mastering.usb import devices, export
from mastering.usb.format import FormatRefused, format_stick
from mastering.usb.mount import UDisks

from ..conftest import ct_series, dciodvfy_errors, dcmdump, make_ct, sample
from .conftest import (
    Loop,
    exfat_image,
    ext4_image,
    mount_point_of,
    need_tool,
    pull,
    release,
    stick_policy,
    usb_config,
)

pytestmark = [pytest.mark.usbstack, pytest.mark.xdist_group("usbstack")]
USB = profiles.load("STD-GEN-USB-JPEG")


_policy = stick_policy  # buses=(): only the tests' own images, never a real stick


def _stick(stack, tmp: Path, loops: list[Loop], name: str = "stick.img") -> tuple[Loop, Path]:
    image = ext4_image(tmp / name)
    loops.append(Loop(image))
    return loops[-1], image


class Mounted:
    """The image mounted read-only by the test itself, to judge what is on it."""

    def __init__(self, image: Path, where: Path):
        self.where = where
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "ro,loop", str(image), str(where)], check=True)

    def __enter__(self) -> Path:
        return self.where

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.where)], check=True)


def _judge(root: Path, instances: int) -> None:
    assert dciodvfy_errors(root / "DICOMDIR") == []
    dcmdump(root / "DICOMDIR")
    fs = FileSet(root / "DICOMDIR")
    assert len(list(fs)) == instances
    from mastering.verify import verify

    assert verify(root, USB).ok


@pytest.mark.oracle
def test_cli_writes_verifies_from_the_device_and_unmounts(stack, tmp_path: Path, loops) -> None:
    loop, image = _stick(stack, tmp_path, loops)
    src = ct_series(tmp_path / "in", 2, 10, rows=128)
    content = sum(p.stat().st_size for p in src.rglob("*.dcm"))
    before = loop.sectors_read()
    res = subprocess.run([sys.executable, "-m", "mastering", "usb", str(src), "--device",
                          loop.node, "--config", str(usb_config(tmp_path, [image]))],
                         capture_output=True, text=True, env=stack.env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Safe to remove the stick." in res.stdout
    for stage in ("mounting", "writing", "verifying", "unmounting", "safe"):
        assert f"{stage} ..." in res.stderr
    # the check read every file back from the device, not from the page cache
    assert (loop.sectors_read() - before) * 512 >= content
    assert mount_point_of(loop.node) is None  # unmounted
    with Mounted(image, tmp_path / "m") as root:
        _judge(root, 20)
        assert sorted(p.name for p in root.iterdir()) == ["DICOM", "DICOMDIR", "lost+found"]


@pytest.mark.oracle
def test_append_and_replace_on_the_stick(stack, tmp_path: Path, loops) -> None:
    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    assert disk.eligible, disk.reason
    how = UDisks()
    first = export.export(disk, [sample("CT_small.dcm")], Options(USB, workers=1), how, policy)
    assert first.ok, first.detail
    again = export.export(disk, [sample("MR_small.dcm")], Options(USB, workers=1), how, policy)
    assert not again.ok and again.exit_code == 6 and again.message == export.MESSAGES[6]
    added = export.export(disk, [sample("MR_small.dcm"), sample("CT_small.dcm")],
                          Options(USB, workers=1, update="append"), how, policy)
    assert added.ok, added.detail
    assert added.report.conversions["existing"] == 1 and len(added.report.duplicates) == 1
    with Mounted(image, tmp_path / "m") as root:
        _judge(root, 2)
        uid = FileSet(root / "DICOMDIR").UID
    assert uid == first.report.volumes[0].fileset_uid  # the File-set keeps its UID
    replaced = export.export(disk, [sample("rtstruct.dcm")],
                             Options(USB, workers=1, update="replace"), how, policy)
    assert replaced.ok, replaced.detail
    with Mounted(image, tmp_path / "m") as root:
        _judge(root, 1)
    how.close()


def _references_exist(root: Path) -> bool:
    fs = FileSet(root / "DICOMDIR")
    return all(Path(i.path).is_file() for i in fs)


@pytest.mark.oracle
def test_stick_pulled_mid_write(stack, tmp_path: Path, loops) -> None:
    """Detaching the stick mid-write ends in failure, never in 'done', and the stick carries
    no DICOMDIR that references missing files (here: none at all)."""
    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    src = ct_series(tmp_path / "in", 1, 30)
    stages: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 10:
            pull(loop, mount_point_of(loop.node))

    out = export.export(disk, [src], Options(USB, workers=1), UDisks(), policy,
                        progress=progress, stage=stages.append)
    assert not out.ok and out.message == export.REMOVED and out.removed
    assert "safe" not in stages
    assert mount_point_of(loop.node) is None
    subprocess.run([need_tool("e2fsck"), "-fy", str(image)], capture_output=True)
    with Mounted(image, tmp_path / "m") as root:
        assert not (root / "DICOMDIR").exists() or _references_exist(root)


def test_exfat_stick_needs_formatting_then_formats_through_udisks(stack, tmp_path: Path,
                                                                  loops) -> None:
    image = exfat_image(tmp_path / "exfat.img")
    loops.append(Loop(image))
    policy = stick_policy(image)
    disk = devices.find(policy, loops[-1].node)
    assert disk.state == "needs-format" and "exFAT" in disk.reason
    done = format_stick(disk, UDisks(), policy, identity=disk.identity)
    assert done.fs_type == "vfat" and done.fs_version in ("FAT16", "FAT32") and done.eligible
    res = subprocess.run([need_tool("fsck.fat"), "-n", str(image)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert done.label == "BACKUP"  # the stick's label is kept


def test_cli_lists_the_stick_and_refuses_the_rest(stack, tmp_path: Path, loops) -> None:
    loop, image = _stick(stack, tmp_path, loops)
    other = Loop(ext4_image(tmp_path / "other.img"))  # a loop device not in the policy
    loops.append(other)
    res = subprocess.run([sys.executable, "-m", "mastering", "usb", "--list", "--all",
                          "--json", "--config", str(usb_config(tmp_path, [image]))],
                         capture_output=True, text=True, env=stack.env(), check=True)
    found = {d["node"]: d for d in json.loads(res.stdout)}
    assert found[loop.node]["eligible"]
    assert found[other.node]["code"] == "bus"
    assert all(d["code"] == "system" for d in found.values() if d["name"].startswith("vd"))
    # off a terminal: one plain line per disk (no colour, no wrapping: grep finds a whole line)
    res = subprocess.run([sys.executable, "-m", "mastering", "usb", "--list", "--all",
                          "--config", str(usb_config(tmp_path, [image]))],
                         capture_output=True, text=True, env={**stack.env(), "COLUMNS": "40"},
                         check=True)
    assert "\x1b" not in res.stdout
    lines = res.stdout.splitlines()
    assert any(line.startswith(loop.node + "  ") and line.endswith("can be written")
               for line in lines), lines
    assert any(line.startswith(other.node + "  ") and line.endswith("refused")
               for line in lines), lines


def test_cli_prints_outside_text_as_it_is(stack, tmp_path: Path, loops) -> None:
    """A name from outside (here a device name) is never read as markup nor wrapped."""
    loop, image = _stick(stack, tmp_path, loops)
    name = "/dev/[/red]no-such-stick-" + "x" * 80
    res = subprocess.run([sys.executable, "-m", "mastering", "usb", str(tmp_path), "--device",
                          name, "--config", str(usb_config(tmp_path, [image]))],
                         capture_output=True, text=True, env=stack.env(), timeout=60)
    assert res.returncode == 7, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: ") and name in first, res.stderr


def test_cancel_mid_write_leaves_the_stick_as_it_was(stack, tmp_path: Path, loops) -> None:
    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    cancel = Event()

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 3:
            cancel.set()

    out = export.export(disk, [ct_series(tmp_path / "in", 1, 8)], Options(USB, workers=1),
                        UDisks(), policy, progress=progress, cancel=cancel)
    assert not out.ok and out.exit_code == 130
    with Mounted(image, tmp_path / "m") as root:
        assert sorted(p.name for p in root.iterdir()) == ["lost+found"]
    make_ct  # noqa: B018 - imported for the shared helpers


def test_cli_waits_for_a_stick(stack, tmp_path: Path, loops) -> None:
    """--wait: the command waits until a stick is inserted (a loop device attached), then
    writes it and says so."""
    image = ext4_image(tmp_path / "later.img")
    cmd = [sys.executable, "-m", "mastering", "usb", str(sample("CT_small.dcm")), "--wait",
           "--timeout", "60", "--config", str(usb_config(tmp_path, [image]))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=stack.env())
    try:
        first = proc.stderr.readline()
        assert "waiting for a USB stick" in first
        loops.append(Loop(image))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Safe to remove the stick." in out


def test_cli_format_is_never_automatic(stack, tmp_path: Path, loops) -> None:
    image = exfat_image(tmp_path / "exfat.img")
    loops.append(Loop(image))
    base = [sys.executable, "-m", "mastering", "usb", str(sample("CT_small.dcm")), "--device",
            loops[-1].node, "--config", str(usb_config(tmp_path, [image]))]
    plain = subprocess.run(base, capture_output=True, text=True, env=stack.env())
    assert plain.returncode == 7 and "use --format" in plain.stderr
    unasked = subprocess.run([*base, "--format"], capture_output=True, text=True,
                             env=stack.env(), stdin=subprocess.DEVNULL)
    assert unasked.returncode == 7 and "--yes" in unasked.stderr
    assert "BACKUP" in unasked.stderr and "erases everything" in unasked.stderr
    blkid = subprocess.run([need_tool("blkid"), "-p", "-o", "value", "-s", "TYPE", str(image)],
                           capture_output=True, text=True)
    assert blkid.stdout.strip() == "exfat"  # untouched


@pytest.mark.oracle
def test_export_through_mount8_as_root(stack, tmp_path: Path, loops) -> None:
    """Where udisks2 does not run: mount(8) as root, into a private folder under
    /media/mastering; the run's work folder (conversions) goes beside it, on the disk that
    holds /media, never into /run (RAM on Debian)."""
    from mastering.outputs import is_work_folder
    from mastering.usb.mount import MEDIA_DIR, Mount8

    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    had = MEDIA_DIR.exists()
    before = set(MEDIA_DIR.iterdir()) if had else set()
    seen: list[tuple[Path, list[Path]]] = []

    def progress(stage: str, done: int, total: int) -> None:
        point = mount_point_of(loop.node)
        if stage.startswith("write") and point is not None and not seen:
            seen.append((point.parent, [p for p in point.parent.iterdir() if is_work_folder(p)]))

    out = export.export(disk, [sample("CT_small.dcm"), sample("MR_small.dcm")],
                        Options(USB, workers=1), Mount8(), policy, progress=progress)
    assert out.ok, out.detail
    assert not out.powered_off  # a loop image has no USB port to switch off
    assert seen[0][0] == MEDIA_DIR and len(seen[0][1]) == 1  # staged beside the mount point
    assert mount_point_of(loop.node) is None
    assert (set(MEDIA_DIR.iterdir()) if MEDIA_DIR.exists() else set()) == before
    if not had:
        MEDIA_DIR.rmdir()
    with Mounted(image, tmp_path / "m") as root:
        _judge(root, 2)


def test_read_back_never_trusts_memory(stack, tmp_path: Path, loops) -> None:
    """The read-back must come from the device. (a) The stick is busy at the read-back: no
    lazy unmount (which keeps the file system and its cache for the remount): "not
    verified". (b) Another mount namespace keeps the file system alive, so the remount gets
    it back from memory: the device's read counter shows it, "not verified". Never "safe"."""
    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    src = ct_series(tmp_path / "in", 1, 6, rows=128)
    held: list = []

    def hold_busy(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 1 and not held:
            held.append(os.open(mount_point_of(loop.node), os.O_RDONLY))

    def hold_elsewhere(stage: str, done: int, total: int) -> None:
        """A process in a mount namespace of its own (a copy of every mount), working in the
        stick's folder: unmounting here (and udisks2 removing the folder, which detaches the
        copy) leaves the file system alive for it."""
        if stage.startswith("write") and done == 1 and not held:
            held.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                          f"--wd={mount_point_of(loop.node)}", "sleep", "60"]))
            time.sleep(0.3)  # the namespace exists

    how = UDisks()
    try:
        for progress in (hold_busy, hold_elsewhere):
            stages: list[str] = []
            out = export.export(disk, [src], Options(USB, workers=1), how, policy,
                                progress=progress, stage=stages.append)
            assert not out.ok and out.message == export.NOT_VERIFIED, (progress, out)
            assert "verifying" in stages and "safe" not in stages
            if progress is hold_busy:
                assert "could not be unmounted" in out.detail
                os.close(held.pop())
            else:
                assert "stayed alive after the unmount" in out.detail
                held.pop().kill()
            assert mount_point_of(loop.node) is None
    finally:
        how.close()
        for h in held:
            h.kill() if isinstance(h, subprocess.Popen) else os.close(h)
    time.sleep(0.2)
    with Mounted(image, tmp_path / "m") as root:  # the run's files were removed again
        assert sorted(p.name for p in root.iterdir()) == ["lost+found"]


def test_the_read_counter_tells_the_device_from_memory(stack, tmp_path: Path, loops) -> None:
    """ReadBack.confirm: a read served from the page cache is refused, the same read after a
    full unmount (the kernel drops the file system and the device's cache) is accepted."""
    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    how = UDisks()
    stick = export._Stick(disk, how, lambda name: None, policy)
    data = os.urandom(2 << 20)
    try:
        (stick.mount() / "FILE").write_bytes(data)
        os.sync()
        check = export.ReadBack(stick)
        check.before = loop.sectors_read()
        assert (stick.point / "FILE").read_bytes() == data  # from memory
        with pytest.raises(export.ReadBackError, match="came from memory"):
            check.confirm(len(data))
        point = check(stick.point)  # unmount, drop, mount: now from the device
        assert (point / "FILE").read_bytes() == data
        check.confirm(len(data))
        assert stick.notes == []  # as root the cache drop works: nothing to report
    finally:
        stick.unmount()
        how.close()


class _SwapAtReadBack(UDisks):
    """udisks2, and at the read-back's unmount another stick takes the node (a person swaps
    sticks while the kiosk shows "checking")."""

    def __init__(self, loops: list[Loop], other: Path):
        super().__init__()
        self.loops, self.other, self.mounted = loops, other, []

    def unmount(self, disk, point, **kw) -> None:
        super().unmount(disk, point, **kw)
        if self.loops[0].attached:  # the first unmount: the read-back's
            self.loops[0].detach()
            self.loops.append(Loop(self.other, node=self.loops[0].node))

    def mount(self, disk, *, read_only: bool = False) -> Path:
        self.mounted.append(Path(f"/sys/block/{Path(disk.node).name}/loop/backing_file")
                            .read_text().strip())
        return super().mount(disk, read_only=read_only)


def test_read_back_remount_checks_it_is_the_same_stick(stack, tmp_path: Path, loops) -> None:
    loop, image = _stick(stack, tmp_path, loops)
    other = ext4_image(tmp_path / "other.img")
    policy = _policy(image, other)
    disk = devices.find(policy, loop.node)
    how = _SwapAtReadBack(loops, other)
    try:
        out = export.export(disk, [sample("CT_small.dcm")], Options(USB, workers=1), how,
                            policy)
    finally:
        how.close()
    assert not out.ok and out.message == export.REMOVED
    assert "another took its place" in out.detail
    assert how.mounted == [str(image.resolve())]  # the other stick was never mounted


def test_a_pulled_stick_is_removed_not_cancelled(stack, tmp_path: Path, loops) -> None:
    """The kiosk's watcher sets both 'removed' and 'cancel' when the stick goes: the person
    hears that it was removed. A cancelled --replace says that the old images are gone."""
    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    cancel, removed = Event(), Event()

    def watcher(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 2 and not removed.is_set():
            pull(loop, mount_point_of(loop.node))
            removed.set()
            cancel.set()

    out = export.export(disk, [ct_series(tmp_path / "in", 1, 6)], Options(USB, workers=1),
                        UDisks(), policy, progress=watcher, cancel=cancel, removed=removed)
    assert not out.ok and out.message == export.REMOVED and out.removed

    loop, image = _stick(stack, tmp_path, loops, "second.img")
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    how = UDisks()
    assert export.export(disk, [sample("CT_small.dcm")], Options(USB, workers=1), how,
                         policy).ok
    cancel = Event()

    def cancel_after_removal(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 1:
            cancel.set()

    out = export.export(disk, [ct_series(tmp_path / "in2", 1, 4, first=9)],
                        Options(USB, workers=1, update="replace"), how, policy,
                        progress=cancel_after_removal, cancel=cancel)
    how.close()
    assert not out.ok and out.exit_code == 130
    assert out.message == export.CANCELLED_AFTER_REMOVAL


def test_format_looks_the_stick_up_again(stack, tmp_path: Path, loops) -> None:
    """Between "Type yes" (or the kiosk's confirmation) and the format, another stick takes
    the node: nothing is formatted."""
    first = exfat_image(tmp_path / "a.img")
    loops.append(Loop(first))
    second = exfat_image(tmp_path / "b.img", label="OTHER")
    policy = _policy(first, second)
    disk = devices.find(policy, loops[0].node)
    assert disk.state == "needs-format"
    loops[0].detach()
    loops.append(Loop(second, node=loops[0].node))
    how = UDisks()
    try:
        with pytest.raises(FormatRefused, match="another stick"):
            format_stick(disk, how, policy)
        with pytest.raises(FormatRefused, match="another stick"):
            format_stick(disk, how, policy, identity=disk.identity)  # as the kiosk calls it
    finally:
        how.close()
    blkid = subprocess.run([need_tool("blkid"), "-p", "-o", "value", "-s", "TYPE", str(second)],
                           capture_output=True, text=True)
    assert blkid.stdout.strip() == "exfat"  # untouched


def test_loop_cleanup_touches_only_our_own_devices(tmp_path: Path) -> None:
    """The loops fixture after a test whose stick was pulled: another agent has attached its
    own image to the same loop number and mounted it; the cleanup leaves both alone."""
    mine = Loop(ext4_image(tmp_path / "mine.img"))
    mine.detach()
    theirs = Loop(ext4_image(tmp_path / "theirs.img"), node=mine.node)
    point = tmp_path / "theirs"
    point.mkdir()
    subprocess.run(["mount", theirs.node, str(point)], check=True)
    try:
        mine.attached = True  # as a test that failed half-way may leave it
        release([mine])
        assert os.path.ismount(point) and theirs.ours()
    finally:
        subprocess.run(["umount", str(point)], check=True)
        theirs.detach()
