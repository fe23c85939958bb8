"""Which disk may be written: pyudev discovery and the eligibility policy.

A candidate is a USB mass-storage disk (``ID_BUS=usb`` or a ``usb`` parent), removable, whose
first partition (or the whole device, if it has no partition table) holds FAT16 or FAT32
(PS3.12 R.1, R.1.1). Every other disk is refused, and each refusal says why, in words a person
at the desk understands:

============== ==========================================================================
code           refused because
============== ==========================================================================
system         the disk holds this machine's system: /, /boot, /usr, /var, /home ... or swap
bus            not a USB disk: SATA, NVMe, virtio, MMC, loop ... (unless the policy allows it)
no-medium      a card reader without a card (size 0)
not-removable  a USB hard disk or SSD (removable=0), unless allow_non_removable
too-large      larger than max_size (default 256 GB): external backup drives
mounted        a partition is mounted somewhere (someone is using it)
in-use         the disk or a partition is held by RAID, LVM or encryption (opened LUKS)
read-only      the write-protect switch is on
============== ==========================================================================

A disk that passes those but holds exFAT, NTFS, FAT12 or nothing *needs formatting*: it is
reported so and may be formatted to FAT32 when a person asks (:mod:`.format`), never by itself.
Partition tables are read from udev's database (``ID_PART_*``, ``ID_FS_*``); this module never
opens a disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyudev

SECTOR = 512
GB = 10**9
#: mount points whose disk is "the system": writing there could destroy this machine
SYSTEM_PATHS = ("/", "/boot", "/boot/efi", "/efi", "/usr", "/var", "/home", "/opt", "/srv",
                "/etc", "/root", "/tmp")
BUS_WORDS = {"ata": "SATA/ATA", "scsi": "SCSI/SAS", "nvme": "NVMe", "virtio": "virtio (a virtual "
             "machine's disk)", "mmc": "an SD/MMC card slot", "loop": "a loop device (a file)",
             "zram": "compressed memory (zram)", "ieee1394": "FireWire", "none": "no bus"}
FS_WORDS = {"exfat": "exFAT", "ntfs": "NTFS", "vfat": "FAT", "ext4": "ext4", "ext3": "ext3",
            "ext2": "ext2", "btrfs": "Btrfs", "xfs": "XFS", "hfsplus": "HFS+", "apfs": "APFS",
            "iso9660": "ISO 9660", "udf": "UDF", "crypto_LUKS": "encryption (LUKS)"}
FAT_VERSIONS = ("FAT16", "FAT32")  # PS3.12 R.1.1
MOUNTERS = ("auto", "udisks2", "mount")


@dataclass(frozen=True)
class Policy:
    """What may be written. The defaults follow PS3.12 Annex R and the dangers of issue 9."""

    max_bytes: int = 256 * GB
    allow_non_removable: bool = False
    #: buses whose disks may be written; () = none: only the loop_images (what the tests use,
    #: so that no test can ever reach a real stick of the machine it runs on)
    buses: tuple[str, ...] = ("usb",)
    #: file systems accepted as they are; PS3.12 allows only FAT16/FAT32 ("vfat"). Tests add
    #: "ext4" because the test machine's kernel has no vfat driver.
    filesystems: tuple[str, ...] = ("vfat",)
    #: loop devices backed by these image files count as removable USB sticks (tests, and
    #: preparing a stick image to copy with dd later)
    loop_images: tuple[str, ...] = ()
    #: how sticks are mounted: "auto" (udisks2 where it runs, else mount(8) as root),
    #: "udisks2" only, or "mount" (mount(8) only)
    mounter: str = "auto"

    @classmethod
    def from_config(cls, table: dict) -> Policy:
        """The [usb] table of the kiosk configuration (see README)."""
        known = {"max_size", "allow_non_removable", "buses", "filesystems", "loop_images",
                 "mounter"}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"unknown [usb] key(s): {', '.join(sorted(unknown))}")
        kw: dict = {}
        if "max_size" in table:
            kw["max_bytes"] = parse_size(table["max_size"])
        if "allow_non_removable" in table:
            kw["allow_non_removable"] = bool(table["allow_non_removable"])
        for key in ("buses", "filesystems", "loop_images"):
            if key in table:
                kw[key] = tuple(str(v) for v in table[key])
        if "loop_images" in kw:
            kw["loop_images"] = tuple(os.path.realpath(p) for p in kw["loop_images"])
        if "mounter" in table:
            if table["mounter"] not in MOUNTERS:
                raise ValueError(f"[usb] mounter must be one of {', '.join(MOUNTERS)}")
            kw["mounter"] = table["mounter"]
        return cls(**kw)


def parse_size(value: int | str) -> int:
    """Bytes from 1234, "256 GB", "2TB", "500 MiB"."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {value!r} (say 256 GB)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1000
    return f"{n} B"


@dataclass
class Disk:
    """One whole disk and the decision about it."""

    name: str  # kernel name: sdb
    node: str  # /dev/sdb
    sys_path: str
    target: str  # the device holding the File-set: /dev/sdb1, or /dev/sdb if unpartitioned
    vendor: str = ""
    model: str = ""
    serial: str = ""
    size: int = 0
    bus: str = "none"
    removable: bool = False
    partitioned: bool = False
    fs_type: str = ""
    fs_version: str = ""
    label: str = ""
    state: str = "refused"  # "eligible" | "needs-format" | "refused"
    code: str = ""  # see the module table; "filesystem" for needs-format
    reason: str = ""  # plain words; "" when eligible
    devnum: tuple[int, int] = (0, 0)
    usb_device: str = ""  # sysfs path of the USB device (power off)
    mounts: list[str] = field(default_factory=list)
    image: str = ""  # a loop device over one of the policy's loop_images: that file

    @property
    def eligible(self) -> bool:
        return self.state == "eligible"

    @property
    def title(self) -> str:
        name = " ".join(p for p in (self.vendor, self.model) if p) or self.name
        return f"{name} ({human_size(self.size)})"

    @property
    def identity(self) -> str:
        """Stays the same while the same stick is plugged in; changes with another stick."""
        return f"{self.name}:{self.serial}:{self.size}"

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(eligible=self.eligible, title=self.title, identity=self.identity,
                    size_text=human_size(self.size), filesystem=self.filesystem_text)
        return data

    @property
    def filesystem_text(self) -> str:
        if not self.fs_type:
            return "none"
        word = FS_WORDS.get(self.fs_type, self.fs_type)
        return f"{word} ({self.fs_version})" if self.fs_type == "vfat" and self.fs_version \
            else word


# -- the machine's mounts ------------------------------------------------------------------


@dataclass
class Mounts:
    """Mounted devices (by device number) and what holds the system."""

    points: dict[tuple[int, int], list[str]]
    system: set[tuple[int, int]]  # devices of SYSTEM_PATHS and active swap

    @classmethod
    def read(cls, mountinfo: str = "/proc/self/mountinfo", swaps: str = "/proc/swaps") -> Mounts:
        points: dict[tuple[int, int], list[str]] = {}
        system: set[tuple[int, int]] = set()
        for line in _lines(mountinfo):
            fields = line.split()
            if len(fields) < 5 or "-" not in fields:
                continue
            point = _unescape(fields[4])
            source = fields[fields.index("-") + 2] if len(fields) > fields.index("-") + 2 else ""
            devnum = _devnum(fields[2], source)
            if devnum is None:
                continue
            points.setdefault(devnum, []).append(point)
            if point in SYSTEM_PATHS:
                system.add(devnum)
        for line in _lines(swaps)[1:]:
            dev = _stat_rdev(line.split()[0]) if line.split() else None
            if dev is not None:
                system.add(dev)
        return cls(points, system)


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _devnum(field_: str, source: str) -> tuple[int, int] | None:
    """major:minor of a mount; for anonymous devices (btrfs, overlay: major 0) the source."""
    try:
        major, minor = (int(x) for x in field_.split(":"))
    except ValueError:
        return None
    if major == 0 and source.startswith("/dev/"):
        return _stat_rdev(source) or (major, minor)
    return major, minor


def _stat_rdev(path: str) -> tuple[int, int] | None:
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return None
    return (os.major(rdev), os.minor(rdev)) if rdev else None


# -- classification ------------------------------------------------------------------------


def _attr(dev: pyudev.Device, name: str) -> str:
    try:
        value = dev.attributes.get(name)
    except (KeyError, OSError):
        return ""
    return value.decode("utf-8", "replace").strip() if isinstance(value, bytes) else ""


def device_number(dev: pyudev.Device) -> tuple[int, int]:
    """From the 'dev' attribute (umockdev test beds set only that), else udev's number."""
    text = _attr(dev, "dev")
    if ":" in text:
        major, minor = text.split(":", 1)
        return int(major), int(minor)
    return os.major(dev.device_number), os.minor(dev.device_number)


def _bus(dev: pyudev.Device) -> str:
    if dev.find_parent("usb", "usb_device") is not None:
        return "usb"
    if dev.sys_name.startswith("loop"):
        return "loop"
    if dev.sys_name.startswith("zram"):
        return "zram"
    for parent in dev.ancestors:
        if parent.subsystem in ("nvme", "virtio", "mmc", "ieee1394"):
            return parent.subsystem
    bus = dev.properties.get("ID_BUS", "")
    if bus:
        return bus
    return "scsi" if dev.find_parent("scsi") is not None else "none"


def _partitions(ctx: pyudev.Context, disk: pyudev.Device) -> list[pyudev.Device]:
    parts = [d for d in ctx.list_devices(subsystem="block", DEVTYPE="partition")
             if d.parent is not None and d.parent.sys_path == disk.sys_path]
    return sorted(parts, key=lambda p: int(_attr(p, "partition") or
                                          p.properties.get("ID_PART_ENTRY_NUMBER", "0") or 0))


def _holders(dev: pyudev.Device) -> list[str]:
    try:
        return os.listdir(os.path.join(dev.sys_path, "holders"))
    except OSError:
        return []


def _system_disks(ctx: pyudev.Context, mounts: Mounts) -> set[str]:
    """sys_paths of the disks under the system's mounts, through partitions and the slaves
    of device-mapper / RAID devices."""
    by_num: dict[tuple[int, int], pyudev.Device] = {}
    for dev in ctx.list_devices(subsystem="block"):
        by_num[device_number(dev)] = dev
    disks: set[str] = set()
    todo = [by_num[n] for n in mounts.system if n in by_num]
    seen: set[str] = set()
    while todo:
        dev = todo.pop()
        if dev.sys_path in seen:
            continue
        seen.add(dev.sys_path)
        if dev.device_type == "partition" and dev.parent is not None:
            dev = dev.parent
        disks.add(dev.sys_path)
        try:
            slaves = os.listdir(os.path.join(dev.sys_path, "slaves"))
        except OSError:
            slaves = []
        for name in slaves:
            found = next((d for d in by_num.values() if d.sys_name == name), None)
            if found is not None:
                todo.append(found)
    return disks


def _loop_backing(dev: pyudev.Device) -> str:
    backing = _attr(dev, "loop/backing_file")
    return os.path.realpath(backing) if backing else ""


def classify(ctx: pyudev.Context, dev: pyudev.Device, policy: Policy, mounts: Mounts,
             system: set[str], own: Iterable[tuple[int, int]] = ()) -> Disk:
    """The decision for one whole disk (DEVTYPE=disk)."""
    props = dev.properties
    parts = _partitions(ctx, dev)
    target = parts[0] if parts else dev
    tprops = target.properties
    disk = Disk(
        name=dev.sys_name, node=dev.device_node or f"/dev/{dev.sys_name}", sys_path=dev.sys_path,
        target=target.device_node or f"/dev/{target.sys_name}",
        vendor=(props.get("ID_VENDOR", "") or _attr(dev, "device/vendor")).replace("_", " "),
        model=(props.get("ID_MODEL", "") or _attr(dev, "device/model")).replace("_", " "),
        serial=props.get("ID_SERIAL_SHORT", "") or props.get("ID_SERIAL", ""),
        size=int(_attr(dev, "size") or 0) * SECTOR, bus=_bus(dev),
        removable=_attr(dev, "removable") == "1", partitioned=bool(parts),
        fs_type=tprops.get("ID_FS_TYPE", ""), fs_version=tprops.get("ID_FS_VERSION", ""),
        label=tprops.get("ID_FS_LABEL", ""), devnum=device_number(dev))
    usb = dev.find_parent("usb", "usb_device")
    if usb is not None:
        disk.usb_device = usb.sys_path
        disk.vendor = disk.vendor or _attr(usb, "manufacturer")
        disk.model = disk.model or _attr(usb, "product")
        disk.serial = disk.serial or _attr(usb, "serial")
    backing = _loop_backing(dev) if disk.bus == "loop" else ""
    if backing and backing in policy.loop_images:
        disk.bus, disk.removable, disk.image = "usb", True, backing
        disk.vendor, disk.model, disk.serial = "Loop image", Path(backing).name, backing
    own = set(own)
    for part in (dev, *parts):
        num = device_number(part)
        if num not in own:
            disk.mounts += mounts.points.get(num, [])
    _decide(disk, policy, dev.sys_path in system,
            [h for p in (dev, *parts) for h in _holders(p)], _attr(dev, "ro") == "1")
    return disk


def _decide(disk: Disk, policy: Policy, is_system: bool, holders: list[str],
            read_only: bool) -> None:
    def refuse(code: str, reason: str) -> None:
        disk.state, disk.code, disk.reason = "refused", code, reason

    if is_system:
        return refuse("system", "This disk holds the computer's own system; it is never "
                                "written.")
    if disk.bus not in policy.buses and not disk.image:
        if disk.bus == "usb":
            return refuse("bus", "USB sticks are not used by this configuration (it writes "
                                 "only the image files it names).")
        return refuse("bus", f"Not a USB stick: it is connected by "
                             f"{BUS_WORDS.get(disk.bus, disk.bus)}.")
    if disk.size == 0:
        return refuse("no-medium", "There is no medium in this drive.")
    if not disk.removable and not policy.allow_non_removable:
        return refuse("not-removable", "This is a USB hard disk or SSD, not a stick; it is "
                                       "not used, so that no backup drive is overwritten.")
    if disk.size > policy.max_bytes:
        return refuse("too-large", f"This drive holds {human_size(disk.size)}, more than "
                                   f"{human_size(policy.max_bytes)}: probably a backup "
                                   "drive; it is not used.")
    if disk.mounts:
        return refuse("mounted", f"This stick is in use (open at {disk.mounts[0]}); close "
                                 "it there first.")
    if holders:
        return refuse("in-use", "This stick is in use by the system (RAID, LVM or "
                                "encryption).")
    if read_only:
        return refuse("read-only", "This stick is write-protected: slide its lock switch "
                                   "and insert it again.")
    if disk.fs_type in policy.filesystems and (
            disk.fs_type != "vfat" or disk.fs_version in FAT_VERSIONS):
        disk.state, disk.code, disk.reason = "eligible", "", ""
        return None
    disk.state, disk.code = "needs-format", "filesystem"
    where = "Its first partition" if disk.partitioned else "It"
    if not disk.fs_type:
        disk.reason = f"{where} has no file system. It must be formatted (FAT32) first."
    else:
        disk.reason = (f"{where} holds {disk.filesystem_text}; DICOM allows only FAT16 or "
                       "FAT32 on USB sticks. It must be formatted (FAT32) first, which "
                       "erases it.")
    return None


# -- listing and watching ------------------------------------------------------------------


def list_disks(policy: Policy, *, ctx: pyudev.Context | None = None,
               own: Iterable[tuple[int, int]] = (), every: bool = False) -> list[Disk]:
    """Every whole disk with its decision. Unless every, only what a person could plug in:
    USB disks, loop images of the policy and anything removable."""
    ctx = ctx or pyudev.Context()
    mounts = Mounts.read()
    system = _system_disks(ctx, mounts)
    out = []
    for dev in ctx.list_devices(subsystem="block", DEVTYPE="disk"):
        disk = classify(ctx, dev, policy, mounts, system, own)
        if disk.bus == "loop" and int(_attr(dev, "size") or 0) == 0 and not every:
            continue  # an unused loop device
        if every or disk.bus in policy.buses or disk.removable:
            out.append(disk)
    return sorted(out, key=lambda d: d.name)


def find(policy: Policy, device: str, *, own: Iterable[tuple[int, int]] = ()) -> Disk:
    """The disk of a device argument: /dev/sdb, /dev/sdb1 (the partition the File-set goes
    on), a /dev/disk/by-* link or sdb. Another partition (/dev/sdb2) is refused: PS3.12
    R.1.1 puts the File-set on the first partition, and that is the only one written."""
    ctx = pyudev.Context()
    path = os.path.realpath(device if device.startswith("/") else f"/dev/{device}")
    name = os.path.basename(path)
    disks = list_disks(policy, ctx=ctx, own=own, every=True)
    for disk in disks:
        if name == disk.name or path in (disk.node, disk.target):
            return disk
    for dev in ctx.list_devices(subsystem="block", DEVTYPE="partition"):
        if dev.sys_name == name and dev.parent is not None:
            disk = next(d for d in disks if d.sys_path == dev.parent.sys_path)
            raise LookupError(f"{device}: not the partition a File-set goes on; a DICOM stick "
                              f"carries it on its first partition (PS3.12 R.1.1), "
                              f"{disk.target}, and only that one is written: name the stick "
                              f"{disk.node}")
    raise LookupError(f"{device}: no such disk")


def watch(callback: Callable[[str, str], None]) -> pyudev.MonitorObserver:
    """Call callback(action, kernel name) for every block device event (add, remove, change:
    a loop device being attached or a card inserted), from a background thread."""
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("block")

    def event(dev: pyudev.Device) -> None:
        callback(dev.action or "", dev.sys_name)

    observer = pyudev.MonitorObserver(monitor, callback=event, name="usb-monitor")
    observer.daemon = True
    observer.start()
    return observer
