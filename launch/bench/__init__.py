"""``hcml bench``: one harness for every target (warm-up, timed iterations, CUDA events on GPU, median/min/max,
JSON or a readable table). Performance goals live here, never in unit tests; ratios are always measured within
one run, on one card.

Targets: ``op`` (cost volume, :mod:`.op`), ``model`` (a training step, :mod:`.model`), ``pipeline`` (DALI vs a
PyAV loader and the candidate reader graphs, :mod:`.pipeline`), ``train`` (the loop's steady state and its
per-stage split, :mod:`.train`).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

from hcml.errors import ConfigError


def device_of(name: str) -> torch.device:
    """``auto`` → CUDA when visible, else CPU; ``cuda`` without a GPU is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench: --device cuda but no CUDA device is visible")
    return torch.device(name)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def summarize_times(times: list[float]) -> dict:
    """The one summary every bench target reports: median/min/max seconds and the count."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": len(times)}


_L2_FLUSH: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 by writing a buffer twice its size (outside any timed region)."""
    if device.type != "cuda":
        return
    if device not in _L2_FLUSH:
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) * 2
        _L2_FLUSH[device] = torch.empty(size, dtype=torch.uint8, device=device)
    _L2_FLUSH[device].zero_()


def time_fn(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3, calls: int = 1,
            cold_l2: bool = False) -> dict:
    """Median/min/max seconds per call of ``fn`` (CUDA events on GPU, wall clock on CPU).

    ``calls`` back-to-back calls share one event pair (per-call launch and event overheads amortised);
    ``cold_l2`` flushes the L2 before each sample, so inputs come from memory as in a training step where
    other layers ran in between."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cold_l2:
            flush_l2(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t) / calls)
    return {**summarize_times(times), "calls_per_sample": calls, "cold_l2": cold_l2}


def main(args) -> int:
    """``hcml bench TARGET``: run the target, print JSON (``--json``) or a readable summary."""
    res = TARGETS[args.what].run(args)
    target = TARGETS[args.what]
    print(json.dumps(res, indent=1) if args.json else target.show(res))
    return 0


# The bench targets: each module owns its flags (add_args), HELP, run(args) and show(result). A new target is one
# module added here.
from hcml.launch.bench import model, op, pipeline, scale, train  # noqa: E402

TARGETS = {"op": op, "model": model, "pipeline": pipeline, "train": train, "scale": scale}
