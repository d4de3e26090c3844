"""The runner: the stages one process owns (all of them in-process, one per rank with gloo or NCCL), and how it
runs a job on them: a prefill (every mode), the greedy decode step after it, the gathering of every rank's records on
rank 0, and the order of the runs (warm-ups first, then the timed repeats round-robin over the jobs)."""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from .checks import DTYPES
from .link import DistChannel, LinkAborted, LinkModel, LocalChannel
from .model import resolve_config
from .schedule import Clock, StageRecord, stage_program, summarize, timeline
from .spec import Job, PipelineSpec, PrefillResult
from .stage import Stage, split_layers

class Runner:
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
        self.partitions = None
        if rank is None and spec.sm_partitions:  # one GPU as S: each stage on its SMs, the links on the rest
            from .partitions import SMPartitions
            self.partitions = SMPartitions(self.device, self.S, self.S - 1)
        if rank is None:
            lanes = self.partitions.link_streams if self.partitions else [None] * (self.S - 1)
            self.channels = [LocalChannel(self.device, model, self.clock, spec.timeout_s, stream=lane)
                             for lane in lanes]
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
            streams = (self.partitions.stage_streams[:S] if self.partitions  # unchunked: on partition 0
                       else [torch.cuda.Stream(self.device) for _ in range(S)])
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


def _reset(runner: Runner, mode: str, B: int, max_len: int):
    stages = [runner.full()] if mode == "unchunked" else list(runner.stages.values())
    for st in stages:
        st.reset_cache(B, max_len)


def run_once_inprocess(runner: Runner, job: Job) -> PrefillResult:
    """One run of `job` with every stage in this process."""
    B, L = job.tokens.shape
    tokens = job.tokens.to(runner.device)
    _reset(runner, job.mode, B, L + 1)
    records, t0, t1, logits = runner.run_inprocess(job.mode, tokens, job.chunks)
    metrics = summarize(records, t0, t1)
    if runner.partitions is not None:
        metrics["sm_partitions"] = runner.partitions.describe()
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


def _run_once_rank(runner: Runner, job: Job) -> PrefillResult | None:
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


def run_all(run_once, jobs: list[Job], progress=None) -> list[list[PrefillResult]]:
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
    runner = Runner(spec, rank)
    try:
        results = run_all(lambda job: _run_once_rank(runner, job), jobs, progress if rank == 0 else None)
    finally:
        runner.close()
    return results if rank == 0 else None
