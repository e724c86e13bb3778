"""How many CPUs this process may use: its CPU affinity, capped by its cgroup's CPU quota.

``os.cpu_count()`` counts the machine's CPUs. A container limited with ``--cpus 2`` (a
CFS quota) or pinned with ``--cpuset-cpus`` sees all of them there, and a server that
starts a worker per CPU it counts would oversubscribe what it may run on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (affinity), capped by the CPU quota of its cgroup
    (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up; at
    least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not Linux)
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5: one and a half), or None
    when there is none (or no cgroup file can be read)."""
    for directory in _cgroup_dirs(cgroup_root):
        v2 = directory / "cpu.max"  # "max 100000" or "<quota> <period>"
        if v2.is_file():
            return _ratio(*_read(v2).split()[:2])
        v1 = directory / "cpu.cfs_quota_us"  # -1 for none
        if v1.is_file():
            return _ratio(_read(v1), _read(directory / "cpu.cfs_period_us"))
    return None


def _cgroup_dirs(root: Path) -> list[Path]:
    """Where this process's cgroup CPU files may be, most specific first: its own cgroup
    (from /proc/self/cgroup), then the root (inside a container, its own cgroup)."""
    dirs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu"):
            sub = path.lstrip("/")
            for base in (root, root / "cpu", root / "cpu,cpuacct"):
                if sub and (base / sub).is_dir():
                    dirs.append(base / sub)
    return [*dirs, root, root / "cpu", root / "cpu,cpuacct"]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = float(quota), float(period)
    except ValueError:  # "max", or unreadable
        return None
    return q / p if q > 0 and p > 0 else None
