"""chunk_attention over a paged KV cache, with rows of different chunk and prefix lengths in one launch
(kernels.paged_attention): against float64 on fresh random data, outputs poisoned before the launch, the pool of
pages checked bit for bit (new positions written, everything else untouched), and against the dense path."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import chunk_attention, chunk_attention_ref
from kernels.paged_attention import paged_chunk_attention_ref
from tests.test_kernels import DEVICE, DTYPES, attention_f64, no_nan_arithmetic


def make_case(lens, prefixes, Hq, Hkv, D, page_size, dtype, seed=0, spare_pages=3):
    """Random packed chunks, a shuffled pool of pages, each row's pages drawn from it; unused table entries -1."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    B, N = len(lens), sum(lens)
    need = [-(-(p + c) // page_size) for p, c in zip(prefixes, lens)]
    max_pages = max(need) + 1
    num_pages = sum(need) + spare_pages
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, kn, vn = rnd(N, Hq, D), rnd(N, Hkv, D), rnd(N, Hkv, D)
    kc, vc = rnd(num_pages, page_size, Hkv, D), rnd(num_pages, page_size, Hkv, D)
    return q, kn, vn, kc, vc, table.to(DEVICE), cu


def expected_pool(pool, new, table, prefixes, lens, page_size):
    """The pool after appending each row's new K (or V) at its positions [prefix, prefix + len)."""
    pool = pool.clone()
    start = 0
    for b, (p, c) in enumerate(zip(prefixes, lens)):
        for i in range(c):
            pos = p + i
            pool[int(table[b, pos // page_size]), pos % page_size] = new[start + i]
        start += c
    return pool


def row_dense(pool, table, b, n, page_size):
    """Row b's first n positions gathered from its pages: [1, n, Hkv, D]."""
    pos = torch.arange(n, device=pool.device)
    return pool[table[b].long()[pos // page_size], pos % page_size][None]


def run_paged_case(lens, prefixes, Hq, Hkv, D, page_size, dtype, tol, seed=0, tensor_prefix=True, config=None,
                   window=None):
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, Hq, Hkv, D, page_size, dtype, seed)
    k_after = expected_pool(kc, kn, table, prefixes, lens, page_size)
    v_after = expected_pool(vc, vn, table, prefixes, lens, page_size)
    out = torch.full_like(q, float("nan"))
    pre = torch.tensor(prefixes, dtype=torch.int32, device=DEVICE) if tensor_prefix else prefixes[0]
    with no_nan_arithmetic():
        res = chunk_attention(q, kn, vn, kc, vc, pre, out=out, block_table=table, cu_seqlens=cu, config=config,
                              window=window)
    assert res is out
    assert torch.equal(kc, k_after) and torch.equal(vc, v_after)  # appended where due, nothing else touched
    start = 0
    for b, (p, c) in enumerate(zip(prefixes, lens)):
        if c:
            k_row, v_row = row_dense(k_after, table, b, p + c, page_size), row_dense(v_after, table, b, p + c,
                                                                                    page_size)
            expected = attention_f64(q[start:start + c][None], k_row, v_row, p, window)[0]
            got = out[start:start + c]
            assert not got.isnan().any(), f"row {b}"
            assert (got.double() - expected).abs().max().item() <= tol, f"row {b}"
        start += c
    return q, kn, vn, out


PAGED_CASES = [  # (chunk lengths, prefix lengths, Hq, Hkv, D, page size)
    ([5, 37, 1], [0, 20, 33], 4, 2, 64, 16),  # a fresh row, a prefix mid-page, a decode-like row
    ([1, 1, 1, 1], [0, 15, 16, 17], 8, 1, 32, 16),  # decode at page boundaries
    ([64, 0, 3], [128, 7, 0], 4, 4, 16, 64),  # a row with no chunk this time (its cache untouched)
    ([130, 2], [100, 700], 8, 1, 128, 256),  # large pages, a long prefix
    ([17, 9], [3, 40], 6, 3, 80, 32),  # padded head dim, GQA 2
    ([33], [0], 2, 2, 24, 16),  # one row, odd head dim
    ([6, 3], [5, 0], 4, 2, 32, 1),  # pages of one token (SGLang's token-level pool)
    ([7, 4, 0], [10, 2, 5], 4, 2, 16, 3),  # pages of 3: no power of two
    ([20, 1], [37, 48], 4, 1, 32, 24),  # pages of 24, a chunk across three of them
]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,prefixes,Hq,Hkv,D,page_size", PAGED_CASES)
def test_paged_varlen_chunk_attention(lens, prefixes, Hq, Hkv, D, page_size, dtype, tol):
    run_paged_case(lens, prefixes, Hq, Hkv, D, page_size, dtype, tol)


# GQA packing (a KV group's query heads in one tile) and split-KV (the prefix in slices, merged by log-sum-exp),
# alone and together, on tiles the interpreter runs: 16 rows (fp32's), 64 rows packing 8 heads x 8 queries
PACKED_SPLIT = {"pack": dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1, pack_gqa=True),
                "split3": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, num_splits=3),
                "pack+split4": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, pack_gqa=True, num_splits=4),
                # block-table reads one block ahead (the interpreter's default tile has them too), split: some
                # splits' ranges are empty
                "split5+ahead": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, num_splits=5,
                                     page_ahead=True)}


PACKED_SPLIT_CASES = [
    ([5, 37, 1], [0, 20, 33], 4, 2, 64, 16),  # a chunk longer than a packed tile's queries per head
    ([1, 1, 1, 1], [0, 15, 16, 17], 8, 1, 32, 16),  # decode, group 8: every head of the group in one tile
    ([17, 9, 0], [3, 140, 7], 6, 2, 80, 32),  # group 3 (padded to 4 rows of heads), padded head dim, an empty row
    ([3, 2], [300, 0], 12, 4, 24, 1),  # pages of one token, a row with no prefix: its splits see nothing
]
# every case in fp32, the first in fp16 too (fp16 runs the same tiles; the split's partial results are fp32 in both)
PACKED_SPLIT_PARAMS = [(*case, *DTYPES[0]) for case in PACKED_SPLIT_CASES] + [(*PACKED_SPLIT_CASES[0], *DTYPES[1])]


@pytest.mark.parametrize("config", list(PACKED_SPLIT.values()), ids=list(PACKED_SPLIT))
@pytest.mark.parametrize("lens,prefixes,Hq,Hkv,D,page_size,dtype,tol", PACKED_SPLIT_PARAMS,
                         ids=[f"case{i}-fp32" for i in range(len(PACKED_SPLIT_CASES))] + ["case0-fp16"])
def test_paged_gqa_packing_and_split_kv(lens, prefixes, Hq, Hkv, D, page_size, dtype, tol, config):
    run_paged_case(lens, prefixes, Hq, Hkv, D, page_size, dtype, tol, config=config)


# sliding windows over pages (chunk lengths, prefix lengths, Hq, Hkv, D, page size, window, config): windows shorter
# than a page, a block, a chunk; rows whose windows end in the prefix, the chunk or past them; packed, split (some
# splits below the window), reading the table ahead; pages of one token
WINDOW_CASES = [
    ([5, 40, 1], [30, 0, 77], 4, 2, 32, 16, 8, None),
    ([9, 20], [50, 3], 2, 2, 16, 1, 5, None),
    ([33, 2], [100, 200], 8, 2, 40, 64, 40, None),
    ([3, 3, 3], [300, 17, 64], 8, 2, 32, 16, 50, PACKED_SPLIT["pack+split4"]),
    ([70], [90], 2, 1, 16, 32, 13, PACKED_SPLIT["split3"]),
    ([70, 17], [130, 0], 2, 2, 16, 64, 33, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, page_ahead=True)),
    ([7], [0], 4, 2, 16, 16, 1, None),
]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,prefixes,Hq,Hkv,D,page_size,window,config", WINDOW_CASES)
def test_paged_sliding_window(lens, prefixes, Hq, Hkv, D, page_size, window, config, dtype, tol):
    """Each row's query i sees its own positions (prefix + i - window, prefix + i] only, in every layout."""
    run_paged_case(lens, prefixes, Hq, Hkv, D, page_size, dtype, tol, config=config, window=window)


def test_paged_reference_takes_a_window():
    """paged_chunk_attention_ref (the model's torch backend for ragged batches) with a window, against float64: the
    pages below a row's window are not read, the rest gives the same output."""
    lens, prefixes = [6, 11, 3], [9, 0, 23]  # windows from page 1, none, page 4 (pages of 4)
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 4, 2, 16, 4, torch.float64, seed=2)
    k_after = expected_pool(kc, kn, table, prefixes, lens, 4)
    v_after = expected_pool(vc, vn, table, prefixes, lens, 4)
    for b, p in enumerate(prefixes):  # the pages wholly below the row's window: NaN, never read
        below = table[b, :max(0, p - 5 + 1) // 4].long()
        kc[below] = vc[below] = float("nan")
    out = paged_chunk_attention_ref(q, kn, vn, kc, vc, torch.tensor(prefixes), table, cu, window=5)
    start = 0
    for b, (p, c) in enumerate(zip(prefixes, lens)):
        k_row, v_row = row_dense(k_after, table, b, p + c, 4), row_dense(v_after, table, b, p + c, 4)
        expected = attention_f64(q[start:start + c][None], k_row, v_row, p, 5)[0]
        assert (out[start:start + c] - expected).abs().max().item() <= 1e-12
        start += c


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(0, 60), min_size=1, max_size=4), data=st.data(),
       group=st.sampled_from([1, 2, 4]), D=st.sampled_from([16, 32, 64]), page=st.sampled_from([16, 32, 128]),
       half=st.booleans(), seed=st.integers(0, 99), config=st.sampled_from([None, *PACKED_SPLIT.values()]))
def test_paged_varlen_random(lens, data, group, D, page, half, seed, config):
    prefixes = data.draw(st.lists(st.integers(0, 300), min_size=len(lens), max_size=len(lens)))
    dtype, tol = DTYPES[1] if half else DTYPES[0]
    run_paged_case(lens, prefixes, 2 * group, 2, D, page, dtype, tol, seed=seed, config=config)


def test_the_paged_launch_packs_short_gqa_chunks_and_splits_long_prefixes_on_an_idle_grid(monkeypatch):
    """pick_config packs a KV group's heads for chunks of up to 16 queries; on a GPU of 132 SMs a decode batch of
    2 rows x 8 KV heads over 16k-token prefixes fills 16 programs and is split; 64 rows are not. Host work only."""
    from kernels import paged_attention as pa
    monkeypatch.setattr(pa, "_device_facts", lambda index: ((9, 0), 132))
    assert pa.pick_config(128, torch.bfloat16, (9, 0), max_chunk=1, group=4)["pack_gqa"]
    assert not pa.pick_config(128, torch.bfloat16, (9, 0), max_chunk=17, group=4)["pack_gqa"]
    assert not pa.pick_config(128, torch.bfloat16, (9, 0), max_chunk=1, group=1)["pack_gqa"]
    plan = pa.paged_launch_plan("cuda:0", torch.bfloat16, 2, 32, 8, 128, 1, 16384)
    assert plan["pack"] == 4 and plan["grid"][:2] == (1, 16) and plan["splits"] > 1
    assert plan["grid"][2] == plan["splits"]
    assert pa.paged_launch_plan("cuda:0", torch.bfloat16, 64, 32, 8, 128, 1, 16384)["splits"] == 1
    assert pa.paged_launch_plan("cuda:0", torch.bfloat16, 2, 32, 8, 128, 1, 64)["splits"] == 1  # too few blocks
    forced = pa.paged_launch_plan("cuda:0", torch.bfloat16, 2, 32, 8, 128, 300, 16384,
                                  dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, num_splits=2))
    assert forced["pack"] == 1 and forced["splits"] == 2 and forced["grid"] == (5, 64, 2)
    assert pa.paged_launch_plan("cpu", torch.float32, 2, 32, 8, 128, 1, 16384)["splits"] == 1  # no SM count


def test_the_hopper_tile_reads_its_block_table_ahead_over_pages_that_hold_a_key_block(monkeypatch):
    """page_ahead (one table entry read a key block early) where a key block lies in one page only: an H200 timed
    it 1.07x over pages of 256, 0.88x over pages of 16 (four pages gathered per block). A given config is kept."""
    from kernels import paged_attention as pa
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choices, not the interpreter's
    monkeypatch.setattr(pa, "_device_facts", lambda index: ((9, 0), 132))
    plan = lambda page, config=None: pa.paged_launch_plan("cuda:0", torch.bfloat16, 1, 32, 8, 128, 2048, 16384,
                                                          config, page_size=page)["config"]  # noqa: E731
    assert plan(256)["page_ahead"] and plan(64)["page_ahead"] and plan(None)["page_ahead"]
    assert not plan(16)["page_ahead"] and not plan(32)["page_ahead"] and not plan(96)["page_ahead"]
    assert {k: v for k, v in plan(16).items() if k != "page_ahead"} == \
        {k: v for k, v in plan(256).items() if k != "page_ahead"}
    forced = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, page_ahead=True)
    assert plan(16, forced)["page_ahead"]
    assert pa.for_page_size(dict(BLOCK_M=16, BLOCK_N=16, page_ahead=True), 16)["page_ahead"]
    with pytest.raises(ValueError, match="page_size must be >= 1 position, got 0"):
        plan(0)
    with pytest.raises(TypeError, match="page_size must be an integer, got 16.0"):
        plan(16.0)


def test_strided_index_tensors_read_as_their_values():
    """A block table, cu_seqlens and prefix lengths given as strided views (every other column or element, as a
    slice of a larger host buffer may be) give the launch of their contiguous copies, output and pages bit for bit;
    so do the dense kernel's per-row starts."""
    lens, prefixes = [5, 9, 2], [20, 0, 33]
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 4, 2, 16, 8, torch.float32, seed=4)
    wide = torch.full((table.shape[0], 2 * table.shape[1]), 99, dtype=torch.int32)
    wide[:, ::2] = table

    def every_other(t):
        spread = torch.full((2 * t.numel(),), 7, dtype=t.dtype)
        spread[::2] = t
        return spread[::2]
    pre = torch.tensor(prefixes, dtype=torch.int32)
    outs, pools = [], []
    for args in ((table, cu, pre), (wide[:, ::2], every_other(cu), every_other(pre))):
        k, v, out = kc.clone(), vc.clone(), torch.full_like(q, float("nan"))
        chunk_attention(q, kn, vn, k, v, args[2], out=out, block_table=args[0], cu_seqlens=args[1])
        outs.append(out)
        pools.append((k, v))
    assert not outs[0].isnan().any() and torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*pools))
    g = torch.Generator().manual_seed(5)
    q, kn, vn = (torch.randn(3, 4, 4 if i == 0 else 2, 16, generator=g) for i in range(3))
    kc, vc = (torch.randn(3, 30, 2, 16, generator=g) for _ in range(2))
    starts = torch.tensor([3, 0, 17], dtype=torch.int32)
    dense = [chunk_attention(q, kn, vn, kc.clone(), vc.clone(), s) for s in (starts, every_other(starts))]
    assert torch.equal(dense[0], dense[1])


def test_pages_that_interleave_k_and_v_are_two_caches_and_one_pool_twice_is_refused():
    """FlashInfer's NHD pages, [num_pages, 2, page_size, Hkv, D] with k = kv[:, 0] and v = kv[:, 1], give what two
    separate pools give, pages and output; the same pool as both caches is refused before the launch."""
    lens, prefixes = [3, 6], [9, 0]
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 4, 2, 16, 4, torch.float32, seed=6)
    kv = torch.stack([kc, vc], 1)
    pre = torch.tensor(prefixes, dtype=torch.int32)
    apart = chunk_attention(q, kn, vn, kc, vc, pre, block_table=table, cu_seqlens=cu)
    together = chunk_attention(q, kn, vn, kv[:, 0], kv[:, 1], pre, block_table=table, cu_seqlens=cu)
    assert torch.equal(together, apart) and torch.equal(kv[:, 0], kc) and torch.equal(kv[:, 1], vc)
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
        chunk_attention(q, kn, vn, kc, kc, pre, block_table=table, cu_seqlens=cu)


def test_an_int_prefix_serves_every_row():
    run_paged_case([7, 7], [40, 40], 4, 2, 32, 16, torch.float32, 2e-5, tensor_prefix=False)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_reading_the_block_table_ahead_changes_no_result(page_size, dtype, tol):
    """config page_ahead (each key block's page read one block early, carried into the next iteration): the same
    outputs to the bit as reading it in the block's own iteration, both against float64; pages of one key block or
    more (one lookup per block: fp16) and smaller ones or fp32's exact tiles (a lookup per key); a long prefix, a
    prefix ending mid-page, a decode row, an empty chunk."""
    lens, prefixes = [7, 40, 1, 0], [300, 64, 17, 5]
    outs = [run_paged_case(lens, prefixes, 4, 2, 32, page_size, dtype, tol, seed=page_size,
                           config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, page_ahead=ahead))[3]
            for ahead in (False, True)]
    assert torch.equal(outs[0], outs[1])


def test_paged_equals_the_dense_path():
    """The same rows through the dense kernel (cache [B, max_len, Hkv, D], one launch per row) and the paged one."""
    lens, prefixes, page = [11, 40, 1], [5, 64, 200], 16
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 8, 2, 64, page, torch.float32, seed=3)
    dense_k = [row_dense(kc, table, b, p, page) for b, p in enumerate(prefixes)]
    dense_v = [row_dense(vc, table, b, p, page) for b, p in enumerate(prefixes)]
    out = chunk_attention(q, kn, vn, kc, vc, torch.tensor(prefixes, dtype=torch.int32), block_table=table,
                          cu_seqlens=cu)
    start = 0
    for b, (p, c) in enumerate(zip(prefixes, lens)):
        kd = torch.cat([dense_k[b], torch.zeros(1, c, 2, 64)], 1)
        vd = torch.cat([dense_v[b], torch.zeros(1, c, 2, 64)], 1)
        want = chunk_attention(q[start:start + c][None], kn[start:start + c][None], vn[start:start + c][None], kd, vd,
                               p)[0]
        assert (out[start:start + c] - want).abs().max().item() <= 1e-5
        start += c


def test_equal_chunks_in_pages_and_packed_rows_in_a_dense_cache():
    """block_table alone (q [B, C, Hq, D]) and cu_seqlens alone (a dense cache): the same answers as the full
    layout."""
    g = torch.Generator().manual_seed(5)
    B, C, Hq, Hkv, D, page = 3, 9, 4, 2, 32, 16
    prefixes = [0, 17, 30]
    q, kn, vn = (torch.randn(B, C, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    pool_k, pool_v = torch.randn(12, page, Hkv, D, generator=g), torch.randn(12, page, Hkv, D, generator=g)
    table = torch.tensor([[0, 1, 2, -1], [3, 4, 5, -1], [6, 7, 8, 9]], dtype=torch.int32)
    pre = torch.tensor(prefixes, dtype=torch.int32)
    ref_k, ref_v = pool_k.clone(), pool_v.clone()
    ref = paged_chunk_attention_ref(q.double(), kn.double(), vn.double(), ref_k.double(), ref_v.double(), pre, table)
    out = torch.full_like(q, float("nan"))
    chunk_attention(q, kn, vn, pool_k, pool_v, pre, out=out, block_table=table)
    assert (out.double() - ref).abs().max().item() <= 2e-5
    # the dense cache, rows packed: [B, max_len, Hkv, D] is B pages of max_len positions
    dk, dv = torch.randn(B, 48, Hkv, D, generator=g), torch.randn(B, 48, Hkv, D, generator=g)
    cu = torch.arange(0, (B + 1) * C, C, dtype=torch.int32)
    dk2, dv2 = dk.clone(), dv.clone()
    packed = chunk_attention(q.reshape(B * C, Hq, D), kn.reshape(B * C, Hkv, D), vn.reshape(B * C, Hkv, D), dk, dv,
                             pre, cu_seqlens=cu)
    for b, p in enumerate(prefixes):
        row = chunk_attention(q[b:b + 1], kn[b:b + 1], vn[b:b + 1], dk2[b:b + 1], dv2[b:b + 1], p)
        assert (packed[b * C:(b + 1) * C] - row[0]).abs().max().item() <= 1e-5
    assert torch.equal(dk, dk2) and torch.equal(dv, dv2)


def test_the_torch_reference_takes_the_same_layouts():
    lens, prefixes, page = [4, 13], [9, 0], 16
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 4, 1, 32, page, torch.float32, seed=8)
    kc2, vc2 = kc.clone(), vc.clone()
    pre = torch.tensor(prefixes, dtype=torch.int32)
    want = chunk_attention(q, kn, vn, kc, vc, pre, block_table=table, cu_seqlens=cu)
    got = chunk_attention_ref(q, kn, vn, kc2, vc2, pre, block_table=table, cu_seqlens=cu)
    assert (got - want).abs().max().item() <= 1e-5 and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("layout", ["varlen-no-tokens", "varlen-no-rows", "equal-empty-chunks", "equal-no-rows",
                                    "dense-cache-no-rows"])
def test_paged_calls_with_no_work_are_empty_and_leave_the_pool(layout):
    """No rows, or rows whose chunks are all empty, in every layout: an empty out, nothing written (the values of
    the rows are still checked on the host)."""
    Hq, Hkv, D = 4, 2, 16
    pool_k, pool_v = torch.randn(3, 16, Hkv, D), torch.randn(3, 16, Hkv, D)
    k0, v0 = pool_k.clone(), pool_v.clone()
    rows = 0 if "no-rows" in layout else 2
    table = torch.zeros(rows, 2, dtype=torch.int32)
    pre = torch.full((rows,), 5, dtype=torch.int32)
    kw = dict(block_table=table)
    if layout.startswith("varlen"):
        q, kn = torch.zeros(0, Hq, D), torch.zeros(0, Hkv, D)
        kw["cu_seqlens"] = torch.zeros(rows + 1, dtype=torch.int32)
    elif layout.startswith("equal"):
        q, kn = torch.zeros(rows, 0, Hq, D), torch.zeros(rows, 0, Hkv, D)
    else:  # a dense cache of no rows, the rows packed
        q, kn = torch.zeros(0, Hq, D), torch.zeros(0, Hkv, D)
        pool_k, pool_v, k0, v0 = pool_k[:0], pool_v[:0], pool_k[:0], pool_v[:0]
        kw = dict(cu_seqlens=torch.zeros(1, dtype=torch.int32))
    out = chunk_attention(q, kn, kn, pool_k, pool_v, pre, **kw)
    assert out.shape == q.shape and torch.equal(pool_k, k0) and torch.equal(pool_v, v0)
    ref = chunk_attention_ref(q, kn, kn, pool_k.clone(), pool_v.clone(), pre, **kw)
    assert ref.shape == q.shape
    if rows:  # a prefix past a row's table is refused, even with nothing to compute
        with pytest.raises(ValueError, match="does not fit its block table"):
            chunk_attention(q, kn, kn, pool_k, pool_v, torch.full((rows,), 40, dtype=torch.int32), **kw)


def _bad(**over):
    lens, prefixes, page = [4, 6], [3, 20], 16
    q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 4, 2, 32, page, torch.float32, seed=1)
    args = dict(q=q, k_new=kn, v_new=vn, k_cache=kc, v_cache=vc, start_pos=torch.tensor(prefixes, dtype=torch.int32),
                block_table=table, cu_seqlens=cu)
    args.update(over)
    before = kc.clone()
    return args, kc, before


@pytest.mark.parametrize("over,match", [
    (dict(cu_seqlens=torch.tensor([0, 6, 4], dtype=torch.int32)), "cu_seqlens must rise from 0 to N = 10"),
    (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)), r"cu_seqlens must be .* \[B \+ 1 = 3\]"),
    (dict(start_pos=torch.tensor([3, 60], dtype=torch.int32)), "row 1: prefix 60 \\+ chunk 6 does not fit"),
    (dict(start_pos=-1), "row 0: prefix -1"),
    (dict(block_table=torch.tensor([[0, 1, 2], [3, 99, 5]], dtype=torch.int32)), "row 1's block table addresses"),
    (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), "block_table must be int32"),
    (dict(v_new=torch.zeros(10, 1, 32)), "k_new/v_new must be"),
    (dict(max_chunk="4"), "max_chunk"),
])
def test_bad_paged_input_is_refused_before_the_launch(over, match):
    args, kc, before = _bad(**over)
    with pytest.raises((ValueError, TypeError), match=match):
        chunk_attention(**args)
    assert torch.equal(kc, before)  # nothing written


@pytest.mark.parametrize("over,match", [
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, tma=True)), "config tma is not supported"),
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, longest_first=True)), "longest_first is the"),
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, no_prefix=True)), "no_prefix is the"),
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, ws=True)), "config ws is the dense kernel's"),
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, page_ahead=1)), "page_ahead must be True or"),
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, pack_gqa=True)), "BLOCK_M must be at least"),
    (dict(config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, num_splits=0)), "num_splits"),
    (dict(config=dict(BLOCK_M=16)), "config must give"),
    (dict(max_chunk=5), "max_chunk 5 is shorter than the longest row's chunk \\(6\\)"),
    (dict(max_prefix=-1), "max_prefix"),
])
def test_bad_paged_tuning_is_refused_before_the_launch(over, match):
    args, kc, before = _bad(**over)
    if "config" in over and over["config"].get("pack_gqa"):  # 32 query heads per KV head: 32 rows at least
        args.update(q=torch.zeros(10, 64, 32))
    with pytest.raises(ValueError, match=match):
        chunk_attention(**args)
    assert torch.equal(kc, before)


@pytest.mark.gpu
def test_paged_gpu_bad_page_is_asserted(cuda):
    """On a GPU the launcher checks rows and pages on the device (one launch) and asserts asynchronously: a good call
    syncs cleanly, a block table entry in use outside the pool raises at the next sync. A device-side assert leaves
    the CUDA context unusable, so this runs in a process of its own."""
    from conftest import run_python_apart
    res = run_python_apart("""
        import torch
        from kernels import chunk_attention
        q = torch.randn(2, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        kc = torch.zeros(6, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        table = torch.tensor([[0, 1], [2, 3]], device="cuda", dtype=torch.int32)
        chunk_attention(q, k, k, kc, vc, 4, block_table=table)
        torch.cuda.synchronize()
        print("good call ok", flush=True)
        table[1, 1] = 6  # row 1's positions 16..19 live in page 6 of a pool of 6
        chunk_attention(q, k, k, kc, vc, 12, block_table=table)
        torch.cuda.synchronize()
        print("no error", flush=True)
    """)
    assert "good call ok" in res.stdout, res.stdout + res.stderr[-2000:]
    assert res.returncode != 0 and "no error" not in res.stdout
    assert "not a page of the cache" in res.stderr or "device-side assert" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("kw", [dict(max_prefix=4), dict(check=False)])
def test_max_prefix_and_check_go_with_the_paged_path(kw):
    q = torch.zeros(1, 2, 2, 16)
    with pytest.raises(ValueError, match="max_chunk, max_prefix and check go with cu_seqlens or block_table"):
        chunk_attention(q, q, q, torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16), 0, **kw)


def test_a_paged_call_that_skips_the_device_check_still_checks_cpu_rows_and_gives_the_same_result():
    """check=False skips only the GPU's device-side check: a CPU call still refuses a row past its table, and a
    good call's outputs are those of the checked call."""
    lens, prefixes = [5, 9], [20, 3]
    outs = []
    for check in (True, False):
        q, kn, vn, kc, vc, table, cu = make_case(lens, prefixes, 4, 2, 16, 16, torch.float32, seed=5)
        outs.append(chunk_attention(q, kn, vn, kc, vc, torch.tensor(prefixes, dtype=torch.int32), block_table=table,
                                    cu_seqlens=cu, check=check))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="does not fit its block table"):
        chunk_attention(q, kn, vn, kc, vc, torch.tensor([200, 3], dtype=torch.int32), block_table=table,
                        cu_seqlens=cu, check=False)
    with pytest.raises(TypeError, match="check must be True or False, got 0"):
        chunk_attention(q, kn, vn, kc, vc, torch.tensor(prefixes, dtype=torch.int32), block_table=table,
                        cu_seqlens=cu, check=0)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 256])
def test_paged_varlen_gpu_bf16(cuda, page):
    run_paged_case([2048, 1, 300, 17], [16384, 9000, 0, 4097], 32, 8, 128, page, torch.bfloat16, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 256])
def test_paged_varlen_gpu_bf16_sliding_window(cuda, page):
    run_paged_case([2048, 1, 300, 17], [16384, 9000, 0, 4097], 32, 8, 128, page, torch.bfloat16, 2e-2, window=4096)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 256])
def test_paged_decode_batch_gpu_bf16_packs_and_splits(cuda, page):
    """A decode step of 4 rows over long prefixes, 4 query heads per KV head: the launcher packs each group's heads
    into one tile and, with 32 programs on a GPU of many more SMs, splits the prefixes; compiled kernel and merge
    against float64."""
    from kernels.paged_attention import paged_launch_plan
    plan = paged_launch_plan(cuda, torch.bfloat16, 4, 32, 8, 128, 1, 16384)
    assert plan["pack"] == 4 and plan["splits"] > 1
    run_paged_case([1, 1, 1, 1], [16384, 9000, 300, 4097], 32, 8, 128, page, torch.bfloat16, 2e-2)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_device_checks_flag_rows_past_their_table_and_pages_outside_the_pool(cu_dtype):
    """The GPU launcher's device-side check (one launch, read by async asserts), run here under the interpreter:
    flag 0 drops when a row's prefix + chunk passes its block table, flag 1 when a page it uses is not in the pool;
    entries past a row's last used page are not looked at."""
    from kernels.paged_attention import device_checks

    def flags(table, lens, prefixes, num_pages=10, page=4):
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=cu_dtype)
        return device_checks(torch.tensor(table, dtype=torch.int32), cu, torch.tensor(prefixes, dtype=torch.int32),
                             page, num_pages).tolist()
    table = [[3, 7, -1, 99], [0, 9, 5, 2]]
    assert flags(table, [3, 5], [4, 10]) == [1, 1]  # row 0 uses pages 3, 7 (positions < 7); row 1 all four
    assert flags(table, [3, 7], [4, 10]) == [0, 1]  # row 1: 17 positions in a table of 16
    assert flags(table, [3, 1], [-1, 0]) == [0, 1]  # a negative prefix
    assert flags(table, [5, 1], [4, 0]) == [1, 0]   # row 0 now reaches entry 2 (-1)
    assert flags(table, [1, 1], [12, 0]) == [1, 0]  # row 0 reaches entry 3 (99: past a pool of 10)
    assert flags(table, [1, 1], [12, 0], num_pages=100) == [1, 0]  # still -1 at entry 2
    assert flags([[0] * 300], [1], [1000], num_pages=1, page=4) == [1, 1]  # several check blocks, all good
    assert flags([[0] * 299 + [1]], [1], [1199], num_pages=1, page=4) == [1, 0]  # the last entry of the last block
