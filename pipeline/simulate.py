"""Discrete-event model of S stages × chunks × links, for the same schedules the engine runs (`schedule.py`).

Events follow the engine's rules exactly, so a simulated run and a measured one are read the same way:
- a stage's host runs one thing at a time: receive a chunk, compute it, post (and in blocking modes wait for) its
  send;
- a transfer starts when the sender has posted it, the link's lane is free (sends of one link are serial), and the
  receiver has posted the matching receive (rendezvous, as gloo and NCCL point-to-point do); it lasts
  `link.delay_s(bytes)`;
- `naive` and `chunked`: blocking sends, the receive posted when the receiving stage reaches the chunk;
  `overlapped`: receives pre-posted two ahead, at most two sends in flight (the third waits for the oldest);
- `unchunked`: the whole model on one device, no link.

Every event has a fixed predecessor set, so they are evaluated in (chunk, stage) order instead of through a
priority queue: the same times, fewer lines. The result carries `StageRecord`s, so `schedule.summarize` and
`schedule.timeline` give the figures and the picture exactly as for a measured run.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import checks
from .link import LinkModel
from .schedule import StageRecord, check_mode, chunk_starts, mode_chunks, summarize, timeline


@dataclass
class Simulation:
    mode: str
    chunks: list[int]
    records: list[StageRecord]
    makespan_s: float
    metrics: dict  # as schedule.summarize
    events: list[dict]  # as schedule.timeline


def simulate(mode: str, chunks: list[int], costs, link: LinkModel = LinkModel(), bytes_per_token: int = 0,
             start_pos: int = 0) -> Simulation:
    """`costs`: one callable per stage, `cost(x, p)` -> seconds for a chunk of x tokens after p (see `costs.py`).
    `bytes_per_token`: what one token's hidden state weighs on the link (B·H·itemsize). For `naive` and
    `unchunked` the chunk list is ignored: the whole prompt is one chunk."""
    check_mode(mode)
    chunks = checks.int_list("chunk sizes", chunks, 1)
    if not isinstance(costs, (list, tuple)) or not costs:
        raise ValueError(f"need one cost per stage, got {checks.shown(costs)}")
    for s, c in enumerate(costs):
        if not callable(c):
            raise TypeError(f"costs[{s}] must be a callable cost(x, p) -> seconds, got {checks.shown(c)}")
    if not isinstance(link, LinkModel):
        raise TypeError(f"link must be a LinkModel, got {checks.shown(link)}")
    bytes_per_token = checks.integer("bytes_per_token", bytes_per_token, 0)
    start_pos = checks.integer("start_pos", start_pos, 0)
    costs = [_checked(c, f"costs[{s}]") for s, c in enumerate(costs)]
    chunks = mode_chunks(mode, chunks)
    if mode == "unchunked":  # one device runs every layer
        costs = [lambda x, p, cs=tuple(costs): sum(float(c(x, p)) for c in cs)]
    S = len(costs)
    starts = chunk_starts(chunks, start_pos)
    xfer_s = [link.delay_s(c * bytes_per_token) for c in chunks]
    overlapped = mode == "overlapped"

    records = [StageRecord(s, list(chunks)) for s in range(S)]
    free = [0.0] * S  # when each stage's host is next free
    lane_free = [0.0] * S  # each stage's outgoing link
    posted_at: list[dict[int, float]] = [dict() for _ in range(S)]  # sender posted chunk k's send
    recv_posted: list[dict[int, float]] = [{0: 0.0, 1: 0.0} if overlapped else {} for _ in range(S)]
    xfer_end: list[dict[int, float]] = [dict() for _ in range(S)]
    in_flight: list[list[int]] = [[] for _ in range(S)]

    for k, (c, p) in enumerate(zip(chunks, starts)):
        for s in range(S):
            if s > 0:  # receive chunk k from stage s-1
                post = recv_posted[s].get(k, free[s])
                lane_start = max(posted_at[s - 1][k], lane_free[s - 1])  # the lane takes the send up
                end = max(lane_start, post) + xfer_s[k]  # ... and moves data once the receive is posted
                lane_free[s - 1] = xfer_end[s - 1][k] = end
                records[s - 1].send.append((lane_start, end))
                if not overlapped:  # the sender was blocked in its send until now
                    records[s - 1].send_wait.append((posted_at[s - 1][k], end))
                    free[s - 1] = end
                records[s].recv_wait.append((free[s], max(free[s], end)))
                free[s] = max(free[s], end)
            t = float(costs[s](c, p))
            records[s].compute.append((free[s], free[s] + t))
            free[s] += t
            if overlapped and s > 0:
                recv_posted[s][k + 2] = free[s]  # this chunk's input buffer is free again
            if s < S - 1:
                posted_at[s][k] = free[s]
                records[s].bytes_sent += c * bytes_per_token
                if overlapped:
                    in_flight[s].append(k)
                    if len(in_flight[s]) > 2:  # both send buffers busy: wait for the oldest send
                        old = in_flight[s].pop(0)
                        _wait_send(records[s], free, s, xfer_end[s][old])
    for s in range(S - 1):  # drain: overlapped stages wait for their last sends
        for old in in_flight[s]:
            _wait_send(records[s], free, s, xfer_end[s][old])
    makespan = max(free)
    return Simulation(mode, list(chunks), records, makespan, summarize(records, 0.0, makespan),
                      timeline(records, 0.0))


def _checked(cost, name):
    """`cost` whose every answer is checked: finite seconds >= 0 (a NaN would silently poison the schedule)."""
    return lambda x, p: float(checks.seconds(name, cost, x, p))


class MeasuredCost:
    """One stage's compute times in one measured run, by chunk: `cost(x, p)` is what that stage took on the chunk
    of x tokens starting at position p (with its boundary's collective over the TP group first, where it took one).
    Given to `simulate` in place of a cost model it replays the run (`replay`)."""

    def __init__(self, record: StageRecord, start_pos: int = 0):
        if len(record.compute) != len(record.chunks):
            raise ValueError(f"stage {record.stage} recorded {len(record.compute)} compute intervals for "
                             f"{len(record.chunks)} chunks: not a complete run")
        if record.boundary and len(record.boundary) != len(record.chunks):
            raise ValueError(f"stage {record.stage} recorded {len(record.boundary)} boundary collectives for "
                             f"{len(record.chunks)} chunks: not a complete run")
        starts = chunk_starts(record.chunks, start_pos)
        boundary = record.boundary or [0.0] * len(record.chunks)
        self.times = {(x, p): b - a + t for x, p, (a, b), t in zip(record.chunks, starts, record.compute, boundary)}

    def __call__(self, x, p) -> float:
        try:
            return self.times[(int(x), int(p))]
        except KeyError:
            raise ValueError(f"the measured run has no chunk of {int(x)} tokens at position {int(p)}") from None


def replay(mode: str, records: list[StageRecord], link: LinkModel = LinkModel(), bytes_per_token: int = 0,
           start_pos: int = 0) -> Simulation:
    """The simulator on one measured run's own compute times: its makespan differs from the measured one only by
    what the event model gets wrong (dependencies, blocking and rendezvous, the link model, host overhead between
    events), not by the cost model or by how noisy the machine was during that run."""
    if not records:
        raise ValueError("need the measured run's stage records, got none")
    return simulate(mode, list(records[0].chunks), [MeasuredCost(r, start_pos) for r in records], link,
                    bytes_per_token, start_pos)


def _wait_send(record: StageRecord, free: list[float], s: int, end: float) -> None:
    record.send_wait.append((free[s], max(free[s], end)))
    free[s] = max(free[s], end)


def free_link_bound(mode: str, records: list[StageRecord], start_pos: int = 0) -> float:
    """The least time the schedule of one measured run can take: the run replayed on its own per-(stage, chunk)
    compute times with a link that costs nothing. Whatever the measured TTFT adds to it is communication, host
    overhead and waiting the event model does not explain."""
    return replay(mode, records, LinkModel(), 0, start_pos).makespan_s

