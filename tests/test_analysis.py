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
    assert cam.shape == (T, S, S) and cls == 1
    assert cam[:, :48].mean() > 5 * cam[:, 48:].mean()
    xs = np.arange(S)
    cx = [(cam[t].sum(0) * xs).sum() / cam[t].sum() for t in (0, T - 1)]
    assert cx[1] > cx[0] + 20
    frames = clip[0].permute(1, 2, 3, 0).numpy() * 255
    png = save_gradcam_strip([{"name": "HCML", "frames": frames, "cam": cam, "pred": "right", "correct": True}],
                             tmp_path / "g.png")
    assert png.stat().st_size > 1000
