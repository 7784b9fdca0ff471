"""Prometheus: a real server (Debian 'prometheus') scrapes a short CPU training run on loopback; the series are
read back through Prometheus' HTTP query API."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import PY, run_env
from tests.helpers import SMALL

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, q: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_exporter_port_in_use_is_reported_or_skipped():
    from hcml.errors import ConfigError
    from hcml.launch.metrics import PrometheusExporter

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics.port {taken} .* already in use"):
            PrometheusExporter(taken, 0, next_free=False)
        msgs = []
        exp = PrometheusExporter(taken, 0, next_free=True, log=msgs.append)
        try:
            assert exp.port != taken
            assert f"serving Prometheus metrics on {exp.port}" in msgs[0]
        finally:
            exp.close()


def test_skipped_videos_and_the_time_since_the_last_step_are_exported():
    """hcml_samples_skipped_total counts what the train loop reports; hcml_seconds_since_step shows a stall before
    the watchdog ends the job (the watchdog's tick sets it)."""
    from hcml.launch.metrics import PrometheusExporter

    exp = PrometheusExporter(free_port(), 3)
    try:
        exp.observe_skipped(2)
        exp.idle(42.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'hcml_samples_skipped_total{rank="3"} 2.0' in text
        assert 'hcml_seconds_since_step{rank="3"} 42.5' in text
    finally:
        exp.close()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus server not installed (make test installs Debian's "
                    "'prometheus' when it can; see scripts/ensure_prometheus.sh)")
def test_prometheus_scrapes_a_training_run(tiny_dataset, tmp_path):
    exporter_port, prom_port = free_port(), free_port()
    (tmp_path / "prom.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hcml\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prom.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{prom_port}"
    train = None
    try:
        train = subprocess.Popen([PY, "-m", "hcml.launch.cli", "train", "--config", "demo", "--data", str(tiny_dataset),
                                  "--run-dir", str(tmp_path / "run"), *SMALL, "optim.epochs=40",
                                  "checkpoint.every_steps=2", f"metrics.port={exporter_port}", "metrics.next_free_port=false"],
                                 env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        got = []
        while time.time() < deadline and train.poll() is None:
            try:
                got = query(base, "hcml_step")
            except OSError:
                got = []
            if got and float(got[0]["value"][1]) >= 5:
                break
            time.sleep(0.5)
        if not got:
            train.terminate()
            out, _ = train.communicate(timeout=120)
            raise AssertionError(f"Prometheus never saw hcml_step; training output:\n{out[-2000:]}")
        time.sleep(1.5)  # one more scrape; queried while the run is alive (a gone target's series go stale)

        def value(q: str) -> float:
            res = query(base, q)
            assert res, f"no series for {q}"
            return float(res[0]["value"][1])

        assert value('hcml_samples_seen_total{rank="0"}') >= 5 * 2
        assert value("hcml_clips_per_second") > 0
        # one expression = one instant, so both gauges come from the same scrape
        assert value("hcml_frames_per_second / hcml_clips_per_second") == pytest.approx(8, rel=1e-6)
        assert value("hcml_step_seconds_count") >= 5
        assert 0 <= value("hcml_data_wait_ratio") <= 1
        assert 0 < value("hcml_learning_rate") < 1
        assert 0 < value('hcml_loss{term="total"}') < 100
        assert {r["metric"]["term"] for r in query(base, "hcml_loss")} >= {"total", "ce", "nce_low", "nce_mid",
                                                                             "nce_high"}
        assert value("hcml_checkpoint_save_seconds_count") >= 1  # checkpoint.every_steps=2
        assert train.poll() is None, "training ended before the checks: the series may have gone stale"
    finally:
        if train is not None and train.poll() is None:
            train.terminate()
            train.communicate(timeout=120)
        prom.terminate()
        prom.wait(timeout=30)


def test_a_record_cut_short_does_not_stop_the_resume_and_a_full_disk_is_one_line(tmp_path, tmpfs):
    """kill -9 (or a full disk) in the middle of a metrics write leaves half a line: the resume's trim leaves it out
    (with a warning) instead of failing on it, and later records read back. A bad line before the last one is an
    error naming file and line. A full disk at a write is one HCMLError naming the file."""
    from hcml.errors import HCMLError
    from hcml.launch.metrics import JsonlLog, read_jsonl

    log = JsonlLog(tmp_path / "metrics.jsonl")
    log.reset()
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=1.0)
    with open(log.path, "a") as f:
        f.write('{"time": 1.5, "kind": "tra')  # the torn write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: a record cut short"):
        assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3]
    with pytest.warns(UserWarning):
        log.keep_until(2)
    log.write(kind="train", step=3, loss=0.5)
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3]
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(HCMLError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl(log.path)

    disk = tmpfs("disk", "size=64k")
    full = JsonlLog(disk / "metrics.jsonl")
    full.reset()
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()
    with pytest.raises(HCMLError, match=rf"cannot write {re.escape(str(full.path))}: No space left on device; the "
                                        r"checkpoints so far are intact"):
        for _ in range(100):  # the page cache may take a few records before the disk says no
            full.write(kind="train", step=1, loss=1.0)


def test_trimming_the_metrics_log_on_resume_replaces_it_atomically(tmp_path):
    """On resume metrics.jsonl keeps the records up to the restored step. The trim writes a new file and renames it
    into place: a process killed during the rewrite (a second preemption) leaves the old log whole, never a
    truncated one. A handle opened before the trim still reads every old record (the old file), which an in-place
    rewrite would have truncated."""
    from hcml.launch.metrics import JsonlLog, read_jsonl

    log = JsonlLog(tmp_path / "metrics.jsonl")
    log.reset()
    for step in range(1, 6):
        log.write(kind="train", step=step, loss=1.0 / step)
    with open(log.path) as before:
        log.keep_until(3)
        assert [json.loads(line)["step"] for line in before] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind


def _events(folder) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per scalar tag, as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: points for tag, points in series.items() if points}  # a purged tag keeps its name, no point


def test_tensorboard_mirrors_metrics_jsonl_and_a_resume_continues_without_duplicate_steps(tmp_path):
    """Every numeric field of every record becomes the scalar <kind>/<field> at its step; a resume from step 3
    (keep_until, as train.restore does) purges the later events, so each curve has every step once and equals the
    log that survives."""
    import pytest

    from hcml.launch.metrics import JsonlLog, read_jsonl

    log = JsonlLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    log.reset()
    for step in range(1, 7):
        log.write(kind="train", step=step, epoch=0, loss=10.0 - step, lr=0.1, samples_skipped=0)
    log.write(kind="eval", step=6, epoch=0, top1=12.5, top5=50.0, split="val")
    log.close()
    # the job is preempted after its step-3 checkpoint: the resume runs steps 4-6 again, with other values
    log = JsonlLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    log.keep_until(3)
    for step in range(4, 7):
        log.write(kind="train", step=step, epoch=0, loss=100.0 + step, lr=0.05, samples_skipped=1)
    log.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    ev = _events(tmp_path / "tb")
    assert set(ev) == {"train/epoch", "train/loss", "train/lr", "train/samples_skipped"}  # the eval after step 3 is gone
    for tag, points in ev.items():
        kind, field = tag.split("/")
        want = [(r["step"], float(r[field])) for r in records if r["kind"] == kind]
        assert [s for s, _ in points] == list(range(1, 7)), tag  # every step once
        assert points == [(s, pytest.approx(v)) for s, v in want], tag
    assert ev["train/loss"][3][1] == pytest.approx(104.0)
    log = JsonlLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    log.reset()  # a fresh run into the folder starts empty curves, as it starts an empty log
    assert not list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_gpu_memory_fields_of_the_metrics_log(monkeypatch):
    """On CUDA each train record carries allocated, reserved and peak memory in GiB (the allocator's own counters,
    here stand-ins, as no GPU is on this machine); on a CPU none of the three fields is written."""
    import torch

    from hcml.launch.metrics import gpu_memory

    assert gpu_memory(torch.device("cpu")) == {}
    asked = []
    for name, value in (("memory_allocated", 3 * 2 ** 30), ("memory_reserved", 4 * 2 ** 30),
                        ("max_memory_allocated", 5.5 * 2 ** 30)):
        monkeypatch.setattr(torch.cuda, name, lambda device, v=value, n=name: asked.append((n, device)) or v)
    dev = torch.device("cuda", 1)
    assert gpu_memory(dev) == {"gpu_mem_gib": 3.0, "gpu_mem_reserved_gib": 4.0, "gpu_mem_peak_gib": 5.5}
    assert {d for _, d in asked} == {dev}  # this rank's device, not the current default
