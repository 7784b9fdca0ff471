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


def test_bench_model_cpu_compare_and_profile():
    """The four variants of issue 12 in one run (the dynamo-only backend keeps this fast on CPU), their ratios and
    the top kernels of the compiled variant."""
    r = hcml("bench", "model", "--arch", "tiny", "--frames", "8", "--size", "32", "--batch", "2", "--iters", "2",
             "--compare", "--profile", "--backend", "eager", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    names = [v["name"] for v in res["runs"]]
    assert names == ["HCML eager fp32", "HCML eager bf16 channels_last", "HCML compiled bf16 channels_last",
                     "backbone only, compiled bf16 channels_last"]
    assert all(v["clips_per_s"] > 0 for v in res["runs"]) and not res["runs"][3]["motion"]
    rate = {v["name"]: v["clips_per_s"] for v in res["runs"]}
    assert res["ratios"]["hcml_vs_backbone_only"] == pytest.approx(rate[names[2]] / rate[names[3]])
    top = res["profile"]["top"]
    assert res["profile"]["variant"] == names[2] and top and sum(k["share"] for k in top) <= 1.0 + 1e-9


SMALL_DATA = ["model.arch=tiny", "data.frames=8", "data.crop=32", "data.short_side=[36,40]", "data.batch_size=2",
              "data.threads=1", "data.device=cpu"]


def test_bench_train_steady_state_cpu(tiny_dataset):
    r = hcml("bench", "train", "--data", str(tiny_dataset), "--config", "demo", "--steps", "4", "--json", *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["mode"] == "overlapped steady state" and "stages" not in res
    assert res["clips_per_s"] == pytest.approx(2 * 4 / res["wall_s"]) and 0 <= res["data_wait_fraction"] <= 1


def test_bench_train_breakdown_cpu(tiny_dataset, tmp_path):
    trace = tmp_path / "trace.json"
    r = hcml("bench", "train", "--data", str(tiny_dataset), "--config", "demo", "--steps", "3", "--json",
             "--breakdown", "--trace", str(trace), *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert set(res["stages_median_s"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert res["bottleneck"] in res["stages_median_s"] and 0 <= res["data_wait_fraction"] <= 1
    f = res["stages"]["forward"]
    assert f["min_s"] <= f["median_s"] <= f["max_s"] and f["iters"] >= 1
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("convolution" in e.get("name", "") for e in events)


def test_bench_pipeline_dali_vs_pyav_cpu(tiny_dataset):
    """24 videos, batch 2: 12 batches an epoch, so 15 timed batches (+ warm-up) cycle epochs; every rate is over
    exactly the timed batches, and each candidate that runs on CPU reports (or says why it cannot)."""
    r = hcml("bench", "pipeline", "--data", str(tiny_dataset), "--config", "demo", "--batches", "15", "--threads",
             "1", "--device", "cpu", "--compare", "--json", *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    loaders = res["loaders"]
    assert {"dali", "pyav", "file+decoder", "experimental x2"} <= set(loaders)
    for name in ("dali", "pyav", "experimental x2"):
        r_ = loaders[name]
        assert r_["timed_batches"] == 15 and r_["clips"] == 30 and r_["batch"]["iters"] == 15, name
        assert r_["clips_per_s"] == pytest.approx(r_["clips"] / r_["seconds"])
    assert res["speedup_dali_vs_pyav"] == pytest.approx(loaders["dali"]["clips_per_s"] / loaders["pyav"]["clips_per_s"])


def test_bench_pipeline_refuses_too_few_batches_and_oversized_batches(tiny_dataset):
    r = hcml("bench", "pipeline", "--data", str(tiny_dataset), "--config", "demo", "--batches", "2", *SMALL_DATA)
    assert r.returncode == 2 and "at least 10" in r.stderr and "Traceback" not in r.stderr
    r = hcml("bench", "pipeline", "--data", str(tiny_dataset), "--config", "demo", *SMALL_DATA, "data.batch_size=64")
    assert r.returncode == 2 and "data.batch_size=64" in r.stderr and "Traceback" not in r.stderr


def test_bench_op_default_shape_fits_the_cpu():
    r = hcml("bench", "op", "--device", "cpu", "--iters", "1", "--json")
    res = json.loads(r.stdout)
    assert res["shape"] == [8, 64, 28, 28] and "hcml" in res["impls"]


def test_bench_op_sweep_reads_the_shapes_off_the_models():
    """R2D-50 (T=16) and R(2+1)D-101 (T=32) at batch 8 run the cost volume on res2: (8·T, 256, 56, 56)."""
    from hcml.launch.bench.op import model_shapes

    shapes = {m["arch"]: m["shape"] for m in model_shapes()}
    assert shapes == {"r2d50": [128, 256, 56, 56], "r2plus1d101": [256, 256, 56, 56]}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The whole demo at a few steps: SSL, then joint from the SSL checkpoint (init_from), the two controls, the
    report (text and JSON) with every model at the same step count, the KNN pair and a Grad-CAM++ strip."""
    r = hcml("demo", "--out", str(tmp_path / "demo"), "--quick", timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = tmp_path / "demo"
    report = (out / "report.txt").read_text()
    assert "HCML: self-supervised, then joint" in report and "random init" in report and "KNN" in report
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["models"]) == {"baseline", "motion_no_nce", "hcml"}
    for m in rep["models"].values():
        assert 0 <= m["top1"] <= 100 and "pair_direction" in m
    assert len({m["steps"] for m in rep["models"].values()}) == 1  # the same number of steps for every model
    assert rep["ssl_steps"] > 0 and rep["models"]["hcml"]["steps"] > rep["ssl_steps"]
    for kind in ("ssl", "random_init"):
        assert set(rep["knn"][kind]) == {"low", "mid", "high"}
    assert "[init] loaded" in r.stdout  # the joint phase started from the SSL weights
    assert list((out / "gradcam").glob("*.png"))
    for run in ("ssl", "hcml", "motion_no_nce", "baseline"):
        d = out / run
        assert (d / "curves.png").is_file() and (d / "metrics.jsonl").is_file() and list(d.glob("checkpoints/*.pt"))
    assert not json.loads((out / "ssl" / "summary.json").read_text()).get("eval")  # SSL: no classifier to score
    assert "SMOKE TEST (--quick)" in report and "helped" not in report  # no conclusion from a few steps
    assert rep["smoke_test"] and rep["knn"]["random_init_calibrated"]
    # a second demo into the same folder replaces its own runs (the run dirs refuse a fresh start otherwise)
    again = hcml("demo", "--out", str(out), "--quick", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]


def test_demo_recipes_split_the_same_step_total():
    """HCML's two phases together train exactly as many epochs as the controls, on the same data settings."""
    from hcml.launch.config import load_config, resolve_recipe

    demo, ssl, joint = (load_config(resolve_recipe(n)) for n in ("demo", "demo_ssl", "demo_joint"))
    assert ssl.optim.epochs + joint.optim.epochs == demo.optim.epochs
    assert ssl.train.phase == "ssl" and joint.train.phase == "joint" == demo.train.phase
    assert ssl.data == demo.data == joint.data and ssl.model == demo.model == joint.model
