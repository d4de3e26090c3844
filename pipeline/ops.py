"""The op seam: the model calls attention / add_rms_norm / rope / swiglu through an `Ops` backend, so the plain-torch
reference path and the Triton kernels are interchangeable without touching the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import kernels


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable  # (q, k_new, v_new, k_cache, v_cache, start_pos, **paged keywords) -> out [B, C, Hq, D]
    add_rms_norm: Callable  # (x, residual | None, weight, eps) -> (normed, x + residual)
    rope: Callable  # (x [B, C, H, D], cos, sin, start_pos) -> rotated x
    swiglu: Callable  # (gate, up) -> silu(gate) * up


TORCH_OPS = Ops("torch", kernels.chunk_attention_ref, kernels.add_rms_norm_ref, kernels.rope_ref, kernels.swiglu_ref)
TRITON_OPS = Ops("triton", kernels.chunk_attention, kernels.add_rms_norm, kernels.rope, kernels.swiglu)
BACKENDS = {"torch": TORCH_OPS, "triton": TRITON_OPS}
# the same kernels as PyTorch custom operators (`kernels.library`), for a model run under torch.compile: pass it as
# `ops=LIBRARY_OPS` (eager runs take the launchers directly: the operator's dispatch costs host time per call)
LIBRARY_OPS = Ops("triton-library", kernels.library.chunk_attention, kernels.library.add_rms_norm,
                  kernels.library.rope, kernels.library.swiglu)


def get_ops(ops: str | Ops) -> Ops:
    if isinstance(ops, Ops):
        return ops
    if ops not in BACKENDS:
        raise ValueError(f"unknown ops backend {ops!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[ops]


def host_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) as a tensor on `device`, without the host waiting for the device. On
    CUDA a plain `torch.tensor(values, device=...)` is a blocking copy: the host waits for everything queued on the
    current stream. With one host thread enqueueing every stage's work (the in-process GPU driver), that stalls every
    stage behind it, and the pipeline runs in the order the host enqueued it (seen on an H200: the last stage's
    last-token index made overlapped run 0.83-0.94x naive). Here the values are staged in pinned memory and copied
    asynchronously on the current stream; torch's pinned-memory cache keeps the staging block until that copy is
    done."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def select_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[:, rows], contiguous, without a host sync: a run of consecutive rows (the last token: [C - 1]) is a slice,
    any other list an index tensor from `host_tensor`."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return t[:, rows[0]:rows[0] + len(rows)].contiguous()
    return t[:, host_tensor(rows, torch.long, t.device)]
