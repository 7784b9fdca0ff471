"""``hcml predict`` on videos as users hold them: the same views and top-1 as ``hcml eval`` on prepared files,
PyAV's views equal to DALI's, H.264 with B-frames in presentation order on CPU, and every broken video one line
while the others go on."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, run_env
from tests import videos


def hcml(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hcml.launch.cli", *args], capture_output=True, text=True, env=run_env(),
                          timeout=timeout)


@pytest.fixture()
def trained(trained_checkpoint) -> Path:
    return trained_checkpoint


def test_predict_on_prepared_files_gives_evals_top1(trained, tiny_dataset, tmp_path):
    """The same checkpoint, the same 2 x 3 views: `predict` over the val split's files (a --list of them) names
    the class `eval` predicts for every video; the names come from the checkpoint."""
    from hcml.pipeline.prepared import load_prepared

    ds = load_prepared(tiny_dataset)
    ev = hcml("eval", "--checkpoint", str(trained), "--out", str(tmp_path / "eval"), "data.eval_clips=2",
              "data.eval_crops=3")
    assert ev.returncode == 0, ev.stderr[-2000:]
    preds = json.loads((tmp_path / "eval" / "eval.json").read_text())["predictions"]
    lst = tmp_path / "val_list.txt"
    lst.write_text("# the val split\n" + "".join(f"{s.path}\n" for s in ds.val))
    r = hcml("predict", "--checkpoint", str(trained), "--list", str(lst), "--views", "2x3", "--top-k", "3",
             "--out", str(tmp_path / "p.jsonl"))
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [rec["video"] for rec in recs] == [s.path for s in ds.val]
    assert [rec["top_k"][0]["label"] for rec in recs] == preds
    assert len(set(preds)) > 1, "the model predicts one class for every video: the comparison would be blind"
    for rec in recs:
        assert rec["ok"] and rec["views"] == "2x3" and rec["decoder"] == "dali-cpu"
        assert rec["top_k"][0]["class"] == ds.classes[rec["top_k"][0]["label"]]
        probs = [t["prob"] for t in rec["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5 and len(probs) == 3


def _views_by_dali(samples, spec):
    from hcml.pipeline.loader import EvalLoader

    rows = {}
    for clips, r in EvalLoader(samples, spec):
        rows.update(zip(r.tolist(), clips))
    return rows


@pytest.mark.parametrize("source", ["prepared", "landscape"])
def test_pyav_views_equal_dalis(tiny_dataset, tmp_path, source):
    """The PyAV path's views (decode, BT.601 colour conversion, crop windows, resampling, normalisation) against the
    DALI graph's on the same files, 3 clips x 3 crops, square synthetic clips and an 80 x 48 landscape video: at
    most 1 grey level apart (rounding), 0.1 on average. PyAV's own rgb24 conversion was 5 apart on average."""
    from hcml.pipeline.loader import DataSpec
    from hcml.pipeline.prepared import Sample, load_prepared
    from hcml.pipeline.rawvideo import decode_views

    if source == "prepared":
        samples = load_prepared(tiny_dataset).val[:3]
    else:
        path = videos.write("webm", tmp_path / "landscape.webm", frames=40)
        samples = [Sample(str(path), 0, 40)]
    spec = DataSpec(frames=8, stride=2, crop=32, eval_short_side=40, eval_clips=3, eval_crops=3, batch_size=2,
                    threads=1, device="cpu")
    dali = _views_by_dali(samples, spec)
    for i, s in enumerate(samples):
        views, decoded = decode_views(s.path, s.num_frames, spec)
        assert decoded >= min(s.num_frames, 8 * 2)
        for k in range(3):
            grey = (views[k] - dali[3 * i + k]).abs() * 0.225 * 255
            assert float(grey.max()) <= 1.01, (s.path, k, float(grey.max()))
            assert float(grey.mean()) <= 0.1, (s.path, k, float(grey.mean()))


def _left_crop_number(view_t: torch.Tensor) -> int:
    """The frame number of an index frame (tests/videos.py: bit b = stripe b of 8 px) from the left crop of an
    80 x 48 frame taken at its own scale (48 x 48: stripes 0..5, enough for frames < 64), un-normalised."""
    img = view_t.mean(0)  # (H, W), grey values 0..255
    row = img[img.shape[0] // 2]
    return sum(1 << b for b in range(6) if float(row[int((b + 0.5) * 8)]) > 127)


@pytest.mark.parametrize("kind,frames", [("mp4-bframes", 40), ("avi-mpeg4", 40), ("mp4-bframes", 7),
                                         ("jpeg-folder", 40), ("jpeg-folder", 7)])
def test_pyav_views_show_the_right_frames_in_presentation_order(tmp_path, kind, frames):
    """H.264 with B-frames (decode order != presentation order), MPEG-4 AVI, which DALI cannot decode on a CPU, and
    a Something-V1 folder of JPEG frames: every view's t-th frame is frame start + t x stride of the video; a video
    shorter than a clip repeats its last frame (edge padding, as DALI's pad_mode="edge")."""
    from hcml.pipeline.loader import DataSpec, eval_views
    from hcml.pipeline.rawvideo import decode_views

    path = videos.write(kind, tmp_path / f"v{videos.KINDS[kind]}", frames=frames)
    spec = DataSpec(frames=5, stride=3, crop=48, eval_short_side=48, eval_clips=3, eval_crops=3, batch_size=2,
                    threads=1, device="cpu", mean=[0.0] * 3, std=[1 / 255] * 3)
    views, decoded = decode_views(str(path), frames, spec)
    assert decoded == min(frames, max(s for s, _ in eval_views(frames, spec)) + spec.span)
    for k, (start, _) in enumerate(eval_views(frames, spec)):
        got = [_left_crop_number(views[k, 0, :, t]) for t in range(spec.frames)]
        assert got == [min(start + t * spec.stride, frames - 1) for t in range(spec.frames)], (k, start, got)


def test_a_frame_folder_decodes_only_the_frames_its_views_show(tmp_path):
    """Frame folders are read at random: a broken JPEG that no view shows costs nothing (no note, every view
    right); one that a view shows ends the video there and the rest is edge-padded, as for a cut video file."""
    from hcml.pipeline.loader import DataSpec, eval_views
    from hcml.pipeline.rawvideo import decode_views

    folder = videos.write("jpeg-folder", tmp_path / "12345", frames=40)
    spec = DataSpec(frames=4, stride=2, crop=48, eval_short_side=48, eval_clips=2, eval_crops=3, batch_size=2,
                    threads=1, device="cpu", mean=[0.0] * 3, std=[1 / 255] * 3)
    shown = sorted({s + t * spec.stride for s, _ in eval_views(40, spec) for t in range(spec.frames)})
    unshown = next(f for f in range(shown[0], shown[-1]) if f not in shown)
    (folder / f"{unshown + 1:05d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    views, decoded = decode_views(str(folder), 40, spec)
    assert decoded == shown[-1] + 1
    for k, (start, _) in enumerate(eval_views(40, spec)):
        assert [_left_crop_number(views[k, 0, :, t]) for t in range(spec.frames)] == \
            [start + t * spec.stride for t in range(spec.frames)]
    broken = shown[len(shown) // 2]  # a frame the second view shows
    (folder / f"{broken + 1:05d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    views, decoded = decode_views(str(folder), 40, spec)
    assert decoded == broken
    last_good = max(f for f in shown if f < broken)
    for k, (start, _) in enumerate(eval_views(40, spec)):
        want = [start + t * spec.stride for t in range(spec.frames)]
        assert [_left_crop_number(views[k, 0, :, t]) for t in range(spec.frames)] == \
            [f if f < broken else last_good for f in want]


def test_predict_raw_videos_reports_each_broken_one_and_goes_on(trained, tmp_path):
    """A folder as users hold it: H.264 MP4 with B-frames, WebM, MPEG-4 AVI, a clip shorter than one clip span,
    a file cut in half, one that is not a video, and a missing path. The good ones are labelled (PyAV for what DALI
    cannot decode here), each bad one is one line naming it and why, the exit code is 1; CSV and JSONL carry the
    same predictions; two processes give the same records as one."""
    raw = tmp_path / "raw"
    for kind, frames in (("mp4-bframes", 40), ("webm", 40), ("avi-mpeg4", 40)):
        videos.write(kind, raw / f"{kind}{videos.KINDS[kind]}", frames=frames)
    videos.write("mp4-bframes", raw / "short.mp4", frames=6)
    whole = (raw / "mp4-bframes.mp4").read_bytes()
    (raw / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    (raw / "notes.mp4").write_text("not a video\n" * 50)
    videos.write("jpeg-folder", raw / "ssv1" / "12345", frames=40)  # Something-V1: a folder of frames is a video
    videos.write("jpeg-folder", raw / "thumbs", frames=1)  # frames beside no video: a (1-frame) video too
    (raw / "poster.jpg").write_bytes((raw / "thumbs" / "00001.jpg").read_bytes())  # beside videos: no video
    missing, plain = tmp_path / "gone.webm", tmp_path / "plain"
    plain.mkdir()
    r = hcml("predict", "--checkpoint", str(trained), "--dir", str(raw), str(missing), str(plain), "--top-k", "2",
             "--out", str(tmp_path / "p.jsonl"))
    assert r.returncode == 1, r.stderr[-2000:]
    recs = {Path(rec["video"]).name: rec for rec in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert set(recs) == {"mp4-bframes.mp4", "webm.webm", "avi-mpeg4.avi", "short.mp4", "cut.mp4", "notes.mp4",
                         "12345", "thumbs", "gone.webm", "plain"}
    for name in ("mp4-bframes.mp4", "avi-mpeg4.avi", "short.mp4", "12345", "thumbs"):
        assert recs[name]["ok"] and recs[name]["decoder"] == "pyav", recs[name]
    assert recs["12345"]["codec"] == "jpeg-frames" and recs["12345"]["size"] == [80, 48]
    assert recs["webm.webm"]["decoder"] == "dali-cpu"
    assert "edge-padded" in recs["short.mp4"]["note"] and "edge-padded" in recs["thumbs"]["note"]
    assert recs["gone.webm"]["error"] == "missing"
    assert recs["plain"]["error"].startswith("a directory, not a folder of JPEG frames")
    for name in ("cut.mp4", "notes.mp4", "gone.webm", "plain"):
        assert not recs[name]["ok"]
        assert f"{name}: FAILED: " in r.stdout, r.stdout
    assert "6 of 10 videos labelled, 4 failed" in r.stdout
    for rec in recs.values():
        if rec["ok"]:
            assert len(rec["top_k"]) == 2 and rec["seconds"] > 0 and rec["frames"] in (1, 6, 40)
    c = hcml("predict", "--checkpoint", str(trained), "--dir", str(raw), str(missing), str(plain), "--top-k", "2",
             "--out", str(tmp_path / "p.csv"), "--nproc-per-node", "2")
    assert c.returncode == 1, c.stderr[-2000:]
    assert "Traceback" not in c.stderr and "ChildFailedError" not in c.stderr, c.stderr[-2000:]
    rows = {Path(row["video"]).name: row for row in csv.DictReader((tmp_path / "p.csv").open())}
    assert set(rows) == set(recs)
    for name, rec in recs.items():
        assert rows[name]["ok"] == str(rec["ok"])
        if rec["ok"]:
            assert rows[name]["top1"] == rec["top_k"][0]["class"]
            assert float(rows[name]["top1_prob"]) == pytest.approx(rec["top_k"][0]["prob"], abs=1e-4)


def test_gradcam_takes_videos_dali_cannot_decode_here(trained, tmp_path):
    """`hcml gradcam` on a CPU machine: an H.264 MP4 with B-frames and a JPEG frame folder (PyAV, as predict) beside
    a WebM (DALI), one PNG strip each; a file that is no video is one line naming it."""
    h264 = videos.write("mp4-bframes", tmp_path / "cam.mp4", frames=40)
    folder = videos.write("jpeg-folder", tmp_path / "frames" / "12345", frames=40)
    webm = videos.write("webm", tmp_path / "cam.webm", frames=40)
    r = hcml("gradcam", "--checkpoint", str(trained), "--videos", str(h264), str(folder), str(webm),
             "--out", str(tmp_path / "cams"))
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p.name for p in (tmp_path / "cams").glob("*.png"))
    assert len(pngs) == 3 and r.stdout.count("wrote ") == 3, (pngs, r.stdout)
    for p in (tmp_path / "cams").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n" * 50)
    r = hcml("gradcam", "--checkpoint", str(trained), "--videos", str(bad), "--out", str(tmp_path / "cams2"))
    assert r.returncode == 2 and "notes.mp4" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_predict_input_mistakes_are_one_line(trained, tmp_path):
    """Exit 2, one line naming the problem, nothing written: a checkpoint that is not one, malformed --views,
    a --list that does not exist, an --out of another kind, no videos at all."""
    video = videos.write("webm", tmp_path / "v.webm", frames=20)
    not_ckpt = tmp_path / "model.pt"
    not_ckpt.write_bytes(b"\0" * 100)
    for args, says in (
            (["--checkpoint", str(not_ckpt), str(video)], "corrupted or truncated"),
            (["--checkpoint", str(trained), str(video), "--views", "10by3"], "--views '10by3'"),
            (["--checkpoint", str(trained), str(video), "--views", "4x2"], "C = 1 or 3"),
            (["--checkpoint", str(trained), "--list", str(tmp_path / "nope.txt")], "no such file"),
            (["--checkpoint", str(trained), "--dir", str(tmp_path / "nodir")], "no such directory"),
            (["--checkpoint", str(trained), str(video), "--out", str(tmp_path / "p.txt")], ".jsonl or .csv"),
            (["--checkpoint", str(trained)], "no videos")):
        r = hcml("predict", *args)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "p.txt").exists()


def test_an_older_checkpoint_without_class_names(trained, tmp_path):
    """A checkpoint saved before class names travelled inside it, away from its dataset: predict says so and
    prints indices; --classes names them (and a file with the wrong count is refused in one line)."""
    ck = torch.load(trained, weights_only=True)
    del ck["classes"]
    ck["config"]["data"]["root"] = str(tmp_path / "moved")
    old = tmp_path / "old.pt"
    torch.save(ck, old)
    video = videos.write("webm", tmp_path / "v.webm", frames=20)
    r = hcml("predict", "--checkpoint", str(old), str(video), "--top-k", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "holds no class names" in r.stdout and ": class_" in r.stdout, r.stdout
    names = tmp_path / "names.txt"
    names.write_text("left\nright\nin\nout\n")
    r = hcml("predict", "--checkpoint", str(old), str(video), "--classes", str(names))
    assert r.returncode == 0 and "holds no class names" not in r.stdout
    assert any(n in r.stdout for n in ("left", "right", "in", "out"))
    names.write_text("left\nright\n")
    r = hcml("predict", "--checkpoint", str(old), str(video), "--classes", str(names))
    assert r.returncode == 2 and "2 class names, the checkpoint's classifier has 4 outputs" in r.stderr
