"""The paper's evidence tools: per-level KNN on motion features (Table 7) and Grad-CAM++ maps (Fig. 6).

Grad-CAM++ is implemented here (about 30 lines) rather than taken from PyPI's ``grad-cam``: that package pulls
torchvision and OpenCV, and PyPI's torchvision does not import beside the CPU torch wheel this project pins.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hcml.errors import ConfigError, DatasetError
from hcml.files import atomic_write_text
from hcml.launch import components
from hcml.launch.distributed import DistInfo, all_gather_objects, cleanup, init_distributed
from hcml.launch.evaluate import per_class_accuracy, per_video
from hcml.model import LEVELS
from hcml.pipeline.loader import DALI_CODECS, EvalLoader


# ---------------------------------------------------------------- KNN (Table 7)
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int,
                num_classes: int, *, test_chunk: int = 1024, train_chunk: int = 32768) -> torch.Tensor:
    """Cosine KNN: each test vector votes with its k most similar train vectors (votes weighted by similarity,
    which breaks ties towards the closer neighbours).

    Blocked: similarities exist for one (test_chunk x train_chunk) block at a time and a running top-k is kept,
    so memory is O(test_chunk·train_chunk + n_test·k) instead of the dense n_test x n_train matrix (20k x 240k
    fp32 at Kinetics scale: 19 GB). Runs on the device the features are on (the GPU when there is one)."""
    a, b = F.normalize(test.float(), dim=1), F.normalize(train.float(), dim=1)
    k = min(k, b.shape[0])
    labels = train_labels.to(a.device)
    preds = []
    for t0 in range(0, a.shape[0], test_chunk):
        q = a[t0:t0 + test_chunk]
        top = torch.full((q.shape[0], 0), -2.0, device=a.device)
        idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=a.device)
        for s0 in range(0, b.shape[0], train_chunk):
            sim = q @ b[s0:s0 + train_chunk].t()
            bt, bi = sim.topk(min(k, sim.shape[1]), dim=1)
            top, order = torch.cat([top, bt], 1).topk(min(k, top.shape[1] + bt.shape[1]), dim=1)
            idx = torch.cat([idx, bi + s0], 1).gather(1, order)
        votes = torch.zeros(q.shape[0], num_classes, device=a.device)
        votes.scatter_add_(1, labels[idx], top.clamp_min(0) + 1e-6)
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)


def knn_table(feats_train: dict[str, torch.Tensor], y_train: torch.Tensor, feats_val: dict[str, torch.Tensor],
              y_val: torch.Tensor, classes: list[str], k: int = 20, info: DistInfo | None = None) -> dict:
    """Per level: accuracy, per-class accuracy and the 3 classes of largest gain over the level below
    (for the low level, the 3 most accurate classes), as in the paper's Table 7. With ``info`` of several ranks,
    each rank scores its contiguous shard of the val set and the predictions are gathered."""
    n = len(classes)
    out = {"random_accuracy": 100.0 / n, "k": k, "classes": list(classes), "levels": {}}
    info = info or DistInfo()
    shard = slice(len(y_val) * info.rank // info.world, len(y_val) * (info.rank + 1) // info.world)
    prev = None
    for lv in [lv for lv in LEVELS if lv in feats_train]:
        dev = info.device
        mine = knn_predict(feats_train[lv].to(dev), y_train, feats_val[lv][shard].to(dev), k, n)
        pred = torch.cat(all_gather_objects(mine, info))
        per = per_class_accuracy(pred, y_val, n)
        valid = [c for c in range(n) if not np.isnan(per[c])]
        if prev is None:
            top = sorted(valid, key=lambda c: -per[c])[:3]
            best = [{"class": classes[c], "accuracy": per[c]} for c in top]
        else:
            top = sorted(valid, key=lambda c: (-(per[c] - prev[c]), -per[c]))[:3]
            best = [{"class": classes[c], "from": prev[c], "to": per[c]} for c in top]
        out["levels"][lv] = {"accuracy": float((pred == y_val).float().mean() * 100), "per_class": per, "top": best}
        prev = per
    return out


def format_knn_table(t: dict) -> str:
    lines = [f"KNN (k={t['k']}) on motion features per level; random output {t['random_accuracy']:.1f}%",
             f"{'level':<8}{'acc %':>7}   classes with the largest gain (low: highest accuracy)"]
    for lv, r in t["levels"].items():
        tops = ", ".join(f"\"{b['class']}\" ({b['accuracy']:.1f})" if "accuracy" in b else
                         f"\"{b['class']}\" ({b['from']:.1f} → {b['to']:.1f})" for b in r["top"])
        lines.append(f"{lv:<8}{r['accuracy']:>7.1f}   {tops}")
    return "\n".join(lines)


@torch.no_grad()
def extract_level_features(model, loader, info: DistInfo, n_videos: int, views: int = 1) -> dict[str, torch.Tensor]:
    """Globally pooled, L2-normalised per-level motion features per video (views averaged), all ranks gathered.
    ``loader``: an :class:`EvalLoader` or the list of its batches (decoded once, scored by several models)."""
    model.eval()
    rows, feats = [], {lv: [] for lv in LEVELS}
    for clips, r in loader:
        B, V = clips.shape[:2]
        x = clips.reshape(B * V, *clips.shape[2:]).to(info.device)
        f = model.motion_features(x)
        for lv in LEVELS:
            feats[lv].append(F.normalize(f[lv].float().mean(dim=(2, 3, 4)), dim=1).view(B, V, -1).mean(1).cpu())
        rows.append(r.cpu())
    views = loader.spec.eval_clips if isinstance(loader, EvalLoader) else views
    sums, _ = per_video(rows, feats, n_videos, views, info)
    return {lv: F.normalize(v, dim=1) for lv, v in sums.items()}


@torch.no_grad()
def calibrate_bn(model, loader: EvalLoader, info: DistInfo) -> None:
    """A fair random-initialisation reference: BatchNorm statistics measured on the training clips (a cumulative
    average over one pass, no weight changes), as a trained network's are. Without it, BN normalises with its
    initial statistics (0, 1), which no training ever leaves, and the reference is weaker than random features are."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    for clips, _ in loader:
        model.motion_features(clips.reshape(-1, *clips.shape[2:]).to(info.device))
    model.eval()


def _load_motion_model(checkpoint: str, config_path: str | None, overrides: list[str]):
    cfg, ds, model = components.load_trained(checkpoint, config_path, overrides)
    if not cfg.model.motion:
        raise ConfigError(f"{checkpoint}: motion features need a model trained with model.motion=true")
    return cfg, ds, model


def run_knn(config_path: str | None, checkpoint: str, overrides: list[str], k: int = 20, out: str | None = None,
            as_json: bool = False, random_init: bool = False) -> dict:
    """``hcml knn``: features of the training set and of ``data.eval_split`` (val, or the held-out test split;
    centre crop, 1 clip), cosine KNN per level.
    ``random_init``: the checkpoint's network at random initialisation (seed ``train.seed``) instead of its
    weights: the reference any self-supervised feature must beat."""
    return knn_many([checkpoint], config_path, overrides, k, [out], as_json, random_init=random_init)[0]


KEEP_BYTES = 2 << 30  # decoded clips knn_many keeps for several models at most


def knn_many(checkpoints: list[str], config_path: str | None, overrides: list[str], k: int, outs: list,
             as_json: bool | None = None, random_init: bool = False) -> list[dict]:
    """:func:`run_knn` for several checkpoints of one data setting, each video decoded once when the decoded
    clips fit in ``KEEP_BYTES`` (the demo's: ~130 MB): every model then scores the same kept batches, so the tables
    equal separate runs'; otherwise each pass decodes again. With ``random_init`` the first checkpoint's network
    at random init (BN calibrated on the training clips) stands in for that checkpoint."""
    cfg, ds, model = _load_motion_model(checkpoints[0], config_path, overrides)
    if not 1 <= k <= len(ds.train):
        raise ConfigError(f"--k {k}: needs 1 <= k <= the {len(ds.train)} training videos of {cfg.data.root}")
    info = init_distributed()
    query = ds.split(cfg.data.eval_split)
    sets = {"train": ds.train, "query": query}
    passes = len(checkpoints) + int(random_init)  # passes over the training clips (calibration included)
    clip_bytes = 4 * 3 * cfg.data.frames * cfg.data.crop ** 2
    keep = passes > 1 and (len(ds.train) + len(query)) * clip_bytes <= KEEP_BYTES

    def source(split):
        loader = components.eval_loader(cfg, ds, sets[split], info, single_view=True)
        return list(loader) if keep else loader

    batches = {split: source(split) for split in sets} if keep else None
    jobs = []  # (model, checkpoint, out, random init)
    if random_init:
        torch.manual_seed(cfg.train.seed)
        rand = components.model_from_config(cfg, components.num_classes(cfg, ds)).to(info.device)
        if keep and info.world == 1:
            calibrate_bn(rand, batches["train"], info)
        else:  # every rank calibrates on all training clips, not its shard
            whole = DistInfo(device=info.device, local_rank=info.local_rank)
            calibrate_bn(rand, components.eval_loader(cfg, ds, ds.train, whole, single_view=True), info)
        jobs.append((rand, checkpoints[0], outs[0], True))
    else:
        jobs.append((model, checkpoints[0], outs[0], False))
    for ck, out in zip(checkpoints[1:], outs[1:]):
        other, _, net = _load_motion_model(ck, config_path, overrides)
        if other.data != cfg.data:  # the kept clips are the first checkpoint's data setting
            diff = [f.name for f in dataclasses.fields(cfg.data)
                    if getattr(cfg.data, f.name) != getattr(other.data, f.name)]
            raise ConfigError(f"{ck}: data.{', data.'.join(diff)} differ from {checkpoints[0]}'s; run hcml knn on it "
                              f"separately")
        jobs.append((net, ck, out, False))
    tables = []
    for net, ck, out, rnd in jobs:
        net = net.to(info.device)
        feats = {split: extract_level_features(net, batches[split] if keep else source(split), info,
                                               len(sets[split])) for split in sets}
        table = knn_table(feats["train"], torch.tensor([s.label for s in ds.train]), feats["query"],
                          torch.tensor([s.label for s in query]), ds.classes, k, info)
        table["split"] = cfg.data.eval_split
        table["random_init_calibrated"] = rnd  # BN statistics of the random network set on training clips
        if info.main:
            work = Path(out or Path(ck).resolve().parent.parent / "knn")
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_text(work / "knn.json", json.dumps(table, indent=1))
            if as_json is not None:  # None: the caller prints
                print(json.dumps(table, indent=1) if as_json else format_knn_table(table))
                print(f"wrote {work / 'knn.json'}", file=sys.stderr if as_json else sys.stdout)
        tables.append(table)
    cleanup()
    return tables


# ---------------------------------------------------------------- Grad-CAM++ (Fig. 6)
def unique_stems(paths: list[str]) -> dict[str, str]:
    """A file-name stem per path, unique among ``paths``: the name, or with as many parent folders as it takes
    to tell clashing ones apart (``train_move_left_0000`` vs ``val_move_left_0000``); the suffix stays where only
    it differs (``cam.mp4`` vs ``cam.webm``)."""
    def name(p: str, keep_suffix: bool) -> str | None:
        def parts(q: str) -> tuple[str, ...]:
            return (Path(q) if keep_suffix else Path(q).with_suffix("")).parts

        own, others = parts(p), [parts(q) for q in paths if q != p]
        k = next((k for k in range(1, len(own) + 1) if all(o[-k:] != own[-k:] for o in others)), None)
        return None if k is None else "_".join(own[-k:]).lstrip("/_") or "video"

    return {p: name(p, False) or name(p, True) or "video" for p in paths}


def gradcam_pp(model, clip: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """Grad-CAM++ of the last convolution (end of res5) for class ``target`` (default: predicted).

    clip: (1, 3, T, H, W). Returns (T_out, H, W) maps in [0, 1] upsampled to the clip's frames and size, and the
    class used. Weights per channel follow Chattopadhyay et al. (α from 2nd/3rd powers of the gradient of
    exp(score), positive gradients only)."""
    model.eval()
    acts = {}
    last = list(model.backbone.stages.values())[-1]
    h = last.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        logits = model(clip, with_nce=False)["logits"]
    finally:
        h.remove()
    cls = int(logits.argmax(1)) if target is None else int(target)
    a = acts["a"]
    (g,) = torch.autograd.grad(logits[0, cls], a)
    g, a = g[0], a[0]  # (C, T, h, w)
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + (a * g3).sum(dim=(1, 2, 3), keepdim=True)
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    w = (alpha * F.relu(g)).sum(dim=(1, 2, 3), keepdim=True)
    cam = F.relu((w * a).sum(0))  # (T', h, w)
    cam = F.interpolate(cam[None, None], size=clip.shape[2:], mode="trilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / cam.max().clamp_min(1e-8)
    return cam.detach().cpu().numpy(), cls


def _overlay(frame: np.ndarray, cam: np.ndarray) -> np.ndarray:
    import matplotlib

    heat = matplotlib.colormaps["jet"](cam)[..., :3]
    return np.clip(0.55 * frame / 255.0 + 0.45 * heat, 0, 1)


def save_gradcam_strip(rows: list[dict], out_png: str | Path, max_frames: int = 8) -> Path:
    """One row per model: frames with the heat-map overlay; the title gives the model and its prediction,
    green when correct, red when wrong (black when the true label is unknown), as in Fig. 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = rows[0]["frames"].shape[0]
    ts = np.linspace(0, T - 1, min(T, max_frames)).round().astype(int)
    fig, axes = plt.subplots(len(rows), len(ts), figsize=(1.6 * len(ts), 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for j, t in enumerate(ts):
            ax = axes[r, j]
            ax.imshow(_overlay(row["frames"][t], row["cam"][t]))
            ax.set_xticks([])
            ax.set_yticks([])
        color = {True: "green", False: "red", None: "black"}[row.get("correct")]
        axes[r, 0].set_title(f"{row['name']}: {row['pred']}", loc="left", fontsize=9, color=color)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def run_gradcam(config_path: str | None, checkpoint: str, videos: list[str], out: str,
                baseline: str | None = None, overrides: list[str] | None = None, target: int | None = None) -> list[Path]:
    """``hcml gradcam``: a PNG strip per video (HCML, and the baseline above it when given). Each video's centred
    clip comes from DALI where its decoder reads the codec on this device, else from PyAV with the same frames,
    crop and colour conversion (``pipeline/rawvideo.py``, as ``hcml predict``): an H.264 MP4 or a frame folder
    on a CPU machine."""
    from hcml.pipeline.prepared import Sample
    from hcml.pipeline.prepare import probe_video
    from hcml.pipeline.rawvideo import decode_views

    cfg, ds, model = _load_motion_model(checkpoint, config_path, overrides or [])
    models = [("HCML", model)]
    if baseline:
        models.insert(0, ("Baseline", components.load_trained(baseline)[2]))
    info = DistInfo.local()
    device = info.device
    models = [(name, m.to(device)) for name, m in models]
    known = {s.path: s for s in ds.train + ds.val}
    out_dir = Path(out)
    spec = dataclasses.replace(components.data_spec(cfg, ds, device), eval_clips=1, eval_crops=1)
    probes = {}
    for v in videos:  # every video checked before any work: missing or unreadable
        path = str(Path(v).resolve())
        pr = probe_video(path, timestamps="any")
        if not pr.ok:
            raise DatasetError(f"--videos {v}: {pr.reason}{': ' + pr.detail if pr.detail else ''}")
        probes[path] = pr
    out_dir.mkdir(parents=True, exist_ok=True)
    names = unique_stems(list(probes))
    written = []
    for path, pr in probes.items():
        s = known.get(path) or Sample(path, -1, pr.frames)
        if pr.codec in DALI_CODECS[spec.device]:
            loader = components.eval_loader(cfg, ds, [Sample(s.path, max(s.label, 0), s.num_frames)], info,
                                            single_view=True)
            clips, _ = next(iter(loader))
            clip = clips[0, :1].float().to(device)  # (1, 3, T, H, W)
        else:  # DALI's decoder here does not read this codec
            try:
                clip = decode_views(path, s.num_frames, spec, threads=spec.threads)[0][0].to(device)
            except OSError as e:
                raise DatasetError(f"--videos {path}: {e}") from None
        mean = torch.tensor(cfg.data.mean).view(3, 1, 1, 1)
        std = torch.tensor(cfg.data.std).view(3, 1, 1, 1)
        frames = ((clip[0].cpu() * std + mean) * 255).clamp(0, 255).permute(1, 2, 3, 0).numpy()
        rows = []
        for name, m in models:
            cam, cls = gradcam_pp(m, clip, target)
            rows.append({"name": name, "frames": frames, "cam": cam, "pred": ds.classes[cls],
                         "correct": None if s.label < 0 else cls == s.label})
        png = out_dir / f"gradcam_{names[path]}.png"
        save_gradcam_strip(rows, png)
        written.append(png)
    return written
