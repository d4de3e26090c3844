"""Chunked-prefill attention with the KV-cache append fused in: the queries of one chunk attend to the cached
prefix and, causally (aligned bottom-right), to the chunk itself. FlashAttention-2 style, one launch.

Reads top to bottom: inner loop, kernel, block-size choice, launcher, plain-torch reference.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .compat import FP_FUSION
from .fast_launch import DirectLaunch
from .shapes import (cdiv, distinct_configs, integer, interpreted, launching, next_pow2, positive_number, same_memory,
                     shown)

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(qk, m_i, qk_scale, FOLD_SCALE: tl.constexpr, SAFE: tl.constexpr = False):
    """One key block of the online softmax, in the log2 domain (qk_scale = sm_scale·log2 e > 0): the block's masked
    scores qk [BLOCK_M, BLOCK_N] (raw with FOLD_SCALE, else already scaled: `_scores`) and the running row max m_i
    give (p, the rescale factor alpha, the new max). FOLD_SCALE takes the max of the raw scores and scales each
    score inside the exp2's fused multiply-add, as FlashAttention-2 and Triton's tutorial do: one instruction per
    score less than scaling every score first (the hot loop of the Hopper 128x128 tile: 534 instructions instead of
    595 under Triton 3.6), at the price of a few registers, which made some other tiles spill 4-8 B: the launcher
    folds in the tiles that compile clean with it.
    SAFE: a row may have seen no key yet and have every key of this block masked (a sliding window's edge): its max
    stays -inf, and p and alpha are taken against 0 instead (-inf - -inf would be NaN), giving 0 for both."""
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new
    if SAFE:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FOLD_SCALE:
        p = tl.math.exp2(tl.fma(qk, qk_scale, -m_ref[:, None]))
    else:
        p = tl.math.exp2(qk - m_ref[:, None])
    return p, tl.math.exp2(m_i - m_ref), m_new


@triton.jit
def _scores(q, k, qk_scale, PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """q @ k [BLOCK_M, BLOCK_N]: raw with FOLD_SCALE (`_softmax_step` scales them), else scaled here, before any
    mask, in the order the plain tiles were compiled clean in."""
    qk = tl.dot(q, k, input_precision=PRECISION)
    if not FOLD_SCALE:
        qk = qk * qk_scale
    return qk


@triton.jit
def _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, lo, hi, n_limit, offs_m, offs_n, offs_d, qk_scale,
            CAUSAL: tl.constexpr, MASK_N: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
            HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, FOLD_SCALE: tl.constexpr, WINDOW: tl.constexpr = False,
            shift=0):
    """Online softmax over key blocks [lo, hi) of one source (prefix cache or the chunk itself).

    CAUSAL masks key j > query i (both chunk-local); MASK_N masks keys j >= n_limit (a ragged last block); PAD_D
    masks the head-dim columns past HEAD_DIM of a padded tile (a head dim that is not a power of two); WINDOW masks
    key j <= query i + shift (a sliding window's lower edge: shift is the query's position less the window, less
    the position of key 0 of this source).
    Blocks without a mask run with unmasked loads: that is the hot loop over the prefix. FOLD_SCALE: see
    `_softmax_step`.
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
        qk = _scores(q, k, qk_scale, PRECISION, FOLD_SCALE)  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            qk = tl.where(offs_m[:, None] >= cols[None, :], qk, float("-inf"))
        if MASK_N:
            qk = tl.where(cols[None, :] < n_limit, qk, float("-inf"))
        if WINDOW:
            qk = tl.where(cols[None, :] > offs_m[:, None] + shift, qk, float("-inf"))
        p, alpha, m_new = _softmax_step(qk, m_i, qk_scale, FOLD_SCALE, WINDOW)
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


@triton.jit
def _attend_tma(acc, l_i, m_i, q, kd, vd, row0, kvh, hi, offs_d, qk_scale, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """`_attend` over whole, unmasked key blocks [0, hi) from row `row0` of the cache, each K and V tile fetched by
    the tensor-memory accelerator through descriptors over [B·max_len, Hkv, HEAD_DIM] (zero-filled past HEAD_DIM)."""
    for start_n in range(0, hi, BLOCK_N):
        k = kd.load([row0 + start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D)
        qk = _scores(q, tl.trans(k), qk_scale, PRECISION, FOLD_SCALE)
        p, alpha, m_new = _softmax_step(qk, m_i, qk_scale, FOLD_SCALE)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = vd.load([row0 + start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_slice(P, C_ok, pid_s, n_splits, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, p0=0):
    """Split-KV: program `pid_s` of `n_splits` covers the block-aligned slice [lo, hi) of the prefix's keys [p0, P)
    (p0 a multiple of BLOCK_N: 0, or where a sliding window lets the chunk's first query see from), and the chunk's
    C_ok keys only in the last split (chunk_end); unsplit, all of them. Returns (lo, hi, chunk_end)."""
    if SPLIT:
        per = tl.cdiv(tl.cdiv(P - p0, BLOCK_N), n_splits) * BLOCK_N
        lo = p0 + pid_s * per
        hi = tl.maximum(tl.minimum(lo + per, P), lo)
        chunk_end = tl.where(pid_s == n_splits - 1, C_ok, 0)
    else:
        lo = p0
        hi = P
        chunk_end = C_ok
    return lo, hi, chunk_end


@triton.jit(do_not_specialize=["start_pos", "max_len", "window"])  # a new prefix every chunk: one kernel for all
def _chunk_attention_kernel(
    # pointers (StartPos is read only with PER_ROW_START, Lse only with SPLIT)
    Q, KN, VN, KC, VC, Out, Lse, StartPos,
    # the prefix length of every row, unless PER_ROW_START; the cache's length; the sliding window (with WINDOW)
    start_pos, max_len, window,
    # strides (the head-dim stride is 1); with SPLIT, Out is the float32 partial [splits, B, C, Hq, D]
    stride_qb, stride_qm, stride_qh,
    stride_knb, stride_knm, stride_knh,
    stride_vnb, stride_vnm, stride_vnh,
    stride_kcb, stride_kcm, stride_kch,
    stride_vcb, stride_vcm, stride_vch,
    stride_ob, stride_om, stride_oh,
    # sizes
    B, C, Hq, qk_scale,
    # meta-parameters
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, PER_ROW_START: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
    TMA: tl.constexpr = False, LONGEST_FIRST: tl.constexpr = False, HAS_PREFIX: tl.constexpr = True,
    FOLD_SCALE: tl.constexpr = False, WINDOW: tl.constexpr = False, SKIP_FULL: tl.constexpr = False,
):
    """One program: BLOCK_M tile rows x every visible key, for one batch row. The tile rows are BLOCK_M queries of
    one query head, or, with PACK > 1 (GQA packing), BLOCK_M // PACK queries of each of the PACK query heads that
    share one KV head (PACK is GROUP rounded up to a power of two; the extra rows are masked): each K/V tile is
    then read once for the whole group. With SPLIT, program (., ., s) of a grid of n splits covers the s-th
    block-aligned slice of the prefix (the last one the chunk too) and writes its unnormalised partial result with
    its log-sum-exp; `_merge_splits_kernel` combines them. With TMA the prefix's whole key blocks are fetched
    through tensor descriptors (Hopper's tensor-memory accelerator); the ragged tail and the chunk as before. With
    LONGEST_FIRST the query blocks run last to first: under the causal mask the last ones see the most keys, so the
    longest programs start in the first wave (for sweeps: it made the 64x128 tile spill on sm_90 under Triton 3.9,
    so the launcher does not choose it). Without HAS_PREFIX (config no_prefix, for an int start of 0) the prefix
    loops are not compiled, which keeps the launcher's prefix-0 tile from spilling. FOLD_SCALE (config fold_scale):
    the softmax scale applied inside the exp2's multiply-add (`_softmax_step`). With WINDOW (a sliding window),
    query i at position P + i sees the keys at positions (P + i - window, P + i] only: key blocks wholly below its
    block's window are not visited, and every visited block is masked at the window's edge (a masked band and an
    unmasked rest, two loops each for the prefix and the chunk, made tiles spill under Triton 3.6). With SKIP_FULL
    (config ws, with SPLIT and one split) the prefix's keys below `window`, which then carries that boundary, are
    `_prefix_ws_kernel`'s: this kernel covers the rest of the prefix (under one of that kernel's key blocks) and the
    chunk, its partial result the first of the two that `_merge_splits_kernel` merges."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM  # a head dim that is not a power of two: padded tiles, masked columns
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK  # queries per head in the tile
    if LONGEST_FIRST:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if PACK > 1:  # rows (g, i): query i of head kvh * GROUP + g; the program owns its KV head's cache append
        Hkv = Hq // GROUP
        b = (pid_bh // Hkv).to(tl.int64)
        kvh = pid_bh % Hkv
        heads = kvh * GROUP + rows // BLOCK_Q
        offs_m = pid_m * BLOCK_Q + rows % BLOCK_Q  # chunk-local query rows
        row_ok = (offs_m < C) & (rows // BLOCK_Q < GROUP)
        writer = pid_s == 0
    else:
        b = (pid_bh // Hq).to(tl.int64)
        heads = pid_bh % Hq
        kvh = heads // GROUP
        offs_m = pid_m * BLOCK_M + rows
        row_ok = offs_m < C
        writer = (heads % GROUP == 0) & (pid_s == 0)  # the first query head of each KV group appends
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

    offs_n = tl.arange(0, BLOCK_N)
    if PAD_D:
        io_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)  # the rows and columns that exist
    else:
        io_ok = row_ok[:, None]
    q = tl.load(Q + b * stride_qb + (heads * stride_qh + offs_m * stride_qm)[:, None] + offs_d[None, :], mask=io_ok,
                other=0.0)
    kn = KN + b * stride_knb + kvh * stride_knh
    vn = VN + b * stride_vnb + kvh * stride_vnh
    kc = KC + b * stride_kcb + kvh * stride_kch
    vc = VC + b * stride_vcb + kvh * stride_vch

    # Fused cache append of this block's BLOCK_Q new keys and values, once per KV head and query block. Nothing in
    # this launch reads those cache rows (the chunk phase reads KN/VN), so there is no race.
    q_lo = pid_m * BLOCK_Q
    if writer:
        kv_rows = q_lo + tl.arange(0, BLOCK_Q)[:, None]
        kv_ok = kv_rows < C
        new_ok = kv_rows < C_ok
        if PAD_D:
            kv_ok = kv_ok & (offs_d[None, :] < HEAD_DIM)
            new_ok = new_ok & (offs_d[None, :] < HEAD_DIM)
        k_blk = tl.load(kn + kv_rows * stride_knm + offs_d[None, :], mask=kv_ok, other=0.0)
        v_blk = tl.load(vn + kv_rows * stride_vnm + offs_d[None, :], mask=kv_ok, other=0.0)
        tl.store(kc + (P + kv_rows) * stride_kcm + offs_d[None, :], k_blk, mask=new_ok)
        tl.store(vc + (P + kv_rows) * stride_vcm + offs_d[None, :], v_blk, mask=new_ok)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1, the prefix: every query sees every key. Full blocks unmasked, the ragged tail masked. Split: this
    # program's block-aligned slice [lo, hi) of [0, P); the chunk phase only in the last split. With WINDOW, of
    # [p0, P): the key blocks from the one the chunk's first query sees from.
    p0 = 0
    if WINDOW:
        p0 = (tl.maximum(P - window + 1, 0) // BLOCK_N) * BLOCK_N
    if SKIP_FULL:
        p0 = window
    lo, hi, chunk_end = _split_slice(P, C_ok, pid_s, n_splits, SPLIT, BLOCK_N, p0)
    if HAS_PREFIX:
        # the slice's keys are addressed from its start (a loop from 0 with a constant-free start compiles to fewer
        # registers: a loop from a runtime `lo` spilled 92-108 B in the 64x128 tile under Triton 3.9)
        n = hi - lo
        n_full = (n // BLOCK_N) * BLOCK_N
        kcs, vcs = kc + lo * stride_kcm, vc + lo * stride_vcm
        shift = 0
        if WINDOW:
            # relative to lo: key c is visible to query i when c > i + shift; the block's first query sees from
            # `band` on
            shift = P - window - lo
            band = tl.minimum((tl.maximum(shift + q_lo + 1, 0) // BLOCK_N) * BLOCK_N, n_full)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kcs, vcs, stride_kcm, stride_vcm, band, n_full, n, offs_m,
                                    offs_n, offs_d, qk_scale, False, False, BLOCK_N, PRECISION, HEAD_DIM, PAD_D,
                                    FOLD_SCALE, True, shift)
        elif TMA:  # the cache as [B·max_len, Hkv, HEAD_DIM]: the launcher checked it flattens (batch stride max_len)
            Hkv_all = Hq // GROUP
            kd = tl.make_tensor_descriptor(KC, shape=[B * max_len, Hkv_all, HEAD_DIM],
                                           strides=[stride_kcm, stride_kch, 1], block_shape=[BLOCK_N, 1, BLOCK_D])
            vd = tl.make_tensor_descriptor(VC, shape=[B * max_len, Hkv_all, HEAD_DIM],
                                           strides=[stride_vcm, stride_vch, 1], block_shape=[BLOCK_N, 1, BLOCK_D])
            acc, l_i, m_i = _attend_tma(acc, l_i, m_i, q, kd, vd, (b * max_len + lo).to(tl.int32), kvh, n_full, offs_d,
                                        qk_scale, BLOCK_N, BLOCK_D, PRECISION, FOLD_SCALE)
        else:
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kcs, vcs, stride_kcm, stride_vcm, 0, n_full, n, offs_m, offs_n,
                                    offs_d, qk_scale, False, False, BLOCK_N, PRECISION, HEAD_DIM, PAD_D, FOLD_SCALE)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kcs, vcs, stride_kcm, stride_vcm, n_full, n, n, offs_m, offs_n,
                                offs_d, qk_scale, False, True, BLOCK_N, PRECISION, HEAD_DIM, PAD_D, FOLD_SCALE,
                                WINDOW, shift)
    # Phase 2, the chunk itself: whole key blocks before this query block are all visible (unmasked); the
    # blocks from the one holding the block's first query on get the causal mask (that start is rounded down to
    # BLOCK_N, so BLOCK_N > BLOCK_Q stays exact). Blocks right of the diagonal are never visited.
    # With WINDOW, from the block the first query's window starts in, masked (keys j <= i - window).
    diag = (q_lo // BLOCK_N) * BLOCK_N
    c_lo = 0
    if WINDOW:
        c_lo = (tl.maximum(q_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, stride_knm, stride_vnm, c_lo, tl.minimum(diag, chunk_end), C,
                            offs_m, offs_n, offs_d, qk_scale, False, False, BLOCK_N, PRECISION, HEAD_DIM, PAD_D,
                            FOLD_SCALE, WINDOW, -window)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, stride_knm, stride_vnm, diag,
                            tl.minimum(q_lo + BLOCK_Q, chunk_end), C, offs_m, offs_n, offs_d, qk_scale, True, True,
                            BLOCK_N, PRECISION, HEAD_DIM, PAD_D, FOLD_SCALE, WINDOW, -window)

    o_rows = (heads * stride_oh + offs_m * stride_om)[:, None] + offs_d[None, :]
    if SPLIT:  # partial result and its log2-sum-exp (-inf and 0 for a split that saw no key)
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        split_b = pid_s.to(tl.int64) * B + b  # the partials are contiguous [splits, B, C, Hq, (D)]
        tl.store(Out + split_b * stride_ob + o_rows, out, mask=io_ok)
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(Lse + (split_b * C + offs_m) * Hq + heads, lse, mask=row_ok)
    else:
        if WINDOW:  # rows past the chunk may see no key in the window: divided by 1, not 0 / 0 (never stored)
            l_i = tl.where(row_ok, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + o_rows, out.to(Out.dtype.element_ty), mask=io_ok)


# launched directly after the first launch of each specialization (`kernels.fast_launch`): Triton's binding of
# 33 arguments and 17 constexprs costs more host time than a short chunk's kernel takes
CHUNK_LAUNCH = DirectLaunch(_chunk_attention_kernel, pointers=8)


@triton.jit
def _merge_splits_kernel(Part, Lse, Out, n_splits, n_rows, C, Hq, stride_ob, stride_om, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Out[b, i, h] = the splits' partial results [splits, rows, HEAD_DIM] weighted by exp2 of their log2-sum-exp
    [splits, rows], for BLOCK_R rows (b, i, h) at a time. A row that no split saw (every lse -inf) becomes NaN, as
    in the unsplit kernel."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    io_ok = r_ok[:, None] & (d[None, :] < HEAD_DIM)
    r64 = r.to(tl.int64)
    m = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(n_splits):
        base = r64 + s * n_rows
        lse = tl.load(Lse + base, mask=r_ok, other=float("-inf"))
        part = tl.load(Part + base[:, None] * HEAD_DIM + d[None, :], mask=io_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        # rescaled to a finite max: while no split has seen a key (m_new -inf) both weights are exp2(-inf) = 0,
        # with no -inf - -inf = NaN taken (the interpreter warns of it even where masked off)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_ref)
        w = tl.math.exp2(lse - m_ref)
        acc = acc * alpha[:, None] + part * w[:, None]
        l = l * alpha + w
        m = m_new
    out = acc / tl.where(r_ok, l, 1.0)[:, None]  # rows past the end divided by 1, not 0 / 0
    h = r64 % Hq
    bi = r64 // Hq
    dst = Out + (bi // C) * stride_ob + (bi % C) * stride_om + h * stride_oh
    tl.store(dst[:, None] + d[None, :], out.to(Out.dtype.element_ty), mask=io_ok)


MERGE_LAUNCH = DirectLaunch(_merge_splits_kernel, pointers=3)


@triton.jit(do_not_specialize=["start_pos", "max_len"])
def _prefix_ws_kernel(Q, KC, VC, Part, Lse, start_pos, max_len, B, C, Hq, qk_scale, GROUP: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                      WS: tl.constexpr = True):
    """Config ws (Hopper, sweeps): the prefix's whole key blocks [0, start_pos // BLOCK_N · BLOCK_N) for BLOCK_M
    queries of one query head, in a loop that Triton's Hopper pass warp-specializes (a producer warp group issuing
    the tensor-memory loads, two consumer groups of BLOCK_M / 2 rows each). That pass takes no other loop with a
    matrix multiply after it and a query tile only through a 2-D descriptor, so this is a kernel of its own: Q is
    [B·C, Hq·HEAD_DIM] and the caches [B·max_len, Hkv·HEAD_DIM] (contiguous rows), and its normalised partial result
    and log2-sum-exp go to the second of the two splits of Part [2, B, C, Hq, HEAD_DIM] and Lse [2, B, C, Hq], the
    first being `_chunk_attention_kernel`'s (SKIP_FULL: the rest of the prefix and the chunk). WS=False: the same
    loop not specialized (`bench.ws_probe` times both)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    Hkv = Hq // GROUP
    qd = tl.make_tensor_descriptor(Q, shape=[B * C, Hq * HEAD_DIM], strides=[Hq * HEAD_DIM, 1],
                                   block_shape=[BLOCK_M, HEAD_DIM])
    kd = tl.make_tensor_descriptor(KC, shape=[B * max_len, Hkv * HEAD_DIM], strides=[Hkv * HEAD_DIM, 1],
                                   block_shape=[BLOCK_N, HEAD_DIM])
    vd = tl.make_tensor_descriptor(VC, shape=[B * max_len, Hkv * HEAD_DIM], strides=[Hkv * HEAD_DIM, 1],
                                   block_shape=[BLOCK_N, HEAD_DIM])
    # rows past this batch row's chunk are the next row's queries (or zero-filled): computed, never stored
    q = qd.load([b * C + pid_m * BLOCK_M, h * HEAD_DIM])
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row0 = b * max_len
    n_full = (start_pos // BLOCK_N) * BLOCK_N
    for start in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        k = kd.load([row0 + start, kvh * HEAD_DIM])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p, alpha, m_new = _softmax_step(qk, m_i, qk_scale, True)  # the raw scores, scaled in the exp2's FMA
        l_i = l_i * alpha + tl.sum(p, 1)
        v = vd.load([row0 + start, kvh * HEAD_DIM])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < C
    rows = ((B + b).to(tl.int64) * C + offs_m) * Hq + h  # split 1 of [2, B, C, Hq]
    tl.store(Part + rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=row_ok[:, None])
    tl.store(Lse + rows, m_i + tl.math.log2(l_i), mask=row_ok)


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # the tile shapes; any head dim up to 256 runs in the next one up
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PACK_MAX_CHUNK = 16  # GQA packing for chunks this short: their query rows alone would leave a tile mostly empty
MAX_SPLITS = 32
MIN_SPLIT_BLOCKS = 4  # key blocks per split at least: fewer, and the merge costs more than the split saves


def block_d(head_dim: int) -> int:
    """The tile width for a head dim: the next power of two, at least 16 (tl.dot's least K)."""
    return max(16, next_pow2(head_dim))


def pack_heads(group: int) -> int:
    """Query heads per program under GQA packing: the group rounded up to a power of two (extra rows masked)."""
    return next_pow2(group)


def pick_config(chunk_len: int, head_dim: int, dtype: torch.dtype, capability: tuple[int, int] = (9, 0),
                group: int = 1, prefix: int | None = None, window: int | None = None) -> dict:
    """Block sizes, launch shape and GQA packing for a GPU of compute `capability` (`group` = query heads per KV
    head; `prefix` = the cached positions before the chunk, None when unknown, e.g. per-row starts on the device;
    a head dim runs in the tile of `block_d(head_dim)`: 80 and 96 as 128; `window`: a sliding window, None for
    none). What the launcher picks for such a call. Every config this can return is compiled ahead of time in the
    tests (no spills allowed)."""
    return dict(_pick_config(chunk_len, head_dim, dtype, capability, group, interpreted(), prefix == 0,
                             window is not None))


@functools.lru_cache(maxsize=1024)  # the launcher asks on every call: host time counts for short chunks
def _pick_config(chunk_len, head_dim, dtype, capability, group, interpreted, no_prefix=False, windowed=False) -> dict:
    padded, head_dim = block_d(head_dim) != head_dim, block_d(head_dim)  # the tile's head dim: 80 and 96 as 128
    pack = group > 1 and chunk_len <= PACK_MAX_CHUNK
    # at least 32 rows: 16-row packed tiles spilled 4-8 B under Triton 3.7 (d64 split, d256), 32-row ones do not
    packed_rows = min(64, max(32, next_pow2(chunk_len) * pack_heads(group)))
    if pack and pack_heads(group) > 64:
        pack = False
    if interpreted:  # numpy interpreter: fewer, larger blocks run faster
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, pack_gqa=pack)
    if dtype == torch.float32:  # exact fp32 dots (FMA, no TF32) are register-hungry: small tiles, for checking
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, pack_gqa=pack and pack_heads(group) <= 16)
    if chunk_len <= 16:  # decode-like: do not waste a 128-row tile on one query; pack a GQA group's heads into
        # the rows instead. Wide heads take narrower key blocks (d128: 64-key blocks spilled under Triton 3.7) and
        # d256 eight warps (four spilled 4-8 B). A memory-bound read of the prefix: on Hopper three load stages in
        # flight (H200, d128, prefix 32k: 73 us against 94 with two at one query, 68 against 82 at 16; four no
        # faster: bench/results/h200/sweeps.json). Only there: with three, d64 spilled 4 B under Triton 3.7, d80 and
        # d96 (the d128 tile padded) 4 B under 3.6, and under a sliding window the d128 packed split tile 4 B under 3.6
        return dict(BLOCK_M=packed_rows if pack else 16,
                    BLOCK_N=64 if head_dim <= 64 else 32 if head_dim == 128 else 16,
                    num_warps=8 if head_dim == 256 else 4,
                    num_stages=3 if capability >= (9, 0) and head_dim == 128 and not (padded or windowed) else 2,
                    pack_gqa=pack)
    if capability < (9, 0) and head_dim >= 64:  # Ampere: mma.sync keeps acc in registers; 128-row tiles spill
        return dict(BLOCK_M=64, BLOCK_N={64: 64, 128: 32}.get(head_dim, 16), num_warps=4, num_stages=2,
                    pack_gqa=False)
    if head_dim == 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, pack_gqa=False)
    if head_dim == 128 and no_prefix:  # H100 sweep at prefix 0, chunk 2k: 64x64 s3 300 TFLOP/s, 128x128 254
        # (tiles on the diagonal are half masked: smaller ones waste less). Compiled without the prefix loops, which
        # keeps this tile from spilling (4-16 B with them; other tiles, 64x128 among them, spilled without them).
        # Chunks of 17-512 too (untimed there, bench.kernels.TILE_AB times it against the 64x128 below): a 64-query
        # block's keys end on a 64-key boundary, which a 128-key block overshoots by half in every other block
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, pack_gqa=False, no_prefix=True)
    if head_dim == 128 and chunk_len <= 512:  # H100 sweep (bench/results/h100): short chunks need more programs
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, pack_gqa=False)  # P=32k C=256: 412 vs 263
    if head_dim == 128:  # H100 sweep: 128x128 480-490 TFLOP/s, 128x64 457-469 at prefix 16k chunk 2k. Not
        # fold_scale (534 instructions in the prefix loop instead of 595 under Triton 3.6, yet on an H200 470 TFLOP/s
        # against 479 without it here, 309 against 320 for the prefix-0 tile above: bench/results/h200)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, pack_gqa=False)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pack_gqa=False)


# Tiles for the TMA prefix loads (config tma=True; Hopper): pick_config does not choose TMA until a GPU session has
# timed it against these plain tiles (`python -m bench kernels --sweep` tries both); compiled in the tests.
TMA_SWEEP = tuple((d, dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, tma=True))
                  for d, m, n, w, s in ((128, 128, 128, 8, 3), (128, 64, 128, 4, 3), (128, 128, 64, 8, 3),
                                        (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)))

# Tiles of config ws (Hopper, sweeps): `_prefix_ws_kernel`'s, each with 4 warps that Triton specializes into a
# producer group and two consumer groups (12). Compiled for sm_90 without spills under Triton 3.6-3.9 (the tests);
# 128x128 with 3 stages needs 246 KB of shared memory, over Hopper's 227. `pick_config` does not choose it: the
# gpu-suite's warp-specialization probe (`bench.ws_probe`) times it first.
WS_SWEEP = tuple((128, dict(BLOCK_M=128, BLOCK_N=n, num_warps=4, num_stages=s, ws=True))
                 for n, s in ((128, 2), (64, 3)))

# (chunk length, group) pairs that reach every branch of pick_config: decode unpacked and packed (16 and 64 rows)
CONFIG_PROBES = ((1, 1), (1, 4), (16, 8), (256, 1), (4096, 1))


def all_configs(capability: tuple[int, int] = (9, 0), prefix: int | None = None, window: int | None = None
                ) -> list[tuple[int, torch.dtype, int, dict]]:
    """(head_dim, dtype, group, config) for every choice `pick_config` makes on a GPU of that capability, over a
    prefix (None: any; 0: the launches at prefix 0), under a sliding window or none."""
    return distinct_configs(SUPPORTED_HEAD_DIMS, SUPPORTED_DTYPES, CONFIG_PROBES,
                            lambda c, d, dtype, group: pick_config(c, d, dtype, capability, group, prefix, window))


@functools.lru_cache(maxsize=4096)  # the launcher asks on every call: 10 us of host time uncached (H200)
def pick_splits(programs: int, key_blocks: int, n_sm: int, per_sm: int = 1) -> int:
    """How many slices to split the prefix's key blocks into (split-KV, flash-decoding style): 1 unless the grid
    fills less than 80% of the GPU's program slots (`per_sm` programs on each of `n_sm` SMs: `programs_per_sm`);
    otherwise the fewest splits whose wave efficiency (programs per slot over the whole waves they need) is within
    85% of the best, with at least MIN_SPLIT_BLOCKS blocks per split."""
    slots = n_sm * per_sm
    if programs >= 0.8 * slots:
        return 1
    most = min(MAX_SPLITS, key_blocks // MIN_SPLIT_BLOCKS)
    if most < 2:
        return 1
    eff = {s: programs * s / slots / math.ceil(programs * s / slots) for s in range(1, most + 1)}
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= 0.85 * best)


def programs_per_sm(chunk_len: int) -> int:
    """Programs that `pick_splits` counts on one SM at once: 2 for decode-like launches (chunks of up to
    PACK_MAX_CHUNK queries, whose tiles are small: an SM holds several, and a memory-bound read of a long prefix wants
    more loads in flight than one program keeps), else 1. On an H200 at prefix 32k, one query, 8 KV heads packed (8
    programs): the 32x32 tile split 32 ways read the prefix in 87 us, 64 ways 89, 16 ways 112, the 14 splits of one
    program per SM 124 (bench/results/h200/sweeps.json)."""
    return 2 if chunk_len <= PACK_MAX_CHUNK else 1


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _check_inputs(q, k_new, v_new, k_cache, v_cache, start_pos):
    named = (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"chunk_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtype, device = q.dtype, q.device  # read once: the launch path's host time counts for short chunks
    for name, t in named:
        shape = t.shape
        if len(shape) != 4 or not (shape[2] and shape[3]):
            raise ValueError(f"chunk_attention: {name} must be a 4-D tensor [B, len, heads, D] with heads, D >= 1, "
                             f"got shape {tuple(t.shape)}")
        t_dtype = t.dtype
        if t_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"chunk_attention: {name} has unsupported dtype {t_dtype}")
        if t_dtype != dtype:
            raise TypeError(f"chunk_attention: {name} is {t_dtype} but q is {dtype}")
        if t.device != device:
            raise ValueError(f"chunk_attention: {name} is on {t.device} but q is on {device}")
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
    if same_memory(k_cache, v_cache):
        raise ValueError("chunk_attention: k_cache and v_cache are the same memory: the fused append would write "
                         "each new v over its k; give two caches (or two views of one buffer, k = kv[0], v = kv[1])")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"chunk_attention: head dim {D} is not supported (1 to {MAX_HEAD_DIM})")
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
# GQA packing (default off); prefix splits (default: heuristic); TMA loads of the prefix (default off: untimed);
# query blocks last to first (default off: for sweeps); the kernel compiled without its prefix loops (for an int
# start of 0 only; the launcher's prefix-0 tile sets it); the paged kernel's block-table reads one key block ahead
# (paged path only: `kernels.paged_attention`); the softmax scale in the exp2's multiply-add (for sweeps); the
# prefix's whole key blocks in a warp-specialized kernel of their own (Hopper, for sweeps: `_launch_ws`)
OPTIONAL_CONFIG_KEYS = ("pack_gqa", "num_splits", "tma", "longest_first", "no_prefix", "page_ahead", "fold_scale",
                        "ws")


def _check_config(config: dict, group: int) -> dict:
    if not isinstance(config, dict) or not set(CONFIG_KEYS) <= set(config) <= set(CONFIG_KEYS + OPTIONAL_CONFIG_KEYS):
        got = sorted(config) if isinstance(config, dict) else repr(config)
        raise ValueError(f"chunk_attention: config must give {', '.join(CONFIG_KEYS)} and optionally "
                         f"{', '.join(OPTIONAL_CONFIG_KEYS)}, got {got}")
    for key in CONFIG_KEYS:
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (key != "num_stages" and v & (v - 1)):
            raise ValueError(f"chunk_attention: config {key} must be a positive int"
                             f"{'' if key == 'num_stages' else ' and a power of two'}, got {shown(v)}")
    if config["BLOCK_M"] < 16 or config["BLOCK_N"] < 16:
        raise ValueError(f"chunk_attention: BLOCK_M and BLOCK_N must be >= 16 (tl.dot), got {config}")
    if not isinstance(config.get("pack_gqa", False), bool):
        raise ValueError(f"chunk_attention: config pack_gqa must be True or False, got {shown(config['pack_gqa'])}")
    if config.get("pack_gqa") and pack_heads(group) > config["BLOCK_M"]:
        raise ValueError(f"chunk_attention: config pack_gqa puts {pack_heads(group)} query heads in a tile of "
                         f"BLOCK_M = {config['BLOCK_M']} rows; BLOCK_M must be at least that")
    for key in ("tma", "longest_first", "no_prefix", "page_ahead", "fold_scale", "ws"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"chunk_attention: config {key} must be True or False, got {shown(config[key])}")
    splits = config.get("num_splits", 1)
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= 256:
        raise ValueError(f"chunk_attention: config num_splits must be an int in [1, 256], got {shown(splits)}")
    if config.get("ws"):
        others = [k for k in ("pack_gqa", "num_splits", "tma", "longest_first", "no_prefix", "fold_scale")
                  if config.get(k)]
        if others:
            raise ValueError(f"chunk_attention: config ws (the prefix's whole key blocks in a warp-specialized kernel "
                             f"of their own) takes none of {', '.join(others)}")
    return dict(config)


def chunk_attention(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale=None, out=None, config=None, *,
                    block_table=None, cu_seqlens=None, max_chunk=None, max_prefix=None, check=True, window=None):
    """Attention of a chunk over the prefix KV cache plus itself, appending the chunk's K/V to the cache.

    q [B, C, Hq, D]: queries at positions [start_pos, start_pos + C).
    k_new, v_new [B, C, Hkv, D]: written to k_cache, v_cache [B, max_len, Hkv, D] at those positions.
    start_pos: int, or an int tensor [B] on q's device (one prefix length per row; no host sync).
    Returns out [B, C, Hq, D] (written into `out` when given); query i sees cache positions <= start_pos + i.
    B or C of 0 returns an empty out and leaves the caches as they are.
    config: block sizes and launch shape (keys CONFIG_KEYS, optionally OPTIONAL_CONFIG_KEYS) instead of
    `pick_config`'s choice and `pick_splits`'s, for tuning sweeps.
    window: a sliding window (Mistral, Gemma 2): query i then sees only the `window` latest positions up to its own,
    (start_pos + i - window, start_pos + i], as transformers' sliding-window mask; None: every earlier position.

    A serving stack's layout (`kernels.paged_attention`): with `block_table` [B, max_pages] int32 the caches are
    pages [num_pages, page_size, Hkv, D]; with `cu_seqlens` [B + 1] the rows' chunks are packed, q [N, Hq, D] and
    k_new, v_new [N, Hkv, D] (each row its own chunk length; `max_chunk`, the longest, spares a GPU launch a host
    sync; `max_prefix`, the longest prefix, informs the split-KV choice; `check=False` skips the GPU's device-side
    check of rows and pages, for a caller that has checked the same ones, e.g. at a model's first layer). Either
    one alone works: a dense cache with packed rows, or paged caches with equal chunks. config there may not ask
    for TMA.
    """
    window = check_window("chunk_attention", window)
    if block_table is not None or cu_seqlens is not None:
        from .paged_attention import paged_chunk_attention
        if block_table is None:  # a dense cache is one page of max_len positions per row
            block_table = _one_page_per_row(k_cache, q.device)
        return paged_chunk_attention(q, k_new, v_new, k_cache, v_cache, start_pos, block_table, cu_seqlens,
                                     max_chunk, sm_scale, out, config, max_prefix, check, window)
    check_dense_call(max_chunk, max_prefix, check)
    B, C, Hq, Hkv, D = _check_inputs(q, k_new, v_new, k_cache, v_cache, start_pos)
    if window is not None and window >= (k_cache.shape[1] if isinstance(start_pos, torch.Tensor) else start_pos + C):
        window = None  # wider than every query's history: the full causal attention, at no cost
    if config is not None:
        config = _check_config(config, Hq // Hkv)
        if config.get("no_prefix") and (isinstance(start_pos, torch.Tensor) or start_pos != 0):
            got = "a tensor" if isinstance(start_pos, torch.Tensor) else start_pos
            raise ValueError(f"chunk_attention: config no_prefix compiles the kernel without its prefix loops: it "
                             f"needs an int start_pos of 0, got {got}")
        if config.get("page_ahead"):
            raise ValueError("chunk_attention: config page_ahead is the paged kernel's (block-table reads one key "
                             "block ahead); the dense path has no block table")
        if config.get("tma") and window is not None:
            raise ValueError("chunk_attention: config tma reads whole prefix blocks unmasked; it does not take a "
                             "sliding window")
        if config.get("ws"):
            if isinstance(start_pos, torch.Tensor) or start_pos < config["BLOCK_N"]:
                got = "a tensor" if isinstance(start_pos, torch.Tensor) else start_pos
                raise ValueError(f"chunk_attention: config ws runs the prefix's whole key blocks in a kernel of their "
                                 f"own: it needs an int start_pos of at least BLOCK_N ({config['BLOCK_N']}), got {got}")
            if window is not None:
                raise ValueError("chunk_attention: config ws reads whole prefix blocks unmasked; it does not take a "
                                 "sliding window")
            if block_d(D) != D:
                raise ValueError(f"chunk_attention: config ws reads whole head-dim tiles; head dim {D} is not a power "
                                 "of two")
    if sm_scale is None:
        sm_scale = D ** -0.5
    sm_scale = positive_number("chunk_attention: sm_scale", sm_scale)
    if out is None:
        out = torch.empty_like(q)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
          or out.stride(-1) != 1):
        raise ValueError(f"chunk_attention: out must match q ({q.dtype} {tuple(q.shape)}, last dim contiguous)")
    if B * C == 0:  # no rows or an empty chunk: nothing to attend, nothing appended, no launch
        return out
    if isinstance(start_pos, torch.Tensor) and q.is_cuda:  # reported at a later sync (device-side assert)
        torch._assert_async(((start_pos >= 0) & (start_pos <= k_cache.shape[1] - C)).all(),
                            "chunk_attention: a start_pos row puts the chunk outside the KV cache (row masked off)")
    return _launch(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, out, config, window)


def check_window(who: str, window) -> int | None:
    """A sliding window: None (none) or a positive int."""
    if window is None:
        return None
    window = integer(f"{who}: window", window)
    if window < 1:
        raise ValueError(f"{who}: window must be a positive number of positions or None, got {window}")
    return window


def window_start(start_pos: int, window: int | None) -> int:
    """The first position a chunk's first query (at start_pos) sees under a sliding window (0 without one): no query
    of the chunk sees a key below it."""
    return 0 if window is None else max(0, start_pos - window + 1)


def check_dense_call(max_chunk, max_prefix, check) -> None:
    """The dense path (no cu_seqlens, no block_table) takes none of the paged / varlen path's launch hints."""
    if max_chunk is not None or max_prefix is not None or check is not True:
        raise ValueError("chunk_attention: max_chunk, max_prefix and check go with cu_seqlens or block_table (the "
                         "paged / varlen path)")


def launch_plan(q, k_new, k_cache, start_pos, config=None, window=None) -> dict:
    """What `chunk_attention` launches for these inputs: the tile config (given or `pick_config`'s), the query heads
    packed per program, the prefix splits (given or `pick_splits`'s; over the keys a sliding `window` leaves) and the
    grid. Host work only."""
    B, C, Hq, D = q.shape
    Hkv = k_new.shape[2]
    group = Hq // Hkv
    cap, n_sm = _device_facts(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else ((9, 0), 0)
    known = None if isinstance(start_pos, torch.Tensor) else start_pos  # a device tensor is not read
    cfg = config or _pick_config(C, D, q.dtype, cap, group, interpreted(), known == 0, window is not None)
    pack = pack_heads(group) if cfg.get("pack_gqa") and group > 1 else 1
    grid_m, grid_h = cdiv(C, cfg["BLOCK_M"] // pack), B * (Hkv if pack > 1 else Hq)
    splits = cfg.get("num_splits")
    if splits is None:  # for a device start tensor the longest prefix the cache allows stands in
        prefix = k_cache.shape[1] - C if known is None else known
        if window is not None:
            prefix = min(prefix, window)
        splits = pick_splits(grid_m * grid_h, prefix // cfg["BLOCK_N"], n_sm, programs_per_sm(C)) if q.is_cuda else 1
    return dict(config=cfg, pack=pack, splits=splits, grid=(grid_m, grid_h, splits))


def _launch(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, out, config=None, window=None):
    """The kernel launch alone, on checked inputs (`chunk_attention` checks them)."""
    if config is not None and config.get("ws"):
        return _launch_ws(q, k_new, v_new, k_cache, v_cache, start_pos, sm_scale, out, config)
    B, C, Hq, D = q.shape
    # an int start rides in the launch itself; a tensor [B] is read on the device (no host sync)
    per_row = isinstance(start_pos, torch.Tensor)
    # per-row starts read one element apart (a strided view is copied); q: a placeholder pointer the kernel never reads
    starts = start_pos.to(torch.int32).contiguous() if per_row else q
    plan = launch_plan(q, k_new, k_cache, start_pos, config, window)
    cfg, pack, splits = plan["config"], plan["pack"], plan["splits"]
    if cfg.get("tma"):
        _check_tma(k_cache, v_cache)
    if splits > 1:  # float32 partial results and their log2-sum-exp, merged into `out` below
        dst = torch.empty((splits, B, C, Hq, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((splits, B, C, Hq), device=q.device, dtype=torch.float32)
    else:
        dst, lse = out, q  # q: a placeholder pointer the kernel never reads
    with launching("chunk_attention", q.device):
        CHUNK_LAUNCH[plan["grid"]](
            q, k_new, v_new, k_cache, v_cache, dst, lse, starts, 0 if per_row else int(start_pos), k_cache.shape[1],
            window or 0,
            *q.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], *dst.stride()[-4:-1],  # one call per tensor: the launch path's host time counts
            B, C, Hq, sm_scale * LOG2E,
            GROUP=Hq // k_new.shape[2], HEAD_DIM=D, BLOCK_D=block_d(D),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PER_ROW_START=per_row, PACK=pack,
            SPLIT=splits > 1, TMA=bool(cfg.get("tma")), LONGEST_FIRST=bool(cfg.get("longest_first")),
            HAS_PREFIX=not cfg.get("no_prefix"), FOLD_SCALE=bool(cfg.get("fold_scale")), WINDOW=window is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
        )
        if splits > 1:
            rows = B * C * Hq
            MERGE_LAUNCH[(cdiv(rows, MERGE_ROWS),)](
                dst, lse, out, splits, rows, C, Hq, out.stride(0), out.stride(1), out.stride(2),
                HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_R=MERGE_ROWS, num_warps=4, enable_fp_fusion=FP_FUSION)
    return out


MERGE_ROWS = 16


def _launch_ws(q, k_new, v_new, k_cache, v_cache, start_pos: int, sm_scale, out, config: dict):
    """Config ws: the prefix's whole key blocks of `config`'s BLOCK_N in `_prefix_ws_kernel` (config's tile, warps and
    stages: 4 warps are specialized into 12), the rest of the prefix and the chunk in `_chunk_attention_kernel`
    (SKIP_FULL) with the tile `pick_config` gives this chunk, their float32 partial results merged into `out`."""
    B, C, Hq, D = q.shape
    Hkv = k_new.shape[2]
    _check_flat_rows(k_cache, v_cache)
    _tma_allocator(q.device)
    qc = q if q.is_contiguous() else q.contiguous()  # the query tile comes through a 2-D descriptor
    n_full = start_pos // config["BLOCK_N"] * config["BLOCK_N"]
    rest = launch_plan(q, k_new, k_cache, start_pos)["config"]  # its tile; one split (the prefix kernel's the other)
    dst = torch.empty((2, B, C, Hq, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((2, B, C, Hq), device=q.device, dtype=torch.float32)
    with launching("chunk_attention", q.device):
        _prefix_ws_kernel[(cdiv(C, config["BLOCK_M"]), B * Hq)](
            qc, k_cache, v_cache, dst, lse, start_pos, k_cache.shape[1], B, C, Hq, sm_scale * LOG2E,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=config["num_warps"], num_stages=config["num_stages"], enable_fp_fusion=FP_FUSION)
        CHUNK_LAUNCH[(cdiv(C, rest["BLOCK_M"]), B * Hq, 1)](
            q, k_new, v_new, k_cache, v_cache, dst, lse, q, int(start_pos), k_cache.shape[1], n_full,
            *q.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], *dst.stride()[-4:-1],
            B, C, Hq, sm_scale * LOG2E,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=D,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PER_ROW_START=False, PACK=1,
            SPLIT=True, SKIP_FULL=True, BLOCK_M=rest["BLOCK_M"], BLOCK_N=rest["BLOCK_N"],
            num_warps=rest["num_warps"], num_stages=rest["num_stages"], enable_fp_fusion=FP_FUSION,
        )
        rows = B * C * Hq
        MERGE_LAUNCH[(cdiv(rows, MERGE_ROWS),)](
            dst, lse, out, 2, rows, C, Hq, out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=D, BLOCK_D=D, BLOCK_R=MERGE_ROWS, num_warps=4, enable_fp_fusion=FP_FUSION)
    return out


def _check_flat_rows(k_cache, v_cache) -> None:
    """What config ws's descriptors need: a Hopper GPU (or the interpreter), and each cache flattening to
    [B·max_len, Hkv·D] rows (contiguous but for the batch stride of max_len rows), 16-byte aligned."""
    if k_cache.is_cuda and _device_facts(k_cache.device.index or 0)[0][0] != 9:
        raise ValueError("chunk_attention: config ws is Triton's Hopper warp specialization: it needs a GPU of compute "
                         f"capability 9.x; this one is {_device_facts(k_cache.device.index or 0)[0]}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        B, L, H, D = c.shape
        if c.stride()[1:] != (H * D, D, 1) or c.stride(0) != L * H * D or c.data_ptr() % 16 \
                or (H * D * c.element_size()) % 16:
            raise ValueError(f"chunk_attention: config ws needs {name} to flatten to [B*max_len, Hkv*D] rows (strides "
                             f"{(L * H * D, H * D, D, 1)} and a 16-byte aligned base; got {tuple(c.stride())})")


def _check_tma(k_cache, v_cache) -> None:
    """What the TMA path's descriptors need: each cache flattens to [B·max_len, Hkv, D] (the batch stride is
    max_len rows), 16-byte aligned rows and base, and the device-side descriptors a scratch allocator."""
    if k_cache.is_cuda and _device_facts(k_cache.device.index or 0)[0] < (9, 0):
        raise ValueError("chunk_attention: config tma needs a Hopper GPU or newer (compute capability 9.0); this one "
                         f"is {_device_facts(k_cache.device.index or 0)[0]}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        B, L, H, D = c.shape
        e = c.element_size()
        if c.stride(0) != L * c.stride(1) or (c.stride(1) * e) % 16 or (c.stride(2) * e) % 16 \
                or c.data_ptr() % 16:
            raise ValueError(f"chunk_attention: config tma needs {name} to flatten to [B*max_len, Hkv, D] with 16-byte "
                             f"aligned rows and base (strides {tuple(c.stride())}, {e}-byte elements)")
    _tma_allocator(k_cache.device)


def _tma_allocator(device) -> None:
    """Device-side tensor descriptors live in a scratch buffer Triton asks an allocator for; set one (torch's
    caching allocator) unless the caller has."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


def _one_page_per_row(k_cache, device) -> torch.Tensor:
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError("chunk_attention: with cu_seqlens and no block_table, k_cache must be the dense "
                         f"[B, max_len, Hkv, D], got {getattr(k_cache, 'shape', type(k_cache).__name__)}")
    return torch.arange(k_cache.shape[0], device=device, dtype=torch.int32)[:, None]


def chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, start_pos: int, sm_scale=None, *, block_table=None,
                        cu_seqlens=None, max_chunk=None, max_prefix=None, check=True, window=None):
    """Plain-torch reference (and the model's torch backend): same contract, start_pos an int or a tensor [B] of
    per-row prefixes (served as one page per row by `paged_attention.paged_chunk_attention_ref`). max_chunk and
    max_prefix, the kernel's launch hints, and check (its device-side check) are not needed here: the rows are read
    on the host."""
    window = check_window("attention", window)
    if block_table is not None or cu_seqlens is not None or isinstance(start_pos, torch.Tensor):
        from .paged_attention import paged_chunk_attention_ref
        if block_table is None:
            block_table = _one_page_per_row(k_cache, q.device)
        return paged_chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, start_pos, block_table, cu_seqlens,
                                         sm_scale, window)
    B, C, Hq, D = q.shape
    Hkv = k_new.shape[2]
    end = start_pos + C
    if end > k_cache.shape[1]:
        raise ValueError(f"attention: start_pos + C = {end} is past the cache (max_len {k_cache.shape[1]})")
    k_cache[:, start_pos:end] = k_new
    v_cache[:, start_pos:end] = v_new
    # keys below the first query's window are masked for every query: not read at all (positions [lo, end))
    lo = window_start(start_pos, window)
    qt = q.transpose(1, 2)  # [B, Hq, C, D]
    kt = k_cache[:, lo:end].transpose(1, 2)  # [B, Hkv, end - lo, D]
    vt = v_cache[:, lo:end].transpose(1, 2)
    if start_pos == 0 and (window is None or window >= C):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=sm_scale,
                                                               enable_gqa=Hq != Hkv)
    else:
        i = torch.arange(C, device=q.device)[:, None]
        j = torch.arange(lo, end, device=q.device)[None, :]
        mask = j <= start_pos + i  # bottom-right aligned causal mask [C, end]
        if window is not None:  # and the window's lower edge: the `window` latest positions
            mask &= j > start_pos + i - window
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=sm_scale,
                                                               enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)
