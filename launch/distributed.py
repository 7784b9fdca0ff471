"""torchrun environment → process group, device, and the few collectives the driver needs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def local(cls) -> "DistInfo":
        """One process outside torchrun, on the GPU when there is one (tools such as Grad-CAM and the benches)."""
        return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def init_distributed() -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); NCCL on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), store=_round_store(world),
                                rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local, device)


def _round_store(world: int):
    """torchrun's store under a prefix that is new for each round of workers and the same on every rank.

    Why: with c10d rendezvous every round of workers talks to the same agent store, and torch keys the process
    group's addresses by the restart count, which differs between nodes when one node's worker failed and the
    others restart for the membership change: the restarted ranks then read the previous round's peer addresses
    and gloo fails to connect (seen with two agents on one host). Every worker start adds 1 to a counter, so
    the n-th start belongs to round (n - 1) // world on every rank."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # a plain env:// launch: torch's own store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(minutes=30))
    start = store.add("hcml/worker_starts", 1)
    return dist.PrefixStore(f"hcml/round{(start - 1) // world}", store)


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Every rank takes rank 0's buffers (BN running statistics). With per-process BN each rank's statistics
    drift from rank 0's over its own last batches (DDP re-broadcasts them only at the next forward), while a
    checkpoint holds rank 0's: an evaluation sharded over ranks must score that model, or the checkpoint will
    not reproduce the reported figure."""
    if info.distributed:
        for b in module.buffers():
            dist.broadcast(b, 0)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch, on any backend (gloo on CPU
    included): per-channel count, sum and sum of squares are all-reduced in the forward, through
    ``torch.distributed.nn.all_reduce``, whose backward all-reduces the matching gradient terms, so input and
    parameter gradients are those of one process holding the whole batch. ``torch.nn.SyncBatchNorm`` does the
    same on CUDA only (torch 2.13: "expected input tensor to be on GPU or XPU or privateuseone"). Any input rank
    (2D, 3D, channels_last or not); evaluation uses the running statistics as usual."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn import all_reduce

        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        C = x.shape[1]
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: torch.nn.Module) -> torch.nn.Module:
        """Every BatchNorm*d of ``module`` replaced by a GlobalBatchNorm holding the same parameters and buffers."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                with torch.no_grad():
                    out.weight, out.bias = module.weight, module.bias
            if module.track_running_stats:
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child))
        return out
