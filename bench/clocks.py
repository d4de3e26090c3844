"""The GPU's SM clock, power draw and clock-limit reasons, sampled in a thread while a measurement runs (NVML,
through nvidia-ml-py, the package torch's own `torch.cuda.clock_rate` reads): whether a run's kernels ran at the
clock they would run at alone. On SM partitions the stages of a pipelined run compute at once, naive's one after
another; a GPU with all its SMs busy may hold a lower clock (its power limit) than one with half of them busy, which
S separate GPUs would not. `ClockSampler` records it; the gpu-suite's partitions part puts one summary on each
point and on each stage timed alone."""
from __future__ import annotations

import statistics
import threading
import time

from .kernels import why

# NVML's clock-limit reason bits (nvmlClocksEventReason*: SwPowerCap; SwThermal, HwThermal; HwSlowdown, HwPowerBrake)
POWER_CAP = 0x4
THERMAL = 0x20 | 0x40
HW_SLOWDOWN = 0x8 | 0x80


def nvml_reader(device_index: int = 0):
    """A function returning (SM clock MHz, power W, clock-limit reason bits) for one GPU now, and the GPU's own
    (max SM clock MHz, enforced power limit W); raises if NVML cannot be read (no nvidia-ml-py, no driver)."""
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons  # the older name (nvidia-ml-py before 12.535)

    def read() -> tuple[float, float, int]:
        return (float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, int(reasons(handle)))
    limits = (float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
              pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3)
    return read, limits


class ClockSampler:
    """`with ClockSampler() as clocks: ...` samples every `period_s` in a daemon thread until the block ends;
    `clocks.summary()` then gives the SM clock (median, min, max MHz) against the GPU's max, the power draw (median,
    max W) against its limit, and the share of samples the GPU named its power cap, a thermal limit or a hardware
    slowdown as a reason its clock was held down; or, where NVML cannot be read, `unavailable` and why. `reader`:
    `nvml_reader`'s pair, for tests."""

    def __init__(self, device_index: int = 0, period_s: float = 0.05, reader=None):
        self.period_s = period_s
        self.samples: list[tuple[float, float, float, int]] = []  # (perf_counter s, SM MHz, W, reason bits)
        self.why = None
        try:
            self.read, self.limits = reader if reader is not None else nvml_reader(device_index)
        except Exception as e:  # noqa: BLE001 - no NVML: the measurement goes on without its clocks
            self.read, self.limits = None, None
            self.why = why(e)
        self._stop = threading.Event()
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), *self.read()))
            except Exception as e:  # noqa: BLE001 - a reading that fails ends the sampling, said why
                self.why = why(e)
                return
            self._stop.wait(self.period_s)

    def __enter__(self) -> ClockSampler:
        if self.read is not None:
            self._thread = threading.Thread(target=self._run, name="clock-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self, windows: dict | None = None) -> dict:
        """The samples summed up (see the class); with `windows` (label -> [(start, end)] in perf_counter seconds,
        e.g. each mode's runs: `run_windows`) also per label over the samples taken inside its windows (`windows`:
        label -> samples, median SM clock, power-capped share; NVML's readings cover its own sample period, up to a
        second on some GPUs: trust a label's figures only over runs much longer than that)."""
        if not self.samples:
            return dict(unavailable=self.why or "no sample taken")
        out = dict(samples=len(self.samples), period_s=self.period_s, **_figures(self.samples),
                   max_sm_clock_mhz=self.limits[0], power_limit_w=self.limits[1])
        if windows:
            out["windows"] = {}
            for label, spans in windows.items():
                inside = [x for x in self.samples if any(a <= x[0] <= b for a, b in spans)]
                out["windows"][label] = dict(samples=len(inside), **(_figures(inside) if inside else {}))
        if self.why:
            out["stopped"] = self.why
        return out


def _figures(samples) -> dict:
    clocks = [c for _, c, _, _ in samples]
    power = [p for _, _, p, _ in samples]
    share = lambda bits: sum(1 for *_, r in samples if r & bits) / len(samples)  # noqa: E731
    return dict(sm_clock_mhz=dict(median=statistics.median(clocks), min=min(clocks), max=max(clocks)),
                power_w=dict(median=statistics.median(power), max=max(power)), power_capped=share(POWER_CAP),
                thermal_limited=share(THERMAL), hw_slowdown=share(HW_SLOWDOWN))


def run_windows(records: dict) -> dict:
    """mode label -> [(start, end)] of each of its runs (the first chunk's start to the last chunk's end over the
    stages, perf_counter seconds) from a point's raw records (`bench.harness.run_point`'s `records`: label -> runs,
    each its stages' StageRecords)."""
    def flat(x):
        if hasattr(x, "compute"):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from flat(y)
    out = {}
    for label, runs in records.items():
        spans = []
        for run in runs:
            computed = [c for r in flat(run) for c in r.compute]
            if computed:
                spans.append((min(a for a, _ in computed), max(b for _, b in computed)))
        out[label] = spans
    return out


def sampled(fn, device: str = "cuda", period_s: float = 0.05, reader=None):
    """fn()'s result and the ClockSampler that ran over it (None on a CPU device: nothing to sample); its
    `summary()` says what it saw."""
    if device == "cpu":
        return fn(), None
    with ClockSampler(period_s=period_s, reader=reader) as clocks:
        got = fn()
    return got, clocks
