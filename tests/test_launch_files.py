"""Launch assets parse and reference what exists: Slurm script, PyTorchJob manifest, Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PY, REPO

LAUNCH = REPO / "launch"


def exported_metric_names() -> set[str]:
    """Every name the exporter serves (counters also as ``_total``), read off a live exporter's scrape."""
    import urllib.request

    from hcml.launch.metrics import PrometheusExporter
    from tests.test_metrics import free_port

    exp = PrometheusExporter(free_port(), 0)
    try:
        exp.observe_step(step=1, epoch=0, step_s=0.1, wait_s=0.01, clips=2, frames_per_clip=8, world=1, lr=0.1,
                         losses={"total": 1.0})
        with urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        exp.close()
    return {re.sub(r"_(bucket|sum|count|created)$", "", m) for m in re.findall(r"^(hcml_[a-z_]+)", text, re.M)}


def test_slurm_script_is_valid_bash_and_requeues():
    script = LAUNCH / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --requeue" in text
    assert "--signal=B:USR1" in text
    assert "--resume auto" in text
    assert "hcml train" in text
    assert "--rdzv-endpoint" in text
    assert "torchrun" not in text.split("set -euo")[1]
    assert "#SBATCH --output=hcml-" in text  # no folder that would have to exist before the job starts


def slurm_shims(d: Path) -> dict:
    """srun/scontrol/scancel stand-ins: srun runs the task here (container flags dropped) and records its pid,
    scancel --signal sends that signal to the task, scontrol answers hostnames and records a requeue."""
    d.mkdir()
    (d / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\necho $$ > "$SHIM/task.pid"\n'
                            'exec "$@"\n')
    (d / "scancel").write_text('#!/bin/bash\nsig=${2#--signal=}; [[ "$1" == --signal=* ]] && sig=${1#--signal=}\n'
                               'kill -s "$sig" "$(cat "$SHIM/task.pid")"\n')
    (d / "scontrol").write_text('#!/bin/bash\ncase "$1" in show) echo 127.0.0.1;; requeue) echo "requeue $2" '
                                '>> "$SHIM/requeued";; esac\n')
    for f in d.iterdir():
        f.chmod(0o755)
    return {**os.environ, "SHIM": str(d), "PATH": f"{d}:{Path(PY).parent}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "HCML_NPROC": "2",
            "MASTER_PORT": str(29500 + os.getpid() % 1000), "HCML_THREADS": "1"}


@pytest.mark.slow
def test_slurm_preemption_path_checkpoints_and_requeues(tiny_dataset, tmp_path):
    """The script as Slurm runs it (srun/scontrol/scancel replaced by shims): USR1 to the batch shell, as
    --signal=B:USR1 sends it, ends in a checkpoint, every process gone, exit 0 and a requeue; and the Prometheus
    targets file lists every local rank."""
    from tests.helpers import SMALL, wait_for_step

    env = slurm_shims(tmp_path / "shim")
    run = tmp_path / "run"
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "demo", f"data.root={tiny_dataset}",
                             f"run_dir={run}", *SMALL, "optim.epochs=50", "metrics.port=0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(run, 2, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "checkpoint written at step" in out
    assert (tmp_path / "shim/requeued").read_text() == "requeue 4242\n"
    assert json.loads((run / "summary.json").read_text())["stopped_by_signal"] == signal.SIGUSR1
    targets = json.loads((run / "prometheus_targets.json").read_text())
    assert targets[0]["targets"] == ["127.0.0.1:9400", "127.0.0.1:9401"]


def test_pytorchjob_manifest():
    docs = list(yaml.safe_load_all((LAUNCH / "k8s" / "pytorchjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    cmd = " ".join(pod["containers"][0]["command"])
    assert "exec hcml train" in cmd
    assert "--resume auto" in cmd
    assert "--nproc-per-node 8" in cmd
    cfg = cmd.split("--config ")[1].split()[0]
    assert (REPO / "configs" / f"{cfg}.yaml").is_file()
    # every local rank's exporter is declared and scraped
    ports = [p["containerPort"] for p in pod["containers"][0]["ports"]]
    assert ports == list(range(9400, 9408))
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert len(monitor["spec"]["podMetricsEndpoints"]) == 8
    assert next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["terminationGracePeriodSeconds"] >= 120


def test_grafana_dashboard_is_drawn_from_the_metric_registry_and_uses_only_exported_metrics():
    """One registry (launch/metrics.METRICS) makes the exporter and the dashboard: the committed JSON is what it
    draws (redraw: python -m hcml.launch.metrics --dashboard), and every panel queries a metric a scrape serves."""
    from hcml.launch.metrics import METRICS, dashboard

    dash = json.loads((LAUNCH / "grafana" / "hcml_dashboard.json").read_text())
    assert dash == dashboard()
    assert len(dash["panels"]) == sum(m.panel is not None for m in METRICS)
    names = exported_metric_names()
    used = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            used |= {m.removesuffix("_bucket") for m in re.findall(r"hcml_[a-z_]+", t["expr"])}
    assert used, used - names
    assert used <= names, used - names


def test_device_check_is_valid_bash_and_stages_payload_parts(tmp_path):
    script = LAUNCH / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # `stage` only copies one carried payload part to /tmp/parts (the first two device calls)
    part = tmp_path / "p1"
    part.mkdir()
    (part / "dali.tar.xz.part00").write_bytes(b"x")
    env = {**os.environ, "HCML_PARTS": str(tmp_path / "parts")}
    r = subprocess.run(["bash", str(script), "stage", str(part)], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    assert (tmp_path / "parts" / "dali.tar.xz.part00").is_file()
