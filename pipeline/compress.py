"""Compressed stage-boundary sends: what crosses a stage boundary can be narrower than the model's dtype.

- `none`: the hidden state as computed (the model's dtype);
- `bf16`: cast to bfloat16 (half of float32's bytes; an fp16 or bf16 model gains nothing, so it is refused there);
- `fp8`: float8 e4m3 with one float32 scale per token (amax / 448 over the hidden dimension): H + 4 bytes a token,
  about a quarter of float32's, half of bf16's.

A codec turns the hidden state [B, c, H] into one tensor for the link (`encode`), says what the receiver must post
(`wire`: shape and dtype, derived from the chunk plan like every receive) and restores the model's dtype on the
other side (`decode`). The fp8 payload and its scales travel as one uint8 tensor [B, c, H + 4]: one message per
chunk, as uncompressed.
"""
from __future__ import annotations

import torch

CODECS = ("none", "bf16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def check_codec(name: str, dtype: torch.dtype | None = None) -> str:
    """`name` among CODECS and, given the model's dtype, one that makes the sends smaller."""
    if name not in CODECS:
        raise ValueError(f"unknown boundary compression {name!r}; choose one of {', '.join(CODECS)}")
    if name == "bf16" and dtype is not None and dtype.itemsize <= 2:
        raise ValueError(f"boundary compression bf16 needs a float32 model (a {str(dtype).removeprefix('torch.')} "
                         f"model's sends are 16-bit already); use fp8 to halve them")
    return name


class Codec:
    def __init__(self, name: str = "none"):
        self.name = check_codec(name)

    @property
    def lossless(self) -> bool:
        return self.name == "none"

    def wire(self, shape, dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
        """What the link carries for a hidden state of `shape` [B, c, H] in `dtype`."""
        B, c, H = shape
        if self.name == "bf16":
            return (B, c, H), torch.bfloat16
        if self.name == "fp8":
            return (B, c, H + 4), torch.uint8
        return (B, c, H), dtype

    def bytes_per_token(self, batch: int, hidden: int, dtype: torch.dtype) -> int:
        shape, wire_dtype = self.wire((batch, 1, hidden), dtype)
        return shape[0] * shape[2] * wire_dtype.itemsize

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        if self.name == "bf16":
            return y.to(torch.bfloat16)
        if self.name == "fp8":
            B, c, H = y.shape
            yf = y.float()
            scale = (yf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            out = torch.empty(B, c, H + 4, dtype=torch.uint8, device=y.device)
            out[..., :H] = (yf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
            out[..., H:] = scale.view(torch.uint8)  # [B, c, 1] float32 -> [B, c, 4] bytes
            return out
        return y

    def decode(self, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The received tensor -> the hidden state [B, c, H] in the model's dtype (a new tensor for the lossy
        codecs: the receive buffer may be reused as soon as this returns)."""
        if self.name == "bf16":
            return buf.to(dtype)
        if self.name == "fp8":
            H = buf.shape[-1] - 4
            q = buf[..., :H].contiguous().view(FP8).float()
            scale = buf[..., H:].contiguous().view(torch.float32)  # [B, c, 1]
            return (q * scale).to(dtype)
        return buf
