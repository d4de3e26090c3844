"""Chunked-prefill attention with the KV-cache append fused in: the queries of one chunk attend to the cached
prefix and, causally (aligned bottom-right), to the chunk itself. FlashAttention-2 style, one launch.

Reads top to bottom: inner loop, kernel, block-size choice, launcher, plain-torch reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .shapes import integer, launching, positive_number

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, lo, hi, n_limit, offs_m, offs_n, offs_d, qk_scale,
            CAUSAL: tl.constexpr, MASK_N: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
            HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one source (prefix cache or the chunk itself).

    CAUSAL masks key j > query i (both chunk-local); MASK_N masks keys j >= n_limit (a ragged last block); PAD_D
    masks the head-dim columns past HEAD_DIM of a padded tile (a head dim that is not a power of two).
    Blocks without a mask run with unmasked loads: that is the hot loop over the prefix.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_N:
            k_ok = cols[None, :] < n_limit
            if PAD_D:
                k_ok = k_ok & (offs_d[:, None] < HEAD_DIM)
            k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=k_ok, other=0.0)
        elif PAD_D:
            k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None])
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if CAUSAL:
            qk = tl.where(offs_m[:, None] >= cols[None, :], qk, float("-inf"))
        if MASK_N:
            qk = tl.where(cols[None, :] < n_limit, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_N:
            v_ok = cols[:, None] < n_limit
            if PAD_D:
                v_ok = v_ok & (offs_d[None, :] < HEAD_DIM)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=v_ok, other=0.0)
        elif PAD_D:
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["start_pos", "max_len"])  # a new prefix every chunk: one compiled kernel for all
def _chunk_attention_kernel(
    # pointers (StartPos is read only with PER_ROW_START)
    Q, KN, VN, KC, VC, Out, StartPos,
    # the prefix length of every row, unless PER_ROW_START; the cache's length
    start_pos, max_len,
    # strides (the head-dim stride is 1)
    stride_qb, stride_qm, stride_qh,
    stride_knb, stride_knm, stride_knh,
    stride_vnb, stride_vnm, stride_vnh,
    stride_kcb, stride_kcm, stride_kch,
    stride_vcb, stride_vcm, stride_vch,
    stride_ob, stride_om, stride_oh,
    # sizes
    C, Hq, qk_scale,
    # meta-parameters
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, PER_ROW_START: tl.constexpr,
):
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM  # a head dim that is not a power of two: padded tiles, masked columns
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kvh = h // GROUP
    if PER_ROW_START:
        P = tl.load(StartPos + b)  # prefix length of this batch row
    else:
        P = start_pos
    # A row whose prefix + chunk does not fit the cache (a bad per-row start: the launcher cannot read a device
    # tensor without a host sync) touches nothing: it attends to no key (no read past the cache), writes no cache
    # row, and its output is 0 / 0 = NaN. Scalars only: the hot loops do not change.
    in_range = (P >= 0) & (P + C <= max_len)
    P = tl.where(in_range, P, 0)
    C_ok = tl.where(in_range, C, 0)  # chunk rows this program attends over and appends

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # chunk-local query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m[:, None] < C
    if PAD_D:
        io_ok = row_ok & (offs_d[None, :] < HEAD_DIM)  # the rows and columns that exist
        new_ok = (offs_m[:, None] < C_ok) & (offs_d[None, :] < HEAD_DIM)
    else:
        io_ok = row_ok
        new_ok = offs_m[:, None] < C_ok

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=io_ok,
                other=0.0)
    kn = KN + b * stride_knb + kvh * stride_knh
    vn = VN + b * stride_vnb + kvh * stride_vnh
    kc = KC + b * stride_kcb + kvh * stride_kch
    vc = VC + b * stride_vcb + kvh * stride_vch

    # Fused cache append: the first query head of each KV group writes this block's new keys and values.
    # Nothing in this launch reads those cache rows (the chunk phase reads KN/VN), so there is no race.
    if h % GROUP == 0:
        kv_rows = offs_m[:, None]
        k_blk = tl.load(kn + kv_rows * stride_knm + offs_d[None, :], mask=io_ok, other=0.0)
        v_blk = tl.load(vn + kv_rows * stride_vnm + offs_d[None, :], mask=io_ok, other=0.0)
        tl.store(kc + (P + kv_rows) * stride_kcm + offs_d[None, :], k_blk, mask=new_ok)
        tl.store(vc + (P + kv_rows) * stride_vcm + offs_d[None, :], v_blk, mask=new_ok)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1, the prefix [0, P): every query sees every key. Full blocks unmasked, the ragged tail masked.
    p_full = (P // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, kc, vc, stride_kcm, stride_vcm, 0, p_full, P, offs_m, offs_n,
                            offs_d, qk_scale, False, False, BLOCK_N, PRECISION, HEAD_DIM, PAD_D)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, kc, vc, stride_kcm, stride_vcm, p_full, P, P, offs_m, offs_n,
                            offs_d, qk_scale, False, True, BLOCK_N, PRECISION, HEAD_DIM, PAD_D)
    # Phase 2, the chunk itself: whole key blocks before this query block are all visible (unmasked); the
    # blocks from the one holding the block's first query on get the causal mask (that start is rounded down to
    # BLOCK_N, so BLOCK_N > BLOCK_M stays exact). Blocks right of the diagonal are never visited.
    m_lo = pid_m * BLOCK_M
    diag = (m_lo // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, stride_knm, stride_vnm, 0, tl.minimum(diag, C_ok), C, offs_m,
                            offs_n, offs_d, qk_scale, False, False, BLOCK_N, PRECISION, HEAD_DIM, PAD_D)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, stride_knm, stride_vnm, diag, tl.minimum(m_lo + BLOCK_M, C_ok),
                            C, offs_m, offs_n, offs_d, qk_scale, True, True, BLOCK_N, PRECISION, HEAD_DIM, PAD_D)

    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=io_ok)


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # the tile shapes; any head dim up to 256 runs in the next one up
MAX_HEAD_DIM = 256


def block_d(head_dim: int) -> int:
    """The tile width for a head dim: the next power of two, at least 16 (tl.dot's least K)."""
    return max(16, triton.next_power_of_2(head_dim))
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(chunk_len: int, head_dim: int, dtype: torch.dtype, capability: tuple[int, int] = (9, 0)) -> dict:
    """Block sizes and launch shape for a GPU of compute `capability`. Every config this can return is compiled
    ahead of time in the tests (no spills allowed)."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # numpy interpreter: fewer, larger blocks run faster
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact fp32 dots (FMA, no TF32) are register-hungry: small tiles, for checking
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if chunk_len <= 16:  # decode-like: do not waste a 128-row tile on one query. Wide heads take narrower key
        # blocks (d128: 64-key blocks spilled under Triton 3.7) and d256 eight warps (four spilled 4-8 B)
        return dict(BLOCK_M=16, BLOCK_N=64 if head_dim <= 64 else 32 if head_dim == 128 else 16,
                    num_warps=8 if head_dim == 256 else 4, num_stages=2)
    if capability < (9, 0) and head_dim >= 64:  # Ampere: mma.sync keeps acc in registers; 128-row tiles spill
        return dict(BLOCK_M=64, BLOCK_N={64: 64, 128: 32}.get(head_dim, 16), num_warps=4, num_stages=2)
    if head_dim == 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if head_dim == 128 and chunk_len <= 512:  # H100 sweep (bench/results/h100): short chunks need more programs
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)  # P=32k C=256: 412 vs 263 TFLOP/s
    if head_dim == 128:  # H100 sweep: 128x128 480-490 TFLOP/s, 128x64 457-469 at prefix 16k chunk 2k
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)


def all_configs(capability: tuple[int, int] = (9, 0)) -> list[tuple[int, torch.dtype, dict]]:
    """(head_dim, dtype, config) for every choice `pick_config` makes on a GPU of that capability."""
    out = []
    for d in SUPPORTED_HEAD_DIMS:
        for dtype in SUPPORTED_DTYPES:
            seen = []
            for c in (1, 256, 4096):
                cfg = pick_config(c, d, dtype, capability)
                if cfg not in seen:
                    seen.append(cfg)
                    out.append((d, dtype, cfg))
    return out


def _check_inputs(q, k_new, v_new, k_cache, v_cache, start_pos):
    named = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"chunk_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or 0 in t.shape[:1] + t.shape[2:]:
            raise ValueError(f"chunk_attention: {name} must be a 4-D tensor [B, len, heads, D] with B, heads, D >= 1, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"chunk_attention: {name} has unsupported dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"chunk_attention: {name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"chunk_attention: {name} is on {t.device} but q is on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"chunk_attention: the last dimension of {name} must be contiguous (stride 1)")
    B, C, Hq, D = q.shape
    if k_new.shape != v_new.shape or k_new.shape[0] != B or k_new.shape[1] != C or k_new.shape[3] != D:
        raise ValueError(f"chunk_attention: k_new/v_new must be [B={B}, C={C}, Hkv, D={D}], got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
    Hkv = k_new.shape[2]
    if Hq % Hkv:
        raise ValueError(f"chunk_attention: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[2:] != (Hkv, D):
        raise ValueError(f"chunk_attention: k_cache/v_cache must be [B={B}, max_len, Hkv={Hkv}, D={D}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"chunk_attention: head dim {D} is not supported (1 to {MAX_HEAD_DIM})")
    if C < 1:
        raise ValueError("chunk_attention: the chunk must hold at least one query")
    max_len = k_cache.shape[1]
    if isinstance(start_pos, torch.Tensor):
        if start_pos.shape != (B,) or start_pos.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"chunk_attention: a start_pos tensor must be int32/int64 of shape [B={B}], got "
                             f"{start_pos.dtype} {tuple(start_pos.shape)}")
        if start_pos.device != q.device:
            raise ValueError(f"chunk_attention: start_pos is on {start_pos.device} but q is on {q.device}")
        if start_pos.device.type == "cpu":  # reading it costs nothing here: check every row
            bad = [(b, int(p)) for b, p in enumerate(start_pos.tolist()) if not 0 <= p <= max_len - C]
            if bad:
                b, p = bad[0]
                raise ValueError(f"chunk_attention: start_pos[{b}] = {p} puts the chunk of {C} at [{p}, {p + C}), "
                                 f"outside the cache (each start must be in [0, {max_len - C}] for max_len "
                                 f"{max_len})")
        # on a GPU the kernel masks such rows off (NaN out, nothing written) and the launcher asserts
        # asynchronously: no host sync on the hot path
    else:
        start_pos = integer("start_pos", start_pos)
        if start_pos < 0:
            raise ValueError(f"chunk_attention: start_pos must be >= 0, got {start_pos}")
        if start_pos + C > max_len:
            raise ValueError(f"chunk_attention: start_pos + C = {start_pos + C} is past the cache "
                             f"(max_len {max_len})")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError("chunk_attention: bfloat16 on CPU runs in Triton's interpreter, which computes bf16 dots "
                        "wrongly; use float32 or float16 there")
    return B, C, Hq, Hkv, D


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _check_config(config: dict) -> dict:
    if set(config) != set(CONFIG_KEYS):
        raise ValueError(f"chunk_attention: config must give exactly {', '.join(CONFIG_KEYS)}, got {sorted(config)}")
    for key in CONFIG_KEYS:
        v = config[key]
        if not isinstance(v, int) or v < 1 or (key != "num_stages" and v & (v - 1)):
            raise ValueError(f"chunk_attention: config {key} must be a positive int"
                             f"{'' if key == 'num_stages' else ' and a power of two'}, got {v!r}")
    if config["BLOCK_M"] < 16 or config["BLOCK_N"] < 16:
        raise ValueError(f"chunk_attention: BLOCK_M and BLOCK_N must be >= 16 (tl.dot), got {config}")
    return dict(config)


def chunk_attention(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale=None, out=None, config=None):
    """Attention of a chunk over the prefix KV cache plus itself, appending the chunk's K/V to the cache.

    q [B, C, Hq, D]: queries at positions [start_pos, start_pos + C).
    k_new, v_new [B, C, Hkv, D]: written to k_cache, v_cache [B, max_len, Hkv, D] at those positions.
    start_pos: int, or an int tensor [B] on q's device (one prefix length per row; no host sync).
    Returns out [B, C, Hq, D] (written into `out` when given); query i sees cache positions <= start_pos + i.
    config: block sizes and launch shape (keys CONFIG_KEYS) instead of `pick_config`'s choice, for tuning sweeps.
    """
    B, C, Hq, Hkv, D = _check_inputs(q, k_new, v_new, k_cache, v_cache, start_pos)
    if config is not None:
        config = _check_config(config)
    if sm_scale is None:
        sm_scale = D ** -0.5
    sm_scale = positive_number("chunk_attention: sm_scale", sm_scale)
    if out is None:
        out = torch.empty_like(q)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
          or out.stride(-1) != 1):
        raise ValueError(f"chunk_attention: out must match q ({q.dtype} {tuple(q.shape)}, last dim contiguous)")
    if isinstance(start_pos, torch.Tensor) and q.is_cuda:  # reported at a later sync (device-side assert)
        torch._assert_async(((start_pos >= 0) & (start_pos <= k_cache.shape[1] - C)).all(),
                            "chunk_attention: a start_pos row puts the chunk outside the KV cache (row masked off)")
    return _launch(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, out, config)


def _launch(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, out, config=None):
    """The kernel launch alone, on checked inputs (`chunk_attention` checks them)."""
    B, C, Hq, D = q.shape
    Hkv = k_new.shape[2]
    # an int start rides in the launch itself; a tensor [B] is read on the device (no host sync)
    per_row = isinstance(start_pos, torch.Tensor)
    starts = start_pos.to(torch.int32) if per_row else q  # q: a placeholder pointer the kernel never reads
    cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else (9, 0)
    cfg = config or pick_config(C, block_d(D), q.dtype, cap)
    grid = (triton.cdiv(C, cfg["BLOCK_M"]), B * Hq)
    with launching():
        _chunk_attention_kernel[grid](
            q, k_new, v_new, k_cache, v_cache, out, starts, 0 if per_row else int(start_pos), k_cache.shape[1],
            q.stride(0), q.stride(1), q.stride(2),
            k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            C, Hq, sm_scale * LOG2E,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            PER_ROW_START=per_row, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out


def chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, start_pos: int, sm_scale=None):
    """Plain-torch reference (and the model's torch backend): same contract, int start_pos only."""
    B, C, Hq, D = q.shape
    Hkv = k_new.shape[2]
    end = start_pos + C
    if end > k_cache.shape[1]:
        raise ValueError(f"attention: start_pos + C = {end} is past the cache (max_len {k_cache.shape[1]})")
    k_cache[:, start_pos:end] = k_new
    v_cache[:, start_pos:end] = v_new
    qt = q.transpose(1, 2)  # [B, Hq, C, D]
    kt = k_cache[:, :end].transpose(1, 2)  # [B, Hkv, end, D]
    vt = v_cache[:, :end].transpose(1, 2)
    if start_pos == 0:
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=sm_scale,
                                                               enable_gqa=Hq != Hkv)
    else:
        i = torch.arange(C, device=q.device)[:, None]
        j = torch.arange(end, device=q.device)[None, :]
        mask = j <= start_pos + i  # bottom-right aligned causal mask [C, end]
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=sm_scale,
                                                               enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)
