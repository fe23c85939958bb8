#!/usr/bin/env python
"""Time ``mastering`` against the reference tools, and check the targets of issue 10.

On one corpus, in the same run and with a warm page cache, this times:

* ``mastering``: ``mastering iso CORPUS -o OUT.iso --profile P --no-span``, durable (the
  default) and with ``--no-sync``, for each profile (STD-GEN-DVD-JPEG, plus STD-GEN-CD when
  the corpus fits a CD), and with ``--viewer`` (``--no-sync``);
* ``floor``: ``xorriso -as mkisofs -quiet -o OUT.iso CORPUS`` (packing the same bytes), alone
  and followed by ``sync``;
* ``reference``: ``dcmmkdir +r +id DIR +D DIR/DICOMDIR -P..`` then ``xorriso`` on a copy of the
  corpus already renamed to conformant File IDs and converted to Explicit VR LE (the copy is
  preparation and is not timed);
* the USB path: ``mastering fileset CORPUS -o DIR`` (durable and ``--no-sync``) against
  ``cp -r CORPUS DIR`` (alone and followed by ``sync``) onto the same file system, and
  ``mastering usb`` once it exists (issue 9: see usb_steps);
* start-up: ``mastering --help`` and ``mastering profiles``.

Each measured command runs ``--repeat`` times (default 3, interleaved); the table gives the
median wall time, the median user+sys CPU time of the child (``os.wait4``: the child and every
descendant it waited for) and the largest peak RSS (``ru_maxrss``); a second table the ratios
against the targets. ``--scaling 1000,2000,...`` instead times mastering (and the floor) on
generated corpora of those sizes (``50000x64``: 50,000 images of 64x64).

Usage (from the repository root; a fresh clone needs only ``scripts/bootstrap --test``)::

    .venv/bin/python bench/run.py --preset large --viewer      # generates the corpus if needed
    .venv/bin/python bench/run.py --corpus bench/corpus/large
    .venv/bin/python bench/run.py --scaling 1000,2000,5000,10000,50000x64
    .venv/bin/python bench/run.py --all                        # both, one report
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import make_corpus
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DVD, CD = "STD-GEN-DVD-JPEG", "STD-GEN-CD"
#: mastering profile -> the matching dcmmkdir profile switch
DCMMKDIR_PROFILE = {CD: "-Pgp", DVD: "-Pdv", "STD-GEN-DVD-J2K": "-Pd2",
                    "STD-GEN-BD-JPEG": "-Pbd", "STD-GEN-BD-J2K": "-Pb2", "STD-GEN-BD": "-Pbd",
                    "STD-GEN-USB-JPEG": "-Pfl", "STD-GEN-USB-J2K": "-Pf2"}
CAPACITY_HEADROOM = 1.10  # pass --capacity when corpus bytes x this exceed the profile's media
#: issue 10, on 2 cores and the large preset
TARGET_FLOOR_RATIO = 1.0  # mastering iso / floor, --no-sync and durable alike
TARGET_VIEWER_RATIO = 2.0  # --no-sync --viewer / --no-sync
TARGET_START_S = 0.2  # mastering --help, mastering profiles
TARGET_USB_RATIO = 1.1  # mastering fileset / cp -r
TARGET_RSS_MB = 250  # 50,000 small instances
TARGET_RSS_LARGE_MB = 120  # 10,000 large instances
START_REPEAT = 10  # start-up commands are short: more runs for the median


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One execution of one child process."""

    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kb: int
    returncode: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


@dataclass
class Result:
    """All repeats of one measured step (or the sum of a sequence of steps)."""

    name: str
    command: str
    status: str = "ok"  # "ok", "error: ...", "not available"
    samples: list[Sample] = field(default_factory=list)
    parts: list[Result] = field(default_factory=list)
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    @property
    def peak_rss_mb(self) -> float:
        return max(s.maxrss_kb for s in self.samples) / 1024

    def summary(self) -> dict:
        out: dict = {"name": self.name, "command": self.command, "status": self.status,
                     "output_bytes": self.output_bytes,
                     "samples": [asdict(s) for s in self.samples]}
        if self.ok:
            out |= {"wall_s": self.median("wall_s"), "cpu_s": self.median("cpu_s"),
                    "user_s": self.median("user_s"), "sys_s": self.median("sys_s"),
                    "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.parts:
            out["parts"] = [p.summary() for p in self.parts]
        return out


# Peak RSS cannot come from os.wait4 on a child we spawn directly: at exec() Linux folds the
# pre-exec memory's high-water mark into the child's ru_maxrss, and subprocess spawns with
# vfork, so every child would report at least this (numpy + pydicom) process's own peak.
# A small wrapper forks the real command and reports its ru_maxrss instead: GNU time (floor
# ~1 MB) if present, else a minimal Python launcher (floor ~5 MB).
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@functools.cache
def gnu_time() -> str | None:
    """Path of a GNU time that supports -f/-o, or None."""
    exe = shutil.which("time")
    if not exe:
        return None
    probe = Path(f"/tmp/bench-time-probe-{os.getpid()}")
    try:
        subprocess.run([exe, "-f", "%M", "-o", str(probe), "true"], capture_output=True,
                       timeout=30, check=True)
        int(probe.read_text().split()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
    finally:
        probe.unlink(missing_ok=True)
    return exe


def rss_wrapped(cmd: list[str], rssfile: Path) -> list[str]:
    exe = gnu_time()
    if exe:
        return [exe, "-f", "%M", "-o", str(rssfile), *cmd]
    return [sys.executable, "-S", "-I", "-c", LAUNCHER, str(rssfile), *cmd]


def read_rss_kb(rssfile: Path) -> int:
    try:
        return int(rssfile.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def run_child(cmd: list[str], logfile: Path) -> Sample:
    """Run cmd to completion: wall time from spawn to reap, CPU from os.wait4 (the command and
    its waited-for descendants, plus the wrapper's ~1 ms), peak RSS from the wrapper."""
    if not shutil.which(cmd[0]):
        raise FileNotFoundError(2, "not found", cmd[0])
    rssfile = logfile.with_suffix(".rss")
    rssfile.unlink(missing_ok=True)
    with open(logfile, "ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(rss_wrapped(cmd, rssfile), stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=fh)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Sample(wall, ru.ru_utime, ru.ru_stime, read_rss_kb(rssfile), proc.returncode)


def tail(logfile: Path, lines: int = 3) -> str:
    try:
        text = logfile.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    text = [t for t in text if t.strip() and not t.startswith("$ ")]
    return " | ".join(text[-lines:])[:300]


def measure(result: Result, cmd: list[str], logfile: Path) -> Sample | None:
    """Run cmd once, adding the sample to result or turning result into an error row."""
    if result.status != "ok":
        return None
    try:
        sample = run_child(cmd, logfile)
    except OSError as exc:
        result.status = f"error: {cmd[0]}: {exc.strerror or exc}"
        return None
    if sample.returncode != 0:
        result.status = f"error: exit {sample.returncode}: {tail(logfile)}"
        return None
    result.samples.append(sample)
    return sample


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------- corpus


@dataclass
class CorpusInfo:
    path: str
    files: int
    bytes: int
    implicit_files: int | None


def corpus_files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*") if p.is_file())


def corpus_info(corpus: Path) -> CorpusInfo:
    files = corpus_files(corpus)
    manifest = make_corpus.read_manifest(corpus) or {}
    return CorpusInfo(str(corpus), len(files), sum(f.stat().st_size for f in files),
                      manifest.get("implicit_files"))


def warm_cache(corpus: Path) -> float:
    """Read every corpus file once so all measured runs see a warm page cache."""
    start = time.perf_counter()
    for path in corpus_files(corpus):
        with open(path, "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass
    return time.perf_counter() - start


def is_implicit(path: Path) -> bool:
    try:
        return read_file_meta_info(path).get("TransferSyntaxUID") == ImplicitVRLittleEndian
    except Exception:  # a non-DICOM file is simply linked or copied
        return False


DIR_PREFIXES = ("P", "S", "SE")


def conformant_dir(depth: int, index: int) -> str:
    prefix = DIR_PREFIXES[depth] if depth < len(DIR_PREFIXES) else "D"
    return f"{prefix}{index:0{5 - len(prefix)}d}"  # P0001, S0001, SE001, D0001


def place_file(src: Path, dst: Path) -> bool:
    """Hard-link (or copy) src to dst; Implicit VR files go through dcmconv +te (returns True)."""
    if is_implicit(src):
        subprocess.run(["dcmconv", "+te", str(src), str(dst)], check=True)
        return True
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return False


def prepare_conformant(corpus: Path, dest: Path) -> int:
    """Copy corpus to dest/DICOM/P0001/S0001/SE001/I00001...; return the files converted."""
    root = dest / "DICOM"
    mapping: dict[Path, Path] = {corpus: root}
    converted = 0
    for src_dir, subdirs, files in os.walk(corpus):
        here = Path(src_dir)
        depth = len(here.relative_to(corpus).parts)
        subdirs.sort()
        for n, sub in enumerate(subdirs, 1):
            mapping[here / sub] = mapping[here] / conformant_dir(depth, n)
        target = mapping[here]
        target.mkdir(parents=True, exist_ok=True)
        for n, name in enumerate(sorted(files), 1):
            converted += place_file(here / name, target / f"I{n:05d}")
    return converted


# --------------------------------------------------------------------------- commands


def mastering_exe(arg: str | None) -> str:
    if arg:
        return arg
    venv = REPO / ".venv" / "bin" / "mastering"
    return str(venv) if venv.exists() else (shutil.which("mastering") or str(venv))


def profile_capacity(profile: str) -> int:
    try:
        data = tomllib.loads((REPO / "profiles" / f"{profile}.toml").read_text())
        return int(data["media"]["capacity_bytes"])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return 0


def mastering_cmd(exe: str, corpus: Path, iso: Path, profile: str, corpus_bytes: int,
                  extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [exe, "iso", str(corpus), "-o", str(iso), "--profile", profile, "--no-span"]
    capacity = profile_capacity(profile)
    if capacity and corpus_bytes * CAPACITY_HEADROOM > capacity:
        cmd += ["--capacity", str(int(corpus_bytes * 2))]
    return cmd + list(extra)


def floor_cmd(src: Path, iso: Path) -> list[str]:
    return ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), str(src)]


def dcmmkdir_cmd(fileset: Path, switch: str) -> list[str]:
    return ["dcmmkdir", "+r", "+id", str(fileset), "+D", str(fileset / "DICOMDIR"), switch]


def viewer_supported(exe: str) -> bool | None:
    """Whether ``mastering iso --help`` lists --viewer (None: the CLI does not run)."""
    try:
        out = subprocess.run([exe, "iso", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return "--viewer" in out.stdout + out.stderr


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip(" $") if text and out.returncode == 0 else "unavailable"


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    """One measured row: a sequence of commands timed together (parts reported separately)."""

    result: Result
    commands: list[tuple[str, list[str]]]
    outputs: list[Path]  # removed before each repeat (and after, unless --keep)
    check: str | None = None  # log text that means failure even with exit status 0
    repeat: int | None = None  # runs of this step (default: the run's --repeat)

    def run_once(self, logfile: Path, keep: bool) -> None:
        clean(self.outputs)
        os.sync()  # no run pays for the write-back of what ran before it
        if not self.result.parts:
            self.result.parts = [Result(name, " ".join(cmd)) for name, cmd in self.commands]
        samples: list[Sample] = []
        for part, (_, cmd) in zip(self.result.parts, self.commands, strict=True):
            sample = measure(part, cmd, logfile)
            if sample is None:
                self.result.status = part.status
                break
            samples.append(sample)
        if self.result.status == "ok" and self.check and self.check in logfile.read_text(
                errors="replace"):
            self.result.status = f"error: {tail(logfile)}"
        if self.result.status == "ok":
            self.result.samples.append(combine(samples))
            self.result.output_bytes = output_size(self.outputs[-1]) if self.outputs else 0
        if not keep:
            clean(self.outputs)


def output_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return file_size(path)


def combine(samples: list[Sample]) -> Sample:
    """A sequence of children: wall and CPU add up, peak RSS is the largest."""
    return Sample(sum(s.wall_s for s in samples), sum(s.user_s for s in samples),
                  sum(s.sys_s for s in samples), max(s.maxrss_kb for s in samples), 0)


def clean(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        # what a mastering run keeps beside its output (the record of what it published)
        p.with_name(f".{p.name}.mastering.json").unlink(missing_ok=True)


def single(name: str, cmd: list[str], out: Path | None) -> Step:
    return Step(Result(name, " ".join(cmd)), [(name, cmd)], [out] if out else [])


def then_sync(name: str, cmd: list[str], out: Path) -> Step:
    """cmd made durable: cmd, then sync (as mastering fsyncs its output by default)."""
    res = Result(f"{name} + sync", f"{' '.join(cmd)} && sync")
    return Step(res, [(name, cmd), ("sync", ["sync"])], [out])


def reference_step(fileset: Path, switch: str, iso: Path) -> Step:
    mk, xo = dcmmkdir_cmd(fileset, switch), floor_cmd(fileset, iso)
    res = Result(f"reference {switch}", f"{' '.join(mk)} && {' '.join(xo)}")
    return Step(res, [(f"dcmmkdir {switch}", mk), ("xorriso", xo)],
                [fileset / "DICOMDIR", iso], check="cannot be added to DICOMDIR")


def run_steps(steps: list[Step], repeat: int, logdir: Path, keep: bool) -> None:
    """Every step once, then again, ... (interleaved), each as often as it asks."""
    logdir.mkdir(parents=True, exist_ok=True)
    rounds = max([repeat, *(s.repeat or 0 for s in steps)])
    for r in range(rounds):
        for i, step in enumerate(steps):
            times = step.repeat or repeat
            if step.result.status != "ok" or r >= times:
                continue
            log(f"[{r + 1}/{times}] {step.result.name}")
            logfile = logdir / f"{i:02d}-{slug(step.result.name)}.log"
            step.run_once(logfile, keep and r == times - 1)
            s = step.result
            log(f"    {s.status}" if s.status != "ok" else f"    {s.samples[-1].wall_s:.2f} s")
            LOAD.append(os.getloadavg()[0])


LOAD: list[float] = []  # 1-minute load average after each measured run


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


# --------------------------------------------------------------------------- corpus mode


def default_profiles(corpus_bytes: int) -> list[str]:
    cd = profile_capacity(CD)
    return [DVD, CD] if cd and corpus_bytes < cd else [DVD]


def corpus_steps(args: argparse.Namespace, info: CorpusInfo, work: Path) -> list[Step]:
    corpus, exe = Path(info.path), mastering_exe(args.mastering)
    profiles = args.profile or default_profiles(info.bytes)
    floor = floor_cmd(corpus, work / "floor-sync.iso")
    steps = [single("floor", floor_cmd(corpus, work / "floor.iso"), work / "floor.iso"),
             then_sync("floor", floor, work / "floor-sync.iso")]
    fileset = work / "conformant"
    for switch in dict.fromkeys(DCMMKDIR_PROFILE.get(p, "-Pgp") for p in profiles):
        steps.append(reference_step(fileset, switch, work / f"reference{switch}.iso"))
    for p in profiles:
        iso = work / f"mastering-{p}.iso"
        steps.append(single(f"mastering {p}", mastering_cmd(exe, corpus, iso, p, info.bytes), iso))
        fast = work / f"mastering-{p}-nosync.iso"
        steps.append(single(f"mastering {p} --no-sync", mastering_cmd(
            exe, corpus, fast, p, info.bytes, ("--no-sync",)), fast))
    if args.viewer:
        steps.append(viewer_step(exe, corpus, work, profiles[0], info.bytes))
    if not args.no_usb:
        steps += usb_steps(exe, corpus, work)
    steps += startup_steps(exe)
    return steps


def viewer_step(exe: str, corpus: Path, work: Path, profile: str, nbytes: int) -> Step:
    """--viewer against the same run without it: both --no-sync (issue 10, target 2)."""
    iso = work / f"mastering-{profile}-viewer.iso"
    step = single(f"mastering {profile} --no-sync --viewer",
                  mastering_cmd(exe, corpus, iso, profile, nbytes, ("--no-sync", "--viewer")),
                  iso)
    step.outputs += [iso.with_name(iso.stem + ".label.svg"),
                     iso.with_name(iso.stem + ".label.png")]
    step.outputs.reverse()  # the image last: its size is the row's output
    supported = viewer_supported(exe)
    if supported is False:
        step.result.status = "not available"
    return step


USB_PROFILE = "STD-GEN-USB-JPEG"


def usb_steps(exe: str, corpus: Path, work: Path) -> list[Step]:
    """The USB path against cp -r of the raw corpus onto the same file system (the work
    folder): ``mastering fileset`` onto a new folder, durable (its default: every file and
    folder fsynced) against cp -r + sync, --no-sync against cp -r; and the in-place writer
    that ``mastering usb`` runs on a mounted stick (``fileset --replace`` into an existing
    folder: the same code, journal and proofs, fsync of every file, DICOMDIR last), timed
    against the same cp -r rows."""
    cp_dir, fs_dir, fast_dir = work / "cp", work / "fileset", work / "fileset-nosync"
    cp = ["cp", "-r", str(corpus), str(cp_dir)]
    fileset = [exe, "fileset", str(corpus), "-o", str(fs_dir), "--profile", USB_PROFILE]
    fast = [exe, "fileset", str(corpus), "-o", str(fast_dir), "--profile", USB_PROFILE,
            "--no-sync"]
    steps = [single("cp -r", cp, cp_dir),
             then_sync("cp -r", ["cp", "-r", str(corpus), str(work / "cp-sync")],
                       work / "cp-sync"),
             single("mastering fileset", fileset, fs_dir),
             single("mastering fileset --no-sync", fast, fast_dir)]
    for name, extra in (("mastering usb (in place)", ()),
                        ("mastering usb (in place) --no-sync", ("--no-sync",))):
        out = work / slug(name)
        cmd = [exe, "fileset", str(corpus), "-o", str(out), "--profile", USB_PROFILE,
               "--replace", "--quiet", *extra]
        steps.append(Step(Result(name, " ".join(cmd)),
                          [("mkdir", ["mkdir", str(out)]), (name, cmd)], [out]))
    return steps


def startup_steps(exe: str) -> list[Step]:
    """Start-up (issue 10, target 3): the wall time of two commands that do almost nothing."""
    return [Step(Result(name, " ".join(cmd)), [(name, cmd)], [], repeat=START_REPEAT)
            for name, cmd in (("mastering --help", [exe, "--help"]),
                              ("mastering profiles", [exe, "profiles"]),
                              ("python -c pass", [sys.executable, "-I", "-c", "pass"]))]


def corpus_path(args: argparse.Namespace) -> Path:
    """--corpus as given, or the --preset corpus under --corpus-dir, generated if needed."""
    if args.corpus:
        return args.corpus.resolve()
    n, matrix = make_corpus.PRESETS[args.preset]
    path = args.corpus_dir / args.preset
    if not make_corpus.corpus_matches(path, n, matrix=matrix):
        clean([path, make_corpus.manifest_path(path)])
        log(f"generating the {args.preset} preset ({n} instances of {matrix}x{matrix}) into "
            f"{path}")
        m = make_corpus.generate(n, path, jobs=args.jobs, preset=args.preset, matrix=matrix)
        log(f"    {m['bytes'] / 1e9:.2f} GB in {m['seconds']:.1f} s")
    return path.resolve()


def run_corpus_mode(args: argparse.Namespace, work: Path) -> dict:
    corpus = corpus_path(args)
    info = corpus_info(corpus)
    if info.files == 0:
        sys.exit(f"no files under {corpus}")
    repeat = args.repeat or 3
    log(f"corpus {corpus}: {info.files} files, {info.bytes / 1e9:.2f} GB; repeat {repeat}")
    steps = corpus_steps(args, info, work)
    log("preparing the conformant copy for dcmmkdir (not timed)")
    t0 = time.perf_counter()
    converted = prepare_conformant(corpus, work / "conformant")
    prep_s = time.perf_counter() - t0
    warm_s = warm_up(corpus, args)
    load_before = os.getloadavg()
    run_steps(steps, repeat, work / "logs", args.keep)
    results = [s.result for s in steps]
    return {"mode": "corpus", "corpus": asdict(info), "repeat": repeat,
            "prepare_s": round(prep_s, 2), "converted_for_dcmmkdir": converted,
            "warmup_read_s": round(warm_s, 2), "results": [r.summary() for r in results],
            "ratios": ratios(results), "targets": targets(results),
            "load": load_summary(load_before)}


def load_summary(before: tuple[float, float, float]) -> dict:
    """The machine's load (1-minute average) before and during the measured runs."""
    during = LOAD or [before[0]]
    return {"before": round(before[0], 2), "median": round(statistics.median(during), 2),
            "max": round(max(during), 2), "cpus": os.cpu_count()}


def warm_up(corpus: Path, args: argparse.Namespace) -> float:
    log("warm-up: reading the corpus once and starting each tool once (not timed)")
    seconds = warm_cache(corpus)
    for cmd in (["xorriso", "-version"], ["dcmmkdir", "--version"],
                [mastering_exe(args.mastering), "--help"]):
        tool_version(cmd)
    return seconds


def ratios(results: list[Result]) -> list[dict]:
    """Every mastering iso row against its floor and the dcmmkdir + xorriso reference."""
    by_name = {r.name: r for r in results}
    floor = by_name.get("floor")
    rows = []
    for r in results:
        if not r.name.startswith("mastering STD") or "--viewer" in r.name:
            continue
        profile = r.name.split()[1]
        synced = "--no-sync" not in r.name
        base = by_name.get("floor + sync") if synced else floor
        ref = by_name.get(f"reference {DCMMKDIR_PROFILE.get(profile, '-Pgp')}")
        rows.append({"profile": r.name.removeprefix("mastering "), "vs_floor": ratio(r, base),
                     "floor": base.name if base else None, "vs_reference": ratio(r, ref),
                     "reference": ref.name if ref else None})
    return rows


def targets(results: list[Result]) -> list[dict]:
    """Issue 10's targets, each with the measured figure and whether it is met."""
    by_name = {r.name: r for r in results}
    iso = next((r.name for r in results if r.name.startswith("mastering STD")
                and " --" not in r.name), None)
    rows: list[dict] = []

    def add(target: str, what: str, num: str | None, den: str | None, limit: float) -> None:
        a, b = by_name.get(num or ""), by_name.get(den or "") if den else None
        value = (ratio(a, b) if den else (round(a.median("wall_s"), 3) if a and a.ok else None)
                 ) if a else None
        status = a.status if a is not None and not a.ok else (
            b.status if b is not None and not b.ok else "")
        rows.append({"target": target, "what": what, "value": value, "limit": limit,
                     "unit": "×" if den else "s",
                     "met": None if value is None else value <= limit, "status": status})

    add("1", "`mastering iso --no-sync` / floor", f"{iso} --no-sync", "floor",
        TARGET_FLOOR_RATIO)
    add("1", "`mastering iso` (durable) / (floor + sync)", iso, "floor + sync",
        TARGET_FLOOR_RATIO)
    add("2", "`--no-sync --viewer` / `--no-sync`", f"{iso} --no-sync --viewer",
        f"{iso} --no-sync", TARGET_VIEWER_RATIO)
    add("3", "`mastering --help` wall", "mastering --help", None, TARGET_START_S)
    add("3", "`mastering profiles` wall", "mastering profiles", None, TARGET_START_S)
    add("5", "`mastering fileset --no-sync` / `cp -r`", "mastering fileset --no-sync", "cp -r",
        TARGET_USB_RATIO)
    add("5", "`mastering fileset` (durable) / (`cp -r` + sync)", "mastering fileset",
        "cp -r + sync", TARGET_USB_RATIO)
    add("5", "`mastering usb` in place, `--no-sync` / `cp -r`",
        "mastering usb (in place) --no-sync", "cp -r", TARGET_USB_RATIO)
    add("5", "`mastering usb` in place (durable) / (`cp -r` + sync)", "mastering usb (in place)",
        "cp -r + sync", TARGET_USB_RATIO)
    return rows


def ratio(a: Result | None, b: Result | None) -> float | None:
    if not (a and a.ok and b and b.ok):
        return None
    return round(a.median("wall_s") / b.median("wall_s"), 3)


# --------------------------------------------------------------------------- scaling mode


def parse_size(spec: str) -> tuple[int, int]:
    """'5000' -> (5000, 512); '50000x64' -> (50000, 64)."""
    n, _, matrix = spec.strip().partition("x")
    return int(n), int(matrix or make_corpus.ROWS)


def scaling_corpus(n: int, corpus_dir: Path, jobs: int, matrix: int = make_corpus.ROWS) -> Path:
    """A corpus of n instances: reuse any matching one under corpus_dir, else generate it."""
    for manifest in sorted(corpus_dir.glob("*.json")):
        candidate = manifest.with_suffix("")
        if make_corpus.corpus_matches(candidate, n, matrix=matrix):
            return candidate
    path = corpus_dir / (f"n{n}" if matrix == make_corpus.ROWS else f"n{n}x{matrix}")
    clean([path, make_corpus.manifest_path(path)])
    log(f"generating {n} instances of {matrix}x{matrix} into {path}")
    m = make_corpus.generate(n, path, jobs=jobs, matrix=matrix)
    log(f"    {m['bytes'] / 1e9:.2f} GB in {m['seconds']:.1f} s")
    return path


DEFAULT_SCALING = "1000,2000,5000,10000,5000x64,50000x64"


def run_scaling_mode(args: argparse.Namespace, work: Path) -> dict:
    sizes = [parse_size(s) for s in (args.scaling or DEFAULT_SCALING).split(",") if s.strip()]
    exe, profile, rows = mastering_exe(args.mastering), (args.profile or [DVD])[0], []
    load_before = os.getloadavg()
    for n, matrix in sizes:
        corpus = scaling_corpus(n, args.corpus_dir, args.jobs, matrix).resolve()
        info = corpus_info(corpus)
        warm_s = warm_up(corpus, args)
        iso = work / f"mastering-{n}x{matrix}.iso"
        steps = [single(f"mastering {profile}",
                        mastering_cmd(exe, corpus, iso, profile, info.bytes), iso),
                 single("floor", floor_cmd(corpus, work / f"floor-{n}.iso"),
                        work / f"floor-{n}.iso")]
        run_steps(steps, args.repeat or 1, work / "logs" / f"n{n}x{matrix}", args.keep)
        rows.append({"instances": n, "matrix": matrix, "corpus": asdict(info),
                     "warmup_read_s": round(warm_s, 2),
                     "results": [s.result.summary() for s in steps]})
    return {"mode": "scaling", "profile": profile, "repeat": args.repeat or 1, "rows": rows,
            "load": load_summary(load_before)}


# --------------------------------------------------------------------------- report


def environment(args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    exe = mastering_exe(args.mastering)
    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)),
            "mem_gb": round(int(mem) / 1024**2, 1), "kernel": platform.release(),
            "python": platform.python_version(),
            "xorriso": tool_version(["xorriso", "-version"]),
            "dcmmkdir": tool_version(["dcmmkdir", "--version"]),
            "mastering": f"{exe} ({tool_version([exe, '--version'])})"}


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def short(command: str, subs: dict[str, str]) -> str:
    for path, name in subs.items():
        command = command.replace(path, name)
    return command


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def result_row(s: dict, subs: dict[str, str], indent: str = "") -> str:
    name, cmd = f"{indent}{s['name']}", cell(short(s["command"], subs))
    if s["status"] != "ok":
        return f"| {name} | {cell(s['status'])} | | | | | `{cmd}` |"
    out = f"{s['output_bytes'] / 1e6:.0f}" if s["output_bytes"] else ""
    return (f"| {name} | ok | {s['wall_s']:.2f} | {s['cpu_s']:.2f} "
            f"({s['user_s']:.2f}+{s['sys_s']:.2f}) | {s['peak_rss_mb']:.0f} | {out} | `{cmd}` |")


def load_line(report: dict) -> str:
    load = report.get("load") or {}
    return (f"Machine load (1-minute average, {load.get('cpus')} CPUs): {load.get('before')} "
            f"before the runs, median {load.get('median')} and at most {load.get('max')} "
            "during them.")


def corpus_markdown(report: dict) -> list[str]:
    c = report["corpus"]
    subs = {report["work"]: "$WORK", c["path"]: "$CORPUS", str(REPO) + "/": ""}
    lines = [f"Corpus `{c['path']}`: {c['files']} files, {c['bytes'] / 1e9:.3f} GB "
             f"({c['implicit_files']} Implicit VR); repeats: {report['repeat']} (median, "
             f"interleaved; start-up commands {START_REPEAT}); warm-up read "
             f"{report['warmup_read_s']} s; conformant copy prepared in {report['prepare_s']} s "
             f"({report['converted_for_dcmmkdir']} dcmconv +te).  ",
             f"`$CORPUS` = `{c['path']}`, `$WORK` = `{report['work']}`.  ", load_line(report),
             "", "| Run | Status | Wall s | CPU s (user+sys) | Peak RSS MB | Output MB | Command |",
             "|---|---|---:|---:|---:|---:|---|"]
    for s in report["results"]:
        lines.append(result_row(s, subs))
        if len(s.get("parts", [])) > 1:
            lines += [result_row(p, subs, "↳ ") for p in s["parts"]]
    lines += ["", "| Target (issue 10) | Measured | Limit | Verdict |", "|---|---:|---:|---|"]
    for t in report.get("targets", []):
        verdict = ("met" if t["met"] else "**missed**") if t["met"] is not None else (
            t["status"] or "not measured")
        lines.append(f"| {t['target']}. {t['what']} | {fmt(t['value'], '.3f')} {t['unit']} | "
                     f"≤ {t['limit']} {t['unit']} | {cell(verdict)} |")
    lines += ["", "| Profile | mastering / floor | mastering / (dcmmkdir + xorriso) | Floor | "
              "Reference |", "|---|---:|---:|---|---|"]
    lines += [f"| {r['profile']} | {fmt(r['vs_floor'], '.3f')} | "
              f"{fmt(r['vs_reference'], '.3f')} | {r.get('floor')} | {r['reference']} |"
              for r in report["ratios"]]
    return lines


def scaling_markdown(report: dict) -> list[str]:
    lines = [f"Scaling, profile {report['profile']}, repeats: {report['repeat']} (median).  ",
             load_line(report), "",
             "| Instances | Matrix | GB | mastering wall s | CPU s | CPU ms / instance | "
             "Peak RSS MB | floor wall s | mastering / floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        m, f = row["results"]
        n, gb, mx = row["instances"], row["corpus"]["bytes"] / 1e9, row.get("matrix", 512)
        if m["status"] != "ok":
            lines.append(f"| {n} | {mx} | {gb:.2f} | {cell(m['status'])} | | | | "
                         f"{fmt(f.get('wall_s'))} | |")
            continue
        r = m["wall_s"] / f["wall_s"] if f["status"] == "ok" else None
        lines.append(f"| {n} | {mx} | {gb:.2f} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | "
                     f"{1000 * m['cpu_s'] / n:.2f} | {m['peak_rss_mb']:.0f} | "
                     f"{fmt(f.get('wall_s'))} | {fmt(r, '.3f')} |")
    return lines + ["", *scaling_verdict(report), ""]


def scaling_verdict(report: dict) -> list[str]:
    """Per matrix: CPU per instance largest/smallest size (1.0 = linear); the RSS targets."""
    out = []
    by_matrix: dict[int, list[tuple[int, dict]]] = {}
    for r in report["rows"]:
        if r["results"][0]["status"] == "ok":
            by_matrix.setdefault(r.get("matrix", 512), []).append((r["instances"],
                                                                  r["results"][0]))
    for matrix, ok in sorted(by_matrix.items(), reverse=True):
        per = [m["cpu_s"] / n for n, m in ok]
        rss = ", ".join(f"{m['peak_rss_mb']:.0f} MB at {n:,}" for n, m in ok)
        if len(ok) > 1:
            spread = per[-1] / per[0]
            out.append(f"{matrix}x{matrix}: CPU per instance at {ok[-1][0]:,} / at "
                       f"{ok[0][0]:,} = {spread:.2f} (1.0 = linear). Peak RSS: {rss}.")
        else:
            out.append(f"{matrix}x{matrix}: one size only. Peak RSS: {rss}.")
    for n, matrix, limit in ((50_000, 64, TARGET_RSS_MB), (10_000, 512, TARGET_RSS_LARGE_MB)):
        hit = next((m for k, m in by_matrix.get(matrix, []) if k == n), None)
        if hit is not None:
            verdict = "met" if hit["peak_rss_mb"] <= limit else "**missed**"
            out.append(f"Target 4: peak RSS at {n:,} instances of {matrix}x{matrix}: "
                       f"{hit['peak_rss_mb']:.0f} MB (≤ {limit} MB): {verdict}.")
    return out or ["No successful size."]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmark {report['timestamp']}", "",
             f"Host: {env['cpu']}, {env['cpus_usable']} CPUs usable, {env['mem_gb']} GB RAM, "
             f"Linux {env['kernel']}, Python {env['python']}.  ",
             f"Tools: {env['xorriso']}; {env['dcmmkdir']}; mastering: {env['mastering']}.", ""]
    for part in report.get("parts", [report]):
        body = corpus_markdown if part["mode"] == "corpus" else scaling_markdown
        lines += body(part) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--corpus", type=Path, help="corpus folder to benchmark")
    mode.add_argument("--preset", choices=sorted(make_corpus.PRESETS),
                      help="benchmark a preset corpus under --corpus-dir (generated if needed)")
    mode.add_argument("--scaling", help="comma-separated sizes, e.g. 1000,5000,50000x64 "
                      "(instances, or instances x matrix)")
    mode.add_argument("--all", action="store_true", help="--preset large --viewer, then "
                      f"--scaling {DEFAULT_SCALING}, in one report")
    ap.add_argument("--repeat", type=int, default=0,
                    help="runs per command (default: 3, interleaved; 1 for --scaling)")
    ap.add_argument("--profile", action="append",
                    help=f"mastering profile (repeatable; default {DVD}, plus {CD} if it fits)")
    ap.add_argument("--viewer", action="store_true",
                    help="also time `mastering iso --no-sync --viewer`")
    ap.add_argument("--no-usb", action="store_true", help="leave out the USB path rows")
    ap.add_argument("--mastering", help="mastering executable (default .venv/bin/mastering)")
    ap.add_argument("--work", type=Path, default=BENCH / "work", help="scratch folder")
    ap.add_argument("--keep", action="store_true", help="keep ISOs and the conformant copy")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--corpus-dir", type=Path, default=BENCH / "corpus",
                    help="where --preset and --scaling find or generate corpora")
    ap.add_argument("--jobs", type=int, default=0, help="corpus generation workers")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.work.resolve() / stamp
    work.mkdir(parents=True)
    try:
        report = {"timestamp": stamp, "environment": environment(args), "work": str(work)}
        if args.all:
            args.preset, args.viewer = "large", True
            (work / "corpus").mkdir()
            first = {"work": str(work / "corpus"), **run_corpus_mode(args, work / "corpus")}
            LOAD.clear()
            (work / "scaling").mkdir()
            second = {"work": str(work / "scaling"), **run_scaling_mode(args, work / "scaling")}
            report |= {"mode": "all", "parts": [first, second]}
        else:
            run = run_scaling_mode if args.scaling else run_corpus_mode
            report |= run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                args.work.resolve().rmdir()  # only if empty
    write_report(report, args, stamp)
    return 0


def write_report(report: dict, args: argparse.Namespace, stamp: str) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.results / f"{stamp}.md").write_text(text, encoding="utf-8")
    if args.json:
        (args.results / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    else:
        print(text, end="")
    log(f"results written to {args.results / (stamp + '.md')}")


if __name__ == "__main__":
    raise SystemExit(main())
