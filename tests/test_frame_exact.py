"""Frame exactness from the files users download to the frames the model sees: every source kind goes through
`prepare` (re-encoded) and through the decode graph the training loader runs (encoded bytes → `decoders.video`
at the clip starts the loader draws); each returned frame must be the frame number that was asked for. The
frames carry their own number (tests/videos.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hcml.pipeline.loader import DataSpec, _pipeline, clip_bytes, decode, draw_clip, read_encoded
from hcml.pipeline.prepare import prepare, probe_video
from hcml.pipeline.prepared import load_prepared
from hcml.pipeline.sources import SourceOptions
from tests.conftest import requires_cuda
from tests.videos import KINDS, decoded_indices, frame_index, packet_pts, write

FRAMES = 40


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("src")
    return root, {kind: write(kind, root / "videos" / f"{kind}{ext}", FRAMES) for kind, ext in KINDS.items()}


def lists_dataset(root: Path, paths: list[Path]) -> SourceOptions:
    """MMAction2-style lists (``path label``; a frame folder as ``folder num_frames label``) over ``paths``."""
    lines = [f"{p.relative_to(root)} {FRAMES} {i}" if p.is_dir() else f"{p.relative_to(root)} {i}"
             for i, p in enumerate(paths)]
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    (root / "val_list.txt").write_text(lines[0] + "\n")
    return SourceOptions(train_list=str(root / "train_list.txt"), val_list=str(root / "val_list.txt"))


def read_clips(rows: list[tuple[str, int, int]], spec: DataSpec, device: str = "cpu", gop: int = 0):
    """(label, frame numbers) of every clip the loader's decode graph returns for ``(path, label, start)`` rows;
    ``gop``: as the loader does for a dataset with a recorded GOP, only the packets from the keyframe before."""
    queue = list(rows)

    def source():
        path, _, start = queue[0] if queue else rows[-1]
        queue[:1] = []
        data = read_encoded(path)
        data, start = clip_bytes(data, path, start, spec.span, gop) if gop else (data, start)
        return [data], [np.array(start, np.int32)]

    p = _pipeline(lambda enc, st: decode(enc, st, spec, device), source, 2, 1, spec, 0 if device == "gpu" else None)
    out = []
    for path, label, _ in rows:
        video, = p.run()
        if device == "gpu":
            video = video.as_cpu()
        out.append((label, [frame_index(f) for f in np.array(video.at(0))]))
    return out


@pytest.mark.parametrize("codec", ["vp9", pytest.param("h264", marks=[requires_cuda, pytest.mark.gpu])])
def test_prepare_keeps_every_frame_of_every_source_kind(sources, tmp_path, codec):
    root, paths = sources
    order = list(paths)
    report = prepare("lists", root, tmp_path / "out", opts=lists_dataset(root, [paths[k] for k in order]),
                     reencode_to=codec, frames=8, stride=2, workers=2, progress=False)
    assert report["usable"] == {"train": len(order), "val": 1}, report["summary"]
    ds = load_prepared(tmp_path / "out")
    for s in ds.train:
        kind = order[s.label]
        pts = packet_pts(Path(s.path))
        assert all(b > a for a, b in zip(pts, pts[1:])), (kind, pts[:10])  # strictly increasing, file order
        assert decoded_indices(Path(s.path)) == list(range(FRAMES)), kind  # output frame n = source frame n
        assert s.num_frames == FRAMES, kind
    # the loader's decode graph, at the clip starts the loader draws: frame start + stride·k, exactly
    device = "gpu" if codec == "h264" else "cpu"
    spec = DataSpec(frames=8, stride=2, device=device)
    rows = [(s.path, s.label, draw_clip(3, 1, s.label, s.num_frames, spec).start) for s in ds.train]
    assert ds.gop == 16  # prepare's default, recorded: the loader cuts each clip at the keyframe before it
    for gop in (0, ds.gop):
        for (_, _, start), (label, frames) in zip(rows, read_clips(rows, spec, device, gop)):
            assert frames == [start + 2 * k for k in range(8)], (order[label], start, gop, frames)


@pytest.mark.parametrize("kind", ["webm", "vfr-webm"])
def test_sources_kept_as_they_are_read_frame_exact(sources, tmp_path, kind):
    """--reencode none: DALI's CPU decoder on the VP9 source itself, constant and variable frame rate."""
    path = sources[1][kind]
    assert probe_video(path).ok
    spec = DataSpec(frames=6, stride=3)
    rows = [(str(path), i, start) for i, start in enumerate((0, 7, FRAMES - spec.span))]
    for (_, _, start), (_, frames) in zip(rows, read_clips(rows, spec)):
        assert frames == [start + 3 * k for k in range(6)]


def test_short_video_is_edge_padded_not_shifted(sources, tmp_path):
    """A video shorter than the span: the clip starts at frame 0 and repeats the last frame."""
    path = sources[1]["webm"]
    spec = DataSpec(frames=8, stride=8)  # span 57 > 40 frames
    assert all(draw_clip(0, 0, i, FRAMES, spec).start == 0 for i in range(20))
    (_, frames), = read_clips([(str(path), 0, 0)], spec)
    assert frames == [0, 8, 16, 24, 32, 39, 39, 39]


def test_probe_rejects_timestamps_a_frame_indexed_reader_cannot_use(tmp_path):
    """Zero or repeated packet timestamps (what the old re-encode wrote) are refused, naming the fault."""
    import av
    from fractions import Fraction

    from tests.videos import index_frame

    path = tmp_path / "zero.webm"
    with av.open(str(path), "w") as out:
        st = out.add_stream("libvpx-vp9", rate=25)
        st.width, st.height, st.pix_fmt = 80, 48, "yuv420p"
        st.codec_context.time_base = Fraction(1, 25)
        for n in range(10):
            fr = av.VideoFrame.from_ndarray(index_frame(n), format="rgb24").reformat(format="yuv420p")
            fr.pts, fr.time_base = n, Fraction(1, 12800)  # the bug: pts rescaled from another time base → 0
            for pkt in st.encode(fr):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    pr = probe_video(path)
    assert not pr.ok
    assert pr.reason == "bad timestamps"
    assert "share a timestamp" in pr.detail
    assert probe_video(path, timestamps="any").ok  # as a source to re-encode it is fine (decode order is kept)
