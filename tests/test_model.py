"""Model: Table 8 shapes, hand-derived parameter counts, the InfoNCE split vs a naive loop, compile safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hcml.model import build_model, phase_loss
from hcml.model.contrastive import future_prediction_loss, gather_positions, info_nce, l2_normalize, negative_masks
from hcml.model.summary import summarize


@pytest.mark.parametrize("T", [16, 32])
@pytest.mark.parametrize("arch", ["r2d50", "r2plus1d101"])
def test_stage_shapes_follow_table8(arch, T):
    s = summarize(build_model(arch, 400), T)
    assert s["stages"]["res2"] == [256, T, 56, 56]
    assert s["stages"]["res3"] == [512, T // 2, 28, 28]
    assert s["stages"]["res4"] == [1024, T // 4, 14, 14]
    assert s["stages"]["res5"] == [2048, T // 4, 7, 7]
    assert s["motion_levels"]["low"][1:] == [T, 56, 56]
    assert s["motion_levels"]["mid"][1:] == [T // 2, 28, 28]
    assert s["motion_levels"]["high"][1:] == [T // 4, 14, 14]


def bottleneck_params(cin: int, w: int, cout: int, temporal: bool, projection: bool) -> int:
    """Conv weights (no bias) + BN (gamma, beta) per conv.
    1×1×1 cin→w: cin·w + 2w;  (3×1×1) w→w: 3w² + 2w;  1×3×3 w→w: 9w² + 2w;  1×1×1 w→cout: w·cout + 2cout;
    projection shortcut 1×1×1 cin→cout: cin·cout + 2cout."""
    n = cin * w + 2 * w + 9 * w * w + 2 * w + w * cout + 2 * cout
    if temporal:
        n += 3 * w * w + 2 * w
    if projection:
        n += cin * cout + 2 * cout
    return n


def backbone_params(blocks, temporal) -> int:
    stem = 3 * 64 * 49 + 2 * 64  # 1×7×7 conv 3→64 + BN
    n, cin = stem, 64
    for b, w, t in zip(blocks, (64, 128, 256, 512), temporal):
        cout = 4 * w
        for i in range(b):
            n += bottleneck_params(cin if i == 0 else cout, w, cout, t, projection=i == 0)
        cin = cout
    return n


def test_param_counts_match_hand_derivation():
    r2d50 = backbone_params((3, 4, 6, 3), (False,) * 4)
    r21d = backbone_params((3, 4, 23, 3), (False, False, True, True))
    assert r2d50 == 23_508_032  # = torchvision ResNet-50 without fc (its 7×7 stem is our 1×7×7)
    for arch, expected in (("r2d50", r2d50), ("r2plus1d101", r21d)):
        s = summarize(build_model(arch, 400, motion=False), 16)
        fc = 2048 * 400 + 400
        assert abs(s["params"]["backbone"] - expected) / expected < 0.01
        assert s["params"]["total"] == s["params"]["backbone"] + fc


def test_motion_module_param_count_by_hand():
    """Prime block (cin=256, cm=64, 49 cost-volume channels) + mid/high levels + fusions + predictors."""
    cm = (64, 128, 256)
    c = (256, 512, 1024)
    prime = 2 * 49 + (256 * 64 + 2 * 64) + ((49 + 64) * 64 * 9 + 2 * 64)
    mid = (512 * 128 + 2 * 128) + ((64 + 128) * 128 * 18 + 2 * 128)
    high = (1024 * 256 + 2 * 256) + ((128 + 256) * 256 * 18 + 2 * 256)
    fusion = sum(m * ch + 2 * ch for m, ch in zip(cm, c))
    s = summarize(build_model("r2d50", 400), 16)
    assert s["params"]["motion"] == prime + mid + high + fusion
    targets = (256, 64, 128)  # level l predicts level l-1: backbone res2, low, mid
    predictors = sum(m * m + m + m * t + t for m, t in zip(cm, targets))
    assert s["params"]["heads"] == predictors + 2048 * 400 + 400


def test_gmacs_are_reported_and_motion_costs_extra():
    with_m = summarize(build_model("r2d50", 400), 16)["gmacs_per_clip"]
    without = summarize(build_model("r2d50", 400, motion=False), 16)["gmacs_per_clip"]
    # Backbone: ResNet-50 is ~4.1 GMACs per 224² frame; with temporal striding R2D-50 at T=16 is ~31.
    assert 28 < without < 34
    # The low-level cost volume alone: 16 frames · 49 · 56² · 256 channels
    assert with_m - without > 16 * 49 * 56 * 56 * 256 / 1e9


def test_forward_outputs_and_baseline_switch():
    x = torch.randn(2, 3, 8, 32, 32)
    out = build_model("tiny", 5)(x)
    assert out["logits"].shape == (2, 5)
    assert set(out) == {"logits", "nce_low", "nce_mid", "nce_high"}
    base = build_model("tiny", 5, motion=False)
    assert set(base(x)) == {"logits"}
    feats = build_model("tiny", 5).motion_features(x)
    assert set(feats) == {"low", "mid", "high"}
    assert feats["low"].shape[2] == 8


def test_untrained_motion_module_is_identity_on_the_backbone():
    """Zero-init fusion BN: with motion on, the logits equal the no-motion model's with the same weights."""
    torch.manual_seed(0)
    m = build_model("tiny", 5, dropout=0.0).eval()
    b = build_model("tiny", 5, motion=False, dropout=0.0).eval()
    b.load_state_dict({k: v for k, v in m.state_dict().items() if k in b.state_dict()})
    x = torch.randn(2, 3, 8, 32, 32)
    torch.testing.assert_close(m(x, with_nce=False)["logits"], b(x)["logits"])


def test_motion_is_causal_no_future_frames():
    """The motion feature at time t must not depend on frames after t (else 'predict the future' leaks)."""
    torch.manual_seed(0)
    m = build_model("tiny", 5).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    y = x.clone()
    y[:, :, 5:] = torch.randn_like(y[:, :, 5:])
    fx, fy = m.motion_features(x), m.motion_features(y)
    torch.testing.assert_close(fx["low"][:, :, :5], fy["low"][:, :, :5])


# ---------------------------------------------------------------- contrastive sampling
@pytest.mark.parametrize("dim", [1, -1, 2])
def test_l2_normalize_equals_f_normalize(dim):
    """Values and input gradients equal torch's F.normalize (to float rounding), zero vectors included (eps
    clamp: zero out, the 1/eps gradient), and a half-precision input comes back in its dtype."""
    x = torch.randn(3, 5, 4, 6, 7, dtype=torch.float64)
    x[0, :, 1, 2, 3] = 0  # a zero vector along dim 1
    x = x.movedim(1, dim).contiguous().movedim(dim, 1) if dim != 1 else x  # another memory layout
    x.requires_grad_(True)
    g = torch.randn(x.shape, dtype=torch.float64)
    ours, ref = l2_normalize(x.float(), dim), F.normalize(x.float(), dim=dim)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    ga, = torch.autograd.grad(l2_normalize(x, dim), x, g)
    gb, = torch.autograd.grad(F.normalize(x, dim=dim), x, g)
    torch.testing.assert_close(ga, gb, atol=1e-9, rtol=1e-7)  # 1/eps at the zero vector
    half = l2_normalize(x.detach().to(torch.bfloat16), dim)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref.detach(), atol=1e-2, rtol=1e-2)


def test_negative_counts_match_the_paper():
    B, N, T = 3, 4, 5
    m = negative_masks(B, N, T)
    per_row = {k: v.sum(1) for k, v in m.items()}
    assert torch.all(per_row["positive"] == 1)
    assert torch.all(per_row["spatial"] == (N - 1) * T)
    assert torch.all(per_row["temporal"] == T - 1)
    assert torch.all(per_row["easy"] == (B - 1) * N * T)
    total = sum(v.int() for v in m.values())
    assert torch.all(total == 1)  # a partition of all B·N·T candidates
    # the candidate counts the demo compares the loss with (chance = ln of them), from the masks
    from hcml.model.contrastive import num_candidates

    same_video = m["positive"] | m["spatial"] | m["temporal"]
    assert num_candidates("all", B, N, T) == m["positive"].shape[1]
    assert num_candidates("video", B, N, T) == int(same_video[0].sum())
    assert num_candidates("temporal", B, N, T) == int((m["positive"] | m["temporal"])[0].sum())


def test_negative_types_on_a_hand_built_batch():
    """B=2, N=2, T=2 → 8 rows ordered (b, n, t). Row 0 = (b0, n0, t0)."""
    m = negative_masks(2, 2, 2)
    assert m["positive"][0].nonzero().flatten().tolist() == [0]
    assert m["temporal"][0].nonzero().flatten().tolist() == [1]  # (b0, n0, t1)
    assert m["spatial"][0].nonzero().flatten().tolist() == [2, 3]  # (b0, n1, t0/t1)
    assert m["easy"][0].nonzero().flatten().tolist() == [4, 5, 6, 7]


def naive_info_nce(pred, target, tau, negatives="all"):
    """Loop over predictions; candidates gathered explicitly per negative type. The positive of pred[b, n, t] is
    target[b, n, t + shift] (shift = 1: the next time step, among the targets of all Tg time steps)."""
    B, N, T, C = pred.shape
    Tg = target.shape[2]
    shift = Tg - T
    losses = []
    for b in range(B):
        for n in range(N):
            for t in range(T):
                p = F.normalize(pred[b, n, t], dim=0)
                pos = F.normalize(target[b, n, t + shift], dim=0)
                spatial = [target[b, m, s] for m in range(N) if m != n for s in range(Tg)]
                temporal = [target[b, n, s] for s in range(Tg) if s != t + shift]
                easy = [target[c, m, s] for c in range(B) if c != b for m in range(N) for s in range(Tg)]
                negs = {"all": spatial + temporal + easy, "video": spatial + temporal, "temporal": temporal}[negatives]
                # the paper's counts (supplementary §3.3) at a level with Tg time steps
                assert len(spatial) == (N - 1) * Tg
                assert len(temporal) == Tg - 1
                assert len(easy) == (B - 1) * N * Tg
                logits = torch.stack([p @ pos] + [p @ F.normalize(x, dim=0) for x in negs]) / tau
                losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("negatives", ["all", "video", "temporal"])
def test_info_nce_equals_naive_loop(negatives, shift):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 6, generator=g), torch.randn(3, 2, 4 + shift, 6, generator=g)
    torch.testing.assert_close(info_nce(pred, target, 0.1, negatives), naive_info_nce(pred, target, 0.1, negatives))
    with pytest.raises(ValueError, match="negatives must be one of"):
        info_nce(pred, target, 0.1, "some")


def test_future_prediction_aligns_t_with_t_plus_1():
    """A predictor that outputs exactly the next frame's target gets a far lower loss than one lagging a step."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, 6, 4, 4, generator=g)
    perfect = torch.cat([target[:, :, 1:], target[:, :, -1:]], 2)  # pred[t] = target[t+1]
    lagging = target  # pred[t] = target[t]
    lp = future_prediction_loss(perfect, target, 8, 0.1, torch.Generator().manual_seed(1))
    ll = future_prediction_loss(lagging, target, 8, 0.1, torch.Generator().manual_seed(1))
    assert lp < 0.1
    assert ll > 5.0  # the present (what a lagging predictor outputs) is a negative


def test_gather_positions_layout():
    x = torch.arange(2 * 3 * 4 * 5 * 5, dtype=torch.float).view(2, 3, 4, 5, 5)
    idx = torch.tensor([[0, 7], [24, 3]])
    g = gather_positions(x, idx)
    assert g.shape == (2, 2, 4, 3)
    assert g[1, 0, 2, 1] == x[1, 1, 2, 4, 4]


def test_phase_losses_weights():
    out = {"logits": torch.tensor([[2.0, 0.0]]), "nce_low": torch.tensor(1.0), "nce_mid": torch.tensor(2.0),
           "nce_high": torch.tensor(3.0)}
    y = torch.tensor([0])
    ce = F.cross_entropy(out["logits"], y)
    ssl, _ = phase_loss(out, y, "ssl", (0.25, 0.25, 1.0), 15.0)
    assert math.isclose(float(ssl), 0.25 + 0.5 + 3.0)
    joint, terms = phase_loss(out, y, "joint", (0.25, 0.25, 1.0), 15.0)
    assert math.isclose(float(joint), float(ce) + 15 * 3.75, rel_tol=1e-6)
    assert set(terms) == {"ce", "nce_low", "nce_mid", "nce_high"}
    ft, _ = phase_loss(out, y, "finetune", (0.25, 0.25, 1.0), 15.0)
    assert math.isclose(float(ft), float(ce), rel_tol=1e-6)


# ---------------------------------------------------------------- compile safety (CPU, tiny)
def test_compile_fullgraph_no_graph_breaks_no_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = build_model("tiny", 5).to(memory_format=torch.channels_last_3d)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        x = torch.randn(2, 3, 8, 32, 32).contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        loss, _ = phase_loss(out, torch.tensor([0, 1]), "joint", (0.25, 0.25, 1.0), 15.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert torch.isfinite(loss)


def test_motion_sampling_draws_where_the_target_changes():
    """Uniform sampling picks every position alike; motion sampling picks positions in proportion to how much
    their target changes over time (here only position 4 of 9 changes: ~96 % of its mass)."""
    from hcml.model.contrastive import change_weights, sample_positions

    t = torch.zeros(64, 4, 5, 3, 3)
    t[:, :, :, 1, 1] = torch.randn(64, 4, 5)
    w = change_weights(t)
    # change c at position 4, a floor of 5 % of the mean (c / 9) everywhere: (1 + 0.05/9) / (1 + 0.05) = 0.9577
    assert torch.allclose(w[:, 4] / w.sum(1), torch.tensor(0.9577), atol=1e-3)
    g = torch.Generator().manual_seed(0)
    motion = sample_positions(64, 9, 1, "cpu", g, w)
    uniform = sample_positions(64, 9, 1, "cpu", g)
    assert (motion == 4).float().mean() > 0.85
    assert (uniform == 4).float().mean() < 0.35
    both = sample_positions(64, 9, 3, "cpu", g, w)  # without replacement: distinct, position 4 always among them
    assert all(len(set(r)) == 3 for r in both.tolist())
    assert (both == 4).any(1).float().mean() > 0.95


def test_a_backbone_family_that_is_not_a_resnet_spec_plugs_in(monkeypatch):
    """The written-down interface (model/backbone.BackboneLike) is all HCML needs: a family registered in ARCHS as
    a builder, with its own stage names and level attachment, trains the full model (logits and the three NCE
    terms, gradients reaching the stem), and the stages it was asked to make causal are the ones its levels
    follow."""
    from torch import nn

    from hcml.model import backbone as bb
    from hcml.model import build_model

    asked = {}

    class Plain(nn.Module):
        def __init__(self, causal_stages):
            super().__init__()
            asked["causal"] = tuple(causal_stages)
            self.stem = nn.Conv3d(3, 8, (1, 3, 3), (1, 2, 2), (0, 1, 1))
            widths = {"s1": 8, "s2": 16, "s3": 16, "s4": 24}
            self.stages, cin = nn.ModuleDict(), 8
            for i, (name, w) in enumerate(widths.items()):
                stride = (1, 1, 1) if i == 0 else (2, 2, 2)
                self.stages[name] = nn.Sequential(nn.Conv3d(cin, w, (1, 3, 3), stride, (0, 1, 1)), nn.ReLU())
                cin = w
            self.widths, self.out_channels = widths, cin
            self.level_stages = {"low": "s1", "mid": "s2", "high": "s3"}

        @property
        def stage_names(self):
            return list(self.stages)

        def stage_channels(self, name):
            return self.widths[name]

    monkeypatch.setitem(bb.ARCHS, "plain", Plain)
    model = build_model("plain", 5, max_displacement=2, nce_samples=4)
    assert asked["causal"] == ("s1", "s2", "s3")
    out = model(torch.randn(2, 3, 8, 32, 32))
    assert out["logits"].shape == (2, 5)
    assert set(out) == {"logits", "nce_low", "nce_mid", "nce_high"}
    sum(v.sum() for v in out.values()).backward()
    assert model.backbone.stem.weight.grad.abs().sum() > 0
