"""Projection: what S GPUs over a given link would give, before having them. Roofline chunk costs for a device
preset (`pipeline.costs`), chunk boundaries from the planner, and the discrete-event simulator for the naive,
chunked and overlapped schedules; compared with T_compute / S, the ideal split of the unchunked prefill.

    python -m bench simulate [--models llama3-8b,llama3-70b] [--device h100] [--stages 2,4,8]
                             [--links nvlink,pcie5,100gbe] [--prompt-lens 4096,...,131072] [--out DIR]

With --gpus N,...: tensor x pipeline parallelism instead. Every (T, S) with T·S = N GPUs, each stage split over T
ranks with two all-reduces per layer (ring: latency + 2(T-1)/T bytes / bandwidth), serial or overlapped ISO-style
(`pipeline.costs.TPCost`); defaults llama3-8b/70b/405b over nvlink, pcie5 and ib-ndr. Every link, the stage sends
and the all-reduces alike, is the named fabric, unless --tp-link names the all-reduces' own for TP groups that fit
in a node of --node-gpus GPUs (nvlink, say; wider groups cross nodes over the named fabric). Where T > 1 and
S > 1 it also says how a stage boundary should cross: T matching sends, one send and a broadcast inside the
receiving stage, or T sends of 1/T of the tokens and an all-gather, over a NIC per GPU or one shared NIC.

Writes simulate.json and simulate.png; the last stdout line is a one-line JSON summary. These are model figures,
not measurements: the device rates and efficiencies they assume are in pipeline/costs.py and in the JSON.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

HIDDEN_TOLERANCE = 0.05  # communication counts as hidden while it adds less than 5% to the overlapped TTFT


def project(cfg, S: int, device: str, link_name: str, L: int, batch: int = 1, plan: str = "balanced",
            chunk_size: int = 2048, granularity: int | None = None) -> dict:
    """One projected point: every mode's TTFT, the ideal T_compute / S, and how much bandwidth hiding needs."""
    from pipeline.costs import get_device, link_preset, roofline_stage_costs, stage_max
    from pipeline.link import LinkModel
    from pipeline.plan import plan_chunks
    from pipeline.schedule import chunk_plan
    from pipeline.simulate import simulate
    dev = get_device(device)
    costs = roofline_stage_costs(cfg, S, dev, batch)
    link = link_preset(link_name, dev)
    bpt = batch * cfg.hidden_size * 2  # bf16 hidden state
    if plan not in ("balanced", "uniform"):
        raise ValueError(f"plan must be 'balanced' or 'uniform', got {plan!r}")
    if plan == "balanced":
        g = granularity or max(128, L // 64)
        chunks = plan_chunks(L, stage_max(costs), S, min(g, L), link=link, bytes_per_token=bpt).chunks
    else:
        chunks = chunk_plan(L, chunk_size)
    t_compute = sum(float(c(L, 0)) for c in costs)
    row = dict(model=cfg_name(cfg), stages=S, link=link_name, link_gbps=link.bandwidth_gbps, prompt_len=L, plan=plan,
               chunks=len(chunks), first_chunk=chunks[0], last_chunk=chunks[-1], t_compute_ms=t_compute * 1e3,
               ideal_ms=t_compute / S * 1e3,
               fits_in_memory=max(c.memory_bytes(L) for c in costs) <= dev.memory_gb * 1e9)
    for mode in ("naive", "chunked", "overlapped"):
        sim = simulate(mode, chunks, costs, link, bpt)
        row[f"{mode}_ms"] = sim.makespan_s * 1e3
        row[f"{mode}_over_ideal"] = sim.makespan_s / (t_compute / S)
        row[f"{mode}_exposed_comm_ms"] = sim.metrics["exposed_comm_s"] * 1e3
    free = simulate("overlapped", chunks, costs, LinkModel(), bpt).makespan_s
    row["overlapped_free_link_ms"] = free * 1e3
    row["comm_hidden"] = row["overlapped_ms"] <= (1 + HIDDEN_TOLERANCE) * free * 1e3
    row["min_gbps_to_hide"] = _min_bandwidth(chunks, costs, bpt, link.latency_s, free)
    return row


def _min_bandwidth(chunks, costs, bpt, latency_s, free_s) -> float:
    """The least link bandwidth (GB/s, bisection on a log scale) at which overlapped sends still add less than
    HIDDEN_TOLERANCE to the TTFT."""
    from pipeline.link import LinkModel
    from pipeline.simulate import simulate
    ok = lambda bw: simulate("overlapped", chunks, costs, LinkModel(bw, latency_s), bpt).makespan_s <= (  # noqa
        1 + HIDDEN_TOLERANCE) * free_s
    lo, hi = 0.01, 10_000.0
    if not ok(hi):
        return float("inf")
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


# ---- tensor parallelism x pipeline parallelism -----------------------------------------------------------------

TP_MODES = ("naive", "chunked", "overlapped")


def tp_splits(cfg, gpus: int) -> list[tuple[int, int]]:
    """Every (T, S) with T·S = gpus that the model allows: T splits the heads and MLP (`pipeline.tp.check_tp`), S is
    at most the layer count."""
    from pipeline.tp import check_tp
    out = []
    for T in range(1, gpus + 1):
        if gpus % T or gpus // T > cfg.num_layers:
            continue
        try:
            check_tp(cfg, T)
        except ValueError:
            continue
        out.append((T, gpus // T))
    return out


class _Tabled:
    """A cost evaluated once, vectorised, at the (x, p) a simulation asks for: lookups after that."""

    def __init__(self, cost, points):
        import numpy as np
        xs = np.array([x for x, _ in points], dtype=np.float64)
        ps = np.array([p for _, p in points], dtype=np.float64)
        self.table = dict(zip(points, np.broadcast_to(cost(xs, ps), xs.shape).tolist()))

    def __call__(self, x, p):
        return self.table[(int(x), int(p))]


BOUNDARIES = ("matching", "matching_shared_nic", "broadcast", "sharded", "sharded_shared_nic")


def project_tp(cfg, gpus: int, T: int, S: int, device: str, link_name: str, L: int, batch: int = 1,
               granularity: int | None = None, tp_link_name: str | None = None) -> dict:
    """One TP x PP point: `gpus` = T·S GPUs, stage sends on `link_name`, all-reduces on `tp_link_name` (default the
    same fabric). For serial and overlapped all-reduces (`pipeline.costs.TPCost` on one rank's roofline), a balanced
    chunk plan and every mode's TTFT; the same with a free TP interconnect, to tell how much of the reduce stays
    exposed. With T > 1 and S > 1, the overlapped pipeline's TTFT for each way a boundary can cross
    (`BOUNDARIES`): each TP rank to its peer over its own NIC ("matching", what the modes above assume), the same
    T sends sharing one NIC per stage ("matching_shared_nic": each at 1/T of the bandwidth), one send and a
    broadcast over the receiving stage's TP group ("broadcast", on the TP interconnect), or each TP rank sending
    1/T of the tokens to its peer and an all-gather in the receiving stage ("sharded", over a NIC per GPU or one
    shared NIC). Sequence parallelism ("sequence": reduce-scatters and all-gathers in turn) is projected too, with
    matching sends and with sharded ones, where each stage sends the slices it holds and keeps those it receives
    (no all-gather at either end: `sequence_sharded_ms`, `sequence_sharded_shared_nic_ms`)."""
    from pipeline.costs import (TPCost, attention_share, boundary_lane_bytes, get_device, link_preset,
                                roofline_stage_costs, stage_max)
    from pipeline.link import LinkModel
    from pipeline.plan import plan_chunks
    from pipeline.schedule import chunk_starts
    from pipeline.simulate import simulate
    dev = get_device(device)
    compute = roofline_stage_costs(cfg, S, dev, batch, tp=T)
    link = link_preset(link_name, dev)
    fabric = link_preset(tp_link_name or link_name, dev)
    # a ring all-reduce over T ranks takes 2(T-1) steps, each paying the link's latency
    tp_link = LinkModel(fabric.bandwidth_gbps, fabric.latency_s * 2 * (T - 1)) if T > 1 else LinkModel()
    # a pipelined ring broadcast or all-gather: T-1 hops of latency (the bytes per rank: `boundary_lane_bytes`)
    bcast_link = LinkModel(fabric.bandwidth_gbps, fabric.latency_s * (T - 1)) if T > 1 else LinkModel()
    bpt = batch * cfg.hidden_size * 2  # bf16 hidden state
    g = min(granularity or max(128, L // 64), L)
    full = sum(float(c(L, 0)) for c in roofline_stage_costs(cfg, 1, dev, batch))  # the unchunked prefill, 1 GPU
    layers = [c.layers for c in compute]
    shares = [attention_share(cfg, windowed=c.windowed / c.layers) for c in compute]  # where the first all-reduce is
    row = dict(model=cfg_name(cfg), gpus=gpus, tp=T, stages=S, link=link_name, link_gbps=link.bandwidth_gbps,
               tp_link=tp_link_name or link_name, tp_link_gbps=fabric.bandwidth_gbps,
               prompt_len=L, t_compute_1gpu_ms=full * 1e3, ideal_ms=full / gpus * 1e3,
               fits_in_memory=max(c.memory_bytes(L) for c in compute) <= dev.memory_gb * 1e9,
               boundary_bytes=L * bpt, allreduce_bytes_per_stage=[2 * n * L * bpt for n in layers])
    # reduce-scatters and all-gathers: pipelined rings of T-1 hops each
    half_link = bcast_link
    for comm in ("serial", "overlap", "sequence"):
        costs = [TPCost(c, n, T, half_link if comm == "sequence" else tp_link, bpt, comm, share,
                        closing="token" if s == S - 1 else "chunk")
                 for s, (c, n, share) in enumerate(zip(compute, layers, shares))]
        chunks = plan_chunks(L, stage_max(costs), S, g, link=link, bytes_per_token=bpt).chunks
        points = list(zip(chunks, chunk_starts(chunks))) + [(L, 0)]
        tabled = [_Tabled(c, points) for c in costs]
        row[f"chunks_{comm}"] = len(chunks)
        for mode in TP_MODES:
            row[f"{mode}_{comm}_ms"] = simulate(mode, chunks, tabled, link, bpt).makespan_s * 1e3
        if comm == "overlap":
            free = [_Tabled(TPCost(c, n, T, LinkModel(), bpt, comm, share), points)
                    for c, n, share in zip(compute, layers, shares)]
            row["overlapped_free_tp_ms"] = simulate("overlapped", chunks, free, link, bpt).makespan_s * 1e3
        shared = LinkModel(link.bandwidth_gbps / T, link.latency_s)
        if comm == "sequence" and T > 1 and S > 1:  # the slices each rank holds, sent as they are and kept
            kept = [_Tabled(dataclasses.replace(c, closing="token" if s == S - 1 else "none"), points)
                    for s, c in enumerate(costs)]
            row["sequence_sharded_ms"] = simulate("overlapped", chunks, kept, link, -(-bpt // T)).makespan_s * 1e3
            row["sequence_sharded_shared_nic_ms"] = simulate("overlapped", chunks, kept, shared,
                                                             -(-bpt // T)).makespan_s * 1e3
        if T > 1 and S > 1 and comm != "sequence":  # the boundary crossing T times (own NICs, one shared NIC), once
            # and broadcast, or in 1/T slices (T sends of 1/T: over one shared NIC as long as one whole send) and
            # all-gathered

            def collective(kind):
                return [_Tabled(dataclasses.replace(c, boundary_bytes_per_token=boundary_lane_bytes(kind, T, bpt)
                                                    if s else 0, boundary_link=bcast_link,
                                                    boundary_sliced=kind == "sharded"), points)
                        for s, c in enumerate(costs)]
            bcast, gather = collective("broadcast"), collective("sharded")
            row[f"boundary_{comm}_ms"] = dict(
                matching=row[f"overlapped_{comm}_ms"],
                matching_shared_nic=simulate("overlapped", chunks, tabled, shared, bpt).makespan_s * 1e3,
                broadcast=simulate("overlapped", chunks, bcast, link, bpt).makespan_s * 1e3,
                sharded=simulate("overlapped", chunks, gather, link, -(-bpt // T)).makespan_s * 1e3,
                sharded_shared_nic=simulate("overlapped", chunks, gather, shared,
                                            -(-bpt // T)).makespan_s * 1e3)
    best = min(((mode, comm) for mode in TP_MODES for comm in ("serial", "overlap", "sequence")),
               key=lambda mc: row[f"{mc[0]}_{mc[1]}_ms"])
    row["best_mode"], row["best_tp_comm"] = best
    row["best_ms"] = row[f"{best[0]}_{best[1]}_ms"]
    row["best_over_ideal"] = row["best_ms"] / row["ideal_ms"]
    # what the all-reduces still add to the overlapped pipeline once overlapped themselves
    row["reduce_exposed_ms"] = row["overlapped_overlap_ms"] - row["overlapped_free_tp_ms"]
    row["reduce_hidden"] = row["overlapped_overlap_ms"] <= (1 + HIDDEN_TOLERANCE) * row["overlapped_free_tp_ms"]
    if T > 1 and S > 1:  # which crossing, for the overlapped pipeline's faster all-reduce schedule
        comm = min(("serial", "overlap"), key=lambda c: row[f"overlapped_{c}_ms"])
        b = row[f"boundary_{comm}_ms"]
        row["boundary_tp_comm"] = comm
        own = {"matching": b["matching"], "broadcast": b["broadcast"], "sharded": b["sharded"]}
        shared_nic = {"matching": b["matching_shared_nic"], "broadcast": b["broadcast"],
                      "sharded": b["sharded_shared_nic"]}
        row["boundary_own_nics"] = min(own, key=own.get)
        row["boundary_shared_nic"] = min(shared_nic, key=shared_nic.get)
        row["broadcast_over_matching"] = b["broadcast"] / b["matching"]  # NIC per GPU: what the broadcast costs
        row["shared_nic_matching_over_broadcast"] = b["matching_shared_nic"] / b["broadcast"]  # one NIC: T sends
        row["sharded_over_matching"] = b["sharded"] / b["matching"]  # NIC per GPU: 1/T per link + an all-gather
        # sequence parallelism with sharded boundaries against the best crossing of the faster all-reduce schedule
        row["sequence_sharded_over_best_boundary"] = row["sequence_sharded_ms"] / min(own.values())
        row["sequence_sharded_shared_nic_over_best_boundary"] = (row["sequence_sharded_shared_nic_ms"]
                                                                 / min(shared_nic.values()))
    return row


def mark_fastest(rows: list[dict]) -> None:
    """rows[i]["fastest"]: the least TTFT among the (T, S) splits of its (model, GPUs, link, prompt length)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["gpus"], r["link"], r["prompt_len"]), []).append(r)
    for group in groups.values():
        winner = min(group, key=lambda r: (not r["fits_in_memory"], r["best_ms"]))
        for r in group:
            r["fastest"] = r is winner


def tp_table(rows: list[dict]) -> str:
    head = ("model", "GPUs", "TxS", "link", "L", "naive ms", "overl. ms", "overl.+ISO ms", "free-AR ms", "AR exposed",
            "hidden", "best", "best/ideal", "boundary", "SP+sh/bnd", "fits", "fastest")
    out = [head]
    for r in rows:
        L = r["prompt_len"]
        out.append((r["model"], str(r["gpus"]), f"{r['tp']}x{r['stages']}", r["link"],
                    f"{L // 1024}k" if L % 1024 == 0 else str(L), _ms(r['naive_serial_ms']),
                    _ms(r['overlapped_serial_ms']), _ms(r['overlapped_overlap_ms']),
                    _ms(r['overlapped_free_tp_ms']), _ms(r['reduce_exposed_ms']),
                    "yes" if r["reduce_hidden"] else "NO", f"{r['best_mode']}/{r['best_tp_comm']}",
                    f"{r['best_over_ideal']:.2f}", _boundary_cell(r),
                    f"{r['sequence_sharded_over_best_boundary']:.3f}" if "sequence_sharded_over_best_boundary" in r
                    else "-", "yes" if r["fits_in_memory"] else "no",
                    "<--" if r["fastest"] else ""))
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in out)


def _ms(x: float) -> str:
    """Milliseconds to three significant figures (whole ones from 100 up): a small model's 0.4 ms is not 0."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _worst(rows: list[dict], key: str) -> float | None:
    return round(max(r[key] for r in rows), 3) if rows else None


def _range(rows: list[dict], key: str) -> list[float] | None:
    return [round(min(r[key] for r in rows), 3), round(max(r[key] for r in rows), 3)] if rows else None


def _boundary_cell(r: dict) -> str:
    """Which boundary crossing wins with a NIC per GPU / one NIC per stage: m (matching sends), b (broadcast) or s
    (sharded sends, all-gathered)."""
    if "boundary_own_nics" not in r:
        return "-"
    return f"{r['boundary_own_nics'][0]}/{r['boundary_shared_nic'][0]}"


def cfg_name(cfg) -> str:
    from pipeline.config import PRESETS
    return next((name for name, c in PRESETS.items() if c == cfg), f"custom(H={cfg.hidden_size})")


def table(rows: list[dict]) -> str:
    head = ("model", "S", "link", "L", "chunks", "ideal ms", "naive ms", "chunked ms", "overl. ms", "overl/ideal",
            "exp.comm ms", "hidden", "≥GB/s", "fits")
    out = [head]
    for r in rows:
        L = r["prompt_len"]
        out.append((r["model"], str(r["stages"]), r["link"], f"{L // 1024}k" if L % 1024 == 0 else str(L), str(r["chunks"]),
                    _ms(r['ideal_ms']), _ms(r['naive_ms']), _ms(r['chunked_ms']),
                    _ms(r['overlapped_ms']), f"{r['overlapped_over_ideal']:.2f}",
                    _ms(r['overlapped_exposed_comm_ms']), "yes" if r["comm_hidden"] else "NO",
                    f"{r['min_gbps_to_hide']:.1f}", "yes" if r["fits_in_memory"] else "no"))
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in out)


def _style(ax, title: str, bottom: bool, left: bool, ylabel: str, ybase: int) -> None:
    """One panel of a projection grid: log axes, title, grid, axis labels on the outer panels."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=ybase)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if bottom:
        ax.set_xlabel("prompt length (tokens)")
    if left:
        ax.set_ylabel(ylabel)


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    stages = sorted({r["stages"] for r in rows})
    fig, axes = plt.subplots(len(models), len(links), figsize=(4.2 * len(links), 3.4 * len(models)), squeeze=False,
                             sharex=True, sharey=True)
    colors = dict(zip(stages, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for i, model in enumerate(models):
        for j, link in enumerate(links):
            ax = axes[i, j]
            for S in stages:
                pts = sorted((r["prompt_len"], r) for r in rows if (r["model"], r["link"], r["stages"]) ==
                             (model, link, S))
                xs = [x for x, _ in pts]
                ax.plot(xs, [r["overlapped_over_ideal"] for _, r in pts], color=colors[S], marker="o", ms=3,
                        label=f"overlapped S={S}")
                ax.plot(xs, [r["naive_over_ideal"] for _, r in pts], color=colors[S], ls="--", label=f"naive S={S}")
                for x, r in pts:
                    if not r["comm_hidden"]:  # where sends stop hiding behind compute
                        ax.plot(x, r["overlapped_over_ideal"], "x", color="black", ms=7)
            ax.axhline(1.0, color="gray", lw=0.8)
            _style(ax, f"{model} — {link}", i == len(models) - 1, j == 0, "TTFT / (T_compute / S)", ybase=2)
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.suptitle(title + "  (x: communication no longer hidden)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from pipeline.costs import DEVICES, LINK_PRESETS, get_device, link_preset
    from pipeline.model import resolve_config

    from .report import environment, write_json
    from .options import Parser, int_list, integer, name_list, out_path, output_dir, say
    ap = Parser(prog="python -m bench simulate", description=__doc__.split("\n\n")[0],
                hints={"--tp": "tensor parallelism here: --gpus N projects every T x S = N"})
    ap.add_argument("--models", type=model_list, default=None,
                    help="model presets or Hugging Face directories (their config.json: shapes only), comma-separated "
                         "(default: llama3-8b,llama3-70b; with --gpus also llama3-405b)")
    ap.add_argument("--device", choices=list(DEVICES), default="h100", help="device preset (default: h100)")
    ap.add_argument("--stages", type=int_list(1), default=None, help="pipeline stages (default: 2,4,8)")
    ap.add_argument("--gpus", type=int_list(1), default=None,
                    help="tensor x pipeline parallelism: GPU counts N, each split every way T x S = N the model allows "
                         "(e.g. 8,16); replaces --stages")
    ap.add_argument("--links", type=name_list(["nvlink", *LINK_PRESETS], "link preset"), default=None,
                    help="link presets (default: nvlink,pcie5,100gbe; with --gpus nvlink,pcie5,ib-ndr)")
    ap.add_argument("--tp-link", choices=["nvlink", *LINK_PRESETS], default=None,
                    help="with --gpus: the fabric of the all-reduces (and of boundary broadcasts) of TP groups that "
                         "fit in one node (--node-gpus), e.g. nvlink, while --links names the fabric between nodes "
                         "(default: the same as each link)")
    ap.add_argument("--node-gpus", type=integer(1), default=None,
                    help="with --tp-link: GPUs per node; a TP group wider than a node all-reduces over --links "
                         "(default: 8)")
    ap.add_argument("--prompt-lens", type=int_list(1, tokens=True),
                    default=[4096, 8192, 16384, 32768, 65536, 131072],
                    help="prompt lengths, k = 1024 (default: 4k,8k,16k,32k,64k,128k); each must fit the model's "
                         "context (a checkpoint's max_position_embeddings, even where running it here is capped "
                         "below for exact outputs: LongRoPE's original length)")
    ap.add_argument("--batch", type=integer(1), default=1, help="batch size (default: 1)")
    ap.add_argument("--chunk-plan", choices=["balanced", "uniform"], default="balanced")
    ap.add_argument("--chunk-size", type=integer(1, tokens=True), default=None,
                    help="uniform plan: tokens per chunk (default: 2048)")
    ap.add_argument("--granularity", type=integer(1), default=None, help="balanced plan: boundary step (default L/64, "
                                                                         "at least 128)")
    ap.add_argument("--out", type=out_path, default=Path("bench_out/simulate"), help="output directory")
    args = ap.parse_args(argv)
    if args.gpus and args.stages:
        raise ValueError("--gpus splits each GPU count every way T x S itself: drop --stages")
    if args.chunk_size is not None and args.chunk_plan != "uniform":
        raise ValueError(f"--chunk-size {args.chunk_size} sets the chunks of the uniform plan; the balanced planner "
                         "(the default) chooses its own: add --chunk-plan uniform (not with --gpus)")
    if args.granularity is not None and args.chunk_plan != "balanced":
        raise ValueError(f"--granularity {args.granularity} is the balanced planner's boundary step; the uniform plan "
                         "takes --chunk-size: drop --granularity")
    args.chunk_size = args.chunk_size or 2048
    if args.gpus:
        return main_tp(args)
    if args.tp_link:
        raise ValueError("--tp-link names the fabric of tensor parallelism's all-reduces: it needs --gpus")
    if args.node_gpus is not None:
        raise ValueError("--node-gpus says which TP groups --tp-link serves: it needs --gpus and --tp-link")
    args.models = args.models or ["llama3-8b", "llama3-70b"]
    args.stages = args.stages or [2, 4, 8]
    args.links = args.links or ["nvlink", "pcie5", "100gbe"]
    cfgs = {m: resolve_config(m) for m in args.models}
    labels = model_labels(args.models)
    dev = get_device(args.device)
    for m, cfg in cfgs.items():  # every size checked before any work
        for S in args.stages:
            if S > cfg.num_layers:
                raise ValueError(f"{m} has {cfg.num_layers} layers, cannot make {S} stages")
    check_grid(cfgs, args.prompt_lens, args.granularity)
    from tqdm import tqdm

    from pipeline.checks import count
    grid = [(m, S, link, L) for m in args.models for S in args.stages for link in args.links for L in args.prompt_lens]
    with output_dir(args.out) as out:
        say(f"bench simulate: {count(len(grid), 'point')} ({dev.name} roofline, {args.chunk_plan} chunks)")
        rows = [dict(project(cfgs[m], S, args.device, link, L, args.batch, args.chunk_plan, args.chunk_size,
                             args.granularity), model=labels[m])
                for m, S, link, L in tqdm(grid, desc="simulating", file=sys.stderr, disable=not sys.stderr.isatty())]
        title = f"projection: {dev.name}, batch {args.batch}, bf16, {args.chunk_plan} chunks (roofline model)"
        write_plot(rows, out / "simulate.png", title)
        doc = dict(kind="projection (model figures, not measurements)", environment=environment(),
                   device=dataclasses.asdict(dev),
                   links={name: dataclasses.asdict(link_preset(name, dev)) for name in args.links},
                   hidden_tolerance=HIDDEN_TOLERANCE, config={k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}, rows=rows)
        write_json(out / "simulate.json", doc)
    print(title)
    print(table(rows))
    print(f"\n'hidden': overlapped sends add < {100 * HIDDEN_TOLERANCE:.0f}% to TTFT; '≥GB/s': the least link "
          f"bandwidth for that ('inf': none does); 'fits': weights + KV cache of the largest stage fit in "
          f"{dev.memory_gb:.0f} GB.")
    print(f"results: {out / 'simulate.json'}  plot: {out / 'simulate.png'}")
    print(json.dumps(dict(results=str(out / "simulate.json"), points=len(rows),
                          hidden=sum(r["comm_hidden"] for r in rows),
                          worst_overlapped_over_ideal=round(max(r["overlapped_over_ideal"] for r in rows), 3))))
    return 0


def model_list(text: str) -> list[str]:
    """`--models`: comma-separated presets or Hugging Face directories, each read (and checked) here."""
    import argparse

    from pipeline.model import resolve_config

    from .options import name_list
    names = name_list(None, "model")(text)
    for name in names:
        try:  # the refusals the harness's --model gives: an unknown preset, a missing directory, a bad config.json
            resolve_config(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def model_labels(names: list[str]) -> dict[str, str]:
    """The rows' model names: a preset's own, a directory's last part (its whole path where two would look alike)."""
    from pipeline.config import PRESETS
    short = {m: m if m in PRESETS else Path(m).resolve().name or m for m in names}
    return {m: label if list(short.values()).count(label) == 1 else m for m, label in short.items()}


def check_grid(cfgs: dict, prompt_lens: list[int], granularity: int | None) -> None:
    """Every prompt length within every model's context (a prefill of the whole context is fine: the TTFT needs no
    further position), and a --granularity given suiting the planner at each (the default, L/64 but at least 128,
    does). A projection needs shapes only: a checkpoint whose context this project's model caps for exact outputs
    (LongRoPE's original length: `ModelConfig.context_limit`) is projected up to its own
    max_position_embeddings."""
    from pipeline.plan import check_granularity
    for m, cfg in cfgs.items():
        context = cfg.checkpoint_context or cfg.max_seq_len
        for L in prompt_lens:
            if L > context:
                raise ValueError(f"prompt length {L} exceeds {m}'s context of {context} tokens")
    for L in sorted(set(prompt_lens), reverse=True) if granularity else []:  # the longest names the finest step
        check_granularity(L, granularity, "--granularity")


def main_tp(args) -> int:
    """`simulate --gpus`: the TP x PP projection."""
    from pipeline.costs import get_device, link_preset
    from pipeline.model import resolve_config

    from .report import environment, write_json
    from .options import output_dir, say
    if args.chunk_plan != "balanced":
        raise ValueError("--gpus plans balanced chunks for each split: drop --chunk-plan uniform")
    if args.node_gpus is not None and not args.tp_link:
        raise ValueError("--node-gpus says which TP groups --tp-link serves: it needs --tp-link")
    args.node_gpus = args.node_gpus or 8
    models = args.models or ["llama3-8b", "llama3-70b", "llama3-405b"]
    links = args.links or ["nvlink", "pcie5", "ib-ndr"]
    cfgs = {m: resolve_config(m) for m in models}
    labels = model_labels(models)
    check_grid(cfgs, args.prompt_lens, args.granularity)
    splits = {(m, N): tp_splits(cfg, N) for m, cfg in cfgs.items() for N in args.gpus}
    for (m, N), options in splits.items():
        if not options:
            raise ValueError(f"{m} cannot be split over {N} GPUs (no T x S = {N} with T dividing its heads and MLP "
                             f"and S at most its {cfgs[m].num_layers} layers)")
    dev = get_device(args.device)
    grid = [(m, N, T, S, link, L) for m in models for N in args.gpus for T, S in splits[(m, N)] for link in links
            for L in args.prompt_lens]
    from tqdm import tqdm

    from pipeline.checks import count
    with output_dir(args.out) as out:
        say(f"bench simulate: {count(len(grid), 'TP x PP point')} ({dev.name} roofline, balanced chunks)")
        rows = [dict(project_tp(cfgs[m], N, T, S, args.device, link, L, args.batch, args.granularity,
                                args.tp_link if T <= args.node_gpus else None), model=labels[m])
                for m, N, T, S, link, L in tqdm(grid, desc="simulating", file=sys.stderr,
                                                 disable=not sys.stderr.isatty())]
        mark_fastest(rows)
        title = f"TP x PP projection: {dev.name}, batch {args.batch}, bf16, balanced chunks (roofline model)"
        write_tp_plot(rows, out / "simulate.png", title)
        doc = dict(kind="projection (model figures, not measurements)", environment=environment(),
                   device=dataclasses.asdict(dev),
                   links={name: dataclasses.asdict(link_preset(name, dev))
                          for name in dict.fromkeys([*links, *([args.tp_link] if args.tp_link else [])])},
                   hidden_tolerance=HIDDEN_TOLERANCE,
                   boundary_model="with T > 1 and S > 1, the overlapped pipeline with each boundary crossing as "
                                  "T matching sends over a NIC per GPU (the modes' figures), the same T sends "
                                  "sharing one NIC per stage (1/T of the bandwidth each), one send then a "
                                  "broadcast over the receiving stage's TP group (pipelined ring on the TP link: "
                                  "(T-1) x latency + bytes / bandwidth, before the chunk's compute), or T sends of "
                                  "1/T of the tokens (NIC per GPU or shared) then an all-gather ((T-1) x latency + "
                                  "(T-1)/T bytes / bandwidth)",
                   allreduce_model="ring over T ranks: 2(T-1) x link latency + 2(T-1)/T x payload / link bandwidth "
                                   "per all-reduce, 2 per layer; overlap: ISO token halves; sequence: 2 reduce-scatters "
                                   "+ 2 all-gathers per layer of the chunk padded to T rows, each (T-1) x latency + "
                                   "(T-1)/T x payload / bandwidth, plus the stage's closing all-gather: of the chunk, "
                                   "of its last token on the last stage, none where the stage hands on its slices "
                                   "(sequence_sharded_*: sharded boundaries, sent and kept as the ranks hold them) "
                                   "(pipeline.costs.TPCost)",
                   config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, rows=rows)
        write_json(out / "simulate.json", doc)
    print(title)
    print(tp_table(rows))
    print(f"\n'naive ms' / 'overl. ms': serial all-reduces; 'overl.+ISO ms': the overlapped pipeline with ISO-overlapped "
          f"all-reduces; 'free-AR ms': the same with a free TP interconnect; 'AR exposed': what the all-reduces still "
          f"add; 'hidden': under {100 * HIDDEN_TOLERANCE:.0f}%; 'best/ideal': the best mode over (1-GPU compute)/N; "
          f"'boundary': which crossing the overlapped pipeline prefers with a NIC per GPU / one NIC per stage "
          f"(m: each TP rank sends to its peer, b: one send, then a broadcast in the stage, s: each TP rank sends 1/T "
          f"of the tokens, then an all-gather); 'SP+sh/bnd': the overlapped pipeline with sequence parallelism and "
          f"sharded boundaries (each rank sends and keeps its slices, no all-gather at either end) over the best "
          f"crossing, NIC per GPU; "
          f"'fastest': the least TTFT among the splits that fit, per model, GPUs, link and prompt.")
    print(f"results: {out / 'simulate.json'}  plot: {out / 'simulate.png'}")
    fastest = {f"{r['model']} {r['gpus']} GPUs {r['link']} L={r['prompt_len']}":
               f"T{r['tp']}xS{r['stages']} {r['best_mode']}/{r['best_tp_comm']}" for r in rows if r["fastest"]}
    pp_tp = [r for r in rows if "boundary_own_nics" in r]
    print(json.dumps(dict(results=str(out / "simulate.json"), points=len(rows),
                          reduce_hidden=sum(r["reduce_hidden"] for r in rows), fastest=fastest,
                          boundary_wins={nic: {kind: sum(r[f"boundary_{nic}"] == kind for r in pp_tp)
                                               for kind in ("matching", "broadcast", "sharded")}
                                         for nic in ("own_nics", "shared_nic")},
                          worst_broadcast_over_matching=_worst(pp_tp, "broadcast_over_matching"),
                          best_sharded_over_matching=round(min(r["sharded_over_matching"] for r in pp_tp), 3)
                          if pp_tp else None,
                          worst_shared_nic_matching_over_broadcast=_worst(pp_tp,
                                                                          "shared_nic_matching_over_broadcast"),
                          sequence_sharded_over_best_boundary=dict(
                              own_nics=_range(pp_tp, "sequence_sharded_over_best_boundary"),
                              shared_nic=_range(pp_tp, "sequence_sharded_shared_nic_over_best_boundary")))))
    return 0


def write_tp_plot(rows: list[dict], path: Path, title: str) -> None:
    """Per model (rows) and link (columns): the best TTFT of each T x S split against the prompt length, on the
    largest GPU count; x where the overlapped all-reduces are no longer hidden."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(len(models), len(links), figsize=(4.2 * len(links), 3.4 * len(models)), squeeze=False,
                             sharex=True)
    for i, model in enumerate(models):
        N = max(r["gpus"] for r in rows if r["model"] == model)
        for j, link in enumerate(links):
            ax = axes[i, j]
            mine = [r for r in rows if (r["model"], r["link"], r["gpus"]) == (model, link, N)]
            for T, S in dict.fromkeys((r["tp"], r["stages"]) for r in mine):
                pts = sorted((r["prompt_len"], r) for r in mine if (r["tp"], r["stages"]) == (T, S))
                line, = ax.plot([x for x, _ in pts], [r["best_ms"] / 1e3 for _, r in pts], marker="o", ms=3,
                                label=f"T={T} S={S}")
                for x, r in pts:
                    if not r["reduce_hidden"]:
                        ax.plot(x, r["best_ms"] / 1e3, "x", color="black", ms=6)
            _style(ax, f"{model}, {N} GPUs — {link}", i == len(models) - 1, j == 0, "best TTFT (s)", ybase=10)
            ax.legend(fontsize=6)
    fig.suptitle(title + "  (x: all-reduces not hidden)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
