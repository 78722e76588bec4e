"""CPU threads: how many cores this process may use, and torch's intra-op thread count.

Two jobs on one machine each running one intra-op thread per core oversubscribe it: the
OpenMP workers of one process busy-wait at their barriers while the other process holds the
cores, and a job that takes seconds alone can take minutes. Give each job its share of the
cores (``--threads``); the command line also shortens OpenMP's busy-wait (``GOMP_SPINCOUNT``,
see ``personalab.cli``).
"""

import math
import os
from pathlib import Path

import torch

from personalab.errors import InvalidInputError


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), or ``None`` for no quota."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100_000)
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: ``available_cores()``); returns the number set."""
    if threads is not None and threads < 1:
        raise InvalidInputError(f"`threads` is {threads}; give at least 1")
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n
