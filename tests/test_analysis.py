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
    """3 classes, 2 val videos each. low separates only class 0; mid adds class 1; high separates all."""
    c = torch.eye(3)
    y_train = torch.tensor([0, 0, 1, 1, 2, 2])
    y_val = torch.tensor([0, 0, 1, 1, 2, 2])
    same = torch.tensor([1.0, 1.0, 0.0])  # classes 1 and 2 indistinguishable
    low_tr = torch.stack([c[0], c[0], same, same, same, same]) + 1e-3 * torch.arange(6)[:, None]
    mid_tr = torch.stack([c[0], c[0], c[1], c[1], c[0] + c[2] * 0.1, c[0] + c[2] * 0.1])
    high_tr = torch.stack([c[0], c[0], c[1], c[1], c[2], c[2]])
    feats_tr = {"low": low_tr, "mid": mid_tr, "high": high_tr}
    feats_val = {k: v.clone() for k, v in feats_tr.items()}
    t = knn_table(feats_tr, y_train, feats_val, y_val, ["a", "b", "c"], k=1)
    acc = {lv: r["accuracy"] for lv, r in t["levels"].items()}
    assert acc["high"] == 100.0 and acc["low"] < acc["high"]
    assert t["random_accuracy"] == pytest.approx(100 / 3)
    assert t["levels"]["low"]["top"][0] == {"class": "a", "accuracy": 100.0}  # low: most accurate classes
    high_top = t["levels"]["high"]["top"][0]
    assert high_top["class"] == "c" and high_top["to"] == 100.0 and high_top["from"] < 100.0  # the largest gain
    assert "high" in format_knn_table(t)


def test_gradcam_pp_responds_to_the_moving_object(tmp_path):
    """A model whose only evidence is where frames change: the CAM peaks on the moving square, not the static
    background, and the PNG strip is written."""
    from hcml.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", 2, motion=False, dropout=0.0)
    T, S = 8, 32
    clip = torch.zeros(1, 3, T, S, S)
    for t in range(T):
        clip[0, :, t, 4:12, 2 + 2 * t:10 + 2 * t] = 1.0  # a square moving right in the top band
    # Make the network sensitive to brightness: its logit rises with the energy of the last feature map.
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[1] = 1.0
    cam, cls = gradcam_pp(model, clip, target=1)
    assert cam.shape == (T, S, S) and cls == 1
    top_band, bottom_band = cam[:, :16].mean(), cam[:, 16:].mean()
    assert top_band > 2 * bottom_band
    frames = (clip[0].permute(1, 2, 3, 0).numpy() * 255)
    png = save_gradcam_strip([{"name": "HCML", "frames": frames, "cam": cam, "pred": "right", "correct": True}],
                             tmp_path / "g.png")
    assert png.stat().st_size > 1000
