"""The daemon as a real process, its peers (DCMTK, pynetdicom) and its drives (xorriso stdio:
pseudo-drives, some on a FUSE file system that can be slow, fail or lie)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mastering.daemon.store import JobStore

REPO = Path(__file__).resolve().parents[2]
FAKEDRIVE = Path(__file__).with_name("fakedrive.py")
TIMEOUT = float(os.environ.get("DAEMON_TEST_TIMEOUT", "60"))  # seconds any wait may take


def wait_for(what: Callable[[], object], timeout: float = TIMEOUT, every: float = 0.05,
             message: str | Callable[[], str] = "condition") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(every)
    if callable(message):
        message = message()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, cfg: dict) -> Path:
    lines = []
    for section, table in cfg.items():
        if section == "drives":
            for d in table:
                lines.append("[[drives]]")
                lines += [f"{k} = {_toml(v)}" for k, v in d.items()]
            continue
        lines.append(f"[{section}]")
        for k, v in table.items():
            if isinstance(v, dict):
                continue
            lines.append(f"{k} = {_toml(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(f"[{section}.{k}]")
                lines += [f"{kk} = {_toml(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_config(tmp: Path, **sections) -> dict:
    cfg = {
        "daemon": {"spool": str(tmp / "spool"), "tick_seconds": 0.1, "status_seconds": 0.5},
        "scp": {"ae_title": "BURNER", "bind": "127.0.0.1", "port": 0, "min_free_mb": 0},
        "assembly": {"quiet_seconds": 1},
        "media": {"label": False},
        "retry": {"backoff_seconds": 0.2, "max_backoff_seconds": 1, "max_attempts": 5},
        "drives": [{"name": "pseudo", "device": f"stdio:{tmp / 'disc.img'}",
                    "poll_seconds": 0.2}],
    }
    for name, table in sections.items():
        if name == "drives":
            cfg["drives"] = table
        else:
            cfg.setdefault(name, {}).update(table)
    return cfg


class DaemonProcess:
    """`mastering daemon --config FILE` in a child process; stderr kept for assertions."""

    def __init__(self, config: Path, env: dict | None = None):
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.port = 0
        self.runs = 0

    def start(self) -> DaemonProcess:
        self.runs += 1
        mark = len(self.lines)
        self.proc = subprocess.Popen([sys.executable, "-m", "mastering", "daemon", "--config",
                                      str(self.config)], stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=REPO)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("daemon exited:\n" + "\n".join(self.lines[-20:]))
            for line in self.lines[mark:]:
                m = re.search(r"listening on [\d.]+:(\d+)", line)
                if m:
                    return int(m.group(1))
            return 0

        self.port = wait_for(listening, message="the daemon to listen")
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def kill(self, reap: bool = True) -> list[int]:
        """kill -9: no clean-up of any kind. Then, as systemd does with the rest of a failed
        service's cgroup, the children left (xorriso) are killed too, unless reap is False.
        Returns the children the daemon had."""
        kids: list[int] = []
        if self.proc and self.proc.poll() is None:
            kids = children(self.proc.pid)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            if reap:
                _reap(kids)
        return kids

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def restart(self) -> DaemonProcess:
        self.kill()
        return self.start()

    def store(self) -> JobStore:
        from mastering.daemon.config import load

        return JobStore(load(self.config).database)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pids: list[int]) -> None:
    for child in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.fixture
def daemon(tmp_path):
    """daemon(**sections) -> a started DaemonProcess with the base test configuration."""
    started: list[DaemonProcess] = []

    def make(env: dict | None = None, start: bool = True, **sections) -> DaemonProcess:
        cfg = write_config(tmp_path / f"daemon{len(started)}.toml",
                           base_config(tmp_path, **sections))
        d = DaemonProcess(cfg, env)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()


class FakeDriveMount:
    """A FUSE mount holding `disc`: device stdio:<mount>/disc."""

    def __init__(self, root: Path):
        self.backing, self.mount = root / "backing", root / "mnt"
        self.backing.mkdir(parents=True)
        self.mount.mkdir()
        self.set()
        self.proc = subprocess.Popen([sys.executable, str(FAKEDRIVE), str(self.backing),
                                      str(self.mount)], stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.ismount(self.mount), 10, message="the FUSE drive")

    @property
    def device(self) -> str:
        return f"stdio:{self.mount / 'disc'}"

    @property
    def disc(self) -> Path:
        return self.backing / "disc"

    def set(self, **control) -> None:
        tmp = self.backing / "control.tmp"
        tmp.write_text(json.dumps(control))
        os.replace(tmp, self.backing / "control.json")
        time.sleep(0.01)

    def take_out(self, to: Path | None = None) -> None:
        """The operator takes the disc out (and keeps it at `to`)."""
        if self.disc.exists():
            if to is not None:
                os.replace(self.disc, to)
            else:
                self.disc.unlink()

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], capture_output=True)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def fake_drive(tmp_path):
    mounts: list[FakeDriveMount] = []

    def make(name: str = "fd") -> FakeDriveMount:
        m = FakeDriveMount(tmp_path / name)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storescu(port: int, *paths: Path, aet: str = "MODALITY", aec: str = "BURNER",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    from tests.conftest import need

    return subprocess.run([need("storescu"), "-aet", aet, "-aec", aec, "+sd", "+r", *extra,
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True,
                          text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=TIMEOUT)


def echoscu(port: int, aet: str = "MODALITY", aec: str = "BURNER") -> subprocess.CompletedProcess:
    from tests.conftest import need

    return subprocess.run([need("echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=TIMEOUT)


def scu_ae(*contexts: str, ae_title: str = "MODALITY"):
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        ae.add_requested_context(cx)
    if not contexts:
        ae.requested_contexts = StoragePresentationContexts[:120]
        ae.add_requested_context(Verification)
    return ae


def send(assoc, path: Path) -> int:
    """C-STORE one file on an open association; the status code."""
    import pydicom

    status = assoc.send_c_store(pydicom.dcmread(path))
    return int(status.Status) if status else -1


def job_of_study(store: JobStore, study_uid: str):
    jobs = [j for j in store.jobs() if j.study_uid == study_uid and not j.supplement_of]
    return jobs[0] if jobs else None


def send_raw(assoc, sop_class: str, sop_uid: str, body: bytes) -> int:
    """A C-STORE whose data set bytes go on the wire as given (corrupt, or lying about its
    class): pynetdicom sends a file's body as it is, under its meta's class and instance."""
    import tempfile

    from pynetdicom import _config

    from mastering import part10

    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, not a re-encoding

    meta = part10.build_meta(sop_class, sop_uid, "1.2.840.10008.1.2.1", "1.2.3", "TEST")
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(meta + body)
        fh.flush()
        status = assoc.send_c_store(Path(fh.name))
    return int(status.Status) if status else -1


def body_of(path: Path) -> bytes:
    from mastering import part10

    return path.read_bytes()[part10.inspect(path).dataset_start:]
