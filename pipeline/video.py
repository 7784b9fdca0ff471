"""Video encoding with PyAV (libx264, libx265, libvpx-vp9 and mpeg4 ship inside its wheel): the synthetic set, the
re-encoding of ``hcml prepare`` and the test fixtures. No ffmpeg executable is needed, so a GPU machine without a
package index can make its own H.264 data from one 35 MB wheel.

Every file is written to a temporary name in the target folder and renamed when complete, so an interrupted run
never leaves a half-written video behind.
"""

from __future__ import annotations

import errno
import threading
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from hcml.files import temp_prefix, write_failure

CODECS = {  # name → (PyAV encoder, container, encoder options); keyframes every `gop` frames exactly (no scene cuts)
    "h264": ("libx264", "mp4", {"preset": "veryfast", "crf": "18", "bf": "0", "threads": "1", "x264-params": "scenecut=0"}),
    "hevc": ("libx265", "mp4", {"preset": "fast", "crf": "22",
                                "x265-params": "scenecut=0:bframes=0:open-gop=0:pools=1:log-level=error"}),
    "vp9": ("libvpx-vp9", "webm", {"crf": "18", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "0",
                                   "threads": "1"}),
    "mpeg4": ("mpeg4", "avi", {"threads": "1"}),  # UCF-101's format (test fixtures)
}


class Cancelled(Exception):
    """``encode_video`` stopped because its ``cancel`` event was set; nothing was written."""


def encode_video(frames: Iterable, path: str | Path, codec: str = "vp9", fps: float = 25, gop: int = 8,
                 size: tuple[int, int] | None = None, options: dict | None = None,
                 cancel: threading.Event | None = None) -> int:
    """Encode frames (uint8 (H, W, 3) RGB arrays or ``av.VideoFrame``) to ``path``; returns the frame count.

    ``gop``: keyframe interval (also the minimum, and no scene-cut keyframes, so keyframes fall on every gop-th
    frame exactly; no B-frames for H.264/HEVC), ``size``:
    (width, height) to scale to (default: the first frame's). ``options`` override the encoder's defaults.
    ``cancel``: checked before every frame (a stopped ``prepare`` must not wait for an hour-long source).
    """
    import av

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} ({' | '.join(CODECS)})")
    encoder, container, opts = CODECS[codec]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_prefix(path))
    n = 0
    try:
        with av.open(str(tmp), "w", format=container) as out:
            stream = None
            for f in frames:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{path}: cancelled")
                frame = f if isinstance(f, av.VideoFrame) else av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(f), format="rgb24")
                if stream is None:
                    width, height = size or (frame.width, frame.height)
                    rate = Fraction(fps).limit_denominator(1001)
                    stream = out.add_stream(encoder, rate=rate)
                    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                    time_base = stream.codec_context.time_base = 1 / rate
                    stream.codec_context.gop_size = gop
                    stream.options = {**opts, "g": str(gop), "keyint_min": str(gop), **(options or {})}
                frame = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
                # A decoded source frame keeps its picture type, and an encoder makes every frame marked I a
                # keyframe: the source's scene cuts would come back, off the fixed GOP.
                frame.pict_type = 0  # AV_PICTURE_TYPE_NONE: the encoder decides, by `gop` alone
                # Output frame n is input frame n, at a constant rate. The time base must be set with the pts: a
                # decoded frame keeps its source's (1/1000 for WebM, 1/12800 for MP4), and PyAV rescales pts from
                # it to the encoder's, which turned n into 0 for every frame.
                frame.pts, frame.time_base = n, time_base
                n += 1
                for packet in stream.encode(frame):
                    out.mux(packet)
            if stream is None:
                raise ValueError("no frames to encode")
            for packet in stream.encode():
                out.mux(packet)
        tmp.replace(path)
    except Exception as e:
        # the disk, not this video: the caller must stop (EACCES may be the source's, read through ``frames``)
        failure = write_failure(e, path.parent, "every finished video is kept: make room and run the same command "
                                                "to continue", ignore=(errno.EACCES,))
        if failure is None:
            raise
        raise failure from None
    finally:
        tmp.unlink(missing_ok=True)
    return n


JPEG_SUFFIXES = (".jpg", ".jpeg")
FRAME_FOLDER_FPS = 12.0  # Something-Something V1's frames: 12 per second


def frame_folder_frames(path: str | Path) -> list[Path]:
    """A JPEG frame folder's frames in name order (Something-Something V1: ``<id>/00001.jpg ...``): the one rule
    for prepare, its probe and predict."""
    return sorted(p for p in Path(path).iterdir() if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())


def decode_jpeg(path: str | Path):
    """One JPEG frame as a PyAV frame (yuvj4xxp, as an MJPEG stream's), the colour path every video frame takes."""
    import av

    with av.open(str(path)) as c:
        return next(c.decode(video=0))


def read_frames(src: str | Path) -> tuple[Iterable, float]:
    """(decoded ``av.VideoFrame`` iterator, average fps) of a video file, or of a folder of JPEG frames (sorted by
    name; Something-V1's layout, 12 fps)."""
    import av

    src = Path(src)
    if src.is_dir():
        return (decode_jpeg(p) for p in frame_folder_frames(src)), FRAME_FOLDER_FPS

    container = av.open(str(src))
    st = container.streams.video[0]
    fps = float(st.average_rate or 25)

    def video_frames():
        with container:
            yield from container.decode(st)

    return video_frames(), fps


def scaled_size(width: int, height: int, short_side: int, upscale: bool = False) -> tuple[int, int]:
    """(width, height) with the shorter side at ``short_side`` and both even (what 4:2:0 encoders need). A video
    already shorter than that keeps its size unless ``upscale`` (enlarging adds pixels, not detail)."""
    if min(width, height) <= short_side and not upscale:
        return width + width % 2, height + height % 2
    if width <= height:
        w, h = short_side, round(height * short_side / width)
    else:
        w, h = round(width * short_side / height), short_side
    return w + w % 2, h + h % 2
