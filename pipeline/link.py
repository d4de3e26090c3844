"""Links: one directed channel from stage s to stage s+1 that carries a chunk's hidden state [B, c, H].

Two implementations behind one interface (`isend(t, tag) -> Handle`, `irecv(shape, dtype, tag, out) -> Handle`):
- `DistChannel`: torch.distributed point-to-point (gloo for CPU tensors, NCCL for CUDA tensors), one process per
  stage.
- `LocalChannel`: both stages in one process; a send is a copy into a buffer the receiver then owns.

Sends run on a communication lane: a CUDA stream ordered by events on GPU, a single worker thread on CPU (gloo's
own `Work` is also asynchronous, the thread adds the optional emulated link delay and exact send timing). An
emulated bandwidth and latency (`LinkModel`) lets slow links (PCIe, Ethernet) be studied on fast hardware.

Metadata: every rank derives each chunk's shape from the shared chunk plan, so only the tensor crosses the link.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import checks


@dataclass(frozen=True)
class LinkModel:
    """Emulated link: each send takes at least latency_s + bytes / bandwidth. bandwidth_gbps None = no emulation."""
    bandwidth_gbps: float | None = None  # gigabytes per second
    latency_s: float = 0.0

    def __post_init__(self):
        if self.bandwidth_gbps is not None:
            checks.number("emulated link bandwidth (GB/s)", self.bandwidth_gbps, 0, strict=True)
        checks.number("emulated link latency (s)", self.latency_s, 0)

    @property
    def active(self) -> bool:
        return self.bandwidth_gbps is not None or self.latency_s > 0

    def delay_s(self, nbytes: int) -> float:
        bw = self.bandwidth_gbps
        return self.latency_s + (nbytes / (bw * 1e9) if bw else 0.0)


@triton.jit
def _wait_ns_kernel(ns):
    """One thread spins until the GPU's global timer (nanoseconds, independent of the SM clock) has advanced by
    `ns`. torch.cuda._sleep counts SM cycles instead, and the SM clock moves between ~345 MHz idle and ~2 GHz
    busy: calibrated once, its sleeps came out 2-5x short on an H100."""
    start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    now = start
    while now - start < ns:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                        pack=1)


def _gpu_sleep(seconds: float) -> None:
    """Occupies the current CUDA stream for `seconds` of wall time without using the SMs' math (an emulated
    transfer): one single-warp program, whatever the clocks do."""
    if seconds > 0:
        _wait_ns_kernel[(1,)](int(seconds * 1e9), num_warps=1)


class Handle:
    """Completion of one send or receive. `wait()` returns the received tensor (None for a send). On CPU it blocks
    the host; on GPU it makes the current stream wait (the host does not block)."""

    def __init__(self, wait_fn, nbytes: int, timing=None, event=None):
        self._wait_fn, self.nbytes = wait_fn, nbytes
        self.timing = timing  # () -> (start_s, end_s) of the transfer itself, resolvable after the run
        self.event = event  # GPU sends: the completion event, for a receiver in this process to wait on
        self._done, self._value = False, None

    def wait(self):
        if not self._done:
            self._value, self._done = self._wait_fn(), True
        return self._value


class _Lane:
    """Where sends execute: a CUDA stream (device tensors) or one worker thread (CPU tensors)."""

    def __init__(self, device: torch.device, model: LinkModel, clock):
        self.device, self.model, self.clock = device, model, clock
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device=device)
        else:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comm")

    def submit(self, tensor: torch.Tensor, transfer) -> Handle:
        """Runs transfer(tensor) -> finish_fn on the lane after the emulated delay; returns the send's handle."""
        nbytes = tensor.numel() * tensor.element_size()
        delay = self.model.delay_s(nbytes)
        if self.device.type == "cuda":
            producer = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(producer)  # the send starts when the tensor has been computed
            with torch.cuda.stream(self.stream):
                t0 = self.clock.mark()
                _gpu_sleep(delay)
                transfer(tensor)
                t1 = self.clock.mark()
            tensor.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
            return Handle(lambda: torch.cuda.current_stream(self.device).wait_event(done), nbytes,
                          lambda: (self.clock.seconds(t0), self.clock.seconds(t1)), event=done)

        times = {}

        def run():
            times["start"] = time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            transfer(tensor)
            times["end"] = time.perf_counter()

        fut = self.pool.submit(run)
        return Handle(fut.result, nbytes, lambda: (self.clock.seconds(times["start"]), self.clock.seconds(times["end"])))

    def close(self):
        if self.device.type != "cuda":
            self.pool.shutdown(wait=True)


class DistChannel:
    """torch.distributed P2P between ranks `src` and `dst`; each process creates the ends it uses."""

    def __init__(self, src: int, dst: int, device: torch.device, model: LinkModel = LinkModel(), clock=None):
        self.src, self.dst, self.device = src, dst, torch.device(device)
        self.lane = _Lane(self.device, model, clock)

    def isend(self, tensor: torch.Tensor, tag: int) -> Handle:
        if self.device.type == "cuda":  # NCCL: enqueue on the comm stream, ordered after the producer
            return self.lane.submit(tensor, lambda t: dist.isend(t, self.dst, tag=tag))
        return self.lane.submit(tensor, lambda t: dist.send(t, self.dst, tag=tag))

    def irecv(self, shape, dtype, tag: int, out: torch.Tensor | None = None) -> Handle:
        buf = out if out is not None else torch.empty(shape, dtype=dtype, device=self.device)
        if self.device.type == "cuda":
            stream = self.lane.stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the buffer's last reader is done
            with torch.cuda.stream(stream):
                work = dist.irecv(buf, self.src, tag=tag)
            done = torch.cuda.Event()
            done.record(stream)

            def finish():
                work.wait()
                torch.cuda.current_stream(self.device).wait_event(done)
                return buf
        else:
            work = dist.irecv(buf, self.src, tag=tag)

            def finish():
                work.wait()
                return buf
        return Handle(finish, buf.numel() * buf.element_size())

    def close(self):
        self.lane.close()


class LocalChannel:
    """Both ends in one process: a send copies the tensor (on the comm lane) into a buffer the receiver owns."""

    def __init__(self, device: torch.device, model: LinkModel = LinkModel(), clock=None):
        self.device = torch.device(device)
        self.lane = _Lane(self.device, model, clock)
        self._slots: dict[int, torch.Tensor] = {}  # tag -> the delivered copy
        self._done: dict[int, torch.cuda.Event] = {}  # tag -> the send's completion event (GPU)
        self._cond = threading.Condition()

    def isend(self, tensor: torch.Tensor, tag: int) -> Handle:
        def deliver(t):
            copy = t.clone()
            with self._cond:
                self._slots[tag] = copy
                self._cond.notify_all()

        handle = self.lane.submit(tensor, deliver)
        if self.device.type == "cuda":
            # The receiver's stream must wait on the event itself: waiting through the sender's Handle would be a
            # no-op once the sender has waited on it (a blocking send), and the receiver would read the copy
            # before the (emulated) transfer wrote it.
            self._done[tag] = handle.event
        return handle

    def irecv(self, shape, dtype, tag: int, out: torch.Tensor | None = None) -> Handle:
        def finish():
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self._done.pop(tag))  # the copy is written on the comm stream
                buf = self._slots.pop(tag)
                buf.record_stream(stream)
            else:
                with self._cond:
                    self._cond.wait_for(lambda: tag in self._slots)
                    buf = self._slots.pop(tag)
            if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
                raise RuntimeError(f"link: received {buf.dtype} {tuple(buf.shape)}, expected {dtype} {tuple(shape)}")
            return buf
        return Handle(finish, int(torch.Size(shape).numel()) * torch.tensor([], dtype=dtype).element_size())

    def close(self):
        self.lane.close()
