"""The command line: subcommands exist, `info` and every `bench` target run on CPU, the quick demo end to end."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, run_env
from tests.helpers import SMALL_DATA


def hcml(*args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hcml.launch.cli", *args], capture_output=True, text=True, env=run_env(),
                          timeout=timeout, cwd=cwd)


def test_help_lists_the_subcommands():
    out = hcml("--help").stdout
    for cmd in ("synth", "demo", "train", "eval", "predict", "export", "prepare", "info", "knn", "gradcam", "bench"):
        assert cmd in out


def test_info_json_and_text():
    r = hcml("info", "--arch", "r2d50", "--frames", "16", "--json")
    s = json.loads(r.stdout)
    assert s["stages"]["res5"] == [2048, 4, 7, 7]
    assert s["params"]["total"] > 25e6
    t = hcml("info", "--arch", "tiny", "--frames", "8", "--classes", "12", "--no-motion").stdout
    assert "GMACs per clip" in t
    assert "motion 0" in t


def test_bench_op_cpu_reports_all_implementations():
    r = hcml("bench", "op", "--shape", "2,8,12,12", "--iters", "2", "--device", "cpu", "--json")
    res = json.loads(r.stdout)
    assert {"hcml", "reference"} <= set(res["impls"])
    assert res["impls"]["hcml"]["forward"]["median_s"] > 0
    assert "speedup_fwd_bwd_vs_reference" in res


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
    assert all(v["clips_per_s"] > 0 for v in res["runs"])
    assert not res["runs"][3]["motion"]
    rate = {v["name"]: v["clips_per_s"] for v in res["runs"]}
    assert res["ratios"]["hcml_vs_backbone_only"] == pytest.approx(rate[names[2]] / rate[names[3]])
    top = res["profile"]["top"]
    assert res["profile"]["variant"] == names[2]
    assert top
    assert sum(k["share"] for k in top) <= 1.0 + 1e-9




def test_bench_train_steady_state_cpu(tiny_dataset):
    r = hcml("bench", "train", "--data", str(tiny_dataset), "--config", "demo", "--steps", "4", "--json", *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["mode"] == "overlapped steady state"
    assert "stages" not in res
    assert res["clips_per_s"] == pytest.approx(2 * 4 / res["wall_s"])
    assert 0 <= res["data_wait_fraction"] <= 1


def test_bench_train_breakdown_cpu(tiny_dataset, tmp_path):
    trace = tmp_path / "trace.json"
    r = hcml("bench", "train", "--data", str(tiny_dataset), "--config", "demo", "--steps", "3", "--json",
             "--breakdown", "--trace", str(trace), *SMALL_DATA)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert set(res["stages_median_s"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert res["bottleneck"] in res["stages_median_s"]
    assert 0 <= res["data_wait_fraction"] <= 1
    f = res["stages"]["forward"]
    assert f["min_s"] <= f["median_s"] <= f["max_s"]
    assert f["iters"] >= 1
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
    assert {"dali", "pyav", "file+decoder", "experimental", "loader x2"} <= set(loaders)
    for name in ("dali", "pyav", "loader x2", "experimental", "file+decoder"):
        r_ = loaders[name]
        assert r_["timed_batches"] == 15, name
        assert r_["clips"] == 30, name
        assert r_["batch"]["iters"] == 15, name
        assert r_["clips_per_s"] == pytest.approx(r_["clips"] / r_["seconds"])
    assert res["speedup_dali_vs_pyav"] == pytest.approx(loaders["dali"]["clips_per_s"] / loaders["pyav"]["clips_per_s"])


def test_bench_pipeline_refuses_too_few_batches_and_oversized_batches(tiny_dataset):
    r = hcml("bench", "pipeline", "--data", str(tiny_dataset), "--config", "demo", "--batches", "2", *SMALL_DATA)
    assert r.returncode == 2
    assert "at least 10" in r.stderr
    assert "Traceback" not in r.stderr
    r = hcml("bench", "pipeline", "--data", str(tiny_dataset), "--config", "demo", *SMALL_DATA, "data.batch_size=64")
    assert r.returncode == 2
    assert "data.batch_size=64" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_op_default_shape_fits_the_cpu():
    r = hcml("bench", "op", "--device", "cpu", "--iters", "1", "--json")
    res = json.loads(r.stdout)
    assert res["shape"] == [8, 64, 28, 28]
    assert "hcml" in res["impls"]


def test_bench_op_sweep_reads_the_shapes_off_the_models():
    """R2D-50 (T=16) and R(2+1)D-101 (T=32) at batch 8 run the cost volume on res2: (8·T, 256, 56, 56)."""
    from hcml.launch.bench.op import model_shapes

    shapes = {m["arch"]: m["shape"] for m in model_shapes()}
    assert shapes == {"r2d50": [128, 256, 56, 56], "r2plus1d101": [256, 256, 56, 56]}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The whole demo at a few steps: both SSL phases, the five arms (two from an SSL checkpoint via init_from),
    the report (text and JSON) on the held-out test split with every arm at the same step count, each SSL loss
    beside ln(candidates), the KNN of both SSL checkpoints beside the calibrated random init, a Grad-CAM++ strip."""
    r = hcml("demo", "--out", str(tmp_path / "demo"), "--quick", timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = tmp_path / "demo"
    report = (out / "report.txt").read_text()
    assert "held-out test split" in report
    assert "the paper's loss (all neg., tau 0.1)" in report
    rep = json.loads((out / "report.json").read_text())
    assert rep["split"] == "test"
    assert set(rep["models"]) == {"baseline", "motion_no_nce", "joint_only", "hcml", "hcml_paper_loss"}
    for m in rep["models"].values():
        assert 0 <= m["top1"] <= 100
        assert "pair_direction" in m
        assert m["split"] == "test"  # each training's final evaluation ran on the test split
    assert len({m["steps"] for m in rep["models"].values()}) == 1  # the same number of steps for every arm
    assert rep["ssl_steps"] > 0
    assert rep["models"]["hcml"]["steps"] > rep["ssl_steps"]
    assert rep["test_videos"] == 12 * 3
    # chance of the SSL losses: temporal negatives, T time steps per level → ln T; all negatives → ln(B·N·T)
    assert rep["nce"]["ssl"]["low"]["candidates"] == 16
    assert rep["nce"]["ssl_paper_loss"]["low"]["candidates"] == 8 * 8 * 16
    assert set(rep["knn"]["ssl"]) == {"ssl", "ssl_paper_loss"}
    assert set(rep["knn"]["random_init"]) == {"low", "mid", "high"}
    assert rep["knn"]["split"] == "test"
    assert r.stdout.count("[init] loaded") == 2  # both joint phases started from their SSL weights
    assert list((out / "gradcam").glob("*.png"))
    for run in ("ssl", "ssl_paper_loss", "baseline", "motion_no_nce", "joint_only", "hcml", "hcml_paper_loss"):
        d = out / run
        assert (d / "curves.png").is_file(), run
        assert list(d.glob("checkpoints/*.pt")), run
    assert not json.loads((out / "ssl" / "summary.json").read_text()).get("eval")  # SSL: no classifier to score
    assert "SMOKE TEST (--quick)" in report
    assert "helped" not in report  # no conclusion from a few steps
    assert rep["smoke_test"]
    assert rep["knn"]["random_init_calibrated"]
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and f"The result as a picture: {out / 'report.png'}" in report
    t = rep["timing"]  # where the time went, the parts adding up to the whole
    parts = t["dataset"] + t["trainings"] + t["knn"] + t["gradcam"] + t["report"]
    assert parts <= t["total"] + 0.5 and parts >= 0.9 * t["total"] - 2, t
    assert t["trainings"] == pytest.approx(t["launch"] + t["run_setups"] + t["training_steps"] + t["final_evals"])
    assert min(t["launch"], t["run_setups"], t["training_steps"], t["final_evals"]) > 0, t
    runs = ("ssl", "ssl_paper_loss", "baseline", "motion_no_nce", "joint_only", "hcml", "hcml_paper_loss")
    assert set(t["per_run"]) == set(runs), t  # each training's own time, adding up to the trainings' share
    assert sum(r["seconds"] for r in t["per_run"].values()) == pytest.approx(t["trainings"] - t["launch"])
    assert all(r["steps"] > 0 and r["ms_per_step"] > 0 for r in t["per_run"].values()), t
    assert "per training (" in report and "hcml_paper_loss " in report.split("per training (")[1]
    # a second demo into the same folder replaces its own runs (the run dirs refuse a fresh start otherwise), here
    # with the SSL study's arms: the paper's protocol, global BN in the paper-loss SSL phase, 10 % of the labels
    again = hcml("demo", "--out", str(out), "--quick", "--study", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    study = {"hcml_paper_protocol", "joint_only_long", "hcml_paper_loss_global_bn", "scarce_motion_no_nce",
             "scarce_joint_only", "scarce_hcml", "scarce_joint_only_long"}
    assert set(rep["models"]) == {"baseline", "motion_no_nce", "joint_only", "hcml", "hcml_paper_loss"} | study
    m = rep["models"]
    assert m["hcml_paper_protocol"]["steps"] == m["joint_only"]["steps"] + rep["ssl_steps"]  # SSL, then it all
    assert m["scarce_hcml"]["steps"] - m["scarce_hcml"]["ssl_steps"] == m["scarce_joint_only"]["steps"]
    assert m["scarce_joint_only"]["steps"] == m["scarce_motion_no_nce"]["steps"]
    sub = rep["label_subset"]  # 10 % of 6 per class rounds to 1 per class: 12 videos, the ones the arms trained on
    assert sub["fraction"] == 0.1 and len(sub["videos"]) == 12
    assert sorted(v.split("/")[1] for v in sub["videos"]) == sorted(rep["classes"])
    assert "labelled videos=12 of 72" in again.stdout
    assert set(rep["knn"]["ssl"]) == {"ssl", "ssl_paper_loss", "ssl_paper_loss_global_bn"}
    cfg = (out / "ssl_paper_loss_global_bn" / "config.yaml").read_text()
    assert "bn: global" in cfg and "nce_negatives: all" in cfg
    assert "hcml_paper_loss_global_bn-hcml_paper_loss" in rep["margins"]
    assert "The SSL study" in (out / "report.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_not_just_its_current_training(tmp_path):
    """Ctrl-C (SIGINT to the demo, the process the user started) checkpoints the training in progress and ends
    the demo with a message and a non-zero exit: it must not go on to the next arm."""
    import signal
    import time

    from tests.helpers import kill_all, wait_for_step

    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([PY, "-m", "hcml.launch.cli", "demo", "--quick", "--out", str(out)], env=run_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(out / "ssl", 1, proc, log, timeout=600)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        kill_all(out)  # whatever is left (torchrun's workers live in sessions of their own)
    text = log.read_text()
    assert proc.returncode != 0, text[-2000:]
    assert "ssl stopped by signal 2" in text, text[-2000:]
    assert "[plan] stopped by signal 2 in ssl: 6 run(s) not started" in text, text[-2000:]
    assert "[plan] 2/7" not in text  # no further training started
    time.sleep(0.5)
    assert not (out / "report.json").exists()


def test_demo_noise_rule_and_seed_aggregation():
    """The rule a single run's margins are judged by (> 2 sd of the same margin across seeds), and mean ± sd over
    seeds with paired margins, against hand-computed figures."""
    from hcml.launch.demo import aggregate, judge, margins

    assert judge(5.0, 2.0).startswith("helped")
    assert judge(3.9, 2.0).startswith("within the noise")
    assert judge(-4.1, 2.0).startswith("hurt")
    assert judge(9.0, None).startswith("not judged")

    def seed(s, top1s):
        models = {k: {"label": k, "top1": t, "pair_direction": 50.0 + t} for k, t in top1s.items()}
        return {"seed": s, "models": models, "margins": margins(models), "steps": 10, "ssl_steps": 5,
                "knn": {"k": 1, "ssl": {"ssl": {lv: 10.0 * s for lv in ("low", "mid", "high")}},
                        "random_init": {lv: 1.0 for lv in ("low", "mid", "high")}},
                "nce": {"ssl": {lv: {"final": float(s), "chance": 1.0} for lv in ("low", "mid", "high")}}}

    names = ("baseline", "motion_no_nce", "joint_only", "hcml", "hcml_paper_loss")
    runs = [seed(0, dict(zip(names, (10, 20, 30, 40, 15)))), seed(1, dict(zip(names, (12, 24, 30, 44, 15)))),
            seed(2, dict(zip(names, (14, 22, 30, 42, 15))))]
    agg = aggregate(runs)
    assert agg["models"]["hcml"]["top1"] == 42.0
    assert agg["models"]["hcml"]["top1_sd"] == pytest.approx(2.0)  # sample sd of 40, 44, 42
    assert agg["models"]["joint_only"]["top1_sd"] == 0.0
    # hcml − motion_no_nce per seed: 20, 20, 20 → sd 0; joint_only − motion_no_nce: 10, 6, 8 → mean 8, sd 2
    assert agg["margin_spread"]["hcml-motion_no_nce"]["top1_sd"] == 0.0
    assert agg["margin_spread"]["joint_only-motion_no_nce"]["top1"] == 8.0
    assert agg["margin_spread"]["joint_only-motion_no_nce"]["top1_sd"] == pytest.approx(2.0)
    assert agg["knn"]["ssl"]["ssl"]["low"] == 10.0
    assert agg["seeds"] == [0, 1, 2]


def test_demo_timing_per_training_and_over_seeds():
    """Each training's pace is its optimizer steps' seconds (set-up and final evaluation left out) per step; over
    seeds the seconds add up and the pace is the mean of the seeds that trained it (a reused one did not)."""
    from hcml.launch.demo import format_timing, run_timing, sum_timings

    r = run_timing({"seconds": 30.0, "eval_seconds": 4.0, "setup_seconds": 1.0, "step": 100})
    assert r == {"seconds": 30.0, "steps": 100, "ms_per_step": 250.0}
    base = {"trainings": 40.0, "launch": 5.0, "run_setups": 1.0, "training_steps": 30.0, "final_evals": 4.0,
            "knn": 2.0}
    s0 = {**base, "per_run": {"a": r, "b": run_timing({"seconds": 5.0, "step": 50})}, "reused": []}
    s1 = {**base, "per_run": {"a": run_timing({"seconds": 20.0, "step": 100})}, "reused": ["b"]}
    old = {**base, "per_run": {"a": 12.0}, "reused": []}  # a seed report written before the pace was recorded
    t = sum_timings([s0, s1, old])
    assert t["trainings"] == 120.0 and t["reused_runs"] == 1
    assert t["per_run"]["a"] == {"seconds": 50.0, "steps": 200, "ms_per_step": 225.0}
    assert t["per_run"]["b"] == {"seconds": 5.0, "steps": 50, "ms_per_step": 100.0}
    line = format_timing({**t, "dataset": 1.0, "gradcam": 0.0, "report": 0.0, "total": 130.0})
    assert "a 50 s (225 ms/step), b 5 s (100 ms/step)" in line and "1 trainings reused" in line


def test_label_subset_is_class_balanced_seeded_and_in_list_order():
    """data.label_fraction's subset against hand counts: round(fraction x n) per class (at least one), the same
    for the same seed, another for another seed, in the list's own order; 1.0 keeps everything."""
    from hcml.pipeline.prepared import Sample, label_subset

    samples = [Sample(f"v{i}.webm", i % 3, 32) for i in range(30)] + [Sample("rare.webm", 3, 32)]
    sub = label_subset(samples, 0.2, seed=0)
    counts = {c: sum(s.label == c for s in sub) for c in range(4)}
    assert counts == {0: 2, 1: 2, 2: 2, 3: 1}  # 20 % of 10 per class; the class of one video keeps it
    assert sub == [s for s in samples if s in sub]  # list order
    assert label_subset(samples, 0.2, seed=0) == sub
    assert label_subset(samples, 0.2, seed=1) != sub
    assert label_subset(samples, 1.0) == samples


def test_label_fraction_is_checked():
    from hcml.errors import ConfigError
    from hcml.launch.config import load_config, resolve_recipe

    for ov, says in ((["data.label_fraction=0"], "in (0, 1]"), (["data.label_fraction=1.5"], "in (0, 1]"),
                     (["data.label_fraction=0.1", "train.phase=ssl"], "uses no labels")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(resolve_recipe("demo"), ov)
    assert load_config(resolve_recipe("demo_scarce")).data.label_fraction == 0.1


def test_a_finished_seed_is_reused_only_for_the_same_trainings(tmp_path):
    """`demo --seeds N` keeps each finished seed's figures; a rerun reuses them only when every training of that
    seed resolves to the same config (another seed, the study on or off, or a recipe change retrains)."""
    from hcml.launch.demo import plan_fingerprint, seed_plan

    def fp(seed, study, out=tmp_path / "seed0"):
        return plan_fingerprint(seed_plan(out, tmp_path / "data", seed, False, study)[2])

    assert fp(0, True) == fp(0, True)
    assert fp(0, True) != fp(1, True)
    assert fp(0, False) != fp(0, True) and set(fp(0, True)) > set(fp(0, False))
    assert fp(0, False, tmp_path / "elsewhere") != fp(0, False)


def test_an_interrupted_study_keeps_the_trainings_it_finished(tmp_path):
    """Run-level reuse under --seeds: a training counts as done only with its summary, no stop signal, the same
    config fingerprint (model.init_from included), and its SSL phase done too; all others train again."""
    from hcml.launch.config import fingerprint, load_config
    from hcml.launch.demo import finished_runs, seed_plan
    from hcml.launch.plan import run_dir_of

    out = tmp_path / "seed0"
    entries = seed_plan(out, tmp_path / "data", 0, False, True)[2]
    for e in entries:
        d = Path(run_dir_of(e))
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "ckpt_00000150.pt").write_bytes(b"")
    for e in entries:
        sha = fingerprint(load_config(e.config, e.resolved_overrides()))
        (Path(run_dir_of(e)) / "summary.json").write_text(json.dumps({"stopped_by_signal": None,
                                                                       "config_sha256": sha}))
    names = {e.name for e in entries}
    assert finished_runs(entries) == names
    (out / "ssl" / "summary.json").unlink()  # the SSL phase did not finish: it and all it initialises train again
    again = names - finished_runs(entries)
    assert again == {"ssl", "hcml", "hcml_paper_protocol", "scarce_hcml"}
    (out / "joint_only" / "summary.json").write_text(json.dumps({"stopped_by_signal": None, "config_sha256": "x"}))
    (out / "baseline" / "summary.json").write_text(json.dumps({"stopped_by_signal": 15, "config_sha256": fingerprint(
        load_config(entries[3].config, entries[3].overrides))}))
    assert {"joint_only", "baseline"} <= names - finished_runs(entries)


def test_demo_recipes_split_the_same_step_total():
    """HCML's two phases together train exactly as many epochs as the controls, on the same data settings."""
    from hcml.launch.config import load_config, resolve_recipe

    demo, ssl, joint = (load_config(resolve_recipe(n)) for n in ("demo", "demo_ssl", "demo_joint"))
    assert ssl.optim.epochs + joint.optim.epochs == demo.optim.epochs
    # the study's equal-compute control of the paper's protocol (SSL, then demo.yaml's whole budget)
    from hcml.launch.demo import STUDY_ARMS

    long = load_config(resolve_recipe("demo"), STUDY_ARMS["joint_only_long"].overrides)
    assert long.optim.epochs == ssl.optim.epochs + demo.optim.epochs
    # and of the label-scarce SSL arm: as many labelled steps as it has steps (48 videos: 3 steps per epoch)
    scarce = load_config(resolve_recipe("demo_scarce"))
    scarce_long = load_config(resolve_recipe("demo_scarce"), STUDY_ARMS["scarce_joint_only_long"].overrides)
    per_epoch = 48 // 16
    assert scarce_long.optim.epochs * per_epoch == ssl.optim.epochs * 30 + scarce.optim.epochs * per_epoch
    assert ssl.train.phase == "ssl"
    assert joint.train.phase == "joint" == demo.train.phase
    assert ssl.data == demo.data == joint.data
    assert ssl.model == demo.model == joint.model
