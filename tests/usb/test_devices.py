"""The eligibility policy: every disk kind in an umockdev test bed gets its decision and its
reason; the machine's own real disks are all refused (no test can write to them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mastering.usb import devices
from mastering.usb.cli import load_policy

from .beds import MACHINE, machine_bed
from .conftest import stick_policy, usb_config


@pytest.mark.umockdev
def test_every_disk_kind_gets_its_decision(tmp_path: Path) -> None:
    bed = machine_bed(tmp_path)
    res = bed.run(sys.executable, "-m", "mastering", "usb", "--list", "--all", "--json",
                  timeout=60)
    assert res.returncode == 0, res.stderr
    found = {d["name"]: d for d in json.loads(res.stdout)}
    assert set(found) == set(MACHINE)
    for name, (_desc, state, code) in MACHINE.items():
        assert (found[name]["state"], found[name]["code"]) == (state, code), (name, found[name])
        assert found[name]["reason"] or state == "eligible"
    assert found["sdb"]["target"] == "/dev/sdb1" and found["sdh"]["target"] == "/dev/sdh"
    assert found["sdb"]["title"] == "SanDisk Cruzer Blade (16 GB)"
    assert "exFAT" in found["sdc"]["reason"] and "/media/user/MINE" in found["sde"]["reason"]
    assert "2 TB" in found["sdg"]["reason"] and "NVMe" in found["nvme0n1"]["reason"]


@pytest.mark.umockdev
def test_write_refuses_every_ineligible_disk_before_touching_it(tmp_path: Path) -> None:
    """`mastering usb --device` on each refused disk exits 7 with the reason (also a stick's
    second partition); with no --device, two eligible sticks are ambiguous."""
    bed = machine_bed(tmp_path)
    script = ("import subprocess, sys, json\n"
              "out = {}\n"
              "for name in ['sda', 'nvme0n1', 'sdc', 'sdd', 'sdg', 'sdk', 'sdl2']:\n"
              "    r = subprocess.run([sys.executable, '-m', 'mastering', 'usb', 'x.dcm',"
              " '--device', '/dev/' + name], capture_output=True, text=True)\n"
              "    out[name] = [r.returncode, r.stderr]\n"
              "r = subprocess.run([sys.executable, '-m', 'mastering', 'usb', 'x.dcm'],"
              " capture_output=True, text=True)\n"
              "out['auto'] = [r.returncode, r.stderr]\n"
              "print(json.dumps(out))\n")
    (tmp_path / "x.dcm").write_bytes(b"")
    res = bed.run(sys.executable, "-c", script, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout)
    for name, (code, err) in results.items():
        assert code == 7, (name, err)
    assert "holds the computer's own system" in results["sda"][1]
    assert "in use by the system" in results["sdk"][1]  # the opened LUKS stick
    # a stick's second partition: refused by name (it once wrote the first partition)
    assert "/dev/sdl2: not the partition a File-set goes on" in results["sdl2"][1]
    assert "2 sticks could be written" in results["auto"][1]


def test_the_machines_own_disks_are_all_refused(tmp_path: Path) -> None:
    """The real disks of the machine running the tests: each one is refused, so no test
    (and no user of this machine) can write to them: under the default policy, and under
    the policy the tests themselves use (in process and as the CLI reads it from the
    tests' configuration), which takes nothing but the tests' own image files."""
    image = tmp_path / "stick.img"
    for policy in (devices.Policy(), stick_policy(image),
                   load_policy(usb_config(tmp_path, [image]))):
        disks = devices.list_disks(policy, every=True)
        assert disks, "no block devices found"
        for disk in disks:
            assert disk.state == "refused", (policy, disk.name, disk.state, disk.reason)
            assert disk.reason
        root = [d for d in disks if d.code == "system"]
        assert root, "the disk holding / was not recognised as the system disk"
    assert stick_policy(image).buses == () == load_policy(usb_config(tmp_path, [image])).buses


def test_sizes_and_policy_from_config() -> None:
    assert devices.parse_size("256 GB") == 256 * 10**9
    assert devices.parse_size("2TiB") == 2 * 2**40 and devices.parse_size(512) == 512
    policy = devices.Policy.from_config({"max_size": "64 GB", "allow_non_removable": True})
    assert policy.max_bytes == 64 * 10**9 and policy.allow_non_removable
    with pytest.raises(ValueError):
        devices.Policy.from_config({"max_sise": 1})
