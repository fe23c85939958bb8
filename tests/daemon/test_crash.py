"""Crash safety (issue 8 point 8): the daemon is killed with SIGKILL while receiving,
assembling, mastering, burning and verifying, and restarted each time. Afterwards: no
acknowledged instance lost, no job lost or duplicated, the interrupted burns reported as
spoiled and redone on a new disc, no job done whose disc fails read-back, no half-written
image taken for a finished one."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from tests.conftest import extract_iso, make_ct

from .conftest import alive, body_of, children, job_of_study, scu_ae, send, wait_for

STUDY = "1.2.3.4.77"


def _study(folder: Path, n: int) -> list[Path]:
    return [make_ct(folder, f"{i:03d}.dcm", instance=i, rows=96, value=i, study_uid=STUDY,
                    series_uid=f"{STUDY}.{1 + i // 40}", SeriesNumber=1 + i // 40)
            for i in range(n)]


class Poll:
    """A cheap read-only look at the job's state, every few milliseconds."""

    def __init__(self, d):
        from mastering.daemon.config import load

        self.db = load(d.config).database
        self._con = None

    def state(self) -> str:
        import sqlite3

        if self._con is None:
            if not self.db.exists():
                return ""
            self._con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        row = self._con.execute("SELECT state FROM jobs WHERE study_uid=? AND supplement_of "
                                "IS NULL ORDER BY id LIMIT 1", (STUDY,)).fetchone()
        return row[0] if row else ""


class Sender(threading.Thread):
    """A modality: sends files one by one, remembering which got Success."""

    def __init__(self, port: int, files: list[Path]):
        super().__init__(daemon=True)
        self.port, self.files = port, files
        self.acked: list[Path] = []
        self.error: Exception | None = None

    def run(self) -> None:
        ae = scu_ae()
        assoc = ae.associate("127.0.0.1", self.port, ae_title="BURNER")
        if not assoc.is_established:
            self.error = ConnectionError("no association")
            return
        try:
            for f in self.files:
                try:
                    status = send(assoc, f)
                except Exception as exc:  # noqa: BLE001 - the daemon died under us
                    self.error = exc
                    return
                if status != 0:
                    self.error = ValueError(f"status 0x{status:04X}")
                    return
                self.acked.append(f)
        finally:
            if assoc.is_established:
                assoc.release()


@pytest.mark.slow
def test_kill_at_many_points_then_restart(daemon, fake_drive, tmp_path):
    files = _study(tmp_path / "in", 300)
    drive = fake_drive()
    drive.set(write_rate=1_500_000, read_rate=3_000_000)
    d = daemon(assembly={"quiet_seconds": 4}, media={"label": True},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    kills = []

    # 1. receiving: killed after some instances were acknowledged
    sender = Sender(d.port, files)
    sender.start()
    poll = Poll(d)
    wait_for(lambda: len(sender.acked) >= 30, message="30 acknowledged instances")
    d.kill()
    kills.append(("receiving", len(sender.acked)))
    sender.join(10)
    acked = list(sender.acked)
    d.start()
    store = d.store()
    for f in acked:  # every acknowledged instance is in the spool, intact
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        rec = store.instance(uid)
        assert rec is not None and body_of(Path(rec.path)) == body_of(f)

    # 2. assembling: the rest sent (the first ones again: idempotent), killed at once
    sender = Sender(d.port, files)
    sender.start()
    sender.join(60)
    assert len(sender.acked) == len(files)
    assert poll.state() == "received"
    d.kill()
    kills.append(("assembling", poll.state()))
    d.start()

    # 3. mastering
    wait_for(lambda: poll.state() == "mastering" and children(d.proc.pid), every=0.002,
             message=lambda: "mastering\n" + d.log[-3000:])
    kids = d.kill(reap=False)  # the mastering process must die with the daemon by itself
    kills.append(("mastering", poll.state()))
    assert kids
    wait_for(lambda: not any(alive(k) for k in kids), 10, message="the mastering child to die")
    d.start()

    # 4. burning, with bytes on the disc
    wait_for(lambda: poll.state() == "burning" and drive.disc.exists()
             and drive.disc.stat().st_size > 200_000, every=0.01, message="a burn under way")
    d.kill()
    kills.append(("burning", drive.disc.stat().st_size))
    d.start()

    # 5. verifying (reading the disc back)
    wait_for(lambda: poll.state() == "verifying", every=0.005, message="read-back")
    d.kill()
    kills.append(("verifying", poll.state()))
    d.start()

    wait_for(lambda: poll.state() == "done", message="the job to be done after 5 kills")
    store = d.store()
    job = job_of_study(store, STUDY)
    # no job lost or duplicated: one job for the study, none cancelled or failed
    jobs = [j for j in store.jobs() if j.study_uid == STUDY]
    assert [j.id for j in jobs] == [job.id], [(j.id, j.state, j.reason) for j in jobs]
    assert job.instances == len(files)
    # the interrupted burn and read-back were reported as spoiled, then redone
    media = store.media(job.id)
    states = [m["state"] for m in media]
    assert states.count("verified") == 1 and states[-1] == "verified"
    assert states.count("spoiled") >= 2, media
    trail = store.audit_trail(job.id)
    assert sum(a["event"] == "disc-spoiled" and a["actor"] == "recovery" for a in trail) >= 2
    # the disc in the drive is the image, byte for byte over its size, and holds every
    # instance exactly once with its data set unchanged
    img = job.images[0]
    assert hashlib.sha256(drive.disc.read_bytes()[:img["bytes"]]).hexdigest() == img["sha256"]
    assert hashlib.sha256(Path(img["path"]).read_bytes()).hexdigest() == img["sha256"]
    out = extract_iso(drive.disc, tmp_path / "x")
    fs = FileSet(out / "DICOMDIR")
    on_disc = {i.SOPInstanceUID: Path(i.path) for i in fs}
    assert len(on_disc) == len(fs) == len(files)
    for f in files[::17]:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert body_of(on_disc[uid]) == body_of(f)
    # nothing half-written is left in the job's folder: only the finished image(s) and the
    # core's record of what it published (mastering.outputs)
    leftovers = [p for p in Path(img["path"]).parent.iterdir() if p.name.endswith(".partial")
                 or (p.name.startswith(".") and not p.name.endswith(".mastering.json"))]
    assert leftovers == []
    assert len(kills) == 5 and d.runs == 6



def _jobs_cmd(d, *args: str):
    import subprocess
    import sys

    from .conftest import REPO

    return subprocess.run([sys.executable, "-m", "mastering", "jobs", "--config",
                           str(d.config), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=90)


def test_cancel_while_the_daemon_is_down(daemon, tmp_path):
    """kill -9 while a job is mastered; `jobs cancel` while the daemon is stopped; at the
    restart the job is cancelled (not left queued forever), and an instance of the study
    that arrives later goes into a new job of its own, which burns."""
    files = _study(tmp_path / "in", 41)
    d = daemon(assembly={"quiet_seconds": 0.5})
    poll = Poll(d)
    sender = Sender(d.port, files[:40])
    sender.run()
    assert len(sender.acked) == 40
    wait_for(lambda: poll.state() == "mastering", every=0.002, message="mastering")
    d.kill()
    res = _jobs_cmd(d, "cancel", "1")
    assert "the daemon stops it and cancels it" in res.stdout, res.stdout + res.stderr
    d.start()
    store = d.store()
    wait_for(lambda: store.job(1).state == "cancelled", 10, message="the cancel at restart")
    late = Sender(d.port, files[40:])
    late.run()
    assert late.acked, (late.error, d.log[-300:])
    follow = wait_for(lambda: [j for j in store.jobs() if j.id != 1 and j.state == "done"],
                      message="the late instance's own job to burn")
    assert follow[0].instances == 1 and store.job(1).instances == 40
    assert [m["state"] for m in store.media(1)] == []


def _workers(d) -> list[str]:
    """The daemon's children doing work (a mastering process, xorriso), not
    multiprocessing's resource tracker."""
    import subprocess

    cmds = [subprocess.run(["ps", "-o", "args=", "-p", str(p)], capture_output=True,
                           text=True).stdout.strip() for p in children(d.proc.pid)]
    return [c for c in cmds if c and "resource_tracker" not in c]


def test_cancel_while_mastering_and_while_burning(daemon, fake_drive, tmp_path):
    """A cancel (what `jobs cancel` records) of a job being mastered stops the mastering
    process; of a job being burned stops xorriso; both end cancelled, the burned disc
    reported as spoiled, and no child process is left."""
    drive = fake_drive()
    drive.set(write_rate=100_000)
    d = daemon(assembly={"quiet_seconds": 0.5}, media={"label": True},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    poll = Poll(d)
    sender = Sender(d.port, _study(tmp_path / "in", 60))
    sender.run()
    store = d.store()
    wait_for(lambda: poll.state() == "mastering", every=0.002, message="mastering")
    assert store.request_cancel(1, "cli:test") == "mastering"
    wait_for(lambda: store.job(1).state == "cancelled", 20, message="the mastering cancel")
    trail = [(a["from_state"], a["to_state"]) for a in store.audit_trail(1)
             if a["event"] == "state"]
    assert trail[-1] == ("mastering", "cancelled"), trail
    assert store.media(1) == []
    wait_for(lambda: not _workers(d), 10, message="the mastering process to end")
    other = [make_ct(tmp_path / "b", f"{i}.dcm", instance=i, rows=128, study_uid="1.2.3.4.78",
                     series_uid="1.2.3.4.78.1") for i in range(6)]
    Sender(d.port, other).run()
    job = wait_for(lambda: (j := job_of_study(store, "1.2.3.4.78")) and j.state == "burning"
                   and drive.disc.exists() and drive.disc.stat().st_size > 50_000 and j,
                   message="the second job's burn")
    assert store.request_cancel(job.id, "cli:test") == "burning"
    wait_for(lambda: store.job(job.id).state == "cancelled", 20, message="the burn cancel")
    assert [m["state"] for m in store.media(job.id)] == ["spoiled"]
    wait_for(lambda: not _workers(d), 10, message="xorriso to end")


def test_a_second_daemon_on_the_spool_refuses(daemon, fake_drive, tmp_path):
    """An operator starts a second daemon with the same configuration while the first one
    burns: it refuses at once (the spool lock), before touching anything; the first one's
    job is burned once, its disc not reported spoiled, its received data intact."""
    import subprocess
    import sys

    from .conftest import REPO

    drive = fake_drive()
    drive.set(write_rate=300_000)
    d = daemon(assembly={"quiet_seconds": 0.5},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    Sender(d.port, _study(tmp_path / "in", 20)).run()
    poll = Poll(d)
    wait_for(lambda: poll.state() == "burning", message="the burn")
    second = subprocess.run([sys.executable, "-m", "mastering", "daemon", "--config",
                             str(d.config)], capture_output=True, text=True, cwd=REPO,
                            timeout=30)
    assert second.returncode == 1
    assert "one daemon per spool" in second.stderr and str(d.proc.pid) in second.stderr
    assert "recovery" not in second.stderr
    store = d.store()
    assert [m["state"] for m in store.media(1)] == ["burning"]
    drive.set()
    wait_for(lambda: poll.state() == "done", message="the first daemon's job")
    assert [m["state"] for m in store.media(1)] == ["verified"]
    assert d.log.count("job 1 done") == 1


def test_a_job_moved_by_someone_else_is_left_to_them(daemon, fake_drive, tmp_path):
    """While the daemon reads a disc back, another process moves the job back to ready and
    reports the disc spoiled (what a second daemon's recovery did before the spool lock):
    the daemon's refused transition means "stop": the disc stays spoiled, no "done" is
    logged for that attempt, and the job is burned again, once."""
    drive = fake_drive()
    drive.set(read_rate=150_000)
    d = daemon(assembly={"quiet_seconds": 0.5},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    Sender(d.port, _study(tmp_path / "in", 8)).run()
    poll = Poll(d)
    wait_for(lambda: poll.state() == "verifying", every=0.005, message="the read-back")
    store = d.store()
    medium = store.media(1)[-1]
    store.finish_medium(medium["id"], "spoiled", detail="reported by another process")
    assert store.transition(1, "ready", expect=("verifying",), actor="someone else")
    drive.set()
    wait_for(lambda: "by someone else; drive fd leaves" in d.log, 20,
             message=lambda: "the worker to let go\n" + d.log[-3000:])
    wait_for(lambda: poll.state() == "done", message="the job burned again")
    states = [m["state"] for m in store.media(1)]
    assert states[0] == "spoiled" and states[-1] == "verified" and len(states) == 2, states
    assert d.log.count("job 1 done") == 1


def test_purge_interrupted_by_a_crash(daemon, tmp_path):
    """A purge killed after it recorded what to release and before the files were removed,
    and a purge whose file cannot be removed (immutable): recovery finishes the first and
    never takes a tombstoned file for a new instance (no unrequested disc); the second is
    finished once the file can be removed."""
    import subprocess

    d = daemon(assembly={"quiet_seconds": 0.5},
               drives=[{"name": "p", "device": f"stdio:{tmp_path / 'disc.img'}",
                        "blank": "as_needed", "poll_seconds": 0.2}])
    Sender(d.port, _study(tmp_path / "in", 3)).run()
    store = d.store()
    wait_for(lambda: store.jobs() and store.jobs()[0].state == "done", message="job 1")
    spooled = [Path(r.path) for r in store.job_files(1)]
    d.stop()
    # a purge killed between its commit and the first unlink leaves exactly this behind
    assert sorted(store.begin_purge(1, "cli:test")) == sorted(map(str, spooled))
    assert all(p.exists() for p in spooled)
    d.start()
    wait_for(lambda: store.job(1).purged == 1, 10, message="recovery to finish the purge")
    assert not any(p.exists() for p in spooled) and store.tombstones() == []
    assert len(store.jobs()) == 1 and "adopted" not in d.log
    # the same study again, burned, then purged with one file that cannot be removed
    Sender(d.port, [make_ct(tmp_path / "two", f"{i}.dcm", instance=i, study_uid="1.2.3.4.79",
                            series_uid="1.2.3.4.79.1") for i in range(3)]).run()
    wait_for(lambda: (j := job_of_study(store, "1.2.3.4.79")) and j.state == "done",
             message="job 2")
    job = job_of_study(store, "1.2.3.4.79")
    files = [Path(r.path) for r in store.job_files(job.id)]
    d.stop()
    subprocess.run(["chattr", "+i", str(files[0])], check=True)
    try:
        res = _jobs_cmd(d, "purge", "--done-older-than", "0")
        assert res.returncode == 1 and "could not be removed" in res.stderr, res
        assert files[0].exists() and not files[1].exists()
        d.start()
        time.sleep(2)
        assert len(store.jobs()) == 2, [(j.id, j.state) for j in store.jobs()]
        assert files[0].exists() and store.tombstones() == [str(files[0])]
    finally:
        subprocess.run(["chattr", "-i", str(files[0])], check=True)
    wait_for(lambda: store.job(job.id).purged == 1 and not files[0].exists(), 10,
             message="the daemon to remove the file once it can")
    assert store.tombstones() == [] and len(store.jobs()) == 2
