"""The export on the real stack: our own udevd, system D-Bus and udisksd, loop devices over
image files. ext4 stands in for FAT (this kernel has no vfat driver; the FAT layout itself is
tested through fusefat and mtools in test_fat.py): mount through udisks2 -> write in place ->
unmount, drop the cache, mount -> verify and compare -> unmount; append and replace; a stick
pulled mid-write; formatting an exFAT stick through udisks2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from threading import Event

import pytest
from pydicom.fileset import FileSet

from mastering import profiles
from mastering.pipeline import Options
from mastering.usb import devices, export
from mastering.usb.format import format_stick
from mastering.usb.mount import UDisks

from ..conftest import ct_series, dciodvfy_errors, dcmdump, make_ct, sample
from .conftest import Loop, exfat_image, ext4_image, mount_point_of, need_tool, pull, usb_config

pytestmark = [pytest.mark.usbstack, pytest.mark.xdist_group("usbstack")]
USB = profiles.load("STD-GEN-USB-JPEG")


def _policy(*images: Path) -> devices.Policy:
    return devices.Policy(filesystems=("vfat", "ext4"), loop_images=tuple(
        str(p.resolve()) for p in images))


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
    policy = devices.Policy(loop_images=(str(image.resolve()),))
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
    """Where udisks2 does not run: mount(8) as root, into a private folder under /run."""
    from mastering.usb.mount import RUN_DIR, Mount8

    loop, image = _stick(stack, tmp_path, loops)
    policy = _policy(image)
    disk = devices.find(policy, loop.node)
    before = set(RUN_DIR.iterdir()) if RUN_DIR.exists() else set()
    out = export.export(disk, [sample("CT_small.dcm"), sample("MR_small.dcm")],
                        Options(USB, workers=1), Mount8(), policy)
    assert out.ok, out.detail
    assert not out.powered_off  # a loop image has no USB port to switch off
    assert mount_point_of(loop.node) is None
    assert (set(RUN_DIR.iterdir()) if RUN_DIR.exists() else set()) == before
    with Mounted(image, tmp_path / "m") as root:
        _judge(root, 2)
