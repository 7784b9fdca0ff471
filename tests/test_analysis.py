"""KNN table on hand-made features with a known answer; Grad-CAM++ follows the moving object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcml.launch.analysis import format_knn_table, gradcam_pp, knn_predict, knn_table, save_gradcam_strip


def test_knn_predict_known_answer():
    train = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.2]])
    assert knn_predict(train, labels, test, k=2, num_classes=2).tolist() == [0, 1, 1]


def test_knn_table_levels_and_gains():
    """3 classes, 2 videos each. low carries no information (every video predicted 'a'), mid separates 'a'
    from {'b','c'} (ties go to 'b'), high separates all: accuracies 33 / 67 / 100, gains b at mid, c at high."""
    e = torch.eye(3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    feats = {"low": torch.ones(6, 3),
             "mid": torch.stack([e[0], e[0], e[1], e[1], e[1], e[1]]),
             "high": torch.stack([e[0], e[0], e[1], e[1], e[2], e[2]])}
    t = knn_table(feats, y, {k: v.clone() for k, v in feats.items()}, y, ["a", "b", "c"], k=6)
    acc = {lv: round(r["accuracy"], 1) for lv, r in t["levels"].items()}
    assert acc == {"low": 33.3, "mid": 66.7, "high": 100.0}
    assert t["random_accuracy"] == pytest.approx(100 / 3)
    assert t["levels"]["low"]["top"][0] == {"class": "a", "accuracy": 100.0}  # low: the most accurate classes
    assert t["levels"]["mid"]["top"][0] == {"class": "b", "from": 0.0, "to": 100.0}  # the largest gain
    assert t["levels"]["high"]["top"][0] == {"class": "c", "from": 0.0, "to": 100.0}
    assert "high" in format_knn_table(t)


def test_gradcam_pp_follows_the_moving_object(tmp_path):
    """An untrained tiny backbone whose 'class' is the energy of its last feature map (BN calibrated on the
    clip): the CAM concentrates on the band the square moves in and its centroid moves right with it."""
    from hcml.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", 2, motion=False, dropout=0.0)
    T, S = 8, 96
    clip = torch.zeros(1, 3, T, S, S)
    for t in range(T):
        clip[0, :, t, 10:30, 10 + 8 * t:30 + 8 * t] = 1.0  # a square moving right in the top band
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[1] = 1.0
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.momentum = None
        model.train()
        model(torch.cat([clip, clip.flip(-1), clip.flip(-2)]), with_nce=False)
    cam, cls = gradcam_pp(model, clip, target=1)
    assert cam.shape == (T, S, S)
    assert cls == 1
    assert cam[:, :48].mean() > 5 * cam[:, 48:].mean()
    xs = np.arange(S)
    cx = [(cam[t].sum(0) * xs).sum() / cam[t].sum() for t in (0, T - 1)]
    assert cx[1] > cx[0] + 20
    frames = clip[0].permute(1, 2, 3, 0).numpy() * 255
    png = save_gradcam_strip([{"name": "HCML", "frames": frames, "cam": cam, "pred": "right", "correct": True}],
                             tmp_path / "g.png")
    assert png.stat().st_size > 1000


def dense_knn(train, labels, test, k, n):
    """The direct form: the whole similarity matrix, one top-k."""
    sim = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).t()
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(test.shape[0], n).scatter_add_(1, labels[idx], top.clamp_min(0) + 1e-6)
    return votes.argmax(1)


def test_blocked_knn_equals_the_dense_result():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 7, (1000,), generator=g)
    ref = dense_knn(train, labels, test, 20, 7)
    for tc, sc in ((1024, 32768), (64, 100), (7, 13)):  # one block; several; ragged blocks smaller than k
        assert torch.equal(knn_predict(train, labels, test, 20, 7, test_chunk=tc, train_chunk=sc), ref), (tc, sc)


def test_knn_table_sharded_over_ranks_equals_one_rank():
    from hcml.launch.distributed import DistInfo

    g = torch.Generator().manual_seed(1)
    feats = {"low": torch.randn(60, 8, generator=g)}
    val = {"low": torch.randn(25, 8, generator=g)}
    y, yv = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (25,), generator=g)
    whole = knn_table(feats, y, val, yv, ["a", "b", "c"], k=5)
    # what each of 3 ranks scores, concatenated in rank order (the gather), gives the same table
    parts = [knn_predict(feats["low"], y, val["low"][25 * r // 3:25 * (r + 1) // 3], 5, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), knn_predict(feats["low"], y, val["low"], 5, 3))
    assert whole == knn_table(feats, y, val, yv, ["a", "b", "c"], k=5, info=DistInfo())


@pytest.mark.slow
def test_knn_at_kinetics_scale_stays_in_bounded_memory():
    """20k val x 240k train features (the Kinetics-400 shape): the dense matrix alone would take 19 GB; the
    blocked KNN's peak RSS grows by less than 1.5 GB over the 1 GB of features it is given."""
    import subprocess

    from tests.conftest import PY

    code = """
import resource, torch
from hcml.launch.analysis import knn_predict
torch.manual_seed(0)
train, test = torch.randn(240_000, 32), torch.randn(20_000, 32)
labels = torch.randint(0, 400, (240_000,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pred = knn_predict(train, labels, test, 20, 400, test_chunk=512)
assert pred.shape == (20_000,)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20)
"""
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) < 1.5, res.stdout  # GiB over the inputs


def test_random_init_reference_calibrates_bn_statistics_on_the_clips():
    """The random-init KNN reference gets BN statistics measured on training clips (no weight changes): the stem
    BN's running mean becomes the per-channel mean of its input over all calibration clips."""
    from hcml.launch.analysis import calibrate_bn
    from hcml.launch.distributed import DistInfo
    from hcml.model import build_model

    torch.manual_seed(0)
    m = build_model("tiny", 3)
    weights = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [(torch.randn(2, 1, 3, 8, 32, 32) + 0.5, torch.arange(2)) for _ in range(3)]
    bn = m.backbone.stem[0][1]
    seen = []
    h = bn.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach()))
    calibrate_bn(m, batches, DistInfo())
    h.remove()
    expect = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in seen], 1).mean(1)
    torch.testing.assert_close(bn.running_mean, expect, rtol=1e-4, atol=1e-5)
    assert not m.training
    assert bn.running_mean.abs().max() > 0.01
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in weights.items())  # no weight moved


def test_knn_of_several_checkpoints_decodes_once_and_equals_separate_runs(trained_checkpoint, tmp_path):
    """The demo's KNN (random init + each SSL checkpoint) scores kept clips with every model: the tables equal
    those of separate `hcml knn` runs, the calibrated random init included."""
    from hcml.launch.analysis import knn_many, run_knn

    ck = str(trained_checkpoint)
    many = knn_many([ck, ck], None, [], 3, [tmp_path / "a", tmp_path / "b"], random_init=True)
    alone = [run_knn(None, ck, [], 3, str(tmp_path / "c"), None, random_init=True),
             run_knn(None, ck, [], 3, str(tmp_path / "d"), None)]
    for m, a in zip(many, alone):
        assert m["levels"] == a["levels"]
        assert m["random_init_calibrated"] == a["random_init_calibrated"]
    assert many[0]["levels"] != many[1]["levels"]  # the random network is not the trained one
