"""The runner: the stages one process owns (all of them in-process, one per rank with gloo or NCCL), and how it
runs a job on them: a prefill (every mode), the greedy decode step after it, the gathering of every rank's records on
rank 0, and the order of the runs (warm-ups first, then the timed repeats round-robin over the jobs)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist

from .checks import DTYPES
from .compress import Codec
from .ragged import decode_step
from .link import DistChannel, LinkAborted, LinkModel, LocalChannel
from .model import resolve_config
from .procs import usable_cores
from .schedule import Clock, StageRecord, stage_program, summarize, timeline
from .spec import Job, PipelineSpec, PrefillResult
from .stage import Stage
from .tp import BroadcastRecv, DistReducer, LocalGroup, LocalReducer, NoSend, ShardRecv, ShardSend, kv_heads_of

class Runner:
    """Owns the stages of this process (all of them in-process, one with gloo/NCCL) and runs jobs on them."""

    def __init__(self, spec: PipelineSpec, rank: int | None):
        self.spec, self.rank = spec, rank  # rank None: in-process
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]
        self.cfg = resolve_config(spec.source)
        self.ranges = spec.layer_ranges(self.cfg)
        self.S, self.T = len(self.ranges), spec.tp
        S, T = self.S, self.T
        # every (stage, TP rank) this process runs: all of them in-process, one per rank (rank = stage * T + t)
        self.groups = {}
        tp_link = LinkModel(spec.tp_bandwidth_gbps, spec.tp_latency_s)
        if rank is None:
            mine = [(s, t) for s in range(S) for t in range(T)]
            if T > 1:  # TP ranks as threads: an all-reduce is a barrier and a sum
                self.groups = {s: LocalGroup(T, spec.timeout_s) for s in range(S)}
            reducers = {(s, t): LocalReducer(self.groups[s], t, tp_link) if T > 1 else None for s, t in mine}
        else:
            self.s, self.t = divmod(rank, T)
            mine = [(self.s, self.t)]
            # every rank creates every stage's TP group, in the same order (new_group is collective)
            tp_groups = [dist.new_group(list(range(g * T, (g + 1) * T))) for g in range(S)] if T > 1 else []
            reducers = {mine[0]: DistReducer(T, tp_groups[self.s], tp_link, src=self.s * T) if T > 1 else None}
        self.codec, self.tp_boundary = Codec(), "matching"
        self.shards = {(s, t): self._stage(self.ranges[s], s, S, t, reducers[(s, t)]) for s, t in mine}
        self._full = None
        self._streams = None  # in-process on a GPU without SM partitions: each stage's stream, made at the first run
        self.clock = Clock(self.device)
        model = LinkModel(spec.bandwidth_gbps, spec.latency_s)
        self.partitions = None
        if rank is None and spec.sm_partitions:  # one GPU as S: each stage on its SMs, the links on the rest
            from .partitions import SMPartitions
            self.partitions = SMPartitions(self.device, self.S, self.S - 1)
        if rank is None:  # channels[boundary][t]: stage s, TP rank t sends to stage s + 1, TP rank t
            lanes = self.partitions.link_streams if self.partitions else [None] * (S - 1)
            self.channels = [[LocalChannel(self.device, model, self.clock, spec.timeout_s, stream=lane)
                              for _ in range(T)] for lane in lanes]
        else:
            self.recv = DistChannel(rank - T, rank, self.device, model, self.clock) if self.s > 0 else None
            self.send = DistChannel(rank, rank + T, self.device, model, self.clock) if self.s < S - 1 else None

    def _stage(self, layers, index, n, tp_rank=0, reduce=None):
        tp = self.T if reduce is not None else 1
        return Stage(self.spec.source, layers, index, n, dtype=self.dtype, device=self.device, ops=self.spec.ops,
                     seed=self.spec.seed, tp_rank=tp_rank, tp=tp, reduce=reduce, tp_comm=self.spec.tp_comm,
                     cuda_graphs=self.spec.cuda_graphs)

    def reducer_stats(self, mode: str) -> list[dict] | None:
        """The all-reduce accounting of the last run, per stage here (TP rank 0's in-process, this rank's in a
        process of its own); None without TP."""
        if self.T == 1 or mode == "unchunked":
            return None
        return [st.model.reduce.stats() for (s, t), st in sorted(self.shards.items())
                if t == 0 or self.rank is not None]

    def configure(self, job: Job) -> None:
        """What may change from job to job on the same stages: how the TP shards combine their partial sums
        (job.tp_comm, None: the spec's) and how boundary sends are compressed (job.compress)."""
        for st in self.shards.values():
            st.model.tp_comm = job.tp_comm or self.spec.tp_comm
            # sharded boundaries under sequence parallelism: each rank hands on and takes in the slice it holds
            st.model.shard_boundaries = self.T > 1 and job.tp_boundary == "sharded" and st.model.tp_comm == "sequence"
        self.codec = Codec(job.compress)
        self.tp_boundary = job.tp_boundary

    def links(self, s: int, t: int, recv, send):
        """Stage s, TP rank t's receive and send ends for this job: the channels between matching TP ranks; with
        tp_boundary 'broadcast' TP rank 0's alone, the rest of the stage taking the boundary by broadcast; with
        'sharded' each rank's 1/T of the tokens over its channel, all-gathered in the receiving stage (under
        sequence parallelism the model slices what it sends itself, and keeps a sequence-parallel chunk's slice as
        it arrives: `Transformer.shard_boundaries`)."""
        if self.T == 1 or self.tp_boundary == "matching":
            return recv, send
        model = self.shards[(s, t)].model
        if self.tp_boundary == "sharded":
            if model.shard_boundaries:
                return None if recv is None else ShardRecv(recv, model.reduce, keep=model.keeps_shard), send
            return (None if recv is None else ShardRecv(recv, model.reduce),
                    None if send is None else ShardSend(send, t, self.T))
        reducer = model.reduce
        if recv is not None:
            recv = BroadcastRecv(recv if t == 0 else None, reducer, self.device)
        if send is not None and t != 0:
            send = NoSend()
        return recv, send

    def _reset_reducers(self):
        for st in self.shards.values():
            if st.model.reduce is not None:
                st.model.reduce.reset()

    def full(self) -> Stage:
        """The whole model as a single stage: the unchunked baseline (built on first use)."""
        if self._full is None:
            self._full = self._stage(range(self.cfg.num_layers), 0, 1)
        return self._full

    def graph_counts(self, mode: str) -> dict | None:
        """Chunk graphs captured and replayed so far by the stages `mode` runs on (None without cuda_graphs)."""
        if not self.spec.cuda_graphs:
            return None
        stages = [self.full()] if mode == "unchunked" else list(self.shards.values())
        return {k: sum(st.graphs.counts()[k] for st in stages) for k in ("captured", "replayed")}

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
    def run_inprocess(self, mode: str, tokens, chunks, start_pos=0, ragged=None):
        shards = {(0, 0): self.full()} if mode == "unchunked" else self.shards
        S, B = (1 if mode == "unchunked" else self.S), (1 if ragged is not None else tokens.shape[0])
        records = {key: StageRecord(key[0], chunks) for key in shards}
        result = {}
        for lanes in self.channels:
            for ch in lanes:
                ch.reset()
        self._reset_reducers()
        ends = {(s, t): self.links(s, t, self.channels[s - 1][t] if s > 0 and S > 1 else None,
                                   self.channels[s][t] if s < S - 1 else None) for s, t in shards}
        gens = {(s, t): stage_program(st, mode, chunks, self.clock, records[(s, t)],
                                      tokens=tokens if s == 0 else None,
                                      recv=ends[(s, t)][0], send=ends[(s, t)][1], batch=B, start_pos=start_pos,
                                      result=(result if t == 0 else {}) if s == S - 1 else None, codec=self.codec,
                                      ragged=ragged, yield_posts=self.device.type == "cuda")
                for (s, t), st in shards.items()}
        if self.device.type == "cuda":  # the host only enqueues: interleave the stages chunk by chunk
            if self.partitions:  # unchunked: on partition 0
                streams = self.partitions.stage_streams[:S]
            else:  # the same stream per stage run after run (the unchunked stage runs on the first)
                if self._streams is None:
                    self._streams = [torch.cuda.Stream(self.device) for _ in range(self.S)]
                streams = self._streams[:S]
            self.clock.anchor()
            t0 = self.clock.mark()
            for i in range(S):
                self._inject_fault(i)
            with counting_host_syncs() as syncs:  # each stage's count in its record
                drive_gpu_rounds(gens, streams, len(chunks), records=records, syncs=syncs,
                                 receivers={key for key in gens if ends[key][0] is not None})
            with torch.cuda.stream(streams[-1]):
                end_mark = self.clock.mark()
            self._sync()
            t_start, t_end = self.clock.seconds(t0), self.clock.seconds(end_mark)
        else:  # each stage blocks on its links like a process of its own would
            errors: list[tuple[int, BaseException]] = []

            def drive(i, g):
                try:
                    torch.set_num_threads(_threads(self.spec))  # per thread: this stage's share of the cores
                    self._inject_fault(i)
                    for _ in g:
                        pass
                except BaseException as e:  # noqa: BLE001 - re-raised below, after every stage has stopped
                    errors.append((i, e))
                    for lanes in self.channels:
                        for ch in lanes:
                            ch.abort(f"stage {i} failed")
                    for group in self.groups.values():
                        group.abort()
            threads = [threading.Thread(target=drive, args=(s, g), name=f"stage-{s}" + (f"-tp{t}" if self.T > 1
                                                                                          else ""), daemon=True)
                       for (s, t), g in gens.items()]
            t_start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_end = time.perf_counter()
            if errors:  # the failure itself, not a peer that saw its link or TP group abort
                first = sorted(errors, key=lambda e: isinstance(e[1], (LinkAborted, threading.BrokenBarrierError)))[0]
                raise first[1]
        resolved = {key: rec.resolve(self.clock) for key, rec in records.items()}
        mine = [least_reduce(resolved[key], [resolved[(key[0], t)] for t in range(self.T) if (key[0], t) in resolved])
                for key in sorted(resolved) if key[1] == 0]
        return mine, t_start, t_end, result["logits"]

    # one process per stage: this rank's part of a run
    def run_rank(self, mode: str, tokens, chunks, start_pos=0, ragged=None):
        rank = self.rank
        self._reset_reducers()
        if mode == "unchunked":  # no pipeline: rank 0 runs the whole model, the others wait
            dist.barrier()
            if rank != 0:
                dist.barrier()
                return None
            self._inject_fault(0)
            st, recv, send = self.full(), None, None
        else:
            st = self.shards[(self.s, self.t)]
            recv, send = self.links(self.s, self.t, self.recv, self.send)
            dist.barrier()
        record = StageRecord(self.s if mode != "unchunked" else 0, chunks)
        result = {}
        self._sync()
        self.clock.anchor()  # every rank's GPU clock on the host time base, from an idle device
        t_start = time.perf_counter()
        with counting_host_syncs(self.device.type == "cuda") as syncs:
            for k in stage_program(st, mode, chunks, self.clock, record, tokens=tokens if (recv is None) else None,
                                   recv=recv, send=send, batch=1 if ragged is not None else tokens.shape[0],
                                   start_pos=start_pos, result=result, codec=self.codec, ragged=ragged):
                if k == 0 and mode != "unchunked":
                    self._inject_fault(self.s)
        record.host_syncs = syncs.count
        self._sync()
        t_end = time.perf_counter()
        if mode == "unchunked":
            dist.barrier()
        return record.resolve(self.clock), t_start, t_end, result.get("logits")

    def caches(self, mode):
        """Per stage here, (k, v) [layers, B, max_len, Hkv, D]: with TP, every KV head once, gathered from the
        ranks here (`merge_tp_caches`)."""
        if mode == "unchunked":
            return [(self._full.cache.k.clone(), self._full.cache.v.clone())]
        by_stage = {}
        for (s, t), st in sorted(self.shards.items()):
            by_stage.setdefault(s, []).append((t, st.cache.k.clone(), st.cache.v.clone()))
        return [merge_tp_caches(parts, self.cfg, self.T) for parts in by_stage.values()]

    def close(self):
        for st in getattr(self, "shards", {}).values():
            if st.model.reduce is not None:
                st.model.reduce.close()
        lanes = [ch for lane in getattr(self, "channels", []) for ch in lane]
        for ch in lanes + [getattr(self, "recv", None), getattr(self, "send", None)]:
            if ch is not None:
                ch.close()


SYNC_WARNING = "synchronizing CUDA operation"  # what torch says under set_sync_debug_mode("warn")
SYNC_MODE_NOTICE = "Synchronization debug mode is a prototype"  # and, once, of the mode itself: not passed on
_PASSED_ON: set = set()  # the warnings counting_host_syncs has passed on (text, category, file, line)


class _SyncCount:
    def __init__(self, caught=()):
        self.caught = caught

    @property
    def count(self) -> int:
        """The host syncs so far."""
        return sum(SYNC_WARNING in str(w.message) for w in self.caught)


@contextlib.contextmanager
def counting_host_syncs(enabled: bool = True):
    """Counts the calls inside that made the host wait for the GPU (a blocking copy, `.item()`, ...: torch's sync
    debug mode, as warnings; other warnings pass through). A run's stages are only enqueued by the host; one such
    call stalls the host until the device catches up, and with one host thread driving every stage in-process,
    every stage queued after it waits too: the pipeline then runs in the order the host enqueued it, and overlap
    cannot show (seen on an H200). Each stage record keeps its count (`host_syncs`)."""
    if not enabled:
        yield _SyncCount()
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield _SyncCount(caught)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:  # the others passed on, each text from each place once (not once per run: a run's catching
        # resets the registries that would show it once)
        key = (str(w.message), w.category, w.filename, w.lineno)
        if SYNC_WARNING not in key[0] and SYNC_MODE_NOTICE not in key[0] and key not in _PASSED_ON:
            _PASSED_ON.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def drive_gpu_rounds(gens: dict, streams, n_chunks: int, receivers, records=None, syncs=None) -> None:
    """One host thread enqueues every stage's work on its own stream (`streams[s]`; None: the current one), round by
    round, round k for chunk k: first each stage in `receivers` posts its receive of chunk k (`stage_program(...,
    yield_posts=True)` pauses there), then the stages in pipeline order compute chunk k and enqueue its send; a last
    round lets each stage wait for its sends still in flight. Every event a stream waits for has then been recorded
    before the wait is enqueued: a wait on an event not yet recorded would be a no-op, and a device-side spin on
    work the host has yet to enqueue can hang the device for good (a module load waits for it). `records` (per
    key), if given, get each stage's host seconds (`host_enqueue_s`) and, with `syncs` (`counting_host_syncs`), its
    host syncs."""
    order = sorted(gens)

    def on(key):
        stream = streams[key[0]]
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def step(key, want):
        before, t0 = syncs.count if syncs is not None else 0, time.perf_counter()
        with on(key):
            got = next(gens[key], None)
        if records is not None:  # the host's time on this stage's step, and what it made the host wait for
            rec = records[key]
            rec.host_enqueue_s = (rec.host_enqueue_s or 0.0) + time.perf_counter() - t0
            if syncs is not None:
                rec.host_syncs += syncs.count - before
        if got != want:
            raise RuntimeError(f"in-process GPU driver: stage {key[0]} yielded {got!r} where {want!r} was due")
    for k in range(n_chunks):
        for key in order:
            if key in receivers:
                step(key, ("posted", k))
        for key in order:
            step(key, k)
    for key in order:  # the sends still in flight
        step(key, None)


def least_reduce(record: StageRecord, tp_records: list[StageRecord]) -> StageRecord:
    """`record` (TP rank 0's) with each chunk's all-reduce time replaced by the sum over its calls of the least
    wait over the stage's TP ranks. A rank that computed faster waits in a collective for the slowest; the last to
    arrive waits only for the transfer. The least wait is the collective's own time, and the chunk's time less it
    is the slowest rank's compute: what paces the stage."""
    if len(tp_records) <= 1 or not record.reduce:
        return record
    least = []
    for k, (_, calls, payload, per_call) in enumerate(record.reduce):
        each = [min(r.reduce[k][3][i] for r in tp_records) for i in range(len(per_call))]
        least.append((sum(each), calls, payload, tuple(each)))
    return dataclasses.replace(record, reduce=least)


def merge_tp_caches(parts, cfg, T: int):
    """[(t, k, v)] of one stage's TP ranks -> (k, v) with every KV head once, in head order (a KV head replicated
    over several ranks is taken from the first). A single part of a TP stage is returned as it is."""
    if T == 1 or len(parts) == 1:
        return parts[0][1], parts[0][2]
    ks, vs, seen = [], [], set()
    for t, k, v in sorted(parts, key=lambda p: p[0]):
        heads = kv_heads_of(cfg, t, T)
        if heads.start not in seen:
            seen.add(heads.start)
            ks.append(k)
            vs.append(v)
    return torch.cat(ks, dim=3), torch.cat(vs, dim=3)


def tp_metrics(prefill: list[dict] | None, decode: list[dict] | None, tp: int) -> dict:
    """The reduce traffic of a run, per stage: all-reduce payload bytes (what each rank contributes), the ring's
    bytes on the wire per rank (2(T-1)/T of that), calls and seconds spent in them, for the prefill and one decode
    token, and prefill over decode (= L, the prompt length)."""
    if prefill is None:
        return {}
    out = dict(tp=tp, allreduce_bytes_per_stage=[p["payload_bytes"] for p in prefill],
               allreduce_wire_bytes_per_stage=[p["wire_bytes"] for p in prefill],
               allreduce_calls_per_stage=[p["calls"] for p in prefill],
               allreduce_s_per_stage=[p["seconds"] for p in prefill])
    if any(p["broadcast_calls"] for p in prefill):  # tp_boundary 'broadcast': each boundary once, then broadcast
        out["boundary_broadcast_bytes_per_stage"] = [p["broadcast_bytes"] for p in prefill]
        out["boundary_broadcast_s_per_stage"] = [p["broadcast_seconds"] for p in prefill]
    if any(p["gather_calls"] for p in prefill):  # tp_boundary 'sharded': 1/T per rank, then an all-gather
        out["boundary_gather_bytes_per_stage"] = [p["gather_bytes"] for p in prefill]
        out["boundary_gather_s_per_stage"] = [p["gather_seconds"] for p in prefill]
    if decode is not None:
        out["decode_allreduce_bytes_per_stage"] = [d["payload_bytes"] for d in decode]
        out["allreduce_prefill_over_decode"] = [p["payload_bytes"] / d["payload_bytes"] if d["payload_bytes"] else None
                                                for p, d in zip(prefill, decode)]
    return out


def _reset(runner: Runner, mode: str, B: int, max_len: int):
    stages = [runner.full()] if mode == "unchunked" else list(runner.shards.values())
    for st in stages:
        st.reset_cache(B, max_len)


def run_once_inprocess(runner: Runner, job: Job) -> PrefillResult:
    """One run of `job` with every stage in this process."""
    if job.ragged:
        return run_ragged_inprocess(runner, job)
    B, L = job.tokens.shape
    tokens = job.tokens.to(runner.device)
    _reset(runner, job.mode, B, L + 1)
    runner.configure(job)
    graphs = runner.graph_counts(job.mode)
    records, t0, t1, logits = runner.run_inprocess(job.mode, tokens, job.chunks)
    metrics = summarize(records, t0, t1)
    if graphs is not None:  # what this run captured and replayed (captures: the first run of each chunk shape)
        metrics["cuda_graphs"] = {k: v - graphs[k] for k, v in runner.graph_counts(job.mode).items()}
    reduce_prefill = runner.reducer_stats(job.mode)
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
    res.metrics |= tp_metrics(reduce_prefill, runner.reducer_stats(job.mode) if job.decode else None, runner.T)
    if job.return_cache:
        res.caches = [(k[:, :, :L].cpu(), v[:, :, :L].cpu()) for k, v in runner.caches(job.mode)]
    return res


def _greedy_tokens(runner: Runner, job: Job, part, as_tokens, shape) -> torch.Tensor:
    """The greedy next tokens where the decode step starts (the first stage's ranks): `as_tokens(logits)` on the
    last stage, sent back by its TP rank t to the first stage's TP rank t; zeros of `shape` on the other ranks."""
    rank, S, T, s, t = runner.rank, runner.S, runner.T, runner.s, runner.t
    nxt = torch.zeros(shape, dtype=torch.long, device=runner.device)
    if job.mode == "unchunked":
        if rank == 0:
            nxt = as_tokens(part[3])
    elif S > 1:
        if s == S - 1:
            dist.send(as_tokens(part[3]).contiguous(), t, tag=1 << 20)
        elif s == 0:
            dist.recv(nxt, (S - 1) * T + t, tag=1 << 20)
    else:
        nxt = as_tokens(part[3])
    return nxt


def _gathered(runner: Runner, job: Job, chunks, everyone: list[dict]) -> PrefillResult:
    """Rank 0: every rank's share of a run (`everyone`, in rank order) combined into one result, caches aside:
    the pipeline's records from the TP rank 0s (each chunk's collective time the least over its stage's ranks),
    the last stage's logits, the decode step's and the reduce traffic."""
    T = runner.T
    lead = [p for p in everyone if p["tp_rank"] == 0]
    parts = [p["part"] for p in lead if p["part"] is not None]
    if T > 1 and job.mode != "unchunked":  # each chunk's collective time: the least any rank of the stage waited
        parts = [(least_reduce(part[0], [everyone[g * T + u]["part"][0] for u in range(T)]),) + tuple(part[1:])
                 for g, part in enumerate(parts)]
    records, starts, ends, logits = zip(*parts)
    res = PrefillResult(job.mode, chunks, logits[-1].float(), summarize(list(records), min(starts), ends[-1]),
                        timeline(list(records), min(starts)), records=list(records), t_start=min(starts),
                        t_end=ends[-1])
    if job.decode:
        dparts = [p["decode"] for p in lead if p["decode"] is not None]
        res.decode_logits = dparts[-1][3].float()
        res.metrics["decode_bytes_per_boundary"] = [d[0].bytes_sent for d in dparts[:-1]]
        res.metrics["decode_s"] = dparts[-1][2] - min(d[1] for d in dparts)
    if lead[0]["reduce"] is not None:
        res.metrics |= tp_metrics([p["reduce"][0] for p in lead],
                                  [p["decode_reduce"][0] for p in lead] if job.decode else None, T)
    return res


def _gather(runner: Runner, mine: dict) -> list[dict] | None:
    """Every rank's share on rank 0 (None elsewhere)."""
    everyone = [None] * (runner.S * runner.T) if runner.rank == 0 else None
    dist.gather_object(_to_cpu(mine), everyone, dst=0)
    return everyone


def _run_once_rank(runner: Runner, job: Job) -> PrefillResult | None:
    """This rank's share of one run of `job`; rank 0 gathers everyone's and returns the combined result."""
    if job.ragged:
        return _run_ragged_rank(runner, job)
    rank, S, T, t = runner.rank, runner.S, runner.T, runner.t
    B, L = job.tokens.shape
    tokens = job.tokens.to(runner.device)
    _reset(runner, job.mode, B, L + 1)
    runner.configure(job)
    part = runner.run_rank(job.mode, tokens, job.chunks)
    mine = dict(part=part, tp_rank=t, reduce=runner.reducer_stats(job.mode))
    if job.decode:
        nxt = _greedy_tokens(runner, job, part, lambda logits: logits.argmax(-1)[:, None], (B, 1))
        mine["decode"] = runner.run_rank("chunked" if job.mode != "unchunked" else "unchunked", nxt, [1],
                                         start_pos=L)
        mine["decode_reduce"] = runner.reducer_stats(job.mode)
    if job.return_cache and (job.mode != "unchunked" or rank == 0):
        mine["cache"] = [(t, k[:, :, :L].cpu(), v[:, :, :L].cpu()) for k, v in runner.caches(job.mode)]
    everyone = _gather(runner, mine)
    if rank != 0:
        return None
    res = _gathered(runner, job, job.chunks, everyone)
    if job.return_cache:
        if job.mode == "unchunked":
            res.caches = [(k, v) for _, k, v in everyone[0]["cache"]]
        else:
            res.caches = [merge_tp_caches([c for p in everyone[g * T:(g + 1) * T] for c in p["cache"]], runner.cfg, T)
                          for g in range(S)]
    return res


# ---- ragged batches: rows of different lengths, packed, over paged caches (pipeline.ragged) ------------------

def _ragged_setup(runner: Runner, job: Job):
    """The job's steps, each step's packed tokens [1, N_k], and every stage here with a fresh page pool."""
    rows = [r.to(runner.device) for r in job.tokens]
    lengths = [len(r) for r in rows]
    steps = job.steps()
    inputs = [torch.cat([r[p:p + n] for r, p, n in zip(rows, st.starts, st.lengths)])[None] for st in steps]
    stages = [runner.full()] if job.mode == "unchunked" else list(runner.shards.values())
    for st in stages:
        st.reset_pool(lengths, runner.spec.page_size)
    runner.configure(job)
    return lengths, steps, inputs, [st.tokens for st in steps]


def _row_caches(runner: Runner, mode: str, lengths: list[int]) -> list[list[tuple]]:
    """Per stage here, per row: (t, k, v) [layers, 1, len, Hkv, D] gathered from the pages."""
    shards = {(0, 0): runner.full()} if mode == "unchunked" else runner.shards
    by_stage: dict[int, list] = {}
    for (s, t), st in sorted(shards.items()):
        by_stage.setdefault(s, []).append([(t,) + tuple(c.cpu() for c in st.pool.row_cache(b, n))
                                           for b, n in enumerate(lengths)])
    return [by_stage[s] for s in sorted(by_stage)]


def _merge_row_caches(per_stage_parts, cfg, T: int, rows: int):
    """[stage][TP part][row] (t, k, v) -> [row][stage] (k, v) with every KV head once."""
    return [[merge_tp_caches([part[b] for part in parts], cfg, T) for parts in per_stage_parts] for b in range(rows)]


def run_ragged_inprocess(runner: Runner, job: Job) -> PrefillResult:
    """One run of a ragged job with every stage in this process."""
    lengths, steps, inputs, chunks = _ragged_setup(runner, job)
    records, t0, t1, logits = runner.run_inprocess(job.mode, inputs, chunks, ragged=steps)
    res = PrefillResult(job.mode, chunks, logits.float().cpu(), summarize(records, t0, t1), timeline(records, t0),
                        records=records, t_start=t0, t_end=t1)
    reduce_prefill = runner.reducer_stats(job.mode)
    if job.decode:  # each row's greedy token, at its own position
        nxt = logits.argmax(-1)[None]  # [1, B]
        drec, d0, d1, dlog = runner.run_inprocess("chunked" if job.mode != "unchunked" else "unchunked", [nxt],
                                                  [len(lengths)], ragged=[decode_step(lengths)])
        res.decode_logits = dlog.float().cpu()
        res.metrics["decode_bytes_per_boundary"] = [r.bytes_sent for r in drec[:-1]]
        res.metrics["decode_s"] = d1 - d0
    res.metrics |= tp_metrics(reduce_prefill, runner.reducer_stats(job.mode) if job.decode else None, runner.T)
    if job.return_cache:
        res.row_caches = _merge_row_caches(_row_caches(runner, job.mode, lengths), runner.cfg, runner.T,
                                           len(lengths))
    return res


def _run_ragged_rank(runner: Runner, job: Job) -> PrefillResult | None:
    """This rank's share of a ragged job; rank 0 gathers everyone's and returns the combined result."""
    rank, S, T, t = runner.rank, runner.S, runner.T, runner.t
    lengths, steps, inputs, chunks = _ragged_setup(runner, job)
    part = runner.run_rank(job.mode, inputs, chunks, ragged=steps)
    mine = dict(part=part, tp_rank=t, reduce=runner.reducer_stats(job.mode))
    if job.decode:
        B = len(lengths)
        nxt = _greedy_tokens(runner, job, part, lambda logits: logits.argmax(-1)[None], (1, B))
        mine["decode"] = runner.run_rank("chunked" if job.mode != "unchunked" else "unchunked", [nxt], [B],
                                         ragged=[decode_step(lengths)])
        mine["decode_reduce"] = runner.reducer_stats(job.mode)
    if job.return_cache and (job.mode != "unchunked" or rank == 0):
        mine["cache"] = _row_caches(runner, job.mode, lengths)
    everyone = _gather(runner, mine)
    if rank != 0:
        return None
    res = _gathered(runner, job, chunks, everyone)
    if job.return_cache:
        if job.mode == "unchunked":
            per_stage = everyone[0]["cache"]
        else:  # stage g: its T ranks' parts
            per_stage = [[everyone[g * T + u]["cache"][0][0] for u in range(T)] for g in range(S)]
        res.row_caches = _merge_row_caches(per_stage, runner.cfg, T, len(lengths))
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
    return spec.threads or max(1, usable_cores() // spec.world_size)


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
