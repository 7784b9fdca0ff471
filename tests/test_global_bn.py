"""train.bn=global on CPU/gloo: GlobalBatchNorm over 2 processes equals one process holding the whole batch."""

from __future__ import annotations

import pytest
import torch

from hcml.launch.distributed import GlobalBatchNorm


def _data(dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole batch whose two halves look nothing alike (other mean and scale per half), and an output weight."""
    g = torch.Generator().manual_seed(0)
    shape = (4, 6, 5, 7) if dims == 2 else (4, 6, 3, 5, 4)
    x = torch.randn(shape, generator=g)
    x[:2] = x[:2] * 3 + 2
    x[2:] = x[2:] * 0.5 - 1
    return x, torch.randn(shape, generator=g)


def _bn(dims: int) -> torch.nn.Module:
    bn = (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d)(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    return bn


def _step(bn: torch.nn.Module, x: torch.Tensor, w: torch.Tensor, channels_last: bool) -> dict:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}


def _worker(rank: int, init: str, dims: int, channels_last: bool, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x, w = _data(dims)
    half = slice(2 * rank, 2 * rank + 2)
    bn = GlobalBatchNorm.convert(_bn(dims))
    assert isinstance(bn, GlobalBatchNorm)
    torch.save(_step(bn, x[half], w[half], channels_last), f"{out}.{rank}")
    bn.eval()
    torch.save(bn(x[half]).detach(), f"{out}.eval{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("dims,channels_last", [(2, False), (2, True), (3, True)])
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, dims, channels_last):
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", dims, channels_last, out), nprocs=2)
    x, w = _data(dims)
    ref_bn = _bn(dims)
    ref = _step(ref_bn, x, w, channels_last)
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), ref["y"], **tol)
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), ref["dx"], **tol)
    # DDP sums (then averages) parameter gradients over ranks: their sum is the whole batch's gradient
    torch.testing.assert_close(got[0]["dweight"] + got[1]["dweight"], ref["dweight"], **tol)
    torch.testing.assert_close(got[0]["dbias"] + got[1]["dbias"], ref["dbias"], **tol)
    for g in got:  # both ranks hold the global running statistics (unbiased variance, as torch's BN)
        torch.testing.assert_close(g["running_mean"], ref["running_mean"], **tol)
        torch.testing.assert_close(g["running_var"], ref["running_var"], **tol)
    # the per-process statistics would differ far beyond the tolerance: the test can fail
    local = _step(_bn(dims), x[:2], w[:2], channels_last)
    assert (local["y"] - ref["y"][:2]).abs().max() > 0.1
    ref_bn.eval()
    torch.testing.assert_close(torch.cat([torch.load(f"{out}.eval{r}") for r in range(2)]), ref_bn(x), **tol)


def test_outside_a_process_group_it_is_plain_batchnorm():
    x, w = _data(2)
    torch.testing.assert_close(_step(GlobalBatchNorm.convert(_bn(2)), x, w, False)["dx"], _step(_bn(2), x, w, False)["dx"])
