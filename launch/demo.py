"""``hcml demo``: the paper's mechanism on a synthetic motion set, end to end on CPU in minutes.

The synthetic set's classes differ only by motion (appearance is random per clip). From the same data and the
same number of optimizer steps, four 2-process torchrun trainings (gloo on CPU, NCCL on a GPU machine):

- ``baseline``       the backbone without the motion module;
- ``motion_no_nce``  the motion module trained by classification only (lambda = 0);
- ``ssl``            HCML's self-supervised phase (contrastive terms only), the first part of the steps;
- ``hcml``           HCML's joint phase (Eq. 5) initialised from the SSL checkpoint, the rest of the steps.

Then the report: top-1, direction accuracy inside time-reversal pairs (an order-blind model scores 50 %), the
per-level KNN of the SSL checkpoint beside the same network at random initialisation (the paper's Table 7 form)
and a Grad-CAM++ strip. Written to ``report.txt`` and ``report.json`` in the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hcml.launch.config import load_config, resolve_recipe
from hcml.launch.launcher import Launch, run
from hcml.model import LEVELS
from hcml.pipeline import synth
from hcml.pipeline.prepared import load_prepared

MODELS = {  # report key → (label, recipe, extra overrides)
    "baseline": ("baseline (no motion module)", "demo", ["model.motion=false"]),
    "motion_no_nce": ("motion module, no contrastive terms (lambda = 0)", "demo", ["model.nce_lambda=0"]),
    "hcml": ("HCML: self-supervised, then joint", "demo_joint", []),
}


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


def train(name: str, recipe: str, data: Path, run_dir: Path, nproc: int, overrides: list[str]) -> dict:
    argv = ["train", "--config", resolve_recipe(recipe), "--data", str(data), "--run-dir", str(run_dir),
            "--overwrite", *overrides]  # a demo rerun replaces its own earlier runs
    print(f"[demo] {name}: torchrun --nproc_per_node={nproc} hcml {' '.join(argv)}", flush=True)
    t0 = time.time()
    rc = run(Launch(nproc), argv)
    if rc != 0:
        raise SystemExit(f"[demo] training {name} failed with exit code {rc}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["seconds"] = time.time() - t0
    return summary


def format_report(rep: dict, classes: list[str], pairs) -> str:
    chance = 100.0 / len(classes)
    lines = [f"HCML demo: synthetic motion set, {len(classes)} classes (chance {chance:.1f}%), appearance random "
             f"per clip; every model {rep['steps']} optimizer steps on the same data",
             f"{'model':<52}{'top-1':>7}   direction in time-reversal pairs (chance 50%)"]
    for key, r in rep["models"].items():
        lines.append(f"{r['label']:<52}{r['top1']:>6.1f}%   {r['pair_direction']:5.1f}% "
                     f"(of {r['pair_n']} videos predicted inside their pair)")
    lines.append(f"(HCML: {rep['ssl_steps']} self-supervised steps, then {rep['steps'] - rep['ssl_steps']} joint; "
                 f"{rep['bn_note']})")
    lines.append("per-class top-1 on the time-reversal pairs (same frames, opposite order):")
    for a, b in pairs:
        row = "  " + f"{classes[a]} / {classes[b]}".ljust(26)
        row += "".join(f"  {key}: {r['per_class'][a]:5.1f} / {r['per_class'][b]:5.1f}" for key, r in rep["models"].items())
        lines.append(row)
    k = rep["knn"]
    lines += ["", f"KNN (k={k['k']}) on the motion features of each level (the paper's Table 7 form); random output "
                  f"{chance:.1f}%",
              f"{'level':<8}{'random init':>12}{'after SSL':>11}   classes with the largest gain after SSL"]
    for lv in LEVELS:
        tops = ", ".join(f"\"{t['class']}\" ({t['from']:.0f} → {t['to']:.0f})" for t in k["ssl_top"][lv])
        lines.append(f"{lv:<8}{k['random_init'][lv]:>11.1f}%{k['ssl'][lv]:>10.1f}%   {tops}")
    lines += ["", *verdict(rep)]
    return "\n".join(lines)


def verdict(rep: dict) -> list[str]:
    """What the numbers say, in words, including when the contrastive terms did not help. A smoke test
    (``--quick``) draws no conclusion: its models are trained far too briefly to differ from chance."""
    if rep.get("smoke_test"):
        return ["SMOKE TEST (--quick): every model trained for a few steps only, so these figures sit at chance and "
                "support no conclusion; run `hcml demo` without --quick for the comparison."]
    k, m = rep["knn"], rep["models"]
    beats = [lv for lv in LEVELS if k["ssl"][lv] > k["random_init"][lv]]
    ordered = k["ssl"]["low"] < k["ssl"]["mid"] < k["ssl"]["high"]
    out = [f"Self-supervised motion features beat random initialisation at {len(beats)} of 3 levels"
           f"{' (' + ', '.join(beats) + ')' if beats and len(beats) < 3 else ''}; "
           f"{'ordered' if ordered else 'NOT ordered'} low < mid < high as in Table 7."]
    h, z, b = m["hcml"], m["motion_no_nce"], m["baseline"]
    out.append(f"HCML vs the same network without contrastive terms: top-1 {h['top1'] - z['top1']:+.1f} points, "
               f"direction {h['pair_direction'] - z['pair_direction']:+.1f} points"
               + (" (the contrastive terms helped)." if h["top1"] > z["top1"] or h["pair_direction"] >
                  z["pair_direction"] else " (the contrastive terms did NOT help here)."))
    out.append(f"Without the motion module the backbone stays near chance: top-1 {b['top1']:.1f}% "
               f"(chance {100 / len(rep['classes']):.1f}%); its direction figure rests on {b['pair_n']} videos.")
    return out


def knn_pair(ssl_ckpt: Path, out: Path, k: int) -> dict:
    from hcml.launch.analysis import run_knn

    print("[demo] KNN on per-level motion features: the SSL checkpoint and the same network at random init",
          flush=True)
    trained = run_knn(None, str(ssl_ckpt), [], k=k, out=str(out / "knn_ssl"), as_json=None)
    rand = run_knn(None, str(ssl_ckpt), [], k=k, out=str(out / "knn_random_init"), as_json=None, random_init=True)
    lv = LEVELS
    ssl_top = {}
    for level in lv:  # classes with the largest gain of the SSL features over random init, per level
        a, r = trained["levels"][level]["per_class"], rand["levels"][level]["per_class"]
        order = sorted(range(len(a)), key=lambda c: -(a[c] - r[c]))[:3]
        ssl_top[level] = [{"class": trained["classes"][c], "from": r[c], "to": a[c]} for c in order]
    return {"k": k, "random_init_calibrated": rand["random_init_calibrated"],
            "ssl": {x: trained["levels"][x]["accuracy"] for x in lv},
            "random_init": {x: rand["levels"][x]["accuracy"] for x in lv}, "ssl_top": ssl_top}


def run_demo(out: Path, nproc: int = 2, quick: bool = False) -> int:
    from hcml.launch.analysis import run_gradcam
    from hcml.launch.checkpoint import list_checkpoints

    t0 = time.time()
    out = out.resolve()
    data = out / "data"
    if not (data / "dataset.yaml").is_file():
        print(f"[demo] generating the synthetic motion dataset in {data}", flush=True)
        synth.generate(data, per_class=6 if quick else 40, val_per_class=3 if quick else 16, frames=32, size=48,
                       seed=0, workers=2)
    ds = load_prepared(data)
    pairs = [(a, b) for a, b in synth.TEMPORAL_ORDER_PAIRS if max(a, b) < ds.num_classes]
    quick_ov = ["optim.epochs=2", "optim.warmup_epochs=1"] if quick else []
    ssl_ov = ["optim.epochs=1", "optim.warmup_epochs=0"] if quick else []

    ssl = train("ssl", "demo_ssl", data, out / "ssl", nproc, ssl_ov)
    ssl_ckpt = list_checkpoints(out / "ssl" / "checkpoints")[-1]
    runs = {}
    for key, (label, recipe, extra) in MODELS.items():
        ov = [*extra, *quick_ov] if key != "hcml" else [f"model.init_from={ssl_ckpt}", *(ssl_ov if quick else [])]
        runs[key] = (label, train(key, recipe, data, out / key, nproc, ov))

    labels = [s.label for s in ds.val]
    steps = {key: s["step"] for key, (_, s) in runs.items()}
    steps["hcml"] += ssl["step"]
    models = {}
    for key, (label, s) in runs.items():
        ev = s["eval"]
        d, n = pair_direction_accuracy(labels, ev["predictions"], pairs)
        models[key] = {"label": label, "top1": ev["top1"], "top5": ev["top5"], "pair_direction": d, "pair_n": n,
                       "per_class": ev["per_class"], "steps": steps[key], "train_seconds": s["seconds"]}
    ssl_cfg = load_config(resolve_recipe("demo_ssl"), ssl_ov)
    bn_note = ("global BN across the processes, as in the paper" if ssl_cfg.train.bn == "global" and
               torch.cuda.is_available() else
               f"BN statistics per process over {ssl_cfg.data.batch_size} clips stand in for the paper's global BN: "
               f"SyncBatchNorm runs only on CUDA")
    rep = {"models": models, "steps": max(steps.values()), "knn": knn_pair(ssl_ckpt, out, k=10),
           "ssl_steps": ssl["step"], "classes": ds.classes, "bn_note": bn_note, "smoke_test": quick}
    if len(set(steps.values())) != 1:
        print(f"[demo] WARNING: the models ran different step counts: {steps}", flush=True)
    video = next((s.path for s in ds.val if ds.classes[s.label] == "pan_left"), ds.val[0].path)
    pngs = run_gradcam(None, str(list_checkpoints(out / "hcml" / "checkpoints")[-1]), [video], str(out / "gradcam"),
                       baseline=str(list_checkpoints(out / "baseline" / "checkpoints")[-1]))
    rep["seconds"] = time.time() - t0
    text = format_report(rep, ds.classes, pairs) + f"\nGrad-CAM++ (baseline above, HCML below): {pngs[0]}"
    (out / "report.txt").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    print("\n" + text)
    print(f"\n[demo] done in {rep['seconds']:.0f}s. Runs (config, metrics.jsonl, curves.png, checkpoints) in {out}; "
          f"numbers in {out / 'report.json'}", flush=True)
    return 0
