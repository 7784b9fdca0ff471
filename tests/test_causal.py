"""Causality of every motion level for every architecture: the contrastive loss asks the motion feature at step k
to predict the previous level's feature at k + 1, so the feature at k must not see the frames that step k + 1
covers. On a level whose time grid is T/f (f = 1, 2, 4 for low, mid, high), step k may depend on frames < f·(k+1)
only. R(2+1)D-101's temporal (3×1×1) convolutions in res4 would break this with symmetric padding; they pad the
past only when the motion module is on.

Checked with BatchNorm in eval mode: in training mode BN's batch statistics pool all time steps of the batch, a
second-order coupling the paper's design has as well (and no direct path from a future frame to a feature)."""

from __future__ import annotations

import pytest
import torch

from hcml.model import LEVELS, build_model

FACTOR = {"low": 1, "mid": 2, "high": 4}


def trained_like(model):
    """Zero-initialised BN gammas make every residual block and fusion the identity at init, which would hide a
    leak: give every BN random affine parameters and statistics, as training would."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.weight.data = torch.randn(mod.weight.shape, generator=g)
            mod.bias.data = 0.1 * torch.randn(mod.bias.shape, generator=g)
            mod.running_mean = 0.1 * torch.randn(mod.running_mean.shape, generator=g)
            mod.running_var = 0.5 + torch.rand(mod.running_var.shape, generator=g)
    return model.eval()


@pytest.mark.parametrize("arch,size", [("tiny", 32), ("r2d50", 32), ("r2plus1d101", 32)])
def test_causal_every_level_ignores_the_frames_of_its_target(arch, size):
    torch.manual_seed(0)
    T = 16
    m = trained_like(build_model(arch, 5))
    x = torch.randn(1, 3, T, size, size)
    with torch.no_grad():
        ref = m.motion_features(x)
        for cut in (4, 8, 12):  # frames >= cut replaced
            y = x.clone()
            y[:, :, cut:] = torch.randn_like(y[:, :, cut:])
            got = m.motion_features(y)
            for lv in LEVELS:
                keep = cut // FACTOR[lv]  # steps k with f·(k+1) <= cut
                assert keep >= 1
                torch.testing.assert_close(got[lv][:, :, :keep], ref[lv][:, :, :keep], msg=f"{arch} {lv} cut {cut}")
                # and the test can fail: the steps after the cut do change
                assert not torch.allclose(got[lv][:, :, keep:], ref[lv][:, :, keep:]), (arch, lv, cut)


def test_causal_padding_is_only_for_models_with_the_motion_module():
    """The backbone alone keeps the paper's symmetric temporal convolutions (same weights either way)."""
    from hcml.model.backbone import CausalTimeConv3d

    with_motion, without = build_model("r2plus1d101", 5), build_model("r2plus1d101", 5, motion=False)
    causal = [n for n, mod in with_motion.backbone.named_modules() if isinstance(mod, CausalTimeConv3d)]
    assert causal
    assert all(n.startswith("stages.res4") for n in causal)
    assert not any(isinstance(mod, CausalTimeConv3d) for mod in without.backbone.modules())
    assert {k: v.shape for k, v in with_motion.backbone.state_dict().items()} == \
        {k: v.shape for k, v in without.backbone.state_dict().items()}
