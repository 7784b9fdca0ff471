"""One typed config: dataclasses, YAML recipes (with ``base:`` inheritance) and ``key=value`` overrides.

Every value is checked against its field's type; unknown keys and ill-typed values raise
:class:`ConfigError` naming the key and the file (or ``<command line>``) it came from. The config object is
passed explicitly; nothing here is global.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hcml.errors import ConfigError
from hcml.files import atomic_write_text
from hcml.model import ARCHS, HCMLSpec, Phase
from hcml.model.contrastive import NEGATIVES, SAMPLING
from hcml.ops import num_displacements
from hcml.pipeline.loader import DataSpec


@dataclass
class DataConfig(DataSpec):
    """The pipeline's :class:`~hcml.pipeline.loader.DataSpec` (every field documented there) plus the dataset."""

    root: str = ""  # a prepared dataset directory (train.txt, val.txt, classes.txt, dataset.yaml)
    eval_split: str = "val"  # the split a run's final evaluation reports: val (selection) | test (held out)
    # < 1: train on a seeded, class-balanced share of the labelled training videos (the label-scarce protocol:
    # pre-train without labels on all of them, then fine-tune on few); pipeline.prepared.label_subset
    label_fraction: float = 1.0
    label_seed: int = 0  # the subset's seed: fixed apart from train.seed, so every seed trains on the same videos


@dataclass
class ModelConfig(HCMLSpec):
    """The model's :class:`~hcml.model.HCMLSpec` (architecture, motion module, contrastive sampling) plus the
    loss weights and initialisation, which belong to training rather than to the network."""

    num_classes: int = 0  # 0: taken from the dataset's classes.txt
    nce_weights: list[float] = field(default_factory=lambda: [0.25, 0.25, 1.0])  # (gamma1, gamma2, 1)
    nce_lambda: float = 15.0  # lambda of Eq. 5 (joint phase)
    init_from: str = ""  # checkpoint whose model weights initialise this run (SSL → joint, fine-tuning)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (the paper) | adamw (quick CPU demos converge in far fewer steps)
    lr_per_gpu: float = 0.0025  # linearly scaled by world size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    epochs: int = 80
    warmup_epochs: int = 10
    fused: Optional[bool] = None  # None: fused/foreach where available


@dataclass
class TrainConfig:
    phase: Phase = Phase.JOINT  # ssl | joint | finetune (model.losses.Phase says what each one trains)
    max_steps: int = 0  # >0: stop after this many optimizer steps (checkpoint included)
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | none | bf16 | fp16
    compile: Optional[bool] = None  # None: on for CUDA, off on CPU
    compile_mode: str = "default"
    channels_last: Optional[bool] = None  # None: on for CUDA
    bn: str = "global"  # global (SyncBN across ranks, CUDA only) | local (per-process statistics)
    deterministic: bool = False
    log_every: int = 10
    eval_every: int = 0  # epochs between evaluations; 0: only at the end
    grad_clip: float = 0.0
    progress: bool = True
    stall_timeout_s: float = 300.0  # no step on any rank for this long: end the job naming the stalled rank(s),
    #                                 so torchrun can restart it (0: never). Must exceed the slowest step, first
    #                                 compile and a checkpoint save included.


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at epoch end
    keep: int = 3


@dataclass
class MetricsConfig:
    port: int = 0  # Prometheus port base (rank i uses port + local_rank); 0 = off
    next_free_port: bool = True  # if the port is taken, use the next free one (and say which)
    tensorboard: bool = False  # also write every metrics.jsonl series as TensorBoard scalars, RUN_DIR/tensorboard/


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run_dir: str = "runs/default"


_CHOICES = {
    "data.flip": ("none", "plain", "swap"),
    "data.eval_split": ("val", "test"),
    "data.device": ("auto", "cpu", "gpu"),
    "data.dtype": ("auto", "float32", "float16"),
    "optim.name": ("sgd", "adamw"),
    "model.arch": tuple(sorted(ARCHS)),
    "model.nce_negatives": NEGATIVES,
    "model.nce_sampling": SAMPLING,
    "train.amp": ("auto", "none", "bf16", "fp16"),
    "train.bn": ("global", "local"),
}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{source}: key '{key}' must be one of {tuple(m.value for m in tp)}, got {value!r}") \
                from None
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the types above are used
        raise ConfigError(f"{source}: key '{key}' has unsupported type {tp}")
    raise ConfigError(f"{source}: key '{key}' expects {tp.__name__}, got {value!r} ({type(value).__name__})")


def _merge(obj: Any, data: dict, source: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{key}' (valid here: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, source, key + ".")
        else:
            v = _coerce(v, hints[k], key, source)
            if key in _CHOICES and v not in _CHOICES[key]:
                raise ConfigError(f"{source}: key '{key}' must be one of {_CHOICES[key]}, got {v!r}")
            setattr(obj, k, v)


def _load_yaml_chain(path: Path, seen: tuple = ()) -> list[tuple[dict, str]]:
    """The recipe and its ``base:`` ancestors, oldest first."""
    if path in seen:
        raise ConfigError(f"{path}: 'base' inheritance cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    chain = _load_yaml_chain((path.parent / base).resolve(), seen + (path,)) if base else []
    return chain + [(data, str(path))]


def parse_overrides(items: list[str]) -> dict:
    """``["train.max_steps=5", "data.short_side=[64,80]"]`` → nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"<command line>: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"<command line>: value of '{key}' is not parseable: {raw!r}") from e
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def recipe_dir() -> Path:
    """The shipped recipes (``configs/`` in the repository, package data ``hcml.configs`` in any install)."""
    from importlib.resources import files

    return Path(str(files("hcml.configs")))


def resolve_recipe(name: str | None) -> str | None:
    """A YAML path as given, or a shipped recipe by name (``demo`` → ``<recipes>/demo.yaml``)."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return str(p)
    for cand in (recipe_dir() / name, recipe_dir() / f"{name}.yaml"):
        if cand.is_file():
            return str(cand)
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        return str(p)  # load_config reports the missing file by name
    known = sorted(q.stem for q in recipe_dir().glob("*.yaml"))
    raise ConfigError(f"no config file {name!r} and no shipped recipe of that name (recipes: {', '.join(known)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, a YAML recipe chain and command-line overrides (in that order)."""
    cfg = Config()
    if path is not None:
        for data, source in _load_yaml_chain(Path(path).resolve()):
            _merge(cfg, data, source)
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides in place, then re-validate."""
    if overrides:
        _merge(cfg, parse_overrides(overrides), "<command line>")
    validate(cfg)
    return cfg


REQUIRED = "REQUIRED"  # a recipe's blank that the user must fill in (e.g. the checkpoint a fine-tune starts from)


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    d, m = cfg.data, cfg.model
    blanks = [k for k, v in _flat(to_dict(cfg)).items() if v == REQUIRED]
    if blanks:
        raise ConfigError(f"{', '.join(blanks)} must be set: the recipe leaves it for you (e.g. "
                          f"{blanks[0]}=/runs/k400_r2d50_joint/checkpoints/ckpt_<step>.pt)")
    if d.frames < 2:
        raise ConfigError(f"data.frames must be >= 2 (motion needs frame pairs), got {d.frames}")
    if len(d.short_side) != 2 or d.short_side[0] > d.short_side[1]:
        raise ConfigError(f"data.short_side must be [min, max], got {d.short_side}")
    if d.short_side[0] < d.crop:
        raise ConfigError(f"data.short_side min {d.short_side[0]} is smaller than data.crop {d.crop}")
    if d.eval_crops not in (1, 3):
        raise ConfigError(f"data.eval_crops must be 1 or 3, got {d.eval_crops}")
    for key in ("batch_size", "threads", "prefetch", "readers"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(d, key)}")
    for p in d.flip_pairs:
        if len(p) != 2:
            raise ConfigError(f"data.flip_pairs entries must be [a, b], got {p}")
    try:
        num_displacements(m.max_displacement, m.cv_stride)
    except ValueError as e:
        raise ConfigError(f"model.max_displacement={m.max_displacement} must be a non-negative multiple of "
                          f"model.cv_stride={m.cv_stride} ({e})") from None
    if len(m.nce_weights) != 3:
        raise ConfigError(f"model.nce_weights needs 3 values (low, mid, high), got {m.nce_weights}")
    if m.motion and cfg.train.phase.predicts_future and d.frames // 4 < 2:
        raise ConfigError(f"data.frames={d.frames}: the high motion level runs at T/4 frames and predicting the "
                          f"future needs at least 2 there, so data.frames must be >= 8 (or train.phase=finetune)")
    o, t = cfg.optim, cfg.train
    for key, value, ok, need in (
            ("optim.lr_per_gpu", o.lr_per_gpu, o.lr_per_gpu > 0, "> 0"),
            ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
            ("optim.epochs", o.epochs, o.epochs >= 1, ">= 1"),
            ("optim.warmup_epochs", o.warmup_epochs, 0 <= o.warmup_epochs <= o.epochs, "in [0, optim.epochs]"),
            ("train.max_steps", t.max_steps, t.max_steps >= 0, ">= 0 (0: no limit)"),
            ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
            ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0: off)"),
            ("train.stall_timeout_s", t.stall_timeout_s, t.stall_timeout_s >= 0, ">= 0 (0: off)"),
            ("checkpoint.every_steps", cfg.checkpoint.every_steps, cfg.checkpoint.every_steps >= 0, ">= 0"),
            ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep >= 1, ">= 1"),
            ("data.crop", d.crop, d.crop >= 8, ">= 8"),
            ("data.stride", d.stride, d.stride >= 1, ">= 1"),
            ("data.label_fraction", d.label_fraction, 0 < d.label_fraction <= 1, "in (0, 1]")):
        if not ok:
            raise ConfigError(f"{key} must be {need}, got {value}")
    if cfg.train.phase is Phase.SSL and d.label_fraction < 1:
        raise ConfigError(f"data.label_fraction={d.label_fraction} with train.phase=ssl: the self-supervised phase "
                          "uses no labels and trains on every training video; set it for the joint or finetune "
                          "phase that follows")
    if cfg.train.phase is Phase.SSL and not m.motion:
        raise ConfigError("train.phase=ssl needs model.motion=true (the SSL losses live in the motion module)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def to_dict(cfg: Config) -> dict:
    """Plain values only (enums as their names in YAML), for YAML and checkpoints."""
    return dataclasses.asdict(cfg, dict_factory=lambda kv: {k: v.value if isinstance(v, enum.Enum) else v
                                                            for k, v in kv})


def fingerprint(cfg: Config) -> str:
    """A digest of every setting: two runs with the same fingerprint are the same training."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def dump_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(data: dict, source: str = "<checkpoint>") -> Config:
    cfg = Config()
    _merge(cfg, data, source)
    return cfg
