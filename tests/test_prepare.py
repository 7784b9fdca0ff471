"""Dataset adapters on tiny fake trees in each dataset's exact distribution format, and `hcml prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imsave

from hcml.errors import DatasetError
from hcml.pipeline.prepared import load_prepared
from hcml.pipeline.sources import SourceOptions, left_right_pairs, load_source
from hcml.pipeline.prepare import probe_video
from hcml.pipeline.synth import encode, render_clip


def clip(path: Path, label: int = 0, frames: int = 20, codec: str = "vp9") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encode(render_clip(label, np.random.default_rng(label), frames, 48), path, codec)
    return path


def avi_mpeg4(path: Path, frames: int = 20) -> Path:
    """UCF-101's real format: MPEG-4 Part 2 in AVI (not decoded by DALI's CPU decoder; not taken on NVDEC here either)."""
    from hcml.pipeline.video import encode_video

    encode_video(render_clip(0, np.random.default_rng(0), frames, 48), path, "mpeg4", 25, 12)
    return path


def test_k400_adapter(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,aaa,10,20,train,0\nbowling,bbb,0,10,train,0\nbowling,gone,5,15,train,0\n")
    (tmp_path / "annotations/validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\nabseiling,ccc,3,13,val,0\n")
    clip(tmp_path / "train/abseiling/aaa_000010_000020.mp4", codec="h264")
    clip(tmp_path / "train/bowling/bbb_000000_000010.mp4", codec="h264")
    clip(tmp_path / "val/abseiling/ccc_000003_000013.mp4", codec="h264")
    ds = load_source("k400", tmp_path)
    assert ds.classes == ["abseiling", "bowling"]
    assert [(Path(p).name, lab) for p, lab in ds.train] == [("aaa_000010_000020.mp4", 0), ("bbb_000000_000010.mp4", 1)]
    assert [lab for _, lab in ds.val] == [0]
    assert ds.missing == [("train", "gone_000005_000015")]


def test_ssv2_adapter_and_flip_pairs(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/labels.json").write_text(json.dumps({
        "Pushing something from left to right": "0", "Pushing something from right to left": "1",
        "Holding something": "2"}))
    (tmp_path / "labels/train.json").write_text(json.dumps([
        {"id": "1", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right",
         "placeholders": ["a cup"]},
        {"id": "2", "label": "holding a pen", "template": "Holding [something]", "placeholders": ["a pen"]}]))
    (tmp_path / "labels/validation.json").write_text(json.dumps([
        {"id": "3", "label": "pushing x from right to left", "template": "Pushing [something] from right to left",
         "placeholders": ["x"]}]))
    for i in (1, 2, 3):
        clip(tmp_path / f"20bn-something-something-v2/{i}.webm")
    ds = load_source("ssv2", tmp_path)
    assert [lab for _, lab in ds.train] == [0, 2]
    assert [lab for _, lab in ds.val] == [1]
    assert ds.flip_pairs == [[0, 1]]


def test_ssv1_adapter_reads_frame_folders(tmp_path):
    (tmp_path / "something-something-v1-labels.csv").write_text("Holding something\nTurning the camera left\n")
    (tmp_path / "something-something-v1-train.csv").write_text("100;Holding something\n101;Turning the camera left\n")
    (tmp_path / "something-something-v1-validation.csv").write_text("102;Holding something\n")
    for vid in ("100", "101", "102"):
        d = tmp_path / "20bn-something-something-v1" / vid
        d.mkdir(parents=True)
        for t, frame in enumerate(render_clip(0, np.random.default_rng(int(vid)), 20, 48), 1):
            imsave(d / f"{t:05d}.jpg", frame)
    ds = load_source("ssv1", tmp_path)
    assert [lab for _, lab in ds.train] == [0, 1]
    assert Path(ds.train[0][0]).is_dir()
    (tmp_path / "something-something-v1-validation.csv").write_text("102;Unknown class\n")
    with pytest.raises(DatasetError, match=r"validation\.csv:1: label 'Unknown class'"):
        load_source("ssv1", tmp_path)


def test_a_frame_folder_probes_like_a_video(tmp_path):
    """Its frame count, size and Something-V1's 12 fps; a first frame that is no JPEG fails the probe as an
    undecodable video does, naming the frame; a folder with no frames is 'no frames'."""
    d = tmp_path / "100"
    d.mkdir()
    for t in range(1, 6):
        imsave(d / f"{t:05d}.jpg", np.full((36, 64, 3), 40 * t, np.uint8))
    (d / "notes.txt").write_text("not a frame")
    p = probe_video(d, min_frames=5)
    assert (p.ok, p.codec, p.frames, p.fps, p.width, p.height) == (True, "jpeg-frames", 5, 12.0, 64, 36)
    assert probe_video(d, min_frames=6).reason == "too few frames"
    (d / "00001.jpg").write_bytes(b"\xff\xd8 cut short")
    p = probe_video(d)
    assert not p.ok and p.reason == "undecodable" and p.detail.startswith("00001.jpg: "), p
    empty = tmp_path / "101"
    empty.mkdir()
    assert probe_video(empty).reason == "no frames"


def make_ucf(root: Path) -> Path:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g08_c01.avi 2\n"
        "Archery/v_Archery_g09_c01.avi 2\nArchery/v_Archery_g10_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g01_c01.avi\n")
    for name in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "Archery/v_Archery_g08_c01",
                 "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "Archery/v_Archery_g01_c01"):
        avi_mpeg4(root / "UCF-101" / f"{name}.avi")
    # a truncated file and a zero-length one: reported, never trained on
    good = (root / "UCF-101/Archery/v_Archery_g08_c01.avi").read_bytes()
    (root / "UCF-101/Archery/v_Archery_g09_c01.avi").write_bytes(good[: len(good) // 3])
    (root / "UCF-101/Archery/v_Archery_g10_c01.avi").write_bytes(b"")
    return root


def test_ucf101_adapter(tmp_path):
    ds = load_source("ucf101", make_ucf(tmp_path))
    assert ds.classes == ["ApplyEyeMakeup", "Archery"]
    assert [lab for _, lab in ds.train] == [0, 1, 1, 1]
    assert [lab for _, lab in ds.val] == [0, 1]
    with pytest.raises(DatasetError, match="splits 1, 2, 3"):
        load_source("ucf101", tmp_path, SourceOptions(split=4))


def test_probe_reports_truncated_and_zero_length(tmp_path):
    good = clip(tmp_path / "good.webm")
    assert probe_video(good).ok
    assert probe_video(good).frames == 20
    assert probe_video(good).codec == "vp9"
    bad = tmp_path / "bad.webm"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    pr = probe_video(bad)
    assert not pr.ok
    assert pr.reason in ("truncated", "undecodable")
    (tmp_path / "empty.webm").write_bytes(b"")
    assert probe_video(tmp_path / "empty.webm").reason == "zero-length"
    assert probe_video(tmp_path / "nope.webm").reason == "missing"
    assert probe_video(good, min_frames=50).reason == "too few frames"


def test_prepare_ucf101_reencodes_reports_bad_files_and_trains(tmp_path):
    from hcml.pipeline.loader import DataSpec, TrainLoader
    from hcml.pipeline.prepare import prepare

    root = make_ucf(tmp_path / "src")
    out = tmp_path / "prepared"
    report = prepare("ucf101", root, out, workers=2, reencode_to="vp9", short_side=40, frames=4, stride=2,
                     max_excluded=0.5, progress=False)
    reasons = {Path(e["path"]).name: e["reason"] for e in report["excluded"]}
    assert reasons["v_Archery_g10_c01.avi"] == "zero-length"
    assert reasons["v_Archery_g09_c01.avi"] in ("truncated", "undecodable")
    assert report["usable"] == {"train": 2, "val": 2}
    ds = load_prepared(out)
    assert all(s.path.endswith(".webm") and "g09" not in s.path and "g10" not in s.path for s in ds.train + ds.val)
    assert "zero-length: 1" in (out / "report.txt").read_text()
    # the re-encoded files are what DALI's CPU decoder takes (MPEG-4 AVI is not)
    spec = DataSpec(frames=4, stride=2, crop=32, short_side=[40, 40], batch_size=2, threads=1, device="cpu")
    tl = TrainLoader(ds.train, spec)
    x, y = next(iter(tl.epoch(0)))
    assert x.shape == (2, 3, 4, 32, 32)
    # resumable: a second run re-encodes nothing and gives the same lists
    before = {p: p.stat().st_mtime_ns for p in (out / "videos").rglob("*.webm")}
    lists = (out / "train.txt").read_text()
    prepare("ucf101", root, out, workers=2, reencode_to="vp9", short_side=40, frames=4, stride=2, max_excluded=0.5,
            progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "videos").rglob("*.webm")}
    assert (out / "train.txt").read_text() == lists
    # other settings into the same folder are refused (two datasets never mix); --overwrite replaces
    with pytest.raises(DatasetError, match="other settings.*--overwrite"):
        prepare("ucf101", root, out, workers=2, reencode_to="vp9", short_side=32, frames=4, max_excluded=0.5,
                progress=False)
    prepare("ucf101", root, out, workers=2, reencode_to="vp9", short_side=32, frames=4, overwrite=True,
            max_excluded=0.5, progress=False)
    assert before.keys() == set((out / "videos").rglob("*.webm"))


def test_prepare_without_reencode_rejects_mpeg4_and_fails_naming_the_fix(tmp_path):
    """UCF-101 kept as MPEG-4 AVI: nothing usable is an error (exit 2 from the CLI) naming the cause, the fix and
    the report, not a success with empty lists."""
    from hcml.pipeline.prepare import prepare

    with pytest.raises(DatasetError, match=r"6 of 6 videos excluded.*4 unsupported codec.*--reencode h264\|vp9.*"
                                           r"report.txt"):
        prepare("ucf101", make_ucf(tmp_path / "src"), tmp_path / "out", reencode_to="none", frames=4, progress=False)
    report = json.loads((tmp_path / "out/report.json").read_text())
    reasons = {Path(e["path"]).name: e["reason"] for e in report["excluded"]}
    assert [n for n, r in reasons.items() if r == "unsupported codec"].__len__() == 4  # the 4 intact MPEG-4 AVIs
    assert reasons["v_Archery_g10_c01.avi"] == "zero-length"
    assert reasons["v_Archery_g09_c01.avi"] in ("truncated", "undecodable")
    assert not (tmp_path / "out/train.txt").exists()


def keyframes(path: Path) -> tuple[list[int], list[int]]:
    """(frames whose packet is a keyframe: where a decoder can start, intra-coded frames: scene cuts included)."""
    import av

    with av.open(str(path)) as c:
        packets = [p.is_keyframe for p in c.demux(video=0) if p.size]
    with av.open(str(path)) as c:
        intra = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame or int(f.pict_type) == 1]  # AV_PICTURE_TYPE_I
    return [i for i, k in enumerate(packets) if k], intra


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9"])
def test_prepare_writes_a_fixed_gop_without_scene_cuts_and_records_it(tmp_path, codec):
    """--gop 8: keyframes at frames 0, 8, 16, ... exactly, even across a hard scene cut at frame 13 (an encoder
    left alone puts a keyframe there); dataset.yaml records the GOP and the coded sizes; two sources of one aspect
    but different sizes come out at one coded size."""
    import yaml

    from hcml.pipeline.prepare import prepare
    from hcml.pipeline.video import encode_video

    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    lines = []
    for i, (w, h) in enumerate([(96, 64), (144, 96)]):
        a, b = ((rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2))
        frames = [a] * 13 + [b] * 27  # a hard cut at frame 13
        encode_video(frames, root / f"v{i}.mp4", "h264", 25, gop=250,
                     options={"x264-params": "scenecut=40", "keyint_min": "1"})  # as x264 is by default
        lines.append(f"v{i}.mp4 {i}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text(lines[0] + "\n")
    assert 13 in keyframes(root / "v0.mp4")[1]  # the source has its scene-cut intra frame
    opts = SourceOptions(train_list=str(root / "train.txt"), val_list=str(root / "val.txt"))
    prepare("lists", root, tmp_path / "out", opts=opts, reencode_to=codec, short_side=48, gop=8, frames=4,
            workers=2, progress=False)
    ds = load_prepared(tmp_path / "out")
    for s in ds.train:
        assert keyframes(Path(s.path)) == ([0, 8, 16, 24, 32],) * 2, s.path
        assert s.num_frames == 40
    meta = yaml.safe_load((tmp_path / "out/dataset.yaml").read_text())
    assert meta["gop"] == 8 and ds.gop == 8
    assert meta["coded_sizes"] == {"72x48": 3}  # 2 train + 1 val video, one size
    with pytest.raises(DatasetError, match="--gop 0"):
        prepare("lists", root, tmp_path / "out2", opts=opts, reencode_to=codec, gop=0, progress=False)


def test_left_right_pairs():
    assert left_right_pairs(["Moving x left", "Moving x right", "Turning the camera left", "Other"]) == [[0, 1]]
