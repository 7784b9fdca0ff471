"""DALI input pipelines (train and multi-view eval) on ``fn.decoders.video``: one graph for CPU and GPU.

Why this design. DALI's video *readers* decode one sequence at a time (one NVDEC engine busy per pipeline) and
index every file of their list when the pipeline builds: 56 s of epoch start per rank at 240k lines, rebuilt
every epoch. Here an external source hands the graph the *encoded bytes* of this rank's shard only, read ahead by
a thread pool, and ``decoders.video`` decodes every sample of a batch in parallel (DALI's thread pool on the CPU,
NVDEC on the GPU: ``device="mixed"``), with the augmentation after it on the same device.

Every random choice -- the epoch's sample order, the rank's contiguous shard, each clip's start (temporal
jitter), shorter side, crop position and flip -- is this module's seeded function of (seed, epoch, index)
(:func:`epoch_order`, :func:`draw_clip`), never DALI's RNG. So:

- the pipeline is built once per run, not per epoch, and batch ``g`` of a run is the same tensor whatever
  ``data.threads`` and ``data.readers`` (pipelines per process) are;
- a mid-epoch resume needs only (epoch, position, the videos found unreadable): no DALI checkpoint;
- a video that cannot be read or decoded is replaced in its batch by the next readable video of the same shard
  (a rule of the shard, not of timing), counted and reported; batches stay full, so every rank runs the same
  steps and never waits for another at a collective.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from hcml.errors import ConfigError, DatasetError
from hcml.pipeline.prepared import Sample

# What DALI's video decoder takes on each device (``fn.decoders.video``, DALI 2.4): the CPU backend VP8/VP9/MJPEG
# (FFmpeg's software decoders it ships; no H.264), the mixed backend NVDEC's codecs as well. DALI lists MPEG-4
# Part 2 for the mixed backend too; it is left out until a GPU run shows UCF-101's AVIs decode frame-exact.
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
    threads: int = 4  # DALI CPU worker threads per pipeline (CPU decode and augmentation; file reads: `readers`)
    device: str = "auto"  # auto | cpu | gpu: where DALI decodes and augments
    dtype: str = "auto"  # auto | float32 | float16: clip dtype (auto: float16 when the GPU trains in AMP)
    prefetch: int = 2  # batches DALI prepares ahead (prefetch_queue_depth); files are read ahead of that
    readers: int = 1  # DALI pipelines per process, batches taken in turn (one NVDEC decode stream each): measure
    #                   with `hcml bench pipeline --compare`; it never changes which batch comes
    keyframe_starts: bool = False  # train clips start only on keyframes (dataset.yaml's fixed `gop`): no frame
    #                                decoded in vain, temporal jitter in steps of the GOP
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])

    @property
    def span(self) -> int:
        """Frames one clip covers in the video."""
        return clip_span(self.frames, self.stride)

    def steps_per_epoch(self, videos: int, world: int) -> int:
        """Steps every rank runs per epoch over ``videos``: ``floor(videos / world / B)``, every rank's shard
        (``floor(videos / world)`` videos at least) filling as many whole batches. The one rule for the loader and
        for ``hcml train``'s check before any process starts."""
        return videos // world // self.batch_size

    @property
    def eval_rows_per_batch(self) -> int:
        """(video, view) rows per eval batch: 2 x batch_size clips per forward, each row holding eval_crops."""
        return max(1, 2 * self.batch_size // self.eval_crops)


def clip_span(frames: int, stride: int) -> int:
    """Frames of the video a clip of ``frames`` frames ``stride`` apart covers."""
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
    """Refuse, before any pipeline starts, videos the resolved DALI ``device`` cannot decode (every batch would
    fail and every video would be replaced in vain)."""
    bad = sorted(codecs - DALI_CODECS[device])
    if bad:
        fix = ("train on a GPU (data.device=gpu), or prepare a CPU copy with `hcml prepare ... --reencode vp9`"
               if device == "cpu" else "prepare it again with `hcml prepare ... --reencode h264`")
        raise DatasetError(f"{where}: {'/'.join(bad)} videos cannot be decoded by DALI's {device.upper()} decoder "
                           f"(it decodes {', '.join(sorted(DALI_CODECS[device]))}): {fix}")


def placement(spec: DataSpec, device_id: int | None) -> tuple[str, int | None]:
    """(DALI device, CUDA device id or None): a GPU pipeline runs on ``device_id`` (default 0)."""
    device = dali_device(spec.device)
    return device, ((device_id or 0) if device == "gpu" else None)


# ------------------------------------------------------------------ the seeded sampling rules
def clip_start(seed: int, epoch: int, index: int, num_frames: int, span: int, gop: int = 0) -> int:
    """Random temporal offset of sample ``index`` in ``epoch``: uniform over the valid starts, or over the valid
    keyframes when ``gop`` > 0 (a fixed keyframe interval: every GOP-th frame is one)."""
    if num_frames <= span:
        return 0
    rng = np.random.default_rng([seed, epoch, index])
    if gop > 0:
        return gop * int(rng.integers(0, (num_frames - span) // gop + 1))
    return int(rng.integers(0, num_frames - span + 1))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch; identical on every rank."""
    return np.random.default_rng([seed, epoch, 7919]).permutation(n)


def shard_rows(n: int, rank: int, world: int) -> range:
    """The contiguous share of ``n`` rows (of an epoch's order, or of the eval views) that ``rank`` reads."""
    return range(math.floor(n * rank / world), math.floor(n * (rank + 1) / world))


class Clip(NamedTuple):
    """One training clip's random choices: first frame, shorter side (px), crop position (0..1 of the free
    range, x and y) and horizontal flip."""

    start: int
    short_side: float
    pos_x: float
    pos_y: float
    mirror: bool


def draw_clip(seed: int, epoch: int, index: int, num_frames: int, spec: DataSpec, gop: int = 0,
              salt: int = 0) -> Clip:
    """The clip of sample ``index`` in ``epoch``. ``salt`` > 0: the same video standing in for an unreadable one
    (the salt-th candidate after it in the shard) draws a clip of its own."""
    start = clip_start(seed, epoch, index, num_frames, spec.span, gop if spec.keyframe_starts else 0)
    if salt:
        start = clip_start(seed + 1_000_003 * salt, epoch, index, num_frames, spec.span,
                           gop if spec.keyframe_starts else 0)
    rng = np.random.default_rng([seed, epoch, index, 104_729, salt])
    lo, hi = (float(v) for v in spec.short_side)
    short = float(rng.uniform(lo, hi)) if hi > lo else lo
    pos_x, pos_y = (float(v) for v in rng.uniform(0.0, 1.0, 2))
    mirror = spec.flip != "none" and bool(rng.random() < 0.5)
    return Clip(start, short, pos_x, pos_y, mirror)


def eval_views(num_frames: int, spec: DataSpec) -> list[tuple[int, int]]:
    """K uniformly spaced [start, end) clip ranges covering the video (PySlowFast's multi-view testing)."""
    span = spec.span
    last = max(0, num_frames - span) if num_frames else 0
    K = spec.eval_clips
    starts = [round(last * k / (K - 1)) if K > 1 else last // 2 for k in range(K)]
    return [(s, min(s + span, num_frames) if num_frames else s + span) for s in starts]


# ------------------------------------------------------------------ the graph
def read_encoded(path: str) -> np.ndarray:
    """A video file's bytes for the decoder; OSError (with the reason) when it cannot be read or is empty."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise OSError(f"{path}: zero-length file")
    return data


_MUXERS = {".webm": "webm", ".mkv": "matroska", ".mp4": "mp4", ".mov": "mov", ".m4v": "mp4"}


def clip_bytes(data: np.ndarray, path: str, start: int, span: int, gop: int) -> tuple[np.ndarray, int]:
    """The packets a clip of ``span`` frames from ``start`` needs -- from the keyframe before ``start`` (every
    ``gop``-th frame, as ``prepare`` writes them) -- remuxed into a small file of their own with timestamps from 0,
    and the clip's start in it. Why: DALI 2.4's ``decoders.video`` decodes an in-memory video from its first frame
    up to ``start_frame`` (measured: 80 ms per clip at frame 0, 500 ms at frame 260 of a 320 px VP9 file), so a
    random clip of a 10 s video would cost ~5x its own frames. Frame n of the result is frame (k + n) of the video
    only for one packet per frame in presentation order, which is what ``prepare`` writes (no B-frames; its probe
    checks increasing timestamps); hence only for datasets with a recorded ``gop``. OSError when it cannot be
    demuxed or is shorter than ``start``."""
    import io

    import av

    first = (start // gop) * gop
    try:
        with av.open(io.BytesIO(data.tobytes())) as inp:
            st = inp.streams.video[0]
            packets = []
            for p in inp.demux(st):
                if p.size:
                    packets.append(p)
                    if len(packets) >= start + span:
                        break
            if len(packets) <= start:
                raise OSError(f"{path}: {len(packets)} frames, a clip starts at frame {start}")
            sel = packets[first:]
            base_pts, base_dts = sel[0].pts, sel[0].dts
            out = io.BytesIO()
            with av.open(out, "w", format=_MUXERS.get(os.path.splitext(path)[1].lower(), "matroska")) as o:
                stream = o.add_stream_from_template(st)
                for p in sel:
                    if base_pts is not None and p.pts is not None:
                        p.pts -= base_pts
                    if base_dts is not None and p.dts is not None:
                        p.dts -= base_dts
                    p.stream = stream
                    o.mux(p)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV's errors for a damaged file
        raise OSError(f"{path}: cannot be demuxed ({type(e).__name__}: {e})") from None
    return np.frombuffer(out.getvalue(), dtype=np.uint8), start - first


def decode(encoded, start, spec: DataSpec, device: str):
    """T frames (F, H, W, C) uint8 from ``start``, ``stride`` apart, edge-padded past the end of the video. DALI
    decodes from the keyframe before ``start``; frame n is the n-th frame in presentation order."""
    from nvidia.dali import fn

    return fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", start_frame=start,
                             sequence_length=spec.frames, stride=spec.stride, pad_mode="edge")


def crop_window(h, w, short_side, pos_x, pos_y, crop: int, minimum=min):
    """The window (y0, x0, height, width), in source pixels, that becomes a crop x crop output: the crop at
    relative position (pos_x, pos_y) of the frame scaled to ``short_side``. The one rule for the DALI graph (on
    its data nodes, ``minimum=dali.math.min``) and for PyAV-decoded frames (:mod:`hcml.pipeline.rawvideo`)."""
    scale = short_side / minimum(h, w)  # source px → resized px
    win_h, win_w = minimum(crop / scale, h), minimum(crop / scale, w)
    return pos_y * (h - win_h), pos_x * (w - win_w), win_h, win_w


def eval_positions(landscape, crops: int) -> list[tuple]:
    """Relative (pos_x, pos_y) of the 1 (centre) or 3 eval crops, spread along the longer side; ``landscape``
    is 1/True when width >= height (a DALI data node or a Python bool)."""
    return [(landscape * p + (1 - landscape) * 0.5, landscape * 0.5 + (1 - landscape) * p)
            for p in ((0.5,) if crops == 1 else (0.0, 0.5, 1.0))]


def _crop_resize(video, short_side, pos_x, pos_y, crop: int):
    """Resize only the window that becomes the output: the crop of ``crop`` px at relative position (pos_x,
    pos_y) of the video scaled to ``short_side``, expressed in source pixels, is resampled straight to
    crop x crop (an ROI resize), instead of resizing whole frames and then cropping. Same result, a fraction
    of the resampling work."""
    from nvidia.dali import fn, math as dmath, types

    shape = fn.cast(video.shape(), dtype=types.FLOAT)  # (F, H, W, C)
    y0, x0, win_h, win_w = crop_window(shape[1], shape[2], short_side, pos_x, pos_y, crop, dmath.min)
    return fn.resize(video, roi_start=fn.stack(y0, x0), roi_end=fn.stack(y0 + win_h, x0 + win_w),
                     size=[crop, crop], antialias=False)


def _normalize(video, spec: DataSpec, mirror=0):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(video, mirror=mirror, mean=[255 * m for m in spec.mean],
                                    std=[255 * s for s in spec.std], output_layout="CFHW",
                                    dtype=types.FLOAT16 if spec.dtype == "float16" else types.FLOAT)


def augment_train(video, spec: DataSpec, short_side, pos_x, pos_y, mirror):
    """The training augmentation inside a DALI graph, with its random values given per sample: one crop window
    for all frames (shorter side, position) resized to crop x crop, horizontal flip, normalisation (CFHW)."""
    return _normalize(_crop_resize(video, short_side, pos_x, pos_y, spec.crop), spec, mirror)


def eval_crops(video, spec: DataSpec):
    """Shorter side → ``eval_short_side``, 1 or 3 crops along the longer side, stacked (crops, C, T, H, W)."""
    from nvidia.dali import fn, types

    shape = fn.cast(video.shape(), dtype=types.FLOAT)  # (F, H, W, C)
    return fn.stack(*(_normalize(_crop_resize(video, float(spec.eval_short_side), px, py, spec.crop), spec)
                      for px, py in eval_positions(shape[2] >= shape[1], spec.eval_crops)))


def _pipeline(graph: Callable, source: Callable, outputs: int, batch_size: int, spec: DataSpec, device_id,
              prefetch: int | None = None):
    """A built pipeline whose external source (``source()`` → one batch of ``outputs`` columns, encoded bytes
    first, then int32/float32 scalars per sample) feeds ``graph(*columns)``."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        cols = fn.external_source(source=source, num_outputs=outputs, batch=True,
                                  dtype=[types.UINT8, types.INT32] + [types.FLOAT] * (outputs - 2))
        return graph(*cols)

    p = pipe(batch_size=batch_size, num_threads=spec.threads, device_id=device_id, seed=0,
             prefetch_queue_depth=prefetch or spec.prefetch)
    p.build()
    return p


def to_torch(out, device_id: int | None) -> torch.Tensor:
    """A DALI batch (TensorList, CPU or GPU) copied into a new torch tensor on the pipeline's device."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = out.as_tensor()
    device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
    t = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, t, cuda_stream=stream)
    return t


def _last_line(e: Exception) -> str:
    """The reason in a DALI error: the first line after "encountered:" (not its C++ context or traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    keep = [ln for ln in after if not ln.startswith("C++ context") and "no longer valid" not in ln]
    text = keep[0] if keep else type(e).__name__
    return text.replace('Assert on "frames_decoders_[s]->IsValid()" failed: ', "")[:200]


class _Decodes:
    """The decoder alone, one sample at a time: which samples of a batch that DALI refused are at fault (its
    error does not always name the sample). Built on first use, rebuilt after each failure (a DALI pipeline is
    unusable after an error)."""

    def __init__(self, spec: DataSpec, device: str, device_id):
        self.spec, self.device, self.device_id = spec, device, device_id
        self._pipe, self._item = None, None

    def fails(self, encoded: np.ndarray, start: int) -> str:
        """"" when (encoded, start) decodes, else DALI's reason."""
        if self._pipe is None:
            self._pipe = _pipeline(lambda enc, st: decode(enc, st, self.spec, self.device), lambda: self._item, 2,
                                   1, self.spec, self.device_id, prefetch=1)  # one run = this sample, none ahead
        self._item = ([encoded], [np.array(start, dtype=np.int32)])
        try:
            self._pipe.run()
            return ""
        except Exception as e:  # noqa: BLE001 - whatever DALI raised is the reason
            self._pipe = None
            return _last_line(e) or "undecodable"


class _Batch(NamedTuple):
    key: tuple  # what the loader asked for: (epoch, position) or eval batch number
    labels: list[int]  # per sample (training: after the flip swap) or eval rows
    items: list[tuple[int, np.ndarray, int]]  # (dataset index, encoded bytes, start) per sample


class _Source:
    """The external source of one pipeline: each call plans the next batch in ``keys`` (the loader's order for
    this pipeline) and remembers it, so that the batch DALI delivers is matched with its labels and bytes."""

    def __init__(self, keys: Iterator, plan: Callable[[object], tuple[list, _Batch]]):
        self.keys, self.plan, self.planned = keys, plan, deque()
        self.error: BaseException | None = None

    def __call__(self):
        try:
            columns, batch = self.plan(next(self.keys))
        except BaseException as e:  # raised again by the loader, as it is (DALI would wrap it)
            self.error = e
            raise
        self.planned.append(batch)
        return columns


class _Files:
    """What the decoder gets for each clip -- the file's bytes, or with a known GOP only the packets the clip
    needs (:func:`clip_bytes`) -- prepared ahead on a thread pool (file reads release the GIL, PyAV's demuxing
    mostly), so the DALI source rarely waits."""

    def __init__(self, threads: int, span: int, gop: int):
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="hcml-read")
        self._ahead: dict[object, Future] = {}
        self._lock = threading.Lock()
        self.span, self.gop = span, gop
        self.bytes_read = 0

    def read(self, path: str) -> np.ndarray:
        data = read_encoded(path)
        with self._lock:
            self.bytes_read += data.size
        return data

    def clip(self, path: str, start: int | None, data: np.ndarray | None = None) -> tuple[np.ndarray, int | None]:
        """(encoded bytes for the decoder, the clip's first frame in them); ``start`` None: the whole file's bytes.
        OSError when it cannot be read."""
        data = self.read(path) if data is None else data
        if start is None or not self.gop:
            return data, start
        return clip_bytes(data, path, start, self.span, self.gop)

    def want(self, key, path: str, start: int | None) -> None:
        if key not in self._ahead:
            self._ahead[key] = self._pool.submit(self.clip, path, start)

    def get(self, key, path: str, start: int | None) -> tuple[np.ndarray, int | None]:
        """:meth:`clip`, made ahead under ``key`` (for the same path and start) or now."""
        fut = self._ahead.pop(key, None)
        return fut.result() if fut is not None else self.clip(path, start)

    def forget(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()

    def close(self) -> None:
        self.forget()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Pipelines:
    """``n`` DALI pipelines over one sequence of batch keys, batch k from pipeline k mod n, rebuilt from any key
    (a resume, or after a video DALI could not decode)."""

    def __init__(self, n: int, build: Callable[[Callable], object], keys_from: Callable[[object, int, int], Iterator],
                 plan: Callable, device_id):
        self.n, self.build, self.keys_from, self.plan, self.device_id = n, build, keys_from, plan, device_id
        self.pipes: list = []
        self.sources: list[_Source] = []
        self.next_key = None
        self.turn = 0
        self.failed: list[_Batch] = []  # after take() raised: the batches the failing pipeline held, oldest first

    def open(self, key) -> None:
        self.close()
        self.sources = [_Source(self.keys_from(key, k, self.n), self.plan) for k in range(self.n)]
        self.pipes = [self.build(src) for src in self.sources]
        self.next_key, self.turn = key, 0

    def take(self) -> tuple[torch.Tensor, _Batch]:
        """The next batch: (clips, its plan). Raises what DALI or the source raised; then ``open`` again."""
        k = self.turn
        try:
            out = self.pipes[k].run()
        except BaseException as e:
            err = self.sources[k].error
            self.failed = list(self.sources[k].planned)  # the refused batch first
            self.close()
            if err is not None and err is not e and not isinstance(err, StopIteration):
                raise err from None
            raise
        batch = self.sources[k].planned.popleft()
        self.turn = (k + 1) % self.n
        return to_torch(out[0], self.device_id), batch

    def close(self) -> None:
        self.pipes, self.sources = [], []  # DALI frees a pipeline with its last reference
        self.next_key = None


class TrainLoader:
    """One rank's training batches, epoch by epoch, with a resumable position.

    Epoch e's order is :func:`epoch_order`; rank r reads the contiguous share :func:`shard_rows` of it and its
    first ``steps_per_epoch x B`` slots make the batches (every rank runs the same number of steps). The pipelines
    are built at the first batch and serve every later epoch; ``epoch(e, state)`` at any other position (a resume)
    rebuilds them there. ``device_id``: the CUDA device of a GPU pipeline; ``gop``: the dataset's fixed keyframe
    interval (``data.keyframe_starts``).

    A video that cannot be read (missing, empty, unreadable) or decoded (DALI refuses its batch; the decoder alone
    then finds which sample) is replaced in its slot by the next readable video of the rank's shard, with a clip
    drawn for it, and remembered for the rest of the run (and in :meth:`state`, so that a resume replaces the
    same way); ``on_skip(epoch, 1, [path])`` reports each replacement. A DALI failure costs its batch's decode.
    """

    def __init__(self, samples: Sequence[Sample], spec: DataSpec, *, rank: int = 0, world: int = 1,
                 device_id: int | None = None, seed: int = 0, gop: int = 0,
                 on_skip: Callable[[int, int, list[str]], None] | None = None):
        if not samples:
            raise DatasetError("no training videos (train.txt is empty)")
        self.samples, self.spec = samples, spec
        self.device, self.device_id = placement(spec, device_id)
        self.rank, self.world, self.seed, self.gop = rank, world, seed, gop
        self.readers = max(1, spec.readers)
        self.steps_per_epoch = spec.steps_per_epoch(len(self.samples), world)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.samples)} training videos cannot fill one batch of data.batch_size="
                              f"{spec.batch_size} on each of {world} process(es); lower data.batch_size to at most "
                              f"{max(1, len(self.samples) // world)}")
        if spec.keyframe_starts and gop <= 0:
            raise ConfigError("data.keyframe_starts=true needs a dataset with a fixed keyframe interval (`gop` in "
                              "dataset.yaml, written by `hcml prepare --reencode h264|vp9`)")
        self.on_skip = on_skip
        self.unreadable: dict[str, str] = {}  # path → why: left out of every later batch, replaced
        self._swap = None
        if spec.flip == "swap":
            if not spec.flip_pairs:
                raise ConfigError("data.flip=swap needs label pairs that a horizontal flip swaps: none in data.flip_pairs "
                                  "nor in the dataset's dataset.yaml (flip_pairs)")
            n = max(max(max(p) for p in spec.flip_pairs), max(s.label for s in self.samples)) + 1
            swap = list(range(n))
            for a, b in spec.flip_pairs:
                swap[a], swap[b] = b, a
            self._swap = swap
        self._shards: dict[int, np.ndarray] = {}
        self._files = _Files(max(2, spec.threads), spec.span, gop)
        self._decodes = _Decodes(spec, self.device, self.device_id)
        self._pipes = _Pipelines(self.readers, self._build, self._keys, self._plan, self.device_id)
        self._epoch, self._pos = -1, 0
        self._ahead = spec.prefetch + 2  # batches whose files are read before DALI asks for them

    # -- the rules: which video and clip each slot holds
    def shard(self, epoch: int) -> np.ndarray:
        """Dataset indices of this rank's share of ``epoch``'s order (its first steps x B slots are batched)."""
        if epoch not in self._shards:
            rows = shard_rows(len(self.samples), self.rank, self.world)
            self._shards = {e: s for e, s in self._shards.items() if e >= epoch - 1}
            self._shards[epoch] = epoch_order(len(self.samples), self.seed, epoch)[rows.start:rows.stop]
        return self._shards[epoch]

    def _advance(self, key: tuple[int, int], n: int) -> tuple[int, int]:
        epoch, pos = key
        pos += n
        return epoch + pos // self.steps_per_epoch, pos % self.steps_per_epoch

    def _keys(self, key, k: int, n: int) -> Iterator[tuple[int, int]]:
        key = self._advance(key, k)
        while True:
            yield key
            key = self._advance(key, n)

    def _want(self, key: tuple[int, int]) -> None:
        epoch, pos = key
        shard, B = self.shard(epoch), self.spec.batch_size
        for slot in range(pos * B, (pos + 1) * B):
            index = int(shard[slot])
            s = self.samples[index]
            if s.path not in self.unreadable:
                clip = draw_clip(self.seed, epoch, index, s.num_frames, self.spec, self.gop)
                self._files.want((epoch, slot), s.path, clip.start)

    def _slot(self, epoch: int, slot: int) -> tuple[int, np.ndarray, int, Clip]:
        """(dataset index, encoded bytes, first frame in them, clip) of ``slot``: its own video, or the first
        readable one after it in the shard."""
        shard = self.shard(epoch)
        for j in range(len(shard)):
            index = int(shard[(slot + j) % len(shard)])
            s = self.samples[index]
            if s.path in self.unreadable:
                continue
            clip = draw_clip(self.seed, epoch, index, s.num_frames, self.spec, self.gop, salt=j)
            try:
                data, start = self._files.get((epoch, slot) if j == 0 else None, s.path, clip.start)
            except OSError as e:
                self._mark(epoch, s.path, e.strerror or str(e))
                continue
            if j:
                self._report(epoch, self.samples[int(shard[slot])].path)
            return index, data, start, clip
        raise DatasetError(f"epoch {epoch}: none of the {len(shard)} videos of rank {self.rank}'s shard can be "
                           f"read or decoded; e.g. {next(iter(self.unreadable.items()), ('?', '?'))}")

    def _mark(self, epoch: int, path: str, why: str) -> None:
        self.unreadable[path] = why

    def _report(self, epoch: int, path: str) -> None:
        if self.on_skip:
            self.on_skip(epoch, 1, [f"{path} ({self.unreadable.get(path, '?')})"])

    def _plan(self, key: tuple[int, int]) -> tuple[list, _Batch]:
        epoch, pos = key
        for n in range(1, self._ahead + 1):
            self._want(self._advance(key, n))
        B = self.spec.batch_size
        items, labels, cols = [], [], ([], [], [], [], [], [])
        for slot in range(pos * B, (pos + 1) * B):
            index, data, start, clip = self._slot(epoch, slot)
            label = self.samples[index].label
            if self._swap is not None and clip.mirror and label < len(self._swap):
                label = self._swap[label]
            items.append((index, data, start))
            labels.append(label)
            for col, v in zip(cols, (data, np.array(start, np.int32), np.array(clip.short_side, np.float32),
                                     np.array(clip.pos_x, np.float32), np.array(clip.pos_y, np.float32),
                                     np.array(float(clip.mirror), np.float32))):
                col.append(v)
        return list(cols), _Batch(key, labels, items)

    def _build(self, source: _Source):
        from nvidia.dali import fn, types

        def graph(enc, start, short, px, py, mirror):
            video = decode(enc, start, self.spec, self.device)
            return augment_train(video, self.spec, short, px, py, fn.cast(mirror, dtype=types.INT32))

        return _pipeline(graph, source, 6, self.spec.batch_size, self.spec, self.device_id)

    # -- iteration
    @property
    def finished(self) -> bool:
        """The current epoch has yielded all of its steps."""
        return self._pos >= self.steps_per_epoch

    @property
    def bytes_read(self) -> int:
        """Encoded bytes this rank has read so far (its shard's files only)."""
        return self._files.bytes_read

    def state(self) -> dict:
        """Resumable position: epoch, batches consumed, and the videos found unreadable (path → why)."""
        return {"epoch": self._epoch, "position": self._pos, "unreadable": dict(self.unreadable)}

    def cycle(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch 0, 1, 2, ... without end (benchmarks)."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1

    def epoch(self, epoch: int, state: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (clips (B, 3, T, H, W), labels (B,)) for the rest of ``epoch`` (from ``state`` if resuming)."""
        self._epoch, self._pos = epoch, 0
        if state and state.get("epoch") == epoch:
            self._pos = int(state.get("position", 0))
            self.unreadable.update(state.get("unreadable") or {})
        while self._pos < self.steps_per_epoch:
            clips, batch = self._take((epoch, self._pos))
            self._pos += 1
            yield clips, torch.tensor(batch.labels, dtype=torch.long, device=clips.device)

    def _take(self, key: tuple[int, int]) -> tuple[torch.Tensor, _Batch]:
        for _ in range(self.spec.batch_size + 2):  # each retry marks at least one video, or raises
            if self._pipes.next_key != key:
                self._files.forget()
                self._pipes.open(key)
            try:
                clips, batch = self._pipes.take()
            except (DatasetError, ConfigError):
                raise
            except Exception:  # noqa: BLE001 - DALI refused a batch: find its culprit, or re-raise
                if not self._find_undecodable(key[0], self._pipes.failed[:1]):
                    raise
                continue
            assert batch.key == key, (batch.key, key)
            self._pipes.next_key = self._advance(key, 1)
            return clips, batch
        raise RuntimeError(f"batch {key}: DALI failed {self.spec.batch_size + 2} times in a row")

    def _find_undecodable(self, epoch: int, batches: list[_Batch]) -> bool:
        found = False
        for batch in batches:
            for index, data, start in batch.items:
                why = self._decodes.fails(data, start)
                if why:
                    self._mark(epoch, self.samples[index].path, f"cannot be decoded: {why}")
                    found = True
        return found

    def close(self) -> None:
        """Stop the pipelines and the read-ahead (also when the loader is garbage-collected)."""
        self._pipes.close()
        self._files.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class EvalLoader:
    """Multi-view eval batches for this rank's shard: (clips (B, crops, 3, T, H, W), view rows (B,)).

    Rows are indices into the (video, view) list (``video = row // eval_clips``); the rank reads the contiguous
    share :func:`shard_rows` of them, so gathering (row, score) pairs over ranks scores every video once, and each
    rank reads only its share's files. ``spec.eval_clips``/``eval_crops`` set the views (KNN and Grad-CAM pass a
    spec with 1 and 1). A video that cannot be read or decoded loses its views: it is listed in ``dropped``
    (``dropped_why``: path → reason), the other rows go on. A pass builds its pipeline once.
    """

    def __init__(self, samples: Sequence[Sample], spec: DataSpec, *, rank: int = 0, world: int = 1,
                 device_id: int | None = None, gop: int = 0):
        self.samples, self.spec = samples, spec
        self.device, self.device_id = placement(spec, device_id)
        self.rank, self.world, self.gop = rank, world, gop
        self.dropped: list[str] = []  # videos that could not be read or decoded in the last pass
        self.dropped_why: dict[str, str] = {}

    @property
    def num_rows(self) -> int:
        return len(self.samples) * self.spec.eval_clips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.samples:
            return
        self.dropped, self.dropped_why = [], {}
        it = _EvalPass(self)
        try:
            yield from it
        finally:
            it.close()

    def _drop(self, path: str, why: str) -> None:
        if path not in self.dropped_why:
            self.dropped_why[path] = why
            self.dropped.append(path)


class _EvalPass:
    """One pass over an :class:`EvalLoader`'s rows: a cursor that the DALI source advances batch by batch (rows
    of dropped videos are passed over), reset to a batch's first row when DALI refused that batch."""

    def __init__(self, loader: EvalLoader):
        self.loader, self.spec = loader, loader.spec
        rows = shard_rows(loader.num_rows, loader.rank, loader.world)
        self.rows = range(rows.start, rows.stop)
        self.cursor = 0
        self.last: tuple[int, np.ndarray] | None = None  # (video, bytes): its next views reuse them
        self.files = _Files(max(2, self.spec.threads), self.spec.span, loader.gop)
        self.decodes = _Decodes(self.spec, loader.device, loader.device_id)
        build = lambda source: _pipeline(  # noqa: E731
            lambda enc, st: eval_crops(decode(enc, st, self.spec, loader.device), self.spec), source, 2,
            self.spec.eval_rows_per_batch, self.spec, loader.device_id)
        self.pipes = _Pipelines(1, build, lambda key, k, n: iter(lambda: key, object()), self._plan,
                                loader.device_id)

    def _bad(self, video: int) -> bool:
        return self.loader.samples[video].path in self.loader.dropped_why

    def _plan(self, _key) -> tuple[list, _Batch]:
        K, B = self.spec.eval_clips, self.spec.eval_rows_per_batch
        samples = self.loader.samples
        first = self.cursor
        encs, starts, items, kept = [], [], [], []
        while len(kept) < B and self.cursor < len(self.rows):
            row = self.rows[self.cursor]
            self.cursor += 1
            video = row // K
            if self._bad(video):
                continue
            s = samples[video]
            try:
                if self.last is None or self.last[0] != video:
                    self.last = (video, self.files.get(video, s.path, None)[0])
                data, start = self.files.clip(s.path, eval_views(s.num_frames, self.spec)[row % K][0], self.last[1])
            except OSError as e:
                self.loader._drop(s.path, e.strerror or str(e))
                continue
            encs.append(data)
            starts.append(np.array(start, np.int32))
            items.append((video, data, start))
            kept.append(row)
        if not kept:
            raise StopIteration
        ahead = self.rows[self.cursor:self.cursor + (self.spec.prefetch + 2) * B]
        for video in dict.fromkeys(r // K for r in ahead):
            if not self._bad(video):
                self.files.want(video, samples[video].path, None)
        return [encs, starts], _Batch(first, kept, items)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.pipes.open(0)
        while True:
            try:
                clips, batch = self.pipes.take()
            except StopIteration:
                return
            except (DatasetError, ConfigError):
                raise
            except Exception:  # noqa: BLE001 - DALI refused a batch: drop its culprit(s) and go on from there
                pending = self.pipes.failed
                found = False
                for video, data, start in pending[0].items if pending else []:
                    why = self.decodes.fails(data, start)
                    if why:
                        self.loader._drop(self.loader.samples[video].path, f"cannot be decoded: {why}")
                        found = True
                if not found:
                    raise
                self.cursor, self.last = pending[0].key, None
                self.files.forget()
                self.pipes.open(pending[0].key)
                continue
            yield clips, torch.tensor(batch.labels, dtype=torch.long, device=clips.device)

    def close(self) -> None:
        self.pipes.close()
        self.files.close()
