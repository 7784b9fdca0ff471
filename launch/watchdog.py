"""Stall detection: a job whose ranks make no step for ``train.stall_timeout_s`` ends at once, naming who stalled,
instead of waiting out the 30-minute process-group timeout.

Each worker runs a daemon thread. The loop reports progress with :meth:`Watchdog.beat` (a plain assignment: step
and phase, ``data`` while it waits for a batch, ``step`` while it computes and communicates). The thread publishes
``{step, phase, progress time, alive time}`` to torchrun's TCP store every few seconds and reads everyone else's.
When this rank has made no step for the timeout it writes one line and exits with :data:`EXIT_STALL`, so torchrun
ends (or restarts) the job. Who stalled: a rank whose thread went silent (stopped, SIGSTOP, a frozen node), else a
rank still waiting for data while the others wait in a collective (a wedged read), else all ranks look alike (a
hung collective or GPU) and the line says so. It also exits when its parent is gone (torchrun killed): no orphan
keeps training. A pause of the whole process or machine (a VM snapshot or live migration, SIGSTOP to the job,
a suspended laptop) shows as the thread's own tick coming far too late: that time is not counted as a stall.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time

EXIT_STALL = 4


class Watchdog(threading.Thread):
    def __init__(self, timeout_s: float, rank: int, world: int, on_tick=None):
        super().__init__(name="hcml-watchdog", daemon=True)
        self.timeout_s, self.rank, self.world = timeout_s, rank, world
        self.interval = max(0.5, min(10.0, timeout_s / 10))
        self.on_tick = on_tick  # called with seconds since the last step (Prometheus gauge)
        self.step, self.phase, self.t_progress = 0, "start", time.time()
        self.frozen_s = 0.0  # seconds this process was frozen (its ticks came late), in all
        self.frozen_at_beat = 0.0  # frozen_s when the loop last beat: what counts since
        # under torchrun only: a process started from a shell may outlive it on purpose (nohup)
        self.parent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
        self._stop = threading.Event()
        self.store = _store(world)

    def beat(self, step: int, phase: str) -> None:
        """From the training loop: cheap, no I/O."""
        self.step, self.phase, self.t_progress, self.frozen_at_beat = step, phase, time.time(), self.frozen_s

    def stop(self) -> None:
        self._stop.set()

    def idle(self, now: float) -> float:
        """Seconds without a step, less the time the process spent frozen since the last one."""
        return now - self.t_progress - (self.frozen_s - self.frozen_at_beat)

    def run(self) -> None:
        last = time.time()
        while not self._stop.wait(self.interval):
            now = time.time()
            late = now - last - self.interval
            last = now
            if late > max(10.0, 3 * self.interval):  # not scheduled for that long: the process was frozen
                self.frozen_s += late
                os.write(2, f"hcml train (rank {self.rank}): warning: this process was frozen for {late:.0f} s (a "
                            f"paused VM or node, SIGSTOP); not counted as a stall\n".encode())
            idle = self.idle(now)
            if self.on_tick:
                self.on_tick(idle)
            views = self._exchange(now)
            if self.parent is not None and os.getppid() != self.parent:
                self._exit(f"its launcher (pid {self.parent}) is gone; stopping instead of training as an orphan")
            if self.timeout_s and idle > self.timeout_s:
                self._exit(self.verdict(views, now))

    def _exchange(self, now: float) -> dict[int, dict]:
        """Publish this rank's state; read every rank's (best effort: a store error never ends the run)."""
        mine = {"step": self.step, "phase": self.phase, "progress": self.t_progress, "alive": now}
        if self.store is None:
            return {self.rank: mine}
        views = {}
        try:
            self.store.set(f"hcml/hb/{self.rank}", json.dumps(mine))
            for r in range(self.world):
                key = f"hcml/hb/{r}"
                if self.store.check([key]):
                    views[r] = json.loads(self.store.get(key))
        except Exception:  # noqa: BLE001 - the store is a convenience for naming ranks
            pass
        views[self.rank] = mine
        return views

    def verdict(self, views: dict[int, dict], now: float) -> str:
        since = datetime.datetime.fromtimestamp(self.t_progress).strftime("%H:%M:%S")
        head = f"stalled: no step for {self.idle(now):.0f} s (train.stall_timeout_s={self.timeout_s:g}) " \
               f"after step {self.step} at {since}"
        deaf = min(self.timeout_s / 2, 3 * self.interval + 5)  # several missed heartbeats, well inside the timeout
        silent = sorted(r for r in range(self.world) if r not in views or now - views[r]["alive"] > deaf)
        if silent:
            return f"{head}; rank(s) {', '.join(map(str, silent))} stopped answering (stopped or frozen process, " \
                   f"or a lost node)"
        waiting = sorted(r for r, v in views.items() if v["phase"] == "data")
        if waiting and len(waiting) < len(views):
            return f"{head}; rank(s) {', '.join(map(str, waiting))} still wait for input data while the others " \
                   f"wait for them (a hung read: storage or DALI)"
        return f"{head}; all {len(views)} rank(s) alive in phase '{self.phase}' (a hung collective or device)"

    def _exit(self, why: str) -> None:
        os.write(2, f"hcml train (rank {self.rank}): error: {why}\n".encode())
        os._exit(EXIT_STALL)


def _store(world: int):
    """A client of torchrun's TCP store (its own connection), or None outside torchrun."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    try:
        from torch.distributed import TCPStore

        return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    except Exception:  # noqa: BLE001
        return None
