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

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")  # where distributions mount the v1 cpu controller


def _cores(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def cpu_max_cores(path: Path) -> int | None:
    """cgroup v2 ``cpu.max`` ("<quota> <period>" or "max <period>") as whole cores (rounded up); None: no limit,
    no file, or unreadable."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else _cores(int(quota), int(period))
    except (OSError, ValueError):
        return None


def cfs_quota_cores(folder: Path) -> int | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: no limit) as whole cores, or None."""
    try:
        return _cores(int((folder / "cpu.cfs_quota_us").read_text()), int((folder / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):
        return None


def _own_and_parents(mount: Path, rel: str) -> list[Path]:
    """The process's cgroup folder under ``mount`` and each parent up to the mount (a parent's quota binds as
    well). Inside a container the host's path is often not visible and the mount's root is the container's own
    cgroup: then only the folders that exist count, the root always among them."""
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    return [d for d in (mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)) if d.is_dir()]


def cgroup_cpu_limit(root: Path | None = None, proc: Path | None = None) -> int | None:
    """Cores allowed by the CPU quotas of this process's cgroups, v2 (``cpu.max``) or v1 (CFS quota, what a
    Kubernetes CPU limit or ``docker --cpus`` sets on older nodes): the tightest of its own and its parents'.
    None without a quota, or where /proc or the cgroup folders cannot be read (macOS)."""
    root, proc = root or CGROUP_ROOT, proc or PROC_CGROUP
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, rel = fields
        if hierarchy == "0" and not controllers:  # the v2 unified hierarchy
            limits += [cpu_max_cores(d / "cpu.max") for d in _own_and_parents(root, rel)]
        elif "cpu" in controllers.split(","):
            mount = next((root / m for m in V1_CPU_MOUNTS if (root / m).is_dir()), None)
            if mount is not None:
                limits += [cfs_quota_cores(d) for d in _own_and_parents(mount, rel)]
    limits = [n for n in limits if n]
    return min(limits) if limits else None


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
