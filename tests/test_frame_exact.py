"""Frame exactness from the files users download to the frames the model sees: every source kind goes through
`prepare` (re-encoded) and through the reader graph the training loader runs; each returned frame must be the
frame number that was asked for. The frames carry their own number (tests/videos.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hcml.pipeline.loader import DataSpec, clip_start, video_reader, write_train_list
from hcml.pipeline.prepare import prepare, probe_video
from hcml.pipeline.prepared import Sample, load_prepared
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


def read_clips(file_list_rows: list[tuple[str, int, int, int]], tmp: Path, spec: DataSpec, device: str = "cpu"):
    """(label, frame numbers) of every clip the loader's reader returns for ``(path, label, start, end)`` rows."""
    from nvidia.dali import pipeline_def

    lst = tmp / "list.txt"
    lst.write_text("".join(f"{p} {lab} {s} {e}\n" for p, lab, s, e in file_list_rows))

    @pipeline_def
    def pipe():
        video, label = video_reader(lst, spec, device, 0, 1)
        return video, label

    p = pipe(batch_size=1, num_threads=1, device_id=0 if device == "gpu" else None, seed=0)
    p.build()
    out = []
    for _ in range(len(file_list_rows)):
        video, label = p.run()
        if device == "gpu":
            video = video.as_cpu()
        clip = np.array(video.at(0))
        out.append((int(np.array(label.at(0)).ravel()[0]), [frame_index(f) for f in clip]))
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
    # the loader's reader, on the ranges the loader writes: frame start + stride·k, exactly
    device = "gpu" if codec == "h264" else "cpu"
    spec = DataSpec(frames=8, stride=2, device=device)
    samples = [Sample(s.path, s.label, s.num_frames) for s in ds.train]
    write_train_list(tmp_path / "epoch.txt", samples, spec, seed=3, epoch=1)
    rows = [tuple(line.split()) for line in (tmp_path / "epoch.txt").read_text().splitlines()]
    got = read_clips([(p, int(lab), int(s), int(e)) for p, lab, s, e in rows], tmp_path, spec, device)
    for label, frames in got:
        start = clip_start(3, 1, label, FRAMES, spec.span)
        assert frames == [start + 2 * k for k in range(8)], (order[label], start, frames)


@pytest.mark.parametrize("kind", ["webm", "vfr-webm"])
def test_sources_kept_as_they_are_read_frame_exact(sources, tmp_path, kind):
    """--reencode none: DALI's CPU reader on the VP9 source itself, constant and variable frame rate."""
    path = sources[1][kind]
    assert probe_video(path).ok
    spec = DataSpec(frames=6, stride=3)
    rows = [(str(path), i, start, start + spec.span) for i, start in enumerate((0, 7, FRAMES - spec.span))]
    for (_, _, start, _), (_, frames) in zip(rows, read_clips(rows, tmp_path, spec)):
        assert frames == [start + 3 * k for k in range(6)]


def test_short_video_is_edge_padded_not_shifted(sources, tmp_path):
    """A video shorter than the span: the clip starts at frame 0 and repeats the last frame."""
    path = sources[1]["webm"]
    spec = DataSpec(frames=8, stride=8)  # span 57 > 40 frames
    write_train_list(tmp_path / "e.txt", [Sample(str(path), 0, FRAMES)], spec, seed=0, epoch=0)
    _, lab, s, e = (tmp_path / "e.txt").read_text().split()
    assert (int(s), int(e)) == (0, FRAMES)
    (_, frames), = read_clips([(str(path), 0, 0, FRAMES)], tmp_path, spec)
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
