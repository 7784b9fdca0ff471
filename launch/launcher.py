"""``hcml train --nproc-per-node N``: torchrun under a launcher that owns the signals a scheduler sends.

Why not plain torchrun: SIGTERM/SIGINT make torchrun raise and kill its workers 30 s later with exit 1, and SIGUSR1
(Slurm's preemption warning) kills torchrun outright, orphaning workers that keep training. Here torchrun runs in
its own session with SIGTERM/SIGINT/SIGUSR1 ignored (and dies with the launcher); the launcher forwards each of
those signals to the workers themselves, which checkpoint at the step boundary and exit 0, so torchrun, then the
launcher, exit 0. A second signal forwards again; a third kills the job (a user who really wants it gone).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Launch:
    """Where the workers run: one node (``--standalone``) or a c10d rendezvous of ``nnodes`` nodes."""

    nproc: int
    nnodes: str = "1"  # "N" or "MIN:MAX" (elastic)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous (multi-node)
    rdzv_id: str | None = None  # the job's id on every node (Slurm: the job id)
    max_restarts: int = 0

    def torchrun_cmd(self, argv: list[str]) -> list[str]:
        """The torchrun command running ``hcml <argv>`` in every worker."""
        where = (["--standalone"] if self.rdzv_endpoint is None else
                 ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                  f"--rdzv-id={self.rdzv_id or 'hcml'}"])
        return [sys.executable, "-m", "torch.distributed.run", *where, f"--nnodes={self.nnodes}",
                f"--nproc-per-node={self.nproc}", f"--max-restarts={self.max_restarts}", "-m", "hcml.launch.cli",
                *argv]


def _torchrun_child() -> None:
    """In torchrun (before exec): the forwarded signals ignored (the workers set their own handlers), killed with
    the launcher (never an orphan)."""
    for s in FORWARDED:
        signal.signal(s, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        pass


def workers(pid: int) -> list[int]:
    """torchrun's (``pid``) worker processes, from Linux /proc: its children running hcml (not, e.g., the
    multiprocessing resource tracker, which SIGUSR1 would kill)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:  # field 4: ppid (after the parenthesised name)
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"hcml.launch.cli" in f.read():
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


LAUNCHED = "HCML_LAUNCHED"  # set in the workers: a stop signal is reported by the launcher, not by each worker


def run(launch: Launch, argv: list[str], interruptible: bool = False) -> int:
    """Run torchrun for ``argv`` and return its exit code, forwarding stop signals to the workers.

    ``interruptible``: the command has nothing to checkpoint (``hcml eval``). Its workers, told by ``LAUNCHED``,
    stop on a stop signal without a torchrun failure report (exit 0); the job then ends 128 + the signal, as an
    interrupted command does."""
    # torchrun handles only these; the forwarded ones it ignores (``_torchrun_child``)
    env = {**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT", LAUNCHED: "1"}
    proc = subprocess.Popen(launch.torchrun_cmd(argv), env=env, start_new_session=True, preexec_fn=_torchrun_child)
    received: list[int] = []
    delivered: dict[int, int] = {}  # worker pid → how many of the received signals it got

    def forward() -> None:  # every received signal to every worker, once (workers started later get them too)
        for pid in workers(proc.pid):
            for signum in received[delivered.get(pid, 0):]:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            delivered[pid] = len(received)

    def on_signal(signum, frame):
        received.append(signum)
        if len(received) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
        forward()

    old = {s: signal.signal(s, on_signal) for s in FORWARDED}
    try:
        while True:
            if received:
                forward()
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            return 128 + received[0] if interruptible and received and code == 0 else code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
