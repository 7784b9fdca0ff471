"""InfoNCE over sampled spatio-temporal positions (supplementary §3.3).

For B videos, N sampled spatial positions per video and a level with T time steps, the prediction P̂[b, n, t]
made at time t (t < T − 1) is scored against the targets of all T time steps of all B·N sampled tubes. Its
single positive is the target of the same video and position at t + 1; the other candidates are exactly the
paper's three negative types, in the paper's counts:

- spatial:  same video, other position, any time          → (N − 1)·T
- temporal: same video, same position, other time         → T − 1   (the present and the past among them)
- easy:     other videos                                   → (B − 1)·N·T

1 + (N−1)T + (T−1) + (B−1)NT = B·N·T candidates per prediction: a dense score matrix, cross-entropy against
the shifted diagonal. :func:`negative_masks` exposes the split for tests and analysis (square case).
``negatives`` restricts the candidates to one video (spatial + temporal) or one tube (temporal only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


SAMPLING = ("uniform", "motion")


def l2_normalize(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=dim)`` (x / max(||x||, eps)); half precision computed in fp32 and cast back.

    Why not F.normalize: on the CPU, torch's vector_norm over a non-innermost dim (the channels of an NCTHW map)
    runs ~10x slower than a sum of squares, and its backward makes several more passes; this form (rsqrt of the
    clamped sum of squares; max(sqrt(s), eps) = sqrt(max(s, eps²))) does one reduction and fuses under
    torch.compile. Equal to F.normalize to float rounding (tested)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * xf.square().sum(dim, keepdim=True).clamp_min(eps * eps).rsqrt()).to(x.dtype)


def sample_positions(B: int, HW: int, N: int, device, generator: torch.Generator | None = None,
                     weights: Tensor | None = None) -> Tensor:
    """N distinct spatial indices per video, (B, N); N is capped at H·W. Uniform, or with ``weights`` (B, H·W)
    >= 0 with probability proportional to them, without replacement (Gumbel top-k)."""
    N = min(N, HW)
    u = torch.rand(B, HW, device=device, generator=generator)
    if weights is None:
        return u.argsort(dim=1)[:, :N]
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    return (torch.log(weights.float().clamp_min(1e-20)) + gumbel).topk(N, dim=1).indices


def change_weights(target: Tensor) -> Tensor:
    """(B, C, T, H, W) → (B, H·W): how much each position's (unit-normalised) target changes from one time step to
    the next, plus a floor of 5 % of the mean so that static positions keep a chance. Where nothing changes, no
    prediction can tell the future from the present, so those tubes carry no signal for the temporal contrast."""
    with torch.no_grad():
        t = l2_normalize(target.float(), dim=1)
        change = (t[:, :, 1:] - t[:, :, :-1]).pow(2).sum(1).mean(1).flatten(1)
        return change + 0.05 * change.mean(1, keepdim=True) + 1e-12


def gather_positions(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, C, T, H, W), idx (B, N) over H·W → (B, N, T, C)."""
    B, C, T, H, W = x.shape
    flat = x.reshape(B, C, T, H * W)
    g = torch.gather(flat, 3, idx[:, None, None, :].expand(B, C, T, idx.shape[1]))  # (B, C, T, N)
    return g.permute(0, 3, 2, 1)


NEGATIVES = ("all", "video", "temporal")


def info_nce(pred: Tensor, target: Tensor, temperature: float, negatives: str = "all") -> Tensor:
    """pred (B, N, Tp, C), target (B, N, Tg, C) with Tg >= Tp: the positive of pred[b, n, t] is
    target[b, n, t + Tg − Tp] (Tg = Tp: row-aligned; Tg = Tp + 1: the next time step). Mean over predictions.

    ``negatives`` picks the candidates each prediction is scored against (besides its positive):
    ``all`` the paper's three types (spatial, temporal, easy: B·N·Tg candidates); ``video`` only its own video's
    (spatial + temporal: N·Tg); ``temporal`` only its own position's other time steps (Tg). Fewer candidates from
    other videos leave appearance less to solve, so more of the loss is about what changes over time.
    """
    B, N, Tp, C = pred.shape
    Tg, shift = target.shape[2], target.shape[2] - pred.shape[2]
    if target.shape[:2] != pred.shape[:2] or shift < 0:
        raise ValueError(f"target {tuple(target.shape)} does not match predictions {tuple(pred.shape)}")
    p = F.normalize(pred.float(), dim=-1)
    g = F.normalize(target.float(), dim=-1)
    # positives: within a group, prediction row (b, n, t) ↔ candidate column (b, n, t + shift)
    if negatives == "all":
        p, g, groups = p.reshape(1, B * N * Tp, C), g.reshape(1, B * N * Tg, C), 1
    elif negatives == "video":
        p, g, groups = p.reshape(B, N * Tp, C), g.reshape(B, N * Tg, C), B
    elif negatives == "temporal":
        p, g, groups = p.reshape(B * N, Tp, C), g.reshape(B * N, Tg, C), B * N
    else:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    r = torch.arange(p.shape[1], device=pred.device)  # row = tube · Tp + t
    labels = ((r // Tp) * Tg + r % Tp + shift).expand(groups, -1)
    logits = torch.bmm(p, g.transpose(1, 2)) / temperature  # (groups, rows, candidates)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def num_candidates(negatives: str, B: int, N: int, T: int) -> int:
    """How many targets each prediction is scored against (its positive included) for B videos, N positions and
    T time steps: chance level of the loss is ln of this."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    return {"all": B * N * T, "video": N * T, "temporal": T}[negatives]


def future_prediction_loss(pred: Tensor, target: Tensor, num_samples: int, temperature: float,
                           generator: torch.Generator | None = None, negatives: str = "all",
                           sampling: str = "uniform") -> Tensor:
    """pred (B, C, T, H, W): the prediction made at time t < T − 1 is scored against the targets of all T time
    steps (same resolution); its positive is the target at t + 1, so the present and the past are among its
    temporal negatives (copying the present is the trivial solution the loss must rule out). ``sampling``:
    ``uniform`` positions (the paper), or ``motion``: positions drawn in proportion to how much their target
    changes over time (:func:`change_weights`)."""
    B, _, T, H, W = pred.shape
    if T < 2:
        raise ValueError(f"future prediction needs at least 2 time steps at this level, got T={T}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    weights = change_weights(target) if sampling == "motion" else None
    idx = sample_positions(B, H * W, num_samples, pred.device, generator, weights)
    return info_nce(gather_positions(pred[:, :, :-1], idx), gather_positions(target, idx), temperature, negatives)


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
