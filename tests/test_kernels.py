"""Triton kernels against float64 references computed independently of them (interpreter on CPU, compiled on GPU).
Outputs are NaN-poisoned before each launch, so an element a kernel forgets to write fails the test."""
from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import add_rms_norm, chunk_attention, chunk_attention_ref, rope, rope_tables, swiglu

DTYPES = [(torch.float32, 2e-5), (torch.float16, 4e-3)]  # dtype with its absolute tolerance
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attention_f64(q, k_cache, v_cache, start_pos, window=None):
    """Explicit softmax(QK^T) V in float64 over cache positions [0, start_pos + C), bottom-right causal; with a
    sliding `window`, query i sees positions (start_pos + i - window, start_pos + i] only."""
    q, k, v = q.double(), k_cache.double(), v_cache.double()
    B, C, Hq, D = q.shape
    group = Hq // k.shape[2]
    end = start_pos + C
    k = k[:, :end].repeat_interleave(group, dim=2)  # [B, end, Hq, D]
    v = v[:, :end].repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    visible = torch.arange(end)[None, :] <= start_pos + torch.arange(C)[:, None]
    if window is not None:
        visible &= torch.arange(end)[None, :] > start_pos + torch.arange(C)[:, None] - window
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@contextlib.contextmanager
def no_nan_arithmetic():
    """A launch under the interpreter that computes no NaN or inf - inf anywhere, masked-off lanes included (NumPy
    warns of each: noise in a user's CPU run, e.g. tile rows past a packed row's chunk divided 0 / 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol, seed=0, per_row_starts=None, config=None,
                       window=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    starts = per_row_starts or [start_pos] * B
    max_len = max(starts) + C + 3
    q, k_new, v_new = rnd(B, C, Hq, D), rnd(B, C, Hkv, D), rnd(B, C, Hkv, D)
    k_cache, v_cache = rnd(B, max_len, Hkv, D), rnd(B, max_len, Hkv, D)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torch.full_like(q, float("nan"))
    sp = torch.tensor(starts, device=DEVICE) if per_row_starts else start_pos
    with no_nan_arithmetic():
        chunk_attention(q, k_new, v_new, k_cache, v_cache, sp, out=out, config=config, window=window)
    for b, p in enumerate(starts):
        kb, vb = k_before[b:b + 1].clone(), v_before[b:b + 1].clone()
        kb[:, p:p + C], vb[:, p:p + C] = k_new[b:b + 1], v_new[b:b + 1]
        # the cache: new rows written, everything else untouched (bit-exact)
        assert torch.equal(k_cache[b:b + 1], kb) and torch.equal(v_cache[b:b + 1], vb)
        expected = attention_f64(q[b:b + 1], kb, vb, p, window)
        assert not out[b].isnan().any()
        assert (out[b:b + 1].double() - expected).abs().max().item() <= tol


ATTENTION_CASES = [  # (B, C, Hq, Hkv, D, start_pos): every odd size, GQA ratio and batch appears
    (1, 1, 4, 4, 16, 0),
    (1, 1, 8, 1, 64, 1000),
    (3, 37, 4, 1, 32, 1),
    (1, 37, 8, 8, 16, 1000),
    (3, 217, 8, 1, 16, 0),
    (1, 217, 4, 1, 32, 1),
    (1, 217, 8, 2, 16, 1000),
    (3, 1, 4, 1, 128, 1),
    (1, 37, 4, 4, 128, 45),
    # head dims that are not powers of two (padded tiles, masked columns): real models' 80 and 96, and odd ones
    (2, 37, 4, 2, 80, 21),
    (1, 19, 6, 2, 96, 0),
    (3, 5, 2, 1, 24, 7),
    (1, 33, 2, 2, 200, 3),
    (1, 9, 2, 1, 6, 11),
]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos", ATTENTION_CASES)
def test_chunk_attention(B, C, Hq, Hkv, D, start_pos, dtype, tol):
    run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), C=st.integers(1, 80), group=st.sampled_from([1, 2, 4]), Hkv=st.integers(1, 2),
       D=st.sampled_from([16, 32, 64]), start_pos=st.integers(0, 150), half=st.booleans(), seed=st.integers(0, 99))
def test_chunk_attention_random_shapes(B, C, group, Hkv, D, start_pos, half, seed):
    dtype, tol = DTYPES[1] if half else DTYPES[0]
    run_attention_case(B, C, group * Hkv, Hkv, D, start_pos, dtype, tol, seed=seed)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 64), (32, 32)])
def test_chunk_attention_any_block_shape(block_m, block_n):
    """Launch configs other than pick_config's (a tuning sweep tries them): key blocks wider than query blocks
    must not see the chunk's diagonal unmasked (a sweep on an H100 caught exactly that)."""
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    run_attention_case(2, 75, 4, 2, 16, 21, torch.float32, 2e-5, config=cfg)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,C,start_pos,extra", [(2, 75, 0, {}), (1, 130, 0, {"pack_gqa": True}),
                                                 (2, 33, 21, {"num_splits": 3}), (1, 1, 40, {})])
def test_chunk_attention_longest_first(B, C, start_pos, extra, dtype, tol):
    """Query blocks launched last to first (config longest_first, a sweep option): the same results, at prefix 0
    (where the order matters most), packed, split and for a single query."""
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, longest_first=True, **extra)
    run_attention_case(B, C, 4, 2, 16, start_pos, dtype, tol, config=cfg)


# sliding windows (B, C, Hq, Hkv, D, start_pos, window, config): a window of one key, windows shorter than a block,
# than the chunk, than the prefix, edges across the prefix and the chunk and across block boundaries, packed GQA,
# prefix splits (some of them below every window), prefix 0 with and without the prefix loops, a padded head dim
_TILE = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
WINDOW_CASES = [
    (1, 37, 4, 2, 16, 50, 1, None),
    (2, 70, 4, 4, 32, 130, 20, None),
    (1, 5, 8, 2, 32, 200, 3, None),
    (1, 64, 2, 1, 16, 0, 10, None),
    (1, 100, 2, 1, 24, 300, 64, _TILE),
    (1, 3, 8, 2, 32, 300, 50, {**_TILE, "pack_gqa": True}),
    (1, 3, 8, 2, 32, 300, 50, {**_TILE, "num_splits": 4}),
    (1, 20, 4, 2, 16, 300, 270, {**_TILE, "BLOCK_M": 16, "num_splits": 3, "pack_gqa": True}),
    (2, 40, 4, 2, 80, 90, 17, {**_TILE, "BLOCK_M": 16, "BLOCK_N": 32, "num_splits": 2}),
    (1, 48, 2, 2, 16, 0, 5, {**_TILE, "BLOCK_M": 16, "no_prefix": True}),
    (1, 33, 4, 1, 16, 40, 45, {**_TILE, "BLOCK_N": 32}),  # the edge in the prefix for some queries, not others
]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos,window,config", WINDOW_CASES)
def test_chunk_attention_sliding_window(B, C, Hq, Hkv, D, start_pos, window, config, dtype, tol):
    """Query i sees the `window` latest positions up to its own, (start + i - window, start + i] (transformers'
    sliding-window mask): blocks below the window skipped, the edge masked, rows that see no key in a block (the
    band's first blocks) without 0 / 0 or -inf - -inf anywhere."""
    run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol, config=config, window=window)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), C=st.integers(1, 60), group=st.sampled_from([1, 2, 4]), start_pos=st.integers(0, 150),
       window=st.integers(1, 200), pack=st.booleans(), splits=st.sampled_from([1, 2, 3]),
       block_n=st.sampled_from([16, 32]), per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_chunk_attention_random_sliding_windows(B, C, group, start_pos, window, pack, splits, block_n, per_row, seed):
    cfg = dict(BLOCK_M=32, BLOCK_N=block_n, num_warps=4, num_stages=1, pack_gqa=pack, num_splits=splits)
    starts = [start_pos, (start_pos * 7 + 3) % 151][:B] if per_row else None
    run_attention_case(B, C, group * 2, 2, 16, start_pos, torch.float32, 2e-5, seed=seed, per_row_starts=starts,
                       config=cfg, window=window)


def test_a_window_as_long_as_the_history_changes_nothing():
    """A window that covers every query's positions is the full causal attention: bit for bit what the launch
    without one gives (the launcher drops it), and the reference agrees."""
    g = torch.Generator().manual_seed(4)
    C, P = 9, 12
    q, kn, vn = torch.randn(1, C, 4, 16, generator=g), torch.randn(1, C, 2, 16, generator=g), \
        torch.randn(1, C, 2, 16, generator=g)
    kc, vc = torch.randn(1, P + C, 2, 16, generator=g), torch.randn(1, P + C, 2, 16, generator=g)
    run = lambda window: chunk_attention(q, kn, vn, kc.clone(), vc.clone(), P, window=window)  # noqa: E731
    assert torch.equal(run(None), run(P + C)) and torch.equal(run(None), run(10**9))
    assert not torch.equal(run(None), run(P + C - 1))  # the last query's window now leaves out key 0


@pytest.mark.parametrize("window,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                          ("8", TypeError)])
def test_chunk_attention_refuses_a_bad_window(window, error):
    with pytest.raises(error, match="window"):
        chunk_attention(**_attn_inputs(), window=window)
    with pytest.raises(error, match="window"):
        chunk_attention_ref(**_attn_inputs(), window=window)


def test_the_reference_takes_a_window_as_the_kernel_does():
    """chunk_attention_ref (the model's torch backend) with a window, dense and per-row starts, against float64;
    the positions below the first query's window are not read (NaN there changes nothing)."""
    g = torch.Generator().manual_seed(3)
    q, kn, vn = (torch.randn(2, 9, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    kn, vn = kn[:, :, :2], vn[:, :, :2]
    kc, vc = (torch.randn(2, 40, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    for start in (0, 20, torch.tensor([20, 5])):
        k, v = kc.clone(), vc.clone()
        starts = start.tolist() if isinstance(start, torch.Tensor) else [start] * 2
        for b, p in enumerate(starts):  # unread: positions before p - window + 1
            k[b, :max(0, p - 5)] = v[b, :max(0, p - 5)] = float("nan")
        out = chunk_attention_ref(q, kn, vn, k, v, start, window=6)
        for b, p in enumerate(starts):
            kb, vb = kc[b:b + 1].clone(), vc[b:b + 1].clone()
            kb[:, p:p + 9], vb[:, p:p + 9] = kn[b:b + 1], vn[b:b + 1]
            expected = attention_f64(q[b:b + 1], kb, vb, p, 6)
            assert (out[b:b + 1] - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("config,match", [
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, longest_first=1), "longest_first must be True or False"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, page_ahead=True), "page_ahead is the paged kernel's"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4), "must give BLOCK_M"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, split=2), "must give BLOCK_M"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, num_splits=0), r"num_splits .* \[1, 256\], got 0"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, num_splits=2.0), "num_splits"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, pack_gqa=1), "pack_gqa must be True or False"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=True, num_stages=2), "num_warps must be a positive int"),
    (dict(BLOCK_M=48, BLOCK_N=64, num_warps=4, num_stages=2), "power of two"),
    (dict(BLOCK_M=8, BLOCK_N=64, num_warps=4, num_stages=2), ">= 16"),
    (dict(BLOCK_M=64, BLOCK_N=64, num_warps=0, num_stages=2), "positive"),
])
def test_chunk_attention_refuses_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        chunk_attention(**_attn_inputs(), config=config)


# GQA packing (a group's query heads share a program's tile rows) and split-KV (prefix slices merged by their
# log-sum-exp), forced by config on the interpreter; on a GPU `pick_config`/`pick_splits` choose them.
PACK_SPLIT_CASES = [  # (B, C, Hq, Hkv, D, start_pos, pack, splits)
    (1, 1, 8, 2, 64, 300, True, 1),      # decode, packed (4 heads x 16 queries per 64-row tile)
    (2, 5, 6, 2, 32, 77, True, 1),       # group 3: rounded up to 4 heads per tile, the 4th masked
    (1, 37, 16, 1, 16, 200, True, 1),    # group 16: 4 queries per head per 64-row tile, many query blocks
    (3, 1, 4, 1, 128, 333, False, 5),    # split, decode
    (1, 19, 4, 2, 80, 150, False, 3),    # split, padded head dim
    (1, 1, 8, 1, 32, 1000, True, 7),     # both
    (2, 9, 4, 2, 24, 130, True, 16),     # more splits than prefix blocks: empty splits merge to nothing
    (1, 23, 4, 4, 16, 0, False, 4),      # no prefix at all: every split but the last is empty
]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos,pack,splits", PACK_SPLIT_CASES)
def test_chunk_attention_gqa_packing_and_split_kv(B, C, Hq, Hkv, D, start_pos, pack, splits, dtype, tol):
    cfg = dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1, pack_gqa=pack, num_splits=splits)
    run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol, config=cfg)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), C=st.integers(1, 40), group=st.sampled_from([1, 2, 3, 4, 8]), Hkv=st.integers(1, 2),
       start_pos=st.integers(0, 200), pack=st.booleans(), splits=st.integers(1, 9), block_n=st.sampled_from([16, 32]),
       seed=st.integers(0, 99))
def test_chunk_attention_random_pack_and_splits(B, C, group, Hkv, start_pos, pack, splits, block_n, seed):
    cfg = dict(BLOCK_M=32, BLOCK_N=block_n, num_warps=4, num_stages=1, pack_gqa=pack, num_splits=splits)
    run_attention_case(B, C, group * Hkv, Hkv, 16, start_pos, torch.float32, 2e-5, seed=seed, config=cfg)


# the two long cases (many prefix blocks: 25 and 19 a row) in fp32 only: fp16 takes the same descriptors and
# loops, and the small cases run it
TMA_CASES = [(1, 37, 4, 4, 128, 45), (2, 37, 4, 2, 80, 21), (3, 5, 2, 1, 24, 70)]
TMA_LONG_CASES = [(1, 61, 8, 2, 16, 389), (1, 1, 8, 1, 64, 300)]


TMA_PARAMS = [(*case, *DTYPES[0]) for case in TMA_CASES + TMA_LONG_CASES] + [(*case, *DTYPES[1]) for case in TMA_CASES]
TMA_IDS = ["-".join(map(str, p[:6])) + ("-fp32" if p[6] == torch.float32 else "-fp16") for p in TMA_PARAMS]


@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos,dtype,tol", TMA_PARAMS, ids=TMA_IDS)
@pytest.mark.parametrize("extra", [{}, {"num_splits": 3}, {"pack_gqa": True}], ids=["plain", "split", "pack"])
def test_chunk_attention_tma_prefix_loads(B, C, Hq, Hkv, D, start_pos, dtype, tol, extra):
    """The prefix's whole key blocks through tensor descriptors (config tma): odd sizes, padded head dims (zero-filled
    past D), splits, GQA packing, per-row starts."""
    if extra.get("pack_gqa") and Hq == Hkv:
        extra = {}
    cfg = dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1, tma=True, **extra)
    run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol, config=cfg)
    run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol, config=cfg,
                       per_row_starts=[start_pos + 3 * b for b in range(B)])


def test_chunk_attention_tma_refuses_a_cache_that_does_not_flatten():
    q, k = torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)
    big = torch.zeros(2, 64, 2, 16)
    with pytest.raises(ValueError, match="config tma needs k_cache to flatten"):
        chunk_attention(q, k, k, big[:, :32], big[:, :32].clone(), 3,
                        config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, tma=True))
    with pytest.raises(ValueError, match="config tma must be True or False"):
        chunk_attention(q, k, k, big.clone(), big.clone(), 3,
                        config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, tma="yes"))


# config ws: the prefix's whole key blocks in the warp-specialized kernel, the rest and the chunk in the main one
WS_CASES = [(1, 37, 4, 4, 128, 45), (3, 5, 2, 1, 32, 70), (2, 19, 4, 2, 16, 64), (1, 1, 8, 1, 64, 300)]
WS_LONG_CASES = [(2, 61, 8, 2, 16, 389)]
WS_PARAMS = [(*case, *DTYPES[0]) for case in WS_CASES + WS_LONG_CASES] + [(*case, *DTYPES[1]) for case in WS_CASES]
WS_IDS = ["-".join(map(str, p[:6])) + ("-fp32" if p[6] == torch.float32 else "-fp16") for p in WS_PARAMS]


@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos,dtype,tol", WS_PARAMS, ids=WS_IDS)
@pytest.mark.parametrize("block_m", [32, 64])
def test_chunk_attention_warp_specialized_prefix(B, C, Hq, Hkv, D, start_pos, dtype, tol, block_m):
    """Config ws: batches (the query and cache descriptors span every row), GQA groups, chunks that are not whole
    query blocks, a prefix that is whole key blocks (64) or has a tail, one query; output and cache append exact."""
    cfg = dict(BLOCK_M=block_m, BLOCK_N=16, num_warps=4, num_stages=2, ws=True)
    run_attention_case(B, C, Hq, Hkv, D, start_pos, dtype, tol, seed=block_m, config=cfg)


def test_chunk_attention_warp_specialized_prefix_refuses_what_it_cannot_run():
    q, k = torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)
    cache = lambda: torch.zeros(2, 64, 2, 16)  # noqa: E731
    ws = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, ws=True)
    with pytest.raises(ValueError, match=r"config ws .* needs an int start_pos of at least BLOCK_N \(16\), got 15"):
        chunk_attention(q, k, k, cache(), cache(), 15, config=ws)
    with pytest.raises(ValueError, match="needs an int start_pos of at least BLOCK_N .16., got a tensor"):
        chunk_attention(q, k, k, cache(), cache(), torch.tensor([20, 30]), config=ws)
    with pytest.raises(ValueError, match="config ws reads whole prefix blocks unmasked; it does not take a sliding"):
        chunk_attention(q, k, k, cache(), cache(), 20, config=ws, window=8)
    with pytest.raises(ValueError, match=r"config ws \(.*\) takes none of pack_gqa, num_splits$"):
        chunk_attention(q, k, k, cache(), cache(), 20, config={**ws, "pack_gqa": True, "num_splits": 2})
    with pytest.raises(ValueError, match="config ws needs k_cache to flatten to \\[B\\*max_len, Hkv\\*D\\] rows"):
        big = torch.zeros(2, 64, 4, 16)
        chunk_attention(q, k, k, big[:, :, :2], cache(), 20, config=ws)
    q24, k24 = torch.randn(1, 4, 2, 24), torch.randn(1, 4, 2, 24)
    with pytest.raises(ValueError, match="head dim 24 is not a power of two"):
        chunk_attention(q24, k24, k24, torch.zeros(1, 64, 2, 24), torch.zeros(1, 64, 2, 24), 20, config=ws)


def test_chunk_attention_split_with_per_row_starts():
    """Splits are cut per row from that row's own prefix: a long and a short prefix in one launch."""
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, pack_gqa=True, num_splits=6)
    run_attention_case(3, 7, 8, 2, 32, 0, torch.float32, 2e-5, per_row_starts=[0, 9, 250], config=cfg)


@pytest.mark.parametrize("pack,splits", [(False, 1), (True, 1), (False, 4), (True, 4)])
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # 0 / 0: the NaN rows
def test_packed_and_split_kernels_mask_off_out_of_range_rows(pack, splits):
    from kernels.chunk_attention import _launch
    g = torch.Generator().manual_seed(8)
    B, C, Hq, Hkv, D, max_len, guard = 3, 9, 4, 2, 16, 60, 64
    q = torch.randn(B, C, Hq, D, generator=g)
    k, v = (torch.randn(B, C, Hkv, D, generator=g) for _ in range(2))
    bufs = [torch.full((B, guard + max_len + guard, Hkv, D), 7.0) for _ in range(2)]
    kc, vc = (b[:, guard:guard + max_len] for b in bufs)
    kc[:], vc[:] = 0.0, 0.0
    starts = torch.tensor([40, -4, max_len - C + 1], dtype=torch.int32)
    out = torch.full_like(q, 123.0)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, pack_gqa=pack, num_splits=splits)
    _launch(q, k, v, kc, vc, starts, D ** -0.5, out, cfg)
    for b in bufs:
        assert (b[:, :guard] == 7.0).all() and (b[:, guard + max_len:] == 7.0).all()
    assert not kc[1:].any() and not vc[1:].any() and out[1:].isnan().all()
    assert (out[:1].double() - attention_f64(q[:1], kc[:1], vc[:1], 40)).abs().max().item() <= 2e-5


def test_pick_splits_fills_idle_sms_only_when_the_prefix_is_long():
    from kernels.chunk_attention import MAX_SPLITS, MIN_SPLIT_BLOCKS, pick_splits
    assert pick_splits(programs=128, key_blocks=256, n_sm=132) == 1  # the grid already fills the GPU
    assert pick_splits(programs=1024, key_blocks=4096, n_sm=132) == 1
    assert pick_splits(programs=8, key_blocks=3, n_sm=132) == 1  # too short a prefix to split
    s = pick_splits(programs=8, key_blocks=1000, n_sm=132)  # decode, 8 KV heads packed: 8 programs
    assert 10 <= s <= MAX_SPLITS and 8 * s <= 132
    assert pick_splits(programs=32, key_blocks=1000, n_sm=132) == 4  # 128 programs: one nearly full wave
    assert pick_splits(programs=8, key_blocks=5 * MIN_SPLIT_BLOCKS, n_sm=132) <= 5  # each split >= MIN blocks
    # two programs per SM (the small decode tiles): about twice the splits, the grid within two per SM
    s2 = pick_splits(programs=8, key_blocks=1000, n_sm=132, per_sm=2)
    assert 2 * s - 4 <= s2 <= MAX_SPLITS and s2 > 16 and 8 * s2 <= 2 * 132
    assert pick_splits(programs=128, key_blocks=1000, n_sm=132, per_sm=2) == 2  # one wave of SMs, none of slots
    assert pick_splits(programs=240, key_blocks=1000, n_sm=132, per_sm=2) == 1  # fills 80% of the slots


def test_decode_like_launches_split_for_two_programs_per_sm(monkeypatch):
    """Chunks of up to 16 queries (the small decode tiles) count two programs per SM: at prefix 32k on 132 SMs, one
    query, 8 KV heads packed, the launcher splits 28 ways (14 at one per SM: an H200 timed 32 splits 1.43x faster);
    a 2k chunk counts one."""
    from kernels.chunk_attention import pick_config, pick_splits, programs_per_sm
    assert [programs_per_sm(c) for c in (1, 16, 17, 2048)] == [2, 2, 1, 1]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choices, not the interpreter's
    tile = pick_config(1, 128, torch.bfloat16, (9, 0), group=4)  # 8 programs: one per KV head, its 4 heads packed
    assert pick_splits(8, 32768 // tile["BLOCK_N"], 132, programs_per_sm(1)) == 28
    assert pick_splits(8, 32768 // tile["BLOCK_N"], 132) == 14


def test_decode_like_tiles_take_three_load_stages_on_hopper_at_d128_only(monkeypatch):
    """The d128 decode tiles read the prefix with three load stages on Hopper (an H200 timed 1.30x / 1.20x at 32k/1
    and 32k/16); under a sliding window, at other head dims (d80 and d96 in the d128 tile too) and on Ampere they keep
    two (three spilled there, or were not timed). The
    launcher passes its window to the choice; the AOT report compiles both choices."""
    from kernels.aot import kernel_specs
    from kernels.chunk_attention import launch_plan, pick_config
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choices, not the interpreter's
    bf16 = torch.bfloat16
    for c, group in ((1, 1), (1, 4), (16, 8)):
        assert pick_config(c, 128, bf16, (9, 0), group=group)["num_stages"] == 3
        assert pick_config(c, 96, bf16, (9, 0), group=group)["num_stages"] == 2  # the d128 tile padded: spilled
        windowed = pick_config(c, 128, bf16, (9, 0), group=group, window=4096)
        assert windowed["num_stages"] == 2 and windowed == {**pick_config(c, 128, bf16, (9, 0), group=group),
                                                             "num_stages": 2}
        assert pick_config(c, 128, bf16, (8, 0), group=group)["num_stages"] == 2
        assert all(pick_config(c, d, bf16, (9, 0), group=group)["num_stages"] == 2 for d in (16, 32, 64, 256))
    # a window changes nothing but the decode tiles
    for c in (17, 256, 2048):
        assert pick_config(c, 128, bf16, (9, 0), window=4096) == pick_config(c, 128, bf16, (9, 0))
    q, k_new = torch.empty(1, 1, 32, 128, dtype=bf16), torch.empty(1, 1, 8, 128, dtype=bf16)
    k_cache = torch.empty(1, 8192, 8, 128, dtype=bf16)
    assert launch_plan(q, k_new, k_cache, 8000)["config"]["num_stages"] == 3
    assert launch_plan(q, k_new, k_cache, 8000, window=4096)["config"]["num_stages"] == 2
    # ahead of time: the plain d128 decode tile with three stages, its window variant with two
    specs = {(s.name, s.num_stages) for s in kernel_specs(90)}
    assert ("chunk_attention d128 bfloat16 m32n32 pack4", 3) in specs
    assert ("chunk_attention d128 bfloat16 m32n32 pack4 split window", 2) in specs
    assert ("chunk_attention d128 bfloat16 m32n32 pack4 window", 3) not in specs


def test_pick_config_packs_gqa_for_short_chunks_only(monkeypatch):
    from kernels.chunk_attention import pick_config
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choices, not the interpreter's
    for cap in ((9, 0), (8, 0)):
        decode = pick_config(1, 128, torch.bfloat16, cap, group=4)
        assert decode["pack_gqa"] and decode["BLOCK_M"] == 32  # 4 heads x 8 queries (1 real)
        assert pick_config(16, 128, torch.bfloat16, cap, group=8)["BLOCK_M"] == 64  # 8 heads x 8 queries, capped
        assert not pick_config(1, 128, torch.bfloat16, cap, group=1)["pack_gqa"]  # MHA: nothing to pack
        assert not pick_config(2048, 128, torch.bfloat16, cap, group=4)["pack_gqa"]
    assert not pick_config(1, 128, torch.bfloat16, (9, 0), group=128)["pack_gqa"]  # 128 heads do not fit a tile
    cfg = pick_config(1, 64, torch.bfloat16, (9, 0), group=4)
    cfg["BLOCK_M"] = 999  # a copy: the launcher's cached choice is not changed by the caller
    assert pick_config(1, 64, torch.bfloat16, (9, 0), group=4)["BLOCK_M"] == 32


def test_pick_config_at_prefix_0_takes_smaller_tiles(monkeypatch):
    """A chunk over no prefix is all causal: Hopper launches 64x64 tiles there (compiled without the prefix loops),
    for chunks of 17 and more, the long-prefix tile elsewhere; decode-like chunks, Ampere and per-row starts on the
    device (not read) keep theirs."""
    from kernels.chunk_attention import launch_plan, pick_config
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bf16 = torch.bfloat16
    long_tile = pick_config(2048, 128, bf16, (9, 0))
    assert pick_config(2048, 128, bf16, (9, 0), prefix=16384) == long_tile
    assert pick_config(2048, 128, bf16, (9, 0), prefix=1) == long_tile
    short = pick_config(2048, 128, bf16, (9, 0), prefix=0)
    assert short["no_prefix"] and not long_tile.get("no_prefix")
    assert (short["BLOCK_M"], short["BLOCK_N"], short["num_stages"]) == (64, 64, 3) != (
        long_tile["BLOCK_M"], long_tile["BLOCK_N"], long_tile["num_stages"])
    for c in (17, 64, 256, 512):
        assert pick_config(c, 128, bf16, (9, 0), prefix=0) == short != pick_config(c, 128, bf16, (9, 0))
        assert pick_config(c, 96, bf16, (9, 0), prefix=0) == short  # padded to d128 tiles
    for c in (1, 16):
        assert pick_config(c, 128, bf16, (9, 0), prefix=0) == pick_config(c, 128, bf16, (9, 0))
    assert pick_config(2048, 128, bf16, (8, 0), prefix=0) == pick_config(2048, 128, bf16, (8, 0))
    q = torch.empty(1, 1024, 8, 128, dtype=bf16)
    k_new = torch.empty(1, 1024, 2, 128, dtype=bf16)
    k_cache = torch.empty(1, 4096, 2, 128, dtype=bf16)
    assert launch_plan(q, k_new, k_cache, 0)["config"] == short
    assert launch_plan(q, k_new, k_cache, 3072)["config"] == long_tile
    assert launch_plan(q, k_new, k_cache, torch.zeros(1, dtype=torch.int32))["config"] == long_tile


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("extra", [{}, {"num_splits": 3}, {"pack_gqa": True}])
def test_chunk_attention_without_prefix_loops(extra, dtype, tol):
    """config no_prefix (the launcher's prefix-0 tile) compiles the kernel without its prefix loops: at start 0 the
    reference's results and the cache append, also with forced splits (all but the last see no key) and packing."""
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, no_prefix=True, **extra)
    run_attention_case(2, 37, 4, 2, 16, 0, dtype, tol, config=cfg)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("fold", [False, True], ids=["scaled-first", "fold-scale"])
@pytest.mark.parametrize("B,C,D,start_pos,extra", [
    (2, 75, 16, 21, {}), (1, 37, 80, 0, {"no_prefix": True}), (2, 33, 32, 90, {"num_splits": 3}),
    (1, 9, 16, 40, {"pack_gqa": True}), (1, 1, 24, 7, {})])
def test_chunk_attention_softmax_scale_folded_or_not(B, C, D, start_pos, extra, fold, dtype, tol):
    """config fold_scale (a sweep option; an H200 timed it slower in the Hopper prefill tiles): the max of the raw
    scores, each score scaled inside the exp2's multiply-add; without it every score is scaled first. Both against
    float64, over a prefix and none, split, packed, padded head dims, one query. The launcher does not fold, so
    its every other test runs the plain step."""
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, fold_scale=fold, **extra)
    run_attention_case(B, C, 4, 2, D, start_pos, dtype, tol, seed=C, config=cfg)
    if DEVICE == "cpu":
        from kernels.chunk_attention import launch_plan
        q = torch.empty(1, 40, 4, 16)
        assert not launch_plan(q, q[:, :, :2], torch.empty(1, 64, 2, 16), 3)["config"].get("fold_scale")


@pytest.mark.parametrize("start_pos", [3, "tensor"])
def test_chunk_attention_refuses_no_prefix_over_a_prefix(start_pos):
    inputs = _attn_inputs()
    inputs["start_pos"] = torch.zeros(inputs["q"].shape[0], dtype=torch.int32) if start_pos == "tensor" else start_pos
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, no_prefix=True)
    with pytest.raises(ValueError, match="no_prefix .* needs an int start_pos of 0"):
        chunk_attention(**inputs, config=cfg)


def test_chunk_attention_per_row_start_positions():
    run_attention_case(3, 19, 4, 2, 32, 0, torch.float32, 2e-5, per_row_starts=[0, 7, 70])


def test_the_reference_takes_per_row_starts_as_the_kernel_does():
    """chunk_attention_ref with a tensor of per-row starts: the kernel's outputs and caches, and the per-row answer
    of the int-start reference row by row."""
    g = torch.Generator().manual_seed(11)
    q, kn, vn = (torch.randn(3, 6, h, 16, generator=g) for h in (4, 2, 2))
    kc, vc = torch.randn(3, 40, 2, 16, generator=g), torch.randn(3, 40, 2, 16, generator=g)
    starts = torch.tensor([0, 9, 34])
    caches = [(kc.clone(), vc.clone()) for _ in range(2)]
    got = chunk_attention_ref(q, kn, vn, *caches[0], starts)
    want = chunk_attention(q, kn, vn, *caches[1], starts)
    assert (got - want).abs().max().item() <= 2e-5 and all(map(torch.equal, caches[0], caches[1]))
    for b, p in enumerate(starts.tolist()):
        row = chunk_attention_ref(q[b:b + 1], kn[b:b + 1], vn[b:b + 1], kc[b:b + 1].clone(), vc[b:b + 1].clone(), p)
        assert (row[0] - got[b]).abs().max().item() <= 1e-6


def test_chunk_attention_int_and_tensor_starts_agree_bit_for_bit():
    # an int start rides in the launch, a tensor is read per row on the device: the same start, the same result
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 4, 32, generator=g).to(DEVICE)
    k_new, v_new, k0, v0 = (torch.randn(2, n, 1, 32, generator=g).to(DEVICE) for n in (21, 21, 80, 80))  # 4-way GQA
    outs = []
    for start in (45, torch.full((2,), 45, device=DEVICE)):
        k_cache, v_cache = k0.clone(), v0.clone()
        out = torch.full_like(q, float("nan"))
        chunk_attention(q, k_new, v_new, k_cache, v_cache, start, out=out)
        outs.append((out, k_cache, v_cache))
    assert not outs[0][0].isnan().any()
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("starts", [[-4, 7], [7, 70], [2**30, 0]], ids=["negative", "past-the-end", "huge"])
def test_chunk_attention_refuses_a_cpu_start_row_outside_the_cache(starts):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=g) for _ in range(3))
    kc, vc = torch.zeros(2, 20, 2, 16), torch.zeros(2, 20, 2, 16)
    bad = next(b for b, p in enumerate(starts) if not 0 <= p <= 11)
    with pytest.raises(ValueError, match=rf"start_pos\[{bad}\] = {starts[bad]} .* \[0, 11\]"):
        chunk_attention(q, k, v, kc, vc, torch.tensor(starts))
    assert not kc.any() and not vc.any()  # refused before any launch


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # 0 / 0: the NaN rows
def test_chunk_attention_kernel_masks_off_rows_whose_start_is_out_of_range():
    """What a GPU does with a bad device-side start (the launcher cannot read it without a sync): the kernel itself
    writes nothing outside the cache, leaves the cache alone for that row and returns NaN there; the good row is
    computed as usual. The cache is a window of a larger buffer, so a stray write would land in the guard rows."""
    from kernels.chunk_attention import _launch
    g = torch.Generator().manual_seed(7)
    B, C, H, D, max_len, guard = 4, 9, 2, 16, 20, 64
    q, k, v = (torch.randn(B, C, H, D, generator=g) for _ in range(3))
    bufs = [torch.full((B, guard + max_len + guard, H, D), 7.0) for _ in range(2)]
    kc, vc = (b[:, guard:guard + max_len] for b in bufs)
    kc[:], vc[:] = 0.0, 0.0
    starts = torch.tensor([5, -4, max_len - C + 1, 2**20], dtype=torch.int32)
    out = torch.full_like(q, 123.0)
    _launch(q, k, v, kc, vc, starts, D ** -0.5, out)
    for b in bufs:  # guard rows untouched
        assert (b[:, :guard] == 7.0).all() and (b[:, guard + max_len:] == 7.0).all()
    assert not kc[1:].any() and not vc[1:].any() and out[1:].isnan().all()
    kb, vb = torch.zeros(1, max_len, H, D), torch.zeros(1, max_len, H, D)
    kb[:, 5:5 + C], vb[:, 5:5 + C] = k[:1], v[:1]
    assert torch.equal(kc[:1], kb) and torch.equal(vc[:1], vb)
    assert (out[:1].double() - attention_f64(q[:1], kb, vb, 5)).abs().max().item() <= 2e-5


@pytest.mark.parametrize("start_pos", [5.7, 5.0, True, "5", None])
def test_chunk_attention_start_must_be_an_integer(start_pos):
    with pytest.raises(TypeError, match="start_pos must be an integer"):
        chunk_attention(**_attn_inputs(start_pos=start_pos))


def test_chunk_attention_default_scale_is_inverse_sqrt_head_dim():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=g) for _ in range(3))
    kc, vc = torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16)
    default = chunk_attention(q, k, v, kc.clone(), vc.clone(), 0)
    explicit = chunk_attention(q, k, v, kc.clone(), vc.clone(), 0, sm_scale=0.25)
    halved = chunk_attention(q, k, v, kc.clone(), vc.clone(), 0, sm_scale=0.125)
    assert torch.allclose(default, explicit) and not torch.allclose(default, halved)


def _attn_inputs(**over):
    t = dict(q=torch.zeros(1, 4, 4, 16), k_new=torch.zeros(1, 4, 2, 16), v_new=torch.zeros(1, 4, 2, 16),
             k_cache=torch.zeros(1, 10, 2, 16), v_cache=torch.zeros(1, 10, 2, 16), start_pos=0)
    t.update(over)
    return t


@pytest.mark.parametrize("over,match", [
    (dict(k_new=torch.zeros(1, 4, 3, 16), v_new=torch.zeros(1, 4, 3, 16)), "multiple of KV heads"),
    (dict(k_new=torch.zeros(1, 5, 2, 16)), "k_new/v_new must be"),
    (dict(k_cache=torch.zeros(1, 10, 2, 16, dtype=torch.float16)), "float16 but q is torch.float32"),
    (dict(start_pos=7), "past the cache"),
    (dict(start_pos=-1), ">= 0"),
    (dict(q=torch.zeros(1, 4, 16, 4).transpose(2, 3)), "contiguous"),
    (dict(q=torch.zeros(1, 4, 4, 264), k_new=torch.zeros(1, 4, 2, 264), v_new=torch.zeros(1, 4, 2, 264),
          k_cache=torch.zeros(1, 10, 2, 264), v_cache=torch.zeros(1, 10, 2, 264)), r"head dim 264 .*1 to 256"),
    (dict(q=torch.zeros(4, 4, 16)), "4-D"),
    (dict(q=torch.zeros(1, 4, 4, 16, dtype=torch.float64)), "unsupported dtype"),
    (dict(start_pos=torch.zeros(2, dtype=torch.int64)), "start_pos tensor"),
])
def test_chunk_attention_refuses_bad_input(over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chunk_attention(**_attn_inputs(**over))


def test_one_buffer_passed_as_both_caches_is_refused_and_two_views_of_one_are_not():
    """k_cache is v_cache (the append would write v over k) is refused before the launch; k = kv[0], v = kv[1] of
    one [2, B, max_len, Hkv, D] buffer is two caches, and gives what two separate tensors give."""
    kv = torch.randn(2, 1, 10, 2, 16)
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
        chunk_attention(**_attn_inputs(k_cache=kv[0], v_cache=kv[0]))
    args = _attn_inputs(q=torch.randn(1, 4, 4, 16), k_new=torch.randn(1, 4, 2, 16), v_new=torch.randn(1, 4, 2, 16),
                        start_pos=3)
    apart = chunk_attention(**args | dict(k_cache=kv[0].clone(), v_cache=kv[1].clone()))
    assert torch.equal(chunk_attention(**args | dict(k_cache=kv[0], v_cache=kv[1])), apart)


@pytest.mark.parametrize("B,C,start_pos", [(1, 0, 0), (1, 0, 10), (2, 0, 3), (0, 4, 0), (0, 0, 0)])
def test_chunk_attention_of_nothing_is_empty_and_leaves_the_cache(B, C, start_pos):
    """No rows or an empty chunk (at any start up to the cache's end) is a no-op, as torch's ops treat empty inputs:
    an empty out, no launch, the caches untouched; the other checks still apply."""
    q, k = torch.zeros(B, C, 4, 16), torch.zeros(B, C, 2, 16)
    kc, vc = torch.randn(B, 10, 2, 16), torch.randn(B, 10, 2, 16)
    kc0, vc0 = kc.clone(), vc.clone()
    out = chunk_attention(q, k, k, kc, vc, start_pos)
    assert out.shape == (B, C, 4, 16) and torch.equal(kc, kc0) and torch.equal(vc, vc0)
    assert chunk_attention(q, k, k, kc, vc, torch.full((B,), start_pos)).shape == (B, C, 4, 16)
    with pytest.raises(ValueError, match="past the cache"):
        chunk_attention(q, k, k, kc, vc, 11)
    with pytest.raises(ValueError, match="heads, D >= 1"):
        chunk_attention(q[..., :0], k[..., :0], k[..., :0], kc[..., :0], vc[..., :0], 0)


def test_chunk_attention_refuses_device_mismatch():
    with pytest.raises(ValueError, match="k_cache is on meta"):
        chunk_attention(**_attn_inputs(k_cache=torch.zeros(1, 10, 2, 16, device="meta")))


# ---- memory-bound kernels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 37, 123), (2, 217, 100)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(shape, dtype, tol, with_residual):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(*shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    out, r_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    y, s = add_rms_norm(x, r if with_residual else None, w, 1e-5, out=out, residual_out=r_out)
    s64 = x.double() + (r.double() if with_residual else 0)
    y64 = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert y is out and (y.double() - y64).abs().max().item() <= tol * 4  # |y| reaches ~4: scale the tolerance
    assert (s.double() - s64).abs().max().item() <= tol * 2


def test_add_rms_norm_reads_a_strided_weight():
    """A weight given as a strided view (every other element of a larger buffer) is read as its values."""
    g = torch.Generator().manual_seed(4)
    x, r = (torch.randn(2, 9, 40, generator=g).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(40, 2, generator=g)).to(DEVICE)[:, 0]
    assert w.stride() == (2,)
    y, _ = add_rms_norm(x, r, w, 1e-5, out=torch.full_like(x, float("nan")))
    s64 = x.double() + r.double()
    y64 = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert (y.double() - y64).abs().max().item() <= 1e-5 * 4


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,C,H,D,start_pos", [(1, 1, 1, 16, 0), (3, 37, 5, 64, 1000), (2, 217, 3, 128, 1),
                                               (2, 19, 3, 80, 5), (1, 7, 2, 96, 0), (1, 5, 1, 6, 2),
                                               (1, 3, 40, 128, 9), (2, 2, 37, 256, 3), (1, 2, 300, 8, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "qkv"])
def test_rope(B, C, H, D, start_pos, dtype, tol, layout):
    """Several head blocks per row from H = 40 at D = 128 on; "qkv": x is the q-and-k part of a fused projection's
    output (the model's call), heads strided inside each token's row."""
    g = torch.Generator().manual_seed(2)
    if layout == "qkv":  # [B, C, (H + 3) D]: x its first H heads, 3 heads of "v" after them
        x = torch.randn(B, C, (H + 3) * D, generator=g).to(dtype).to(DEVICE)[..., :H * D].view(B, C, H, D)
    else:
        x = torch.randn(B, C, H, D, generator=g).to(dtype).to(DEVICE)
    cos, sin = rope_tables(D, start_pos + C + 5, 10000.0, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    y = rope(x, cos, sin, start_pos, out=out)
    # independent float64 reference: rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D)
    pos = torch.arange(start_pos, start_pos + C, dtype=torch.float64)
    ang = pos[:, None] * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    c, s = ang.cos()[None, :, None, :].to(DEVICE), ang.sin()[None, :, None, :].to(DEVICE)
    x1, x2 = x.double()[..., :D // 2], x.double()[..., D // 2:]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    assert y is out and (y.double() - expected).abs().max().item() <= tol * 2


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("D,R", [(16, 8), (96, 72), (128, 96), (80, 2)])
def test_rope_of_part_of_each_head_with_longrope_tables(D, R, dtype, tol):
    """Partial rotary embedding as transformers' Phi-3 computes it (rotate-half over the first R dims, the rest
    passed through; LongRoPE's short factors and attention factor), by the rotate-half kernel on each head's dims
    in the model's `rotary_order`, against a float64 reference in the checkpoint's order."""
    from pipeline import ModelConfig
    from pipeline.model import rotary_order
    B, C, H, start_pos = 2, 13, 3, 7
    g = torch.Generator().manual_seed(12)
    short = (1.0 + torch.rand(R // 2, generator=g, dtype=torch.float64) * 3).tolist()
    x = torch.randn(B, C, H, D, generator=g).to(dtype)
    cos, sin = rope_tables(D, start_pos + C, 10000.0, rotary_dim=R, freq_factors=short, attention_factor=1.3)
    assert torch.equal(cos[:, R // 2:], torch.ones_like(cos[:, R // 2:])) and not sin[:, R // 2:].any()
    order = rotary_order(ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                                     head_dim=D, intermediate_size=8, rotary_dim=R))
    out = torch.full_like(x, float("nan"))
    y = rope(x[..., order].to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), start_pos, out=out.to(DEVICE))
    pos = torch.arange(start_pos, start_pos + C, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, R, 2, dtype=torch.float64) / R) / torch.tensor(short, dtype=torch.float64)
    ang = torch.cat([pos[:, None] * inv] * 2, -1)[None, :, None, :]
    x64, rot = x.double(), x.double()[..., :R]
    half = torch.cat([-rot[..., R // 2:], rot[..., :R // 2]], -1)
    expected = torch.cat([(rot * ang.cos() + half * ang.sin()) * 1.3, x64[..., R:]], -1)
    assert (y.double().cpu() - expected[..., order]).abs().max().item() <= tol * 4


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 37, 123), (2, 217, 300)])
def test_swiglu_on_fused_projection_halves(shape, dtype, tol):
    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(dtype).to(DEVICE)
    gate, up = gate_up[..., :shape[-1]], gate_up[..., shape[-1]:]  # strided views, as in the model
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    y = swiglu(gate, up, out=out)
    g64, u64 = gate.double(), up.double()
    assert y is out and (y.double() - g64 * torch.sigmoid(g64) * u64).abs().max().item() <= tol * 4


def test_memory_bound_kernels_refuse_bad_input():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, None, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.zeros(2, 3, 8, dtype=torch.float16), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="must match"):
        swiglu(x, torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="contiguous"):
        swiglu(torch.zeros(8, 2).t(), torch.zeros(8, 2).t())
    cos, sin = rope_tables(8, 4, 10000.0)
    with pytest.raises(ValueError, match="outside the tables"):
        rope(torch.zeros(1, 3, 2, 8), cos, sin, 2)
    with pytest.raises(ValueError, match=r"\[max_len, 4\]"):
        rope(torch.zeros(1, 3, 2, 8), cos[:, :2], sin[:, :2], 0)


def test_memory_bound_kernels_give_empty_results_for_no_rows():
    """No rows (an empty step) gives empty results, as torch's ops do; an empty last dimension is still refused."""
    x, w = torch.zeros(0, 3, 8), torch.ones(8)
    y, s = add_rms_norm(x, x.clone(), w, 1e-5)
    assert y.shape == s.shape == (0, 3, 8)
    assert swiglu(x, x.clone()).shape == (0, 3, 8)
    cos, sin = rope_tables(8, 4, 10000.0)
    assert rope(torch.zeros(0, 3, 2, 8), cos, sin, 1).shape == (0, 3, 2, 8)
    assert rope(torch.zeros(2, 0, 2, 8), cos, sin, 4).shape == (2, 0, 2, 8)
    with pytest.raises(ValueError, match="H >= 1"):
        add_rms_norm(torch.zeros(2, 0), None, torch.ones(0), 1e-5)
    with pytest.raises(ValueError, match="I >= 1"):
        swiglu(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match="H, D >= 1"):
        rope(torch.zeros(1, 3, 0, 8), cos, sin, 0)
    with pytest.raises(ValueError, match="outside the tables"):
        rope(torch.zeros(0, 3, 2, 8), cos, sin, 2)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors")
def test_cpu_tensors_without_the_interpreter_are_refused_in_words(monkeypatch):
    """Without TRITON_INTERPRET=1, Triton cannot run a kernel on CPU tensors (it says "0 active drivers"): every
    launcher says what to do instead, before its launch, with the caches untouched."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kc, vc = torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    k0 = kc.clone()
    cos, sin = rope_tables(8, 4, 10000.0)
    calls = {
        "chunk_attention": lambda: chunk_attention(**_attn_inputs(k_cache=kc, v_cache=vc)),
        "paged chunk_attention": lambda: chunk_attention(**_attn_inputs(k_cache=kc, v_cache=vc),
                                                         block_table=torch.zeros(1, 1, dtype=torch.int32)),
        "add_rms_norm": lambda: add_rms_norm(torch.zeros(2, 8), None, torch.ones(8), 1e-5),
        "swiglu": lambda: swiglu(torch.zeros(2, 8), torch.zeros(2, 8)),
        "rope": lambda: rope(torch.zeros(1, 3, 2, 8), cos, sin, 0),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"^{op}: the tensors are on the CPU, .*TRITON_INTERPRET=1"):
            call()
    assert torch.equal(kc, k0)


# ---- GPU: bf16, long prefixes, large batches (compiled Triton) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos", [(1, 2048, 32, 8, 128, 16384), (8, 512, 32, 8, 128, 4000),
                                                     (4, 1, 32, 8, 128, 30000), (2, 777, 16, 16, 64, 1234),
                                                     (1, 2048, 32, 8, 128, 0), (2, 999, 8, 2, 80, 0),
                                                     (3, 77, 32, 8, 128, 0)])
def test_chunk_attention_gpu_bf16(cuda, B, C, Hq, Hkv, D, start_pos):
    """Compiled, against float64; at start 0 with chunks over 16 the launcher's prefix-0 tile (on Hopper: no
    prefix loops; a long chunk and a short one), d80 in padded tiles."""
    run_attention_case(B, C, Hq, Hkv, D, start_pos, torch.bfloat16, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,warps", [(64, 128, 4), (128, 128, 8), (128, 32, 4)])
def test_chunk_attention_gpu_bf16_other_configs(cuda, block_m, block_n, warps):
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2)
    run_attention_case(1, 1000, 16, 4, 128, 3000, torch.bfloat16, 2e-2, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("B,C,Hq,Hkv,D,start_pos,window", [(1, 2048, 32, 8, 128, 16384, 4096),
                                                            (4, 1, 32, 8, 128, 30000, 4096),
                                                            (2, 777, 16, 16, 64, 1234, 500),
                                                            (1, 2048, 32, 8, 128, 0, 1000)])
def test_chunk_attention_gpu_bf16_sliding_window(cuda, B, C, Hq, Hkv, D, start_pos, window):
    """Compiled with a sliding window, against float64: a prefill chunk over a long prefix, a split decode step, a
    window shorter than the chunk, and the prefix-0 tile."""
    run_attention_case(B, C, Hq, Hkv, D, start_pos, torch.bfloat16, 2e-2, window=window)


@pytest.mark.gpu
def test_direct_launches_give_tritons_path_outputs_bit_for_bit_on_the_gpu(cuda, monkeypatch):
    """`kernels.fast_launch` compiled: every op's second call of a specialization launched directly (no Triton
    binding), its output equal bit for bit to the same call's through Triton's own path; the dense kernel with a
    prefix, split decode rows (with the merge kernel), a sliding window, the paged kernel, and the small ops."""
    from kernels import fast_launch
    from kernels.paged_attention import paged_chunk_attention
    direct = []
    real = fast_launch._run_compiled
    monkeypatch.setattr(fast_launch, "_run_compiled", lambda *a: (direct.append(1), real(*a)))
    bf = dict(device=cuda, dtype=torch.bfloat16)
    g = torch.Generator(device=cuda).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, **bf)  # noqa: E731
    calls = []
    for B, C, P, window in [(1, 512, 4000, None), (4, 1, 30000, None), (2, 77, 1234, 500)]:
        q, kn, vn = rnd(B, C, 32, 128), rnd(B, C, 8, 128), rnd(B, C, 8, 128)
        kc, vc = rnd(B, P + C, 8, 128), rnd(B, P + C, 8, 128)
        calls.append(lambda q=q, kn=kn, vn=vn, kc=kc, vc=vc, P=P, w=window: chunk_attention(q, kn, vn, kc, vc, P,
                                                                                            window=w))
    page, pages = 16, 64
    kc, vc = rnd(pages, page, 8, 128), rnd(pages, page, 8, 128)
    bt = torch.randperm(pages, device=cuda).to(torch.int32).view(2, 32)
    cu = torch.tensor([0, 5, 105], device=cuda, dtype=torch.int32)
    prefix = torch.tensor([300, 17], device=cuda, dtype=torch.int32)
    qp, knp, vnp = rnd(105, 32, 128), rnd(105, 8, 128), rnd(105, 8, 128)
    calls.append(lambda: paged_chunk_attention(qp, knp, vnp, kc, vc, prefix, bt, cu, 100, max_prefix=300))
    x, r, w = rnd(3, 77, 4096), rnd(3, 77, 4096), rnd(4096)
    calls.append(lambda: add_rms_norm(x, r, w, 1e-5))
    gate, up = rnd(3, 77, 1000), rnd(3, 77, 1000)
    calls.append(lambda: swiglu(gate, up))
    cos, sin = rope_tables(128, 4096, 500000.0, device=cuda)
    xr = rnd(2, 77, 32, 128)
    calls.append(lambda: rope(xr, cos, sin, 1000))
    for i, call in enumerate(calls):
        with fast_launch.jit_launches():
            want = call()
        call()  # the first call of a specialization goes through Triton's path (compiles, or finds it compiled)
        n = len(direct)
        got = call()
        assert len(direct) > n, f"call {i}: not launched directly"
        want, got = (t if isinstance(t, tuple) else (t,) for t in (want, got))
        assert all(torch.equal(a, b) for a, b in zip(want, got)), f"call {i}"


@pytest.mark.gpu
def test_memory_bound_kernels_gpu_bf16(cuda):
    x, r = torch.randn(8, 2048, 4096, device=cuda, dtype=torch.bfloat16), torch.randn(8, 2048, 4096, device=cuda,
                                                                                         dtype=torch.bfloat16)
    w = torch.ones(4096, device=cuda, dtype=torch.bfloat16)
    y, s = add_rms_norm(x, r, w, 1e-5)
    s64 = x.double() + r.double()
    assert (y.double() - s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)).abs().max() < 5e-2


@pytest.mark.gpu
def test_empty_work_on_the_gpu_launches_nothing_and_gives_empty_outputs(cuda):
    """The empty calls of the CPU tests, compiled: no rows, empty chunks, a varlen launch of no tokens."""
    bf = dict(device=cuda, dtype=torch.bfloat16)
    kc, vc = torch.randn(2, 16, 2, 64, **bf), torch.randn(2, 16, 2, 64, **bf)  # two caches: aliased ones are refused
    k0, v0 = kc.clone(), vc.clone()
    assert chunk_attention(torch.zeros(2, 0, 4, 64, **bf), torch.zeros(2, 0, 2, 64, **bf),
                           torch.zeros(2, 0, 2, 64, **bf), kc, vc, 3).shape == (2, 0, 4, 64)
    table = torch.zeros(0, 1, dtype=torch.int32, device=cuda)
    out = chunk_attention(torch.zeros(0, 4, 64, **bf), torch.zeros(0, 2, 64, **bf), torch.zeros(0, 2, 64, **bf), kc,
                          vc, torch.zeros(0, dtype=torch.int32, device=cuda), block_table=table,
                          cu_seqlens=torch.zeros(1, dtype=torch.int32, device=cuda))
    assert out.shape == (0, 4, 64)
    x = torch.zeros(0, 4096, **bf)
    assert add_rms_norm(x, x, torch.ones(4096, **bf), 1e-5)[0].shape == (0, 4096)
    assert swiglu(x, x).shape == (0, 4096)
    cos, sin = rope_tables(64, 8, 10000.0, device=cuda)
    assert rope(torch.zeros(0, 3, 2, 64, **bf), cos, sin, 0).shape == (0, 3, 2, 64)
    torch.cuda.synchronize()
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


@pytest.mark.gpu
def test_chunk_attention_gpu_bad_start_row_is_masked_and_asserted(cuda):
    """A device start tensor is not read back on the hot path: the kernel masks the bad row off and an asynchronous
    assert reports it at the next sync. A device-side assert leaves the CUDA context unusable, so this runs in a
    process of its own; the guard rows around the cache are checked before the sync that raises."""
    from conftest import run_python_apart
    res = run_python_apart("""
        import torch
        from kernels.chunk_attention import _launch
        from kernels import chunk_attention
        q = torch.randn(2, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        buf = torch.full((2, 160, 2, 64), 7.0, device="cuda", dtype=torch.bfloat16)
        kc = buf[:, 64:96]
        vc = torch.zeros_like(kc)
        starts = torch.tensor([0, 30], device="cuda")
        out = _launch(q, k, k, kc, vc, starts, 0.125, torch.empty_like(q))
        guard_ok = bool((buf[:, :64] == 7).all() and (buf[:, 96:] == 7).all() and out[1].isnan().all())
        print("guard_ok", guard_ok, flush=True)
        chunk_attention(q, k, k, kc, vc, starts)
        torch.cuda.synchronize()
        print("no error", flush=True)
    """)
    assert "guard_ok True" in res.stdout, res.stdout + res.stderr[-2000:]
    assert res.returncode != 0 and "no error" not in res.stdout


@given(a=st.integers(1, 1 << 40), b=st.integers(1, 1 << 20))
def test_launch_path_arithmetic_matches_tritons(a, b):
    """The launchers' plain-Python cdiv/next_pow2 (Triton's cost ~4 us a call on the launch path) agree with Triton."""
    import triton

    from kernels.shapes import cdiv, next_pow2
    assert cdiv(a, b) == triton.cdiv(a, b) and next_pow2(a) == triton.next_power_of_2(a)


def _old_patch_lang_tensor(tensor, scope):  # Triton 3.6's conversion, as its interpreter has it
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_the_interpreter_shim_squeezes_runtime_scalars_for_triton_3_6(monkeypatch):
    """Triton 3.6's interpreter bounds a loop with int() of a one-element array, which NumPy 2.4 refuses;
    `kernels.compat.patch_interpreter` wraps that conversion (once), and leaves other interpreters alone."""
    import numpy as np
    from triton.runtime import interpreter

    from kernels.compat import patch_interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert patch_interpreter() and not patch_interpreter()  # patched once, not wrapped again

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Tensor:
        def __init__(self, data):
            self.handle = type("Handle", (), {"data": data})()
    interpreter._patch_lang_tensor(Tensor, Scope())
    assert range(0, Tensor(np.array([7], dtype=np.int32)))[-1] == 6  # a runtime scalar as a loop bound
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", lambda tensor, scope: None)  # 3.7+: nothing to do
    assert not patch_interpreter()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert not patch_interpreter()  # compiled kernels: never touched
