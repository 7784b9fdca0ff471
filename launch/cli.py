"""``hcml`` command line: thin subcommands over library calls that the tests use directly."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from hcml.errors import HCMLError



def resolve_config(name: str | None) -> str | None:
    from hcml.launch.config import resolve_recipe

    return resolve_recipe(name)


def _overrides(args) -> list[str]:
    ov = list(args.overrides)
    if getattr(args, "data", None):
        ov.append(f"data.root={Path(args.data).resolve()}")
    if getattr(args, "run_dir", None):
        ov.append(f"run_dir={args.run_dir}")
    return ov


def cmd_synth(args) -> int:
    from hcml.pipeline import synth

    classes = args.classes.split(",") if args.classes else None
    out = synth.generate(args.out, classes, args.per_class, args.val_per_class, args.size, args.frames, args.codec,
                         args.seed, workers=args.workers)
    print(f"wrote synthetic motion dataset to {out}")
    return 0


def cmd_prepare(args) -> int:
    from hcml.pipeline.prepare import prepare
    from hcml.pipeline.sources import SourceOptions

    opts = SourceOptions(split=args.split, train_list=args.train_list, val_list=args.val_list, classes=args.classes)
    report = prepare(args.dataset, args.root, args.out, opts=opts, workers=args.workers, reencode_to=args.reencode,
                     short_side=args.short_side, upscale=args.upscale, frames=args.frames, stride=args.stride,
                     max_excluded=args.max_excluded, overwrite=args.overwrite)
    print(report["summary"])
    print(f"prepared dataset: {Path(args.out).resolve()} (report: {Path(args.out).resolve() / 'report.txt'})")
    return 0


LAUNCHER_FLAGS = ("--nproc-per-node", "--max-restarts", "--nnodes", "--rdzv-endpoint", "--rdzv-id")


def worker_argv(argv: list[str]) -> list[str]:
    """The command line minus the launcher's own flags (``--flag v`` or ``--flag=v``): what every worker runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCHER_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCHER_FLAGS)):
            out.append(a)
    return out


def cmd_train(args) -> int:
    from hcml.launch.components import check_runnable
    from hcml.launch.config import load_config
    from hcml.launch.launcher import Launch, run
    from hcml.launch.rundir import preflight

    cfg_path = resolve_config(args.config)
    # Reject a bad config, dataset, batch or run dir before any process starts (raises: one line, exit 2).
    cfg = load_config(cfg_path, _overrides(args))
    worker = "LOCAL_RANK" in os.environ
    if not worker:
        check_runnable(cfg, (args.nproc_per_node or 1) * _min_nodes(args.nnodes))
        preflight(Path(cfg.run_dir), args.resume, args.overwrite)
    if args.nproc_per_node and not worker:
        launch = Launch(args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.max_restarts)
        return run(launch, worker_argv(args.argv))
    from hcml.launch.train import main_from_args

    return main_from_args(cfg_path, _overrides(args), args.resume, args.overwrite)


def _min_nodes(nnodes: str) -> int:
    try:
        return int(str(nnodes).split(":")[0])
    except ValueError:
        raise HCMLError(f"--nnodes {nnodes!r}: expected N or MIN:MAX") from None


def cmd_eval(args) -> int:
    from hcml.launch.evaluate import run_eval

    return run_eval(resolve_config(args.config), args.checkpoint, _overrides(args), args.out)


def cmd_knn(args) -> int:
    from hcml.launch.analysis import run_knn

    run_knn(resolve_config(args.config), args.checkpoint, _overrides(args), args.k, args.out, args.json,
            args.random_init)
    return 0


def cmd_gradcam(args) -> int:
    from hcml.launch.analysis import run_gradcam

    for png in run_gradcam(resolve_config(args.config), args.checkpoint, args.videos, args.out, args.baseline,
                           _overrides(args), args.target):
        print(f"wrote {png}")
    return 0


def cmd_info(args) -> int:
    from hcml.model import build_model
    from hcml.model.summary import summarize

    s = summarize(build_model(args.arch, args.classes, motion=not args.no_motion), args.frames, args.size)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['arch']}  T={s['frames']}  {s['size']}x{s['size']}  motion={s['motion']}")
    print(f"{'stage':<8} output (C, T, H, W)")
    for k, v in s["stages"].items():
        print(f"{k:<8} {tuple(v)}")
    for k, v in s["motion_levels"].items():
        print(f"motion/{k:<5} {tuple(v)}")
    p = s["params"]
    print(f"params: backbone {p['backbone']:,}  motion {p['motion']:,}  heads {p['heads']:,}  total {p['total']:,}")
    print(f"GMACs per clip: {s['gmacs_per_clip']:.2f}")
    return 0


def cmd_bench(args) -> int:
    from hcml.launch import bench

    if getattr(args, "config", None):
        args.config = resolve_config(args.config)
    return bench.main(args)


def cmd_demo(args) -> int:
    from hcml.launch.demo import run_demo

    return run_demo(Path(args.out), nproc=args.nproc, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    from hcml.model.backbone import ARCHS
    from hcml.pipeline.sources import ADAPTERS

    ARCH_CHOICES = sorted(ARCHS)
    ap = argparse.ArgumentParser(prog="hcml", description="Hierarchical Contrastive Motion Learning: train, "
                                 "evaluate and profile video action recognition models.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("synth", help="write the synthetic motion dataset (a prepared dataset directory)")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", default="", help="comma-separated subset of the synthetic classes")
    p.add_argument("--per-class", type=int, default=24)
    p.add_argument("--val-per-class", type=int, default=None)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("prepare", help="probe (and re-encode) a public dataset into a prepared dataset directory")
    p.add_argument("dataset", choices=sorted(ADAPTERS))
    p.add_argument("--root", required=True, help="the dataset as distributed (layouts: docs/DATASETS.md)")
    p.add_argument("--out", required=True, help="a new or empty folder (or this command's earlier output with "
                   "the same settings: it continues)")
    p.add_argument("--split", type=int, default=1, help="UCF-101 split 1|2|3")
    p.add_argument("--train-list", help="lists: the training list ('path label' per line)")
    p.add_argument("--val-list", help="lists: the validation list")
    p.add_argument("--classes", help="lists: class names, one per line (line number = label)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reencode", choices=["h264", "vp9", "none"], default="none",
                   help="h264 for NVDEC (GPU), vp9 for DALI's CPU reader; none keeps the files")
    p.add_argument("--short-side", type=int, default=None, help="with --reencode: shorter side in pixels "
                   "(default 320; smaller videos keep their size)")
    p.add_argument("--upscale", action="store_true", help="also enlarge videos smaller than --short-side")
    p.add_argument("--max-excluded", type=float, default=0.2, help="fail when more than this share of the listed "
                   "videos is unusable (default 0.2)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepare's output in --out")
    p.add_argument("--frames", type=int, default=16, help="clip length T (sets the GOP and the minimum length)")
    p.add_argument("--stride", type=int, default=2)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("demo", help="synthetic set → 2-process training with and without motion → report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.set_defaults(fn=cmd_demo)

    for name, helptext in (("train", "train per a YAML recipe (run under torchrun for several processes)"),
                           ("eval", "multi-view evaluation of a checkpoint")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=name == "train", help="YAML recipe (path or name under configs/)")
        p.add_argument("--data", help="prepared dataset directory (overrides data.root)")
        p.add_argument("--run-dir", help="run directory (overrides run_dir)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=10")
        if name == "train":
            p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in the run dir) or a path")
            p.add_argument("--nproc-per-node", type=int, default=0, help="launch torchrun with N processes")
            p.add_argument("--max-restarts", type=int, default=0,
                           help="with --nproc-per-node: torchrun restarts failed workers, which resume from the "
                                "newest checkpoint (also automatic under any torchrun restart)")
            p.add_argument("--nnodes", default="1", help="with --nproc-per-node: nodes of a multi-node job (N or "
                           "MIN:MAX); each node runs this same command")
            p.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (multi-node)")
            p.add_argument("--rdzv-id", default=None, help="the job's id, the same on every node (e.g. the Slurm "
                           "job id)")
            p.add_argument("--overwrite", action="store_true", help="start fresh in a run dir that holds another "
                           "run's checkpoints, deleting them (without it that is refused)")
            p.set_defaults(fn=cmd_train)
        else:
            p.add_argument("--checkpoint", required=True)
            p.add_argument("--out", default=None, help="report directory (default: next to the checkpoint)")
            p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("knn", help="per-level KNN on motion features (the paper's Table 7)")
    p.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="prepared dataset directory (overrides data.root)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--random-init", action="store_true", help="the same network at random initialisation (the "
                   "reference a self-supervised feature must beat)")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_knn)

    p = sub.add_parser("gradcam", help="Grad-CAM++ strips of the last conv layer (the paper's Fig. 6)")
    p.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--videos", nargs="+", required=True)
    p.add_argument("--baseline", default=None, help="a no-motion checkpoint shown above for comparison")
    p.add_argument("--target", type=int, default=None, help="class index (default: the predicted class)")
    p.add_argument("--data", help="prepared dataset directory (for labels)")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_gradcam)

    def model_args(q) -> None:  # the model a command builds without a config (info, bench model)
        q.add_argument("--arch", default="r2d50", choices=ARCH_CHOICES)
        q.add_argument("--frames", type=int, default=16)
        q.add_argument("--size", type=int, default=224)
        q.add_argument("--no-motion", action="store_true", help="the backbone alone")

    p = sub.add_parser("info", help="per-stage shapes, parameters and GMACs of a model")
    model_args(p)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("bench", help="benchmarks: op (cost volume), model, pipeline (DALI vs PyAV), train (step breakdown)")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("op", help="cost volume: CUDA kernel vs reference vs spatial-correlation-sampler")
    b.add_argument("--shape", default=None, help="B,C,H,W (default: 128,64,56,56 on a GPU, 8,64,28,28 on a CPU)")
    b.add_argument("--sweep", action="store_true", help="every cost-volume shape the R2D-50/R(2+1)D-101 recipes run")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    b.add_argument("--channels-last", action="store_true", help="NHWC inputs (the layout the model runs in)")
    b.add_argument("--d", type=int, default=6)
    b.add_argument("--s", type=int, default=2)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--json", action="store_true")
    b = bsub.add_parser("model", help="train-step clips/s (random clips) and GMACs per clip")
    model_args(b)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--compile", action="store_true")
    b.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; eager/aot_eager for checks)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--compare", action="store_true", help="in one run: HCML eager fp32, eager bf16 channels_last, "
                   "compiled bf16 channels_last, and the backbone alone compiled bf16 channels_last")
    b.add_argument("--profile", action="store_true", help="print the top kernels (torch.profiler)")
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--json", action="store_true")
    b = bsub.add_parser("pipeline", help="DALI clips/s vs a PyAV CPU loader with the same augmentation")
    b.add_argument("--data", required=True)
    b.add_argument("--config", default=None)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    b.add_argument("--batches", type=int, default=30, help="timed batches per loader (>= 10; small sets cycle)")
    b.add_argument("--threads", type=int, default=None, help="DALI threads = PyAV DataLoader workers")
    b.add_argument("--compare", action="store_true", help="also the candidate reader graphs (pipeline/readers.py)")
    b.add_argument("--json", action="store_true")
    b.add_argument("overrides", nargs="*")
    b = bsub.add_parser("train", help="a real training step: overlapped steady state (or --breakdown per stage)")
    b.add_argument("--data", required=True)
    b.add_argument("--config", default=None)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--breakdown", action="store_true", help="synchronise after each stage: data-wait / forward / "
                   "backward / optimizer (serialises the pipeline)")
    b.add_argument("--trace", default=None, help="write a torch.profiler Chrome trace (JSON) of the timed steps")
    b.add_argument("--json", action="store_true")
    b.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_bench)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also follow options (``--resume auto k=v``)."""
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        ap.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the launcher hands it on to the workers
    try:
        return args.fn(args) or 0
    except HCMLError as e:  # user errors: one clear line, no traceback, exit 2 (in every torchrun worker too)
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        # one write of the whole line: torchrun workers share stderr, and a line under PIPE_BUF is never split
        os.write(2, f"hcml {args.cmd}{where}: error: {e}\n".encode())
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
