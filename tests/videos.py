"""Test videos that carry their own frame number, in the forms users download (MP4/H.264 with B-frames as YouTube
serves it, WebM/VP9, AVI/MPEG-4, JPEG frame folders, variable frame rate), and a reader of that number.

Frame n shows n in binary as 10 vertical stripes (white = 1) on a black background: coarse enough to survive every
lossy codec and any rescaling, so a decoded frame says which source frame it is.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

BITS = 10


def index_frame(n: int, width: int = 80, height: int = 48) -> np.ndarray:
    f = np.zeros((height, width, 3), np.uint8)
    w = width // BITS
    for b in range(BITS):
        if (n >> b) & 1:
            f[:, b * w:(b + 1) * w] = 255
    return f


def frame_index(frame: np.ndarray) -> int:
    """The number an ``index_frame`` shows, read from the centre of each stripe of an (H, W, C) frame of any size."""
    h, w = frame.shape[:2]
    row = frame[h // 2].astype(float).mean(-1)
    return sum(1 << b for b in range(BITS) if row[int((b + 0.5) * w / BITS)] > 127)


def write(kind: str, path: Path, frames: int = 40, fps: float = 25) -> Path:
    """A source video of ``frames`` index frames in one of the forms in ``KINDS``."""
    from hcml.pipeline.video import encode_video

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [index_frame(n) for n in range(frames)]
    if kind == "mp4-bframes":  # H.264 High profile with B-frames: decode order != presentation order
        encode_video(images, path, "h264", fps, gop=12, options={"bf": "3", "b_strategy": "0"})
    elif kind == "webm":
        encode_video(images, path, "vp9", fps, gop=8)
    elif kind == "avi-mpeg4":
        encode_video(images, path, "mpeg4", fps, gop=12)
    elif kind == "jpeg-folder":
        from matplotlib.image import imsave

        path.mkdir(parents=True, exist_ok=True)
        for n, im in enumerate(images, 1):
            imsave(path / f"{n:05d}.jpg", im)
    elif kind.startswith("vfr-"):  # irregular frame durations (1, 3, 2 ticks of 1/75 s), as phone cameras write
        _write_vfr(images, path, "libvpx-vp9" if kind == "vfr-webm" else "libx264")
    else:
        raise ValueError(kind)
    return path


def _write_vfr(images, path: Path, encoder: str) -> None:
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream(encoder, rate=25)
        st.width, st.height, st.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        st.codec_context.time_base = Fraction(1, 75)
        st.options = {"bf": "0"} if encoder == "libx264" else {"deadline": "realtime", "cpu-used": "8"}
        t = 0
        for n, im in enumerate(images):
            fr = av.VideoFrame.from_ndarray(im, format="rgb24").reformat(format="yuv420p")
            fr.pts, fr.time_base = t, Fraction(1, 75)
            t += (1, 3, 2)[n % 3]
            for pkt in st.encode(fr):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


KINDS = {"mp4-bframes": ".mp4", "webm": ".webm", "avi-mpeg4": ".avi", "jpeg-folder": "", "vfr-mp4": ".mp4",
         "vfr-webm": ".webm"}


def decoded_indices(path: Path) -> list[int]:
    """Every frame of a video file as PyAV decodes it (presentation order), as frame numbers."""
    import av

    with av.open(str(path)) as c:
        return [frame_index(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def packet_pts(path: Path) -> list[int]:
    import av

    with av.open(str(path)) as c:
        return [p.pts for p in c.demux(video=0) if p.size]
