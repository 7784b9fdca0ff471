"""Run telemetry: Prometheus exporter (one endpoint per rank), JSON-lines log and end-of-run PNG plots."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import torch

from hcml.errors import ConfigError

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


class PrometheusExporter:
    """Serves ``hcml_*`` metrics with a ``rank`` label on ``port`` (next free port if taken and allowed)."""

    def __init__(self, port: int, rank: int, next_free: bool = True, log=print):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        chosen = port
        while not _port_free(chosen):
            if not next_free:
                raise ConfigError(f"metrics.port {chosen} (rank {rank}) is already in use; pick another "
                                  f"metrics.port or set metrics.next_free_port=true")
            chosen += 1
            if chosen > port + 100:
                raise ConfigError(f"metrics.port: no free port in [{port}, {port + 100}] for the Prometheus exporter")
        if chosen != port:
            log(f"[metrics] rank {rank}: port {port} in use, serving Prometheus metrics on {chosen}")
        self.port = chosen
        r = self.registry = CollectorRegistry()
        lab = ["rank"]
        self.clips = Gauge("hcml_clips_per_second", "training clips/s of this rank", lab, registry=r)
        self.frames = Gauge("hcml_frames_per_second", "decoded frames/s consumed by this rank", lab, registry=r)
        self.global_clips = Gauge("hcml_global_clips_per_second", "clips/s over all ranks (estimate)", lab, registry=r)
        self.global_frames = Gauge("hcml_global_frames_per_second", "frames/s over all ranks (estimate)", lab,
                                   registry=r)
        self.step_time = Histogram("hcml_step_seconds", "optimizer step wall time", lab, buckets=STEP_BUCKETS,
                                   registry=r)
        self.data_wait = Histogram("hcml_data_wait_seconds", "time blocked on the input pipeline per step", lab,
                                   buckets=WAIT_BUCKETS, registry=r)
        self.wait_frac = Gauge("hcml_data_wait_ratio", "fraction of step time spent waiting for data", lab,
                               registry=r)
        self.loss = Gauge("hcml_loss", "loss terms (total, ce, nce_low, nce_mid, nce_high)", lab + ["term"],
                          registry=r)
        self.lr = Gauge("hcml_learning_rate", "learning rate", lab, registry=r)
        self.epoch = Gauge("hcml_epoch", "current epoch", lab, registry=r)
        self.step = Gauge("hcml_step", "optimizer steps done", lab, registry=r)
        self.mem_alloc = Gauge("hcml_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", lab, registry=r)
        self.mem_reserved = Gauge("hcml_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", lab, registry=r)
        self.samples = Counter("hcml_samples_seen", "training clips consumed by this rank", lab, registry=r)
        self.skipped = Counter("hcml_samples_skipped", "training videos DALI could not read (dropped from their "
                               "epoch; counted by rank 0)", lab, registry=r)
        self.ckpt_time = Histogram("hcml_checkpoint_save_seconds", "checkpoint save duration", lab,
                                   buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60), registry=r)
        self.since_step = Gauge("hcml_seconds_since_step", "seconds since this rank's last optimizer step (a stall "
                                "shows here before train.stall_timeout_s ends the job)", lab, registry=r)
        self.rank = str(rank)
        self._server = start_http_server(chosen, registry=r)

    def observe_step(self, *, step: int, epoch: int, step_s: float, wait_s: float, clips: int, frames_per_clip: int,
                     world: int, lr: float, losses: dict[str, float]) -> None:
        rk = self.rank
        rate = clips / max(step_s, 1e-9)
        self.clips.labels(rk).set(rate)
        self.frames.labels(rk).set(rate * frames_per_clip)
        self.global_clips.labels(rk).set(rate * world)
        self.global_frames.labels(rk).set(rate * frames_per_clip * world)
        self.step_time.labels(rk).observe(step_s)
        self.data_wait.labels(rk).observe(wait_s)
        self.wait_frac.labels(rk).set(wait_s / max(step_s, 1e-9))
        for k, v in losses.items():
            self.loss.labels(rk, k).set(v)
        self.lr.labels(rk).set(lr)
        self.epoch.labels(rk).set(epoch)
        self.step.labels(rk).set(step)
        self.samples.labels(rk).inc(clips)
        if torch.cuda.is_available():
            self.mem_alloc.labels(rk).set(torch.cuda.memory_allocated())
            self.mem_reserved.labels(rk).set(torch.cuda.memory_reserved())

    def observe_checkpoint(self, seconds: float) -> None:
        self.ckpt_time.labels(self.rank).observe(seconds)

    def idle(self, seconds: float) -> None:
        self.since_step.labels(self.rank).set(seconds)

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else None
        if server is not None:
            server.shutdown()


class JsonlLog:
    """``metrics.jsonl``: one JSON record per logged step/eval. Only rank 0 writes (``enabled``)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def reset(self) -> None:
        """A fresh run starts an empty log (a second run into the same directory must not append to the first)."""
        if self.enabled:
            self.path.write_text("")

    def keep_until(self, step: int) -> None:
        """On resume: drop the records after the restored step (those steps run again and are logged again)."""
        if self.enabled and self.path.is_file():
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Loss terms, learning rate, throughput and eval accuracy over steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_jsonl(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    steps = [r["step"] for r in train]
    for key in sorted({k for r in train for k in r if k.startswith("loss")}):
        ax[0].plot(steps, [r.get(key, float("nan")) for r in train], label=key)
    ax[0].set_title("loss")
    ax[0].set_xlabel("step")
    ax[0].legend(fontsize=7)
    ax[1].plot(steps, [r["lr"] for r in train])
    ax[1].set_title("learning rate")
    ax[2].plot(steps, [r["clips_per_s"] for r in train])
    ax[2].set_title("throughput (clips/s, this rank)")
    if evals:
        ax[3].plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="top-1")
        ax[3].plot([r["step"] for r in evals], [r["top5"] for r in evals], "s--", label="top-5")
        ax[3].legend()
    ax[3].set_title("val accuracy (%)")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)
