"""Config → parts: the one place where a :class:`~hcml.launch.config.Config` becomes a model, data loaders, an
optimizer and precision settings. The training loop, evaluation, the analysis tools and the benchmarks all build
through here, so each rule (which device DALI uses, how large an eval batch is, what ``auto`` means) exists once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hcml.errors import CheckpointError, ConfigError, DatasetError
from hcml.launch import config as C
from hcml.launch.checkpoint import load_checkpoint
from hcml.launch.distributed import GlobalBatchNorm, DistInfo
from hcml.model import HCML
from hcml.pipeline.loader import DataSpec, EvalLoader, TrainLoader, check_decodable, dali_device
from hcml.pipeline.prepared import PreparedDataset, Sample, label_subset, load_prepared, read_class_names


@dataclass(frozen=True)
class Precision:
    """How the model runs on a device, with every ``auto`` resolved."""

    autocast: torch.dtype | None  # None: full precision
    compile: bool
    channels_last: bool

    def autocast_ctx(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def to_input(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of clips moved to ``device`` in the model's memory format."""
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x


def precision(cfg: C.Config, device: torch.device) -> Precision:
    """``train.amp``/``compile``/``channels_last`` with ``auto`` resolved: all on for CUDA, off on CPU."""
    cuda = device.type == "cuda"
    amp = {"auto": "bf16" if cuda else "none"}.get(cfg.train.amp, cfg.train.amp)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    compile_ = cfg.train.compile if cfg.train.compile is not None else cuda
    cl = cfg.train.channels_last if cfg.train.channels_last is not None else cuda
    return Precision(dtype, compile_, cl)


# ------------------------------------------------------------------ data
def data_spec(cfg: C.Config, ds: PreparedDataset | None, device: torch.device) -> DataSpec:
    """The config's data section with ``auto`` resolved: DALI device (GPU when CUDA is usable), clip dtype
    (float16 when a GPU trains in AMP, else float32) and the flip pairs (the dataset's own unless set)."""
    d = cfg.data
    ddev = dali_device(d.device)
    dtype = d.dtype
    if dtype == "auto":
        dtype = "float16" if ddev == "gpu" and precision(cfg, device).autocast is not None else "float32"
    return dataclasses.replace(d, device=ddev, dtype=dtype, flip_pairs=d.flip_pairs or (ds.flip_pairs if ds else []))


def train_videos(cfg: C.Config, ds: PreparedDataset) -> list[Sample]:
    """The training videos a run learns from: all of them, or the labelled share ``data.label_fraction``."""
    return label_subset(ds.train, cfg.data.label_fraction, cfg.data.label_seed)


def train_loader(cfg: C.Config, ds: PreparedDataset, info: DistInfo) -> TrainLoader:
    return TrainLoader(train_videos(cfg, ds), data_spec(cfg, ds, info.device), gop=ds.gop, rank=info.rank,
                       world=info.world, device_id=info.local_rank, seed=cfg.train.seed)


def eval_loader(cfg: C.Config, ds: PreparedDataset, samples: list[Sample], info: DistInfo,
                single_view: bool = False) -> EvalLoader:
    """Multi-view (``data.eval_clips`` x ``data.eval_crops``) or, for features (KNN, Grad-CAM), one centred clip."""
    spec = data_spec(cfg, ds, info.device)
    if single_view:
        spec = dataclasses.replace(spec, eval_clips=1, eval_crops=1)
    return EvalLoader(samples, spec, rank=info.rank, world=info.world, device_id=info.local_rank, gop=ds.gop)


# ------------------------------------------------------------------ model
def model_from_config(cfg: C.Config, num_classes: int, log=print) -> HCML:
    """The network of ``cfg.model`` (its section *is* the model's spec), initialised from ``model.init_from``
    when set: every tensor whose name and shape match is loaded (SSL → joint keeps the backbone, motion module
    and predictors; a new classifier of another size is skipped), and the count is logged."""
    model = HCML(dataclasses.replace(cfg.model, num_classes=num_classes))
    if cfg.model.init_from:
        state = load_checkpoint(cfg.model.init_from)["model"]
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(compatible))
        model.load_state_dict(compatible, strict=False)
        log(f"[init] loaded {len(compatible)} of {len(own)} tensors from {cfg.model.init_from}"
            + (f"; skipped {len(skipped)} (name/shape mismatch): {skipped[:4]}" if skipped else ""))
    return model


def check_compatible(ck: dict, model: nn.Module, path: str | Path, cfg: C.Config) -> None:
    """Refuse, with one line, a checkpoint whose tensors do not fit ``model`` (another architecture, another number
    of classes, motion module on/off) instead of load_state_dict's list of every key."""
    own, theirs = model.state_dict(), ck["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shaped = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
    if not (missing or unexpected or shaped):
        return
    saved = ck.get("config", {}).get("model", {})
    what = ", ".join(f"{k}={saved.get(k)!r} here {getattr(cfg.model, k)!r}" for k in ("arch", "motion")
                     if k in saved and saved[k] != getattr(cfg.model, k))
    first = (f"{shaped[0]} {tuple(theirs[shaped[0]].shape)} vs {tuple(own[shaped[0]].shape)}" if shaped
             else (missing or unexpected)[0])
    raise CheckpointError(f"{path} does not fit this model{' (' + what + ')' if what else ''}: {len(missing)} "
                          f"tensors missing, {len(unexpected)} unexpected, {len(shaped)} of another shape (first: "
                          f"{first}); use the config and dataset it was trained with")


def num_classes(cfg: C.Config, ds: PreparedDataset) -> int:
    return cfg.model.num_classes or ds.num_classes


@dataclass
class Trained:
    """A trained network for inference away from its dataset: ``hcml predict`` and ``hcml export``."""

    cfg: C.Config
    model: HCML
    classes: list[str]
    classes_from: str  # where the names came from: "checkpoint", a classes.txt path, or "indices"


def read_classes(path: str | Path, n: int, what: str) -> list[str]:
    """One class name per line; exactly ``n`` of them (the classifier's outputs)."""
    names = read_class_names(path, what)
    if len(names) != n:
        raise DatasetError(f"{what} {path}: {len(names)} class names, the checkpoint's classifier has {n} outputs")
    return names


def load_for_inference(checkpoint: str, classes_file: str | None = None) -> Trained:
    """The checkpoint's network and its class names, with no dataset needed: the names travel inside checkpoints
    (since 2026-12-03); an older one takes them from ``classes_file``, else from its dataset's classes.txt when
    that is still where it was trained, else they are printed as indices (``class_<i>``)."""
    ck = load_checkpoint(checkpoint)
    cfg = C.from_dict(ck["config"])
    cfg.model.init_from = ""  # the checkpoint holds all the weights
    if "fc.weight" not in ck["model"]:
        raise CheckpointError(f"{checkpoint} has no classifier (fc.weight): not an hcml classification model")
    n = int(ck["model"]["fc.weight"].shape[0])
    model = _restored(ck, cfg, n, checkpoint)
    if classes_file:
        return Trained(cfg, model, read_classes(classes_file, n, "--classes"), str(classes_file))
    if ck.get("classes"):  # a classifier wider than the dataset (model.num_classes) has unnamed outputs
        names = list(ck["classes"])[:n]
        return Trained(cfg, model, names + [f"class_{i}" for i in range(len(names), n)], "checkpoint")
    own = Path(cfg.data.root) / "classes.txt"
    if cfg.data.root and own.is_file():
        try:
            return Trained(cfg, model, read_classes(own, n, "classes of the training dataset"), str(own))
        except DatasetError:
            pass
    return Trained(cfg, model, [f"class_{i}" for i in range(n)], "indices")


def load_trained(checkpoint: str, config_path: str | None = None, overrides: list[str] | None = None
                 ) -> tuple[C.Config, PreparedDataset, HCML]:
    """A trained model with the config it was trained with (or ``config_path``) plus ``overrides``."""
    ck = load_checkpoint(checkpoint)
    cfg = C.from_dict(ck["config"]) if config_path is None else C.load_config(config_path)
    C.apply_overrides(cfg, overrides or [])
    cfg.model.init_from = ""  # the checkpoint holds all the weights
    ds = load_prepared(cfg.data.root)
    return cfg, ds, _restored(ck, cfg, num_classes(cfg, ds), checkpoint)


def _restored(ck: dict, cfg: C.Config, n_classes: int, checkpoint: str | Path) -> HCML:
    """The network of ``cfg`` with the checkpoint's weights, a checkpoint that does not fit refused in one line."""
    model = model_from_config(cfg, n_classes)  # model.init_from is cleared: nothing to log
    check_compatible(ck, model, checkpoint, cfg)
    model.load_state_dict(ck["model"])
    return model


def uses_nce(cfg: C.Config) -> bool:
    """Whether the phase's loss has contrastive terms: SSL always, joint unless lambda = 0, fine-tuning never.
    Without them the step skips computing them (predictors, sampling, scores)."""
    return cfg.train.phase.has_nce(cfg.model.motion, cfg.model.nce_lambda)


def forward_flags(cfg: C.Config) -> dict[str, bool]:
    """What a training step asks the model for: the contrastive terms (when the loss has them) and the logits
    (except in SSL, where the classifier is frozen and the stages only it needs are skipped)."""
    return {"with_nce": uses_nce(cfg), "with_logits": cfg.train.phase.classifies}


def freeze_unused(model: HCML, cfg: C.Config) -> None:
    """Parameters the phase's loss never reaches get no gradient (DDP would wait for them): in SSL the classifier,
    the stages after the last motion level and that level's fusion; without contrastive terms (fine-tuning, joint
    with lambda = 0) the future predictors."""
    unused = [] if cfg.train.phase.classifies else list(model.unused_without_logits())
    if not uses_nce(cfg) and hasattr(model, "predictors"):
        unused.append(model.predictors)
    for module in unused:
        for p in module.parameters():
            p.requires_grad_(False)


def sync_bn(model: nn.Module, cfg: C.Config, info: DistInfo, log=print) -> nn.Module:
    """``train.bn=global``: BN statistics of the whole global batch. On CUDA SyncBatchNorm (apex's when importable);
    elsewhere (CPU/gloo, where torch's SyncBatchNorm refuses to run) :class:`GlobalBatchNorm`, the same arithmetic
    through differentiable all-reduces."""
    if cfg.train.bn != "global" or not info.distributed:
        return model
    if info.device.type != "cuda":
        log("[bn] global BN via hcml's GlobalBatchNorm (all-reduced statistics; SyncBatchNorm runs only on CUDA)")
        return GlobalBatchNorm.convert(model)
    try:  # NGC images ship apex; its SyncBN is the faster one there
        from apex.parallel import convert_syncbn_model

        log("[bn] global BN via apex.parallel.SyncBatchNorm")
        return convert_syncbn_model(model)
    except ImportError:
        log("[bn] global BN via torch.nn.SyncBatchNorm")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def to_device(model: nn.Module, info: DistInfo, prec: Precision) -> nn.Module:
    """The model on this process's device in the memory format its inputs will have."""
    model = model.to(info.device)
    return model.to(memory_format=torch.channels_last_3d) if prec.channels_last else model


def prepare_model(model: nn.Module, cfg: C.Config, info: DistInfo, prec: Precision, log=print) -> nn.Module:
    """Phase freezing, SyncBN, device and memory format: the model as the loop trains it (not yet wrapped)."""
    freeze_unused(model, cfg)
    return to_device(sync_bn(model, cfg, info, log), info, prec)


def build_optimizer(model: nn.Module, cfg: C.Config, info: DistInfo, log=print) -> torch.optim.Optimizer:
    """SGD (the paper; apex FusedSGD on CUDA when importable, else torch's fused/foreach) or AdamW, at
    ``optim.lr_per_gpu x world size`` (the linear scaling rule)."""
    o = cfg.optim
    lr = base_lr(cfg, info)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = info.device.type == "cuda"
    fused = o.fused if o.fused is not None else cuda
    kw = {"fused": True} if fused else {"foreach": True}
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **kw)
    if cuda:
        try:
            from apex.optimizers import FusedSGD

            log("[optim] apex FusedSGD")
            return FusedSGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
        except ImportError:
            pass
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov, **kw)


@dataclass(frozen=True)
class Schedule:
    """Per-iteration linear warm-up then cosine decay to 0 over ``optim.epochs``."""

    total: int
    warmup: int
    base_lr: float

    def lr(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.base_lr)


def schedule(cfg: C.Config, steps_per_epoch: int, info: DistInfo) -> Schedule:
    return Schedule(cfg.optim.epochs * steps_per_epoch, cfg.optim.warmup_epochs * steps_per_epoch,
                    base_lr(cfg, info))


def base_lr(cfg: C.Config, info: DistInfo) -> float:
    """The linear scaling rule: ``optim.lr_per_gpu`` x world size."""
    return cfg.optim.lr_per_gpu * info.world


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Per-iteration linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_runnable(cfg: C.Config, world: int = 1) -> PreparedDataset:
    """What can be checked before any process starts (``hcml train`` runs it before launching torchrun, every
    worker again): the dataset loads, the DALI device exists, a batch fills on every rank, flip pairs exist for
    ``flip=swap``. Raises ConfigError/DatasetError naming the problem and the key."""
    ds = load_prepared(cfg.data.root)
    check_decodable(ds.codecs, dali_device(cfg.data.device), str(Path(cfg.data.root) / "dataset.yaml"))
    n = len(train_videos(cfg, ds))
    if cfg.data.steps_per_epoch(n, world) == 0:  # the loader's own rule
        share = f" (data.label_fraction={cfg.data.label_fraction} of {len(ds.train)})" if n < len(ds.train) else ""
        raise ConfigError(f"{n} training videos in {cfg.data.root}{share} cannot fill one batch of "
                          f"data.batch_size={cfg.data.batch_size} on each of {world} process(es); lower "
                          f"data.batch_size to at most {max(1, n // world)}")
    if cfg.data.keyframe_starts and not ds.gop:
        raise ConfigError(f"data.keyframe_starts=true needs a fixed keyframe interval, and "
                          f"{Path(cfg.data.root) / 'dataset.yaml'} records none (gop): prepare it with "
                          f"`hcml prepare ... --reencode h264|vp9 --gop N`")
    if cfg.data.flip == "swap" and not (cfg.data.flip_pairs or ds.flip_pairs):
        raise ConfigError(f"data.flip=swap needs the label pairs a horizontal flip swaps: set data.flip_pairs or "
                          f"record flip_pairs in {Path(cfg.data.root) / 'dataset.yaml'}")
    try:
        ds.split(cfg.data.eval_split)
    except DatasetError as e:
        raise ConfigError(f"data.eval_split={cfg.data.eval_split}: {e}") from None
    if cfg.model.num_classes and cfg.model.num_classes < ds.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is smaller than the {ds.num_classes} classes "
                          f"of {Path(cfg.data.root) / 'classes.txt'}")
    return ds
