"""Config: recipes, inheritance, overrides; every error names the key and where it came from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hcml.launch.config import ConfigError, load_config
from tests.conftest import PY, REPO


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_recipe_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  arch: tiny\ndata:\n  frames: 8\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ndata:\n  batch_size: 4\n")
    cfg = load_config(child, ["train.max_steps=5", "data.short_side=[300, 330]", "optim.lr_per_gpu=1",
                              "optim.weight_decay=1e-5"])
    assert cfg.optim.weight_decay == 1e-5
    assert cfg.model.arch == "tiny"
    assert cfg.data.frames == 8
    assert cfg.data.batch_size == 4
    assert cfg.train.max_steps == 5
    assert cfg.data.short_side == [300, 330]
    assert cfg.optim.lr_per_gpu == 1.0
    assert isinstance(cfg.optim.lr_per_gpu, float)
    assert cfg.optim.momentum == 0.9  # untouched default


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", "data:\n  frame: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'data\.frame'"):
        load_config(p)


def test_ill_typed_value_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", "data:\n  frames: sixteen\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'data\.frames' expects int, got 'sixteen'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"<command line>: key 'train\.compile' expects bool"):
        load_config(None, ["train.compile=maybe"])
    with pytest.raises(ConfigError, match=r"key 'model\.arch' must be one of"):
        load_config(None, ["model.arch=resnet9000"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.max_steps"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="model.max_displacement=5 must be a non-negative multiple of model.cv_stride=2"):
        load_config(None, ["model.max_displacement=5"])
    with pytest.raises(ConfigError, match="data.frames must be >= 8"):
        load_config(None, ["data.frames=4"])
    load_config(None, ["data.frames=4", "train.phase=finetune"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_all_shipped_recipes_load():
    from hcml.launch.config import recipe_dir, resolve_recipe

    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 8
    assert recipe_dir().samefile(REPO / "configs")
    blanks = {"ucf101_r2d50_finetune": ["model.init_from=/runs/k400/ckpt_00000001.pt"]}  # left for the user
    for r in recipes:
        ov = blanks.get(r.stem, [])
        load_config(r, ov)
        assert load_config(resolve_recipe(r.stem), ov) == load_config(r, ov)  # found by name, from the package data
    with pytest.raises(ConfigError, match="model.init_from must be set"):
        load_config(REPO / "configs/ucf101_r2d50_finetune.yaml")
    with pytest.raises(ConfigError, match="no shipped recipe of that name"):
        resolve_recipe("k400_r2d5O_joint")


def test_numeric_bounds_are_named():
    for ov, msg in (("optim.lr_per_gpu=-0.1", "optim.lr_per_gpu must be > 0, got -0.1"),
                    ("optim.warmup_epochs=90", r"optim.warmup_epochs must be in \[0, optim.epochs\], got 90"),
                    ("train.stall_timeout_s=-1", "train.stall_timeout_s must be >= 0"),
                    ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [ov])


def test_cli_rejects_bad_config_before_any_process_starts(tmp_path):
    res = subprocess.run([PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--nproc-per-node", "2",
                          "data.frams=8"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "unknown key 'data.frams'" in res.stderr
    assert "torch.distributed" not in res.stderr
    assert "rank" not in res.stdout.lower()


def test_phase_is_a_typed_value(tmp_path):
    """train.phase is a Phase: what each phase's loss holds is asked of it (one place), it round-trips through
    YAML and checkpoints as its plain name, and a wrong name is refused with the choices."""
    from hcml.launch.config import dump_config, load_config, to_dict
    from hcml.model import Phase

    cfg = load_config(None, ["train.phase=ssl", "model.motion=true"])
    assert cfg.train.phase is Phase.SSL
    assert not cfg.train.phase.classifies
    assert Phase.JOINT.has_nce(True, 0.1)
    assert not Phase.JOINT.has_nce(True, 0.0)  # lambda = 0: the motion module trains by classification only
    assert not Phase.FINETUNE.has_nce(True, 15.0)
    assert Phase.SSL.has_nce(True, 0.0)
    assert not Phase.SSL.has_nce(False, 1.0)
    assert to_dict(cfg)["train"]["phase"] == "ssl"
    assert f"{cfg.train.phase}" == "ssl"
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")).train.phase is Phase.SSL
    with pytest.raises(ConfigError, match=r"train.phase' must be one of \('ssl', 'joint', 'finetune'\), got 'pretrain'"):
        load_config(None, ["train.phase=pretrain"])
