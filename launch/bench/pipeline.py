"""``hcml bench pipeline``: clips/s of the DALI loader vs a PyAV CPU loader (PySlowFast-style: decode in
DataLoader workers, same augmentation) on the same data and the same number of CPU cores/threads.

A rate is reported only over enough timed batches (``--batches``, at least :data:`MIN_BATCHES`), after a warm-up
that drains DALI's prefetch queue: timing one batch that was already prefetched is how a 4-video set once showed
12,976 clips/s. Small datasets are cycled over several epochs to reach the count, and the report says how many
batches were timed. ``--compare`` adds the candidate reader graphs of :mod:`hcml.pipeline.readers`.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hcml.errors import ConfigError
from hcml.launch.bench import summarize_times

MIN_BATCHES = 10


class PyAVClips(torch.utils.data.Dataset):
    """The loader PySlowFast-style code uses: PyAV decode on CPU workers, then the same augmentation
    (random shorter side, one random crop for all frames, flip, normalise) in numpy/torch."""

    def __init__(self, samples, spec, seed: int = 0):
        self.samples, self.spec, self.seed = list(samples), spec, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        import av

        from hcml.pipeline.loader import clip_start

        s, spec = self.samples[i], self.spec
        rng = np.random.default_rng([self.seed, i])
        start = clip_start(self.seed, 0, i, s.num_frames, spec.span)
        want = set(range(start, start + spec.span, spec.stride))
        frames = []
        with av.open(s.path) as c:
            for k, fr in enumerate(c.decode(video=0)):
                if k in want:
                    frames.append(fr.to_ndarray(format="rgb24"))
                if k >= start + spec.span - 1:
                    break
        while len(frames) < spec.frames:
            frames.append(frames[-1])
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # T, C, H, W
        short = int(rng.uniform(*spec.short_side))
        H, W = x.shape[-2:]
        size = (short, round(W * short / H)) if H <= W else (round(H * short / W), short)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y0 = int(rng.integers(0, x.shape[-2] - spec.crop + 1))
        x0 = int(rng.integers(0, x.shape[-1] - spec.crop + 1))
        x = x[..., y0:y0 + spec.crop, x0:x0 + spec.crop]
        if spec.flip != "none" and rng.random() < 0.5:
            x = x.flip(-1)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        return ((x - mean) / std).permute(1, 0, 2, 3), s.label


def time_batches(batches, n: int, warmup: int, frames: int) -> dict:
    """Clips/s over ``n`` batches after ``warmup`` untimed ones (pipeline start, prefetch queue drained)."""
    it = iter(batches)
    try:
        return _time(it, n, warmup, frames)
    finally:
        if hasattr(it, "close"):
            it.close()  # a loader's pipelines and threads end here, before the next loader starts


def _time(it, n: int, warmup: int, frames: int) -> dict:
    for _ in range(warmup):
        next(it)
    got, per_batch = 0, []
    t0 = t = time.perf_counter()
    for x in itertools.islice(it, n):
        x = x[0] if isinstance(x, (tuple, list)) else x
        if x.is_cuda:
            torch.cuda.synchronize()
        got += x.shape[0]
        now = time.perf_counter()
        per_batch.append(now - t)
        t = now
    dt = time.perf_counter() - t0
    if len(per_batch) < n:
        raise ConfigError(f"bench pipeline: only {len(per_batch)} of {n} batches came")
    return {"clips_per_s": got / dt, "frames_per_s": got * frames / dt, "clips": got, "seconds": dt,
            "timed_batches": len(per_batch), "batch": summarize_times(per_batch)}


def _pyav(samples, spec, threads: int):
    dl = torch.utils.data.DataLoader(PyAVClips(samples, spec), batch_size=spec.batch_size, num_workers=threads,
                                     shuffle=True, drop_last=True, persistent_workers=threads > 0)
    return itertools.chain.from_iterable(itertools.repeat(dl))  # cycle epochs


def bench_pipeline(data: str, config: str | None = None, device: str = "auto", batches: int = 30,
                   threads: int | None = None, overrides: list[str] | None = None, compare: bool = False,
                   pipelines: tuple[int, ...] = (2, 4, 7)) -> dict:
    import dataclasses

    from hcml.launch import components
    from hcml.launch.config import load_config
    from hcml.launch.distributed import DistInfo
    from hcml.pipeline import readers

    if batches < MIN_BATCHES:
        raise ConfigError(f"bench pipeline: --batches {batches} is too few for a rate; use at least {MIN_BATCHES}")
    ov = [f"data.root={data}", *(overrides or [])]
    if device != "auto":
        ov.append(f"data.device={device}")
    if threads:
        ov.append(f"data.threads={threads}")
    cfg = load_config(config, ov)
    ds = components.check_runnable(cfg)
    spec = components.data_spec(cfg, ds, DistInfo().device)
    spec = dataclasses.replace(spec, dtype="float32")
    warmup = spec.prefetch + 2
    res = {"data": str(data), "videos": len(ds.train), "device": spec.device, "threads": spec.threads,
           "batch": spec.batch_size, "frames": spec.frames, "crop": spec.crop, "cpu_cores": os.cpu_count(),
           "warmup_batches": warmup, "loaders": {}}
    # PyAV first: its DataLoader forks worker processes, which must not inherit DALI's running threads
    res["loaders"]["pyav"] = time_batches(_pyav(ds.train, spec, spec.threads), batches, 2, spec.frames)
    with tempfile.TemporaryDirectory() as tmp:
        res["loaders"]["dali"] = time_batches(readers.loader(ds.train, spec, Path(tmp), gop=ds.gop), batches, warmup,
                                              spec.frames)
        if compare:
            cands = {}  # every design in readers.CANDIDATES (a new one is timed by adding it there)
            for name, make in readers.CANDIDATES.items():
                if name == "loader":  # the loader itself: timed above; here with several pipelines per process
                    cands.update({f"loader x{n}": (lambda n=n, make=make: make(ds.train, spec, Path(tmp), pipelines=n,
                                                                                 gop=ds.gop)) for n in pipelines})
                    if ds.gop:
                        cands["loader, whole files"] = lambda make=make: make(ds.train, spec, Path(tmp))
                else:
                    cands[name] = lambda make=make: make(ds.train, spec, Path(tmp))
            for name, make in cands.items():
                try:
                    res["loaders"][name] = time_batches(make(), batches, warmup, spec.frames)
                except Exception as e:  # a candidate that cannot run here is reported, not fatal
                    res["loaders"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    pyav = res["loaders"]["pyav"]["clips_per_s"]
    for r in res["loaders"].values():
        if "clips_per_s" in r:
            r["vs_pyav"] = r["clips_per_s"] / pyav
    res["speedup_dali_vs_pyav"] = res["loaders"]["dali"]["vs_pyav"]
    return res


HELP = "DALI clips/s vs a PyAV CPU loader with the same augmentation"


def add_args(b) -> None:
    from hcml.launch.cli import count

    b.add_argument("--data", required=True)
    b.add_argument("--config", default=None)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    b.add_argument("--batches", type=count(1), default=30, help="timed batches per loader (>= 10; small sets cycle)")
    b.add_argument("--threads", type=count(1), default=None, help="DALI threads = PyAV DataLoader workers")
    b.add_argument("--compare", action="store_true", help="also the candidate reader graphs (pipeline/readers.py)")
    b.add_argument("--json", action="store_true")
    b.add_argument("overrides", nargs="*")

def run(args) -> dict:
    return bench_pipeline(args.data, args.config, args.device, args.batches, args.threads, args.overrides,
                          args.compare)


def show(res: dict) -> str:
    lines = [f"input pipeline on {res['data']} ({res['videos']} videos; batch {res['batch']}, T={res['frames']}, "
             f"crop {res['crop']}, {res['threads']} threads/workers, {res['cpu_cores']} cores; DALI on {res['device']})"]
    for name, r in res["loaders"].items():
        if "error" in r:
            lines.append(f"  {name:<20} {r['error']}")
            continue
        lines.append(f"  {name:<20} {r['clips_per_s']:8.1f} clips/s {r['frames_per_s']:9.0f} frames/s  "
                     f"{r['vs_pyav']:5.2f}x PyAV  ({r['timed_batches']} timed batches)")
    return "\n".join(lines)
