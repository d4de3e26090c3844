"""The op seam: the model calls attention / add_rms_norm / rope / swiglu through an `Ops` backend, so the plain-torch
reference path and the Triton kernels are interchangeable without touching the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import kernels


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable  # (q, k_new, v_new, k_cache, v_cache, start_pos) -> out [B, C, Hq, D]
    add_rms_norm: Callable  # (x, residual | None, weight, eps) -> (normed, x + residual)
    rope: Callable  # (x [B, C, H, D], cos, sin, start_pos) -> rotated x
    swiglu: Callable  # (gate, up) -> silu(gate) * up


TORCH_OPS = Ops("torch", kernels.chunk_attention_ref, kernels.add_rms_norm_ref, kernels.rope_ref, kernels.swiglu_ref)
TRITON_OPS = Ops("triton", kernels.chunk_attention, kernels.add_rms_norm, kernels.rope, kernels.swiglu)
BACKENDS = {"torch": TORCH_OPS, "triton": TRITON_OPS}


def get_ops(ops: str | Ops) -> Ops:
    if isinstance(ops, Ops):
        return ops
    if ops not in BACKENDS:
        raise ValueError(f"unknown ops backend {ops!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[ops]
