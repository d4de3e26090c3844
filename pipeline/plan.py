"""Chunk planner: where to cut a prompt so that the pipeline finishes first.

A chunk's cost grows with the prefix it attends to, so equal-size chunks are not equal-cost chunks, and in a
pipeline the slowest chunk paces every stage. With per-chunk times t_k (the slowest stage's, per-chunk overhead
included) and per-chunk send times l_k, an S-stage pipeline with overlapped sends finishes in about

    T = Σ_k t_k + (S − 1) · max_k (t_k + l_k)

(every chunk passes the first stage; the slowest chunk, with its send, once more through each further stage).
`plan_chunks` minimises T by dynamic programming over chunk boundaries on a granularity: for a cap M on
t_k + l_k it finds the boundaries with the least Σ t_k among those with every chunk under the cap; T is then
minimised over the caps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .link import LinkModel


@dataclass(frozen=True)
class ChunkPlan:
    chunks: list[int]
    predicted_s: float  # T above, for these chunks
    per_chunk_s: list[float]  # t_k


def _per_chunk(chunks, cost, link, bytes_per_token, start_pos):
    x = np.asarray(chunks, dtype=np.float64)
    p = start_pos + np.concatenate([[0.0], np.cumsum(x)[:-1]])
    t = np.broadcast_to(cost(x, p), x.shape).astype(np.float64)
    lk = np.array([link.delay_s(int(c) * bytes_per_token) for c in chunks]) if link is not None else np.zeros_like(t)
    return t, lk


def predicted_makespan(chunks: list[int], cost, stages: int, link: LinkModel | None = None, bytes_per_token: int = 0,
                       start_pos: int = 0) -> float:
    """T = Σ t_k + (S−1)·max(t_k + l_k) for a given chunk list (the planner's objective)."""
    t, lk = _per_chunk(chunks, cost, link, bytes_per_token, start_pos)
    return float(t.sum() + (stages - 1) * (t + lk).max())


def plan_chunks(prompt_len: int, cost, stages: int, granularity: int, *, link: LinkModel | None = None,
                bytes_per_token: int = 0, num_chunks: int | None = None, max_chunk: int | None = None,
                start_pos: int = 0, max_caps: int = 256) -> ChunkPlan:
    """Chunk boundaries (multiples of `granularity`, the last chunk ending at the prompt's end) that minimise the
    predicted makespan. `cost(x, p)` is the slowest stage's seconds for a chunk of x tokens after p (numpy
    broadcasting, see `costs`); `link` and `bytes_per_token` add each chunk's send; `num_chunks` fixes the number
    of chunks (otherwise the planner picks it, trading overhead against pipeline fill); `max_chunk` bounds a chunk
    (e.g. activation memory). Caps are tried exhaustively up to `max_caps` distinct values, otherwise on quantiles
    refined around the best."""
    for name, v in (("prompt_len", prompt_len), ("stages", stages), ("granularity", granularity)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if granularity > prompt_len:
        raise ValueError(f"granularity {granularity} is larger than the prompt ({prompt_len} tokens)")
    if start_pos < 0:
        raise ValueError(f"start_pos must be >= 0, got {start_pos}")
    if max_chunk is not None and max_chunk < granularity:
        raise ValueError(f"max_chunk {max_chunk} is smaller than the granularity {granularity}")
    bounds = np.array(list(range(0, prompt_len, granularity)) + [prompt_len], dtype=np.int64)
    N = len(bounds) - 1
    if num_chunks is not None and not 1 <= num_chunks <= N:
        raise ValueError(f"num_chunks must be in 1..{N} for {prompt_len} tokens at granularity {granularity}, "
                         f"got {num_chunks}")
    i, j = np.meshgrid(np.arange(N + 1), np.arange(N + 1), indexing="ij")
    x = (bounds[j] - bounds[i]).astype(np.float64)
    valid = j > i
    if max_chunk is not None:
        valid &= x <= max_chunk
    xs = np.where(valid, x, 1.0)
    T = np.where(valid, np.broadcast_to(cost(xs, start_pos + bounds[i].astype(np.float64)), xs.shape), np.inf)
    if link is not None:
        sizes = np.unique(xs[valid]).astype(np.int64)
        delay = {int(s): link.delay_s(int(s) * bytes_per_token) for s in sizes}
        Lk = np.where(valid, np.vectorize(lambda s: delay.get(int(s), 0.0))(xs), 0.0)
    else:
        Lk = np.zeros_like(T)
    E = T + Lk

    def best_path(cap: float):
        Tc = np.where(E <= cap, T, np.inf)
        if num_chunks is None:
            best = np.full(N + 1, np.inf)
            arg = np.zeros(N + 1, dtype=np.int64)
            best[0] = 0.0
            for jj in range(1, N + 1):
                cand = best[:jj] + Tc[:jj, jj]
                arg[jj] = int(np.argmin(cand))
                best[jj] = cand[arg[jj]]
            if not np.isfinite(best[N]):
                return None
            path, jj = [N], N
            while jj:
                jj = arg[jj]
                path.append(jj)
            return path[::-1]
        best = np.full(N + 1, np.inf)
        best[0] = 0.0
        args = []
        for _ in range(num_chunks):
            cand = best[:, None] + Tc  # [from, to]
            a = np.argmin(cand, axis=0)
            args.append(a)
            best = cand[a, np.arange(N + 1)]
        if not np.isfinite(best[N]):
            return None
        path, jj = [N], N
        for a in reversed(args):
            jj = int(a[jj])
            path.append(jj)
        return path[::-1]

    def objective(path):
        steps = list(zip(path[:-1], path[1:]))
        t = np.array([T[a, b] for a, b in steps])
        e = np.array([E[a, b] for a, b in steps])
        return float(t.sum() + (stages - 1) * e.max()), t

    caps_all = np.unique(E[np.isfinite(E)])
    if stages == 1:
        caps_all = caps_all[-1:]
    caps = caps_all if len(caps_all) <= max_caps else np.quantile(caps_all, np.linspace(0, 1, max_caps))
    best_obj, best_p = np.inf, None

    def try_caps(cs):
        nonlocal best_obj, best_p
        for cap in cs:
            path = best_path(cap)
            if path is not None:
                obj, _ = objective(path)
                if obj < best_obj - 1e-15:
                    best_obj, best_p = obj, path
    try_caps(caps)
    if len(caps_all) > max_caps and best_p is not None:  # refine between the neighbours of the best quantile cap
        e_best = max(E[a, b] for a, b in zip(best_p[:-1], best_p[1:]))
        k = int(np.searchsorted(caps, e_best))
        lo, hi = caps[max(0, k - 1)], caps[min(len(caps) - 1, k + 1)]
        inner = caps_all[(caps_all > lo) & (caps_all < hi)]
        if len(inner) > max_caps:
            inner = inner[np.linspace(0, len(inner) - 1, max_caps).astype(np.int64)]
        try_caps(inner)
    if best_p is None:
        raise ValueError(f"no chunk plan satisfies the constraints (max_chunk={max_chunk}, num_chunks={num_chunks})")
    chunks = [int(bounds[b] - bounds[a]) for a, b in zip(best_p[:-1], best_p[1:])]
    _, t = objective(best_p)
    return ChunkPlan(chunks, best_obj, [float(v) for v in t])
