"""The FAT layout itself, without the kernel's vfat (this kernel has none): the in-place
writer writes onto a FAT32 image mounted through fusefat (FUSE); fsck.fat must find nothing
wrong, mtools reads the File-set back for dciodvfy, dcmdump and pydicom's FileSet, and the
names the writer chooses are FAT 8.3 short names (mtools, which writes a long-name entry only
for names that need one, writes none for them). Killing fusefat mid-write stands for a
pulled stick: the run fails and the image holds no DICOMDIR."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.fileset import FileSet

from mastering import profiles
from mastering.pipeline import Options, master

from ..conftest import ct_series, dciodvfy_errors, dcmdump, sample
from .conftest import fat_image, need_tool

pytestmark = pytest.mark.usbstack
USB = profiles.load("STD-GEN-USB-JPEG")
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


class FuseFat:
    """A FAT image mounted read-write through fusefat, in the foreground (so the test owns
    the process and can kill it)."""

    def __init__(self, image: Path, where: Path):
        where.mkdir()
        self.where = where
        self.proc = subprocess.Popen([need_tool("fusefat"), "-f", "-o", "rw+", str(image),
                                      str(where)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.ismount(where):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail("fusefat did not mount the image")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount", "-u", str(self.where)], check=True)
            self.proc.wait(timeout=10)
        else:
            subprocess.run(["fusermount", "-u", "-z", str(self.where)], capture_output=True)


def _fsck(image: Path) -> str:
    res = subprocess.run([need_tool("fsck.fat"), "-n", str(image)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _mcopy_out(image: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run([need_tool("mcopy"), "-s", "-n", "-i", str(image), "::/*", str(dest)],
                   check=True, env=MTOOLS, capture_output=True)
    return dest


@pytest.mark.oracle
def test_fileset_on_fat32_through_fusefat(tmp_path: Path) -> None:
    image = fat_image(tmp_path / "stick.img")
    fuse = FuseFat(image, tmp_path / "mnt")
    try:
        report = master([ct_series(tmp_path / "in", 2, 3), sample("CT_small.dcm")], fuse.where,
                        Options(USB, workers=1, viewer=True, verify=True, fileset_id="PATIENT"),
                        kind="inplace")
        assert report.ok
    finally:
        fuse.close()
    _fsck(image)
    root = _mcopy_out(image, tmp_path / "out")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    dcmdump(root / "DICOMDIR")
    assert len(list(FileSet(root / "DICOMDIR"))) == 7
    names = [p.relative_to(root) for p in root.rglob("*")]
    assert {"DICOMDIR", "README.TXT", "INDEX.HTM", "IHE_PDI", "DICOM"} <= {str(n) for n in names}
    assert not (root / "DICOMDIR.JNL").exists() and not (root / "DICOMDIR.TMP").exists()

    # mtools writes a VFAT long-name entry only for a name that needs one: it writes none here
    fresh = fat_image(tmp_path / "copy.img")
    for path in sorted(root.rglob("*")):
        rel = "::/" + path.relative_to(root).as_posix()
        cmd = ["mmd", "-i", str(fresh), rel] if path.is_dir() else \
            ["mcopy", "-i", str(fresh), str(path), rel]
        subprocess.run([need_tool(cmd[0]), *cmd[1:]], check=True, env=MTOOLS)
    listing = subprocess.run([need_tool("mdir"), "-/", "-i", str(fresh), "::/"],
                             capture_output=True, text=True, env=MTOOLS, check=True).stdout
    assert not long_names(listing) and "DICOMDIR" in listing
    _fsck(fresh)
    # the check itself can fail: fusefat writes every name with a long-name entry
    stored = subprocess.run([need_tool("mdir"), "-/", "-i", str(image), "::/"],
                            capture_output=True, text=True, env=MTOOLS, check=True).stdout
    assert "DICOMDIR" in long_names(stored)


def long_names(listing: str) -> list[str]:
    """mdir prints 'NAME     EXT   size date time' and, if the entry has a VFAT long name,
    that name after the time."""
    found = []
    for line in listing.splitlines():
        m = re.match(r"^(?!\.)\S.*?\d{4}-\d{2}-\d{2}\s+\d{1,2}:\d{2}\s+(\S.*)$", line)
        if m:
            found.append(m.group(1).strip())
    return found


def test_pulled_fat_stick_holds_no_dicomdir(tmp_path: Path) -> None:
    image = fat_image(tmp_path / "stick.img")
    fuse = FuseFat(image, tmp_path / "mnt")

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("write") and done == 5:
            fuse.kill()  # the stick is gone: every later call fails (ENOTCONN)

    try:
        with pytest.raises(OSError):
            master([ct_series(tmp_path / "in", 1, 12)], fuse.where, Options(USB, workers=1),
                   kind="inplace", progress=progress)
    finally:
        fuse.close()
    res = subprocess.run([need_tool("mdir"), "-i", str(image), "::/DICOMDIR"],
                         capture_output=True, text=True, env=MTOOLS)
    assert res.returncode != 0  # no DICOMDIR: nothing that looks finished
