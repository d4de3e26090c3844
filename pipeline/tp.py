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
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from .config import ModelConfig
from .weights import LazyState


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
        if name.endswith("self_attn.o_proj.bias"):  # added once, after the sum
            return t if rank == 0 else torch.zeros_like(t)
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            return t[cols]
        if name.endswith("mlp.down_proj.weight"):
            return t[:, cols]
        return t  # embedding, norms, head: replicated
    return LazyState(list(state), part)


class Reducer:
    """The all-reduce (sum) of a stage's TP group, with its accounting: calls, payload bytes (one rank's tensor)
    and seconds spent in it (host wall time, so on CPU the time the rank was blocked)."""

    def __init__(self, tp: int):
        self.tp = tp
        self.reset()

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._reduce(t)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.bytes += t.numel() * t.element_size()
        return out

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict:
        """payload: bytes each rank contributes; wire: what a ring all-reduce moves per rank, 2(T-1)/T of that."""
        wire = 2 * (self.tp - 1) * self.bytes // self.tp
        return dict(calls=self.calls, payload_bytes=self.bytes, wire_bytes=wire, seconds=self.seconds)


class DistReducer(Reducer):
    """torch.distributed all-reduce over `group` (gloo: CPU tensors, NCCL: CUDA tensors; a collective on NCCL runs
    on the current stream, so the compute stream orders it)."""

    def __init__(self, tp: int, group):
        self.group = group
        super().__init__(tp)

    def _reduce(self, t):
        dist.all_reduce(t, group=self.group)
        return t


class LocalGroup:
    """T ranks as threads of one process: an all-reduce is a barrier, a sum in rank order (the same on every rank,
    so the ranks stay bit-identical) and a second barrier before anyone reuses the slots."""

    def __init__(self, tp: int, timeout_s: float = 60.0):
        self.tp = tp
        self.slots: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=timeout_s)
        self.total: torch.Tensor | None = None

    def abort(self) -> None:
        self.barrier.abort()

    def all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t
        if self.barrier.wait() == 0:
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.total = total
        self.barrier.wait()
        t.copy_(self.total)
        self.barrier.wait()  # every rank has its copy: the slots and the total may be reused
        return t


class LocalReducer(Reducer):
    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank = group, rank
        super().__init__(group.tp)

    def _reduce(self, t):
        return self.group.all_reduce(self.rank, t)
