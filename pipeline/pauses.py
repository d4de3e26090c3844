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


# ---- how steady is this machine? ---------------------------------------------------------------------------------

def spin_windows(seconds: float, window_s: float = 0.010, stop_s: float = 0.010):
    """Spins on this core for `seconds`, counting loop iterations per `window_s` window. Returns (counts, stopped):
    per window the iterations done and whether a stop (a gap over `stop_s` between two iterations) touched it."""
    import time
    if seconds <= 0 or window_s <= 0:
        raise ValueError(f"seconds and window_s must be positive, got {seconds}, {window_s}")
    n = max(1, int(seconds / window_s))
    counts, stopped = [0] * n, [False] * n
    t0 = last = time.perf_counter()
    while True:
        now = time.perf_counter()
        w = int((now - t0) / window_s)
        if w >= n:
            break
        counts[w] += 1
        if now - last > stop_s:
            for v in range(int((last - t0) / window_s), w + 1):
                stopped[v] = True
        last = now
    return counts, stopped


def steadiness(counts, stopped) -> dict:
    """From `spin_windows`: the share of windows the machine was stopped in, and of the windows it ran through
    without a stop, the share in which the spin got through less than half of its usual work (the 90th percentile
    of those windows): slow-downs that no pause monitor can see."""
    running = sorted(c for c, s in zip(counts, stopped) if not s)
    if not running:
        raise ValueError("the machine was stopped in every window: nothing to measure its speed on")
    usual = running[min(len(running) - 1, int(0.9 * len(running)))]
    slow = sum(1 for c in running if c < 0.5 * usual)
    return dict(windows=len(counts), stopped_fraction=sum(stopped) / len(counts),
                slowed_fraction=slow / len(running), median_speed=running[len(running) // 2] / usual)

