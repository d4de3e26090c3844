"""Running prefill requests on a pipeline: `run_prefill` (one request, any mode and link) and `run_jobs` (several
requests on one set-up, as the harness uses it), with every argument checked first. The in-process link runs every
stage in this process (`runner`); gloo and NCCL run one process per stage, started here (`procs`, spawn) or by
`torchrun --nproc-per-node S` (env:// rendezvous)."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from . import checks
from .checks import DTYPES, TOKEN_DTYPES
from .compress import check_codec
from .ragged import check_rows, pages_needed
from .config import ModelConfig
from .link import LinkModel
from .model import resolve_config
from .procs import PipelineError, init_process_group, run_spawned, torchrun_rank
from .runner import Runner, rank_main, run_all, run_once_inprocess, run_order
from .schedule import DEFAULT_CHUNK_SIZE, MODES, check_mode, chunk_plan, chunk_starts, mode_chunks
from .spec import LINKS, Job, PipelineSpec, PrefillResult
from .tp import check_tp_boundary, check_tp_comm

# ---- public entry points ---------------------------------------------------------------------------------------

def check_job(job: Job, cfg) -> None:
    """A job's fields, one by one, against the model's limits: a one-line error naming the bad value."""
    if not isinstance(job, Job):
        raise TypeError(f"jobs must be Job objects, got {checks.shown(job)}")
    check_mode(job.mode)
    if job.ragged:
        check_rows(job.tokens, cfg, decode=job.decode)
        if job.chunk_size is not None:
            checks.positive_int("chunk_size", job.chunk_size)
        if job.token_budget is not None:
            checks.positive_int("token_budget", job.token_budget)
        want = [st.tokens for st in job.steps()]
        if list(job.chunks) != want:
            raise ValueError(f"a ragged job's chunks are its steps' packed tokens, {want}; got {job.chunks}")
    else:
        check_tokens(job.tokens, cfg, decode=job.decode)
        chunk_plan(job.tokens.shape[1], chunks=job.chunks)
        if job.token_budget is not None:
            raise ValueError(f"token_budget={job.token_budget!r} packs the steps of a ragged batch (tokens a list of "
                             "1-D rows); a [B, L] tensor takes chunks")
    checks.positive_int("repeats", job.repeats)
    checks.integer("warmup", job.warmup, 0)
    checks.flag("decode", job.decode)
    checks.flag("return_cache", job.return_cache)
    if job.tp_comm is not None:
        check_tp_comm(job.tp_comm)
    check_codec(job.compress)
    check_tp_boundary(job.tp_boundary)


def check_job_tp(job: Job, spec: PipelineSpec) -> None:
    """A job's TP choices against the set-up: a non-default one where it could change nothing is refused (the CLI
    refuses the same), not silently ignored."""
    if job.tp_comm not in (None, "serial") and spec.tp == 1:
        raise ValueError(f"tp_comm={job.tp_comm!r} chooses how tensor-parallel ranks combine their sums: it needs "
                         "tp >= 2 (got tp=1)")
    if job.tp_boundary != "matching" and (spec.tp == 1 or spec.num_stages == 1):
        raise ValueError(f"tp_boundary={job.tp_boundary!r} chooses how a boundary crosses between tensor-parallel "
                         f"stages: it needs tp >= 2 and stages >= 2 (got tp={spec.tp}, stages={spec.num_stages})")


def check_page_size(spec: PipelineSpec, cfg) -> None:
    """A ragged batch's KV page holds at most the model's context: a larger one is memory no row can use."""
    if spec.page_size > cfg.max_seq_len:
        raise ValueError(f"page_size={spec.page_size} is more positions than the model's context (max_seq_len "
                         f"{cfg.max_seq_len}) and no row can fill it: choose 1 to {cfg.max_seq_len} (serving stacks "
                         "use 16 to 256)")


def memory_needed(spec: PipelineSpec, cfg, job: Job) -> int:
    """A lower estimate of the bytes one run of `job` holds at once on one machine (the device's memory, or the
    host's): the stages' weights and KV cache and those of the unchunked baseline's whole model, one chunk's
    activations, with the torch ops the attention scores SDPA materialises for a chunk after a prefix, and with
    cuda_graphs what the graphs keep (`pipeline.graphs`)."""
    B, L = job.dims()
    item = DTYPES[spec.dtype].itemsize
    T = spec.tp
    tables = cfg.vocab_size * cfg.hidden_size * (1 + (not cfg.tie_embeddings))  # embedding and head
    params = cfg.num_layers * cfg.params_per_layer + tables
    positions = B * (L + 1)
    if job.ragged:  # a stage's page pool: whole pages per row
        positions = pages_needed([len(r) for r in job.tokens], spec.page_size, job.decode) * spec.page_size
    kv = 2 * cfg.num_layers * positions * cfg.num_kv_heads * cfg.head_dim * item
    # the stages' TP ranks: layers split, embedding and head on every rank, KV heads replicated when T > Hkv
    stage_params = params + (T - 1) * tables
    stage_kv = kv * max(1, T // cfg.num_kv_heads)
    C = max(job.chunks)  # a ragged job's chunks are its steps' packed tokens: a batch of one
    act = (1 if job.ragged else B) * C * (4 * cfg.hidden_size + 2 * cfg.intermediate_size
                                          + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) * item
    scores = 0
    if spec.ops == "torch" and job.ragged:  # the reference attends row by row
        scores = max(cfg.num_heads * n * (p + n) * 4 for st in job.steps() for p, n in zip(st.starts, st.lengths))
    elif spec.ops == "torch":  # [B, Hq, c, p + c] fp32 scores for a chunk after a prefix (masked SDPA, math path)
        starts = chunk_starts(job.chunks)
        scores = max((B * cfg.num_heads * c * (p + c) * 4 for c, p in zip(job.chunks, starts) if p > 0), default=0)
    graphs = 0
    if spec.cuda_graphs:  # each stage and the baseline: a graph pool holding a chunk's scratch, and every chunk's
        # input and output kept (hidden states [B, c, H]; the last stage's output is smaller, not counted off)
        graphs = (spec.num_stages + 1) * (act + 2 * B * L * cfg.hidden_size * item)
    # the stages, and the unchunked baseline's whole model (one rank)
    return (stage_params + params) * item + stage_kv + kv + act + scores + graphs


def memory_available(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_resources(spec: PipelineSpec, cfg, jobs: list[Job]) -> None:
    """Refuses, before any allocation, a request that cannot fit this machine's memory (it would end in the OOM
    killer), and an emulated link so slow that one send would take half the time a stage waits for its peer
    (`spec.timeout_s`) or one run's sends over an hour."""
    have = memory_available(spec.device)
    needs = [memory_needed(spec, cfg, job) for job in jobs]
    need = max(needs)  # the largest run's, so that the figure does not depend on the jobs' order
    if need > have:
        B, L = jobs[needs.index(need)].dims()
        raise ValueError(f"batch {B} x prompt {L} needs at least {need / 1e9:.1f} GB at once (weights, KV cache "
                         f"and activations of the stages and of the unchunked baseline), more than the "
                         f"{have / 1e9:.1f} GB of {torch.device(spec.device).type} memory here")
    link = LinkModel(spec.bandwidth_gbps, spec.latency_s)
    if link.active:
        item = DTYPES[spec.dtype].itemsize
        # a receiver may wait for the send before its own and then its own: two transfers within its wait limit
        # (in-process on a GPU nothing waits on the host: the streams wait for each other)
        host_waits = spec.link != "inprocess" or torch.device(spec.device).type != "cuda"
        what = ", ".join(([f"{spec.bandwidth_gbps:g} GB/s"] if spec.bandwidth_gbps else [])
                         + [f"{spec.latency_s * 1e6:g} us per send"])
        for job in jobs:
            B, L = job.dims()
            rows = 1 if job.ragged else B  # a ragged job's chunks are its steps' packed tokens, one message each
            delays = [link.delay_s(rows * c * cfg.hidden_size * item) for c in job.chunks]
            if host_waits and 2 * max(delays) >= spec.timeout_s:
                raise ValueError(f"the emulated link ({what}) would "
                                 f"take {max(delays):.1f} s to carry one {max(job.chunks)}-token send of a {L}-token "
                                 f"prompt, half or more of the {spec.timeout_s:g} s a stage waits for its peer before "
                                 "it takes it as failed; choose a faster one")
            if sum(delays) > 3600:
                raise ValueError(f"the emulated link ({what}) "
                                 f"would take {sum(delays) / 3600:.1f} h to carry one {L}-token prompt across a "
                                 "boundary; choose a faster one")


def check_tokens(tokens, cfg, decode: bool = False) -> None:
    """tokens: a torch.long (or torch.int32, as nn.Embedding takes) tensor [B, L] with B, L >= 1, ids in
    [0, vocab), L (+1 with decode) within context."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.long tensor [B, L], got {type(tokens).__name__}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"tokens must be a torch.long or torch.int32 tensor [B, L], got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must have shape [B, L] with B, L >= 1 (an empty prompt has nothing to prefill), "
                         f"got {tuple(tokens.shape)}")
    L = tokens.shape[1]
    if L + int(bool(decode)) > cfg.max_seq_len:
        raise ValueError(f"prompt of {L} tokens{' (+1 decode)' if decode else ''} exceeds the model's {cfg.context}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got min {lo}, max {hi}")


def long_tokens(job: Job) -> Job:
    """The job with torch.long token ids (int32 ones converted; the caller's job is left as it is)."""
    if job.ragged:
        rows = [t.long() for t in job.tokens]
        return job if all(r is t for r, t in zip(rows, job.tokens)) else dataclasses.replace(job, tokens=rows)
    return job if job.tokens.dtype == torch.long else dataclasses.replace(job, tokens=job.tokens.long())


def run_jobs(spec: PipelineSpec, jobs: list[Job], progress=None) -> list[list[PrefillResult]] | None:
    """Runs each job on one pipeline set-up; returns, per job, one PrefillResult per timed repeat. Warm-ups run
    first, then the timed repeats round-robin over the jobs (`run_order`). Under torchrun (one process per stage,
    process group from env://) every rank calls this with the same arguments; rank 0 gets the results, the other
    ranks None. `progress(done, total, what)`, if given, is called (on rank 0) before each run and at the end."""
    if not isinstance(spec, PipelineSpec):
        raise TypeError(f"spec must be a PipelineSpec, got {checks.shown(spec)}")
    spec.validate()
    cfg = resolve_config(spec.source)
    if not isinstance(jobs, (list, tuple)) or not jobs:
        raise ValueError(f"jobs must be a non-empty list of Job, got {checks.shown(jobs)}")
    for job in jobs:
        check_job(job, cfg)
        check_codec(job.compress, DTYPES[spec.dtype])
        check_job_tp(job, spec)
    jobs = [long_tokens(job) for job in jobs]
    if any(job.ragged for job in jobs):
        check_page_size(spec, cfg)
        if spec.cuda_graphs:
            raise ValueError("cuda_graphs captures the chunks of [B, L] prompts; a ragged batch's steps carry "
                             "per-step rows and pages from the host and run eagerly: drop one of the two")
    check_resources(spec, cfg, jobs)
    return _run(spec, jobs, progress)


def _run(spec: PipelineSpec, jobs: list[Job], progress=None):
    rank = torchrun_rank()
    if spec.link == "inprocess":
        if rank is not None and dist.get_world_size() > 1:
            raise ValueError("link 'inprocess' runs every stage in this one process: launch it without torchrun")
        runner = Runner(spec, None)
        try:
            return run_all(lambda job: run_once_inprocess(runner, job), jobs, progress)
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
                latency_s: float = 0.0, decode: bool = True, return_cache: bool = False, compress: str = "none",
                tp_boundary: str = "matching", token_budget: int | None = None,
                **spec_kw) -> PrefillResult | None:
    """One prefill request through the pipeline. Returns the last-position logits [B, V], the measurements and,
    with return_cache, every stage's KV cache. `unchunked` ignores stages and chunks (it is the baseline).
    compress: what crosses each stage boundary, "none", "bf16" (float32 models) or "fp8" (e4m3 with per-token
    scales): lossy, the logits then differ from the unchunked model's (`pipeline.compress`).
    tokens may also be a list of 1-D rows of different lengths (a ragged batch, `pipeline.ragged`): each row in
    chunks of chunk_size, the rows' chunks packed into one step, the KV cache in pages of `page_size`; logits
    [B, V] are then each row's at its own last token, decode continues each row from its own length, and with
    return_cache `row_caches[b]` holds row b's (k, v) per stage. token_budget (ragged only): each step packs at
    most that many tokens, filled from the rows in order (`pipeline.ragged.ragged_plan`), as a serving scheduler's
    per-step token budget does.
    chunk_size / chunks: the chunks of the chunked and overlapped modes (given neither, chunks of
    DEFAULT_CHUNK_SIZE = 128 tokens, as the CLI's --chunk-size; a ragged batch: per row and step, unless a
    token_budget plans the steps); naive and unchunked run the prompt whole whatever they say.
    tp_boundary (tp > 1): "matching" sends each stage boundary between matching TP ranks (T sends of [B, c, H]);
    "broadcast" sends it once, TP rank 0 to TP rank 0, and the receiving stage broadcasts it over its TP group;
    "sharded" sends 1/T of its tokens between each pair of matching TP ranks, and the receiving stage all-gathers
    them (T sends of [B, ceil(c/T), H]; a message of fewer than T tokens, a decode token, crosses whole).

    link 'gloo' / 'nccl' start one process per stage (spawn): in a script, call this under
    `if __name__ == "__main__":`. Under torchrun every rank calls it; rank 0 gets the result, the others None."""
    check_mode(mode)
    cfg = resolve_config(source)
    ragged = isinstance(tokens, (list, tuple))
    if chunk_size is None and chunks is None and token_budget is None:
        chunk_size = DEFAULT_CHUNK_SIZE  # what chunked and overlapped run (naive and unchunked run the prompt whole)
    if ragged:  # rows of different lengths: each in chunks of chunk_size, packed step by step
        check_rows(tokens, cfg, decode=decode)
        if chunks is not None:
            raise ValueError("a ragged batch (a list of rows) takes chunk_size, the tokens per row per step; "
                             "explicit chunks fit a [B, L] tensor")
        if chunk_size is not None:
            checks.positive_int("chunk_size", chunk_size)
        if token_budget is not None:
            checks.positive_int("token_budget", token_budget)
    else:
        if token_budget is not None:
            raise ValueError(f"token_budget={token_budget!r} packs the steps of a ragged batch (tokens a list of 1-D "
                             "rows); a [B, L] tensor takes chunk_size or chunks")
        check_tokens(tokens, cfg, decode=decode)
        plan = mode_chunks(mode, chunk_plan(tokens.shape[1], chunk_size, chunks))  # validated in every mode
    unknown = set(spec_kw) - {f.name for f in dataclasses.fields(PipelineSpec)}
    if unknown:
        raise TypeError(f"run_prefill() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    if "page_size" in spec_kw and not ragged:
        raise ValueError(f"page_size={spec_kw['page_size']!r} sets the KV pages of a ragged batch (tokens a list of "
                         f"1-D rows); a [B, L] tensor runs on a dense cache: drop page_size")
    if isinstance(stages, (list, tuple)):
        stages = tuple(checks.int_list("stages", stages))
    spec = PipelineSpec(source=source if isinstance(source, ModelConfig) else str(source), stages=stages, link=link,
                        ops=ops, dtype=checks.dtype_name(dtype), device=device, bandwidth_gbps=bandwidth_gbps,
                        latency_s=latency_s, **spec_kw)
    if ragged:
        job = Job.of_rows(mode, tokens, decode=decode, return_cache=return_cache, compress=compress,
                          chunk_size=chunk_size, tp_boundary=tp_boundary, token_budget=token_budget)
    else:
        job = Job(mode, tokens, plan, decode=decode, return_cache=return_cache, compress=compress,
                  tp_boundary=tp_boundary)
    results = run_jobs(spec, [job])
    return None if results is None else results[0][0]


__all__ = ["MODES", "LINKS", "PipelineSpec", "Job", "PrefillResult", "PipelineError", "run_jobs", "run_prefill",
           "init_process_group", "rank_main", "run_order", "check_tokens"]
