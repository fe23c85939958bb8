"""Mounting, unmounting and powering off a stick: udisks2 over D-Bus where it runs (as a desktop
or the kiosk's service user does, allowed by polkit), else mount(8) as root.

udisks2 (``org.freedesktop.UDisks2`` on the system bus, spoken with jeepney): the Block object
whose ``Device`` is the partition is mounted with ``Filesystem.Mount`` (udisks picks the mount
point under /media/USER and safe options: nosuid, nodev, for vfat ``shortname=mixed,flush``),
unmounted with ``Filesystem.Unmount`` and the stick switched off with ``Drive.PowerOff``, which
syncs, stops the unit and powers the USB port down: only then is pulling it harmless.

mount(8) as root: a private folder under /run/mastering, ``nosuid,nodev,noexec`` and for vfat
``shortname=mixed,utf8,flush``; power off writes 1 to the USB device's ``remove`` attribute
after flushing the device's buffers, which is what udisks does too.

:func:`drop_cache` makes the next reads come from the device: after an unmount the last close
of the device drops its page cache; BLKFLSBUF and POSIX_FADV_DONTNEED make sure of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from .devices import Disk

BLKFLSBUF = 0x1261
UDISKS = "org.freedesktop.UDisks2"
UDISKS_PATH = "/org/freedesktop/UDisks2"
IFACE = "org.freedesktop.UDisks2."
RUN_DIR = Path("/run/mastering")
VFAT_OPTIONS = "shortname=mixed,utf8,flush"


class MountError(OSError):
    """Mounting, unmounting, powering off or formatting failed; the message says why."""


class Mounter(ABC):
    """One way of mounting sticks."""

    name: str

    @abstractmethod
    def mount(self, disk: Disk, *, read_only: bool = False) -> Path:
        """Mount disk.target; returns the mount point."""

    @abstractmethod
    def unmount(self, disk: Disk, point: Path) -> None:
        """Unmount; a stick already pulled is unmounted lazily."""

    @abstractmethod
    def power_off(self, disk: Disk) -> bool:
        """Switch the stick off for removal; False if it cannot be (a loop image)."""

    @abstractmethod
    def format(self, disk: Disk, label: str) -> None:
        """Make a FAT file system on disk.target (see mastering.usb.format)."""

    def close(self) -> None:  # noqa: B027 - most mounters hold nothing
        """Release what the mounter holds (udisks2: its bus connection)."""


def drop_cache(node: str) -> None:
    """Write back and drop the device's cached pages (best effort without CAP_SYS_ADMIN)."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- udisks2 --------------------------------------------------------------------------------


class UDisks(Mounter):
    """udisks2 on the system bus (DBUS_SYSTEM_BUS_ADDRESS, or the default socket)."""

    name = "udisks2"

    def __init__(self) -> None:
        from jeepney.io.blocking import open_dbus_connection

        self.conn = open_dbus_connection(bus="SYSTEM")

    def close(self) -> None:
        self.conn.close()

    @staticmethod
    def available() -> bool:
        """udisksd owns its name on the system bus (or can be started by it)."""
        try:
            u = UDisks()
        except (OSError, ValueError, KeyError, RuntimeError):
            return False
        try:
            from jeepney.bus_messages import message_bus

            reply = u.conn.send_and_get_reply(message_bus.NameHasOwner(UDISKS), timeout=5)
            if reply.body and reply.body[0]:
                return True
            reply = u.conn.send_and_get_reply(message_bus.ListActivatableNames(), timeout=5)
            return UDISKS in (reply.body[0] if reply.body else [])
        except Exception:  # noqa: BLE001 - any bus trouble means: not available
            return False
        finally:
            u.close()

    def _call(self, path: str, iface: str, method: str, signature: str = "",
              body: tuple = (), timeout: float = 120) -> tuple:
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        addr = DBusAddress(path, bus_name=UDISKS, interface=iface)
        reply = self.conn.send_and_get_reply(new_method_call(addr, method, signature, body),
                                             timeout=timeout)
        try:
            return unwrap_msg(reply)
        except DBusErrorResponse as exc:
            raise MountError(_udisks_words(exc.name, str(exc.data[0] if exc.data else ""))) \
                from exc

    def objects(self) -> dict:
        (objs,) = self._call(UDISKS_PATH, "org.freedesktop.DBus.ObjectManager",
                             "GetManagedObjects")
        return objs

    def block(self, node: str) -> tuple[str, dict]:
        """(object path, interfaces) of the Block object of a device node."""
        want = os.path.realpath(node).encode()
        for path, ifaces in self.objects().items():
            blk = ifaces.get(IFACE + "Block")
            if blk and bytes(blk["Device"][1]).rstrip(b"\0") == want:
                return path, ifaces
        raise MountError(f"udisks2 does not know {node} (is udevd running?)")

    def mount(self, disk: Disk, *, read_only: bool = False) -> Path:
        path, ifaces = self.block(disk.target)
        fs = ifaces.get(IFACE + "Filesystem")
        if fs is None:
            raise MountError(f"{disk.target}: udisks2 sees no file system on it")
        options = ["ro"] if read_only else []
        opts = {"auth.no_user_interaction": ("b", True)}
        if options:
            opts["options"] = ("s", ",".join(options))
        (point,) = self._call(path, IFACE + "Filesystem", "Mount", "a{sv}", (opts,))
        return Path(point)

    def unmount(self, disk: Disk, point: Path) -> None:
        path, _ = self.block(disk.target)
        try:
            self._call(path, IFACE + "Filesystem", "Unmount", "a{sv}",
                       ({"auth.no_user_interaction": ("b", True)},))
        except MountError:
            # a stick pulled mid-write: udisks may refuse; force (lazy) detaches the mount
            self._call(path, IFACE + "Filesystem", "Unmount", "a{sv}",
                       ({"force": ("b", True), "auth.no_user_interaction": ("b", True)},))

    def power_off(self, disk: Disk) -> bool:
        _path, ifaces = self.block(disk.node)
        drive = ifaces[IFACE + "Block"]["Drive"][1]
        if not drive or drive == "/":
            return False  # a loop image has no drive
        props = self.objects().get(drive, {}).get(IFACE + "Drive", {})
        if not props.get("CanPowerOff", ("b", False))[1]:
            return False
        self._call(drive, IFACE + "Drive", "PowerOff", "a{sv}",
                   ({"auth.no_user_interaction": ("b", True)},))
        return True

    def format(self, disk: Disk, label: str) -> None:
        path, _ = self.block(disk.target)
        self._call(path, IFACE + "Block", "Format", "sa{sv}",
                   ("vfat", {"label": ("s", label), "update-partition-type": ("b", True),
                             "auth.no_user_interaction": ("b", True)}), timeout=600)


def _udisks_words(name: str, text: str) -> str:
    if name.endswith("NotAuthorized") or name.endswith("NotAuthorizedCanObtain"):
        return ("not allowed to mount or power off sticks: install the polkit rule "
                "systemd/50-mastering-kiosk.rules for this user")
    if name.endswith("NotMounted"):
        return "the stick is not mounted"
    return f"udisks2: {text or name}"


# -- mount(8) -------------------------------------------------------------------------------


class Mount8(Mounter):
    """mount(8) and umount(8) as root."""

    name = "mount(8)"

    def mount(self, disk: Disk, *, read_only: bool = False) -> Path:
        RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        point = Path(tempfile.mkdtemp(prefix=f"{disk.name}.", dir=RUN_DIR))
        options = ["nosuid", "nodev", "noexec", "ro" if read_only else "rw"]
        if disk.fs_type == "vfat":
            options.append(VFAT_OPTIONS)
        cmd = ["mount", "-t", disk.fs_type or "auto", "-o", ",".join(options), disk.target,
               str(point)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            point.rmdir()
            raise MountError(f"mount {disk.target}: {res.stderr.strip()}")
        return point

    def unmount(self, disk: Disk, point: Path) -> None:
        res = subprocess.run(["umount", str(point)], capture_output=True, text=True)
        if res.returncode:  # pulled: detach lazily, the kernel finishes when it can
            res = subprocess.run(["umount", "-l", str(point)], capture_output=True, text=True)
        if res.returncode:
            raise MountError(f"umount {point}: {res.stderr.strip()}")
        with contextlib.suppress(OSError):
            point.rmdir()

    def power_off(self, disk: Disk) -> bool:
        if not disk.usb_device:
            return False
        drop_cache(disk.node)
        try:
            Path(disk.usb_device, "remove").write_text("1\n")
        except OSError as exc:
            raise MountError(f"cannot power off {disk.node}: {exc.strerror or exc}") from exc
        return True

    def format(self, disk: Disk, label: str) -> None:
        for cmd in (["wipefs", "-a", disk.target],
                    ["mkfs.vfat", *(["-F", "32"] if disk.size >= 256 * 2**20 else []),
                     "-n", label, disk.target]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise MountError(f"{cmd[0]} {disk.target}: {res.stderr.strip()}")
        if disk.partitioned:  # partition type 0x0c: FAT32 (LBA)
            subprocess.run(["sfdisk", "--part-type", disk.node, "1", "c"], capture_output=True)


def mounter() -> Mounter:
    """udisks2 where it runs, else mount(8) if we are root."""
    if UDisks.available():
        return UDisks()
    if os.geteuid() == 0:
        return Mount8()
    raise MountError("neither udisks2 (on the system bus) nor root rights to run mount(8)")
