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
