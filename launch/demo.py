"""``hcml demo``: the paper's mechanism on a synthetic motion set, end to end on CPU in minutes.

The synthetic set's classes differ only by motion (appearance is random per clip). From the same data and the
same number of optimizer steps, five arms, trained (with the two SSL phases) in one 2-process torchrun plan (gloo on
CPU, NCCL on a GPU; ``hcml train --plan``):

- ``baseline``         the backbone without the motion module;
- ``motion_no_nce``    the motion module trained by classification only (lambda = 0);
- ``joint_only``       classification + the contrastive terms from scratch (no self-supervised phase);
- ``hcml``             a self-supervised phase (contrastive terms only), then the joint phase (Eq. 5) from it,
                       with the demo's contrastive loss (temporal negatives, tau 0.3: docs/DEMO.md says why);
- ``hcml_paper_loss``  the same two phases with the paper's own loss (all negatives, tau 0.1).

Every figure is measured on a held-out test split (its own random stream; no setting was chosen on it; the
validation split is for selection, docs/DEMO.md). The report: top-1, direction accuracy inside time-reversal
pairs (an order-blind model scores 50 %), each SSL phase's final contrastive loss against chance (ln of its
candidates), the per-level KNN of both SSL checkpoints beside the same network at random initialisation with
calibrated BN statistics (the paper's Table 7 form), and a Grad-CAM++ strip. ``--seeds N`` repeats every arm over
N seeds and reports mean ± sd, with the SSL study's arms (``STUDY_ARMS``: the paper's protocol, the paper's loss
with global BN, 10 % of the labels, each SSL arm beside its equal-step control); a single run judges a margin only
against the spread documented in ``configs/demo_spread.json`` (written by ``--seeds``). Output: ``report.txt``,
``report.json`` and ``report.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hcml.files import atomic_write, atomic_write_text
from hcml.launch.config import load_config, recipe_dir, resolve_recipe
from hcml.launch.launcher import Launch, run
from hcml.launch.plan import PlanEntry, run_dir_of, write_plan
from hcml.launch.rundir import SUMMARY, finished_with, read_json
from hcml.model import LEVELS
from hcml.model.contrastive import num_candidates
from hcml.pipeline import synth
from hcml.pipeline.prepared import label_subset, load_prepared

PAPER_LOSS = ["model.nce_negatives=all", "model.nce_temperature=0.1"]
SSL_RUNS = {"ssl": [], "ssl_paper_loss": PAPER_LOSS}  # self-supervised phases: key → overrides of demo_ssl.yaml
STUDY_SSL_RUNS = {"ssl_paper_loss_global_bn": [*PAPER_LOSS, "train.bn=global"]}


@dataclass(frozen=True)
class Arm:
    label: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    ssl: str | None = None  # the SSL run whose checkpoint initialises it


ARMS = {
    "baseline": Arm("baseline: no motion module", "demo", ["model.motion=false"]),
    "motion_no_nce": Arm("motion module, lambda = 0 (no contrastive terms)", "demo", ["model.nce_lambda=0"]),
    "joint_only": Arm("joint only: classification + contrastive from scratch", "demo"),
    "hcml": Arm("SSL -> joint, the demo's loss (temporal neg., tau 0.3)", "demo_joint", ssl="ssl"),
    "hcml_paper_loss": Arm("SSL -> joint, the paper's loss (all neg., tau 0.1)", "demo_joint", PAPER_LOSS,
                           ssl="ssl_paper_loss"),
}
# The SSL study (``--seeds N``, docs/DEMO.md): the paper's protocol (SSL, then the whole joint schedule), the
# paper's loss with global BN in its SSL phase, and the label-scarce case (configs/demo_scarce.yaml: 10 % of the
# labels, the same labelled steps for every arm).
STUDY_ARMS = {
    "hcml_paper_protocol": Arm("SSL, then the whole joint budget of joint_only", "demo", ssl="ssl"),
    "joint_only_long": Arm("joint only for as many steps (its equal-compute control)", "demo", ["optim.epochs=14"]),
    "hcml_paper_loss_global_bn": Arm("SSL (paper's loss, global BN) -> joint", "demo_joint", PAPER_LOSS,
                                     ssl="ssl_paper_loss_global_bn"),
    "scarce_motion_no_nce": Arm("10% labels: motion module, lambda = 0", "demo_scarce", ["model.nce_lambda=0"]),
    "scarce_joint_only": Arm("10% labels: joint only from scratch", "demo_scarce"),
    "scarce_hcml": Arm("10% labels: SSL on every video -> joint", "demo_scarce", ssl="ssl"),
    "scarce_joint_only_long": Arm("10% labels: joint only for as many steps", "demo_scarce", ["optim.epochs=90"]),
}
# The margins the report judges: (arm, control)
MARGINS = (("hcml", "motion_no_nce"), ("joint_only", "motion_no_nce"), ("hcml", "joint_only"),
           ("hcml_paper_loss", "motion_no_nce"),
           ("hcml_paper_protocol", "joint_only"), ("hcml_paper_protocol", "joint_only_long"),
           ("hcml_paper_protocol", "motion_no_nce"), ("joint_only_long", "joint_only"),
           ("hcml_paper_loss_global_bn", "hcml_paper_loss"), ("hcml_paper_loss_global_bn", "motion_no_nce"),
           ("scarce_hcml", "scarce_joint_only"), ("scarce_hcml", "scarce_motion_no_nce"),
           ("scarce_joint_only", "scarce_motion_no_nce"), ("scarce_hcml", "scarce_joint_only_long"))
SPREAD_FILE = "demo_spread.json"
PLAN_SECONDS = "__plan_seconds__"  # train_all's wall time, beside the summaries
REUSED = "__reused__"  # and the trainings it did not run again (their time is an earlier run's)
SEED_REPORT = "seed_report.json"  # one seed's figures under --seeds, written as soon as the seed is done
NOISE_SDS = 2  # a margin counts only above this many standard deviations of its seed-to-seed spread


def pair_direction_accuracy(labels: list[int], preds: list[int], pairs) -> tuple[float, int]:
    """Among videos of a time-reversal pair whose prediction lands in that pair, the share with the right
    direction, and how many such videos there were. An order-blind model scores ~50 % here whatever its
    overall accuracy."""
    hit = tot = 0
    for a, b in pairs:
        for y, p in zip(labels, preds):
            if y in (a, b) and p in (a, b):
                tot += 1
                hit += int(p == y)
    return (100.0 * hit / tot if tot else float("nan")), tot


def finished_runs(entries: list[PlanEntry]) -> set[str]:
    """The entries an earlier demo already trained exactly so: a summary with no stop signal and this config's
    fingerprint, and (for a run started from an SSL checkpoint) that SSL run finished too, not retrained now."""
    from hcml.launch.config import fingerprint

    done: set[str] = set()
    for e in entries:
        summary = read_json(Path(run_dir_of(e)) / SUMMARY)
        if not summary:
            continue
        if e.init_from_run is not None and Path(e.init_from_run).name not in done:
            continue  # its SSL phase trains again: so must it
        # model.init_from included, as the run had it
        if finished_with(summary, fingerprint(load_config(e.config, e.resolved_overrides()))):
            done.add(e.name)
    return done


def train_all(entries: list[PlanEntry], out: Path, nproc: int, reuse: bool = False) -> dict[str, dict]:
    """Every training of one seed as one ``hcml train --plan`` (one torchrun, one process group: the imports, the
    group and its teardown once instead of per run); {entry name: its summary.json}. ``reuse`` (``--seeds``, a
    long study): runs that an earlier demo finished with the same config are not trained again."""
    dirs = {e.name: Path(run_dir_of(e)) for e in entries}
    keep = finished_runs(entries) if reuse else set()
    for name, d in dirs.items():  # a summary left by an earlier demo must not stand in for a run that did not happen
        if name not in keep:
            (d / SUMMARY).unlink(missing_ok=True)
            shutil.rmtree(d / "checkpoints", ignore_errors=True)  # nor its checkpoint be resumed
    if keep:
        print(f"[demo] {len(keep)} of {len(entries)} trainings finished earlier with the same config: reused "
              f"({', '.join(sorted(keep))})", flush=True)
    plan = write_plan(out / "plan.json", entries)
    t0 = time.time()
    argv = ["train", "--plan", str(plan), *(["--resume", "auto"] if keep else [])]
    print(f"[demo] {len(entries)} trainings ({', '.join(e.name for e in entries)}): "
          f"torchrun --nproc_per_node={nproc} hcml {' '.join(argv)}", flush=True)
    rc = run(Launch(nproc), argv)
    summaries = {}
    for name, d in dirs.items():
        if not (d / SUMMARY).is_file():
            raise SystemExit(f"[demo] training {name} did not finish (exit code {rc}); see the log above")
        summary = json.loads((d / SUMMARY).read_text())
        if summary.get("stopped_by_signal") is not None:  # the run checkpointed and left: so does the demo
            raise SystemExit(f"[demo] {name} stopped by signal {summary['stopped_by_signal']} at step "
                             f"{summary['step']}; the demo stops too (its checkpoint is in {d})")
        summaries[name] = summary
    if rc != 0:
        raise SystemExit(f"[demo] the trainings failed with exit code {rc}")
    summaries[PLAN_SECONDS] = time.time() - t0
    summaries[REUSED] = sorted(keep)
    return summaries


def format_report(rep: dict, classes: list[str]) -> str:
    chance = 100.0 / len(classes)
    seeds = rep.get("seeds")
    lines = [f"HCML demo: synthetic motion set, {len(classes)} classes (chance {chance:.1f}%), appearance random "
             f"per clip; every arm below {rep['steps']} optimizer steps on the same data; figures on the held-out "
             f"{rep['split']} split ({rep['test_videos']} videos)"
             + (f", mean ± sd over {len(seeds)} seeds {seeds}" if seeds else f", seed {rep['seed']}"),
             f"{'arm':<56}{'top-1':>14}   direction in time-reversal pairs (chance 50%)"]

    def row(key, r, steps=""):
        top1 = f"{r['top1']:.1f} ± {r['top1_sd']:.1f}%" if seeds else f"{r['top1']:.1f}%"
        dirn = f"{r['pair_direction']:.1f} ± {r['pair_direction_sd']:.1f}%" if seeds else f"{r['pair_direction']:.1f}%"
        ref = rep.get("documented", {}).get("models", {}).get(key)
        doc = f"   [documented over seeds: {ref['top1']:.1f} ± {ref['top1_sd']:.1f}%]" if ref and not seeds else ""
        return f"{r['label']:<56}{steps}{top1:>14}   {dirn}{doc}"

    study = {k: r for k, r in rep["models"].items() if r.get("study")}
    lines += [row(k, r) for k, r in rep["models"].items() if k not in study]
    lines.append(f"(SSL arms: {rep['ssl_steps']} self-supervised steps, then {rep['steps'] - rep['ssl_steps']} "
                 f"joint; {rep['bn_note']})")
    if study:
        sub = rep.get("label_subset", {})
        lines += ["", f"The SSL study (docs/DEMO.md); steps = self-supervised + labelled; "
                      f"{sub.get('fraction', 0):.0%} labels = {len(sub.get('videos', []))} training videos, "
                      f"class-balanced, seed {sub.get('seed')} (report.json lists them); controls from the table above",
                  f"{'arm':<56}{'steps':>9}{'top-1':>14}   direction in pairs"]
        for k, r in study.items():
            ssl = r.get("ssl_steps", 0)
            steps = f"{ssl}+{r['steps'] - ssl}"
            lines.append(row(k, r, f"{steps:>9}"))
    lines += ["", "contrastive loss at the end of each SSL phase vs chance ln(candidates) (per level):"]
    for key, n in rep["nce"].items():
        lines.append(f"  {key:<26}" + "  ".join(f"{lv} {n[lv]['final']:.2f} / {n[lv]['chance']:.2f}" for lv in LEVELS))
    k = rep["knn"]
    lines += ["", f"KNN (k={k['k']}) on each level's motion features, {rep['split']} split; random output "
                  f"{chance:.1f}%; random init has BN statistics calibrated on training clips",
              f"{'level':<8}{'random init':>12}" + "".join(f"{key:>{max(16, len(key) + 2)}}" for key in k["ssl"])]
    for lv in LEVELS:
        lines.append(f"{lv:<8}{k['random_init'][lv]:>11.1f}%" + "".join(f"{v[lv]:>{max(15, len(key) + 1)}.1f}%"
                                                                      for key, v in k["ssl"].items()))
    lines += ["", *verdict(rep)]
    return "\n".join(lines)


def margins(models: dict) -> dict[str, dict]:
    """Each judged margin (arm − control) in top-1 and direction points."""
    return {f"{a}-{b}": {"top1": models[a]["top1"] - models[b]["top1"],
                         "pair_direction": models[a]["pair_direction"] - models[b]["pair_direction"]}
            for a, b in MARGINS if a in models and b in models}


def judge(margin: float, sd: float | None) -> str:
    """The noise rule: a margin "helped" only when it exceeds NOISE_SDS standard deviations of the same margin
    across seeds (paired by seed); otherwise it is within the noise."""
    if sd is None:
        return "not judged: no seed spread documented"
    if margin > NOISE_SDS * sd:
        return f"helped (> {NOISE_SDS} sd = {NOISE_SDS * sd:.1f} points)"
    if margin < -NOISE_SDS * sd:
        return f"hurt (< -{NOISE_SDS} sd = {-NOISE_SDS * sd:.1f} points)"
    return f"within the noise (|margin| <= {NOISE_SDS} sd = {NOISE_SDS * sd:.1f} points)"


def verdict(rep: dict) -> list[str]:
    """What the numbers say, in words, judged against the seed-to-seed spread. A smoke test (``--quick``) draws no
    conclusion: its models are trained far too briefly to differ from chance."""
    if rep.get("smoke_test"):
        return ["SMOKE TEST (--quick): every model trained for a few steps only, so these figures sit at chance and "
                "support no conclusion; run `hcml demo` without --quick for the comparison."]
    spread = rep.get("margin_spread") or rep.get("documented", {}).get("margin_spread") or {}
    out = [f"Margins in top-1 points, judged against {NOISE_SDS} sd of the same margin across seeds "
           f"({'this run' if rep.get('seeds') else 'configs/' + SPREAD_FILE}):"]
    for name, m in rep["margins"].items():
        sd = spread.get(name, {}).get("top1_sd")
        out.append(f"  {name:<44} {m['top1']:+6.1f}   {judge(m['top1'], sd)}")
    k = rep["knn"]
    for key, v in k["ssl"].items():
        beats = [lv for lv in LEVELS if v[lv] > k["random_init"][lv]]
        runs = f"mean of {len(rep['seeds'])} seeds" if rep.get("seeds") else "one run"
        out.append(f"KNN after {key}: above the calibrated random init at {len(beats)} of 3 levels "
                   f"({runs}; each video of the split is {100 / rep['test_videos']:.1f} points).")
    return out


def knn_reference(ssl_ckpts: dict[str, Path], out: Path, k: int, split: str) -> dict:
    from hcml.launch.analysis import knn_many

    print("[demo] KNN on per-level motion features: each SSL checkpoint and the same network at random init",
          flush=True)
    first = next(iter(ssl_ckpts.values()))
    keys = list(ssl_ckpts)
    tables = knn_many([str(first), *map(str, ssl_ckpts.values())], None, [f"data.eval_split={split}"], k,
                      [out / "knn_random_init", *(out / f"knn_{key}" for key in keys)], random_init=True)
    rand, ssl = tables[0], dict(zip(keys, tables[1:]))
    return {"k": k, "split": split, "random_init_calibrated": rand["random_init_calibrated"],
            "ssl": {key: {lv: t["levels"][lv]["accuracy"] for lv in LEVELS} for key, t in ssl.items()},
            "random_init": {lv: rand["levels"][lv]["accuracy"] for lv in LEVELS}}


def nce_at_end(run_dir: Path, cfg) -> dict:
    """The last logged contrastive loss per level of a run, beside chance: ln of the candidates each prediction
    is scored against (a loss far below it with features that do not beat random init in KNN is solved by
    something other than motion)."""
    import hcml.launch.components as components

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("kind") == "train"][-1]
    model = components.model_from_config(cfg, 2).eval()
    with torch.no_grad():
        feats = model.motion_features(torch.zeros(1, 3, cfg.data.frames, cfg.data.crop, cfg.data.crop))
    m = cfg.model
    out = {}
    for lv in LEVELS:
        _, _, T, H, W = feats[lv].shape
        n = num_candidates(m.nce_negatives, cfg.data.batch_size, min(m.nce_samples, H * W), T)
        out[lv] = {"final": last[f"loss_nce_{lv}"], "chance": math.log(n), "candidates": n}
    return out


def dataset(out: Path, quick: bool):
    """The synthetic set with a held-out test split (made once; remade if an older one lacks the split)."""
    data = out / "data"
    if not (data / "test.txt").is_file():
        print(f"[demo] generating the synthetic motion dataset in {data}", flush=True)
        synth.generate(data, per_class=6 if quick else 40, val_per_class=3 if quick else 16,
                       test_per_class=3 if quick else 16, frames=32, size=48, seed=0, workers=2, overwrite=True)
    return data, load_prepared(data)


def seed_plan(out: Path, data: Path, seed: int, quick: bool, study: bool):
    """The SSL runs, the arms and the plan entries of one seed (the trainings ``run_seed`` runs)."""
    common = [f"train.seed={seed}", "data.eval_split=test"]
    quick_ov = ["optim.epochs=2", "optim.warmup_epochs=1"] if quick else []
    ssl_quick = ["optim.epochs=1", "optim.warmup_epochs=0"] if quick else []
    data_ov = [f"data.root={data}"]
    ssl_runs = {**SSL_RUNS, **(STUDY_SSL_RUNS if study else {})}
    arms = {**ARMS, **(STUDY_ARMS if study else {})}
    entries = [PlanEntry(key, resolve_recipe("demo_ssl"), [*data_ov, f"run_dir={out / key}", *extra, *common,
                                                         *ssl_quick], overwrite=True)
               for key, extra in ssl_runs.items()]
    for key, arm in arms.items():
        tail = ssl_quick if arm.ssl and arm.recipe == "demo_joint" else quick_ov
        if quick and arm.recipe == "demo_scarce":  # the quick set's 10 % (one video per class) fills no batch of 8
            tail = [*tail, "data.batch_size=4"]
        entries.append(PlanEntry(key, resolve_recipe(arm.recipe), [*data_ov, f"run_dir={out / key}",
                                                                   *arm.overrides, *common, *tail],
                                 overwrite=True, init_from_run=str(out / arm.ssl) if arm.ssl else None))
    return ssl_runs, arms, entries


def plan_fingerprint(entries) -> dict[str, str]:
    """Each training's resolved config, hashed: a finished seed is reused only for exactly these trainings."""
    from hcml.launch.config import fingerprint

    return {e.name: fingerprint(load_config(e.config, e.overrides)) for e in entries}


def run_seed(out: Path, data: Path, ds, seed: int, nproc: int, quick: bool, study: bool = False,
             reuse: bool = False) -> dict:
    """Every arm once with ``train.seed=seed`` (with ``study``, the SSL study's arms too): {models, nce, knn,
    steps, ...} for the report. ``reuse``: trainings an earlier run finished with the same config are kept."""
    from hcml.launch.checkpoint import list_checkpoints

    split = "test"
    ssl_runs, arms, entries = seed_plan(out, data, seed, quick, study)
    done = train_all(entries, out, nproc, reuse=reuse)
    ssl_ckpts = {key: list_checkpoints(out / key / "checkpoints")[-1] for key in ssl_runs}
    steps = {key: done[key]["step"] for key in ssl_runs}
    nce = {e.name: nce_at_end(out / e.name, load_config(e.config, e.overrides)) for e in entries
           if e.name in ssl_runs}
    labels = [s.label for s in ds.split(split)]
    pairs = [(a, b) for a, b in synth.TEMPORAL_ORDER_PAIRS if max(a, b) < ds.num_classes]
    models = {}
    for key, arm in arms.items():
        s = done[key]
        ev, ssl = s["eval"], steps[arm.ssl] if arm.ssl else 0
        d, n = pair_direction_accuracy(labels, ev["predictions"], pairs)
        models[key] = {"label": arm.label, "top1": ev["top1"], "top5": ev["top5"], "pair_direction": d,
                       "pair_n": n, "per_class": ev["per_class"], "steps": s["step"] + ssl, "ssl_steps": ssl,
                       "train_seconds": s["seconds"], "split": ev.get("split"), "study": key in STUDY_ARMS}
    main = {k: m["steps"] for k, m in models.items() if not m["study"]}
    if len(set(main.values())) != 1:
        print(f"[demo] WARNING: the arms ran different step counts: {main}", flush=True)
    t_knn = time.time()
    knn = knn_reference(ssl_ckpts, out, 10, split)
    runs = {k: v for k, v in done.items() if k not in (PLAN_SECONDS, REUSED) and k not in done[REUSED]}
    evals = sum(v.get("eval_seconds", 0.0) for v in runs.values())
    setups = sum(v.get("setup_seconds", 0.0) for v in runs.values())
    ran = sum(v["seconds"] for v in runs.values())  # inside the trainings; the rest of the plan's time: launch
    timing = {"trainings": done[PLAN_SECONDS], "launch": done[PLAN_SECONDS] - ran, "run_setups": setups,
              "final_evals": evals, "training_steps": ran - evals - setups, "knn": time.time() - t_knn,
              "per_run": {k: run_timing(v) for k, v in runs.items()}, "reused": done[REUSED]}
    rep = {"seed": seed, "models": models, "nce": nce, "knn": knn, "steps": max(main.values()),
           "ssl_steps": steps["ssl"], "margins": margins(models), "timing": timing,
           "plan": plan_fingerprint(entries)}
    if study:
        cfg = load_config(resolve_recipe("demo_scarce"))
        subset = label_subset(ds.train, cfg.data.label_fraction, cfg.data.label_seed)
        rep["label_subset"] = {"fraction": cfg.data.label_fraction, "seed": cfg.data.label_seed,
                               "videos": [str(Path(v.path).relative_to(ds.root)) for v in subset]}
    return rep


def aggregate(per_seed: list[dict]) -> dict:
    """Mean ± sd per arm and per margin over seeds (sample sd; paired margins per seed)."""
    def sd(xs):
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    first = per_seed[0]
    models = {}
    for key, m in first["models"].items():
        t = [r["models"][key]["top1"] for r in per_seed]
        d = [r["models"][key]["pair_direction"] for r in per_seed]
        models[key] = {**m, "top1": statistics.mean(t), "top1_sd": sd(t), "top1_all": t,
                       "pair_direction": statistics.mean(d), "pair_direction_sd": sd(d)}
    spread = {}
    for name in first["margins"]:
        t = [r["margins"][name]["top1"] for r in per_seed]
        spread[name] = {"top1": statistics.mean(t), "top1_sd": sd(t), "top1_all": t}
    knn = {**first["knn"],
           "ssl": {key: {lv: statistics.mean(r["knn"]["ssl"][key][lv] for r in per_seed) for lv in LEVELS}
                   for key in first["knn"]["ssl"]},
           "random_init": {lv: statistics.mean(r["knn"]["random_init"][lv] for r in per_seed) for lv in LEVELS}}
    nce = {key: {lv: {**v, "final": statistics.mean(r["nce"][key][lv]["final"] for r in per_seed)}
                 for lv, v in n.items()} for key, n in first["nce"].items()}
    return {"models": models, "margin_spread": spread, "knn": knn, "nce": nce,
            "margins": {k: {"top1": v["top1"], "pair_direction": statistics.mean(
                r["margins"][k]["pair_direction"] for r in per_seed)} for k, v in spread.items()},
            "seeds": [r["seed"] for r in per_seed], "steps": first["steps"], "ssl_steps": first["ssl_steps"],
            **({"label_subset": first["label_subset"]} if "label_subset" in first else {})}


def documented_spread() -> dict:
    path = recipe_dir() / SPREAD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def plot_report(rep: dict, classes: list[str], path: Path) -> Path:
    """report.png: each arm's top-1 with the seed spread as error bars (this run's with ``--seeds``, else the
    documented one of configs/demo_spread.json) and chance as a line, beside the per-level KNN of each SSL phase
    against the same network at random init (BN calibrated). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = 100.0 / len(classes)
    seeds = rep.get("seeds")
    documented = rep.get("documented", {}).get("models", {})
    keys = list(rep["models"])[::-1]  # top to bottom in the report's order
    top1 = [rep["models"][k]["top1"] for k in keys]
    sd = [rep["models"][k]["top1_sd"] if seeds else documented.get(k, {}).get("top1_sd", 0.0) for k in keys]
    colours = ["tab:orange" if rep["models"][k].get("study") else "tab:blue" for k in keys]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.42 * len(keys) + 2.2), gridspec_kw={"width_ratios": [3, 2]})
    ax.barh(range(len(keys)), top1, xerr=sd, color=colours, capsize=3, alpha=0.85)
    ax.axvline(chance, color="k", ls="--", lw=1, label=f"chance {chance:.1f}%")
    ax.set_yticks(range(len(keys)), [rep["models"][k]["label"] for k in keys], fontsize=8)
    ax.set_xlabel(f"top-1 on the held-out {rep['split']} split (%)")
    spread = (f"mean ± sd over seeds {seeds}" if seeds else
              "seed 0; error bars: the documented sd over seeds" if documented else "seed 0; no seed spread documented")
    ax.set_title(f"{'SMOKE TEST (--quick): no conclusion. ' if rep.get('smoke_test') else ''}arms ({spread})",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    k = rep["knn"]
    names = ["random init", *k["ssl"]]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [k["random_init"][lv] if i == 0 else k["ssl"][name][lv] for lv in LEVELS]
        bx.bar([j + i * width for j in range(len(LEVELS))], vals, width, label=name,
               color="0.6" if i == 0 else None)
    bx.axhline(chance, color="k", ls="--", lw=1)
    bx.set_xticks([j + 0.4 - width / 2 for j in range(len(LEVELS))], list(LEVELS))
    bx.set_ylabel(f"KNN (k={k['k']}) top-1 (%)")
    bx.set_title("per-level motion features: SSL vs random init (BN calibrated)", fontsize=9)
    bx.legend(fontsize=7)
    for a in (ax, bx):
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), binary=True)
    plt.close(fig)
    return path


def run_timing(summary: dict) -> dict:
    """One training's wall time and its optimizer steps' pace: the figure to compare between machines."""
    steps_s = summary["seconds"] - summary.get("eval_seconds", 0.0) - summary.get("setup_seconds", 0.0)
    steps = summary["step"]
    return {"seconds": summary["seconds"], "steps": steps, "ms_per_step": 1000 * steps_s / max(1, steps)}


def sum_timings(timings: list[dict]) -> dict:
    """Several seeds' timings as one: seconds add up, each training's pace is the mean over the seeds that ran it."""
    total = {k: sum(t[k] for t in timings) for k in timings[0] if k not in ("per_run", "reused")}
    # a seed report written before the pace was recorded holds bare seconds: its trainings are left out here
    kept = [{k: r for k, r in t.get("per_run", {}).items() if isinstance(r, dict)} for t in timings]
    per_run = {}
    for k in dict.fromkeys(k for runs in kept for k in runs):
        runs = [t[k] for t in kept if k in t]
        per_run[k] = {"seconds": sum(r["seconds"] for r in runs), "steps": sum(r["steps"] for r in runs),
                      "ms_per_step": sum(r["ms_per_step"] for r in runs) / len(runs)}
    return {**total, "per_run": per_run, "reused_runs": sum(len(t.get("reused", [])) for t in timings)}


def format_timing(t: dict) -> str:
    """Where the demo's wall time went, in all and per training: on another machine the per-step pace says whether
    it is the steps that are slower there or the start-up around them."""
    per_run = ", ".join(f"{k} {r['seconds']:.0f} s ({r['ms_per_step']:.0f} ms/step)"
                        for k, r in t.get("per_run", {}).items())
    return (f"time: {t['total']:.0f} s = dataset {t['dataset']:.0f} + trainings {t['trainings']:.0f} (torchrun and "
            f"imports {t['launch']:.0f}, run set-ups {t['run_setups']:.0f}, optimizer steps {t['training_steps']:.0f}, "
            f"final evaluations {t['final_evals']:.0f}) + KNN {t['knn']:.0f} + Grad-CAM {t['gradcam']:.0f} + "
            f"report {t['report']:.0f}" + (f"; {t['reused_runs']} trainings reused from an earlier run"
                                             if t.get("reused_runs") else "")
            + (f"\n  per training (wall time incl. set-up and final evaluation; pace of its optimizer steps): {per_run}"
               if per_run else ""))


def run_demo(out: Path, nproc: int = 2, quick: bool = False, seeds: int = 1, study: bool | None = None) -> int:
    from hcml.launch.analysis import run_gradcam
    from hcml.launch.checkpoint import list_checkpoints

    t0 = time.time()
    out = out.resolve()
    study = seeds > 1 if study is None else study
    data, ds = dataset(out, quick)
    t_data = time.time() - t0
    if seeds == 1:
        rep = run_seed(out, data, ds, 0, nproc, quick, study)
        rep["documented"] = documented_spread()
        arm_dir = out
    else:
        per_seed = []
        for s in range(seeds):  # each seed's figures kept on disk as soon as they exist
            kept = out / f"seed{s}" / SEED_REPORT
            if kept.is_file():  # a seed an interrupted --seeds run finished: reused if its trainings are these
                prev = json.loads(kept.read_text())
                if prev.get("plan") == plan_fingerprint(seed_plan(out / f"seed{s}", data, s, quick, study)[2]):
                    print(f"[demo] seed {s}: reusing the figures a finished earlier run left in {kept} (the same "
                          f"trainings; delete the file to train it again)", flush=True)
                    per_seed.append(prev)
                    continue
            per_seed.append(run_seed(out / f"seed{s}", data, ds, s, nproc, quick, study, reuse=not quick))
            atomic_write_text(kept, json.dumps(per_seed[-1], indent=1))
        rep = {**aggregate(per_seed), "per_seed": per_seed}
        arm_dir = out / "seed0"
        spread = {"command": f"hcml demo --seeds {seeds}", "measured": time.strftime("%Y-%m-%d"),
                  "seeds": rep["seeds"],
                  "models": {k: {"top1": m["top1"], "top1_sd": m["top1_sd"], "pair_direction": m["pair_direction"],
                                 "pair_direction_sd": m["pair_direction_sd"]} for k, m in rep["models"].items()},
                  "margin_spread": rep["margin_spread"]}
        atomic_write_text(out / SPREAD_FILE, json.dumps(spread, indent=1))
    ssl_cfg = load_config(resolve_recipe("demo_ssl"))
    bn_note = ("global BN across the processes, as in the paper" if ssl_cfg.train.bn == "global" else
               f"BN statistics per process over {ssl_cfg.data.batch_size} clips (train.bn=local) stand in for the "
               f"paper's global BN")
    rep.update(split="test", test_videos=len(ds.test), classes=ds.classes, bn_note=bn_note, smoke_test=quick)
    video = next((s.path for s in ds.test if ds.classes[s.label] == "pan_left"), ds.test[0].path)
    t_cam = time.time()
    pngs = run_gradcam(None, str(list_checkpoints(arm_dir / "hcml" / "checkpoints")[-1]), [video],
                       str(out / "gradcam"), baseline=str(list_checkpoints(arm_dir / "baseline" / "checkpoints")[-1]))
    t_report = time.time()
    png = plot_report(rep, ds.classes, out / "report.png")
    t_end = time.time()
    rep["timing"] = {**sum_timings([r["timing"] for r in rep.get("per_seed", [rep])]), "dataset": t_data,
                     "gradcam": t_report - t_cam, "report": t_end - t_report, "total": t_end - t0}
    rep["seconds"] = rep["timing"]["total"]
    text = (format_report(rep, ds.classes) + f"\nGrad-CAM++ (baseline above, HCML below): {pngs[0]}"
            f"\nThe result as a picture: {png}\n{format_timing(rep['timing'])}")
    atomic_write_text(out / "report.txt", text + "\n")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1))
    print("\n" + text)
    extra = f"; the seed spread in {out / SPREAD_FILE} (copy it to configs/ to document it)" if seeds > 1 else ""
    print(f"\n[demo] done in {rep['seconds']:.0f}s. Runs (config, metrics.jsonl, curves.png, checkpoints) in {out}; "
          f"numbers in {out / 'report.json'}{extra}", flush=True)
    return 0
