"""Planning: order, File IDs, running numbers and volumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mastering import intake, plan, profiles
from mastering.plan import PlanError

from .conftest import make_ct

CD = profiles.load("STD-GEN-CD")
FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")


def _tree(tmp: Path, profile=CD):
    res = intake.scan([tmp], profile, workers=1)
    tree, roots = plan.build_tree(res.instances, profile)
    for e in [e for p in tree for s in p.studies for se in s.series for e in se.entries]:
        e.out_ts = e.instance.transfer_syntax
    return tree, roots


def test_order_and_file_ids(tmp_path: Path) -> None:
    for n in (3, 1, 2, 10):
        make_ct(tmp_path / "b", f"{n}.dcm", instance=n, series_uid="1.2.9.2", SeriesNumber=2)
        make_ct(tmp_path / "a", f"{n}.dcm", instance=n, series_uid="1.2.9.1", SeriesNumber=1)
    make_ct(tmp_path / "c", "x.dcm", patient_id="A0", study_uid="1.2.8", series_uid="1.2.8.1")
    tree, roots = _tree(tmp_path)
    assert [p.id for p in tree] == ["A0", "PID1"]
    series = tree[1].studies[0].series
    assert [s.uid for s in series] == ["1.2.9.1", "1.2.9.2"]
    assert [e.instance.instance_number for e in series[0].entries] == ["1", "2", "3", "10"]
    vol = plan.Volume(1, 1, "X", "1.2", tree, roots)
    plan.assign_file_ids(vol, CD)
    ids = [e.file_id for e in vol.entries()]
    assert ids == sorted(ids)  # name order = DICOMDIR order = order on the disc
    for fid in ids:
        assert len(fid) <= CD.max_components and all(FILE_ID.match(c) for c in fid)
        assert not any("PID" in c or "DOE" in c for c in fid)  # no patient data in paths


def test_running_numbers_fill_gaps(tmp_path: Path) -> None:
    make_ct(tmp_path, "a.dcm", instance=4)
    make_ct(tmp_path, "b.dcm", instance=None)
    make_ct(tmp_path, "c.dcm", instance=None)
    make_ct(tmp_path, "d.dcm", series_uid="1.2.5", SeriesNumber=None)
    tree, _ = _tree(tmp_path)
    study = tree[0].studies[0]
    filled = [f for s in study.series for e in s.entries for f in e.instance.filled]
    assert sorted(v for k, v in filled if k == "InstanceNumber") == ["5", "6"]
    assert [v for k, v in filled if k == "SeriesNumber"] == ["2"]  # after the existing 1


def _costs(tmp: Path, series: int, per: int, rows: int = 64):
    for s in range(series):
        for i in range(per):
            make_ct(tmp / f"s{s}", f"{i}.dcm", rows=rows, instance=i + 1,
                    series_uid=f"1.2.7.{s}", SeriesNumber=s + 1)
    return _tree(tmp)


def test_series_kept_whole_where_it_fits(tmp_path: Path) -> None:
    tree, roots = _costs(tmp_path, 3, 5)
    per_series = sum(plan._entry_cost(e) for e in tree[0].studies[0].series[0].entries)
    prof = CD.with_capacity(plan.ISO_BASE_SECTORS * plan.SECTOR + int(per_series * 1.7)
                            + 12 * plan.SECTOR)
    packed = plan.split_volumes(tree, roots, prof)
    assert len(packed) == 3
    for patients, _ in packed:
        (series,) = [se for p in patients for st in p.studies for se in st.series]
        assert len(series.entries) == 5


def test_series_larger_than_a_volume_is_split(tmp_path: Path) -> None:
    tree, roots = _costs(tmp_path, 1, 12)
    one = plan._entry_cost(tree[0].studies[0].series[0].entries[0])
    base = (plan.ISO_BASE_SECTORS + 2) * plan.SECTOR
    path = 3 * plan._node_cost({}) + 2000  # patient, study, series records and folders
    prof = CD.with_capacity(base + path + 5 * one + one // 2)
    packed = plan.split_volumes(tree, roots, prof)
    counts = [len(se.entries) for patients, _ in packed for p in patients for st in p.studies
              for se in st.series]
    assert sum(counts) == 12 and len(packed) >= 3 and max(counts) <= 5
    uids = [e.instance.sop_instance_uid for patients, _ in packed for p in patients
            for st in p.studies for se in st.series for e in se.entries]
    assert len(set(uids)) == 12  # each instance exactly once


def test_file_larger_than_medium(tmp_path: Path) -> None:
    tree, roots = _costs(tmp_path, 1, 1, rows=256)
    with pytest.raises(PlanError, match="do not fit"):
        plan.split_volumes(tree, roots, CD.with_capacity(plan.ISO_BASE_SECTORS * plan.SECTOR
                                                         + 40 * plan.SECTOR))


def test_unlimited_capacity_is_one_volume(tmp_path: Path) -> None:
    tree, roots = _costs(tmp_path, 2, 3)
    assert len(plan.split_volumes(tree, roots, profiles.load("STD-GEN-USB-JPEG"))) == 1


def test_fileset_uid_reproducible_only_when_asked(tmp_path: Path) -> None:
    tree, roots = _costs(tmp_path, 1, 2)
    vol = plan.Volume(1, 1, "X", "", tree, roots)
    plan.assign_file_ids(vol, CD)
    a = plan.fileset_uid(vol.entries(), "X", 1, True)
    assert a == plan.fileset_uid(vol.entries(), "X", 1, True) and a.startswith("2.25.")
    assert plan.fileset_uid(vol.entries(), "X", 1, False) != plan.fileset_uid(
        vol.entries(), "X", 1, False)
    assert len(a) <= 64


def test_inconsistent_patient_is_reported(tmp_path: Path) -> None:
    make_ct(tmp_path, "a.dcm", patient_name="DOE^JANE")
    make_ct(tmp_path, "b.dcm", patient_name="DOE^JOAN", series_uid="1.2.6", instance=2)
    make_ct(tmp_path, "c.dcm", patient_name="DOE^JILL", instance=3)  # same series as a.dcm
    res = intake.scan([tmp_path], CD, workers=1)
    warnings: list[str] = list(res.warnings)
    tree, _ = plan.build_tree(res.instances, CD, warnings)
    assert len(tree) == 1 and len(warnings) == 2  # within the series, and across series
    assert all("Patient's Name differs" in w for w in warnings)
    assert not any("JOAN" in w or "JILL" in w for w in warnings)


def test_series_under_two_studies_is_a_conflict(tmp_path: Path) -> None:
    make_ct(tmp_path, "a.dcm", study_uid="1.2.1", series_uid="1.2.1.1")
    make_ct(tmp_path, "b.dcm", study_uid="1.2.2", series_uid="1.2.1.1", instance=2)
    make_ct(tmp_path, "c.dcm", patient_id="OTHER", study_uid="1.2.1", series_uid="1.2.1.7")
    res = intake.scan([tmp_path], CD, workers=1)
    conflicts: list[tuple[str, str]] = []
    warnings: list[str] = []
    tree, _ = plan.build_tree(res.instances, CD, warnings, conflicts)
    assert [Path(p).name for p, _ in conflicts] == ["b.dcm"]
    assert "1.2.1.1" in conflicts[0][1]
    assert any("Study Instance UID 1.2.1" in w for w in warnings)  # study under two patients
    uids = [se.uid for p in tree for st in p.studies for se in st.series]
    assert len(uids) == len(set(uids))


def test_overflowing_file_is_checked_on_the_next_volume(tmp_path: Path) -> None:
    """A small and a big file of one series: the big one moves to a new volume, where it must
    still be checked (it does not fit there either)."""
    make_ct(tmp_path, "small.dcm", rows=8, instance=1)
    make_ct(tmp_path, "big.dcm", rows=256, instance=2)
    tree, roots = _tree(tmp_path)
    small = plan._entry_cost(tree[0].studies[0].series[0].entries[0])
    base = (plan.ISO_BASE_SECTORS + 2) * plan.SECTOR + 3 * plan._node_cost({}) + 2000
    with pytest.raises(PlanError, match="do not fit"):
        plan.split_volumes(tree, roots, CD.with_capacity(base + small + 4 * plan.SECTOR))
