"""``hcml bench scale``: Kinetics-400 scale on the machine at hand.

1. ``prepare`` of ``--videos`` tiny source clips laid out as list files, with ``--workers`` (videos/s, memory);
   ``--videos 0`` skips it;
2. ``--files`` videos that look like Kinetics after ``prepare`` (10 s = 300 frames at 30 fps, 320 px shorter side,
   16:9, GOP 16; VP9 for DALI's CPU decoder, H.264 with ``--codec h264`` for NVDEC), listed ``--lines`` times and
   ``--lines / 10`` times over (the same files repeated: what a list costs, not the storage). For each list: load it,
   check the exact-once shards over ``--ranks`` ranks, and start one rank's training epoch (the first batch, the
   bytes that rank read); then steady clips/s at ``--threads``; the same for the former reader
   (``experimental.readers.video`` over the whole list, which indexes every listed file at every epoch start) on
   ``--reader-lines`` lines (default: the larger list), side by side, in one run.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HELP = "Kinetics scale: prepare N videos; 240k- and 24k-line lists of Kinetics-like files: load, shard, epoch start"
FRAMES, FPS, SIZE, GOP = 300, 30, (568, 320), 16


def add_args(b) -> None:
    from hcml.launch.cli import count

    b.add_argument("--out", required=True, help="a work folder (sources, prepared sets); removed with --clean")
    b.add_argument("--videos", type=int, default=20000, help="tiny sources to prepare (0: skip that stage)")
    b.add_argument("--lines", type=count(10), default=240000)
    b.add_argument("--files", type=count(1), default=8, help="distinct Kinetics-like files behind the lists")
    b.add_argument("--codec", choices=["vp9", "h264"], default="vp9", help="h264 decodes on the GPU only")
    b.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    b.add_argument("--threads", type=count(1), default=2, help="DALI threads per pipeline")
    b.add_argument("--batches", type=count(2), default=10, help="timed batches for the steady rate")
    b.add_argument("--reader-lines", type=int, default=None,
                   help="lines for the former reader (default --lines; 0: skip it)")
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


def kinetics_like(path: Path, seed: int, codec: str) -> None:
    """A 10 s 568x320 clip with the texture and motion statistics of natural video at that size: a synthetic
    moving scene rendered at 160 px, upscaled by the encoder, plus per-frame sensor noise (what keeps a real
    video's bitrate, and so its decode cost, up)."""
    import numpy as np

    from hcml.pipeline.synth import render_clip
    from hcml.pipeline.video import encode_video

    rng = np.random.default_rng(seed)
    clip = render_clip(seed % 12, rng, 30, 160)  # one second of motion, looped forward and back: 300 frames

    def frames():
        for n in range(FRAMES):
            k = n % 60
            f = clip[k if k < 30 else 59 - k].astype(np.int16)
            yield np.clip(f + rng.integers(-6, 7, f.shape), 0, 255).astype(np.uint8)

    encode_video(frames(), path, codec, FPS, GOP, size=SIZE)


def _rchar() -> int:
    """Bytes this process has read through system calls so far (all threads), from /proc/self/io."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _big_list(prepared: Path, name: str, files: list[Path], lines: int):
    from hcml.pipeline.prepared import load_prepared, write_split

    d = prepared / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "classes.txt").write_text("".join(f"class{i}\n" for i in range(400)))
    (d / "dataset.yaml").write_text(f"name: scale\ncodec: as-is\ngop: {GOP}\n")
    write_split(d / "train.txt", [(f"../videos/{files[i % len(files)].name}", i % 400, FRAMES) for i in range(lines)])
    write_split(d / "val.txt", [])
    t = time.perf_counter()
    ds = load_prepared(d)
    return ds, time.perf_counter() - t


def _epoch_start(make, spec, batches: int) -> dict:
    """Build + first batch of one rank (seconds, bytes read), then the steady clips/s over ``batches``."""
    from hcml.launch.bench.pipeline import time_batches

    r0, t = _rchar(), time.perf_counter()
    it = make()
    x = next(it)
    x = x[0] if isinstance(x, (tuple, list)) else x
    res = {"epoch_start_s": time.perf_counter() - t, "epoch_start_bytes_read": _rchar() - r0,
           "first_batch_shape": list(x.shape)}
    steady = time_batches(it, batches, spec.prefetch + 1, spec.frames)
    res["clips_per_s"] = steady["clips_per_s"]
    return res


def run(args) -> dict:
    import numpy as np

    from hcml.pipeline import readers
    from hcml.pipeline.loader import DataSpec, TrainLoader, epoch_order, shard_rows

    out = Path(args.out)
    res = {"videos": args.videos, "workers": args.workers, "lines": args.lines, "ranks": args.ranks,
           "files": args.files, "codec": args.codec, "device": args.device, "threads": args.threads}
    if args.videos:
        src, prepared = out / "src", out / "prepared"
        t = time.perf_counter()
        if not (src / "val.txt").is_file():
            make_sources(src, args.videos)
        res["make_sources_s"] = time.perf_counter() - t
        cmd = [sys.executable, "-m", "hcml.launch.cli", "prepare", "lists", "--root", str(src), "--out",
               str(prepared), "--train-list", str(src / "train.txt"), "--val-list", str(src / "val.txt"),
               "--reencode", "vp9", "--frames", "8", "--stride", "2", "--short-side", "64", "--workers",
               str(args.workers)]
        t = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res["prepare_s"] = time.perf_counter() - t
        res["prepare_videos_per_s"] = args.videos / res["prepare_s"]
        res["prepare_peak_rss_MiB"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024

    real = out / "kinetics_like"
    vids = [real / "videos" / f"{i:02d}.{'webm' if args.codec == 'vp9' else 'mp4'}" for i in range(args.files)]
    t = time.perf_counter()
    for i, p in enumerate(vids):
        if not p.is_file():
            kinetics_like(p, i, args.codec)
    res["make_files_s"] = time.perf_counter() - t
    res["file_MiB"] = sum(p.stat().st_size for p in vids) / len(vids) / 2**20
    spec = DataSpec(frames=16, stride=2, crop=224, short_side=[256, 320], batch_size=8, threads=args.threads,
                    device=args.device)
    res["lists"] = {}
    warm, _ = _big_list(real, "warmup", vids, 2 * 8 * args.ranks)  # DALI, PyAV and the pool start once, untimed
    _epoch_start(lambda: TrainLoader(warm.train, spec, rank=0, world=args.ranks, gop=warm.gop).cycle(), spec, 2)
    big = None
    for name, lines in (("small", max(10, args.lines // 10)), ("big", args.lines)):
        ds, load_s = _big_list(real, name, vids, lines)
        n = len(ds.train)
        order = epoch_order(n, 0, 0)
        merged = np.sort(np.concatenate([order[r.start:r.stop] for r in (shard_rows(n, k, args.ranks)
                                                                         for k in range(args.ranks))]))
        entry = {"lines": lines, "load_list_s": load_s, "exact_once": bool((merged == np.arange(n)).all())}
        holder = {}

        def make(ds=ds):
            holder["loader"] = TrainLoader(ds.train, spec, rank=0, world=args.ranks, gop=ds.gop)
            return holder["loader"].cycle()

        entry.update(_epoch_start(make, spec, args.batches))
        entry["loader_bytes_read"] = holder["loader"].bytes_read
        holder["loader"].close()
        res["lists"][name] = entry
        big = ds
    for k in ("load_list_s", "epoch_start_s", "exact_once", "clips_per_s", "epoch_start_bytes_read"):
        res[k] = res["lists"]["big"][k]
    res["epoch_start_ratio_big_vs_small"] = res["lists"]["big"]["epoch_start_s"] / res["lists"]["small"]["epoch_start_s"]
    reader_lines = args.lines if args.reader_lines is None else args.reader_lines
    if reader_lines:
        samples = big.train[:reader_lines]
        work = out / "reader_lists"

        def make_reader():
            pipes = readers.experimental_pipelines(samples, spec, work, 0, rank=0, world=args.ranks)
            return readers._iterate(pipes)

        r = _epoch_start(make_reader, spec, args.batches)
        res.update({"reader_lines": reader_lines, "reader_epoch_start_s": r["epoch_start_s"],
                    "reader_epoch_start_bytes_read": r["epoch_start_bytes_read"],
                    "reader_clips_per_s": r["clips_per_s"]})
    res["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.clean:
        shutil.rmtree(out)
    return res


def show(r: dict) -> str:
    lines = []
    if r.get("prepare_s"):
        lines.append(f"prepare {r['videos']} videos with --workers {r['workers']}: {r['prepare_s']:.0f} s = "
                     f"{r['prepare_videos_per_s']:.1f} videos/s, peak RSS {r['prepare_peak_rss_MiB']:.0f} MiB")
    lines.append(f"Kinetics-like files: {r['files']} x {FRAMES} frames {SIZE[0]}x{SIZE[1]} {r['codec']} GOP {GOP}, "
                 f"{r['file_MiB']:.2f} MiB each; one rank of {r['ranks']}, batch 8, T=16 s=2, crop 224, "
                 f"{r['threads']} DALI threads, {r['device']}")
    for name, e in r["lists"].items():
        lines.append(f"  {e['lines']:>7}-line list: load {e['load_list_s']:.2f} s, exact once: {e['exact_once']}, "
                     f"epoch start (first batch) {e['epoch_start_s']:.2f} s reading "
                     f"{e['epoch_start_bytes_read'] / 2**20:.1f} MiB, steady {e['clips_per_s']:.1f} clips/s")
    lines.append(f"  epoch start, {r['lists']['big']['lines']} vs {r['lists']['small']['lines']} lines: "
                 f"{r['epoch_start_ratio_big_vs_small']:.2f}x")
    if "reader_epoch_start_s" in r:
        lines.append(f"  former reader (experimental.readers.video), {r['reader_lines']} lines: epoch start "
                     f"{r['reader_epoch_start_s']:.1f} s reading {r['reader_epoch_start_bytes_read'] / 2**20:.0f} MiB, "
                     f"steady {r['reader_clips_per_s']:.1f} clips/s")
    lines.append(f"  peak RSS {r['peak_rss_MiB']:.0f} MiB")
    return "\n".join(lines)
