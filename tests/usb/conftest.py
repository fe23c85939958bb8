"""The real stack for the USB tests, started and stopped by the tests themselves: a private
system D-Bus (its own socket; /run/dbus untouched), systemd-udevd (only if none runs: there is
one udevd per machine) and udisksd on that bus; loop devices over image files made here.

One stack at a time on the machine: an exclusive lock (another worker or another checkout
running these tests waits), and every daemon gets PR_SET_PDEATHSIG so none outlives the test
process even if it is killed. Only loop devices these tests attached are touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mastering.usb import devices

LOCK = Path("/run/lock/mastering-usb-tests.lock")
UDEVD = Path("/lib/systemd/systemd-udevd")
UDISKSD = Path("/usr/libexec/udisks2/udisksd")
DEBIAN_PYTHON = Path("/usr/bin/python3")  # has python3-gi for the umockdev test beds
MiB = 2**20


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def need_tool(path: str | Path) -> str:
    found = shutil.which(str(path)) or (str(path) if Path(path).exists() else None)
    if found is None:  # scripts/test installs them; missing means a broken setup
        pytest.fail(f"{path} is not installed: run scripts/test (it installs the Debian tools)")
    return found


def _wait(check, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up in {timeout} s")
        time.sleep(0.05)


def _udevd_running() -> bool:
    return subprocess.run(["udevadm", "control", "--ping", "--timeout=1"],
                          capture_output=True).returncode == 0


class Stack:
    """What the tests started; bus is the private system bus address."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.bus = f"unix:path={root / 'system_bus'}"
        self.created: list[Path] = []

    def start(self) -> None:
        for path in (Path("/run/udev"), Path("/run/udisks2"), Path("/media/root")):
            if not path.exists():
                self.created.append(path)
        self._dbus()
        if not _udevd_running():
            self.procs.append(self._spawn([need_tool(UDEVD)], "udevd"))
            _wait(_udevd_running, "systemd-udevd")
        self.procs.append(self._spawn([need_tool(UDISKSD), "--no-debug"], "udisksd",
                                      DBUS_SYSTEM_BUS_ADDRESS=self.bus))
        from mastering.usb.mount import UDisks

        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus
        _wait(UDisks.available, "udisksd")

    def _dbus(self) -> None:
        conf = Path("/usr/share/dbus-1/system.conf").read_text()
        conf = conf.replace("<includedir>system.d</includedir>",
                            "<includedir>/usr/share/dbus-1/system.d</includedir>")
        import re

        conf = re.sub(r"<listen>.*?</listen>", f"<listen>{self.bus}</listen>", conf)
        conf = re.sub(r"<pidfile>.*?</pidfile>", "", conf)
        conf = conf.replace("<user>messagebus</user>", "")
        (self.root / "bus.conf").write_text(conf)
        self.procs.append(self._spawn([need_tool("dbus-daemon"), "--nofork",
                                       f"--config-file={self.root / 'bus.conf'}"], "dbus"))
        _wait(lambda: (self.root / "system_bus").exists(), "dbus-daemon")

    def _spawn(self, cmd: list[str], name: str, **env: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, preexec_fn=_die_with_parent)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        for path in self.created:  # what the daemons made and nobody had before
            if path == Path("/media/root"):
                _rmdir(path)  # udisks' mount folder, if empty
            else:
                shutil.rmtree(path, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus}


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """The real udevd + D-Bus + udisksd stack (one per machine at a time)."""
    if os.geteuid() != 0:
        pytest.fail("the USB stack tests need root (loop devices, udevd, mounts)")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        s = Stack(tmp_path_factory.mktemp("stack"))
        try:
            s.start()
            yield s
        finally:
            s.stop()


# -- images and loop devices ---------------------------------------------------------------


def ext4_image(path: Path, size: int = 64 * MiB, label: str = "PATIENT",
               slack: int = 0) -> Path:
    """An ext4 file system standing in for the stick's FAT (this kernel has no vfat); with
    slack, the image is that much larger than the file system (see unplug)."""
    with open(path, "wb") as fh:
        fh.truncate(size + slack)
    subprocess.run([need_tool("mkfs.ext4"), "-q", "-F", "-L", label, "-O", "^has_journal",
                    str(path), f"{size // 1024}k"], check=True)
    return path


def fat_image(path: Path, size: int = 64 * MiB, label: str = "PATIENT",
              bits: int = 32) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    subprocess.run([need_tool("mkfs.vfat"), "-F", str(bits), "-n", label, str(path)],
                   check=True, capture_output=True)
    return path


def exfat_image(path: Path, size: int = 64 * MiB, label: str = "BACKUP") -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    subprocess.run([need_tool("mkfs.exfat"), "-L", label, str(path)], check=True,
                   capture_output=True)
    return path


class Loop:
    """A loop device over an image, attached by the test and detached at the end. Another
    agent may attach its own image to the same number once this one is detached: every
    action first checks that the device is still backed by this image."""

    def __init__(self, image: Path, node: str | None = None):
        self.image = image
        cmd = [need_tool("losetup"), "--show", *([node] if node else ["-f"]), str(image)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        self.node = res.stdout.strip() or str(node)
        self.name = Path(self.node).name
        self.attached = True
        subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True)

    def ours(self) -> bool:
        """The device is (still) backed by this image."""
        try:
            backing = Path(f"/sys/block/{self.name}/loop/backing_file").read_text().strip()
        except OSError:
            return False
        return os.path.realpath(backing) == os.path.realpath(self.image)

    def devnum(self) -> str:
        return Path(f"/sys/block/{self.name}/dev").read_text().strip()

    def sectors_read(self) -> int:
        return int(Path(f"/sys/block/{self.name}/stat").read_text().split()[2])

    def mount_points(self) -> list[str]:
        """Where this device is mounted (by device number, and only while it is ours)."""
        if not self.ours():
            return []
        number = self.devnum()
        return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                .splitlines() if line.split()[2] == number]

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            if self.ours():
                subprocess.run(["losetup", "-d", self.node], capture_output=True)
                subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True)


def release(made: list[Loop]) -> None:
    """Unmount and detach what a test attached, and only that: a device number another agent
    reused after our detach is theirs (mounts by device number, only while it is ours)."""
    for loop in made:
        for point in loop.mount_points():  # a mount a failed test left, of our device only
            subprocess.run(["umount", "-l", point], capture_output=True)
        loop.detach()


@pytest.fixture
def loops() -> Iterator[list[Loop]]:
    made: list[Loop] = []
    yield made
    release(made)


#: the tests' device policy: no bus at all, only the loop images a test names (never a real
#: stick of the machine the tests run on), ext4 standing in for FAT
TEST_POLICY = {"buses": (), "filesystems": ("vfat", "ext4")}


def stick_policy(*images: Path) -> devices.Policy:
    return devices.Policy(**TEST_POLICY, loop_images=tuple(str(p.resolve()) for p in images))


def usb_config(tmp: Path, images: list[Path], **extra: str) -> Path:
    """A kiosk/usb configuration with the tests' policy for these images."""
    lines = ["[usb]", f"loop_images = {[str(p) for p in images]!r}".replace("'", '"'),
             "buses = []", 'filesystems = ["vfat", "ext4"]']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = tmp / "kiosk.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


EXT4_SHUTDOWN = 0x8004587D  # EXT4_IOC_SHUTDOWN
SHUTDOWN_NOLOGFLUSH = 2


def pull(loop: Loop, mount_point: Path) -> None:
    """Pull the stick: its I/O fails at once (EXT4_IOC_SHUTDOWN: every later read and write
    returns EIO, as on a device that went) and the loop device is detached (this kernel
    defers a detach while the device is mounted, until the unmount, so udev sees nothing
    yet: see unplug)."""
    import struct

    fd = os.open(mount_point, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
    finally:
        os.close(fd)
    loop.detach()


def unplug(loop: Loop, slack: int) -> None:
    """The stick goes as udev sees it, while it is mounted and being written: the image (made
    with this slack beyond its file system) is cut by the slack and the loop device told
    (LOOP_SET_CAPACITY): the kernel sends a change event with the new size, so the device
    that was there (name, serial, size) is gone for every watcher; then the detach."""
    assert loop.ours()
    with open(loop.image, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - slack)  # only the slack: the file system stays whole
    subprocess.run(["losetup", "-c", loop.node], check=True, capture_output=True)
    loop.detach()


def mount_point_of(node: str) -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 2] == node:
            return Path(fields[4])
    return None
