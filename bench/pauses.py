"""Machine-wide pauses, and timings with them cut out.

Some virtual machines are stopped by their host now and then: every process, busy or idle, stands still for tens
to hundreds of milliseconds at the same instants, and the monotonic clock runs on. (The CPU machines this project
is developed on pause for roughly half of the wall time, in 20-600 ms pieces.) A 15 ms chunk then reads 400 ms, and
which chunk is hit is chance. `PauseMonitor` runs a tiny side process (no torch: it starts in milliseconds) that
wakes every millisecond and records each gap over `threshold_s` as a pause; `active_time` maps a timestamp to
"seconds of running machine" so that every interval of a run can be measured without the pauses. A machine that
never pauses records none, and the correction is the identity. The pipeline itself measures wall-clock time;
`measure` is how the harness runs it with the pauses cut out.
"""
from __future__ import annotations

import bisect
import json
import subprocess
import sys

import torch

from pipeline import run_jobs
from pipeline.launch import PrefillResult
from pipeline.schedule import StageRecord, summarize, timeline

_MONITOR = r"""
import json, os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this by closing stdin
try:  # a starved monitor would take CPU contention for a pause: run ahead of the busy processes where allowed
    os.nice(-10)
except (OSError, AttributeError):
    pass
def tell(text):
    try:
        print(text, flush=True)
    except OSError:  # the parent is gone (killed, interrupted, even before "ready"): nobody to tell, nothing to say
        os._exit(0)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
threshold = float(sys.argv[1])
pauses, last = [], time.perf_counter()
tell("ready")
while not stop.is_set():
    time.sleep(0.001)
    now = time.perf_counter()
    if now - last > threshold:
        pauses.append((last + 0.001, now))  # the sleep itself was due; the rest is the pause
    last = now
tell(json.dumps(pauses))
"""


class PauseMonitor:
    """`with PauseMonitor() as mon: ...` then `mon.pauses`: [(start, end)] in time.perf_counter seconds (the
    machine-wide monotonic clock, shared by every process of the machine)."""

    def __init__(self, threshold_s: float = 0.010):
        self.threshold_s = threshold_s
        self.pauses: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self) -> "PauseMonitor":
        from pipeline.procs import sigint_blocked
        with sigint_blocked():  # started with SIGINT blocked: a Ctrl-C to the process group does not kill it
            self._proc = subprocess.Popen([sys.executable, "-c", _MONITOR, str(self.threshold_s)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._proc.stdout.readline()  # "ready": pauses from here on are seen
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        if exc_type is not None:  # the run failed or was interrupted: its timings are not wanted
            self._proc.kill()
            self._proc.wait()
            return False
        try:
            out, _ = self._proc.communicate("", timeout=10)
            self.pauses = [tuple(p) for p in json.loads(out.strip().splitlines()[-1])]
        except (subprocess.TimeoutExpired, IndexError, ValueError):  # the monitor died: no pause was seen
            self.pauses = []
        finally:  # also when interrupted while reading: the monitor never outlives this
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
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


def measure(spec, jobs, progress=None):
    """`run_jobs` with the machine's pauses cut out of every CPU timing (GPU timings come from CUDA events, which
    host pauses do not enter). None off rank 0 under torchrun."""
    from pipeline.procs import torchrun_rank
    if torch.device(spec.device).type != "cpu" or torchrun_rank() not in (None, 0):  # rank 0 alone reports
        return run_jobs(spec, jobs, progress)
    with PauseMonitor() as monitor:
        results = run_jobs(spec, jobs, progress)
    if results is not None:
        clock = ActiveClock(monitor.pauses)
        for runs in results:
            for res in runs:
                cut_pauses(res, clock)
    return results


def cut_pauses(res: PrefillResult, clock: ActiveClock) -> None:
    """Re-derives a run's figures and timeline with the machine's pauses cut out (see pauses.py); the wall-clock
    TTFT and the paused time stay in the metrics as wall_ttft_s and paused_s."""
    spans = [(res.t_start, res.t_end)] + [(a, b) for r in res.records for a, b in r.compute if b > a]
    if any(clock(b) - clock(a) <= 0 for a, b in spans):
        # "paused" for the whole run, or for the whole of a chunk's compute (which a machine that stops would have
        # resumed): the monitor was starved (CPU contention), not the machine stopped. Cut, it would leave a TTFT or
        # a bound of 0. The wall-clock figures stand; paused_s says how much the monitor saw.
        res.metrics = dict(res.metrics, wall_ttft_s=res.t_end - res.t_start,
                           paused_s=clock.paused_between(res.t_start, res.t_end), pause_cut=False)
        return
    conv = lambda pairs: [(clock(a), clock(b)) for a, b in pairs]  # noqa: E731
    records = [StageRecord(r.stage, r.chunks, conv(r.compute), conv(r.recv_wait), conv(r.send_wait), conv(r.send),
                           r.bytes_sent, reduce=list(r.reduce), boundary=list(r.boundary)) for r in res.records]
    t0, t1 = clock(res.t_start), clock(res.t_end)
    # the schedule's figures re-derived; the others (decode, all-reduce accounting, partitions) kept as they were
    res.metrics = dict(res.metrics, **summarize(records, t0, t1), wall_ttft_s=res.t_end - res.t_start,
                       paused_s=clock.paused_between(res.t_start, res.t_end))
    res.timeline = timeline(records, t0)
    res.records, res.t_start, res.t_end = records, t0, t1


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

