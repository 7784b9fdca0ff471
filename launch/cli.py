"""``hcml`` command line: thin subcommands over library calls that the tests use directly."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from hcml.errors import HCMLError
from hcml.host import usable_cores
from hcml.launch.launcher import LAUNCHED



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
                         args.seed, workers=args.workers, overwrite=args.overwrite,
                         test_per_class=args.test_per_class)
    print(f"wrote synthetic motion dataset to {Path(out).resolve()}")
    return 0


def cmd_prepare(args) -> int:
    from hcml.pipeline.prepare import prepare
    from hcml.pipeline.sources import SourceOptions

    opts = SourceOptions(split=args.split, train_list=args.train_list, val_list=args.val_list, classes=args.classes)
    report = prepare(args.dataset, args.root, args.out, opts=opts, workers=args.workers, reencode_to=args.reencode,
                     short_side=args.short_side, upscale=args.upscale, frames=args.frames, stride=args.stride,
                     gop=args.gop, max_excluded=args.max_excluded, overwrite=args.overwrite)
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

    worker = "LOCAL_RANK" in os.environ
    world = (args.nproc_per_node or 1) * _min_nodes(args.nnodes)
    if not worker:
        _check_launcher_flags(args)
    if args.plan:
        from hcml.launch.plan import load_plan

        clash = [f for f, v in (("--config", args.config), ("--data", args.data), ("--run-dir", args.run_dir),
                                ("--overwrite", args.overwrite), ("key=value", args.overrides)) if v]
        if clash:
            raise HCMLError(f"--plan takes each run's recipe, overrides and run dir from the plan file; drop "
                            f"{', '.join(clash)}")
        if args.resume not in (None, "auto"):
            raise HCMLError(f"--plan takes --resume auto (each entry continues from its own newest checkpoint, "
                            f"finished entries are skipped), not --resume {args.resume}")
        entries = load_plan(args.plan)
        runs = [(resolve_config(e.config), e.overrides, args.resume, e.overwrite) for e in entries]
    elif args.config:
        runs = [(resolve_config(args.config), _overrides(args), args.resume, args.overwrite)]
    else:
        raise HCMLError("hcml train needs --config RECIPE (one training) or --plan FILE (several, in order)")
    if not worker:  # reject a bad config, dataset, batch or run dir before any process starts (one line, exit 2)
        for cfg_path, overrides, resume, overwrite in runs:
            cfg = load_config(cfg_path, overrides)
            check_runnable(cfg, world)
            preflight(Path(cfg.run_dir), resume, overwrite)
    if args.nproc_per_node and not worker:
        launch = Launch(args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.max_restarts)
        return run(launch, worker_argv(args.argv))
    from hcml.launch.train import main_from_args, main_from_plan

    return main_from_plan(args.plan, args.resume) if args.plan else main_from_args(*runs[0])


def _check_launcher_flags(args) -> None:
    """torchrun's flags only mean something together: one line for each combination that would otherwise run
    something else than asked (one process, a standalone node, or a job id shared with every other job)."""
    given = [f for f, v in (("--max-restarts", args.max_restarts), ("--nnodes", args.nnodes != "1"),
                            ("--rdzv-endpoint", args.rdzv_endpoint), ("--rdzv-id", args.rdzv_id)) if v]
    if given and not args.nproc_per_node:
        raise HCMLError(f"{', '.join(given)}: only under torchrun; add --nproc-per-node N (processes per node)")
    nodes = str(args.nnodes).split(":")[-1]
    if nodes != "1" and not args.rdzv_endpoint:
        raise HCMLError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the rendezvous every node joins) "
                        f"and --rdzv-id ID")
    if args.rdzv_endpoint and not args.rdzv_id:
        raise HCMLError("--rdzv-endpoint needs --rdzv-id ID: the same on every node and new for each job (e.g. "
                        "$SLURM_JOB_ID); a run dir resumes by itself only within the job it names")


def _min_nodes(nnodes: str) -> int:
    try:
        return int(str(nnodes).split(":")[0])
    except ValueError:
        raise HCMLError(f"--nnodes {nnodes!r}: expected N or MIN:MAX") from None


def cmd_eval(args) -> int:
    from hcml.launch.evaluate import run_eval
    from hcml.launch.launcher import Launch, run

    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:  # views sharded over N processes (GPUs)
        from hcml.launch.components import load_trained

        # a bad key, dataset or checkpoint: one line here, not one per worker and torchrun's failure report
        load_trained(args.checkpoint, resolve_config(args.config), _overrides(args))
        return run(Launch(args.nproc_per_node), worker_argv(args.argv), interruptible=True)
    return run_eval(resolve_config(args.config), args.checkpoint, _overrides(args), args.out)


def cmd_predict(args) -> int:
    from hcml.launch.launcher import Launch, run
    from hcml.launch.predict import STATUS_ENV, Request, check_request, collect_videos, parse_views, run_predict

    req = Request(args.checkpoint, collect_videos(args.videos, args.list, args.dir or []), args.top_k,
                  parse_views(args.views) if args.views else None, args.out, args.decoder, args.device, args.classes)
    trained = check_request(req)  # a bad checkpoint, --views or --out: one line here, not one per worker
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:  # videos sharded over N processes (GPUs)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            status = Path(tmp) / "failed"
            os.environ[STATUS_ENV] = str(status)
            try:
                rc = run(Launch(args.nproc_per_node), worker_argv(args.argv), interruptible=True)
            finally:
                del os.environ[STATUS_ENV]
            return rc or int(status.is_file() and int(status.read_text() or 0) > 0)
    return run_predict(req, trained)


def cmd_export(args) -> int:
    from hcml.launch.export import run_export

    return run_export(args.checkpoint, args.out, args.frames, args.crop, args.dynamic_batch, args.dtype, args.aoti,
                      args.classes, args.device)


def cmd_knn(args) -> int:
    from hcml.launch.analysis import run_knn

    run_knn(resolve_config(args.config), args.checkpoint, _overrides(args), args.k, args.out, args.json,
            args.random_init)
    return 0  # run_knn prints where it wrote


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

    _bench_args_checked(args)
    if getattr(args, "config", None):
        args.config = resolve_config(args.config)
    return bench.main(args)


def cmd_demo(args) -> int:
    from hcml.launch.demo import run_demo

    return run_demo(Path(args.out), nproc=args.nproc, quick=args.quick, seeds=args.seeds, study=args.study)


def _bench_args_checked(args) -> None:
    """Flags of bench targets that argparse types cannot check alone."""
    if getattr(args, "what", None) == "model" and not args.no_motion and args.frames < 8:
        raise HCMLError(f"--frames {args.frames}: a training step with the motion module needs >= 8 frames (the "
                        f"high level runs at T/4 and predicts a future step); or pass --no-motion")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the contract for every bad input: one line, exit 2)."""

    def error(self, message: str):
        os.write(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n".encode())
        raise SystemExit(2)


def count(minimum: int = 1):
    """An argparse type: an integer >= ``minimum``, named in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_synth(p) -> None:
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--classes", default="", help="comma-separated subset of the synthetic classes")
    p.add_argument("--per-class", type=count(1), default=24)
    p.add_argument("--val-per-class", type=count(0), default=None)
    p.add_argument("--test-per-class", type=count(0), default=0, help="a held-out test split (test.txt), its own "
                   "random stream: for figures no setting was chosen on (data.eval_split=test)")
    p.add_argument("--size", type=count(16), default=64)
    p.add_argument("--frames", type=count(2), default=32)
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=count(1), default=usable_cores())
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synth in --out")


def add_prepare(p) -> None:
    from hcml.pipeline.sources import ADAPTERS

    p.add_argument("dataset", choices=sorted(ADAPTERS))
    p.add_argument("--root", required=True, help="the dataset as distributed (layouts: docs/DATASETS.md)")
    p.add_argument("--out", required=True, help="a new or empty folder (or this command's earlier output with "
                   "the same settings: it continues)")
    p.add_argument("--split", type=int, default=1, help="UCF-101 split 1|2|3")
    p.add_argument("--train-list", help="lists: the training list ('path label' per line)")
    p.add_argument("--val-list", help="lists: the validation list")
    p.add_argument("--classes", help="lists: class names, one per line (line number = label)")
    p.add_argument("--workers", type=count(1), default=usable_cores())
    p.add_argument("--reencode", choices=["h264", "hevc", "vp9", "none"], default="none",
                   help="h264 or hevc for NVDEC (GPU), vp9 for DALI's CPU decoder (it takes no H.264); none keeps "
                   "the files")
    p.add_argument("--gop", type=count(1), default=16, help="with --reencode: a keyframe every N frames exactly, "
                   "no scene-cut keyframes (default 16; a random clip decodes ~N/2 frames it does not use)")
    p.add_argument("--short-side", type=count(16), default=None, help="with --reencode: shorter side in pixels "
                   "(default 320; smaller videos keep their size)")
    p.add_argument("--upscale", action="store_true", help="also enlarge videos smaller than --short-side")
    p.add_argument("--frames", type=count(2), default=16, help="clip length T (with --stride: the minimum video length)")
    p.add_argument("--stride", type=count(1), default=2)
    p.add_argument("--max-excluded", type=float, default=0.2, help="fail when more than this share of the listed "
                   "videos is unusable (default 0.2)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepare's output in --out")


def add_demo(p) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--nproc", type=count(1), default=2)
    p.add_argument("--quick", action="store_true", help="a much shorter run: a smoke test, no conclusion drawn")
    p.add_argument("--seeds", type=count(1), default=1, help="run every arm over seeds 0..N-1 and report mean ± sd "
                   "(and write the spread a single run is judged against)")
    p.add_argument("--study", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the SSL study's arms (the paper's protocol, the paper's loss with global BN, 10%% "
                        "labels: docs/DEMO.md); default: on with --seeds > 1, off for a single run")


def add_run_args(p, config_required: bool) -> None:
    """What train and eval share: the recipe, the dataset, the run dir and key=value overrides."""
    p.add_argument("--config", required=config_required, help="YAML recipe (path or name under configs/)")
    p.add_argument("--data", help="prepared dataset directory (overrides data.root)")
    p.add_argument("--run-dir", help="run directory (overrides run_dir)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=10")


def add_train(p) -> None:
    add_run_args(p, False)
    p.add_argument("--plan", default=None, help="a JSON plan of several trainings run in order in one process "
                   "group (instead of --config; see hcml/launch/plan.py)")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in the run dir) or a path")
    p.add_argument("--overwrite", action="store_true", help="start fresh in a run dir that holds another "
                   "run's checkpoints, deleting them (without it that is refused)")
    p.add_argument("--nproc-per-node", type=count(1), default=0, help="launch torchrun with N processes")
    p.add_argument("--max-restarts", type=count(0), default=0,
                   help="with --nproc-per-node: torchrun restarts failed workers, which resume from the "
                        "newest checkpoint (also automatic under any torchrun restart)")
    p.add_argument("--nnodes", default="1", help="with --nproc-per-node: nodes of a multi-node job (N or "
                   "MIN:MAX); each node runs this same command")
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default=None, help="the job's id, the same on every node and new for each job "
                   "(e.g. the Slurm job id); needed with --rdzv-endpoint")


def add_eval(p) -> None:
    add_run_args(p, False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="report directory (default: next to the checkpoint)")
    p.add_argument("--nproc-per-node", type=count(1), default=0, help="shard the views over N processes "
                   "(torchrun; one per GPU)")


def add_predict(p) -> None:
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files (any container/codec FFmpeg "
                   "reads) or folders of JPEG frames (Something-Something V1: one folder, one video)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of hcml train (ckpt_<step>.pt)")
    p.add_argument("--list", default=None, metavar="FILE", help="a file of video paths, one per line (relative "
                   "to the file's folder; # comments)")
    p.add_argument("--dir", action="append", metavar="DIR", help="every video file under DIR, recursively, and "
                   "every folder of JPEG frames in it (repeatable)")
    p.add_argument("--top-k", type=count(1), default=5, help="class names with probabilities per video (default 5)")
    p.add_argument("--views", default=None, metavar="KxC", help="K clips x C crops (1 or 3) per video; default: "
                   "the checkpoint's data.eval_clips x data.eval_crops, as hcml eval")
    p.add_argument("--out", default=None, metavar="FILE", help="write the predictions to FILE.jsonl or FILE.csv")
    p.add_argument("--decoder", default="auto", choices=("auto", "dali", "pyav"), help="auto: DALI where it "
                   "decodes the codec (GPU: H.264/HEVC/VP9/AV1...; CPU: VP8/VP9/MJPEG), PyAV otherwise")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"), help="where the model (and DALI) "
                   "run; auto: the GPU when there is one")
    p.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line, for a checkpoint "
                   "that holds none (saved before 2026-12-03)")
    p.add_argument("--nproc-per-node", type=count(1), default=0, help="shard the videos over N processes "
                   "(torchrun; one per GPU)")


def add_export(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint of hcml train (ckpt_<step>.pt)")
    p.add_argument("--out", required=True, metavar="FILE.pt2", help="the torch.export program (load it with "
                   "`import hcml.ops; torch.export.load(FILE)`)")
    p.add_argument("--frames", type=count(1), default=None, help="T of the input clips (default: the checkpoint's "
                   "data.frames)")
    p.add_argument("--crop", type=count(1), default=None, help="S of the S x S input (default: data.crop)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size from 1 to 4096 (default: batch 1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the program runs (a CUDA "
                   "export runs on the GPU)")
    p.add_argument("--aoti", default=None, metavar="FILE.pt2", help="also compile an AOTInductor package (needs a "
                   "C++ compiler; it calls the cost-volume op back through Python: README, Exporting)")
    p.add_argument("--classes", default=None, metavar="FILE", help="class names for a checkpoint that holds none")


def add_knn(p) -> None:
    p.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="prepared dataset directory (overrides data.root)")
    p.add_argument("--k", type=count(1), default=20, help="neighbours (at most the number of training videos)")
    p.add_argument("--random-init", action="store_true", help="the same network at random initialisation (the "
                   "reference a self-supervised feature must beat)")
    p.add_argument("--out", default=None, help="where knn.json goes (default: next to the checkpoint)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")


def add_gradcam(p) -> None:
    p.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--videos", nargs="+", required=True, help="video files or JPEG frame folders, as hcml predict "
                   "takes them (DALI where it reads the codec here, PyAV otherwise)")
    p.add_argument("--baseline", default=None, help="a no-motion checkpoint shown above for comparison")
    p.add_argument("--target", type=count(0), default=None, help="class index (default: the predicted class)")
    p.add_argument("--data", help="prepared dataset directory (for labels)")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")


def add_model_args(q, min_frames: int = 1) -> None:
    """The model a command builds without a config (info, bench model)."""
    from hcml.model.backbone import ARCHS

    q.add_argument("--arch", default="r2d50", choices=sorted(ARCHS))
    q.add_argument("--frames", type=count(min_frames), default=16)
    q.add_argument("--size", type=count(16), default=224)
    q.add_argument("--no-motion", action="store_true", help="the backbone alone")


def add_info(p) -> None:
    add_model_args(p)
    p.add_argument("--classes", type=count(1), default=400)
    p.add_argument("--json", action="store_true")


def add_bench(p) -> None:
    from hcml.launch.bench import TARGETS

    bsub = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    for name, target in TARGETS.items():
        target.add_args(bsub.add_parser(name, help=target.HELP))


# Each subcommand: (help, its flags, what runs it). The parser is built from this table only.
COMMANDS = {
    "synth": ("write the synthetic motion dataset (a prepared dataset directory)", add_synth, cmd_synth),
    "prepare": ("probe (and re-encode) a public dataset into a prepared dataset directory", add_prepare,
                cmd_prepare),
    "demo": ("synthetic set → SSL then joint HCML vs controls, 2-process training → report", add_demo, cmd_demo),
    "train": ("train per a YAML recipe (--nproc-per-node N: torchrun, signals handled)", add_train, cmd_train),
    "eval": ("multi-view evaluation of a checkpoint", add_eval, cmd_eval),
    "predict": ("label raw videos (files, --list, --dir) with a checkpoint: top-k class names", add_predict,
                cmd_predict),
    "export": ("torch.export a checkpoint's inference network (.pt2; optionally AOTInductor) for serving",
               add_export, cmd_export),
    "knn": ("per-level KNN on motion features (the paper's Table 7)", add_knn, cmd_knn),
    "gradcam": ("Grad-CAM++ strips of the last conv layer (the paper's Fig. 6)", add_gradcam, cmd_gradcam),
    "info": ("per-stage shapes, parameters and GMACs of a model", add_info, cmd_info),
    "bench": ("benchmarks: op (cost volume), model, pipeline (DALI vs PyAV), train (step breakdown)", add_bench,
              cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    from hcml import __version__

    ap = Parser(prog="hcml", description="Hierarchical Contrastive Motion Learning: train, evaluate and profile "
                "video action recognition models.")
    ap.add_argument("--version", action="version", version=f"hcml {__version__}")
    sub = ap.add_subparsers(dest="cmd", parser_class=Parser)
    for name, (helptext, add, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add(p)
        p.set_defaults(fn=fn)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also follow options (``--resume auto k=v``)."""
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # bare `hcml` / `python -m hcml`: the usage, not an error
        ap.print_help()
        raise SystemExit(0)
    command = next((a for a in reversed(argv) if a in COMMANDS), None)  # "--config demo train": train
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version") and command:
        rest = list(argv)
        rest.remove(command)
        ap.error(f"options go after the command: hcml {command} {' '.join(rest)}")
    args, rest = ap.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        ap.error(f"hcml {args.cmd}: unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM: a scheduler's stop; SIGUSR1: Slurm's preemption warning) ends a command as Ctrl-C
    does, through ``finally`` blocks (temp files removed, pending work cancelled), with one line and no traceback.
    ``hcml train`` replaces these handlers with its own (checkpoint, then exit 0)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


AFTER_STOP = {"prepare": "; the same command continues, keeping every finished video",
              "synth": "; the same command continues, keeping every finished clip",
              "eval": "; no report written", "predict": "; no predictions written"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd is None:
        build_parser().print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the launcher hands it on to the workers
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank not in (None, "0") else ""
    in_main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGUSR1)} if in_main else {}
    try:
        return args.fn(args) or 0
    except HCMLError as e:  # user errors: one clear line, no traceback, exit 2 (in every torchrun worker too)
        # one write of the whole line: torchrun workers share stderr, and a line under PIPE_BUF is never split
        os.write(2, f"hcml {args.cmd}{where}: error: {e}\n".encode())
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal above
        signum = getattr(e, "signum", signal.SIGINT)
        if not where:
            os.write(2, f"hcml {args.cmd}: stopped by signal {signum}{AFTER_STOP.get(args.cmd, '')}\n".encode())
        # a worker of hcml's launcher exits 0 (no torchrun failure report); the launcher returns 128 + signal
        return 0 if os.environ.get(LAUNCHED) else 128 + signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    raise SystemExit(main())
