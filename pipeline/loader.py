"""DALI video pipelines (train and multi-view eval), one definition for CPU and GPU, and their iterators.

Why per-epoch frame-range file lists: ``readers.video`` (GPU) and ``experimental.readers.video`` (CPU + GPU)
emit *every* sequence of a file, so an epoch would be "all clips" rather than "each video once at a random
offset". Writing, each epoch, one ``path label start end`` line per video (frame numbers, a start drawn from
a seeded RNG = temporal jitter, ``step`` larger than the range = exactly one clip per line) and pre-shuffling
the list with the same seed on every rank gives PySlowFast's sampling with DALI's decoders, exact-once
sharding (contiguous shards of one shuffled list) and DALI pipeline checkpointing for mid-epoch resume.

GPU: ``experimental.readers.video(device="gpu")`` decodes H.264/HEVC with NVDEC and the whole augmentation
graph runs on the GPU. CPU: the same reader on ``device="cpu"`` (VP9/VP8/MJPEG only) and the same graph.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from hcml.errors import ConfigError, DatasetError
from hcml.pipeline.prepared import Sample

BIG_STEP = 1 << 30  # one sequence per file-list line
# What DALI's video reader decodes on each device: CPU (FFmpeg's software decoders it ships) and GPU (NVDEC).
DALI_CODECS = {"cpu": {"vp8", "vp9", "mjpeg"}, "gpu": {"h264", "hevc", "vp8", "vp9", "av1", "mjpeg"}}


@dataclass
class DataSpec:
    """Everything the input pipeline needs: clip sampling, augmentation, batching and where DALI runs.

    The training config's ``data`` section *is* a DataSpec (it adds only the dataset root), so no setting is
    copied by hand between the config and the pipeline; this package still knows nothing of the config.
    """

    frames: int = 16  # T, frames per clip
    stride: int = 2  # temporal stride between sampled frames
    crop: int = 224
    short_side: list[int] = field(default_factory=lambda: [256, 320])  # random shorter-side range (train)
    eval_short_side: int = 256
    eval_clips: int = 10  # K uniformly spaced clips per video at test time
    eval_crops: int = 3  # 1 (centre) or 3 (left/centre/right or top/centre/bottom)
    flip: str = "plain"  # none | plain | swap (swap: mirrored clips of a flip pair take the pair's other label)
    flip_pairs: list[list[int]] = field(default_factory=list)  # empty: the prepared dataset's own (dataset.yaml)
    batch_size: int = 8  # clips per GPU (per process); evaluation forwards 2x as many clips (no activations kept)
    threads: int = 4  # DALI CPU worker threads per process
    device: str = "auto"  # auto | cpu | gpu: where DALI decodes and augments
    dtype: str = "auto"  # auto | float32 | float16: clip dtype (auto: float16 when the GPU trains in AMP)
    prefetch: int = 2  # batches DALI prepares ahead (prefetch_queue_depth)
    readers: int = 1  # training pipelines per process over disjoint sub-shards, batches taken in turn (one DALI
    #                   pipeline keeps one NVDEC engine busy; H100/H200 have 7): measure with bench pipeline --compare
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])

    @property
    def span(self) -> int:
        """Frames one clip covers in the video."""
        return clip_span(self.frames, self.stride)

    def steps_per_epoch(self, videos: int, world: int) -> int:
        """Steps every rank runs per epoch over ``videos``: ``R · floor(videos / (world · R) / B)`` with R =
        ``readers`` (each rank's shard splits into R sub-shards, each a whole number of batches). The one rule for
        the loader and for ``hcml train``'s check before any process starts."""
        R = max(1, self.readers)
        return R * (videos // (world * R) // self.batch_size)

    @property
    def eval_rows_per_batch(self) -> int:
        """(video, view) rows per eval batch: 2 x batch_size clips per forward, each row holding eval_crops."""
        return max(1, 2 * self.batch_size // self.eval_crops)


def clip_span(frames: int, stride: int) -> int:
    """Frames of the video a clip of ``frames`` frames ``stride`` apart covers (also prepare's GOP)."""
    return (frames - 1) * stride + 1


def dali_device(requested: str) -> str:
    """Resolve ``auto`` → ``gpu`` when CUDA is usable, else ``cpu``."""
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.device=gpu but no CUDA device is visible; use data.device=cpu (VP9/VP8 data)")
    if requested not in ("cpu", "gpu"):
        raise ConfigError(f"data.device must be auto, cpu or gpu, got {requested!r}")
    return requested


def check_decodable(codecs: set[str], device: str, where: str) -> None:
    """Refuse, before any pipeline starts, videos the resolved DALI ``device`` cannot decode (DALI itself would
    drop them all and fail with "number of input samples: 0")."""
    bad = sorted(codecs - DALI_CODECS[device])
    if bad:
        fix = ("train on a GPU (data.device=gpu), or prepare a CPU copy with `hcml prepare ... --reencode vp9`"
               if device == "cpu" else "prepare it again with `hcml prepare ... --reencode h264`")
        raise DatasetError(f"{where}: {'/'.join(bad)} videos cannot be decoded by DALI's {device.upper()} reader "
                           f"(it decodes {', '.join(sorted(DALI_CODECS[device]))}): {fix}")


def placement(spec: DataSpec, device_id: int | None) -> tuple[str, int | None]:
    """(DALI device, CUDA device id or None): a GPU pipeline runs on ``device_id`` (default 0)."""
    device = dali_device(spec.device)
    return device, ((device_id or 0) if device == "gpu" else None)


def clip_start(seed: int, epoch: int, index: int, num_frames: int, span: int) -> int:
    """Random temporal offset of sample ``index`` in ``epoch``: uniform over the valid starts."""
    if num_frames <= span:
        return 0
    return int(np.random.default_rng([seed, epoch, index]).integers(0, num_frames - span + 1))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch; identical on every rank."""
    return np.random.default_rng([seed, epoch, 7919]).permutation(n)


def write_train_list(path: Path, samples: Sequence[Sample], spec: DataSpec, seed: int, epoch: int,
                     skip: set[str] = frozenset()) -> None:
    """One ``path label start end`` line per video (``end`` exclusive), in the epoch's shuffled order; videos in
    ``skip`` are left out (the others keep their place and start)."""
    lines = []
    for i in epoch_order(len(samples), seed, epoch):
        s = samples[i]
        if s.path in skip:
            continue
        start = clip_start(seed, epoch, int(i), s.num_frames, spec.span)
        end = start + spec.span
        if s.num_frames:
            end = min(end, s.num_frames)  # short videos: edge-padded by the reader
        lines.append(f"{s.path} {s.label} {start} {end}\n")
    path.write_text("".join(lines))


def eval_views(num_frames: int, spec: DataSpec) -> list[tuple[int, int]]:
    """K uniformly spaced [start, end) clip ranges covering the video (PySlowFast's multi-view testing)."""
    span = spec.span
    last = max(0, num_frames - span) if num_frames else 0
    K = spec.eval_clips
    starts = [round(last * k / (K - 1)) if K > 1 else last // 2 for k in range(K)]
    return [(s, min(s + span, num_frames) if num_frames else s + span) for s in starts]


def write_eval_list(path: Path, samples: Sequence[Sample], spec: DataSpec, skip: set[str] = frozenset()) -> None:
    """One line per (video, view); the label column holds the *row index* so that scores map back to videos."""
    lines, row = [], 0
    for s in samples:
        for start, end in eval_views(s.num_frames, spec):
            if s.path not in skip:
                lines.append(f"{s.path} {row} {start} {end}\n")
            row += 1
    path.write_text("".join(lines))


def video_reader(file_list: Path, spec: DataSpec, device: str, shard_id: int, num_shards: int):
    """(T frames (F, H, W, C) uint8, label) per file-list line. Ranges are [start, end): DALI 2.4 reads
    ``end`` as exclusive even with ``file_list_include_end=True`` (an inclusive end lost a clip's last frame to
    edge padding), so ends are written exclusive and the flag says so."""
    from nvidia.dali import fn

    return fn.experimental.readers.video(
        device=device, file_list=str(file_list), file_list_format="frames", file_list_include_end=False,
        sequence_length=spec.frames, stride=spec.stride, step=BIG_STEP, pad_mode="edge", random_shuffle=False,
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="Reader")


def _crop_resize(video, short_side, pos_x, pos_y, crop: int):
    """Resize only the window that becomes the output: the crop of ``crop`` px at relative position (pos_x,
    pos_y) of the video scaled to ``short_side``, expressed in source pixels, is resampled straight to
    crop x crop (an ROI resize), instead of resizing whole frames and then cropping. Same result, a fraction
    of the resampling work."""
    from nvidia.dali import fn, math as dmath, types

    shape = fn.cast(video.shape(), dtype=types.FLOAT)  # (F, H, W, C)
    h, w = shape[1], shape[2]
    scale = short_side / dmath.min(h, w)  # source px → resized px
    win_h, win_w = dmath.min(crop / scale, h), dmath.min(crop / scale, w)  # the window in source px
    y0, x0 = pos_y * (h - win_h), pos_x * (w - win_w)
    return fn.resize(video, roi_start=fn.stack(y0, x0), roi_end=fn.stack(y0 + win_h, x0 + win_w),
                     size=[crop, crop], antialias=False)


def _normalize(video, spec: DataSpec, mirror=0):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(video, mirror=mirror, mean=[255 * m for m in spec.mean],
                                    std=[255 * s for s in spec.std], output_layout="CFHW",
                                    dtype=types.FLOAT16 if spec.dtype == "float16" else types.FLOAT)


def augment_train(video, spec: DataSpec):
    """(augmented clip, mirror flag) inside a DALI graph: random shorter side and crop position, one window for
    all frames resized to crop x crop, random horizontal flip (unless ``flip=none``), normalisation."""
    from nvidia.dali import fn

    lo, hi = (float(v) for v in spec.short_side)
    short = fn.random.uniform(range=[lo, hi]) if hi > lo else lo
    video = _crop_resize(video, short, fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0]),
                         spec.crop)
    mirror = fn.random.coin_flip(probability=0.5) if spec.flip != "none" else 0
    return _normalize(video, spec, mirror), mirror


def build_train_pipeline(file_list: Path, spec: DataSpec, *, device: str, device_id: int | None, shard_id: int,
                         num_shards: int, seed: int, checkpoint: str | None = None):
    """Train graph: decode T frames → one random crop window (random shorter side, random position) resized to
    crop x crop for all frames → flip → normalise (CFHW = the model's C, T, H, W)."""
    from nvidia.dali import pipeline_def

    @pipeline_def(enable_checkpointing=True)
    def train_pipe():
        video, label = video_reader(file_list, spec, device, shard_id, num_shards)
        video, mirror = augment_train(video, spec)
        return video, label, (label * 0 if spec.flip == "none" else mirror)

    pipe = train_pipe(batch_size=spec.batch_size, num_threads=spec.threads, device_id=device_id, seed=seed,
                      checkpoint=checkpoint, prefetch_queue_depth=spec.prefetch)
    pipe.build()
    return pipe


def build_eval_pipeline(file_list: Path, spec: DataSpec, *, device: str, device_id: int | None, shard_id: int,
                        num_shards: int):
    """Eval graph: shorter side → ``eval_short_side``, 1 or 3 crops along the longer side, stacked per sample."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def eval_pipe():
        video, row = video_reader(file_list, spec, device, shard_id, num_shards)
        shape = fn.cast(video.shape(), dtype=types.FLOAT)  # (F, H, W, C)
        landscape = shape[2] >= shape[1]
        positions = (0.5,) if spec.eval_crops == 1 else (0.0, 0.5, 1.0)
        crops = []
        for p in positions:
            px = landscape * p + (1 - landscape) * 0.5
            py = landscape * 0.5 + (1 - landscape) * p
            crops.append(_normalize(_crop_resize(video, float(spec.eval_short_side), px, py, spec.crop), spec))
        return fn.stack(*crops), row

    pipe = eval_pipe(batch_size=spec.eval_rows_per_batch, num_threads=spec.threads, device_id=device_id, seed=0,
                     prefetch_queue_depth=spec.prefetch)
    pipe.build()
    return pipe


# What DALI's readers print (C++, to fd 2) for a file-list line they drop while the pipeline builds.
_DROPPED = (re.compile(r'Failed to open video file "(.+?)"'), re.compile(r"Empty frame range .* for file (.+?)\. Skipping"))


@contextmanager
def dropped_files() -> Iterator[list[str]]:
    """Paths of the videos DALI's reader drops while pipelines build inside the block (unreadable, missing, or
    shorter than the listed range): it indexes every file then, so a file that broke after ``prepare`` costs its
    line, not the run. DALI's per-file lines are summarised by the caller; everything else on fd 2 passes on."""
    sys.stderr.flush()
    saved = os.dup(2)
    paths: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield paths
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            other = []
            for line in tmp.read().decode(errors="replace").splitlines():
                m = next((m for m in (p.search(line) for p in _DROPPED) if m), None)
                paths.append(m.group(1)) if m else other.append(line)
            if other:
                os.write(2, ("\n".join(other) + "\n").encode())


_NO_FRAMES = re.compile(r'video file "(.+?)"')


def build_skipping_unreadable(build: Callable[[], list], unreadable: set[str]) -> tuple[list, list[str]]:
    """``build()`` (which writes the file list without ``unreadable`` and builds the pipelines), retried without
    each video that makes DALI's reader fail to build (a file that opens but holds no decodable frame); returns
    (what build returned, every video dropped or left out). Every rank meets the same files the same way, so
    the shards still partition what is left."""
    dropped: list[str] = []  # over all attempts: DALI may name a file only once per process
    while True:
        with dropped_files() as named:
            try:
                result = build()
            except RuntimeError as e:
                m = _NO_FRAMES.search(str(e))
                if not m or m.group(1) in unreadable:
                    raise
                unreadable.add(m.group(1))
                result = None
        dropped += named
        if result is not None:
            return result, sorted(set(dropped) | unreadable)


def kept_samples(pipe) -> int:
    """Samples the reader of a built pipeline will emit per epoch (all shards), after it dropped unreadable ones."""
    return int(pipe.reader_meta("Reader")["epoch_size"])


class TrainLoader:
    """One rank's training batches, epoch by epoch, with a resumable position.

    Every rank runs the same number of steps per epoch (``R · floor(N / (world · R) / B)`` with ``R`` =
    ``spec.readers``), so DDP never waits on a rank whose shard happens to be one sample shorter. With R > 1 the
    rank's shard is split into R contiguous sub-shards, each read by its own DALI pipeline, and batches are taken
    from them in turn; the sub-shards partition the list, so every video still comes once per epoch.
    ``device_id``: the CUDA device of a GPU pipeline.

    A video DALI cannot open (it broke after ``prepare``) is dropped from the epoch by DALI on every rank alike;
    the epoch then has ``floor(kept / (world · R) / B) · R`` steps (a step fewer at most per B lost videos),
    and ``on_skip(epoch, count, paths)`` reports it once per epoch start.
    """

    def __init__(self, samples: Sequence[Sample], spec: DataSpec, *, work_dir: Path, rank: int = 0, world: int = 1,
                 device_id: int | None = None, seed: int = 0,
                 on_skip: Callable[[int, int, list[str]], None] | None = None):
        if not samples:
            raise DatasetError("no training videos (train.txt is empty)")
        self.samples, self.spec, self.work_dir = list(samples), spec, Path(work_dir)
        self.device, self.device_id = placement(spec, device_id)
        self.rank, self.world, self.seed = rank, world, seed
        self.readers = max(1, spec.readers)
        self.steps_per_epoch = spec.steps_per_epoch(len(self.samples), world)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.samples)} training videos cannot fill one batch of data.batch_size="
                              f"{spec.batch_size} on each of {world} process(es) x data.readers={self.readers}; "
                              f"lower data.batch_size to at most {max(1, len(self.samples) // (world * self.readers))}")
        self._iters: list = []
        self._epoch = -1
        self._pos = 0
        self._epoch_steps = self.steps_per_epoch
        self.on_skip = on_skip
        self.unreadable: set[str] = set()  # videos that stop DALI's reader from building: left out of the lists
        self._swap = None
        if spec.flip == "swap":
            if not spec.flip_pairs:
                raise ConfigError("data.flip=swap needs label pairs that a horizontal flip swaps: none in data.flip_pairs "
                                  "nor in the dataset's dataset.yaml (flip_pairs)")
            n = max(max(max(p) for p in spec.flip_pairs), max(s.label for s in self.samples)) + 1
            swap = torch.arange(n)
            for a, b in spec.flip_pairs:
                swap[a], swap[b] = b, a
            self._swap = swap

    def _start(self, epoch: int, checkpoints: list | None):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.work_dir.mkdir(parents=True, exist_ok=True)
        lst = self.work_dir / f"train_epoch{epoch}_rank{self.rank}.txt"
        R = self.readers

        def build():
            write_train_list(lst, self.samples, self.spec, self.seed, epoch, skip=self.unreadable)
            # k = 0 with R = 1 is exactly the single-pipeline loader (same shard, same seed)
            return [build_train_pipeline(lst, self.spec, device=self.device, device_id=self.device_id,
                                         shard_id=self.rank * R + k, num_shards=self.world * R,
                                         seed=self.seed * 1000 + epoch * 10 + self.rank + 100_003 * k,
                                         checkpoint=checkpoints[k] if checkpoints else None) for k in range(R)]

        pipes, dropped = build_skipping_unreadable(build, self.unreadable)
        self._iters = [DALIGenericIterator([pipe], ["clips", "labels", "mirror"], reader_name="Reader",
                                           last_batch_policy=LastBatchPolicy.DROP, auto_reset=False) for pipe in pipes]
        kept = kept_samples(pipes[0])
        self._epoch_steps = self.spec.steps_per_epoch(kept, self.world)
        if kept < len(self.samples) and self.on_skip:
            self.on_skip(epoch, len(self.samples) - kept, dropped)
        if self._epoch_steps == 0:
            raise DatasetError(f"epoch {epoch}: DALI could read only {kept} of {len(self.samples)} training videos, "
                               f"too few for one batch of {self.spec.batch_size} per process; unreadable: "
                               f"{', '.join(dropped[:3]) or 'see the DALI log'}")
        self._epoch = epoch

    @property
    def finished(self) -> bool:
        """The current epoch has yielded all of its steps."""
        return self._pos >= self._epoch_steps

    def state(self) -> dict:
        """Resumable position: epoch, batches consumed, and each pipeline's DALI checkpoint (reader + RNG)."""
        cps = [it.checkpoints()[0] for it in self._iters] or None
        return {"epoch": self._epoch, "position": self._pos, "dali": cps}

    def cycle(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch 0, 1, 2, ... without end (benchmarks)."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1

    def epoch(self, epoch: int, state: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (clips (B, 3, T, H, W), labels (B,)) for the rest of ``epoch`` (from ``state`` if resuming)."""
        self._pos = 0
        checkpoints = None
        if state and state.get("epoch") == epoch:
            self._pos = int(state.get("position", 0))
            checkpoints = state.get("dali")
            if isinstance(checkpoints, str):  # a checkpoint written by the single-pipeline loader
                checkpoints = [checkpoints]
            if checkpoints is not None and len(checkpoints) != self.readers:
                raise ConfigError(f"the checkpoint's loader ran {len(checkpoints)} reader pipeline(s), this run has "
                                  f"data.readers={self.readers}: resume with the same data.readers")
        self._start(epoch, checkpoints)
        if checkpoints is None and self._pos:  # no DALI checkpoint: skip decoded batches (augmentation RNG differs)
            for i in range(self._pos):
                next(self._iters[i % self.readers])
        while self._pos < self._epoch_steps:
            batch = next(self._iters[self._pos % self.readers])[0]
            labels = batch["labels"].view(-1).long()
            if self._swap is not None:
                mirrored = batch["mirror"].view(-1).to(labels.device).bool()
                labels = torch.where(mirrored, self._swap.to(labels.device)[labels], labels)
            self._pos += 1
            yield batch["clips"], labels
        self._iters = []


class EvalLoader:
    """Multi-view eval batches for this rank's shard: (clips (B, crops, 3, T, H, W), view rows (B,)).

    Rows are indices into the eval list (``video = row // eval_clips``); with ``pad_last_batch`` and the PARTIAL
    policy every row of the shard comes exactly once, and shards partition the rows, so gathering (row, score)
    pairs over ranks scores every video once. ``spec.eval_clips``/``eval_crops`` set the views (KNN and Grad-CAM
    pass a spec with 1 and 1).
    """

    def __init__(self, samples: Sequence[Sample], spec: DataSpec, *, work_dir: Path, rank: int = 0, world: int = 1,
                 device_id: int | None = None):
        self.samples, self.spec, self.work_dir = list(samples), spec, Path(work_dir)
        self.device, self.device_id = placement(spec, device_id)
        self.rank, self.world = rank, world
        self.dropped: list[str] = []  # videos DALI could not open in the last pass (their views never come)

    @property
    def num_rows(self) -> int:
        return len(self.samples) * self.spec.eval_clips

    def __iter__(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if not self.samples:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lst = self.work_dir / f"eval_rank{self.rank}.txt"
        unreadable: set[str] = set()

        def build():
            write_eval_list(lst, self.samples, self.spec, skip=unreadable)
            return build_eval_pipeline(lst, self.spec, device=self.device, device_id=self.device_id,
                                       shard_id=self.rank, num_shards=self.world)

        pipe, self.dropped = build_skipping_unreadable(build, unreadable)
        it = DALIGenericIterator([pipe], ["clips", "rows"], reader_name="Reader",
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        for batch in it:
            yield batch[0]["clips"], batch[0]["rows"].view(-1).long()


def shard_rows(n: int, rank: int, world: int) -> range:
    """The rows DALI assigns to ``rank`` (contiguous split): for tests and cross-checks."""
    return range(math.floor(n * rank / world), math.floor(n * (rank + 1) / world))
