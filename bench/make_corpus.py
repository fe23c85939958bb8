#!/usr/bin/env python
"""Generate a deterministic synthetic CT corpus laid out like a PACS export.

The corpus is a tree ``<patient>/<study>/<series>/IMG00001.dcm`` of CT Image Storage Part 10
files (512x512 by default, ``--matrix`` for other sizes; 16 bits allocated, 12 stored). Names
are lower-case, long and carry extensions, so they are *not* conformant PS3.10 File IDs: the
mastering tool has to rename them. 10% of the
files are Implicit VR Little Endian, the rest Explicit VR Little Endian.

Speed: one pydicom header template per series; pixel data comes from a few precomputed
phantom slices with a per-instance stamp, and is appended to the pydicom-written header as
raw bytes (Pixel Data is the last element). Series are written in parallel (``--jobs``).

A manifest ``<out>.json`` is written *beside* the corpus (not inside, so the corpus holds only
DICOM files); ``bench/run.py`` uses it to reuse corpora.

Usage::

    .venv/bin/python bench/make_corpus.py --preset large --out bench/corpus/large
    .venv/bin/python bench/make_corpus.py --instances 2000 --out bench/corpus/n2000
    .venv/bin/python bench/make_corpus.py --preset many --out bench/corpus/many  # 50,000 x 64x64
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

#: preset -> (instances, matrix): "many" is the scale test, 50,000 small images that fit a disk
PRESETS: dict[str, tuple[int, int]] = {"small": (500, 512), "large": (5000, 512),
                                       "many": (50_000, 64)}
GENERATOR_VERSION = 1
DEFAULT_SEED = 20240601
ROWS = COLS = 512  # the default matrix
IMPLICIT_FRACTION = 0.10
N_VARIANTS = 16  # distinct phantom slices per series; each file also gets a unique stamp
SERIES_MIN, SERIES_MAX = 100, 300

FAMILY = ["SMITH", "MUELLER", "GARCIA", "ROSSI", "DUBOIS", "NOVAK", "SILVA", "JANSEN",
          "KOWALSKI", "NIELSEN", "OBRIEN", "TANAKA", "MARTIN", "FISCHER", "LOPEZ", "BERG"]
GIVEN = {"F": ["ANNA", "MARIA", "SOFIA", "EMMA", "CLARA", "IDA", "LENA", "NORA"],
         "M": ["JOHN", "LUCAS", "PAUL", "JAN", "MARCO", "PETER", "LEON", "OSCAR"]}
STUDIES = [("CT CHEST WITH CONTRAST", "CHEST"), ("CT ABDOMEN PELVIS", "ABDOMEN"),
           ("CT THORAX LOW DOSE", "CHEST"), ("CT CHEST ABDOMEN", "CHEST")]
RECONS = [("AXIAL 1.25MM", 1.25, "STANDARD"), ("AXIAL 0.625MM LUNG", 0.625, "LUNG"),
          ("AXIAL 2.5MM SOFT", 2.5, "SOFT"), ("AXIAL 1MM BONE", 1.0, "BONE")]


@dataclass(frozen=True)
class SeriesPlan:
    """Everything a worker needs to write one series."""

    seed: int
    rel_dir: str
    first_index: int  # global index of the first instance (for UIDs and the implicit choice)
    n_slices: int
    implicit: tuple[int, ...]  # local indices written Implicit VR LE
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    study_id: str
    accession: str
    study_description: str
    body_part: str
    frame_of_reference_uid: str
    series_uid: str
    series_number: int
    series_description: str
    kernel: str
    slice_thickness: float
    pixel_spacing: float
    kvp: int
    z_start: float
    matrix: int = ROWS  # rows = columns


def uid(seed: int, *parts: object) -> str:
    """Deterministic 2.25 UID derived from the seed and the parts."""
    return str(generate_uid(prefix=None, entropy_srcs=[str(seed), *map(str, parts)]))


def split_series(n: int, rng: random.Random) -> list[int]:
    """Series sizes of 100-300 slices summing to n (a single smaller series if n < 100)."""
    sizes: list[int] = []
    remaining = n
    while remaining > 0:
        if remaining <= SERIES_MAX:
            size = remaining
        else:
            size = rng.randint(SERIES_MIN, min(SERIES_MAX, remaining - SERIES_MIN))
        sizes.append(size)
        remaining -= size
    return sizes


def _patient(rng: random.Random, number: int) -> dict[str, str]:
    sex = rng.choice("FM")
    family, given = rng.choice(FAMILY), rng.choice(GIVEN[sex])
    year = rng.randint(1935, 2005)
    return {"patient_name": f"{family}^{given}", "patient_id": f"PID{rng.randint(0, 999999):06d}",
            "birth_date": f"{year}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}", "sex": sex,
            "dir": f"{number:03d}_{family.lower()}_{given.lower()}"}


def _study(rng: random.Random, seed: int, p: int, s: int) -> dict[str, str]:
    description, body_part = rng.choice(STUDIES)
    date = f"{rng.randint(2019, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    time_ = f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
    return {"study_uid": uid(seed, "study", p, s), "study_date": date, "study_time": time_,
            "study_id": str(rng.randint(1000, 99999)),
            "accession": f"ACC{rng.randint(0, 10**8 - 1):08d}",
            "study_description": description, "body_part": body_part,
            "frame_of_reference_uid": uid(seed, "for", p, s),
            "dir": f"study_{s + 1:02d}_{date}_{description.lower().replace(' ', '_')}"}


def plan_corpus(n: int, seed: int, matrix: int = ROWS) -> list[SeriesPlan]:
    """Lay n instances out in patients (1-2 studies) and studies (1-2 series)."""
    rng = random.Random(seed)
    sizes = split_series(n, rng)
    implicit = set(rng.sample(range(n), round(n * IMPLICIT_FRACTION)))
    plans: list[SeriesPlan] = []
    first = p = 0
    while len(plans) < len(sizes):
        patient = _patient(rng, p + 1)
        for s in range(rng.randint(1, 2)):
            study = _study(rng, seed, p, s)
            for k in range(rng.randint(1, 2)):
                if len(plans) == len(sizes):
                    break
                size = sizes[len(plans)]
                local = tuple(i for i in range(size) if first + i in implicit)
                plans.append(_series(rng, seed, patient, study, k + 1, first, size, local,
                                     matrix))
                first += size
        p += 1
    return plans


def _series(rng: random.Random, seed: int, patient: dict[str, str], study: dict[str, str],
            number: int, first: int, size: int, implicit: tuple[int, ...],
            matrix: int = ROWS) -> SeriesPlan:
    description, thickness, kernel = rng.choice(RECONS)
    rel_dir = "/".join([f"patient_{patient['dir']}", study["dir"],
                        f"series_{number:03d}_{description.lower().replace(' ', '_')}"])
    keep = {k: v for k, v in {**patient, **study}.items() if k != "dir"}
    return SeriesPlan(
        seed=seed, rel_dir=rel_dir, first_index=first, n_slices=size, implicit=implicit,
        series_uid=uid(seed, "series", first), series_number=number,
        series_description=description, kernel=kernel, slice_thickness=thickness,
        pixel_spacing=round(rng.uniform(0.6, 0.9), 4), kvp=rng.choice([100, 120, 140]),
        z_start=round(rng.uniform(-400.0, -100.0), 2), matrix=matrix, **keep)


@functools.cache
def phantom_variants(seed: int, matrix: int = ROWS) -> tuple[bytes, ...]:
    """N_VARIANTS phantom slices (stored values = HU + 1024, 12 bits) with fixed noise."""
    half = matrix // 2
    y, x = np.mgrid[-half:matrix - half, -half:matrix - half].astype(np.float32) * (512 / matrix)
    noise = np.random.default_rng(seed).normal(0.0, 12.0, (matrix, matrix)).astype(np.float32)
    out = []
    for v in range(N_VARIANTS):
        k = 0.55 + 0.45 * np.sin(np.pi * (v + 0.5) / N_VARIANTS)
        hu = np.full((matrix, matrix), -1000.0, dtype=np.float32)
        hu[(x / 210) ** 2 + (y / 160) ** 2 <= 1] = 40.0
        for cx in (-95, 95):
            hu[((x - cx) / (65 * k)) ** 2 + ((y + 10) / (90 * k)) ** 2 <= 1] = -820.0
        hu[(x / 22) ** 2 + ((y - 105) / 22) ** 2 <= 1] = 700.0
        hu[((x - 30) / 35) ** 2 + ((y + 20) / (30 * k)) ** 2 <= 1] = 60.0
        stored = np.clip(hu + noise + 1024.0, 0, 4095).astype("<u2")
        out.append(stored.tobytes())
    return tuple(out)


def series_template(plan: SeriesPlan) -> Dataset:
    """The CT Image Storage header shared by all instances of a series (no Pixel Data)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", plan.study_date)
        setattr(ds, f"{prefix}Time", plan.study_time)
    ds.AccessionNumber = plan.accession
    ds.Modality = "CT"
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "BENCH GENERAL HOSPITAL"
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.StationName = "CTBENCH01"
    ds.StudyDescription = plan.study_description
    ds.SeriesDescription = plan.series_description
    ds.ManufacturerModelName = "BENCHSCAN 64"
    ds.PatientName = plan.patient_name
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = plan.birth_date
    ds.PatientSex = plan.sex
    _add_acquisition(ds, plan)
    _add_image(ds, plan)
    return ds


def _add_acquisition(ds: Dataset, plan: SeriesPlan) -> None:
    ds.BodyPartExamined = plan.body_part
    ds.SliceThickness = f"{plan.slice_thickness:g}"
    ds.KVP = str(plan.kvp)
    ds.ReconstructionDiameter = f"{plan.pixel_spacing * plan.matrix:.2f}"
    ds.ConvolutionKernel = plan.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = plan.series_uid
    ds.StudyID = plan.study_id
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _add_image(ds: Dataset, plan: SeriesPlan) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = plan.matrix
    ds.PixelSpacing = [f"{plan.pixel_spacing:g}"] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"


def instance_header(ds: Dataset, plan: SeriesPlan, i: int, implicit: bool) -> bytes:
    """Part 10 preamble, meta and dataset up to (excluding) Pixel Data for instance i."""
    sop_uid = uid(plan.seed, "sop", plan.first_index + i)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = i + 1
    z = plan.z_start + i * plan.slice_thickness
    origin = -plan.pixel_spacing * (plan.matrix - 1) / 2
    ds.ImagePositionPatient = [f"{origin:.4f}", f"{origin:.4f}", f"{z:.3f}"]
    ds.SliceLocation = f"{z:.3f}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def pixel_element_header(nbytes: int, implicit: bool) -> bytes:
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    if implicit:
        return tag + struct.pack("<I", nbytes)
    return tag + b"OW\x00\x00" + struct.pack("<I", nbytes)


def pixel_bytes(plan: SeriesPlan, i: int) -> bytes:
    """A phantom slice chosen by z position, stamped with the instance number (unique bytes)."""
    variant = phantom_variants(plan.seed, plan.matrix)[(i * N_VARIANTS) // plan.n_slices]
    pixels = np.frombuffer(variant, dtype="<u2").reshape(plan.matrix, plan.matrix).copy()
    stamp = max(1, plan.matrix // 64)
    pixels[-stamp:, : 8 * stamp] = (plan.first_index + i) % 4096  # corner stamp in the air
    return pixels.tobytes()


def write_series(plan: SeriesPlan, out: Path) -> tuple[int, int]:
    """Write one series; return (files, bytes)."""
    folder = out / plan.rel_dir
    folder.mkdir(parents=True, exist_ok=True)
    ds = series_template(plan)
    implicit = set(plan.implicit)
    total = 0
    for i in range(plan.n_slices):
        imp = i in implicit
        data = pixel_bytes(plan, i)
        chunks = [instance_header(ds, plan, i, imp), pixel_element_header(len(data), imp), data]
        with open(folder / f"IMG{i + 1:05d}.dcm", "wb") as fh:
            fh.writelines(chunks)
        total += sum(len(c) for c in chunks)
    return plan.n_slices, total


def manifest_path(out: Path) -> Path:
    """The manifest lives beside the corpus folder: ``<out>.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads(manifest_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def corpus_matches(out: Path, instances: int, seed: int = DEFAULT_SEED,
                   matrix: int = ROWS) -> bool:
    """True if ``out`` holds a complete corpus generated with these parameters."""
    m = read_manifest(out)
    return bool(m and out.is_dir() and m.get("instances") == instances
                and m.get("seed") == seed and m.get("generator_version") == GENERATOR_VERSION
                and m.get("matrix", ROWS) == matrix)


def generate(instances: int, out: Path, seed: int = DEFAULT_SEED, jobs: int = 0,
             preset: str | None = None, matrix: int = ROWS) -> dict:
    """Generate the corpus into ``out`` (which must not exist or be empty); return the manifest."""
    start = time.perf_counter()
    plans = plan_corpus(instances, seed, matrix)
    out.mkdir(parents=True, exist_ok=True)
    files = nbytes = 0
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        for f, b in pool.map(write_series, plans, [out] * len(plans)):
            files, nbytes = files + f, nbytes + b
    manifest = {
        "generator_version": GENERATOR_VERSION, "preset": preset, "instances": instances,
        "matrix": matrix,
        "seed": seed, "files": files, "bytes": nbytes,
        "implicit_files": sum(len(p.implicit) for p in plans),
        "patients": len({p.patient_id for p in plans}),
        "studies": len({p.study_uid for p in plans}), "series": len(plans),
        "series_sizes": [p.n_slices for p in plans],
        "seconds": round(time.perf_counter() - start, 2),
    }
    manifest_path(out).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--preset", choices=sorted(PRESETS),
                      help="small=500, large=5000 instances of 512x512; many=50,000 of 64x64")
    size.add_argument("--instances", type=int, help="arbitrary number of instances")
    ap.add_argument("--out", type=Path, required=True, help="corpus folder to create")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--matrix", type=int, help="rows = columns of every image (default 512, "
                    "or the preset's)")
    ap.add_argument("--jobs", type=int, default=0, help="worker processes (default: all CPUs)")
    ap.add_argument("--force", action="store_true", help="replace an existing corpus folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    instances, matrix = PRESETS[args.preset] if args.preset else (args.instances, ROWS)
    matrix = args.matrix or matrix
    if instances < 1:
        sys.exit("--instances must be positive")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.force:
            sys.exit(f"{args.out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(args.out)
        manifest_path(args.out).unlink(missing_ok=True)
    if not 16 <= matrix <= 4096:
        sys.exit("--matrix must be 16..4096")
    m = generate(instances, args.out, args.seed, args.jobs, args.preset, matrix)
    print(f"{m['files']} files, {m['bytes'] / 1e9:.2f} GB, {m['implicit_files']} implicit VR, "
          f"{m['patients']} patients / {m['studies']} studies / {m['series']} series "
          f"in {m['seconds']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
