"""service.cores.available_cores: the fewest of the machine's cores, the process's affinity
and its cgroup's CPU quota, read from cgroup files the test writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from convtune.service.cores import available_cores, cgroup_cpu_quota

NODE_CORES = 64


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-core node whose every core the process may run on."""
    monkeypatch.setattr(os, "cpu_count", lambda: NODE_CORES)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(NODE_CORES)))


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("200000 100000", 2), ("150000 100000", 1), ("50000 100000", 1), ("max 100000", NODE_CORES)],
)
def test_a_cgroup_v2_quota_limits_the_cores(node, tmp_path: Path, cpu_max: str, cores: int) -> None:
    assert available_cores(cgroup_v2(tmp_path, cpu_max)) == cores


@pytest.mark.parametrize(
    ("quota", "period", "cores"), [("400000", "100000", 4), ("-1", "100000", NODE_CORES)]
)
def test_a_cgroup_v1_quota_limits_the_cores(
    node, tmp_path: Path, quota: str, period: str, cores: int
) -> None:
    assert available_cores(cgroup_v1(tmp_path, quota, period)) == cores


def test_v2_is_read_where_both_are_mounted(tmp_path: Path) -> None:
    cgroup_v1(tmp_path, "400000", "100000")
    assert cgroup_cpu_quota(cgroup_v2(tmp_path, "300000 100000")) == 3.0


@pytest.mark.parametrize("cpu_max", ["", "garbage", "0 0", "100000"])
def test_an_unreadable_quota_is_no_quota(node, tmp_path: Path, cpu_max: str) -> None:
    assert cgroup_cpu_quota(cgroup_v2(tmp_path, cpu_max)) is None
    assert available_cores(tmp_path) == NODE_CORES


def test_without_cgroup_files_the_machine_counts(node, tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cores(tmp_path) == NODE_CORES


def test_the_affinity_limits_the_cores(node, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {4, 5, 6})
    assert available_cores(cgroup_v2(tmp_path, "max 100000")) == 3
    assert available_cores(cgroup_v2(tmp_path, "200000 100000")) == 2


def test_an_unknown_machine_count_is_one_core(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cores(tmp_path) == 1
