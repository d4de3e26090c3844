"""python -m bench [options]             the demo: every prefill mode on one prompt (a sweep with several lengths)
python -m bench compare BASE NEW       regression check between two results files
python -m bench simulate               projection of S GPUs over NVLink / PCIe / Ethernet (roofline + simulator)
python -m bench kernels                kernel benchmark (needs a GPU; says so and exits 0 without one)
python -m bench gpu-suite --out DIR    every GPU test and benchmark in one pass (refuses without CUDA)
python -m bench machine-check          how steady this machine is: host stops and slow-downs (CPU timings vary by them)

The last line of stdout is a one-line JSON summary."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _positive(kind):
    def parse(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


def run_parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset name or Hugging Face directory (default: small)")
    ap.add_argument("--stages", type=_positive(int), default=2, help="pipeline stages S (default: 2)")
    ap.add_argument("--prompt-len", type=_int_list, default=[2048],
                    help="prompt length(s); several, comma-separated, make a sweep (default: 2048)")
    ap.add_argument("--chunk-size", type=_positive(int), default=None, help="uniform chunk size (default: 128)")
    ap.add_argument("--chunks", type=_int_list, default=None, help="explicit chunk sizes, comma-separated")
    ap.add_argument("--chunk-plan", choices=["uniform", "balanced"], default="uniform",
                    help="uniform: --chunk-size tokens per chunk; balanced: boundaries chosen by the planner from a "
                         "cost model fitted on this pipeline first (implies --simulate)")
    ap.add_argument("--granularity", type=_positive(int), default=32,
                    help="balanced plan: chunk boundaries are multiples of this (default: 32)")
    ap.add_argument("--simulate", action="store_true",
                    help="fit per-stage chunk costs and the link on calibration runs interleaved with the measured "
                         "ones, then report the simulator's TTFT next to each measured one (and draw both timelines)")
    ap.add_argument("--batch", type=_positive(int), default=1, help="batch size B (default: 1)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16" if gpu else "float32")
    ap.add_argument("--link", choices=["gloo", "nccl", "inprocess"], default=None,
                    help="stage link (default: gloo processes on CPU; nccl with >= S GPUs; inprocess on one GPU)")
    ap.add_argument("--bandwidth-gbps", type=_positive(float), default=None, help="emulated link bandwidth, GB/s")
    ap.add_argument("--latency-us", type=float, default=0.0, help="emulated per-send latency, microseconds")
    ap.add_argument("--ops", choices=["torch", "triton"], default="triton" if gpu else "torch",
                    help="op backend (default: triton on GPU, torch on CPU)")
    ap.add_argument("--modes", default="unchunked,naive,chunked,overlapped", help="modes to run, comma-separated")
    ap.add_argument("--repeats", type=_positive(int), default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first (default: 1)")
    ap.add_argument("--threads", type=_positive(int), default=None, help="torch threads per stage process")
    ap.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    return ap


def main_run(argv) -> int:
    from pipeline import MODES, PipelineSpec, chunk_plan, resolve_config
    from pipeline.launch import LINKS  # noqa: F401

    from .harness import SCHEMA_VERSION, check_output_dir, environment, run_point, table, write_results
    from .timeline import write_chrome_trace, write_sweep_png, write_timeline_png

    args = run_parser().parse_args(argv)
    fail = lambda msg: sys.exit(f"bench: {msg}")  # noqa: E731
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            fail(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    gpu = torch.cuda.is_available()
    link = args.link or ("gloo" if not gpu else "nccl" if torch.cuda.device_count() >= args.stages else "inprocess")
    device = "cuda" if gpu and link != "gloo" else "cpu"
    if args.ops == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        fail("--ops triton on CPU needs TRITON_INTERPRET=1 (Triton's interpreter: correct, far from fast)")
    if link == "gloo" and args.stages > (os.cpu_count() or 1):
        fail(f"{args.stages} stage processes need {args.stages} cores, this machine has {os.cpu_count()}")
    if link == "nccl" and torch.cuda.device_count() < args.stages:
        fail(f"nccl with {args.stages} stages needs {args.stages} GPUs, found {torch.cuda.device_count()}")
    if args.chunks and len(args.prompt_len) > 1:
        fail("--chunks fits one prompt length; use --chunk-size for a sweep")
    if args.chunk_plan == "balanced" and (args.chunks or args.chunk_size):
        fail("--chunk-plan balanced chooses the chunks itself: drop --chunks / --chunk-size")
    if args.chunk_plan == "balanced" and args.granularity > min(args.prompt_len):
        fail(f"--granularity {args.granularity} is larger than the prompt ({min(args.prompt_len)} tokens)")
    simulate = args.simulate or args.chunk_plan == "balanced"
    try:
        cfg = resolve_config(args.model)
        spec = PipelineSpec(source=str(args.model), stages=args.stages, link=link, ops=args.ops, dtype=args.dtype,
                            device=device, bandwidth_gbps=args.bandwidth_gbps, latency_s=args.latency_us * 1e-6,
                            threads=args.threads)
        spec.validate()
        plans = {L: chunk_plan(L, None if args.chunks else (args.chunk_size or 128), args.chunks)
                 for L in args.prompt_len}
        for L in args.prompt_len:
            if L + 1 > cfg.max_seq_len:
                fail(f"prompt length {L} (+1 decode token) exceeds the model's max_seq_len {cfg.max_seq_len}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    out = Path(args.out)
    check_output_dir(out)
    plan_calibration = None
    if args.chunk_plan == "balanced":
        from pipeline.costs import stage_max
        from pipeline.plan import plan_chunks
        from .harness import bytes_per_token, calibrate
        print(f"calibrating: fitting chunk costs on this pipeline at L={max(args.prompt_len)} to plan the chunks ...",
              file=sys.stderr)
        costs, link_model, plan_calibration = calibrate(spec, max(args.prompt_len), args.batch)
        for L in args.prompt_len:
            plans[L] = plan_chunks(L, stage_max(costs), spec.num_stages, args.granularity, link=link_model,
                                   bytes_per_token=bytes_per_token(spec, args.batch)).chunks
    config = dict(model=str(args.model), stages=args.stages, link=link, device=device, ops=args.ops,
                  dtype=args.dtype, batch=args.batch, prompt_lens=args.prompt_len, chunk_size=args.chunk_size or 128,
                  chunks=args.chunks, chunk_plan=args.chunk_plan, granularity=args.granularity,
                  plans={str(L): plans[L] for L in args.prompt_len}, bandwidth_gbps=args.bandwidth_gbps,
                  latency_us=args.latency_us,
                  repeats=args.repeats, warmup=args.warmup, modes=modes,
                  threads_per_stage=args.threads or max(1, (os.cpu_count() or 1) // args.stages))
    points = []
    t0 = time.time()
    from tqdm import tqdm
    bar = tqdm(args.prompt_len, desc="prompt lengths", disable=len(args.prompt_len) == 1, file=sys.stderr)
    for L in bar:
        bar.set_postfix(L=L)
        points.append(run_point(spec, L, args.batch, plans[L], args.repeats, args.warmup, modes, simulate=simulate))
    env = environment()
    doc = dict(schema_version=SCHEMA_VERSION, environment=env, config=config, units=_units(),
               wall_s=time.time() - t0, plan_calibration=plan_calibration,
               points=[{k: v for k, v in p.items() if not k.endswith("timelines") and k != "records"} for p in points])
    last = points[-1]
    title = (f"{args.model}, S={args.stages}, L={last['prompt_len']}, B={args.batch}, {link}, {args.dtype}, "
             f"{env['device']}")
    write_timeline_png(last["timelines"], out / "timeline.png", title)
    write_chrome_trace(last["timelines"], out / "trace.json")
    if simulate:  # measured and simulated, mode by mode, on one time axis
        write_timeline_png({f"{mode} {kind}": p[mode] for mode in last["timelines"]
                            for kind, p in (("measured", last["timelines"]), ("simulated", last["sim_timelines"]))},
                           out / "timeline_vs_sim.png", title + " — measured vs simulated")
    if len(points) > 1:
        write_sweep_png(points, out / "sweep.png", title)
    path = write_results(out, doc)  # last: results.json only exists once everything else is written
    for p in points:
        print(f"\nL={p['prompt_len']} B={args.batch}  ({title})")
        print(table(p))
    summary = dict(results=str(path), device=env["device"],
                   ttft_ms={m: round(v["ttft_ms"], 2) for m, v in last["modes"].items()},
                   outputs_match=all(v["outputs_match"] for p in points for v in p["modes"].values()),
                   bytes_exact=all(v["bytes_exact"] for p in points for v in p["modes"].values()))
    if "naive" in last["modes"] and "overlapped" in last["modes"]:
        summary["overlapped_vs_naive"] = round(last["modes"]["overlapped"]["speedup_vs_naive"], 3)
        summary["overlapped_measured_over_bound"] = round(last["modes"]["overlapped"]["measured_over_bound"], 3)
    if simulate:
        summary["sim_over_measured"] = {m: round(v["sim_over_measured"], 3) for m, v in last["modes"].items()}
        summary["replay_over_measured"] = {m: round(v["replay_over_measured"], 3) for m, v in last["modes"].items()}
    print(f"\nresults: {path}  timeline: {out / 'timeline.png'}  trace: {out / 'trace.json'}")
    print(json.dumps(summary))
    return 0 if summary["outputs_match"] and summary["bytes_exact"] else 1


def _units():
    from .harness import UNITS
    return UNITS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compare":
        ap = argparse.ArgumentParser(prog="python -m bench compare", description="regression check")
        ap.add_argument("base")
        ap.add_argument("new")
        ap.add_argument("--threshold", type=float, default=0.10, help="allowed TTFT slow-down (default 0.10)")
        ap.add_argument("--force", action="store_true", help="compare runs of different devices/configurations")
        a = ap.parse_args(argv[1:])
        from .compare import compare
        return compare(a.base, a.new, a.threshold, a.force)
    if argv and argv[0] == "simulate":
        from .simulate import main as simulate_main
        return simulate_main(argv[1:])
    if argv and argv[0] == "gpu-suite":
        from .gpu_suite import main as suite_main
        return suite_main(argv[1:])
    if argv and argv[0] == "machine-check":
        ap = argparse.ArgumentParser(prog="python -m bench machine-check",
                                     description="Spins on one core and reports the share of 10 ms windows the host "
                                                 "stopped the machine in, and of the rest the share in which it ran "
                                                 "at less than half its usual speed: CPU timings of this machine "
                                                 "vary by that much (see pipeline/pauses.py).")
        ap.add_argument("--seconds", type=_positive(float), default=5.0, help="how long to spin (default: 5)")
        a = ap.parse_args(argv[1:])
        from pipeline.pauses import spin_windows, steadiness
        try:
            report = steadiness(*spin_windows(a.seconds))
        except ValueError as e:
            sys.exit(f"bench machine-check: {e}; spin longer (--seconds)")
        print(json.dumps({k: round(v, 3) for k, v in report.items()}))
        return 0
    if argv and argv[0] == "kernels":
        from .kernels import main as kernels_main
        return kernels_main(argv[1:])
    return main_run(argv)


if __name__ == "__main__":
    sys.exit(main())
