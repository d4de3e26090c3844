"""The main job: unchunked, naive, chunked and overlapped prefill on the same prompt, with where the time goes
and proof that the outputs did not change. Writes results JSON, a timeline PNG and a Chrome/Perfetto trace."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import MODES, Job, PipelineSpec, checks, resolve_config
from pipeline.checks import DTYPES
from pipeline.compress import Codec
from pipeline.schedule import chunk_starts, mode_chunks
from pipeline.tp import link_tokens

from .pauses import measure

SCHEMA_VERSION = 1
LAST_WRITTEN: dict = {}  # the results file this process wrote last: path, points, complete
LOGITS_TOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}  # max |Δ logits| vs unchunked that passes


def environment() -> dict:
    """Device, versions and commit of this run (a copy: callers add to it)."""
    return dict(_environment())


@functools.cache  # one git call per process, not one per point written
def _environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    # a lent GPU machine gets a copy of the tree whose .git may be stale: the caller says which commit it is
    commit = os.environ.get("GIT_COMMIT") or commit
    import triton
    cuda = torch.cuda.is_available()
    return dict(
        device=torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                          f"{os.cpu_count()} cores)",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        cuda=torch.version.cuda if cuda else None, git_commit=commit,
    )


def bytes_per_token(spec: PipelineSpec, batch: int) -> int:
    """What one token's hidden state weighs on a stage boundary: B·H·itemsize."""
    itemsize = torch.tensor([], dtype=getattr(torch, spec.dtype)).element_size()
    return batch * resolve_config(spec.source).hidden_size * itemsize


def calibration_jobs(tokens: torch.Tensor, repeats: int, warmup: int, tp_overlap: bool = False) -> list[Job]:
    """Runs that a cost fit needs, on `tokens` [B, L]: an overlapped run whose chunk sizes cycle through L/128..L/4
    tokens (every size at many prefix lengths) and a naive run (the whole prompt as one chunk). With tensor
    parallelism they use serial all-reduces, so that each chunk's time splits into compute and all-reduce;
    `tp_overlap` adds the first run again with the overlapped reduce (`tp_comm` "overlap"), from which
    `fit_calibration` fits what splitting chunks in halves costs (`pipeline.costs.fit_tp_overlap`)."""
    from pipeline.costs import calibration_chunks
    L = tokens.shape[1]
    jobs = [Job("overlapped", tokens, calibration_chunks(L), repeats=repeats, warmup=warmup, decode=False,
                tp_comm="serial"),
            Job("naive", tokens, [L], repeats=repeats, warmup=warmup, decode=False, tp_comm="serial")]
    if tp_overlap:
        jobs.append(dataclasses.replace(jobs[0], tp_comm="overlap"))
    return jobs


def split_tp_link(fitted, emulated):
    """(wire, busy) of a fitted per-all-reduce cost on CPU: the emulated interconnect (sleeps: the CPU is free) is
    the wire, what the fit finds beyond it is the ranks' own CPU work (gloo copies and sums on the cores that
    compute), each term at least 0. Without emulation the whole all-reduce is CPU work."""
    from pipeline.link import LinkModel
    if not emulated.active:
        return LinkModel(), fitted
    latency = max(0.0, fitted.latency_s - emulated.latency_s)
    inv = lambda m: 1.0 / m.bandwidth_gbps if m.bandwidth_gbps else 0.0  # noqa: E731 - seconds per GB
    extra = inv(fitted) - inv(emulated)
    return emulated, LinkModel(1.0 / extra if extra > 0 else None, latency)


def fit_calibration(spec: PipelineSpec, batch: int, jobs: list[Job], runs: list[list]):
    """Fits each stage's chunk cost a·x² + b·x·p + c·x + d and the link's latency + bytes/bandwidth from the timed
    runs of `calibration_jobs` (warm-up runs are not among them). With tp > 1 the chunk cost is the compute alone
    (each chunk's time less its all-reduces') and the TP interconnect is fitted too (latency + ring bytes /
    bandwidth per all-reduce); each stage's cost is then a `pipeline.costs.TPCost` (serial all-reduces; the
    simulator swaps in the overlapped schedule for rows that ran it); a calibration run with the overlapped reduce
    (`calibration_jobs(tp_overlap=True)`) fits that schedule's own costs (`split_s`, `posted_busy`). Returns
    (costs, link, description)."""
    from pipeline.costs import TPCost, attention_share, fit_from_runs, fit_tp_from_runs, fit_tp_overlap
    from pipeline.link import LinkModel
    overlapped = [r for job, job_runs in zip(jobs, runs) if job.tp_comm == "overlap" for r in job_runs]
    flat = [r for job, job_runs in zip(jobs, runs) if job.tp_comm != "overlap" for r in job_runs]
    bpt = bytes_per_token(spec, batch)
    costs, link = fit_from_runs(flat, bpt)
    info = dict(prompt_len=jobs[0].tokens.shape[1], repeats=jobs[0].repeats, warmup=jobs[0].warmup,
                chunks=jobs[0].chunks, stage_costs=[dataclasses.asdict(c) for c in costs],
                stage_cost_form="a*x^2 + b*x*p + c*x + d seconds",
                link=dict(bandwidth_gbps=link.bandwidth_gbps, latency_s=link.latency_s))
    if spec.tp > 1:
        compute, tp_link = fit_tp_from_runs(flat, spec.tp)
        cfg = resolve_config(spec.source)
        layers = [len(r) for r in spec.layer_ranges(cfg)]
        wire, busy = split_tp_link(tp_link, LinkModel(spec.tp_bandwidth_gbps, spec.tp_latency_s))
        costs = [TPCost(c, n, spec.tp, wire, bpt, "serial", attention_share(cfg), busy)
                 for c, n in zip(compute, layers)]
        info.update(stage_costs=[dataclasses.asdict(c) for c in compute],
                    stage_cost_form="one TP rank's compute alone: a*x^2 + b*x*p + c*x + d seconds, plus 2 all-reduces "
                                    "per layer (pipeline.costs.TPCost)",
                    tp_link=dict(bandwidth_gbps=tp_link.bandwidth_gbps, latency_s=tp_link.latency_s,
                                 form="per all-reduce: latency_s + 2(T-1)/T payload bytes / bandwidth"),
                    tp_wire=dataclasses.asdict(wire), tp_busy=dataclasses.asdict(busy),
                    tp_split="the emulated interconnect is the wire; the rest of the fitted all-reduce (gloo's own "
                             "copies, sums and wake-ups) occupies the rank's CPU, the compute lane")
        if overlapped:
            form = ("the overlapped reduce's schedule (pipeline.costs.TPCost): split_s seconds added to its two halves' "
                    "compute per chunk; posted_busy, the share of an asynchronous all-reduce's busy time the compute "
                    "lane still pays")
            try:
                split, share = fit_tp_overlap(overlapped, costs)
                why = None
            except ValueError as e:  # a prompt too short for it: the schedule at its defaults, and why
                split, share, why = 0.0, 1.0, str(e)
            costs = [dataclasses.replace(c, split_s=split, posted_busy=share) for c in costs]
            info.update(tp_overlap=dict(split_s=split, posted_busy=share, fitted=why is None, form=form,
                                        **({"not_fitted": why} if why else {})))
    return costs, link, info


def calibrate(spec: PipelineSpec, prompt_len: int, batch: int, repeats: int = 3, warmup: int = 1, seed: int = 1,
              progress=None):
    """`calibration_jobs` on their own, fitted (`fit_calibration`): costs for the planner, before any measured run.
    With tensor parallelism the costs are the spec's `tp_comm` schedule (the overlapped one fitted on a calibration
    run of its own; a sequence-parallel last stage closing on its last token alone), so the planner balances the
    all-reduces the run will make. None off rank 0 under torchrun (that rank ran its stage; rank 0 fits)."""
    from pipeline.costs import check_calibration_length
    check_calibration_length(prompt_len, "calibrate")
    cfg = resolve_config(spec.source)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    jobs = calibration_jobs(tokens, repeats, warmup, tp_overlap=spec.tp > 1 and spec.tp_comm == "overlap")
    runs = measure(spec, jobs, progress)
    if runs is None:
        return None
    costs, link, info = fit_calibration(spec, batch, jobs, runs)
    if spec.tp > 1:
        last = len(costs) - 1
        costs = [dataclasses.replace(c, comm=spec.tp_comm, closing="token" if s == last else "chunk")
                 for s, c in enumerate(costs)]
        info.update(tp_comm=spec.tp_comm)
    return costs, link, info


def simulate_modes(point: dict, costs, link, bpt: int, steps: dict | None = None, cfg=None) -> dict:
    """The simulator's makespan for each measured mode of `point` (same chunks), next to the measured TTFT; adds
    sim_ttft_ms and sim_over_measured to each mode and returns the simulated timelines. The costs are fitted on
    the median time of each point over repeats, so the comparison is with the median measured TTFT (ttft_ms): both
    estimate the typical run. Each measured run is also replayed: simulated on its own measured compute
    times (replay_over_measured, the median over runs; replay_over_measured_runs), which tests the event model
    (dependencies, blocking sends, rendezvous, the fitted link) apart from the cost model and the machine's noise.
    And the cost model chunk by chunk: chunk_fit_over_measured (median over every chunk of every stage and run of
    fitted / measured) and outlier_compute_fraction (the share of measured compute time spent in chunks that took
    more than twice their fitted cost: disturbances of the machine that the least-time fit leaves out).
    `steps` (a ragged batch: each mode's `RaggedStep`s) costs each step row by row from the dense fit
    (`pipeline.costs.RaggedStepCost`; with TP, one rank's compute, the all-reduces of the step's packed tokens, and
    the overlapped schedule's token halves split as the model splits them; `cfg` gives the attention's share)."""
    from pipeline.costs import RaggedStepCost, TPCost, attention_share, boundary_lane_bytes
    from pipeline.simulate import replay, simulate
    timelines = {}
    tp = isinstance(costs[0], TPCost)
    for mode, m in point["modes"].items():
        bpt = m["wire_bytes_per_token"]  # what one token weighs on this row's boundaries (compressed or not)
        row_costs = costs
        if steps is not None and tp:  # one rank's compute step by step; the all-reduces as for a dense chunk
            row_costs = [dataclasses.replace(c, compute=(r := RaggedStepCost(c.compute, steps[mode])),
                                             attn_share=attention_share(cfg, r)) for c in costs]
        elif steps is not None:
            row_costs = [RaggedStepCost(c, steps[mode]) for c in costs]
        if tp:  # the row's own all-reduce schedule (the baseline has no TP)
            comm, crossing = m.get("tp_comm"), m.get("tp_boundary", "matching")
            # a boundary received once (broadcast) or in 1/T slices (all-gathered) goes through the receiving stage's TP
            # group before its chunk computes; sharded sends carry 1/T of the bytes per link. Sequence parallel
            # stages with sharded boundaries send the slices they hold and keep the ones they receive: neither the
            # closing all-gather nor the boundary's
            kept = comm == "sequence" and crossing == "sharded"
            lane = 0 if kept else boundary_lane_bytes(crossing, costs[0].tp, bpt)
            last = len(costs) - 1
            row_costs = ([dataclasses.replace(c, comm=comm, boundary_bytes_per_token=lane if s else 0,
                                              boundary_sliced=crossing == "sharded",
                                              closing="token" if s == last else "none" if kept else "chunk")
                          for s, c in enumerate(row_costs)] if comm in ("serial", "overlap", "sequence") else None)
            if crossing == "sharded":
                bpt = -(-bpt // costs[0].tp)  # per link: each rank its 1/T of the tokens
        if row_costs is None:
            for key in ("sim_ttft_ms", "sim_over_measured", "sim_exposed_comm_ms", "sim_bubble_fraction",
                        "chunk_fit_over_measured", "outlier_compute_fraction"):
                m[key] = math.nan
        else:
            sim = simulate(m.get("mode", mode), m["chunks"], row_costs, link, bpt)
            m["sim_ttft_ms"] = sim.makespan_s * 1e3
            m["sim_over_measured"] = m["sim_ttft_ms"] / m["ttft_ms"]
            m["sim_exposed_comm_ms"] = sim.metrics["exposed_comm_s"] * 1e3
            m["sim_bubble_fraction"] = sim.metrics["bubble_fraction"]
            fit, took = chunk_costs_vs_measured(m.get("mode", mode), point["records"][mode], row_costs)
            if steps is not None:  # when each row's step left the last stage, simulated
                m["sim_row_ttft_ms"] = [sim.records[-1].compute[k][1] * 1e3 for k in m["row_end_step"]]
            m["chunk_fit_over_measured"] = float(np.median(fit / took))
            m["outlier_compute_fraction"] = float(took[took > 2 * fit].sum() / took.sum())
            timelines[mode] = sim.events
        # the event model alone: each measured run replayed on its own compute times
        ratios = [replay(m.get("mode", mode), records, link, bpt).makespan_s * 1e3 / ttft
                  for records, ttft in zip(point["records"][mode], m["ttft_runs_ms"])]
        m["replay_over_measured_runs"] = ratios
        m["replay_over_measured"] = statistics.median(ratios)
    return timelines


def chunk_costs_vs_measured(mode: str, runs_records, costs):
    """(fitted, measured) seconds of every chunk on every stage in the given runs: the cost model against what the
    stages actually took, chunk by chunk (unchunked: the whole model's cost, the stages' costs summed; a boundary's
    collective over the TP group, a broadcast or an all-gather, counts with its chunk, as the cost model has it)."""
    fit, took = [], []
    for records in runs_records:
        for r in records:
            cost = (lambda x, p: sum(float(c(x, p)) for c in costs)) if mode == "unchunked" else costs[r.stage]
            starts = chunk_starts(r.chunks)
            boundary = r.boundary or [0.0] * len(r.chunks)
            for x, p, (a, b), t in zip(r.chunks, starts, r.compute, boundary):
                fit.append(float(cost(x, p)))
                took.append(b - a + t)
    return np.array(fit), np.array(took)


def run_point(spec: PipelineSpec, prompt_len: int, batch: int, chunks: list[int], repeats: int, warmup: int,
              modes=MODES, seed: int = 0, simulate: bool = False, progress=None, tp_comms=None,
              compress=None, tp_boundaries=None, rows: list[int] | None = None,
              chunk_size: int | None = None, token_budgets=None) -> dict | None:
    """All modes on one prompt; returns the figures per mode (medians over repeats) and the raw timelines. The
    outputs are always checked against the unchunked baseline: when `unchunked` is not among `modes` it runs once,
    untimed, as the reference. With `simulate`, `calibration_jobs` run in the same round-robin as the modes (so a
    drift of the machine's speed touches the fit and the measurements alike), and each mode gets the simulator's
    figures (`simulate_modes`). With tensor parallelism, `tp_comms` (default: the spec's) lists the ways the TP ranks
    combine their partial sums (`pipeline.tp.TP_COMMS`) and `compress` (default none) the boundary compressions
    (`pipeline.compress`), and `tp_boundaries` (default matching) how boundaries cross TP stages, to run side by
    side, in the same round-robin: the first of each keeps the mode's name, the others are keyed "mode/<value>..."
    (the unchunked baseline, no TP and no boundary, runs once). A lossy row's logits are compared with the
    unchunked baseline and with the same mode uncompressed in this run; its outputs_match only asks for finite
    logits.
    With `rows` (prompt lengths; prompt_len, batch and chunks are then ignored) the point is one ragged batch, as a
    serving stack runs it (`pipeline.ragged`): a random prompt per row, each row in chunks of `chunk_size` tokens
    (unchunked and naive: whole), the rows' chunks packed into one step, or under a token budget steps of that many
    tokens filled from the rows in order (no per-row cap), the KV cache in pages. `token_budgets` (default [None]:
    per-row chunks) lists the plans to run side by side, one more axis: the chunked and overlapped modes under each
    (keyed "mode/budget<N>", or "mode/chunks" for None where it is not the first), naive and unchunked once. Every
    mode's logits are checked row by row against the unchunked ragged baseline and against each row run alone (an
    unchunked [1, L] run per row, untimed); each row's TTFT is when the last stage finishes the step its prompt
    ends in.
    None off rank 0 under torchrun."""
    cfg = resolve_config(spec.source)
    modes = list(modes)
    ragged = rows is not None
    if ragged:
        if chunk_size is not None:
            checks.positive_int("chunk_size", chunk_size)
        for b in token_budgets or [None]:
            if b is not None:
                checks.positive_int("token_budget", b)
        rows = checks.int_list("rows", rows)
        prompt_len, batch = max(rows), len(rows)
    elif token_budgets not in (None, [None]):
        raise ValueError(f"token_budgets={token_budgets!r} plan the steps of a ragged batch: they need rows")
    if simulate:
        from pipeline.costs import check_calibration_length
        check_calibration_length(prompt_len, "simulate", "a longest row" if ragged else "a prompt")
    axes = dict(tp_comm=list(tp_comms or [spec.tp_comm]), compress=list(compress or ["none"]),
                tp_boundary=list(tp_boundaries or ["matching"]), token_budget=list(token_budgets or [None]))
    if len(set(axes["token_budget"])) != len(axes["token_budget"]):
        raise ValueError(f"a token budget is listed twice in {token_budgets!r}")
    gen = torch.Generator().manual_seed(seed)
    tokens = ([torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in rows] if ragged
              else torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen))

    def job(mode: str, **kw) -> Job:  # a ragged job's chunks are its steps' token counts
        if not ragged:
            return Job(mode, tokens, mode_chunks(mode, chunks), **kw)
        # per-row chunks of chunk_size, or steps under a token budget (no per-row cap)
        j = Job(mode, tokens, [], chunk_size=chunk_size if kw.get("token_budget") is None else None, **kw)
        j.chunks = [st.tokens for st in j.steps()]
        return j
    # every mode under every combination of the axes; the unchunked baseline (no TP, no boundary) once
    # (naive runs every row whole: a token budget changes nothing there, it runs under the first only)
    variants = [dict(mode=m, **dict(zip(axes, combo))) for combo in itertools.product(*axes.values())
                for m in modes if m != "unchunked"
                and not (m == "naive" and combo[-1] != axes["token_budget"][0])]
    shown = lambda a, v: v if a != "token_budget" else "chunks" if v is None else f"budget{v}"  # noqa: E731
    labels = [v["mode"] + "".join(f"/{shown(a, v[a])}" for a in axes if v[a] != axes[a][0]) for v in variants]
    if "unchunked" in modes:  # no TP, no boundary: once, uncompressed, where the caller listed it
        at = modes.index("unchunked")
        variants.insert(at, dict(mode="unchunked", tp_comm=axes["tp_comm"][0], compress="none",
                                 tp_boundary="matching", token_budget=axes["token_budget"][0]))
        labels.insert(at, "unchunked")
    jobs = [job(v["mode"], repeats=repeats, warmup=warmup, tp_comm=v["tp_comm"], compress=v["compress"],
                tp_boundary=v["tp_boundary"], **({"token_budget": v["token_budget"]} if ragged else {}))
            for v in variants]
    compress = axes["compress"]
    # a ragged batch's costs are fitted on a dense prompt as long as its longest row (`RaggedStepCost`)
    cal_tokens = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen) if ragged else tokens
    cal_jobs = calibration_jobs(cal_tokens, repeats, warmup,
                                tp_overlap=spec.tp > 1 and "overlap" in axes["tp_comm"]) if simulate else []
    ref_jobs = [] if "unchunked" in modes else [job("unchunked")]
    alone_jobs = [Job("unchunked", row[None], [len(row)]) for row in tokens] if ragged else []
    all_runs = measure(spec, jobs + cal_jobs + ref_jobs + alone_jobs, progress)
    if all_runs is None:
        return None
    results = dict(zip(labels, all_runs))
    variant_of = dict(zip(labels, variants))
    job_of = dict(zip(labels, jobs))
    base = results["unchunked"] if "unchunked" in results else all_runs[len(jobs) + len(cal_jobs)]
    alone = [runs[0] for runs in all_runs[len(all_runs) - len(alone_jobs):]] if ragged else []
    # what crosses a boundary: [B, c, H] of a [B, L] prompt; [1, N, H] of a ragged step (N: its packed tokens)
    wire_batch = 1 if ragged else batch
    n_tokens = sum(rows) if ragged else prompt_len  # one boundary's tokens over the prefill
    decode_tokens = batch if ragged else 1  # a ragged decode step is one token per row, packed
    bpt = bytes_per_token(spec, wire_batch)
    wire_bpt = {z: Codec(z).bytes_per_token(wire_batch, cfg.hidden_size, DTYPES[spec.dtype])
                for z in {"none", *compress}}
    from pipeline.simulate import free_link_bound
    bounds = {label: [free_link_bound(variant_of[label]["mode"], r.records) for r in runs]
              for label, runs in results.items()}
    figures, timelines = {}, {}
    stage_layers = [len(r) for r in spec.layer_ranges(cfg)]
    for mode, runs in results.items():
        best = sorted(runs, key=lambda r: r.metrics["ttft_s"])[len(runs) // 2]  # the median run
        med = lambda key: statistics.median(r.metrics[key] for r in runs)  # noqa: E731
        m = dict(
            ttft_ms=med("ttft_s") * 1e3,
            ttft_min_ms=min(r.metrics["ttft_s"] for r in runs) * 1e3,
            ttft_runs_ms=[r.metrics["ttft_s"] * 1e3 for r in runs],
            wall_ttft_ms=med("wall_ttft_s") * 1e3 if "wall_ttft_s" in runs[0].metrics else med("ttft_s") * 1e3,
            machine_paused_fraction=statistics.median(r.metrics.get("paused_s", 0.0) / r.metrics["wall_ttft_s"]
                                                      for r in runs) if "wall_ttft_s" in runs[0].metrics else 0.0,
            exposed_comm_ms=med("exposed_comm_s") * 1e3,
            bubble_fraction=med("bubble_fraction"),
            bound_ms=statistics.median(bounds[mode]) * 1e3,
            bound_runs_ms=[b * 1e3 for b in bounds[mode]],
            measured_over_bound_runs=[r.metrics["ttft_s"] / b for r, b in zip(runs, bounds[mode])],
            ideal_ms=med("ideal_s") * 1e3,
            equal_stage_formula_ms=med("equal_stage_formula_s") * 1e3,
            compute_ms_per_stage=[x * 1e3 for x in best.metrics["compute_s"]],
            send_time_ms_per_stage=[x * 1e3 for x in best.metrics["send_time_s"]],
            per_chunk_stage_max_ms=[x * 1e3 for x in best.metrics["per_chunk_stage_max_s"]],
            prefill_bytes_per_boundary=best.metrics["bytes_per_boundary"],
            decode_bytes_per_boundary=best.metrics.get("decode_bytes_per_boundary", []),
            # per TP lane: the whole boundary, or with tp_boundary 'sharded' 1/T of each chunk's tokens (rounded up;
            # a chunk of fewer tokens than T whole)
            expected_prefill_bytes=wire_bpt[variant_of[mode]["compress"]] * (
                sum(link_tokens(c, spec.tp) for c in best.chunks) if variant_of[mode]["tp_boundary"] == "sharded"
                else n_tokens),
            wire_bytes_per_token=wire_bpt[variant_of[mode]["compress"]],
            expected_decode_bytes=wire_bpt[variant_of[mode]["compress"]] * (
                link_tokens(decode_tokens, spec.tp) if variant_of[mode]["tp_boundary"] == "sharded"
                else decode_tokens),
            chunks=best.chunks,
            mode=variant_of[mode]["mode"], compress=variant_of[mode]["compress"],
        )
        if "allreduce_bytes_per_stage" in best.metrics:  # tensor parallelism: the reduce traffic, per stage
            bm = best.metrics
            m.update(tp_comm=variant_of[mode]["tp_comm"], tp_boundary=variant_of[mode]["tp_boundary"], tp=spec.tp,
                     allreduce_bytes_per_stage=bm["allreduce_bytes_per_stage"],
                     allreduce_wire_bytes_per_stage=bm["allreduce_wire_bytes_per_stage"],
                     allreduce_calls_per_stage=bm["allreduce_calls_per_stage"],
                     allreduce_ms_per_stage=[statistics.median(r.metrics["allreduce_s_per_stage"][s] for r in runs)
                                             * 1e3 for s in range(len(stage_layers))],
                     decode_allreduce_bytes_per_stage=bm.get("decode_allreduce_bytes_per_stage", []),
                     allreduce_prefill_over_decode=bm.get("allreduce_prefill_over_decode", []),
                     # two all-reduces of [B, L, H] per layer (after attention, after the MLP)
                     expected_allreduce_bytes_per_stage=[2 * n * n_tokens * bpt for n in stage_layers])
            for kind in ("broadcast", "gather"):  # a boundary once then broadcast, or in 1/T slices all-gathered
                if f"boundary_{kind}_bytes_per_stage" in bm:
                    m[f"boundary_{kind}_bytes_per_stage"] = bm[f"boundary_{kind}_bytes_per_stage"]
                    m[f"boundary_{kind}_ms_per_stage"] = [
                        statistics.median(r.metrics[f"boundary_{kind}_s_per_stage"][s] for r in runs) * 1e3
                        for s in range(len(stage_layers))]
        ref = base[0]
        m["max_abs_dlogits"] = max((r.logits - ref.logits).abs().max().item() for r in runs)
        m["max_abs_ddecode_logits"] = max((r.decode_logits - ref.decode_logits).abs().max().item() for r in runs)
        if ragged:  # row by row: against the ragged baseline, against the row run alone, and when its logits were ready
            m.update(rows=rows, chunk_size=job_of[mode].chunk_size, token_budget=variant_of[mode]["token_budget"],
                     **ragged_figures(job_of[mode], runs, ref, alone))
        if variant_of[mode]["compress"] != "none":  # lossy sends: how far the logits moved, against the same run uncompressed
            m["rel_dlogits"] = m["max_abs_dlogits"] / ref.logits.abs().max().item()
            m["greedy_match_fraction"] = min((r.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
                                             for r in runs)
            plain = next((lab for lab, v in variant_of.items()
                          if v == dict(variant_of[mode], compress="none")), None)
            if plain is not None:
                m["max_abs_dlogits_vs_uncompressed"] = max((r.logits - results[plain][0].logits).abs().max().item()
                                                           for r in runs)
        m["measured_over_bound"] = m["ttft_ms"] / m["bound_ms"]  # the quotient of the two medians printed
        figures[mode] = m
        timelines[mode] = best.timeline
    for mode, m in figures.items():
        if "unchunked" in figures:
            m["speedup_vs_unchunked"] = figures["unchunked"]["ttft_ms"] / m["ttft_ms"]
        if "naive" in figures:
            m["speedup_vs_naive"] = figures["naive"]["ttft_ms"] / m["ttft_ms"]
        m["bytes_exact"] = (all(b == m["expected_prefill_bytes"] for b in m["prefill_bytes_per_boundary"])
                            and all(b == m["expected_decode_bytes"] for b in m["decode_bytes_per_boundary"])
                            and m.get("allreduce_bytes_per_stage") == m.get("expected_allreduce_bytes_per_stage"))
        # NaN logits (a broken kernel) must fail the check: NaN <= tol is False, and so is this
        tol = LOGITS_TOL[spec.dtype] if m["compress"] == "none" else math.inf  # lossy: reported, not judged
        m["outputs_match"] = bool(m["max_abs_dlogits"] <= tol and m["max_abs_ddecode_logits"] <= tol
                                  and m.get("max_abs_dlogits_vs_alone", 0.0) <= tol
                                  and m.get("max_abs_ddecode_logits_vs_alone", 0.0) <= tol)
    partitions = next((r.metrics["sm_partitions"] for runs in all_runs for r in runs if "sm_partitions" in r.metrics),
                      None)
    point = dict(prompt_len=prompt_len, batch=batch, **({"rows": rows} if ragged else {}), modes=figures,
                 timelines=timelines,
                 **({"sm_partitions": partitions} if partitions else {}),
                 baseline="unchunked" if "unchunked" in modes else "unchunked reference run (not among the modes)",
                 records={mode: [r.records for r in runs] for mode, runs in results.items()})
    if simulate:
        costs, link, point["calibration"] = fit_calibration(spec, wire_batch, cal_jobs,
                                                            all_runs[len(jobs):len(jobs) + len(cal_jobs)])
        point["sim_timelines"] = simulate_modes(point, costs, link, bpt,
                                                {label: j.steps() for label, j in job_of.items()} if ragged else None,
                                                cfg)
    return point


def ragged_figures(job: Job, runs, ref, alone) -> dict:
    """A ragged mode's figures row by row: its logits against the ragged baseline `ref` and against each row run
    alone (`alone[b]`, an unchunked [1, L_b] run), the greedy decode step's too, and each row's TTFT: when the last
    stage finished the step the row's prompt ends in (median over runs, pauses cut like the TTFT's)."""
    B = len(alone)
    ends = {b: k for k, st in enumerate(job.steps()) for b in st.ends}
    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    vs_alone = [max(diff(r.logits[b], alone[b].logits[0]) for r in runs) for b in range(B)]
    return dict(
        max_abs_dlogits_per_row=[max(diff(r.logits[b], ref.logits[b]) for r in runs) for b in range(B)],
        max_abs_dlogits_vs_alone_per_row=vs_alone, max_abs_dlogits_vs_alone=max(vs_alone),
        max_abs_ddecode_logits_vs_alone=max(diff(r.decode_logits[b], alone[b].decode_logits[0])
                                            for r in runs for b in range(B)),
        row_ttft_ms=[statistics.median(r.records[-1].compute[ends[b]][1] - r.t_start for r in runs) * 1e3
                     for b in range(B)],
        row_end_step=[ends[b] for b in range(B)])


class Progress:
    """Progress on stderr: on a terminal a bar per batch of runs; otherwise one line per phase (start, warm-up,
    timed runs, done) so that a log shows where the time went. `enabled` False (torchrun ranks other than 0):
    silent."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def phase(self, text: str) -> None:
        if self.enabled:
            print(f"bench: {text}", file=self.stream, flush=True)

    def runs(self, label: str):
        """A callback for run_jobs: (done, total, what) before each run and once at the end."""
        if not self.enabled:
            return None
        state = dict(kind=None, bar=None, t0=time.time())

        def update(done: int, total: int, what: str):
            kind = what.split()[-1]  # warm-up | timed | done
            if self.tty:
                from tqdm import tqdm
                if state["bar"] is None:
                    state["bar"] = tqdm(total=total, desc=label, unit="run", file=self.stream, leave=False)
                state["bar"].n = done
                state["bar"].set_postfix_str(what, refresh=True)
                if done == total:
                    state["bar"].close()
            if kind != state["kind"]:
                state["kind"] = kind
                text = {"warm-up": f"warm-up runs ({done} of {total} runs done)",
                        "timed": f"timed runs, round-robin over the jobs ({done} of {total} runs done)",
                        "done": f"{total} runs done"}.get(kind, what)
                if not self.tty or kind == "done":
                    print(f"bench: {label}: {text} after {time.time() - state['t0']:.1f} s", file=self.stream,
                          flush=True)
        return update


UNITS = {"ttft_ms": "ms of running machine (host pauses cut out, see bench/pauses.py)",
         "wall_ttft_ms": "ms of wall clock, pauses included", "ttft_min_ms": "ms, least over repeats",
         "machine_paused_fraction": "fraction of wall_ttft_ms", "exposed_comm_ms": "ms",
         "bound_ms": "ms, median over runs of the least time the run's schedule can take: the run replayed on its "
                     "own compute times with a free link (pipeline.simulate.free_link_bound)",
         "bound_runs_ms": "ms per run", "measured_over_bound": "ratio, median TTFT / median bound (ttft_ms / bound_ms)",
         "measured_over_bound_runs": "ratio per run (its TTFT / its bound)",
         "ideal_ms": "ms, median over runs of the run's compute time summed over stages / S (no bubble at all)",
         "equal_stage_formula_ms": "ms, median of sum_k max_s t + (S-1) max_k max_s t: the makespan if every stage "
                                   "took the slowest stage's time on each chunk (an estimate, not a bound)",
         "bubble_fraction": "fraction of S·TTFT", "speedup_vs_unchunked": "ratio", "speedup_vs_naive": "ratio",
         "prefill_bytes_per_boundary": "bytes (per TP lane: with tp T, each of the T rank pairs sends this; 1/T of "
                                       "the boundary with tp_boundary sharded)",
         "decode_bytes_per_boundary": "bytes per token",
         "allreduce_bytes_per_stage": "bytes, all-reduce payload of the prefill per TP rank (2 per layer, [B, L, H])",
         "allreduce_wire_bytes_per_stage": "bytes a ring moves per rank: 2(T-1)/T of the payload for an all-reduce or "
                                           "a reduce-scatter + all-gather pair (sequence: padding to T rows and the "
                                           "stage's closing all-gather come on top; with tp_boundary sharded a "
                                           "stage that sends hands on its slice instead of that all-gather)",
         "allreduce_ms_per_stage": "ms, median over runs of the time TP rank 0 was blocked in its collectives (serial: "
                                   "all of the all-reduces' time; overlap: only what the other half's compute did "
                                   "not hide)",
         "tp_comm": "how the TP ranks combine partial sums: serial all-reduces, overlap (two token halves, each "
                    "half's all-reduce behind the other's compute) or sequence (reduce-scatter + all-gather)",
         "tp_boundary": "with TP, how a boundary crosses: matching (each TP rank sends to its peer: T sends), "
                        "broadcast (TP rank 0 to TP rank 0 once, then a broadcast over the receiving stage's TP group) "
                        "or sharded (each TP rank sends 1/T of the tokens to its peer, then an all-gather)",
         "boundary_broadcast_bytes_per_stage": "bytes, tp_boundary broadcast: what each stage broadcast to its TP "
                                               "ranks (the prefill's boundary, once)",
         "boundary_broadcast_ms_per_stage": "ms, median over runs of TP rank 0's time in those broadcasts",
         "boundary_gather_bytes_per_stage": "bytes, tp_boundary sharded: what each stage's all-gathers of the slices "
                                            "assembled on a TP rank (the prefill's boundary, padded to T slices; "
                                            "under sequence parallelism only chunks of fewer tokens than T ranks: "
                                            "the others stay the slices the ranks compute on)",
         "boundary_gather_ms_per_stage": "ms, median over runs of TP rank 0's time in those all-gathers",
         "mode": "the schedule of this row (a row keyed mode/tp_comm runs that mode with that tp_comm)",
         "decode_allreduce_bytes_per_stage": "bytes, all-reduce payload of one decode token per TP rank",
         "allreduce_prefill_over_decode": "ratio, prefill all-reduce bytes / one decode step's (= L; a ragged batch: "
                                          "its tokens / its rows)",
         "max_abs_dlogits": "absolute logit difference vs unchunked",
         "compress": "what crossed the stage boundaries: none, bf16 or fp8 (e4m3 + a float32 scale per token)",
         "rel_dlogits": "lossy rows: max_abs_dlogits / max |logit| of the unchunked baseline",
         "greedy_match_fraction": "lossy rows: fraction of the batch whose greedy next token is the baseline's "
                                  "(least over runs)",
         "max_abs_dlogits_vs_uncompressed": "lossy rows: absolute logit difference vs the same mode uncompressed in "
                                            "this run", "compute_ms_per_stage": "ms",
         "send_time_ms_per_stage": "ms", "per_chunk_stage_max_ms": "ms", "sim_ttft_ms": "ms (simulated)",
         "sim_over_measured": "ratio, simulated / median measured TTFT", "sim_exposed_comm_ms": "ms (simulated)",
         "replay_over_measured": "ratio, median over runs of (simulated on the run's own compute times / measured)",
         "replay_over_measured_runs": "ratio per run",
         "chunk_fit_over_measured": "ratio, median over chunks (every stage and run) of fitted cost / measured time",
         "outlier_compute_fraction": "fraction of measured compute time in chunks slower than 2x their fitted cost",
         "rows": "a ragged batch (--rows): each row's prompt length; prompt_len is then the longest, batch the rows, "
                 "chunks the packed tokens of each step, and the bytes per boundary the steps' tokens summed",
         "chunk_size": "a ragged batch: each row's tokens per step (null: unchunked and naive, every row whole, and "
                       "a token budget's steps, which cap no row)",
         "token_budget": "a ragged batch: the most packed tokens a step takes, filled from the rows in order (null: "
                         "each step holds every running row's next chunk)",
         "row_ttft_ms": "ms per row, median over runs: when the last stage finished the step the row's prompt ends in "
                        "(its logits ready), from the run's start, pauses cut out",
         "row_end_step": "per row, the step (0-based) its prompt ends in",
         "sim_row_ttft_ms": "ms per row (simulated): when the last stage finished the row's step",
         "wire_bytes_per_token": "bytes one token weighs on this row's boundaries (compressed or not; per TP lane)",
         "max_abs_dlogits_per_row": "per row, absolute logit difference vs the ragged unchunked baseline",
         "max_abs_dlogits_vs_alone": "absolute logit difference vs each row run alone (an unchunked [1, L] run), "
                                     "the largest over rows and runs",
         "max_abs_dlogits_vs_alone_per_row": "per row, absolute logit difference vs the row run alone",
         "max_abs_ddecode_logits_vs_alone": "the greedy decode step's logits vs each row's alone"}


def _x(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def table(point: dict) -> str:
    """A short table for a person."""
    rows = [("mode", "TTFT ms", "vs unch", "vs naive", "exp.comm ms", "bubble", "bound ms", "meas/bnd", "ideal ms",
             "eq.stage ms", "prefill B/bnd", "decode B/bnd", "ratio", "max|Δlogit|")]
    sim = all("sim_ttft_ms" in m for m in point["modes"].values())
    if sim:
        rows[0] += ("sim ms", "sim/meas", "replay/meas")
    for mode, m in point["modes"].items():
        pb = m["prefill_bytes_per_boundary"][0] if m["prefill_bytes_per_boundary"] else 0
        db = m["decode_bytes_per_boundary"][0] if m["decode_bytes_per_boundary"] else 0
        rows.append((mode, f"{m['ttft_ms']:.1f}", _x(m.get("speedup_vs_unchunked")), _x(m.get("speedup_vs_naive")),
                     f"{m['exposed_comm_ms']:.1f}",
                     f"{100 * m['bubble_fraction']:.0f}%", f"{m['bound_ms']:.1f}", f"{m['measured_over_bound']:.2f}",
                     f"{m['ideal_ms']:.1f}", f"{m['equal_stage_formula_ms']:.1f}",
                     f"{pb:,}" if pb else "-", f"{db:,}" if db else "-", f"{pb / db:.0f}" if db else "-",
                     f"{m.get('max_abs_dlogits', 0.0):.1e}")
                    + ((f"{m['sim_ttft_ms']:.1f}", f"{m['sim_over_measured']:.2f}",
                        f"{m['replay_over_measured']:.2f}") if sim else ()))
    tp = [(mode, m) for mode, m in point["modes"].items() if "allreduce_bytes_per_stage" in m]
    if tp:  # the reduce traffic next to the boundary's: stage 0's figures
        rows[0] += ("AR B/stage", "AR wire B", "AR ms", "AR ratio")
        for row_i, (mode, m) in enumerate(point["modes"].items(), start=1):
            if "allreduce_bytes_per_stage" in m:
                ratio = (m["allreduce_prefill_over_decode"] or [None])[0]
                rows[row_i] += (f"{m['allreduce_bytes_per_stage'][0]:,}", f"{m['allreduce_wire_bytes_per_stage'][0]:,}",
                                f"{m['allreduce_ms_per_stage'][0]:.1f}", f"{ratio:.0f}" if ratio else "-")
            else:
                rows[row_i] += ("-",) * 4
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    text += ("\n(bound: each run replayed on its own compute times with a free link, the least time its schedule "
             "can take; meas/bnd = TTFT ms / bound ms; ideal: compute summed over stages / S; eq.stage: "
             "Σ_k max_s t + (S−1)·max t, exact only when every stage takes the same time on a chunk)")
    if sim:
        out = {mode: m["outlier_compute_fraction"] for mode, m in point["modes"].items()}
        fit = {mode: m["chunk_fit_over_measured"] for mode, m in point["modes"].items()}
        text += ("\n(sim: the simulator on the cost model fitted on calibration runs interleaved with these, against the "
                 "median TTFT; replay/meas: "
                 "on each run's own measured compute times, the event model alone. Chunk by chunk the fitted cost "
                 "is " + ", ".join(f"{fit[k]:.2f}" for k in fit) + " of the measured time (median); chunks that took "
                 "over twice their fitted cost hold " + ", ".join(f"{100 * out[k]:.0f}%" for k in out)
                 + " of the compute time)")
        overlap = point.get("calibration", {}).get("tp_overlap")
        if overlap and overlap["fitted"]:
            text += (f"\n(the overlapped reduce's schedule, fitted on its own calibration run: splitting a chunk in "
                     f"halves adds {overlap['split_s'] * 1e3:.1f} ms to their compute; an all-reduce posted "
                     f"asynchronously costs the compute lane {overlap['posted_busy']:.2f} of its CPU work)")
    if "rows" in point:
        text += "\n\n" + row_table(point)
    paused = max(m.get("machine_paused_fraction", 0.0) for m in point["modes"].values())
    if paused > 0.01:
        text += (f"\n(the machine was paused by its host for up to {100 * paused:.0f}% of a run's wall time; "
                 f"times above leave those pauses out, wall_ttft_ms in the results keeps them)")
    return text


def row_table(point: dict) -> str:
    """A ragged batch row by row, a line per mode: when each row's logits were ready (its TTFT; in a mode of
    several steps, the step it ends in), the simulator's where it ran, and how far any uncompressed mode's logits of
    the row are from the row run alone."""
    modes = point["modes"]
    rows = [("row TTFT ms",) + tuple(f"row {b}: {n} tok" for b, n in enumerate(point["rows"]))]

    def cell(m, b, t):
        return f"{t:.1f}" + (f" ({m['row_end_step'][b] + 1}/{len(m['chunks'])})" if len(m["chunks"]) > 1 else "")
    rows += [(mode,) + tuple(cell(m, b, t) for b, t in enumerate(m["row_ttft_ms"])) for mode, m in modes.items()]
    rows += [(f"{mode} sim",) + tuple(f"{t:.1f}" for t in m["sim_row_ttft_ms"]) for mode, m in modes.items()
             if "sim_row_ttft_ms" in m]
    exact = [m for m in modes.values() if m.get("compress", "none") == "none"]  # lossy rows are not judged here
    if exact:
        rows.append(("max|Δlogit| alone",) + tuple(f"{max(m['max_abs_dlogits_vs_alone_per_row'][b] for m in exact):.1e}"
                                                   for b in range(len(point["rows"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    return (text + "\n(a row's TTFT: when the last stage finished the step its prompt ends in, (k/n): the k-th of the "
            "mode's n steps; sim: the same from the simulator, each step costed row by row from the dense fit; "
            "max|Δlogit| alone: the largest logit difference of any uncompressed mode against the row run alone, an "
            "unchunked [1, L] run)")


def strict_json(obj, path: str = "$", nulls: dict | None = None):
    """`obj` with every NaN or ±inf replaced by None (strict JSON has neither); `nulls` collects where and why."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if nulls is not None:
            nulls[path] = f"was {obj} (not a number JSON can hold: undefined for this run)"
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v, f"{path}.{k}", nulls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, f"{path}[{i}]", nulls) for i, v in enumerate(obj)]
    if isinstance(obj, (np.floating, np.integer)):
        return strict_json(obj.item(), path, nulls)
    return obj


def dump_json(doc) -> str:
    """Strict JSON text (no NaN/Infinity): non-finite figures become null, listed under "nulls" with a reason."""
    nulls: dict = {}
    clean = strict_json(doc, "$", nulls)
    if nulls and isinstance(clean, dict):
        clean["nulls"] = nulls
    return json.dumps(clean, indent=1, allow_nan=False)


def write_json(path: Path, doc) -> Path:
    """Atomically: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_json(doc))
    tmp.replace(path)
    return path


def results_doc(config: dict, points: list[dict], plan_calibration, wall_s: float, complete: bool) -> dict:
    return dict(schema_version=SCHEMA_VERSION, complete=complete, environment=environment(), config=config,
                units=UNITS, wall_s=wall_s, plan_calibration=plan_calibration,
                points=[{k: v for k, v in p.items() if not k.endswith("timelines") and k != "records"}
                        for p in points])


def write_results(out: Path, doc: dict) -> Path:
    """results.json, atomically; written after every point of a sweep (complete: false until the last)."""
    path = write_json(out / "results.json", doc)
    LAST_WRITTEN.update(path=path, points=len(doc["points"]), complete=doc["complete"])
    return path


def row_end_steps(point: dict) -> dict[str, list[int]] | None:
    """A ragged point's step each row ends in, per mode (for the timelines' row marks); None for one prompt."""
    if "rows" not in point:
        return None
    return {mode: m["row_end_step"] for mode, m in point["modes"].items() if "row_end_step" in m}


def write_pictures(out: Path, points: list[dict], config: dict, simulate: bool) -> str:
    """timeline.png and trace.json of the last point (and measured-vs-simulated, sweep plots); returns the title."""
    from .timeline import write_chrome_trace, write_sweep_png, write_timeline_png
    last = points[-1]
    env = environment()
    shape = (f"rows={','.join(map(str, last['rows']))}" if "rows" in last
             else f"L={last['prompt_len']}, B={config['batch']}")
    title = (f"{config['model']}, S={config['stages']}, {shape}, "
             f"{config['link']}, {config['dtype']}, {env['device']}")
    ends = row_end_steps(last)
    write_timeline_png(last["timelines"], out / "timeline.png", title, ends)
    write_chrome_trace(last["timelines"], out / "trace.json", ends)
    if simulate:  # measured and simulated, mode by mode, on one time axis
        pairs = [(mode, kind, p[mode]) for mode in last["timelines"]
                 for kind, p in (("measured", last["timelines"]), ("simulated", last["sim_timelines"])) if mode in p]
        write_timeline_png({f"{mode} {kind}": ev for mode, kind, ev in pairs},
                           out / "timeline_vs_sim.png", title + " — measured vs simulated",
                           ends and {f"{mode} {kind}": ends[mode] for mode, kind, _ in pairs if mode in ends})
    if len(points) > 1:
        write_sweep_png(points, out / "sweep.png", title)
    return title


def report(points: list[dict], path: Path, title: str, simulate: bool) -> dict:
    """Prints each point's table (stdout) and returns the one-line summary."""
    for p in points:
        shape = ("rows=" + ",".join(map(str, p["rows"]))) if "rows" in p else f"L={p['prompt_len']} B={p['batch']}"
        print(f"\n{shape}  ({title})")
        print(table(p))
    last = points[-1]
    out = path.parent
    summary = dict(results=str(path), device=environment()["device"],
                   ttft_ms={m: round(v["ttft_ms"], 2) for m, v in last["modes"].items()},
                   outputs_match=all(v["outputs_match"] for p in points for v in p["modes"].values()),
                   bytes_exact=all(v["bytes_exact"] for p in points for v in p["modes"].values()))
    lossy = {m: v["max_abs_dlogits"] for m, v in last["modes"].items() if v.get("compress", "none") != "none"}
    if lossy:  # not judged by outputs_match: how far compression moved the logits
        summary["lossy_max_abs_dlogits"] = lossy
    if "naive" in last["modes"] and "overlapped" in last["modes"]:
        summary["overlapped_vs_naive"] = round(last["modes"]["overlapped"]["speedup_vs_naive"], 3)
        summary["overlapped_measured_over_bound"] = round(last["modes"]["overlapped"]["measured_over_bound"], 3)
    if "rows" in last:  # a ragged batch: when each row's logits were ready
        summary["row_ttft_ms"] = {m: [round(t, 2) for t in v["row_ttft_ms"]] for m, v in last["modes"].items()}
    if simulate:
        summary["sim_over_measured"] = {m: round(v["sim_over_measured"], 3) for m, v in last["modes"].items()}
        summary["replay_over_measured"] = {m: round(v["replay_over_measured"], 3) for m, v in last["modes"].items()}
    print(f"\nresults: {path}  timeline: {out / 'timeline.png'}  trace: {out / 'trace.json'}")
    return strict_json(summary)
