"""DALI pipelines on CPU (VP9): shapes, crop consistency, flip/label swap, sharding, multi-view, resume, broken files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hcml.pipeline.prepared import Sample, load_prepared
from hcml.pipeline.loader import (DataSpec, EvalLoader, TrainLoader, clip_start, draw_clip, epoch_order, eval_views,
                                  shard_rows)
from tests.conftest import requires_cuda

SPEC = DataSpec(frames=8, stride=2, crop=48, short_side=[56, 64], eval_short_side=56, eval_clips=3, eval_crops=3,
                flip="plain", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], batch_size=4, threads=1, device="cpu")


def spec(**kw) -> DataSpec:
    return replace(SPEC, **kw)


def test_train_clip_shape_dtype_and_range(tiny_dataset, tmp_path):
    ds = load_prepared(tiny_dataset)
    tl = TrainLoader(ds.train, SPEC, seed=0)
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
    tl = TrainLoader(samples, spec(frames=6, crop=40, short_side=[48, 72]), seed=3)
    x, _ = next(iter(tl.epoch(0)))
    frames_diff = (x - x[:, :, :1]).abs().amax(dim=(1, 2, 3, 4))
    assert torch.all(frames_diff < 0.15), frames_diff
    # and the crops differ between clips (random position/scale per clip)
    assert (x[0] - x[1]).abs().mean() > 0.05


def test_flip_swap_changes_labels_of_mirrored_clips(tiny_dataset, tmp_path):
    ds = load_prepared(tiny_dataset)
    tl = TrainLoader(ds.train, spec(flip="swap", flip_pairs=[[0, 1]], batch_size=24), seed=0)
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
        tl = TrainLoader(samples, SPEC, rank=rank, world=2)
        assert tl.steps_per_epoch == 3
        for _, y in tl.epoch(0):
            seen += y.tolist()
    assert sorted(seen) == list(range(24))  # 2 shards × 3 steps × 4 = 24: each exactly once


def test_a_list_loads_without_a_file_system_call_per_line(tmp_path, monkeypatch):
    """A prepared list is joined to its root resolved once: 5,000 lines make no per-line stat/resolve, relative
    paths are normalised, absolute ones kept, and a symlink inside the dataset stays as listed (not resolved)."""
    import os

    from hcml.pipeline import prepared as P

    root = tmp_path / "ds"
    (root / "v").mkdir(parents=True)
    os.symlink(tmp_path, root / "link")
    (root / "classes.txt").write_text("a\nb\n")
    rows = [f"v/{i}.webm {i % 2} 32" for i in range(5000)] + ["../other/x.webm 1 10", "/abs/y.webm 0", "link/z.webm 1 5"]
    (root / "train.txt").write_text("\n".join(rows) + "\n")
    (root / "val.txt").write_text("")
    calls = {"resolve": 0, "stat": 0}
    real_resolve, real_stat = Path.resolve, os.stat

    def resolve(self, *a, **k):
        calls["resolve"] += 1
        return real_resolve(self, *a, **k)

    def stat(p, *a, **k):
        calls["stat"] += 1
        return real_stat(p, *a, **k)

    monkeypatch.setattr(Path, "resolve", resolve)
    monkeypatch.setattr(os, "stat", stat)
    ds = P.load_prepared(root)
    assert calls["resolve"] <= 3 and calls["stat"] <= 20, calls  # per split and file, not per line
    base = str(root.resolve())
    assert ds.train[0] == Sample(f"{base}/v/0.webm", 0, 32)
    assert ds.train[-3:] == [Sample(str(tmp_path / "other/x.webm"), 1, 10), Sample("/abs/y.webm", 0, 0),
                             Sample(f"{base}/link/z.webm", 1, 5)]


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


def test_clip_draws_are_seeded_per_epoch_and_stay_in_range():
    """Every random choice is a function of (seed, epoch, index): equal on every rank, new each epoch, in range."""
    a = [draw_clip(0, 0, i, 64, SPEC) for i in range(50)]
    assert a == [draw_clip(0, 0, i, 64, SPEC) for i in range(50)]
    assert a != [draw_clip(0, 1, i, 64, SPEC) for i in range(50)]
    assert a != [draw_clip(0, 0, i, 64, SPEC, salt=1) for i in range(50)]  # a stand-in draws a clip of its own
    assert all(0 <= c.start <= 64 - SPEC.span and 56 <= c.short_side <= 64 and 0 <= c.pos_x <= 1 and 0 <= c.pos_y <= 1
               for c in a)
    assert 10 < sum(c.mirror for c in a) < 40
    assert not any(c.mirror for c in (draw_clip(0, 0, i, 64, spec(flip="none")) for i in range(50)))


def test_keyframe_starts_fall_on_the_gop():
    keyed = spec(keyframe_starts=True)
    starts = {draw_clip(0, 0, i, 300, keyed, gop=16).start for i in range(300)}
    assert starts <= set(range(0, 300 - SPEC.span + 1, 16))
    assert len(starts) == (300 - SPEC.span) // 16 + 1  # every keyframe that leaves room for the span
    with pytest.raises(Exception, match="keyframe_starts"):
        TrainLoader([Sample("/v.webm", 0, 64)] * 8, keyed)


def test_a_rank_reads_only_its_own_shard(tiny_dataset, tmp_path, monkeypatch):
    """96 distinct files over 4 ranks: rank 1 reads exactly its epoch's slots (and, read ahead, the first ones of
    its next shard), never another rank's."""
    import os

    from hcml.pipeline import loader as L

    ds = load_prepared(tiny_dataset)
    samples = []
    for i in range(96):
        link = tmp_path / f"{i:03d}.webm"
        os.link(ds.train[i % len(ds.train)].path, link)
        samples.append(Sample(str(link), i % 4, 32))
    read: list[str] = []
    real = L.read_encoded
    monkeypatch.setattr(L, "read_encoded", lambda p: read.append(p) or real(p))
    tl = TrainLoader(samples, spec(batch_size=4), rank=1, world=4)
    assert tl.steps_per_epoch == 6
    labels = [y for _, y in tl.epoch(0)]
    assert len(labels) == 6
    mine = {samples[i].path for i in tl.shard(0)}
    assert mine == {samples[i].path for i in epoch_order(96, 0, 0)[24:48]}
    assert mine <= set(read)
    assert set(read) - mine <= {samples[i].path for i in tl.shard(1)}
    assert tl.bytes_read >= sum(os.path.getsize(p) for p in mine)
    tl.close()


def test_eval_views_uniform_and_multiview_count(tiny_dataset, tmp_path):
    views = eval_views(100, spec(eval_clips=4))
    assert [v[0] for v in views] == [0, 28, 57, 85]
    assert all(e - s == 15 for s, e in views)
    ds = load_prepared(tiny_dataset)
    rows = []
    for rank in range(2):
        el = EvalLoader(ds.val, spec(batch_size=7), rank=rank, world=2)
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
    el = EvalLoader([Sample(str(path), 0, 16)], spec(frames=4, crop=40, eval_short_side=48, eval_clips=1))
    x, _ = next(iter(el))
    means = x[0].mean(dim=(1, 2, 3, 4))
    assert means[0] < means[1] < means[2]


def test_mid_epoch_resume_is_bit_exact(tiny_dataset, tmp_path):
    """Position (+ the videos found unreadable) restores the order, the clips and the random crops/flips exactly,
    with other data.threads and data.readers too: nothing of DALI's state is needed."""
    ds = load_prepared(tiny_dataset)
    ref = TrainLoader(ds.train, SPEC, seed=5)
    ref_batches = [x.clone() for x, _ in ref.epoch(0)]
    tl = TrainLoader(ds.train, SPEC, seed=5)
    it = tl.epoch(0)
    for _ in range(2):
        next(it)
    state = tl.state()
    assert state["position"] == 2
    assert state["unreadable"] == {}
    for other in (SPEC, spec(threads=2, readers=2)):
        tl2 = TrainLoader(ds.train, other, seed=5)
        rest = [x for x, _ in tl2.epoch(0, state)]
        assert len(rest) == len(ref_batches) - 2
        for a, b in zip(rest, ref_batches[2:]):
            assert torch.equal(a, b)


def test_clips_cut_at_the_keyframe_equal_the_whole_file_decode(tiny_dataset, tmp_path):
    """With the dataset's GOP known (synth writes a keyframe every 8 frames) each clip's packets are cut from the
    keyframe before it: the batches are bit for bit those of decoding whole files (a keyframe resets the decoder),
    for training and for every eval view, and the decoder gets a fraction of the bytes."""
    import av

    from hcml.pipeline.loader import clip_bytes, read_encoded

    ds = load_prepared(tiny_dataset)
    with av.open(ds.train[0].path) as c:
        assert [i for i, p in enumerate(p for p in c.demux(video=0) if p.size) if p.is_keyframe] == [0, 8, 16, 24]
    whole = [(x.clone(), y.clone()) for x, y in TrainLoader(ds.train, SPEC, seed=2).epoch(0)]
    cut = list(TrainLoader(ds.train, SPEC, seed=2, gop=8).epoch(0))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(whole, cut))
    ev = [x for x, _ in EvalLoader(ds.val, SPEC)]
    assert all(torch.equal(a, b) for a, b in zip(ev, (x for x, _ in EvalLoader(ds.val, SPEC, gop=8))))
    data = read_encoded(ds.train[0].path)
    part, start = clip_bytes(data, ds.train[0].path, 19, SPEC.span, 8)
    assert start == 3 and part.size < data.size
    with pytest.raises(OSError, match="32 frames, a clip starts at frame 40"):
        clip_bytes(data, ds.train[0].path, 40, SPEC.span, 8)


@requires_cuda
@pytest.mark.gpu
def test_gpu_pipeline_decodes_h264_on_the_gpu(tmp_path):
    from hcml.pipeline import synth

    d = synth.generate(tmp_path / "h264", classes=["move_left", "move_right"], per_class=4, val_per_class=2,
                       codec="h264", progress=False)
    ds = load_prepared(d)
    tl = TrainLoader(ds.train, spec(device="gpu", threads=2), device_id=0)
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
                                                    mean=[0, 0, 0], std=[1 / 255] * 3))
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
    tl = components.train_loader(cfg, ds, DistInfo())
    x, y = next(tl.epoch(0))
    order = epoch_order(len(ds.train), 0, 0)
    true = torch.tensor([ds.train[i].label for i in order[:24]])
    assert (y != true).any()
    assert torch.all((y != true) <= ((true == 0) | (true == 1)))


def test_several_reader_pipelines_keep_exact_once_and_bit_exact_resume(tiny_dataset, tmp_path):
    """data.readers=2 on each of 2 ranks: every video once; batches come from the two pipelines in turn and are the
    same as with one; a resume continues bit for bit with 1, 2 or 3 pipelines."""
    ds = load_prepared(tiny_dataset)
    samples = [Sample(s.path, i, s.num_frames) for i, s in enumerate(ds.train)]
    two = spec(readers=2, batch_size=3)
    seen = []
    for rank in range(2):
        tl = TrainLoader(samples, two, rank=rank, world=2)
        assert tl.steps_per_epoch == 4  # floor(24 / 2 / 3)
        seen += [v for _, y in tl.epoch(0) for v in y.tolist()]
    assert sorted(seen) == list(range(24))
    ref = [x.clone() for x, _ in TrainLoader(ds.train, two, seed=5).epoch(0)]
    one = [x for x, _ in TrainLoader(ds.train, spec(batch_size=3), seed=5).epoch(0)]
    assert all(torch.equal(a, b) for a, b in zip(one, ref))
    tl = TrainLoader(ds.train, two, seed=5)
    it = tl.epoch(0)
    for _ in range(3):  # an odd count: the next batch comes from the second pipeline
        next(it)
    state = tl.state()
    assert state["position"] == 3
    for other in (two, spec(batch_size=3, readers=1), spec(batch_size=3, readers=3, threads=2)):
        rest = [x for x, _ in TrainLoader(ds.train, other, seed=5).epoch(0, state)]
        assert len(rest) == len(ref) - 3
        assert all(torch.equal(a, b) for a, b in zip(rest, ref[3:]))


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


def test_unreadable_videos_are_replaced_and_every_rank_runs_its_steps(broken_dataset, tmp_path):
    """22 readable of 24 over 2 ranks x batch 4: both ranks run their 3 full steps (no StopIteration, no shorter
    epoch), the broken videos never come, each is replaced by the next video of its rank's shard (one video
    twice per broken one), and each replacement is reported with the path and the reason."""
    reports, seen = [], []
    for rank in range(2):
        tl = TrainLoader(broken_dataset, SPEC, rank=rank, world=2, on_skip=lambda *a: reports.append(a))
        batches = [y.tolist() for _, y in tl.epoch(0)]
        assert len(batches) == 3 and all(len(b) == 4 for b in batches)
        assert tl.finished
        seen += [v for b in batches for v in b]
        shard = [broken_dataset[i].label for i in tl.shard(0)]
        for bad in {5, 17} & set(shard):  # the stand-in: the next video of the same shard
            after = shard[(shard.index(bad) + 1) % len(shard)]
            assert seen.count(after) == 2, (bad, after)
    assert len(seen) == 24
    assert not {5, 17} & set(seen)
    assert set(seen) == set(range(24)) - {5, 17}
    assert sorted(n for _, n, _ in reports) == [1, 1]
    named = " ".join(p for _, _, paths in reports for p in paths)
    assert "05.webm" in named and "17.webm" in named


def test_two_undecodable_videos_in_one_batch_are_both_found(broken_dataset):
    """One batch of all 24 videos holding both broken ones: DALI refuses it once, the decoder alone names each
    culprit (not its neighbours), and the batch comes full without them; evaluation drops exactly those two."""
    tl = TrainLoader(broken_dataset, spec(batch_size=24))
    (_, y), = list(tl.epoch(0))
    assert len(y) == 24 and not {5, 17} & set(y.tolist())
    assert sorted(Path(p).name for p in tl.unreadable) == ["05.webm", "17.webm"]
    assert all("cannot be decoded" in why for why in tl.unreadable.values())
    el = EvalLoader(broken_dataset, spec(eval_clips=1, eval_crops=1, batch_size=24))
    rows = [r for _, rr in el for r in rr.tolist()]
    assert sorted(rows) == sorted(set(range(24)) - {5, 17})
    assert sorted(Path(p).name for p in el.dropped) == ["05.webm", "17.webm"]


def test_resume_with_an_unreadable_video_is_bit_exact(broken_dataset, tmp_path):
    one = spec(batch_size=3)
    ref = [x.clone() for x, _ in TrainLoader(broken_dataset, one, seed=5).epoch(0)]
    assert len(ref) == 8  # floor(24 / 3): replaced, not dropped
    tl = TrainLoader(broken_dataset, one, seed=5)
    it = tl.epoch(0)
    for _ in range(4):
        next(it)
    state = tl.state()
    rest = [x for x, _ in TrainLoader(broken_dataset, one, seed=5).epoch(0, state)]
    assert len(rest) == 4
    assert all(torch.equal(a, b) for a, b in zip(rest, ref[4:]))
    second = list(TrainLoader(broken_dataset, one, seed=5).epoch(1))  # the next epoch: replaced again
    assert len(second) == 8


def test_eval_leaves_out_unreadable_videos_and_counts_them(broken_dataset, tmp_path):
    from hcml.launch.components import Precision
    from hcml.launch.distributed import DistInfo
    from hcml.launch.evaluate import evaluate

    class Constant(torch.nn.Module):
        def forward(self, x, with_nce=False):
            return {"logits": torch.zeros(x.shape[0], 24)}

    samples = broken_dataset[:8]
    el = EvalLoader(samples, spec(eval_clips=2, eval_crops=1))
    res = evaluate(Constant(), el, samples, 24, DistInfo(), Precision(None, False, False))
    assert res["videos"] == 7
    assert res["skipped"] == 1
    assert el.dropped[0].endswith("05.webm")
