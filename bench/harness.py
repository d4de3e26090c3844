"""The main job: unchunked, naive, chunked and overlapped prefill on the same prompt (`run_point`), with where the
time goes and proof that the outputs did not change. The cost model's fit and the simulator's figures are in
`bench.calibration`; what is written and printed (results JSON, tables, timeline PNG, Chrome/Perfetto trace) in
`bench.report`."""
from __future__ import annotations

import itertools
import math
import statistics
import sys
import time

import torch

from pipeline import MODES, Job, PipelineSpec, checks, resolve_config
from pipeline.checks import DTYPES
from pipeline.compress import Codec
from pipeline.schedule import mode_chunks
from pipeline.tp import link_tokens

from .calibration import bytes_per_token, calibration_jobs, fit_calibration, simulate_modes
from .pauses import measure

LOGITS_TOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}  # max |Δ logits| vs unchunked that passes


def check_point_fits(spec: PipelineSpec, prompt_len: int, batch: int, chunks: list[int], modes=MODES,
                     rows: list[int] | None = None, chunk_size: int | None = None, token_budgets=None) -> None:
    """`run_point`'s memory and link checks (`pipeline.launch.check_resources`) on jobs of shapes only (meta
    tensors: nothing drawn or allocated), so that a sweep refuses a point that cannot fit before its first point
    runs. The unchunked baseline runs at every point (as a mode or as the reference), and each row alone after a
    ragged batch."""
    from pipeline.launch import check_resources
    modes = {*modes, "unchunked"}
    if rows is None:
        tokens = torch.empty((batch, prompt_len), dtype=torch.long, device="meta")
        jobs = [_point_job(m, tokens, chunks) for m in modes]
    else:
        tokens = [torch.empty((n,), dtype=torch.long, device="meta") for n in rows]
        jobs = [_point_job(m, tokens, chunks, chunk_size, token_budget=b)
                for m in modes for b in token_budgets or [None]]
        jobs += [Job("unchunked", row[None], [len(row)]) for row in tokens]
    check_resources(spec, resolve_config(spec.source), jobs)


def _point_job(mode: str, tokens, chunks: list[int], chunk_size: int | None = None, **kw) -> Job:
    """One mode's job at a point: a [B, L] prompt in `chunks` (naive and unchunked: whole), or a ragged batch
    (tokens a list of rows) whose chunks are its steps' token counts: per-row chunks of `chunk_size`, or, with a
    token_budget in kw, steps of that many tokens (no per-row cap)."""
    if not isinstance(tokens, (list, tuple)):
        return Job(mode, tokens, mode_chunks(mode, chunks), **kw)
    return Job.of_rows(mode, tokens, chunk_size=chunk_size if kw.get("token_budget") is None else None, **kw)


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

    def job(mode: str, **kw) -> Job:
        return _point_job(mode, tokens, chunks, chunk_size, **kw)
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
    cal_jobs = calibration_jobs(cal_tokens, repeats, warmup, tp_overlap=spec.tp > 1 and "overlap" in axes["tp_comm"],
                                sizes=() if ragged else {c for j in jobs for c in j.chunks}) if simulate else []
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
            # the most times any run made the host wait for the GPU while enqueueing (GPU runs; 0 on CPU): each one
            # stalls the stages' enqueueing, so overlap measured with any is not the schedule's
            host_syncs=max(sum(r.metrics.get("host_syncs_per_stage", [])) for r in runs),
        )
        if "host_enqueue_s_per_stage" in runs[0].metrics:  # one host thread enqueued every stage (in-process GPU)
            m["host_enqueue_ms"] = statistics.median(sum(r.metrics["host_enqueue_s_per_stage"]) for r in runs) * 1e3
        if "cuda_graphs" in runs[0].metrics:  # the timed runs' chunk graphs (a capture in one: not all replayed)
            m["cuda_graphs"] = {k: sum(r.metrics["cuda_graphs"][k] for r in runs) for k in ("captured", "replayed")}
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
