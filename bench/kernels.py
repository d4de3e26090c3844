"""Kernel benchmark, as providers against a baseline with accuracy checked in the same run:
- chunk_attention against its fairest peers on the same work (`attention_peers`: SDPA flash / efficient / cuDNN with
  a bottom-right causal bias and native GQA, flex_attention compiled with a block mask; the old dense-mask,
  repeated-K/V SDPA kept only as a labelled row), in TFLOP/s counting only visible query-key pairs, with a large
  bf16 GEMM measured on the same GPU as the ceiling; the shapes include the planner's (`planner_shapes`);
- the paged, varlen chunk_attention on serving-like batches (rows of different prefixes and chunks, pages of 16
  and 256) against the dense kernel and SDPA run once per row, and flex_attention once over the packed rows
  (`bench_paged`);
- RMSNorm (+residual), RoPE and SwiGLU in GB/s against torch eager, with a device-to-device copy as the ceiling;
- the host's time to enqueue one pipeline stage's chunk (eager, and as `--cuda-graphs` replays it), against the
  device's time for it (`bench_layer_host`).

    python -m bench kernels [--out bench/results/<gpu>]

Needs a GPU for figures worth reading (without one it says so and exits 0). Every function takes `device` and a
`timer`, so the same code runs on CPU under Triton's interpreter in the tests, on tiny shapes.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
import warnings

import torch

from pipeline.costs import window_pairs  # the pairs a sliding window leaves a chunk (the window rows' TFLOP/s)

# The device-bound shapes first, the launch-bound ones (prefix 0 with short chunks, decode-like) after them: their
# eager times read the host, and the first shape of the H200 run (0/256, measured right after the GPU tests' process
# ended) found it twice as slow as every later shape did (the launcher's Python 57 us against ~25). The last two: GQA
# packing and split-KV territory.
ATTENTION_SHAPES = ((16384, 2048), (0, 2048), (4096, 1024), (32768, 256), (32768, 4096), (32768, 128), (0, 256),
                    (0, 64), (32768, 16), (32768, 1))
TARGET_SHAPE = (16384, 2048)  # prefix, chunk: where the targets are set
# H100, bf16, B=1, 32 query / 8 KV heads, d128: at least the best fair peer at every shape, 560 TFLOP/s at 16k/2k
TARGETS = dict(attention_tflops=560.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8)


def gpu_timer(fn) -> float:
    """Median milliseconds of `fn` (triton.testing.do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median")


def cpu_timer(fn, repeats: int = 3) -> float:
    """Median milliseconds on the host clock (tests and CPU smoke runs only)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def launch_cost(fn, device, timer=gpu_timer, calls: int = 50, graph: bool = True, stubbed: bool = True) -> dict:
    """The Python launcher's host time per call, measured apart from the kernel: `host_us` is the median wall time of
    one call that only enqueues work (the device is synchronised before each, so a full queue never blocks it);
    `python_us` the same with Triton's launch path stubbed out (`triton_launches_stubbed`): what is left is the
    launcher's own Python and torch's work (allocations, torch ops), so host_us - python_us is Triton's binding and
    launching; `graph_us` is the same work replayed from a CUDA graph (no Python, no launch path: the device's time
    alone, None off CUDA or with graph=False; python_us is None with stubbed=False: work that launches no Triton
    kernel of its own, a peer or a graph replay). A short chunk whose host_us exceeds graph_us is launch-bound: back to
    back, the GPU idles. Before each timed call the host spins HOST_WARM_S after the synchronise: on an H200 the
    launcher's time measured straight after a synchronise that had waited on a long kernel (0.6-4.8 ms) came out
    151-173 us against 61-72 us after short ones, on the same launch path (a host thread woken from a blocking wait
    runs slower at first); the stubbed calls, which leave nothing to wait for, would not pay that.
    `jit_steady_us` (with stubbed) is steady_us with every launch through Triton's `kernel[grid](...)` instead of
    `kernels.fast_launch`'s direct launches of the compiled kernel: what the direct path saves the host.
    `steady_us` is the host's time per call back to back (bursts of STEADY_BURST calls after one untimed call, the
    device queue taking the work, the median burst): what a loop of launches costs the host once its code and data
    are warm. One call alone can take far longer: on the H200 the launcher's host_us read 61 us at prefix 0 / chunk
    64 while do_bench timed the same calls at 24 us each. Back to back, the device idles when steady_us exceeds
    graph_us."""
    from kernels import fast_launch

    def median_us():
        ts = []
        for _ in range(calls):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            while time.perf_counter() - t < HOST_WARM_S:  # the host busy, not woken cold, when the call starts
                pass
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e6)
        return statistics.median(ts)

    def steady_us():
        bursts = []
        for _ in range(max(1, calls // STEADY_BURST)):
            if device != "cpu":
                torch.cuda.synchronize()
            fn()  # the burst's first call pays what host_us measures: not part of the steady state
            t = time.perf_counter()
            for _ in range(STEADY_BURST):
                fn()
            bursts.append((time.perf_counter() - t) * 1e6 / STEADY_BURST)
        return statistics.median(bursts)
    fn()
    host_us, python_us, steady, jit_steady = median_us(), None, steady_us(), None
    if stubbed:
        with triton_launches_stubbed():
            python_us = median_us()
        with fast_launch.jit_launches():
            jit_steady = steady_us()
    graph_us = graph_replay_ms(fn, timer) * 1e3 if device != "cpu" and graph else None
    return dict(host_us=host_us, steady_us=steady, python_us=python_us, jit_steady_us=jit_steady, graph_us=graph_us)


def launch_bound(row: dict) -> bool:
    """Whether an attention row's launcher takes the host longer than its kernel takes the device: back to back
    (`launch_steady_us`; one call's `launch_host_us` in files from before 2026-11-29) against the CUDA-graph replay
    (False without a graph time)."""
    host, graph = row.get("launch_steady_us", row.get("launch_host_us")), row.get("launch_graph_us")
    return host is not None and graph is not None and host > graph


def dense_rows_launch_bound(row: dict, margin: float = 0.10) -> bool:
    """Whether a paged batch row's dense kernel run once per row was launch-bound: its eager time over its CUDA-graph
    replay's by more than `margin` (the host's launch path the limit: decode-like rows, four split launches). False
    without a replay (files before 2026-11-29, CPU runs)."""
    graph = row.get("dense_rows_graph_ms")
    return isinstance(graph, (int, float)) and row["dense_rows_ms"] > (1 + margin) * graph


HOST_WARM_S = 200e-6  # `launch_cost`: the host's spin before each timed call
# `launch_cost`: timed calls per back-to-back burst; few enough that a stage's chunk of two layers (about 20 launches
# a call) stays well inside CUDA's queue of pending launches (about 1024), which would block the host on the device
STEADY_BURST = 5


@contextlib.contextmanager
def triton_launches_stubbed():
    """Every Triton kernel launch (`kernel[grid](...)`, compiled or interpreted, and `kernels.fast_launch`'s direct
    launches of a compiled kernel) a no-op for the duration: timing a launcher inside it leaves out Triton's part of the
    launch path. Nothing runs on the device: outputs are not written."""
    from triton.runtime import interpreter, jit
    from kernels import fast_launch
    classes = (jit.JITFunction, interpreter.InterpretedFunction)
    saved = [c.__dict__["run"] for c in classes]
    saved_direct = fast_launch._run_compiled
    try:
        for c in classes:
            c.run = lambda self, *args, **kwargs: None
        fast_launch._run_compiled = lambda *args: None
        yield
    finally:
        for c, run in zip(classes, saved):
            c.run = run
        fast_launch._run_compiled = saved_direct


def graph_replay_ms(fn, timer=gpu_timer) -> float:
    """`fn`'s work captured in a CUDA graph and timed as replays: the device's time with no host launch path."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's graph docs ask
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer(graph.replay)


def visible_pairs(C: int, P: int) -> int:
    """Query-key pairs a chunk of C queries over prefix P actually computes (bottom-right causal)."""
    return C * P + C * (C + 1) // 2


def attention_flops(B, Hq, D, C, P) -> int:
    return 4 * B * Hq * D * visible_pairs(C, P)


PEER_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # max |error| vs float64 of a correct run


def why(e: BaseException, reasons=()) -> str:
    """A failure in one line for a result row: the error's type and first line, then any `reasons` given."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}" + (f" ({'; '.join(reasons)})" if reasons else "")


# SDPA's warnings that only announce or repeat a refusal: the backends a pin turned off, and the headers
_SDPA_NOISE = ("not used because", "has been runtime disabled")


def call_peer(fn):
    """fn() -> (its result, None), or (None, why it failed). SDPA pinned to a backend that cannot run a shape raises
    only "No available kernel" and gives its reasons as warnings, one per backend it considered (those flooded the
    GPU suite's log): they are held back and the first three that say why (not the headers, nor the backends the
    pin turned off) go into the failure's text. The warnings of a call that succeeds are issued as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run a shape is a result, said why
            said = dict.fromkeys(str(w.message).strip().splitlines()[0][:200] for w in caught
                                 if str(w.message).strip())
            return None, why(e, [m for m in said if not any(n in m for n in _SDPA_NOISE)][:3])
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return got, None


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION))


def window_mask(C: int, N: int, P: int, window: int | None, device) -> torch.Tensor:
    """[C, N] bool: query i (position P + i) sees key j when j <= P + i, and j > P + i - window with a window."""
    j, i = torch.arange(N, device=device)[None, :], P + torch.arange(C, device=device)[:, None]
    return (j <= i) & (j > i - window) if window is not None else j <= i


def reference_attention(q, k, v, P, window=None):
    """float64 attention of queries [B, Hq, C, D] over keys/values [B, Hkv, P+C, D] (GQA by head groups), bottom-right
    causal (within a sliding `window`, if given), one query head at a time: the full score matrix of a long prefix
    in float64 does not fit (32 heads × 4k × 36k × 8 B = 38 GB)."""
    F = torch.nn.functional
    group = q.shape[1] // k.shape[1]
    C, N = q.shape[2], k.shape[2]
    mask = window_mask(C, N, P, window, q.device)
    return torch.cat([F.scaled_dot_product_attention(q[:, h:h + 1].double(), k[:, h // group:h // group + 1].double(),
                                                     v[:, h // group:h // group + 1].double(), attn_mask=mask)
                      for h in range(q.shape[1])], dim=1)


def attention_case(P, C, B, Hq, Hkv, D, dtype, device, seed, window=None):
    """Random inputs of one (prefix P, chunk C) shape, with the cache already holding the chunk (what the kernel
    writes there), the same tensors heads-first for the peers ([B, H, len, D] views, K/V not repeated) and the
    float64 reference. Returns (q, kn, vn, kc, vc, (qt, kt, vt), ref) with ref [B, C, Hq, D]."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, C, Hq, D, device=device, dtype=dtype, generator=g)
    kn, vn = (torch.randn(B, C, Hkv, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    kc, vc = (torch.randn(B, P + C, Hkv, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    kc[:, P:], vc[:, P:] = kn, vn
    heads_first = (q.transpose(1, 2), kc[:, :P + C].transpose(1, 2), vc[:, :P + C].transpose(1, 2))
    return q, kn, vn, kc, vc, heads_first, reference_attention(*heads_first, P, window).transpose(1, 2)


def _eager(flex_attention):
    """flex_attention uncompiled, as asked for (the CPU tests check the peer's plumbing, not its speed), without its
    warning that it is uncompiled."""
    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)
    return run


# flex_attention compiled for each shape's own sizes (`flex_peer`): a recompile of its frame per shape, which dynamo
# allows 8 times by default before it runs the frame eagerly (materialising the scores)
FLEX_RECOMPILES = 64
FLEX_COMPILE = "static"  # recorded in kernels.json (`flex_compile`); files without it compiled with dynamic shapes


def flex_peer(compile_flex: bool = True):
    """flex_attention as a user of one fixed shape runs it: compiled with static shapes (`dynamic=False`), so every
    shape gets its own kernel: the decoding kernel (the keys split over programs) for fewer than 128 queries, and
    full blocks unmasked where both lengths are multiples of 128 (`IS_DIVISIBLE`). Compiled with dynamic shapes (this
    benchmark up to 2026-11-29: one compile for every shape) it gets neither: symbolic batch and head counts rule the
    decoding kernel out and divisibility cannot be proven. `compile_flex=False`: uncompiled (the CPU tests)."""
    from torch.nn.attention.flex_attention import flex_attention
    if not compile_flex:
        return _eager(flex_attention)
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILES)
    return torch.compile(flex_attention, dynamic=False)


def attention_peers(qt, kt, vt, P, compile_flex: bool = True) -> dict:
    """name -> fn() returning [B, Hq, C, D]: the fairest peers of chunk_attention on the same work.
    - sdpa_<backend>: SDPA with a bottom-right causal bias (`causal_lower_right`, no dense mask) and native GQA
      (`enable_gqa`, K/V not repeated), pinned to one backend (flash, efficient, cuDNN);
    - flex: `flex_attention` with a block mask (kv <= q + P), compiled (`compile_flex`; eager materialises the scores);
    - sdpa_dense_repeat (handicapped, for the record): a dense boolean mask and K/V repeated per query head, what this
      benchmark compared against before. Never the best peer."""
    import functools

    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.attention.flex_attention import create_block_mask
    F = torch.nn.functional
    C, N = qt.shape[2], kt.shape[2]
    bias = causal_lower_right(C, N)
    peers = {}
    for name, backend in _sdpa_backends():
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, enable_gqa=True)
        peers[f"sdpa_{name}"] = sdpa
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + P, B=None, H=None, Q_LEN=C,
                                   KV_LEN=N, device=qt.device)
    flex = flex_peer(compile_flex)
    peers["flex"] = functools.partial(flex, qt, kt, vt, block_mask=block_mask, enable_gqa=True)
    group = qt.shape[1] // kt.shape[1]
    dense = torch.arange(N, device=qt.device)[None, :] <= P + torch.arange(C, device=qt.device)[:, None]
    rep_k, rep_v = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    peers["sdpa_dense_repeat"] = lambda: F.scaled_dot_product_attention(qt, rep_k, rep_v, attn_mask=dense)
    return peers


HANDICAPPED = ("sdpa_dense_repeat",)

def time_peers(row: dict, peers: dict, ref, timer, tol: float) -> dict:
    """Each peer's error against float64 `ref` and its time into `row` (`<name>_ms`, `<name>_max_abs_err`, or
    `<name>_why` for one that cannot run the shape), then the best peer (the fastest whose error is within `tol`,
    handicapped rows excluded) and chunk_attention's speed-up over it (`row["triton_ms"]`). Returns the fair peers'
    times by name."""
    for name, fn in peers.items():
        t = time.perf_counter()
        got, failed = call_peer(fn)
        if name == "flex":  # its first call compiles it for this shape: what the shape costs the suite's time plan
            row["flex_first_call_s"] = time.perf_counter() - t
        if failed is None:
            row[f"{name}_max_abs_err"] = (got.transpose(1, 2).double() - ref).abs().max().item()
            try:
                row[f"{name}_ms"] = timer(fn)
            except Exception as e:  # noqa: BLE001 - a peer that runs once and fails when timed, said why
                failed = why(e)
        if failed is not None:
            row[f"{name}_ms"] = None
            row[f"{name}_why"] = failed
    fair = {n: row[f"{n}_ms"] for n in peers if row[f"{n}_ms"] and n not in HANDICAPPED
            and row.get(f"{n}_max_abs_err", float("inf")) <= tol}
    row["best_peer"] = min(fair, key=fair.get) if fair else None
    row["speedup_vs_best_peer"] = fair[row["best_peer"]] / row["triton_ms"] if fair else None
    return fair


# (prefix, chunk, window): Mistral 7B v0.1's window of 4096 over a long prefix, with a prefill chunk and a short one
WINDOW_SHAPES = ((16384, 2048, 4096), (32768, 256, 4096))


def window_peers(qt, kt, vt, P, window, compile_flex: bool = True) -> dict:
    """name -> fn() returning [B, Hq, C, D]: the peers of a sliding-window chunk. flex_attention with the window's
    block mask (its blocks below the window skipped, as this kernel skips them), compiled; SDPA on the backends that
    take a mask (efficient, cuDNN; flash takes none), given the keys from the first query's window on (the ones below
    it no query sees: what a caller of SDPA would cut off, as this project's torch backend does) and the window as a
    boolean mask over them, with native GQA (`sdpa_mask_<backend>`) and with K/V repeated per query head beforehand,
    untimed (`sdpa_mask_<backend>_repeat`: how SDPA takes GQA where its native path refuses a masked call)."""
    import functools

    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels.chunk_attention import window_start
    F = torch.nn.functional
    C, N = qt.shape[2], kt.shape[2]
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx + P) & (kv_idx > q_idx + P - window),
                                   B=None, H=None, Q_LEN=C, KV_LEN=N, device=qt.device)
    flex = flex_peer(compile_flex)
    peers = {"flex": functools.partial(flex, qt, kt, vt, block_mask=block_mask, enable_gqa=True)}
    lo = window_start(P, window)
    ks, vs = kt[:, :, lo:], vt[:, :, lo:]
    mask = window_mask(C, N, P, window, qt.device)[:, lo:].contiguous()
    group = qt.shape[1] // kt.shape[1]
    rep_k, rep_v = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
    for name, backend in _sdpa_backends()[1:]:
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, ks, vs, attn_mask=mask, enable_gqa=True)

        def sdpa_repeat(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, rep_k, rep_v, attn_mask=mask)
        peers[f"sdpa_mask_{name}"], peers[f"sdpa_mask_{name}_repeat"] = sdpa, sdpa_repeat
    return peers


def bench_window(B=1, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, shapes=WINDOW_SHAPES, device="cuda",
                 timer=gpu_timer, compile_flex: bool = True, deadline: float | None = None) -> list[dict]:
    """One row per (prefix P, chunk C, window W): chunk_attention with the sliding window, its TFLOP/s over the pairs
    the window leaves, its error against float64, each peer's (`window_peers`) time and error, the best correct peer
    and the speed-up over it. No shape starts past `deadline`."""
    from kernels import chunk_attention
    from kernels.chunk_attention import launch_plan
    tol = PEER_TOL[dtype]
    rows = []
    for P, C, W in shapes:
        if deadline is not None and time.time() > deadline:
            break
        q, kn, vn, kc, vc, heads_first, ref = attention_case(P, C, B, Hq, Hkv, D, dtype, device, seed=P + C + W,
                                                             window=W)
        out = torch.full_like(q, float("nan"))
        run = lambda: chunk_attention(q, kn, vn, kc, vc, P, out=out, window=W)  # noqa: E731
        ms = timer(run)
        err = (out.double() - ref).abs().max().item()
        plan = launch_plan(q, kn, kc, P, window=W)
        row = dict(prefix=P, chunk=C, window=W, triton_ms=ms,
                   triton_tflops=4 * B * Hq * D * float(window_pairs(C, P, W)) / ms / 1e9, max_abs_err=err,
                   triton_correct=err <= tol, peer_tolerance=tol,
                   launch=dict(plan["config"], pack_heads=plan["pack"], splits=plan["splits"], grid=plan["grid"]))
        time_peers(row, window_peers(*heads_first, P, W, compile_flex=compile_flex), ref, timer, tol)
        rows.append(row)
    return rows



def sweep_attention(configs=None, shape=TARGET_SHAPE, B=1, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, device="cuda",
                    timer=gpu_timer, deadline: float | None = None, on_row=None,
                    launcher_first: bool | None = None) -> list[dict]:
    """chunk_attention at one (prefix, chunk) shape under each launch config: TFLOP/s and max error against
    float64, one row per config (or why it failed to compile or run). The default grid is the one a tuning
    session on Hopper would try first, the launcher's own choice leading it (`launcher`: the tile `launch_plan`
    picks for this shape, marked wherever it appears). Past `deadline` (time.time()) no config starts: its row says
    so. `on_row(rows)` after each row (a sweep cut short keeps what it measured). `launcher_first` (default: with
    the default grid only) puts the launcher's choice before the given configs."""
    from kernels import chunk_attention
    from kernels.chunk_attention import launch_plan, pack_heads
    P, C = shape
    q, kn, vn, kc, vc, _, ref = attention_case(P, C, B, Hq, Hkv, D, dtype, device, seed=P * 7919 + C + 1)
    plan = launch_plan(q, kn, kc, P)
    chosen = plan["config"]
    default_grid = configs is None
    if default_grid:
        configs = []
        if C <= 16 and P >= 4096:  # decode-like, first (a sweep cut short has measured them): the launcher's tile
            # split more ways than one wave of programs (a memory-bound read of the whole prefix may want several
            # programs per SM to keep enough loads in flight), with other load depths, then the same packed rows
            # over wider key blocks and with other warp counts (more bytes in flight per program), and in 16 rows
            # where the packed queries fit (a decode step: a quarter of the 32-row tile's rows are real). The grid
            # below has no packed tile: on an H200 the first 17-18 configs of it took 1.3-2.4x the launcher's
            # (32k/1, 32k/16), and the suite's sweep reached no further.
            configs += [{**chosen, "num_splits": k} for k in (8, 16, 32, 64) if P // chosen["BLOCK_N"] >= k]
            configs += [{**chosen, "num_stages": st} for st in (2, 3, 4) if st != chosen["num_stages"]]
            configs += [{**chosen, "BLOCK_N": n, "num_warps": w, "num_stages": st} for n in (32, 64, 128)
                        for w in (2, 4) for st in (2, 3, 4)
                        if (n, w) != (chosen["BLOCK_N"], chosen["num_warps"])]
            if chosen.get("pack_gqa") and chosen["BLOCK_M"] > 16 and C * pack_heads(Hq // Hkv) <= 16:
                configs += [{**chosen, "BLOCK_M": 16, "num_stages": st} for st in (2, 3)]
        configs += [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                    for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
                    if not (m == 64 and w == 8)]
        from kernels.chunk_attention import TMA_SWEEP, WS_SWEEP
        configs += [cfg for d, cfg in TMA_SWEEP if d == D]  # the TMA prefix loads (Hopper)
        # the prefix's whole key blocks in a warp-specialized kernel of their own (Hopper; bench.ws_probe)
        configs += [cfg for d, cfg in WS_SWEEP if d == D and P >= cfg["BLOCK_N"]]
        if C <= 512 and P >= 4096:  # short chunks over long prefixes: split-KV and GQA packing too
            configs += [dict(BLOCK_M=64, BLOCK_N=n, num_warps=4, num_stages=3, num_splits=k, pack_gqa=pack)
                        for n in (64, 128) for k in (2, 4, 8) for pack in (False, True) if not (pack and C > 64)]
        if P == 0:  # no prefix: tiles compiled without the prefix loops; over several query blocks (the causal
            # work per block grows 1..C/BLOCK_N) longest first too
            configs += [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=3, **{key: True})
                        for key in (("longest_first", "no_prefix") if C > 256 else ("no_prefix",))
                        for m, n, w in ((128, 128, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4))]
    configs = _launcher_first(configs, chosen, launcher_first, default_grid)
    flops = attention_flops(B, Hq, D, C, P)
    return _sweep(configs, dict(prefix=P, chunk=C), chosen, deadline, on_row, lambda row, cfg: _sweep_row(
        row, q, ref, flops, timer, lambda out: chunk_attention(q, kn, vn, kc, vc, P, out=out, config=cfg)),
        plan["splits"])


SWEEP_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "pack_gqa", "num_splits", "tma", "longest_first",
              "no_prefix", "page_ahead", "fold_scale", "ws")


def _same_tile(a: dict, b: dict) -> bool:
    """The same launch config, an absent option meaning the launcher's default (off; splits by the heuristic)."""
    return all(a.get(k) == b.get(k) if k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "num_splits")
               else bool(a.get(k)) == bool(b.get(k)) for k in SWEEP_KEYS)


def _launcher_first(configs, chosen: dict, launcher_first: bool | None, default_grid: bool) -> list[dict]:
    """`configs` led by the launcher's choice (once) when asked, or by default for a default grid."""
    if launcher_first or (launcher_first is None and default_grid):
        return [dict(chosen)] + [c for c in configs if not _same_tile(c, chosen)]
    return configs


def _sweep(configs, where: dict, chosen: dict, deadline, on_row, measure, splits: int = 1) -> list[dict]:
    """Each config measured (`measure(row, cfg)`) unless past `deadline`; the launcher's (`chosen`, splitting the
    prefix `splits` ways where no num_splits is given) is marked `launcher`, its split count as `splits`."""
    rows = []
    for cfg in configs:
        row = dict(cfg, **where, launcher=_same_tile(cfg, chosen))
        if row["launcher"] and "num_splits" not in cfg:
            row["splits"] = splits
        if deadline is not None and time.time() > deadline:
            row["not_run"] = "past the sweep's budget"
        else:
            row = measure(row, cfg)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def _sweep_row(row: dict, q, ref, flops: float, timer, call, graph: bool = True) -> dict:
    """One sweep config: `call(out)` timed into a NaN-poisoned `out` like `q`, its TFLOP/s and max error against
    `ref`; or why it failed (a config that does not compile, shared memory, is a result). On a GPU also replayed
    from a CUDA graph (`graph_ms`, `graph_tflops`; or `graph_why`): the device's time alone. Eager, a short chunk's
    time is its launch path's (an H200 sweep timed the 32k/16 launcher tile at 232 us eagerly, 98 us replayed),
    and configs that launch a merge after their splits pay a second launch: a sweep ranks kernels by the replay.
    `graph=False` leaves the replay out (the paged sweep: its launcher's device-side checks have not been captured on
    a GPU yet, and a capture that failed would cost the suite's graphs part after it)."""
    out = torch.full_like(q, float("nan"))
    try:
        ms = timer(lambda: call(out))
    except Exception as e:  # noqa: BLE001 - said in the row
        return dict(row, error=why(e))
    row = dict(row, ms=ms, tflops=flops / ms / 1e9, max_abs_err=(out.double() - ref).abs().max().item())
    if q.is_cuda and graph:
        try:
            g = graph_replay_ms(lambda: call(out), timer)
            row.update(graph_ms=g, graph_tflops=flops / g / 1e9)
        except Exception as e:  # noqa: BLE001 - said in the row; the eager time stands
            row["graph_why"] = why(e)
    return row


def timing_key(rows: list[dict]) -> str:
    """The time a set of sweep rows is compared by: `graph_ms` (the device alone) when every row has it, else
    `ms` (eager: CPU runs, or a capture that failed, which must not be set against replays)."""
    return "graph_ms" if rows and all("graph_ms" in r for r in rows) else "ms"


def bench_attention(B=1, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, shapes=ATTENTION_SHAPES, device="cuda",
                    timer=gpu_timer, compile_flex: bool = True, deadline: float | None = None) -> list[dict]:
    """One row per (prefix P, chunk C): Triton time and TFLOP/s, each peer's time (or why it could not run) and
    error against float64, the best peer (the fastest whose error is within PEER_TOL, handicapped rows excluded)
    and chunk_attention's speed-up over it. No shape starts past `deadline` (time.time())."""
    from kernels import chunk_attention
    from kernels.chunk_attention import launch_plan
    tol = PEER_TOL[dtype]
    rows = []
    for P, C in shapes:
        if deadline is not None and time.time() > deadline:
            break
        q, kn, vn, kc, vc, heads_first, ref = attention_case(P, C, B, Hq, Hkv, D, dtype, device, seed=P * 7919 + C)
        out = torch.full_like(q, float("nan"))
        run = lambda: chunk_attention(q, kn, vn, kc, vc, P, out=out)  # noqa: E731
        ms = timer(run)
        flops = attention_flops(B, Hq, D, C, P)
        err = (out.double() - ref).abs().max().item()
        plan = launch_plan(q, kn, kc, P)
        row = dict(prefix=P, chunk=C, triton_ms=ms, triton_tflops=flops / ms / 1e9, max_abs_err=err,
                   triton_correct=err <= tol, peer_tolerance=tol,
                   launch=dict(plan["config"], pack_heads=plan["pack"], splits=plan["splits"], grid=plan["grid"]),
                   **{f"launch_{k}": v for k, v in launch_cost(run, device, timer).items()})
        peers = attention_peers(*heads_first, P, compile_flex=compile_flex)
        fair = time_peers(row, peers, ref, timer, tol)
        if fair and row["launch_graph_us"] is not None and row["launch_host_us"] > row["launch_graph_us"]:
            row.update(device_time_vs_peers(row, peers, fair, timer))
        rows.append(row)
    return rows


def device_time_vs_peers(row: dict, peers: dict, fair: dict, timer=gpu_timer) -> dict:
    """For a shape that may be launch-bound (one call's host time over its kernel's graph time: eager, the GPU may wait
    on the host; `launch_steady_us` says whether it does back to back), the kernels against each other with no host in
    the way: every fair peer's work replayed from a CUDA graph (`<peer>_graph_ms`, or `<peer>_graph_why` where it cannot
    be captured), the fastest of them (`best_peer_graph`) and chunk_attention's graph time against it
    (`speedup_vs_best_peer_graph`). The SDPA backends only: capturing compiled flex_attention could recompile inside the
    capture, and a capture that fails can leave the device in an error state for the shapes after it."""
    out, graphs = {}, {}
    for name in (n for n in fair if n.startswith("sdpa_")):
        try:
            graphs[name] = out[f"{name}_graph_ms"] = graph_replay_ms(peers[name], timer)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be captured is a result, said why
            out[f"{name}_graph_why"] = why(e)
    if graphs:
        best = min(graphs, key=graphs.get)
        out.update(best_peer_graph=best, speedup_vs_best_peer_graph=graphs[best] / (row["launch_graph_us"] / 1e3))
    return out


# (prefix, chunk) per row: one long prompt's chunk; a serving step (a fresh prompt, a mid-size chunk, decode rows);
# a decode step of 4 rows over long prefixes (GQA packing and split-KV)
PAGED_BATCHES = (((16384, 2048),), ((0, 2048), (8192, 512), (30000, 1), (4000, 256), (12000, 1)),
                 ((4096, 1), (9000, 1), (16384, 1), (32000, 1)))


def flex_packed_peer(cases, batch, compile_flex: bool = True):
    """flex_attention over a batch's rows in one call, as a varlen user of FlexAttention runs them: the rows' queries
    packed [1, Hq, N, D], each row's keys and values (its prefix and chunk, contiguous) packed [1, Hkv, sum(P+C), D],
    and a block mask that lets a query see keys of its own row at positions up to its own (bottom-right causal per
    row). `cases` from `attention_case`, `batch` the rows' (prefix, chunk). Returns fn() -> [N, Hq, D]."""
    import functools

    from torch.nn.attention.flex_attention import create_block_mask
    qt = torch.cat([c[5][0] for c in cases], dim=2)
    kt, vt = (torch.cat([c[5][i] for c in cases], dim=2) for i in (1, 2))
    device = qt.device
    q_row = torch.cat([torch.full((C,), b) for b, (_, C) in enumerate(batch)]).to(device)
    q_pos = torch.cat([torch.arange(P, P + C) for P, C in batch]).to(device)
    kv_row = torch.cat([torch.full((P + C,), b) for b, (P, C) in enumerate(batch)]).to(device)
    kv_pos = torch.cat([torch.arange(P + C) for P, C in batch]).to(device)

    def visible(b, h, q_idx, kv_idx):
        return (q_row[q_idx] == kv_row[kv_idx]) & (kv_pos[kv_idx] <= q_pos[q_idx])
    mask = create_block_mask(visible, B=None, H=None, Q_LEN=qt.shape[2], KV_LEN=kt.shape[2], device=device)
    flex = flex_peer(compile_flex)
    run = functools.partial(flex, qt, kt, vt, block_mask=mask, enable_gqa=True)
    return lambda: run()[0].transpose(0, 1)


def bench_paged(batches=PAGED_BATCHES, page_sizes=(16, 256), Hq=32, Hkv=8, D=128, dtype=torch.bfloat16,
                device="cuda", timer=gpu_timer, deadline: float | None = None, compile_flex: bool = True) -> list[dict]:
    """The paged, varlen kernel (one launch for a batch of rows of different prefixes and chunk lengths, the cache
    in pages of a shuffled pool) against what a stack without one would run on the same rows: the dense kernel once
    per row (each row's own contiguous cache), SDPA once per row (the fastest correct backend, bottom-right causal
    bias, native GQA) and flex_attention once for the whole batch (`flex_packed_peer`: rows packed, a per-row causal
    block mask; or why it could not run). One row per (batch, page size): times, TFLOP/s over the visible pairs,
    errors vs float64. No batch starts past `deadline` (time.time())."""
    from kernels import chunk_attention
    from kernels.paged_attention import paged_launch_plan
    F = torch.nn.functional
    tol = PEER_TOL[dtype]
    rows = []
    for bi, batch in enumerate(batches):
        if deadline is not None and time.time() > deadline:
            break
        cases = [attention_case(P, C, 1, Hq, Hkv, D, dtype, device, seed=bi * 1000 + i)
                 for i, (P, C) in enumerate(batch)]
        flops = sum(attention_flops(1, Hq, D, C, P) for P, C in batch)
        ref = torch.cat([c[6][0] for c in cases])  # [N, Hq, D]
        q = torch.cat([c[0][0] for c in cases])
        kn, vn = torch.cat([c[1][0] for c in cases]), torch.cat([c[2][0] for c in cases])
        cu = torch.tensor([0] + [sum(C for _, C in batch[:i + 1]) for i in range(len(batch))], dtype=torch.int32,
                          device=device)
        prefix = torch.tensor([P for P, _ in batch], dtype=torch.int32, device=device)
        dense_out = [torch.full_like(c[0], float("nan")) for c in cases]

        def dense_rows():
            for c, o, (P, _) in zip(cases, dense_out, batch):
                chunk_attention(c[0], c[1], c[2], c[3], c[4], P, out=o)
        dense_ms = timer(dense_rows)
        dense_err = (torch.cat([o[0] for o in dense_out]).double() - ref).abs().max().item()
        dense_graph = {}  # the rows' launches replayed from a CUDA graph: their kernels' time alone (decode-like rows
        if q.is_cuda:  # are launch-bound eagerly: on an H200 four split launches read 0.40 and 0.79 ms in two runs)
            try:
                dense_graph["dense_rows_graph_ms"] = graph_replay_ms(dense_rows, timer)
            except Exception as e:  # noqa: BLE001 - said in the row; the eager time stands
                dense_graph["dense_rows_graph_why"] = why(e)
        from torch.nn.attention import sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right
        sdpa, sdpa_refused = {}, {}  # backend -> (ms, error); backend -> why it is not a peer here
        for name, backend in _sdpa_backends():
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return [F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(qt.shape[2],
                                                                                                    kt.shape[2]),
                                                           enable_gqa=True) for qt, kt, vt in (c[5] for c in cases)]
            got, failed = call_peer(run)
            if failed is None:
                err = (torch.cat([o.transpose(1, 2)[0] for o in got]).double() - ref).abs().max().item()
                if err <= tol:
                    sdpa[name] = (timer(run), err)
                else:
                    failed = f"error {err:.1e} over the tolerance {tol:.0e}"
            if failed is not None:
                sdpa_refused[name] = failed
        best = min(sdpa, key=lambda n: sdpa[n][0]) if sdpa else None
        flex = {}
        try:
            run_flex = flex_packed_peer(cases, batch, compile_flex)
            flex["flex_max_abs_err"] = (run_flex().double() - ref).abs().max().item()
            if flex["flex_max_abs_err"] <= tol:
                flex["flex_ms"] = timer(run_flex)
            else:
                flex.update(flex_ms=None, flex_why=f"error {flex['flex_max_abs_err']:.1e} over the tolerance {tol:.0e}")
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this batch is a result, said why
            flex.update(flex_ms=None, flex_why=why(e))
        for page in page_sizes:
            kc, vc, table = paged_cache(batch, cases, page, seed=page)
            out = torch.full_like(q, float("nan"))
            max_chunk, max_prefix = max(C for _, C in batch), max(P for P, _ in batch)
            ms = timer(lambda: chunk_attention(q, kn, vn, kc, vc, prefix, out=out, block_table=table,
                                               cu_seqlens=cu, max_chunk=max_chunk, max_prefix=max_prefix))
            err = (out.double() - ref).abs().max().item()
            plan = paged_launch_plan(device, dtype, len(batch), Hq, Hkv, D, max_chunk, max_prefix, page_size=page)
            rows.append(dict(batch=[list(x) for x in batch], page_size=page, launch_plan=plan, paged_ms=ms,
                             paged_tflops=flops / ms / 1e9, paged_max_abs_err=err, paged_correct=err <= tol,
                             tolerance=tol,
                             dense_rows_ms=dense_ms, dense_rows_max_abs_err=dense_err, **dense_graph, best_sdpa=best,
                             sdpa_rows_ms=sdpa[best][0] if best else None,
                             sdpa_rows_max_abs_err=sdpa[best][1] if best else None, sdpa_refused=sdpa_refused,
                             paged_vs_dense_rows=dense_ms / ms,
                             **({"paged_vs_dense_rows_graph": dense_graph["dense_rows_graph_ms"] / ms}
                                if "dense_rows_graph_ms" in dense_graph else {}),
                             paged_vs_sdpa_rows=sdpa[best][0] / ms if best else None, **flex,
                             paged_vs_flex=flex["flex_ms"] / ms if flex.get("flex_ms") else None))
    return rows


def paged_cache(batch, cases, page: int, seed: int):
    """A shuffled pool of pages holding each row's prefix (and room for its chunk), and the block table [rows,
    most pages] int32 (-1 past a row's pages): rows (prefix, chunk) of `batch`, their K/V from `attention_case`."""
    device, dtype = cases[0][3].device, cases[0][3].dtype
    Hkv, D = cases[0][3].shape[2:]
    need = [-(-(P + C) // page) for P, C in batch]
    pool_pages = sum(need)
    order = torch.randperm(pool_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(batch), max(need)), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[start:start + n], dtype=torch.int32)
        start += n
    table = table.to(device)
    kc = torch.empty(pool_pages, page, Hkv, D, device=device, dtype=dtype)
    vc = torch.empty_like(kc)
    for b, ((P, C), c) in enumerate(zip(batch, cases)):  # each row's prefix into its pages
        pos = torch.arange(P + C, device=device)
        pages, slots = table[b].long()[pos // page], pos % page
        kc[pages, slots], vc[pages, slots] = c[3][0, :P + C], c[4][0, :P + C]
    return kc, vc, table


PAGED_SWEEP_PAGES = (16, 256)


def sweep_paged(configs=None, shape=TARGET_SHAPE, page_sizes=PAGED_SWEEP_PAGES, Hq=32, Hkv=8, D=128,
                dtype=torch.bfloat16, device="cuda", timer=gpu_timer, deadline: float | None = None,
                on_row=None, launcher_first: bool | None = None) -> list[dict]:
    """The paged kernel (`chunk_attention(..., block_table=)`) on one row of (prefix, chunk) `shape`, its cache in a
    shuffled pool of pages, under each launch config and page size: TFLOP/s and max error against float64, one row
    per (page size, config), or why it failed. Key blocks no longer than a page are read from one page each (the
    dense kernel's addressing); longer ones gather each key's page. The default grid is a Hopper tuning session's
    first try, the launcher's own choice (`launcher`) first. `deadline`, `on_row` and `launcher_first` as in
    `sweep_attention`."""
    from kernels import chunk_attention
    from kernels.paged_attention import paged_launch_plan
    P, C = shape
    case = attention_case(P, C, 1, Hq, Hkv, D, dtype, device, seed=P * 7919 + C + 2)
    q, kn, vn, ref = case[0][0], case[1][0], case[2][0], case[6][0]
    default_grid = configs is None
    if default_grid:
        configs = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                   for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
                   if not (m == 64 and w == 8)]
        # block-table reads one key block ahead, on the tiles the H200 sweep ranked highest without them
        configs += [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, page_ahead=True)
                    for m, n, w, s in ((128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 2), (64, 64, 4, 3))]
    cu = torch.tensor([0, C], dtype=torch.int32, device=device)
    prefix = torch.tensor([P], dtype=torch.int32, device=device)
    flops = attention_flops(1, Hq, D, C, P)
    rows = []
    for page in page_sizes:  # the launcher's choice depends on the page size (`for_page_size`)
        plan = paged_launch_plan(q.device, dtype, 1, Hq, Hkv, D, C, P, page_size=page)
        chosen = plan["config"]
        kc, vc, table = paged_cache([shape], [case], page, seed=page)
        rows += _sweep(_launcher_first(configs, chosen, launcher_first, default_grid),
                       dict(prefix=P, chunk=C, page_size=page), chosen, deadline,
                       None if on_row is None else lambda new, done=list(rows): on_row(done + new),
                       lambda row, cfg, kc=kc, vc=vc, table=table: _sweep_row(
                           row, q, ref, flops, timer,
                           lambda out: chunk_attention(q, kn, vn, kc, vc, prefix, out=out, config=cfg,
                                                       block_table=table, cu_seqlens=cu, max_chunk=C, max_prefix=P),
                           graph=False),
                       plan["splits"])
    return rows


def planner_shapes(model: str = "llama3-8b", prompt_len: int = 32768, stages: int = 4) -> list[tuple[int, int]]:
    """(prefix, chunk) of the first, a middle and the last chunk the planner cuts for `model` at `prompt_len` on an
    H100 roofline over NVLink: the shapes a balanced pipeline really runs."""
    from pipeline.config import get_preset
    from pipeline.costs import link_preset, roofline_stage_costs, stage_max
    from pipeline.plan import plan_chunks
    from pipeline.schedule import chunk_starts
    cfg = get_preset(model)
    plan = plan_chunks(prompt_len, stage_max(roofline_stage_costs(cfg, stages, "h100")), stages, 256,
                       link=link_preset("nvlink"), bytes_per_token=cfg.hidden_size * 2).chunks
    pairs = list(zip(chunk_starts(plan), plan))
    return [pairs[0], pairs[len(pairs) // 2], pairs[-1]]


def copy_bandwidth(nbytes: int = 1 << 30, device="cuda", timer=gpu_timer) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written): the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def gemm_tflops(n: int = 8192, dtype=torch.bfloat16, device="cuda", timer=gpu_timer) -> float:
    """TFLOP/s of an n×n×n matmul: the matrix-unit rate this GPU really reaches (the attention ceiling)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


def bench_memory_bound(tokens: int = 8192, hidden: int = 4096, intermediate: int = 14336, heads: int = 32,
                       kv_heads: int = 8, head_dim: int = 128, dtype=torch.bfloat16, device="cuda",
                       timer=gpu_timer) -> list[dict]:
    """RMSNorm (+residual), RoPE and SwiGLU on one chunk's activations, each called as the model calls it (RoPE on
    the q and k heads of the fused qkv projection's output, one call; SwiGLU on the two halves of the fused gate/up
    output): Triton and torch eager in GB/s (the bytes each op must move: inputs read once, outputs written once),
    max error of each against float64."""
    from kernels import add_rms_norm, add_rms_norm_ref, rope, rope_ref, rope_tables, swiglu, swiglu_ref
    g = torch.Generator(device=device).manual_seed(0)
    e = torch.tensor([], dtype=dtype).element_size()
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)  # noqa: E731
    x, r = rnd(tokens, hidden), rnd(tokens, hidden)
    w = 1 + 0.1 * rnd(hidden)
    rotated = heads + kv_heads
    q = rnd(1, tokens, (rotated + kv_heads) * head_dim)[..., :rotated * head_dim].view(1, tokens, rotated, head_dim)
    cos, sin = rope_tables(head_dim, tokens + 7, 500000.0, device=device)
    gate_up = rnd(tokens, 2 * intermediate)
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    d = lambda t: t.double()  # noqa: E731
    ops = {
        "add_rms_norm": (lambda: add_rms_norm(x, r, w, 1e-5), lambda: add_rms_norm_ref(x, r, w, 1e-5),
                         lambda: add_rms_norm_ref(d(x), d(r), d(w), 1e-5),
                         4 * tokens * hidden * e + hidden * e),
        "rope": (lambda: rope(q, cos, sin, 7), lambda: rope_ref(q, cos, sin, 7),
                 lambda: rope_ref(d(q), cos.double(), sin.double(), 7),
                 2 * q.numel() * e + 2 * tokens * head_dim // 2 * 4),
        "swiglu": (lambda: swiglu(gate, up), lambda: swiglu_ref(gate, up), lambda: swiglu_ref(d(gate), d(up)),
                   3 * tokens * intermediate * e),
    }
    rows = []
    for name, (tri, eager, ref64, nbytes) in ops.items():
        want = ref64()
        want = want if isinstance(want, tuple) else (want,)

        def err(fn):
            got = fn()
            got = got if isinstance(got, tuple) else (got,)
            return max((a.double() - b).abs().max().item() for a, b in zip(got, want))
        t_ms, e_ms = timer(tri), timer(eager)
        cost = launch_cost(tri, device, timer, calls=20, graph=False)  # the launch path's time per call
        eager_cost = launch_cost(eager, device, timer, calls=20, graph=False, stubbed=False)
        host = dict(triton_host_us=cost["host_us"], triton_steady_us=cost["steady_us"],
                    triton_jit_steady_us=cost["jit_steady_us"], triton_python_us=cost["python_us"],
                    eager_host_us=eager_cost["host_us"],
                    eager_steady_us=eager_cost["steady_us"])
        rows.append(dict(op=name, bytes=nbytes, triton_ms=t_ms, triton_gbps=nbytes / t_ms / 1e6, eager_ms=e_ms,
                         eager_gbps=nbytes / e_ms / 1e6, triton_max_abs_err=err(tri), eager_max_abs_err=err(eager),
                         **host))
    return rows


def bench_layer_host(model="llama3-8b", layers: int = 2, prefix: int = 2048, chunk: int = 2048,
                     dtype=torch.bfloat16, device="cuda", timer=gpu_timer, calls: int = 20,
                     graphs: bool | None = None) -> list[dict]:
    """What one pipeline stage's chunk costs the host: a chunk of `chunk` tokens at `prefix` through `layers` middle
    layers of `model` (an 8-layer pipeline's stage at S = 4), enqueued with the Triton ops and with the torch ops. Per
    backend `host_us`, the median wall time of one enqueue (the device idle before it), `steady_us`, the same back to
    back, and `graph_us`, the work replayed from a CUDA graph (the device's time alone; None off CUDA): see
    `launch_cost`. The in-process driver enqueues every stage from one host thread: a round of S stages takes the host
    about S x steady_us, so steady_us near graph_us means the host paces the pipeline. Each backend's output is checked
    against the other's (`max_abs_diff`, with `scale`, the largest output magnitude). With `graphs` (default: on CUDA) a
    third row, "triton, CUDA graph": the Triton ops' chunk as `--cuda-graphs` enqueues it (`pipeline.graphs`: input
    copied in, one replay, output copied out), its host time against the same device time, and its replay against the
    eager output (`replay_max_abs_diff`)."""
    from pipeline.model import load_model
    from pipeline.ops import get_ops
    part = load_model(model, dtype, device, layers=range(1, 1 + layers), ops="triton")
    cache = part.new_cache(1, prefix + chunk)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, chunk, part.cfg.hidden_size, device=device, dtype=dtype, generator=g)
    rows, outs = [], {}
    for ops in ("triton", "torch"):
        part.ops = get_ops(ops)
        fn = lambda: part.forward_chunk(x, prefix, cache)  # noqa: E731
        outs[ops] = fn().double()
        row = dict(ops=ops, model=model, layers=layers, prefix=prefix, chunk=chunk)
        try:
            row.update(launch_cost(fn, device, timer, calls=calls))
        except Exception as e:  # noqa: BLE001 - a row that says why, not a lost kernel part
            row.update(error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    diff, scale = (outs["triton"] - outs["torch"]).abs().max().item(), outs["torch"].abs().max().item()
    for r in rows:
        r.update(max_abs_diff=diff, scale=scale)
    if graphs if graphs is not None else device != "cpu":
        from pipeline.graphs import ChunkGraphs
        part.ops, chunk_graphs = get_ops("triton"), ChunkGraphs()
        fn = lambda: chunk_graphs(lambda inp: part.forward_chunk(inp, prefix, cache), x, (prefix,))  # noqa: E731
        row = dict(ops="triton, CUDA graph", model=model, layers=layers, prefix=prefix, chunk=chunk,
                   max_abs_diff=diff, scale=scale)
        try:
            fn()  # the eager run and the capture
            row["replay_max_abs_diff"] = (fn().double() - outs["triton"]).abs().max().item()
            row.update(launch_cost(fn, device, timer, calls=calls, graph=False, stubbed=False),
                       graph_us=rows[0].get("graph_us"))
        except Exception as e:  # noqa: BLE001 - a row that says why, not a lost kernel part
            row.update(error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    return rows


SCHEMA_VERSION = 1  # of kernels.json: `python -m bench compare` reads it


# The launcher's choices made without timing them as launched, each against what it replaced, at one shape: the
# decode-like tiles with three load stages on Hopper, against the two they had, at prefix 32k with 1 and 16 queries
# (the sweep timed the launcher's tile with three; as launched, its split count is the launcher's either way). (Timed
# on an H200 and dropped from here: the decode tiles split for two programs per SM, 1.37x / 1.27x the one-per-SM
# split count at 32k/1 and 32k/16; the prefix-0 tile (64x64, no prefix loops), 1.24x the 128x128 it replaced at
# 0/2k and 1.29x / 1.47x the 64x128 at 0/256 and 0/64; the paged 64x64 tile, 1.38-1.44x the 64x32; the paged
# block-table reads ahead, 1.07x over pages of 256 and 0.88x over pages of 16, kept for the former only; the softmax
# scale folded into the exp2's FMA, 0.98x / 0.97x at 16k/2k and 0/2k, dropped: bench/results/h200/.)
# (kernel, shape, the former config): the launcher's config at that shape is timed against it
TILE_AB = tuple(("dense", (32768, C), dict(BLOCK_M=m, BLOCK_N=32, num_warps=4, num_stages=2, pack_gqa=True))
                for C, m in ((1, 32), (16, 64)))


def tile_ab(device="cuda", timer=gpu_timer, deadline: float | None = None, entries=TILE_AB, **shape_kw) -> list[dict]:
    """`entries` (TILE_AB) measured: per entry the launcher's own tile (`launcher` True) and the former one, each
    against float64; `vs_former` on the launcher's rows is its speed over the former tile's at the same shape and
    page. Past `deadline` no entry starts."""
    rows = []
    for kind, shape, former in entries:
        if deadline is not None and time.time() > deadline:
            break
        sweep = sweep_attention if kind == "dense" else sweep_paged
        got = sweep(configs=[former], shape=shape, device=device, timer=timer, deadline=deadline,
                    launcher_first=True, **shape_kw)
        for r in got:
            r["kernel"] = kind
        for r in got:
            old = _former(got, r)
            if old is not None and "ms" in r and "ms" in old:
                key = timing_key([r, old])
                r["vs_former"], r["vs_former_by"] = old[key] / r[key], key
        rows += got
    return rows


def _former(rows: list[dict], r: dict) -> dict | None:
    """For a launcher row of the tile A/B, the former tile's row at its kernel, shape and page size (else None)."""
    if not r["launcher"]:
        return None
    return next((o for o in rows if o["kernel"] == r["kernel"] and not o["launcher"] and o["prefix"] == r["prefix"]
                 and o["chunk"] == r["chunk"] and o.get("page_size") == r.get("page_size")), None)


def run_all(device="cuda", timer=gpu_timer, quick=False, deadline: float | None = None) -> dict:
    """Every kernel figure of this GPU in one document (the gpu-suite's kernel part). Past `deadline`
    (time.time()) no further attention shape, tile A/B, sliding-window shape or paged batch starts (`complete` False,
    `stopped` says what was left out); the ceilings and the memory-bound ops, short, always run."""
    shapes = (TARGET_SHAPE, (0, 256)) if quick else tuple(dict.fromkeys(ATTENTION_SHAPES + tuple(planner_shapes())))
    batches = PAGED_BATCHES[:1] if quick else PAGED_BATCHES
    copy = copy_bandwidth(device=device, timer=timer)
    gemm = gemm_tflops(device=device, timer=timer)
    memory = bench_memory_bound(device=device, timer=timer)
    attention = bench_attention(shapes=shapes, device=device, timer=timer, deadline=deadline)
    # the launcher's untimed tile choices next (each A/B decides one), then the first sliding-window timings, then
    # the paged batches (measured before): a budget that runs out cuts what matters least
    entries = () if quick else TILE_AB
    ab = tile_ab(device=device, timer=timer, deadline=deadline, entries=entries)
    # whether Hopper's warp specialization pays, the prefix loop alone and config ws end to end (`bench.ws_probe`)
    from .ws_probe import run_isolated, skip_reason
    probe_skip = "not run: --quick" if quick else skip_reason(device)
    probe = [] if probe_skip else run_isolated(deadline if deadline is not None else time.time() + 300.0)
    window_shapes = WINDOW_SHAPES[:1] if quick else WINDOW_SHAPES
    window = bench_window(shapes=window_shapes, device=device, timer=timer, deadline=deadline)
    paged = bench_paged(batches=batches, device=device, timer=timer, deadline=deadline)
    late = deadline is not None and time.time() > deadline
    # last: a failed graph capture cannot spoil the rest
    layer = [] if late else bench_layer_host(device=device, timer=timer)
    for m in memory:
        m["triton_of_copy"] = m["triton_gbps"] / copy
        m["eager_of_copy"] = m["eager_gbps"] / copy
    for a in attention:
        a["triton_of_gemm"] = a["triton_tflops"] / gemm
    doc = dict(schema_version=SCHEMA_VERSION, kind="kernels", flex_compile=FLEX_COMPILE, copy_gbps=copy,
               gemm_bf16_tflops=gemm, attention=attention, paged=paged, window=window, tile_ab=ab, ws_probe=probe,
               memory_bound=memory, layer_host=layer, attention_config=dict(B=1, Hq=32, Hkv=8, D=128, dtype="bfloat16"),
               targets=TARGETS, complete=True)
    if probe_skip:
        doc["ws_probe_skipped"] = probe_skip
    measured = {tuple(map(tuple, r["batch"])) for r in paged}
    left = [f"attention P={P} C={C}" for P, C in shapes[len(attention):]]
    timed = {(r["kernel"], r["prefix"], r["chunk"]) for r in ab if "not_run" not in r}
    left += [f"tile A/B {kind} P={P} C={C}" for kind, (P, C), _ in entries if (kind, P, C) not in timed]
    left += ["the warp-specialization probe"] if any("not_run" in r for r in probe) else []
    left += [f"window P={P} C={C} W={W}" for P, C, W in window_shapes[len(window):]]
    left += [f"paged batch {i}" for i, b in enumerate(batches) if tuple(b) not in measured]
    left += ["the layer's host cost"] if late else []
    if left:
        doc.update(complete=False, stopped=f"time budget: not measured {', '.join(left)}")
    return doc


def _tile(r: dict) -> str:
    """A launch config's tile in words: BLOCK_MxBLOCK_N, warps and pipeline stages (e.g. 64x64 w4s3)."""
    return f"{r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']}s{r['num_stages']}"


def tile_words(r: dict, keys=("pack_gqa", "no_prefix", "page_ahead", "fold_scale")) -> str:
    """A sweep row's launch config in words: the tile, its options, and its prefix splits when more than one (given,
    `num_splits`, or the launcher's, `splits`)."""
    splits = r.get("num_splits") or r.get("splits") or 1
    return _tile(r) + "".join(f" {k.replace('_', '-')}" for k in keys if r.get(k)) + (
        f" splits {splits}" if splits > 1 else "")


def tile_ab_lines(rows: list[dict]) -> list[str]:
    """One line per launcher tile of the A/B: its TFLOP/s against the former tile's at that shape (and page), both
    replayed from CUDA graphs where both were (the device's time alone), else as launched."""
    out = []
    for r in rows:
        if not r["launcher"]:
            continue
        old = _former(rows, r)
        where = f"{r['kernel']} P={r['prefix']} C={r['chunk']}" + (
            f" page {r['page_size']}" if "page_size" in r else "")
        graph = r.get("vs_former_by") == "graph_ms"
        res = lambda x: (f"{x['graph_tflops' if graph else 'tflops']:.1f} TFLOP/s" if "tflops" in x  # noqa: E731
                         else x.get("error") or f"not run ({x.get('not_run')})")
        out.append(f"tile A/B {where}: launcher {tile_words(r)} {res(r)} vs former "
                   + (f"{tile_words(old)} {res(old)}" if old else "-")
                   + (f" = {r['vs_former']:.2f}x" + (" (CUDA graph replays)" if graph else "")
                      if r.get("vs_former") else ""))
    return out


def layer_host_lines(rows: list[dict]) -> list[str]:
    """`bench_layer_host`'s rows in words: per ops backend, the host's enqueue time of one stage's chunk (with the
    Triton ops, how much of it Triton's launch path takes) against the device's time for it."""
    if not rows:
        return []
    r0 = rows[0]
    out = [f"one stage's chunk ({r0['layers']} layers of {r0['model']}, chunk {r0['chunk']} at prefix "
           f"{r0['prefix']}; outputs of the two backends within {r0['max_abs_diff']:.1e} of {r0['scale']:.1e}):"]
    for r in rows:
        graph = r.get("graph_us")
        if "error" in r:
            out.append(f"  {r['ops']} ops: not measured ({r['error']})")
            continue
        steady = r.get("steady_us")  # absent from files before 2026-11-29
        out.append(f"  {r['ops']} ops: host {r['host_us']:.0f} us to enqueue"
                   + (f" ({r['host_us'] - r['python_us']:.0f} of it in Triton's launches)" if r["ops"] == "triton"
                      else "") + (f", {steady:.0f} back to back" if steady is not None else "")
                   + (f" ({r['jit_steady_us']:.0f} through Triton's own launch path)"
                      if r.get("jit_steady_us") is not None else "") + ", device "
                   + (f"{graph:.0f} us (host/device {(steady or r['host_us']) / graph:.2f})" if graph
                      else "not measured")
                   + (f"; the replay within {r['replay_max_abs_diff']:.1e} of the eager Triton output"
                      if "replay_max_abs_diff" in r else ""))
    return out


def print_report(doc: dict) -> None:
    print(f"copy {doc['copy_gbps']:.0f} GB/s   bf16 GEMM {doc['gemm_bf16_tflops']:.0f} TFLOP/s")
    for r in doc["attention"]:
        graph = r.get("launch_graph_us")
        print(f"attention P={r['prefix']:>6} C={r['chunk']:>5}  triton {r['triton_ms']:.3f} ms "
              f"{r['triton_tflops']:.0f} TFLOP/s  vs best peer ({r['best_peer']}) "
              f"{r['speedup_vs_best_peer'] or float('nan'):.2f}x  err {r['max_abs_err']:.1e}  launcher "
              f"{r.get('launch_host_us', float('nan')):.0f} us host ("
              f"{r.get('launch_host_us', float('nan')) - r.get('launch_python_us', float('nan')):.0f} Triton), "
              f"{r.get('launch_steady_us', float('nan')):.0f} back to back / "
              f"{graph if graph is not None else float('nan'):.0f} us graph"
              + ("  launch-bound" if launch_bound(r) else "")
              + (f"  by graph time {r['speedup_vs_best_peer_graph']:.2f}x {r['best_peer_graph']}"
                 if r.get("speedup_vs_best_peer_graph") else ""))
    for r in doc.get("paged", []):
        sdpa = r["paged_vs_sdpa_rows"]
        print(f"paged {len(r['batch'])} row(s) page {r['page_size']:>3}  {r['paged_ms']:.3f} ms "
              f"{r['paged_tflops']:.0f} TFLOP/s  vs dense per row {r['paged_vs_dense_rows']:.2f}x  vs SDPA per row "
              f"({r['best_sdpa']}) {sdpa if sdpa is not None else float('nan'):.2f}x  vs flex (one call) "
              f"{r.get('paged_vs_flex') or float('nan'):.2f}x  err {r['paged_max_abs_err']:.1e}")
    for line in tile_ab_lines(doc.get("tile_ab", [])):
        print(line)
    from .ws_probe import ws_probe_lines
    for line in ws_probe_lines(doc.get("ws_probe", [])):
        print(line)
    for m in doc["memory_bound"]:
        print(f"{m['op']:>13}  triton {m['triton_gbps']:.0f} GB/s ({100 * m['triton_of_copy']:.0f}% of copy)  "
              f"eager {m['eager_gbps']:.0f} GB/s  err {m['triton_max_abs_err']:.1e}"
              + (f"  host {m['triton_host_us']:.0f} us triton ({m['triton_host_us'] - m['triton_python_us']:.0f} in "
                 f"Triton's launch) / {m['eager_host_us']:.0f} us eager" if "triton_host_us" in m else "")
              + (f"; back to back {m['triton_steady_us']:.0f} / {m['eager_steady_us']:.0f} us"
                 if "eager_steady_us" in m else ""))
    for line in layer_host_lines(doc.get("layer_host", [])):
        print(line)


def _shape(text: str) -> tuple[int, int]:
    import argparse
    from .options import token_count
    try:
        prefix, chunk = (token_count(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PREFIX,CHUNK (two integers; k = 1024: 16k,2k), "
                                         f"got {text!r}") from None
    if prefix < 0 or chunk < 1 or prefix + chunk > 1 << 20:
        raise argparse.ArgumentTypeError(f"expected PREFIX >= 0, CHUNK >= 1 and PREFIX + CHUNK <= 1048576, got {text}")
    return prefix, chunk


# the gpu-suite's sweeps: decode-like shapes (their grids lead with split counts and load depths)
DECODE_SWEEP_SHAPES = ((32768, 1), (32768, 16))


def run_sweeps(deadline: float, shapes=DECODE_SWEEP_SHAPES, paged_shape=TARGET_SHAPE, device="cuda",
               timer=gpu_timer, on_sweep=None, **case_kw) -> dict:
    """The gpu-suite's tuning part, in the time left to it: `sweep_attention`'s default grid at each of `shapes`
    (decode-like ones lead with their split counts and load depths), then `sweep_paged` at `paged_shape` (None: not
    run), one sweep per page size. The time up to `deadline` (time.time()) is shared out: each sweep gets an equal
    part of what is left when it starts, so one that ends early leaves its time to the rest; rows past a share's end
    say 'not run' (on an H200 the pages of 16 took the paged sweep's whole share when both page sizes had one).
    `on_sweep(doc)` after each sweep. Returns dict(kind="sweeps", attention=rows, paged=rows, complete)."""
    import functools
    sweeps = [("attention", functools.partial(sweep_attention, shape=sh)) for sh in shapes]
    sweeps += [("paged", functools.partial(sweep_paged, shape=paged_shape, page_sizes=(page,)))
               for page in (PAGED_SWEEP_PAGES if paged_shape else ())]
    doc = dict(kind="sweeps", attention=[], paged=[], complete=False)
    for i, (kind, sweep) in enumerate(sweeps):
        share_end = time.time() + max(0.0, deadline - time.time()) / (len(sweeps) - i)
        doc[kind] += sweep(device=device, timer=timer, deadline=share_end, **case_kw)
        if on_sweep is not None:
            on_sweep(doc)
    doc["complete"] = not any("not_run" in r for r in doc["attention"] + doc["paged"])
    return doc


def sweep_lines(doc: dict, tol: float | None = None) -> list[str]:
    """One line per swept shape (and page size): the launcher's config against the fastest correct one (error
    within `tol`, default the bf16 peer tolerance), and how many configs ran."""
    tol = PEER_TOL[torch.bfloat16] if tol is None else tol

    def tile(r):
        return tile_words(r, ("pack_gqa", "tma", "longest_first", "no_prefix", "page_ahead", "fold_scale", "ws"))
    out = []
    for kind in ("attention", "paged"):
        groups: dict = {}
        for r in doc.get(kind, []):
            groups.setdefault((r["prefix"], r["chunk"], r.get("page_size")), []).append(r)
        for (P, C, page), rows in groups.items():
            ok = [r for r in rows if "ms" in r and r["max_abs_err"] <= tol]
            where = f"{kind} P={P} C={C}" + (f" page {page}" if page else "")
            ran = f"{sum('ms' in r for r in rows)} of {len(rows)} configs ran"
            if not ok:
                why = ("not run: past the sweep's budget" if all("not_run" in r for r in rows)
                       else "no config ran correctly")
                out.append(f"{where}: {why} ({ran})")
                continue
            key = timing_key(ok)
            best, own = min(ok, key=lambda r: r[key]), next((r for r in ok if r["launcher"]), None)
            mine = f"launcher {tile(own)} {own[key] * 1e3:.0f} us" if own else "launcher's config did not run"
            out.append(f"{where}: {mine}; fastest {tile(best)} {best[key] * 1e3:.0f} us"
                       + (f": the launcher takes {own[key] / best[key]:.2f}x its time" if own else "")
                       + (" (CUDA graph replays)" if key == "graph_ms" else "") + f" ({ran})")
    return out


def _run_sweeps(sweep, shapes, out_dir, deadline) -> int:
    """Every shape's sweep; with `out_dir`, sweep.json rewritten after each row (`complete` false until the end)."""
    import contextlib
    from .options import output_dir
    from .report import environment, write_json
    env = environment()
    with (output_dir(out_dir) if out_dir else contextlib.nullcontext()) as out:
        rows: list[dict] = []

        def save(shape_rows, complete=False):
            if out is not None:
                write_json(out / "sweep.json", dict(environment=env, complete=complete, rows=rows + shape_rows))
        for sh in shapes:
            rows += sweep(shape=sh, deadline=deadline, on_row=save)
        save([], complete=True)
    # fastest first within each shape, by the CUDA-graph replay where the row has one (the device's time alone)
    speed = lambda r: r.get("graph_tflops", r.get("tflops", 0))  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["prefix"], r["chunk"], r.get("page_size", 0), -speed(r))):
        cfg = f"P={r['prefix']} C={r['chunk']} " + " ".join(f"{k}={r[k]}" for k in ("page_size",) + SWEEP_KEYS
                                                             if k in r)
        result = (f"{r['tflops']:6.0f} TFLOP/s" + (f" ({r['graph_tflops']:.0f} replayed)" if "graph_tflops" in r
                                                   else "") + f"  err {r['max_abs_err']:.1e}" if "tflops" in r
                  else r.get("error") or f"not run: {r['not_run']}")
        print(f"{'*' if r['launcher'] else ' '} {cfg:<64} {result}")
    print("(* the launcher's own choice for that shape; on a GPU, ordered by the CUDA-graph replay)")
    return 0


def main(argv=None) -> int:
    from .options import Parser, number, out_path, output_dir
    ap = Parser(prog="python -m bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=out_path, default=None, help="directory for kernels.json (default: print only)")
    ap.add_argument("--quick", action="store_true", help="two attention shapes only")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: chunk_attention under a grid of block sizes/warps/stages at prefix 16k, chunk 2k "
                         "(sweep.json)")
    ap.add_argument("--shape", action="append", type=_shape, default=None, metavar="PREFIX,CHUNK",
                    help="with --sweep: the (prefix, chunk) shape(s) to sweep (default 16384,2048; k = 1024: "
                         "16k,2k; repeatable)")
    ap.add_argument("--paged", action="store_true",
                    help=f"with --sweep: the paged kernel instead (one row, its cache in pages of "
                         f"{' and '.join(map(str, PAGED_SWEEP_PAGES))})")
    ap.add_argument("--budget-s", type=number(0.0, maximum=86400.0), default=None,
                    help="with --sweep: start no config past this many seconds (their rows say 'not run'); "
                         "sweep.json is rewritten after every row either way")
    args = ap.parse_args(argv)
    if args.shape and not args.sweep:
        ap.error("--shape goes with --sweep")
    if args.paged and not args.sweep:
        ap.error("--paged goes with --sweep")
    if args.budget_s is not None and not args.sweep:
        ap.error("--budget-s goes with --sweep")
    if args.quick and args.sweep:
        ap.error("--quick cuts the benchmark's shapes; --sweep measures the --shape shapes only: drop --quick")
    shapes = args.shape or [TARGET_SHAPE]
    if not torch.cuda.is_available():
        print("bench kernels: no CUDA GPU on this machine; the kernel benchmark needs one (nothing measured).")
        print(json.dumps(dict(skipped="no CUDA GPU")))
        return 0
    if args.sweep:
        return _run_sweeps(sweep_paged if args.paged else sweep_attention, shapes, args.out,
                           None if args.budget_s is None else time.time() + args.budget_s)
    from .report import environment, write_json
    doc = dict(environment=environment(), **run_all(quick=args.quick))
    print_report(doc)
    if args.out:
        with output_dir(args.out) as out:
            write_json(out / "kernels.json", doc)
    print(json.dumps(dict(attention_tflops={f"P{r['prefix']}_C{r['chunk']}": round(r["triton_tflops"], 1)
                                            for r in doc["attention"]},
                          memory_bound_of_copy={m["op"]: round(m["triton_of_copy"], 3) for m in doc["memory_bound"]})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
