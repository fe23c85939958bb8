"""Crash safety (issue 8 point 8): the daemon is killed with SIGKILL while receiving,
assembling, mastering, burning and verifying, and restarted each time. Afterwards: no
acknowledged instance lost, no job lost or duplicated, the interrupted burns reported as
spoiled and redone on a new disc, no job done whose disc fails read-back, no half-written
image taken for a finished one."""

from __future__ import annotations

import hashlib
import threading
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

    def run(self) -> None:
        ae = scu_ae()
        assoc = ae.associate("127.0.0.1", self.port, ae_title="BURNER")
        if not assoc.is_established:
            return
        try:
            for f in self.files:
                try:
                    status = send(assoc, f)
                except Exception:  # noqa: BLE001 - the daemon died under us
                    return
                if status != 0:
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

