"""The cores a process may use: affinity masks (taskset, Slurm cpusets) and cgroup quotas (k8s CPU limits)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hcml import host
from hcml.errors import ConfigError

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity calls here")


@needs_affinity
def test_a_process_pinned_to_one_core_uses_one_thread_whatever_the_machine_has():
    core = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{core}}}); from hcml import host; "
            "print(host.usable_cores(), host.threads_per_process(1), host.threads_per_process(4), os.cpu_count())")
    env = {k: v for k, v in os.environ.items() if k != "HCML_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cores, one, four, machine = map(int, out.stdout.split())
    assert (cores, one, four) == (1, 1, 1)
    assert machine == os.cpu_count()  # what the old code divided, unchanged by the mask


@pytest.mark.parametrize("text, cores", [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000", 1),
                                         ("400000 100000", 4), ("garbage", None), ("", None), ("0 100000", None)])
def test_cgroup_quota_rounds_up_to_whole_cores(tmp_path, text, cores):
    f = tmp_path / "cpu.max"
    f.write_text(text)
    assert host.cpu_max_cores(f) == cores


def test_a_missing_cgroup_file_means_no_limit(tmp_path):
    assert host.cpu_max_cores(tmp_path / "absent") is None
    assert host.cfs_quota_cores(tmp_path) is None
    assert host.cgroup_cpu_limit(tmp_path, tmp_path / "no-proc-file") is None


def _tree(tmp_path, proc_lines: str, files: dict[str, str]):
    """A fake /sys/fs/cgroup (folders and control files) and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_lines)
    return root, proc


def test_v2_the_own_cgroups_quota_and_a_tighter_parents_bind(tmp_path):
    """A Slurm/systemd host without a cgroup namespace: the process's cgroup is a sub-folder, not the root."""
    own = "system.slice/job_7/step_0"
    root, proc = _tree(tmp_path, f"0::/{own}\n", {f"{own}/cpu.max": "400000 100000\n",
                                                  "system.slice/job_7/cpu.max": "max 100000\n",
                                                  "system.slice/cpu.max": "max 100000\n"})
    assert host.cgroup_cpu_limit(root, proc) == 4
    (root / "system.slice/job_7/cpu.max").write_text("250000 100000\n")  # the job's limit below the step's
    assert host.cgroup_cpu_limit(root, proc) == 3
    (root / f"{own}/cpu.max").write_text("max 100000\n")
    (root / "system.slice/job_7/cpu.max").write_text("max 100000\n")
    assert host.cgroup_cpu_limit(root, proc) is None


def test_v2_in_a_container_reads_its_namespace_root(tmp_path):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert host.cgroup_cpu_limit(root, proc) == 2


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_v1_cfs_quota_as_kubernetes_sets_it_on_older_nodes(tmp_path, mount):
    """cgroup v1 (RHEL 8, older k8s nodes; this development machine): a CPU limit is cpu.cfs_quota_us over
    cpu.cfs_period_us; -1 means none. In a container the host's path is not visible: the mount's root is its own."""
    lines = "12:pids:/kubepods/pod1/abc\n4:cpu,cpuacct:/kubepods/pod1/abc\n1:name=systemd:/kubepods/pod1/abc\n"
    root, proc = _tree(tmp_path, lines, {f"{mount}/cpu.cfs_quota_us": "150000\n",
                                         f"{mount}/cpu.cfs_period_us": "100000\n"})
    assert host.cgroup_cpu_limit(root, proc) == 2
    (root / mount / "cpu.cfs_quota_us").write_text("-1\n")
    assert host.cgroup_cpu_limit(root, proc) is None
    pod = root / mount / "kubepods/pod1/abc"  # on the host itself the path is visible, each level with its quota
    pod.mkdir(parents=True)
    (pod / "cpu.cfs_quota_us").write_text("100000\n")
    (pod / "cpu.cfs_period_us").write_text("100000\n")
    assert host.cgroup_cpu_limit(root, proc) == 1


@needs_affinity
def test_the_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    monkeypatch.setattr(host, "CGROUP_ROOT", root)
    monkeypatch.setattr(host, "PROC_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.delenv("HCML_THREADS", raising=False)
    assert host.usable_cores() == 1
    (root / "cpu.max").write_text("max 100000")
    assert host.usable_cores() == 8
    assert [host.threads_per_process(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_HCML_THREADS_is_named(monkeypatch, value):
    monkeypatch.setenv("HCML_THREADS", value)
    with pytest.raises(ConfigError, match=f"HCML_THREADS='{value}'"):
        host.threads_per_process(1)


def test_HCML_THREADS_wins(monkeypatch):
    monkeypatch.setenv("HCML_THREADS", "3")
    assert host.threads_per_process(64) == 3


def _real_cgroup_with_quota(name: str, cores: float) -> tuple[Path, str] | None:
    """A real cgroup of this machine with a CPU quota (v1 cfs or v2 cpu.max), or None where this process may not
    make one (not root, a read-only /sys/fs/cgroup, no cpu controller)."""
    period = 100000
    for mount, quota_file, text in (("cpu", "cpu.cfs_quota_us", str(int(cores * period))),
                                    ("cpu,cpuacct", "cpu.cfs_quota_us", str(int(cores * period))),
                                    ("", "cpu.max", f"{int(cores * period)} {period}")):
        base = host.CGROUP_ROOT / mount if mount else host.CGROUP_ROOT
        if not (base / "cgroup.procs").is_file() or (not mount and not (base / "cgroup.controllers").is_file()):
            continue
        d = base / name
        try:
            d.mkdir()
            (d / quota_file).write_text(text)
            return d, quota_file
        except OSError:
            if d.is_dir():
                d.rmdir()
    return None


def test_a_process_in_a_real_cgroup_with_a_quota_gets_that_many_cores(tmp_path):
    """The kernel's own files, not fakes: a process moved into a cgroup limited to 1.5 cores before it starts
    Python counts 2 cores and 1 thread for each of 2 ranks, whatever its affinity mask says."""
    made = _real_cgroup_with_quota(f"hcml-test-{os.getpid()}", 1.5)
    if made is None:
        pytest.skip("cannot make a cgroup with a CPU quota here (needs root and a writable cgroup cpu controller)")
    folder, _ = made
    try:
        code = "from hcml import host; print(host.cgroup_cpu_limit(), host.usable_cores(), host.threads_per_process(2))"
        env = {k: v for k, v in os.environ.items() if k != "HCML_THREADS"}
        out = subprocess.run(["sh", "-c", f'echo $$ > "{folder}/cgroup.procs" && exec "$0" -c "$1"', sys.executable,
                              code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        limit, cores, threads = out.stdout.split()
        assert limit == "2" and int(cores) == min(2, len(os.sched_getaffinity(0)))
        assert int(threads) == max(1, int(cores) // 2)
    finally:
        folder.rmdir()
