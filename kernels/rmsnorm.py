"""Fused residual add + RMSNorm: `s = x + residual; out = rmsnorm(s) * weight`, returning (out, s) in one pass.

Rounding follows Hugging Face Llama: the sum is rounded to the input dtype, normalised in fp32, rounded back,
then scaled by the weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compat import FP_FUSION
from .fast_launch import DirectLaunch
from .shapes import as_rows, launching, next_pow2, non_negative_number, tensor


@triton.jit
def _add_rms_norm_kernel(
    # pointers
    X, R, W, Out, ROut,
    # strides (rows; the hidden dimension is contiguous)
    stride_x, stride_r, stride_o, stride_ro,
    # sizes
    N, eps,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(ROut + row * stride_ro + cols, x, mask=mask)
    s = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (s * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


_LAUNCH = DirectLaunch(_add_rms_norm_kernel, pointers=5)  # `kernels.fast_launch`


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out=None,
                 residual_out=None):
    """x, residual [..., H]; weight [H]. Returns (rmsnorm(x + residual) * weight, x + residual).

    With residual None: (rmsnorm(x) * weight, x). `out` / `residual_out` receive the results when given.
    No rows (a leading dimension of 0) gives empty results.
    """
    for name, t in (("x", x), ("weight", weight)) + ((("residual", residual),) if residual is not None else ()):
        tensor(f"add_rms_norm: {name}", t)
    eps = non_negative_number("add_rms_norm: eps", eps)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"add_rms_norm: x must be [..., H] with H >= 1, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise TypeError(f"add_rms_norm: x and weight must share one of float32, float16, bfloat16, got {x.dtype} "
                        f"and {weight.dtype}")
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"add_rms_norm: weight must be [{H}], got {tuple(weight.shape)}")
    for name, t in (("residual", residual), ("weight", weight)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"add_rms_norm: {name} is on {t.device} but x is on {x.device}")
        if name == "residual" and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError(f"add_rms_norm: residual {t.dtype} {tuple(t.shape)} does not match x "
                             f"{x.dtype} {tuple(x.shape)}")
    x2 = as_rows(x, "add_rms_norm", "x")
    weight = weight.contiguous()  # read one element apart: a strided view (every other element, say) is copied
    for name, t in (("out", out), ("residual_out", residual_out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device
                              or not t.is_contiguous()):
            raise ValueError(f"add_rms_norm: {name} must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    r2 = as_rows(residual, "add_rms_norm", "residual") if residual is not None else x2
    if residual is None:
        r_out = x
    else:
        r_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual_out is None else residual_out
    if x2.shape[0] == 0:  # no rows (an empty step): empty results, as torch's ops give, and no launch
        return out, r_out
    BLOCK = next_pow2(H)
    o2, ro2 = out.view(-1, H), r_out.view(-1, H)
    with launching("add_rms_norm", x.device):
        _LAUNCH[(x2.shape[0],)](
            x2, r2, weight, o2, ro2,
            x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
            H, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 256)),
            enable_fp_fusion=FP_FUSION,
        )
    return out, r_out


def add_rms_norm_ref(x, residual, weight, eps: float):
    """Plain-torch reference (and the model's torch backend)."""
    s = x if residual is None else x + residual
    sf = s.float() if s.dtype != torch.float64 else s
    y = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return weight * y, s
