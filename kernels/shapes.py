"""Input checks shared by the row-wise kernels (RMSNorm, SwiGLU): views of [..., N] tensors as rows [rows, N]."""
from __future__ import annotations

import torch


def as_rows(t: torch.Tensor, op: str, name: str) -> torch.Tensor:
    """[..., N] -> [rows, N] view without a copy; the last dimension must be contiguous."""
    if t.dim() < 1 or t.stride(-1) != 1:
        raise ValueError(f"{op}: the last dimension of {name} must be contiguous (stride 1)")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} with strides {t.stride()} cannot be viewed as rows "
                         f"[N, {t.shape[-1]}] (its leading dimensions are not collapsible)") from None
