"""Projection: what S GPUs over a given link would give, before having them. Roofline chunk costs for a device
preset (`pipeline.costs`), chunk boundaries from the planner, and the discrete-event simulator for the naive,
chunked and overlapped schedules; compared with T_compute / S, the ideal split of the unchunked prefill.

    python -m bench simulate [--models llama3-8b,llama3-70b] [--device h100] [--stages 2,4,8]
                             [--links nvlink,pcie5,100gbe] [--prompt-lens 4096,...,131072] [--out DIR]

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
                    f"{r['ideal_ms']:.0f}", f"{r['naive_ms']:.0f}", f"{r['chunked_ms']:.0f}",
                    f"{r['overlapped_ms']:.0f}", f"{r['overlapped_over_ideal']:.2f}",
                    f"{r['overlapped_exposed_comm_ms']:.1f}", "yes" if r["comm_hidden"] else "NO",
                    f"{r['min_gbps_to_hide']:.1f}", "yes" if r["fits_in_memory"] else "no"))
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in out)


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
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{model} — {link}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("prompt length (tokens)")
            if j == 0:
                ax.set_ylabel("TTFT / (T_compute / S)")
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.suptitle(title + "  (x: communication no longer hidden)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from pipeline.config import PRESETS
    from pipeline.costs import DEVICES, LINK_PRESETS, get_device, link_preset

    from .harness import write_json
    from .options import Parser, int_list, integer, name_list, out_path, output_dir, say
    ap = Parser(prog="python -m bench simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=name_list([m for m in PRESETS if m not in ("tiny", "small")] + ["tiny", "small"],
                                               "model preset"), default=["llama3-8b", "llama3-70b"],
                    help="model presets (default: llama3-8b,llama3-70b)")
    ap.add_argument("--device", choices=list(DEVICES), default="h100", help="device preset (default: h100)")
    ap.add_argument("--stages", type=int_list(1), default=[2, 4, 8], help="pipeline stages (default: 2,4,8)")
    ap.add_argument("--links", type=name_list(["nvlink", *LINK_PRESETS], "link preset"),
                    default=["nvlink", "pcie5", "100gbe"], help="link presets (default: nvlink,pcie5,100gbe)")
    ap.add_argument("--prompt-lens", type=int_list(1), default=[4096, 8192, 16384, 32768, 65536, 131072],
                    help="prompt lengths (default: 4k-128k); each must fit the model's context")
    ap.add_argument("--batch", type=integer(1), default=1, help="batch size (default: 1)")
    ap.add_argument("--chunk-plan", choices=["balanced", "uniform"], default="balanced")
    ap.add_argument("--chunk-size", type=integer(1), default=2048, help="uniform plan: tokens per chunk")
    ap.add_argument("--granularity", type=integer(1), default=None, help="balanced plan: boundary step (default L/64, "
                                                                         "at least 128)")
    ap.add_argument("--out", type=out_path, default=Path("bench_out/simulate"), help="output directory")
    args = ap.parse_args(argv)
    cfgs = {m: PRESETS[m] for m in args.models}
    dev = get_device(args.device)
    for m, cfg in cfgs.items():  # every size checked before any work
        for S in args.stages:
            if S > cfg.num_layers:
                raise ValueError(f"{m} has {cfg.num_layers} layers, cannot make {S} stages")
        for L in args.prompt_lens:
            if L > cfg.max_seq_len:  # a prefill of the whole context is fine: the TTFT needs no further position
                raise ValueError(f"prompt length {L} exceeds {m}'s context of {cfg.max_seq_len} tokens")
    if args.granularity and args.granularity > min(args.prompt_lens):
        raise ValueError(f"--granularity {args.granularity} is larger than the shortest prompt "
                         f"({min(args.prompt_lens)} tokens)")
    from tqdm import tqdm
    grid = [(m, S, link, L) for m in args.models for S in args.stages for link in args.links for L in args.prompt_lens]
    with output_dir(args.out) as out:
        say(f"bench simulate: {len(grid)} points ({dev.name} roofline, {args.chunk_plan} chunks)")
        rows = [project(cfgs[m], S, args.device, link, L, args.batch, args.chunk_plan, args.chunk_size,
                        args.granularity)
                for m, S, link, L in tqdm(grid, desc="simulating", file=sys.stderr, disable=not sys.stderr.isatty())]
        title = f"projection: {dev.name}, batch {args.batch}, bf16, {args.chunk_plan} chunks (roofline model)"
        write_plot(rows, out / "simulate.png", title)
        doc = dict(kind="projection (model figures, not measurements)", device=dataclasses.asdict(dev),
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


if __name__ == "__main__":
    sys.exit(main())
