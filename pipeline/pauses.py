"""Machine-wide pauses, and timings with them cut out.

Some virtual machines are stopped by their host now and then: every process, busy or idle, stands still for tens
to hundreds of milliseconds at the same instants, and the monotonic clock runs on. (The CPU machines this project
is developed on pause for roughly half of the wall time, in 20-600 ms pieces.) A 15 ms chunk then reads 400 ms, and
which chunk is hit is chance. `PauseMonitor` runs a tiny side process (no torch: it starts in milliseconds) that
wakes every millisecond and records each gap over `threshold_s` as a pause; `active_time` maps a timestamp to
"seconds of running machine" so that every interval of a run can be measured without the pauses. A machine that
never pauses records none, and the correction is the identity.
"""
from __future__ import annotations

import bisect
import json
import subprocess
import sys

_MONITOR = r"""
import json, os, sys, threading, time
try:  # a starved monitor would take CPU contention for a pause: run ahead of the busy processes where allowed
    os.nice(-10)
except (OSError, AttributeError):
    pass
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
threshold = float(sys.argv[1])
pauses, last = [], time.perf_counter()
print("ready", flush=True)
while not stop.is_set():
    time.sleep(0.001)
    now = time.perf_counter()
    if now - last > threshold:
        pauses.append((last + 0.001, now))  # the sleep itself was due; the rest is the pause
    last = now
print(json.dumps(pauses), flush=True)
"""


class PauseMonitor:
    """`with PauseMonitor() as mon: ...` then `mon.pauses`: [(start, end)] in time.perf_counter seconds (the
    machine-wide monotonic clock, shared by every process of the machine)."""

    def __init__(self, threshold_s: float = 0.010):
        self.threshold_s = threshold_s
        self.pauses: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self) -> "PauseMonitor":
        self._proc = subprocess.Popen([sys.executable, "-c", _MONITOR, str(self.threshold_s)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self._proc.stdout.readline()  # "ready": pauses from here on are seen
        return self

    def __exit__(self, *exc) -> bool:
        out, _ = self._proc.communicate("", timeout=10)
        self.pauses = [tuple(p) for p in json.loads(out.strip().splitlines()[-1])]
        return False


class ActiveClock:
    """Maps a timestamp to seconds of running machine: t minus the pauses before it."""

    def __init__(self, pauses: list[tuple[float, float]]):
        self.pauses = sorted(pauses)
        self._starts = [a for a, _ in self.pauses]
        self._before = [0.0]  # total paused time before pause i
        for a, b in self.pauses:
            self._before.append(self._before[-1] + (b - a))

    def __call__(self, t: float) -> float:
        i = bisect.bisect_right(self._starts, t)  # pauses 0..i-1 start at or before t
        if i == 0:
            return t
        a, b = self.pauses[i - 1]
        return t - self._before[i - 1] - (min(t, b) - a)

    def paused_between(self, t0: float, t1: float) -> float:
        return (t1 - t0) - (self(t1) - self(t0))
