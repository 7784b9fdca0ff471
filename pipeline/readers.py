"""Candidate DALI reader graphs for ``hcml bench pipeline --compare`` (which reader design feeds a GPU
fastest). Each yields batches of augmented clips exactly as :class:`~hcml.pipeline.loader.TrainLoader` does (one
crop window per clip resized to crop x crop, flip, normalise, CFHW), so only the reader differs:

- ``experimental``: the project's loader (``experimental.readers.video`` over a per-epoch frame-range list);
- ``file+decoder``: ``readers.file`` hands encoded files to ``decoders.video`` (``mixed`` = NVDEC on a GPU), which
  decodes every sample of a batch in parallel; the clip start comes from the list's label column;
- ``classic``: ``readers.video`` (GPU only) over a ``path label start end`` frame-number list;
- ``experimental xN``: the same loader with ``data.readers=N``: N pipelines over disjoint sub-shards, batches
  taken in turn (one pipeline keeps one NVDEC engine busy; H100/H200 have seven).

They serve measurement only: the training loader keeps the guarantees (exact-once sharding, bit-exact resume).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hcml.pipeline.loader import (BIG_STEP, DataSpec, TrainLoader, augment_train, clip_start, dali_device,
                                  epoch_order)
from hcml.pipeline.prepared import Sample


def _augment(video, spec: DataSpec):
    return augment_train(video, spec)[0]


def _iterate(pipes) -> Iterator[torch.Tensor]:
    """Batches from one or more built pipelines, taken in turn, as torch tensors (forever)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    its = [DALIGenericIterator([p], ["clips"], auto_reset=True, size=-1) for p in pipes]
    while True:
        for it in its:
            yield next(it)[0]["clips"]


def _clip_list(path: Path, samples: Sequence[Sample], spec: DataSpec, line) -> None:
    """One line per video in the epoch-0 order, ``line(sample, start)`` at the loader's seeded clip start."""
    path.write_text("".join(line(samples[i], clip_start(0, 0, int(i), samples[i].num_frames, spec.span))
                            for i in epoch_order(len(samples), 0, 0)))


def _built(pipe_def, spec: DataSpec, device_id: int | None):
    p = pipe_def(batch_size=spec.batch_size, num_threads=spec.threads, device_id=device_id, seed=0,
                 prefetch_queue_depth=spec.prefetch)
    p.build()
    return _iterate([p])


def file_decoder(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0):
    from nvidia.dali import fn, pipeline_def

    dev = dali_device(spec.device)
    lst = Path(work_dir) / "file_decoder.txt"
    _clip_list(lst, samples, spec, lambda s, start: f"{s.path} {start}\n")  # label column = first frame

    @pipeline_def
    def pipe():
        encoded, start = fn.readers.file(file_list=str(lst), random_shuffle=False, name="Reader")
        video = fn.decoders.video(encoded, device="mixed" if dev == "gpu" else "cpu", start_frame=start[0],
                                  sequence_length=spec.frames, stride=spec.stride, pad_mode="edge")
        return _augment(video, spec)

    return _built(pipe, spec, device_id if dev == "gpu" else None)


def classic(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0):
    """``readers.video`` (NVDEC only) over ``path label start end`` frame numbers."""
    from nvidia.dali import fn, pipeline_def

    if dali_device(spec.device) != "gpu":
        raise RuntimeError("readers.video runs on the GPU only")
    lst = Path(work_dir) / "classic.txt"
    _clip_list(lst, samples, spec, lambda s, start: f"{s.path} {s.label} {start} {start + spec.span}\n")

    @pipeline_def
    def pipe():
        video, _ = fn.readers.video(device="gpu", file_list=str(lst), file_list_frame_num=True,
                                    sequence_length=spec.frames, stride=spec.stride, step=BIG_STEP,
                                    random_shuffle=False, name="Reader")
        return _augment(video, spec)

    return _built(pipe, spec, device_id)


def experimental(samples: Sequence[Sample], spec: DataSpec, work_dir: Path, device_id: int | None = 0,
                 pipelines: int = 1):
    """The project's TrainLoader, with ``pipelines`` reader pipelines (``data.readers``) over disjoint sub-shards."""
    loader = TrainLoader(samples, dataclasses.replace(spec, readers=pipelines), work_dir=Path(work_dir),
                         device_id=device_id)
    return (clips for clips, _ in loader.cycle())


CANDIDATES = {"experimental": experimental, "file+decoder": file_decoder, "classic": classic}
