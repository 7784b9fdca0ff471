"""``hcml bench scale``: Kinetics-400 scale on the machine at hand, with tiny videos (the work per video is what
changes with resolution; the per-file costs measured here are what 240,000 files add).

1. ``prepare`` of ``--videos`` source clips laid out as list files, with ``--workers`` (videos/s, peak memory);
2. a prepared list of ``--lines`` lines (the same files listed repeatedly): load it, shard it exact-once over
   ``--ranks`` ranks (checked), and start one rank's DALI training epoch (DALI indexes every file of the list
   at pipeline build: that time grows with the list, on every rank).
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HELP = "Kinetics scale: prepare N videos (videos/s, memory); a 240k-line list: load, shard, DALI epoch start"


def add_args(b) -> None:
    from hcml.launch.cli import count

    b.add_argument("--out", required=True, help="a work folder (sources, prepared set); removed with --clean")
    b.add_argument("--videos", type=count(10), default=20000)
    b.add_argument("--lines", type=count(10), default=240000)
    b.add_argument("--workers", type=count(1), default=2)
    b.add_argument("--ranks", type=count(1), default=8)
    b.add_argument("--clean", action="store_true", help="remove --out afterwards")
    b.add_argument("--json", action="store_true")


def make_sources(root: Path, n: int) -> None:
    """n distinct source files (copies of 8 encoded 24-frame 64 px clips) and list files, as a list-file user
    would hold them."""
    import numpy as np

    from hcml.pipeline.synth import encode, render_clip

    seeds = root / "seeds"
    for i in range(8):
        encode(render_clip(i % 12, np.random.default_rng(i), 24, 64), seeds / f"{i}.webm", "vp9")
    lines = []
    for i in range(n):
        rel = f"videos/{i // 1000:03d}/{i:06d}.webm"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seeds / f"{i % 8}.webm", root / rel)
        lines.append(f"{rel} {i % 400}")
    (root / "train.txt").write_text("\n".join(lines[: n * 9 // 10]) + "\n")
    (root / "val.txt").write_text("\n".join(lines[n * 9 // 10:]) + "\n")


def run(args) -> dict:
    from hcml.pipeline.loader import DataSpec, TrainLoader, epoch_order, shard_rows
    from hcml.pipeline.prepared import load_prepared, write_split

    out = Path(args.out)
    src, prepared = out / "src", out / "prepared"
    res = {"videos": args.videos, "workers": args.workers, "lines": args.lines, "ranks": args.ranks}
    t = time.perf_counter()
    if not (src / "val.txt").is_file():
        make_sources(src, args.videos)
    res["make_sources_s"] = time.perf_counter() - t
    cmd = [sys.executable, "-m", "hcml.launch.cli", "prepare", "lists", "--root", str(src), "--out", str(prepared),
           "--train-list", str(src / "train.txt"), "--val-list", str(src / "val.txt"), "--reencode", "vp9",
           "--frames", "8", "--stride", "2", "--short-side", "64", "--workers", str(args.workers)]
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res["prepare_s"] = time.perf_counter() - t
    res["prepare_videos_per_s"] = args.videos / res["prepare_s"]
    res["prepare_peak_rss_MiB"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024

    ds = load_prepared(prepared)
    rows = [(Path(s.path).relative_to(prepared.resolve()), s.label, s.num_frames) for s in ds.train]
    big = prepared / "big"
    big.mkdir(exist_ok=True)
    for name in ("classes.txt", "dataset.yaml"):
        shutil.copy(prepared / name, big / name)
    write_split(big / "train.txt", [(f"../{r}", lab, nf) for i in range(args.lines)
                                    for r, lab, nf in [rows[i % len(rows)]]])
    write_split(big / "val.txt", [])
    t = time.perf_counter()
    ds = load_prepared(big)
    res["load_list_s"] = time.perf_counter() - t
    n = len(ds.train)
    t = time.perf_counter()
    order = epoch_order(n, 0, 0)
    shards = [order[rows.start:rows.stop] for rows in (shard_rows(n, r, args.ranks) for r in range(args.ranks))]
    res["shard_s"] = time.perf_counter() - t
    merged = sorted(int(i) for s in shards for i in s)
    res["exact_once"] = merged == list(range(n))
    spec = DataSpec(frames=8, stride=2, crop=56, short_side=[64, 64], batch_size=8, threads=2, device="cpu")
    loader = TrainLoader(ds.train, spec, work_dir=out / "lists", rank=0, world=args.ranks)
    t = time.perf_counter()
    x, _ = next(loader.epoch(0))
    res["dali_epoch_start_s"] = time.perf_counter() - t
    res["first_batch_shape"] = list(x.shape)
    res["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del x, loader  # stop DALI's prefetching before the files go
    if args.clean:
        shutil.rmtree(out)
    return res


def show(r: dict) -> str:
    return "\n".join([
        f"prepare {r['videos']} videos with --workers {r['workers']}: {r['prepare_s']:.0f} s = "
        f"{r['prepare_videos_per_s']:.1f} videos/s, peak RSS {r['prepare_peak_rss_MiB']:.0f} MiB",
        f"{r['lines']}-line list: load {r['load_list_s']:.2f} s, shuffle + shard over {r['ranks']} ranks "
        f"{r['shard_s']:.3f} s (exact once: {r['exact_once']}), DALI epoch start + first batch on one rank "
        f"{r['dali_epoch_start_s']:.1f} s; peak RSS {r['peak_rss_MiB']:.0f} MiB"])
