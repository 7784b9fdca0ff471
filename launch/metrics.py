"""Run telemetry: Prometheus exporter (one endpoint per rank), JSON-lines log and end-of-run PNG plots."""

from __future__ import annotations

import json
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from hcml.errors import ConfigError, HCMLError
from hcml.files import atomic_write_text, write_failure

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
CKPT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)


@dataclass(frozen=True)
class Panel:
    """A Grafana panel over one metric: its PromQL, unit and legend."""

    title: str
    expr: str
    unit: str = "none"
    legend: str = "rank {{rank}}"


@dataclass(frozen=True)
class Metric:
    """One exported metric. The exporter creates it, the dashboard draws its panel: adding a metric is one entry
    in METRICS (plus the line that updates it) and `python -m hcml.launch.metrics --dashboard` to redraw."""

    key: str    # how the exporter refers to it
    name: str   # the Prometheus name
    kind: str   # gauge | counter | histogram
    help: str
    buckets: tuple = ()
    extra_labels: tuple = ()
    panel: Panel | None = None


METRICS = (
    Metric("clips", "hcml_clips_per_second", "gauge", "training clips/s of this rank",
           panel=Panel("Global clips/s", "sum(hcml_clips_per_second)", legend="all ranks")),
    Metric("frames", "hcml_frames_per_second", "gauge", "decoded frames/s consumed by this rank",
           panel=Panel("Frames/s per rank", "hcml_frames_per_second")),
    Metric("global_clips", "hcml_global_clips_per_second", "gauge", "clips/s over all ranks (estimate)"),
    Metric("global_frames", "hcml_global_frames_per_second", "gauge", "frames/s over all ranks (estimate)"),
    Metric("step_time", "hcml_step_seconds", "histogram", "optimizer step wall time", STEP_BUCKETS,
           panel=Panel("Step time p95", "histogram_quantile(0.95, sum by (le, rank) "
                       "(rate(hcml_step_seconds_bucket[5m])))", "s")),
    Metric("data_wait", "hcml_data_wait_seconds", "histogram", "time blocked on the input pipeline per step",
           WAIT_BUCKETS),
    Metric("wait_frac", "hcml_data_wait_ratio", "gauge", "fraction of step time spent waiting for data",
           panel=Panel("Data-wait share of step time", "hcml_data_wait_ratio", "percentunit")),
    Metric("loss", "hcml_loss", "gauge", "loss terms (total, ce, nce_low, nce_mid, nce_high)",
           extra_labels=("term",), panel=Panel("Loss terms", 'hcml_loss{rank="0"}', legend="{{term}}")),
    Metric("lr", "hcml_learning_rate", "gauge", "learning rate",
           panel=Panel("Learning rate", 'hcml_learning_rate{rank="0"}')),
    Metric("epoch", "hcml_epoch", "gauge", "current epoch"),
    Metric("step", "hcml_step", "gauge", "optimizer steps done"),
    Metric("mem_alloc", "hcml_gpu_memory_allocated_bytes", "gauge", "torch.cuda.memory_allocated",
           panel=Panel("GPU memory allocated", "hcml_gpu_memory_allocated_bytes", "bytes")),
    Metric("mem_reserved", "hcml_gpu_memory_reserved_bytes", "gauge", "torch.cuda.memory_reserved"),
    Metric("samples", "hcml_samples_seen", "counter", "training clips consumed by this rank"),
    Metric("skipped", "hcml_samples_skipped", "counter", "training videos DALI could not read (dropped from their "
           "epoch; counted by rank 0)", panel=Panel("Unreadable videos skipped", "hcml_samples_skipped_total")),
    Metric("ckpt_time", "hcml_checkpoint_save_seconds", "histogram", "checkpoint save duration", CKPT_BUCKETS,
           panel=Panel("Checkpoint save time (p95)", "histogram_quantile(0.95, sum by (le) "
                       "(rate(hcml_checkpoint_save_seconds_bucket[1h])))", "s", "p95")),
    Metric("since_step", "hcml_seconds_since_step", "gauge", "seconds since this rank's last optimizer step (a stall "
           "shows here before train.stall_timeout_s ends the job)",
           panel=Panel("Seconds since the last step", "hcml_seconds_since_step", "s")),
)


def dashboard() -> dict:
    """The Grafana dashboard (launch/grafana/hcml_dashboard.json): one panel per metric that has one, two per row."""
    panels = []
    for i, m in enumerate(p for p in METRICS if p.panel):
        pn = m.panel
        panels.append({"type": "timeseries", "title": pn.title,
                       "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2), "w": 12, "h": 8},
                       "datasource": {"type": "prometheus", "uid": "${datasource}"},
                       "fieldConfig": {"defaults": {"unit": pn.unit}, "overrides": []},
                       "targets": [{"expr": pn.expr, "legendFormat": pn.legend, "refId": "A"}]})
    return {"title": "hcml training", "uid": "hcml-training", "schemaVersion": 39,
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
            "panels": panels}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


class PrometheusExporter:
    """Serves the METRICS with a ``rank`` label on ``port`` (next free port if taken and allowed)."""

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
        self.registry = CollectorRegistry()
        kinds = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}
        self.m, self.rank = {}, str(rank)
        for spec in METRICS:
            kw = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
            self.m[spec.key] = kinds[spec.kind](spec.name, spec.help, ["rank", *spec.extra_labels],
                                                registry=self.registry, **kw)
            if not spec.extra_labels:  # every series exists (at 0) from the first scrape, not from its first event
                self.m[spec.key].labels(self.rank)
        self._server = start_http_server(chosen, registry=self.registry)

    def _of(self, key: str, *labels: str):
        return self.m[key].labels(self.rank, *labels)

    def observe_step(self, *, step: int, epoch: int, step_s: float, wait_s: float, clips: int, frames_per_clip: int,
                     world: int, lr: float, losses: dict[str, float]) -> None:
        rate = clips / max(step_s, 1e-9)
        self._of("clips").set(rate)
        self._of("frames").set(rate * frames_per_clip)
        self._of("global_clips").set(rate * world)
        self._of("global_frames").set(rate * frames_per_clip * world)
        self._of("step_time").observe(step_s)
        self._of("data_wait").observe(wait_s)
        self._of("wait_frac").set(wait_s / max(step_s, 1e-9))
        for k, v in losses.items():
            self._of("loss", k).set(v)
        self._of("lr").set(lr)
        self._of("epoch").set(epoch)
        self._of("step").set(step)
        self._of("samples").inc(clips)
        if torch.cuda.is_available():
            self._of("mem_alloc").set(torch.cuda.memory_allocated())
            self._of("mem_reserved").set(torch.cuda.memory_reserved())

    def observe_checkpoint(self, seconds: float) -> None:
        self._of("ckpt_time").observe(seconds)

    def observe_skipped(self, count: int) -> None:
        self._of("skipped").inc(count)

    def idle(self, seconds: float) -> None:
        self._of("since_step").set(seconds)

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else None
        if server is not None:
            server.shutdown()


def gpu_memory(device: torch.device) -> dict[str, float]:
    """This process's GPU memory for the metrics log, in GiB: allocated now, reserved by the caching allocator, and
    the peak allocated since the process started (what sizing a batch needs); {} on a CPU. Prometheus has the
    first two per rank (``hcml_gpu_memory_*_bytes``)."""
    if device.type != "cuda":
        return {}
    gib = 2.0 ** 30
    return {"gpu_mem_gib": torch.cuda.memory_allocated(device) / gib,
            "gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib}


class JsonlLog:
    """``metrics.jsonl``: one JSON record per logged step/eval. Only rank 0 writes (``enabled``).

    ``tensorboard``: a folder (``RUN_DIR/tensorboard``) where every numeric field of every record is also written
    as a TensorBoard scalar ``<kind>/<field>`` at the record's step, so the curves are exactly the log's; a resume
    purges the events after the restored step (TensorBoard's ``purge_step``), so a curve continues without
    duplicate steps."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = Path(tensorboard) if tensorboard else None
        self._tb = None

    def _writer(self, purge_step: int | None = None):
        if self._tb is None and self.tensorboard is not None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tensorboard), purge_step=purge_step)
        return self._tb

    def reset(self) -> None:
        """A fresh run starts an empty log (a second run into the same directory must not append to the first)."""
        if self.enabled:
            self.path.write_text("")
            if self.tensorboard is not None and self.tensorboard.is_dir():
                for f in self.tensorboard.glob("events.out.tfevents.*"):
                    f.unlink()

    def keep_until(self, step: int) -> None:
        """On resume: drop the records after the restored step (those steps run again and are logged again)."""
        if self.enabled and self.path.is_file():
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
            # atomic: a second preemption during the rewrite must not cost the run its history
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.close()
        self._writer(purge_step=step + 1)

    def write(self, **record) -> None:
        if self.enabled:
            record = {"time": round(time.time(), 3), **record}
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                failure = write_failure(e, self.path, "the checkpoints so far are intact: make room and continue "
                                                      "with --resume auto")
                if failure is None:
                    raise
                raise failure from None
            tb = self._writer()
            if tb is not None:
                kind, step = record.get("kind", "train"), int(record.get("step", 0))
                for key, value in record.items():
                    if key not in ("time", "step", "kind") and isinstance(value, (int, float)) \
                            and not isinstance(value, bool):
                        tb.add_scalar(f"{kind}/{key}", value, global_step=step, walltime=record["time"])
                tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log. A last line cut short (a process killed mid-write, a disk that filled) is
    left out with a warning, so the run still resumes; a bad line before it is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    out = []
    for n, (i, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines) - 1:
                raise HCMLError(f"{path}:{i}: not a JSON record ({e.msg}): the log was edited or is corrupt") from None
            warnings.warn(f"{path}:{i}: a record cut short (a write interrupted), left out", stacklevel=2)
    return out


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


if __name__ == "__main__":  # python -m hcml.launch.metrics --dashboard > launch/grafana/hcml_dashboard.json
    import sys

    if sys.argv[1:] != ["--dashboard"]:
        raise SystemExit("usage: python -m hcml.launch.metrics --dashboard")
    print(json.dumps(dashboard(), indent=1))
