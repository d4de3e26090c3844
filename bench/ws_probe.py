"""Would Triton's Hopper warp specialization speed up chunk_attention's prefix phase? The A/B that decides it.

At the target shape (prefix 16k, chunk 2k) 94% of chunk_attention's work is its prefix phase: every query of the
chunk over every prefix key, a plain (non-causal) flash-attention loop. Its 128x128 tile reaches 491 TFLOP/s on an
H200 (70% of the GEMM), the target is 560, and FlashAttention-3 gets past 600 on Hopper with warp specialization: a
producer warp group issues the tensor-memory (TMA) loads while two consumer warp groups, each half of the query tile,
do the matrix multiplies and the softmax, their registers rebalanced (`setmaxnreg`).

Triton 3.6-3.9 have a Hopper pass for it (`tl.range(..., warp_specialize=True)`), but chunk_attention's kernel does
not get it. Compiled for sm_90 without a GPU, the pass fails ("Unexpected op" in WSDataPartition) unless the query
tile comes through a 2-D tensor descriptor, and it fails whenever another loop with a matrix multiply follows the
specialized one (chunk_attention has two: the chunk's own keys, unmasked and on the diagonal). So chunk_attention's
config `ws` (a sweep option; the launcher does not choose it) runs the prefix's whole key blocks in a kernel of their
own (`_prefix_ws_kernel`), the rest of the prefix and the chunk in its usual kernel with the launcher's tile, and
merges their partial results as split-KV merges its slices: a third launch and a float32 round trip of the output
(32 MB at 16k/2k, about 2% of the kernel's time).

This probe times both, against float64, in the same run:
- kind "loop": `prefix_attention`, config ws's prefix kernel (`_prefix_ws_kernel`) alone over a prefix of whole key
  blocks, one program per (query block, query head), with and without `warp_specialize` (its `WS`) under a few
  tiles, the plain one with chunk_attention's own tile: does the pass pay at all;
- kind "chunk_attention": the whole op at the shape, its launcher's tile against config ws with each `WS_SWEEP`
  tile, replayed from CUDA graphs too: what it buys end to end.
The gpu-suite's kernel part runs it on a Hopper GPU (in a process of its own: `run_isolated`) and its summary says
which way it went.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels.compat import FP_FUSION
from kernels.shapes import cdiv

from .kernels import PEER_TOL, cpu_timer, gpu_timer, sweep_attention, tile_words, why

LOG2E = 1.4426950408889634


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "ws")


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict, out=None) -> torch.Tensor:
    """Attention of queries q [C, Hq, D] over every key and value k, v [P, Hkv, D] (no mask; one batch row) by
    chunk_attention's `_prefix_ws_kernel` with `config` (CONFIG_KEYS; `ws`: the key loop warp-specialized), its
    float32 result written into `out` when given, else returned in q's dtype."""
    part, lse = _check(q, k, v, config)
    if out is None:
        out = torch.empty_like(q)
    elif not (isinstance(out, torch.Tensor) and out.shape == q.shape and out.device == q.device):
        raise ValueError(f"prefix_attention: out must be a tensor of q's shape ({tuple(q.shape)}) on {q.device}")
    if q.shape[0]:
        _launch(q, k, v, part, lse, config)
    return out.copy_(part[1, 0])


def _check(q, k, v, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's inputs checked; the kernel's float32 result and log-sum-exp buffers ([2, 1, C, Hq(, D)]: it writes
    the second split, as config ws does)."""
    if not isinstance(config, dict) or set(config) != set(CONFIG_KEYS):
        raise ValueError(f"prefix_attention: config must give exactly {', '.join(CONFIG_KEYS)}, got "
                         f"{sorted(config) if isinstance(config, dict) else repr(config)}")
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"prefix_attention: expected q [C, Hq, D] and k, v [P, Hkv, D] with Hq a multiple of Hkv, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not all(t.is_contiguous() for t in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError("prefix_attention: q, k and v must be contiguous and of one dtype")
    (C, Hq, D), P = q.shape, k.shape[0]
    if D & (D - 1) or D < 16:
        raise ValueError(f"prefix_attention: the head dim must be a power of two >= 16 (whole descriptor tiles), "
                         f"got {D}")
    if P % config["BLOCK_N"] or P == 0:
        raise ValueError(f"prefix_attention: the prefix ({P} keys) must be a positive multiple of BLOCK_N "
                         f"({config['BLOCK_N']}): the loop has no masked tail")
    return (torch.full((2, 1, C, Hq, D), float("nan"), device=q.device),
            torch.full((2, 1, C, Hq), float("nan"), device=q.device))


def _launch(q, k, v, part, lse, config: dict):
    """The kernel alone, on checked inputs: q as one batch row of C queries, k and v as a cache of P rows all of them
    prefix; returns what Triton returns (the compiled kernel, on a GPU)."""
    from kernels.chunk_attention import _prefix_ws_kernel, _tma_allocator
    _tma_allocator(q.device)
    (C, Hq, D), P = q.shape, k.shape[0]
    return _prefix_ws_kernel[(cdiv(C, config["BLOCK_M"]), Hq)](
        q, k, v, part, lse, P, P, 1, C, Hq, D ** -0.5 * LOG2E, GROUP=Hq // k.shape[1], HEAD_DIM=D,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WS=bool(config["ws"]), num_warps=config["num_warps"], num_stages=config["num_stages"],
        enable_fp_fusion=FP_FUSION)


def prefix_attention_ref(q, k, v) -> torch.Tensor:
    """float64 reference of `prefix_attention`, one query head at a time (the scores of a long prefix are large)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        s = q[:, h].double() @ kh.T * q.shape[2] ** -0.5
        out[:, h] = torch.softmax(s, dim=-1) @ vh
    return out


# plain: chunk_attention's own tile over a prefix (128x128, 8 warps, 3 load stages) and two neighbours; specialized:
# 4 warps, which the pass makes a producer warp group and two consumer groups of 64 query rows each (12 warps),
# num_stages the tiles in flight (128x128 with 3 needs 246 KB of shared memory, over Hopper's 227; 128x128 plain with
# 4 warps spills: neither is here). Compiled for sm_90 under Triton 3.6: no spills, at most 229,792 B of shared
# memory, 12 warps and `setmaxnreg` in every specialized one (tests/test_ws_probe.py checks under the installed one).
PROBE_CONFIGS = (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, ws=False),
                 dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, ws=False),
                 dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, ws=False),
                 dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, ws=True),
                 dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, ws=True),
                 dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4, ws=True))


def run_ws_probe(shape=(16384, 2048), Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, device="cuda", timer=None,
                 configs=PROBE_CONFIGS, ws_configs=None, deadline: float | None = None, on_row=None) -> list[dict]:
    """The probe at the prefix and chunk of `shape`, one row per config (each with its time, TFLOP/s and max error
    against float64, or why it did not compile or run; past `deadline` (time.time()) no config starts: its row says
    so), `on_row(row)` after each:
    - kind "loop": `prefix_attention` under each of `configs`; on CUDA with the compiled kernel's warp count (`warps`:
      12 from 4 where the pass specialized the loop);
    - kind "chunk_attention": the whole op at that shape, its launcher's own tile first (`launcher`), then config ws
      (the prefix's whole key blocks in the warp-specialized kernel, the rest and the chunk in the launcher's tile,
      merged) with each of `ws_configs` (default: `WS_SWEEP`'s at this head dim), replayed from CUDA graphs too."""
    from kernels.chunk_attention import WS_SWEEP
    timer = timer or (gpu_timer if torch.device(device).type == "cuda" else cpu_timer)
    ws_configs = [cfg for d, cfg in WS_SWEEP if d == D] if ws_configs is None else list(ws_configs)
    P, C = shape
    rows = []

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)
    late = deadline is not None and time.time() > deadline
    if not late:  # the inputs and their float64 reference only if a config will run
        g = torch.Generator(device=device).manual_seed(P * 7919 + C)
        q = torch.randn(C, Hq, D, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(P, Hkv, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        ref = prefix_attention_ref(q, k, v)
    flops = 4 * C * P * Hq * D
    for cfg in configs:
        row = dict(cfg, kind="loop", prefix=P, chunk=C)
        if deadline is not None and time.time() > deadline:
            emit(dict(row, not_run="past the kernel part's budget"))
            continue
        try:
            part, lse = _check(q, k, v, cfg)  # NaN-poisoned
            compiled = _launch(q, k, v, part, lse, cfg)  # compiles; its result is checked below
            ms = timer(lambda: _launch(q, k, v, part, lse, cfg))  # noqa: B023 - called here
        except Exception as e:  # noqa: BLE001 - said in the row: a config that does not compile is a result
            emit(dict(row, error=why(e)))
            continue
        row.update(ms=ms, tflops=flops / ms / 1e9, max_abs_err=(part[1, 0].double() - ref).abs().max().item())
        if q.is_cuda:  # the compiled kernel (the interpreter returns none)
            row["warps"] = compiled.metadata.num_warps
        emit(row)
    if deadline is not None and time.time() > deadline:
        for cfg in [None] + ws_configs:
            emit(dict(cfg or {}, kind="chunk_attention", prefix=P, chunk=C, launcher=cfg is None,
                      not_run="past the kernel part's budget"))
        return rows
    sweep_attention(configs=ws_configs, shape=shape, B=1, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, device=device,
                    timer=timer, deadline=deadline, launcher_first=True,
                    on_row=lambda so_far: emit(dict(so_far[-1], kind="chunk_attention")))
    return rows


def skip_reason(device) -> str | None:
    """Why the probe has nothing to tell on `device` (None on a Hopper GPU, where it runs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"not run: it times Hopper's warp specialization, and {device.type} is not a CUDA GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap[0] != 9:
        return f"not run: it times Hopper's warp specialization (compute capability 9.x), this GPU is {cap[0]}.{cap[1]}"
    return None


def ws_probe_lines(rows: list[dict], tol: float = PEER_TOL[torch.bfloat16]) -> list[str]:
    """The probe in words: the loop's configs (TFLOP/s or why not) and the best warp-specialized tile over the best
    plain one; then chunk_attention with config ws against its launcher's tile, by CUDA-graph replays where every
    row has one. Rows with an error over `tol` do not count."""
    if not rows:
        return []
    P, C = rows[0]["prefix"], rows[0]["chunk"]
    loop = [r for r in rows if r.get("kind", "loop") == "loop"]
    whole = [r for r in rows if r.get("kind") == "chunk_attention"]
    out = [f"warp-specialization probe (chunk_attention's prefix phase alone: {C} queries over {P} keys, no mask):"]
    for r in loop:
        if "tflops" in r:
            ok = r["max_abs_err"] <= tol
            out.append(f"  {tile_words(r, ('ws',))}: {r['tflops']:.0f} TFLOP/s, err {r['max_abs_err']:.1e}"
                       + ("" if ok else " WRONG")
                       + (f", {r['warps']} warps compiled" if r.get("warps") else ""))
        else:
            out.append(f"  {tile_words(r, ('ws',))}: " + (r.get("error") or f"not run ({r.get('not_run')})"))
    ok = [r for r in loop if "tflops" in r and r["max_abs_err"] <= tol]
    ws, plain = ([r for r in ok if r["ws"] is flag] for flag in (True, False))
    if ws and plain:
        best_ws, best_plain = (max(rs, key=lambda r: r["tflops"]) for rs in (ws, plain))
        out.append(f"  specialized over plain: {best_ws['tflops'] / best_plain['tflops']:.2f}x (best of each)")
    else:
        kind = "" if not (ws or plain) else "plain " if ws else "specialized "
        tried = not kind or any(r["ws"] is (kind == "specialized ") for r in loop)
        out.append(f"  specialized over plain: not measured (no {kind}config "
                   + ("ran correctly)" if tried else "in the probe)"))
    if whole:
        good = [r for r in whole if "tflops" in r and r["max_abs_err"] <= tol]
        graph = bool(good) and all("graph_ms" in r for r in good)
        key = "graph_ms" if graph else "ms"
        own = next((r for r in good if r.get("launcher")), None)
        out.append("  chunk_attention at this shape, the prefix's whole key blocks in the specialized kernel (config "
                   "ws) against its launcher's tile" + (" (CUDA graph replays)" if graph else "") + ":")
        for r in whole:
            # a launcher row that did not run has no tile: the launcher's pick is made in the probe's process
            name = ("launcher " if r.get("launcher") else "") + (
                tile_words(r, ("pack_gqa", "no_prefix", "ws")) if "BLOCK_M" in r else "tile")
            if r in good:
                vs = f" = {own[key] / r[key]:.2f}x the launcher's" if own is not None and r is not own else ""
                out.append(f"    {name}: {r['graph_tflops' if graph else 'tflops']:.0f} TFLOP/s{vs}")
            elif "tflops" in r:
                out.append(f"    {name}: err {r['max_abs_err']:.1e} WRONG")
            else:
                out.append(f"    {name}: " + (r.get("error") or f"not run ({r.get('not_run')})"))
    return out


ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 15.0  # the probe's process: importing torch and Triton, a CUDA context (seconds on a GPU machine)
# the most the probe may take: six compiles and timings, about 40 s expected; a hang then costs the kernel part no
# more than this (the rows after the probe, sliding windows and paged batches, still run)
MAX_PROBE_S = 100.0


def run_isolated(deadline: float, case: dict | None = None, cmd: list[str] | None = None) -> list[dict]:
    """`run_ws_probe` in a process of its own (`python -m bench.ws_probe`), killed at `deadline` (time.time()) or
    MAX_PROBE_S after it starts, whichever comes first: a warp-specialized kernel, its warp groups synchronised by
    barriers, has never run here, and one that hung would hang the suite's process (a fault would poison its CUDA
    context for the parts after it). The rows come back one JSON line each as they are measured; the config running
    when the process was killed, or died, says so, those after it are not run. `case`: run_ws_probe's keyword
    arguments (shape, Hq, Hkv, D, dtype by name, device, configs, ws_configs), for tests; `cmd`: the command instead
    (tests)."""
    from kernels.chunk_attention import WS_SWEEP
    case = dict(case or {})
    P, C = case.get("shape", (16384, 2048))
    ws_configs = case.get("ws_configs", [cfg for d, cfg in WS_SWEEP if d == case.get("D", 128)])
    plan = [dict(cfg, kind="loop") for cfg in case.get("configs", PROBE_CONFIGS)] + [
        dict(kind="chunk_attention", launcher=True)] + [dict(cfg, kind="chunk_attention", launcher=False)
                                                         for cfg in ws_configs]
    deadline = min(deadline, time.time() + MAX_PROBE_S)
    budget = deadline - time.time()
    if budget < STARTUP_S:
        return [dict(p, prefix=P, chunk=C, not_run="past the kernel part's budget") for p in plan]
    cmd = cmd or [sys.executable, "-m", "bench.ws_probe", "--budget-s", f"{budget - STARTUP_S:.0f}",
                  "--case", json.dumps(case)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} if case.get("device", "cuda") == "cuda" \
        else dict(os.environ)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        ended = f"its process ended (exit code {proc.returncode}): " \
                f"{((err or '').strip().splitlines() or ['no message'])[-1][:300]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        ended = f"killed {budget:.0f} s after the probe started (its budget): hung, or too slow"
    rows = []
    for line in out.splitlines():
        try:
            rows.append(json.loads(line)["row"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    rest = [dict(p, prefix=P, chunk=C) for p in plan[len(rows):]]
    if rest:
        rest[0]["error"] = f"not measured: {ended}"
        for r in rest[1:]:
            r["not_run"] = "the probe's process ended before it"
    return rows + rest


def _case(text: str) -> dict:
    try:
        case = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object of run_ws_probe's arguments, got {text!r} ({e})")
    allowed = {"shape", "Hq", "Hkv", "D", "dtype", "device", "configs", "ws_configs"}
    if not isinstance(case, dict) or not set(case) <= allowed:
        raise argparse.ArgumentTypeError(f"expected a JSON object with keys among {', '.join(sorted(allowed))}, "
                                         f"got {text!r}")
    if "dtype" in case:
        if case["dtype"] not in ("float32", "float16", "bfloat16"):
            raise argparse.ArgumentTypeError(f"dtype must be float32, float16 or bfloat16, got {case['dtype']!r}")
        case["dtype"] = getattr(torch, case["dtype"])
    for key in ("configs", "ws_configs"):
        if key in case:
            case[key] = tuple(case[key])
    if "shape" in case:
        case["shape"] = tuple(case["shape"])
    return case


def main(argv=None) -> int:
    """`python -m bench.ws_probe`: the probe at the target shape on this machine's GPU, one JSON line per config
    ({"row": ...}) as it is measured, then the lines of `ws_probe_lines` on stderr."""
    ap = argparse.ArgumentParser(prog="python -m bench.ws_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=None, help="start no config after this many seconds")
    ap.add_argument("--case", type=_case, default={}, help="run_ws_probe's keyword arguments as JSON (tests)")
    args = ap.parse_args(argv)
    case = args.case
    device = case.get("device", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("python -m bench.ws_probe: refused: no CUDA GPU is visible to torch; the probe times a Hopper GPU",
              file=sys.stderr)
        return 2
    if device == "cuda" and skip_reason(device):
        print(f"python -m bench.ws_probe: refused, {skip_reason(device)}", file=sys.stderr)
        return 2
    deadline = None if args.budget_s is None else time.time() + args.budget_s
    rows = run_ws_probe(**case, deadline=deadline, on_row=lambda r: print(json.dumps(dict(row=r)), flush=True))
    for line in ws_probe_lines(rows):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
