"""Reader designs for ``hcml bench pipeline --compare`` and ``hcml bench scale``: which one feeds a GPU fastest,
and what each costs at an epoch start. Each yields batches of augmented clips exactly as
:class:`~hcml.pipeline.loader.TrainLoader` does (one crop window per clip resized to crop x crop, flip, normalise,
CFHW), so only the reading and decoding differ:

- ``loader``: the training loader (an external source of this rank's encoded bytes → ``decoders.video``; with
  the dataset's GOP, only each clip's packets from the keyframe before it), ``loader xN`` with ``data.readers=N``
  pipelines per process, batches taken in turn, and ``loader, whole files`` (the GOP ignored);
- ``file+decoder``: DALI's own ``readers.file`` hands encoded files to ``decoders.video``;
- ``experimental``: the loader this project had before (``experimental.readers.video`` over a per-epoch
  ``path label start end`` frame-range list of the *whole* dataset, sharded inside the reader, which indexes every
  listed file when the pipeline builds, every epoch);
- ``classic``: ``readers.video`` (GPU only) over the same frame-range list.

Only ``loader`` keeps the training guarantees (exact-once sharding, bit-exact resume, broken-file replacement); the
others serve measurement: each was measured against it (docs/PERFORMANCE.md) before it was dropped as a loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hcml.pipeline.loader import DataSpec, TrainLoader, augment_train, clip_start, dali_device, epoch_order
from hcml.pipeline.prepared import Sample

BIG_STEP = 1 << 30  # one sequence per frame-range line


def _random_augment(video, spec: DataSpec):
    """The training augmentation with DALI's own RNG (the readers below have no per-sample source)."""
    from nvidia.dali import fn

    lo, hi = (float(v) for v in spec.short_side)
    short = fn.random.uniform(range=[lo, hi]) if hi > lo else lo
    mirror = fn.random.coin_flip(probability=0.5) if spec.flip != "none" else 0
    return augment_train(video, spec, short, fn.random.uniform(range=[0.0, 1.0]),
                         fn.random.uniform(range=[0.0, 1.0]), mirror)


def _iterate(pipes) -> Iterator[torch.Tensor]:
    """Batches from one or more built pipelines, taken in turn, as torch tensors (forever)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    its = [DALIGenericIterator([p], ["clips"], auto_reset=True, size=-1) for p in pipes]
    while True:
        for it in its:
            yield next(it)[0]["clips"]


def frame_range_list(path: Path, samples: Sequence[Sample], spec: DataSpec, line, epoch: int = 0) -> None:
    """One line per video in the epoch's order, ``line(sample, start)`` at the loader's seeded clip start."""
    path.write_text("".join(line(samples[i], clip_start(0, epoch, int(i), samples[i].num_frames, spec.span))
                            for i in epoch_order(len(samples), 0, epoch)))


def _built(pipe_def, spec: DataSpec, device_id: int | None):
    p = pipe_def(batch_size=spec.batch_size, num_threads=spec.threads, device_id=device_id, seed=0,
                 prefetch_queue_depth=spec.prefetch)
    p.build()
    return p


def loader(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0,
           pipelines: int = 1, rank: int = 0, world: int = 1, gop: int = 0):
    """The training loader, with ``pipelines`` DALI pipelines per process (``data.readers``); ``gop``: the
    dataset's keyframe interval (each clip's packets cut from the keyframe before it), 0: whole files."""
    tl = TrainLoader(samples, dataclasses.replace(spec, readers=pipelines), device_id=device_id, rank=rank,
                     world=world, gop=gop)

    def batches():
        try:
            yield from (clips for clips, _ in tl.cycle())
        finally:  # generator closed: stop DALI's threads now, not at garbage collection
            tl.close()

    return batches()


def file_decoder(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0):
    """DALI's ``readers.file`` (whole dataset, its own file reading) → ``decoders.video`` at the seeded starts."""
    from nvidia.dali import fn, pipeline_def

    dev = dali_device(spec.device)
    lst = Path(work_dir) / "file_decoder.txt"
    frame_range_list(lst, samples, spec, lambda s, start: f"{s.path} {start}\n")  # label column = first frame

    @pipeline_def
    def pipe():
        encoded, start = fn.readers.file(file_list=str(lst), random_shuffle=False, name="Reader")
        video = fn.decoders.video(encoded, device="mixed" if dev == "gpu" else "cpu", start_frame=start[0],
                                  sequence_length=spec.frames, stride=spec.stride, pad_mode="edge")
        return _random_augment(video, spec)

    return _iterate([_built(pipe, spec, device_id if dev == "gpu" else None)])


def experimental_pipelines(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0,
                           rank: int = 0, world: int = 1, epoch: int = 0) -> list:
    """The former training loader's pipeline for one epoch: the whole list written, every file indexed at build
    (``reader_meta`` of the returned pipeline gives its epoch size)."""
    from nvidia.dali import fn, pipeline_def

    dev = dali_device(spec.device)
    lst = Path(work_dir) / f"experimental_epoch{epoch}_rank{rank}.txt"
    lst.parent.mkdir(parents=True, exist_ok=True)
    frame_range_list(lst, samples, spec, lambda s, start: f"{s.path} {s.label} {start} {start + spec.span}\n",
                     epoch)

    @pipeline_def
    def pipe():
        video, _ = fn.experimental.readers.video(
            device=dev, file_list=str(lst), file_list_format="frames", file_list_include_end=False,
            sequence_length=spec.frames, stride=spec.stride, step=BIG_STEP, pad_mode="edge", random_shuffle=False,
            shard_id=rank, num_shards=world, pad_last_batch=True, name="Reader")
        return _random_augment(video, spec)

    return [_built(pipe, spec, device_id if dev == "gpu" else None)]


def experimental(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0):
    return _iterate(experimental_pipelines(samples, spec, work_dir, device_id))


def classic(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0):
    """``readers.video`` (NVDEC only) over ``path label start end`` frame numbers."""
    from nvidia.dali import fn, pipeline_def

    if dali_device(spec.device) != "gpu":
        raise RuntimeError("readers.video runs on the GPU only")
    lst = Path(work_dir) / "classic.txt"
    frame_range_list(lst, samples, spec, lambda s, start: f"{s.path} {s.label} {start} {start + spec.span}\n")

    @pipeline_def
    def pipe():
        video, _ = fn.readers.video(device="gpu", file_list=str(lst), file_list_frame_num=True,
                                    sequence_length=spec.frames, stride=spec.stride, step=BIG_STEP,
                                    random_shuffle=False, name="Reader")
        return _random_augment(video, spec)

    return _iterate([_built(pipe, spec, device_id)])


CANDIDATES = {"loader": loader, "file+decoder": file_decoder, "experimental": experimental, "classic": classic}
