"""Mounting, unmounting and powering off a stick: udisks2 over D-Bus where it runs (as a desktop
or the kiosk's service user does, allowed by polkit), else mount(8) as root.

udisks2 (``org.freedesktop.UDisks2`` on the system bus, spoken with jeepney): the Block object
whose ``Device`` is the partition is mounted with ``Filesystem.Mount`` (udisks picks the mount
point under /media/USER and safe options: nosuid, nodev, for vfat ``shortname=mixed,flush``),
unmounted with ``Filesystem.Unmount`` and the stick switched off with ``Drive.PowerOff``, which
syncs, stops the unit and powers the USB port down: only then is pulling it harmless.

mount(8) as root: a private folder under /media/mastering (removable media, FHS; like udisks2's
/media/USER), ``nosuid,nodev,noexec`` and for vfat ``shortname=mixed,utf8,flush``. The run's
work folder (conversions staged before they are written) goes beside the mount point, so on
the disk that holds /media, never into /run (RAM). Power off writes 1 to the USB device's
``remove`` attribute after flushing the device's buffers, which is what udisks does too.

The read-back must come from the device, not from memory. A full unmount ends the file system
in the kernel (its files' cached pages go with it) and the last close of the device drops the
device's own cache; :func:`drop_cache` adds BLKFLSBUF and POSIX_FADV_DONTNEED where it can
(they need the device node and, for BLKFLSBUF, CAP_SYS_ADMIN: the kiosk's hardened unit has
neither, so there it reports what it could not do). A *lazy* unmount would keep the file
system, and its cache, alive for the next mount: the read-back therefore never unmounts
lazily (``unmount(lazy=False)``), :func:`held_elsewhere` sees a file system kept alive in
another mount namespace, and :func:`sectors_read` (the device's read counter in
/sys/class/block/NAME/stat, readable by anyone) lets the caller prove afterwards that the
bytes it checked were read from the device.
"""

from __future__ import annotations

import contextlib
import errno
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
MEDIA_DIR = Path("/media/mastering")  # mount(8) mode's mount points
SECTOR = 512
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
    def unmount(self, disk: Disk, point: Path, *, lazy: bool = True) -> None:
        """Unmount; if that fails (busy, or the stick was pulled) and lazy, detach the mount
        lazily (the kernel finishes when the last user lets go). Raise MountError."""

    @abstractmethod
    def power_off(self, disk: Disk) -> bool:
        """Switch the stick off for removal; False if it cannot be (a loop image)."""

    @abstractmethod
    def format(self, disk: Disk, label: str) -> None:
        """Make a FAT file system on disk.target (see mastering.usb.format)."""

    def close(self) -> None:  # noqa: B027 - most mounters hold nothing
        """Release what the mounter holds (udisks2: its bus connection)."""


def drop_cache(node: str) -> list[str]:
    """Write back and drop the device's cached pages; returns what could not be done (the
    node cannot be opened, BLKFLSBUF without CAP_SYS_ADMIN), [] when both calls worked."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return [f"{node}: cannot be opened to drop its cached pages ({exc.strerror or exc})"]
    problems = []
    try:
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        except OSError as exc:
            problems.append(f"{node}: BLKFLSBUF failed ({exc.strerror or exc})")
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            problems.append(f"{node}: POSIX_FADV_DONTNEED failed ({exc.strerror or exc})")
    finally:
        os.close(fd)
    return problems


def held_elsewhere(node: str) -> bool | None:
    """After our unmount: does something still hold the device, e.g. its file system alive
    in another mount namespace (a lazy unmount, a service that copied the mount)? An
    exclusive open (O_EXCL on a block device) fails with EBUSY exactly then, whatever the
    namespace. None when the node cannot be opened here (no access: the kiosk's unit)."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return True if exc.errno == errno.EBUSY else None
    os.close(fd)
    return False


def sectors_read(node: str) -> int | None:
    """Sectors (512 bytes) read from the device so far (/sys/class/block/NAME/stat, field 3);
    None if the kernel does not say."""
    name = os.path.basename(os.path.realpath(node))
    try:
        return int(Path(f"/sys/class/block/{name}/stat").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return None


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

    def unmount(self, disk: Disk, point: Path, *, lazy: bool = True) -> None:
        path, _ = self.block(disk.target)
        try:
            self._call(path, IFACE + "Filesystem", "Unmount", "a{sv}",
                       ({"auth.no_user_interaction": ("b", True)},))
        except MountError:
            if not lazy:
                raise
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
        MEDIA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        point = Path(tempfile.mkdtemp(prefix=f"{disk.name}.", dir=MEDIA_DIR))
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

    def unmount(self, disk: Disk, point: Path, *, lazy: bool = True) -> None:
        res = subprocess.run(["umount", str(point)], capture_output=True, text=True)
        if res.returncode and lazy:  # pulled: detach lazily, the kernel finishes when it can
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


def mounter(prefer: str = "auto") -> Mounter:
    """udisks2 where it runs, else mount(8) if we are root; prefer (the policy's "mounter")
    "udisks2" or "mount" allows only that one."""
    if prefer in ("auto", "udisks2") and UDisks.available():
        return UDisks()
    if prefer in ("auto", "mount") and os.geteuid() == 0:
        return Mount8()
    if prefer == "udisks2":
        raise MountError("udisks2 does not run on the system bus (and the configuration "
                         "allows no other way to mount sticks)")
    if prefer == "mount":
        raise MountError("mount(8) needs root rights")
    raise MountError("neither udisks2 (on the system bus) nor root rights to run mount(8)")
