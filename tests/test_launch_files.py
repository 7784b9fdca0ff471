"""Launch assets parse and reference what exists: Slurm script, PyTorchJob manifest, Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import subprocess

import yaml

from tests.conftest import REPO

LAUNCH = REPO / "launch"


def exported_metric_names() -> set[str]:
    src = (LAUNCH / "metrics.py").read_text()
    return set(re.findall(r'"(hcml_[a-z_]+)"', src))


def test_slurm_script_is_valid_bash_and_requeues():
    script = LAUNCH / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "--signal=B:USR1" in text and "--resume auto" in text
    assert "--rdzv_backend=c10d" in text


def test_pytorchjob_manifest():
    job = yaml.safe_load((LAUNCH / "k8s" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    cmd = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[0] == "torchrun" and "--resume" in cmd
    cfg = cmd[cmd.index("--config") + 1]
    assert (REPO / cfg).is_file()


def test_grafana_dashboard_uses_only_exported_metrics():
    dash = json.loads((LAUNCH / "grafana" / "hcml_dashboard.json").read_text())
    names = exported_metric_names()
    used = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            used |= {m.removesuffix("_bucket") for m in re.findall(r"hcml_[a-z_]+", t["expr"])}
    assert used and used <= names, used - names


def test_device_check_is_valid_bash_and_stages_payload_parts(tmp_path):
    script = LAUNCH / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # `stage` only copies one carried payload part to /tmp/parts (the first two device calls)
    part = tmp_path / "p1"
    part.mkdir()
    (part / "dali.tar.xz.part00").write_bytes(b"x")
    env = {**os.environ, "HCML_PARTS": str(tmp_path / "parts")}
    r = subprocess.run(["bash", str(script), "stage", str(part)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and (tmp_path / "parts" / "dali.tar.xz.part00").is_file()
