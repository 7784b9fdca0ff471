"""How many CPU cores this process may use.

Why not ``os.cpu_count()``: under Slurm (``--cpus-per-task``), Kubernetes (CPU limits) or ``taskset`` a process
may run on a few of the machine's cores; dividing the machine's count among the ranks oversubscribes those few,
and every rank's step slows down from thread contention. Lives in the package root (no torch import) so the CLI's
defaults and the trainer read the same number.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from hcml.errors import ConfigError

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cgroup_cpu_limit(path: Path | None = None) -> int | None:
    """Cores allowed by a cgroup v2 CPU quota (rounded up), or None without one or when unreadable."""
    try:
        quota, period = (path or CGROUP_CPU_MAX).read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores in this process's affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call (macOS)
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def threads_per_process(processes: int) -> int:
    """Intra-op threads for each of ``processes`` ranks on this host: HCML_THREADS when set, else a fair share."""
    env = os.environ.get("HCML_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"HCML_THREADS={env!r}: expected a whole number of threads >= 1")
        return int(env)
    return max(1, usable_cores() // max(1, processes))
