"""Chunked-prefill attention over a paged KV cache, for batches of chunks of different lengths (varlen): what a
serving stack's scheduler hands a kernel. The same contract as `chunk_attention` (the chunk attends to its row's
cached prefix and, causally, to itself; its K/V are appended to the cache in the same launch), with the cache in
pages and the rows packed:

- k_cache, v_cache [num_pages, page_size, Hkv, D] (vLLM's NHD layout); block_table [B, max_pages] int32: page
  `block_table[b, i]` holds positions [i·page_size, (i+1)·page_size) of row b;
- q [N, Hq, D], k_new, v_new [N, Hkv, D]: the rows' chunks one after another, row b's at [cu_seqlens[b],
  cu_seqlens[b+1]) (cumulative offsets, as varlen kernels take them); or q [B, C, Hq, D] for equal chunks;
- prefix_lens: row b's cached positions before this chunk (an int for every row, or an int tensor [B]).

A dense cache [B, max_len, Hkv, D] is the paged one with one page of max_len positions per row (block table
[[0], [1], ...]): `chunk_attention(..., cu_seqlens=...)` uses this kernel that way for varlen batches.

Reads top to bottom: kernel, block-size choice, launcher, plain-torch reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .chunk_attention import MAX_HEAD_DIM, MERGE_ROWS, PACK_MAX_CHUNK, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, \
    MERGE_LAUNCH, _check_config, _device_facts, _softmax_step, _split_slice, block_d, check_window, \
    pack_heads, pick_splits, programs_per_sm, window_start
from .compat import FP_FUSION
from .fast_launch import DirectLaunch
from .shapes import (cdiv, distinct_configs, integer, interpreted, launching, positive_number, same_memory,
                     shown)

LOG2E = 1.4426950408889634


@triton.jit
def _attend_pages(acc, l_i, m_i, q, KC, VC, bt, stride_kp, stride_ks, stride_vp, stride_vs, lo, hi, n_limit,
                  offs_n, offs_d, qk_scale, MASK_N: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, PAGE_AHEAD: tl.constexpr,
                  WINDOW: tl.constexpr = False, offs_m=0, shift=0):
    """Online softmax over cached key positions [lo, hi) of one row: each key's page looked up in the row's block
    table `bt` (every query sees every cached key). MASK_N masks positions >= n_limit (a ragged last block); WINDOW
    masks positions <= query offs_m + shift (a sliding window's lower edge: shift = the prefix less the window).
    `lo` is a multiple of BLOCK_N. When pages hold a whole number of key blocks, each block lies in one page: one
    page lookup per block and the dense kernel's addressing (a scalar base plus contiguous rows); smaller pages
    gather each key's page, as do the exact-float32 checking tiles (one-page reads spilled one of them, 16x16
    packed, on sm_80 under Triton 3.6).
    PAGE_AHEAD: each block's page(s) are read one block ahead and carried into the next iteration. Read in the
    block's own iteration, the K/V loads depend on a load of the same iteration, and Triton's software pipeliner
    then keeps one K/V tile in flight whatever num_stages says (the dense kernel, num_stages 3: two); carried,
    the loads are as deep as the dense kernel's (seen in the sm_90 TTGIR)."""
    ONE_PAGE: tl.constexpr = (PAGE_SIZE % BLOCK_N == 0) & (PRECISION != "ieee")
    last = tl.maximum(hi - 1, 0)  # reads ahead stay inside the row's table (hi <= its pages' positions)
    if PAGE_AHEAD:  # nothing read for an empty range (its table may have no entry)
        if ONE_PAGE:
            page_next = tl.load(bt + tl.minimum(lo, last) // PAGE_SIZE, mask=lo < hi, other=0).to(tl.int64)
        else:
            page_next = tl.load(bt + tl.minimum(lo + offs_n, last) // PAGE_SIZE, mask=(lo + offs_n * 0) < hi,
                                other=0).to(tl.int64)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_N:
            ok = cols < n_limit
        if ONE_PAGE:  # start_n < hi: its page is in the table
            if PAGE_AHEAD:
                page = page_next
                page_next = tl.load(bt + tl.minimum(start_n + BLOCK_N, last) // PAGE_SIZE).to(tl.int64)
            else:
                page = tl.load(bt + start_n // PAGE_SIZE).to(tl.int64)
            rows_in = start_n % PAGE_SIZE + offs_n
            k_ptr = KC + page * stride_kp + (rows_in * stride_ks)[None, :] + offs_d[:, None]
            v_ptr = VC + page * stride_vp + (rows_in * stride_vs)[:, None] + offs_d[None, :]
        else:
            if PAGE_AHEAD:  # past hi (masked keys) the last position's page stands in
                page = page_next
                page_next = tl.load(bt + tl.minimum(cols + BLOCK_N, last) // PAGE_SIZE).to(tl.int64)
            elif MASK_N:
                page = tl.load(bt + cols // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
            else:
                page = tl.load(bt + cols // PAGE_SIZE).to(tl.int64)
            slot = cols % PAGE_SIZE
            k_ptr = KC + (page * stride_kp + slot * stride_ks)[None, :] + offs_d[:, None]
            v_ptr = VC + (page * stride_vp + slot * stride_vs)[:, None] + offs_d[None, :]
        if MASK_N:
            k_ok = ok[None, :]
            v_ok = ok[:, None]
            if PAD_D:
                k_ok = k_ok & (offs_d[:, None] < HEAD_DIM)
                v_ok = v_ok & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptr, mask=k_ok, other=0.0)
        elif PAD_D:
            k = tl.load(k_ptr, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptr)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if MASK_N:
            qk = tl.where(ok[None, :], qk, float("-inf"))
        if WINDOW:
            qk = tl.where(cols[None, :] > offs_m[:, None] + shift, qk, float("-inf"))
        p, alpha, m_new = _softmax_step(qk, m_i, qk_scale, False, WINDOW)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_N:
            v = tl.load(v_ptr, mask=v_ok, other=0.0)
        elif PAD_D:
            v = tl.load(v_ptr, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_ptr)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_chunk(acc, l_i, m_i, q, KN, VN, stride_kn, stride_vn, hi, n_limit, offs_m, offs_n, offs_d, qk_scale,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr,
                  WINDOW: tl.constexpr = False, lo=0, window=0):
    """Online softmax over the chunk's own keys [lo, hi) (lo a multiple of BLOCK_N), causal (key j <= query i),
    keys >= n_limit masked; with WINDOW also keys j <= i - window."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        ok = cols < n_limit
        k_ok = ok[None, :]
        v_ok = ok[:, None]
        if PAD_D:
            k_ok = k_ok & (offs_d[:, None] < HEAD_DIM)
            v_ok = v_ok & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(KN + cols[None, :] * stride_kn + offs_d[:, None], mask=k_ok, other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        qk = tl.where((offs_m[:, None] >= cols[None, :]) & ok[None, :], qk, float("-inf"))
        if WINDOW:
            qk = tl.where(cols[None, :] > offs_m[:, None] - window, qk, float("-inf"))
        p, alpha, m_new = _softmax_step(qk, m_i, qk_scale, False, WINDOW)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VN + cols[:, None] * stride_vn + offs_d[None, :], mask=v_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_chunk_attention_kernel(
    Q, KN, VN, KC, VC, Out, Lse, BT, CuQ, Prefix,
    stride_qn, stride_qh, stride_knn, stride_knh, stride_vnn, stride_vnh,
    stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch,
    stride_os, stride_on, stride_oh, stride_bt,
    max_pages, N, Hq, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, PACK: tl.constexpr,
    SPLIT: tl.constexpr, PAGE_AHEAD: tl.constexpr, WINDOW: tl.constexpr = False,
):
    """One program: BLOCK_M tile rows of one row b of the batch. The tile rows are BLOCK_M queries of one query
    head (program_id(1) = b·Hq + head), or, with PACK > 1 (GQA packing), BLOCK_M // PACK queries of each of the
    query heads sharing one KV head (program_id(1) = b·Hkv + kv head; PACK is the group rounded up to a power of
    two, the extra rows masked): each K/V tile is then read once for the whole group. Row b's chunk is packed
    tokens [CuQ[b], CuQ[b+1]); its prefix is Prefix[b] positions in the pages BT[b, :]. With SPLIT, program
    (., ., s) of n splits covers the s-th block-aligned slice of its row's prefix (the last split the chunk too)
    and writes a float32 partial result [splits, N, Hq, D] with its log2-sum-exp [splits, N, Hq], merged by
    `chunk_attention`'s merge kernel. A program past its row's chunk does nothing. A row whose prefix + chunk does
    not fit its block table touches nothing and gets NaN (0 / 0), as in `chunk_attention`. With WINDOW (a sliding
    window) query i of a row sees its positions (P + i - window, P + i] only, as in `chunk_attention`."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK  # queries per head in the tile
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = tl.arange(0, BLOCK_M)
    if PACK > 1:  # rows (g, i): query i of head kvh * GROUP + g; the program owns its KV head's page append
        Hkv = Hq // GROUP
        b = pid_bh // Hkv
        kvh = pid_bh % Hkv
        heads = kvh * GROUP + rows // BLOCK_Q
        offs_m = pid_m * BLOCK_Q + rows % BLOCK_Q  # chunk-local query rows
        head_ok = rows // BLOCK_Q < GROUP
        writer = pid_s == 0
    else:
        b = pid_bh // Hq
        heads = pid_bh % Hq
        kvh = heads // GROUP
        offs_m = pid_m * BLOCK_M + rows
        head_ok = rows >= 0
        writer = (heads % GROUP == 0) & (pid_s == 0)  # the first query head of each KV group appends
    q0 = tl.load(CuQ + b).to(tl.int64)
    C = (tl.load(CuQ + b + 1) - q0).to(tl.int32)
    P = tl.load(Prefix + b).to(tl.int32)
    in_range = (P >= 0) & (C >= 0) & (P + C <= max_pages * PAGE_SIZE)
    q_lo = pid_m * BLOCK_Q
    mine = q_lo < C  # this program has queries of its row
    P = tl.where(in_range & mine, P, 0)
    C_ok = tl.where(in_range & mine, C, 0)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m < C) & head_ok
    if PAD_D:
        io_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        io_ok = row_ok[:, None]
    q = tl.load(Q + ((q0 + offs_m) * stride_qn + heads * stride_qh)[:, None] + offs_d[None, :], mask=io_ok,
                other=0.0)
    kn = KN + q0 * stride_knn + kvh * stride_knh
    vn = VN + q0 * stride_vnn + kvh * stride_vnh
    kc = KC + kvh * stride_kch
    vc = VC + kvh * stride_vch
    bt = BT + b.to(tl.int64) * stride_bt

    # Fused append of this block's BLOCK_Q new keys and values into their pages, once per KV head and query block.
    # Nothing in this launch reads those positions (the chunk phase reads KN/VN): no race.
    if writer:
        kv_rows = q_lo + tl.arange(0, BLOCK_Q)
        new_ok = kv_rows < C_ok
        pos = P + kv_rows
        page = tl.load(bt + pos // PAGE_SIZE, mask=new_ok, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        w_ok = new_ok[:, None]
        if PAD_D:
            w_ok = w_ok & (offs_d[None, :] < HEAD_DIM)
        k_blk = tl.load(kn + kv_rows[:, None] * stride_knn + offs_d[None, :], mask=w_ok, other=0.0)
        v_blk = tl.load(vn + kv_rows[:, None] * stride_vnn + offs_d[None, :], mask=w_ok, other=0.0)
        tl.store(kc + (page * stride_kcp + slot * stride_kcs)[:, None] + offs_d[None, :], k_blk, mask=w_ok)
        tl.store(vc + (page * stride_vcp + slot * stride_vcs)[:, None] + offs_d[None, :], v_blk, mask=w_ok)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the prefix: this program's block-aligned slice [lo, hi) of it (all of it unsplit), full key blocks unmasked,
    # the ragged tail masked; the chunk only in the last split
    # With WINDOW the slice starts at the key block the row's first query sees from (p0), this program reads from the
    # block its own first query sees from (first), and every block is masked at the window's edge (one masked loop:
    # a masked band plus an unmasked rest made the dense kernel's tiles spill under Triton 3.6)
    p0 = 0
    if WINDOW:
        p0 = (tl.maximum(P - window + 1, 0) // BLOCK_N) * BLOCK_N
    lo, hi, chunk_end = _split_slice(P, C_ok, pid_s, n_splits, SPLIT, BLOCK_N, p0)
    n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    first = lo
    if WINDOW:
        first = tl.minimum(tl.maximum((tl.maximum(P - window + q_lo + 1, 0) // BLOCK_N) * BLOCK_N, lo), n_full)
    acc, l_i, m_i = _attend_pages(acc, l_i, m_i, q, kc, vc, bt, stride_kcp, stride_kcs, stride_vcp, stride_vcs, first,
                                  n_full, hi, offs_n, offs_d, qk_scale, False, BLOCK_N, PAGE_SIZE, PRECISION,
                                  HEAD_DIM, PAD_D, PAGE_AHEAD, WINDOW, offs_m, P - window)
    acc, l_i, m_i = _attend_pages(acc, l_i, m_i, q, kc, vc, bt, stride_kcp, stride_kcs, stride_vcp, stride_vcs,
                                  n_full, hi, hi, offs_n, offs_d, qk_scale, True, BLOCK_N, PAGE_SIZE, PRECISION,
                                  HEAD_DIM, PAD_D, False, WINDOW, offs_m, P - window)  # one block at most
    # the chunk itself, causal: keys up to this block's last query (with WINDOW from the block its first query's
    # window starts in)
    c_lo = 0
    if WINDOW:
        c_lo = (tl.maximum(q_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_chunk(acc, l_i, m_i, q, kn, vn, stride_knn, stride_vnn,
                                  tl.minimum(q_lo + BLOCK_Q, chunk_end), chunk_end, offs_m, offs_n, offs_d,
                                  qk_scale, BLOCK_N, PRECISION, HEAD_DIM, PAD_D, WINDOW, c_lo, window)
    o_rows = ((q0 + offs_m) * stride_on + heads * stride_oh)[:, None] + offs_d[None, :]
    if SPLIT:  # partial result and its log2-sum-exp (-inf and 0 for a split that saw no key)
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(Out + pid_s.to(tl.int64) * stride_os + o_rows, out, mask=io_ok)
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(Lse + (pid_s.to(tl.int64) * N + q0 + offs_m) * Hq + heads, lse, mask=row_ok)
    else:  # rows not stored (past the row's chunk, masked heads) saw no key: divided by 1, not 0 / 0 (the
        # interpreter warns of it); a stored row of a row outside its table still gets 0 / 0 = NaN
        out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
        tl.store(Out + o_rows, out.to(Out.dtype.element_ty), mask=io_ok)


PAGED_LAUNCH = DirectLaunch(_paged_chunk_attention_kernel, pointers=10)


@triton.jit
def _check_rows_kernel(BT, CuQ, Prefix, Ok, stride_bt, max_pages, num_pages, PAGE_SIZE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One program per row b: Ok[0] is lowered to 0 if the row's prefix + chunk does not fit its block table, Ok[1]
    if a block-table entry the row uses (its first cdiv(prefix + chunk, PAGE_SIZE)) is not a page of the pool. The
    launcher's device-side check: one launch where a dozen elementwise torch ops stood, read by two async asserts."""
    b = tl.program_id(0)
    q0 = tl.load(CuQ + b)
    C = tl.load(CuQ + b + 1) - q0
    P = tl.load(Prefix + b)
    end = P + C
    fits = (P >= 0) & (C >= 0) & (end <= max_pages * PAGE_SIZE)
    used = tl.where(fits, (end + PAGE_SIZE - 1) // PAGE_SIZE, 0)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    row = BT + b.to(tl.int64) * stride_bt
    for start in range(0, used, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        live = idx < used
        page = tl.load(row + idx, mask=live, other=0)
        bad = tl.maximum(bad, (live & ((page < 0) | (page >= num_pages))).to(tl.int32))
    tl.atomic_min(Ok, fits.to(tl.int32))
    tl.atomic_min(Ok + 1, 1 - tl.max(bad, 0))


CHECK_BLOCK = 128


CHECK_ROWS_LAUNCH = DirectLaunch(_check_rows_kernel, pointers=4)


def device_checks(block_table, cu_seqlens, prefix, page_size: int, num_pages: int) -> torch.Tensor:
    """Ok flags [2] int32 on the device, 1 while every row fits its block table ([0]) and uses only pages of the
    pool ([1]); computed by one launch, nothing read back (the GPU launcher asserts on them asynchronously)."""
    ok = torch.ones(2, device=block_table.device, dtype=torch.int32)
    with launching("paged chunk_attention", block_table.device):
        CHECK_ROWS_LAUNCH[(block_table.shape[0],)](
            block_table, cu_seqlens, prefix, ok, block_table.stride(0), block_table.shape[1], num_pages,
            PAGE_SIZE=page_size, BLOCK=CHECK_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION)
    return ok


def pick_config(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] = (9, 0), max_chunk: int = 64,
                group: int = 1) -> dict:
    """Block sizes and GQA packing for a GPU of compute `capability`, for a launch whose longest chunk is
    `max_chunk` with `group` query heads per KV head (every config this returns is compiled ahead of time in the
    tests, no spills allowed). Packs a group's heads into the tile rows for chunks of up to PACK_MAX_CHUNK queries
    (decode and short chunks: their own queries would leave a tile mostly empty), as the dense kernel does.
    On Hopper at d128, 64x64 with three stages: on an H200 (bench/results/h200) 313 / 353 TFLOP/s over pages of
    16 / 256 against 228 / 246 for the former 64x32 (prefix 16k, chunk 2k; no spills under Triton 3.6, 3.7, 3.9).
    The paged sweep there ranked 128x128 w8 s3 first (354 / 369), a tile that spills over pages of 16 under 3.6;
    `python -m bench kernels --sweep --paged` is how to choose by measurement. A head dim runs in the tile of
    `block_d(head_dim)` (80 and 96 as 128), as the launcher runs it."""
    return dict(_pick_config(block_d(head_dim), dtype, capability, max_chunk <= PACK_MAX_CHUNK and group > 1,
                             pack_heads(group), interpreted()))


@functools.lru_cache(maxsize=256)
def _pick_config(head_dim, dtype, capability, short_gqa, pack, interpreted) -> dict:
    if interpreted:  # block-table reads ahead (config page_ahead) here too: every interpreter test runs them
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, pack_gqa=short_gqa and pack <= 64,
                    page_ahead=True)
    if dtype == torch.float32:  # exact fp32 dots, for checking: small tiles, chosen from a grid of warps x key
        # blocks compiled under Triton 3.6, 3.7 and 3.9 for sm_90 and sm_80 as the ones no version spills in
        if head_dim >= 256:
            return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1, pack_gqa=short_gqa and pack <= 16)
        return dict(BLOCK_M=16, BLOCK_N=32 if head_dim <= 16 else 16, num_warps=4, num_stages=1,
                    pack_gqa=short_gqa and pack <= 16)
    if short_gqa and pack <= 64:  # a group's heads x up to 16 queries in one 64-row tile; the unpacked tiles'
        # key blocks (compiled without spills under Triton 3.6-3.9)
        return dict(BLOCK_M=64, BLOCK_N=64 if head_dim <= 64 else 32 if head_dim == 128 else 16,
                    num_warps=8 if head_dim >= 256 else 4, num_stages=2, pack_gqa=True)
    if head_dim >= 256:
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2, pack_gqa=False)
    if head_dim == 128 and capability >= (9, 0):  # H200, pages of 16 / 256: 313 / 353 TFLOP/s vs 228 / 246 for
        # 64x32 s2; 128x128 s3 (354 / 369) spilled on pages of 16 under Triton 3.6. Block-table reads one block
        # ahead where a key block lies in one page (`for_page_size` drops them over smaller pages)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, pack_gqa=False, page_ahead=True)
    if head_dim == 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, pack_gqa=False)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, pack_gqa=False)


def for_page_size(config: dict, page_size: int) -> dict:
    """The launcher's tile `config` for pages of `page_size` positions: the block-table reads one key block ahead
    (`page_ahead`) only where each key block lies in one page (page_size a multiple of BLOCK_N: one table entry read
    ahead per block). Timed on an H200 (bench/results/h200, prefix 16k, chunk 2k, the 64x64 w4 s3 tile): 1.07x the
    same tile without over pages of 256, 0.88x over pages of 16, where a block gathers four pages read ahead."""
    if config.get("page_ahead") and page_size % config["BLOCK_N"]:
        return {**config, "page_ahead": False}
    return config


# (longest chunk, group) pairs that reach every branch of pick_config: unpacked, and packed (PACK only changes how
# tile rows map to heads and queries, so one group stands for all)
CONFIG_PROBES = ((64, 1), (16, 8))


def all_configs(capability: tuple[int, int] = (9, 0)) -> list[tuple[int, torch.dtype, int, dict]]:
    """(head_dim, dtype, group, config) for every choice `pick_config` makes on a GPU of that capability."""
    return distinct_configs(SUPPORTED_HEAD_DIMS, SUPPORTED_DTYPES, CONFIG_PROBES,
                            lambda c, d, dtype, group: pick_config(d, dtype, capability, c, group))


def _tensor(name: str, t, dims: int, what: str, counts: int = 0) -> torch.Tensor:
    """`counts`: how many leading dims count rows or tokens, which may be none (no rows, every chunk empty); the
    others (heads, head dim, pages, positions per page) must not be empty."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"paged chunk_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims or 0 in t.shape[counts:]:
        raise ValueError(f"paged chunk_attention: {name} must be {what}, got shape {tuple(t.shape)}")
    return t


def _check(q, k_new, v_new, k_cache, v_cache, prefix_lens, block_table, cu_seqlens):
    """Shapes, dtypes and devices; on CPU also the values (row offsets, prefix lengths, pages): reading them costs
    nothing there. Returns (B, N, Hq, Hkv, D, page_size, chunk lengths on the host or None)."""
    varlen = cu_seqlens is not None
    counts = 1 if varlen else 2  # N, or B and C
    _tensor("q", q, 3 if varlen else 4, "[N, Hq, D] (with cu_seqlens)" if varlen else "[B, C, Hq, D]", counts)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _tensor(name, t, q.dim(), "[N, Hkv, D]" if varlen else "[B, C, Hkv, D]", counts)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, t, 4, "[num_pages, page_size, Hkv, D]", 1)  # a pool of no pages serves rows that use none
    _tensor("block_table", block_table, 2, "[B, max_pages]", 1)
    for name, t in dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache).items():
        if t.dtype not in SUPPORTED_DTYPES or t.dtype != q.dtype:
            raise TypeError(f"paged chunk_attention: {name} is {t.dtype}; q is {q.dtype} (all of q, k_new, v_new and "
                            f"the caches in one of float32, float16, bfloat16)")
        if t.device != q.device:
            raise ValueError(f"paged chunk_attention: {name} is on {t.device} but q is on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"paged chunk_attention: the last dimension of {name} must be contiguous (stride 1)")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError("paged chunk_attention: bfloat16 on CPU runs in Triton's interpreter, which computes bf16 "
                        "dots wrongly; use float32 or float16 there")
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv = k_new.shape[-2]
    if k_new.shape != v_new.shape or k_new.shape[:-2] != q.shape[:-2] or k_new.shape[-1] != D:
        raise ValueError(f"paged chunk_attention: k_new/v_new must be {list(q.shape[:-2]) + ['Hkv', D]}, got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if Hq % Hkv:
        raise ValueError(f"paged chunk_attention: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"paged chunk_attention: head dim {D} is not supported (1 to {MAX_HEAD_DIM})")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != (Hkv, D):
        raise ValueError(f"paged chunk_attention: k_cache/v_cache must be [num_pages, page_size, Hkv={Hkv}, D={D}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if same_memory(k_cache, v_cache):
        raise ValueError("paged chunk_attention: k_cache and v_cache are the same memory: the fused append would "
                         "write each new v over its k; give two page pools (or two views of one, k = kv[:, 0], "
                         "v = kv[:, 1])")
    num_pages, page_size = k_cache.shape[:2]
    B, max_pages = block_table.shape
    if block_table.dtype != torch.int32 or block_table.device != q.device:
        raise TypeError(f"paged chunk_attention: block_table must be int32 on {q.device}, got {block_table.dtype} on "
                        f"{block_table.device}")
    if varlen:
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.shape != (B + 1,)
                or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.device != q.device):
            raise ValueError(f"paged chunk_attention: cu_seqlens must be an int32/int64 tensor [B + 1 = {B + 1}] on "
                             f"{q.device} (B from block_table), got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                             f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    elif q.shape[0] != B:
        raise ValueError(f"paged chunk_attention: q has {q.shape[0]} rows, block_table {B}")
    if isinstance(prefix_lens, torch.Tensor):
        if prefix_lens.shape != (B,) or prefix_lens.dtype not in (torch.int32, torch.int64) \
                or prefix_lens.device != q.device:
            raise ValueError(f"paged chunk_attention: a prefix_lens tensor must be int32/int64 [B={B}] on {q.device}, "
                             f"got {prefix_lens.dtype} {tuple(prefix_lens.shape)} on {prefix_lens.device}")
    else:
        integer("prefix_lens", prefix_lens)
    lens = None
    if q.device.type == "cpu":  # every value checked before the launch
        N = q.shape[0]
        if varlen:
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"paged chunk_attention: cu_seqlens must rise from 0 to N = {N}, got {cu}")
            lens = [b - a for a, b in zip(cu, cu[1:])]
        else:
            lens = [q.shape[1]] * B
        pre = prefix_lens.tolist() if isinstance(prefix_lens, torch.Tensor) else [prefix_lens] * B
        table = block_table.tolist()
        for b, (p, c) in enumerate(zip(pre, lens)):
            if p < 0 or p + c > max_pages * page_size:
                raise ValueError(f"paged chunk_attention: row {b}: prefix {p} + chunk {c} does not fit its block table "
                                 f"({max_pages} pages of {page_size}: prefixes in [0, {max_pages * page_size - c}])")
            used = table[b][:cdiv(p + c, page_size)]
            if any(not 0 <= page < num_pages for page in used):
                raise ValueError(f"paged chunk_attention: row {b}'s block table addresses pages {used} for its "
                                 f"{p + c} positions; pages must be in [0, {num_pages})")
    return B, Hq, Hkv, D, page_size, lens


def paged_chunk_attention(q, k_new, v_new, k_cache, v_cache, prefix_lens, block_table, cu_seqlens=None,
                          max_chunk: int | None = None, sm_scale=None, out=None, config=None,
                          max_prefix: int | None = None, check: bool = True, window: int | None = None):
    """Chunked-prefill attention over a paged KV cache (module docstring), the chunks' K/V appended to their pages.

    q [N, Hq, D] with cu_seqlens [B+1], or [B, C, Hq, D]; k_new, v_new likewise with Hkv heads; k_cache, v_cache
    [num_pages, page_size, Hkv, D]; block_table [B, max_pages] int32; prefix_lens an int or an int tensor [B].
    max_chunk: the longest row's chunk (the grid's height); without it a GPU launch reads cu_seqlens once (a host
    sync). max_prefix: the longest row's prefix, for the split-KV choice (without it, and with a prefix tensor, the
    longest the block table allows stands in). Returns out shaped like q; query i of row b sees that row's positions
    <= prefix_lens[b] + i. Pages written by one row must not be read by another in the same launch (a shared
    prefix's pages are only read). config: block sizes, `pack_gqa`, `num_splits` and `page_ahead` instead of
    `pick_config`'s and `pick_splits`'s choice, for tuning sweeps (as `chunk_attention` takes them; no TMA here).
    check=False skips the GPU's device-side check of the rows against the block table and the pool (one launch and
    two async asserts): for a caller that has checked these very rows, block table, prefixes and pool size already,
    e.g. once per step for every layer of a model. CPU inputs are checked on the host either way.
    window: a sliding window, as `chunk_attention` takes it (query i of row b sees that row's positions
    (prefix_lens[b] + i - window, prefix_lens[b] + i]).
    """
    window = check_window("paged chunk_attention", window)
    if not isinstance(check, bool):
        raise TypeError(f"paged chunk_attention: check must be True or False, got {shown(check)}")
    B, Hq, Hkv, D, page_size, lens = _check(q, k_new, v_new, k_cache, v_cache, prefix_lens, block_table, cu_seqlens)
    # the kernels step through a row of the block table, and through cu_seqlens and the prefixes, one element at a
    # time: a view with another step (every other column, say) is copied first (views of whole rows are not)
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    if window is not None and window >= block_table.shape[1] * page_size:
        window = None  # wider than any row's positions: the full causal attention, at no cost
    if config is not None:
        config = _check_config(config, Hq // Hkv)
        if config.get("tma"):
            raise ValueError("paged chunk_attention: config tma is not supported on the paged path (pages are not "
                             "one tensor a descriptor can address)")
        if config.get("no_prefix"):
            raise ValueError("paged chunk_attention: config no_prefix is the dense kernel's (its prefix-0 tile); the "
                             "paged path does not take it")
        if config.get("longest_first"):
            raise ValueError("paged chunk_attention: config longest_first is the dense kernel's (a sweep option); "
                             "the paged path does not take it")
        if config.get("fold_scale"):
            raise ValueError("paged chunk_attention: config fold_scale is the dense kernel's (the softmax scale in the "
                             "exp2's multiply-add); the paged path does not take it")
        if config.get("ws"):
            raise ValueError("paged chunk_attention: config ws is the dense kernel's (its prefix's whole key blocks "
                             "through 2-D descriptors, warp-specialized); the paged path does not take it")
    if max_prefix is not None and integer("max_prefix", max_prefix) < 0:
        raise ValueError(f"paged chunk_attention: max_prefix (the longest row's prefix, a hint for the split-KV "
                         f"choice) must be >= 0, got {max_prefix}")
    if sm_scale is None:
        sm_scale = D ** -0.5
    sm_scale = positive_number("paged chunk_attention: sm_scale", sm_scale)
    varlen = cu_seqlens is not None
    if out is None:
        out = torch.empty_like(q)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
          or out.stride(-1) != 1):
        raise ValueError(f"paged chunk_attention: out must match q ({q.dtype} {tuple(q.shape)}, last dim contiguous)")
    if not varlen:  # equal chunks: the packed layout with offsets 0, C, 2C, ...
        C = q.shape[1]
        if B * C == 0:  # no rows or empty chunks: nothing read, nothing written, no launch
            return out
        cu_seqlens = torch.arange(0, (B + 1) * C, C, device=q.device, dtype=torch.int32)
        q, k_new, v_new, flat_out = (t.reshape(B * C, *t.shape[2:]) for t in (q, k_new, v_new, out))
        max_chunk = C
    else:
        flat_out = out
    if max_chunk is None:
        max_chunk = max(lens, default=0) if lens is not None else \
            int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if B else 0
    max_chunk = integer("max_chunk", max_chunk)
    if lens is not None and max_chunk < max(lens, default=0):
        raise ValueError(f"paged chunk_attention: max_chunk {max_chunk} is shorter than the longest row's chunk "
                         f"({max(lens)}); it sizes the grid")
    if isinstance(prefix_lens, torch.Tensor):
        prefix = prefix_lens.to(torch.int32).contiguous()
    else:
        prefix = torch.full((B,), int(prefix_lens), device=q.device, dtype=torch.int32)
    if q.is_cuda and check and B:  # reported at a later sync (device-side asserts), no host sync now
        ok = device_checks(block_table, cu_seqlens, prefix, page_size, k_cache.shape[0])
        torch._assert_async(ok[0], "paged chunk_attention: a row's prefix + chunk does not fit its block table")
        torch._assert_async(ok[1], "paged chunk_attention: a block table entry in use is not a page of the cache")
    if max_chunk == 0 or q.shape[0] == 0:
        return out
    if max_prefix is None:  # a device tensor is not read: the longest prefix the block table allows stands in
        if not isinstance(prefix_lens, torch.Tensor):
            max_prefix = int(prefix_lens)
        elif not q.is_cuda:
            max_prefix = int(prefix_lens.max())
        else:
            max_prefix = max(0, block_table.shape[1] * page_size - max_chunk)
    if window is not None:  # the keys a split can see
        max_prefix = min(max_prefix, window)
    plan = paged_launch_plan(q.device, q.dtype, B, Hq, Hkv, D, max_chunk, max_prefix, config, page_size)
    cfg, pack, splits = plan["config"], plan["pack"], plan["splits"]
    N = q.shape[0]
    if splits > 1:  # float32 partial results and their log2-sum-exp, merged into `out` below
        dst = torch.empty((splits, N, Hq, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((splits, N, Hq), device=q.device, dtype=torch.float32)
    else:
        dst, lse = flat_out[None], q  # q: a placeholder pointer the kernel never reads
    with launching("paged chunk_attention", q.device):
        PAGED_LAUNCH[plan["grid"]](
            q, k_new, v_new, k_cache, v_cache, dst, lse, block_table, cu_seqlens, prefix,
            q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), dst.stride(0), dst.stride(1), dst.stride(2), block_table.stride(0),
            block_table.shape[1], N, Hq, sm_scale * LOG2E, window or 0,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            PAGE_SIZE=page_size, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PACK=pack,
            SPLIT=splits > 1, PAGE_AHEAD=bool(cfg.get("page_ahead")), WINDOW=window is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION,
        )
        if splits > 1:  # the packed tokens as one row of N positions: Out[0, n, h]
            rows = N * Hq
            MERGE_LAUNCH[(cdiv(rows, MERGE_ROWS),)](
                dst, lse, flat_out, splits, rows, N, Hq, 0, flat_out.stride(0), flat_out.stride(1),
                HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_R=MERGE_ROWS, num_warps=4, enable_fp_fusion=FP_FUSION)
    return out


def paged_launch_plan(device, dtype, B: int, Hq: int, Hkv: int, D: int, max_chunk: int, max_prefix: int,
                      config=None, page_size: int | None = None) -> dict:
    """What `paged_chunk_attention` launches: the tile config (given, or `pick_config`'s for pages of `page_size`
    positions: `for_page_size`; None, the tile before that), the query heads packed per program, the prefix splits
    (given, or `pick_splits`'s from the grid's occupancy on a GPU) and the grid. Host work only."""
    device = torch.device(device)
    cap, n_sm = _device_facts(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else ((9, 0), 0)
    group = Hq // Hkv
    cfg = config or _pick_config(block_d(D), dtype, cap, max_chunk <= PACK_MAX_CHUNK and group > 1,
                                 pack_heads(group), interpreted())
    if config is None and page_size is not None:
        if integer("paged_launch_plan: page_size", page_size) < 1:
            raise ValueError(f"paged_launch_plan: page_size must be >= 1 position, got {page_size}")
        cfg = for_page_size(cfg, page_size)
    pack = pack_heads(group) if cfg.get("pack_gqa") and group > 1 else 1
    grid_m, grid_h = cdiv(max_chunk, cfg["BLOCK_M"] // pack), B * (Hkv if pack > 1 else Hq)
    splits = cfg.get("num_splits")
    if splits is None:
        splits = pick_splits(grid_m * grid_h, max_prefix // cfg["BLOCK_N"], n_sm, programs_per_sm(max_chunk)) \
            if device.type == "cuda" else 1
    return dict(config=dict(cfg), pack=pack, splits=splits, grid=(grid_m, grid_h, splits))


def paged_chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, prefix_lens, block_table, cu_seqlens=None,
                              sm_scale=None, window=None):
    """Plain-torch reference: row by row, the new K/V written into their pages, the row's positions gathered from
    its pages into a dense cache and `chunk_attention_ref` on it. Same contract as `paged_chunk_attention`."""
    from .chunk_attention import chunk_attention_ref
    B = block_table.shape[0]
    page_size = k_cache.shape[1]
    varlen = cu_seqlens is not None
    if varlen:
        cu = [int(x) for x in cu_seqlens.tolist()]
        spans = [(cu[b], cu[b + 1]) for b in range(B)]
    out = torch.empty_like(q)
    pre = prefix_lens.tolist() if isinstance(prefix_lens, torch.Tensor) else [int(prefix_lens)] * B
    for b in range(B):
        if varlen:
            s, e = spans[b]
            qb, kb, vb = q[s:e][None], k_new[s:e][None], v_new[s:e][None]
        else:
            qb, kb, vb = q[b:b + 1], k_new[b:b + 1], v_new[b:b + 1]
        P, C = int(pre[b]), qb.shape[1]
        if P < 0 or P + C > block_table.shape[1] * page_size:
            raise ValueError(f"paged attention: row {b}: prefix {P} + chunk {C} does not fit its block table "
                             f"({block_table.shape[1]} pages of {page_size})")
        if C == 0:
            continue
        table = block_table[b, :-(-(P + C) // page_size)].long()  # the row's pages holding positions [0, P + C)
        pos = torch.arange(P, P + C, device=q.device)
        pages, slots = table[pos // page_size], pos % page_size  # where the new tokens go
        k_cache[pages, slots] = kb[0]
        v_cache[pages, slots] = vb[0]
        # whole pages gathered (a copy of page_size positions each), from the page the first query's window starts
        # in (0 without a window), then cut to the row's positions [1, P + C - first, Hkv, D]
        first = window_start(P, window) // page_size * page_size
        table = table[first // page_size:]
        dense_k = k_cache.index_select(0, table).flatten(0, 1)[None, :P + C - first]
        dense_v = v_cache.index_select(0, table).flatten(0, 1)[None, :P + C - first]
        o = chunk_attention_ref(qb, kb, vb, dense_k, dense_v, P - first, sm_scale, window=window)
        if varlen:
            out[s:e] = o[0]
        else:
            out[b] = o[0]
    return out
