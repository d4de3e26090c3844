"""What a pipeline run is asked to do and what it returns: `PipelineSpec` (the set-up: model, split, link, ops,
dtype, device, emulated link), `Job` (one request, its chunks and repeats) and `PrefillResult`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks
from .checks import DTYPES
from .config import ModelConfig
from .model import resolve_config
from .schedule import StageRecord
from .stage import split_layers

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
    threads: int | None = None  # torch threads per stage process, or per stage thread in-process on CPU (default:
    # cores // (stages x tp))
    timeout_s: float = 60.0  # a stage blocked this long on a peer fails instead of hanging
    sm_partitions: bool = False  # in-process on one GPU: each stage on its own SMs (see partitions.py)
    tp: int = 1  # tensor-parallel ranks per stage (pipeline.tp): S x tp processes, rank = stage * tp + TP rank
    tp_bandwidth_gbps: float | None = None  # emulated TP interconnect: each collective + latency + wire bytes / bw
    tp_latency_s: float = 0.0
    page_size: int = 16  # ragged batches: positions per KV page (pipeline.ragged)
    tp_comm: str = "serial"  # with tp > 1: serial all-reduces, "overlap" (ISO halves) or "sequence" (pipeline.tp)
    cuda_graphs: bool = False  # in-process on a GPU: each stage's chunk captured in a CUDA graph, then replayed
    fault: tuple[str, int] | None = None  # tests only: ("raise" | "exit" | "stop" | "hang", stage) injects one

    @property
    def num_stages(self) -> int:
        return self.stages if isinstance(self.stages, int) else len(self.stages)

    def layer_ranges(self, cfg: ModelConfig) -> list[range]:
        """Each stage's layers of `cfg` (`split_layers` of the stage count or the per-stage counts)."""
        return split_layers(cfg.num_layers, self.stages if isinstance(self.stages, int) else list(self.stages))

    @property
    def world_size(self) -> int:
        """Processes (gloo/NCCL) or threads (in-process) of the pipeline: S x tp."""
        return self.num_stages * self.tp

    def validate(self) -> None:
        """Every field checked, and a Hugging Face checkpoint read (config and safetensors headers, no tensor
        data) against its config, here in the calling process: before any stage process starts."""
        if self.link not in LINKS:
            raise ValueError(f"unknown link {self.link!r}; choose one of {', '.join(LINKS)}")
        checks.dtype_name(self.dtype)
        if not isinstance(self.dtype, str):
            raise TypeError(f"dtype must be the name of a dtype ({', '.join(DTYPES)}), got {checks.shown(self.dtype)}")
        cfg = resolve_config(self.source)
        if isinstance(self.stages, bool) or not isinstance(self.stages, (int, tuple)):
            raise TypeError(f"stages must be a number of stages or per-stage layer counts, got {checks.shown(self.stages)}")
        self.layer_ranges(cfg)
        if self.bandwidth_gbps is not None:
            checks.number("bandwidth_gbps", self.bandwidth_gbps, 0, strict=True)
        checks.number("latency_s", self.latency_s, 0)
        if self.tp_bandwidth_gbps is not None:
            checks.number("tp_bandwidth_gbps", self.tp_bandwidth_gbps, 0, strict=True)
        checks.number("tp_latency_s", self.tp_latency_s, 0)
        checks.integer("seed", self.seed)
        if self.threads is not None:
            checks.positive_int("threads", self.threads)
        checks.number("timeout_s", self.timeout_s, 0, strict=True)
        checks.positive_int("page_size", self.page_size)
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
        from .tp import check_tp, check_tp_comm
        check_tp(cfg, self.tp)
        check_tp_comm(self.tp_comm)
        if self.tp == 1 and self.tp_comm != "serial":
            raise ValueError(f"tp_comm={self.tp_comm!r} chooses how tensor-parallel ranks combine their sums: it "
                             "needs tp >= 2 (got tp=1)")
        if self.tp > 1 and self.link == "inprocess" and device.type != "cpu":
            raise ValueError(f"tp={self.tp} in-process runs the TP ranks as threads on CPU; on GPUs launch one "
                             f"process per rank: torchrun --nproc-per-node {self.world_size} ... --link nccl")
        checks.flag("sm_partitions", self.sm_partitions)
        if self.sm_partitions:
            if self.link != "inprocess" or device.type != "cuda":
                raise ValueError("sm_partitions splits one GPU between in-process stages: use link='inprocess' on a "
                                 f"CUDA device (got link {self.link!r}, device {self.device!r})")
            from .partitions import _driver
            _driver()
        checks.flag("cuda_graphs", self.cuda_graphs)
        if self.cuda_graphs and (self.link != "inprocess" or device.type != "cuda" or self.tp != 1):
            raise ValueError("cuda_graphs replays each stage's chunks from CUDA graphs in the in-process GPU driver: "
                             f"it needs link='inprocess' on a CUDA device and tp=1 (got link {self.link!r}, device "
                             f"{self.device!r}, tp {self.tp})")
        if isinstance(self.source, ModelConfig):
            return
        if Path(self.source).is_dir():
            from .weights import validate_checkpoint
            validate_checkpoint(self.source, cfg)


@dataclass
class Job:
    """One prefill request run `repeats` times after `warmup` untimed runs."""
    mode: str
    tokens: torch.Tensor | list  # [B, L], or a ragged batch: a list of 1-D rows (then chunks is per step)
    chunks: list[int]
    repeats: int = 1
    warmup: int = 0
    decode: bool = True
    return_cache: bool = False
    tp_comm: str | None = None  # how TP ranks combine partial sums in this run (None: the spec's; pipeline.tp)
    compress: str = "none"  # what crosses stage boundaries: none, bf16 or fp8 (pipeline.compress)
    chunk_size: int | None = None  # a ragged batch (tokens a list of 1-D rows): each row's tokens per step
    tp_boundary: str = "matching"  # with TP: boundaries between matching TP ranks, or once and "broadcast"
    token_budget: int | None = None  # a ragged batch: at most this many packed tokens a step, rows in order

    @classmethod
    def of_rows(cls, mode: str, rows, **kw) -> "Job":
        """A ragged batch's job (rows: 1-D token tensors; chunk_size and token_budget in kw): its chunks are its
        steps' packed token counts (`steps`)."""
        job = cls(mode, list(rows), [], **kw)
        job.chunks = [st.tokens for st in job.steps()]
        return job

    @property
    def ragged(self) -> bool:
        """tokens is a list of 1-D rows of different lengths (pipeline.ragged), not a tensor [B, L]."""
        return isinstance(self.tokens, (list, tuple))

    def dims(self) -> tuple[int, int]:
        """(rows, longest prompt)."""
        if self.ragged:
            return len(self.tokens), max(len(t) for t in self.tokens)
        return tuple(self.tokens.shape)

    def steps(self):
        """A ragged job's steps (`pipeline.ragged.ragged_plan`): unchunked and naive run every row whole."""
        from .ragged import ragged_plan
        whole = self.mode in ("unchunked", "naive")
        if whole:
            return ragged_plan([len(t) for t in self.tokens])
        return ragged_plan([len(t) for t in self.tokens], self.chunk_size, self.token_budget)


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
    row_caches: list | None = None  # a ragged batch with return_cache: per row, per stage (k, v) [layers, 1, len, ..]
    t_start: float = 0.0
    t_end: float = 0.0
