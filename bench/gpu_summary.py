"""summary.md of `python -m bench gpu-suite`: the figures a person reads first, each from the part documents (and,
for the kernels, a committed run on the same GPU), against their targets and by how much each misses. Pure functions
of the documents: the CPU tests check every table on made-up documents, the GPU run writes them
(`gpu_suite._write_summary`, `python -m bench gpu-suite --summary-only`)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nccl_markdown(doc: dict) -> list[str]:
    """The nccl part: every mode over real links per (S, T), overlapped against naive and the ideal, and with T > 1
    the all-reduce time of serial reduces against ISO-overlapped ones; or why it did not run."""
    lines = [f"## Multi-GPU pipeline ({doc.get('link', 'nccl').upper()}, one process per stage and TP rank)", ""]
    if doc.get("skipped"):
        return lines + [f"Not run: {doc['skipped']}.", ""]
    head = (f"{doc['model']} shape with {doc['layers']} of its {doc['model_layers']} layers, random weights, "
            f"{doc['dtype']}, chunks of {doc['chunk_size']}, median of {doc['repeats']} runs, {doc['gpus']} GPUs; "
            "the links are the machine's own (nothing emulated)." + _part_notes(doc))
    lines += [head, "", "| S | T | L | naive ms | chunked ms | overlapped ms | overlapped vs naive | of ideal | "
              "exposed comm ms | all-reduce ms serial | overlapped ms, ISO reduce (its all-reduce ms) | "
              "outputs match |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in doc["points"]:
        m = p["modes"]
        get = lambda mode, key, f="{:.1f}": _fmt(m.get(mode, {}).get(key), f)  # noqa: E731
        reduce_ms = lambda mode: _fmt((m.get(mode, {}).get("allreduce_ms_per_stage") or [None])[0], "{:.1f}")  # noqa
        iso = f"{get('overlapped/overlap', 'ttft_ms')} ({reduce_ms('overlapped/overlap')})" if p["tp"] > 1 else "-"
        lines.append(f"| {p['stages']} | {p['tp']} | {p['prompt_len']} | {get('naive', 'ttft_ms')} | "
                     f"{get('chunked', 'ttft_ms')} | {get('overlapped', 'ttft_ms')} | "
                     f"{get('overlapped', 'speedup_vs_naive', '{:.2f}')}x | {_fmt(p.get('overlapped_of_ideal'))} | "
                     f"{get('overlapped', 'exposed_comm_ms')} | {reduce_ms('overlapped') if p['tp'] > 1 else '-'} | "
                     f"{iso} | {'yes' if all(v['outputs_match'] for v in m.values()) else 'NO'} |")
    return lines + [""]



def _vs_target(value: float, target: float) -> str:
    if value >= target:
        return f"met ({value / target:.2f}x the target)"
    return f"MISSED by {100 * (1 - value / target):.0f}%"


PARTITION_TARGETS = dict(overlapped_of_ideal=0.9, overlapped_of_ideal_link="100gbe", sim_within=0.10)


def _why_incomplete(doc: dict) -> str:
    if doc.get("part_failed"):
        return f"the part failed ({doc['part_failed']})"
    return doc.get("stopped") or "the run was cut short"


def host_lines(doc: dict) -> list[str]:
    """What the one host thread that enqueues every stage (the in-process GPU driver) did to a pipeline part's runs:
    whether any made the host wait for the GPU (`host_syncs`: any such wait stalls the driver, the stages then run in
    the order enqueued and the overlap figures measure the stall), and the share of the overlapped TTFT the host spent
    enqueueing (`host_enqueue_ms`: near 1, the host paced the run, not the GPU). Nothing for results from before
    these were counted."""
    lines = []
    counts = [(f"rows {','.join(map(str, p['rows']))}" if p.get("rows") else f"L={p['prompt_len']}", mode,
               m["host_syncs"]) for p in doc.get("points", []) for mode, m in p["modes"].items() if "host_syncs" in m]
    bad = [c for c in counts if c[2]]
    if bad:
        worst = max(bad, key=lambda c: c[2])
        lines.append(f"- **Host syncs while enqueueing: {len(bad)} of {len(counts)} mode-points, up to {worst[2]} in "
                     f"a run ({worst[0]}, {worst[1]})**: the host waited for the GPU mid-run, the stages ran in the "
                     "order enqueued, and the overlap figures here measure that stall, not the schedule.")
    elif counts:
        lines.append(f"- Host syncs while enqueueing: none in any run ({len(counts)} mode-points).")
    shares = [m["host_enqueue_ms"] / m["ttft_ms"] for p in doc.get("points", []) for mode, m in p["modes"].items()
              if mode.startswith("overlapped") and m.get("host_enqueue_ms") is not None and m.get("ttft_ms")]
    if shares:
        paced = sum(x >= HOST_PACED for x in shares)
        lines.append(f"- Host enqueue time (one thread for every stage): {min(shares):.2f}-{max(shares):.2f} of the "
                     f"overlapped TTFT" + (f"; **{paced} of {len(shares)} runs at >= {HOST_PACED} (paced by the host, "
                                           "not the GPU)**" if paced else "") + ".")
    return lines


# A run whose host enqueue time is at least this share of its TTFT was paced by the host (`host_lines`).
HOST_PACED = 0.9


def _paragraph(lines: list[str]) -> list[str]:
    """`lines` followed by a blank line, or nothing when there are none."""
    return lines + [""] if lines else []


def _part_notes(doc: dict) -> str:
    """What a pipeline part's head adds: the ops it fell back to, and that it was cut short (and why)."""
    notes = f" {doc['ops_fallback']}." if doc.get("ops_fallback") else ""
    if not doc.get("complete", True):
        notes += f" **Incomplete: {_why_incomplete(doc)}; these are the points it measured.**"
    return notes


def _fmt(v, f="{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def partitions_markdown(doc: dict) -> list[str]:
    """The partitions part: overlapped against naive and against the ideal S·C/(C+S−1), measured over the free-link
    bound, the simulator against the measured chunked and overlapped runs, and the targets (overlapped >= 0.9 of the
    ideal with 100 GbE emulated at every S; the simulator within 10% for chunked and overlapped)."""
    t = PARTITION_TARGETS
    head = (f"{doc['model']} shape with {doc['layers']} of its {doc['model_layers']} layers, random weights, "
            f"{doc['dtype']}, chunks of {doc['chunk_size']}, median of {doc['repeats']} runs; each stage on its own "
            "SMs (green contexts), the links on the rest.")
    head += _part_notes(doc)
    first = next((p.get("sm_partitions") for p in doc["points"] if p.get("sm_partitions")), None)
    if first:
        head += (f" SMs per stage {first['stage_sms']}, for the links {first['link_sms']}; not modelled: "
                 f"{first['not_modelled']}.")
    lines = ["## One GPU as S GPUs (SM partitions, in-process link, emulated bandwidth)", "", head, "",
             "| S | link | L | naive ms | chunked ms | overlapped ms | overlapped vs naive | ideal | of ideal | "
             "meas/bnd | sim/meas chunked | sim/meas overlapped | outputs match |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in doc["points"]:
        m = p["modes"]
        get = lambda mode, key: m.get(mode, {}).get(key)  # noqa: E731
        lines.append(f"| {p['stages']} | {p['link']} | {p['prompt_len']} | {_fmt(get('naive', 'ttft_ms'), '{:.1f}')} | "
                     f"{_fmt(get('chunked', 'ttft_ms'), '{:.1f}')} | {_fmt(get('overlapped', 'ttft_ms'), '{:.1f}')} | "
                     f"{_fmt(get('overlapped', 'speedup_vs_naive'))}x | {_fmt(p.get('ideal_speedup'))}x | "
                     f"{_fmt(p.get('overlapped_of_ideal'))} | {_fmt(get('overlapped', 'measured_over_bound'))} | "
                     f"{_fmt(get('chunked', 'sim_over_measured'))} | {_fmt(get('overlapped', 'sim_over_measured'))} | "
                     f"{'yes' if all(v['outputs_match'] for v in m.values()) else 'NO'} |")
    lines.append("")
    lines += host_lines(doc)
    for S in sorted({p["stages"] for p in doc["points"]}):
        pts = [p for p in doc["points"] if p["stages"] == S and p["link"] == t["overlapped_of_ideal_link"]
               and p.get("overlapped_of_ideal") is not None]
        if pts:
            worst = min(p["overlapped_of_ideal"] for p in pts)
            lines.append(f"- Target overlapped >= {t['overlapped_of_ideal']} of the ideal speed-up over naive, S={S}, "
                         f"{t['overlapped_of_ideal_link']}: worst {worst:.2f} → "
                         f"{_vs_target(worst, t['overlapped_of_ideal'])}")
    lines += ideal_gap_lines(doc["points"])
    lines += stage_alone_lines(doc)
    lines += clock_lines(doc)
    sims = [(mode, p["modes"][mode]["sim_over_measured"]) for p in doc["points"] for mode in ("chunked", "overlapped")
            if p["modes"].get(mode, {}).get("sim_over_measured") is not None]
    if sims:
        off = max(abs(r - 1) for _, r in sims)
        verdict = "met" if off <= t["sim_within"] else f"MISSED (off by {100 * off:.0f}%)"
        lines.append(f"- Target simulator within {100 * t['sim_within']:.0f}% of measured for chunked and overlapped: "
                     f"{min(r for _, r in sims):.2f}-{max(r for _, r in sims):.2f} → {verdict}")
    lines.append("")
    return lines


def stage_compute_growth(point: dict) -> float | None:
    """The busiest stage's compute time in the overlapped run over naive's (`compute_ms_per_stage`): the ideal
    speed-up takes it as 1 (a chunked prompt costs each stage what the whole prompt does). None without both."""
    m = point["modes"]
    ov, nv = (m.get(k, {}).get("compute_ms_per_stage") for k in ("overlapped", "naive"))
    return max(ov) / max(nv) if ov and nv and max(nv) > 0 else None


def ideal_gap_lines(points: list[dict]) -> list[str]:
    """Where overlapped falls short of the ideal speed-up, how much of that is the stages' compute growing (each
    stage computed longer in the overlapped run than in naive: on SM partitions they share one GPU's HBM bandwidth
    and L2 cache, and chunks cost more than the whole prompt) and how much the schedule's: the share of the ideal at
    the overlapped run's own stage compute (of ideal x growth), beside measured over the bound."""
    rows = [(p["overlapped_of_ideal"], g, p["modes"]["overlapped"].get("measured_over_bound"))
            for p in points if p.get("overlapped_of_ideal") is not None and (g := stage_compute_growth(p))]
    if not rows:
        return []
    growth = [g for _, g, _ in rows]
    at_own = [o * g for o, g, _ in rows]
    bound = [b for _, _, b in rows if b is not None]
    return [f"- Stage compute, overlapped over naive (the busiest stage): {min(growth):.2f}-{max(growth):.2f}x, where "
            "the ideal takes 1; at the overlapped runs' own stage compute the schedule reaches "
            f"{min(at_own):.2f}-{max(at_own):.2f} of the ideal"
            + (f" (measured/bound {min(bound):.2f}-{max(bound):.2f})" if bound else "")
            + (": what falls short is compute, not exposed sends." if min(at_own) >= PARTITION_TARGETS[
                "overlapped_of_ideal"] else ".")]


def stage_alone_lines(doc: dict) -> list[str]:
    """The stage compute growth split in two with `stage_compute_alone`: chunking's own cost (a stage's chunks over
    its whole prompt, alone on its partition) and the rest, running beside S - 1 busy stages (growth over chunking
    cost, per point); and the share of the ideal the overlapped runs would reach without that rest (of ideal x it):
    what S GPUs, each with its own HBM, L2 and power limit, would give if the schedule held. Where both clocks were
    read, the rest is split again: the SM clock's drop (the lone stage's median clock over the overlapped runs') and
    what is left (HBM bandwidth and L2 shared)."""
    if doc.get("stage_alone_skipped"):
        return [f"- One stage alone on its partition: not measured ({doc['stage_alone_skipped']})."]
    alone = {(a["stages"], a["prompt_len"]): a for a in doc.get("stage_alone", [])}
    rows = [(alone[key]["chunking_cost"], g / alone[key]["chunking_cost"], p["overlapped_of_ideal"],
             _clock_drop(alone[key], p))
            for p in doc.get("points", []) if (key := (p["stages"], p.get("prompt_len"))) in alone
            and p.get("overlapped_of_ideal") is not None and (g := stage_compute_growth(p))]
    if not rows:
        return []
    a0 = next(iter(alone.values()))
    cost = [r[0] for r in rows]
    beside = [r[1] for r in rows]
    apart = [o * b for _, b, o, _ in rows]
    clocks = [(b, c) for _, b, _, c in rows if c is not None]
    split = ""
    if len(clocks) == len(rows):
        split = (f", of which the SM clock's drop (the power limit) {_span([c for _, c in clocks])}x and the rest "
                 f"(HBM and L2) {_span([b / c for b, c in clocks])}x")
    return [f"- One stage alone on its partition (its layers, the prompt in chunks of {a0['chunk_size']} against "
            f"whole, nothing else running): chunking costs it {min(cost):.2f}-{max(cost):.2f}x; running beside the "
            f"other busy stages {min(beside):.2f}-{max(beside):.2f}x more{split} (one GPU shared: S GPUs would not "
            f"pay it); without that, overlapped would reach {min(apart):.2f}-{max(apart):.2f} of the ideal."]


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _clock_drop(alone: dict, point: dict) -> float | None:
    """The lone stage's median SM clock over the overlapped runs' at this point (above 1: the stages at once ran at
    a lower clock); None where either was not read."""
    mine = alone.get("gpu_clocks", {}).get("sm_clock_mhz", {}).get("median")
    ov = point.get("gpu_clocks", {}).get("windows", {}).get("overlapped", {}).get("sm_clock_mhz", {}).get("median")
    return mine / ov if mine and ov else None


def clock_lines(doc: dict) -> list[str]:
    """The GPU's SM clock and power cap over the part's points (`bench.clocks`): per mode over its runs (naive's
    stages compute one after another, overlapped's at once on their partitions) and for a stage timed alone. A
    lower clock with the stages at once is a cost of sharing one GPU that S GPUs would not pay."""
    points = doc.get("points", [])
    read = [p["gpu_clocks"] for p in points if "sm_clock_mhz" in p.get("gpu_clocks", {})]
    if not read:
        why = next((p["gpu_clocks"].get("unavailable") for p in points if p.get("gpu_clocks")), None)
        return [f"- GPU clocks: not read ({why})."] if why else []

    def span(values, fmt="{:.0f}"):
        return fmt.format(min(values)) + ("" if min(values) == max(values) else "-" + fmt.format(max(values)))
    parts = []
    for mode in ("naive", "overlapped"):
        got = [w for c in read if (w := c.get("windows", {}).get(mode, {})).get("samples")]
        if got:
            parts.append(f"{mode} {span([w['sm_clock_mhz']['median'] for w in got])} MHz, power-capped in "
                         f"{span([100 * w['power_capped'] for w in got])}% of its samples")
    alone = [a["gpu_clocks"] for a in doc.get("stage_alone", []) if "sm_clock_mhz" in a.get("gpu_clocks", {})]
    if alone:
        parts.append(f"one stage alone {span([c['sm_clock_mhz']['median'] for c in alone])} MHz, power-capped in "
                     f"{span([100 * c['power_capped'] for c in alone])}%")
    if not parts:
        parts.append(f"all runs {span([c['sm_clock_mhz']['median'] for c in read])} MHz")
    first = read[0]
    return [f"- SM clock (NVML every {1e3 * first['period_s']:.0f} ms; this GPU's max {first['max_sm_clock_mhz']:.0f} "
            f"MHz, power limit {first['power_limit_w']:.0f} W), the points' medians: " + "; ".join(parts) + ". A "
            "lower clock with the stages at once than one at a time is a cost of sharing one GPU that S GPUs would "
            "not pay."]


def graphs_markdown(doc: dict, eager: dict | None = None) -> list[str]:
    """The graphs part: points of the partitions part run again with each stage's chunks replayed from CUDA graphs,
    against the same points run eagerly in `eager` (the partitions part, same call): the overlapped TTFT, its
    speed-up over naive and share of the ideal, the host's enqueue time as a share of the TTFT, and each stage's
    compute time graphed over eager (about 1 if the replays ran on their partition's SMs as the eager kernels did;
    far below 1 would say a replay escaped its partition)."""
    head = (f"{doc['model']} shape with {doc['layers']} of its {doc['model_layers']} layers, random weights, "
            f"{doc['dtype']}, chunks of {doc['chunk_size']}, median of {doc['repeats']} runs (the warm-up runs "
            "capture each stage's chunks; the timed runs replay them), on SM partitions; eager: the same point in "
            "the partitions part above.")
    head += _part_notes(doc)
    lines = ["## CUDA graphs per stage chunk (SM partitions)", "", head, "",
             "| S | link | L | overlapped ms eager → graphs | vs naive eager → graphs | of ideal eager → graphs | "
             "host share of TTFT eager → graphs | stage compute graphs/eager | replays (captures) | outputs match |",
             "|---:|---|---:|---|---|---|---|---:|---:|---|"]
    pairs = lambda a, b, f="{:.2f}": f"{_fmt(a, f)} → {_fmt(b, f)}"  # noqa: E731
    share = lambda m: m["host_enqueue_ms"] / m["ttft_ms"] if m.get("host_enqueue_ms") is not None else None  # noqa
    for p in doc["points"]:
        e = next((q for q in (eager or {}).get("points", []) if (q["stages"], q["link"], q.get("prompt_len")) ==
                  (p["stages"], p["link"], p.get("prompt_len"))), None)
        g, o = p["modes"].get("overlapped", {}), (e or {}).get("modes", {}).get("overlapped", {})
        compute = None
        if g.get("compute_ms_per_stage") and o.get("compute_ms_per_stage"):
            compute = statistics.median(a / b for a, b in zip(g["compute_ms_per_stage"], o["compute_ms_per_stage"]))
        counts = g.get("cuda_graphs") or {}
        lines.append(f"| {p['stages']} | {p['link']} | {p['prompt_len']} | "
                     f"{pairs(o.get('ttft_ms'), g.get('ttft_ms'), '{:.1f}')} | "
                     f"{pairs(o.get('speedup_vs_naive'), g.get('speedup_vs_naive'))} | "
                     f"{pairs(e.get('overlapped_of_ideal') if e else None, p.get('overlapped_of_ideal'))} | "
                     f"{pairs(share(o) if o else None, share(g) if g else None)} | {_fmt(compute)} | "
                     f"{counts.get('replayed', '-')} ({counts.get('captured', '-')}) | "
                     f"{'yes' if all(v['outputs_match'] for v in p['modes'].values()) else 'NO'} |")
    if eager is None or not eager.get("points"):
        lines += ["", "No eager points to compare with (the partitions part did not run or measured nothing)."]
    lines.append("")
    return lines


def _plan_key(mode: str, budgets: list, i: int) -> str:
    """The harness's key of a mode under the i-th token-budget plan: the first keeps the mode's name."""
    if i == 0:
        return mode
    return f"{mode}/{'chunks' if budgets[i] is None else f'budget{budgets[i]}'}"


def ragged_markdown(doc: dict) -> list[str]:
    """The ragged part: each batch of rows under each plan, the batch's TTFT per mode, each row's TTFT overlapped and
    naive (a short row's first token comes when its last chunk is through, not when the batch is), the simulator
    against the measured overlapped run, and each mode's rows against the same prompts run alone."""
    budgets = doc.get("token_budgets") or [None]
    head = (f"{doc['model']} shape with {doc['layers']} of its {doc['model_layers']} layers, random weights, "
            f"{doc['dtype']}, the KV cache in pages of 16, median of {doc['repeats']} runs; "
            + ("each stage on its own SMs (green contexts)." if doc.get("sm_partitions") else
               "the stages take turns on the whole GPU.")
            + " Plans: " + ", ".join(f"per-row chunks of {doc['chunk_size']}" if b is None else
                                     f"steps of {b} tokens (first come, first served)" for b in budgets) + ".")
    head += _part_notes(doc)
    lines = ["## Ragged batches (paged KV cache, rows of different lengths in one step)", "", head, "",
             "| S | link | rows | plan | naive ms | chunked ms | overlapped ms | overlapped vs naive | row TTFT "
             "overlapped ms | row TTFT naive ms | sim/meas overlapped | rows vs alone max abs diff | outputs match |",
             "|---:|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---|"]
    ms = lambda v: "-" if v is None else ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    for p in doc["points"]:
        m = p["modes"]
        naive = m.get("naive", {})
        for i, b in enumerate(budgets):
            ch, ov = m.get(_plan_key("chunked", budgets, i), {}), m.get(_plan_key("overlapped", budgets, i), {})
            plan = f"chunks of {doc['chunk_size']}" if b is None else f"budget {b}"
            vs = naive["ttft_ms"] / ov["ttft_ms"] if naive.get("ttft_ms") and ov.get("ttft_ms") else None
            diff = max((v.get("max_abs_dlogits_vs_alone") or 0.0 for v in (naive, ch, ov) if v), default=None)
            ok = all(v["outputs_match"] for v in (naive, ch, ov) if v)
            lines.append(f"| {p['stages']} | {p['link']} | {','.join(map(str, p['rows']))} | {plan} | "
                         f"{_fmt(naive.get('ttft_ms'), '{:.1f}')} | {_fmt(ch.get('ttft_ms'), '{:.1f}')} | "
                         f"{_fmt(ov.get('ttft_ms'), '{:.1f}')} | {_fmt(vs)}x | {ms(ov.get('row_ttft_ms'))} | "
                         f"{ms(naive.get('row_ttft_ms'))} | {_fmt(ov.get('sim_over_measured'))} | "
                         f"{_fmt(diff, '{:.1e}')} | {'yes' if ok else 'NO'} |")
    lines.append("")
    return lines + _paragraph(host_lines(doc))


def _launcher(row: dict) -> str:
    """The launcher's host µs for one call (with, in parentheses, Triton's launch path's part of it) and per call back
    to back, against the same work replayed from a CUDA graph; 'launch-bound' where back to back the host takes longer
    than the device (one call's time where a file has no back-to-back figure: before 2026-11-29)."""
    host, graph, python = row.get("launch_host_us"), row.get("launch_graph_us"), row.get("launch_python_us")
    steady, jit = row.get("launch_steady_us"), row.get("launch_jit_steady_us")
    if host is None:
        return "-"
    host_text = f"{host:.0f}" + (f" ({host - python:.0f})" if python is not None else "") \
        + (f", {steady:.0f}" if steady is not None else "") + (f" [{jit:.0f}]" if jit is not None else "")
    if graph is None:
        return f"{host_text} / -"
    from .kernels import launch_bound
    return f"{host_text} / {graph:.0f}" + (" launch-bound" if launch_bound(row) else "")


def committed_baseline(kernels: dict | None, out: Path) -> tuple[str, dict] | None:
    """The committed kernel benchmark of the GPU `kernels` ran on (`bench/results/*/kernels.json` with the same
    device name), other than `out`'s own: (its path from the repository root, its document), or None."""
    device = ((kernels or {}).get("environment") or {}).get("device")
    if not device:
        return None
    for f in sorted((ROOT / "bench" / "results").glob("*/kernels.json")):
        if f.parent.resolve() == Path(out).resolve():
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and (doc.get("environment") or {}).get("device") == device and doc.get("attention"):
            return str(f.relative_to(ROOT)), doc
    return None


def baseline_lines(path: str, base: dict, new: dict) -> list[str]:
    """This project's attention kernels (dense, and paged) against a committed run on the same GPU, shape by shape:
    the time there over the time here (above 1: faster now), so a kernel change made since is measured by the next
    run without a separate A/B. Another session's run: differences of a few percent are its noise. A launch-bound
    shape is compared by its CUDA-graph replays (marked "graph"), as `python -m bench compare` gates it."""
    from .compare import host_bound_pair, kernel_rows
    old, now = kernel_rows(base), kernel_rows(new)
    pairs = []
    for key, b in old.items():
        n = now.get(key)
        fig = {"attention": "triton_ms", "paged": "paged_ms"}.get(key[0])
        graph = fig == "triton_ms" and n is not None and host_bound_pair(b, n)
        fig = "triton_graph_ms" if graph else fig
        if fig and n and isinstance(b.get(fig), (int, float)) and b[fig] > 0 and isinstance(n.get(fig), (int, float)) \
                and n[fig] > 0:
            pairs.append((key[1] + (" (graph)" if graph else ""), b[fig] / n[fig]))
    if not pairs:
        return []
    ratios = [r for _, r in pairs]
    commit = str((base.get("environment") or {}).get("git_commit") or "?")[:7]
    return ["", f"This project's attention kernels against the committed run on this GPU (`{path}`, commit {commit}), "
                "time there / time here (above 1: faster now; another session's run, so a few percent is noise): "
                f"median {statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x.", "",
            "- " + "; ".join(f"{shape}: {r:.2f}x" for shape, r in pairs)]


def tests_markdown(tests: dict) -> list[str]:
    """The GPU-marked tests: how many passed, failed, skipped; each failure named."""
    lines = ["## GPU tests", "", f"{tests.get('passed', 0)} passed, {len(tests.get('failed', []))} failed, "
                                 f"{tests.get('skipped', 0)} skipped (exit code {tests.get('exit_code')})", ""]
    if tests.get("timed_out"):
        lines += [f"**Incomplete: {tests['timed_out']}.**", ""]
    lines += [f"- FAILED `{f}`" for f in tests.get("failed", [])]
    lines.append("")
    return lines


def _ws_at_target(kernels: dict, target: float) -> str:
    """The target shape's best config ws run of the warp-specialization probe (chunk_attention end to end, correct,
    eager as the table above is), against the target, as a clause; "" where the probe has none."""
    import torch

    from .kernels import PEER_TOL
    tol = PEER_TOL[torch.bfloat16]
    ws = [r for r in kernels.get("ws_probe") or [] if r.get("kind") == "chunk_attention" and r.get("ws")
          and (r["prefix"], r["chunk"]) == (16384, 2048) and "tflops" in r and r["max_abs_err"] <= tol]
    if not ws:
        return ""
    best = max(ws, key=lambda r: r["tflops"])
    tile = f"{best['BLOCK_M']}x{best['BLOCK_N']} w{best['num_warps']}s{best['num_stages']}"
    return (f"; with config ws (the warp-specialization probe, {tile}, not the launcher's choice): {best['tflops']:.0f} "
            f"→ {_vs_target(best['tflops'], target)}")


def kernels_markdown(kernels: dict, baseline: tuple[str, dict] | None = None) -> list[str]:
    """The kernel part: attention against the best fair peer per shape (and the targets), the paged kernel, the
    launcher's tile A/B, the memory-bound ops against copy, host costs, the committed run on the same GPU
    (`baseline`) and the compiler's report."""
    t = kernels["targets"]
    lines = ["## Kernels", "", f"Ceilings measured here: device copy {kernels['copy_gbps']:.0f} GB/s, bf16 GEMM "
             f"{kernels['gemm_bf16_tflops']:.0f} TFLOP/s." + ("" if kernels.get("complete", True) else
                                                             f" **Incomplete: {_why_incomplete(kernels)}.**"),
             "",
             "| prefix | chunk | Triton TFLOP/s | of GEMM | best peer | speed-up | max err | launcher host"
             + (" (Triton's launch)" if any("launch_python_us" in r for r in kernels["attention"]) else "")
             + (", back to back" if any("launch_steady_us" in r for r in kernels["attention"]) else "")
             + (" [through Triton's launch path]" if any(r.get("launch_jit_steady_us") is not None
                                                        for r in kernels["attention"]) else "")
             + " / graph µs |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
    best = lambda r: r.get("best_peer", r.get("best_sdpa"))  # noqa: E731 - older files: SDPA only
    speedup = lambda r: r.get("speedup_vs_best_peer", r.get("speedup_vs_best_sdpa"))  # noqa: E731
    for r in kernels["attention"]:
        sp = speedup(r)
        lines.append(f"| {r['prefix']} | {r['chunk']} | {r['triton_tflops']:.0f} | "
                     f"{100 * r.get('triton_of_gemm', 0):.0f}% | {best(r) if sp else 'none ran'} | "
                     f"{f'{sp:.2f}x' if sp else '-'} | {r['max_abs_err']:.1e} | {_launcher(r)} |")
    vs_peer = t.get("attention_vs_best_peer", t.get("attention_vs_best_sdpa"))
    target = next((r for r in kernels["attention"] if (r["prefix"], r["chunk"]) == (16384, 2048)), None)
    if target is not None:
        lines += ["", f"- Target ≥ {t['attention_tflops']:.0f} TFLOP/s at prefix 16k, chunk 2k: "
                      f"{target['triton_tflops']:.0f} → {_vs_target(target['triton_tflops'], t['attention_tflops'])}"
                  + _ws_at_target(kernels, t['attention_tflops'])]
    ran = [r for r in kernels["attention"] if speedup(r)]
    if ran:
        worst = min(ran, key=speedup)
        lines.append(f"- Target ≥ {vs_peer}x the best peer at every shape: worst {speedup(worst):.2f}x at prefix "
                     f"{worst['prefix']}, chunk {worst['chunk']} ({best(worst)}) → "
                     f"{_vs_target(speedup(worst), vs_peer)}")
    if any("flex_ms" in r for r in kernels["attention"]) and "flex_compile" not in kernels:
        lines.append("- flex_attention compiled with dynamic shapes in this run (one kernel for every shape: no "
                     "decoding kernel for chunks under 128, boundary masks in every block): a handicapped peer; "
                     "runs since 2026-11-29 compile it for each shape (`flex_compile` static)")
    bound = [r for r in kernels["attention"] if r.get("speedup_vs_best_peer_graph")]
    if bound:
        lines.append("- Launch-bound shapes (the launcher's host time over the kernel's), kernels against each "
                     "other replayed from CUDA graphs (no host): " + "; ".join(
                         f"prefix {r['prefix']}, chunk {r['chunk']}: {r['speedup_vs_best_peer_graph']:.2f}x "
                         f"{r['best_peer_graph']} (eager {speedup(r):.2f}x)" for r in bound))
    direct = [r for r in kernels["attention"] if r.get("launch_jit_steady_us") and r.get("launch_steady_us")]
    if direct:
        from .kernels import launch_bound
        steady = [r["launch_steady_us"] for r in direct]
        jit = [r["launch_jit_steady_us"] for r in direct]
        saved = [j / s for j, s in zip(jit, steady)]
        lines.append(f"- Direct launches (`kernels.fast_launch`): the launcher's host time back to back "
                     f"{min(steady):.0f}–{max(steady):.0f} µs a call, through Triton's own launch path "
                     f"{min(jit):.0f}–{max(jit):.0f} µs ({min(saved):.2f}–{max(saved):.2f}x); "
                     f"launch-bound with them: {sum(map(launch_bound, direct))} of {len(direct)} shapes")
    if kernels.get("paged"):
        flex = any("flex_ms" in r for r in kernels["paged"])  # older files: no flex peer
        lines += ["", "Paged, varlen chunk_attention: one launch over a batch of rows (prefix+chunk each), the "
                      "cache in shuffled pages, against the dense kernel and the best SDPA backend run once per "
                      "row" + (", and flex_attention run once over the packed rows (a per-row causal block mask)"
                               if flex else "") + ".", "",
                  "| rows | page | paged TFLOP/s | vs dense per row | vs SDPA per row | " + ("vs flex | " * flex)
                  + "launch | max err |", "|---|---:|---:|---:|---:|" + "---:|" * flex + "---|---:|"]
        from .kernels import dense_rows_launch_bound
        for r in kernels["paged"]:
            plan = r.get("launch_plan") or {}
            vs = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
            lines.append(f"| {', '.join(f'{p}+{c}' for p, c in r['batch'])} | {r['page_size']} | "
                         f"{r['paged_tflops']:.0f} | {vs(r.get('paged_vs_dense_rows'))}"
                         + (f" ({vs(r['paged_vs_dense_rows_graph'])} by the dense rows' graph replay)"
                            if dense_rows_launch_bound(r) else "")
                         + " | "
                         f"{vs(r.get('paged_vs_sdpa_rows'))} ({r.get('best_sdpa') or 'none ran'}) | "
                         + (f"{vs(r.get('paged_vs_flex'))} | " if flex else "") +
                         f"pack {plan.get('pack', '?')}, splits {plan.get('splits', '?')} | "
                         f"{r['paged_max_abs_err']:.1e}{'' if r.get('paged_correct', True) else ' WRONG'} |")
    if kernels.get("window"):  # older files: no sliding-window rows
        from .kernels import _tile as tile
        lines += ["", "Sliding window (chunk_attention's `window`), TFLOP/s over the pairs the window leaves, against "
                      "flex_attention with the window's block mask and SDPA with it as a boolean mask over the keys "
                      "from the first query's window on (native GQA, and K/V repeated per query head):", "",
                  "| prefix | chunk | window | Triton TFLOP/s | best peer | speed-up | launch | max err |",
                  "|---:|---:|---:|---:|---|---:|---|---:|"]
        for r in kernels["window"]:
            sp, plan = r.get("speedup_vs_best_peer"), r["launch"]
            lines.append(f"| {r['prefix']} | {r['chunk']} | {r['window']} | {r['triton_tflops']:.0f} | "
                         f"{r['best_peer'] or 'none ran'} | {f'{sp:.2f}x' if sp else '-'} | {tile(plan)}, pack "
                         f"{plan['pack_heads']}, splits {plan['splits']} | {r['max_abs_err']:.1e}"
                         f"{'' if r['triton_correct'] else ' WRONG'} |")
    if kernels.get("tile_ab"):
        from .kernels import tile_ab_lines
        lines += ["", "Launcher tiles chosen untimed, each against the tile it replaced (one shape each):", ""]
        lines += [f"- {line[len('tile A/B '):]}" for line in tile_ab_lines(kernels["tile_ab"])]
    if kernels.get("ws_probe"):  # files before 2026-11-29: no probe
        from .ws_probe import ws_probe_lines
        head, *rest = ws_probe_lines(kernels["ws_probe"])
        lines += ["", head[0].upper() + head[1:], ""] + [("  - " if r.startswith("    ") else "- ") + r.strip()
                                                          for r in rest]
    hosts = any("triton_host_us" in m for m in kernels["memory_bound"])  # older files: no host times
    steady = any("eager_steady_us" in m for m in kernels["memory_bound"])
    jits = any(m.get("triton_jit_steady_us") is not None for m in kernels["memory_bound"])
    lines += ["", "| op | Triton GB/s | of copy | eager GB/s | target |"
              + (f" host µs Triton (its launch){', back to back' if steady else ''}"
                 + (" [through Triton's launch path]" if jits else "") + " / eager"
                 f"{', back to back' if steady else ''} |" if hosts else ""),
              "|---|---:|---:|---:|---|" + ("---:|" if hosts else "")]
    for m in kernels["memory_bound"]:
        both = "eager_steady_us" in m
        jit = m.get("triton_jit_steady_us")
        host = (f" {m['triton_host_us']:.0f} ({m['triton_host_us'] - m['triton_python_us']:.0f})"
                + (f", {m['triton_steady_us']:.0f}" if both else "") + (f" [{jit:.0f}]" if jit is not None else "")
                + f" / {m['eager_host_us']:.0f}"
                + (f", {m['eager_steady_us']:.0f}" if both else "") + " |") if "triton_host_us" in m else " - |"
        lines.append(f"| {m['op']} | {m['triton_gbps']:.0f} | {100 * m['triton_of_copy']:.0f}% | "
                     f"{m['eager_gbps']:.0f} | {_vs_target(m['triton_of_copy'], t['memory_bound_of_copy'])} |"
                     + (host if hosts else ""))
    if kernels.get("layer_host"):
        from .kernels import layer_host_lines
        head, *rest = layer_host_lines(kernels["layer_host"])
        lines += ["", f"Host cost of {head}", ""] + [f"- {r.strip()}" for r in rest]
    if baseline is not None:
        lines += baseline_lines(*baseline, kernels)
    report = [r for r in kernels.get("compiler", []) if "registers" in r]
    if report:
        lines += ["", "Compiler report (attention, d128; spills: bytes stored, and the local loads and stores per "
                      "iteration of each key-block loop where there are any):", "",
                  "| kernel | registers | spilled B | spill ops per loop iteration | shared KB | wgmma |",
                  "|---|---:|---:|---|---:|---|"]
        lines += [f"| {r.get('kernel', '?')} | {r['registers']} | {r.get('spill_stores', 0)} | "
                  + (", ".join(map(str, r["mma_loop_spill_ops"])) if any(r.get("mma_loop_spill_ops") or []) else "-")
                  + f" | {r.get('shared_bytes', 0) // 1024} | {'yes' if r.get('wgmma') else 'no'} |"
                  for r in sorted(report, key=lambda r: r.get("kernel", ""))]
    lines.append("")
    return lines


def pipeline_markdown(pipeline: dict) -> list[str]:
    """The pipeline part (the stages taking turns on the whole GPU): every mode per point, and the host's part."""
    lines = ["## Pipeline on one GPU (in-process link, emulated bandwidth)", "",
             f"{pipeline['model']} shape with {pipeline['layers']} of its {pipeline['model_layers']} layers, "
             f"random weights, {pipeline['dtype']}, chunks of {pipeline['chunk_size']}, median of "
             f"{pipeline['repeats']} runs." + ("" if pipeline.get("complete", True) else
                                                f" **Incomplete: {_why_incomplete(pipeline)}; these are the "
                                                "points it measured.**"), "",
             "| S | link | L | unchunked ms | naive ms | chunked ms | overlapped ms | overlapped vs naive | "
             "exposed comm ms | outputs match |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in pipeline["points"]:
        m = p["modes"]
        get = lambda mode, key="ttft_ms": m[mode][key] if mode in m else float("nan")  # noqa: E731
        lines.append(f"| {p['stages']} | {p['link']} | {p['prompt_len']} | {get('unchunked'):.1f} | "
                     f"{get('naive'):.1f} | {get('chunked'):.1f} | {get('overlapped'):.1f} | "
                     f"{get('overlapped', 'speedup_vs_naive'):.2f}x | {get('overlapped', 'exposed_comm_ms'):.1f} | "
                     f"{'yes' if all(v['outputs_match'] for v in m.values()) else 'NO'} |")
    lines.append("")
    lines += _paragraph(host_lines(pipeline))
    return lines


def sweeps_markdown(sweeps: dict) -> list[str]:
    """The tuning sweeps: each shape's launcher config against the fastest correct one."""
    from .kernels import sweep_lines
    lines = ["## Tuning sweeps (the suite's time left over)", "",
             "Each shape's launch configs timed against float64-checked outputs: the launcher's choice against "
             "the fastest correct config." + ("" if sweeps.get("complete") else
                                               " **Incomplete: configs past the time left are not run.**"), ""]
    lines += [f"- {line}" for line in sweep_lines(sweeps)] + [""]
    return lines


# The order of the summary's sections, and the key a part's document has once it measured anything.
SUMMARY_ORDER = ("tests", "kernels", "pipeline", "partitions", "graphs", "ragged", "nccl", "sweeps")
SHOWN_KEY = dict(tests="exit_code", kernels="attention", pipeline="points", partitions="points", graphs="points",
                 ragged="points", nccl="points", sweeps="attention")


def summary_markdown(env: dict, tests: dict | None, kernels: dict | None, pipeline: dict | None,
                     partitions: dict | None = None, ragged: dict | None = None, sweeps: dict | None = None,
                     graphs: dict | None = None, baseline: tuple[str, dict] | None = None,
                     nccl: dict | None = None) -> str:
    """The short table a person reads first; every figure comes from the part documents (and, for the kernels, a
    committed run on the same GPU: `baseline`, from `committed_baseline`)."""
    lines = [f"# GPU suite: {env.get('device')}", "",
             f"driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, Triton "
             f"{env.get('triton')}, commit `{env.get('git_commit')}`", ""]
    parts = dict(tests=tests, kernels=kernels, partitions=partitions, graphs=graphs, pipeline=pipeline, ragged=ragged,
                 nccl=nccl, sweeps=sweeps)
    failed = [(name, d["part_failed"]) for name, d in parts.items() if d is not None and d.get("part_failed")]
    if failed:  # the suite went on after these; what they measured before failing is below
        lines += [f"- **{name} part FAILED**: {why} (traceback in `{name}.json`)" for name, why in failed] + [""]
    # a part that failed before measuring anything (no figure under its key) has nothing more to show
    shown = {name: d for name, d in parts.items() if d is not None and SHOWN_KEY[name] in d}
    writers = dict(tests=tests_markdown, kernels=lambda d: kernels_markdown(d, baseline), pipeline=pipeline_markdown,
                   partitions=partitions_markdown, graphs=lambda d: graphs_markdown(d, shown.get("partitions")),
                   ragged=ragged_markdown, nccl=nccl_markdown, sweeps=sweeps_markdown)
    for name in SUMMARY_ORDER:
        if name in shown:
            lines += writers[name](shown[name])
    return "\n".join(lines)

