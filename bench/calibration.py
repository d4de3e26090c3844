"""The cost model against the measured runs: the calibration runs a fit needs (`calibration_jobs`, interleaved with
the measured modes or run first for the planner, `calibrate`), the fit itself (`fit_calibration`: per-stage chunk
costs and the link; with tensor parallelism one rank's compute, the TP interconnect and the overlapped schedule's own
costs), and the simulator's figures for each measured mode (`simulate_modes`)."""
from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import torch

from pipeline import Job, PipelineSpec, resolve_config
from pipeline.schedule import chunk_starts

from .pauses import measure


def bytes_per_token(spec: PipelineSpec, batch: int) -> int:
    """What one token's hidden state weighs on a stage boundary: B·H·itemsize."""
    itemsize = torch.tensor([], dtype=getattr(torch, spec.dtype)).element_size()
    return batch * resolve_config(spec.source).hidden_size * itemsize


def calibration_jobs(tokens: torch.Tensor, repeats: int, warmup: int, tp_overlap: bool = False,
                     sizes=()) -> list[Job]:
    """Runs that a cost fit needs, on `tokens` [B, L]: an overlapped run whose chunk sizes cycle through L/128..L/4
    tokens and `sizes` (the measured modes' chunks; every size at many prefix lengths) and a naive run (the whole
    prompt as one chunk). With tensor parallelism they use serial all-reduces, so that each chunk's time splits
    into compute and all-reduce; `tp_overlap` adds the first run again with the overlapped reduce (`tp_comm`
    "overlap"), from which `fit_calibration` fits what splitting chunks in halves costs
    (`pipeline.costs.fit_tp_overlap`)."""
    from pipeline.costs import calibration_chunks
    L = tokens.shape[1]
    jobs = [Job("overlapped", tokens, calibration_chunks(L, extra=sizes), repeats=repeats, warmup=warmup,
                decode=False, tp_comm="serial"),
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


# Why an emulated in-process link is not fitted from the sends (`fit_calibration`): on an H200's SM partitions
# (bench/results/h200) the fit of 100 GbE at S = 4 found 13 ms of latency for a 3 us link, and the simulator put
# chunked 1.79x over its measured TTFT; with the emulated link, 0.93x.
LINK_FIT_CAVEAT = ("a send's measured time (posted to done) includes waiting for the receiver and for the send "
                   "ahead of it, not only the wire: the emulated link is the wire")


def fit_calibration(spec: PipelineSpec, batch: int, jobs: list[Job], runs: list[list]):
    """Fits each stage's chunk cost a·x² + b·x·p + c·x + d and the link's latency + bytes/bandwidth from the timed
    runs of `calibration_jobs` (warm-up runs are not among them). With tp > 1 the chunk cost is the compute alone
    (each chunk's time less its all-reduces') and the TP interconnect is fitted too (latency + ring bytes /
    bandwidth per all-reduce); each stage's cost is then a `pipeline.costs.TPCost` (serial all-reduces; the
    simulator swaps in the overlapped schedule for rows that ran it); a calibration run with the overlapped reduce
    (`calibration_jobs(tp_overlap=True)`) fits that schedule's own costs (`split_s`, `posted_busy`). An emulated
    in-process stage link is the emulated one, not fitted (`LINK_FIT_CAVEAT`; the fit is kept as `link_fitted`);
    over gloo or NCCL the real transfer adds to the emulated delay, and the link is fitted. Returns (costs, link,
    description)."""
    from pipeline.costs import (TPCost, attention_share, cost_form, fit_from_runs, fit_tp_from_runs, fit_tp_overlap,
                                stage_windows)
    from pipeline.link import LinkModel
    overlapped = [r for job, job_runs in zip(jobs, runs) if job.tp_comm == "overlap" for r in job_runs]
    flat = [r for job, job_runs in zip(jobs, runs) if job.tp_comm != "overlap" for r in job_runs]
    bpt = bytes_per_token(spec, batch)
    cfg = resolve_config(spec.source)
    windows = stage_windows(cfg, spec.layer_ranges(cfg))  # a sliding window: the prefix keys each stage reads
    costs, link = fit_from_runs(flat, bpt, windows)
    info = dict(prompt_len=jobs[0].tokens.shape[1], repeats=jobs[0].repeats, warmup=jobs[0].warmup,
                chunks=jobs[0].chunks, stage_costs=[c.fields() for c in costs],
                stage_cost_form=cost_form(costs))
    emulated = LinkModel(spec.bandwidth_gbps, spec.latency_s)
    source = "emulated" if spec.link == "inprocess" and emulated.active else "fitted"
    if source == "emulated":  # an in-process send takes the emulated time and nothing else (a device-local copy)
        info["link_fitted"] = dict(bandwidth_gbps=link.bandwidth_gbps, latency_s=link.latency_s,
                                   why_not_used=LINK_FIT_CAVEAT)
        link = emulated
    info["link"] = dict(bandwidth_gbps=link.bandwidth_gbps, latency_s=link.latency_s, source=source)
    if spec.tp > 1:
        compute, tp_link = fit_tp_from_runs(flat, spec.tp, windows)
        layers = [len(r) for r in spec.layer_ranges(cfg)]
        wire, busy = split_tp_link(tp_link, LinkModel(spec.tp_bandwidth_gbps, spec.tp_latency_s))
        costs = [TPCost(c, n, spec.tp, wire, bpt, "serial", attention_share(cfg, windowed=c.windowed), busy)
                 for c, n in zip(compute, layers)]
        info.update(stage_costs=[c.fields() for c in compute],
                    stage_cost_form=f"one TP rank's compute alone: {cost_form(compute)}, plus 2 all-reduces per "
                                    "layer (pipeline.costs.TPCost)",
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
        costs, _ = tp_schedule(costs, spec.tp_comm)
        info.update(tp_comm=spec.tp_comm)
    return costs, link, info


def tp_schedule(costs, comm: str, crossing: str = "matching", bpt: float = 0):
    """Each stage's fitted `TPCost` under a run's all-reduce schedule `comm` and boundary crossing `crossing`, and
    what one token weighs on each stage link (`bpt` whole; 1/T of it with sharded sends). A boundary received once
    (broadcast) or in 1/T slices (all-gathered) goes through the receiving stage's TP group before its chunk
    computes; sequence-parallel stages with sharded boundaries send the slices they hold and keep the ones they
    receive: neither the closing all-gather nor the boundary's. The last stage closes on its last token alone."""
    from pipeline.costs import boundary_lane_bytes
    kept = comm == "sequence" and crossing == "sharded"
    lane = 0 if kept else boundary_lane_bytes(crossing, costs[0].tp, bpt)
    last = len(costs) - 1
    scheduled = [dataclasses.replace(c, comm=comm, boundary_bytes_per_token=lane if s else 0,
                                     boundary_sliced=crossing == "sharded",
                                     closing="token" if s == last else "none" if kept else "chunk")
                 for s, c in enumerate(costs)]
    return scheduled, (-(-bpt // costs[0].tp) if crossing == "sharded" else bpt)


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
    from pipeline.costs import RaggedStepCost, TPCost, attention_share
    from pipeline.simulate import replay, simulate
    timelines = {}
    tp = isinstance(costs[0], TPCost)
    for mode, m in point["modes"].items():
        bpt = m["wire_bytes_per_token"]  # what one token weighs on this row's boundaries (compressed or not)
        row_costs = costs
        if steps is not None and tp:  # one rank's compute step by step; the all-reduces as for a dense chunk
            row_costs = [dataclasses.replace(c, compute=(r := RaggedStepCost(c.compute, steps[mode])),
                                             attn_share=attention_share(cfg, r, c.compute.windowed))
                          for c in costs]
        elif steps is not None:
            row_costs = [RaggedStepCost(c, steps[mode]) for c in costs]
        if tp:  # the row's own all-reduce schedule and crossing (the baseline has no TP: no figures)
            comm = m.get("tp_comm")
            if comm in ("serial", "overlap", "sequence"):
                row_costs, bpt = tp_schedule(row_costs, comm, m.get("tp_boundary", "matching"), bpt)
            else:
                row_costs = None
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
