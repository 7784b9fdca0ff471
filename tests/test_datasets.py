"""The public datasets in the layouts their downloaders leave, each as a tiny fixture in exactly that layout, through
`hcml prepare`; and the errors a wrong layout or an unusable dataset must give before any training starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hcml.errors import DatasetError
from hcml.pipeline.prepare import prepare
from hcml.pipeline.prepared import load_prepared
from hcml.pipeline.sources import SourceOptions, load_source
from tests.conftest import PY, run_env
from tests.helpers import freeze
from tests.videos import decoded_indices, write

K400_HEADER = "label,youtube_id,time_start,time_end,split\n"


def k400_cvdf(root: Path) -> Path:
    """As the CVDF downloader + extractor leave Kinetics-400: annotations/{train,val,test}.csv, flat train/ val/
    test/, and replacement/replacement_for_corrupted_k400/ holding fixed copies of broken clips."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    (ann / "train.csv").write_text(K400_HEADER + "abseiling,aaa,10,20,train\nbowling,bbb,0,10,train\n"
                                   "bowling,ccc,5,15,train\nabseiling,ddd,1,11,train\nbowling,eee,2,12,train\n")
    (ann / "val.csv").write_text(K400_HEADER + "abseiling,vvv,3,13,val\n")
    (ann / "test.csv").write_text(K400_HEADER + "abseiling,ttt,3,13,test\n")
    for stem in ("aaa_000010_000020", "bbb_000000_000010", "eee_000002_000012"):
        write("mp4-bframes", root / "train" / f"{stem}.mp4", 24)
    (root / "train/ccc_000005_000015.mp4").write_bytes(b"\x00" * 3000)  # corrupted in the tar
    write("mp4-bframes", root / "val/vvv_000003_000013.mp4", 24)
    write("mp4-bframes", root / "test/ttt_000003_000013.mp4", 24)
    fixes = root / "replacement/replacement_for_corrupted_k400"
    write("mp4-bframes", fixes / "ccc_000005_000015.mp4", 24)  # a fix for the corrupted clip
    write("mp4-bframes", fixes / "ddd_000001_000011.mp4", 24)  # and for one missing from train/
    return root


def test_k400_from_the_cvdf_downloader_uses_replacement_clips(tmp_path):
    root = k400_cvdf(tmp_path / "k400")
    report = prepare("k400", root, tmp_path / "out", reencode_to="vp9", frames=4, stride=2, workers=2,
                     progress=False)
    assert report["usable"] == {"train": 5, "val": 1}
    assert report["excluded"] == []
    assert report["replaced"] == 2
    assert "2 from published replacements" in (tmp_path / "out/report.txt").read_text()
    ds = load_prepared(tmp_path / "out")
    assert ds.classes == ["abseiling", "bowling"]
    assert [s.label for s in ds.train] == [0, 1, 1, 0, 1]
    for s in ds.train + ds.val:
        assert decoded_indices(Path(s.path)) == list(range(24))  # the B-frame MP4s, frame for frame
    assert "test" not in (tmp_path / "out/train.txt").read_text()


def test_k400_as_mmaction2_and_opendatalab_copies_with_validate_csv(tmp_path):
    """Per-class folders videos_train/ videos_val/ and the original release's validate.csv."""
    root = tmp_path / "k400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/train.csv").write_text(K400_HEADER + "abseiling,aaa,10,20,train\nbowling,bbb,0,10,train\n")
    (root / "annotations/validate.csv").write_text(K400_HEADER + "bowling,ccc,3,13,val\n")
    write("webm", root / "videos_train/abseiling/aaa_000010_000020.webm", 20)
    write("webm", root / "videos_train/bowling/bbb_000000_000010.webm", 20)
    write("webm", root / "videos_val/bowling/ccc_000003_000013.webm", 20)
    ds = load_source("k400", root)
    assert [Path(p).parent.name for p, _ in ds.train] == ["abseiling", "bowling"]
    assert ds.val[0][1] == 1
    assert ds.missing == []


def test_k400_with_no_clip_found_fails_before_any_work_naming_where_it_looked(tmp_path):
    root = tmp_path / "k400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/train.csv").write_text(K400_HEADER + "abseiling,aaa,10,20,train\n")
    (root / "annotations/val.csv").write_text(K400_HEADER + "abseiling,bbb,10,20,val\n")
    write("webm", root / "clips/aaa_000010_000020.webm", 20)  # not where Kinetics copies put clips
    with pytest.raises(DatasetError, match=r"none of the 2 clips.*train/, val/, validate/, videos_train/"):
        prepare("k400", root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_lists_as_pyslowfast_and_mmaction2_read_them(tmp_path):
    """``path label`` lists (MMAction2's kinetics400_train_list_videos.txt, PySlowFast's train.csv), relative to
    --root or absolute, with a class-name file."""
    root = tmp_path / "data"
    write("webm", root / "videos/a.webm", 20)
    write("webm", root / "videos/b.webm", 20)
    absolute = write("webm", tmp_path / "elsewhere/c.webm", 20)
    (root / "kinetics400_train_list_videos.txt").write_text(f"videos/a.webm 0\n{absolute} 1\n")
    (root / "kinetics400_val_list_videos.txt").write_text("videos/b.webm 1\n")
    (root / "label_map.txt").write_text("pushing left\npushing right\n")
    opts = SourceOptions(train_list=str(root / "kinetics400_train_list_videos.txt"),
                         val_list=str(root / "kinetics400_val_list_videos.txt"), classes=str(root / "label_map.txt"))
    report = prepare("lists", root, tmp_path / "out", opts=opts, reencode_to="vp9", frames=4, progress=False)
    assert report["usable"] == {"train": 2, "val": 1}
    ds = load_prepared(tmp_path / "out")
    assert ds.classes == ["pushing left", "pushing right"]
    assert ds.flip_pairs == [[0, 1]]
    assert all(Path(s.path).is_file() and Path(s.path).is_relative_to(tmp_path / "out") for s in ds.train)
    (root / "bad.txt").write_text("videos/a.webm zero\n")
    with pytest.raises(DatasetError, match=r"bad.txt:1: expected 'path label'"):
        load_source("lists", root, SourceOptions(train_list=str(root / "bad.txt"), val_list=str(root / "bad.txt")))


def ssv2_labels() -> tuple[dict, list, list]:
    labels = {"Pushing something from left to right": "0", "Pushing something from right to left": "1"}
    train = [{"id": "1", "label": "pushing a cup from left to right",
              "template": "Pushing [something] from left to right", "placeholders": ["a cup"]}]
    val = [{"id": "2", "label": "pushing a cup from right to left",
            "template": "Pushing [something] from right to left", "placeholders": ["a cup"]}]
    return labels, train, val


@pytest.mark.parametrize("where", ["root", "labels"])
def test_ssv2_under_the_20bn_file_names(tmp_path, where):
    """something-something-v2-{labels,train,validation}.json, as 20BN ships them and PySlowFast reads them."""
    labels, train, val = ssv2_labels()
    d = tmp_path if where == "root" else tmp_path / "labels"
    d.mkdir(exist_ok=True)
    for kind, obj in (("labels", labels), ("train", train), ("validation", val)):
        (d / f"something-something-v2-{kind}.json").write_text(json.dumps(obj))
    for i in ("1", "2"):
        write("webm", tmp_path / f"20bn-something-something-v2/{i}.webm", 20)
    ds = load_source("ssv2", tmp_path)
    assert [lab for _, lab in ds.train] == [0]
    assert [lab for _, lab in ds.val] == [1]
    assert ds.flip_pairs == [[0, 1]]


def test_ssv2_missing_labels_names_every_accepted_name(tmp_path):
    with pytest.raises(DatasetError, match=r"something-something-v2-labels.json.*labels/labels.json"):
        load_source("ssv2", tmp_path)


def test_relative_root_tilde_and_symlinked_split_folders(tmp_path, monkeypatch):
    """--root given relative, with ~, and with a split folder that is a symlink to another disk."""
    storage = tmp_path / "disk2/train"
    write("webm", storage / "aaa_000010_000020.webm", 20)
    write("webm", storage / "bbb_000000_000010.webm", 20)
    root = tmp_path / "home/k400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/train.csv").write_text(K400_HEADER + "abseiling,aaa,10,20,train\nbowling,bbb,0,10,train\n")
    (root / "annotations/val.csv").write_text(K400_HEADER + "bowling,ccc,3,13,val\n")
    (root / "train").symlink_to(storage)
    write("webm", root / "val/ccc_000003_000013.webm", 20)
    monkeypatch.chdir(tmp_path / "home")
    out = prepare("k400", "k400", "prepared", frames=4, progress=False)  # relative, kept as is
    ds = load_prepared(tmp_path / "home/prepared")
    assert out["usable"] == {"train": 2, "val": 1}
    assert all(Path(s.path).is_file() for s in ds.train)
    assert all(Path(line.split()[0]).is_absolute() for line in (tmp_path / "home/prepared/train.txt").read_text()
               .splitlines())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = prepare("k400", "~/k400", "~/prepared-vp9", reencode_to="vp9", frames=4, progress=False)
    assert out["usable"] == {"train": 2, "val": 1}
    assert (tmp_path / "home/prepared-vp9/videos/train/aaa_000010_000020.webm").is_file()  # mirrors the symlink


def test_never_upscales_unless_asked(tmp_path):
    """SSv1's frames are 100 px high: --short-side 320 keeps them at 100 unless --upscale."""
    import av

    root = tmp_path / "ssv1"
    root.mkdir()
    (root / "something-something-v1-labels.csv").write_text("Holding something\n")
    (root / "something-something-v1-train.csv").write_text("1;Holding something\n")
    (root / "something-something-v1-validation.csv").write_text("2;Holding something\n")
    for vid in ("1", "2"):
        write("jpeg-folder", root / "20bn-something-something-v1" / vid, 12)
    for upscale, short in ((False, 48), (True, 96)):
        out = tmp_path / f"out{upscale}"
        prepare("ssv1", root, out, reencode_to="vp9", short_side=96, upscale=upscale, frames=4, progress=False)
        with av.open(load_prepared(out).train[0].path) as c:
            assert c.streams.video[0].codec_context.height == short  # 80 x 48 source


def test_h264_kept_as_is_fails_cpu_training_preflight_naming_the_fix(tmp_path):
    from hcml.launch.components import check_runnable
    from hcml.launch.config import load_config

    root = tmp_path / "data"
    for i in range(3):
        write("mp4-bframes", root / f"v{i}.mp4", 20)
    (root / "train.txt").write_text("v0.mp4 0\nv1.mp4 0\n")
    (root / "val.txt").write_text("v2.mp4 0\n")
    opts = SourceOptions(train_list=str(root / "train.txt"), val_list=str(root / "val.txt"))
    report = prepare("lists", root, tmp_path / "out", opts=opts, frames=4, progress=False)
    assert "decodes only with DALI's GPU reader" in report["summary"]
    assert load_prepared(tmp_path / "out").codecs == {"h264"}
    cfg = load_config(None, [f"data.root={tmp_path / 'out'}", "data.device=cpu", "data.batch_size=1"])
    with pytest.raises(DatasetError, match=r"h264 videos cannot be decoded by DALI's CPU decoder.*--reencode vp9"):
        check_runnable(cfg)


def test_short_side_without_reencode_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="--short-side 48 needs --reencode"):
        prepare("ucf101", tmp_path, tmp_path / "out", short_side=48, progress=False)


def test_a_second_writer_into_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    """The same prepare started twice (two shells, a job array) would encode every video twice and race on the
    files; the second is refused in one line naming the first, and the folder is usable again once it is gone."""
    root = tmp_path / "data"
    write("webm", root / "v0.webm", 12)
    (root / "train.txt").write_text("v0.webm 0\n")
    (root / "val.txt").write_text("v0.webm 0\n")
    out = tmp_path / "out"
    holder = subprocess.Popen([PY, "-c", "import sys, time; from hcml.files import FolderLock; "
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(out)], env=run_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        opts = SourceOptions(train_list=str(root / "train.txt"), val_list=str(root / "val.txt"))
        with pytest.raises(DatasetError, match=rf"--out {out} is in use \(pid {holder.pid} on .+ since .+\); wait "
                           "for it to end or choose another folder"):
            prepare("lists", root, out, opts=opts, frames=4, progress=False)
        res = subprocess.run([PY, "-m", "hcml.launch.cli", "synth", "--out", str(out), "--per-class", "1"],
                             env=run_env(), capture_output=True, text=True)
        assert res.returncode == 2 and f"--out {out} is in use (pid {holder.pid} on" in res.stderr
    finally:
        holder.kill()
        holder.wait()
    report = prepare("lists", root, out, opts=opts, frames=4, progress=False)  # the lock went with its process
    assert report["usable"] == {"train": 1, "val": 1}
    assert (out / ".hcml-lock").read_text().startswith("hcml prepare: pid ")  # what a second one is told


def test_a_full_disk_during_prepare_stops_naming_the_disk_not_the_videos(tmp_path, tmpfs):
    """The output disk fills up halfway: one line naming the disk, exit 2, finished videos kept, no half file. (It
    used to exclude every later video as "undecodable": near the end of a Kinetics prepare, under --max-excluded,
    a silently smaller dataset.) With room made, the same command finishes without redoing a video."""
    root = tmp_path / "data"
    for i in range(10):
        write("webm", root / f"v{i}.webm", 200)
    (root / "train.txt").write_text("".join(f"v{i}.webm {i % 2}\n" for i in range(8)))
    (root / "val.txt").write_text("v8.webm 0\nv9.webm 1\n")
    disk = tmpfs("disk", "size=64k")  # ~3 of the 15 kB outputs fit
    cmd = [PY, "-m", "hcml.launch.cli", "prepare", "lists", "--root", str(root), "--train-list", str(root / "train.txt"),
           "--val-list", str(root / "val.txt"), "--reencode", "vp9", "--frames", "4", "--workers", "2", "--out",
           str(disk / "out")]
    res = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.splitlines()[-1] == (f"hcml prepare: error: cannot write {disk / 'out/videos'}: No space left "
                                           "on device; every finished video is kept: make room and run the same "
                                           "command to continue")
    done = {p: p.stat().st_mtime_ns for p in (disk / "out").rglob("v*.webm")}
    assert 1 <= len(done) < 10 and not list((disk / "out").rglob(".tmp-*"))
    assert not (disk / "out/train.txt").exists() and not (disk / "out/report.json").exists()
    subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
    assert subprocess.run(cmd, env=run_env(), capture_output=True).returncode == 0
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert len((disk / "out/train.txt").read_text().splitlines()) == 8


def test_a_full_disk_during_synth_is_one_line_too(tmpfs):
    disk = tmpfs("disk", "size=100k")
    res = subprocess.run([PY, "-m", "hcml.launch.cli", "synth", "--out", str(disk / "s"), "--per-class", "3"],
                         env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert re.fullmatch(rf"hcml synth: error: cannot write {re.escape(str(disk))}/s/\S+: No space left on device; "
                        r"every finished video is kept: make room and run the same command to continue",
                        res.stderr.splitlines()[-1]), res.stderr[-2000:]
    assert not list((disk / "s").rglob(".tmp-*"))


def test_a_cancelled_encode_stops_at_the_next_frame_and_leaves_no_file(tmp_path):
    """What a stopped prepare sets for the encodes in flight: the frame loop ends at once (an hour-long source is
    not finished first), nothing under the real name, no temp file."""
    import threading

    import numpy as np

    from hcml.pipeline.video import Cancelled, encode_video

    cancel, pulled = threading.Event(), []

    def frames():
        for i in range(1000):
            pulled.append(i)
            if i == 5:
                cancel.set()
            yield np.zeros((32, 32, 3), np.uint8)

    with pytest.raises(Cancelled):
        encode_video(frames(), tmp_path / "v.webm", "vp9", cancel=cancel)
    assert len(pulled) == 6 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_prepare_says_so_in_one_line_and_the_same_command_continues(tmp_path, sig):
    """Ctrl-C or a scheduler's SIGTERM halfway: exit 128 + signal, one line (no traceback), the videos not started
    are not encoded, no half-written file is left, and the same command finishes the job."""
    root = tmp_path / "data"
    for i in range(12):
        write("webm", root / f"v{i:02d}.webm", 30)
    (root / "train.txt").write_text("".join(f"v{i:02d}.webm {i % 2}\n" for i in range(10)))
    (root / "val.txt").write_text("v10.webm 0\nv11.webm 1\n")
    cmd = [PY, "-m", "hcml.launch.cli", "prepare", "lists", "--root", str(root), "--train-list", str(root / "train.txt"),
           "--val-list", str(root / "val.txt"), "--reencode", "vp9", "--frames", "4", "--workers", "1", "--out",
           str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list((tmp_path / "out").rglob("v*.webm"))) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)
    freeze(proc.pid)  # the count below is what the signal meets
    started = len(list((tmp_path / "out").rglob("v*.webm"))) + 1  # the finished ones and the one in progress
    assert started <= 10, started
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert err.splitlines()[-1] == (f"hcml prepare: stopped by signal {int(sig)}; the same command continues, "
                                    "keeping every finished video") and "Traceback" not in err, err[-2000:]
    assert len(list((tmp_path / "out").rglob("v*.webm"))) <= started  # the rest was cancelled, not encoded
    assert not list((tmp_path / "out").rglob(".tmp-*")) and not (tmp_path / "out/train.txt").exists()
    assert subprocess.run(cmd, env=run_env(), capture_output=True).returncode == 0
    assert len((tmp_path / "out/train.txt").read_text().splitlines()) == 10


def test_killed_prepare_continues_and_equals_an_uninterrupted_run(tmp_path):
    """kill -9 halfway through re-encoding; the rerun keeps every finished video and writes the same lists."""
    root = tmp_path / "data"
    lines = []
    for i in range(10):
        write("webm", root / f"v{i:02d}.webm", 30)
        lines.append(f"v{i:02d}.webm {i % 2}")
    (root / "train.txt").write_text("\n".join(lines[:8]) + "\n")
    (root / "val.txt").write_text("\n".join(lines[8:]) + "\n")
    args = ["prepare", "lists", "--root", str(root), "--train-list", str(root / "train.txt"), "--val-list",
            str(root / "val.txt"), "--reencode", "vp9", "--frames", "4", "--workers", "1"]
    cmd = [PY, "-m", "hcml.launch.cli", *args]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "a")], env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:  # kill once 3 videos are done and the next one is half-written
        assert time.time() < deadline and proc.poll() is None, "never saw 3 videos done and a 4th half-written"
        if len(list((tmp_path / "a").rglob("v*.webm"))) >= 3 and list((tmp_path / "a").rglob(".tmp-*")):
            freeze(proc.pid)  # every thread stopped: the half-file seen now is still there when it dies
            if list((tmp_path / "a").rglob(".tmp-*")):
                break
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("v*.webm")}
    assert 3 <= len(done) < 10
    assert len(list((tmp_path / "a").rglob(".tmp-*"))) == 1  # the half-written video of the killed run
    assert not (tmp_path / "a/train.txt").exists()
    assert subprocess.run([*cmd, "--out", str(tmp_path / "a")], env=run_env(), capture_output=True).returncode == 0
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished videos were not redone
    assert not list((tmp_path / "a").rglob(".tmp-*"))  # the rerun removed the killed run's half-file
    assert subprocess.run([*cmd, "--out", str(tmp_path / "b")], env=run_env(), capture_output=True).returncode == 0
    for name in ("train.txt", "val.txt", "classes.txt"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for p in (tmp_path / "b").rglob("v*.webm"):
        assert decoded_indices(p) == decoded_indices(tmp_path / "a" / p.relative_to(tmp_path / "b"))


def test_a_class_list_from_windows_or_with_blanks_names_the_same_classes(tmp_path):
    """classes.txt written with CRLF, trailing blanks and an empty last line gives the names a clean list gives, to
    training (load_prepared) and to predict's --classes alike; a list that is not UTF-8 is refused naming the file."""
    from hcml.launch.components import read_classes

    root = tmp_path / "ds"
    root.mkdir()
    (root / "classes.txt").write_bytes(b"air drumming \r\n  bowling\r\n\r\n")
    (root / "train.txt").write_text("a.webm 1\n")
    (root / "val.txt").write_text("b.webm 0\n")
    assert load_prepared(root).classes == ["air drumming", "bowling"]
    assert read_classes(root / "classes.txt", 2, "--classes") == ["air drumming", "bowling"]
    with pytest.raises(DatasetError, match="--classes .*classes.txt: 2 class names, .* has 3 outputs"):
        read_classes(root / "classes.txt", 3, "--classes")
    (root / "classes.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"class list .*ds/classes.txt: not UTF-8 text \(byte 3"):
        load_prepared(root)
