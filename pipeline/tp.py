"""Tensor parallelism inside a stage, Megatron style: each of a stage's T ranks holds 1/T of every layer.

- attention by heads: rank t owns query heads [t·Hq/T, (t+1)·Hq/T) and their KV heads (with fewer KV heads than
  ranks, each KV head is replicated over the T/Hkv ranks whose query heads use it, as vLLM does); `wqkv` is
  column-parallel, `wo` row-parallel;
- the MLP by intermediate columns: `w13` (gate, up) column-parallel, `w2` row-parallel;
- the outputs of `wo` and `w2` are partial sums: two all-reduces of [B, C, H] per layer (the "reduce" traffic of
  prefill); biases of row-parallel layers are added once (on rank 0);
- embedding, norms and the head are replicated.

A `Reducer` is the all-reduce a block calls; it counts what it moves and how long it takes. Three kinds: none
(T = 1), `LocalReducer` (T ranks as threads of one process: tests and in-process runs on CPU) and `DistReducer`
(torch.distributed over a TP process group: gloo or NCCL).

Between TP stages a boundary crosses (`TP_BOUNDARIES`) between matching TP ranks, once from TP rank 0 and then
broadcast (`BroadcastRecv`, `NoSend`), or as 1/T of its tokens per rank pair, all-gathered by the receiving stage
(`ShardSend`, `ShardRecv`). Under sequence parallelism the sharded crossing needs no all-gather at either end: each
rank sends the slice it holds and the next stage computes on the slice it receives (the model slices what it sends,
`Transformer.shard_boundaries`; `ShardRecv(keep=...)` leaves a sequence-parallel chunk's slice as it arrived).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .config import ModelConfig
from .link import LinkModel
from .weights import LazyState


# how a stage's TP ranks combine the row-parallel partial sums: a blocking all-reduce after wo and after w2 (serial);
# the chunk in two token halves, each half's all-reduce hidden behind the other half's compute (overlap, ISO); or
# reduce-scatter + all-gather with the norms on 1/T of the tokens (sequence, Megatron sequence parallelism)
TP_COMMS = ("serial", "overlap", "sequence")


def check_tp_comm(tp_comm: str) -> str:
    if tp_comm not in TP_COMMS:
        raise ValueError(f"unknown tp_comm {tp_comm!r}; choose one of {', '.join(TP_COMMS)}")
    return tp_comm


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """What a split over `tp` ranks needs: whole query heads and MLP columns per rank, and KV heads that either
    split evenly or replicate evenly."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if cfg.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide the {cfg.num_heads} query heads (tensor parallelism splits "
                         f"attention by heads)")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide the MLP's intermediate size {cfg.intermediate_size}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"tp={tp} and {cfg.num_kv_heads} KV heads: KV heads must split evenly over the ranks or "
                         f"replicate evenly (tp a multiple of the KV heads)")


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The per-rank shape of a layer: Hq/T query heads, max(1, Hkv/T) KV heads, I/T MLP columns."""
    if tp == 1:
        return cfg
    return cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
                       intermediate_size=cfg.intermediate_size // tp)


def kv_heads_of(cfg: ModelConfig, rank: int, tp: int) -> range:
    """The KV heads rank `rank` holds (one replicated head when there are fewer KV heads than ranks)."""
    if cfg.num_kv_heads >= tp:
        n = cfg.num_kv_heads // tp
        return range(rank * n, (rank + 1) * n)
    h = rank // (tp // cfg.num_kv_heads)
    return range(h, h + 1)


def shard_state(state, cfg: ModelConfig, rank: int, tp: int):
    """Hugging Face-named full tensors -> this rank's slices, each made when asked for (a lazy state stays lazy)."""
    if tp == 1:
        return state
    D, I = cfg.head_dim, cfg.intermediate_size
    hq = cfg.num_heads // tp
    q_rows = slice(rank * hq * D, (rank + 1) * hq * D)
    kv = kv_heads_of(cfg, rank, tp)
    kv_rows = slice(kv.start * D, kv.stop * D)
    cols = slice(rank * (I // tp), (rank + 1) * (I // tp))

    def part(name):
        t = state[name]
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return t[q_rows]
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias",
                          "self_attn.v_proj.bias")):
            return t[kv_rows]
        if name.endswith("self_attn.o_proj.weight"):
            return t[:, q_rows]
        if name.endswith(("self_attn.o_proj.bias", "mlp.down_proj.bias")):  # added once, after the sum
            return t if rank == 0 else torch.zeros_like(t)
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
            return t[cols]
        if name.endswith("mlp.down_proj.weight"):
            return t[:, cols]
        return t  # embedding, norms, head: replicated
    return LazyState(list(state), part)


class Pending:
    """An all-reduce in flight (`Reducer.start`): `wait()` returns the summed tensor, blocking (CPU) or making the
    current stream wait (NCCL) only now; the time blocked here is the reduce's exposed time. With an emulated
    interconnect the result is usable `delay` seconds after the collective itself completed and the emulated lane
    finished the collectives posted before it: one transfer at a time, as one link carries them (gloo would
    otherwise run two on its two worker threads side by side, twice the emulated bandwidth)."""

    def __init__(self, reducer: "Reducer", work, t: torch.Tensor, delay: float = 0.0):
        self.reducer, self.work, self.t, self.delay = reducer, work, t, delay
        self.index = len(reducer.log) - 1  # this call's entry in the reducer's per-call log
        self.arrived = None
        if delay > 0:  # when the real collective completes the emulated transfer starts, once the lane is free
            def lane():
                if work is not None:
                    work.wait()
                end = max(time.perf_counter(), reducer.lane_free) + delay
                reducer.lane_free = end
                return end
            self.arrived = reducer.watcher().submit(lane)  # one watcher thread: the lane's order is the posts'


    def wait(self) -> torch.Tensor:
        if self.work is not None or self.arrived is not None:
            t0 = time.perf_counter()
            if self.arrived is not None:
                rest = self.arrived.result() - time.perf_counter()
                if rest > 0:
                    time.sleep(rest)
            else:
                self.work.wait()
            waited = time.perf_counter() - t0
            self.reducer.seconds += waited
            self.reducer.log[self.index] += waited
            self.work = self.arrived = None
        return self.t


class Reducer:
    """The collectives of a stage's TP group, with their accounting: calls, payload bytes (the activation each rank
    contributes to a sum: one rank's [B, C, H]), bytes a ring moves per rank ("wire") and seconds the rank spent
    blocked in them (host wall time: on CPU the time the rank waited; with `start` only the part not hidden).
    `model`: an emulated interconnect (as for stage links): each collective then takes latency + its wire bytes /
    bandwidth more, counted from when the real one completed, with the host free meanwhile (a DMA or NVLink
    transfer does not use the CPU; on GPUs NCCL's kernels do take SMs, which this leaves out).

    - `__call__(t)`: all-reduce (sum) in place, blocking; a ring moves 2(T-1)/T of the payload;
    - `start(t)`: the same, asynchronous: a `Pending` to wait on later (ISO-style overlap);
    - `reduce_scatter(t, payload)` / `all_gather(shard)`: sequence parallelism's pair, along dim 1 (tokens) of
      [B, T·n, H]; each moves (T-1)/T of the full tensor, so the pair moves what one all-reduce does."""

    def __init__(self, tp: int, model: LinkModel = LinkModel()):
        self.tp, self.model = tp, model
        self._watcher = None
        self.reset()

    def reset(self) -> None:
        self.calls, self.bytes, self.wire, self.seconds = 0, 0, 0, 0.0
        self.bcast_calls, self.bcast_bytes, self.bcast_seconds = 0, 0, 0.0  # boundary broadcasts (tp_boundary)
        self.gather_calls, self.gather_bytes, self.gather_seconds = 0, 0, 0.0  # sharded boundaries' all-gathers
        self.log: list[float] = []  # seconds blocked, per call
        self.lane_free = 0.0  # emulated interconnect: when its last transfer ends

    def watcher(self) -> ThreadPoolExecutor:
        if self._watcher is None:
            self._watcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tp-wait")
        return self._watcher

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.shutdown(wait=True)

    def _count(self, payload: int, wire: int) -> float:
        """Counts one collective; returns its emulated time (0 without emulation: `model`)."""
        self.calls += 1
        self.bytes += payload
        self.wire += wire
        return self.model.delay_s(wire) if self.model.active else 0.0

    def _paid(self, t0: float, delay: float) -> None:
        """A blocking collective done: pays the emulated interconnect's time, counts the time blocked."""
        if delay > 0:
            end = max(time.perf_counter(), self.lane_free) + delay
            self.lane_free = end
            time.sleep(max(0.0, end - time.perf_counter()))
        self.seconds += time.perf_counter() - t0
        self.log.append(time.perf_counter() - t0)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._reduce(t)
        n = _nbytes(t)
        self._paid(t0, self._count(n, 2 * (self.tp - 1) * n // self.tp))
        return out

    def start(self, t: torch.Tensor) -> Pending:
        t0 = time.perf_counter()
        work = self._start(t)
        self.seconds += time.perf_counter() - t0
        self.log.append(time.perf_counter() - t0)
        n = _nbytes(t)
        return Pending(self, work, t, self._count(n, 2 * (self.tp - 1) * n // self.tp))

    def reduce_scatter(self, t: torch.Tensor, payload: int | None = None) -> torch.Tensor:
        """t [B, T·n, H] (each rank's partial sum) -> [B, n, H]: rows [rank·n, (rank+1)·n) of the sum. `payload`:
        the bytes to count as reduced (the unpadded activation; default all of t)."""
        if t.shape[1] % self.tp:
            raise ValueError(f"reduce_scatter needs dim 1 ({t.shape[1]}) divisible by tp={self.tp}")
        t0 = time.perf_counter()
        out = self._reduce_scatter(t)
        n = _nbytes(t)
        self._paid(t0, self._count(n if payload is None else payload, (self.tp - 1) * n // self.tp))
        return out

    def all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        """shard [B, n, H] of every rank -> [B, T·n, H] in rank order."""
        t0 = time.perf_counter()
        out = self._all_gather(shard)
        self._paid(t0, self._count(0, (self.tp - 1) * _nbytes(shard)))
        return out

    def _lane(self, nbytes: int) -> None:
        """A boundary collective done: over an emulated interconnect it takes latency + `nbytes` / bandwidth more on
        the same lane as the all-reduces."""
        if self.model.active:
            end = max(time.perf_counter(), self.lane_free) + self.model.delay_s(nbytes)
            self.lane_free = end
            time.sleep(max(0.0, end - time.perf_counter()))

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """TP rank 0's `t` to every rank of the group, in place (a stage boundary received once: tp_boundary
        'broadcast'). Counted apart from the all-reduces; the lane carries its bytes once."""
        t0 = time.perf_counter()
        out = self._broadcast(t)
        n = _nbytes(t)
        self._lane(n)
        self.bcast_calls += 1
        self.bcast_bytes += n
        self.bcast_seconds += time.perf_counter() - t0
        return out

    def gather_boundary(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of a stage boundary, [B, n, W] each, all-gathered along dim 1 into [B, T·n, W] (a
        boundary received as 1/T per rank: tp_boundary 'sharded'). Counted apart from the all-reduces; a ring
        carries T-1 slices per rank."""
        t0 = time.perf_counter()
        out = self._all_gather(shard)
        self._lane((self.tp - 1) * _nbytes(shard))
        self.gather_calls += 1
        self.gather_bytes += _nbytes(out)
        self.gather_seconds += time.perf_counter() - t0
        return out

    def boundary_seconds(self) -> float:
        """Seconds so far in boundary collectives (broadcasts and all-gathers)."""
        return self.bcast_seconds + self.gather_seconds

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, t: torch.Tensor):
        """Posts the all-reduce; returns something with wait(), or None when it is already done."""
        self._reduce(t)
        return None

    def _reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict:
        return dict(calls=self.calls, payload_bytes=self.bytes, wire_bytes=self.wire, seconds=self.seconds,
                    broadcast_calls=self.bcast_calls, broadcast_bytes=self.bcast_bytes,
                    broadcast_seconds=self.bcast_seconds, gather_calls=self.gather_calls,
                    gather_bytes=self.gather_bytes, gather_seconds=self.gather_seconds)

    def snapshot(self) -> tuple[float, int, int, int]:
        return self.seconds, self.calls, self.bytes, len(self.log)

    def since(self, snap) -> tuple[float, int, int, tuple[float, ...]]:
        """(seconds, calls, payload bytes, seconds per call) since `snap`: one chunk's share."""
        return self.seconds - snap[0], self.calls - snap[1], self.bytes - snap[2], tuple(self.log[snap[3]:])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DistReducer(Reducer):
    """torch.distributed collectives over `group` (gloo: CPU tensors, NCCL: CUDA tensors). NCCL runs a collective
    on its own stream, ordered after the current stream's work; waiting on it makes the current stream wait, so
    `start` lets the compute stream run on while the reduce is in flight. gloo runs it on a worker thread."""

    def __init__(self, tp: int, group, model: LinkModel = LinkModel(), src: int = 0):
        self.group, self.src = group, src  # src: the global rank of the group's TP rank 0
        super().__init__(tp, model)

    def _reduce(self, t):
        dist.all_reduce(t, group=self.group)
        return t

    def _broadcast(self, t):
        dist.broadcast(t, src=self.src, group=self.group)
        return t

    def _start(self, t):
        return dist.all_reduce(t, group=self.group, async_op=True)

    # torch's single-tensor collectives split dim 0: tokens are moved there and back
    def _reduce_scatter(self, t):
        x = t.transpose(0, 1).contiguous()
        out = x.new_empty((x.shape[0] // self.tp,) + tuple(x.shape[1:]))
        _reduce_scatter_tensor(out, x, group=self.group)
        return out.transpose(0, 1).contiguous()

    def _all_gather(self, shard):
        x = shard.transpose(0, 1).contiguous()
        out = x.new_empty((x.shape[0] * self.tp,) + tuple(x.shape[1:]))
        _all_gather_tensor(out, x, group=self.group)
        return out.transpose(0, 1).contiguous()


# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor (which now warn) to *_single; 2.11 has only
# the old names
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class LocalGroup:
    """T ranks as threads of one process. A collective is a barrier, the combination of every rank's tensor in rank
    order (the same on every rank, so the ranks stay bit-identical) and a second barrier before anyone reuses the
    slots."""

    def __init__(self, tp: int, timeout_s: float = 60.0):
        self.tp = tp
        self.slots: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=timeout_s)

    def abort(self) -> None:
        self.barrier.abort()

    def _exchange(self, rank: int, t: torch.Tensor, combine) -> torch.Tensor:
        self.slots[rank] = t
        self.barrier.wait()
        out = combine(self.slots)  # every rank combines the same tensors in the same order
        self.barrier.wait()  # everyone has read the slots: they may be reused
        return out

    @staticmethod
    def _sum(slots):
        total = slots[0].clone()
        for other in slots[1:]:
            total += other
        return total

    def all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        return t.copy_(self._exchange(rank, t, self._sum))

    def reduce_scatter(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[1] // self.tp
        return self._exchange(rank, t, lambda slots: self._sum(slots)[:, rank * n:(rank + 1) * n].contiguous())

    def all_gather(self, rank: int, shard: torch.Tensor) -> torch.Tensor:
        return self._exchange(rank, shard, lambda slots: torch.cat(slots, dim=1))

    def broadcast(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        first = self._exchange(rank, t, lambda slots: slots[0].clone() if rank else None)
        return t if rank == 0 else t.copy_(first)


class LocalReducer(Reducer):
    """One thread-rank's collectives over a `LocalGroup` (`start` completes at once: the threads are the ranks)."""

    def __init__(self, group: LocalGroup, rank: int, model: LinkModel = LinkModel()):
        self.group, self.rank = group, rank
        super().__init__(group.tp, model)

    def _reduce(self, t):
        return self.group.all_reduce(self.rank, t)

    def _reduce_scatter(self, t):
        return self.group.reduce_scatter(self.rank, t)

    def _all_gather(self, shard):
        return self.group.all_gather(self.rank, shard)

    def _broadcast(self, t):
        return self.group.broadcast(self.rank, t)


# ---- how a stage boundary crosses between TP stages (tp_boundary) -----------------------------------------------
# "matching": each TP rank sends the whole boundary to the next stage's same TP rank (T sends); "broadcast": TP rank 0
# sends it once, the receiving stage broadcasts it over its TP group; "sharded": each TP rank sends 1/T of its tokens
# to its peer and the receiving stage all-gathers them (Megatron's scatter-gather: T sends of 1/T; a message of fewer
# tokens than T crosses whole, as with matching sends: `sliced`)

TP_BOUNDARIES = ("matching", "broadcast", "sharded")


def check_tp_boundary(name: str) -> str:
    if name not in TP_BOUNDARIES:
        raise ValueError(f"unknown tp_boundary {name!r}; choose one of {', '.join(TP_BOUNDARIES)}")
    return name


class NoSend:
    """The send end of a TP rank other than 0 when TP rank 0 alone sends its stage's boundary."""

    def isend(self, tensor: torch.Tensor, tag: int):
        from .link import Handle
        now = time.perf_counter()
        return Handle(lambda: None, 0, lambda: (now, now))

    def close(self) -> None:
        pass


class BroadcastRecv:
    """The receive end of a stage whose boundary arrives once: TP rank 0 receives it from the previous stage's TP
    rank 0 (`link`), then the stage's TP group broadcasts it from rank 0 (every rank calls `wait` in chunk order,
    so the broadcasts pair up like the all-reduces do)."""

    def __init__(self, link, reducer: Reducer, device):
        self.link, self.reducer, self.device = link, reducer, device

    def irecv(self, shape, dtype, tag: int, slot: int = 0):
        from .link import Handle
        if self.link is not None:
            inner = self.link.irecv(shape, dtype, tag, slot)
            return Handle(lambda: self.reducer.broadcast(inner.wait()), inner.nbytes)
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return Handle(lambda: self.reducer.broadcast(buf), 0)

    def close(self) -> None:
        pass


def sliced(tokens: int, tp: int) -> bool:
    """Whether a boundary message of `tokens` tokens crosses sharded boundaries as 1/T per rank pair: only when it
    has at least T tokens. A shorter one (a decode token) crosses whole on each rank pair's link, as matching sends
    do: slicing it would still cost every link one (padded) row and add an all-gather for nothing."""
    return tokens >= tp


def link_tokens(tokens: int, tp: int) -> int:
    """What each rank pair's link carries of a `tokens`-token message with sharded boundaries: ceil(tokens/T)
    rows, or all of a message too short to slice (`sliced`)."""
    return -(-tokens // tp) if sliced(tokens, tp) else tokens


def shard_tokens(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s slice of a boundary message [B, c, W] along its tokens: rows [rank·n, (rank+1)·n) with
    n = ceil(c/T), the last slices padded with zero rows (every rank sends n, the all-gather needs equal slices)."""
    c = t.shape[1]
    n = -(-c // tp)
    lo, hi = rank * n, min((rank + 1) * n, c)
    part = t[:, lo:hi] if lo < c else t[:, :0]
    if hi - lo < n:
        part = torch.nn.functional.pad(part, (0, 0, 0, n - max(0, hi - lo)))
    return part.contiguous()


class ShardSend:
    """The send end of TP rank `rank` with tp_boundary 'sharded': its 1/T of each message's tokens to its peer (a
    message of fewer tokens than T whole: `sliced`)."""

    def __init__(self, link, rank: int, tp: int):
        self.link, self.rank, self.tp = link, rank, tp

    def isend(self, tensor: torch.Tensor, tag: int):
        if not sliced(tensor.shape[1], self.tp):
            return self.link.isend(tensor, tag)
        return self.link.isend(shard_tokens(tensor, self.rank, self.tp), tag)

    def close(self) -> None:
        pass


class ShardRecv:
    """The receive end with tp_boundary 'sharded': this rank's 1/T of the tokens from its peer in the previous
    stage, then the stage's TP group all-gathers the slices into the whole message (every rank calls `wait` in
    chunk order, so the all-gathers pair up like the all-reduces do). A message of fewer tokens than T arrives
    whole (`sliced`). `keep(c)`: whether a message of c tokens stays the slice as it arrived (a sequence-parallel
    stage computes on it: no all-gather); default never."""

    def __init__(self, link, reducer: Reducer, keep=None):
        self.link, self.reducer, self.keep = link, reducer, keep

    def irecv(self, shape, dtype, tag: int, slot: int = 0):
        from .link import Handle
        B, c, W = shape
        inner = self.link.irecv((B, link_tokens(c, self.reducer.tp), W), dtype, tag, slot)
        if not sliced(c, self.reducer.tp) or (self.keep is not None and self.keep(c)):
            return inner
        return Handle(lambda: self.reducer.gather_boundary(inner.wait())[:, :c].contiguous(), inner.nbytes)

    def close(self) -> None:
        pass
