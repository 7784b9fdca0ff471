"""DALI pipelines on CPU (VP9): shapes, crop consistency, flip/label swap, sharding, multi-view, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hcml.pipeline.prepared import Sample, load_prepared
from hcml.pipeline.loader import (DataSpec, EvalLoader, TrainLoader, clip_start, epoch_order, eval_views, shard_rows,
                                  write_train_list)
from tests.conftest import requires_cuda

SPEC = DataSpec(frames=8, stride=2, crop=48, short_side=[56, 64], eval_short_side=56, eval_clips=3, eval_crops=3,
                flip="plain", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], batch_size=4, threads=1, device="cpu")


def spec(**kw) -> DataSpec:
    return replace(SPEC, **kw)


def test_train_clip_shape_dtype_and_range(tiny_dataset, tmp_path):
    ds = load_prepared(tiny_dataset)
    tl = TrainLoader(ds.train, SPEC, work_dir=tmp_path, seed=0)
    assert tl.steps_per_epoch == len(ds.train) // 4
    batches = list(tl.epoch(0))
    assert len(batches) == tl.steps_per_epoch
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 48, 48)
    assert x.dtype == torch.float32
    # normalised with mean .5, std .25: pixel range [0, 255] maps to [-2, 2]
    assert x.min() >= -2.01
    assert x.max() <= 2.01
    assert x.std() > 0.1
    assert y.dtype == torch.long
    assert set(y.tolist()) <= {0, 1, 2, 3}


def test_same_random_crop_for_all_frames_of_a_clip(tmp_path):
    """A static video: every output frame must be identical, which only holds if the crop is shared."""
    from hcml.pipeline.synth import encode

    rng = np.random.default_rng(0)
    frame = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    frame = np.repeat(np.repeat(frame[::8, ::8], 8, 0), 8, 1)  # blocky: survives VP9
    path = tmp_path / "static.webm"
    encode(np.repeat(frame[None], 24, 0), path, "vp9")
    samples = [Sample(str(path), 0, 24)] * 4
    tl = TrainLoader(samples, spec(frames=6, crop=40, short_side=[48, 72]), work_dir=tmp_path / "w", seed=3)
    x, _ = next(iter(tl.epoch(0)))
    frames_diff = (x - x[:, :, :1]).abs().amax(dim=(1, 2, 3, 4))
    assert torch.all(frames_diff < 0.15), frames_diff
    # and the crops differ between clips (random position/scale per clip)
    assert (x[0] - x[1]).abs().mean() > 0.05


def test_flip_swap_changes_labels_of_mirrored_clips(tiny_dataset, tmp_path):
    ds = load_prepared(tiny_dataset)
    tl = TrainLoader(ds.train, spec(flip="swap", flip_pairs=[[0, 1]], batch_size=24), work_dir=tmp_path, seed=0)
    it = tl.epoch(0)
    x, y = next(it)
    # The reader's labels in file-list order: recover the true labels of this batch from the epoch list
    order = epoch_order(len(ds.train), 0, 0)
    true = torch.tensor([ds.train[i].label for i in order[:24]])
    swapped = y != true
    assert swapped.any(), "no mirrored move_left/right clip in 24 draws: the flip never happened"
    assert torch.all((true[swapped] == 0) & (y[swapped] == 1) | (true[swapped] == 1) & (y[swapped] == 0))
    assert torch.all(y[(true == 2) | (true == 3)] == true[(true == 2) | (true == 3)])  # not in a pair


def test_each_sample_once_per_epoch_across_two_shards(tiny_dataset, tmp_path):
    ds = load_prepared(tiny_dataset)
    samples = [Sample(s.path, i, s.num_frames) for i, s in enumerate(ds.train)]  # label = sample index
    seen = []
    for rank in range(2):
        tl = TrainLoader(samples, SPEC, work_dir=tmp_path / str(rank), rank=rank, world=2)
        assert tl.steps_per_epoch == 3
        for _, y in tl.epoch(0):
            seen += y.tolist()
    assert sorted(seen) == list(range(24))  # 2 shards × 3 steps × 4 = 24: each exactly once


def test_shard_rows_partition():
    parts = [shard_rows(10, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 4]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_temporal_jitter_is_seeded_and_in_range():
    starts = [clip_start(0, 1, i, 100, 15) for i in range(200)]
    assert min(starts) >= 0
    assert max(starts) <= 85
    assert len(set(starts)) > 30
    assert starts == [clip_start(0, 1, i, 100, 15) for i in range(200)]
    assert clip_start(0, 1, 0, 10, 15) == 0  # shorter than the span: start at 0, edge-padded


def test_train_list_is_the_same_on_every_rank_and_differs_per_epoch(tmp_path):
    samples = [Sample(f"/v{i}.webm", i % 3, 64) for i in range(12)]
    write_train_list(tmp_path / "a", samples, SPEC, seed=0, epoch=0)
    write_train_list(tmp_path / "b", samples, SPEC, seed=0, epoch=0)
    write_train_list(tmp_path / "c", samples, SPEC, seed=0, epoch=1)
    a = (tmp_path / "a").read_text()
    assert a == (tmp_path / "b").read_text()
    assert a != (tmp_path / "c").read_text()
    for line in a.splitlines():
        _, _, s, e = line.split()
        assert int(e) - int(s) == SPEC.span  # [start, end): DALI reads the end as exclusive


def test_eval_views_uniform_and_multiview_count(tiny_dataset, tmp_path):
    views = eval_views(100, spec(eval_clips=4))
    assert [v[0] for v in views] == [0, 28, 57, 85]
    assert all(e - s == 15 for s, e in views)
    ds = load_prepared(tiny_dataset)
    rows = []
    for rank in range(2):
        el = EvalLoader(ds.val, spec(batch_size=7), work_dir=tmp_path / str(rank), rank=rank, world=2)
        for x, r in el:
            assert x.shape[1:] == (3, 3, 8, 48, 48)  # crops × C × T × H × W
            rows += r.tolist()
    assert el.num_rows == len(ds.val) * 3
    assert sorted(rows) == list(range(el.num_rows))  # no view duplicated or dropped across shards


def test_three_crops_cover_left_centre_right(tmp_path):
    """A landscape video with a horizontal ramp: the 3 crops' mean brightness increases left → right."""
    from hcml.pipeline.synth import encode

    ramp = np.tile(np.linspace(0, 255, 96)[None, :, None], (48, 1, 3)).astype(np.uint8)
    path = tmp_path / "ramp.webm"
    encode(np.repeat(ramp[None], 16, 0), path, "vp9")
    el = EvalLoader([Sample(str(path), 0, 16)], spec(frames=4, crop=40, eval_short_side=48, eval_clips=1),
                    work_dir=tmp_path / "w")
    x, _ = next(iter(el))
    means = x[0].mean(dim=(1, 2, 3, 4))
    assert means[0] < means[1] < means[2]


def test_mid_epoch_resume_is_bit_exact(tiny_dataset, tmp_path):
    """Position + DALI checkpoint restore the reader and the random crops/flips exactly."""
    ds = load_prepared(tiny_dataset)
    ref = TrainLoader(ds.train, SPEC, work_dir=tmp_path / "a", seed=5)
    ref_batches = [x.clone() for x, _ in ref.epoch(0)]
    tl = TrainLoader(ds.train, SPEC, work_dir=tmp_path / "b", seed=5)
    it = tl.epoch(0)
    for _ in range(2):
        next(it)
    state = tl.state()
    assert state["position"] == 2
    assert state["dali"]
    tl2 = TrainLoader(ds.train, SPEC, work_dir=tmp_path / "c", seed=5)
    rest = [x for x, _ in tl2.epoch(0, state)]
    assert len(rest) == len(ref_batches) - 2
    for a, b in zip(rest, ref_batches[2:]):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.gpu
def test_gpu_pipeline_decodes_h264_on_the_gpu(tmp_path):
    from hcml.pipeline import synth

    d = synth.generate(tmp_path / "h264", classes=["move_left", "move_right"], per_class=4, val_per_class=2,
                       codec="h264", progress=False)
    ds = load_prepared(d)
    tl = TrainLoader(ds.train, spec(device="gpu", threads=2), work_dir=tmp_path / "w", device_id=0)
    x, y = next(iter(tl.epoch(0)))
    assert x.is_cuda
    assert x.shape == (4, 3, 8, 48, 48)


def test_crops_are_exact_windows_when_no_scaling_is_needed(tmp_path):
    """Only the crop window is resampled: at scale 1 (eval_short_side = the video's shorter side) the left /
    centre / right crops are exactly the source pixels at x = 0, (W - crop) / 2, W - crop and y = (H - crop) / 2,
    as PyAV decodes them (the same libvpx decode; colour conversion differs by a level or two, more at chroma edges)."""
    import av

    from hcml.pipeline.synth import encode

    rng = np.random.default_rng(0)
    frame = (rng.random((6, 12, 3)) * 255).astype(np.uint8)
    frame = np.repeat(np.repeat(frame, 8, 0), 8, 1)  # 48 x 96, blocky: survives VP9
    path = tmp_path / "blocks.webm"
    encode(np.repeat(frame[None], 8, 0), path, "vp9")
    with av.open(str(path)) as c:
        src = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    el = EvalLoader([Sample(str(path), 0, 8)], spec(frames=2, stride=1, crop=40, eval_short_side=48, eval_clips=1,
                                                    mean=[0, 0, 0], std=[1 / 255] * 3), work_dir=tmp_path / "w")
    x, _ = next(iter(el))
    crops = x[0, :, :, 0].permute(0, 2, 3, 1).numpy()  # (3 crops, H, W, C) of the first frame
    for crop, x0 in zip(crops, (0, 28, 56)):
        err = {dx: np.median(np.abs(crop - src[4:44, x0 + dx:x0 + dx + 40])) for dx in (-8, 0, 8)
               if 0 <= x0 + dx <= 56}
        assert err[0] <= 4, (x0, err)
        assert all(e > 20 for dx, e in err.items() if dx), (x0, err)


def test_flip_swap_takes_the_pairs_from_the_prepared_dataset(tiny_dataset, tmp_path):
    """data.flip=swap with no data.flip_pairs uses the pairs `synth` wrote into dataset.yaml (no hand copying)."""
    from hcml.launch import components
    from hcml.launch.config import load_config
    from hcml.launch.distributed import DistInfo

    cfg = load_config(None,
                      [f"data.root={tiny_dataset}", "data.flip=swap", "data.device=cpu", "data.batch_size=24",
                       "data.frames=8", "data.crop=48", "data.short_side=[56,64]", "data.threads=1"])
    assert cfg.data.flip_pairs == []
    ds = load_prepared(tiny_dataset)
    assert components.data_spec(cfg, ds, torch.device("cpu")).flip_pairs == [[0, 1]]
    tl = components.train_loader(cfg, ds, DistInfo(), tmp_path)
    x, y = next(tl.epoch(0))
    order = epoch_order(len(ds.train), 0, 0)
    true = torch.tensor([ds.train[i].label for i in order[:24]])
    assert (y != true).any()
    assert torch.all((y != true) <= ((true == 0) | (true == 1)))


def test_several_reader_pipelines_keep_exact_once_and_bit_exact_resume(tiny_dataset, tmp_path):
    """data.readers=2 on each of 2 ranks: 4 sub-shards partition the epoch (every video once); a resume from the
    loader state (two DALI checkpoints) continues bit for bit."""
    ds = load_prepared(tiny_dataset)
    samples = [Sample(s.path, i, s.num_frames) for i, s in enumerate(ds.train)]
    two = spec(readers=2, batch_size=3)
    seen = []
    for rank in range(2):
        tl = TrainLoader(samples, two, work_dir=tmp_path / f"r{rank}", rank=rank, world=2)
        assert tl.steps_per_epoch == 4  # 2 readers x floor(24 / 4 / 3)
        seen += [v for _, y in tl.epoch(0) for v in y.tolist()]
    assert sorted(seen) == list(range(24))
    ref = [x.clone() for x, _ in TrainLoader(ds.train, two, work_dir=tmp_path / "a", seed=5).epoch(0)]
    tl = TrainLoader(ds.train, two, work_dir=tmp_path / "b", seed=5)
    it = tl.epoch(0)
    for _ in range(3):  # an odd count: the next batch comes from the second pipeline
        next(it)
    state = tl.state()
    assert state["position"] == 3
    assert len(state["dali"]) == 2
    rest = [x for x, _ in TrainLoader(ds.train, two, work_dir=tmp_path / "c", seed=5).epoch(0, state)]
    assert len(rest) == len(ref) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, ref[3:]))
    with pytest.raises(Exception, match="data.readers"):
        next(TrainLoader(ds.train, SPEC, work_dir=tmp_path / "d", seed=5).epoch(0, state))


@pytest.fixture()
def broken_dataset(tiny_dataset, tmp_path) -> list[Sample]:
    """The tiny set's 24 training videos (label = index) with two that broke after prepare: one overwritten with
    garbage, one truncated before its first complete frame."""
    import shutil

    ds = load_prepared(tiny_dataset)
    samples = []
    for i, s in enumerate(ds.train):
        path = tmp_path / "videos" / f"{i:02d}.webm"
        path.parent.mkdir(exist_ok=True)
        shutil.copy(s.path, path)
        samples.append(Sample(str(path), i, s.num_frames))
    Path(samples[5].path).write_bytes(b"\x1a\x45\xdf\xa3" + b"garbage" * 300)
    data = Path(samples[17].path).read_bytes()
    Path(samples[17].path).write_bytes(data[: len(data) // 12])
    return samples


def test_unreadable_videos_are_skipped_exact_once_on_every_rank(broken_dataset, tmp_path):
    """22 readable of 24 over 2 ranks x batch 4: both ranks run floor(22 / 2 / 4) = 2 steps (not 3, and never a
    StopIteration), no video twice, the broken ones never, and each rank reports the skip with the paths."""
    reports, seen = [], []
    for rank in range(2):
        tl = TrainLoader(broken_dataset, SPEC, work_dir=tmp_path / str(rank), rank=rank, world=2,
                         on_skip=lambda *a: reports.append(a))
        batches = [y.tolist() for _, y in tl.epoch(0)]
        assert len(batches) == 2
        assert tl.finished
        seen += [v for b in batches for v in b]
    assert len(seen) == len(set(seen)) == 16
    assert not {5, 17} & set(seen)
    assert [(e, n) for e, n, _ in reports] == [(0, 2), (0, 2)]
    assert any(p.endswith("05.webm") for p in reports[0][2])
    assert any(p.endswith("17.webm") for p in reports[0][2])


def test_resume_with_an_unreadable_video_is_bit_exact(broken_dataset, tmp_path):
    one = spec(batch_size=3)
    ref = [x.clone() for x, _ in TrainLoader(broken_dataset, one, work_dir=tmp_path / "a", seed=5).epoch(0)]
    assert len(ref) == 7  # floor(22 / 3)
    tl = TrainLoader(broken_dataset, one, work_dir=tmp_path / "b", seed=5)
    it = tl.epoch(0)
    for _ in range(4):
        next(it)
    rest = [x for x, _ in TrainLoader(broken_dataset, one, work_dir=tmp_path / "c", seed=5).epoch(0, tl.state())]
    assert len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(rest, ref[4:]))


def test_eval_leaves_out_unreadable_videos_and_counts_them(broken_dataset, tmp_path):
    from hcml.launch.components import Precision
    from hcml.launch.distributed import DistInfo
    from hcml.launch.evaluate import evaluate

    class Constant(torch.nn.Module):
        def forward(self, x, with_nce=False):
            return {"logits": torch.zeros(x.shape[0], 24)}

    samples = broken_dataset[:8]
    el = EvalLoader(samples, spec(eval_clips=2, eval_crops=1), work_dir=tmp_path)
    res = evaluate(Constant(), el, samples, 24, DistInfo(), Precision(None, False, False))
    assert res["videos"] == 7
    assert res["skipped"] == 1
    assert el.dropped[0].endswith("05.webm")
