"""CPUs available to the server (affinity, cgroup v1 and v2 quotas) and the worker and
thread counts chosen from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import config
from app.config import Settings
from app.cpus import available_cpus, cgroup_quota

AFFINITY = len(os.sched_getaffinity(0))


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "50000 100000"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            2.0,
        ),
        ({}, None),
    ],
)
def test_cgroup_quotas_v1_and_v2(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    assert cgroup_quota(tmp_path) == quota


def test_a_quota_caps_the_cpus_and_rounds_up(tmp_path: Path) -> None:
    assert available_cpus(write(tmp_path, "cpu.max", "50000 100000")) == 1
    assert available_cpus(write(tmp_path, "cpu.max", "150000 100000")) == min(AFFINITY, 2)
    assert available_cpus(write(tmp_path, "cpu.max", "6400000 100000")) == AFFINITY
    assert available_cpus(write(tmp_path, "cpu.max", "max 100000")) == AFFINITY


def test_workers_and_threads_default_to_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "available_cpus", lambda: 4)
    auto = Settings()
    assert auto.workers == "auto" and auto.worker_count == 4 and auto.threads_per_worker == 1
    one = Settings(workers=1)
    assert one.worker_count == 1 and one.threads_per_worker == 3  # the loop keeps a core
    explicit = Settings(workers=3, torch_threads=2)
    assert explicit.worker_count == 3 and explicit.threads_per_worker == 2
    monkeypatch.setattr(config, "available_cpus", lambda: 1)
    assert Settings().worker_count == 1 and Settings().threads_per_worker == 1


def test_workers_is_a_number_or_auto() -> None:
    assert Settings.of_server(["--workers", "auto"]).workers == "auto"
    assert Settings.of_server(["--workers", "3"]).worker_count == 3
    with pytest.raises(ValueError, match="workers"):
        Settings.of_server(["--workers", "many"])
