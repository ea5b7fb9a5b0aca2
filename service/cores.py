"""How many cores the service may use: the fewest of what the machine, the process's CPU
affinity and its cgroup's CPU quota allow.

``os.cpu_count()`` alone is the node's count in a container: a pod limited to 2 cores on a
64-core node would run 64 threads, throttled by the quota. The quota is read from the
cgroup the container sees as its root (its own under a cgroup namespace, the default with
cgroup v2); a quota on a parent cgroup is not seen.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Whole cores this process may use, at least 1: a fractional quota rounds down, since
    threads beyond it are throttled."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):  # Linux
        counts.append(len(os.sched_getaffinity(0)))
    if (quota := cgroup_cpu_quota(cgroup_root)) is not None:
        counts.append(int(quota))
    return max(1, min(counts))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores: cgroup v2's ``cpu.max``, else v1's ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``; None where there is none ("max", -1) or it cannot be read."""
    if (cpu_max := _read(cgroup_root / "cpu.max")) is not None:
        fields = cpu_max.split()
    else:
        v1 = cgroup_root / "cpu"
        fields = [_read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")]
    if len(fields) != 2 or not all(f and f.isdigit() for f in fields) or int(fields[1]) == 0:
        return None
    quota, period = map(int, fields)
    return quota / period


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
