"""The kiosk's systemd unit, checked by systemd-analyze (verify: no warning at all; security:
hardened like a daemon), and its polkit rule, run by a JavaScript engine against the udisks2
actions the kiosk needs and some it must not get."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need_tool

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "mastering-kiosk.service"


def _unit_here(tmp: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's mastering (verify checks it)."""
    text = UNIT.read_text()
    exe = Path(sys.executable).with_name("mastering")
    text = text.replace("/opt/mastering/.venv/bin/mastering", str(exe))
    path = tmp / UNIT.name
    path.write_text(text)
    return path


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    res = subprocess.run([need_tool("systemd-analyze"), "verify", str(_unit_here(tmp_path))],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr
    assert "Type=notify" in UNIT.read_text() and "WatchdogSec=" in UNIT.read_text()


def test_unit_is_hardened(tmp_path: Path) -> None:
    res = subprocess.run([need_tool("systemd-analyze"), "security", "--offline=yes",
                          str(_unit_here(tmp_path))], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.0  # "OK"; a plain unit scores 9.6 ("UNSAFE")
    text = UNIT.read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "CapabilityBoundingSet=\n", "User=mastering-kiosk", "IPAddressDeny=any"):
        assert line in text
    # the device policy must see /proc/swaps (a disk with active swap is the system's)
    assert not re.search(r"^ProcSubset=", text, re.MULTILINE)


POLKIT = """
const fs = require("fs");
let rule = null;
const polkit = {Result: {YES: "yes", NO: "no", NOT_HANDLED: "not-handled"},
                addRule: (f) => { rule = f; }};
eval(fs.readFileSync(process.argv[2], "utf8"));
const cases = JSON.parse(process.argv[3]);
console.log(JSON.stringify(cases.map(([user, id, details]) =>
    rule({id: id, lookup: (k) => details[k]}, {user: user}))));
"""


def test_polkit_rule_allows_only_the_kiosk_on_usb_sticks(tmp_path: Path) -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.fail("no JavaScript engine (node) to run the polkit rule")
    stick = {"drive.removable": "true", "drive.removable.bus": "usb"}
    disk = {"drive.removable": "false", "drive.removable.bus": ""}
    ud = "org.freedesktop.udisks2."
    cases = [["mastering-kiosk", ud + "filesystem-mount", stick],
             ["mastering-kiosk", ud + "power-off-drive", stick],
             ["mastering-kiosk", ud + "modify-device", stick],
             ["mastering-kiosk", ud + "filesystem-mount", disk],
             ["mastering-kiosk", ud + "filesystem-mount-system", stick],
             ["mastering-kiosk", ud + "modify-device",
              {"drive.removable": "true", "drive.removable.bus": "sdio"}],
             ["mastering-kiosk", "org.freedesktop.login1.power-off", stick],
             ["someone", ud + "filesystem-mount", stick]]
    script = tmp_path / "run.js"
    script.write_text(POLKIT)
    res = subprocess.run([node, str(script), str(SYSTEMD / "50-mastering-kiosk.rules"),
                          json.dumps(cases)], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == ["yes", "yes", "yes"] + ["not-handled"] * 5
