"""Rotate-half rotary position embedding at a position offset: a chunk starting at `start_pos` uses rows
[start_pos, start_pos + C) of precomputed cos/sin tables, so chunks can start anywhere."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compat import FP_FUSION
from .fast_launch import DirectLaunch
from .shapes import cdiv, integer, launching, next_pow2, tensor


@triton.jit(do_not_specialize=["C", "start_pos"])  # both change chunk to chunk: one compiled kernel
def _rope_kernel(
    # pointers
    X, Cos, Sin, Out, Pos,
    # strides (the head dimension is contiguous)
    stride_xb, stride_xm, stride_xh, stride_ob, stride_om, stride_oh, stride_t,
    # sizes
    C, H, start_pos,
    # meta-parameters
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, POSITIONS: tl.constexpr,
):
    pid = tl.program_id(0)  # one (batch, position) row
    b = (pid // C).to(tl.int64)
    m = pid % C
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # BLOCK_H of its heads
    d = tl.arange(0, BLOCK_HALF)[None, :]  # padded to a power of two when D/2 is not one (D = 80, 96, ...)
    mask = (heads < H) & (d < HALF)
    x_row = X + b * stride_xb + m * stride_xm + heads * stride_xh
    x1 = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if POSITIONS:  # one position per token, [B, C] contiguous (packed rows of different requests)
        pos = tl.load(Pos + pid).to(tl.int64)
    else:
        pos = (start_pos + m).to(tl.int64)
    cos = tl.load(Cos + pos * stride_t + d, mask=d < HALF, other=0.0)
    sin = tl.load(Sin + pos * stride_t + d, mask=d < HALF, other=0.0)
    o_row = Out + b * stride_ob + m * stride_om + heads * stride_oh
    tl.store(o_row + d, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF + d, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


_LAUNCH = DirectLaunch(_rope_kernel, pointers=5)  # `kernels.fast_launch`

ROPE_TILE = 2048  # elements of x1 (and of x2) one program holds: 16 fp32 registers each per thread at 4 warps


def rope_head_block(H: int, half: int) -> int:
    """Heads per program: all H when their tile fits ROPE_TILE, else as few blocks as fit (q's and k's heads of
    Llama-3-8B rotated together, 32 + 8 at D = 128: blocks of 32, the second with 8 live rows; masked rows move no
    bytes)."""
    cap = max(1, ROPE_TILE // next_pow2(half))
    return next_pow2(cdiv(H, cdiv(H, cap)))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos, out=None) -> torch.Tensor:
    """x [B, C, H, D]; cos, sin [max_len, D/2] fp32 tables. Returns the rotated x (same shape and dtype).
    start_pos: an int (token m of every row at start_pos + m) or an int tensor [B, C] of each token's position
    (packed rows of different requests; on a GPU not read back: positions must be inside the tables).
    B or C of 0 gives an empty result."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        tensor(f"rope: {name}", t)
    positions = start_pos if isinstance(start_pos, torch.Tensor) else None
    start_pos = 0 if positions is not None else integer("rope: start_pos", start_pos)
    if x.dim() != 4 or 0 in x.shape[2:]:
        raise ValueError(f"rope: x must be [B, C, H, D] with H, D >= 1, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"rope: x must be float32, float16 or bfloat16, got {x.dtype}")
    B, C, H, D = x.shape
    half = D // 2
    if D % 2:
        raise ValueError(f"rope: head dim must be even (rotate-half pairs i and i + D/2), got {D}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != half:
        raise ValueError(f"rope: cos/sin must be [max_len, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("rope: cos/sin must be fp32 tables with identical strides and contiguous rows")
    if x.stride(-1) != 1:
        raise ValueError("rope: the last dimension of x must be contiguous (stride 1)")
    if cos.device != x.device:
        raise ValueError(f"rope: tables are on {cos.device} but x is on {x.device}")
    if positions is not None:
        if positions.shape != (B, C) or positions.dtype not in (torch.int32, torch.int64) \
                or positions.device != x.device:
            raise ValueError(f"rope: a positions tensor must be int32/int64 [B={B}, C={C}] on {x.device}, got "
                             f"{positions.dtype} {tuple(positions.shape)} on {positions.device}")
        if x.device.type == "cpu" and positions.numel() and (int(positions.min()) < 0
                                                              or int(positions.max()) >= cos.shape[0]):
            raise ValueError(f"rope: positions {int(positions.min())}..{int(positions.max())} are outside the tables "
                             f"(max_len {cos.shape[0]})")
        positions = positions.contiguous()
    elif start_pos < 0 or start_pos + C > cos.shape[0]:
        raise ValueError(f"rope: positions [{start_pos}, {start_pos + C}) are outside the tables "
                         f"(max_len {cos.shape[0]})")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"rope: out must match x ({x.dtype} {tuple(x.shape)}, last dim contiguous)")
    if B * C == 0:  # no tokens: an empty result and no launch
        return out
    BLOCK_H = rope_head_block(H, half)
    with launching("rope", x.device):
        _LAUNCH[(B * C, cdiv(H, BLOCK_H))](
            x, cos, sin, out, positions if positions is not None else cos,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), cos.stride(0),
            C, H, start_pos,
            HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_H=BLOCK_H, POSITIONS=positions is not None, num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    return out


def rope_ref(x, cos, sin, start_pos):
    """Plain-torch reference (and the model's torch backend); start_pos an int or positions [B, C]."""
    C, half = x.shape[1], x.shape[-1] // 2
    if isinstance(start_pos, torch.Tensor):
        c, s = cos[start_pos.long()][:, :, None, :], sin[start_pos.long()][:, :, None, :]  # [B, C, 1, D/2]
    else:
        c = cos[start_pos:start_pos + C][None, :, None, :]  # [1, C, 1, D/2]
        s = sin[start_pos:start_pos + C][None, :, None, :]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x[..., :half].to(work), x[..., half:].to(work)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, llama3_scaling=None, device=None,
                linear_factor: float = 1.0, rotary_dim: int | None = None, freq_factors=None,
                attention_factor: float = 1.0):
    """cos, sin [max_len, head_dim/2] in fp32, computed in float64 (positions up to 128k stay exact).
    linear_factor: linear position interpolation (transformers' rope_type "linear"): every frequency divided by it.
    rotary_dim: partial rotary embedding, only rotary_dim of the head's dims rotated (frequencies over rotary_dim);
    the tables' first rotary_dim/2 columns rotate pairs (i, i + head_dim/2), the others have cos 1, sin 0 (pairs
    passed through): the caller orders each head's dims so that the rotated pairs sit there
    (`pipeline.model.rotary_order`). freq_factors: frequency i divided by freq_factors[i] (LongRoPE, YaRN);
    attention_factor: the scale of the rotated columns' cos and sin (LongRoPE, YaRN)."""
    rotary = head_dim if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary) / linear_factor
    if freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64)
    if llama3_scaling is not None:  # Llama 3.1: stretch low frequencies, keep high ones, blend between
        factor, low, high, original = llama3_scaling
        wavelen = 2 * torch.pi / inv_freq
        smooth = ((original / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    if rotary < head_dim:  # passed-through pairs: cos 1, sin 0
        rest = (head_dim - rotary) // 2
        cos = torch.cat((cos, cos.new_ones(max_len, rest)), dim=1)
        sin = torch.cat((sin, sin.new_zeros(max_len, rest)), dim=1)
    return cos.float().to(device), sin.float().to(device)
