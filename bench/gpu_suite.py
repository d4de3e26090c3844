"""Everything a GPU can tell us, in one pass (a GPU is at hand only now and then: use it fully in one go).

    python -m bench gpu-suite --out bench/results/<gpu>/

Parts, in the order they run, each with its own JSON (GPU name, driver, torch and Triton versions, commit) and one
Markdown summary:
1. tests.json       the GPU-marked tests (compiled Triton, bf16 against float64, long prefixes, large batches);
2. kernels.json     chunk_attention vs every SDPA backend (TFLOP/s, bf16 GEMM ceiling), RMSNorm/RoPE/SwiGLU vs
                    torch eager (GB/s, copy ceiling), the compiler's resource report (registers, spills, wgmma);
3. partitions.json  one GPU as S GPUs: each stage on its own SMs (green contexts), S = 2 and 4, every mode,
                    Llama-3-8B shape with random weights (fewer layers, said in the results), prompts 4k-32k, link
                    emulated at NVLink, PCIe Gen5 and 100 GbE; overlapped against naive and the ideal S·C/(C+S−1),
                    the simulator against chunked and overlapped; timeline-partitions.png and its trace;
4. pipeline.json    the same harness with the stages taking turns on the whole GPU (S = 2 and 4, PCIe Gen5 and
                    100 GbE, 4k and 16k): how much of an emulated link overlapping hides; timeline.png, trace.json;
5. ragged.json      a serving-like batch on the SM partitions: rows of 1k, 4k and 16k tokens, the KV cache in
                    pages, per-row chunks and a 4096-token step budget, every mode; each row's TTFT, every row
                    checked against it run alone, the simulator against the measured runs; timeline-ragged.png;
6. nccl.json        on a machine of 2 GPUs or more (else a line saying why not, and no time reserved): the pipeline
                    over real links, one process per stage and TP rank on its own GPU, NCCL between them, every
                    mode at (S, T) = (2, 1), (4, 1), (1, 2), (2, 2) as far as the GPUs go, 4k and 16k tokens; with
                    T = 2, serial all-reduces against ISO-overlapped ones;
7. sweeps.json      in the time left: chunk_attention's tuning grid at the decode-like shapes (prefix 32k, chunks of
                    1 and 16: split counts and load depths first), then the paged kernel's at prefix 16k, chunk 2k;
                    each shape's launcher config against the fastest correct one;
8. graphs.json      the partitions part's 100 GbE points at 16k again, each stage's chunks replayed from CUDA graphs
                    (`pipeline.graphs`): against the eager points, whether the one host thread enqueueing every
                    stage was what limited them; timeline-graphs.png and its trace (last: see PARTS);
9. summary.md       the figures against their targets, by how much each misses; a part that failed, named
                    (it does not stop the parts after it).
Time plan (`part_deadlines`): --budget-s (default 540 s) ends the suite, so it fits one 10-minute call, and each part
stops starting new work early enough to leave the parts after it their reserve (`PART_RESERVE_S`): the test run is
stopped (the tests it finished are counted from its log), no further kernel shape or pipeline point starts. A part
cut short says so. A part still running HANG_GRACE_S (45 s) past the budget is stuck where Python cannot stop it
(a CUDA call that never returns): a watchdog then writes every thread's stack to hang.txt, the part's failure and
the summary, and ends the process with exit code 3 (and should the watchdog itself be blocked, faulthandler writes
the stacks to hang-fallback.txt and ends the process 15 s later). Without CUDA it refuses, saying why, before doing
anything.
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LINKS = ("100gbe", "pcie5", "nvlink")  # the targets' link first: a part cut short has measured it
# the order they run in: most wanted first, except graphs: captures untried on a GPU run last, so that an error
# that poisons the process's CUDA context cannot take the other parts with it
PARTS = ("tests", "kernels", "partitions", "pipeline", "ragged", "nccl", "sweeps", "graphs")
RAGGED_ROWS = ((1024, 4096, 16384),)  # the ragged part's batches (--quick: the first two rows)
RAGGED_BUDGETS = (None, 4096)


def gpu_environment() -> dict:
    from .report import environment
    env = environment()
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2 ** 30, 1),
                   sms=props.multi_processor_count)
    return env


# ---- part 1: GPU tests ------------------------------------------------------------------------------------------

def parse_junit(path: Path) -> dict:
    """Counts and failure names from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = dict(tests=0, failures=0, errors=0, skipped=0, time_s=0.0)
    failed = []
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(s.get(key, 0))
        counts["time_s"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def parse_verbose(text: str) -> dict:
    """Counts and failure names from pytest's -v lines ("tests/x.py::name PASSED"): what a run killed before its
    JUnit report still tells."""
    outcome = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL",
                                                                  "XPASS"):
            outcome[parts[0]] = parts[1]
    failed = [name for name, o in outcome.items() if o in ("FAILED", "ERROR")]
    return dict(tests=len(outcome), passed=sum(o in ("PASSED", "XPASS") for o in outcome.values()),
                skipped=sum(o in ("SKIPPED", "XFAIL") for o in outcome.values()), failed=failed)


def run_gpu_tests(out: Path, timeout_s: float | None = None) -> dict:
    """The GPU-marked tests in one process; after `timeout_s` the run is stopped and the tests it finished are
    counted from its log (`timed_out`, exit code None)."""
    xml = out / "gpu-tests.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton, not interpreted
    t0 = time.time()
    # -o addopts= drops the project's xdist options: the GPU tests run in one process, on the one GPU
    # a test still running after 120 s writes every thread's stack to the log (a hang shows where it is)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-o", "addopts=", "-o", "faulthandler_timeout=120",
           "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        stdout, code, timed_out = proc.stdout, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, timed_out = None, True
    if xml.exists() and not timed_out:
        doc = parse_junit(xml)
    else:
        doc = parse_verbose(stdout)
        if not doc["tests"]:
            doc["failed"] = ["pytest produced no report"]
    doc.update(exit_code=code, wall_s=time.time() - t0, output_tail=stdout[-3000:])
    if timed_out:
        doc["timed_out"] = (f"stopped after {timeout_s:.0f} s (the suite's time plan); the counts are the tests it "
                            "finished")
    return doc


# ---- part 2: kernels --------------------------------------------------------------------------------------------

def compiler_report(arch: int | None = None, only: str = "d128", shards: int = 8,
                    timeout_s: float = 600.0) -> list[dict]:
    """Registers, spills, shared memory and wgmma of the attention kernel's configurations for `arch` (default: this
    GPU's), the same report as `python -m kernels.aot`, compiled by `shards` processes at once; the rows printed
    within `timeout_s` (one clock for all shards)."""
    if arch is None:
        major, minor = torch.cuda.get_device_capability(0)
        arch = 10 * major + minor
    shards = max(1, min(shards, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-m", "kernels.aot", "--arch", str(arch), "--only", only,
                               "--shard", f"{i}/{shards}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(shards)]
    rows, errors = [], []
    end = time.time() + timeout_s
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, end - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for line in out.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if proc.returncode and not out.strip():
            errors.append((err or "")[-2000:])
    return rows or [dict(error="\n".join(errors) or "kernels.aot printed nothing")]


# ---- part 3: the pipeline on one GPU ----------------------------------------------------------------------------

def ideal_speedup(stages: int, chunks: int) -> float:
    """Overlapped over naive with equal chunks on equal stages and a free link: naive takes S·T, the pipeline
    (C + S − 1)·T / C, so S·C / (C + S − 1)."""
    return stages * chunks / (chunks + stages - 1)


def bench_pipeline(model: str = "llama3-8b", layers: int | None = 8, stages=(2, 4), links=PIPELINE_LINKS,
                   prompt_lens=(4096, 8192, 16384, 32768), chunk_size: int = 2048, repeats: int = 3, warmup: int = 1,
                   device: str = "cuda", dtype: str = "bfloat16", ops: str = "triton", sm_partitions: bool = False,
                   simulate: bool = False, deadline: float | None = None, progress=None, rows=(),
                   token_budgets=None, cuda_graphs: bool = False, stage_alone: bool = False) -> dict:
    """The harness's modes on one device with the in-process link, the link emulated at each preset's bandwidth;
    with `sm_partitions` each stage on its own SMs (one GPU as S), with `simulate` the simulator's figures too.
    `layers` cuts the model to that many layers (same shapes otherwise) to keep the run short. Points are skipped
    once `deadline` (time.time()) would be passed (the doc says so: complete False). With SM partitions, Triton
    kernels that cannot launch on a green context's stream make the part fall back to the torch ops (`ops_fallback`
    says why). `rows` adds ragged batches (a tuple of row lengths each, as `python -m bench --rows`: each row in
    chunks of `chunk_size`, the rows' chunks packed into one step, the KV cache in pages, every row checked against it
    run alone), each under every plan of `token_budgets` (None: per-row chunks; N: steps of N tokens).
    `cuda_graphs`: each stage's chunks replayed from CUDA graphs (`pipeline.graphs`; the warm-up runs capture).
    `stage_alone`: after a complete grid, `stage_compute_alone` for each S and prompt length (`stage_alone` in the
    doc: chunking's own cost, to set the pipelined runs' stage compute growth against).
    `progress(i, n, doc)` is called after each point with the document so far."""
    from pipeline import PipelineSpec
    from pipeline.config import PRESETS, get_preset
    from pipeline.costs import link_preset
    from pipeline.schedule import chunk_plan

    from .harness import run_point
    from .report import row_end_steps
    cfg = get_preset(model)
    name = model
    if layers is not None and layers != cfg.num_layers:
        name = f"{model}-{layers}layers"
        PRESETS[name] = cfg.replace(num_layers=layers, max_seq_len=max([*prompt_lens, *map(max, rows)]) + 1)
    rows = [tuple(r) for r in rows]
    points, last_timelines, fallback, stopped = [], None, None, None
    # a point is (S, link, L) for one prompt, (S, link, (L0, L1, ...)) for a ragged batch
    # link by link, prompt by prompt (as given: shortest first in the suite), every S at each: a part cut short by
    # its deadline has measured every S at the first link's short prompts (the targets') rather than one S everywhere
    grid = [(S, link, L) for link in links for L in (*prompt_lens, *rows) for S in stages]
    doc = dict(model=model, layers=layers or cfg.num_layers, model_layers=cfg.num_layers, chunk_size=chunk_size,
               repeats=repeats, warmup=warmup, dtype=dtype, ops=ops, sm_partitions=sm_partitions, points=points,
               complete=False, **({"cuda_graphs": True} if cuda_graphs else {}))
    if rows:
        doc["token_budgets"] = list(token_budgets or [None])
    longest = 0.0
    for i, (S, link, L) in enumerate(grid):
        if deadline is not None and time.time() + 1.5 * longest > deadline:
            stopped = f"stopped at the time budget after {i} of {len(grid)} points"
            break
        t_point = time.time()
        lm = link_preset(link)
        ragged = isinstance(L, tuple)
        chunks = None if ragged else chunk_plan(L, chunk_size)

        def measure(backend):
            spec = PipelineSpec(source=name, stages=S, link="inprocess", ops=backend, dtype=dtype, device=device,
                                bandwidth_gbps=lm.bandwidth_gbps, latency_s=lm.latency_s, sm_partitions=sm_partitions,
                                cuda_graphs=cuda_graphs)
            if ragged:
                return run_point(spec, 0, 1, [], repeats, warmup, simulate=simulate, rows=list(L),
                                 chunk_size=chunk_size, token_budgets=list(token_budgets or [None]))
            return run_point(spec, L, 1, chunks, repeats, warmup, simulate=simulate)
        try:
            point = measure(ops if fallback is None else "torch")
        except RuntimeError as e:
            if not sm_partitions or ops == "torch" or fallback is not None:
                raise
            fallback = (f"ops {ops!r} failed on the SM partitions' streams ({str(e).splitlines()[0][:200]}); "
                        "measured with the torch ops")
            point = measure("torch")
        timelines = point.pop("timelines")
        point.pop("records")  # the raw per-run records: the figures above are made from them
        point.pop("sim_timelines", None)
        shown = (max(stages), "pcie5" if "pcie5" in links else links[0],
                 sorted(prompt_lens)[len(prompt_lens) // 2] if prompt_lens else rows[0])
        if (S, link, L) == shown:
            what = f"rows {','.join(map(str, L))}" if ragged else f"L={L}"
            last_timelines = (f"{name}, S={S}, {what}, {link} emulated, {dtype}", timelines, row_end_steps(point))
        point.update(stages=S, link=link, link_gbps=lm.bandwidth_gbps, link_latency_s=lm.latency_s)
        m = point["modes"]
        if not ragged and "naive" in m and "overlapped" in m:  # unequal packed steps have no such simple ideal
            point["ideal_speedup"] = ideal_speedup(S, len(chunks))
            point["overlapped_of_ideal"] = m["overlapped"]["speedup_vs_naive"] / point["ideal_speedup"]
        points.append(point)
        longest = max(longest, time.time() - t_point)
        doc.update(complete=i + 1 == len(grid), ops_fallback=fallback)
        if progress:
            progress(i + 1, len(grid), doc)
    if stopped:
        doc.update(complete=False, stopped=stopped)
    elif stage_alone and not rows and points:  # one stage's chunks alone, per S and prompt length (about 15 s on an
        # H200 for the suite's grid: past the deadline, not started)
        if deadline is not None and time.time() + STAGE_ALONE_S > deadline:
            doc["stage_alone_skipped"] = "time budget"
        else:
            doc["stage_alone"] = [stage_compute_alone(name, S, L, chunk_size, device, dtype,
                                                      ops if fallback is None else "torch", sm_partitions)
                                  for S in stages
                                  for L in sorted({p["prompt_len"] for p in points if p["stages"] == S})]
    return doc, last_timelines


STAGE_ALONE_S = 30  # what `stage_compute_alone` over the partitions part's grid needs at most (a guess, with room)


def stage_compute_alone(model: str, stages: int, prompt_len: int, chunk_size: int, device: str = "cuda",
                        dtype: str = "bfloat16", ops: str = "triton", sm_partitions: bool = True, repeats: int = 3,
                        warmup: int = 1) -> dict:
    """One pipeline stage's compute with nothing else running: as many middle layers of `model` as the busiest of
    `stages` stages holds, on the first stage's SM partition (with `sm_partitions`) while the others idle, over the
    prompt whole (`whole_ms`, what naive's stage computes) and in chunks of `chunk_size` (`chunked_ms`), each the
    median of `repeats` timed runs (CUDA events on the partition's stream; the host clock on CPU). Their ratio,
    `chunking_cost`, is what chunking costs a stage on its own; the pipelined runs' stage compute growth over it is
    what running beside S - 1 busy stages costs on one GPU (shared HBM bandwidth and L2: S GPUs would not pay it).
    `max_abs_diff`: the chunked output against the whole one (the same computation)."""
    from pipeline import PipelineSpec
    from pipeline.config import get_preset
    from pipeline.model import load_model
    from pipeline.schedule import chunk_plan, chunk_starts
    cfg = get_preset(model)
    n = max(len(r) for r in PipelineSpec(source=model, stages=stages).layer_ranges(cfg))
    part = load_model(model, dtype, device, layers=range(1, 1 + min(n, cfg.num_layers - 1)), ops=ops)
    cache = part.new_cache(1, prompt_len)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, prompt_len, cfg.hidden_size, device=device, dtype=part.dtype, generator=g)
    chunks = chunk_plan(prompt_len, chunk_size)
    stream, plan = None, None
    if sm_partitions:
        from pipeline.partitions import SMPartitions
        partitions = SMPartitions(device, stages, 1)
        stream, plan = partitions.stage_streams[0], partitions.describe()
    if device != "cpu":  # the weights, cache and input were made on the default stream, which `stream` does not wait on
        torch.cuda.synchronize(device)
    outs = {}

    def whole():
        outs["whole"] = part.forward_chunk(x, 0, cache)

    def chunked():
        outs["chunked"] = torch.cat([part.forward_chunk(x[:, s:s + c], s, cache)
                                     for s, c in zip(chunk_starts(chunks), chunks)], dim=1)

    def timed(fn) -> float:
        ts = []
        for i in range(warmup + repeats):
            if device == "cpu":
                t = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t) * 1e3
            else:
                with torch.cuda.stream(stream or torch.cuda.current_stream()):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            if i >= warmup:
                ts.append(ms)
        return statistics.median(ts)
    whole_ms, chunked_ms = timed(whole), timed(chunked)
    diff = (outs["chunked"].double() - outs["whole"].double()).abs().max().item()
    return dict(stages=stages, prompt_len=prompt_len, chunk_size=chunk_size, layers=len(part.layers), ops=ops,
                whole_ms=whole_ms, chunked_ms=chunked_ms, chunking_cost=chunked_ms / whole_ms, max_abs_diff=diff,
                scale=outs["whole"].abs().max().item(), **({"sm_partitions": plan} if plan else {}))


# (stages, tp) of the nccl part, each on stages x tp GPUs: a point needing more GPUs than the machine has is left out
NCCL_POINTS = ((2, 1), (4, 1), (1, 2), (2, 2))
NCCL_TP_COMMS = ["serial", "overlap"]  # with tp > 1: serial all-reduces against ISO-overlapped ones, side by side


def bench_nccl(model: str = "llama3-8b", layers: int | None = 8, prompt_lens=(4096, 16384), chunk_size: int = 2048,
               repeats: int = 3, warmup: int = 1, dtype: str = "bfloat16", ops: str = "triton", gpus: int | None = None,
               link: str = "nccl", device: str = "cuda", deadline: float | None = None, progress=None) -> dict:
    """The pipeline over real links: one process per stage and TP rank, each on its own GPU, NCCL between them (no
    emulated delay: the machine's own NVLink or PCIe), every mode, at each (S, T) of NCCL_POINTS that `gpus`
    (default: the GPUs torch sees) can hold; with T > 1 serial all-reduces against ISO-overlapped ones
    (NCCL_TP_COMMS). Fewer than 2 GPUs: nothing runs and `skipped` says so. `link`/`device` let the tests run the
    same part over gloo on CPU. Points are skipped once `deadline` would be passed; `progress(i, n, doc)` after
    each."""
    from pipeline import PipelineSpec
    from pipeline.config import get_preset
    from pipeline.schedule import chunk_plan

    from .harness import run_point
    gpus = torch.cuda.device_count() if gpus is None else gpus
    full = get_preset(model)
    # the config itself, not a registered name: the stage processes are spawned and re-import the presets
    cfg = full.replace(num_layers=layers or full.num_layers, max_seq_len=max(prompt_lens) + 1)
    grid = [(S, T, L) for L in prompt_lens for S, T in NCCL_POINTS if S * T <= gpus and S <= cfg.num_layers]
    doc = dict(model=model, layers=cfg.num_layers, model_layers=full.num_layers, chunk_size=chunk_size,
               repeats=repeats, warmup=warmup, dtype=dtype, ops=ops, gpus=gpus, link=link, points=[],
               complete=False)
    if not grid:
        doc["skipped"] = (f"{gpus} GPU{'s' if gpus != 1 else ''} here; NCCL between stage processes needs 2 or more "
                          f"(points (S, T) = {', '.join(f'({S}, {T})' for S, T in NCCL_POINTS)} on S x T GPUs)")
        return doc
    if device == "cuda":
        torch.cuda.empty_cache()  # the earlier parts' cached blocks on GPU 0, where stage 0 now runs
    longest = 0.0
    for i, (S, T, L) in enumerate(grid):
        if deadline is not None and time.time() + 1.5 * longest > deadline:
            doc["stopped"] = f"stopped at the time budget after {i} of {len(grid)} points"
            return doc
        t_point = time.time()
        chunks = chunk_plan(L, chunk_size)
        spec = PipelineSpec(source=cfg, stages=S, tp=T, link=link, ops=ops, dtype=dtype, device=device)
        point = run_point(spec, L, 1, chunks, repeats, warmup, tp_comms=NCCL_TP_COMMS if T > 1 else None)
        for key in ("timelines", "records", "sim_timelines"):
            point.pop(key, None)
        point.update(stages=S, tp=T, gpus=S * T, link=link)
        m = point["modes"]
        if S > 1 and "naive" in m and "overlapped" in m:
            point["ideal_speedup"] = ideal_speedup(S, len(chunks))
            point["overlapped_of_ideal"] = m["overlapped"]["speedup_vs_naive"] / point["ideal_speedup"]
        doc["points"].append(point)
        longest = max(longest, time.time() - t_point)
        doc["complete"] = i + 1 == len(grid)
        if progress:
            progress(i + 1, len(grid), doc)
    return doc


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
              "exposed comm ms | all-reduce ms serial | overlapped ms, ISO reduce (its all-reduce ms) | outputs match |",
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


# ---- part 4: summary --------------------------------------------------------------------------------------------

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
    what S GPUs, each with its own HBM and L2, would give if the schedule held."""
    if doc.get("stage_alone_skipped"):
        return [f"- One stage alone on its partition: not measured ({doc['stage_alone_skipped']})."]
    alone = {(a["stages"], a["prompt_len"]): a for a in doc.get("stage_alone", [])}
    rows = [(alone[key]["chunking_cost"], g / alone[key]["chunking_cost"], p["overlapped_of_ideal"])
            for p in doc.get("points", []) if (key := (p["stages"], p.get("prompt_len"))) in alone
            and p.get("overlapped_of_ideal") is not None and (g := stage_compute_growth(p))]
    if not rows:
        return []
    a0 = next(iter(alone.values()))
    cost = [c for c, _, _ in rows]
    beside = [b for _, b, _ in rows]
    apart = [o * b for _, b, o in rows]
    return [f"- One stage alone on its partition (its layers, the prompt in chunks of {a0['chunk_size']} against "
            f"whole, nothing else running): chunking costs it {min(cost):.2f}-{max(cost):.2f}x; running beside the "
            f"other busy stages {min(beside):.2f}-{max(beside):.2f}x more (one GPU's HBM and L2 shared: S GPUs "
            f"would not pay it); without that, overlapped would reach {min(apart):.2f}-{max(apart):.2f} of the ideal."]


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
    """The launcher's host µs per call (with, in parentheses, Triton's launch path's part of it) against the same
    work replayed from a CUDA graph; 'launch-bound' where the host takes longer than the device."""
    host, graph, python = row.get("launch_host_us"), row.get("launch_graph_us"), row.get("launch_python_us")
    if host is None:
        return "-"
    host_text = f"{host:.0f}" + (f" ({host - python:.0f})" if python is not None else "")
    if graph is None:
        return f"{host_text} / -"
    return f"{host_text} / {graph:.0f}" + (" launch-bound" if host > graph else "")


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
    run without a separate A/B. Another session's run: differences of a few percent are its noise."""
    from .compare import kernel_rows
    old, now = kernel_rows(base), kernel_rows(new)
    pairs = []
    for key, b in old.items():
        fig = {"attention": "triton_ms", "paged": "paged_ms"}.get(key[0])
        n = now.get(key)
        if fig and n and isinstance(b.get(fig), (int, float)) and b[fig] > 0 and isinstance(n.get(fig), (int, float)) \
                and n[fig] > 0:
            pairs.append((key[1], b[fig] / n[fig]))
    if not pairs:
        return []
    ratios = [r for _, r in pairs]
    commit = str((base.get("environment") or {}).get("git_commit") or "?")[:7]
    return ["", f"This project's attention kernels against the committed run on this GPU (`{path}`, commit {commit}), "
                "time there / time here (above 1: faster now; another session's run, so a few percent is noise): "
                f"median {statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x.", "",
            "- " + "; ".join(f"{shape}: {r:.2f}x" for shape, r in pairs)]


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
    # a part that failed before measuring anything has nothing more to show
    tests = tests if tests is not None and "exit_code" in tests else None
    kernels = kernels if kernels is not None and "attention" in kernels else None
    pipeline = pipeline if pipeline is not None and "points" in pipeline else None
    partitions = partitions if partitions is not None and "points" in partitions else None
    ragged = ragged if ragged is not None and "points" in ragged else None
    graphs = graphs if graphs is not None and "points" in graphs else None
    sweeps = sweeps if sweeps is not None and "attention" in sweeps else None
    nccl = nccl if nccl is not None and "points" in nccl else None
    if tests is not None:
        lines += ["## GPU tests", "", f"{tests.get('passed', 0)} passed, {len(tests.get('failed', []))} failed, "
                                      f"{tests.get('skipped', 0)} skipped (exit code {tests.get('exit_code')})", ""]
        if tests.get("timed_out"):
            lines += [f"**Incomplete: {tests['timed_out']}.**", ""]
        lines += [f"- FAILED `{f}`" for f in tests.get("failed", [])]
        lines.append("")
    if kernels is not None:
        t = kernels["targets"]
        lines += ["## Kernels", "", f"Ceilings measured here: device copy {kernels['copy_gbps']:.0f} GB/s, bf16 GEMM "
                  f"{kernels['gemm_bf16_tflops']:.0f} TFLOP/s." + ("" if kernels.get("complete", True) else
                                                                  f" **Incomplete: {_why_incomplete(kernels)}.**"),
                  "",
                  "| prefix | chunk | Triton TFLOP/s | of GEMM | best peer | speed-up | max err | launcher host "
                  + ("(Triton's launch) " if any("launch_python_us" in r for r in kernels["attention"]) else "")
                  + "/ graph µs |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
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
                          f"{target['triton_tflops']:.0f} → {_vs_target(target['triton_tflops'], t['attention_tflops'])}"]
        ran = [r for r in kernels["attention"] if speedup(r)]
        if ran:
            worst = min(ran, key=speedup)
            lines.append(f"- Target ≥ {vs_peer}x the best peer at every shape: worst {speedup(worst):.2f}x at prefix "
                         f"{worst['prefix']}, chunk {worst['chunk']} ({best(worst)}) → "
                         f"{_vs_target(speedup(worst), vs_peer)}")
        bound = [r for r in kernels["attention"] if r.get("speedup_vs_best_peer_graph")]
        if bound:
            lines.append("- Launch-bound shapes (the launcher's host time over the kernel's), kernels against each "
                         "other replayed from CUDA graphs (no host): " + "; ".join(
                             f"prefix {r['prefix']}, chunk {r['chunk']}: {r['speedup_vs_best_peer_graph']:.2f}x "
                             f"{r['best_peer_graph']} (eager {speedup(r):.2f}x)" for r in bound))
        if kernels.get("paged"):
            flex = any("flex_ms" in r for r in kernels["paged"])  # older files: no flex peer
            lines += ["", "Paged, varlen chunk_attention: one launch over a batch of rows (prefix+chunk each), the "
                          "cache in shuffled pages, against the dense kernel and the best SDPA backend run once per "
                          "row" + (", and flex_attention run once over the packed rows (a per-row causal block mask)"
                                   if flex else "") + ".", "",
                      "| rows | page | paged TFLOP/s | vs dense per row | vs SDPA per row | " + ("vs flex | " * flex)
                      + "launch | max err |", "|---|---:|---:|---:|---:|" + "---:|" * flex + "---|---:|"]
            for r in kernels["paged"]:
                plan = r.get("launch_plan") or {}
                vs = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
                lines.append(f"| {', '.join(f'{p}+{c}' for p, c in r['batch'])} | {r['page_size']} | "
                             f"{r['paged_tflops']:.0f} | {vs(r.get('paged_vs_dense_rows'))} | "
                             f"{vs(r.get('paged_vs_sdpa_rows'))} ({r.get('best_sdpa') or 'none ran'}) | "
                             + (f"{vs(r.get('paged_vs_flex'))} | " if flex else "") +
                             f"pack {plan.get('pack', '?')}, splits {plan.get('splits', '?')} | "
                             f"{r['paged_max_abs_err']:.1e}{'' if r.get('paged_correct', True) else ' WRONG'} |")
        if kernels.get("tile_ab"):
            from .kernels import tile_ab_lines
            lines += ["", "Launcher tiles chosen untimed, each against the tile it replaced (one shape each):", ""]
            lines += [f"- {line[len('tile A/B '):]}" for line in tile_ab_lines(kernels["tile_ab"])]
        hosts = any("triton_host_us" in m for m in kernels["memory_bound"])  # older files: no host times
        lines += ["", "| op | Triton GB/s | of copy | eager GB/s | target |"
                  + (" host µs Triton (its launch) / eager |" if hosts else ""), "|---|---:|---:|---:|---|"
                  + ("---:|" if hosts else "")]
        for m in kernels["memory_bound"]:
            host = (f" {m['triton_host_us']:.0f} ({m['triton_host_us'] - m['triton_python_us']:.0f}) / "
                    f"{m['eager_host_us']:.0f} |") if "triton_host_us" in m else " - |"
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
            lines += ["", "Compiler report (attention, d128): " + "; ".join(
                f"{r.get('kernel', '?')}: {r['registers']} regs, {r.get('spill_stores', 0)} B spilled, "
                f"{r.get('shared_bytes', 0) // 1024} KB smem, wgmma {'yes' if r.get('wgmma') else 'no'}"
                for r in report)]
        lines.append("")
    if pipeline is not None:
        lines += ["## Pipeline on one GPU (in-process link, emulated bandwidth)", "",
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
    if partitions is not None:
        lines += partitions_markdown(partitions)
    if graphs is not None:
        lines += graphs_markdown(graphs, partitions)
    if ragged is not None:
        lines += ragged_markdown(ragged)
    if nccl is not None:
        lines += nccl_markdown(nccl)
    if sweeps is not None:
        from .kernels import sweep_lines
        lines += ["## Tuning sweeps (the suite's time left over)", "",
                  "Each shape's launch configs timed against float64-checked outputs: the launcher's choice against "
                  "the fastest correct config." + ("" if sweeps.get("complete") else
                                                    " **Incomplete: configs past the time left are not run.**"), ""]
        lines += [f"- {line}" for line in sweep_lines(sweeps)] + [""]
    return "\n".join(lines)


def _write(out: Path, name: str, doc: dict) -> None:
    from .report import write_json
    write_json(out / name, doc)


def write_summary_only(out: Path) -> int:
    """summary.md from the part documents in `out` (each carries its own environment)."""
    docs = {}
    for part in PARTS:
        f = out / f"{part}.json"
        try:
            docs[part] = json.loads(f.read_text()) if f.exists() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f} is not a readable gpu-suite part file: {e}") from None
        if docs[part] is not None and not (isinstance(docs[part], dict)
                                           and isinstance(docs[part].get("environment"), dict)):
            raise ValueError(f"{f} is not a gpu-suite part file (no environment object)")
    found = [d for d in docs.values() if d is not None]
    if not found:
        raise ValueError(f"no part file ({', '.join(p + '.json' for p in PARTS)}) in {out}: nothing to summarise")
    env = found[0]["environment"]
    commits = {part: str(d["environment"].get("git_commit")) for part, d in docs.items() if d is not None}
    if len(set(commits.values())) > 1:  # parts run in separate calls, on different commits: say which is which
        env = dict(env, git_commit="; ".join(f"{part} {c[:7]}" for part, c in commits.items()))
    try:
        text = summary_markdown(env, docs["tests"], docs["kernels"], docs["pipeline"], docs["partitions"],
                                docs["ragged"], docs["sweeps"], docs["graphs"],
                                committed_baseline(docs["kernels"], out), docs["nccl"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"the part files in {out} lack a figure the summary needs ({type(e).__name__}: {e})") from None
    (out / "summary.md").write_text(text)
    print(f"[gpu-suite] {out / 'summary.md'} from {', '.join(k for k, d in docs.items() if d is not None)}")
    return 0


def main(argv=None) -> int:
    from .options import Parser, integer, name_list, number, out_path, output_dir
    ap = Parser(prog="python -m bench gpu-suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=out_path, required=True, help="results directory, e.g. bench/results/h100/")
    ap.add_argument("--parts", type=name_list(PARTS, "part"), default=None,
                    help=f"parts to run (default: {','.join(PARTS)})")
    ap.add_argument("--layers", type=integer(1), default=None,
                    help="layers of the Llama-3-8B shape in the pipeline parts (default: 8)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and prompts (a smoke run)")
    ap.add_argument("--budget-s", type=number(60.0, strict=False, maximum=86400.0), default=None,
                    help="the suite's time: no part starts work that would end past this many seconds from the "
                         "start, and each leaves the parts after it their reserve (default 540: the whole suite in "
                         "one 10-minute call)")
    ap.add_argument("--summary-only", action="store_true",
                    help="measure nothing: rewrite summary.md from the part documents already in --out (parts run "
                         "in separate calls)")
    args = ap.parse_args(argv)
    if args.summary_only:
        given = [flag for flag, value in (("--parts", args.parts), ("--layers", args.layers),
                                          ("--quick", args.quick or None), ("--budget-s", args.budget_s)) if value]
        if given:
            raise ValueError(f"--summary-only measures nothing: drop {', '.join(given)}")
        if not args.out.is_dir():
            raise ValueError(f"--summary-only reads the part files in --out, and {args.out} is not a directory")
        return write_summary_only(args.out)
    parts = args.parts or list(PARTS)
    args.layers = args.layers or 8
    args.budget_s = 540.0 if args.budget_s is None else args.budget_s
    if not torch.cuda.is_available():
        print("bench gpu-suite: refused: no CUDA GPU is visible to torch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); this command measures a GPU "
              "and has nothing to measure here. Nothing was written.", file=sys.stderr)
        return 2
    with output_dir(args.out) as out:
        return _suite(out, args, parts)


# The least time each part is left at the end of the budget (`part_deadlines`): a slow part cannot starve the ones
# after it. Tests, with nothing after them but these, get what the others leave.
# (On an H200 at 295c856 the parts took: tests 73 s, kernels 110, partitions 214, pipeline 16, ragged 11.)
PART_RESERVE_S = dict(tests=0.0, kernels=130.0, partitions=130.0, pipeline=20.0, ragged=20.0, nccl=90.0,
                      sweeps=40.0, graphs=40.0)  # nccl: only on a machine of 2 GPUs or more (`part_deadlines`)
GRAPHS_POINTS = dict(prompt_lens=(16384,), links=("100gbe",), stages=(2, 4))  # the graphs part: a target's points


def part_deadlines(t0: float, budget_s: float, parts, gpus: int = 1) -> dict:
    """When each selected part must stop starting new work (a test run is stopped, a kernel shape or pipeline point
    not started): the budget's end less the reserves of the selected parts after it. With fewer than 2 `gpus` the
    nccl part has nothing to run and reserves nothing."""
    order = [p for p in PARTS if p in parts]
    reserve = dict(PART_RESERVE_S, **({} if gpus >= 2 else {"nccl": 0.0}))
    return {p: t0 + budget_s - sum(reserve[q] for q in order[i + 1:]) for i, p in enumerate(order)}


def _guarded(out: Path, name: str, env: dict, run):
    """Runs one part; a part that raises does not stop the parts after it (GPU time is scarce: one call should
    bring back all it can). Its `<name>.json` then keeps what it measured before the failure (the pipeline parts
    write after every point) with `part_failed` (the error, one line) and `traceback` added, or holds only those."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - recorded in the part's file and the summary; the suite goes on
        import traceback
        first = (str(e).strip().splitlines() or [""])[0][:300]
        doc = _mark_failed(out, name, env, part_failed=f"{type(e).__name__}: {first}",
                           traceback=traceback.format_exc())
        print(f"[gpu-suite] {name} part FAILED: {doc['part_failed']} (kept in {out / f'{name}.json'}; going on)",
              flush=True)
        return doc


def _mark_failed(out: Path, name: str, env: dict, **why) -> dict:
    """`<name>.json` as measured so far (or empty), marked incomplete with `why` (part_failed, ...): rewritten and
    returned."""
    f = out / f"{name}.json"
    try:
        doc = json.loads(f.read_text()) if f.exists() else {}
    except (OSError, json.JSONDecodeError):
        doc = {}
    doc.update(environment=env, complete=False, **why)
    _write(out, f"{name}.json", doc)
    return doc


def _write_summary(out: Path, env: dict, docs: dict) -> None:
    (out / "summary.md").write_text(summary_markdown(env, docs["tests"], docs["kernels"], docs["pipeline"],
                                                     docs["partitions"], docs["ragged"], docs["sweeps"],
                                                     docs["graphs"], committed_baseline(docs["kernels"], out),
                                                     docs["nccl"]))


def _failed_parts(docs: dict) -> list[str]:
    return [name for name, d in docs.items() if d is not None and d.get("part_failed")]


# The kernel part's last seconds, for the compiler's resource report (8 processes on the GPU machine's cores).
COMPILER_RESERVE_S = 30.0
# How long past its budget the suite may still be running before the watchdog ends it (`_watchdog`).
HANG_GRACE_S = 45.0
FALLBACK_AFTER_S = 15.0  # then faulthandler's, should the watchdog itself not run


def _hard_exit(code: int) -> None:
    os._exit(code)


def _watchdog(out: Path, env: dict, docs: dict, running: dict, budget_s: float, at: float):
    """A timer that fires at `at` (time.time()) if the suite is still running: a part is then stuck where Python
    cannot interrupt it (a CUDA call that never returns: seen on an H200, where the outer timeout then took every
    part's results with it). It writes every thread's stack to hang.txt, records the running part as failed,
    writes summary.md and the closing line, and ends the process (exit code 3) so what was measured comes back."""
    import threading

    def fire():
        name = running.get("part")
        with open(out / "hang.txt", "w") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
        if name is not None:
            docs[name] = _mark_failed(
                out, name, env, part_failed=f"hung: still running {time.time() - running['since']:.0f} s after it "
                                            f"started, past the suite's {budget_s:.0f} s budget (every thread's "
                                            "stack: hang.txt)")
        _write_summary(out, env, docs)
        print(f"[gpu-suite] {name} part HUNG past the budget: stacks in {out / 'hang.txt'}; ending the suite",
              flush=True)
        print(json.dumps(dict(out=str(out), device=env["device"], hung=name, parts_failed=_failed_parts(docs))),
              flush=True)
        _hard_exit(3)
    timer = threading.Timer(max(0.0, at - time.time()), fire)
    timer.daemon = True
    return timer


def _suite(out: Path, args, parts) -> int:
    env = gpu_environment()
    t0 = time.time()
    deadlines = part_deadlines(t0, args.budget_s, parts, torch.cuda.device_count())
    print("[gpu-suite] time plan (each part starts no work past): " + ", ".join(
        f"{name} +{d - t0:.0f} s" for name, d in deadlines.items()), flush=True)
    docs = dict.fromkeys(PARTS)
    from .timeline import write_chrome_trace, write_timeline_png
    lens = (4096, 16384) if args.quick else (4096, 8192, 16384, 32768)

    def progress_to(name):
        def progress(i, n, doc):  # a run cut short still leaves the points it measured
            print(f"  {i}/{n} ({time.time() - t0:.0f} s)", flush=True)
            _write(out, f"{name}.json", dict(environment=env, **doc))
        return progress

    def tests():
        doc = dict(environment=env, **run_gpu_tests(out, max(60.0, deadlines["tests"] - time.time())))
        _write(out, "tests.json", doc)
        return doc

    def kernels():
        from .kernels import print_report, run_all
        # the benchmark leaves the compiler report its reserve; its figures are written (and printed) before it
        doc = dict(environment=env, **run_all(quick=args.quick, deadline=deadlines["kernels"] - COMPILER_RESERVE_S))
        print_report(doc)
        _write(out, "kernels.json", doc)
        doc["compiler"] = compiler_report(timeout_s=max(20.0, deadlines["kernels"] - time.time()))
        _write(out, "kernels.json", doc)
        return doc

    def sweeps():
        from .kernels import DECODE_SWEEP_SHAPES, run_sweeps, sweep_lines
        save = lambda d: _write(out, "sweeps.json", dict(environment=env, **d))  # noqa: E731 - after each sweep
        doc = dict(environment=env, **run_sweeps(deadlines["sweeps"], on_sweep=save,
                                                 **(dict(shapes=DECODE_SWEEP_SHAPES[:1], paged_shape=None)
                                                    if args.quick else {})))
        for line in sweep_lines(doc):
            print(line, flush=True)
        _write(out, "sweeps.json", doc)
        return doc

    def nccl():
        doc = dict(environment=env, **bench_nccl(layers=args.layers, deadline=deadlines["nccl"],
                                                 progress=progress_to("nccl"),
                                                 **(dict(prompt_lens=(4096,)) if args.quick else {})))
        if doc.get("skipped"):
            print(f"[gpu-suite] nccl part not run: {doc['skipped']}", flush=True)
        _write(out, "nccl.json", doc)
        return doc

    def pipeline_part(name, pictures, **kw):
        def run():
            doc, shown = bench_pipeline(layers=args.layers, deadline=deadlines[name], progress=progress_to(name),
                                        **kw)
            if shown:
                write_timeline_png(shown[1], out / f"{pictures}.png", shown[0], shown[2])
                write_chrome_trace(shown[1], out / f"{pictures.replace('timeline', 'trace')}.json", shown[2])
            doc = dict(environment=env, **doc)
            _write(out, f"{name}.json", doc)
            return doc
        return run
    runs = dict(tests=tests, kernels=kernels,
                # one GPU as S: each stage on its own SMs, the simulator checked against it
                partitions=pipeline_part("partitions", "timeline-partitions", prompt_lens=lens, sm_partitions=True,
                                         simulate=True, stage_alone=True),
                # the targets' points again, each stage's chunks replayed from CUDA graphs: is the host the limit?
                graphs=pipeline_part("graphs", "timeline-graphs", sm_partitions=True, cuda_graphs=True,
                                     **GRAPHS_POINTS),
                # the stages take turns on the whole GPU
                pipeline=pipeline_part("pipeline", "timeline", prompt_lens=(4096, 16384), links=("pcie5", "100gbe")),
                # a serving-like batch: rows of different lengths, paged KV cache, on SM partitions
                ragged=pipeline_part("ragged", "timeline-ragged", prompt_lens=(), stages=(2,), links=("100gbe",),
                                     rows=[r[:2] if args.quick else r for r in RAGGED_ROWS],
                                     token_budgets=RAGGED_BUDGETS, sm_partitions=True, simulate=True),
                nccl=nccl, sweeps=sweeps)
    titles = dict(tests="GPU tests", kernels="kernel benchmark", partitions="SM partitions",
                  graphs="CUDA graphs per stage chunk", pipeline="pipeline",
                  ragged="ragged batches", nccl="multi-GPU pipeline (NCCL)", sweeps="tuning sweeps")
    running: dict = {}
    watchdog = _watchdog(out, env, docs, running, args.budget_s, t0 + args.budget_s + HANG_GRACE_S)
    watchdog.start()
    # if even the watchdog cannot run (a stuck call holding the interpreter's lock), the C-level fallback writes
    # every thread's stack and ends the process 15 s later: the parts already written stay, the archive step runs
    fallback = open(out / "hang-fallback.txt", "w")
    faulthandler.dump_traceback_later(max(0.1, t0 + args.budget_s + HANG_GRACE_S + FALLBACK_AFTER_S - time.time()),
                                      exit=True, file=fallback)
    try:
        for name in PARTS:
            if name in parts:
                print(f"[gpu-suite] {titles[name]} ...", flush=True)
                running.update(part=name, since=time.time())
                docs[name] = _guarded(out, name, env, runs[name])
        running.update(part=None)
    finally:
        watchdog.cancel()
        faulthandler.cancel_dump_traceback_later()
        fallback.close()
        if not (out / "hang-fallback.txt").stat().st_size:
            (out / "hang-fallback.txt").unlink()
    _write_summary(out, env, docs)
    failed = _failed_parts(docs)
    tests_doc = docs["tests"]
    print(f"[gpu-suite] done in {time.time() - t0:.0f} s: {out / 'summary.md'}")
    print(json.dumps(dict(out=str(out), device=env["device"], wall_s=round(time.time() - t0, 1),
                          tests_failed=len(tests_doc.get("failed", [])) if tests_doc else None, parts_failed=failed)))
    tests_ok = tests_doc is None or (not tests_doc.get("failed") and tests_doc.get("exit_code") in (0, 5))
    return 0 if tests_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
