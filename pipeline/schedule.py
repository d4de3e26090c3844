"""Prefill schedules. One stage program serves every mode and both link kinds:

- `unchunked`: the baseline, the whole model in one pass, no pipeline;
- `naive`: each stage runs the whole prompt, then sends [B, L, H] in one blocking send;
- `chunked`: the prompt in chunks, each sent with a blocking send (what chunking alone gives);
- `overlapped`: chunk sends posted asynchronously on the comm lane while the stage computes the next chunk;
  receives pre-posted into two buffers; at most two sends in flight, a send's tensor kept alive until it is done.

`stage_program` is a generator that yields after each chunk: one process per stage simply exhausts it, and the
in-process driver interleaves the stages chunk by chunk (on GPU each stage has its own CUDA stream, and the host
posts every stage's receive of a chunk before it enqueues any stage's compute and send of it).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from . import checks
from .compress import Codec

MODES = ("unchunked", "naive", "chunked", "overlapped")
DEFAULT_CHUNK_SIZE = 128  # tokens per chunk (per row and step, for a ragged batch) where none is given


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def mode_chunks(mode: str, chunks: list[int]) -> list[int]:
    """The chunks a mode runs: `unchunked` (the baseline) and `naive` run the prompt whole, as one chunk."""
    return [sum(chunks)] if mode in ("unchunked", "naive") else list(chunks)


def chunk_starts(chunks: list[int], start_pos: int = 0) -> list[int]:
    """The position each chunk starts at: start_pos, then the running sum of the chunk lengths."""
    starts, p = [], start_pos
    for c in chunks:
        starts.append(p)
        p += c
    return starts


def _count_hint(chunks: list[int], prompt_len: int) -> str:
    """For one length shorter than the prompt, likely meant as a number of chunks or as a chunk size: what each
    would be."""
    if len(chunks) != 1 or chunks[0] >= prompt_len:
        return ""
    n = chunks[0]
    even = [prompt_len // n + (i < prompt_len % n) for i in range(n)]
    shown = ",".join(map(str, even)) if n <= 8 else "-".join(map(str, sorted({even[-1], even[0]}))) + " tokens each"
    return f" (the list is each chunk's length: {n} chunks of this prompt would be {shown}; chunks of {n} tokens are " \
           f"a chunk size)"


def chunk_plan(prompt_len: int, chunk_size: int | None = None, chunks: list[int] | None = None) -> list[int]:
    """Chunk lengths for a prompt: uniform `chunk_size` (the last chunk takes the remainder) or an explicit list."""
    prompt_len = checks.positive_int("prompt length", prompt_len)
    if chunk_size is not None and chunks is not None:
        raise ValueError("give chunk_size or chunks, not both")
    if chunks is not None:
        chunks = checks.int_list("chunk sizes", chunks, 1)
        if sum(chunks) != prompt_len:
            raise ValueError(f"chunk sizes {chunks} sum to {sum(chunks)}, but the prompt has {prompt_len} "
                             f"tokens{_count_hint(chunks, prompt_len)}")
        return chunks
    if chunk_size is None:
        return [prompt_len]
    chunk_size = checks.positive_int("chunk_size", chunk_size)
    full, rest = divmod(prompt_len, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


class Clock:
    """Timestamps on the host (CPU) or as CUDA events on the current stream (GPU); `seconds` resolves them to
    seconds on one time base (absolute perf_counter on CPU, so processes on one machine share it). A GPU clock is
    re-anchored at the start of every run (`anchor`): the origin event is recorded on an idle device, so its host
    time is the time it ran, and every rank's GPU times land on the shared host time base."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        if self.cuda:
            self.anchor()

    def anchor(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
            torch.cuda.synchronize(self.device)
            self.origin_host = time.perf_counter()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, mark) -> float:
        if self.cuda:
            return self.origin_host + self.origin.elapsed_time(mark) / 1e3
        return mark


@dataclass
class StageRecord:
    """What one stage did in one run: per-chunk times (absolute seconds, see Clock) and bytes sent."""
    stage: int
    chunks: list[int]
    compute: list[tuple[float, float]] = field(default_factory=list)  # (start, end) per chunk
    recv_wait: list[tuple[float, float]] = field(default_factory=list)  # host/stream blocked on a receive
    send_wait: list[tuple[float, float]] = field(default_factory=list)  # blocked until a send completed
    send: list[tuple[float, float]] = field(default_factory=list)  # the transfer itself, on the comm lane
    bytes_sent: int = 0
    recv_posted: list[float] = field(default_factory=list)  # when each chunk's receive was posted
    # with tensor parallelism, per chunk: (seconds blocked in TP collectives, calls, payload bytes, seconds per
    # call), all within its compute interval
    reduce: list[tuple] = field(default_factory=list)
    # with TP, per received chunk: seconds of its collective over the TP group (tp_boundary "broadcast": the broadcast,
    # "sharded": the all-gather of the slices; within its receive wait, before its compute), 0 where it took none
    boundary: list[float] = field(default_factory=list)
    # CUDA calls in this stage's part of the run that made the host wait for the device (`runner.counting_host_syncs`):
    # each stalls the host thread that enqueues the stages' work, so a GPU run's overlap needs 0
    host_syncs: int = 0
    # the in-process GPU driver's host seconds enqueueing this stage's work (None where no driver enqueues it): one
    # host thread enqueues every stage, so a run whose stages' sum nears its TTFT was paced by the host
    host_enqueue_s: float | None = None

    def resolve(self, clock: Clock) -> "StageRecord":
        conv = lambda pairs: [(clock.seconds(a), clock.seconds(b)) for a, b in pairs]  # noqa: E731
        return StageRecord(self.stage, self.chunks, conv(self.compute), conv(self.recv_wait), conv(self.send_wait),
                           [h.timing() for h in self.send], self.bytes_sent,
                           [clock.seconds(t) for t in self.recv_posted], list(self.reduce), list(self.boundary),
                           self.host_syncs, self.host_enqueue_s)


def stage_program(stage, mode: str, chunks: list[int], clock: Clock, record: StageRecord, *, tokens=None,
                  recv=None, send=None, batch: int, start_pos: int = 0, result: dict | None = None, codec=None,
                  ragged=None, yield_posts: bool = False):
    """Runs `chunks` of one request through `stage`, yielding k after chunk k.

    tokens [B, L] on the first stage; `recv` / `send`: channels from the previous / to the next stage; `codec`
    (`pipeline.compress`): what crosses them (default: the hidden state as computed).
    On the last stage, result["logits"] is set to the last position's logits [B, V].
    `ragged`: a ragged batch's steps (`pipeline.ragged.RaggedStep`, one per chunk; chunks[k] is step k's packed
    tokens, batch 1); tokens is then the list of each step's packed tokens [1, N_k], and result["logits"] holds
    each row's logits at its own last token, in row order.
    `yield_posts`: a receiving stage also yields ("posted", k) once chunk k's receive is posted, before it waits for
    it. One host thread driving every stage on GPU streams needs the pause: it posts every stage's receive of chunk k
    first, then enqueues the chunks' computes and sends, so that a send's rendezvous waits only on work already
    enqueued (`LocalChannel`).
    """
    cfg = stage.cfg
    codec = codec or Codec()
    dtype = stage.model.dtype
    wire = lambda c: codec.wire((batch, c, cfg.hidden_size), dtype)  # noqa: E731
    overlapped = mode == "overlapped"
    starts = chunk_starts(chunks, start_pos)
    posted: dict[int, object] = {}
    in_flight: deque = deque()
    reducer = getattr(stage.model, "reduce", None)

    def post_recv(k):  # into buffer slot k % 2: the one chunk k - 2 used, whose compute is done
        record.recv_posted.append(clock.mark())
        posted[k] = recv.irecv(*wire(chunks[k]), tag=k, slot=k % 2)

    if recv is not None and overlapped:  # pre-post the first two receives (double buffering)
        for k in range(min(2, len(chunks))):
            post_recv(k)
    for k, c in enumerate(chunks):
        if recv is None:
            x = tokens[k] if ragged is not None else tokens[:, starts[k] - start_pos:starts[k] - start_pos + c]
        else:
            if k not in posted:
                post_recv(k)
            if yield_posts:
                yield ("posted", k)
            t0 = clock.mark()
            b0 = reducer.boundary_seconds() if reducer is not None else 0.0
            x = posted.pop(k).wait()
            record.recv_wait.append((t0, clock.mark()))
            if reducer is not None:  # a broadcast or all-gather in the stage (0 where the chunk took none)
                record.boundary.append(reducer.boundary_seconds() - b0)
            x = codec.decode(x, dtype)
        t0 = clock.mark()
        before = reducer.snapshot() if reducer is not None else None
        y = (stage.forward_packed(x, ragged[k]) if ragged is not None
             else stage.forward(x, starts[k], last_only=True, tokens=c))
        record.compute.append((t0, clock.mark()))
        if reducer is not None:  # host time: on CPU what the rank was blocked; with NCCL only the host's share
            record.reduce.append(reducer.since(before))
        if recv is not None and overlapped and k + 2 < len(chunks):
            post_recv(k + 2)  # this chunk's input buffer is free again
        if send is None:
            if result is not None and ragged is not None:  # the rows ending in this step
                rows = result.setdefault("rows", {})
                rows.update({b: y[i] for i, b in enumerate(ragged[k].ends)})
                if k == len(chunks) - 1:
                    result["logits"] = torch.stack([rows[b] for b in sorted(rows)])
            elif result is not None and k == len(chunks) - 1:
                result["logits"] = y
        else:
            handle = send.isend(codec.encode(y), tag=k)
            record.send.append(handle)
            record.bytes_sent += handle.nbytes
            in_flight.append(handle)
            if not overlapped or len(in_flight) > 2:  # blocking send, or both send buffers busy
                t0 = clock.mark()
                in_flight.popleft().wait()
                record.send_wait.append((t0, clock.mark()))
        yield k
    while in_flight:
        t0 = clock.mark()
        in_flight.popleft().wait()
        record.send_wait.append((t0, clock.mark()))


# ---- metrics ---------------------------------------------------------------------------------------------------

def _span(pairs) -> float:
    return sum(b - a for a, b in pairs)


def summarize(records: list[StageRecord], t_start: float, t_end: float) -> dict:
    """Figures of one run from its stage records (absolute seconds on one time base)."""
    S = len(records)
    makespan = t_end - t_start
    busy = [_span(r.compute) for r in records]
    exposed = []
    for s, r in enumerate(records):
        e = _span(r.send_wait)
        if s > 0:  # a receive wait is communication only once the sender had started the send
            up = records[s - 1].send
            for k, (a, b) in enumerate(r.recv_wait):
                e += max(0.0, b - max(a, up[k][0]))
        exposed.append(e)
    n_chunks = len(records[0].chunks)
    per_chunk = [max(r.compute[k][1] - r.compute[k][0] for r in records) for k in range(n_chunks)]
    return dict(
        ttft_s=makespan,
        compute_s=busy,
        exposed_comm_s=sum(exposed),
        exposed_comm_per_stage_s=exposed,
        recv_wait_s=[_span(r.recv_wait) for r in records],
        send_wait_s=[_span(r.send_wait) for r in records],
        send_time_s=[_span(r.send) for r in records],
        bubble_fraction=1.0 - sum(busy) / (S * makespan) if makespan > 0 else 0.0,
        # the run's compute split evenly over the stages, no bubble: no schedule of this work is faster
        ideal_s=sum(busy) / S,
        # the makespan if every stage took the slowest stage's time on each chunk: an estimate, not a bound (stages
        # that differ, or blocking sends, take longer or shorter); `simulate.free_link_bound` is the bound
        equal_stage_formula_s=sum(per_chunk) + (S - 1) * max(per_chunk),
        per_chunk_stage_max_s=per_chunk,
        bytes_per_boundary=[r.bytes_sent for r in records[:-1]],
        host_syncs_per_stage=[r.host_syncs for r in records],
        **({"host_enqueue_s_per_stage": [r.host_enqueue_s or 0.0 for r in records]}
           if any(r.host_enqueue_s is not None for r in records) else {}),
    )


def timeline(records: list[StageRecord], t0: float) -> list[dict]:
    """Timeline events (seconds from t0): one row per stage and lane (compute / send / wait)."""
    events = []
    for r in records:
        for k, (a, b) in enumerate(r.compute):
            events.append(dict(stage=r.stage, lane="compute", name=f"chunk {k}", start=a - t0, end=b - t0))
        for k, (a, b) in enumerate(r.send):
            events.append(dict(stage=r.stage, lane="send", name=f"send {k}", start=a - t0, end=b - t0))
        for k, (a, b) in enumerate(r.recv_wait):
            if b - a > 1e-6:
                events.append(dict(stage=r.stage, lane="wait", name=f"recv wait {k}", start=a - t0, end=b - t0))
        for k, (a, b) in enumerate(r.send_wait):
            if b - a > 1e-6:
                events.append(dict(stage=r.stage, lane="wait", name="send wait", start=a - t0, end=b - t0))
    return events
