"""Running the daemon: the `jobs` commands (daemon running and stopped), follow-up jobs,
the watched folder, a full spool on a tmpfs of our own, sd_notify through a NOTIFY_SOCKET
of our own, the systemd unit under systemd-analyze, the configuration file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from mastering.daemon import config
from tests.conftest import ct_series, make_ct

from .conftest import REPO, body_of, job_of_study, scu_ae, send, storescu, wait_for


def jobs_cmd(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mastering", "jobs", "--config", str(d.config),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_jobs_commands_with_the_daemon_running_and_stopped(daemon, tmp_path):
    d = daemon(assembly={"auto": False})
    files = ct_series(tmp_path / "in", 1, 3, patient_id="PURGEDPID9")
    assert storescu(d.port, files).returncode == 0
    listing = json.loads(jobs_cmd(d, "--json").stdout)
    assert listing == []  # auto assembly off: nothing burns until asked
    res = jobs_cmd(d, "submit", "1.2.3.4.1")
    assert res.returncode == 0 and "job 1 ready" in res.stdout
    store = d.store()
    wait_for(lambda: store.job(1).state == "done", message="the submitted job")
    shown = json.loads(jobs_cmd(d, "show", "1", "--json").stdout)
    assert shown["job"]["state"] == "done" and len(shown["instances"]) == 3
    assert [m["state"] for m in shown["media"]] == ["verified"]
    events = [a["event"] for a in shown["audit"]]
    assert "disc-verified" in events and shown["audit"][0]["actor"].startswith("cli:")
    text = jobs_cmd(d, "show", "1").stdout
    assert "verified" in text and "sha256" in text
    assert jobs_cmd(d, "cancel", "1").returncode == 2  # done: nothing to cancel
    d.stop()
    # stopped: the same commands work on the store
    res = jobs_cmd(d)
    assert res.returncode == 0 and "job 1 done instances=3" in res.stdout
    assert jobs_cmd(d, "retry", "1").returncode == 0
    assert store.job(1).state == "ready"
    assert "cancelled" in jobs_cmd(d, "cancel", "1").stdout
    assert jobs_cmd(d, "retry", "1").returncode == 0
    (tmp_path / "disc.img").unlink()  # the operator takes the first disc out
    d.start()
    wait_for(lambda: store.job(1).state == "done", message="the retried job")
    assert [m["state"] for m in store.media(1)] == ["superseded", "verified"]  # a new disc
    spooled = [Path(r.path) for r in store.job_files(1)]
    assert all(p.is_file() for p in spooled)
    # purged while the daemon runs (and keeps the job store open)
    res = jobs_cmd(d, "purge", "--done-older-than", "0")
    assert res.returncode == 0 and "purged 1 job(s), 3 spool file(s)" in res.stdout
    assert not any(p.exists() for p in spooled)
    assert not (Path(store.path).parent / "jobs" / "000001").exists()
    uid = pydicom.dcmread(next(files.rglob("*.dcm")), stop_before_pixels=True).SOPInstanceUID
    store.close()
    raw = b"".join(p.read_bytes() for p in Path(store.path).parent.glob("jobs.sqlite*"))
    # secure_delete overwrote the purged rows, and the purge checkpointed the WAL
    assert uid.encode() not in raw and b"PURGEDPID9" not in raw
    assert jobs_cmd(d, "retry", "1").returncode == 2  # purged: nothing left to burn


def test_follow_up_job_and_cancel(daemon, fake_drive, tmp_path):
    """An instance arriving after its study's job started goes into a follow-up job (its
    own disc, a supplement), never into the disc being written."""
    drive = fake_drive()
    drive.set(write_rate=300_000)
    d = daemon(assembly={"quiet_seconds": 0.5},
               drives=[{"name": "fd", "device": drive.device, "blank": "as_needed",
                        "poll_seconds": 0.2}])
    assert storescu(d.port, ct_series(tmp_path / "in", 1, 4, rows=128)).returncode == 0
    store = d.store()
    wait_for(lambda: (j := job_of_study(store, "1.2.3.4.1")) and j.state == "burning",
             message="the burn")
    late = make_ct(tmp_path / "late", "l.dcm", instance=99, series_uid="1.2.3.4.1.99")
    assert storescu(d.port, late).returncode == 0
    first = job_of_study(store, "1.2.3.4.1")
    follow = [j for j in store.jobs() if j.supplement_of == first.id]
    assert len(follow) == 1 and follow[0].instances == 1 and first.instances == 4
    res = jobs_cmd(d, "cancel", str(follow[0].id))
    assert "cancelled" in res.stdout
    wait_for(lambda: store.job(first.id).state == "done", message="the first disc")
    assert store.job(follow[0].id).state == "cancelled"
    res = jobs_cmd(d)
    assert f"supplement 1 of job {first.id}" in res.stdout


def test_watched_folder(daemon, tmp_path):
    watch = tmp_path / "watch"
    (watch / "doe_jane_ct").mkdir(parents=True)
    d = daemon(watch={"folder": str(watch), "marker": "READY", "poll_seconds": 0.2})
    ct_series(watch / "doe_jane_ct", 1, 3)
    (watch / "doe_jane_ct" / "notes.txt").write_text("not DICOM")
    time.sleep(0.5)
    store = d.store()
    assert store.jobs() == []  # no marker yet
    (watch / "doe_jane_ct" / "READY").write_text("")
    job = wait_for(lambda: (j := store.jobs()) and j[0].state == "done" and j[0],
                   message="the watched folder's job")
    assert job.instances == 3 and job.source == "watch"
    assert (watch / "doe_jane_ct" / "notes.txt").exists()  # the input is left alone
    time.sleep(0.5)
    assert len(store.jobs()) == 1  # taken once
    assert "doe_jane" not in d.log.lower() and f"job {job.id}" in d.log


@pytest.mark.slow
def test_spool_full_answers_out_of_resources(daemon, tmp_path):
    """A 3 MB tmpfs spool: what fits is stored and acknowledged, then A700; nothing
    acknowledged is missing and nothing refused is kept."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (the test machine runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        d = daemon(daemon={"spool": str(mnt / "spool")}, assembly={"quiet_seconds": 300},
                   scp={"min_free_mb": 0})
        files = [make_ct(tmp_path / "in", f"{i}.dcm", instance=i, rows=256) for i in range(40)]
        ae = scu_ae()
        assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
        statuses = [send(assoc, f) for f in files]
        assoc.release()
        assert 0xA700 in statuses and statuses[0] == 0
        store = d.store()
        for f, status in zip(files, statuses, strict=True):
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            rec = store.instance(uid)
            if status == 0:
                assert rec is not None and Path(rec.path).stat().st_size == rec.size
            else:
                assert rec is None
        assert not list((mnt / "spool" / "tmp").iterdir())
        assert "spool full (0xA700)" in d.log or "spool write failed" in d.log
        d.stop()
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_notify_socket_ready_status_watchdog(daemon, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        d = daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        got: list[str] = []
        end = time.monotonic() + 20
        while time.monotonic() < end and not (any("READY=1" in m for m in got)
                                              and any("WATCHDOG=1" in m for m in got)
                                              and sum("STATUS=" in m for m in got) >= 1):
            got.append(sock.recv(4096).decode())
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=queue:" in ready and "drives: pseudo idle" in ready
        assert any(m == "WATCHDOG=1" for m in got)
        assert storescu(d.port, ct_series(tmp_path / "in", 1, 2)).returncode == 0
        while not any("received" in m or "ready" in m or "mastering" in m for m in got[-5:]):
            got.append(sock.recv(4096).decode())
        d.stop()
        while "STOPPING=1" not in got[-1]:
            got.append(sock.recv(4096).decode())
    finally:
        sock.close()


def test_systemd_unit_verifies(tmp_path):
    """systemd-analyze verify with no complaint at all (unknown keys only warn)."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze missing: scripts/bootstrap installs Debian's systemd")
    unit = (REPO / "systemd" / "mastering-daemon.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    for key in ("ProtectSystem=strict", "ReadWritePaths=/var/spool/dicom-burner",
                "PrivateTmp=yes", "NoNewPrivileges=yes", "SupplementaryGroups=cdrom",
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"):
        assert key in unit
    local = tmp_path / "mastering-daemon.service"
    local.write_text(unit.replace("/opt/dicom-mastering/.venv/bin/mastering",
                                  str(Path(sys.executable).with_name("mastering"))))
    res = subprocess.run([exe, "verify", str(local)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_example_config_and_errors(tmp_path):
    cfg = config.load(REPO / "systemd" / "mastering-daemon.toml")
    assert cfg.scp.ae_title == "BURNER" and cfg.drives[0].device == "/dev/sr0"
    assert cfg.database == Path("/var/spool/dicom-burner/jobs.sqlite")
    bad = tmp_path / "bad.toml"
    for text, msg in (("[scp]\nport = 'x'\n", "scp.port"), ("[scp]\ntypo = 1\n", "typo"),
                      ("[nope]\n", "unknown section"),
                      ("[assembly]\ngroup_by = 'series'\n", "group_by"),
                      ("[[drives]]\nname = 'a'\n", "needs device"),
                      ("[scp]\nallowed_peers = ['not an address']\n", "allowed_peers")):
        bad.write_text(text)
        with pytest.raises(config.ConfigError, match=msg):
            config.load(bad)
    res = subprocess.run([sys.executable, "-m", "mastering", "daemon", "--config", str(bad)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "allowed_peers" in res.stderr and "Traceback" not in res.stderr


def test_store_transitions_and_audit(tmp_path):
    from mastering.daemon.store import InstanceRecord, JobStore, StoreError

    store = JobStore(tmp_path / "s" / "jobs.sqlite")
    assert oct((tmp_path / "s" / "jobs.sqlite").stat().st_mode & 0o777) == "0o600"
    rec = InstanceRecord("1.2.3", "1.2", "9.9", "9.9.1", "P", "AE", "127.0.0.1", "/x", 1, "h",
                         1.0)
    job = store.add_instance(rec, "study", "9.9")
    assert store.job(job).state == "received"
    with pytest.raises(StoreError):
        store.transition(job, "done")
    assert store.transition(job, "ready", expect=("received",))
    assert not store.transition(job, "ready", expect=("received",))  # someone else moved it
    claimed = store.claim_ready("A", time.time())
    assert claimed.id == job and claimed.state == "mastering" and store.claim_ready("B", 9e9) \
        is None
    rec2 = InstanceRecord("1.2.4", "1.2", "9.9", "9.9.1", "P", "AE", "127.0.0.1", "/y", 1, "h",
                          2.0)
    follow = store.add_instance(rec2, "study", "9.9")
    assert follow != job and store.job(follow).supplement_of == job
    trail = [(a["from_state"], a["to_state"]) for a in store.audit_trail(job)]
    assert trail == [("", "received"), ("received", "ready"), ("ready", "mastering")]
    # a job waiting for a retry with an image: a new instance joins it and the image goes
    store.transition(follow, "ready", images=[{"index": 1, "sha256": "x"}])
    rec3 = InstanceRecord("1.2.5", "1.2", "9.9", "9.9.1", "P", "AE", "127.0.0.1", "/z", 1, "h",
                          3.0)
    assert store.add_instance(rec3, "study", "9.9") == follow
    assert store.job(follow).images == [] and store.job(follow).instances == 2


@pytest.mark.parametrize("group_by, jobs", [("study", 3), ("patient", 2), ("calling_ae", 2)])
def test_grouping(tmp_path, group_by, jobs):
    """One job per study (default), per patient, or per calling AE."""
    from mastering import profiles
    from mastering.daemon.spool import Spool
    from mastering.daemon.store import JobStore

    store = JobStore(tmp_path / "spool" / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", store, profiles.load("STD-GEN-CD"), group_by=group_by)
    sent = [("P1", "1.2.3.1", "CT1"), ("P1", "1.2.3.2", "CT1"), ("P2", "1.2.3.3", "MR1")]
    for i, (pid, study, ae) in enumerate(sent):
        f = make_ct(tmp_path / "in", f"{i}.dcm", patient_id=pid, study_uid=study,
                    series_uid=study + ".1")
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out = spool.receive(f.read_bytes(), ds.SOPClassUID, ds.SOPInstanceUID, ae, "127.0.0.1")
        assert out.status == 0
    assert len(store.jobs()) == jobs


def test_retention_releases_everything_it_kept(daemon, tmp_path):
    """Instances never submitted (assembly off), a cancelled job's instances and the
    quarantine are released after their retention, like done jobs; the quarantine has a
    size limit; the Patient ID a job was grouped by is never printed by `jobs --json` and
    is gone from the job store, WAL included, once the job is purged."""
    from .conftest import send_raw

    keep = {"unfinished_retention_days": 4 / 86400, "quarantine_retention_days": 4 / 86400}
    d1 = daemon(daemon=keep, assembly={"auto": False}, mcm={"instance_timeout": 1},
                drives=[])
    never = [make_ct(tmp_path / "o", f"{i}.dcm", instance=i, patient_id="SECRETPID7",
                     study_uid="1.2.3.4.70") for i in (1, 2)]
    assert storescu(d1.port, *never).returncode == 0
    d1.stop()
    d = daemon(daemon=keep, assembly={"group_by": "patient", "quiet_seconds": 300},
               scp={"quarantine_max_mb": 1}, mcm={"instance_timeout": 1}, drives=[])
    assert storescu(d.port, ct_series(tmp_path / "in", 1, 3, patient_id="SECRETPID8"))\
        .returncode == 0
    store = d.store()
    job = store.jobs()[0]
    assert job.group_key == "SECRETPID8"
    listing, shown = jobs_cmd(d, "--json").stdout, jobs_cmd(d, "show", str(job.id), "--json").stdout
    assert json.loads(listing)[0]["id"] == job.id and json.loads(shown)["job"]["id"] == job.id
    assert "SECRETPID" not in listing + shown and "group_key" not in listing + shown
    assert "cancelled" in jobs_cmd(d, "cancel", str(job.id)).stdout
    ae = scu_ae()
    assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
    big = body_of(make_ct(tmp_path / "q", "q.dcm", rows=560))  # 627 KB, truncated below
    assert send_raw(assoc, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.9.61", big[:-100]) == 0xC000
    assert send_raw(assoc, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.9.62", big[:-100]) == 0xC000
    assoc.release()
    q = {x["sop_uid"]: x for x in store.quarantined()}
    assert Path(q["1.2.3.9.61"]["path"]).is_file()
    assert q["1.2.3.9.62"]["path"] == "" and "quarantine_max_mb" in q["1.2.3.9.62"]["reason"]
    spool = Path(store.path).parent
    wait_for(lambda: not list((spool / "instances").iterdir())
             and not list((spool / "quarantine").iterdir()) and not store.quarantined()
             and store.job(job.id).purged == 1, 20,
             message=lambda: f"retention: {list((spool / 'instances').iterdir())} "
             f"{list((spool / 'quarantine').iterdir())} {store.job(job.id)}")
    assert all(store.instance(pydicom.dcmread(f).SOPInstanceUID) is None for f in never)
    store.close()  # a reader can hold a checkpoint back: the daemon tries again until done

    def raw() -> bytes:
        return b"".join(p.read_bytes() for p in spool.glob("jobs.sqlite*"))

    wait_for(lambda: b"SECRETPID" not in raw() and b"1.2.3.9.61" not in raw(), 20,
             message=lambda: "purged rows still in the job store's files")
