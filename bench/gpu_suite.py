"""Everything a GPU can tell us, in one pass (a GPU is at hand only now and then: use it fully in one go).

    python -m bench gpu-suite --out bench/results/<gpu>/

Parts, in the order they run, each with its own JSON (GPU name, driver, torch and Triton versions, commit) and one
Markdown summary:
1. tests.json       the GPU-marked tests (compiled Triton, bf16 against float64, long prefixes, large batches);
2. kernels.json     chunk_attention vs every SDPA backend (TFLOP/s, bf16 GEMM ceiling), RMSNorm/RoPE/SwiGLU vs
                    torch eager (GB/s, copy ceiling), the launcher's untimed tiles against the ones they replaced,
                    on Hopper the warp-specialization probe (`bench.ws_probe`, in a process of its own), the
                    compiler's resource report (registers, spills, wgmma);
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
                    (it does not stop the parts after it): `bench/gpu_summary.py`.
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

from pipeline.procs import usable_cores

from .clocks import run_windows, sampled
from .gpu_summary import committed_baseline, summary_markdown

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
    shards = max(1, min(shards, usable_cores()))
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
        try:  # the GPU's clocks sampled over the point's runs (bench.clocks)
            point, clocks = sampled(lambda: measure(ops if fallback is None else "torch"), device)
        except RuntimeError as e:
            if not sm_partitions or ops == "torch" or fallback is not None:
                raise
            fallback = (f"ops {ops!r} failed on the SM partitions' streams ({str(e).splitlines()[0][:200]}); "
                        "measured with the torch ops")
            point, clocks = sampled(lambda: measure("torch"), device)
        if clocks is not None:
            point["gpu_clocks"] = clocks.summary(run_windows(point["records"]))
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
    (whole_ms, chunked_ms), clocks = sampled(lambda: (timed(whole), timed(chunked)), device)
    diff = (outs["chunked"].double() - outs["whole"].double()).abs().max().item()
    return dict(stages=stages, prompt_len=prompt_len, chunk_size=chunk_size, layers=len(part.layers), ops=ops,
                whole_ms=whole_ms, chunked_ms=chunked_ms, chunking_cost=chunked_ms / whole_ms, max_abs_diff=diff,
                scale=outs["whole"].abs().max().item(), **({"sm_partitions": plan} if plan else {}),
                **({"gpu_clocks": clocks.summary()} if clocks is not None else {}))


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


# ---- the suite: files, time plan, failures, hangs --------------------------------------------------------------

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
        _write_summary(out, env, docs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"the part files in {out} lack a figure the summary needs ({type(e).__name__}: {e})") from None
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
    """summary.md from the part documents `docs` (None: a part not run); nothing written if the summary fails."""
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
