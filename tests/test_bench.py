"""The harness: `python -m bench` writes complete results (JSON, timeline PNG, trace) and a JSON last line, refuses
bad input before any work, and `compare` flags regressions."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def compare_here(capsys, *args) -> subprocess.CompletedProcess:
    """`python -m bench compare ...` run in this process (the CLI's main: its exit code, its one-line errors): a
    subprocess would spend its seconds importing torch."""
    from bench.cli import main
    code = main(["compare", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["compare", *args], code, out, err)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bench("--model", "tiny", "--prompt-len", "96", "--chunk-size", "16", "--repeats", "2", "--warmup", "1",
                "--out", str(out))
    return res, out


def test_demo_writes_complete_results(demo_run):
    res, out = demo_run
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # the last line is one JSON document
    assert summary["outputs_match"] and summary["bytes_exact"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema_version"] == 1 and doc["complete"] and doc["config"]["link"] == "gloo" and doc["environment"]["torch"]
    from pipeline import PRESETS
    assert doc["model"]["hidden_size"] == PRESETS["tiny"].hidden_size and doc["model"]["nope_layers"] == []
    assert set(doc["model"]) == set(dataclasses.asdict(PRESETS["tiny"]))  # every field of the model's shape
    modes = doc["points"][0]["modes"]
    assert list(modes) == ["unchunked", "naive", "chunked", "overlapped"]
    for m in modes.values():  # printed ratios are the quotients of the figures printed beside them
        assert m["measured_over_bound"] == pytest.approx(m["ttft_ms"] / m["bound_ms"], rel=1e-12)
        assert m["bound_ms"] <= m["ttft_ms"] * 1.05 and m["ideal_ms"] <= m["bound_ms"] * 1.0001
    for m in ("naive", "chunked", "overlapped"):
        assert modes[m]["prefill_bytes_per_boundary"] == [96 * 64 * 4]
        assert modes[m]["decode_bytes_per_boundary"] == [64 * 4]
        assert modes[m]["max_abs_dlogits"] <= 1e-4
    assert (out / "timeline.png").stat().st_size > 1000
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name", "").startswith("send") for e in trace["traceEvents"])
    assert "TTFT ms" in res.stdout


def test_sweep_inprocess_writes_one_point_per_length(tmp_path):
    res = bench("--model", "tiny", "--prompt-len", "32,48", "--chunk-size", "16", "--link", "inprocess",
                "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [p["prompt_len"] for p in doc["points"]] == [32, 48]
    assert (tmp_path / "sweep.png").is_file()
    # each table's heading names its own length, and only that one (it once repeated the last point's in brackets)
    assert json.loads(res.stdout.strip().splitlines()[-1])["point"] == "L=48 B=1"  # whose timings the summary has
    headings = [line for line in res.stdout.splitlines() if line.startswith("L=")]
    assert [h.split()[0] for h in headings] == ["L=32", "L=48"], headings
    assert all(h.count("L=") == 1 for h in headings), headings


def test_the_default_prompt_is_the_longest_a_shorter_context_takes(tmp_path, capsys):
    from bench.cli import main  # tiny's context is 1024 positions: 1023 prompt tokens and the decode token
    assert main(["--model", "tiny", "--link", "inprocess", "--modes", "overlapped", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs_match"]
    assert [p["prompt_len"] for p in json.loads((tmp_path / "results.json").read_text())["points"]] == [1023]


def test_ragged_batch_runs_every_mode_and_checks_each_row(tmp_path):
    """`--rows`: one mixed batch over two gloo processes; bytes are the rows' tokens, each row's logits are its own
    (against the row run alone) and each row's TTFT is when the step it ends in left the last stage."""
    res = bench("--model", "tiny", "--rows", "40,100,17", "--chunk-size", "16", "--page-size", "8", "--repeats", "1",
                "--warmup", "0", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["outputs_match"] and summary["bytes_exact"] and set(summary["row_ttft_ms"]) == set(
        ["unchunked", "naive", "chunked", "overlapped"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["rows"] == [40, 100, 17] and doc["config"]["prompt_lens"] is None
    assert doc["config"]["page_size"] == 8
    point = doc["points"][0]
    assert point["rows"] == [40, 100, 17] and point["prompt_len"] == 100 and point["batch"] == 3
    for mode, m in point["modes"].items():
        assert m["max_abs_dlogits_vs_alone"] <= 1e-4 and len(m["max_abs_dlogits_vs_alone_per_row"]) == 3, mode
        assert m["max_abs_ddecode_logits_vs_alone"] <= 1e-4, mode
        ttft = m["row_ttft_ms"]
        assert len(ttft) == 3 and max(ttft) <= m["ttft_ms"] * 1.0001, mode
        if mode in ("unchunked", "naive"):  # every row whole in one step: ready together
            assert m["chunks"] == [157] and m["row_end_step"] == [0, 0, 0] and len(set(ttft)) == 1
        else:  # 16 tokens per row per step: the short rows end first, and their logits are ready first
            assert m["chunks"] == [48, 33, 24, 16, 16, 16, 4] and m["row_end_step"] == [2, 6, 1]
            assert ttft[2] < ttft[0] < ttft[1]
        if mode != "unchunked":  # the steps' packed tokens, no padding; a decode step of one token per row
            assert m["prefill_bytes_per_boundary"] == [157 * 64 * 4]
            assert m["decode_bytes_per_boundary"] == [3 * 64 * 4]
    assert "row TTFT ms" in res.stdout and "row 1: 100 tok" in res.stdout


def test_ragged_figures_catch_a_wrong_row():
    """The row-by-row check fails on one row's logits, not only on the batch's."""
    from types import SimpleNamespace

    from bench.harness import ragged_figures
    from pipeline import Job
    rows = [torch.zeros(5, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
    job = Job("chunked", rows, [], chunk_size=2)
    steps = job.steps()
    assert [st.ends for st in steps] == [(), (1,), (0,)]
    logits, dec = torch.randn(2, 7), torch.randn(2, 7)
    alone = [SimpleNamespace(logits=logits[b:b + 1].clone(), decode_logits=dec[b:b + 1].clone()) for b in range(2)]
    record = SimpleNamespace(compute=[(1.0, 1.5), (1.5, 2.25), (2.25, 3.0)])
    run = SimpleNamespace(logits=logits.clone(), decode_logits=dec.clone(), records=[record], t_start=1.0)
    f = ragged_figures(job, [run], run, alone)
    assert f["max_abs_dlogits_vs_alone"] == 0 and f["row_end_step"] == [2, 1]
    assert f["row_ttft_ms"] == pytest.approx([2000.0, 1250.0])
    run.logits[1, 3] += 0.5  # row 1 wrong, row 0 right
    f = ragged_figures(job, [run], run, alone)
    assert f["max_abs_dlogits_vs_alone_per_row"] == pytest.approx([0.0, 0.5])
    assert f["max_abs_dlogits_vs_alone"] == pytest.approx(0.5) and f["max_abs_ddecode_logits_vs_alone"] == 0


def test_token_budgets_run_side_by_side_with_per_row_chunks():
    """--token-budget none,16: the chunked modes under each plan in one round-robin, naive and unchunked once; each
    plan's steps, ends and bytes its own, every row checked."""
    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, link="inprocess")
    point = run_point(spec, 0, 1, [], repeats=1, warmup=0, rows=[40, 9, 23], chunk_size=8,
                      token_budgets=[None, 16])
    modes = point["modes"]
    assert list(modes) == ["unchunked", "naive", "chunked", "overlapped", "chunked/budget16", "overlapped/budget16"]
    assert modes["overlapped"]["chunks"] == [24, 17, 15, 8, 8] and modes["overlapped"]["chunk_size"] == 8
    assert modes["overlapped/budget16"]["chunks"] == [16, 16, 16, 16, 8]
    assert modes["overlapped/budget16"]["token_budget"] == 16 and modes["overlapped/budget16"]["chunk_size"] is None
    assert modes["overlapped/budget16"]["row_end_step"] == [2, 3, 4] and modes["naive"]["token_budget"] is None
    for label, m in modes.items():
        assert m["outputs_match"] and m["bytes_exact"] and m["max_abs_dlogits_vs_alone"] <= 1e-4, label
    from bench.report import row_table, table
    assert "(3/5)" in row_table(point) and "overlapped/budget16" in row_table(point)
    assert "(rows without a suffix: per-row chunks)" in table(point)
    with pytest.raises(ValueError, match="need rows"):
        run_point(spec, 32, 1, [16, 16], 1, 0, token_budgets=[16])


def test_the_table_says_what_its_rows_without_a_suffix_ran_under():
    """A row carries a suffix for each compared axis where it differs from the first value listed; the table names
    those first values when they vary or are not the defaults, and says nothing for a run of defaults."""
    from bench.report import unsuffixed_rows
    row = lambda **kw: dict(dict(tp_comm="serial", compress="none", tp_boundary="matching"), **kw)  # noqa: E731
    plain = {"unchunked": row(), "naive": row(), "overlapped": row()}
    assert unsuffixed_rows({"modes": plain}) is None
    first_not_default = {"unchunked": row(), "naive": row(tp_comm="overlap"),
                         "naive/sequence": row(tp_comm="sequence")}
    assert unsuffixed_rows({"modes": first_not_default}) == "tp-comm overlap"
    varying = {"unchunked": row(), "overlapped": row(), "overlapped/fp8": row(compress="fp8"),
               "overlapped/sharded": row(tp_boundary="sharded")}
    assert unsuffixed_rows({"modes": varying}) == "compress none, tp-boundary matching"
    assert unsuffixed_rows({"modes": {"unchunked": row(), "naive": row(compress="fp8")}}) == "compress fp8"


def test_ragged_point_with_tp_crossings_and_compression_is_exact():
    """A ragged batch over 2 stages x 2 TP ranks in-process: every crossing and tp_comm, with and without fp8,
    bytes exact (sharded steps in 1/T slices, the decode step of 3 tokens sliced too) and each row its own."""
    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, link="inprocess", tp=2)
    point = run_point(spec, 0, 1, [], repeats=1, warmup=0, modes=["naive", "overlapped"], rows=[21, 6, 3],
                      chunk_size=8, tp_comms=["serial", "sequence"], tp_boundaries=["matching", "sharded"],
                      compress=["none", "fp8"])
    modes = point["modes"]
    assert len(modes) == 16 and point["rows"] == [21, 6, 3]
    fp8 = 64 + 4  # e4m3 + a float32 scale per token
    for label, m in modes.items():
        assert m["bytes_exact"] and m["outputs_match"], label
        wire = fp8 if m["compress"] == "fp8" else 64 * 4
        if m["tp_boundary"] == "sharded":  # each step ceil(N/2) per lane, the 3-token decode step 2
            assert m["prefill_bytes_per_boundary"] == [wire * sum(-(-n // 2) for n in m["chunks"])], label
            assert m["decode_bytes_per_boundary"] == [wire * 2], label
        else:
            assert m["prefill_bytes_per_boundary"] == [wire * 30] and m["decode_bytes_per_boundary"] == [wire * 3]
        assert m["allreduce_bytes_per_stage"] == [2 * 2 * 30 * 64 * 4] * 2, label
        if m["compress"] == "none":
            assert m["max_abs_dlogits_vs_alone"] <= 1e-4, label


@pytest.mark.parametrize("chunk_size,budget,ends,steps", [(8, None, [4, 1, 2], [24, 17, 15, 8, 8]),
                                                           (None, 16, [2, 3, 4], [16, 16, 16, 16, 8])])
def test_ragged_point_is_simulated_row_by_row_from_a_dense_fit(chunk_size, budget, ends, steps):
    """--rows with --simulate: costs fitted on a dense prompt as long as the longest row, each packed step costed
    row by row; every mode gets the simulator's TTFT and each row's, the rows' in the order their steps end. Per-row
    chunks or a token budget (first come, first served)."""
    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, link="inprocess")
    point = run_point(spec, 0, 1, [], repeats=2, warmup=0, rows=[40, 9, 23], chunk_size=chunk_size, simulate=True,
                      token_budgets=[budget])
    assert point["calibration"]["prompt_len"] == 40
    for mode, m in point["modes"].items():
        assert m["outputs_match"] and m["bytes_exact"], mode
        assert m["sim_ttft_ms"] > 0 and m["chunk_fit_over_measured"] > 0 and m["replay_over_measured"] > 0, mode
        sim_rows = m["sim_row_ttft_ms"]
        assert max(sim_rows) == pytest.approx(m["sim_ttft_ms"]), mode
        order = sorted(range(3), key=lambda b: m["row_end_step"][b])
        assert [sim_rows[b] for b in order] == sorted(sim_rows), mode
    assert point["modes"]["overlapped"]["row_end_step"] == ends and point["modes"]["overlapped"]["chunks"] == steps
    assert point["modes"]["naive"]["chunks"] == [72] and point["modes"]["overlapped"]["token_budget"] == budget


@pytest.mark.parametrize("emulated", [False, True])
def test_an_emulated_in_process_link_is_simulated_as_emulated_not_fitted(emulated):
    """--simulate over an in-process link: emulated, the simulator's link is the emulated one (a send's measured
    time includes its waits: fitted, an H200 found 13 ms of latency on a 3 us link), the fit kept beside it; not
    emulated, the fit (the real link's own cost)."""
    from bench.harness import run_point
    from pipeline import PipelineSpec
    from pipeline.link import LinkModel
    from pipeline.simulate import simulate
    kw = dict(bandwidth_gbps=0.5, latency_s=2e-4) if emulated else {}
    spec = PipelineSpec(source="tiny", stages=2, link="inprocess", **kw)
    point = run_point(spec, 40, 1, [8] * 5, repeats=1, warmup=0, modes=["naive", "chunked"], simulate=True)
    link = point["calibration"]["link"]
    if emulated:
        assert link == dict(bandwidth_gbps=0.5, latency_s=2e-4, source="emulated")
        assert "waiting for the receiver" in point["calibration"]["link_fitted"]["why_not_used"]
        m = point["modes"]["chunked"]
        from pipeline.costs import ChunkCost
        costs = [ChunkCost(**c) for c in point["calibration"]["stage_costs"]]
        want = simulate("chunked", m["chunks"], costs, LinkModel(0.5, 2e-4), m["wire_bytes_per_token"])
        assert m["sim_ttft_ms"] == pytest.approx(want.makespan_s * 1e3)
    else:
        assert link["source"] == "fitted" and "link_fitted" not in point["calibration"]


def test_ragged_point_with_tp_is_simulated_for_every_reduce_schedule_and_crossing():
    """--rows --simulate --tp 2: one rank's compute fitted on a dense prompt, each packed step costed row by row,
    the all-reduces of the step's packed tokens on the fitted TP link; serial, overlapped (the token halves the model
    cuts) and sequence-parallel reduces, over matching and sharded crossings. The baseline has no TP: no figures."""
    import math

    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, link="inprocess", tp=2)
    point = run_point(spec, 0, 1, [], repeats=1, warmup=0, modes=["unchunked", "chunked", "overlapped"],
                      rows=[40, 9, 23], chunk_size=8, simulate=True, tp_comms=["serial", "overlap", "sequence"],
                      tp_boundaries=["matching", "sharded"])
    assert point["calibration"]["prompt_len"] == 40 and "tp_link" in point["calibration"]
    modes = point["modes"]
    assert len(modes) == 1 + 2 * 3 * 2
    for label, m in modes.items():
        assert m["outputs_match"] and m["bytes_exact"], label
        if m["mode"] == "unchunked":
            assert math.isnan(m["sim_ttft_ms"]), label
            continue
        assert 0 < m["sim_ttft_ms"] < math.inf and m["chunk_fit_over_measured"] > 0, label
        assert max(m["sim_row_ttft_ms"]) == pytest.approx(m["sim_ttft_ms"]), label
        order = sorted(range(3), key=lambda b: m["row_end_step"][b])
        assert [m["sim_row_ttft_ms"][b] for b in order] == sorted(m["sim_row_ttft_ms"]), label


def test_balanced_plan_is_fitted_planned_and_simulated(tmp_path):
    res = bench("--model", "tiny", "--prompt-len", "256", "--chunk-plan", "balanced", "--granularity", "16",
                "--link", "inprocess", "--stages", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    for cal in (doc["plan_calibration"], doc["points"][0]["calibration"]):  # the plan's, and the simulator's
        assert len(cal["stage_costs"]) == 2 and all(min(c.values()) >= 0 for c in cal["stage_costs"])
    plan = doc["config"]["plans"]["256"]
    assert sum(plan) == 256 and all(c % 16 == 0 for c in plan)
    for mode, m in doc["points"][0]["modes"].items():
        assert m["outputs_match"], mode
        assert m["sim_ttft_ms"] > 0 and m["sim_over_measured"] > 0
        assert len(m["replay_over_measured_runs"]) == 1 and m["replay_over_measured"] > 0
        assert m["chunk_fit_over_measured"] > 0 and 0 <= m["outlier_compute_fraction"] <= 1
        if mode in ("chunked", "overlapped"):
            assert m["chunks"] == plan
    assert (tmp_path / "timeline_vs_sim.png").stat().st_size > 1000
    assert "sim/meas" in res.stdout and "replay/meas" in res.stdout
    m = doc["points"][0]["modes"]["chunked"]  # the note under the table names each mode's figures
    assert f"chunked {m['chunk_fit_over_measured']:.2f}" in res.stdout
    assert f"chunked {100 * m['outlier_compute_fraction']:.0f}%" in res.stdout


def test_chunk_costs_against_measured_chunks():
    from bench.calibration import chunk_costs_vs_measured
    from pipeline.costs import ChunkCost
    from pipeline.simulate import simulate
    costs = [ChunkCost(1e-8, 2e-8, 1e-5, 1e-3), ChunkCost(0, 0, 3e-5, 2e-3)]
    chunks = [32, 64, 32]
    runs = [simulate("overlapped", chunks, costs).records for _ in range(2)]
    fit, took = chunk_costs_vs_measured("overlapped", runs, costs)
    assert len(fit) == 2 * 2 * 3 and fit == pytest.approx(took, rel=1e-12)
    a, b = runs[1][1].compute[1]
    runs[1][1].compute[1] = (a, a + 3 * (b - a))  # one chunk of stage 1 took 3x its cost
    fit, took = chunk_costs_vs_measured("overlapped", runs, costs)
    assert took[10] == pytest.approx(3 * fit[10]) and (took > 2 * fit).sum() == 1
    whole = simulate("unchunked", [128], costs).records  # one stage, the model's whole cost
    fit, took = chunk_costs_vs_measured("unchunked", [whole], costs)
    assert fit == pytest.approx([float(costs[0](128, 0) + costs[1](128, 0))]) and fit == pytest.approx(took)


def test_projection_writes_table_plot_and_json(tmp_path, capsys):
    from bench.simulate import main as simulate_main  # in-process: a subprocess would spend its time importing torch
    assert simulate_main(["--models", "llama3-8b", "--stages", "2,4", "--links", "nvlink,100gbe",
                          "--prompt-lens", "4096,16384", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    doc = json.loads((tmp_path / "simulate.json").read_text())
    assert len(doc["rows"]) == 8 and "not measurements" in doc["kind"]
    assert {"git_commit", "torch", "triton"} <= set(doc["environment"])  # which code projected it
    for r in doc["rows"]:
        assert r["overlapped_ms"] <= r["chunked_ms"] * 1.0001 and r["overlapped_ms"] < r["naive_ms"]
        assert r["overlapped_ms"] >= r["ideal_ms"]  # no schedule beats a perfect split of the compute
        assert r["naive_ms"] >= r["t_compute_ms"]  # a naive pipeline runs the stages one after another
    assert (tmp_path / "simulate.png").stat().st_size > 1000
    assert json.loads(stdout.strip().splitlines()[-1])["points"] == 8


def test_projected_times_keep_three_significant_figures():
    from bench.simulate import _ms  # a small model's 0.06 ms once printed as 0
    assert [_ms(x) for x in (0.0555, 0.0, 8.219, 12.34, 99.94, 1234.4)] == ["0.0555", "0", "8.22", "12.3", "99.9",
                                                                          "1234"]


def test_projection_takes_a_hugging_face_directory_by_its_shape(tmp_path, capsys):
    from bench.simulate import main as simulate_main
    d = tmp_path / "Meta-Llama-3-8B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(  # llama3-8b's shape: no weights needed to project
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)))
    for extra in ([], ["--gpus", "8"]):
        args = ["--models", f"llama3-8b,{d}", "--links", "nvlink", "--prompt-lens", "8192"] + (extra or ["--stages",
                                                                                                        "2"])
        assert simulate_main(args + ["--out", str(tmp_path / "out")]) == 0
        rows = json.loads((tmp_path / "out" / "simulate.json").read_text())["rows"]
        preset = [r for r in rows if r["model"] == "llama3-8b"]
        mine = [r for r in rows if r["model"] == "Meta-Llama-3-8B"]  # the directory's name in the rows and table
        assert len(preset) == len(mine) > 0 and len(rows) == 2 * len(mine)
        for a, b in zip(preset, mine):
            assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}
        assert "Meta-Llama-3-8B" in capsys.readouterr().out


def test_compare_flags_regressions(demo_run, tmp_path, capsys):
    _, out = demo_run
    base = out / "results.json"
    assert compare_here(capsys, str(base), str(base)).returncode == 0
    assert compare_here(capsys, str(out), str(base)).returncode == 0  # a run's --out directory: its results.json
    (tmp_path / "kernels.json").write_text('{"kind": "kernels"}')
    res = compare_here(capsys, str(base), str(tmp_path))
    assert res.returncode == 2 and "kernel benchmark file" in res.stderr  # its one file, kernels.json, is read
    (tmp_path / "results.json").write_text("{}")
    res = compare_here(capsys, str(base), str(tmp_path))
    assert res.returncode == 2 and "both results.json and kernels.json: give the file" in res.stderr, res.stderr
    (tmp_path / "empty").mkdir()
    res = compare_here(capsys, str(base), str(tmp_path / "empty"))
    assert res.returncode == 2 and "neither results.json nor kernels.json" in res.stderr, res.stderr
    doc = json.loads(base.read_text())
    doc["points"][0]["modes"]["overlapped"]["ttft_ms"] *= 1.5
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(doc))
    res = compare_here(capsys, str(base), str(slower))
    assert res.returncode == 1 and "REGRESSED" in res.stdout
    doc["points"][0]["modes"]["overlapped"]["ttft_ms"] /= 1.5
    doc["points"][0]["modes"]["chunked"]["outputs_match"] = False
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(doc))
    assert compare_here(capsys, str(base), str(wrong)).returncode == 1
    doc["points"][0]["modes"]["chunked"]["outputs_match"] = True
    m = doc["points"][0]["modes"]["overlapped"]
    m["exposed_comm_ms"] = 5 * m["exposed_comm_ms"] + 0.02 * m["ttft_ms"]  # grew 5x (and by 2% of the TTFT)
    comm = tmp_path / "comm.json"
    comm.write_text(json.dumps(doc))
    res = compare_here(capsys, str(base), str(comm))
    assert res.returncode == 1 and "overlapped L=96 exposed_comm_ms" in res.stdout, res.stdout
    doc = json.loads(base.read_text())
    doc["points"][0]["modes"]["naive"]["prefill_bytes_per_boundary"] = [1]
    changed = tmp_path / "bytes.json"
    changed.write_text(json.dumps(doc))
    res = compare_here(capsys, str(base), str(changed))
    assert res.returncode == 1 and "prefill_bytes_per_boundary changed" in res.stdout
    checked = next(line for line in res.stdout.splitlines() if line.startswith("checked:"))
    for fig in ("ttft_ms", "exposed_comm_ms", "bound_ms", "compute_ms_per_stage", "send_time_ms_per_stage",
                "prefill_bytes_per_boundary", "decode_bytes_per_boundary", "outputs_match", "bytes_exact"):
        assert fig in checked, fig
    doc = json.loads(base.read_text())
    doc["environment"]["device"] = "another GPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    res = compare_here(capsys, str(base), str(other))
    assert res.returncode == 2 and "different devices" in res.stderr and "'another GPU'" in res.stderr
    doc = json.loads(base.read_text())
    doc["config"]["chunk_size"] += 1
    other.write_text(json.dumps(doc))
    res = compare_here(capsys, str(base), str(other))
    assert res.returncode == 2 and "different configurations" in res.stderr  # and which: only the key that differs
    assert f"chunk_size {doc['config']['chunk_size'] - 1} vs {doc['config']['chunk_size']}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    doc = json.loads(base.read_text())  # written before a key existed (null by default now): the same configuration
    del doc["config"]["rows"], doc["config"]["token_budget"]
    older = tmp_path / "older.json"
    older.write_text(json.dumps(doc))
    assert compare_here(capsys, str(older), str(base)).returncode == 0
    doc["config"]["page_size"] = 64  # ... but a key one side lacks and the other sets is a difference
    older.write_text(json.dumps(doc))
    res = compare_here(capsys, str(older), str(base))
    assert res.returncode == 2 and "page_size 64 vs None" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_kernel_benchmark_says_no_gpu_and_exits_zero():
    res = bench("kernels")
    assert res.returncode == 0 and "no CUDA GPU" in res.stdout


def test_machine_check_reports_stops_and_slow_downs(capsys):
    from bench.__main__ import main
    assert main(["machine-check", "--seconds", "1"]) == 0  # 1 s: longer than any host stop seen here (< 0.7 s)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["windows"] == 100 and 0 <= report["stopped_fraction"] <= 1 and 0 <= report["slowed_fraction"] <= 1
    with pytest.raises(SystemExit):
        main(["machine-check", "--seconds", "0"])


def test_a_fresh_demo_compares_with_the_committed_one(demo_run, tmp_path, capsys):
    """`python -m bench compare bench/results/cpu-demo/results.json <a new run of the same command>` compares:
    the keys the harness has added to `config` since that file was committed (TP, compression, SM partitions, CUDA
    graphs, ...) are read there as the values a run without those options records. A run that differs in one of
    them (here: compressed boundaries) is still refused, naming it."""
    from bench.compare import _differing_keys, compare
    committed = ROOT / "bench/results/cpu-demo/results.json"
    base = json.loads(committed.read_text())
    fresh = json.loads((demo_run[1] / "results.json").read_text())
    for key in ("model", "prompt_lens", "plans", "chunk_size", "repeats", "warmup", "threads_per_stage"):
        fresh["config"][key] = base["config"][key]  # the command's own choices, as the committed run made them
    assert _differing_keys(base["config"], fresh["config"]) == []
    fresh["environment"]["device"] = base["environment"]["device"]
    new = tmp_path / "new.json"
    new.write_text(json.dumps(fresh))
    compare(str(committed), str(new))
    assert "different configurations" not in capsys.readouterr().err
    fresh["config"]["compress"] = ["bf16"]
    new.write_text(json.dumps(fresh))
    assert compare(str(committed), str(new)) == 2
    assert "different configurations (compress ['none'] vs ['bf16'])" in capsys.readouterr().err


def test_compare_reads_kernel_benchmark_files(tmp_path, capsys):
    """kernels.json, per shape and provider: our kernels' regressions fail, the peers' changes are reported (they are
    the yardstick); the committed H100 file (schema 0: SDPA peers only) is the stored baseline."""
    from bench.compare import compare
    base = ROOT / "bench/results/h100/kernels.json"
    assert compare(str(base), str(base)) == 0
    doc = json.loads(base.read_text())
    doc.update(schema_version=1, kind="kernels")
    doc["attention"][3]["triton_ms"] *= 1.5  # prefix 16k, chunk 2k
    doc["attention"][0]["sdpa_cudnn_ms"] *= 2  # a peer got slower: not our regression
    slower = tmp_path / "kernels.json"
    slower.write_text(json.dumps(doc))
    capsys.readouterr()
    assert compare(str(base), str(slower)) == 1
    out = capsys.readouterr().out
    assert "P=16384 C=2048 triton_ms x1.50" in out and "peer slower" in out
    doc["attention"][3]["triton_ms"] /= 1.5
    doc["memory_bound"][0]["triton_ms"] *= 1.3  # a memory-bound kernel of ours regressed
    slower.write_text(json.dumps(doc))
    assert compare(str(base), str(slower)) == 1
    doc["memory_bound"][0]["triton_ms"] /= 1.3
    doc["memory_bound"][1].update(bytes=doc["memory_bound"][1]["bytes"] * 1.25, triton_ms=9.9)  # other work
    slower.write_text(json.dumps(doc))
    capsys.readouterr()
    assert compare(str(base), str(slower)) == 0 and "other work: not compared" in capsys.readouterr().out
    doc["attention"][1].update(max_abs_err=0.5, peer_tolerance=3e-2)  # wrong results
    slower.write_text(json.dumps(doc))
    assert compare(str(base), str(slower)) == 1 and "over the tolerance" in capsys.readouterr().out
    doc["attention"][1]["max_abs_err"] = 1e-3
    doc["environment"]["device"] = "another GPU"
    slower.write_text(json.dumps(doc))
    assert compare(str(base), str(slower)) == 2 and "different devices" in capsys.readouterr().err


def test_compare_gates_a_launch_bound_shape_on_its_graph_time(tmp_path, capsys):
    """A shape whose launcher takes the host longer than its kernel takes the device (the committed H200 run's prefix
    0 / chunk 64): its eager time is the host's, which another machine's CPU moves, so it is reported but does not
    fail; the kernels' CUDA-graph replay (`triton_graph_ms`) gates it. A shape that is not launch-bound still fails
    on its eager time."""
    from bench.compare import compare
    base = ROOT / "bench/results/h200/kernels.json"
    doc = json.loads(base.read_text())
    i = next(i for i, r in enumerate(doc["attention"]) if (r["prefix"], r["chunk"]) == (0, 64))
    row = doc["attention"][i]
    assert row["launch_steady_us"] > row["launch_graph_us"]  # launch-bound in the committed run
    new = tmp_path / "kernels.json"
    row["triton_ms"] *= 1.7  # the host got slower, the kernel did not
    new.write_text(json.dumps(doc))
    capsys.readouterr()
    assert compare(str(base), str(new)) == 0
    out = capsys.readouterr().out
    assert "slower (launch-bound: the host's time; triton_graph_ms gates)" in out
    row["launch_graph_us"] *= 1.5  # now the kernel too
    new.write_text(json.dumps(doc))
    assert compare(str(base), str(new)) == 1 and "P=0 C=64 triton_graph_ms x1.50" in capsys.readouterr().out
    row["launch_graph_us"] /= 1.5
    row["triton_ms"] /= 1.7
    j = next(i for i, r in enumerate(doc["attention"]) if (r["prefix"], r["chunk"]) == (16384, 2048))
    doc["attention"][j]["triton_ms"] *= 1.5  # not launch-bound: its eager time is the kernel's
    new.write_text(json.dumps(doc))
    assert compare(str(base), str(new)) == 1 and "P=16384 C=2048 triton_ms x1.50" in capsys.readouterr().out


def test_compare_gates_launch_bound_dense_rows_of_a_paged_batch_on_their_graph_time(tmp_path, capsys):
    """A paged batch's dense kernel run once per row (decode-like rows: four split launches) read 0.40 and 0.79 ms
    eagerly in two H200 runs: the host's launch path. Where both files replayed the rows from a CUDA graph and either
    one's eager time is over its replay's, the replay gates and the eager figure is reported; otherwise the eager
    figure gates as before."""
    from bench.compare import compare
    doc = json.loads((ROOT / "bench/results/h200/kernels.json").read_text())
    row = next(r for r in doc["paged"] if all(c == 1 for _, c in r["batch"]))  # the decode-like batch
    row["dense_rows_graph_ms"] = 0.35
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps(doc))
    row["dense_rows_ms"] *= 1.97  # the host got slower, the kernels did not
    new.write_text(json.dumps(doc))
    capsys.readouterr()
    assert compare(str(base), str(new)) == 0
    assert "slower (launch-bound: the host's time; dense_rows_graph_ms gates)" in capsys.readouterr().out
    row["dense_rows_graph_ms"] *= 1.5  # now the kernels too
    new.write_text(json.dumps(doc))
    assert compare(str(base), str(new)) == 1 and "dense_rows_graph_ms x1.50" in capsys.readouterr().out
    del row["dense_rows_graph_ms"]  # a file without the replay: the eager time gates
    new.write_text(json.dumps(doc))
    assert compare(str(base), str(new)) == 1 and "dense_rows_ms x1.97" in capsys.readouterr().out
    mixed = next(r for r in doc["paged"] if len(r["batch"]) == 5)  # device-bound rows: eager and replay agree
    mixed["dense_rows_graph_ms"] = mixed["dense_rows_ms"] * 0.98
    base.write_text(json.dumps(doc))
    mixed["dense_rows_ms"] *= 1.5
    mixed["dense_rows_graph_ms"] *= 1.5
    new.write_text(json.dumps(doc))
    assert compare(str(base), str(new)) == 1
    out = capsys.readouterr().out
    assert "dense_rows_ms x1.50" in out and "dense_rows_graph_ms x1.50" in out  # the eager one gates too


def test_timelines_mark_when_each_ragged_rows_first_token_is_ready(tmp_path):
    """The step a row ends in, finished by the last stage: a dashed mark in the PNG, an instant event in the trace
    (rows ending together share one time); steps the timeline lacks mark nothing."""
    from bench.timeline import row_end_times, write_chrome_trace, write_timeline_png
    events = [dict(stage=s, lane="compute", name=f"chunk {k}", start=0.01 * (k + s), end=0.01 * (k + s + 1))
              for s in (0, 1) for k in range(3)] + [dict(stage=0, lane="send", name="send 0", start=0.01, end=0.015)]
    assert {round(t, 9): rows for t, rows in row_end_times(events, [2, 0, 2, 7]).items()} == {0.04: [0, 2], 0.02: [1]}
    write_timeline_png({"chunked": events}, tmp_path / "t.png", "t", {"chunked": [2, 0, 2]})
    assert (tmp_path / "t.png").stat().st_size > 0
    write_chrome_trace({"chunked": events, "other": events}, tmp_path / "t.json", {"chunked": [2, 0, 2]})
    marks = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "i"]
    assert sorted((e["name"], round(e["ts"])) for e in marks) == [("row 0: first token", 40000),
                                                                  ("row 1: first token", 20000),
                                                                  ("row 2: first token", 40000)]
    assert {e["pid"] for e in marks} == {0}  # the mode given row ends only, on its last stage's compute thread


def test_compare_matches_ragged_points_by_their_rows(tmp_path, capsys):
    """Two ragged batches of the same longest row and row count are different points: even with --force, a batch
    of other rows is not compared figure by figure with this one, it is reported missing."""
    from bench.compare import compare
    base = ROOT / "bench/results/cpu-ragged/results.json"
    doc = json.loads(base.read_text())
    assert compare(str(base), str(base)) == 0
    doc["points"][0]["rows"] = [301, 999, 2048]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert compare(str(base), str(other), force=True) == 1
    assert "point rows=300,1000,2048 B=3 missing" in capsys.readouterr().out


def test_compare_reads_the_h200_kernel_baseline_with_its_paged_rows(tmp_path, capsys):
    """The committed H200 file (schema 1: fair peers, launch plans, paged batches) is a usable baseline: equal to
    itself, and a slower paged batch of ours fails the comparison, naming it."""
    from bench.compare import compare
    base = ROOT / "bench/results/h200/kernels.json"
    assert compare(str(base), str(base)) == 0
    doc = json.loads(base.read_text())
    assert doc["schema_version"] == 1 and doc["paged"] and doc["environment"]["device"] == "NVIDIA H200"
    doc["paged"][0]["paged_ms"] *= 1.4
    slower = tmp_path / "kernels.json"
    slower.write_text(json.dumps(doc))
    capsys.readouterr()
    assert compare(str(base), str(slower)) == 1
    assert "paged_ms x1.40" in capsys.readouterr().out
    # sliding-window rows (a later file's `window` section; figures made up here) are compared by shape too
    doc["paged"][0]["paged_ms"] /= 1.4
    row = dict(prefix=16384, chunk=2048, window=4096, triton_ms=1.0, max_abs_err=1e-3, peer_tolerance=3e-2,
               flex_ms=1.2)
    windowed = tmp_path / "window.json"
    windowed.write_text(json.dumps(doc | {"window": [row]}))
    slower.write_text(json.dumps(doc | {"window": [row | {"triton_ms": 1.3, "flex_ms": 1.0}]}))
    assert compare(str(windowed), str(windowed)) == 0
    capsys.readouterr()
    assert compare(str(windowed), str(slower)) == 1
    out = capsys.readouterr().out
    assert "P=16384 C=2048 W=4096 triton_ms x1.30" in out and "peer faster" in out
    slower.write_text(json.dumps({k: v for k, v in doc.items() if k != "window"}))  # the new file lacks the shape
    assert compare(str(windowed), str(slower)) == 1
    assert "window P=16384 C=2048 W=4096 missing" in capsys.readouterr().out


def test_the_results_index_lists_every_results_folder_and_no_other():
    """bench/results/README.md names each committed results folder (the subfolders of one that holds only folders)
    and nothing that is not there: a new folder must be indexed, a removed one unlisted."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    index = (root / "README.md").read_text()
    listed = set(re.findall(r"^\| (.+?) \|", index, re.M)) - {"folder", "---"}
    named = {n for cell in listed for n in re.findall(r"`([^`]+)`", cell)}
    on_disk = set()
    for d in (p for p in root.iterdir() if p.is_dir()):  # a folder of folders only (cpu-plan): each of them
        files = [p for p in d.iterdir() if p.is_file()]
        on_disk |= {d.name} if files else {f"{d.name}/{s.name}" for s in d.iterdir() if s.is_dir()}
    assert named == on_disk


def test_the_cores_counted_are_those_this_process_may_run_on(tmp_path, monkeypatch, capsys):
    """A process pinned to one CPU (taskset, a container's cpuset) on a larger machine: two gloo stage processes
    asked for are refused, naming the one core and the in-process link, and nothing is written; with no --link
    given, the run goes in-process and says so."""
    from bench.cli import main
    from pipeline.procs import usable_cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 1
    argv = ["--model", "tiny", "--prompt-len", "24", "--stages", "2", "--chunk-size", "8", "--repeats", "1"]
    assert main([*argv, "--link", "gloo", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "2 stage processes" in err and "may run on 1" in err and "--link inprocess" in err
    assert not (tmp_path / "no").exists()
    assert main([*argv, "--out", str(tmp_path / "ok")]) == 0  # the default: in-process threads
    res = capsys.readouterr()
    assert "may run on 1: running the stages in-process instead, as threads sharing the cores" in res.err
    assert json.loads(res.out.strip().splitlines()[-1])["outputs_match"]
    doc = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert doc["config"]["link"] == "inprocess"


def test_a_cpu_device_names_its_cores_in_words(monkeypatch):
    import bench.report as report
    for n, words in ((1, "1 core)"), (2, "2 cores)")):
        monkeypatch.setattr(report, "usable_cores", lambda: n)
        report._environment.cache_clear()
        assert report.environment()["device"].endswith(words) or torch.cuda.is_available()
    report._environment.cache_clear()  # the next caller sees this machine again


def test_one_thread_per_stage_is_allowed_when_stages_outnumber_the_cores(tmp_path, monkeypatch, capsys):
    """In-process stages outnumbering the cores run one torch thread each (the default there): asking for exactly
    that with --threads 1 runs too, and --threads 2 is refused naming 1 as the most."""
    from bench.cli import main
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    argv = ["--model", "tiny", "--prompt-len", "24", "--chunk-size", "8", "--link", "inprocess", "--stages", "4",
            "--modes", "overlapped", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--threads", "1", "--out", str(tmp_path / "ok")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs_match"]
    assert main([*argv, "--threads", "2", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "choose --threads 1 or less" in err and not (tmp_path / "no").exists()


def _command_spans():
    """(markdown file, command) for every `python -m bench ...` and `python -m kernels.aot ...` command the markdown
    files of this repository show in backticks (a span wrapped over lines too; fenced blocks left out)."""
    import re
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files or ["README.md"]:
        text = re.sub(r"^```.*?^```", "", (ROOT / name).read_text(), flags=re.S | re.M)
        for span in re.findall(r"`([^`]*-m (?:bench|kernels\.aot)\b[^`]*)`", text):
            yield name, " ".join(span.split())


def _documented_commands():
    """Every command `_command_spans` finds, as (module, subcommand or None, the options it names) -> the command."""
    import re
    seen = {}
    for _, span in _command_spans():
        module, _, rest = span.partition("-m ")[2].partition(" ")
        words = rest.replace("[", " ").replace("]", " ").split()
        sub = words[0] if module == "bench" and words and re.fullmatch(r"[a-z][a-z-]*", words[0]) else None
        options = tuple(sorted({w.split("=")[0] for w in words if w.startswith("--")}))
        seen[(module, sub, options)] = span
    return seen


def test_every_documented_command_names_options_its_parser_has(capsys):
    """The README and the results' READMEs show commands to copy: each subcommand they name exists and each option
    they give is one its parser lists (an option renamed or removed must be renamed or removed there too)."""
    import re

    from bench import cli
    from kernels import aot
    commands = _documented_commands()
    assert len(commands) >= 20 and any(sub == "simulate" for _, sub, _ in commands)
    helps = {}
    for module, sub, options in commands:
        if (module, sub) not in helps:
            with pytest.raises(SystemExit) as done:
                (aot.main if module == "kernels.aot" else cli.main)(([sub] if sub else []) + ["--help"])
            assert done.value.code == 0, commands[(module, sub, options)]
            helps[(module, sub)] = capsys.readouterr().out
        if sub is not None:
            assert sub in cli.SUBCOMMANDS, commands[(module, sub, options)]
        missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", helps[(module, sub)])]
        assert not missing, f"{commands[(module, sub, options)]!r}: {missing} not in its --help"


def test_the_readme_states_the_torch_and_triton_floors_pyproject_asks_for():
    """The README tells GPU users which torch to bring (`pip install -e` keeps it only if pyproject.toml's floor
    allows it): the floors it states are pyproject's."""
    import re
    floors = dict(re.findall(r'^\s*"(torch|triton)>=([\d.]+)",$', (ROOT / "pyproject.toml").read_text(), re.M))
    assert set(floors) == {"torch", "triton"}, floors
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"torch \(≥ ([\d.]+) with Triton ≥ ([\d.]+), as pyproject\.toml asks", readme)
    assert stated, "the README no longer states the torch / Triton floors next to the GPU install"
    assert stated.groups() == (floors["torch"], floors["triton"])


def test_compare_says_when_the_flex_peer_was_compiled_differently(tmp_path, capsys):
    """A kernel file whose flex peer was compiled per shape (`flex_compile` static) against a committed one whose flex
    was compiled once with dynamic shapes (the H200 run at 268ac01): each flex figure's verdict names the two
    compiles; a peer never fails it."""
    from bench.compare import compare
    base = ROOT / "bench/results/h200/kernels-268ac01.json"
    doc = json.loads(base.read_text())
    assert "flex_compile" not in doc
    new = tmp_path / "kernels.json"
    new.write_text(json.dumps(doc | dict(flex_compile="static")))
    assert compare(str(base), str(new)) == 0
    out = capsys.readouterr().out
    flex = [line for line in out.splitlines() if " flex_ms " in line]
    assert flex and all("(flex compiled dynamic vs static)" in line for line in flex)
    assert compare(str(new), str(new)) == 0 and "flex compiled" not in capsys.readouterr().out


def test_every_documented_demo_command_passes_the_checks_on_two_cores(tmp_path, monkeypatch, capsys):
    """Each `python -m bench [options]` command the README shows (no placeholders) gets past every check of its
    arguments on a 2-core machine like this project's, up to where it would create its output directory (stopped
    there): none is refused as written (`--tp 2 --simulate` was, with its default of 2 stages: 4 processes)."""
    import re
    import shlex

    import bench.cli as cli
    import pipeline.procs
    monkeypatch.setattr(pipeline.procs, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reached = []

    class Validated(Exception):
        pass

    def stop(out):
        reached.append(out)
        raise Validated
    monkeypatch.setattr(cli, "output_dir", stop)
    spans = {span for name, span in _command_spans() if name == "README.md"}  # the results' READMEs: their GPUs'
    runnable = sorted(s for s in spans if s.split()[:3] == ["python", "-m", "bench"] and not any(c in s for c in "[<|…")
                      and "--help" not in s and not re.match(r"python -m bench [a-z]", s))
    assert len(runnable) >= 6
    for span in runnable:
        argv = shlex.split(span.partition("-m bench")[2]) + ["--out", str(tmp_path / "out")]
        del reached[:]
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert reached and code != 0 and "Validated" in err, f"{span!r} was refused: {err.strip()[-300:]}"


def test_token_counts_take_a_k_suffix_as_context_lengths_are_spoken_of(tmp_path):
    """`--prompt-len 32k` is 32768 tokens (the README's tables say 16k/2k, `simulate --help` says 4k-128k): every
    option that counts tokens reads a k suffix as 1024s; a fraction of one is refused naming the form."""
    import argparse

    from bench.cli import run_parser
    from bench.options import int_list, integer
    assert int_list(1, tokens=True)("4k, 32K,100") == [4096, 32768, 100]
    assert integer(1, tokens=True)("2k") == 2048
    with pytest.raises(argparse.ArgumentTypeError, match=r"k = 1024.*'4\.5k'"):
        int_list(1, tokens=True)("4.5k")
    with pytest.raises(argparse.ArgumentTypeError, match="a value is listed twice"):
        int_list(1, tokens=True)("1k,1024")
    with pytest.raises(argparse.ArgumentTypeError):  # counts of something else keep plain integers
        integer(1)("4k")
    args = run_parser().parse_args(["--prompt-len", "1k,2k", "--chunk-size", "1K", "--rows", "1k,300",
                                    "--token-budget", "none,1k", "--chunks", "1k"])
    assert (args.prompt_len, args.chunk_size, args.rows, args.token_budget, args.chunks) == (
        [1024, 2048], 1024, [1024, 300], [None, 1024], [1024])
    from bench.kernels import _shape
    assert _shape("16k,2k") == (16384, 2048)
    from bench.simulate import main as simulate
    assert simulate(["--models", "llama3-8b", "--stages", "2", "--links", "nvlink", "--prompt-lens", "4k",
                     "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "simulate.json").read_text())
    assert [r["prompt_len"] for r in doc["rows"]] == [4096]
