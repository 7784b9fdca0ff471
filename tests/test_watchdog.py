"""The stall watchdog against the two faults that look alike from inside a rank: a real stall (no step, the process
running) ends the job with exit 4; a frozen process or machine (SIGSTOP, a paused or migrated VM: seen on a
development VM, where a demo died at step 246 after a snapshot) is not counted as a stall once it runs again."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.conftest import PY, run_env

CHILD = """
import sys, time
from hcml.launch.watchdog import Watchdog
wd = Watchdog(3.0, 0, 1)
wd.start()
for step in range(int(sys.argv[2])):
    wd.beat(step, "step")
    time.sleep(0.05 if sys.argv[1] == "beat" else 60)
print("finished", flush=True)
"""


def test_a_frozen_process_is_not_a_stall():
    """SIGSTOP for 12 s (4x the 3 s timeout), then SIGCONT: the loop finishes, exit 0, one warning naming the pause."""
    p = subprocess.Popen([PY, "-c", CHILD, "beat", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=run_env())
    time.sleep(2.0)
    p.send_signal(signal.SIGSTOP)
    time.sleep(12.0)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "finished" in out
    assert "this process was frozen for 1" in err and "not counted as a stall" in err, err


def test_a_running_process_without_steps_is_a_stall():
    t0 = time.time()
    p = subprocess.run([PY, "-c", CHILD, "hang", "2"], capture_output=True, text=True, env=run_env(), timeout=60)
    assert p.returncode == 4, p.stderr
    assert "stalled: no step for 3 s" in p.stderr and "frozen" not in p.stderr, p.stderr
    assert time.time() - t0 < 30
