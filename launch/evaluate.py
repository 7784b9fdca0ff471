"""Multi-view evaluation (:func:`evaluate`, used by the training loop too) and ``hcml eval``: a checkpoint's report
(JSON, per-class accuracy, confusion PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hcml.files import atomic_write_text
from hcml.launch import components
from hcml.launch.distributed import DistInfo, all_gather_objects, cleanup, init_distributed
from hcml.pipeline.loader import EvalLoader


@torch.no_grad()
def per_video(rows: list[torch.Tensor], values: dict[str, list[torch.Tensor]], n_videos: int, views: int,
              info: DistInfo) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every rank's eval batches gathered: ``rows`` are view indices (video = row // views), ``values`` per-view
    tensors by name. Returns each value summed per video and how many views of each video came. A view that came
    twice is a sharding error (raised: it would bias the averages)."""
    local = (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
             {k: torch.cat(v) for k, v in values.items() if v})
    sums: dict[str, torch.Tensor] = {}
    seen = torch.zeros(n_videos * views, dtype=torch.long)
    for r, vals in all_gather_objects(local, info):
        seen.index_add_(0, r, torch.ones_like(r))
        for k, v in vals.items():
            if k not in sums:
                sums[k] = torch.zeros(n_videos, *v.shape[1:])
            sums[k].index_add_(0, r // views, v)
    if seen.numel() and seen.max() > 1:
        raise RuntimeError(f"eval sharding error: a view seen {seen.max()} times (expected once)")
    return sums, seen.view(n_videos, views).sum(1)


@torch.no_grad()
def score_views(model: nn.Module, clips: torch.Tensor, prec: components.Precision, device: torch.device
                ) -> torch.Tensor:
    """Class probabilities of a batch of views (B, crops, 3, T, H, W): the softmax averaged over each view's
    crops, (B, classes) on the CPU. A video's score is the mean over its views (``hcml eval``, ``hcml predict``)."""
    B, V = clips.shape[:2]
    x = prec.to_input(clips.reshape(B * V, *clips.shape[2:]), device)
    with prec.autocast_ctx(device):
        logits = model(x, with_nce=False)["logits"]
    return logits.float().softmax(-1).view(B, V, -1).mean(1).cpu()


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 % per class (NaN for a class with no video)."""
    return [float((pred[labels == c] == c).float().mean() * 100) if (labels == c).any() else float("nan")
            for c in range(num_classes)]


def evaluate(model: nn.Module, loader: EvalLoader, samples, num_classes: int, info: DistInfo,
             prec: components.Precision, progress: bool = False, on_batch=None) -> dict:
    """Multi-view testing: softmax averaged over K clips × crops per video, every view at most once over all ranks
    (twice raises). A video none of whose views came (DALI could not open it) is left out and counted in
    ``skipped``. Returns top-1/top-5 (%) over the evaluated videos, per-class top-1, confusion, predictions."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    rows, scores = [], []
    for clips, r in tqdm(loader, desc="eval", disable=not (progress and info.main), leave=False):
        rows.append(r.cpu())
        scores.append(score_views(model, clips, prec, info.device))
        if on_batch:
            on_batch()  # progress for the stall watchdog
    model.train(was_training)
    sums, views = per_video(rows, {"scores": scores}, len(samples), loader.spec.eval_clips, info)
    present = views > 0
    labels = torch.tensor([s.label for s in samples])[present]
    video_scores = sums.get("scores", torch.zeros(len(samples), num_classes))[present]
    top5 = video_scores.topk(min(5, num_classes), dim=1).indices
    pred = top5[:, 0]
    per_class = per_class_accuracy(pred, labels, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return {"top1": float((pred == labels).float().mean() * 100),
            "top5": float((top5 == labels[:, None]).any(1).float().mean() * 100),
            "per_class": per_class, "confusion": confusion.tolist(), "videos": int(present.sum()),
            "skipped": int((~present).sum()), "predictions": pred.tolist()}


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
    skipped = f", {res['skipped']} unreadable videos skipped" if res.get("skipped") else ""
    lines = [f"top-1 {res['top1']:.2f}%   top-5 {res['top5']:.2f}%   ({res['videos']} videos{skipped})",
             "per-class top-1:"]
    for c, acc in zip(classes, res["per_class"]):
        lines.append(f"  {c:<40} {acc:6.1f}%")
    return "\n".join(lines)


def run_eval(config_path: str | None, checkpoint: str, overrides: list[str], out: str | None) -> int:
    cfg, ds, model = components.load_trained(checkpoint, config_path, overrides)
    info = init_distributed()
    prec = components.precision(cfg, info.device)
    model = components.to_device(model, info, prec)
    out_dir = Path(out) if out else Path(checkpoint).resolve().parent.parent / "eval"
    samples = ds.split(cfg.data.eval_split)  # data.eval_split=test: the held-out split
    loader = components.eval_loader(cfg, ds, samples, info)
    res = evaluate(model, loader, samples, components.num_classes(cfg, ds), info, prec, cfg.train.progress)
    res["split"] = cfg.data.eval_split
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "eval.json", json.dumps({**res, "classes": ds.classes,
                                                             "checkpoint": str(checkpoint)}, indent=1))
        plot_confusion(res["confusion"], ds.classes, out_dir / "confusion.png")
        print(format_report(res, ds.classes))
        print(f"report: {out_dir / 'eval.json'}, {out_dir / 'confusion.png'}")
    cleanup()
    return 0
