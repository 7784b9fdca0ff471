"""``hcml eval``: multi-view evaluation of a checkpoint with a report (JSON, per-class accuracy, confusion PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hcml.launch.distributed import cleanup, init_distributed
from hcml.launch.train import augment_spec, evaluate, load_trained, resolve_speed_switches
from hcml.pipeline.loader import EvalLoader, dali_device


def plot_confusion(confusion: list[list[int]], classes: list[str], out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(confusion, dtype=float)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 2), max(4, 0.45 * n + 1.5)))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=70, fontsize=7, ha="right")
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


def format_report(res: dict, classes: list[str]) -> str:
    lines = [f"top-1 {res['top1']:.2f}%   top-5 {res['top5']:.2f}%   ({res['videos']} videos)", "per-class top-1:"]
    for c, acc in zip(classes, res["per_class"]):
        lines.append(f"  {c:<40} {acc:6.1f}%")
    return "\n".join(lines)


def run_eval(config_path: str | None, checkpoint: str, overrides: list[str], out: str | None) -> int:
    cfg, ds, model = load_trained(checkpoint, config_path, overrides)
    info = init_distributed()
    num_classes = cfg.model.num_classes or ds.num_classes
    autocast_dtype, _, channels_last = resolve_speed_switches(cfg, info.device)
    model = model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    ddev = dali_device(cfg.data.device)
    out_dir = Path(out) if out else Path(checkpoint).resolve().parent.parent / "eval"
    loader = EvalLoader(ds.val, augment_spec(cfg), batch_size=max(1, cfg.data.batch_size // 2),
                        work_dir=out_dir / "lists", device=ddev, device_id=info.local_rank if ddev == "gpu" else None,
                        rank=info.rank, world=info.world, threads=cfg.data.threads)
    res = evaluate(model, loader, ds.val, num_classes, info, autocast_dtype, channels_last, cfg.train.progress)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps({**res, "classes": ds.classes, "checkpoint": str(checkpoint)},
                                                      indent=1))
        plot_confusion(res["confusion"], ds.classes, out_dir / "confusion.png")
        print(format_report(res, ds.classes))
        print(f"report: {out_dir / 'eval.json'}, {out_dir / 'confusion.png'}")
    cleanup()
    return 0
