"""The GPU suite and the kernel benchmark without a GPU: the command refuses cleanly, and every part runs here on
tiny shapes (Triton's interpreter, the in-process link) so that the first GPU session runs tested code."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_suite, gpu_summary
from bench.kernels import (attention_flops, bench_attention, bench_memory_bound, copy_bandwidth, cpu_timer,
                           gemm_tflops, visible_pairs)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_suite_refuses_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench", "gpu-suite", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr and "Nothing was written" in res.stderr
    assert not out.exists()


def test_gpu_suite_refuses_unknown_parts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path), "--parts", "tests,benchmarks"])
    assert "unknown part 'benchmarks'" in capsys.readouterr().err


def test_visible_pairs_counts_bottom_right_causal():
    for C, P in ((1, 0), (5, 3), (17, 100)):
        mask = torch.arange(P + C)[None, :] <= P + torch.arange(C)[:, None]
        assert visible_pairs(C, P) == int(mask.sum())
    assert attention_flops(2, 4, 8, 5, 3) == 4 * 2 * 4 * 8 * visible_pairs(5, 3)


def test_attention_benchmark_runs_and_checks_accuracy():
    rows = bench_attention(B=1, Hq=4, Hkv=2, D=16, dtype=torch.float32, shapes=((0, 5), (37, 16)), device="cpu",
                           timer=lambda fn: cpu_timer(fn, repeats=1), compile_flex=False)
    assert [(r["prefix"], r["chunk"]) for r in rows] == [(0, 5), (37, 16)]
    for r in rows:
        assert r["max_abs_err"] < 1e-5  # NaN-poisoned output, float64 reference: NaN would fail this
        assert r["triton_ms"] > 0 and r["triton_tflops"] > 0
        assert r["launch_host_us"] > 0 and r["launch_python_us"] > 0 and r["launch_graph_us"] is None  # no CUDA
        assert r["launch_steady_us"] > 0
        assert r["launch"]["splits"] == 1 and r["launch"]["grid"][2] == 1 and "BLOCK_M" in r["launch"]
        assert r["triton_correct"] and r["flex_max_abs_err"] < 1e-5 and r["sdpa_dense_repeat_max_abs_err"] < 1e-5
        assert r["flex_first_call_s"] > 0  # its compile, on a GPU
        assert r["best_peer"] not in (None, "sdpa_dense_repeat") and r["speedup_vs_best_peer"] > 0
        for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex"):  # each peer either ran or says why not
            assert r[f"{name}_ms"] is not None or r[f"{name}_why"]
            assert r[f"{name}_ms"] is None or r[f"{name}_max_abs_err"] < 1e-5  # ran: and was checked


def test_window_benchmark_runs_and_checks_accuracy():
    """The sliding-window rows: the kernel and every peer (flex with the window's block mask, SDPA with it as a
    boolean mask) checked against float64 with the window; FLOPs counted over the pairs the window leaves."""
    from bench.kernels import bench_window, window_mask, window_pairs
    assert window_pairs(5, 3, 4) == 20 and window_pairs(3, 0, 2) == 1 + 2 + 2  # min(P + i + 1, W) per query
    for C, P, W in ((5, 3, 4), (16, 0, 5), (7, 40, 100)):
        assert window_pairs(C, P, W) == int(window_mask(C, P + C, P, W, "cpu").sum())
    rows = bench_window(Hq=4, Hkv=2, D=16, dtype=torch.float32, shapes=((37, 16, 9), (0, 20, 7)), device="cpu",
                        timer=lambda fn: cpu_timer(fn, repeats=1), compile_flex=False)
    assert [(r["prefix"], r["chunk"], r["window"]) for r in rows] == [(37, 16, 9), (0, 20, 7)]
    for r in rows:
        assert r["triton_correct"] and r["max_abs_err"] < 1e-5 and r["triton_tflops"] > 0
        assert r["flex_max_abs_err"] < 1e-5 and r["best_peer"] is not None and r["speedup_vs_best_peer"] > 0
        for name in ("sdpa_mask_efficient", "sdpa_mask_cudnn", "sdpa_mask_efficient_repeat", "sdpa_mask_cudnn_repeat",
                     "flex"):  # each peer either ran or says why not
            assert r[f"{name}_ms"] is not None or r[f"{name}_why"]
            assert r[f"{name}_ms"] is None or r[f"{name}_max_abs_err"] < 1e-5


def test_window_sdpa_peers_see_the_keys_the_window_leaves(monkeypatch):
    """The SDPA window peers get the keys from the first query's window on and the mask cut to them, with native GQA
    and with K/V repeated: each equals float64 attention with the window (here on SDPA's math backend, the one a CPU
    runs with a mask; on a GPU the efficient and cuDNN backends run the same calls)."""
    from torch.nn.attention import SDPBackend

    import bench.kernels as bk
    monkeypatch.setattr(bk, "_sdpa_backends", lambda: (("flash", SDPBackend.FLASH_ATTENTION),
                                                       ("math", SDPBackend.MATH)))
    for P, C, W in ((37, 16, 9), (0, 20, 7), (5, 3, 100), (40, 1, 1)):
        q, kn, vn, kc, vc, heads_first, ref = bk.attention_case(P, C, 1, 4, 2, 16, torch.float32, "cpu", seed=P + C,
                                                                window=W)
        peers = bk.window_peers(*heads_first, P, W, compile_flex=False)
        assert set(peers) == {"flex", "sdpa_mask_math", "sdpa_mask_math_repeat"}
        for name, fn in peers.items():
            assert (fn().transpose(1, 2).double() - ref).abs().max().item() < 1e-5, (name, P, C, W)


def test_a_peer_that_cannot_run_says_why_in_its_row_not_in_warnings():
    """SDPA pinned to a backend that cannot run a shape raises only "No available kernel" and says why in warnings,
    one per backend considered (they flooded the GPU suite's log): the row gets the reason, the log none of it."""
    import warnings

    from bench.kernels import call_peer, time_peers

    def refused():
        for text in ("Memory efficient kernel not used because:", "For dense input, both fused kernels require query,"
                     " key and value to have the same num_heads.\nQuery.sizes(): [1, 4, 5, 16]",
                     "Flash attention has been runtime disabled.", "Flash attention kernel not used because:"):
            warnings.warn(text, UserWarning)
        raise RuntimeError("No available kernel. Aborting execution.")

    def chatty():
        warnings.warn("a peer's own warning", UserWarning)
        return torch.ones(1, 2, 3, 4)

    ref = torch.ones(1, 3, 2, 4, dtype=torch.float64)
    row = dict(triton_ms=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fair = time_peers(row, dict(refused=refused, ok=lambda: torch.ones(1, 2, 3, 4)), ref,
                          timer=lambda fn: 2.0, tol=1e-5)
        got, failed = call_peer(chatty)
    assert row["refused_ms"] is None and row["refused_why"] == (
        "RuntimeError: No available kernel. Aborting execution. (For dense input, both fused kernels require query, "
        "key and value to have the same num_heads.)")
    assert fair == dict(ok=2.0) and row["best_peer"] == "ok" and row["ok_max_abs_err"] == 0.0
    assert failed is None and got.shape == (1, 2, 3, 4)
    assert [str(w.message) for w in caught] == ["a peer's own warning"]  # a call that succeeds keeps its warnings


def test_paged_benchmark_runs_and_checks_accuracy(tmp_path):
    from bench.kernels import bench_paged
    rows = bench_paged(batches=(((0, 5),), ((37, 16), (0, 3), (20, 1))), page_sizes=(4, 16), Hq=4, Hkv=2, D=16,
                       dtype=torch.float32, device="cpu", timer=lambda fn: cpu_timer(fn, repeats=1), compile_flex=False)
    assert [(len(r["batch"]), r["page_size"]) for r in rows] == [(1, 4), (1, 16), (3, 4), (3, 16)]
    for r in rows:
        assert r["paged_correct"] and r["paged_max_abs_err"] < 1e-5 and r["dense_rows_max_abs_err"] < 1e-5
        assert r["paged_ms"] > 0 and r["paged_tflops"] > 0 and r["paged_vs_dense_rows"] > 0
        assert r["best_sdpa"] is None or r["sdpa_rows_max_abs_err"] < 1e-5
        # every SDPA backend either ran correctly (the best of them kept) or says why it is not a peer here
        assert r["best_sdpa"] not in r["sdpa_refused"] and all(r["sdpa_refused"].values())
        assert r["flex_max_abs_err"] < 1e-5 and r["flex_ms"] > 0 and r["paged_vs_flex"] > 0  # one call, rows packed
        assert r["launch_plan"]["splits"] == 1 and r["launch_plan"]["grid"][2] == 1  # no SM count on CPU
    assert [r["launch_plan"]["pack"] for r in rows] == [2, 2, 2, 2]  # chunks of up to 16: the group's 2 heads packed
    _compare_paged_rows(rows, tmp_path)


def _compare_paged_rows(rows, tmp_path):
    """`bench compare` on two kernel files holding these paged rows: the paged kernel's (or the per-row dense
    kernel's) regression and error fail, a peer's slow-down does not, a batch missing from the new file fails."""
    import copy
    import json
    from bench.compare import compare
    doc = dict(schema_version=1, kind="kernels", environment=dict(device="cpu"), attention=[], memory_bound=[],
               paged=rows)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(doc))

    def verdict(edit):
        new = copy.deepcopy(doc)
        edit(new["paged"])
        path = tmp_path / "new.json"
        path.write_text(json.dumps(new))
        return compare(str(base), str(path))
    assert verdict(lambda p: None) == 0
    assert verdict(lambda p: p[2].update(paged_ms=p[2]["paged_ms"] * 1.5)) == 1
    assert verdict(lambda p: p[1].update(dense_rows_ms=p[1]["dense_rows_ms"] * 1.5)) == 1
    assert verdict(lambda p: p[0].update(sdpa_rows_ms=(p[0]["sdpa_rows_ms"] or 1.0) * 2)) == 0  # a peer: reported
    assert verdict(lambda p: p[3].update(paged_max_abs_err=1.0)) == 1
    assert verdict(lambda p: p.pop(3)) == 1


def test_memory_bound_benchmark_runs_and_checks_accuracy():
    rows = bench_memory_bound(tokens=9, hidden=48, intermediate=80, heads=3, kv_heads=1, head_dim=16,
                              dtype=torch.float32, device="cpu", timer=lambda fn: cpu_timer(fn, repeats=1))
    assert [r["op"] for r in rows] == ["add_rms_norm", "rope", "swiglu"]
    for r in rows:
        assert r["triton_max_abs_err"] < 1e-5 and r["eager_max_abs_err"] < 1e-5
        assert r["triton_gbps"] > 0 and r["eager_gbps"] > 0
        assert min(r["triton_host_us"], r["triton_steady_us"], r["eager_host_us"], r["eager_steady_us"]) > 0
    assert rows[1]["bytes"] == 2 * 9 * (3 + 1) * 16 * 4 + 2 * 9 * 8 * 4  # q's and k's heads, as the model calls it
    assert rows[2]["bytes"] == 3 * 9 * 80 * 4


def test_stubbed_triton_launches_enqueue_nothing_and_are_restored():
    from bench.kernels import triton_launches_stubbed
    from kernels import swiglu
    gate, up = torch.randn(3, 40), torch.randn(3, 40)
    out = torch.full((3, 40), float("nan"))
    with triton_launches_stubbed():
        assert swiglu(gate, up, out=out) is out and out.isnan().all()  # the launcher ran, the kernel did not
    swiglu(gate, up, out=out)
    assert torch.allclose(out, torch.nn.functional.silu(gate) * up, atol=1e-6)
    with pytest.raises(RuntimeError, match="inside"), triton_launches_stubbed():
        raise RuntimeError("inside")
    swiglu(gate, up * 2, out=out)  # restored after an exception too
    assert torch.allclose(out, torch.nn.functional.silu(gate) * up * 2, atol=1e-6)


def test_layer_host_cost_times_both_backends_on_the_same_work():
    from bench.kernels import bench_layer_host, layer_host_lines
    rows = bench_layer_host(model="tiny", layers=2, prefix=5, chunk=7, dtype=torch.float32, device="cpu",
                            timer=lambda fn: cpu_timer(fn, repeats=1), calls=2)
    assert [r["ops"] for r in rows] == ["triton", "torch"]
    for r in rows:
        assert (r["layers"], r["prefix"], r["chunk"]) == (2, 5, 7) and r["host_us"] > 0 and r["python_us"] > 0
        assert r["steady_us"] > 0
        assert r["graph_us"] is None
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["scale"]) and r["scale"] > 0
    lines = layer_host_lines(rows)
    assert lines[0].startswith("one stage's chunk (2 layers of tiny, chunk 7 at prefix 5")
    assert "device not measured" in lines[1] and lines[2].startswith("  torch ops: host")


def test_layer_host_cost_times_the_graphed_stage_chunk_too(emulated_graphs):
    """The third row: the Triton ops' stage chunk as --cuda-graphs enqueues it (capture emulated on CPU), its host
    time and its replay checked against the eager Triton output."""
    from bench.kernels import bench_layer_host, layer_host_lines
    rows = bench_layer_host(model="tiny", layers=2, prefix=5, chunk=7, dtype=torch.float32, device="cpu",
                            timer=lambda fn: cpu_timer(fn, repeats=1), calls=2, graphs=True)
    assert [r["ops"] for r in rows] == ["triton", "torch", "triton, CUDA graph"]
    g = rows[2]
    assert g["host_us"] > 0 and g["replay_max_abs_diff"] == 0.0 and g["graph_us"] is None
    assert layer_host_lines(rows)[3].startswith("  triton, CUDA graph ops: host ")
    assert layer_host_lines(rows)[3].endswith("; the replay within 0.0e+00 of the eager Triton output")


def test_layer_host_cost_keeps_a_backend_that_failed_as_a_row_that_says_why(monkeypatch):
    import bench.kernels as bk

    def capture_fails(fn, device, timer, calls=50, graph=True):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(bk, "launch_cost", capture_fails)
    rows = bk.bench_layer_host(model="tiny", layers=1, prefix=0, chunk=3, dtype=torch.float32, device="cpu")
    assert [r["error"] for r in rows] == ["RuntimeError: operation not permitted when stream is capturing"] * 2
    assert bk.layer_host_lines(rows)[1] == "  triton ops: not measured (RuntimeError: operation not permitted when " \
                                           "stream is capturing)"


def test_ceilings_measure_something_on_cpu():
    timer = lambda fn: cpu_timer(fn, repeats=1)  # noqa: E731
    assert copy_bandwidth(1 << 20, device="cpu", timer=timer) > 0
    assert gemm_tflops(64, dtype=torch.float32, device="cpu", timer=timer) > 0


def test_a_test_run_past_its_time_is_stopped_and_counted_from_its_log(tmp_path):
    """The suite's GPU tests stop at their share of the budget: what they finished comes from pytest's -v lines,
    a run stopped before any test says it left no report."""
    text = ("tests/test_kernels.py::test_a[fp16] PASSED                  [ 10%]\n"
            "tests/test_kernels.py::test_b FAILED                        [ 20%]\n"
            "tests/test_paged.py::test_c SKIPPED (no CUDA)               [ 30%]\n"
            "tests/test_paged.py::test_d ERROR                           [ 40%]\nsome other line PASSED\n")
    doc = gpu_suite.parse_verbose(text)
    assert (doc["tests"], doc["passed"], doc["skipped"]) == (4, 1, 1)
    assert doc["failed"] == ["tests/test_kernels.py::test_b", "tests/test_paged.py::test_d"]
    doc = gpu_suite.run_gpu_tests(tmp_path, timeout_s=0.2)  # torch alone takes longer to import
    assert doc["exit_code"] is None and "stopped after 0 s" in doc["timed_out"]
    assert doc["failed"] == ["pytest produced no report"] and doc["wall_s"] < 60
    text = gpu_summary.summary_markdown(dict(device="x"), doc, None, None)
    assert "**Incomplete: stopped after 0 s" in text


def test_the_time_plan_leaves_each_later_part_its_reserve():
    r = gpu_suite.PART_RESERVE_S
    plan = gpu_suite.part_deadlines(1000.0, 540.0, gpu_suite.PARTS)
    assert plan["graphs"] == 1540.0 and plan["sweeps"] == 1540.0 - r["graphs"]
    assert plan["ragged"] == 1540.0 - r["graphs"] - r["sweeps"]
    assert plan["pipeline"] == 1540.0 - r["graphs"] - r["sweeps"] - r["ragged"]
    assert plan["tests"] == 1540.0 - sum(v for k, v in r.items() if k not in ("tests", "nccl"))  # one GPU
    multi = gpu_suite.part_deadlines(1000.0, 540.0, gpu_suite.PARTS, gpus=2)  # the nccl part's reserve too
    assert multi["tests"] == 1540.0 - sum(v for k, v in r.items() if k != "tests") and r["nccl"] > 0
    assert multi["ragged"] == 1540.0 - r["graphs"] - r["sweeps"] - r["nccl"] and multi["nccl"] == plan["nccl"]
    assert gpu_suite.part_deadlines(0.0, 540.0, ["kernels", "pipeline"]) == dict(kernels=540.0 - r["pipeline"],
                                                                                   pipeline=540.0)


def test_the_kernel_part_starts_no_shape_past_its_deadline(monkeypatch):
    """Past the deadline no attention shape or paged batch starts; the document says which were left out."""
    import time

    import bench.kernels as bk
    slow = lambda fn: (fn(), time.sleep(0.3), 1.0)[-1]  # noqa: E731 - each timing takes the clock past the deadline
    rows = bench_attention(B=1, Hq=4, Hkv=2, D=16, dtype=torch.float32, shapes=((0, 5), (37, 16)), device="cpu",
                           timer=slow, compile_flex=False, deadline=time.time() + 0.1)
    assert [(r["prefix"], r["chunk"]) for r in rows] == [(0, 5)]
    assert bk.bench_paged(batches=(((3, 4),),), Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu", timer=slow,
                          deadline=time.time() - 1) == []
    monkeypatch.setattr(bk, "copy_bandwidth", lambda **kw: 100.0)
    monkeypatch.setattr(bk, "gemm_tflops", lambda **kw: 10.0)
    monkeypatch.setattr(bk, "bench_memory_bound", lambda **kw: [])
    monkeypatch.setattr(bk, "bench_layer_host", lambda **kw: 1 / 0)  # past the deadline: not started
    doc = bk.run_all(device="cpu", timer=slow, quick=True, deadline=time.time() - 1)
    assert doc["attention"] == [] and doc["paged"] == [] and doc["window"] == [] and not doc["complete"]
    assert doc["flex_compile"] == "static"
    assert doc["stopped"] == ("time budget: not measured attention P=16384 C=2048, attention P=0 C=256, "
                              "window P=16384 C=2048 W=4096, paged batch 0, the layer's host cost")
    doc = bk.run_all(device="cpu", timer=slow, deadline=time.time() - 1)  # the full set: the tile A/B too
    assert doc["tile_ab"] == [] and "tile A/B dense P=32768 C=1, tile A/B dense P=32768 C=16, window" \
        in doc["stopped"]


def test_flex_is_compiled_for_each_shape_and_may_recompile_for_every_shape(monkeypatch):
    """The flex peer is compiled with static shapes (dynamic=False: its decoding kernel for short chunks, unmasked
    full blocks), one compile per shape, and dynamo's recompile limit (8 by default, then it runs the frame eagerly)
    is raised above the benchmark's shape count; uncompiled (the CPU tests) nothing is compiled."""
    import torch._dynamo

    import bench.kernels as bk
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or fn)
    shapes = len(set(bk.ATTENTION_SHAPES) | set(bk.planner_shapes())) + len(bk.WINDOW_SHAPES) + len(bk.PAGED_BATCHES)
    # dynamo's own context restores the limit after (monkeypatch would delete the config entry on undo)
    with torch._dynamo.config.patch(recompile_limit=8):
        bk.flex_peer(compile_flex=False)
        assert compiled == [] and torch._dynamo.config.recompile_limit == 8
        bk.flex_peer()
        assert [kw for _, kw in compiled] == [dict(dynamic=False)]
        assert compiled[0][0].__name__ == "flex_attention"
        assert torch._dynamo.config.recompile_limit >= shapes and bk.FLEX_RECOMPILES >= shapes


def test_summary_says_when_flex_was_compiled_with_dynamic_shapes():
    """A kernel file from before flex was compiled per shape (no `flex_compile`) says its flex peer was handicapped;
    a newer one does not."""
    attention = [dict(prefix=0, chunk=256, triton_tflops=50.0, triton_of_gemm=0.07, best_peer="flex", flex_ms=0.1,
                      speedup_vs_best_peer=0.4, max_abs_err=2e-3, launch_host_us=40.0, launch_graph_us=12.0)]
    kernels = dict(copy_gbps=3000.0, gemm_bf16_tflops=700.0, attention=attention, memory_bound=[],
                   targets=dict(attention_tflops=500.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8))
    old = gpu_summary.summary_markdown(dict(device="x"), None, kernels, None)
    assert "flex_attention compiled with dynamic shapes in this run" in old and "a handicapped peer" in old
    new = gpu_summary.summary_markdown(dict(device="x"), None, kernels | dict(flex_compile="static"), None)
    assert "dynamic shapes" not in new


def test_junit_report_is_parsed(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1" time="2.5">'
                   '<testcase classname="tests.test_kernels" name="test_a"/>'
                   '<testcase classname="tests.test_kernels" name="test_b"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_kernels" name="test_c"><skipped/></testcase>'
                   '<testcase classname="tests.test_kernels" name="test_d"/></testsuite></testsuites>')
    doc = gpu_suite.parse_junit(xml)
    assert (doc["tests"], doc["passed"], doc["skipped"]) == (4, 2, 1)
    assert doc["failed"] == ["tests.test_kernels::test_b"]


@pytest.fixture(scope="module")
def pipeline_part():
    return gpu_suite.bench_pipeline(model="tiny", layers=2, stages=(2,), links=("pcie5", "100gbe"),
                                    prompt_lens=(48,), chunk_size=16, repeats=1, warmup=0, device="cpu",
                                    dtype="float32", ops="torch")


def test_pipeline_part_runs_every_mode_per_link(pipeline_part):
    doc, shown = pipeline_part
    assert doc["layers"] == 2 and doc["model_layers"] == 4
    assert [(p["stages"], p["link"], p["prompt_len"]) for p in doc["points"]] == [(2, "pcie5", 48), (2, "100gbe", 48)]
    for p in doc["points"]:
        assert set(p["modes"]) == {"unchunked", "naive", "chunked", "overlapped"}
        assert all(m["outputs_match"] and m["bytes_exact"] for m in p["modes"].values())
    assert shown is not None and set(shown[1]) == set(doc["points"][0]["modes"])


def test_summary_says_which_targets_are_missed_and_by_how_much(pipeline_part):
    env = dict(device="NVIDIA H100 80GB HBM3", driver="580.1", cuda="12.8", torch="2.11", triton="3.6",
               git_commit="abc")
    attention = [dict(prefix=16384, chunk=2048, triton_tflops=400.0, triton_of_gemm=0.6, best_peer="sdpa_cudnn",
                      speedup_vs_best_peer=1.1, max_abs_err=1e-2, launch_host_us=30.0, launch_graph_us=900.0),
                 dict(prefix=0, chunk=256, triton_tflops=50.0, triton_of_gemm=0.07, best_peer=None,
                      speedup_vs_best_peer=None, max_abs_err=2e-3, launch_host_us=40.0, launch_graph_us=12.0,
                      launch_python_us=14.0)]
    paged = [dict(batch=[[0, 2048], [30000, 1]], page_size=16, paged_tflops=321.0, paged_vs_dense_rows=1.25,
                  paged_vs_sdpa_rows=None, best_sdpa=None, launch_plan=dict(pack=1, splits=4), paged_max_abs_err=3e-3,
                  paged_correct=False, flex_ms=None, flex_why="error 0.5 over the tolerance")]
    memory = [dict(op="swiglu", triton_gbps=2700.0, triton_of_copy=0.9, eager_gbps=1500.0, triton_host_us=21.4,
                   triton_python_us=6.2, eager_host_us=9.6, triton_steady_us=8.0, eager_steady_us=5.0),
              dict(op="rope", triton_gbps=1800.0, triton_of_copy=0.6, eager_gbps=900.0)]  # an older file: no host
    layer = [dict(ops=o, model="llama3-8b", layers=2, prefix=2048, chunk=2048, host_us=h, python_us=p, graph_us=g,
                  max_abs_diff=0.03, scale=9.0)
             for o, h, p, g in (("triton", 900.0, 300.0, 3000.0), ("torch", 500.0, 490.0, None))]
    layer[0]["steady_us"] = 600.0  # the torch row as in a file from before back-to-back times
    tile = dict(kernel="dense", prefix=0, chunk=2048, num_warps=4, num_stages=3)
    ab = [dict(tile, BLOCK_M=64, BLOCK_N=64, no_prefix=True, launcher=True, tflops=300.0, vs_former=300 / 254),
          dict(tile, BLOCK_M=128, BLOCK_N=128, num_warps=8, launcher=False, tflops=254.0)]
    window = [dict(prefix=16384, chunk=2048, window=4096, triton_tflops=380.0, best_peer="flex",
                   speedup_vs_best_peer=1.21, max_abs_err=4e-3, triton_correct=True,
                   launch=dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, pack_heads=1, splits=1))]
    kernels = dict(copy_gbps=3000.0, gemm_bf16_tflops=700.0, attention=attention, memory_bound=memory, paged=paged,
                   window=window, tile_ab=ab, layer_host=layer,
                   targets=dict(attention_tflops=500.0, attention_vs_best_peer=1.3, memory_bound_of_copy=0.8),
                   compiler=[dict(kernel="chunk_attention d128", registers=255, spill_stores=0, shared_bytes=131072,
                                  wgmma=True, mma_loop_spill_ops=[0, 0]),
                             dict(kernel="chunk_attention d128 m64n128", registers=255, spill_stores=140,
                                  shared_bytes=131072, wgmma=True, mma_loop_spill_ops=[36, 2])])
    tests = dict(passed=5, failed=["tests/test_kernels.py::test_x"], skipped=0, exit_code=1)
    text = gpu_summary.summary_markdown(env, tests, kernels, pipeline_part[0])
    assert "NVIDIA H100" in text and "commit `abc`" in text
    assert "MISSED by 20%" in text  # 400 of 500 TFLOP/s
    assert "MISSED by 15%" in text  # 1.1x of 1.3x
    assert "met (1.12x the target)" in text  # swiglu at 90% of copy against 80%
    assert "MISSED by 25%" in text  # rope at 60% against 80%
    assert "| met (1.12x the target) | 21 (15), 8 / 10, 5 |" in text
    assert "host µs Triton (its launch), back to back / eager, back to back |" in text and "| MISSED by 25% | - |" in text
    assert ("Host cost of one stage's chunk (2 layers of llama3-8b, chunk 2048 at prefix 2048; outputs of the two "
            "backends within 3.0e-02 of 9.0e+00):" in text)
    assert ("- triton ops: host 900 us to enqueue (600 of it in Triton's launches), 600 back to back, device 3000 us "
            "(host/device 0.20)") in text
    assert "- torch ops: host 500 us to enqueue, device not measured" in text
    memory[0]["triton_jit_steady_us"], layer[0]["jit_steady_us"] = 19.0, 950.0  # runs since 2026-11-30
    text2 = gpu_summary.summary_markdown(env, tests, kernels, pipeline_part[0])
    assert ("host µs Triton (its launch), back to back [through Triton's launch path] / eager, back to back |"
            in text2 and "| met (1.12x the target) | 21 (15), 8 [19] / 10, 5 |" in text2)
    assert ("- triton ops: host 900 us to enqueue (600 of it in Triton's launches), 600 back to back (950 through "
            "Triton's own launch path), device 3000 us (host/device 0.20)") in text2
    assert "FAILED `tests/test_kernels.py::test_x`" in text
    assert "| chunk_attention d128 | 255 | 0 | - | 128 | yes |" in text
    assert "| chunk_attention d128 m64n128 | 255 | 140 | 36, 2 | 128 | yes |" in text
    assert ("- dense P=0 C=2048: launcher 64x64 w4s3 no-prefix 300.0 TFLOP/s vs former 128x128 w8s3 254.0 TFLOP/s "
            "= 1.18x" in text)
    assert "| 2 | pcie5 | 48 |" in text
    assert "| 30 / 900 |" in text and "| 40 (26) / 12 launch-bound |" in text and "| none ran | - |" in text
    assert "| 0+2048, 30000+1 | 16 | 321 | 1.25x | - (none ran) | - | pack 1, splits 4 | 3.0e-03 WRONG |" in text
    assert "| 16384 | 2048 | 4096 | 380 | flex | 1.21x | 128x128 w8s3, pack 1, splits 1 | 4.0e-03 |" in text


def test_summary_gives_launch_bound_dense_rows_by_their_graph_replay_too():
    """A paged batch whose dense per-row launches are launch-bound (eager over the replay): the speed-up over them by
    the replay beside the eager one; device-bound rows (eager near the replay) show the eager one alone."""
    row = dict(batch=[[4096, 1], [32000, 1]], page_size=16, paged_tflops=5.0, paged_vs_dense_rows=3.6,
               paged_vs_sdpa_rows=0.8, best_sdpa="flash", launch_plan=dict(pack=4, splits=7), paged_max_abs_err=3e-4,
               dense_rows_ms=0.79, dense_rows_graph_ms=0.30, paged_vs_dense_rows_graph=1.36)
    near = dict(row, batch=[[16384, 2048]], dense_rows_ms=1.21, dense_rows_graph_ms=1.20, paged_vs_dense_rows=0.83,
                paged_vs_dense_rows_graph=0.82)
    kernels = dict(copy_gbps=1.0, gemm_bf16_tflops=1.0, attention=[], memory_bound=[], paged=[row, near],
                   targets=dict(attention_tflops=560.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8))
    text = gpu_summary.summary_markdown(dict(device="GPU"), None, kernels, None)
    assert "| 4096+1, 32000+1 | 16 | 5 | 3.60x (1.36x by the dense rows' graph replay) | 0.80x (flash) |" in text
    assert "| 16384+2048 | 16 | 5 | 0.83x | 0.80x (flash) |" in text


def test_launch_cost_tells_one_cold_call_from_calls_back_to_back(monkeypatch):
    """host_us times one call after a synchronise (the host woken from its wait: slow), steady_us calls back to back
    (each burst's first call untimed): a call that costs 5 ms after a synchronise and 0.2 ms otherwise reads about 5
    and 0.2 ms. The summary judges launch-bound by the back-to-back time against the graph's, where a file has it."""
    import bench.kernels as bk
    state = dict(cold=True)

    def fn():
        time.sleep(0.005 if state["cold"] else 0.0002)
        state["cold"] = False
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: state.update(cold=True))
    monkeypatch.setattr(bk, "HOST_WARM_S", 0.0)
    got = bk.launch_cost(fn, "cuda", calls=20, graph=False, stubbed=False)
    assert got["host_us"] > 4000 and 150 < got["steady_us"] < 2000, got
    row = lambda steady: dict(prefix=0, chunk=64, triton_tflops=1.0, triton_of_gemm=0.01,  # noqa: E731
                              best_peer="sdpa_flash", speedup_vs_best_peer=0.4, max_abs_err=1e-3,
                              launch_host_us=61.0, launch_python_us=25.0, launch_steady_us=steady,
                              launch_graph_us=15.0)
    kernels = dict(copy_gbps=1.0, gemm_bf16_tflops=1.0, attention=[row(10.0), row(24.0)], memory_bound=[],
                   targets=dict(attention_tflops=560.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8))
    text = gpu_summary.summary_markdown(dict(device="GPU"), None, kernels, None)
    assert "launcher host (Triton's launch) , back to back / graph µs |" not in text
    assert "| launcher host (Triton's launch), back to back / graph µs |" in text
    assert "| 61 (36), 10 / 15 |" in text and "| 61 (36), 24 / 15 launch-bound |" in text
    assert "Direct launches" not in text  # files before 2026-11-30: no time through Triton's path
    for r, jit in zip(kernels["attention"], (40.0, 48.0)):
        r["launch_jit_steady_us"] = jit
    text = gpu_summary.summary_markdown(dict(device="GPU"), None, kernels, None)
    assert "back to back [through Triton's launch path] / graph µs |" in text
    assert "| 61 (36), 10 [40] / 15 |" in text and "| 61 (36), 24 [48] / 15 launch-bound |" in text
    assert ("- Direct launches (`kernels.fast_launch`): the launcher's host time back to back 10–24 µs a call, "
            "through Triton's own launch path 40–48 µs (2.00–4.00x); launch-bound with them: 1 of 2 shapes") in text


def test_summary_of_an_older_kernel_file_shows_no_columns_it_never_measured():
    """Kernel files from before the host-time split and the paged flex peer: the summary (`--summary-only` rebuilds
    old ones) names no column those files have no figures for."""
    attention = [dict(prefix=0, chunk=256, triton_tflops=50.0, triton_of_gemm=0.07, best_peer="sdpa_cudnn",
                      speedup_vs_best_peer=0.4, max_abs_err=2e-3, launch_host_us=40.0, launch_graph_us=12.0)]
    paged = [dict(batch=[[0, 2048]], page_size=16, paged_tflops=321.0, paged_vs_dense_rows=1.25,
                  paged_vs_sdpa_rows=1.1, best_sdpa="flash", launch_plan=dict(pack=1, splits=1),
                  paged_max_abs_err=3e-3)]
    memory = [dict(op="rope", triton_gbps=1800.0, triton_of_copy=0.6, eager_gbps=900.0)]
    kernels = dict(copy_gbps=3000.0, gemm_bf16_tflops=700.0, attention=attention, memory_bound=memory, paged=paged,
                   targets=dict(attention_tflops=500.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8))
    text = gpu_summary.summary_markdown(dict(device="x"), None, kernels, None)
    assert "| launcher host / graph µs |" in text and "| 40 / 12 launch-bound |" in text
    assert "vs flex" not in text
    assert "| 0+2048 | 16 | 321 | 1.25x | 1.10x (flash) | pack 1, splits 1 | 3.0e-03 |" in text
    assert "| op | Triton GB/s | of copy | eager GB/s | target |\n" in text and "host µs" not in text


def test_suite_goes_on_after_a_part_fails_and_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """The whole suite on CPU (the GPU work stubbed or shrunk): the kernel part raises, the partitions part fails
    after its first point, the pipeline part runs for real; every part file is written, the failures are named in
    the summary and the exit code, and the partitions part keeps the point it measured."""
    import argparse
    import json

    import bench.kernels
    real = gpu_suite.bench_pipeline

    def fake_kernels(quick=False, deadline=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def small_pipeline(layers, deadline, progress, prompt_lens, sm_partitions=False, simulate=False, links=None,
                       stages=None, rows=(), token_budgets=None, cuda_graphs=False, stage_alone=False):
        seen_deadlines.append(deadline)
        graphed.append(cuda_graphs)  # (run eagerly here: a CPU has no graphs to capture)
        alone.append(stage_alone)

        def failing_progress(i, n, doc):
            progress(i, n, doc)
            if sm_partitions and not rows and not cuda_graphs:  # the first point is written, then the part dies
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        small = dict(prompt_lens=(), rows=[(30, 9)], token_budgets=token_budgets, links=("100gbe",),
                     simulate=simulate) if rows else dict(prompt_lens=(48,), links=("pcie5", "100gbe"))
        return real(model="tiny", layers=2, stages=(2,), chunk_size=16, repeats=1, warmup=0, device="cpu",
                    dtype="float32", ops="torch", deadline=deadline, progress=failing_progress, stage_alone=stage_alone,
                    **small)
    real_sweeps = bench.kernels.run_sweeps

    def small_sweeps(deadline, on_sweep, shapes, paged_shape):  # --quick: one dense shape, no paged sweep
        assert (shapes, paged_shape) == (bench.kernels.DECODE_SWEEP_SHAPES[:1], None)
        seen_deadlines.append(deadline)
        return real_sweeps(deadline, shapes=((37, 19),), paged_shape=(37, 19), device="cpu", on_sweep=on_sweep,
                           timer=lambda fn: (fn(), 0.001)[1], Hq=4, Hkv=2, D=16, dtype=torch.float32)
    seen_deadlines, test_timeouts, graphed, alone = [], [], [], []
    monkeypatch.setattr(gpu_suite, "run_gpu_tests", lambda out, timeout_s: test_timeouts.append(timeout_s) or dict(
        tests=3, passed=3, failed=[], skipped=0, exit_code=0))
    monkeypatch.setattr(bench.kernels, "run_all", fake_kernels)
    monkeypatch.setattr(gpu_suite, "bench_pipeline", small_pipeline)
    monkeypatch.setattr(bench.kernels, "run_sweeps", small_sweeps)
    args = argparse.Namespace(budget_s=540.0, quick=True, layers=2)
    t0 = time.time()
    code = gpu_suite._suite(tmp_path, args, list(gpu_suite.PARTS))
    out = capsys.readouterr().out
    assert code == 1
    # the time plan: each part leaves the ones after it their reserve (graphs 40 s, sweeps 40, ragged 20,
    # pipeline 20, partitions 130, kernels 130)
    assert [round(d - t0) for d in seen_deadlines] == [540 - 120, 540 - 100, 540 - 80, 540 - 40, 540]
    assert graphed == [False, False, False, True]  # partitions, pipeline, ragged, graphs (last)
    assert alone == [True, False, False, False]  # one stage timed alone: the partitions part's
    assert "time plan (each part starts no work past): tests +160 s, kernels +290 s, partitions +420 s, " \
           "pipeline +440 s, ragged +460 s, nccl +460 s, sweeps +500 s, graphs +540 s" in out
    nccl = json.loads((tmp_path / "nccl.json").read_text())  # no second GPU here: said, not run, no time spent
    assert nccl["skipped"].startswith("0 GPUs here") and nccl["points"] == [] and "nccl" not in \
        json.loads(out.strip().splitlines()[-1])["parts_failed"]
    assert "nccl part not run: 0 GPUs here" in out
    assert 540 - 380 - 5 < test_timeouts[0] <= 540 - 380
    assert json.loads(out.strip().splitlines()[-1])["parts_failed"] == ["kernels", "partitions"]
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["part_failed"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "fake_kernels" in kernels["traceback"] and kernels["environment"]["torch"]
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert partitions["part_failed"].startswith("OutOfMemoryError: CUDA out of memory")
    assert len(partitions["points"]) == 1 and partitions["complete"] is False  # the point measured before failing
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    assert "part_failed" not in pipeline and pipeline["complete"] and len(pipeline["points"]) == 2
    assert (tmp_path / "timeline.png").is_file()
    ragged = json.loads((tmp_path / "ragged.json").read_text())
    assert ragged["complete"] and ragged["points"][0]["rows"] == [30, 9] and ragged["token_budgets"] == [None, 4096]
    assert (tmp_path / "timeline-ragged.png").is_file()
    text = (tmp_path / "summary.md").read_text()
    assert "## Ragged batches" in text and "| 2 | 100gbe | 30,9 | budget 4096 |" in text
    assert "**kernels part FAILED**: RuntimeError: CUDA error: an illegal memory access" in text
    assert "**partitions part FAILED**" in text and "## Kernels" not in text
    assert "Incomplete: the part failed (OutOfMemoryError" in text and "| 2 | pcie5 | 48 |" in text
    assert "3 passed, 0 failed" in text
    assert "## Multi-GPU pipeline (NCCL, one process per stage and TP rank)\n\nNot run: 0 GPUs here" in text
    graphs = json.loads((tmp_path / "graphs.json").read_text())
    assert graphs["complete"] and "## CUDA graphs per stage chunk" in text
    sweeps = json.loads((tmp_path / "sweeps.json").read_text())
    assert sweeps["complete"] and {r["page_size"] for r in sweeps["paged"]} == {16, 256}
    assert all(r["max_abs_err"] < 1e-4 for r in sweeps["attention"] + sweeps["paged"] if "ms" in r)
    assert "## Tuning sweeps" in text and "- attention P=37 C=19: launcher " in text
    assert "- paged P=37 C=19 page 256: launcher" in text
    assert gpu_suite.main(["--out", str(tmp_path), "--summary-only"]) == 0  # the same summary from the files
    assert (tmp_path / "summary.md").read_text() == text


def test_summary_sets_the_kernels_against_the_committed_run_on_the_same_gpu(tmp_path):
    """A new kernel file of a GPU with a committed run (bench/results/*/kernels.json, same device name) gets, shape
    by shape, the committed time over the new one; the committed directory itself, or another GPU, gets none."""
    import json
    base_path = ROOT / "bench/results/h200/kernels.json"
    new = json.loads(base_path.read_text())
    for r in new["attention"]:
        r["triton_ms"] /= 1.25 if (r["prefix"], r["chunk"]) == (16384, 2048) else 1.0  # 1.25x faster there
        # a launch-bound shape's eager time is the host's: compared by its graph replay, which did not move
        r["triton_ms"] *= 1.7 if (r["prefix"], r["chunk"]) == (0, 64) else 1.0
    new["paged"][0]["paged_ms"] *= 2  # two times slower
    found = gpu_summary.committed_baseline(new, tmp_path)
    assert found is not None and found[0] == "bench/results/h200/kernels.json"
    lines = gpu_summary.baseline_lines(*found, new)
    text = "\n".join(lines)
    assert "P=16384 C=2048: 1.25x" in text and "P=4096 C=1024: 1.00x" in text and "P=0 C=64 (graph): 1.00x" in text
    paged = new["paged"][0]
    assert f"paged {','.join(f'{p}+{c}' for p, c in paged['batch'])} page={paged['page_size']}: 0.50x" in text
    assert "median 1.00x, 0.50-1.25x" in text
    assert gpu_summary.committed_baseline(new, base_path.parent) is None  # not against itself
    other = dict(new, environment=dict(new["environment"], device="NVIDIA B200"))
    assert gpu_summary.committed_baseline(other, tmp_path) is None
    (tmp_path / "kernels.json").write_text(json.dumps(new))
    assert gpu_suite.main(["--out", str(tmp_path), "--summary-only"]) == 0
    assert "P=16384 C=2048: 1.25x" in (tmp_path / "summary.md").read_text()


def test_summary_only_rebuilds_the_summary_from_part_files(tmp_path):
    """Parts run in separate calls (on different commits) still give one summary that says which commit each
    part came from; a directory with no part file is refused."""
    import json
    import shutil
    for part in ("tests", "kernels", "pipeline"):
        shutil.copy(ROOT / "bench/results/h100" / f"{part}.json", tmp_path / f"{part}.json")
    doc = json.loads((tmp_path / "pipeline.json").read_text())
    doc["environment"]["git_commit"] = "0123456789abcdef"
    (tmp_path / "pipeline.json").write_text(json.dumps(doc))
    assert gpu_suite.main(["--out", str(tmp_path), "--summary-only"]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "pipeline 0123456" in text and "## GPU tests" in text and "## Kernels" in text
    assert "| 4 | 100gbe | 32768 |" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to summarise"):
        gpu_suite.main(["--out", str(empty), "--summary-only"])
    assert not (empty / "summary.md").exists()


def test_attention_sweep_reports_each_config_or_why_it_failed():
    from bench.kernels import sweep_attention
    good = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    rows = sweep_attention(configs=[good, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)], shape=(37, 19), Hq=4, Hkv=2,
                           D=16, dtype=torch.float32, device="cpu", timer=cpu_timer)
    assert rows[0]["max_abs_err"] < 2e-5 and rows[0]["tflops"] > 0 and (rows[0]["prefix"], rows[0]["chunk"]) == (37, 19)
    assert "must give BLOCK_M" in rows[1]["error"] and "tflops" not in rows[1]


def test_paged_sweep_reports_each_page_size_and_config_or_why_it_failed():
    """The paged kernel's tuning sweep on CPU: key blocks within a page (16 of 32) and across pages (16 of 8),
    each row checked against float64; a bad config is a row saying why."""
    from bench.kernels import sweep_paged
    good = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    rows = sweep_paged(configs=[good, dict(BLOCK_M=16, BLOCK_N=16)], shape=(37, 19), page_sizes=(8, 32), Hq=4,
                       Hkv=2, D=16, dtype=torch.float32, device="cpu", timer=cpu_timer)
    assert [(r["page_size"], "error" in r) for r in rows] == [(8, False), (8, True), (32, False), (32, True)]
    for r in rows[::2]:
        assert r["max_abs_err"] < 2e-5 and r["tflops"] > 0 and (r["prefix"], r["chunk"]) == (37, 19)
    assert "must give BLOCK_M" in rows[1]["error"]


def test_sweeps_lead_with_the_launchers_choice_and_stop_at_their_deadline():
    """The default grids start with the tile the launcher picks for the shape (marked `launcher`, once); past the
    deadline no config runs (its row says so) and on_row sees every row as it comes."""
    from bench.kernels import sweep_attention, sweep_paged
    rows = sweep_attention(shape=(4096, 16), Hq=4, Hkv=1, D=16, dtype=torch.float32, device="cpu",
                           timer=lambda fn: 1.0)  # configs listed, nothing run but the reference
    assert rows[0]["launcher"] and sum(r["launcher"] for r in rows) == 1
    assert [r.get("num_splits") for r in rows[1:5]] == [8, 16, 32, 64]  # decode-like: the split counts next
    seen, calls = [], []
    rows = sweep_paged(shape=(37, 19), page_sizes=(8, 32), Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu",
                       timer=lambda fn: calls.append(fn) or 1.0, deadline=time.time() - 1,
                       on_row=lambda so_far: seen.append(len(so_far)))
    assert not calls and all(r["not_run"] == "past the sweep's budget" for r in rows)
    assert seen == list(range(1, len(rows) + 1)) and [r["page_size"] for r in rows][::len(rows) // 2] == [8, 32]
    assert [r["launcher"] for r in rows].count(True) == 2  # once per page size


def test_sweep_lines_set_the_launchers_config_against_the_fastest_correct_one():
    from bench.kernels import sweep_lines
    tile = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    doc = dict(attention=[dict(tile, prefix=32768, chunk=1, launcher=True, ms=0.12, max_abs_err=1e-4),
                          dict(tile, prefix=32768, chunk=1, launcher=False, num_splits=32, ms=0.08, max_abs_err=1e-4),
                          dict(tile, prefix=32768, chunk=1, launcher=False, num_splits=64, ms=0.01, max_abs_err=0.5),
                          dict(tile, prefix=32768, chunk=1, launcher=False, not_run="past the sweep's budget"),
                          dict(tile, prefix=32768, chunk=16, launcher=True, error="OutOfResources: shared memory")],
               paged=[dict(tile, prefix=16384, chunk=2048, page_size=16, launcher=False, page_ahead=True, ms=2.0,
                           max_abs_err=1e-3),
                      dict(tile, prefix=16384, chunk=2048, page_size=256, launcher=True, not_run="past the sweep's "
                                                                                                 "budget"),
                      dict(tile, prefix=16384, chunk=2048, page_size=256, launcher=False, not_run="past the sweep's "
                                                                                                  "budget")])
    # replayed from CUDA graphs: ranked by the device's time (eagerly the launcher's split tile looked slower)
    doc["attention"] += [dict(tile, prefix=32768, chunk=16, launcher=True, splits=28, ms=0.23, graph_ms=0.09,
                              max_abs_err=1e-4),
                         dict(tile, prefix=32768, chunk=16, launcher=False, num_splits=14, ms=0.18, graph_ms=0.1,
                              max_abs_err=1e-4)]
    assert sweep_lines(doc) == [
        "attention P=32768 C=1: launcher 64x64 w4s3 120 us; fastest 64x64 w4s3 splits 32 80 us: the launcher takes "
        "1.50x its time (3 of 4 configs ran)",  # the 64-split row is wrong: not the fastest
        "attention P=32768 C=16: launcher 64x64 w4s3 splits 28 90 us; fastest 64x64 w4s3 splits 28 90 us: the "
        "launcher takes 1.00x its time (CUDA graph replays) (2 of 3 configs ran)",
        "paged P=16384 C=2048 page 16: launcher's config did not run; fastest 64x64 w4s3 page-ahead 2000 us "
        "(1 of 1 configs ran)",
        "paged P=16384 C=2048 page 256: not run: past the sweep's budget (0 of 2 configs ran)"]
    doc["attention"] = doc["attention"][4:5]  # the error row alone: it ran, and failed
    assert sweep_lines(doc)[0] == "attention P=32768 C=16: no config ran correctly (0 of 1 configs ran)"


def test_tile_ab_times_each_launcher_tile_against_the_one_it_replaced():
    """The kernel part's A/B of the launcher tiles chosen untimed: per entry the launcher's own tile and the former,
    both against float64, the ratio on the launcher's row (dense, and paged per page size), and a line each."""
    from bench.kernels import tile_ab, tile_ab_lines
    former = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    split = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, num_splits=3)
    times = iter([2.0, 1.0, 2.0, 1.0, 4.0, 1.0, 1.0, 3.0] * 2)
    rows = tile_ab(device="cpu", timer=lambda fn: (fn(), next(times))[1],
                   entries=(("dense", (0, 40), former), ("paged", (37, 19), former), ("dense", (70, 5), split)),
                   Hq=4, Hkv=2, D=16, dtype=torch.float32)
    assert [(r["kernel"], r["launcher"], r.get("page_size")) for r in rows] == [
        ("dense", True, None), ("dense", False, None), ("paged", True, 16), ("paged", False, 16),
        ("paged", True, 256), ("paged", False, 256), ("dense", True, None), ("dense", False, None)]
    assert all(r["max_abs_err"] < 2e-5 for r in rows)
    assert [round(r["vs_former"], 2) for r in rows if r["launcher"]] == [0.5, 0.5, 0.25, 3.0]
    assert {r["vs_former_by"] for r in rows if r["launcher"]} == {"ms"}  # no CUDA graphs on a CPU
    lines = tile_ab_lines(rows)
    assert len(lines) == 4 and lines[0].startswith("tile A/B dense P=0 C=40: launcher 64x64") and "= 0.50x" in lines[0]
    # each launcher row against the former tile of its own shape
    assert "vs former 16x16 w4s1 " in lines[0] and "vs former 32x16 w4s1 splits 3 " in lines[3], lines
    assert lines[3].startswith("tile A/B dense P=70 C=5: launcher 64x64 w4s1") and lines[3].endswith("= 3.00x")
    assert tile_ab(device="cpu", deadline=time.time() - 1) == []


def test_sweeps_share_the_time_left_out_per_shape_and_page_size(monkeypatch):
    """run_sweeps: each dense shape and each page size of the paged sweep its own equal share of what is left when it
    starts (on an H200 the pages of 16 used up a share meant for both page sizes)."""
    import bench.kernels as bk
    calls = []

    def fake(kind):
        def sweep(shape, deadline, page_sizes=None, **kw):
            calls.append((kind, shape, page_sizes, round(deadline - time.time())))
            return [dict(prefix=shape[0], chunk=shape[1], launcher=True, ms=1.0, tflops=1.0, max_abs_err=0.0)]
        return sweep
    monkeypatch.setattr(bk, "sweep_attention", fake("attention"))
    monkeypatch.setattr(bk, "sweep_paged", fake("paged"))
    doc = bk.run_sweeps(time.time() + 400, shapes=((32768, 1), (32768, 16)), paged_shape=(16384, 2048))
    assert calls == [("attention", (32768, 1), None, 100), ("attention", (32768, 16), None, 133),
                     ("paged", (16384, 2048), (16,), 200), ("paged", (16384, 2048), (256,), 400)]
    assert len(doc["attention"]) == 2 and len(doc["paged"]) == 2 and doc["complete"]


def test_sweep_results_are_rewritten_after_every_row(tmp_path, capsys):
    """`bench kernels --sweep --out`: sweep.json holds every row measured so far (complete false) while the sweep
    runs, and all of them with complete true at the end; the launcher's rows are starred in the printout."""
    import json
    from bench.kernels import _run_sweeps
    snapshots = []

    def fake_sweep(shape, deadline, on_row):
        rows = []
        for i in range(3):
            rows.append(dict(prefix=shape[0], chunk=shape[1], BLOCK_M=16 * (i + 1), launcher=i == 0, ms=1.0,
                             tflops=float(i), max_abs_err=0.0))
            on_row(rows)
            snapshots.append(json.loads((tmp_path / "sweep.json").read_text()))
        return rows
    assert _run_sweeps(fake_sweep, [(0, 64), (16, 32)], tmp_path, None) == 0
    assert [len(s["rows"]) for s in snapshots] == [1, 2, 3, 4, 5, 6] and not any(s["complete"] for s in snapshots)
    final = json.loads((tmp_path / "sweep.json").read_text())
    assert final["complete"] and len(final["rows"]) == 6
    out = capsys.readouterr().out
    assert out.count("\n* ") + out.startswith("* ") == 2 and "launcher's own choice" in out

    def replayed(shape, deadline, on_row):  # replays rank the rows, not the eager times
        rows = [dict(prefix=0, chunk=64, BLOCK_M=16, launcher=True, ms=1.0, tflops=5.0, graph_tflops=9.0,
                     max_abs_err=0.0),
                dict(prefix=0, chunk=64, BLOCK_M=32, launcher=False, ms=0.5, tflops=10.0, graph_tflops=8.0,
                     max_abs_err=0.0)]
        on_row(rows)
        return rows
    assert _run_sweeps(replayed, [(0, 64)], tmp_path, None) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("* ") and "5 TFLOP/s (9 replayed)" in out[0] and "(8 replayed)" in out[1]


def test_kernels_cli_sweeps_the_paged_kernel_only_with_sweep(capsys):
    from bench.kernels import main
    with pytest.raises(SystemExit):
        main(["--paged"])
    assert "--paged goes with --sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--budget-s", "60"])
    assert "--budget-s goes with --sweep" in capsys.readouterr().err


def test_compiler_report_compiles_in_parallel_shards_and_keeps_every_row():
    rows = gpu_suite.compiler_report(arch=90, only="chunk_attention_merge", shards=2)
    assert sorted(r["kernel"] for r in rows) == [f"chunk_attention_merge d{d} bfloat16" for d in (128, 256, 64, 80)]
    assert all(r["registers"] and not r["spill_stores"] for r in rows)
    assert "error" in gpu_suite.compiler_report(arch=90, only="no such kernel", shards=2)[0]


def test_attention_sweep_tries_split_kv_and_packing_on_short_chunks_over_long_prefixes():
    from bench.kernels import sweep_attention
    seen = []
    rows = sweep_attention(shape=(4096, 16), Hq=4, Hkv=1, D=16, dtype=torch.float32, device="cpu",
                           timer=lambda fn: seen.append(fn) or 1.0)  # configs listed, nothing run but the reference
    assert len(seen) == len(rows)
    assert {r.get("num_splits", 1) for r in rows} == {1, 2, 4, 8, 16, 32, 64} and any(r.get("pack_gqa") for r in rows)
    assert not any(r.get("longest_first") or r.get("no_prefix") for r in rows)
    # decode-like chunks: the launcher's own tile split 8 to 64 ways too (the most its 4096 // 64 key blocks allow)
    tile = {k: rows[0][k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    assert [r["num_splits"] for r in rows if r.get("num_splits", 1) >= 8 and all(r[k] == v for k, v in tile.items())
            ] == [8, 16, 32, 64]
    assert rows[0].get("pack_gqa")  # the launcher's decode tile packs the group's heads
    deeper = [r["num_stages"] for r in rows if all(r[k] == tile[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps"))
              and r.get("pack_gqa") and not r.get("num_splits") and r["num_stages"] != tile["num_stages"]]
    assert sorted(deeper) == sorted({2, 3, 4} - {tile["num_stages"]})  # and with other load depths
    # then the packed rows over other key-block widths and warp counts, and in 16 rows (4 heads of one query fit)
    packed = [(r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"]) for r in rows
              if r.get("pack_gqa") and not r.get("num_splits") and r["BLOCK_M"] == tile["BLOCK_M"]]
    assert len(set(packed)) == len(packed) and {(n, w) for _, n, w, _ in packed} == {
        (n, w) for n in (32, 64, 128) for w in (2, 4)} | {(tile["BLOCK_N"], tile["num_warps"])}
    first_plain = next(i for i, r in enumerate(rows) if not r.get("pack_gqa"))
    assert all(r.get("pack_gqa") for r in rows[:first_plain]) and first_plain >= 4 + 2 + 17
    one = sweep_attention(shape=(4096, 1), Hq=4, Hkv=1, D=16, dtype=torch.float32, device="cpu",
                          timer=lambda fn: 1.0)
    assert [r["num_stages"] for r in one if r.get("pack_gqa") and r["BLOCK_M"] == 16] == [2, 3]
    assert not any(r.get("pack_gqa") and r["BLOCK_M"] == 16 for r in rows)  # 16 queries x 4 heads: not in 16 rows
    wide = sweep_attention(shape=(4096, 17), Hq=4, Hkv=1, D=16, dtype=torch.float32, device="cpu",
                           timer=lambda fn: 1.0)
    assert max(r.get("num_splits", 1) for r in wide) == 8  # a chunk past 16 tokens: not decode-like


def test_attention_sweep_tries_longest_first_and_no_prefix_loops_at_prefix_zero():
    from bench.kernels import sweep_attention
    rows = sweep_attention(shape=(0, 300), Hq=4, Hkv=1, D=16, dtype=torch.float32, device="cpu",
                           timer=lambda fn: 1.0)  # configs listed, nothing run but the reference
    assert sum(bool(r.get("longest_first")) for r in rows) == 4 and not any(r.get("num_splits") for r in rows)
    assert sum(bool(r.get("no_prefix")) for r in rows) == 4 and not any("error" in r for r in rows)
    short = sweep_attention(shape=(0, 64), Hq=4, Hkv=1, D=16, dtype=torch.float32, device="cpu",
                            timer=lambda fn: 1.0)  # one query block: nothing to order, the prefix loops still cut
    assert not any(r.get("longest_first") for r in short) and sum(bool(r.get("no_prefix")) for r in short) == 4


# ---- one GPU as S GPUs (SM partitions) ------------------------------------------------------------------------------

@pytest.mark.parametrize("total,stages,granularity,per,left", [
    (132, 2, 8, 64, 4),  # H100 SXM: 2 x 64 SMs, 4 for the links
    (132, 4, 8, 32, 4),
    (132, 8, 8, 16, 4),
    (132, 16, 8, 8, 4),
    (108, 3, 2, 34, 6),  # A100: pairs of SMs
])
def test_sm_partitions_are_equal_disjoint_and_leave_the_links_some(total, stages, granularity, per, left):
    from pipeline.partitions import plan_partitions
    plan = plan_partitions(total, stages, granularity)
    assert (plan.stage_sms, plan.link_sms) == (per, left)
    assert plan.stage_sms % granularity == 0 and plan.stage_sms * stages + plan.link_sms == total


def test_sm_partitions_refuse_what_cannot_be_split():
    from pipeline.partitions import SMPartitions, plan_partitions
    with pytest.raises(ValueError, match="132 SMs cannot make 17 partitions of at least 8 SMs.*at most 16 stages"):
        plan_partitions(132, 17, 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="there is none here"):
            SMPartitions("cpu", 2, 1)
    from pipeline import PipelineSpec
    with pytest.raises(ValueError, match="sm_partitions splits one GPU between in-process stages"):
        PipelineSpec(source="tiny", stages=2, link="gloo", sm_partitions=True).validate()


def test_ideal_speedup_of_a_pipeline_over_naive():
    assert gpu_suite.ideal_speedup(2, 16) == pytest.approx(32 / 17)
    assert gpu_suite.ideal_speedup(4, 1) == pytest.approx(1.0)  # one chunk: nothing to overlap
    assert gpu_suite.ideal_speedup(4, 10 ** 6) == pytest.approx(4.0, rel=1e-5)


def test_ideal_gap_separates_the_stages_compute_from_the_schedule():
    """Overlapped at 0.75 of the ideal with its busiest stage computing 1.36x naive's: 1.02 of the ideal at its own
    compute (the schedule is not what falls short); one that stays short at its own compute gets no such claim."""
    def point(of_ideal, ov, nv, bound=1.01):
        return dict(overlapped_of_ideal=of_ideal, modes=dict(
            naive=dict(compute_ms_per_stage=nv), overlapped=dict(compute_ms_per_stage=ov, measured_over_bound=bound)))
    lines = gpu_summary.ideal_gap_lines([point(0.75, [135.0, 136.0], [100.0, 99.0]), point(0.93, [21.1], [19.7], 1.11),
                                         dict(overlapped_of_ideal=None, modes={})])
    assert lines == ["- Stage compute, overlapped over naive (the busiest stage): 1.07-1.36x, where the ideal takes 1; "
                     "at the overlapped runs' own stage compute the schedule reaches 1.00-1.02 of the ideal "
                     "(measured/bound 1.01-1.11): what falls short is compute, not exposed sends."]
    short = gpu_summary.ideal_gap_lines([point(0.5, [110.0], [100.0])])
    assert short[0].endswith("reaches 0.55-0.55 of the ideal (measured/bound 1.01-1.01).")
    assert gpu_summary.ideal_gap_lines([dict(overlapped_of_ideal=0.5, modes=dict(naive={}, overlapped={}))]) == []


def test_stage_alone_splits_the_growth_into_chunking_and_sharing():
    """A stage whose compute grew 1.36x in the overlapped run, 1.10x of it chunking's own cost (measured alone):
    1.24x is the sharing; overlapped at 0.75 of the ideal would reach 0.93 without it."""
    point = dict(stages=4, prompt_len=16384, overlapped_of_ideal=0.75,
                 modes=dict(naive=dict(compute_ms_per_stage=[100.0]), overlapped=dict(compute_ms_per_stage=[136.0])))
    doc = dict(points=[point, dict(point, prompt_len=4096)],  # no stage_alone entry at 4k: left out
               stage_alone=[dict(stages=4, prompt_len=16384, chunk_size=2048, chunking_cost=1.1)])
    assert gpu_summary.stage_alone_lines(doc) == [
        "- One stage alone on its partition (its layers, the prompt in chunks of 2048 against whole, nothing else "
        "running): chunking costs it 1.10-1.10x; running beside the other busy stages 1.24-1.24x more (one GPU "
        "shared: S GPUs would not pay it); without that, overlapped would reach 0.93-0.93 of the ideal."]
    # with both clocks read: the lone stage at 1980 MHz, the overlapped runs at 1800: 1.10x of the 1.24x is the clock, 1.12x the rest
    clocked = dict(point, gpu_clocks=dict(windows=dict(overlapped=dict(sm_clock_mhz=dict(median=1800.0)))))
    lone = dict(doc["stage_alone"][0], gpu_clocks=dict(sm_clock_mhz=dict(median=1980.0)))
    assert "1.24-1.24x more, of which the SM clock's drop (the power limit) 1.10-1.10x and the rest (HBM and L2) " \
        "1.12-1.12x (one GPU shared" in gpu_summary.stage_alone_lines(dict(points=[clocked], stage_alone=[lone]))[0]
    # a point whose overlapped clock was not read: no split claimed
    assert "of which" not in gpu_summary.stage_alone_lines(dict(points=[clocked, dict(point, prompt_len=8192)],
                                                                stage_alone=[lone, dict(lone, prompt_len=8192,
                                                                                        gpu_clocks={})]))[0]
    assert gpu_summary.stage_alone_lines(dict(points=[point])) == []  # an older file: nothing to say
    assert gpu_summary.stage_alone_lines(dict(points=[point], stage_alone_skipped="time budget")) == [
        "- One stage alone on its partition: not measured (time budget)."]


def test_partitions_part_measures_and_summarises_on_cpu():
    """The part's code on CPU (in-process stages, no partitions: there is no GPU to split): every mode, the ideal
    speed-up, the simulator's figures, and the summary with its targets; a spent budget starts no point."""
    doc, shown = gpu_suite.bench_pipeline(model="tiny", layers=None, stages=(2,), links=("100gbe",),
                                          prompt_lens=(64,), chunk_size=16, repeats=1, warmup=0, device="cpu",
                                          dtype="float32", ops="torch", simulate=True, stage_alone=True)
    point = doc["points"][0]
    # one stage alone, the prompt whole and in chunks: the same outputs, chunking's own cost
    (alone,) = doc["stage_alone"]
    assert (alone["stages"], alone["prompt_len"], alone["chunk_size"], alone["layers"]) == (2, 64, 16, 2)
    assert alone["whole_ms"] > 0 and alone["chunking_cost"] == pytest.approx(alone["chunked_ms"] / alone["whole_ms"])
    assert alone["max_abs_diff"] <= 1e-5 * alone["scale"]
    assert doc["complete"] and point["ideal_speedup"] == pytest.approx(2 * 4 / 5)
    assert point["overlapped_of_ideal"] == pytest.approx(
        point["modes"]["overlapped"]["speedup_vs_naive"] / point["ideal_speedup"])
    assert point["modes"]["chunked"]["sim_over_measured"] > 0
    text = "\n".join(gpu_summary.partitions_markdown(doc))
    assert "| 2 | 100gbe | 64 |" in text and "Target overlapped >= 0.9 of the ideal" in text
    assert "Target simulator within 10%" in text and "Stage compute, overlapped over naive" in text
    assert "One stage alone on its partition" in text
    # CPU runs count no host syncs (nothing to wait for); the summary says so
    assert all(m["host_syncs"] == 0 for m in point["modes"].values())
    assert "Host syncs while enqueueing: none in any run (4 mode-points)" in text
    import time
    late, _ = gpu_suite.bench_pipeline(model="tiny", layers=None, stages=(2,), links=("100gbe",), prompt_lens=(64,),
                                       chunk_size=16, repeats=1, warmup=0, device="cpu", dtype="float32",
                                       ops="torch", deadline=time.time() - 1)
    assert late["points"] == [] and not late["complete"] and "time budget after 0 of 1" in late["stopped"]
    assert "Incomplete: stopped at the time budget" in "\n".join(gpu_summary.partitions_markdown(late))


def test_graphs_summary_sets_each_point_against_the_same_point_run_eagerly():
    """The graphs part's table pairs each point with the partitions part's point of the same S, link and prompt:
    overlapped TTFT, speed-up over naive, share of the ideal and the host's share, each eager → graphs; the
    stages' compute graphed over eager; the replays and captures of the timed runs. Without eager points it says
    so. (The figures here are a CPU run reused as both: the pairing and arithmetic are what is checked.)"""
    import copy
    eager, _ = gpu_suite.bench_pipeline(model="tiny", layers=None, stages=(2,), links=("100gbe",), prompt_lens=(64,),
                                        chunk_size=16, repeats=1, warmup=0, device="cpu", dtype="float32", ops="torch")
    graphs = copy.deepcopy(eager)
    g = graphs["points"][0]["modes"]["overlapped"]
    g.update(ttft_ms=g["ttft_ms"] / 2, host_enqueue_ms=0.1 * g["ttft_ms"] / 2,
             cuda_graphs=dict(captured=0, replayed=8))
    g["compute_ms_per_stage"] = [c / 4 for c in g["compute_ms_per_stage"]]
    e = eager["points"][0]["modes"]["overlapped"]
    e["host_enqueue_ms"] = 0.9 * e["ttft_ms"]
    text = "\n".join(gpu_summary.graphs_markdown(graphs, eager))
    row = next(line for line in text.splitlines() if line.startswith("| 2 | 100gbe | 64 |"))
    assert f"{e['ttft_ms']:.1f} → {e['ttft_ms'] / 2:.1f}" in row and "| 0.90 → 0.10 |" in row
    assert "| 0.25 | 8 (0) | yes |" in row
    assert "No eager points" in "\n".join(gpu_summary.graphs_markdown(graphs, None))
    summary = gpu_summary.summary_markdown(dict(device="x"), None, None, None, eager, None, None, graphs)
    assert summary.index("## One GPU as S GPUs") < summary.index("## CUDA graphs per stage chunk")


def test_ragged_part_measures_rows_under_each_plan_and_summarises_on_cpu():
    """The ragged part's code on CPU: a batch of rows under per-row chunks and a token budget, every mode checked
    row by row against each prompt alone, each row's TTFT, the simulator's figures; the summary has a line per plan
    with the figures of that plan's modes."""
    doc, shown = gpu_suite.bench_pipeline(model="tiny", layers=None, stages=(2,), links=("100gbe",), prompt_lens=(),
                                          rows=[(40, 9, 23)], token_budgets=[None, 24], chunk_size=16, repeats=1,
                                          warmup=0, device="cpu", dtype="float32", ops="torch", simulate=True)
    assert doc["complete"] and doc["token_budgets"] == [None, 24] and len(doc["points"]) == 1
    point = doc["points"][0]
    m = point["modes"]
    assert point["rows"] == [40, 9, 23] and "ideal_speedup" not in point
    assert set(m) == {"unchunked", "naive", "chunked", "overlapped", "chunked/budget24", "overlapped/budget24"}
    assert all(v["outputs_match"] and v["max_abs_dlogits_vs_alone"] < 1e-4 for v in m.values())
    assert len(m["overlapped/budget24"]["row_ttft_ms"]) == 3 and m["overlapped"]["sim_over_measured"] > 0
    assert shown is not None and "rows 40,9,23" in shown[0]
    text = "\n".join(gpu_summary.ragged_markdown(doc))
    over = m["overlapped/budget24"]
    line = next(ln for ln in text.splitlines() if "| budget 24 |" in ln)
    assert line.startswith("| 2 | 100gbe | 40,9,23 | budget 24 |")
    assert f"| {over['ttft_ms']:.1f} |" in line and ", ".join(f"{x:.1f}" for x in over["row_ttft_ms"]) in line
    assert f"{m['naive']['ttft_ms'] / over['ttft_ms']:.2f}x" in line and line.endswith("| yes |")
    assert "| chunks of 16 |" in text and "steps of 24 tokens (first come, first served)" in text


def test_the_benchmark_includes_the_shapes_the_planner_cuts():
    from bench.kernels import planner_shapes
    shapes = planner_shapes()
    assert len(shapes) == 3 and shapes[0][0] == 0 and sum(shapes[-1]) == 32768
    assert all(c % 256 == 0 and c > 0 for _, c in shapes) and shapes[0][1] > shapes[-1][1]  # shrinking chunks


def test_a_part_hung_past_the_budget_is_recorded_and_the_suite_ended(tmp_path, monkeypatch):
    """A part stuck in a call Python cannot interrupt (stubbed: a wait the watchdog's exit releases) does not take the
    suite's results with it: at budget + grace the watchdog writes hang.txt (every thread's stack, the stuck part's
    among them), marks the part failed while keeping the parts before it, writes the summary and exits with 3."""
    import argparse
    import json
    import threading
    released, seen = threading.Event(), {}

    def stuck_in_cuda(out, timeout_s):
        released.wait(30)
        return dict(tests=1, passed=1, failed=[], skipped=0, exit_code=0)

    def fake_exit(code):  # what the process would leave behind at os._exit
        seen.update(code=code, files={f.name: f.read_text() for f in tmp_path.iterdir()})
        released.set()
    monkeypatch.setattr(gpu_suite, "run_gpu_tests", stuck_in_cuda)
    monkeypatch.setattr(gpu_suite, "_hard_exit", fake_exit)
    monkeypatch.setattr(gpu_suite, "HANG_GRACE_S", 0.5)
    import importlib
    importlib.import_module("bench.timeline")  # the suite imports it before its first part: off a loaded clock
    gpu_suite._suite(tmp_path, argparse.Namespace(budget_s=2.0, quick=True, layers=2), ["tests"])
    assert seen["code"] == 3
    assert "stuck_in_cuda" in seen["files"]["hang.txt"]
    tests = json.loads(seen["files"]["tests.json"])
    assert tests["part_failed"].startswith("hung: still running") and "hang.txt" in tests["part_failed"]
    assert "**tests part FAILED**: hung" in seen["files"]["summary.md"]
    assert not (tmp_path / "hang-fallback.txt").exists()  # the C-level fallback was disarmed, its empty file gone


def test_pipeline_part_measures_link_by_link_every_stage_count_at_each_prompt(monkeypatch):
    """Points run link by link, within a link prompt by prompt (in the order given: the suite gives them shortest
    first), every stage count at each: a part its deadline cuts short has the targets' link (first in
    PIPELINE_LINKS) at every S."""
    import bench.harness
    seen = []

    def fake_point(spec, L, B, chunks, repeats, warmup, simulate=False, **kw):
        seen.append((spec.stages, round(spec.bandwidth_gbps), L))
        return dict(timelines={}, records=[], modes={}, prompt_len=L)
    monkeypatch.setattr(bench.harness, "run_point", fake_point)
    assert gpu_suite.PIPELINE_LINKS[0] == "100gbe"
    gpu_suite.bench_pipeline(model="tiny", layers=None, stages=(2, 4), links=("100gbe", "nvlink"),
                             prompt_lens=(64, 32), chunk_size=16, device="cpu", dtype="float32", ops="torch")
    from pipeline.costs import link_preset
    gbe, nvl = (round(link_preset(n).bandwidth_gbps) for n in ("100gbe", "nvlink"))
    assert seen == [(2, gbe, 64), (4, gbe, 64), (2, gbe, 32), (4, gbe, 32),
                    (2, nvl, 64), (4, nvl, 64), (2, nvl, 32), (4, nvl, 32)]


def test_a_launch_bound_shape_is_also_compared_by_device_time(monkeypatch):
    """Where the launcher's host time exceeds its kernel's graph time, every fair SDPA peer is replayed from a CUDA
    graph (stubbed here: no CUDA), the fastest named and our graph time set against it; a peer that cannot be
    captured says why; flex is not captured; the summary reports it beside the eager figure."""
    import bench.kernels as bk
    times = dict(sdpa_flash=0.020, sdpa_cudnn=0.012)

    def fake_graph(fn, timer=None):
        if fn == "sdpa_efficient":
            raise RuntimeError("operation not permitted when stream is capturing")
        return times[fn]
    monkeypatch.setattr(bk, "graph_replay_ms", fake_graph)
    row = dict(launch_host_us=60.0, launch_graph_us=15.0)
    got = bk.device_time_vs_peers(row, {n: n for n in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")},
                                  dict(sdpa_flash=0.03, sdpa_cudnn=0.02, sdpa_efficient=0.04, flex=0.05))
    assert got["best_peer_graph"] == "sdpa_cudnn" and got["speedup_vs_best_peer_graph"] == pytest.approx(0.8)
    assert got["sdpa_flash_graph_ms"] == 0.020 and got["sdpa_efficient_graph_why"].startswith("RuntimeError: operat")
    assert not any(k.startswith("flex") for k in got)
    env = dict(device="GPU", torch="2", triton="3", git_commit="x")
    row = dict(prefix=0, chunk=256, triton_tflops=8.0, triton_of_gemm=0.01, best_peer="sdpa_cudnn",
               speedup_vs_best_peer=0.7, max_abs_err=1e-3, launch_host_us=60.0, launch_graph_us=15.0, **got)
    kernels = dict(copy_gbps=1.0, gemm_bf16_tflops=1.0, attention=[row], memory_bound=[],
                   targets=dict(attention_tflops=560.0, attention_vs_best_peer=1.0, memory_bound_of_copy=0.8))
    text = gpu_summary.summary_markdown(env, None, kernels, None, None, None)
    assert "prefix 0, chunk 256: 0.80x sdpa_cudnn (eager 0.70x)" in text


def test_a_hang_the_watchdog_cannot_see_is_ended_by_the_fallback(tmp_path):
    """With the Python watchdog unable to run (stubbed out), faulthandler writes every thread's stack to
    hang-fallback.txt and ends the process: the suite does not outlive its budget."""
    import subprocess
    import sys
    code = f"""
import argparse, time
from pathlib import Path
from bench import gpu_suite
gpu_suite.HANG_GRACE_S, gpu_suite.FALLBACK_AFTER_S = 0.2, 0.5
gpu_suite._watchdog = lambda *a, **k: type("T", (), dict(start=lambda s: None, cancel=lambda s: None))()
def stuck_for_good(out, timeout_s):
    time.sleep(60)
gpu_suite.run_gpu_tests = stuck_for_good
gpu_suite._suite(Path({str(tmp_path)!r}), argparse.Namespace(budget_s=0.3, quick=True, layers=2), ["tests"])
"""
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", code], cwd=gpu_suite.ROOT, capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30 and res.returncode != 0
    assert "stuck_for_good" in (tmp_path / "hang-fallback.txt").read_text()


def test_host_lines_flag_runs_that_waited_on_the_gpu_or_were_paced_by_the_host():
    """A pipeline part whose runs made the host wait for the GPU while enqueueing is flagged in bold with the worst
    run; all zero is said once; the overlapped runs' host enqueue share is given, runs at >= 0.9 of their TTFT
    flagged; results from before these counts have no line."""
    def doc(counts, rows=None, enqueue=None):
        point = dict(prompt_len=4096, modes={mode: dict(host_syncs=c, ttft_ms=10.0) for mode, c in counts.items()})
        if enqueue is not None:
            point["modes"]["overlapped"]["host_enqueue_ms"] = enqueue
        if rows:
            point["rows"] = rows
        return dict(points=[point])
    bad = gpu_summary.host_lines(doc(dict(naive=1, chunked=8, overlapped=0)))
    assert len(bad) == 1 and bad[0].startswith("- **Host syncs while enqueueing: 2 of 3 mode-points, up to 8 in a run "
                                               "(L=4096, chunked)**")
    assert "measure that stall" in bad[0]
    assert "(rows 1024,4096, naive)" in gpu_summary.host_lines(doc(dict(naive=3), rows=[1024, 4096]))[0]
    assert gpu_summary.host_lines(doc(dict(naive=0, overlapped=0))) == [
        "- Host syncs while enqueueing: none in any run (2 mode-points)."]
    assert gpu_summary.host_lines(doc(dict(naive=0, overlapped=0), enqueue=4.0))[1] == (
        "- Host enqueue time (one thread for every stage): 0.40-0.40 of the overlapped TTFT.")
    assert "**1 of 1 runs at >= 0.9 (paced by the host, not the GPU)**" in gpu_summary.host_lines(
        doc(dict(overlapped=0), enqueue=9.5))[1]
    assert gpu_summary.host_lines(dict(points=[dict(prompt_len=1, modes=dict(naive=dict(ttft_ms=1.0)))])) == []


def test_the_nccl_part_runs_every_stage_and_tp_split_the_gpus_hold():
    """The multi-GPU part's code path, run over gloo processes on CPU (as `--link nccl` runs it over NCCL): at 2
    "GPUs" a 2-stage pipeline and a 2-rank TP stage (serial and ISO-overlapped all-reduces side by side), every mode
    equal to the unchunked run; at 1, nothing (and the summary says why)."""
    doc = gpu_suite.bench_nccl(model="tiny", layers=None, prompt_lens=(40,), chunk_size=16, repeats=1, warmup=0,
                               dtype="float32", ops="torch", gpus=2, link="gloo", device="cpu")
    assert doc["complete"] and [(p["stages"], p["tp"], p["gpus"]) for p in doc["points"]] == [(2, 1, 2), (1, 2, 2)]
    pp, tp = doc["points"]
    assert all(m["outputs_match"] for p in doc["points"] for m in p["modes"].values())
    assert pp["ideal_speedup"] == gpu_suite.ideal_speedup(2, 3) and pp["overlapped_of_ideal"] > 0
    assert {"overlapped/overlap", "chunked/overlap"} <= set(tp["modes"]) and "ideal_speedup" not in tp
    assert tp["modes"]["overlapped"]["allreduce_prefill_over_decode"] == [40]
    text = "\n".join(gpu_summary.nccl_markdown(doc))
    assert "| 2 | 1 | 40 |" in text and "| 1 | 2 | 40 |" in text and "| yes |" in text and "NO" not in text
    alone = gpu_suite.bench_nccl(gpus=1)
    assert alone["points"] == [] and "1 GPU here" in alone["skipped"]
    assert "Not run: 1 GPU here" in "\n".join(gpu_summary.nccl_markdown(alone))


def test_clock_sampler_reads_in_a_thread_and_sums_up_per_window():
    """bench.clocks: a sampler over a fake NVML reading (1500 MHz, 600 W, the power-cap bit) samples while its block
    runs and sums the samples up against the GPU's limits; per window (a mode's runs) it counts only the samples
    taken inside; a reader that cannot start or fails is said why, and a CPU device samples nothing."""
    import time

    from bench.clocks import POWER_CAP, ClockSampler, run_windows, sampled
    from pipeline.schedule import StageRecord
    reader = (lambda: (1500.0, 600.0, POWER_CAP), (1980.0, 700.0))
    with ClockSampler(period_s=0.001, reader=reader) as clocks:
        time.sleep(0.05)
    got = clocks.summary()
    assert got["samples"] >= 2 and got["sm_clock_mhz"] == dict(median=1500.0, min=1500.0, max=1500.0)
    assert got["max_sm_clock_mhz"] == 1980.0 and got["power_limit_w"] == 700.0 and got["power_w"]["median"] == 600.0
    assert got["power_capped"] == 1.0 and got["thermal_limited"] == 0.0 and got["hw_slowdown"] == 0.0
    clocks.samples = [(1.0, 1980.0, 300.0, 0), (2.0, 1700.0, 690.0, POWER_CAP), (3.0, 1600.0, 700.0, POWER_CAP),
                      (9.0, 1000.0, 100.0, 0)]
    runs = {"naive": [[StageRecord(0, [4], compute=[(0.5, 1.5)]), StageRecord(1, [4], compute=[(1.5, 1.6)])]],
            "overlapped": [[StageRecord(0, [2, 2], compute=[(1.8, 2.5), (2.5, 3.2)])]], "chunked": []}
    windows = run_windows(runs)
    assert windows == dict(naive=[(0.5, 1.6)], overlapped=[(1.8, 3.2)], chunked=[])
    per = clocks.summary(windows)["windows"]
    assert per["naive"]["samples"] == 1 and per["naive"]["sm_clock_mhz"]["median"] == 1980.0
    assert per["naive"]["power_capped"] == 0.0
    assert per["overlapped"]["samples"] == 2 and per["overlapped"]["sm_clock_mhz"]["median"] == 1650.0
    assert per["overlapped"]["power_capped"] == 1.0 and per["chunked"] == dict(samples=0)

    def broken():
        raise OSError("NVML gone")
    with ClockSampler(period_s=0.001, reader=(broken, (1980.0, 700.0))) as failing:
        time.sleep(0.01)
    assert failing.summary() == dict(unavailable="OSError: NVML gone")
    assert sampled(lambda: 7, device="cpu") == (7, None)
    got, sampler = sampled(lambda: 7, device="cuda", period_s=0.001, reader=reader)
    assert got == 7 and isinstance(sampler, ClockSampler)


def test_clock_sampler_without_nvml_says_why_and_lets_the_measurement_run(monkeypatch):
    import bench.clocks

    def no_nvml(device_index=0):
        raise ModuleNotFoundError("No module named 'pynvml'")
    monkeypatch.setattr(bench.clocks, "nvml_reader", no_nvml)
    got, sampler = bench.clocks.sampled(lambda: "measured", device="cuda")
    assert got == "measured"
    assert sampler.summary() == dict(unavailable="ModuleNotFoundError: No module named 'pynvml'")


def test_summary_sets_the_clock_with_the_stages_at_once_against_one_at_a_time():
    """The partitions part's clock line: each mode's median SM clock and power-capped share over the points, a stage
    alone's, against the GPU's max and power limit; a part without NVML says why; older files say nothing."""
    def clocks(naive, overlapped):
        return dict(samples=40, period_s=0.05, max_sm_clock_mhz=1980.0, power_limit_w=700.0,
                    sm_clock_mhz=dict(median=1800.0, min=1500.0, max=1980.0), power_capped=0.5,
                    windows=dict(naive=dict(samples=10, sm_clock_mhz=dict(median=naive), power_capped=0.0),
                                 overlapped=dict(samples=10, sm_clock_mhz=dict(median=overlapped), power_capped=0.8)))
    doc = dict(points=[dict(gpu_clocks=clocks(1980.0, 1600.0)), dict(gpu_clocks=clocks(1965.0, 1500.0))],
               stage_alone=[dict(gpu_clocks=dict(sm_clock_mhz=dict(median=1980.0), power_capped=0.0))])
    (line,) = gpu_summary.clock_lines(doc)
    assert "max 1980 MHz, power limit 700 W" in line and "naive 1965-1980 MHz, power-capped in 0% of its samples" \
        in line and "overlapped 1500-1600 MHz, power-capped in 80% of its samples" in line
    assert "one stage alone 1980 MHz, power-capped in 0%" in line
    assert gpu_summary.clock_lines(dict(points=[dict(gpu_clocks=dict(unavailable="ModuleNotFoundError: pynvml"))])) \
        == ["- GPU clocks: not read (ModuleNotFoundError: pynvml)."]
    assert gpu_summary.clock_lines(dict(points=[dict(modes={})])) == []
