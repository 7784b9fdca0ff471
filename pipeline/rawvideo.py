"""Videos as users hold them (any container and codec FFmpeg reads, any size and frame rate, no ``prepare``), turned
into the same multi-view clips as ``hcml eval``'s DALI graph, decoded by PyAV on the CPU.

Why a second decoder: DALI's CPU decoder reads VP8/VP9/MJPEG only, so an H.264 MP4 off a camera or an MPEG-4 AVI
would need a GPU (or a ``prepare`` run) to be labelled. The views (:func:`~hcml.pipeline.loader.eval_views`), the
crop windows (:func:`~hcml.pipeline.loader.crop_window`, :func:`~hcml.pipeline.loader.eval_positions`) and the
normalisation are the loader's own; only the resampling is torch's (bilinear at the same pixel centres as DALI's
linear ROI resize, no antialiasing), so a view equals DALI's to within a few grey levels (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hcml.pipeline.loader import DataSpec, crop_window, eval_positions, eval_views
from hcml.pipeline.video import decode_jpeg, frame_folder_frames

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")


def view_frames(num_frames: int, spec: DataSpec) -> list[list[int]]:
    """For each eval view, the T frame indices it shows (``stride`` apart from the view's start)."""
    return [[start + t * spec.stride for t in range(spec.frames)] for start, _ in eval_views(num_frames, spec)]


def _sample_grid(h: int, w: int, window, crop: int) -> torch.Tensor:
    """grid_sample's normalised coordinates of a crop x crop output over ``window`` (y0, x0, wh, ww) of an h x w
    frame: output pixel i samples source coordinate y0 + (i + 0.5) * wh / crop - 0.5 (pixel centres)."""
    y0, x0, wh, ww = (float(v) for v in window)
    i = torch.arange(crop, dtype=torch.float64) + 0.5
    ys, xs = y0 + i * wh / crop - 0.5, x0 + i * ww / crop - 0.5
    gy, gx = (2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1
    return torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1).float()  # (crop, crop, [x, y])


def _plane(plane) -> torch.Tensor:
    a = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
    return torch.from_numpy(a.astype(np.float32))


def frame_rgb(frame) -> torch.Tensor:
    """A PyAV frame as (3, H, W) RGB in [0, 255], converted as DALI's decoder converts (measured on DALI 2.4: BT.601
    limited range, chroma upsampled bilinearly at centred sites, rounded to uint8): 0.25 grey levels apart on
    average, where PyAV's own ``rgb24`` (swscale, nearest chroma) is 5 apart. Other pixel formats are first
    brought to 8-bit 4:2:0 by swscale."""
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        frame = frame.reformat(format="yuv420p")
    full = frame.format.name == "yuvj420p" or getattr(frame, "color_range", 1) == 2
    y, u, v = (_plane(p) for p in frame.planes[:3])
    h, w = y.shape
    uv = F.interpolate(torch.stack([u, v])[None], scale_factor=2, mode="bilinear", align_corners=False)[0, :, :h, :w]
    uv = uv - 128
    if not full:
        y, uv = (y - 16) * (255 / 219), uv * (255 / 224)
    u, v = uv[0], uv[1]
    r, b = y + 1.402 * v, y + 1.772 * u
    g = y - 0.344136 * u - 0.714136 * v
    return torch.stack([r, g, b]).round().clamp(0, 255)


def frame_crops(frame, spec: DataSpec) -> torch.Tensor:
    """One decoded PyAV frame → its ``eval_crops`` normalised crops (crops, 3, crop, crop)."""
    x = frame_rgb(frame)[None]
    h, w = x.shape[2:]
    grids = torch.stack([_sample_grid(h, w, crop_window(h, w, float(spec.eval_short_side), px, py, spec.crop),
                                      spec.crop) for px, py in eval_positions(w >= h, spec.eval_crops)])
    out = F.grid_sample(x.expand(len(grids), -1, -1, -1), grids, mode="bilinear", padding_mode="border",
                        align_corners=False)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return (out.round() - mean) / std  # DALI's resize also rounds to uint8 before normalising


def _video_frames(path: str, threads: int) -> Iterator:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise OSError(f"{path}: no video stream")
        st = container.streams.video[0]
        st.thread_type = "AUTO"
        if threads:
            st.thread_count = threads
        yield from container.decode(st)


def _folder_frames(path: str, wanted: set[int]) -> Iterator:
    """A frame folder's frames in order, decoding only the ``wanted`` ones and the last (edge padding's); None
    stands for a frame nobody needs. Random access: a view costs its own frames, not the frames before it."""
    jpgs = frame_folder_frames(path)
    for i, p in enumerate(jpgs):
        yield decode_jpeg(p) if i in wanted or i == len(jpgs) - 1 else None


def decode_views(path: str, num_frames: int, spec: DataSpec, threads: int = 0) -> tuple[torch.Tensor, int]:
    """The eval views of a video file or a JPEG frame folder: (views, crops, 3, T, crop, crop) float32, and how many
    frames decoded (a folder: read). Frames past the end repeat the last one (DALI's ``pad_mode="edge"``).
    Decodes in presentation order up to the last frame a view needs, cropping each needed frame as it comes
    (memory: the views, not the video). OSError with the reason when the file cannot be opened or decodes no
    frame; a frame that fails part-way ends the video there (the rest edge-padded, as for a cut file)."""
    want = view_frames(num_frames, spec)
    need: dict[int, list[tuple[int, int]]] = {}
    for k, idx in enumerate(want):
        for t, f in enumerate(idx):
            need.setdefault(f, []).append((k, t))
    out = torch.empty(len(want), spec.eval_crops, 3, spec.frames, spec.crop, spec.crop)
    filled = torch.zeros(len(want), spec.frames, dtype=torch.bool)
    last_needed, n, prev = max(need), 0, None
    frames = _folder_frames(path, set(need)) if Path(path).is_dir() else _video_frames(path, threads)
    try:
        for frame in frames:
            prev = frame if frame is not None else prev
            if n in need:
                crops = frame_crops(frame, spec)
                for k, t in need[n]:
                    out[k, :, :, t] = crops
                    filled[k, t] = True
            n += 1
            if n > last_needed:
                break
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV's errors for a damaged file
        if n == 0:
            raise OSError(f"{path}: cannot be decoded ({type(e).__name__}: {e})") from None
        # damaged part-way: the frames that decoded stand, the rest is edge-padded (the caller reports it)
    finally:
        frames.close()
    if n == 0:
        raise OSError(f"{path}: no frame decodes")
    if not filled.all():  # shorter than a view needs: its last decoded frame repeats (DALI's pad_mode="edge")
        tail = frame_crops(prev, spec)
        for k, t in (~filled).nonzero().tolist():
            out[k, :, :, t] = tail
    return out, n
