"""Burning and read-back on xorriso stdio: pseudo-drives (FUSE drives that fail on purpose):
a drive failing mid-write, a disc failing read-back, the blanking policy and the operator,
spanning with a disc change, copies, several drives in parallel, the image folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from pathlib import Path

import pytest

from mastering.daemon.burner import PAD_BYTES, parse_toc
from tests.conftest import ct_series, dciodvfy_errors, extract_iso, make_ct

from .conftest import job_of_study, storescu, wait_for


def _done(d, study: str = "1.2.3.4.1"):
    store = d.store()
    try:
        job = job_of_study(store, study)
        return job if job and job.state == "done" else None
    finally:
        store.close()


def test_parse_toc():
    blank = parse_toc("Media current: stdio file, overwriteable\nMedia status : is blank\n"
                      "Media space  : 1000s\n")
    assert blank.present and blank.blank and blank.rewritable and blank.free_bytes == 2048000
    closed = parse_toc("Media current: CD-R\nMedia status : is written , is closed\n")
    assert closed.present and not closed.blank and closed.closed and not closed.rewritable
    assert not parse_toc("Media current: is not present\n").present


@pytest.mark.slow
def test_drive_failing_mid_write_then_read_back_failure(daemon, fake_drive, tmp_path):
    """The first disc fails half-way through the burn (EIO), the second reads back wrong;
    both are recorded as spoiled, the job is retried with backoff and is done only with a
    disc that reads back as the image."""
    drive = fake_drive()
    drive.set(fail_after=150_000)
    d = daemon(drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    assert storescu(d.port, ct_series(tmp_path / "in", 2, 10)).returncode == 0
    store = d.store()

    def media_states():
        job = job_of_study(store, "1.2.3.4.1")
        return [m["state"] for m in store.media(job.id)] if job else []

    wait_for(lambda: "spoiled" in media_states(), message="the failed burn")
    drive.set(corrupt_from=40_000)  # now the drive writes, but the disc reads back wrong
    wait_for(lambda: "failed-readback" in media_states(), message="the failed read-back")
    assert job_of_study(store, "1.2.3.4.1").state != "done"
    drive.set()
    job = wait_for(lambda: _done(d), message="the job to be done on a good disc")
    states = media_states()
    assert states[-1] == "verified" and "spoiled" in states and "failed-readback" in states
    assert job.attempts >= 2
    spoiled = [m for m in store.media(job.id) if m["state"] == "spoiled"][0]
    assert "burn failed (xorriso exit" in spoiled["detail"]
    img = job.images[0]
    assert hashlib.sha256(drive.disc.read_bytes()[:img["bytes"]]).hexdigest() == img["sha256"]
    assert "failed read-back" in d.log and "attempt" in d.log


def test_blanking_policy_and_the_operator(daemon, fake_drive, tmp_path):
    """A written disc with blanking off is refused and the operator told; once the disc is
    swapped for a blank one, the job burns."""
    drive = fake_drive()
    old = tmp_path / "old.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(old), str(tmp_path)],
                   check=True, capture_output=True)
    subprocess.run(["xorriso", "-as", "cdrecord", f"dev={drive.device}", str(old)],
                   check=True, capture_output=True)
    d = daemon(drives=[{"name": "fd", "device": drive.device, "blank": "never",
                        "poll_seconds": 0.2}])
    assert storescu(d.port, ct_series(tmp_path / "in", 1, 3)).returncode == 0
    wait_for(lambda: "the disc is not blank" in d.log and "blanking is off" in d.log,
             message="the operator to be told")
    store = d.store()
    assert job_of_study(store, "1.2.3.4.1").state == "ready"
    drive.take_out()
    job = wait_for(lambda: _done(d), message="the burn after the disc change")
    assert [m["state"] for m in store.media(job.id)] == ["verified"]


@pytest.mark.slow
@pytest.mark.oracle
def test_spanning_copies_and_disc_changes(daemon, fake_drive, tmp_path):
    """Content larger than one disc is spanned by the core; each volume x copy goes onto
    its own blank disc, the operator changing discs between them; every disc is a complete
    File-set that dciodvfy accepts."""
    drive = fake_drive()
    d = daemon(media={"capacity": 400_000 + PAD_BYTES, "copies": 2},
               drives=[{"name": "fd", "device": drive.device, "blank": "never",
                        "poll_seconds": 0.2}])
    assert storescu(d.port, ct_series(tmp_path / "in", 3, 6, rows=96)).returncode == 0
    store = d.store()
    taken: list[Path] = []
    stop = threading.Event()

    def operator():  # takes each verified disc out once asked for the next (keeping it)
        seen = 0
        while not stop.wait(0.1):
            job = job_of_study(store, "1.2.3.4.1")
            if job is None:
                continue
            verified = [m for m in store.media(job.id) if m["state"] == "verified"]
            asked = sum(a["event"] == "waiting-for-disc" for a in store.audit_trail(job.id))
            if len(verified) > seen and drive.disc.exists() and (
                    asked > seen or store.job(job.id).state == "done"):
                m = verified[seen]
                dst = tmp_path / f"disc-v{m['volume']}-c{m['copy']}.img"
                drive.take_out(dst)
                taken.append(dst)
                seen += 1

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    job = wait_for(lambda: _done(d), message=lambda: "all discs\n" + d.log[-2500:])
    wait_for(lambda: len(taken) == len(job.images) * 2, 10,
             message=lambda: f"the last disc taken out: {taken} {store.media(job.id)}")
    stop.set()
    assert len(job.images) >= 2
    assert "waiting for disc 2 of" in d.log or "disc 1 of" in d.log
    for i, img in enumerate(sorted(taken)):
        out = extract_iso(img, tmp_path / f"x{i}")
        assert dciodvfy_errors(out / "DICOMDIR") == []
    volumes = {m["volume"] for m in store.media(job.id) if m["state"] == "verified"}
    copies = {m["copy"] for m in store.media(job.id) if m["state"] == "verified"}
    assert volumes == set(range(1, len(job.images) + 1)) and copies == {1, 2}


def test_two_drives_burn_in_parallel(daemon, fake_drive, tmp_path):
    a, b = fake_drive("a"), fake_drive("b")
    a.set(write_rate=400_000)
    b.set(write_rate=400_000)
    d = daemon(assembly={"quiet_seconds": 0.5},
               drives=[{"name": "A", "device": a.device, "poll_seconds": 0.2},
                       {"name": "B", "device": b.device, "poll_seconds": 0.2}])
    for s in ("1.2.3.4.10", "1.2.3.4.20"):
        for i in range(1, 9):
            make_ct(tmp_path / s, f"{i}.dcm", instance=i, rows=96, study_uid=s,
                    series_uid=s + ".1")
    assert storescu(d.port, tmp_path / "1.2.3.4.10", tmp_path / "1.2.3.4.20").returncode == 0
    store = d.store()
    jobs = wait_for(lambda: (x := [_done(d, s) for s in ("1.2.3.4.10", "1.2.3.4.20")])
                    and all(x) and x, message="both jobs")
    assert {j.drive for j in jobs} == {"A", "B"}
    spans = []
    for j in jobs:
        m = store.media(j.id)[-1]
        spans.append((m["started_at"], m["started_at"] + m["burn_seconds"]))
    (s1, e1), (s2, e2) = sorted(spans)
    assert s2 < e1, "the two burns overlapped in time"


def test_image_folder_output(daemon, tmp_path):
    hot = tmp_path / "hot"
    d = daemon(media={"label": True, "copies": 3},
               drives=[{"name": "robot", "kind": "image_folder", "folder": str(hot)}])
    assert storescu(d.port, ct_series(tmp_path / "in", 1, 4)).returncode == 0
    job = wait_for(lambda: _done(d), message="the published job")
    manifest = json.loads((hot / f"JOB{job.id:06d}.json").read_text())
    assert manifest["copies"] == 3 and len(manifest["volumes"]) == 1
    vol = manifest["volumes"][0]
    iso = hot / vol["image"]
    assert hashlib.sha256(iso.read_bytes()).hexdigest() == vol["sha256"]
    assert vol["labels"] and all((hot / name).is_file() for name in vol["labels"])
    assert not [p for p in hot.iterdir() if p.name.startswith(".")]  # no temporary left
    assert dciodvfy_errors(extract_iso(iso, tmp_path / "x") / "DICOMDIR") == []


def test_an_unwritable_image_folder_is_refused_at_start(tmp_path):
    """ProtectSystem=strict makes a hot folder outside ReadWritePaths= read-only; the daemon
    says so at start (not after five failed publishes) and the drop-in example that fixes
    it passes systemd-analyze verify (which reads it: a typo in it is reported)."""
    import os
    import shutil
    import subprocess
    import sys

    from .conftest import REPO, base_config, write_config

    if os.geteuid() != 0:
        pytest.fail("mounting a read-only tmpfs needs root (the test machine runs as root)")
    hot = tmp_path / "hot"
    hot.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(hot)], check=True)
    try:
        cfg = write_config(tmp_path / "d.toml", base_config(
            tmp_path, drives=[{"name": "robot", "kind": "image_folder", "folder": str(hot)}]))
        res = subprocess.run([sys.executable, "-m", "mastering", "daemon", "--config", str(cfg)],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(hot)], check=False)
    assert res.returncode == 1
    assert f"the image folder {hot} is not writable (Read-only file system)" in res.stderr
    assert "ReadWritePaths=" in res.stderr and "listening" not in res.stderr
    exe = shutil.which("systemd-analyze")
    unit = tmp_path / "sd" / "mastering-daemon.service"
    (unit.parent / "mastering-daemon.service.d").mkdir(parents=True)
    unit.write_text((REPO / "systemd" / "mastering-daemon.service").read_text().replace(
        "/opt/dicom-mastering/.venv/bin/mastering", str(Path(sys.executable).with_name(
            "mastering"))))
    example = REPO / "systemd" / "mastering-daemon.service.d" / "image-folder.conf.example"
    dropin = unit.parent / "mastering-daemon.service.d" / "image-folder.conf"
    dropin.write_text(example.read_text())
    res = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    dropin.write_text(example.read_text().replace("ReadWritePaths=", "ReadWritePathz="))
    res = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True)
    assert "ReadWritePathz" in res.stderr


def test_read_back_of_a_block_device_stays_within_the_image(fake_drive, tmp_path):
    """A block device whose sectors past the image and a short pad cannot be read (a CD
    written track-at-once): the O_DIRECT checksum reads exactly the image's sectors and
    matches; reading a whole 1 MiB past the end fails on such a device."""
    import mmap
    import os
    import subprocess

    from mastering.daemon.readback import medium_checksum

    drive = fake_drive()
    size = 562 * 2048  # 1.15 MB: the last 1 MiB read would reach 0.95 MB past the image
    data = os.urandom(size)
    drive.disc.write_bytes(data + bytes(4 << 20))
    drive.set(unreadable_from=size + 512 * 1024)  # the image, a pad, then run-out blocks
    loop = subprocess.run(["losetup", "-f", "--show", "-r", str(drive.mount / "disc")],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert medium_checksum(Path(loop), size) == hashlib.sha256(data).hexdigest()
        fd = os.open(loop, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 << 20)
        try:
            os.readv(fd, [buf])
            with pytest.raises(OSError):  # what a whole-MiB last read meets
                os.readv(fd, [buf])
        finally:
            buf.close()
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_a_disc_must_hold_the_image_and_the_burns_padding(daemon, fake_drive, tmp_path):
    """A blank disc with room for the image but not for what `-as cdrecord` pads after it
    is refused before the burn (the operator asked for a larger one), not burned into
    five spoiled discs; a large enough one is then burned."""
    drive = fake_drive()
    drive.set(capacity=420_000)
    d = daemon(drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    assert storescu(d.port, ct_series(tmp_path / "in", 1, 8, rows=128)).returncode == 0
    wait_for(lambda: "insert a larger blank disc" in d.log, message="the operator to be told")
    store = d.store()
    job = job_of_study(store, "1.2.3.4.1")
    assert job.images and job.images[0]["bytes"] < 420_000  # the image alone would fit
    assert store.media(job.id) == [] and job.state == "burning"
    drive.set(capacity=2_000_000)
    job = wait_for(lambda: _done(d), message="the burn on the larger disc")
    assert [m["state"] for m in store.media(job.id)] == ["verified"]


def test_a_written_rewritable_disc_is_judged_after_blanking():
    """The space a drive reports for a written rewritable disc leaves out what blanking
    frees: with blanking allowed it is not refused as too small (burn() blanks, then asks
    the drive again); a blank disc too small, or a disc that may not be blanked, is."""
    from mastering.daemon.burner import DiscDrive, MediaState
    from mastering.daemon.config import Drive

    written = MediaState(True, blank=False, rewritable=True, free_bytes=100_000)
    blank = MediaState(True, blank=True, rewritable=True, free_bytes=100_000)
    may = DiscDrive(Drive(name="a", device="/dev/sr9", blank="as_needed"))
    never = DiscDrive(Drive(name="b", device="/dev/sr9", blank="never"))
    assert may.usable(written, 2_000_000) == ""
    assert "insert a larger blank disc" in may.usable(blank, 2_000_000)
    assert "blanking is off" in never.usable(written, 2_000_000)
