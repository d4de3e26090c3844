"""Argument checks for the public API and the command line: each raises ValueError (or TypeError for a value of the
wrong kind) with a one-line message that names the argument, the bad value and what is allowed, before any work."""
from __future__ import annotations

import math
import numbers

import torch

from kernels.shapes import shown

# token ids: what nn.Embedding takes (int32 ones are converted to torch.long before a run)
TOKEN_DTYPES = (torch.long, torch.int32)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NotFound(FileNotFoundError, ValueError):
    """A file or directory the caller named does not exist: a FileNotFoundError and, like every other bad
    argument here, a ValueError."""


def count(n: int, noun: str) -> str:
    """'1 token', '3 tokens': a number with its noun, for messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def seconds(name: str, cost, x, p):
    """Calls a cost model and checks what it returns: finite seconds >= 0 (numpy broadcasting kept)."""
    import numpy as np
    t = np.asarray(cost(x, p), dtype=np.float64)
    if not np.isfinite(t).all() or (t < 0).any():
        bad = np.broadcast_to(t, np.broadcast(np.asarray(x), np.asarray(p)).shape)
        i = np.flatnonzero(~np.isfinite(bad) | (bad < 0))[0]
        xs, ps = (np.broadcast_to(np.asarray(v), bad.shape).flat[i] for v in (x, p))
        raise ValueError(f"{name} returned {bad.flat[i]} s for a chunk of {xs:g} tokens after {ps:g}: a cost must "
                         "be a finite number of seconds >= 0")
    return t


def integer(name: str, v, minimum: int | None = None) -> int:
    """An int (numpy ints too; not a bool, not a float such as 5.0 or 5.7) of at least `minimum`."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {shown(v, typed=True)}")
    v = int(v)
    if minimum is not None and v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {v}")
    return v


def positive_int(name: str, v) -> int:
    return integer(name, v, 1)


def number(name: str, v, minimum: float | None = None, strict: bool = False, maximum: float | None = None) -> float:
    """A finite real number (not a bool, not NaN or ±inf), >= minimum (> minimum when `strict`), <= maximum."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {shown(v, typed=True)}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {v:g}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {v:g}")
    return v


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {shown(v)}")
    return v


def dtype_name(v, name: str = "dtype") -> str:
    """'float32' | 'float16' | 'bfloat16', given one of those names or the torch dtype."""
    for key, dt in DTYPES.items():
        if v == key or v is dt:
            return key
    raise ValueError(f"{name} must be one of {', '.join(DTYPES)} (or the torch dtype), got {shown(v)}")


def device(v, name: str = "device") -> torch.device:
    """A torch device that exists here: 'cpu', or 'cuda[:i]' with that GPU present."""
    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:index]', got {shown(v)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {shown(v)} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {shown(v)}: only {torch.cuda.device_count()} GPU(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:index]', got {shown(v)}")
    return dev


def int_list(name: str, v, minimum: int = 1) -> list[int]:
    """A non-empty list (or tuple) of integers >= minimum."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a list of integers, got {shown(v)}")
    out = [integer(f"{name}[{i}]", x, minimum) for i, x in enumerate(v)]
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out
