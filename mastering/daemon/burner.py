"""Burning with xorriso (libburn), and the "image folder" output for disc-publisher robots.

A :class:`DiscDrive` is a real drive (``/dev/sr0``) or an xorriso ``stdio:`` pseudo-drive.
Media state and free space come from the drive (native ``-toc`` and ``-tell_media_space``:
``-as cdrecord -toc`` calls a written stdio image blank, devices.md §1). A blank disc is
burned; a written rewritable one only when ``blank = "as_needed"`` (then ``-blank as_needed``
first); anything else is refused and the operator told to insert a blank disc. The image is
burned as is with ``-as cdrecord`` (closed, single session); any non-zero exit is a failed
burn, and the half-written disc is reported as spoiled by the caller.

An :class:`ImageFolder` writes the ISO image(s) and labels of a job into a robot's hot
folder (temporary name, fsync, rename), with a JSON manifest written last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Drive as DriveConfig
from .spool import fsync_dir

log = logging.getLogger("mastering.daemon.burner")

BLOCK = 2048
#: what `-as cdrecord` writes past an image: its default 300 KiB pad, and the rounding seen on
#: pseudo-drives (170-175 blocks in all); a disc must have room for the image and this
PAD_BYTES = 182 * BLOCK
PROGRESS = re.compile(r"(\d+)\s+of\s+(\d+)\s+MB written")


class BurnError(Exception):
    """A burn that did not happen or did not finish. transient: worth another medium or a
    later try; written: bytes reached the medium (it is spoiled)."""

    def __init__(self, message: str, *, transient: bool = True, written: bool = False):
        super().__init__(message)
        self.transient, self.written = transient, written


@dataclass
class MediaState:
    present: bool
    blank: bool = False
    closed: bool = False
    rewritable: bool = False
    free_bytes: int = 0
    kind: str = ""
    text: str = ""

    def describe(self) -> str:
        if not self.present:
            return "no disc"
        what = "blank" if self.blank else ("written, closed" if self.closed else "written")
        return f"{self.kind or 'disc'}, {what}, {self.free_bytes // 1_000_000} MB free"


def parse_toc(text: str) -> MediaState:
    current = re.search(r"^Media current:\s*(.+)$", text, re.M)
    status = re.search(r"^Media status :\s*(.+)$", text, re.M)
    space = re.search(r"^Media space  :\s*(\d+)s", text, re.M)
    if current is None or status is None or "is not present" in current.group(1):
        return MediaState(False, text=text)
    kind = current.group(1).strip()
    st = status.group(1)
    rewritable = any(k in kind for k in ("overwriteable", "RW", "RAM", "BD-RE"))
    return MediaState(True, blank="is blank" in st, closed="is closed" in st,
                      rewritable=rewritable,
                      free_bytes=int(space.group(1)) * BLOCK if space else 0, kind=kind,
                      text=text)


class DiscDrive:
    """One burner; burns one image at a time."""

    kind = "disc"

    def __init__(self, cfg: DriveConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.device = cfg.device
        self._proc: subprocess.Popen | None = None
        self.progress = ""

    @property
    def read_path(self) -> Path:
        """Where the written medium is read back: the device or the pseudo-drive's file."""
        return Path(self.device.removeprefix("stdio:"))

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.cfg.xorriso, *args], capture_output=True, text=True,
                              timeout=timeout, errors="replace")

    def media_state(self) -> MediaState:
        try:
            res = self._run("-outdev", self.device, "-toc", "-tell_media_space", timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BurnError(f"drive {self.name}: xorriso cannot be run: {exc}") from exc
        text = res.stdout + res.stderr
        if "busy" in text.lower() and "Media status" not in text:
            raise BurnError(f"drive {self.name} is busy")
        return parse_toc(text)

    def usable(self, state: MediaState, size: int) -> str:
        """'' if this medium can take an image of size bytes, else what the operator must do.
        A written rewritable disc that may be blanked is judged after blanking (the space a
        drive reports for it now leaves out what blanking frees): see :meth:`burn`."""
        if not state.present:
            return "insert a blank disc"
        if not state.blank and not (state.rewritable and self.cfg.blank == "as_needed"):
            return (f"the disc is not blank ({state.describe()}) and blanking is "
                    f"{'off' if self.cfg.blank == 'never' else 'not possible'}: insert a "
                    "blank disc")
        if state.blank:
            return self._room(state, size)
        return ""

    @staticmethod
    def _room(state: MediaState, size: int) -> str:
        need = size + PAD_BYTES if size else 0
        if need and state.free_bytes and state.free_bytes < need:
            return (f"the disc holds {state.free_bytes} bytes, the image needs {need} (with "
                    "the burn's padding): insert a larger blank disc")
        return ""

    def burn(self, image: Path, state: MediaState, cancel: threading.Event,
             progress: Callable[[str], None] | None = None) -> float:
        """Burn image onto the medium; returns the seconds it took."""
        if not state.blank:
            res = self._run("-outdev", self.device, "-blank", "as_needed", timeout=3600)
            if res.returncode != 0:
                raise BurnError(f"drive {self.name}: blanking failed (xorriso exit "
                                f"{res.returncode})", written=True)
            why = self._room(self.media_state(), image.stat().st_size)
            if why:  # blanked (as allowed), nothing written: the operator brings another
                raise BurnError(f"drive {self.name}: after blanking, {why}")
        args = [self.cfg.xorriso, "-as", "cdrecord", "-v", f"dev={self.device}"]
        if self.cfg.speed:
            args.append(f"speed={self.cfg.speed}")
        args.append(str(image))
        t0 = time.monotonic()
        tail = self._watch(args, cancel, progress)
        seconds = time.monotonic() - t0
        if cancel.is_set():
            raise BurnError(f"drive {self.name}: burn cancelled", transient=False, written=True)
        rc = self._proc.returncode if self._proc else -1
        if rc != 0:
            raise BurnError(f"drive {self.name}: burn failed (xorriso exit {rc}): {tail}",
                            written=True)
        return seconds

    def _watch(self, args: list[str], cancel: threading.Event,
               progress: Callable[[str], None] | None) -> str:
        """Run the burn, passing on its progress lines; stop it when cancel is set."""
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, errors="replace")
        stopper = threading.Thread(target=self._stop_on, args=(cancel, self._proc), daemon=True)
        stopper.start()
        last = []
        for line in self._proc.stdout:
            line = line.strip()
            if "FAILURE" in line or "SORRY" in line:
                last.append(line)
            m = PROGRESS.search(line)
            if m and progress:
                progress(f"{m.group(1)} of {m.group(2)} MB written")
        self._proc.wait()
        return "; ".join(last[-2:])

    @staticmethod
    def _stop_on(cancel: threading.Event, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            if cancel.wait(0.5):
                proc.terminate()
                return

    def eject(self) -> None:
        if self.cfg.eject and not self.device.startswith("stdio:"):
            try:
                self._run("-outdev", self.device, "-eject", "all", timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("drive %s: eject failed: %s", self.name, exc)


class ImageFolder:
    """The hot folder of a disc-publisher robot: images, labels and a manifest per job."""

    kind = "image_folder"

    def __init__(self, cfg: DriveConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.folder = Path(cfg.folder)
        self.progress = ""

    def publish(self, job_id: int, images: list[dict], copies: int, extra: dict) -> list[Path]:
        """Copy each image (and its labels) in, then the manifest; returns the image paths."""
        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        files: list[dict] = []
        for img in images:
            dst = self.folder / f"JOB{job_id:06d}-{img['index']}.iso"
            _copy_durable(Path(img["path"]), dst)
            out.append(dst)
            labels = []
            for label in img.get("labels", []):
                src = Path(label)
                suffix = src.name[src.name.find(".label"):]  # .label.svg, .label.png
                ldst = self.folder / f"JOB{job_id:06d}-{img['index']}{suffix}"
                _copy_durable(src, ldst)
                labels.append(ldst.name)
            files.append({"image": dst.name, "bytes": img["bytes"], "sha256": img["sha256"],
                          "fileset_id": img["fileset_id"], "labels": labels})
        manifest = {"job": job_id, "copies": copies, "volumes": files, **extra}
        tmp = self.folder / f".JOB{job_id:06d}.json.partial"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / f"JOB{job_id:06d}.json")
        fsync_dir(self.folder)
        return out


def _copy_durable(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.partial")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)


def make_drive(cfg: DriveConfig) -> DiscDrive | ImageFolder:
    return ImageFolder(cfg) if cfg.kind == "image_folder" else DiscDrive(cfg)
