"""The synthetic set: deterministic, motion-only (appearance-blind), classes really move as named."""

from __future__ import annotations

import numpy as np
import pytest

from hcml.pipeline import synth
from hcml.errors import DatasetError
from hcml.pipeline.prepared import load_prepared


def frame_features(clip: np.ndarray) -> np.ndarray:
    """Per-frame mean, std and 8-bin colour histogram per channel: (T, 3 + 3 + 24)."""
    f = clip.astype(np.float32) / 255
    T = f.shape[0]
    mean = f.reshape(T, -1, 3).mean(1)
    std = f.reshape(T, -1, 3).std(1)
    hist = np.concatenate([np.stack([np.histogram(f[t, ..., c], bins=8, range=(0, 1))[0] for t in range(T)])
                           for c in range(3)], 1) / (f.shape[1] * f.shape[2])
    return np.concatenate([mean, std, hist], 1)


def frame_classifier_accuracy(train, val, n_classes: int) -> float:
    """Nearest-class-centroid on standardised per-frame features; a clip's vote is the mean frame score."""
    Xtr = np.concatenate([frame_features(c) for c, _ in train])
    ytr = np.concatenate([[y] * len(c) for c, y in train])
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    cents = np.stack([((Xtr[ytr == k] - mu) / sd).mean(0) for k in range(n_classes)])
    hits = 0
    for clip, y in val:
        z = (frame_features(clip) - mu) / sd
        d = ((z[:, None] - cents[None]) ** 2).sum(-1).mean(0)
        hits += int(d.argmin() == y)
    return hits / len(val)


def clips(n_per_class: int, offset: int, tint: bool = False):
    out = []
    for y in range(len(synth.CLASSES)):
        for i in range(n_per_class):
            c = synth.render_clip(y, synth.clip_seed(0, "train", y, offset + i), frames=16, size=48)
            if tint:  # a control that leaks the label through colour: blend in a class colour
                palette = np.random.default_rng(99).uniform(0, 255, (len(synth.CLASSES), 3))
                c = (0.3 * c + 0.7 * palette[y]).astype(np.uint8)
            out.append((c, y))
    return out


def test_appearance_blind_per_frame_classifier_is_near_chance():
    chance = 1 / len(synth.CLASSES)
    acc = frame_classifier_accuracy(clips(20, 0), clips(10, 1000), len(synth.CLASSES))
    assert acc < 2 * chance, f"per-frame appearance classifier reached {acc:.2f} (chance {chance:.2f})"


def test_the_appearance_classifier_can_succeed_on_a_leaky_control():
    """Guards the test above against a classifier that could never succeed."""
    acc = frame_classifier_accuracy(clips(8, 0, tint=True), clips(4, 1000, tint=True), len(synth.CLASSES))
    assert acc > 0.6


def shift_between(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Integer translation (dy, dx) taking frame a to frame b (phase correlation)."""
    A, B = np.fft.fft2(a.mean(-1)), np.fft.fft2(b.mean(-1))
    r = np.fft.ifft2(B * np.conj(A) / (np.abs(B * np.conj(A)) + 1e-9)).real
    dy, dx = np.unravel_index(r.argmax(), r.shape)
    H, W = r.shape
    return (dy - H if dy > H // 2 else dy), (dx - W if dx > W // 2 else dx)


def test_camera_pan_moves_the_whole_scene_the_named_way():
    for name, sign in (("pan_left", 1), ("pan_right", -1)):
        clip = synth.render_clip(synth.CLASSES.index(name), np.random.default_rng(3), frames=32, size=64)
        dy, dx = shift_between(clip[10], clip[20])
        assert dy == 0, (name, dy, dx)
        assert np.sign(dx) == sign, (name, dy, dx)
        assert abs(dx) >= 3, (name, dy, dx)


def object_centroid(clip: np.ndarray) -> np.ndarray:
    """Per-frame centroid of |frame − temporal median| (the median over time is the static background)."""
    diff = np.abs(clip.astype(float) - np.median(clip, axis=0)).mean(-1)  # (T, H, W)
    ys, xs = np.mgrid[0:clip.shape[1], 0:clip.shape[2]]
    w = diff.sum((1, 2)) + 1e-9
    return np.stack([(diff * ys).sum((1, 2)) / w, (diff * xs).sum((1, 2)) / w], 1)


@pytest.mark.parametrize("name,axis,sign", [("move_left", 1, -1), ("move_right", 1, 1), ("move_up", 0, -1),
                                            ("move_down", 0, 1)])
def test_movers_move_the_named_way(name, axis, sign):
    clip = synth.render_clip(synth.CLASSES.index(name), np.random.default_rng(4), frames=32, size=64)
    c = object_centroid(clip)
    assert np.sign(c[-4:, axis].mean() - c[:4, axis].mean()) == sign


def test_appear_raises_and_disappear_lowers_the_object_contrast():
    for name in ("appear", "disappear"):
        clip = synth.render_clip(synth.CLASSES.index(name), np.random.default_rng(5), frames=32, size=64)
        std = clip.astype(float).std((1, 2, 3))
        assert (std[-1] > std[0]) == (name == "appear"), name


def test_render_is_deterministic():
    a = synth.render_clip(3, synth.clip_seed(7, "train", 3, 2))
    b = synth.render_clip(3, synth.clip_seed(7, "train", 3, 2))
    assert np.array_equal(a, b)
    assert a.shape == (32, 64, 64, 3)
    assert a.dtype == np.uint8


def test_generated_directory_layout(tiny_dataset):
    ds = load_prepared(tiny_dataset)
    assert ds.classes == ["move_left", "move_right", "appear", "disappear"]
    assert len(ds.train) == 4 * 6
    assert len(ds.val) == 4 * 3
    assert sorted({s.label for s in ds.train}) == [0, 1, 2, 3]
    assert all(s.num_frames == 32 and s.path.endswith(".webm") for s in ds.train)
    assert ds.meta["codec"] == "vp9"
    assert ds.meta["num_classes"] == 4
    assert ds.meta["flip_pairs"] == [[0, 1]]
    lines = (tiny_dataset / "train.txt").read_text().splitlines()
    assert lines[0].split()[0] == "train/move_left/move_left_0000.webm"  # relative to the directory


def test_held_out_test_split(tmp_path, tiny_dataset):
    """``test_per_class`` writes test.txt from its own random stream (no clip equals a train or val clip of the
    same class and index); a dataset without one says so when a run asks for data.eval_split=test."""
    from hcml.errors import ConfigError
    from hcml.launch import components
    from hcml.launch.config import load_config, resolve_recipe

    out = synth.generate(tmp_path / "s", classes=["move_left", "appear"], per_class=2, val_per_class=1,
                         test_per_class=2, seed=1, workers=2, progress=False)
    ds = load_prepared(out)
    assert len(ds.test) == 4
    assert ds.split("test") == ds.test
    assert (out / "test.txt").read_text().splitlines()[0].split()[0] == "test/move_left/move_left_0000.webm"
    for split in ("train", "val"):
        a = synth.render_clip(0, synth.clip_seed(1, "test", 0, 0))
        assert not np.array_equal(a, synth.render_clip(0, synth.clip_seed(1, split, 0, 0))), split
    assert load_prepared(tiny_dataset).test == []
    cfg = load_config(resolve_recipe("demo"), [f"data.root={tiny_dataset}", "data.eval_split=test"])
    with pytest.raises(ConfigError, match="data.eval_split=test.*no test split"):
        components.check_runnable(cfg)
    cfg = load_config(resolve_recipe("demo"), [f"data.root={out}", "data.eval_split=test", "data.batch_size=2",
                                               "data.flip=plain"])
    assert components.check_runnable(cfg).test


def test_malformed_list_is_reported_with_file_and_line(tmp_path, tiny_dataset):
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(tiny_dataset, d)
    with (d / "val.txt").open("a") as f:
        f.write("val/x.webm 99 32\n")
    with pytest.raises(DatasetError, match=r"val\.txt:13: label 99 outside \[0, 4\)"):
        load_prepared(d)
