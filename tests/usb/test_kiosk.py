"""The kiosk in headless Chromium (Debian's, through Playwright): a real uvicorn process on
the real stack (our udevd, D-Bus, udisksd) with loop-device sticks: insert, pick, export,
progress, safe to remove; a stick pulled mid-write; and under an umockdev test bed, ineligible
disks shown with their reasons and sticks coming and going live. Screenshots go to tmp (and
to MASTERING_SCREENSHOTS, e.g. docs/, when set)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api
from pydicom.fileset import FileSet

from mastering.usb import export

from ..conftest import ct_series, dciodvfy_errors
from .beds import MACHINE, machine_bed
from .conftest import Loop, ext4_image, mount_point_of, need_tool, unplug, usb_config
from .test_export import Mounted, _references_exist

pytestmark = [pytest.mark.browser, pytest.mark.usbstack, pytest.mark.xdist_group("usbstack")]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEW = {"width": 1024, "height": 768}
SLACK = 2**20  # image bytes beyond the file system: cut off to unplug the stick


class KioskProcess:
    """`mastering kiosk` as systemd would run it: READY=1 (with the port) on NOTIFY_SOCKET."""

    def __init__(self, tmp: Path, config: Path, env: dict[str, str], prefix: list[str] = ()):
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = tmp / "notify.sock"
        self.notify.bind(str(path))
        self.notify.settimeout(60)
        self.log = tmp / "kiosk.log"
        cmd = [*prefix, sys.executable, "-m", "mastering", "kiosk", "--config", str(config)]
        with open(self.log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env={**env, "NOTIFY_SOCKET": str(path)},
                                         stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
        message = self.notify.recv(4096).decode()
        assert "READY=1" in message, message
        self.port = int(message.split(":")[-1])
        self.url = f"http://127.0.0.1:{self.port}/"

    def command(self, line: str) -> None:
        """To the umockdev bed helper: add/remove devices."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> str:
        """SIGTERM to the kiosk (and the test bed helper around it: its process group)."""
        if self.proc.poll() is None:  # (once it has ended, its group id is not ours)
            group = os.getpgid(self.proc.pid)
            os.killpg(group, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=4)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)  # whatever of the group is left
        self.proc.wait()
        self.notify.close()
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/test, which installs it")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield chromium
        chromium.close()


def _page(browser, url: str):
    context = browser.new_context(viewport=VIEW, has_touch=True)
    problems: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    return context, page, problems


def _shot(page, tmp: Path, name: str) -> None:
    path = tmp / name
    page.screenshot(path=str(path))
    target = os.environ.get("MASTERING_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / name)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    ct_series(folder / "ct", 2, 120, rows=256, SeriesDescription="Thorax")
    ct_series(folder / "mr", 1, 4, first=5, study_uid="1.2.3.4.7", patient_id="PID7",
              patient_name="ROE^RICHARD", StudyDescription="Knee")
    return folder


@pytest.fixture(scope="module")
def kiosk(stack, tmp_path_factory, studies) -> Iterator[tuple[KioskProcess, list[Path]]]:
    tmp = tmp_path_factory.mktemp("kiosk")
    images = [tmp / f"stick{i}.img" for i in range(2)]
    config = usb_config(tmp, images)
    config.write_text('[kiosk]\nlisten = "127.0.0.1:0"\nviewer = false\n'
                      f'[sources]\nfolders = ["{studies}"]\n' + config.read_text())
    proc = KioskProcess(tmp, config, stack.env())
    yield proc, images
    log = proc.stop()
    # the access log and every other line: no patient data
    for secret in ("DOE^JANE", "DOE, JANE", "ROE^RICHARD", "PID1", "PID7", "1.2.3.4.1", "Thorax"):
        assert secret not in log, secret
    assert "mastering.kiosk.access: GET / 200" in log


def _wait_state(page, state: str, timeout: float = 60_000) -> None:
    page.wait_for_function("s => document.getElementById('job').dataset.state === s", arg=state,
                           timeout=timeout)


@pytest.mark.oracle
def test_insert_pick_export_safe_to_remove(kiosk, browser, tmp_path: Path, loops) -> None:
    proc, images = kiosk
    context, page, problems = _page(browser, proc.url)
    try:
        page.wait_for_selector(".study", timeout=60_000)
        page.wait_for_selector("#no-stick:not([hidden])")
        _shot(page, tmp_path, "kiosk-insert.png")
        loops.append(Loop(ext4_image(images[0], size=128 * 2**20)))
        page.wait_for_selector(".stick.eligible", timeout=20_000)
        page.wait_for_function("() => document.querySelector('.stick').textContent"
                               ".includes('free')", timeout=20_000)  # read while inserted
        page.locator(".study", has_text="DOE, JANE").tap()
        assert page.locator(".study.selected").count() == 1
        page.locator("#copy").tap()
        # mid-job, past the scan: the write (batched syncs make it short) or the check
        page.wait_for_function("() => { const j = document.getElementById('job');"
                               " return j.dataset.state === 'running' && ['write',"
                               " 'verifying', 'verify', 'read back'].includes(j.dataset.phase)"
                               " && parseInt(document.getElementById("
                               "'job-percent').textContent) > 20; }", timeout=60_000)
        assert "left" in page.locator("#job-eta").inner_text() or \
            page.locator("#job-eta").inner_text() == ""
        page.wait_for_timeout(400)  # the bar's transition
        _shot(page, tmp_path, "kiosk-progress.png")
        _wait_state(page, "done")
        assert page.locator("#job-message").inner_text() == export.SAFE
        assert page.locator("#job-percent").inner_text() == "100 %"
        page.wait_for_timeout(400)
        _shot(page, tmp_path, "kiosk-done.png")
        assert mount_point_of(loops[0].node) is None
        assert problems == []
    finally:
        context.close()
    loops[0].detach()
    with Mounted(images[0], tmp_path / "m") as root:
        assert dciodvfy_errors(root / "DICOMDIR") == []
        assert len(list(FileSet(root / "DICOMDIR"))) == 240


def test_stick_pulled_mid_write_ends_in_failure(kiosk, browser, tmp_path: Path, loops) -> None:
    """The stick goes mid-write as udev sees it (a change event, another size): the kiosk's
    watcher marks it removed and cancels the copy, and the person hears that it was removed
    (not that it was cancelled)."""
    proc, images = kiosk
    loops.append(Loop(ext4_image(images[1], size=128 * 2**20, slack=SLACK)))
    loop = loops[-1]
    context, page, problems = _page(browser, proc.url)
    try:
        page.wait_for_selector(".stick.eligible", timeout=20_000)
        page.wait_for_function("() => document.querySelector('.stick').textContent"
                               ".includes('free')", timeout=20_000)
        page.locator(".study", has_text="DOE, JANE").tap()
        page.locator("#copy").tap()
        # while the copy is written or checked (a small study is written in a blink): the
        # stick goes before the export is done either way
        page.wait_for_function("() => ['write', 'verifying', 'verify', 'read back']"
                               ".includes(document.getElementById('job').dataset.phase)",
                               timeout=60_000)
        unplug(loop, SLACK)
        _wait_state(page, "failed")
        assert page.locator("#job-message").inner_text() == export.REMOVED
        assert page.locator("#job-phase").inner_text() == "The copy did not finish"
        _shot(page, tmp_path, "kiosk-removed.png")
        page.locator("#done").tap()
        page.wait_for_selector("#job", state="hidden")
        assert problems == []
    finally:
        context.close()
    subprocess.run([need_tool("e2fsck"), "-fy", str(images[1])], capture_output=True)
    with Mounted(images[1], tmp_path / "m") as root:  # gone before its read-back finished:
        assert not (root / "DICOMDIR").exists() or _references_exist(root)  # nothing missing


@pytest.mark.umockdev
def test_ineligible_disks_shown_with_reasons_live(browser, tmp_path: Path, studies) -> None:
    """The disks of the bed are not this machine's: the kiosk gets no system bus that works
    and may mount only through udisks2 ([usb] mounter), so it can neither mount a real
    /dev/sdb1 of the same name nor ask a real udisks2 to; it shows the stick unread."""
    bed = machine_bed(tmp_path, ["sda", "sdc", "sdg"])
    stick = tmp_path / "sdb.umockdev"
    stick.write_text(MACHINE["sdb"][0])
    config = tmp_path / "kiosk.toml"
    config.write_text(f'[kiosk]\nlisten = "127.0.0.1:0"\n[sources]\nfolders = ["{studies}"]\n'
                      '[usb]\nmounter = "udisks2"\n')
    mounts = _sd_mounts()
    proc = KioskProcess(tmp_path, config, bed.env(MASTERING_LOG="DEBUG"), prefix=bed.command())
    context, page, problems = _page(browser, proc.url)
    try:
        page.wait_for_selector(".stick.refused")
        two_tb = page.locator(".stick", has_text="Elements")
        assert "Cannot be used" in two_tb.inner_text()
        assert "2 TB" in two_tb.inner_text() and "backup drive" in two_tb.inner_text()
        exfat = page.locator(".stick.needs-format")
        assert "exFAT" in exfat.inner_text()
        assert page.locator(".stick", has_text="Samsung").count() == 0  # the system disk
        page.locator("#format").tap()  # the format offer names the stick, never automatic
        text = page.locator("#confirm-text").inner_text()
        assert "BACKUP" in text and "64 GB" in text and "erases everything" in text
        page.locator("#confirm-no").tap()
        _shot(page, tmp_path, "kiosk-sticks.png")
        proc.command(f"add {stick}")  # a stick is inserted: the page shows it at once
        page.wait_for_selector(".stick.eligible", timeout=20_000)
        page.wait_for_function("() => document.querySelector('.stick.eligible').textContent"
                               ".includes('cannot be read')", timeout=20_000)
        path = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2"
        proc.command(f"remove {path}/1-2:1.0/host6/target6:0:0/6:0:0:0/block/sdb/sdb1")
        proc.command(f"remove {path}/1-2:1.0/host6/target6:0:0/6:0:0:0/block/sdb")
        page.wait_for_selector(".stick.eligible", state="detached", timeout=20_000)
        assert problems == []
    finally:
        context.close()
        log = proc.stop()
    assert "udisks2 does not run on the system bus" in log  # and nothing else was tried
    assert _sd_mounts() == mounts


def _sd_mounts() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " /dev/sd" in line]


def _api(url: str, path: str = "api/state", body: dict | None = None) -> dict:
    headers = {"X-Kiosk": "1", "Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url + path, headers=headers, data=None if body is None
                                     else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=20) as res:
        return json.load(res)


def _until(url: str, check, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _api(url)
        if check(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"the kiosk never got there: {state}")


#: phases in which the export is under way and the stick mounted (or being remounted)
MID_EXPORT = ("write", "verifying", "verify", "read back")


def test_stopping_the_kiosk_mid_export_unmounts_the_stick(stack, tmp_path: Path, studies,
                                                          loops) -> None:
    """SIGTERM while a copy runs (systemctl stop): the kiosk cancels it, waits for it to end
    and leaves the stick unmounted (its copy removed), instead of dying with it mounted."""
    image = tmp_path / "stick.img"
    config = usb_config(tmp_path, [image])
    config.write_text('[kiosk]\nlisten = "127.0.0.1:0"\nviewer = false\n'
                      f'[sources]\nfolders = ["{studies}"]\n' + config.read_text())
    proc = KioskProcess(tmp_path, config, stack.env())
    try:
        loops.append(Loop(ext4_image(image, size=128 * 2**20)))
        state = _until(proc.url, lambda s: s["studies"] and s["sticks"] and
                       s["sticks"][0].get("free") is not None)
        ids = [st["id"] for st in state["studies"] if st["patient_id"] == "PID1"]
        job = _api(proc.url, "api/export", {"stick": state["sticks"][0]["identity"],
                                            "studies": ids})["job"]
        _until(proc.url, lambda s: s["job"] and s["job"]["phase"] in MID_EXPORT)
        os.killpg(os.getpgid(proc.proc.pid), signal.SIGTERM)
        assert proc.proc.wait(timeout=30) == 0
    finally:
        log = proc.stop()
    assert mount_point_of(loops[0].node) is None
    assert f"export {job} failed" in log
    with Mounted(image, tmp_path / "m") as root:
        assert sorted(p.name for p in root.iterdir()) == ["lost+found"]
