"""The cores a process may use: affinity masks (taskset, Slurm cpusets) and cgroup quotas (k8s CPU limits)."""

import os
import subprocess
import sys

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
                                         ("400000 100000", 4), ("garbage", None), ("", None)])
def test_cgroup_quota_rounds_up_to_whole_cores(tmp_path, text, cores):
    f = tmp_path / "cpu.max"
    f.write_text(text)
    assert host.cgroup_cpu_limit(f) == cores


def test_a_missing_cgroup_file_means_no_limit(tmp_path):
    assert host.cgroup_cpu_limit(tmp_path / "absent") is None


@needs_affinity
def test_the_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    f = tmp_path / "cpu.max"
    f.write_text("100000 100000")
    monkeypatch.setattr(host, "CGROUP_CPU_MAX", f)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.delenv("HCML_THREADS", raising=False)
    assert host.usable_cores() == 1
    f.write_text("max 100000")
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
