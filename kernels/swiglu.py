"""SwiGLU activation `silu(gate) * up`, reading each input once and writing the output once. The inputs may be
strided views (the two halves of one fused gate/up projection)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compat import FP_FUSION
from .fast_launch import DirectLaunch
from .shapes import as_rows, cdiv, launching, next_pow2, tensor


@triton.jit
def _swiglu_kernel(
    # pointers
    G, U, Out,
    # strides (rows; the last dimension is contiguous)
    stride_g, stride_u, stride_o,
    # sizes
    N,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


_LAUNCH = DirectLaunch(_swiglu_kernel, pointers=3)  # `kernels.fast_launch`


def swiglu(gate: torch.Tensor, up: torch.Tensor, out=None) -> torch.Tensor:
    """gate, up [..., I] (same shape, dtype, device). Returns silu(gate) * up, contiguous (empty for no rows)."""
    tensor("swiglu: gate", gate)
    tensor("swiglu: up", up)
    if gate.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"swiglu: gate and up must be float32, float16 or bfloat16, got {gate.dtype}")
    if gate.dim() < 1 or gate.shape[-1] == 0:
        raise ValueError(f"swiglu: gate must be [..., I] with I >= 1, got {tuple(gate.shape)}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate {gate.dtype} {tuple(gate.shape)} on {gate.device} and up {up.dtype} "
                         f"{tuple(up.shape)} on {up.device} must match")
    g2, u2 = as_rows(gate, "swiglu", "gate"), as_rows(up, "swiglu", "up")
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    elif out.shape != gate.shape or out.dtype != gate.dtype or out.device != gate.device or not out.is_contiguous():
        raise ValueError(f"swiglu: out must be a contiguous {gate.dtype} tensor of shape {tuple(gate.shape)}")
    if g2.shape[0] == 0:  # no rows: an empty result, as torch's ops give, and no launch
        return out
    o2 = out.view(-1, gate.shape[-1])
    N = gate.shape[-1]
    BLOCK = min(4096, next_pow2(N))
    with launching("swiglu", gate.device):
        _LAUNCH[(g2.shape[0], cdiv(N, BLOCK))](
            g2, u2, o2, g2.stride(0), u2.stride(0), o2.stride(0), N, BLOCK=BLOCK,
            num_warps=min(8, max(1, BLOCK // 512)), enable_fp_fusion=FP_FUSION,
        )
    return out


def swiglu_ref(gate, up):
    """Plain-torch reference (and the model's torch backend)."""
    return torch.nn.functional.silu(gate) * up
