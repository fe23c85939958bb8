#!/usr/bin/env python
"""Benchmark of the burning daemon's DICOM side (issue 8 point 10), side by side with DCMTK.

1. Receive: DCMTK ``storescu`` sends the same CT corpus (default 2,000 instances from
   ``bench/make_corpus.py``) over loopback, alternately to DCMTK ``storescp`` (the C anchor,
   writing files without fsync) and to ``mastering daemon`` (fsync of file and folder and a
   durable SQLite commit per instance); wall time of storescu, median of the repeats.
2. C-ECHO latency while the daemon receives that corpus and masters, burns (to an xorriso
   ``stdio:`` pseudo-drive) and reads back the studies that become ready meanwhile.
3. Daemon RSS from 1,000 to 10,000 received instances of a small-image preset (64x64 CT),
   sampled from /proc after each 1,000.
4. Read-back cost: burn seconds against read-back seconds (checksum + the core's verify)
   for each disc of step 2, from the job store.
5. Memory per association: the daemon's peak RSS (VmHWM) before and after it received one
   large instance (default 256 MB), which is streamed into the spool as it arrives.
6. The decode check: the first 200 instances of the corpus compressed by DCMTK dcmcjpeg
   (JPEG lossless SV1), sent to a daemon whose profile (STD-GEN-CD) does not carry JPEG, so
   each is decoded once at receive, and to one whose profile (STD-GEN-DVD-JPEG) does.

The receive part also runs two pynetdicom SCPs that keep nothing: one as pynetdicom comes
(the floor of any pynetdicom SCP) and one with the daemon's faster reader poll (the floor of
the daemon's own configuration).

Both peers get ``TCP_NODELAY=1`` (network.md: Nagle costs ~45 ms per C-STORE on loopback).
Prints Markdown and writes JSON to ``bench/results/daemon-<time>.json``.

Usage::

    .venv/bin/python bench/daemon.py                       # 2,000 CT, 10,000 small, 2 repeats
    .venv/bin/python bench/daemon.py --instances 500 --small 3000 --repeat 1   # quick
    git archive REV | tar -x -C /tmp/old        # a daemon of another revision, side by side
    .venv/bin/python bench/daemon.py --parts receive --repeat 4 --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import make_corpus  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def corpus(n: int, root: Path) -> Path:
    out = root / f"n{n}"
    if not make_corpus.corpus_matches(out, n):
        if out.exists():
            shutil.rmtree(out)
        make_corpus.generate(n, out)
    return out


def small_corpus(n: int, out: Path) -> Path:
    """n small CT instances (64x64), 10 studies, from one template: a preset for RSS."""
    import pydicom
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(HERE.parent))
    from tests.conftest import make_ct

    if out.exists() and len(list(out.rglob("*.dcm"))) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    template = pydicom.dcmread(make_ct(out / "t", "t.dcm", rows=64))
    shutil.rmtree(out / "t")
    for i in range(n):
        study = i * 10 // n
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.StudyInstanceUID = f"1.2.3.777.{study}"
        template.SeriesInstanceUID = f"1.2.3.777.{study}.1"
        template.InstanceNumber = i + 1
        folder = out / f"chunk{i // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        template.save_as(folder / f"{i:05d}.dcm")
    return out


class Daemon:
    """`mastering daemon` of this checkout, or (tree) of another checkout of the project: run
    as `python -m mastering` in that folder, so its package is the one imported."""

    def __init__(self, work: Path, drive: bool, quiet: float = 3600, profile: str = "STD-GEN-CD",
                 tree: Path | None = None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        drives = (f'[[drives]]\nname = "pseudo"\ndevice = "stdio:{work / "disc.img"}"\n'
                  'blank = "as_needed"\npoll_seconds = 0.5\n') if drive else ""
        cfg = work / "daemon.toml"
        cfg.write_text(f'[daemon]\nspool = "{work / "spool"}"\ntick_seconds = 0.2\n'
                       f'[scp]\nae_title = "BURNER"\nbind = "127.0.0.1"\nport = 0\n'
                       f'min_free_mb = 100\nmax_pdu = 0\n'
                       f'[assembly]\nquiet_seconds = {quiet}\n'
                       f'[media]\nprofile = "{profile}"\nlabel = false\nworkers = 1\n{drives}')
        self.config = cfg
        self.lines: list[str] = []
        cmd = [str(HERE.parent / ".venv" / "bin" / "mastering")] if tree is None else \
            [sys.executable, "-m", "mastering"]
        self.proc = subprocess.Popen([*cmd, "daemon", "--config", str(cfg)], cwd=tree,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        end = time.monotonic() + 30
        self.port = 0
        while not self.port and time.monotonic() < end:
            for line in list(self.lines):
                m = re.search(r"listening on [\d.]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
            time.sleep(0.05)
        if not self.port:
            raise RuntimeError("daemon did not start:\n" + "\n".join(self.lines[-10:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def rss_mb(self) -> float:
        return self.status_kb("VmRSS") / 1024

    def status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def store(self):
        from mastering.daemon.store import JobStore

        return JobStore(self.work / "spool" / "jobs.sqlite")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def storescu(port: int, *paths: Path, aec: str = "BURNER", extra: tuple = ()) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "+sd", "+r", "-R", *extra,
                          "127.0.0.1", str(port), *map(str, paths)], env=ENV,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-500:]}")
    return wall


def storescp_run(files: Path, work: Path) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "REF", "-od", str(out), "+B", str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        return storescu(port, files, aec="REF")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


NULL_SCP = """
import socket, sys
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
POLL = float(sys.argv[2])
def store(e):
    e.encoded_dataset()
    return 0
def nodelay(e):
    e.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if POLL:
        e.assoc.dul._run_loop_delay = POLL
ae = AE("NULL")
ae.maximum_pdu_size = 0
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
ae.start_server(("127.0.0.1", int(sys.argv[1])),
                evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, nodelay)])
"""


def null_run(files: Path, poll: float = 0.0) -> float:
    """pynetdicom itself, with a handler that keeps nothing: the floor of any pynetdicom SCP
    (poll 0: pynetdicom's own reader poll; else the daemon's)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", NULL_SCP, str(port), str(poll)],
                            stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    try:
        return storescu(port, files, aec="NULL")
    finally:
        proc.terminate()
        proc.wait()


def daemon_run(files: Path, work: Path, profile: str = "STD-GEN-CD",
               extra: tuple = (), tree: Path | None = None) -> float:
    shutil.rmtree(work, ignore_errors=True)
    d = Daemon(work, drive=False, profile=profile, tree=tree)
    try:
        return storescu(d.port, files, extra=extra)
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


def receive(files: Path, work: Path, repeat: int, baselines: list[Path] = ()) -> dict:
    """Interleaved, the same conditions for all: storescp, the daemon, each baseline (the
    daemon of another checkout, e.g. an earlier revision), the two pynetdicom floors."""
    from mastering.daemon.scp import FAST_POLL

    subprocess.run(["cat", *map(str, sorted(files.rglob("*.dcm"))[:1])], capture_output=True)
    ref, ours, null, fast = [], [], [], []
    base: dict[str, list[float]] = {str(b): [] for b in baselines}
    for _ in range(repeat):
        ref.append(storescp_run(files, work))
        ours.append(daemon_run(files, work / "d"))
        for b in baselines:
            base[str(b)].append(daemon_run(files, work / "b", tree=b))
        null.append(null_run(files))
        fast.append(null_run(files, FAST_POLL))
    r, o, n, f = (statistics.median(x) for x in (ref, ours, null, fast))
    return {"storescp_s": ref, "daemon_s": ours, "null_s": null, "null_fast_s": fast,
            "storescp_median": r, "daemon_median": o, "null_median": n, "null_fast_median": f,
            "ratio": o / r, "null_ratio": n / r, "null_fast_ratio": f / r,
            "baselines": {k: {"runs": v, "median": statistics.median(v),
                              "ratio": statistics.median(v) / r} for k, v in base.items()},
            "load_after": load_avg()}


def big_instance(work: Path, mbytes: int, baselines: list[Path] = ()) -> dict:
    """Peak memory of the daemon (and of each baseline's) around one large instance."""
    out = _big_instance(work, mbytes)
    out["baselines"] = {str(b): _big_instance(work, mbytes, b) for b in baselines}
    return out


def _big_instance(work: Path, mbytes: int, tree: Path | None = None) -> dict:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from tests.conftest import make_ct

    shutil.rmtree(work, ignore_errors=True)
    rows = int((mbytes * 1_000_000 / 2) ** 0.5)
    big = make_ct(work / "in", "big.dcm", rows=rows, value=3, study_uid="1.2.3.444")
    size = big.stat().st_size
    d = Daemon(work / "d", drive=False, tree=tree)
    try:
        ae = AE(ae_title="PING")  # the association machinery has run once
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
        assoc.send_c_echo()
        assoc.release()
        before = d.status_kb("VmHWM")
        seconds = storescu(d.port, big.parent)
        after = d.status_kb("VmHWM")
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"instance_mb": size / 1e6, "hwm_before_mb": before / 1024,
            "hwm_after_mb": after / 1024, "growth_mb": (after - before) / 1024,
            "seconds": seconds, "load_after": load_avg()}


def jpeg_corpus(files: Path, out: Path, n: int = 200) -> Path:
    """n instances of the corpus, JPEG lossless SV1 (dcmcjpeg +e1), cached."""
    if out.is_dir() and len(list(out.glob("*.dcm"))) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for i, f in enumerate(sorted(files.rglob("*.dcm"))[:n]):
        subprocess.run(["dcmcjpeg", "+e1", str(f), str(out / f"{i:04d}.dcm")], check=True,
                       capture_output=True)
    return out


def decode_check(files: Path, work: Path, repeat: int) -> dict:
    """JPEG instances received by a daemon that must decode them once (STD-GEN-CD) and by
    one whose profile carries them as they are (STD-GEN-DVD-JPEG)."""
    jpeg = jpeg_corpus(files, HERE / "corpus" / "jpeg200")
    n = len(list(jpeg.glob("*.dcm")))
    checked, carried = [], []
    for _ in range(repeat):
        # -xs: the files go as they are (JPEG lossless), not decoded by storescu
        checked.append(daemon_run(jpeg, work / "c", "STD-GEN-CD", ("-xs",)))
        carried.append(daemon_run(jpeg, work / "j", "STD-GEN-DVD-JPEG", ("-xs",)))
    c, j = statistics.median(checked), statistics.median(carried)
    return {"instances": n, "checked_s": checked, "carried_s": carried, "checked_median": c,
            "carried_median": j, "ms_per_instance": (c - j) / n * 1000,
            "load_after": load_avg()}


def echo_latency(files: Path, work: Path) -> dict:
    """Receive the corpus while ready studies are mastered and burned; C-ECHO every 0.2 s."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    shutil.rmtree(work, ignore_errors=True)
    d = Daemon(work, drive=True, quiet=2, profile="STD-GEN-DVD-JPEG")
    ae = AE(ae_title="PING")
    ae.add_requested_context(Verification)
    samples: list[tuple[float, str]] = []
    stop = threading.Event()
    db = work / "spool" / "jobs.sqlite"

    def state() -> str:
        import sqlite3

        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            rows = con.execute("SELECT state FROM jobs").fetchall()
            con.close()
            return ",".join(sorted({r[0] for r in rows}))
        except sqlite3.Error:
            return ""

    def ping():
        while not stop.is_set():
            t0 = time.perf_counter()
            assoc = ae.associate("127.0.0.1", d.port, ae_title="BURNER")
            ok = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
            samples.append((time.perf_counter() - t0 if ok else float("inf"), state()))
            time.sleep(0.2)

    t = threading.Thread(target=ping, daemon=True)
    t.start()
    try:
        send_s = storescu(d.port, files)
        store = d.store()
        end = time.monotonic() + 900
        while time.monotonic() < end:
            jobs = store.jobs()
            if jobs and all(j.state in ("done", "failed") for j in jobs) and \
                    time.monotonic() > 5:
                break
            time.sleep(0.5)
        stop.set()
        t.join(5)
        media = [m for j in store.jobs() for m in store.media(j.id) if m["state"] == "verified"]
        failed = [j.reason for j in store.jobs() if j.state == "failed"]
        store.close()
    finally:
        stop.set()
        d.stop()
    lat = [s for s, _ in samples]
    busy = [s for s, st in samples if any(x in st for x in ("mastering", "burning",
                                                             "verifying"))]
    burn = sum(m["burn_seconds"] for m in media)
    verify = sum(m["verify_seconds"] for m in media)
    shutil.rmtree(work, ignore_errors=True)
    return {"samples": len(lat), "max_s": max(lat), "p95_s": _pct(lat, 95),
            "median_s": statistics.median(lat), "busy_samples": len(busy),
            "busy_max_s": max(busy) if busy else None, "send_s": send_s,
            "discs": len(media), "failed_jobs": failed,
            "burn_s": burn, "readback_s": verify,
            "readback_ratio": verify / burn if burn else None,
            "bytes": sum(m["bytes"] for m in media), "load_after": load_avg()}


def _pct(values: list[float], p: int) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def rss_growth(small: Path, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    d = Daemon(work, drive=False)
    points = []
    try:
        points.append((0, d.rss_mb()))
        done = 0
        for chunk in sorted(p for p in small.iterdir() if p.is_dir()):
            storescu(d.port, chunk)
            done += len(list(chunk.glob("*.dcm")))
            points.append((done, d.rss_mb()))
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    at1k = next(r for n, r in points if n >= 1000)
    return {"points": points, "rss_at_1000": at1k, "rss_max": max(r for _, r in points),
            "growth_mb": points[-1][1] - at1k, "load_after": load_avg()}


def markdown(r: dict) -> str:
    rc, ec, rs = r["receive"], r["echo"], r["rss"]
    lines = [f"Run {r['when']}, load before {r['load_before']}, {r['cpus']} CPUs.", "",
             f"**Receive, {r['instances']} CT instances** (storescu +sd +r -R, TCP_NODELAY):",
             "", "| receiver | runs (s) | median s |", "|---|---|---:|",
             f"| DCMTK storescp (no fsync) | {', '.join(f'{x:.2f}' for x in rc['storescp_s'])} "
             f"| {rc['storescp_median']:.2f} |",
             f"| mastering daemon (fsync + SQLite commit per instance) | "
             f"{', '.join(f'{x:.2f}' for x in rc['daemon_s'])} | {rc['daemon_median']:.2f} |",
             f"| pynetdicom SCP that keeps nothing (the library's floor) | "
             f"{', '.join(f'{x:.2f}' for x in rc['null_s'])} | {rc['null_median']:.2f} |",
             "", f"Ratio daemon / storescp: **{rc['ratio']:.2f}** (target ≤ 1.5); "
             f"pynetdicom floor / storescp: {rc['null_ratio']:.2f}.", "",
             f"**C-ECHO** while receiving and burning: {ec['samples']} echoes, median "
             f"{ec['median_s'] * 1000:.0f} ms, p95 {ec['p95_s'] * 1000:.0f} ms, max "
             f"{ec['max_s'] * 1000:.0f} ms; {ec['busy_samples']} taken while a job was "
             f"mastering/burning/verifying (max {((ec['busy_max_s'] or 0) * 1000):.0f} ms). "
             "Target: every echo within 1 s.", "",
             f"**Read-back** ({ec['discs']} disc(s), {ec['bytes'] / 1e6:.0f} MB, stdio "
             f"pseudo-drive): burn {ec['burn_s']:.2f} s, read-back {ec['readback_s']:.2f} s, "
             f"ratio {ec['readback_ratio'] or 0:.2f}.", "",
             "**RSS** (small-image preset):", "", "| instances | RSS MB |", "|---:|---:|"]
    lines += [f"| {n} | {m:.0f} |" for n, m in rs["points"]]
    lines += ["", f"Growth from 1,000 to {rs['points'][-1][0]}: {rs['growth_mb']:+.1f} MB "
              f"(target: flat, ≤ 200 MB; max {rs['rss_max']:.0f} MB).", "",
              f"Load after: {rs['load_after']}."]
    return "\n".join(lines + extra_markdown(r))


def extra_markdown(r: dict) -> list[str]:
    lines = []
    rc = r.get("receive")
    if rc and "null_fast_s" in rc:
        lines += ["", f"pynetdicom SCP that keeps nothing, with the daemon's reader poll: "
                  f"{', '.join(f'{x:.2f}' for x in rc['null_fast_s'])} s, median "
                  f"{rc['null_fast_median']:.2f} s, ratio {rc['null_fast_ratio']:.2f}."]
        for tree, b in rc.get("baselines", {}).items():
            lines += ["", f"Daemon of {tree}: {', '.join(f'{x:.2f}' for x in b['runs'])} s, "
                      f"median {b['median']:.2f} s, ratio {b['ratio']:.2f}."]
    b = r.get("big")
    if b:
        lines += ["", f"**Memory per association**: one {b['instance_mb']:.0f} MB instance "
                  f"received in {b['seconds']:.1f} s; daemon VmHWM {b['hwm_before_mb']:.0f} -> "
                  f"{b['hwm_after_mb']:.0f} MB ({b['growth_mb']:+.1f} MB)."]
        for tree, x in b.get("baselines", {}).items():
            lines += ["", f"Daemon of {tree}: VmHWM {x['hwm_before_mb']:.0f} -> "
                      f"{x['hwm_after_mb']:.0f} MB ({x['growth_mb']:+.1f} MB)."]
    dc = r.get("decode")
    if dc:
        lines += ["", f"**Decode check** ({dc['instances']} JPEG lossless instances): "
                  f"STD-GEN-CD (decoded once at receive) "
                  f"{', '.join(f'{x:.2f}' for x in dc['checked_s'])} s, STD-GEN-DVD-JPEG "
                  f"(carried as is) {', '.join(f'{x:.2f}' for x in dc['carried_s'])} s: "
                  f"{dc['ms_per_instance']:.1f} ms per instance."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--small", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--corpus-dir", type=Path, default=HERE / "corpus")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-daemon")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--parts", default="receive,echo,rss,big,decode",
                    help="which of receive,echo,rss,big,decode")
    ap.add_argument("--big-mb", type=int, default=256, help="size of the large instance")
    ap.add_argument("--baseline", type=Path, action="append", default=[], metavar="TREE",
                    help="also receive with the daemon of this checkout (e.g. `git worktree "
                    "add /tmp/old main`), interleaved; repeatable")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    files = corpus(args.instances, args.corpus_dir)
    small = small_corpus(args.small, args.corpus_dir / f"small{args.small}") \
        if "rss" in parts else None
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": load_avg(),
              "cpus": os.cpu_count(), "instances": args.instances}
    if "receive" in parts:
        report["receive"] = receive(files, args.work, args.repeat, args.baseline)
    if "echo" in parts:
        report["echo"] = echo_latency(files, args.work / "echo")
    if "rss" in parts:
        report["rss"] = rss_growth(small, args.work / "rss")
    if "big" in parts:
        report["big"] = big_instance(args.work / "big", args.big_mb, args.baseline)
    if "decode" in parts:
        report["decode"] = decode_check(files, args.work / "decode", args.repeat)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"daemon-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    if {"receive", "echo", "rss"} <= parts:
        print(markdown(report))
    else:
        print(json.dumps(report, indent=2))
        print("\n".join(extra_markdown(report)))
    print(f"\n(JSON: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
