"""Running prefill requests on a pipeline: `run_prefill` (one request, any mode and link) and `run_jobs` (several
requests on one set-up, as the harness uses it). The in-process link runs every stage in this process; gloo and
NCCL run one process per stage, started here (spawn) or by `torchrun --nproc-per-node S` (env:// rendezvous)."""
from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .link import DistChannel, LinkModel, LocalChannel
from .model import resolve_config
from .pauses import ActiveClock, PauseMonitor
from .schedule import MODES, Clock, StageRecord, check_mode, chunk_plan, stage_program, summarize, timeline
from .stage import Stage, split_layers

LINKS = ("inprocess", "gloo", "nccl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineError(RuntimeError):
    """A stage failed or died; the message names the stage and the error."""


@dataclass(frozen=True)
class PipelineSpec:
    """How the pipeline is set up: the model, its split, the link, the ops and where it runs."""
    source: str = "tiny"
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
    fault: tuple[str, int] | None = None  # tests only: ("raise" | "exit", stage) injects a failure

    @property
    def num_stages(self) -> int:
        return self.stages if isinstance(self.stages, int) else len(self.stages)

    def validate(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"unknown link {self.link!r}; choose one of {', '.join(LINKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        cfg = resolve_config(self.source)
        split_layers(cfg.num_layers, self.stages if isinstance(self.stages, int) else list(self.stages))
        LinkModel(self.bandwidth_gbps, self.latency_s)
        from .ops import get_ops
        get_ops(self.ops)
        if self.link == "nccl" and not torch.cuda.is_available():
            raise ValueError("the nccl link needs CUDA devices; use gloo or inprocess on CPU")
        if self.link == "gloo" and torch.device(self.device).type != "cpu":
            raise ValueError("the gloo link carries CPU tensors: use device='cpu' (or the nccl link)")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")


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
            self.channels = [LocalChannel(self.device, model, self.clock) for _ in range(self.S - 1)]
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
            raise RuntimeError(f"injected failure in stage {stage_index}")

    # in-process: every stage here, interleaved chunk by chunk
    def run_inprocess(self, mode: str, tokens, chunks, start_pos=0, tokens_are_decode=False):
        stages = [self.full()] if mode == "unchunked" else [self.stages[i] for i in range(self.S)]
        S, B = len(stages), tokens.shape[0]
        records = [StageRecord(i, chunks) for i in range(S)]
        result = {}
        streams = [torch.cuda.Stream(self.device) for _ in range(S)] if self.device.type == "cuda" else None
        self._sync()
        t_start = time.perf_counter() if streams is None else self.clock.mark()
        gens = []
        for i, st in enumerate(stages):
            self._inject_fault(i)
            gens.append(stage_program(st, mode, chunks, self.clock, records[i], tokens=tokens if i == 0 else None,
                                      recv=self.channels[i - 1] if i > 0 and S > 1 else None,
                                      send=self.channels[i] if i < S - 1 else None, batch=B, start_pos=start_pos,
                                      result=result if i == S - 1 else None))
        for k in range(len(chunks) + 1):  # the last round drains pending sends
            for i, g in enumerate(gens):
                ctx = torch.cuda.stream(streams[i]) if streams else _nullctx()
                with ctx:
                    next(g, None)
        if streams:
            with torch.cuda.stream(streams[-1]):
                end_mark = self.clock.mark()
            self._sync()
            t_start, t_end = self.clock.seconds(t_start), self.clock.seconds(end_mark)
        else:
            t_end = time.perf_counter()
        return [r.resolve(self.clock) for r in records], t_start, t_end, result["logits"]

    # one process per stage: this rank's part of a run
    def run_rank(self, mode: str, tokens, chunks, start_pos=0):
        rank, S = self.rank, self.S
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


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


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


def _run_all(run_once, jobs: list[Job]) -> list[list[PrefillResult]]:
    """Runs `jobs` in `run_order`; returns, per job, the results of its timed runs (empty lists off rank 0, where
    `run_once` returns None)."""
    out: list[list] = [[] for _ in jobs]
    for j, timed in run_order(jobs):
        res = run_once(jobs[j])
        if timed and res is not None:
            out[j].append(res)
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, StageRecord):
        return obj
    return obj


# ---- multi-process --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads(spec: PipelineSpec) -> int:
    return spec.threads or max(1, (os.cpu_count() or 1) // spec.num_stages)


def rank_main(spec: PipelineSpec, jobs: list[Job]) -> list[list[PrefillResult]] | None:
    """Entry point of one stage process (spawned here or started by torchrun); the process group must be up.
    Returns the results on rank 0, None elsewhere."""
    torch.set_num_threads(_threads(spec))
    rank = dist.get_rank()
    if spec.link == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        spec = dataclasses.replace(spec, device=f"cuda:{torch.cuda.current_device()}")
    runner = _Runner(spec, rank)
    try:
        results = _run_all(lambda job: _run_once_rank(runner, job), jobs)
    finally:
        runner.close()
    return results if rank == 0 else None


def init_process_group(spec: PipelineSpec, rank: int | None = None, world: int | None = None, port: int | None = None):
    """env:// rendezvous (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or an explicit local one."""
    if rank is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    world = int(os.environ["WORLD_SIZE"])
    if world != spec.num_stages:
        raise ValueError(f"world size {world} differs from the number of stages {spec.num_stages}: launch "
                         f"torchrun --nproc-per-node {spec.num_stages}")
    backend = "nccl" if spec.link == "nccl" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=spec.timeout_s))


def _spawned(rank, world, port, spec, jobs, q):
    try:
        init_process_group(spec, rank, world, port)
        results = rank_main(spec, jobs)
        if rank == 0:  # plain pickle: no shared-memory handles that die with this process
            q.put(("ok", rank, pickle.dumps(results)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # report, then die non-zero: the parent tears the others down
        q.put(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        q.close()
        q.join_thread()  # flush the report before the hard exit
        os._exit(1)


_PEER_ERRORS = ("Connection closed", "Connection reset", "Gloo", "gloo", "NCCL", "Timed out", "timed out")


def _first_cause(errors: list[tuple[int, str]]) -> str:
    """When one stage fails its peers fail too (closed connections): name the stage that started it first."""
    errors = sorted(errors, key=lambda e: any(p in e[1].splitlines()[0] for p in _PEER_ERRORS))
    rank, msg = errors[0]
    others = "".join(f"\n(then stage {r}: {m.splitlines()[0]})" for r, m in errors[1:])
    return f"stage {rank} failed: {msg}{others}"


def _run_spawned(spec: PipelineSpec, jobs: list[Job]) -> list[list[PrefillResult]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port, S = _free_port(), spec.num_stages
    procs = [ctx.Process(target=_spawned, args=(r, S, port, spec, jobs, q), daemon=True) for r in range(S)]
    for p in procs:
        p.start()
    results, errors, error = None, [], None
    try:
        deadline = None  # once something failed, collect the other reports for a moment, then stop
        while results is None and error is None:
            try:
                status, rank, payload = q.get(timeout=0.2)
                if status == "ok":
                    results = pickle.loads(payload)
                else:
                    errors.append((rank, payload))
                    deadline = deadline or time.time() + 1.0
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and deadline is None:
                    deadline = time.time() + 1.0
                if results is None and all(p.exitcode == 0 for p in procs):
                    error = "stage processes exited without returning results"
            if deadline is not None and time.time() > deadline:
                reported = {r for r, _ in errors}
                silent = [(r, p.exitcode) for r, p in enumerate(procs)
                          if p.exitcode not in (None, 0) and r not in reported]
                if silent:  # a process that died without a word is the likeliest first cause
                    r, code = silent[0]
                    error = f"stage {r} died (exit code {code}) without reporting an error" + "".join(
                        f"\n(then stage {r2}: {m.splitlines()[0]})" for r2, m in errors)
                else:
                    error = _first_cause(errors)
    finally:
        if error is not None:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=spec.timeout_s)
    if error is not None:
        raise PipelineError(error)
    return results


# ---- public entry points ---------------------------------------------------------------------------------------

def run_jobs(spec: PipelineSpec, jobs: list[Job]) -> list[list[PrefillResult]]:
    """Runs each job on one pipeline set-up; returns, per job, one PrefillResult per timed repeat. Warm-ups run
    first, then the timed repeats round-robin over the jobs (`run_order`)."""
    spec.validate()
    cfg = resolve_config(spec.source)
    for job in jobs:
        check_mode(job.mode)
        if not isinstance(job.tokens, torch.Tensor) or job.tokens.dtype != torch.long or job.tokens.dim() != 2:
            raise TypeError("tokens must be a torch.long tensor [B, L]")
        L = job.tokens.shape[1]
        if L + int(job.decode) > cfg.max_seq_len:
            raise ValueError(f"prompt of {L} tokens (+1 decode) exceeds max_seq_len {cfg.max_seq_len}")
        if int(job.tokens.min()) < 0 or int(job.tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        chunk_plan(L, chunks=job.chunks)
        if job.repeats < 1 or job.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
    if torch.device(spec.device).type != "cpu":  # CUDA events time the device; host pauses do not enter
        return _run(spec, jobs)
    with PauseMonitor() as monitor:
        results = _run(spec, jobs)
    if results is not None:
        clock = ActiveClock(monitor.pauses)
        for runs in results:
            for res in runs:
                _cut_pauses(res, clock)
    return results


def _run(spec: PipelineSpec, jobs: list[Job]):
    if spec.link == "inprocess":
        runner = _Runner(spec, None)
        try:
            return _run_all(lambda job: _run_once_inprocess(runner, job), jobs)
        finally:
            runner.close()
    if dist.is_initialized() or "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: this is one rank
        if not dist.is_initialized():
            init_process_group(spec)
        return rank_main(spec, jobs)
    return _run_spawned(spec, jobs)


def _cut_pauses(res: PrefillResult, clock: ActiveClock) -> None:
    """Re-derives a run's figures and timeline with the machine's pauses cut out (see pauses.py); the wall-clock
    TTFT and the paused time stay in the metrics as wall_ttft_s and paused_s."""
    if clock(res.t_end) - clock(res.t_start) <= 0:
        # "paused" for the whole run: the monitor was starved (CPU contention), not the machine stopped. The
        # wall-clock figures stand; paused_s says how much the monitor saw.
        res.metrics = dict(res.metrics, wall_ttft_s=res.t_end - res.t_start,
                           paused_s=clock.paused_between(res.t_start, res.t_end), pause_cut=False)
        return
    conv = lambda pairs: [(clock(a), clock(b)) for a, b in pairs]  # noqa: E731
    records = [StageRecord(r.stage, r.chunks, conv(r.compute), conv(r.recv_wait), conv(r.send_wait), conv(r.send),
                           r.bytes_sent) for r in res.records]
    t0, t1 = clock(res.t_start), clock(res.t_end)
    extra = {k: v for k, v in res.metrics.items() if k.startswith("decode")}
    res.metrics = dict(summarize(records, t0, t1), wall_ttft_s=res.t_end - res.t_start,
                       paused_s=clock.paused_between(res.t_start, res.t_end), **extra)
    res.timeline = timeline(records, t0)
    res.records, res.t_start, res.t_end = records, t0, t1


def run_prefill(source, tokens: torch.Tensor, mode: str = "overlapped", stages: int | list[int] = 2,
                chunk_size: int | None = None, chunks: list[int] | None = None, link: str = "inprocess",
                ops: str = "torch", dtype: str = "float32", device: str = "cpu", bandwidth_gbps: float | None = None,
                latency_s: float = 0.0, decode: bool = True, return_cache: bool = False, **spec_kw) -> PrefillResult:
    """One prefill request through the pipeline. Returns the last-position logits [B, V], the measurements and,
    with return_cache, every stage's KV cache. `unchunked` ignores stages and chunks (it is the baseline)."""
    check_mode(mode)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a torch.long tensor [B, L]")
    plan = chunk_plan(tokens.shape[1], chunk_size, chunks)  # validated in every mode
    if mode in ("unchunked", "naive"):
        plan = [tokens.shape[1]]  # the baseline and the naive pipeline run the prompt whole
    spec = PipelineSpec(source=str(source), stages=stages if isinstance(stages, int) else tuple(stages), link=link,
                        ops=ops, dtype=dtype, device=device, bandwidth_gbps=bandwidth_gbps, latency_s=latency_s,
                        **spec_kw)
    job = Job(mode, tokens, plan, decode=decode, return_cache=return_cache)
    return run_jobs(spec, [job])[0][0]


__all__ = ["MODES", "LINKS", "PipelineSpec", "Job", "PrefillResult", "PipelineError", "run_jobs", "run_prefill",
           "init_process_group", "rank_main"]
