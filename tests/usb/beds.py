"""umockdev test beds for disks that are not in this machine: sysfs trees and udev properties
written in umockdev's text format (P: path, N: node, E: property, A: attribute), the way
``umockdev-record`` prints real devices. pyudev sees them as it sees real ones.

The helper :data:`HELPER` runs under ``umockdev-wrapper`` with Debian's python3 (python3-gi,
gir1.2-umockdev-1.0): it makes a test bed from description files, a fake
/proc/self/mountinfo, runs a command inside it (the command sees the bed through
UMOCKDEV_DIR) and takes "add FILE" / "remove SYSPATH" lines on its stdin meanwhile, so a
running kiosk sees sticks come and go as uevents.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .conftest import DEBIAN_PYTHON, need_tool

HELPER = Path(__file__).with_name("umockdev_bed.py")
PCI = "/devices/pci0000:00"


@dataclass
class Bed:
    """Files and the mountinfo of one test bed."""

    folder: Path
    devices: list[Path]
    mountinfo: str = ""

    def command(self, *cmd: str) -> list[str]:
        args = [need_tool("umockdev-wrapper"), str(DEBIAN_PYTHON), str(HELPER)]
        if self.mountinfo:
            info = self.folder / "mountinfo"
            info.write_text(self.mountinfo)
            args += ["--mountinfo", str(info)]
        for dev in self.devices:
            args += ["--device", str(dev)]
        return [*args, "--", *cmd]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a command in the bed: no system bus that works (the disks
        the bed describes are not the machine's: nothing may reach the real udisks2 for
        them, or mount a real /dev node of the same name), plus extra."""
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.folder}/no-bus",
               **extra}
        env.pop("UMOCKDEV_DIR", None)
        return env

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        env = self.env(**kw.pop("env", {}))
        return subprocess.run(self.command(*cmd), capture_output=True, text=True, env=env, **kw)


def _block(path: str, node: str, props: dict[str, str], attrs: dict[str, str]) -> str:
    lines = [f"P: {path}", f"N: {node}", f"E: DEVNAME=/dev/{node}", "E: SUBSYSTEM=block"]
    lines += [f"E: {k}={v}" for k, v in props.items()]
    lines += [f"A: {k}={v}" for k, v in attrs.items()]
    return "\n".join(lines) + "\n\n"


def usb_disk(name: str, minor: int, *, port: str, host: int, size: int, fs: str = "vfat",
             version: str = "FAT32", label: str = "PATIENT", removable: bool = True,
             driver: str = "usb-storage", partitioned: bool = True, read_only: bool = False,
             vendor: str = "SanDisk", model: str = "Cruzer Blade", serial: str = "",
             holders: tuple[str, ...] = (), second_fs: str = "") -> str:
    """A USB mass-storage disk: usb_device -> usb_interface -> scsi host/target/device ->
    block disk (-> partition 1, and with second_fs a partition 2 holding that file system);
    holders: device-mapper/RAID devices holding the whole disk (an opened LUKS stick)."""
    serial = serial or f"4C5300012301{minor:08d}"
    usb = f"{PCI}/0000:00:14.0/usb1/{port}"
    scsi = f"{usb}/{port}:1.0/host{host}/target{host}:0:0/{host}:0:0:0"
    text = (f"P: {usb}\nE: DEVTYPE=usb_device\nE: DRIVER=usb\nE: SUBSYSTEM=usb\n"
            f"A: idVendor=0781\nA: idProduct=5567\nA: serial={serial}\n"
            f"A: manufacturer={vendor}\nA: product={model}\n\n"
            f"P: {usb}/{port}:1.0\nE: DEVTYPE=usb_interface\nE: DRIVER={driver}\n"
            f"E: SUBSYSTEM=usb\nA: bInterfaceClass=08\n\n"
            f"P: {scsi}\nE: DEVTYPE=scsi_device\nE: DRIVER=sd\nE: SUBSYSTEM=scsi\n"
            f"A: vendor={vendor}\nA: model={model}\n\n")
    sectors = size // 512
    disk_props = {"DEVTYPE": "disk", "ID_BUS": "usb", "ID_USB_DRIVER": driver,
                  "ID_VENDOR": vendor.replace(" ", "_"), "ID_MODEL": model.replace(" ", "_"),
                  "ID_SERIAL": f"{vendor}_{model}_{serial}-0:0".replace(" ", "_"),
                  "ID_SERIAL_SHORT": serial}
    fs_props = {"ID_FS_TYPE": fs, "ID_FS_VERSION": version, "ID_FS_LABEL": label,
                "ID_FS_USAGE": "filesystem"} if fs else {}
    attrs = {"removable": "1" if removable else "0", "size": str(sectors),
             "dev": f"8:{minor}", "ro": "1" if read_only else "0",
             **{f"holders/{h}": "" for h in holders}}
    if not partitioned:
        return text + _block(f"{scsi}/block/{name}", name, {**disk_props, **fs_props}, attrs)
    text += _block(f"{scsi}/block/{name}", name, {**disk_props, "ID_PART_TABLE_TYPE": "dos"},
                   attrs)
    part = {"DEVTYPE": "partition", "ID_BUS": "usb", "ID_PART_ENTRY_NUMBER": "1",
            "ID_PART_ENTRY_SCHEME": "dos", "ID_PART_ENTRY_TYPE": "0xc", **fs_props}
    half = (sectors - 2048) // 2 if second_fs else sectors - 2048
    text += _block(f"{scsi}/block/{name}/{name}1", f"{name}1", part,
                   {"partition": "1", "start": "2048", "size": str(half),
                    "dev": f"8:{minor + 1}"})
    if second_fs:
        text += _block(f"{scsi}/block/{name}/{name}2", f"{name}2",
                       {**part, "ID_PART_ENTRY_NUMBER": "2", "ID_FS_TYPE": second_fs,
                        "ID_FS_VERSION": "FAT32", "ID_FS_LABEL": "SECOND"},
                       {"partition": "2", "start": str(2048 + half), "size": str(half),
                        "dev": f"8:{minor + 2}"})
    return text


def sata_disk(name: str, minor: int, *, host: int, size: int = 500 * 10**9,
              fs: str = "ext4") -> str:
    ata = f"{PCI}/0000:00:17.0/ata{host}/host{host}/target{host}:0:0/{host}:0:0:0"
    text = f"P: {ata}\nE: DEVTYPE=scsi_device\nE: DRIVER=sd\nE: SUBSYSTEM=scsi\n" \
           "A: vendor=ATA\nA: model=Samsung SSD 870\n\n"
    props = {"DEVTYPE": "disk", "ID_BUS": "ata", "ID_MODEL": "Samsung_SSD_870",
             "ID_SERIAL": f"Samsung_SSD_870_S{minor:06d}", "ID_PART_TABLE_TYPE": "gpt"}
    attrs = {"removable": "0", "size": str(size // 512), "dev": f"8:{minor}", "ro": "0"}
    text += _block(f"{ata}/block/{name}", name, props, attrs)
    return text + _block(f"{ata}/block/{name}/{name}1", f"{name}1",
                         {"DEVTYPE": "partition", "ID_BUS": "ata", "ID_FS_TYPE": fs,
                          "ID_PART_ENTRY_NUMBER": "1"},
                         {"partition": "1", "size": str(size // 512 - 2048),
                          "dev": f"8:{minor + 1}"})


def nvme_disk(size: int = 1000 * 10**9) -> str:
    base = f"{PCI}/0000:00:1d.0/0000:03:00.0/nvme/nvme0"
    text = f"P: {base}\nE: SUBSYSTEM=nvme\nA: model=WD Blue SN570\nA: serial=NV0001\n\n"
    props = {"DEVTYPE": "disk", "ID_MODEL": "WD_Blue_SN570", "ID_SERIAL": "WD_Blue_SN570_NV0001",
             "ID_PART_TABLE_TYPE": "gpt"}
    attrs = {"removable": "0", "size": str(size // 512), "dev": "259:0", "ro": "0"}
    text += _block(f"{base}/nvme0n1", "nvme0n1", props, attrs)
    return text + _block(f"{base}/nvme0n1/nvme0n1p1", "nvme0n1p1",
                         {"DEVTYPE": "partition", "ID_FS_TYPE": "vfat", "ID_FS_VERSION": "FAT32",
                          "ID_PART_ENTRY_NUMBER": "1"},
                         {"partition": "1", "size": "1048576", "dev": "259:1"})


GB = 10**9
#: name -> (description, expected state, expected code)
MACHINE = {
    "sda": (sata_disk("sda", 0, host=0), "refused", "system"),
    "sdf": (sata_disk("sdf", 80, host=1, size=2000 * GB, fs="ntfs"), "refused", "bus"),
    "nvme0n1": (nvme_disk(), "refused", "bus"),
    "sdb": (usb_disk("sdb", 16, port="1-2", host=6, size=16 * GB), "eligible", ""),
    "sdc": (usb_disk("sdc", 32, port="1-3", host=7, size=64 * GB, fs="exfat", version="1.0",
                     label="BACKUP"), "needs-format", "filesystem"),
    "sdd": (usb_disk("sdd", 48, port="1-4", host=8, size=1000 * GB, removable=False,
                     driver="uas", fs="ntfs", vendor="Seagate", model="Expansion HDD"),
            "refused", "not-removable"),
    "sde": (usb_disk("sde", 64, port="1-5", host=9, size=32 * GB, label="MINE"),
            "refused", "mounted"),
    "sdg": (usb_disk("sdg", 96, port="1-6", host=10, size=2000 * GB, vendor="WD",
                     model="Elements"), "refused", "too-large"),
    "sdh": (usb_disk("sdh", 112, port="1-7", host=11, size=8 * GB, partitioned=False),
            "eligible", ""),
    "sdi": (usb_disk("sdi", 128, port="1-8", host=12, size=8 * GB, read_only=True),
            "refused", "read-only"),
    "sdj": (usb_disk("sdj", 144, port="1-9", host=13, size=15 * 10**6, version="FAT12"),
            "needs-format", "filesystem"),
    # an opened LUKS stick without a partition table: dm-0 holds the whole disk
    "sdk": (usb_disk("sdk", 160, port="1-10", host=14, size=16 * GB, partitioned=False,
                     fs="crypto_LUKS", version="2", holders=("dm-0",)), "refused", "in-use"),
    # exFAT on partition 1, FAT32 on partition 2 (only partition 1 is ever the target)
    "sdl": (usb_disk("sdl", 176, port="1-11", host=15, size=16 * GB, fs="exfat",
                     version="1.0", second_fs="vfat"), "needs-format", "filesystem"),
}
#: / on the SATA disk, the stick sde's partition mounted by someone else
MOUNTINFO = ("27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
             "90 27 8:65 / /media/user/MINE rw,nosuid - vfat /dev/sde1 rw\n")


def machine_bed(folder: Path, names: list[str] | None = None) -> Bed:
    files = []
    for name in names or list(MACHINE):
        path = folder / f"{name}.umockdev"
        path.write_text(MACHINE[name][0])
        files.append(path)
    return Bed(folder, files, MOUNTINFO)
