"""Cost volume (local correlation) between two feature maps, as a real PyTorch operator.

Math. For f1, f2 of shape (B, C, H, W), max displacement d and stride s, D = 2·d/s + 1 and::

    out[b, i·D + j, y, x] = 1/C · Σ_c f1[b, c, y, x] · f2[b, c, y + dy_i, x + dx_j],
    dy_i = (i − D//2)·s,  dx_j = (j − D//2)·s,    f2 = 0 outside the image.

Output (B, D², H, W), channel index = row-major (displacement row i, column j). HCML uses d = 6, s = 2 (D = 7).

Layout and dtype policy. Inputs may have any strides. The CUDA kernels compute in NHWC: channels_last inputs
(the model's layout) are read in place, any other layout is copied once (ops/_cuda.py says which, and counts it);
outputs follow the input's layout. fp32/fp16/bf16 are accepted; products are accumulated in fp32
and the result is cast back to the input dtype (the two inputs are promoted to a common dtype first).

Memory-traffic model (forward): an ideal kernel reads f1 and f2 once (2·B·C·H·W elements) and writes
B·D²·H·W elements; at C = 64, D² = 49 the write is ~40 % of the traffic, so the op is bandwidth-bound and
``hcml bench op`` reports achieved GB/s against that model. Backward reads grad (B·D²·H·W), f1 and f2 and
writes both input grads.

Implementations behind one API:
- CUDA: ``csrc/cost_volume_nhwc.cuh`` (kernels compiled for the models' (d, s), and generic ones),
  dispatched in ``csrc/cost_volume_kernels.cu`` (needs only the CUDA toolkit), torch binding in
  ``csrc/cost_volume_binding.cpp``; built ahead of time in the Dockerfile, else JIT with a cache.
- CPU: C kernels (``csrc/cost_volume_cpu.c``, compiled on first use, called via ctypes with the images split
  over torch's threads) that read both layouts in place: NHWC for channels_last inputs, planar (contiguous
  (n, c) planes, any n and c strides) for the rest, so the model's NCHW-on-CPU layout costs no copies; without a C compiler, one batched GEMM per displacement row reading
  the D columns of each pixel off a band of the score matrix (see the CPU section below).
- Reference: :func:`cost_volume_reference` (unfold), for tests and benchmarks only.

The op is registered with ``torch.library`` (``hcml::cost_volume``) with a fake implementation and autograd,
so ``torch.compile(fullgraph=True)`` traces through it without graph breaks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hcml.ops import _cpu, _cuda


def num_displacements(max_displacement: int, stride: int) -> int:
    """D, the number of displacements per axis."""
    if stride <= 0 or max_displacement < 0 or max_displacement % stride:
        raise ValueError(f"max_displacement ({max_displacement}) must be a non-negative multiple of stride ({stride})")
    return 2 * (max_displacement // stride) + 1


def _check(f1: Tensor, f2: Tensor) -> None:
    if f1.dim() != 4 or f1.shape != f2.shape:
        raise ValueError(f"cost_volume needs two (B, C, H, W) tensors of one shape, got {tuple(f1.shape)} "
                         f"and {tuple(f2.shape)}")


def _layout(t: Tensor) -> torch.memory_format:
    """Outputs follow the input's layout: channels_last in → channels_last out (the CUDA binding does the same).
    Real and fake implementations must agree on this, or compiled graphs get wrong strides."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------- CPU paths
# First choice: the C kernels of ops/csrc/cost_volume_cpu.c (ops/_cpu.py builds them with the system compiler),
# NHWC for channels_last inputs and planar for the rest, so neither layout is copied. Without a C compiler (or
# HCML_CPU_COST_VOLUME=torch), the pure-torch band GEMMs on NHWC views: for one displacement row dy_i, pixel
# row y of f1 meets row y + dy_i of the zero-padded f2. One batched GEMM per dy_i, (N·H, W, C) @ (N·H, C,
# W + 2·md), scores every x against every padded column; the D columns that are real displacements (x + j·s) lie
# on a band of that (W, W + 2·md) matrix, read with one strided view. The backward writes the incoming grads into that band (zeros elsewhere) and runs the two
# transposed GEMMs.


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _nhwc(t: Tensor, acc: torch.dtype, pad: int = 0) -> Tensor:
    """(N, C, H, W) → (N, H + 2·pad, W + 2·pad, C) in the accumulation dtype (a view when already NHWC)."""
    t = t.to(acc)
    if pad:
        t = F.pad(t, (pad, pad, pad, pad))
    return t.permute(0, 2, 3, 1)


def _from_nhwc(t: Tensor, like: Tensor) -> Tensor:
    """An NHWC result back to (N, C, H, W) in ``like``'s dtype and layout."""
    return t.permute(0, 3, 1, 2).to(like.dtype).contiguous(memory_format=_layout(like))


def _band(m: Tensor, W: int, Wp: int, D: int, s: int) -> Tensor:
    """The (N·H, W, D) view of ``m`` (N·H, W, Wp) at [x, x + j·s]: the real displacements of each pixel."""
    return m.as_strided((m.shape[0], W, D), (W * Wp, Wp + 1, s), m.storage_offset())


def _gemm_forward(f1: Tensor, f2: Tensor, md: int, s: int, D: int, acc: torch.dtype) -> Tensor:
    N, C, H, W = f1.shape
    Wp = W + 2 * md
    out = torch.zeros((N, H, W, D * D), dtype=acc)
    if out.numel() and C:
        a = _nhwc(f1, acc).reshape(N * H, W, C)
        b = _nhwc(f2, acc, md)
        for i in range(D):
            rows = b[:, i * s:i * s + H].reshape(N * H, Wp, C)
            scores = torch.bmm(a, rows.transpose(1, 2))
            out[..., i * D:(i + 1) * D] = _band(scores, W, Wp, D, s).view(N, H, W, D)
    return out / max(C, 1)


def _gemm_backward(grad: Tensor, f1: Tensor, f2: Tensor, md: int, s: int, D: int, acc: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    N, C, H, W = f1.shape
    Wp, Hp = W + 2 * md, H + 2 * md
    g1 = torch.zeros((N * H, W, C), dtype=acc)
    g2p = torch.zeros((N, Hp, Wp, C), dtype=acc)
    if g1.numel():
        a = _nhwc(f1, acc).reshape(N * H, W, C)
        b = _nhwc(f2, acc, md)
        g = _nhwc(grad, acc)  # (N, H, W, D²)
        band_matrix = torch.zeros((N * H, W, Wp), dtype=acc)  # off-band entries stay zero
        band = _band(band_matrix, W, Wp, D, s)
        for i in range(D):
            band.copy_(g[..., i * D:(i + 1) * D].reshape(N * H, W, D))
            g1.baddbmm_(band_matrix, b[:, i * s:i * s + H].reshape(N * H, Wp, C))
            g2p[:, i * s:i * s + H] += torch.bmm(band_matrix.transpose(1, 2), a).view(N, H, Wp, C)
    return (g1 / max(C, 1)).view(N, H, W, C), g2p[:, md:md + H, md:md + W] / max(C, 1)


def _c_input(t: Tensor, acc: torch.dtype) -> Tensor:
    """``t`` in the accumulation dtype, read in place by the planar C kernels when its rows are unit-stride."""
    t = t.to(acc)
    return t if _cpu.planar(t) else t.contiguous()


def _cpu_forward(f1: Tensor, f2: Tensor, md: int, s: int) -> Tensor:
    D, acc = num_displacements(md, s), _acc_dtype(f1)
    if not _cpu.available(acc):
        return _from_nhwc(_gemm_forward(f1, f2, md, s, D, acc), f1)
    if _layout(f1) == torch.channels_last:  # NHWC in place: the permutes are views
        return _from_nhwc(_cpu.forward(_nhwc(f1, acc).contiguous(), _nhwc(f2, acc).contiguous(), md, s, D), f1)
    return _cpu.forward_planar(_c_input(f1, acc), _c_input(f2, acc), md, s, D).to(f1.dtype)


def _cpu_backward(grad: Tensor, f1: Tensor, f2: Tensor, md: int, s: int) -> tuple[Tensor, Tensor]:
    D, acc = num_displacements(md, s), _acc_dtype(f1)
    if not _cpu.available(acc):
        g1, g2 = _gemm_backward(grad, f1, f2, md, s, D, acc)
    elif _layout(f1) == torch.channels_last:
        g1, g2 = _cpu.backward(_nhwc(grad, acc).contiguous(), _nhwc(f1, acc).contiguous(),
                               _nhwc(f2, acc).contiguous(), md, s)
    else:
        g1, g2 = _cpu.backward_planar(_c_input(grad, acc), _c_input(f1, acc), _c_input(f2, acc), md, s)
        return g1.to(f1.dtype), g2.to(f2.dtype)
    return _from_nhwc(g1, f1), _from_nhwc(g2, f2)


# ---------------------------------------------------------------- the operator
@torch.library.custom_op("hcml::cost_volume", mutates_args=())
def _cost_volume_op(f1: Tensor, f2: Tensor, max_displacement: int, stride: int) -> Tensor:
    if f1.is_cuda:  # the kernels write NHWC; the result follows the input's layout (a view when channels_last)
        return _cuda.forward(f1, f2, max_displacement, stride).contiguous(memory_format=_layout(f1))
    return _cpu_forward(f1, f2, max_displacement, stride)


@_cost_volume_op.register_fake
def _(f1, f2, max_displacement, stride):
    D = num_displacements(max_displacement, stride)
    B, _, H, W = f1.shape
    return f1.new_empty((B, D * D, H, W)).contiguous(memory_format=_layout(f1))


@torch.library.custom_op("hcml::cost_volume_backward", mutates_args=())
def _cost_volume_backward_op(grad: Tensor, f1: Tensor, f2: Tensor, max_displacement: int,
                             stride: int) -> tuple[Tensor, Tensor]:
    if f1.is_cuda:
        g1, g2 = _cuda.backward(grad, f1, f2, max_displacement, stride)
        return g1.contiguous(memory_format=_layout(f1)), g2.contiguous(memory_format=_layout(f2))
    return _cpu_backward(grad, f1, f2, max_displacement, stride)


@_cost_volume_backward_op.register_fake
def _(grad, f1, f2, max_displacement, stride):
    return (f1.new_empty(f1.shape).contiguous(memory_format=_layout(f1)),
            f2.new_empty(f2.shape).contiguous(memory_format=_layout(f2)))


def _setup_context(ctx, inputs, output):
    f1, f2, md, s = inputs
    ctx.save_for_backward(f1, f2)
    ctx.md, ctx.s = md, s


def _backward(ctx, grad):
    f1, f2 = ctx.saved_tensors
    g1, g2 = _cost_volume_backward_op(grad, f1, f2, ctx.md, ctx.s)  # both paths read through strides
    return g1, g2, None, None


_cost_volume_op.register_autograd(_backward, setup_context=_setup_context)


def cost_volume(f1: Tensor, f2: Tensor, max_displacement: int = 6, stride: int = 2) -> Tensor:
    """Cost volume of (B, C, H, W) maps → (B, D², H, W); see the module docstring for the exact definition."""
    _check(f1, f2)
    num_displacements(max_displacement, stride)
    if f1.dtype != f2.dtype:
        dt = torch.promote_types(f1.dtype, f2.dtype)
        f1, f2 = f1.to(dt), f2.to(dt)
    return _cost_volume_op(f1, f2, max_displacement, stride)


# ---------------------------------------------------------------- reference (tests, benchmarks)
def cost_volume_reference(f1: Tensor, f2: Tensor, max_displacement: int = 6, stride: int = 2) -> Tensor:
    """Obvious implementation via ``F.unfold`` of the zero-padded f2 (memory-hungry: D²·C copies of f2)."""
    _check(f1, f2)
    D = num_displacements(max_displacement, stride)
    B, C, H, W = f1.shape
    md = max_displacement
    p = F.pad(f2.float(), (md, md, md, md))
    # dilation = stride picks the D×D displacement grid around each output pixel.
    cols = F.unfold(p, kernel_size=D, dilation=stride)  # (B, C·D², H·W)
    cols = cols.view(B, C, D * D, H, W)
    return (f1.float().unsqueeze(2) * cols).mean(1).to(f1.dtype)
