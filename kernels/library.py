"""The kernels as PyTorch custom operators, `torch.ops.prefill_overlap.*`, for code that runs under torch.compile.

To Dynamo a launcher is Python it must trace (input checks, the launch plan, a lock under the interpreter) and it
stops at the first thing it cannot; a custom operator is one opaque call with a declared schema, the tensors it
mutates (the KV caches of chunk_attention's fused append) and a fake implementation that gives the output's shape
without running anything, so a compiled graph keeps it whole. vLLM and SGLang register their kernels the same way.
Each op runs the launcher of its module unchanged (same checks, same launch plan, same results); eager callers are
better off calling the launchers: the dispatch adds host time to every call (about 12 µs on a 2-core CI VM).

The functions below have the launchers' signatures (the model's `Ops` seam: `pipeline.ops.LIBRARY_OPS`) and pick
the operator: chunk_attention's dense cache with an int start (`chunk_attention`) or a start per row
(`chunk_attention_rows`), its paged / varlen path (`chunk_attention_paged`); add_rms_norm with and without a
residual; rope at an int start or at per-token positions. `config` (tuning sweeps) is not offered here.
"""
from typing import Optional

import torch
from torch.library import custom_op

from .chunk_attention import chunk_attention as _chunk_attention
from .chunk_attention import check_dense_call
from .rmsnorm import add_rms_norm as _add_rms_norm
from .rope import rope as _rope
from .swiglu import swiglu as _swiglu

CACHES = ("k_cache", "v_cache")  # what the fused append writes


@custom_op("prefill_overlap::chunk_attention", mutates_args=CACHES)
def _attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, start_pos: int, sm_scale: Optional[float] = None,
                  window: Optional[int] = None) -> torch.Tensor:
    return _chunk_attention(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, window=window)


@custom_op("prefill_overlap::chunk_attention_rows", mutates_args=CACHES)
def _attention_rows_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, start_pos: torch.Tensor,
                       sm_scale: Optional[float] = None, window: Optional[int] = None) -> torch.Tensor:
    return _chunk_attention(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, window=window)


@custom_op("prefill_overlap::chunk_attention_paged", mutates_args=CACHES)
def _attention_paged_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, prefix_lens: torch.Tensor, block_table: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor], max_chunk: Optional[int] = None,
                        max_prefix: Optional[int] = None, sm_scale: Optional[float] = None,
                        check: bool = True, window: Optional[int] = None) -> torch.Tensor:
    return _chunk_attention(q, k_new, v_new, k_cache, v_cache, prefix_lens, sm_scale, block_table=block_table,
                            cu_seqlens=cu_seqlens, max_chunk=max_chunk, max_prefix=max_prefix, check=check,
                            window=window)


@_attention_op.register_fake
@_attention_rows_op.register_fake
def _attention_fake(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale=None, window=None):
    return torch.empty_like(q)


@_attention_paged_op.register_fake
def _attention_paged_fake(q, k_new, v_new, k_cache, v_cache, prefix_lens, block_table, cu_seqlens, max_chunk=None,
                          max_prefix=None, sm_scale=None, check=True, window=None):
    return torch.empty_like(q)


@custom_op("prefill_overlap::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_rms_norm(x, residual, weight, eps)


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@custom_op("prefill_overlap::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _add_rms_norm(x, None, weight, eps)[0]


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@custom_op("prefill_overlap::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
    return _rope(x, cos, sin, start_pos)


@custom_op("prefill_overlap::rope_positions", mutates_args=())
def _rope_positions_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _rope(x, cos, sin, positions)


@_rope_op.register_fake
@_rope_positions_op.register_fake
def _rope_fake(x, cos, sin, start_pos):
    return torch.empty_like(x)


@custom_op("prefill_overlap::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _swiglu(gate, up)


@_swiglu_op.register_fake
def _swiglu_fake(gate, up):
    return gate.new_empty(gate.shape)


def chunk_attention(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale=None, *, block_table=None,
                    cu_seqlens=None, max_chunk=None, max_prefix=None, check=True, window=None):
    """`kernels.chunk_attention` (no `out`, no `config`) through its operator: the dense cache with an int start or
    a start tensor [B], or the paged / varlen path (block_table and/or cu_seqlens; an int prefix becomes a tensor
    of it per row)."""
    if block_table is None and cu_seqlens is None:
        check_dense_call(max_chunk, max_prefix, check)
        op = _attention_rows_op if isinstance(start_pos, torch.Tensor) else _attention_op
        return op(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, window)
    if not isinstance(start_pos, torch.Tensor):
        rows = block_table.shape[0] if block_table is not None else cu_seqlens.shape[0] - 1
        start_pos = torch.full((rows,), start_pos, dtype=torch.int32, device=q.device)
    return _attention_paged_op(q, k_new, v_new, k_cache, v_cache, start_pos, block_table, cu_seqlens, max_chunk,
                               max_prefix, sm_scale, check, window)


def add_rms_norm(x, residual, weight, eps: float):
    """`kernels.add_rms_norm` through its operator: (rmsnorm(x + residual) * weight, x + residual), or with residual
    None (rmsnorm(x) * weight, x)."""
    if residual is None:
        return _rms_norm_op(x, weight, eps), x
    return _add_rms_norm_op(x, residual, weight, eps)


def rope(x, cos, sin, start_pos):
    """`kernels.rope` through its operator: an int start, or positions [B, C]."""
    if isinstance(start_pos, torch.Tensor):
        return _rope_positions_op(x, cos, sin, start_pos)
    return _rope_op(x, cos, sin, start_pos)


def swiglu(gate, up):
    """`kernels.swiglu` through its operator."""
    return _swiglu_op(gate, up)
