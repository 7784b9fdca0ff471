"""The command line: subcommands exist, `info` and every `bench` target run on CPU, the quick demo end to end."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PY, run_env


def hcml(*args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hcml.launch.cli", *args], capture_output=True, text=True, env=run_env(),
                          timeout=timeout, cwd=cwd)


def test_help_lists_the_subcommands():
    out = hcml("--help").stdout
    for cmd in ("synth", "demo", "train", "eval", "prepare", "info", "knn", "gradcam", "bench"):
        assert cmd in out


def test_info_json_and_text():
    r = hcml("info", "--arch", "r2d50", "--frames", "16", "--json")
    s = json.loads(r.stdout)
    assert s["stages"]["res5"] == [2048, 4, 7, 7] and s["params"]["total"] > 25e6
    t = hcml("info", "--arch", "tiny", "--frames", "8", "--classes", "12", "--no-motion").stdout
    assert "GMACs per clip" in t and "motion 0" in t


def test_bench_op_cpu_reports_all_implementations():
    r = hcml("bench", "op", "--shape", "2,8,12,12", "--iters", "2", "--device", "cpu", "--json")
    res = json.loads(r.stdout)
    assert {"hcml", "reference"} <= set(res["impls"])
    assert res["impls"]["hcml"]["forward"]["median_s"] > 0 and "speedup_fwd_bwd_vs_reference" in res


def test_bench_model_cpu_compare():
    r = hcml("bench", "model", "--arch", "tiny", "--frames", "8", "--size", "32", "--batch", "2", "--iters", "2",
             "--compare", "--device", "cpu", "--json")
    res = json.loads(r.stdout)
    assert len(res["runs"]) == 2 and res["runs"][0]["clips_per_s"] > 0 and res["speedup_vs_eager_fp32"] > 0


SMALL_DATA = ["model.arch=tiny", "data.frames=8", "data.crop=32", "data.short_side=[36,40]", "data.batch_size=2",
              "data.threads=1", "data.device=cpu"]


def test_bench_train_breakdown_cpu(tiny_dataset, tmp_path):
    trace = tmp_path / "trace.json"
    r = hcml("bench", "train", "--data", str(tiny_dataset), "--config", "demo", "--steps", "3", "--json",
             "--trace", str(trace), *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert set(res["stages_median_s"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert res["bottleneck"] in res["stages_median_s"] and 0 <= res["data_wait_fraction"] <= 1
    f = res["stages"]["forward"]
    assert f["min_s"] <= f["median_s"] <= f["max_s"] and f["iters"] >= 1
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("convolution" in e.get("name", "") for e in events)


def test_bench_pipeline_dali_vs_pyav_cpu(tiny_dataset):
    r = hcml("bench", "pipeline", "--data", str(tiny_dataset), "--config", "demo", "--batches", "3", "--threads",
             "1", "--device", "cpu", "--json", *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["dali"]["clips_per_s"] > 0 and res["pyav"]["clips_per_s"] > 0 and res["speedup_dali_vs_pyav"] > 0
    assert res["dali"]["batch"]["iters"] >= 1 and res["pyav"]["batch"]["min_s"] <= res["pyav"]["batch"]["max_s"]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    r = hcml("demo", "--out", str(tmp_path / "demo"), "--quick", timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    report = (tmp_path / "demo" / "report.txt").read_text()
    assert "HCML (motion)" in report and "baseline (no motion)" in report and "KNN" in report
    assert list((tmp_path / "demo" / "gradcam").glob("*.png"))
    for run in ("motion", "baseline"):
        d = tmp_path / "demo" / run
        assert (d / "curves.png").is_file() and (d / "metrics.jsonl").is_file() and list(d.glob("checkpoints/*.pt"))
