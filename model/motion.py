"""The hierarchical motion module: a prime motion block and higher motion levels, each fused into the backbone.

Reconstruction (the main paper's equations were not available; the choices below are configurable or isolated):

- Time alignment: the motion feature at time t is computed from frames (t−1, t) — never from t+1 — so that
  predicting the *future* feature at t+1 is a real prediction, not a copy. At t = 0 the pair is (0, 0).
- Prime motion block (low level, after res2; supplementary §3.2): cost volume (d = 6, s = 2, 49 channels) of
  (X_{t−1}, X_t) → BN+ReLU, in parallel a 1×1 conv reducing X_t → BN+ReLU; concatenated → 3×3 conv → BN+ReLU.
- Higher levels (mid after res3, high after res4): the previous level's motion feature resampled to this
  stage's (T, H, W) by average pooling, concatenated with the reduced backbone feature, then a *causal*
  (2×3×3) conv over (t−1, t) → BN+ReLU: motion of motion, still never looking ahead.
- Fusion: X ← X + BN₀(1×1 conv(P)), BN₀'s gamma initialised to zero, so an untrained module is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hcml.model.contrastive import l2_normalize
from hcml.ops import cost_volume, num_displacements


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last_3d when ``x`` is stored that way, else contiguous.

    Why: BatchNorm, pooling and convolutions pick their output strides from their input's layout, and for
    layouts other than these two the CPU kernels (which differ by ISA: oneDNN on AVX-512, native on AVX2) and the
    fake tensors that torch.compile traces with do not always agree. The motion module therefore hands those ops
    only these two layouts, chosen once from the block's input.
    """
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def resample(x: Tensor, size) -> Tensor:
    """Average-pool (B, C, T, H, W) to ``size`` = (T', H', W'): identity when equal, ``avg_pool3d`` when every axis
    shrinks by an integer factor (the motion levels halve time and space), adaptive pooling otherwise."""
    src, size = tuple(x.shape[2:]), tuple(size)
    if src == size:
        return x
    if all(b and a % b == 0 for a, b in zip(src, size)):
        k = tuple(a // b for a, b in zip(src, size))
        return F.avg_pool3d(x, k, k)
    return F.adaptive_avg_pool3d(x, size)


def frames_to_batch(x: Tensor) -> Tensor:
    """(B, C, T, H, W) → (B·T, C, H, W); a view for contiguous and channels_last_3d inputs alike."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def batch_to_frames(x: Tensor, B: int, fmt: torch.memory_format) -> Tensor:
    """(B·T, C, H, W) → (B, C, T, H, W) stored as ``fmt`` (a view when the strides already are, else a copy)."""
    BT, C, H, W = x.shape
    return x.reshape(B, BT // B, C, H, W).transpose(1, 2).contiguous(memory_format=fmt)


def previous_frame(x: Tensor) -> Tensor:
    """x shifted one step later in time: out[:, :, t] = x[:, :, t−1], out[:, :, 0] = x[:, :, 0]."""
    return torch.cat([x[:, :, :1], x[:, :, :-1]], dim=2)


class Fusion(nn.Module):
    """Residual add of a motion feature into the backbone through 1×1 conv + zero-init BN."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm3d(cout)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor, p: Tensor) -> Tensor:
        return x + self.bn(self.conv(p))


class PrimeMotionBlock(nn.Module):
    def __init__(self, cin: int, cm: int, max_displacement: int = 6, stride: int = 2):
        super().__init__()
        self.md, self.s = max_displacement, stride
        D2 = num_displacements(max_displacement, stride) ** 2
        self.cv_bn = nn.BatchNorm3d(D2)
        self.reduce = nn.Sequential(nn.Conv3d(cin, cm, 1, bias=False), nn.BatchNorm3d(cm), nn.ReLU(inplace=True))
        self.mix = nn.Sequential(nn.Conv3d(D2 + cm, cm, (1, 3, 3), padding=(0, 1, 1), bias=False),
                                 nn.BatchNorm3d(cm), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        B, fmt = x.shape[0], memory_format_of(x)
        # cosine correlation: the match, not the feature energy, decides. Normalised in fp32 and cast back, so the
        # cost volume reads bf16/fp16 under autocast (half the memory traffic, fp32 accumulation).
        f = l2_normalize(x, dim=1)
        cv = cost_volume(frames_to_batch(previous_frame(f)), frames_to_batch(f), self.md, self.s)
        cv = F.relu(self.cv_bn(batch_to_frames(cv, B, fmt)))
        return self.mix(torch.cat([cv, self.reduce(x)], dim=1))


class MotionLevel(nn.Module):
    """A higher motion level: previous motion (resampled) + reduced appearance → causal (2×3×3) conv."""

    def __init__(self, c_prev: int, cin: int, cm: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv3d(cin, cm, 1, bias=False), nn.BatchNorm3d(cm), nn.ReLU(inplace=True))
        self.temporal = nn.Sequential(nn.Conv3d(c_prev + cm, cm, (2, 3, 3), padding=(0, 1, 1), bias=False),
                                      nn.BatchNorm3d(cm), nn.ReLU(inplace=True))

    def forward(self, p_prev: Tensor, x: Tensor) -> Tensor:
        fmt = memory_format_of(x)
        p = resample(p_prev, x.shape[2:]).contiguous(memory_format=fmt)
        h = torch.cat([p, self.reduce(x)], dim=1)
        h = F.pad(h, (0, 0, 0, 0, 1, 0)).contiguous(memory_format=fmt)  # causal: pad one frame in front
        return self.temporal(h)


class Predictor(nn.Module):
    """Maps a motion feature at time t to a prediction of the previous level's feature at t+1."""

    def __init__(self, cm: int, c_target: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(cm, cm, 1), nn.ReLU(inplace=True), nn.Conv3d(cm, c_target, 1))

    def forward(self, p: Tensor) -> Tensor:
        return self.net(p)
