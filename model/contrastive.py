"""InfoNCE over sampled spatio-temporal positions (supplementary §3.3).

For B videos, N sampled spatial positions per video and T' time steps, every prediction P̂[b, n, t] is scored
against all B·N·T' targets. Its single positive is the target of the same video, position and time; the
remaining candidates are exactly the paper's three negative types:

- spatial:  same video, other position, any time          → (N − 1)·T'
- temporal: same video, same position, other time         → T' − 1
- easy:     other videos                                   → (B − 1)·N·T'

1 + (N−1)T' + (T'−1) + (B−1)NT' = B·N·T', i.e. the dense B·N·T' × B·N·T' score matrix, cross-entropy on its
diagonal. :func:`negative_masks` exposes the split for tests and analysis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_positions(B: int, HW: int, N: int, device, generator: torch.Generator | None = None) -> Tensor:
    """N distinct spatial indices per video, (B, N). N is capped at H·W."""
    N = min(N, HW)
    return torch.rand(B, HW, device=device, generator=generator).argsort(dim=1)[:, :N]


def gather_positions(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, C, T, H, W), idx (B, N) over H·W → (B, N, T, C)."""
    B, C, T, H, W = x.shape
    flat = x.reshape(B, C, T, H * W)
    g = torch.gather(flat, 3, idx[:, None, None, :].expand(B, C, T, idx.shape[1]))  # (B, C, T, N)
    return g.permute(0, 3, 2, 1)


def info_nce(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """pred, target: (B, N, T, C), row-aligned (pred[b,n,t] ↔ target[b,n,t]). Mean InfoNCE over all predictions."""
    B, N, T, C = pred.shape
    p = F.normalize(pred.reshape(B * N * T, C).float(), dim=1)
    g = F.normalize(target.reshape(B * N * T, C).float(), dim=1)
    logits = p @ g.t() / temperature
    labels = torch.arange(B * N * T, device=pred.device)
    return F.cross_entropy(logits, labels)


def future_prediction_loss(pred: Tensor, target: Tensor, num_samples: int, temperature: float,
                           generator: torch.Generator | None = None) -> Tensor:
    """pred (B, C, T, H, W) made at time t is scored against target at t+1 (same resolution)."""
    B, _, T, H, W = pred.shape
    if T < 2:
        raise ValueError(f"future prediction needs at least 2 time steps at this level, got T={T}")
    idx = sample_positions(B, H * W, num_samples, pred.device, generator)
    return info_nce(gather_positions(pred[:, :, :-1], idx), gather_positions(target[:, :, 1:], idx), temperature)


def negative_masks(B: int, N: int, T: int) -> dict[str, Tensor]:
    """Boolean (B·N·T × B·N·T) masks of positive / spatial / temporal / easy candidates, rows = predictions."""
    ids = torch.arange(B * N * T)
    b, n, t = ids // (N * T), (ids // T) % N, ids % T
    same_b = b[:, None] == b[None]
    same_n = n[:, None] == n[None]
    same_t = t[:, None] == t[None]
    return {
        "positive": same_b & same_n & same_t,
        "spatial": same_b & ~same_n,
        "temporal": same_b & same_n & ~same_t,
        "easy": ~same_b,
    }
