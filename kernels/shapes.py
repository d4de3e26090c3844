"""What the launchers share: input checks (integers and scales that must be what they say: a bool or 5.7 is not a
position), views of [..., N] tensors as rows [rows, N] for the row-wise kernels (RMSNorm, SwiGLU), and the lock
that serialises launches under Triton's interpreter (its launch state is global: two threads launching at once,
e.g. two in-process pipeline stages on CPU, corrupt each other's grids)."""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading

import torch

_INTERPRETER_LOCK = threading.Lock()


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read now: tests change it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launching(op: str, device: torch.device):
    """A context for one launch of `op`'s kernel on `device`: exclusive under TRITON_INTERPRET=1, free otherwise.
    CPU tensors without the interpreter are refused here, in words (Triton itself says "0 active drivers")."""
    if interpreted():
        return _INTERPRETER_LOCK
    if device.type == "cpu":
        raise ValueError(f"{op}: the tensors are on the CPU, where Triton runs kernels only in its interpreter: set "
                         f"TRITON_INTERPRET=1 before Python starts (correct, slow), or call the plain-torch reference "
                         f"(kernels.*_ref)")
    return _FREE


_FREE = contextlib.nullcontext()


# Plain-Python twins of triton.cdiv / triton.next_power_of_2 for the launch path: Triton's own cost about 4 us a
# call (they are also usable inside kernels), and a launcher calls them several times per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def shown(v, limit: int = 80, typed: bool = False) -> str:
    """A caller's value as an error message shows it, on one line: its repr when that is one line of at most `limit`
    characters (a string or path whatever its length), with its type in brackets if `typed`; a tensor or array as
    its type, shape and dtype; a module as its type (its repr runs to pages); anything else as the start of its repr,
    its type and (for a sized one) its length."""
    text = repr(v)
    if "\n" not in text and (len(text) <= limit or isinstance(v, (str, bytes, os.PathLike))):
        return f"{text} ({type(v).__name__})" if typed else text
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"a {type(v).__name__} of shape {tuple(v.shape)}, {v.dtype}"
    if isinstance(v, torch.nn.Module):
        return f"a {type(v).__name__} module"
    head = " ".join(text.split())[:limit]
    size = f" of {len(v)}" if hasattr(v, "__len__") else ""
    return f"{head}... (a {type(v).__name__}{size})"


def integer(name: str, v) -> int:
    """An int (numpy ints too), never a bool or a float: a position of 5.7 or True is a caller's bug."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {shown(v, typed=True)}")
    return int(v)


def positive_number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {shown(v)}")
    return float(v)


def non_negative_number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {shown(v)}")
    return float(v)


def tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty tensors start at the same element (one buffer passed twice). Views of one buffer that
    start apart (k = kv[0], v = kv[1]; FlashInfer's pages interleaving k and v) are not."""
    return a.numel() > 0 and b.numel() > 0 and a.device == b.device and a.device.type != "meta" \
        and a.data_ptr() == b.data_ptr()


def as_rows(t: torch.Tensor, op: str, name: str) -> torch.Tensor:
    """[..., N] -> [rows, N] view without a copy; the last dimension must be contiguous."""
    if t.dim() < 1 or t.stride(-1) != 1:
        raise ValueError(f"{op}: the last dimension of {name} must be contiguous (stride 1)")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} with strides {t.stride()} cannot be viewed as rows "
                         f"[N, {t.shape[-1]}] (its leading dimensions are not collapsible)") from None


def distinct_configs(head_dims, dtypes, probes, pick) -> list[tuple[int, torch.dtype, int, dict]]:
    """(head_dim, dtype, group, config) for every distinct config `pick(chunk_len, head_dim, dtype, group)` returns
    over the (chunk_len, group) `probes`: what a launcher can choose, for ahead-of-time compilation."""
    out = []
    for d in head_dims:
        for dtype in dtypes:
            seen = []
            for c, group in probes:
                cfg = pick(c, d, dtype, group)
                if cfg not in seen:
                    seen.append(cfg)
                    out.append((d, dtype, group, cfg))
    return out
