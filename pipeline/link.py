"""Links: one directed channel from stage s to stage s+1 that carries a chunk's hidden state [B, c, H].

One interface (`Link`: `isend(t, tag) -> Handle`, `irecv(shape, dtype, tag, slot) -> Handle`, `close()`), two
implementations:
- `DistChannel`: torch.distributed point-to-point, one process per stage; the same code for gloo (CPU tensors) and
  NCCL (CUDA tensors), which differ only in where the waiting happens (a lane thread / a CUDA stream);
- `LocalChannel`: both stages in one process (a stage per thread on CPU, a CUDA stream per stage on GPU); a send is
  a copy into the receiver's buffer.

A transfer behaves like a real point-to-point link: it starts once the send is posted (the data produced, the
link's lane free: sends of one link are serial) *and* the matching receive is posted, and it takes
`LinkModel.delay_s(bytes)` from then (an emulated slow link) or what the hardware takes. A send is complete, for
blocking modes, the two-sends-in-flight cap and its recorded end time, when its transfer is. The simulator
(`simulate.py`) has the same rules.

Receives land in a pair of buffers per channel, reused chunk after chunk (slot k % 2); a buffer is written again only
after the stage that read it has finished with it (the next receive into a slot is posted after the chunk that used
it was computed; on GPU the receive also waits for the compute stream). Every rank derives each chunk's shape from
the shared chunk plan, so only the tensor crosses the link.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.compat import FP_FUSION
from kernels.fast_launch import INT32_MAX, DirectLaunch

from . import checks


@dataclass(frozen=True)
class LinkModel:
    """Emulated link: each transfer takes latency_s + bytes / bandwidth from the moment both ends are ready.
    bandwidth_gbps None = no emulation (as fast as the real link)."""
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


class LinkAborted(RuntimeError):
    """The other end of an in-process link failed: waiting for it is pointless."""


class Handle:
    """Completion of one send or receive. `wait()` returns the received tensor (None for a send). On CPU it blocks
    the host; on GPU it makes the current stream wait (the host does not block). `timing()` gives the transfer's
    (start, end) on the run's clock once the run is over."""

    def __init__(self, wait_fn, nbytes: int, timing=None, keep=None):
        self._wait_fn, self.nbytes = wait_fn, nbytes
        self.timing = timing
        self._keep = keep  # a send's tensor stays alive until its transfer is done
        self._done, self._value = False, None

    def wait(self):
        if not self._done:
            self._value, self._done = self._wait_fn(), True
        return self._value


class Link(Protocol):
    def isend(self, tensor: torch.Tensor, tag: int) -> Handle: ...
    def irecv(self, shape, dtype, tag: int, slot: int = 0) -> Handle: ...
    def close(self) -> None: ...


# ---- GPU waiting without the SMs' math ------------------------------------------------------------------------

@triton.jit(do_not_specialize=["ns"])  # one compiled kernel for every delay: no module load inside a run
def _wait_ns_kernel(ns):
    """One thread spins until the GPU's global timer (nanoseconds, independent of the SM clock) has advanced by
    `ns`. torch.cuda._sleep counts SM cycles instead, and the SM clock moves between ~345 MHz idle and ~2 GHz
    busy: calibrated once, its sleeps came out 2-5x short on an H100."""
    start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    now = start
    while now - start < ns:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                        pack=1)


_PRELOADED: set = set()
_WAIT_OPTIONS = dict(num_warps=1, enable_fp_fusion=FP_FUSION)  # the preload's and every launch's: one compiled kernel
_WAIT_LAUNCH = DirectLaunch(_wait_ns_kernel, pointers=0)  # launched once per emulated transfer: `kernels.fast_launch`


def preload_link_kernels(device) -> None:
    """Compiles and loads the wait kernel on `device` before any run. Loading a module (Triton's first launch of a
    kernel, CUDA's lazy loading) may wait for the whole device to go idle: done inside a run, it stalls every
    stream, and a kernel on the device that waits for work the host has yet to enqueue would never end (seen on an
    H200: the in-process link's former receive-posted spin kernel hung the first run for good)."""
    device = torch.device(device)
    if device.type != "cuda" or str(device) in _PRELOADED:
        return
    with torch.cuda.device(device):
        _WAIT_LAUNCH[(1,)](0, **_WAIT_OPTIONS)
        torch.cuda.synchronize(device)
    _PRELOADED.add(str(device))


def _gpu_sleep(seconds: float) -> None:
    """Occupies the current CUDA stream for `seconds` of wall time (an emulated transfer): one single-warp program,
    whatever the clocks do; a wait past 2**31 - 1 ns (2.1 s: a slow emulated link) in several, each of the kernel's
    one compiled form (a larger count would make Triton compile an int64 one inside the run)."""
    ns = int(seconds * 1e9) if seconds > 0 else 0
    while ns > 0:
        step = min(ns, MAX_WAIT_NS)
        _WAIT_LAUNCH[(1,)](step, **_WAIT_OPTIONS)
        ns -= step


MAX_WAIT_NS = INT32_MAX  # the wait kernel's count, typed int32


# ---- receive buffers ---------------------------------------------------------------------------------------------

class _Buffers:
    """Two flat buffers reused round-robin; a chunk's receive is a view of its slot's buffer (grown on demand)."""

    def __init__(self, device):
        self.device = device
        self.flat: list[torch.Tensor | None] = [None, None]

    def take(self, slot: int, shape, dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        buf = self.flat[slot % 2]
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self.flat[slot % 2] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def _nbytes(shape, dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.tensor([], dtype=dtype).element_size()


# ---- one process per stage -----------------------------------------------------------------------------------------

class DistChannel:
    """torch.distributed point-to-point between ranks `src` and `dst` (each process creates the ends it uses).
    gloo: the send runs on a lane thread (a blocking send, then the emulated delay), the receive is an irecv whose
    wait also pays the emulated delay, both counted from the rendezvous; NCCL: the same on a lane stream per end."""

    def __init__(self, src: int, dst: int, device, model: LinkModel = LinkModel(), clock=None):
        self.src, self.dst, self.device = src, dst, torch.device(device)
        self.model, self.clock = model, clock
        self.buffers = _Buffers(self.device)
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(device=self.device)
            preload_link_kernels(self.device)  # an NCCL kernel waiting on the peer must not meet a module load
        else:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="send")
            self.rpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recv") if model.active else None

    def isend(self, tensor: torch.Tensor, tag: int) -> Handle:
        nbytes = tensor.numel() * tensor.element_size()
        delay = self.model.delay_s(nbytes)
        if self.device.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the send starts once computed
            with torch.cuda.stream(self.stream):
                t0 = self.clock.mark()
                work = dist.isend(tensor, self.dst, tag=tag)
                work.wait()  # this stream waits for the transfer: it completes at the rendezvous
                _gpu_sleep(delay)  # then the emulated link's time, counted from there
                t1 = self.clock.mark()
                done = torch.cuda.Event()
                done.record(self.stream)
            tensor.record_stream(self.stream)
            return Handle(lambda: torch.cuda.current_stream(self.device).wait_event(done), nbytes,
                          lambda: (self.clock.seconds(t0), self.clock.seconds(t1)), keep=(tensor, work))
        times = {}

        def run():
            times["start"] = time.perf_counter()
            dist.send(tensor, self.dst, tag=tag)  # returns when the receiver has it: the rendezvous
            if delay > 0:
                time.sleep(delay)
            times["end"] = time.perf_counter()

        fut = self.pool.submit(run)
        return Handle(fut.result, nbytes, lambda: (times["start"], times["end"]), keep=tensor)

    def irecv(self, shape, dtype, tag: int, slot: int = 0) -> Handle:
        buf = self.buffers.take(slot, shape, dtype)
        nbytes = _nbytes(shape, dtype)
        delay = self.model.delay_s(nbytes)
        if self.device.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last reader is done
            with torch.cuda.stream(self.stream):
                work = dist.irecv(buf, self.src, tag=tag)
                work.wait()
                _gpu_sleep(delay)  # the data is usable once the emulated transfer is over
                done = torch.cuda.Event()
                done.record(self.stream)

            def finish():
                torch.cuda.current_stream(self.device).wait_event(done)
                buf.record_stream(torch.cuda.current_stream(self.device))
                return buf
            return Handle(finish, nbytes, keep=work)
        work = dist.irecv(buf, self.src, tag=tag)
        if self.rpool is None:
            return Handle(lambda: (work.wait(), buf)[1], nbytes, keep=work)
        arrived = self.rpool.submit(lambda: (work.wait(), time.perf_counter())[1])  # when the data came

        def finish():
            rest = arrived.result() + delay - time.perf_counter()
            if rest > 0:
                time.sleep(rest)
            return buf
        return Handle(finish, nbytes, keep=work)

    def close(self):
        if self.device.type != "cuda":
            self.pool.shutdown(wait=True)
            if self.rpool is not None:
                self.rpool.shutdown(wait=True)


# ---- both ends in this process -------------------------------------------------------------------------------------

class LocalChannel:
    """Both ends in one process; the n-th send pairs with the n-th receive (both ends post in chunk order). CPU: the
    stages run in threads of their own; a send's lane thread waits for its receive to be posted, pays the emulated
    delay and copies into the receiver's buffer. GPU: every stage has its own stream, one host thread enqueues
    them all, and nothing waits on the host: posting a receive records an event on the receiver's stream, and the
    lane stream waits for that event (the rendezvous), pays the delay and copies. So the host must post a chunk's
    receive before it enqueues the chunk's send (`stage_program(yield_posts=True)` and the in-process driver do);
    a send whose receive is not posted yet is refused rather than left to a device-side spin that could never end
    (work the device waits for must already be enqueued). `timeout_s` bounds how long a CPU send waits for its
    receive."""

    def __init__(self, device, model: LinkModel = LinkModel(), clock=None, timeout_s: float = 60.0, stream=None):
        self.device, self.model, self.clock, self.timeout_s = torch.device(device), model, clock, timeout_s
        self.buffers = _Buffers(self.device)
        self._cond = threading.Condition()
        self._posted: dict[int, torch.Tensor] = {}  # receive number -> the receiver's buffer (CPU)
        self._delivered: set[int] = set()
        self._done: dict[int, torch.cuda.Event] = {}  # send number -> the copy's completion (GPU)
        self._sends = self._recvs = 0
        self._aborted: str | None = None
        if self.device.type == "cuda":  # the lane: a stream of its own, or the one given (an SM partition's)
            self.stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
            self._posted_at: dict[int, torch.cuda.Event] = {}  # receive number -> posted, on the receiver's stream
            preload_link_kernels(self.device)
        else:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="send")

    def isend(self, tensor: torch.Tensor, tag: int) -> Handle:
        nbytes = tensor.numel() * tensor.element_size()
        delay = self.model.delay_s(nbytes)
        self._sends += 1
        n = self._sends
        if self.device.type == "cuda":
            posted = self._posted_at.pop(n, None)
            if posted is None:
                raise RuntimeError(f"in-process GPU link: send {n} (chunk {tag}) enqueued before its receive was "
                                   "posted; the host must post a chunk's receive first (stage_program(yield_posts="
                                   "True), driven as Runner.run_inprocess does)")
            buf = self.buffers.take(n - 1, tensor.shape, tensor.dtype)  # the slot receive n lands in
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the data has been computed
            with torch.cuda.stream(self.stream):
                t0 = self.clock.mark()
                # ... and receive n posted, which the receiver's stream does once it is done with the slot
                self.stream.wait_event(posted)
                _gpu_sleep(delay)
                buf.copy_(tensor)
                t1 = self.clock.mark()
                done = torch.cuda.Event()
                done.record(self.stream)
            tensor.record_stream(self.stream)
            # the receiver's stream waits on this event itself: through the sender's Handle the wait would be a
            # no-op once a blocking sender had waited on it
            self._done[n] = done
            return Handle(lambda: torch.cuda.current_stream(self.device).wait_event(done), nbytes,
                          lambda: (self.clock.seconds(t0), self.clock.seconds(t1)), keep=tensor)
        times = {}

        def run():
            times["start"] = time.perf_counter()
            with self._cond:
                if not self._cond.wait_for(lambda: n in self._posted or self._aborted, timeout=self.timeout_s):
                    raise TimeoutError(f"link: receive {n} (chunk {tag}) was not posted within {self.timeout_s} s")
                if self._aborted:
                    raise LinkAborted(self._aborted)
                buf = self._posted.pop(n)
            if delay > 0:  # from the rendezvous on
                time.sleep(delay)
            buf.copy_(tensor)
            times["end"] = time.perf_counter()
            with self._cond:
                self._delivered.add(n)
                self._cond.notify_all()

        fut = self.pool.submit(run)
        return Handle(fut.result, nbytes, lambda: (times["start"], times["end"]), keep=tensor)

    def irecv(self, shape, dtype, tag: int, slot: int = 0) -> Handle:
        self._recvs += 1
        n = self._recvs
        buf = self.buffers.take(n - 1, shape, dtype)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            posted = torch.cuda.Event()
            posted.record(stream)  # on this stream, after the slot's last reader
            self._posted_at[n] = posted

            def finish():
                done = self._done.pop(n, None)
                if done is None:
                    raise RuntimeError(f"in-process GPU link: receive {n} (chunk {tag}) waited on before its send "
                                       "was enqueued; the host must enqueue a chunk's send before its receiver waits")
                stream.wait_event(done)  # the copy is written on the lane stream
                buf.record_stream(stream)
                return buf
            return Handle(finish, _nbytes(shape, dtype))
        with self._cond:
            self._posted[n] = buf
            self._cond.notify_all()

        def finish():
            with self._cond:
                if not self._cond.wait_for(lambda: n in self._delivered or self._aborted, timeout=self.timeout_s):
                    raise TimeoutError(f"link: chunk {tag} did not arrive within {self.timeout_s} s")
                if n not in self._delivered:
                    raise LinkAborted(self._aborted)
                self._delivered.discard(n)
            return buf
        return Handle(finish, _nbytes(shape, dtype))

    def abort(self, reason: str) -> None:
        """Wakes every waiter of this link with LinkAborted (a stage on the other end failed)."""
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    def reset(self) -> None:
        """Before a run: no abort pending, both ends counting from zero."""
        with self._cond:
            self._aborted, self._sends, self._recvs = None, 0, 0
            self._posted.clear()
            self._delivered.clear()
            self._done.clear()
        if self.device.type == "cuda":
            self._posted_at.clear()

    def close(self):
        if self.device.type != "cuda":
            self.pool.shutdown(wait=True)
