"""Running prefill requests on a pipeline: `run_prefill` (one request, any mode and link) and `run_jobs` (several
requests on one set-up, as the harness uses it). The in-process link runs every stage in this process; gloo and
NCCL run one process per stage, started here (spawn) or by `torchrun --nproc-per-node S` (env:// rendezvous)."""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import checks
from .checks import DTYPES
from .link import DistChannel, LinkAborted, LinkModel, LocalChannel
from .config import ModelConfig
from .model import resolve_config
from .procs import PipelineError, init_process_group, run_spawned, torchrun_rank
from .schedule import (MODES, Clock, StageRecord, check_mode, chunk_plan, chunk_starts, mode_chunks, stage_program,
                       summarize, timeline)
from .stage import Stage, split_layers

LINKS = ("inprocess", "gloo", "nccl")


@dataclass(frozen=True)
class PipelineSpec:
    """How the pipeline is set up: the model, its split, the link, the ops and where it runs."""
    source: str | ModelConfig = "tiny"  # preset name, Hugging Face directory or a ModelConfig
    stages: int | tuple[int, ...] = 2
    link: str = "inprocess"
    ops: str = "torch"
    dtype: str = "float32"
    device: str = "cpu"
    bandwidth_gbps: float | None = None  # emulated link bandwidth (None: as fast as the real link)
    latency_s: float = 0.0
    seed: int = 0
    threads: int | None = None  # torch threads per stage process (default: cores // stages)
    timeout_s: float = 60.0  # a stage blocked this long on a peer fails instead of hanging
    fault: tuple[str, int] | None = None  # tests only: ("raise" | "exit" | "stop" | "hang", stage) injects one

    @property
    def num_stages(self) -> int:
        return self.stages if isinstance(self.stages, int) else len(self.stages)

    def validate(self) -> None:
        """Every field checked, and a Hugging Face checkpoint read (config and safetensors headers, no tensor
        data) against its config, here in the calling process: before any stage process starts."""
        if self.link not in LINKS:
            raise ValueError(f"unknown link {self.link!r}; choose one of {', '.join(LINKS)}")
        checks.dtype_name(self.dtype)
        if not isinstance(self.dtype, str):
            raise TypeError(f"dtype must be the name of a dtype ({', '.join(DTYPES)}), got {self.dtype!r}")
        cfg = resolve_config(self.source)
        if isinstance(self.stages, bool) or not isinstance(self.stages, (int, tuple)):
            raise TypeError(f"stages must be a number of stages or per-stage layer counts, got {self.stages!r}")
        split_layers(cfg.num_layers, self.stages if isinstance(self.stages, int) else list(self.stages))
        if self.bandwidth_gbps is not None:
            checks.number("bandwidth_gbps", self.bandwidth_gbps, 0, strict=True)
        checks.number("latency_s", self.latency_s, 0)
        checks.integer("seed", self.seed)
        if self.threads is not None:
            checks.positive_int("threads", self.threads)
        checks.number("timeout_s", self.timeout_s, 0, strict=True)
        from .ops import get_ops
        get_ops(self.ops)
        device = checks.device(self.device)
        if self.link == "nccl" and not torch.cuda.is_available():
            raise ValueError("the nccl link needs CUDA devices; use gloo or inprocess on CPU")
        if self.link == "gloo" and device.type != "cpu":
            raise ValueError("the gloo link carries CPU tensors: use device='cpu' (or the nccl link)")
        if self.ops == "triton" and device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("ops='triton' on CPU needs TRITON_INTERPRET=1 set before Python starts (Triton's "
                                 "interpreter: correct, far from fast); use ops='torch' otherwise")
            if self.dtype == "bfloat16":
                raise ValueError("ops='triton' with bfloat16 on CPU: Triton's interpreter computes bf16 wrongly; "
                                 "use float32 or float16 (or ops='torch')")
        if isinstance(self.source, ModelConfig):
            return
        if Path(self.source).is_dir():
            from .weights import validate_checkpoint
            validate_checkpoint(self.source, cfg)


@dataclass
class Job:
    """One prefill request run `repeats` times after `warmup` untimed runs."""
    mode: str
    tokens: torch.Tensor  # [B, L]
    chunks: list[int]
    repeats: int = 1
    warmup: int = 0
    decode: bool = True
    return_cache: bool = False


@dataclass
class PrefillResult:
    mode: str
    chunks: list[int]
    logits: torch.Tensor  # [B, V] at the last prompt position
    metrics: dict  # see schedule.summarize; plus decode figures
    timeline: list[dict] = field(default_factory=list)
    caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per stage (k, v) [layers, B, L, Hkv, D]
    decode_logits: torch.Tensor | None = None  # [B, V] for the greedy next token
    records: list[StageRecord] = field(default_factory=list)  # per stage, absolute seconds (see Clock)
    t_start: float = 0.0
    t_end: float = 0.0


# ---- one process: a runner that owns this process's stages ---------------------------------------------------

class _Runner:
    """Owns the stages of this process (all of them in-process, one with gloo/NCCL) and runs jobs on them."""

    def __init__(self, spec: PipelineSpec, rank: int | None):
        self.spec, self.rank = spec, rank  # rank None: in-process
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]
        self.cfg = resolve_config(spec.source)
        self.ranges = split_layers(self.cfg.num_layers,
                                   spec.stages if isinstance(spec.stages, int) else list(spec.stages))
        self.S = len(self.ranges)
        mine = range(self.S) if rank is None else [rank]
        self.stages = {i: self._stage(self.ranges[i], i, self.S) for i in mine}
        self._full = None
        self.clock = Clock(self.device)
        model = LinkModel(spec.bandwidth_gbps, spec.latency_s)
        if rank is None:
            self.channels = [LocalChannel(self.device, model, self.clock, spec.timeout_s) for _ in range(self.S - 1)]
        else:
            self.recv = DistChannel(rank - 1, rank, self.device, model, self.clock) if rank > 0 else None
            self.send = DistChannel(rank, rank + 1, self.device, model, self.clock) if rank < self.S - 1 else None

    def _stage(self, layers, index, n):
        return Stage(self.spec.source, layers, index, n, dtype=self.dtype, device=self.device, ops=self.spec.ops,
                     seed=self.spec.seed)

    def full(self) -> Stage:
        """The whole model as a single stage: the unchunked baseline (built on first use)."""
        if self._full is None:
            self._full = self._stage(range(self.cfg.num_layers), 0, 1)
        return self._full

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _inject_fault(self, stage_index: int):
        if self.spec.fault and self.spec.fault[1] == stage_index:
            if self.spec.fault[0] == "exit":
                os._exit(17)
            if self.spec.fault[0] == "stop":  # stops answering: as if sent SIGSTOP
                os.kill(os.getpid(), signal.SIGSTOP)
            if self.spec.fault[0] == "hang":  # alive, heartbeat running, never gets on
                time.sleep(1e6)
            raise RuntimeError(f"injected failure in stage {stage_index}")

    # in-process: every stage here; on CPU a thread per stage, on GPU a stream per stage (one host thread)
    def run_inprocess(self, mode: str, tokens, chunks, start_pos=0):
        stages = [self.full()] if mode == "unchunked" else [self.stages[i] for i in range(self.S)]
        S, B = len(stages), tokens.shape[0]
        records = [StageRecord(i, chunks) for i in range(S)]
        result = {}
        for ch in self.channels:
            ch.reset()
        gens = [stage_program(st, mode, chunks, self.clock, records[i], tokens=tokens if i == 0 else None,
                              recv=self.channels[i - 1] if i > 0 and S > 1 else None,
                              send=self.channels[i] if i < S - 1 else None, batch=B, start_pos=start_pos,
                              result=result if i == S - 1 else None) for i, st in enumerate(stages)]
        if self.device.type == "cuda":  # the host only enqueues: interleave the stages chunk by chunk
            streams = [torch.cuda.Stream(self.device) for _ in range(S)]
            self.clock.anchor()
            t0 = self.clock.mark()
            for i in range(S):
                self._inject_fault(i)
            for k in range(len(chunks) + 1):  # the last round drains pending sends
                for i, g in enumerate(gens):
                    with torch.cuda.stream(streams[i]):
                        next(g, None)
            with torch.cuda.stream(streams[-1]):
                end_mark = self.clock.mark()
            self._sync()
            t_start, t_end = self.clock.seconds(t0), self.clock.seconds(end_mark)
        else:  # each stage blocks on its links like a process of its own would
            errors: list[tuple[int, BaseException]] = []

            def drive(i, g):
                try:
                    self._inject_fault(i)
                    for _ in g:
                        pass
                except BaseException as e:  # noqa: BLE001 - re-raised below, after every stage has stopped
                    errors.append((i, e))
                    for ch in self.channels:
                        ch.abort(f"stage {i} failed")
            threads = [threading.Thread(target=drive, args=(i, g), name=f"stage-{i}", daemon=True)
                       for i, g in enumerate(gens)]
            t_start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_end = time.perf_counter()
            if errors:
                first = sorted(errors, key=lambda e: isinstance(e[1], LinkAborted))[0]
                raise first[1]
        return [r.resolve(self.clock) for r in records], t_start, t_end, result["logits"]

    # one process per stage: this rank's part of a run
    def run_rank(self, mode: str, tokens, chunks, start_pos=0):
        rank = self.rank
        if mode == "unchunked":  # no pipeline: rank 0 runs the whole model, the others wait
            dist.barrier()
            if rank != 0:
                dist.barrier()
                return None
            self._inject_fault(0)
            st, recv, send = self.full(), None, None
        else:
            st, recv, send = self.stages[rank], self.recv, self.send
            dist.barrier()
        record = StageRecord(rank if mode != "unchunked" else 0, chunks)
        result = {}
        self._sync()
        self.clock.anchor()  # every rank's GPU clock on the host time base, from an idle device
        t_start = time.perf_counter()
        for k in stage_program(st, mode, chunks, self.clock, record, tokens=tokens if (recv is None) else None,
                               recv=recv, send=send, batch=tokens.shape[0], start_pos=start_pos, result=result):
            if k == 0 and mode != "unchunked":
                self._inject_fault(rank)
        self._sync()
        t_end = time.perf_counter()
        if mode == "unchunked":
            dist.barrier()
        return record.resolve(self.clock), t_start, t_end, result.get("logits")

    def caches(self, mode):
        stages = [self.full()] if mode == "unchunked" else list(self.stages.values())
        return [(s.cache.k.clone(), s.cache.v.clone()) for s in stages]

    def close(self):
        for ch in getattr(self, "channels", []) + [getattr(self, "recv", None), getattr(self, "send", None)]:
            if ch is not None:
                ch.close()


def _reset(runner: _Runner, mode: str, B: int, max_len: int):
    stages = [runner.full()] if mode == "unchunked" else list(runner.stages.values())
    for st in stages:
        st.reset_cache(B, max_len)


def _run_once_inprocess(runner: _Runner, job: Job) -> PrefillResult:
    """One run of `job` with every stage in this process."""
    B, L = job.tokens.shape
    tokens = job.tokens.to(runner.device)
    _reset(runner, job.mode, B, L + 1)
    records, t0, t1, logits = runner.run_inprocess(job.mode, tokens, job.chunks)
    metrics = summarize(records, t0, t1)
    res = PrefillResult(job.mode, job.chunks, logits.float().cpu(), metrics, timeline(records, t0),
                        records=records, t_start=t0, t_end=t1)
    if job.decode:
        nxt = logits.argmax(-1)[:, None]  # greedy next token [B, 1]
        drec, d0, d1, dlog = runner.run_inprocess("chunked" if job.mode != "unchunked" else "unchunked", nxt,
                                                  [1], start_pos=L)
        res.decode_logits = dlog.float().cpu()
        res.metrics["decode_bytes_per_boundary"] = [r.bytes_sent for r in drec[:-1]]
        res.metrics["decode_s"] = d1 - d0
    if job.return_cache:
        res.caches = [(k[:, :, :L].cpu(), v[:, :, :L].cpu()) for k, v in runner.caches(job.mode)]
    return res


def _run_once_rank(runner: _Runner, job: Job) -> PrefillResult | None:
    """This rank's share of one run of `job`; rank 0 gathers everyone's and returns the combined result."""
    rank, S = runner.rank, runner.S
    B, L = job.tokens.shape
    tokens = job.tokens.to(runner.device)
    _reset(runner, job.mode, B, L + 1)
    part = runner.run_rank(job.mode, tokens, job.chunks)
    mine = dict(part=part)
    if job.decode:
        last = 0 if job.mode == "unchunked" else S - 1
        nxt = torch.zeros(B, 1, dtype=torch.long, device=runner.device)
        if job.mode == "unchunked":
            if rank == 0:
                nxt = part[3].argmax(-1)[:, None]
        elif S > 1:  # the last stage sends the greedy token back to the first
            if rank == last:
                dist.send(part[3].argmax(-1)[:, None].contiguous(), 0, tag=1 << 20)
            elif rank == 0:
                dist.recv(nxt, last, tag=1 << 20)
        else:
            nxt = part[3].argmax(-1)[:, None]
        dpart = runner.run_rank("chunked" if job.mode != "unchunked" else "unchunked", nxt, [1], start_pos=L)
        mine["decode"] = dpart
    if job.return_cache and (job.mode != "unchunked" or rank == 0):
        mine["cache"] = [(k[:, :, :L].cpu(), v[:, :, :L].cpu()) for k, v in runner.caches(job.mode)]
    mine = _to_cpu(mine)
    all_parts = [None] * S if rank == 0 else None
    dist.gather_object(mine, all_parts, dst=0)
    if rank != 0:
        return None
    parts = [p["part"] for p in all_parts if p["part"] is not None]
    records, starts, ends, logits = zip(*parts)
    metrics = summarize(list(records), min(starts), ends[-1])
    res = PrefillResult(job.mode, job.chunks, logits[-1].float(), metrics, timeline(list(records), min(starts)),
                        records=list(records), t_start=min(starts), t_end=ends[-1])
    if job.decode:
        dparts = [p["decode"] for p in all_parts if p["decode"] is not None]
        res.decode_logits = dparts[-1][3].float()
        res.metrics["decode_bytes_per_boundary"] = [d[0].bytes_sent for d in dparts[:-1]]
        res.metrics["decode_s"] = dparts[-1][2] - min(d[1] for d in dparts)
    if job.return_cache:
        res.caches = [c for p in all_parts if "cache" in p for c in p["cache"]]
    return res


def run_order(jobs: list[Job]) -> list[tuple[int, bool]]:
    """(job index, timed) for every run: each job's warm-up runs first, then the timed repeats round-robin over
    the jobs (repeat 1 of every job, then repeat 2, ...). A machine whose speed drifts over seconds then slows
    every job alike instead of whichever job ran during the slow spell, so their times compare fairly."""
    order = [(j, False) for j, job in enumerate(jobs) for _ in range(job.warmup)]
    for r in range(max(job.repeats for job in jobs)):
        order += [(j, True) for j, job in enumerate(jobs) if r < job.repeats]
    return order


def _run_all(run_once, jobs: list[Job], progress=None) -> list[list[PrefillResult]]:
    """Runs `jobs` in `run_order`; returns, per job, the results of its timed runs (empty lists off rank 0, where
    `run_once` returns None). `progress(done, total, what)` is called before each run and once at the end."""
    out: list[list] = [[] for _ in jobs]
    order = run_order(jobs)
    for i, (j, timed) in enumerate(order):
        if progress is not None:
            progress(i, len(order), f"{jobs[j].mode} {'timed' if timed else 'warm-up'}")
        res = run_once(jobs[j])
        if timed and res is not None:
            out[j].append(res)
    if progress is not None:
        progress(len(order), len(order), "done")
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _threads(spec: PipelineSpec) -> int:
    return spec.threads or max(1, (os.cpu_count() or 1) // spec.num_stages)


def rank_main(spec: PipelineSpec, jobs: list[Job], progress=None) -> list[list[PrefillResult]] | None:
    """Entry point of one stage process (spawned here or started by torchrun); the process group must be up.
    Returns the results on rank 0, None elsewhere; `progress` is called on rank 0 only."""
    torch.set_num_threads(_threads(spec))
    rank = dist.get_rank()
    if spec.link == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        spec = dataclasses.replace(spec, device=f"cuda:{torch.cuda.current_device()}")
    runner = _Runner(spec, rank)
    try:
        results = _run_all(lambda job: _run_once_rank(runner, job), jobs, progress if rank == 0 else None)
    finally:
        runner.close()
    return results if rank == 0 else None


# ---- public entry points ---------------------------------------------------------------------------------------

def check_job(job: Job, cfg) -> None:
    """A job's fields, one by one, against the model's limits: a one-line error naming the bad value."""
    if not isinstance(job, Job):
        raise TypeError(f"jobs must be Job objects, got {job!r}")
    check_mode(job.mode)
    check_tokens(job.tokens, cfg, decode=job.decode)
    chunk_plan(job.tokens.shape[1], chunks=job.chunks)
    checks.positive_int("repeats", job.repeats)
    checks.integer("warmup", job.warmup, 0)
    checks.flag("decode", job.decode)
    checks.flag("return_cache", job.return_cache)


def memory_needed(spec: PipelineSpec, cfg, job: Job) -> int:
    """A lower estimate of the bytes one run of `job` holds at once on one machine (the device's memory, or the
    host's): the stages' weights and KV cache and those of the unchunked baseline's whole model, one chunk's
    activations and, with the torch ops, the attention scores SDPA materialises for a chunk after a prefix."""
    B, L = job.tokens.shape
    item = DTYPES[spec.dtype].itemsize
    params = cfg.num_layers * cfg.params_per_layer + cfg.vocab_size * cfg.hidden_size * (1 + (not cfg.tie_embeddings))
    kv = 2 * cfg.num_layers * B * (L + 1) * cfg.num_kv_heads * cfg.head_dim * item
    C = max(job.chunks)
    act = B * C * (4 * cfg.hidden_size + 2 * cfg.intermediate_size
                   + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) * item
    scores = 0
    if spec.ops == "torch":  # [B, Hq, c, p + c] fp32 scores for a chunk after a prefix (masked SDPA, math path)
        starts = chunk_starts(job.chunks)
        scores = max((B * cfg.num_heads * c * (p + c) * 4 for c, p in zip(job.chunks, starts) if p > 0), default=0)
    return 2 * (params * item + kv) + act + scores


def memory_available(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_resources(spec: PipelineSpec, cfg, jobs: list[Job]) -> None:
    """Refuses, before any allocation, a request that cannot fit this machine's memory (it would end in the OOM
    killer), and an emulated link so slow that one run's sends would take over an hour."""
    have = memory_available(spec.device)
    for job in jobs:
        need = memory_needed(spec, cfg, job)
        if need > have:
            B, L = job.tokens.shape
            raise ValueError(f"batch {B} x prompt {L} needs at least {need / 1e9:.1f} GB at once (weights, KV cache "
                             f"and activations of the stages and of the unchunked baseline), more than the "
                             f"{have / 1e9:.1f} GB of {torch.device(spec.device).type} memory here")
    link = LinkModel(spec.bandwidth_gbps, spec.latency_s)
    if link.active:
        item = DTYPES[spec.dtype].itemsize
        for job in jobs:
            B, L = job.tokens.shape
            per_run = sum(link.delay_s(B * c * cfg.hidden_size * item) for c in job.chunks)
            if per_run > 3600:
                raise ValueError(f"the emulated link ({spec.bandwidth_gbps} GB/s, {spec.latency_s} s per send) "
                                 f"would take {per_run / 3600:.1f} h to carry one {L}-token prompt across a boundary; "
                                 "choose a faster one")


def check_tokens(tokens, cfg, decode: bool = False) -> None:
    """tokens: a torch.long tensor [B, L] with B, L >= 1, ids in [0, vocab), L (+1 with decode) within context."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.long tensor [B, L], got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise TypeError(f"tokens must be a torch.long tensor [B, L], got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must have shape [B, L] with B, L >= 1 (an empty prompt has nothing to prefill), "
                         f"got {tuple(tokens.shape)}")
    L = tokens.shape[1]
    if L + int(bool(decode)) > cfg.max_seq_len:
        raise ValueError(f"prompt of {L} tokens{' (+1 decode)' if decode else ''} exceeds the model's max_seq_len "
                         f"{cfg.max_seq_len}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got min {lo}, max {hi}")


def run_jobs(spec: PipelineSpec, jobs: list[Job], progress=None) -> list[list[PrefillResult]] | None:
    """Runs each job on one pipeline set-up; returns, per job, one PrefillResult per timed repeat. Warm-ups run
    first, then the timed repeats round-robin over the jobs (`run_order`). Under torchrun (one process per stage,
    process group from env://) every rank calls this with the same arguments; rank 0 gets the results, the other
    ranks None. `progress(done, total, what)`, if given, is called (on rank 0) before each run and at the end."""
    if not isinstance(spec, PipelineSpec):
        raise TypeError(f"spec must be a PipelineSpec, got {spec!r}")
    spec.validate()
    cfg = resolve_config(spec.source)
    if not isinstance(jobs, (list, tuple)) or not jobs:
        raise ValueError(f"jobs must be a non-empty list of Job, got {jobs!r}")
    for job in jobs:
        check_job(job, cfg)
    check_resources(spec, cfg, jobs)
    return _run(spec, jobs, progress)


def _run(spec: PipelineSpec, jobs: list[Job], progress=None):
    rank = torchrun_rank()
    if spec.link == "inprocess":
        if rank is not None and dist.get_world_size() > 1:
            raise ValueError("link 'inprocess' runs every stage in this one process: launch it without torchrun")
        runner = _Runner(spec, None)
        try:
            return _run_all(lambda job: _run_once_inprocess(runner, job), jobs, progress)
        finally:
            runner.close()
    if rank is not None:  # started by torchrun: this process is one stage
        if not dist.is_initialized():
            init_process_group(spec)
        return rank_main(spec, jobs, progress)
    return run_spawned(spec, jobs, rank_main, progress)


def run_prefill(source, tokens: torch.Tensor, mode: str = "overlapped", stages: int | list[int] = 2,
                chunk_size: int | None = None, chunks: list[int] | None = None, link: str = "inprocess",
                ops: str = "torch", dtype: str = "float32", device: str = "cpu", bandwidth_gbps: float | None = None,
                latency_s: float = 0.0, decode: bool = True, return_cache: bool = False,
                **spec_kw) -> PrefillResult | None:
    """One prefill request through the pipeline. Returns the last-position logits [B, V], the measurements and,
    with return_cache, every stage's KV cache. `unchunked` ignores stages and chunks (it is the baseline).

    link 'gloo' / 'nccl' start one process per stage (spawn): in a script, call this under
    `if __name__ == "__main__":`. Under torchrun every rank calls it; rank 0 gets the result, the others None."""
    check_mode(mode)
    cfg = resolve_config(source)
    check_tokens(tokens, cfg, decode=decode)
    plan = mode_chunks(mode, chunk_plan(tokens.shape[1], chunk_size, chunks))  # validated in every mode
    unknown = set(spec_kw) - {f.name for f in dataclasses.fields(PipelineSpec)}
    if unknown:
        raise TypeError(f"run_prefill() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    if isinstance(stages, (list, tuple)):
        stages = tuple(checks.int_list("stages", stages))
    spec = PipelineSpec(source=source if isinstance(source, ModelConfig) else str(source), stages=stages, link=link,
                        ops=ops, dtype=checks.dtype_name(dtype), device=device, bandwidth_gbps=bandwidth_gbps,
                        latency_s=latency_s, **spec_kw)
    job = Job(mode, tokens, plan, decode=decode, return_cache=return_cache)
    results = run_jobs(spec, [job])
    return None if results is None else results[0][0]


__all__ = ["MODES", "LINKS", "PipelineSpec", "Job", "PrefillResult", "PipelineError", "run_jobs", "run_prefill",
           "init_process_group", "rank_main", "check_tokens"]
