"""What the harness writes and prints: the results document (`results_doc`, its `UNITS`, strict JSON with no NaN),
the run's environment (device, versions, commit), the tables for a person, the timeline pictures and the one-line
summary."""
from __future__ import annotations

import dataclasses

import functools
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from pipeline.checks import count
from pipeline.procs import usable_cores

SCHEMA_VERSION = 1
LAST_WRITTEN: dict = {}  # the results file this process wrote last: path, points, complete


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
                                                          f"{count(usable_cores(), 'core')})",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        cuda=torch.version.cuda if cuda else None, git_commit=commit,
    )


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


# the axes a run can compare side by side (`python -m bench` options), each with its default value: a mode's row
# carries a "/value" suffix for each axis where it differs from the first value listed
ROW_AXES = (("tp_comm", "tp-comm", "serial"), ("compress", "compress", "none"),
            ("tp_boundary", "tp-boundary", "matching"), ("token_budget", "token budget", None))


def unsuffixed_rows(point: dict) -> str | None:
    """What the rows without a suffix ran under, for the axes that vary or are not at their default; None when
    every row ran under the defaults."""
    pipelined = {label: m for label, m in point["modes"].items() if label != "unchunked"}
    plain = next((m for label, m in pipelined.items() if "/" not in label), None)
    if plain is None:
        return None
    said = []
    for key, name, default in ROW_AXES:
        if key in plain and (plain[key] != default or len({repr(m.get(key)) for m in pipelined.values()}) > 1):
            value = plain[key]
            said.append("per-row chunks" if key == "token_budget" and value is None else f"{name} {value}")
    return ", ".join(said) or None


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
    plain = unsuffixed_rows(point)
    if plain:
        text += f"\n(rows without a suffix: {plain})"
    text += ("\n(bound: each run replayed on its own compute times with a free link, the least time its schedule "
             "can take; meas/bnd = TTFT ms / bound ms; ideal: compute summed over stages / S; eq.stage: "
             "Σ_k max_s t + (S−1)·max t, exact only when every stage takes the same time on a chunk)")
    if sim:
        out = {mode: m["outlier_compute_fraction"] for mode, m in point["modes"].items()}
        fit = {mode: m["chunk_fit_over_measured"] for mode, m in point["modes"].items()}
        text += ("\n(sim: the simulator on the cost model fitted on calibration runs interleaved with these, against the "
                 "median TTFT; replay/meas: "
                 "on each run's own measured compute times, the event model alone. Chunk by chunk, the fitted cost "
                 "over the measured time (median): " + ", ".join(f"{k} {fit[k]:.2f}" for k in fit) + "; the share "
                 "of the compute time in chunks that took over twice their fitted cost: "
                 + ", ".join(f"{k} {100 * out[k]:.0f}%" for k in out) + ")")
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


def model_shape(cfg) -> dict:
    """A ModelConfig as results.json records it: every field (what a directory's path alone does not say)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def results_doc(config: dict, points: list[dict], plan_calibration, wall_s: float, complete: bool,
                model: dict | None = None) -> dict:
    """results.json's document; `model`: the model's shape (`model_shape`), which the harness records since
    2026-11-29 (older files lack the key)."""
    return dict(schema_version=SCHEMA_VERSION, complete=complete, environment=environment(), config=config,
                model=model, units=UNITS, wall_s=wall_s, plan_calibration=plan_calibration,
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


def point_shape(point: dict) -> str:
    """What a point ran on: its prompt length and batch, or a ragged batch's rows."""
    if "rows" in point:
        return "rows=" + ",".join(map(str, point["rows"]))
    return f"L={point['prompt_len']} B={point['batch']}"


def run_title(config: dict, shape: str | None = None) -> str:
    """The run's setup in one line (a point's shape where the line is about one point)."""
    tp = config.get("tp", 1)
    parts = [config["model"], f"S={config['stages']}" + (f" T={tp}" if tp > 1 else ""), shape,
             config["link"], config["dtype"], environment()["device"]]
    return ", ".join(p for p in parts if p)


def write_pictures(out: Path, points: list[dict], config: dict, simulate: bool) -> None:
    """timeline.png and trace.json of the last point (and measured-vs-simulated, sweep plots)."""
    from .timeline import write_chrome_trace, write_sweep_png, write_timeline_png
    last = points[-1]
    title = run_title(config, point_shape(last))
    ends = row_end_steps(last)
    write_timeline_png(last["timelines"], out / "timeline.png", title, ends)
    write_chrome_trace(last["timelines"], out / "trace.json", ends)
    if simulate:  # measured and simulated, mode by mode, on one time axis
        pairs = [(mode, kind, p[mode]) for mode in last["timelines"]
                 for kind, p in (("measured", last["timelines"]), ("simulated", last["sim_timelines"])) if mode in p]
        write_timeline_png({f"{mode} {kind}": ev for mode, kind, ev in pairs},
                           out / "timeline_vs_sim.png", title + " — measured vs simulated",
                           ends and {f"{mode} {kind}": ends[mode] for mode, kind, _ in pairs if mode in ends})
    if len(points) > 1:  # the sweep's points differ in length: its title names the batch, not one length
        write_sweep_png(points, out / "sweep.png", run_title(config, f"B={config['batch']}"))


def report(points: list[dict], path: Path, config: dict, simulate: bool) -> dict:
    """Prints each point's table (stdout) and returns the one-line summary."""
    title = run_title(config)  # without a shape: each table's own heads its line
    for p in points:
        print(f"\n{point_shape(p)}  ({title})")
        print(table(p))
    last = points[-1]
    out = path.parent
    summary = dict(results=str(path), device=environment()["device"], point=point_shape(last),
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
