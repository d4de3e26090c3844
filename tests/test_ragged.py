"""Ragged batches (pipeline.ragged): prompts of different lengths packed step by step over paged KV caches, every
row checked against the same prompt run alone and against Hugging Face, in every mode and link, with TP and decode."""
from __future__ import annotations

import re

import pytest
import torch

from pipeline import load_model, run_prefill
from pipeline.config import get_preset
from pipeline.ragged import PagePool, decode_step, pages_needed, ragged_plan
from tests.conftest import make_hf_checkpoint

TINY = get_preset("tiny")
LENGTHS = (5, 23, 1, 40)


def rows_of(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def test_a_ragged_plan_steps_every_row_through_its_own_chunks():
    steps = ragged_plan([5, 12, 1], 4)
    assert [s.starts for s in steps] == [(0, 0, 0), (4, 4, 1), (5, 8, 1)]
    assert [s.lengths for s in steps] == [(4, 4, 1), (1, 4, 0), (0, 4, 0)]
    assert [s.ends for s in steps] == [(2,), (0,), (1,)]
    assert [s.tokens for s in steps] == [9, 5, 4]
    assert steps[1].offsets == [0, 1, 5, 5] and steps[1].last_index(1) == 4 and steps[1].positions() == [4, 4, 5, 6, 7]
    whole = ragged_plan([5, 12, 1])
    assert len(whole) == 1 and whole[0].lengths == (5, 12, 1) and whole[0].ends == (0, 1, 2)
    assert decode_step([5, 12]).starts == (5, 12) and decode_step([5, 12]).lengths == (1, 1)


def test_a_token_budget_packs_each_step_full_from_the_rows_in_order():
    """A serving scheduler's budget: each step takes up to `token_budget` tokens, first come first served; a row
    behind waits (empty chunks) and a per-row cap (chunk_size) leaves the rest of the budget to the next rows."""
    steps = ragged_plan([5, 12, 1], token_budget=8)
    assert [s.lengths for s in steps] == [(5, 3, 0), (0, 8, 0), (0, 1, 1)]
    assert [s.starts for s in steps] == [(0, 0, 0), (5, 3, 0), (5, 11, 0)]
    assert [s.ends for s in steps] == [(0,), (), (1, 2)] and [s.tokens for s in steps] == [8, 8, 2]
    capped = ragged_plan([5, 12, 1], chunk_size=4, token_budget=10)
    assert [s.lengths for s in capped] == [(4, 4, 1), (1, 4, 0), (0, 4, 0)]  # the cap binds before the budget
    assert [s.lengths for s in ragged_plan([3, 3], token_budget=100)] == [(3, 3)]
    for lengths, budget in (((5, 23, 1, 40), 7), ((300, 1000, 2048), 384), ((1,), 1)):
        plan = ragged_plan(lengths, token_budget=budget)
        assert all(s.tokens == budget for s in plan[:-1]) and 0 < plan[-1].tokens <= budget
        assert sorted(b for s in plan for b in s.ends) == list(range(len(lengths)))
        for b, n in enumerate(lengths):  # every row's tokens once, in order
            assert sum(s.lengths[b] for s in plan) == n
            assert all(s.starts[b] == sum(t.lengths[b] for t in plan[:k]) for k, s in enumerate(plan))
    with pytest.raises(ValueError, match="token_budget"):
        ragged_plan([4], token_budget=0)


@pytest.mark.parametrize("mode", ["chunked", "overlapped"])
@pytest.mark.parametrize("stages,tp,tp_comm", [(2, 1, "serial"), (2, 2, "overlap"), (2, 2, "sequence")])
def test_a_ragged_batch_under_a_token_budget_equals_each_prompt_alone(alone, mode, stages, tp, tp_comm):
    """Rows that wait for a later step (empty chunks before they start) and steps that start a row mid-budget."""
    rows, ref = alone
    res = run_prefill("tiny", rows, mode=mode, stages=stages, tp=tp, tp_comm=tp_comm, token_budget=9,
                      return_cache=True, page_size=4)
    _check_rows(res, rows, ref)
    assert res.chunks == [9] * 7 + [6]  # 69 tokens
    assert res.metrics["bytes_per_boundary"] == [sum(LENGTHS) * TINY.hidden_size * 4] * (stages - 1)


def test_a_step_splits_into_two_that_continue_each_other():
    st = ragged_plan([5, 12, 1, 9], 7)[0]  # lengths (5, 7, 1, 7), packed offsets 0, 5, 12, 13, 20
    a, b = st.split(8)  # cuts row 1 after 3 of its 7 tokens
    assert a.lengths == (5, 3, 0, 0) and b.lengths == (0, 4, 1, 7)
    assert a.starts == (0, 0, 0, 0) and b.starts == (5, 3, 0, 0)
    assert a.positions() + b.positions() == st.positions() and a.ends == b.ends == ()
    for m in range(1, st.tokens):  # every cut: the halves hold the step's tokens, in order
        a, b = st.split(m)
        assert (a.tokens, b.tokens) == (m, st.tokens - m) and a.positions() + b.positions() == st.positions()
        assert all(pa + na == pb for pa, na, pb, nb in zip(a.starts, a.lengths, b.starts, b.lengths) if nb)
    for m in (0, st.tokens):
        with pytest.raises(ValueError, match=f"a step of 20 tokens splits at 1..19, got {m}"):
            st.split(m)


def test_a_page_pool_hands_out_pages_as_rows_grow_and_says_when_it_runs_out():
    pool = PagePool.create(2, pages_needed([5, 17], 8), 8, 1, 4, torch.float32, "cpu")
    assert pool.num_pages == 1 + 3  # (5+1)/8 -> 1, (17+1)/8 -> 3
    pool.reset(2)
    pool.reserve(0, 5)
    pool.reserve(1, 9)
    pool.reserve(1, 9)  # nothing more needed
    assert pool.rows == [[0], [1, 2]]
    assert pool.block_table("cpu").tolist() == [[0, -1], [1, 2]]
    pool.reserve(1, 18)
    with pytest.raises(RuntimeError, match="page pool exhausted: row 0 needs 1 more pages of 8, 0 of 4 are free"):
        pool.reserve(0, 9)


def test_a_page_pool_frees_finished_rows_and_shares_prefixes_by_count():
    pool = PagePool.create(1, 8, 4, 1, 2, torch.float32, "cpu")
    pool.reset(3)
    pool.reserve(0, 10)  # pages 0, 1, 2: positions 8, 9 in page 2
    pool.k[0, 2, :2] = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    pool.share_prefix(1, 0, 10)  # full pages 0, 1 shared; page 2's two positions copied into a page of its own
    assert pool.rows[1][:2] == [0, 1] and pool.rows[1][2] not in pool.rows[0]
    assert torch.equal(pool.k[0, pool.rows[1][2], :2], pool.k[0, 2, :2])
    pool.share_prefix(2, 0, 8)  # a prefix ending on a page boundary: nothing copied
    assert pool.rows[2] == [0, 1] and pool.refs[:4] == [3, 3, 1, 1]
    free_before = len(pool.free)
    pool.free_row(0)  # pages 0 and 1 stay (rows 1 and 2 hold them), page 2 is free again
    assert pool.rows[0] == [] and len(pool.free) == free_before + 1 and pool.refs[:3] == [2, 2, 0]
    pool.free_row(1)
    pool.free_row(2)
    assert sorted(pool.free) == list(range(8)) and not any(pool.refs)
    pool.reserve(0, 4)
    for bad, match in (((0, 2, 4), "already holds pages"), ((1, 0, 5), r"holds 4 positions; .* got 5"),
                       ((1, 3, 0), r"row must be an int in \[0, 3\), got 3")):
        with pytest.raises(ValueError, match=match):
            pool.share_prefix(*bad)


@pytest.mark.parametrize("prefix_len", [13, 16, 0])
def test_a_row_started_from_a_shared_prefix_equals_the_prompt_run_alone(prefix_len):
    """Prefix caching: row 1's prompt starts with row 0's first `prefix_len` tokens; after row 0 ran, row 1 shares
    those positions' pages (13: the partial page copied) and computes only its own suffix. Its logits equal its
    whole prompt run alone, and row 0's cache is untouched by row 1's writes."""
    model = load_model("tiny")
    g = torch.Generator().manual_seed(7)
    common = torch.randint(0, 256, (prefix_len,), generator=g)
    a = torch.cat([common, torch.randint(0, 256, (9,), generator=g)])
    b = torch.cat([common, torch.randint(0, 256, (11,), generator=g)])
    pool = model.new_pool([len(a), len(b)], 8)
    pool.reset(2)
    from pipeline.ragged import RaggedStep
    first = model.forward_packed(a[None], RaggedStep((0, 0), (len(a), 0), (0,)), pool)
    a_cache = pool.row_cache(0, len(a))
    pool.share_prefix(1, 0, prefix_len)
    suffix = b[prefix_len:]
    second = model.forward_packed(suffix[None], RaggedStep((len(a), prefix_len), (0, len(suffix)), (1,)), pool)
    assert (first[0] - model(a[None])[0, -1]).abs().max().item() <= 1e-5
    assert (second[0] - model(b[None])[0, -1]).abs().max().item() <= 1e-5
    assert all(torch.equal(x, y) for x, y in zip(a_cache, pool.row_cache(0, len(a))))
    b_cache = pool.row_cache(1, len(b))
    ref = run_prefill("tiny", b[None], mode="unchunked", return_cache=True).caches[0]
    assert (b_cache[0][:, 0] - ref[0][:, 0]).abs().max().item() <= 1e-5


# one-token steps with the torch ops only: the interpreter is slow
@pytest.mark.parametrize("ops,chunk_size", [("torch", None), ("torch", 7), ("torch", 1), ("triton", None),
                                            ("triton", 7)])
def test_the_model_on_packed_rows_equals_each_row_alone(ops, chunk_size):
    model, ref = load_model("tiny", ops=ops), load_model("tiny")
    rows = rows_of(LENGTHS[:3])
    pool = model.new_pool([len(r) for r in rows], 16)
    pool.reset(len(rows))
    got = {}
    for st in ragged_plan([len(r) for r in rows], chunk_size):
        x = torch.cat([r[p:p + n] for r, p, n in zip(rows, st.starts, st.lengths)])[None]
        y = model.forward_packed(x, st, pool)
        assert y.shape == (len(st.ends), TINY.vocab_size)
        got.update({b: y[i] for i, b in enumerate(st.ends)})
    for b, r in enumerate(rows):
        assert (got[b] - ref(r[None])[0, -1]).abs().max().item() <= 1e-5, b


def test_the_model_checks_a_steps_rows_and_pages_at_its_first_layer_only():
    """Every layer of a step attends with the same block table, rows and pool size: the kernel's device-side check
    (`check`) runs at the part's first layer and is skipped at the others, in every step."""
    import dataclasses

    from pipeline.ops import TORCH_OPS
    seen = []

    def attention(*args, check=True, **kw):
        seen.append(check)
        return TORCH_OPS.attention(*args, **kw)
    model = load_model("tiny", ops=dataclasses.replace(TORCH_OPS, name="spy", attention=attention))
    rows = rows_of(LENGTHS[:3])
    pool = model.new_pool([len(r) for r in rows], 16)
    pool.reset(len(rows))
    steps = ragged_plan([len(r) for r in rows], 7)
    for st in steps:
        model.forward_packed(torch.cat([r[p:p + n] for r, p, n in zip(rows, st.starts, st.lengths)])[None], st, pool)
    layers = TINY.num_layers
    assert seen == ([True] + [False] * (layers - 1)) * len(steps) and layers > 1


def _check_rows(res, rows, alone, tol=1e-5):
    assert res.logits.shape == (len(rows), TINY.vocab_size)
    for b, a in enumerate(alone):
        assert (res.logits[b] - a.logits[0]).abs().max().item() <= tol, f"row {b} logits"
        assert (res.decode_logits[b] - a.decode_logits[0]).abs().max().item() <= tol, f"row {b} decode"
        k = torch.cat([k for k, _ in res.row_caches[b]], 0)
        v = torch.cat([v for _, v in res.row_caches[b]], 0)
        assert k.shape == a.caches[0][0].shape
        assert (k - a.caches[0][0]).abs().max().item() <= tol and (v - a.caches[0][1]).abs().max().item() <= tol


@pytest.fixture(scope="module")
def alone():
    rows = rows_of(LENGTHS)
    return rows, [run_prefill("tiny", r[None], mode="unchunked", return_cache=True) for r in rows]


@pytest.mark.parametrize("mode", ["unchunked", "naive", "chunked", "overlapped"])
@pytest.mark.parametrize("stages,tp,page_size", [(2, 1, 16), (3, 1, 1), (1, 2, 64), (2, 2, 16)])
def test_a_ragged_batch_in_process_equals_each_prompt_alone(alone, mode, stages, tp, page_size):
    rows, ref = alone
    res = run_prefill("tiny", rows, mode=mode, stages=stages, tp=tp, chunk_size=7, return_cache=True,
                      page_size=page_size)
    _check_rows(res, rows, ref)
    total, H = sum(LENGTHS), TINY.hidden_size
    if mode != "unchunked":
        assert res.metrics["bytes_per_boundary"] == [total * H * 4] * (stages - 1)  # no padding on the wire
        assert res.metrics["decode_bytes_per_boundary"] == [len(rows) * H * 4] * (stages - 1)
    expected_steps = [sum(LENGTHS)] if mode in ("unchunked", "naive") else [s.tokens for s in ragged_plan(LENGTHS, 7)]
    assert res.chunks == expected_steps


@pytest.mark.parametrize("stages,tp", [(2, 1), (1, 2)])
def test_a_ragged_batch_over_gloo_equals_each_prompt_alone(alone, stages, tp):
    """Gloo processes started once (their start-up is the cost) for a job per way TP ranks combine their sums."""
    from pipeline import Job, PipelineSpec, run_jobs
    rows, ref = alone
    comms = ["serial", "overlap", "sequence"] if tp > 1 else ["serial"]
    jobs = [Job.of_rows("overlapped", rows, return_cache=True, chunk_size=9, tp_comm=comm) for comm in comms]
    results = run_jobs(PipelineSpec(source="tiny", stages=stages, tp=tp, link="gloo", threads=1), jobs)
    calls = {}
    for comm, [res] in zip(comms, results, strict=True):
        _check_rows(res, rows, ref)
        calls[comm] = res.metrics.get("allreduce_calls_per_stage")
    if tp > 1:  # each job ran its own way: ISO halves and sequence parallelism make more collective calls than serial
        assert calls["serial"] < calls["overlap"] and calls["serial"] < calls["sequence"]


@pytest.mark.parametrize("tp_comm", ["overlap", "sequence"])
@pytest.mark.parametrize("stages,tp,chunk_size", [(1, 2, 7), (2, 2, 4), (1, 4, 13)])
def test_a_ragged_batch_with_overlapped_or_sequence_parallel_reduces_equals_each_prompt_alone(
        alone, tp_comm, stages, tp, chunk_size):
    """ISO halves cut through rows (the cut row's second part attends to its first over the pages), sequence
    parallelism shards and pads the packed tokens; steps of 1 token (fewer than T: a plain all-reduce) at the end."""
    rows, ref = alone
    res = run_prefill("tiny", rows, mode="overlapped", stages=stages, tp=tp, chunk_size=chunk_size, tp_comm=tp_comm,
                      return_cache=True, page_size=8)
    _check_rows(res, rows, ref)
    m, layers = res.metrics, 4 // stages
    plan = ragged_plan(LENGTHS, chunk_size)
    steps = [s.tokens for s in plan]
    assert m["allreduce_bytes_per_stage"] == [2 * layers * sum(LENGTHS) * TINY.hidden_size * 4] * stages
    assert steps[-1] == 1 or tp == 2  # (1, 4, 13) ends in a one-token step
    if tp_comm == "overlap":  # every step of 2+ tokens: both halves all-reduced apart
        calls = [2 * layers * sum(1 + (n >= 2) for n in steps)] * stages
    else:  # per layer 2 reduce-scatters + 2 all-gathers, + 1 closing all-gather per step (on the last stage only in
        # steps where some row ends: of those rows' last tokens alone); steps under T tokens: plain all-reduces
        calls = [sum(4 * layers + (s < stages - 1 or bool(st.ends)) if st.tokens >= tp else 2 * layers
                     for st in plan) for s in range(stages)]
        assert any(st.tokens >= tp and not st.ends for st in plan)  # such a step is here: its gather is skipped
        row = TINY.hidden_size * 4
        last = sum(4 * layers * (tp - 1) * -(-st.tokens // tp) * row + (tp - 1) * len(st.ends) * row
                   if st.tokens >= tp else 2 * (tp - 1) * 2 * layers * st.tokens * row // tp for st in plan)
        assert m["allreduce_wire_bytes_per_stage"][-1] == last
    assert m["allreduce_calls_per_stage"] == calls


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "phi3"])
def test_a_ragged_batch_of_a_hugging_face_checkpoint_matches_transformers(tmp_path, model_type):
    """Each row at its own positions (the packed step's per-token RoPE positions): with Phi-3, half of each head
    rotated."""
    hf = make_hf_checkpoint(tmp_path, model_type, **({"partial_rotary_factor": 0.5} if model_type == "phi3" else {}))
    rows = rows_of([3, 30, 17], seed=4, vocab=128)
    res = run_prefill(str(tmp_path), rows, mode="overlapped", stages=2, chunk_size=8)
    with torch.no_grad():
        for b, r in enumerate(rows):
            assert (res.logits[b] - hf(r[None]).logits[0, -1]).abs().max().item() <= 1e-4, b
            nxt = torch.cat([r, res.logits[b].argmax()[None]])
            assert (res.decode_logits[b] - hf(nxt[None]).logits[0, -1]).abs().max().item() <= 1e-4, b


def test_a_ragged_batch_with_compressed_boundaries_rounds_at_the_boundary_only():
    rows = rows_of([6, 11], seed=2)
    res = run_prefill("tiny", rows, mode="chunked", stages=2, chunk_size=4, compress="fp8")
    assert res.metrics["bytes_per_boundary"] == [17 * (TINY.hidden_size + 4)]
    plain = run_prefill("tiny", rows, mode="chunked", stages=2, chunk_size=4)
    assert 0 < (res.logits - plain.logits).abs().max().item() < 0.5


@pytest.mark.parametrize("rows,kw,match", [
    ([], {}, "non-empty list"),
    ([torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)], {}, "row 1 of a ragged batch"),
    ([torch.zeros(1, 3, dtype=torch.long)], {}, "row 0 of a ragged batch must be a non-empty 1-D"),
    ([torch.tensor([1, 999])], {}, r"row 0: token ids must be in \[0, 256\)"),
    ([torch.zeros(1024, dtype=torch.long)], {}, r"row 0 has 1024 tokens \(\+1 decode\)"),
    ([torch.zeros(4, dtype=torch.long)], {"chunks": [2, 2]}, "takes chunk_size"),
    ([torch.zeros(4, dtype=torch.long)], {"chunk_size": 0}, "chunk_size"),
    ([torch.zeros(4, dtype=torch.long)], {"page_size": 0}, "page_size"),
    ([torch.zeros(4, dtype=torch.long)], {"page_size": 1025}, r"page_size=1025 is more positions than the model's "
                                                            r"context \(max_seq_len 1024\)"),
    ([torch.zeros(4, dtype=torch.long)], {"token_budget": 0}, "token_budget"),
    (torch.zeros(1, 4, dtype=torch.long), {"token_budget": 8}, "token_budget=8 packs the steps of a ragged batch"),
])
def test_bad_ragged_input_is_refused_before_any_work(rows, kw, match):
    with pytest.raises(ValueError, match=match):
        run_prefill("tiny", rows, **kw)


def test_ragged_errors_are_one_line():
    with pytest.raises(ValueError) as e:
        run_prefill("tiny", [torch.tensor([1, 2]), torch.tensor([1.0])])
    assert len(str(e.value).splitlines()) == 1 and re.search("row 1", str(e.value))


@pytest.mark.gpu
@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_a_ragged_batch_on_gpu_streams_equals_each_prompt_alone(cuda, ops):
    """Stages on CUDA streams, the link emulated, the paged kernel compiled (triton) or its torch reference."""
    rows = rows_of(LENGTHS)
    ref = [run_prefill("tiny", r[None], mode="unchunked", device="cuda", return_cache=True) for r in rows]
    res = run_prefill("tiny", rows, mode="overlapped", stages=2, chunk_size=7, device="cuda", ops=ops,
                      bandwidth_gbps=1e-3, return_cache=True)
    _check_rows(res, rows, ref, tol=1e-4)
    if ops == "triton":  # the block table and row metadata go up without a host sync (the torch reference reads them)
        assert res.metrics["host_syncs_per_stage"] == [0, 0]


def test_the_memory_estimate_counts_whole_kv_pages():
    """A ragged batch's KV cache is its pool: whole pages per row (and the decode token), not the tokens alone."""
    from pipeline import Job, PipelineSpec
    from pipeline.launch import memory_needed
    cfg = get_preset("tiny")
    rows = [torch.zeros(3, dtype=torch.long), torch.zeros(40, dtype=torch.long)]

    def need(page_size):
        job = Job.of_rows("chunked", rows, chunk_size=16)
        return memory_needed(PipelineSpec(source="tiny", stages=2, page_size=page_size), cfg, job)
    kv_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, float32, every layer
    # 1-token pages hold exactly the 3 + 40 tokens and 2 decode tokens; pages of 512 hold 2 x 512 positions; the
    # stages' pools and the unchunked baseline's count once each
    assert need(512) - need(1) == 2 * kv_position * (pages_needed([3, 40], 512) * 512 - pages_needed([3, 40], 1))
