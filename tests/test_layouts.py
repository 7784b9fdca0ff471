"""Results must not depend on how a tensor is laid out in memory, nor on the CPU that computes them.

Property tests over input layouts (contiguous, channels_last(_3d), permuted storage, channel slices with a step,
expanded batches, batch of 1, odd sizes) for ``cost_volume`` and for the whole network with its motion module:
forward, backward and ``torch.compile`` (fullgraph) agree with the contiguous result.

CPU dependence: the same code takes other kernels on other CPUs (oneDNN's AVX-512/bf16 paths vs native AVX2
ones; a compiled backward once failed on an AMD EPYC only, because a BatchNorm there returned other strides than
the traced graph assumed). :func:`test_avx2_code_paths` reruns the layout and compile tests with oneDNN and ATen
capped at AVX2 (``ONEDNN_MAX_CPU_ISA``/``ATEN_CPU_CAPABILITY``), so any machine checks the AVX2 paths too.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from hcml.model import build_model, phase_loss
from hcml.ops import cost_volume, cost_volume_reference
from tests.conftest import PY, REPO


def layouts4(B, C, H, W, g):
    """name → (B, C, H, W) tensor with that storage; all hold the same values as ``base``."""
    base = torch.randn(B, C, H, W, generator=g)
    wide = torch.zeros(B, 2 * C, H, W)
    wide[:, ::2] = base
    out = {
        "contiguous": base.clone(),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0),  # storage (W, C, B, H)
        "channel_step": wide[:, ::2],
    }
    if B > 1:
        one = base[:1].clone()
        out["expanded"] = one.expand(B, C, H, W)
        out["_expanded_base"] = one.expand(B, C, H, W).contiguous()
    return base, out


@pytest.mark.parametrize("shape", [(2, 3, 9, 7, 4, 2), (1, 5, 6, 11, 6, 2), (3, 2, 5, 5, 2, 1)])
def test_cost_volume_is_layout_independent(shape):
    B, C, H, W, md, s = shape
    g = torch.Generator().manual_seed(0)
    _, a = layouts4(B, C, H, W, g)
    _, b = layouts4(B, C, H, W, g)
    D2 = (2 * (md // s) + 1) ** 2
    grad = torch.randn(B, D2, H, W, generator=g)
    for name in [k for k in a if not k.startswith("_")]:
        ref_a = a["_expanded_base"] if name == "expanded" else a["contiguous"]
        ref_b = b["_expanded_base"] if name == "expanded" else b["contiguous"]
        x, y = a[name].detach().requires_grad_(), b[name].detach().requires_grad_()
        rx, ry = ref_a.detach().clone().requires_grad_(), ref_b.detach().clone().requires_grad_()
        out = cost_volume(x, y, md, s)
        ref = cost_volume_reference(rx, ry, md, s)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)
        gx, gy = torch.autograd.grad(out, (x, y), grad)
        rgx, rgy = torch.autograd.grad(ref, (rx, ry), grad)
        torch.testing.assert_close(gx, rgx, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(gy, rgy, atol=1e-5, rtol=1e-4, msg=name)
        torch._dynamo.reset()
        comp = torch.compile(lambda p, q: cost_volume(p, q, md, s), backend="aot_eager", fullgraph=True)
        x2, y2 = a[name].detach().requires_grad_(), b[name].detach().requires_grad_()
        out2 = comp(x2, y2)
        torch.testing.assert_close(out2, ref, atol=1e-5, rtol=1e-5, msg=name)
        cgx, cgy = torch.autograd.grad(out2, (x2, y2), grad)
        torch.testing.assert_close(cgx, rgx, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(cgy, rgy, atol=1e-5, rtol=1e-4, msg=name)


def layouts5(B, C, T, H, W, g):
    base = torch.randn(B, C, T, H, W, generator=g)
    wide = torch.zeros(B, 2 * C, T, H, W)
    wide[:, ::2] = base
    return base, {
        "contiguous": base.clone(),
        "channels_last_3d": base.contiguous(memory_format=torch.channels_last_3d),
        "permuted": base.permute(2, 0, 3, 4, 1).contiguous().permute(1, 4, 0, 2, 3),  # storage (T, B, H, W, C)
        "channel_step": wide[:, ::2],
    }


def _net_step(model, x, seed=0):
    """Logits, NCE terms and input/parameter grads of one joint-loss step (fixed NCE sampling)."""
    torch.manual_seed(seed)
    x = x.detach().requires_grad_()
    out = model(x)
    loss, terms = phase_loss(out, torch.arange(x.shape[0]) % 5, "joint", (0.25, 0.25, 1.0), 1.0)
    grads = torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True)
    return out["logits"], terms, grads


def _tiny(memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    return build_model("tiny", 5, dropout=0.0).train().to(memory_format=memory_format)


@pytest.mark.parametrize("shape", [(2, 8, 24, 24), (1, 8, 17, 13)])  # (B, T, H, W): batch of 1, odd sizes
def test_network_forward_backward_is_layout_independent(shape):
    B, T, H, W = shape
    g = torch.Generator().manual_seed(1)
    base, xs = layouts5(B, 3, T, H, W, g)
    ref_logits, ref_terms, ref_grads = _net_step(_tiny(), base)
    for name, x in xs.items():
        fmt = torch.channels_last_3d if name == "channels_last_3d" else torch.contiguous_format
        logits, terms, grads = _net_step(_tiny(fmt), x)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, msg=name)
        for k in ref_terms:
            torch.testing.assert_close(terms[k], ref_terms[k], atol=1e-4, rtol=1e-4, msg=f"{name} {k}")
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            if b is not None:
                torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3, msg=f"{name} grad {i}")


def test_network_expanded_batch():
    """A batch expanded from one clip gives B identical rows (and the same grads as its materialised copy)."""
    g = torch.Generator().manual_seed(2)
    one = torch.randn(1, 3, 8, 20, 20, generator=g)
    a = _net_step(_tiny(), one.expand(3, -1, -1, -1, -1))
    b = _net_step(_tiny(), one.expand(3, -1, -1, -1, -1).contiguous())
    torch.testing.assert_close(a[0], b[0])
    assert torch.allclose(a[0][0], a[0][2], atol=1e-5)
    for x, y in zip(a[2], b[2]):
        if y is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["contiguous", "channels_last_3d", "permuted", "channel_step"])
def test_compiled_bf16_training_step_any_layout(name):
    """Compiled (fullgraph) forward+backward under bf16 autocast, for each input layout: one graph, finite
    loss, and the same loss as eager within bf16 rounding."""
    from torch._dynamo.testing import CompileCounterWithBackend

    g = torch.Generator().manual_seed(3)
    _, xs = layouts5(2, 3, 8, 24, 24, g)
    x = xs[name]
    fmt = torch.channels_last_3d if name == "channels_last_3d" else torch.contiguous_format
    torch._dynamo.reset()
    model = _tiny(fmt)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    y = torch.tensor([0, 1])
    losses = []
    for net in (model, compiled):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        loss, _ = phase_loss(out, y, "joint", (0.25, 0.25, 1.0), 15.0)
        loss.backward()
        losses.append(loss.detach().float())
    assert counter.frame_count == 1
    assert torch.isfinite(losses[1])
    assert abs(losses[1] - losses[0]) <= 0.02 * abs(losses[0]) + 0.02


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2", reason="already running on the AVX2 paths")
def test_avx2_code_paths():
    """The layout and compile tests again with oneDNN and ATen capped at AVX2: the kernels an AVX2-only CPU (e.g.
    an AMD EPYC of the Zen 2/3 generations) takes, on any machine."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    res = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layouts.py",
                          "tests/test_model.py::test_compile_fullgraph_no_graph_breaks_no_recompiles"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
