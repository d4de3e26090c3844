"""The warp-specialization probe (`bench.ws_probe`): its kernel right against float64 under the interpreter, with and
without `warp_specialize`; compiled for Hopper (no GPU) the specialized configs really specialize; the probe's rows,
lines and place in the kernel part."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.ws_probe import (PROBE_CONFIGS, prefix_attention, prefix_attention_ref, run_ws_probe, skip_reason,
                            ws_probe_lines)

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("C,P,Hq,Hkv,D,bm,bn", [(37, 48, 6, 2, 16, 16, 16), (5, 64, 4, 4, 32, 32, 32),
                                                (70, 32, 8, 2, 16, 32, 16)])
def test_prefix_attention_matches_float64(dtype, ws, C, P, Hq, Hkv, D, bm, bn):
    """Chunks that are not a whole number of query blocks, GQA groups of 1-4, into a NaN-poisoned output."""
    g = torch.Generator().manual_seed(C * 1000 + P + ws)
    q = torch.randn(C, Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(P, Hkv, D, generator=g).to(dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, ws=ws)
    assert prefix_attention(q, k, v, cfg, out=out) is out
    err = (out.double() - prefix_attention_ref(q, k, v)).abs().max().item()
    assert err < TOL[dtype], err
    s = q[:, 0].double() @ k[:, 0].double().T / D ** 0.5  # the reference itself, one head by hand
    assert torch.allclose(prefix_attention_ref(q, k, v)[:, 0], torch.softmax(s, -1) @ v[:, 0].double())


def test_prefix_attention_refuses_what_its_loop_cannot_do():
    q, k = torch.randn(4, 2, 16), torch.randn(24, 1, 16)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, ws=False)
    with pytest.raises(ValueError, match=r"prefix \(24 keys\) must be a positive multiple of BLOCK_N \(16\)"):
        prefix_attention(q, k, k, cfg)
    with pytest.raises(ValueError, match="head dim must be a power of two >= 16.*got 24"):
        prefix_attention(torch.randn(4, 2, 24), torch.randn(16, 1, 24), torch.randn(16, 1, 24), cfg)
    with pytest.raises(ValueError, match=r"config must give exactly BLOCK_M, BLOCK_N, num_warps, num_stages, ws"):
        prefix_attention(q, k[:16], k[:16], {**cfg, "tma": True})
    with pytest.raises(ValueError, match=r"Hq a multiple of Hkv, got \(4, 3, 16\), \(16, 2, 16\)"):
        prefix_attention(torch.randn(4, 3, 16), torch.randn(16, 2, 16), torch.randn(16, 2, 16), cfg)
    empty = prefix_attention(q[:0], k[:16], k[:16], cfg)
    assert empty.shape == (0, 2, 16)


SPECIALIZES = """
import json, sys
from triton.compiler import ASTSource
from kernels.aot import _compile, ptxas_report
from kernels.chunk_attention import _prefix_ws_kernel
from bench.ws_probe import PROBE_CONFIGS
sig = {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "Part": "*fp32", "Lse": "*fp32", "start_pos": "i32",
       "max_len": "i32", "B": "i32", "C": "i32", "Hq": "i32", "qk_scale": "fp32"}
for cfg in PROBE_CONFIGS:
    const = dict(GROUP=4, HEAD_DIM=128, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION="tf32", WS=cfg["ws"])
    src = ASTSource(_prefix_ws_kernel, sig | {k: "constexpr" for k in const}, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(5)})
    k, log = _compile(src, 90, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True))
    ptx = k.asm["ptx"]
    print(json.dumps(dict(cfg, warps=k.metadata.num_warps, shared=k.metadata.shared, setmaxnreg="setmaxnreg" in ptx,
                          wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx, **ptxas_report(log))))
"""


def test_the_probe_configs_compile_for_hopper_and_the_specialized_ones_specialize():
    """Config ws's prefix kernel under each probe config, compiled for sm_90 (no GPU needed): each specialized one
    becomes a producer warp group and two consumer groups (12 warps from 4, registers moved by setmaxnreg), the plain
    ones do not; every one with wgmma, TMA loads,
    no spill and within Hopper's 227 KB of shared memory per block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SPECIALIZES], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(PROBE_CONFIGS), res.stderr[-3000:]
    for r in rows:
        assert r["warps"] == (12 if r["ws"] else r["num_warps"]) and r["setmaxnreg"] == r["ws"], r
        assert r["wgmma"] and r["tma"] and r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["shared"] <= 232448, r
    assert {r["ws"] for r in rows} == {False, True}


def test_run_ws_probe_rows_and_lines():
    """The loop's configs, then chunk_attention end to end (its launcher's tile, then config ws), each against float64
    with its time, and the lines that say which way it went."""
    times = iter([2.0, 1.0, 3.0, 1.5])  # the third loop config fails before its timing
    cfgs = (dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, ws=False),
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2, ws=True),
            dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, ws=True))  # 48 keys: not whole blocks of 32
    ws = [dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2, ws=True)]
    rows = run_ws_probe(shape=(48, 19), Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu",
                        timer=lambda fn: (fn(), next(times))[1], configs=cfgs, ws_configs=ws)
    assert [(r["kind"], r["prefix"], r["chunk"], r.get("ws", False)) for r in rows] == [
        ("loop", 48, 19, False), ("loop", 48, 19, True), ("loop", 48, 19, True),
        ("chunk_attention", 48, 19, False), ("chunk_attention", 48, 19, True)]
    assert rows[3]["launcher"] and not rows[4]["launcher"]
    assert all(r["max_abs_err"] < 2e-5 for r in rows if "max_abs_err" in r)
    assert rows[0]["tflops"] == pytest.approx(4 * 19 * 48 * 4 * 16 / 2.0 / 1e9)
    assert rows[2]["error"].startswith("ValueError: prefix_attention: the prefix (48 keys) must be")
    lines = ws_probe_lines(rows)
    assert lines[0] == ("warp-specialization probe (chunk_attention's prefix phase alone: 19 queries over 48 keys, "
                        "no mask):")
    assert lines[1].startswith("  16x16 w4s2: 0 TFLOP/s, err ") and lines[2].startswith("  32x16 w4s2 ws: ")
    assert lines[3].startswith("  16x32 w4s2 ws: ValueError: prefix_attention: the prefix (48 keys)")
    assert lines[4] == "  specialized over plain: 2.00x (best of each)"
    assert lines[5] == ("  chunk_attention at this shape, the prefix's whole key blocks in the specialized kernel "
                        "(config ws) against its launcher's tile:")
    assert lines[6].startswith("    launcher 64x64 w4s1") and lines[7].startswith("    32x16 w4s2 ws: ")
    assert lines[7].endswith(" = 2.00x the launcher's")
    rows[1]["max_abs_err"] = 1.0  # a wrong result does not count
    rows[4]["max_abs_err"] = 1.0
    lines = ws_probe_lines(rows)
    assert lines[2].endswith(" WRONG") and lines[4] == ("  specialized over plain: not measured (no specialized "
                                                        "config ran correctly)")
    assert lines[7] == "    32x16 w4s2 ws: err 1.0e+00 WRONG"
    assert ws_probe_lines([]) == []
    # past the deadline: no inputs, no reference (at the real shape a float64 reference on a CPU takes minutes)
    late = run_ws_probe(device="cpu", deadline=time.time() - 1)
    assert [r["not_run"] for r in late] == ["past the kernel part's budget"] * (len(PROBE_CONFIGS) + 3)
    assert [r["kind"] for r in late[-3:]] == ["chunk_attention"] * 3 and late[-3]["launcher"]
    assert ws_probe_lines(late)[len(PROBE_CONFIGS) + 1] == ("  specialized over plain: not measured (no config ran "
                                                            "correctly)")
    assert ws_probe_lines(late)[-1].endswith(" ws: not run (past the kernel part's budget)")
    assert ws_probe_lines(rows[:1])[-1] == "  specialized over plain: not measured (no specialized config in the probe)"


def test_the_probe_runs_in_a_process_of_its_own_and_a_hang_costs_only_its_rows(monkeypatch):
    """run_isolated: the rows the probe's process printed come back; the config it was on when it was killed (at the
    deadline) or died says so, the ones after it are not run."""
    import bench.ws_probe as wp
    cfgs = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, ws=w) for w in (False, True, True)]
    case = dict(shape=(32, 5), Hq=2, Hkv=1, D=16, dtype="float32", device="cpu", configs=cfgs, ws_configs=cfgs[1:2])
    rows = wp.run_isolated(time.time() + 300, case=case)  # the real thing, in the interpreter
    assert [(r["kind"], r.get("ws", False)) for r in rows] == [("loop", False), ("loop", True), ("loop", True),
                                                                ("chunk_attention", False), ("chunk_attention", True)]
    assert all(r["max_abs_err"] < 2e-5 for r in rows), rows
    monkeypatch.setattr(wp, "STARTUP_S", 0.0)
    row = json.dumps(dict(row=dict(cfgs[0], prefix=32, chunk=5, ms=1.0, tflops=1.0, max_abs_err=0.0)))
    hang = [sys.executable, "-c", f"import time; print({row!r}, flush=True); time.sleep(60)"]
    t = time.time()
    rows = wp.run_isolated(time.time() + 3, case=dict(shape=(32, 5), configs=cfgs, ws_configs=[]), cmd=hang)
    assert time.time() - t < 30
    assert rows[0]["ms"] == 1.0 and rows[1]["error"].startswith("not measured: killed 3 s after the probe started "
                                                                "(its budget)")
    assert rows[2] == dict(cfgs[2], kind="loop", prefix=32, chunk=5, not_run="the probe's process ended before it")
    assert rows[3] == dict(kind="chunk_attention", launcher=True, prefix=32, chunk=5,
                           not_run="the probe's process ended before it")

    died = [sys.executable, "-c", "import sys; sys.exit('boom: a fault')"]
    rows = wp.run_isolated(time.time() + 30, case=dict(shape=(32, 5), configs=cfgs), cmd=died)
    assert rows[0]["error"] == "not measured: its process ended (exit code 1): boom: a fault"
    assert [r.get("not_run") for r in rows[1:]] == ["the probe's process ended before it"] * 5  # 2 + launcher + 2 ws
    monkeypatch.setattr(wp, "STARTUP_S", 15.0)
    rows = wp.run_isolated(time.time() + 5, case=dict(configs=cfgs))  # too little time to start it
    assert [r["not_run"] for r in rows] == ["past the kernel part's budget"] * 6 and rows[0]["prefix"] == 16384


def test_the_probe_command_refuses_bad_input_in_one_line():
    for case, said in (('{"x": 1}', "keys among D, Hkv, Hq, configs, device, dtype, shape"),
                       ('{"dtype": "int8"}', "dtype must be float32, float16 or bfloat16, got 'int8'"),
                       ("[1", "expected a JSON object of run_ws_probe's arguments")):
        res = subprocess.run([sys.executable, "-m", "bench.ws_probe", "--case", case], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr, res.stderr
    if not torch.cuda.is_available():
        res = subprocess.run([sys.executable, "-m", "bench.ws_probe"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and res.stderr.strip() == ("python -m bench.ws_probe: refused: no CUDA GPU is "
                                                              "visible to torch; the probe times a Hopper GPU")


def test_the_probe_command_refuses_a_gpu_that_is_not_hopper(monkeypatch, capsys):
    import bench.ws_probe as wp
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(wp, "run_ws_probe", lambda **kw: 1 / 0)  # never reached
    assert wp.main([]) == 2
    assert capsys.readouterr().err.strip() == ("python -m bench.ws_probe: refused, not run: it times Hopper's warp "
                                               "specialization (compute capability 9.x), this GPU is 8.0")


def test_the_probe_runs_on_hopper_only_and_the_summary_shows_it(monkeypatch):
    assert skip_reason("cpu") == "not run: it times Hopper's warp specialization, and cpu is not a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert skip_reason("cuda") == ("not run: it times Hopper's warp specialization (compute capability 9.x), this GPU "
                                   "is 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert skip_reason("cuda") is None
    from bench.gpu_summary import summary_markdown
    row = dict(BLOCK_M=128, BLOCK_N=128, num_stages=2, prefix=16384, chunk=2048, max_abs_err=2e-3)
    probe = [dict(row, kind="loop", num_warps=8, ws=False, tflops=500.0, warps=8),
             dict(row, kind="loop", num_warps=4, ws=True, tflops=550.0, warps=12),
             dict(row, kind="chunk_attention", launcher=True, num_warps=8, num_stages=3, ms=1.2, graph_ms=1.19,
                  tflops=490.0, graph_tflops=491.0),
             dict(row, kind="chunk_attention", launcher=False, num_warps=4, ws=True, ms=1.1, graph_ms=1.0,
                  tflops=530.0, graph_tflops=585.0)]
    attention = [dict(prefix=16384, chunk=2048, triton_tflops=491.0, triton_of_gemm=0.7, best_peer="flex",
                      speedup_vs_best_peer=1.17, max_abs_err=2e-4)]
    kernels = dict(copy_gbps=3000.0, gemm_bf16_tflops=700.0, attention=attention, memory_bound=[], ws_probe=probe,
                   targets=dict(attention_tflops=560.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8))
    text = summary_markdown(dict(device="NVIDIA H200"), None, kernels, None)
    assert ("Warp-specialization probe (chunk_attention's prefix phase alone: 2048 queries over 16384 keys, no mask):"
            "\n\n- 128x128 w8s2: 500 TFLOP/s, err 2.0e-03, 8 warps compiled\n- 128x128 w4s2 ws: 550 TFLOP/s, err "
            "2.0e-03, 12 warps compiled\n- specialized over plain: 1.10x (best of each)\n- chunk_attention at this "
            "shape, the prefix's whole key blocks in the specialized kernel (config ws) against its launcher's tile "
            "(CUDA graph replays):\n  - launcher 128x128 w8s3: 491 TFLOP/s\n  - 128x128 w4s2 ws: 585 TFLOP/s = 1.19x "
            "the launcher's") in text
    assert ("- Target ≥ 560 TFLOP/s at prefix 16k, chunk 2k: 491 → MISSED by 12%; with config ws (the "
            "warp-specialization probe, 128x128 w4s2, not the launcher's choice): 530 → MISSED by 5%") in text
    probe[3]["max_abs_err"] = 1.0  # a wrong run does not count
    assert "with config ws" not in summary_markdown(dict(device="NVIDIA H200"), None, kernels, None)
    del kernels["ws_probe"]  # a file from before the probe
    assert "probe" not in summary_markdown(dict(device="NVIDIA H200"), None, kernels, None)
