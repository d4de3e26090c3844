"""Chunk planner: where to cut a prompt so that the pipeline finishes first.

A chunk's cost grows with the prefix it attends to, so equal-size chunks are not equal-cost chunks, and in a
pipeline the slowest chunk paces every stage. With per-chunk times t_k (the slowest stage's, per-chunk overhead
included) and per-chunk send times l_k, an S-stage pipeline with overlapped sends finishes in about

    T = Σ_k t_k + (S − 1) · max_k (t_k + l_k)

(every chunk passes the first stage; the slowest chunk, with its send, once more through each further stage).
`plan_chunks` minimises T exactly by dynamic programming over chunk boundaries on a granularity: for a cap M on
t_k + l_k it finds the boundaries with the least Σ t_k among those with every chunk under the cap; T is then
minimised over every cap that can matter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import checks
from .link import LinkModel


MAX_BOUNDARIES = 1024  # candidate cut points: the DP tables are (N + 1)^2, the search O(caps · N^2)


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


def check_granularity(prompt_len: int, granularity: int, name: str = "granularity") -> None:
    """What `plan_chunks` needs of its boundary step (`name` is how the caller spells it): no larger than the
    prompt, and at most MAX_BOUNDARIES pieces of it."""
    if granularity > prompt_len:
        raise ValueError(f"{name} {granularity} is larger than the prompt ({checks.count(prompt_len, 'token')})")
    N = -(-prompt_len // granularity)
    if N > MAX_BOUNDARIES:
        raise ValueError(f"{name} {granularity} cuts a {prompt_len}-token prompt into {N} pieces; the planner "
                         f"takes up to {MAX_BOUNDARIES} ({name} >= {-(-prompt_len // MAX_BOUNDARIES)})")


def default_granularity(prompt_len: int, step: int = 32) -> int:
    """`step`, or the finest step the planner takes for a prompt so long that `step` would cut it into more than
    MAX_BOUNDARIES pieces; a prompt shorter than `step` is one piece (its plan one chunk)."""
    return min(prompt_len, max(step, -(-prompt_len // MAX_BOUNDARIES)))


def plan_chunks(prompt_len: int, cost, stages: int, granularity: int, *, link: LinkModel | None = None,
                bytes_per_token: int = 0, num_chunks: int | None = None, max_chunk: int | None = None,
                start_pos: int = 0) -> ChunkPlan:
    """Chunk boundaries (multiples of `granularity`, the last chunk ending at the prompt's end) that minimise the
    predicted makespan, exactly. `cost(x, p)` is the slowest stage's seconds for a chunk of x tokens after p (numpy
    broadcasting, see `costs`); `link` and `bytes_per_token` add each chunk's send; `num_chunks` fixes the number
    of chunks (otherwise the planner picks it, trading overhead against pipeline fill); `max_chunk` bounds a chunk
    (e.g. activation memory).

    For a cap M on t_k + l_k, f(M) = the least Σ t_k over plans whose every chunk is under the cap; the optimum is
    min over M of f(M) + (S − 1)·M, and only the distinct values of t_k + l_k matter as caps. A branch and bound
    over the sorted caps (f is non-increasing) finds that minimum exactly while solving the DP for few caps."""
    prompt_len = checks.positive_int("prompt_len", prompt_len)
    stages = checks.positive_int("stages", stages)
    granularity = checks.positive_int("granularity", granularity)
    if not callable(cost):
        raise TypeError(f"cost must be a callable cost(x, p) -> seconds, got {checks.shown(cost)}")
    if link is not None and not isinstance(link, LinkModel):
        raise TypeError(f"link must be a LinkModel or None, got {checks.shown(link)}")
    bytes_per_token = checks.integer("bytes_per_token", bytes_per_token, 0)
    start_pos = checks.integer("start_pos", start_pos, 0)
    check_granularity(prompt_len, granularity)
    if max_chunk is not None and checks.positive_int("max_chunk", max_chunk) < granularity:
        raise ValueError(f"max_chunk {max_chunk} is smaller than the granularity {granularity}")
    N = -(-prompt_len // granularity)
    bounds = np.array(list(range(0, prompt_len, granularity)) + [prompt_len], dtype=np.int64)
    if num_chunks is not None and not 1 <= checks.integer("num_chunks", num_chunks) <= N:
        raise ValueError(f"num_chunks must be in 1..{N} for {prompt_len} tokens at granularity {granularity}, "
                         f"got {num_chunks}")
    i, j = np.meshgrid(np.arange(N + 1), np.arange(N + 1), indexing="ij")
    x = (bounds[j] - bounds[i]).astype(np.float64)
    valid = j > i
    if max_chunk is not None:
        valid &= x <= max_chunk
    xs = np.where(valid, x, 1.0)
    ps = start_pos + bounds[i].astype(np.float64)
    t_all = np.broadcast_to(np.asarray(cost(xs, ps), dtype=np.float64), xs.shape)
    bad = valid & ~(np.isfinite(t_all) & (t_all >= 0))
    if bad.any():
        a, b = np.argwhere(bad)[0]
        checks.seconds("cost", cost, xs[a, b], ps[a, b])  # raises, naming the chunk
    T = np.where(valid, t_all, np.inf)  # T[a, b]: the chunk (bounds[a], bounds[b]]
    if link is not None:
        sizes = np.unique(xs[valid]).astype(np.int64)
        delay = {int(sz): link.delay_s(int(sz) * bytes_per_token) for sz in sizes}
        Lk = np.where(valid, np.vectorize(lambda sz: delay.get(int(sz), 0.0))(xs), 0.0)
    else:
        Lk = np.zeros_like(T)
    E = T + Lk

    def least_sums(caps: np.ndarray) -> np.ndarray:
        """f(M) for every cap M at once: best[c, j] = least Σ t over plans of bounds[0..j] under cap c."""
        best = np.full((len(caps), N + 1), np.inf)
        best[:, 0] = 0.0
        if num_chunks is None:
            for jj in range(1, N + 1):
                Tc = np.where(E[None, :jj, jj] <= caps[:, None], T[None, :jj, jj], np.inf)  # [caps, from]
                best[:, jj] = (best[:, :jj] + Tc).min(axis=1)
            return best[:, N]
        for _ in range(num_chunks):
            Tc = np.where(E[None] <= caps[:, None, None], T[None], np.inf)  # [caps, from, to]
            best = (best[:, :, None] + Tc).min(axis=1)
        return best[:, N]

    def path_under(cap: float) -> list[int]:
        """The boundary indices of the plan that attains f(cap)."""
        Tc = np.where(E <= cap, T, np.inf)
        if num_chunks is None:
            best = np.full(N + 1, np.inf)
            arg = np.zeros(N + 1, dtype=np.int64)
            best[0] = 0.0
            for jj in range(1, N + 1):
                cand = best[:jj] + Tc[:jj, jj]
                arg[jj] = int(np.argmin(cand))
                best[jj] = cand[arg[jj]]
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
        path, jj = [N], N
        for a in reversed(args):
            jj = int(a[jj])
            path.append(jj)
        return path[::-1]

    caps = np.unique(E[np.isfinite(E)])
    values: dict[int, float] = {}

    def f(k: int) -> float:  # least Σ t under cap caps[k], memoised
        if k not in values:
            values[k] = float(least_sums(caps[k:k + 1])[0])
        return values[k]

    if not np.isfinite(f(len(caps) - 1)):
        raise ValueError(f"no chunk plan satisfies the constraints (max_chunk={max_chunk}, num_chunks={num_chunks})")
    lo, hi = 0, len(caps) - 1  # the least feasible cap (feasibility grows with the cap): bisection
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if np.isfinite(f(mid)) else (mid + 1, hi)
    first, last = lo, len(caps) - 1
    if stages == 1:  # no pipeline fill: the least total work wins
        best_k = last
    else:
        # Branch and bound over the sorted caps. f is non-increasing, so on caps[a..b] the objective
        # f(M) + (S-1)·M is at least f(caps[b]) + (S-1)·caps[a]; and where f(caps[a]) == f(caps[b]) it is constant,
        # and the objective is least at caps[a]. Every interval that could hold a better plan is split.
        g = lambda k: f(k) + (stages - 1) * float(caps[k])  # noqa: E731
        best_k = min((first, last), key=g)
        todo = [(first, last)]
        while todo:
            a, b = todo.pop()
            if b - a <= 1 or f(a) == f(b) or f(b) + (stages - 1) * float(caps[a]) >= g(best_k):
                continue
            m = (a + b) // 2
            if g(m) < g(best_k):
                best_k = m
            todo += [(a, m), (m, b)]
        best_k = min((k for k in values if first <= k and np.isfinite(values[k])), key=lambda k: (g(k), k))
    best_cap = float(caps[best_k])
    path = path_under(best_cap)
    steps = list(zip(path[:-1], path[1:]))
    t = np.array([T[a, b] for a, b in steps])
    e = np.array([E[a, b] for a, b in steps])
    chunks = [int(bounds[b] - bounds[a]) for a, b in steps]
    return ChunkPlan(chunks, float(t.sum() + (stages - 1) * e.max()), [float(v) for v in t])
