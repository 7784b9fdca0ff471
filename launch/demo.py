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
N seeds and reports mean ± sd; a single run judges a margin only against the spread documented in
``configs/demo_spread.json`` (written by ``--seeds``). Output: ``report.txt`` and ``report.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hcml.files import atomic_write_text
from hcml.launch.config import load_config, recipe_dir, resolve_recipe
from hcml.launch.launcher import Launch, run
from hcml.launch.plan import PlanEntry, run_dir_of, write_plan
from hcml.launch.rundir import SUMMARY
from hcml.model import LEVELS
from hcml.model.contrastive import num_candidates
from hcml.pipeline import synth
from hcml.pipeline.prepared import load_prepared

PAPER_LOSS = ["model.nce_negatives=all", "model.nce_temperature=0.1"]
SSL_RUNS = {"ssl": [], "ssl_paper_loss": PAPER_LOSS}  # self-supervised phases: key → overrides of demo_ssl.yaml


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
# The margins the report judges: (arm, control)
MARGINS = (("hcml", "motion_no_nce"), ("joint_only", "motion_no_nce"), ("hcml", "joint_only"),
           ("hcml_paper_loss", "motion_no_nce"))
SPREAD_FILE = "demo_spread.json"
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


def train_all(entries: list[PlanEntry], out: Path, nproc: int) -> dict[str, dict]:
    """Every training of one seed as one ``hcml train --plan`` (one torchrun, one process group: the imports, the
    group and its teardown once instead of per run); {entry name: its summary.json}."""
    dirs = {e.name: Path(run_dir_of(e)) for e in entries}
    for d in dirs.values():  # a summary left by an earlier demo must not stand in for a run that did not happen
        (d / SUMMARY).unlink(missing_ok=True)
    plan = write_plan(out / "plan.json", entries)
    argv = ["train", "--plan", str(plan)]
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
    return summaries


def format_report(rep: dict, classes: list[str]) -> str:
    chance = 100.0 / len(classes)
    seeds = rep.get("seeds")
    lines = [f"HCML demo: synthetic motion set, {len(classes)} classes (chance {chance:.1f}%), appearance random "
             f"per clip; every arm {rep['steps']} optimizer steps on the same data; figures on the held-out "
             f"{rep['split']} split ({rep['test_videos']} videos)"
             + (f", mean ± sd over {len(seeds)} seeds {seeds}" if seeds else f", seed {rep['seed']}"),
             f"{'arm':<56}{'top-1':>14}   direction in time-reversal pairs (chance 50%)"]
    for key, r in rep["models"].items():
        top1 = f"{r['top1']:.1f} ± {r['top1_sd']:.1f}%" if seeds else f"{r['top1']:.1f}%"
        dirn = f"{r['pair_direction']:.1f} ± {r['pair_direction_sd']:.1f}%" if seeds else f"{r['pair_direction']:.1f}%"
        ref = rep.get("documented", {}).get("models", {}).get(key)
        doc = f"   [documented over seeds: {ref['top1']:.1f} ± {ref['top1_sd']:.1f}%]" if ref and not seeds else ""
        lines.append(f"{r['label']:<56}{top1:>14}   {dirn}{doc}")
    lines.append(f"(SSL arms: {rep['ssl_steps']} self-supervised steps, then {rep['steps'] - rep['ssl_steps']} "
                 f"joint; {rep['bn_note']})")
    lines += ["", "contrastive loss at the end of each SSL phase vs chance ln(candidates) (per level):"]
    for key, n in rep["nce"].items():
        lines.append(f"  {key:<16}" + "  ".join(f"{lv} {n[lv]['final']:.2f} / {n[lv]['chance']:.2f}" for lv in LEVELS))
    k = rep["knn"]
    lines += ["", f"KNN (k={k['k']}) on each level's motion features, {rep['split']} split; random output "
                  f"{chance:.1f}%; random init has BN statistics calibrated on training clips",
              f"{'level':<8}{'random init':>12}" + "".join(f"{key:>16}" for key in k["ssl"])]
    for lv in LEVELS:
        lines.append(f"{lv:<8}{k['random_init'][lv]:>11.1f}%" + "".join(f"{v[lv]:>15.1f}%" for v in k["ssl"].values()))
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
        out.append(f"  {name:<32} {m['top1']:+6.1f}   {judge(m['top1'], sd)}")
    k = rep["knn"]
    for key, v in k["ssl"].items():
        beats = [lv for lv in LEVELS if v[lv] > k["random_init"][lv]]
        runs = f"mean of {len(rep['seeds'])} seeds" if rep.get("seeds") else "one run"
        out.append(f"KNN after {key}: above the calibrated random init at {len(beats)} of 3 levels "
                   f"({runs}; each video of the split is {100 / rep['test_videos']:.1f} points).")
    return out


def knn_reference(ssl_ckpts: dict[str, Path], out: Path, k: int, split: str) -> dict:
    from hcml.launch.analysis import run_knn

    print("[demo] KNN on per-level motion features: each SSL checkpoint and the same network at random init",
          flush=True)
    ov = [f"data.eval_split={split}"]
    first = next(iter(ssl_ckpts.values()))
    rand = run_knn(None, str(first), ov, k=k, out=str(out / "knn_random_init"), as_json=None, random_init=True)
    ssl = {key: run_knn(None, str(ck), ov, k=k, out=str(out / f"knn_{key}"), as_json=None)
           for key, ck in ssl_ckpts.items()}
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


def run_seed(out: Path, data: Path, ds, seed: int, nproc: int, quick: bool) -> dict:
    """Every arm once with ``train.seed=seed``: {models, nce, knn, steps, ...} for the report."""
    from hcml.launch.checkpoint import list_checkpoints

    split = "test"
    common = [f"train.seed={seed}", f"data.eval_split={split}"]
    quick_ov = ["optim.epochs=2", "optim.warmup_epochs=1"] if quick else []
    ssl_quick = ["optim.epochs=1", "optim.warmup_epochs=0"] if quick else []
    data_ov = [f"data.root={data}"]
    entries = [PlanEntry(key, resolve_recipe("demo_ssl"), [*data_ov, f"run_dir={out / key}", *extra, *common,
                                                         *ssl_quick], overwrite=True)
               for key, extra in SSL_RUNS.items()]
    for key, arm in ARMS.items():
        tail = ssl_quick if arm.ssl else quick_ov
        entries.append(PlanEntry(key, resolve_recipe(arm.recipe), [*data_ov, f"run_dir={out / key}",
                                                                   *arm.overrides, *common, *tail],
                                 overwrite=True, init_from_run=str(out / arm.ssl) if arm.ssl else None))
    done = train_all(entries, out, nproc)
    ssl_ckpts = {key: list_checkpoints(out / key / "checkpoints")[-1] for key in SSL_RUNS}
    steps = {key: done[key]["step"] for key in SSL_RUNS}
    nce = {e.name: nce_at_end(out / e.name, load_config(e.config, e.overrides)) for e in entries
           if e.name in SSL_RUNS}
    summaries = {key: done[key] for key in ARMS}
    labels = [s.label for s in ds.split(split)]
    pairs = [(a, b) for a, b in synth.TEMPORAL_ORDER_PAIRS if max(a, b) < ds.num_classes]
    models = {}
    for key, s in summaries.items():
        ev, arm = s["eval"], ARMS[key]
        d, n = pair_direction_accuracy(labels, ev["predictions"], pairs)
        total = s["step"] + (steps[arm.ssl] if arm.ssl else 0)
        models[key] = {"label": arm.label, "top1": ev["top1"], "top5": ev["top5"], "pair_direction": d,
                       "pair_n": n, "per_class": ev["per_class"], "steps": total, "train_seconds": s["seconds"],
                       "split": ev.get("split")}
    if len({m["steps"] for m in models.values()}) != 1:
        print(f"[demo] WARNING: the arms ran different step counts: { {k: m['steps'] for k, m in models.items()} }",
              flush=True)
    return {"seed": seed, "models": models, "nce": nce, "knn": knn_reference(ssl_ckpts, out, 10, split),
            "steps": max(m["steps"] for m in models.values()), "ssl_steps": steps["ssl"],
            "margins": margins(models)}


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
            "seeds": [r["seed"] for r in per_seed], "steps": first["steps"], "ssl_steps": first["ssl_steps"]}


def documented_spread() -> dict:
    path = recipe_dir() / SPREAD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_demo(out: Path, nproc: int = 2, quick: bool = False, seeds: int = 1) -> int:
    from hcml.launch.analysis import run_gradcam
    from hcml.launch.checkpoint import list_checkpoints

    t0 = time.time()
    out = out.resolve()
    data, ds = dataset(out, quick)
    if seeds == 1:
        rep = run_seed(out, data, ds, 0, nproc, quick)
        rep["documented"] = documented_spread()
        arm_dir = out
    else:
        per_seed = [run_seed(out / f"seed{s}", data, ds, s, nproc, quick) for s in range(seeds)]
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
    pngs = run_gradcam(None, str(list_checkpoints(arm_dir / "hcml" / "checkpoints")[-1]), [video],
                       str(out / "gradcam"), baseline=str(list_checkpoints(arm_dir / "baseline" / "checkpoints")[-1]))
    rep["seconds"] = time.time() - t0
    text = format_report(rep, ds.classes) + f"\nGrad-CAM++ (baseline above, HCML below): {pngs[0]}"
    atomic_write_text(out / "report.txt", text + "\n")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1))
    print("\n" + text)
    extra = f"; the seed spread in {out / SPREAD_FILE} (copy it to configs/ to document it)" if seeds > 1 else ""
    print(f"\n[demo] done in {rep['seconds']:.0f}s. Runs (config, metrics.jsonl, curves.png, checkpoints) in {out}; "
          f"numbers in {out / 'report.json'}{extra}", flush=True)
    return 0
