"""python -m bench [options]             the demo: every prefill mode on one prompt (a sweep with several lengths)
python -m bench compare BASE NEW       regression check between two results files
python -m bench simulate               projection of S GPUs over NVLink / PCIe / Ethernet (roofline + simulator)
python -m bench kernels                kernel benchmark (needs a GPU; says so and exits 0 without one)
python -m bench gpu-suite --out DIR    every GPU test and benchmark in one pass (refuses without CUDA)
python -m bench machine-check          how steady this machine is: host stops and slow-downs (CPU timings vary by them)

The last line of stdout is a one-line JSON summary. Progress goes to stderr. Under
`torchrun --nproc-per-node S -m bench ...` each process runs one stage (env:// rendezvous); rank 0 reports.
Exit codes: 0 done, 1 a check failed (outputs differ, a regression), 2 bad input or a failed run,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 the reader of stdout went away (`| head`), quietly."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from .options import Parser, int_list, integer, name_list, number, out_path, output_dir, reader_gone, say

SUBCOMMANDS = ("compare", "simulate", "kernels", "gpu-suite", "machine-check")


def run_parser():
    import torch

    from pipeline import MODES
    from pipeline.compress import CODECS
    from pipeline.tp import TP_BOUNDARIES, TP_COMMS
    gpu = torch.cuda.is_available()
    projected = "projections to GPUs that are not here: python -m bench simulate {}"  # simulate's options
    ap = Parser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                hints={"--gpus": projected.format("--gpus N"),
                       "--device": "the demo runs on CUDA when present, on the CPU without it or with --link gloo; "
                                   + projected.format("--device h100|h200|a100")})
    ap.add_argument("--model", default="small", help="preset name or Hugging Face directory (default: small)")
    ap.add_argument("--stages", type=integer(1), default=None,
                    help="pipeline stages S (default: 2; under torchrun the number of processes)")
    ap.add_argument("--tp", type=integer(1), default=1,
                    help="tensor-parallel ranks per stage T (default 1): S x T processes, two all-reduces per layer")
    ap.add_argument("--tp-comm", type=name_list(TP_COMMS, "tp-comm"), default=["serial"],
                    help="with --tp > 1, how the TP ranks combine partial sums, comma-separated to compare them in one "
                         "run: serial (a blocking all-reduce after attention and after the MLP), overlap (each chunk "
                         "in two token halves, one half's all-reduce running while the other half computes) or "
                         "sequence (reduce-scatter + all-gather, norms on 1/T of the tokens). Default: serial")
    ap.add_argument("--tp-boundary", type=name_list(TP_BOUNDARIES, "tp-boundary"), default=["matching"],
                    help="with --tp > 1 and --stages > 1, how stage boundaries cross, comma-separated to compare in "
                         "one run: matching (each TP rank sends to the next stage's same TP rank, T sends), broadcast "
                         "(TP rank 0 sends once, the next stage broadcasts it over its TP group) or sharded (each TP "
                         "rank sends 1/T of the tokens to its peer, the next stage all-gathers them; with --tp-comm "
                         "sequence each rank sends the slice it holds and the next computes on it as it arrives, "
                         "neither stage all-gathering). Default: matching")
    ap.add_argument("--compress", type=name_list(CODECS, "compression"), default=["none"],
                    help="what crosses each stage boundary, comma-separated to compare in one run: none (the hidden "
                         "state as computed), bf16 (float32 models: half the bytes) or fp8 (e4m3 with a float32 scale "
                         "per token: H + 4 bytes a token). Lossy rows report their logit difference against the "
                         "unchunked baseline and the same mode uncompressed. Default: none")
    ap.add_argument("--prompt-len", type=int_list(1, tokens=True), default=None,
                    help="prompt length(s); several, comma-separated, make a sweep (default: 2048, or the longest the "
                         "model takes where its context is shorter); k = 1024 here and in every token count: 4k, 32k")
    ap.add_argument("--rows", type=int_list(1, unique=False, tokens=True), default=None,
                    help="a ragged batch instead of one [B, L] prompt: one prompt per row of these lengths, "
                         "comma-separated (e.g. 300,1000,2048), run as a serving stack runs them: each row in chunks "
                         "of --chunk-size, the rows' chunks packed into one step, the KV cache in pages. Every mode "
                         "is checked row by row against the row run alone; each row's TTFT is reported")
    ap.add_argument("--token-budget", type=int_list(1, none_word="none", tokens=True), default=None,
                    help="with --rows, a serving scheduler's per-step budget: the chunked and overlapped steps pack up "
                         "to this many tokens each, filled from the rows in order (first come, first served; no row "
                         "capped); comma-separated to compare plans in one run, 'none' for per-row chunks of "
                         "--chunk-size (e.g. none,384)")
    ap.add_argument("--page-size", type=integer(1), default=None,
                    help="with --rows, positions per KV cache page (default: 16)")
    ap.add_argument("--chunk-size", type=integer(1, tokens=True), default=None,
                    help="uniform chunk size (default: 128); with --rows each row's tokens per step")
    ap.add_argument("--chunks", type=int_list(1, unique=False, tokens=True), default=None,
                    help="explicit chunk sizes, comma-separated, summing to the prompt length")
    ap.add_argument("--chunk-plan", choices=["uniform", "balanced"], default="uniform",
                    help="uniform: --chunk-size tokens per chunk; balanced: boundaries chosen by the planner from a "
                         "cost model fitted on this pipeline first (implies --simulate; with --tp, the all-reduces of "
                         "the first --tp-comm)")
    ap.add_argument("--granularity", type=integer(1), default=None,
                    help="balanced plan: chunk boundaries are multiples of this (default: 32, a shorter prompt's "
                         "length; for prompts past 32k tokens L/1024, the finest the planner takes)")
    ap.add_argument("--simulate", action="store_true",
                    help="fit per-stage chunk costs and the link on calibration runs interleaved with the measured "
                         "ones, then report the simulator's TTFT next to each measured one (and draw both timelines); "
                         "with --rows each packed step is costed row by row from the dense fit")
    ap.add_argument("--batch", type=integer(1), default=None, help="batch size B (default: 1)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16" if gpu else "float32")
    ap.add_argument("--link", choices=["gloo", "nccl", "inprocess"], default=None,
                    help="stage link (default: gloo processes on CPU, inprocess where the cores are fewer than the "
                         "processes; nccl with >= S GPUs; inprocess on one GPU)")
    ap.add_argument("--sm-partitions", action="store_true",
                    help="one GPU as S smaller ones: each stage computes on its own disjoint set of SMs (CUDA green "
                         "contexts), the links on the SMs left over (implies --link inprocess)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="in-process on a GPU: each stage's chunk is captured in a CUDA graph the first time it runs "
                         "and replayed after, so the one host thread that enqueues every stage launches a chunk "
                         "as one graph (warm-up runs capture; not with --rows or --tp)")
    ap.add_argument("--bandwidth-gbps", type=number(0.0), default=None, help="emulated link bandwidth, GB/s")
    ap.add_argument("--latency-us", type=number(0.0, strict=False, maximum=1e7), default=0.0,
                    help="emulated per-send latency, microseconds (default: 0)")
    ap.add_argument("--tp-bandwidth-gbps", type=number(0.0), default=None,
                    help="with --tp > 1, an emulated TP interconnect: each collective takes its ring bytes on the "
                         "wire / this bandwidth (GB/s) more, the host free meanwhile")
    ap.add_argument("--tp-latency-us", type=number(0.0, strict=False, maximum=1e7), default=0.0,
                    help="emulated per-collective latency of the TP interconnect, microseconds (default: 0)")
    ap.add_argument("--ops", choices=["torch", "triton"], default="triton" if gpu else "torch",
                    help="op backend (default: triton on GPU, torch on CPU)")
    ap.add_argument("--modes", type=name_list(MODES, "mode"), default=list(MODES),
                    help=f"modes to run, comma-separated (default: {','.join(MODES)}); the unchunked baseline is "
                         "always run once to check the outputs")
    ap.add_argument("--repeats", type=integer(1), default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--warmup", type=integer(0), default=1, help="untimed runs per mode first (default: 1)")
    ap.add_argument("--threads", type=integer(1), default=None,
                    help="torch threads per stage (its process, or its thread with --link inprocess on CPU; default: "
                         "cores // (stages x tp))")
    ap.add_argument("--out", type=out_path, default=Path("bench_out"), help="output directory (default: bench_out)")
    return ap


def stages_given(args, world, tp) -> int:
    """--stages, or under torchrun the processes / tp, or 2."""
    return args.stages or (world // tp if world is not None else 2)


def main_run(argv) -> int:
    import torch

    from pipeline import PipelineSpec, chunk_plan, resolve_config
    from pipeline.schedule import DEFAULT_CHUNK_SIZE
    from pipeline.checks import DTYPES
    from pipeline.compress import check_codec
    from pipeline.plan import check_granularity, default_granularity
    from pipeline.procs import torchrun_rank, usable_cores

    from .calibration import bytes_per_token
    from .harness import Progress, check_point_fits, run_point
    from .report import model_shape, report, results_doc, write_pictures, write_results
    args = run_parser().parse_args(argv)
    rank = torchrun_rank()
    lead = rank in (None, 0)  # prints and writes (rank 0 of torchrun, or the one process here)
    world = int(os.environ.get("WORLD_SIZE", "1")) if rank is not None else None
    gpu = torch.cuda.is_available()
    tp = args.tp
    if world is not None and world % tp:
        raise ValueError(f"--tp {tp} does not divide torchrun's {world} processes (S x T processes, one per rank)")
    if args.compress != ["none"] and stages_given(args, world, tp) == 1:
        raise ValueError(f"--compress {','.join(args.compress)} compresses what crosses stage boundaries: it needs "
                         f"--stages 2 or more")
    for z in args.compress:
        check_codec(z, DTYPES[args.dtype])
    if args.tp_boundary != ["matching"] and (tp == 1 or stages_given(args, world, tp) == 1):
        raise ValueError(f"--tp-boundary {','.join(args.tp_boundary)} chooses how a boundary crosses between "
                         f"tensor-parallel stages: it needs --tp 2 or more and --stages 2 or more")
    if tp == 1 and (args.tp_bandwidth_gbps is not None or args.tp_latency_us):
        raise ValueError("--tp-bandwidth-gbps / --tp-latency-us emulate the interconnect between tensor-parallel "
                         "ranks: they need --tp 2 or more")
    if tp == 1 and args.tp_comm != ["serial"]:
        raise ValueError(f"--tp-comm {','.join(args.tp_comm)} chooses how tensor-parallel ranks combine their sums: "
                         f"it needs --tp 2 or more")
    stages = stages_given(args, world, tp)
    if world is not None and stages * tp != world:
        raise ValueError(f"--stages {stages} x --tp {tp} differs from torchrun's {world} processes: one process runs "
                         f"one (stage, TP rank)")
    if args.sm_partitions and not gpu:
        raise ValueError("--sm-partitions splits a CUDA GPU's SMs between the stages (green contexts); there is no "
                         "CUDA GPU here")
    if args.sm_partitions and args.link not in (None, "inprocess"):
        raise ValueError(f"--sm-partitions runs every stage in this process on one GPU: drop --link {args.link}")
    cores = usable_cores()
    # the default demo runs on a one-core machine too, in-process (said once the checks pass); --link gloo is refused
    fallback = args.link is None and not gpu and world is None and stages * tp > cores
    link = args.link or ("inprocess" if fallback else "gloo" if not gpu else "inprocess" if args.sm_partitions
                         else "nccl" if torch.cuda.device_count() >= stages else "inprocess")
    if args.cuda_graphs and not (gpu and link == "inprocess" and tp == 1 and args.rows is None):
        why = ("there is no CUDA GPU here" if not gpu else f"drop --link {link}" if link != "inprocess"
               else "drop --tp" if tp != 1 else "a ragged batch (--rows) runs its steps eagerly: drop --rows")
        raise ValueError(f"--cuda-graphs replays each stage's chunks from CUDA graphs in the in-process GPU driver: "
                         f"{why}")
    if args.cuda_graphs and args.warmup == 0:
        raise ValueError("--cuda-graphs captures each chunk's graph in the warm-up runs (a capture is an eager run and "
                         "then some): give --warmup 1 or more")
    if world is not None and world > 1 and link == "inprocess":
        raise ValueError("--link inprocess runs every stage in one process: launch it without torchrun")
    device = "cuda" if gpu and link != "gloo" else "cpu"
    if link == "gloo" and world is None and stages * tp > cores:
        raise ValueError(f"{stages * tp} stage processes ({stages} stage{'s' if stages > 1 else ''} x tp {tp}) need "
                         f"{stages * tp} cores, this process may run on {cores}: --link inprocess runs the stages as "
                         f"threads of one process, taking turns on the cores")
    # one thread per stage is always allowed (the default where stages outnumber the cores: in-process they share)
    fair = max(1, cores // (stages * tp))
    if args.threads is not None and device == "cpu" and world is None and args.threads > fair:
        raise ValueError(f"--threads {args.threads} x {stages * tp} stage{'s' if stages * tp > 1 else ''} (stages x tp) "
                         f"is {args.threads * stages * tp} torch threads on {cores} cores: the stages would time each "
                         f"other's turns on the cores; choose --threads {fair} or less")
    if link == "nccl" and world is None and torch.cuda.device_count() < stages * tp:
        raise ValueError(f"nccl with {stages} stages x tp {tp} needs {stages * tp} GPUs, found "
                         f"{torch.cuda.device_count()}")
    if args.rows is not None:  # one ragged batch: its own lengths and steps
        for flag, given in (("--prompt-len", args.prompt_len is not None), ("--batch", args.batch is not None),
                            ("--chunks", args.chunks is not None), ("--chunk-plan balanced",
                                                                    args.chunk_plan == "balanced")):
            if given:
                raise ValueError(f"--rows {','.join(map(str, args.rows))} is one ragged batch (its rows' lengths, "
                                 f"each in chunks of --chunk-size): drop {flag}")
    if args.token_budget is not None and args.rows is None:
        budgets = ",".join(str(b).lower() for b in args.token_budget)
        raise ValueError(f"--token-budget {budgets} packs the steps of a ragged batch: it goes with --rows (one prompt "
                         f"takes --chunk-size or --chunks)")
    if args.page_size is not None and args.rows is None:
        raise ValueError(f"--page-size {args.page_size} sets the KV pages of a ragged batch: it goes with --rows (one "
                         f"prompt runs on a dense cache)")
    if args.granularity is not None and args.chunk_plan != "balanced":
        raise ValueError(f"--granularity {args.granularity} sets the step of the balanced planner's chunk boundaries: "
                         "it goes with --chunk-plan balanced")
    args.batch = args.batch or 1
    cfg = resolve_config(args.model)
    # the default prompt: 2048 tokens, or the longest the model takes (its context less the decode token)
    args.prompt_len = [max(args.rows)] if args.rows else args.prompt_len or [max(1, min(2048, cfg.max_seq_len - 1))]
    if args.chunks and len(args.prompt_len) > 1:
        raise ValueError("--chunks fits one prompt length; use --chunk-size for a sweep")
    if args.chunks and args.chunk_size:
        raise ValueError("give --chunk-size or --chunks, not both")
    if args.chunk_plan == "balanced" and (args.chunks or args.chunk_size):
        raise ValueError("--chunk-plan balanced chooses the chunks itself: drop --chunks / --chunk-size")
    # the balanced planner's boundary step per prompt length: the one given, or 32 (coarser past 32k tokens)
    granularity = {L: args.granularity or default_granularity(L) for L in args.prompt_len}
    if args.chunk_plan == "balanced":
        for L in sorted(args.prompt_len, reverse=True):  # the longest names the finest step allowed
            check_granularity(L, granularity[L], "--granularity")
    simulate = args.simulate or args.chunk_plan == "balanced"
    if simulate:
        from pipeline.costs import check_calibration_length
        for L in args.prompt_len:
            check_calibration_length(L, "--simulate" if args.simulate else "--chunk-plan balanced",
                                     "a longest row" if args.rows else "a prompt")
    for b, n in enumerate(args.rows or []):
        if n + 1 > cfg.max_seq_len:
            raise ValueError(f"--rows: row {b} has {n} tokens (+1 decode token), past the model's {cfg.context}")
    if args.page_size is not None and args.page_size > cfg.max_seq_len:
        raise ValueError(f"--page-size {args.page_size} is more positions than the model's context (max_seq_len "
                         f"{cfg.max_seq_len}): choose 1 to {cfg.max_seq_len} (serving stacks use 16 to 256)")
    for L in args.prompt_len:
        if L + 1 > cfg.max_seq_len:
            raise ValueError(f"prompt length {L} (+1 decode token) exceeds the model's {cfg.context}: give "
                             f"--prompt-len {cfg.max_seq_len - 1} or less")
    spec = PipelineSpec(source=str(args.model), stages=stages, link=link, ops=args.ops, dtype=args.dtype,
                        device=device, bandwidth_gbps=args.bandwidth_gbps, latency_s=args.latency_us * 1e-6,
                        threads=args.threads, sm_partitions=args.sm_partitions, tp=tp,
                        tp_comm=args.tp_comm[0], tp_bandwidth_gbps=args.tp_bandwidth_gbps,
                        tp_latency_s=args.tp_latency_us * 1e-6, page_size=args.page_size or 16,
                        cuda_graphs=args.cuda_graphs)
    spec.validate()  # the checkpoint too (config, safetensors headers), before any process starts
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE  # with --rows, each row's tokens per step
    plans = {L: chunk_plan(L, None if args.chunks else chunk_size, args.chunks) for L in args.prompt_len}
    for L in args.prompt_len:  # every point's memory before the first runs: a sweep's last point refused late wastes it
        check_point_fits(spec, L, args.batch, plans[L], args.modes, rows=args.rows, chunk_size=chunk_size,
                         token_budgets=args.token_budget)
    config = dict(model=str(args.model), stages=stages, tp=tp, tp_comm=args.tp_comm, compress=args.compress,
                  tp_boundary=args.tp_boundary, link=link, device=device, ops=args.ops, dtype=args.dtype,
                  batch=len(args.rows) if args.rows else args.batch,
                  prompt_lens=None if args.rows else args.prompt_len, rows=args.rows,
                  page_size=args.page_size or 16 if args.rows else None, token_budget=args.token_budget,
                  chunk_size=chunk_size,
                  chunks=args.chunks, chunk_plan=args.chunk_plan,
                  granularity=(next(iter(granularity.values())) if len(set(granularity.values())) == 1
                               else {str(L): g for L, g in granularity.items()}),
                  bandwidth_gbps=args.bandwidth_gbps, latency_us=args.latency_us,
                  tp_bandwidth_gbps=args.tp_bandwidth_gbps, tp_latency_us=args.tp_latency_us, repeats=args.repeats,
                  warmup=args.warmup, modes=args.modes, torchrun=world is not None, sm_partitions=args.sm_partitions,
                  cuda_graphs=args.cuda_graphs,
                  threads_per_stage=args.threads or fair)
    progress = Progress(enabled=lead)
    if fallback:
        print(f"bench: {stages * tp} stage processes would need {stages * tp} cores, this process may run on {cores}: "
              f"running the stages in-process instead, as threads sharing the cores (less overlap than on {stages * tp} "
              f"cores)",
              file=sys.stderr)
    out = args.out
    with output_dir(out) if lead else contextlib.nullcontext(out):
        plan_calibration = None
        if args.chunk_plan == "balanced":
            from pipeline.costs import stage_max
            from pipeline.plan import plan_chunks

            from .calibration import calibrate
            L = max(args.prompt_len)
            progress.phase(f"calibration: fitting chunk costs on this pipeline at L={L} to plan the chunks")
            fitted = calibrate(spec, L, args.batch, progress=progress.runs(f"calibration L={L}"))
            if fitted is not None:
                costs, link_model, plan_calibration = fitted
                for L in args.prompt_len:
                    plans[L] = plan_chunks(L, stage_max(costs), spec.num_stages, granularity[L], link=link_model,
                                           bytes_per_token=bytes_per_token(spec, args.batch)).chunks
            if world is not None:  # every stage runs the plan rank 0 made
                import torch.distributed as dist
                box = [plans, plan_calibration]
                dist.broadcast_object_list(box, src=0)
                plans, plan_calibration = box
        # a ragged batch's steps are in each mode's figures ("chunks": the packed tokens of each step)
        config["plans"] = None if args.rows else {str(L): plans[L] for L in args.prompt_len}
        points, t0 = [], time.time()
        for i, L in enumerate(args.prompt_len):
            label = (f"rows={','.join(map(str, args.rows))}" if args.rows else
                     f"L={L}" + (f" (point {i + 1} of {len(args.prompt_len)})" if len(args.prompt_len) > 1 else ""))
            progress.phase(f"{label}: {len(args.modes)} mode(s)"
                           + (f" x {len(args.tp_comm)} tp-comm(s)" if len(args.tp_comm) > 1 else "")
                           + (f" x {len(args.compress)} compression(s)" if len(args.compress) > 1 else "")
                           + (f" x {len(args.tp_boundary)} tp-boundaries" if len(args.tp_boundary) > 1 else "") + f" x ({args.warmup} warm-up + {args.repeats} timed) "
                           f"runs on {stages} stage(s), {link}, model {args.model}")
            point = run_point(spec, L, args.batch, plans[L], args.repeats, args.warmup, args.modes,
                              simulate=simulate, progress=progress.runs(label), tp_comms=args.tp_comm,
                              compress=args.compress, tp_boundaries=args.tp_boundary, rows=args.rows,
                              # a ragged batch: per-row chunks of this size (token budgets cap no row)
                              chunk_size=chunk_size, token_budgets=args.token_budget)
            if point is None:  # a torchrun rank other than 0: it ran its stage, rank 0 reports
                continue
            points.append(point)
            complete = i + 1 == len(args.prompt_len)
            # after every point: a sweep cut short (Ctrl-C, a failure) keeps the points it finished
            write_results(out, results_doc(config, points, plan_calibration, time.time() - t0, complete=complete,
                                           model=model_shape(cfg)))
        if not lead:
            _finish_torchrun()
            return 0
        write_pictures(out, points, config, simulate)
        path = out / "results.json"
        summary = report(points, path, config, simulate)
    _finish_torchrun()
    print(json.dumps(summary))
    return 0 if summary["outputs_match"] and summary["bytes_exact"] else 1


def _finish_torchrun() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- the small subcommands ----------------------------------------------------------------------------------------

def main_compare(argv) -> int:
    ap = Parser(prog="python -m bench compare",
                description="Compares two results files (python -m bench) or two kernel benchmark files "
                            "(python -m bench kernels / gpu-suite): the ratio of every figure, a verdict for each, "
                            "exit 1 on a regression past the threshold or a failed correctness check, 2 for runs "
                            "of different devices or configurations (unless --force).")
    ap.add_argument("base", help="results.json or kernels.json, or the directory a run wrote it to (--out)")
    ap.add_argument("new", help="the same kind of file (or directory), of the run to check")
    ap.add_argument("--threshold", type=number(0.0, strict=False, maximum=100.0), default=0.10,
                    help="allowed slow-down of a timing, as a fraction (default 0.10: 10%%)")
    ap.add_argument("--force", action="store_true", help="compare runs of different devices/configurations")
    a = ap.parse_args(argv)
    from .compare import compare
    return compare(a.base, a.new, a.threshold, a.force)


def main_machine_check(argv) -> int:
    ap = Parser(prog="python -m bench machine-check",
                description="Spins on one core and reports the share of 10 ms windows the host stopped the machine "
                            "in, and of the rest the share in which it ran at less than half its usual speed: CPU "
                            "timings of this machine vary by that much (see bench/pauses.py).")
    ap.add_argument("--seconds", type=number(0.0, maximum=3600.0), default=5.0,
                    help="how long to spin, up to an hour (default: 5)")
    a = ap.parse_args(argv)
    from .pauses import spin_windows, steadiness
    try:
        report = steadiness(*spin_windows(a.seconds))
    except ValueError as e:
        raise ValueError(f"{e}; spin longer (--seconds)") from None
    print(json.dumps({k: round(v, 3) for k, v in report.items()}))
    return 0


def _dispatch(argv) -> int:
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:  # the demo takes no positional argument
        import difflib
        meant = difflib.get_close_matches(argv[0].replace("_", "-"), SUBCOMMANDS, n=1, cutoff=0.6)
        raise ValueError(f"unknown subcommand {argv[0]!r}" + (f"; did you mean {meant[0]}?" if meant else "")
                         + f" (subcommands: {', '.join(SUBCOMMANDS)}; none runs the demo)")
    if argv and argv[0] in SUBCOMMANDS:
        from pipeline.procs import torchrun_rank
        if torchrun_rank() is not None:
            raise ValueError(f"bench {argv[0]} runs no pipeline: run it without torchrun")
    if argv and argv[0] == "compare":
        return main_compare(argv[1:])
    if argv and argv[0] == "simulate":
        from .simulate import main as simulate_main
        return simulate_main(argv[1:])
    if argv and argv[0] == "gpu-suite":
        from .gpu_suite import main as suite_main
        return suite_main(argv[1:])
    if argv and argv[0] == "machine-check":
        return main_machine_check(argv[1:])
    if argv and argv[0] == "kernels":
        from .kernels import main as kernels_main
        return kernels_main(argv[1:])
    return main_run(argv)


def main(argv=None) -> int:
    """Every subcommand behind one error policy: bad input or a failed run is one line on stderr and exit 2 (no
    traceback; BENCH_TRACEBACK=1 shows it), Ctrl-C 130 and SIGTERM 143 after every stage has been stopped."""
    from pipeline.procs import PipelineError, Terminated, interrupts_raise
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "bench" + (f" {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "")
    try:
        with interrupts_raise():
            code = _dispatch(argv)
            sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is then a BrokenPipeError handled below
            return code
    except KeyboardInterrupt as e:
        kind, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        say(f"{prog}: {kind}; every stage process was stopped" + _kept(argv))
        return code
    except (ValueError, TypeError, OSError, PipelineError) as e:
        if isinstance(e, BrokenPipeError) and reader_gone():  # `| head` has read what it wanted: stop, quietly
            return 141  # what a shell reports for a process that SIGPIPE killed (`cat`, `grep`)
        if os.environ.get("BENCH_TRACEBACK") == "1":
            traceback.print_exc()
        text = str(e).strip() or type(e).__name__
        first, _, rest = text.partition("\n")
        if isinstance(e, PipelineError) and rest:  # the first cause; a stage's traceback only when asked for
            first += " (BENCH_TRACEBACK=1 shows the stage's traceback)"
        say(f"{prog}: {first}")
        if os.environ.get("BENCH_TRACEBACK") == "1" and rest:
            say(rest)
        return 2
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if os.environ.get("BENCH_TRACEBACK") == "1":
            raise
        say(f"{prog}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(BENCH_TRACEBACK=1 shows the traceback; please report it)")
        return 1


def _kept(argv) -> str:
    """After an interrupt: what the results file written during this run keeps."""
    from .report import LAST_WRITTEN
    if not LAST_WRITTEN or LAST_WRITTEN["complete"]:
        return ""
    return f"; {LAST_WRITTEN['path']} keeps the {LAST_WRITTEN['points']} point(s) finished"
