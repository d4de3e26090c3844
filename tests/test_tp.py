"""Tensor parallelism inside stages (pipeline.tp): shards that sum to the whole model, TP x PP in every mode and
link, and the all-reduce accounting (the reduce traffic of prefill is L times one decode token's)."""
from __future__ import annotations

import math
import re
import threading

import numpy as np
import pytest
import torch

from pipeline import run_prefill
from pipeline.config import get_preset
from pipeline.model import load_model
from pipeline.tp import LocalGroup, LocalReducer, check_tp, kv_heads_of
from tests.conftest import make_hf_checkpoint

TINY = get_preset("tiny")  # 4 layers, H 64, 4 query / 2 KV heads, I 160


def run_shards(source, tp, tokens, chunk_size=None, **kw):
    """Every TP rank's shard of the whole model as a thread, all-reducing through a LocalGroup; their logits."""
    group, outs, errors = LocalGroup(tp, timeout_s=30), [None] * tp, []

    def rank(t):
        try:
            m = load_model(source, tp_rank=t, tp=tp, **kw)
            m.reduce = LocalReducer(group, t)
            outs[t] = m.prefill(tokens, chunk_size)[0]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            group.abort()
    threads = [threading.Thread(target=rank, args=(t,)) for t in range(tp)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return outs


@pytest.mark.parametrize("tp,kv,biases", [(2, 2, False), (4, 2, True), (4, 1, False), (2, 1, True), (4, 4, True)],
                         ids=["kv-split", "kv-split-4", "kv-replicated-4", "kv-replicated-2", "mha"])
def test_shards_sum_to_the_whole_model(tp, kv, biases):
    cfg = TINY.replace(num_kv_heads=kv, qkv_bias=biases, o_bias=biases, mlp_bias=biases)
    tokens = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    whole = load_model(cfg, seed=3).prefill(tokens, 10)[0]
    outs = run_shards(cfg, tp, tokens, 10, seed=3)
    assert all(torch.equal(outs[0], o) for o in outs)  # the same sum on every rank: replicated outputs agree
    assert (outs[0] - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type,gqa", [("llama", True), ("qwen2", True), ("llama", False), ("qwen3", True),
                                            ("phi3", True), ("granite", False), ("smollm3", True),
                                            ("mistral", True)])
def test_shards_of_a_hugging_face_checkpoint_match_transformers(tmp_path, model_type, gqa):
    extra = dict(attention_bias=True, mlp_bias=True) if model_type in ("llama", "granite") and not gqa else {}
    if model_type == "granite":
        extra |= dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.03125)
    hf = make_hf_checkpoint(tmp_path, model_type, gqa=gqa, **extra)
    tokens = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    for out in run_shards(tmp_path, 2, tokens, 8):
        assert (out - expected).abs().max().item() <= 1e-4


def test_kv_heads_split_or_replicate():
    assert [kv_heads_of(TINY, t, 2) for t in range(2)] == [range(0, 1), range(1, 2)]
    assert [kv_heads_of(TINY, t, 4) for t in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]


@pytest.mark.parametrize("tp,match", [(3, "does not divide the 4 query heads"), (0, "positive integer"),
                                      (True, "positive integer")])
def test_impossible_splits_are_refused(tp, match):
    with pytest.raises(ValueError, match=match):
        check_tp(TINY, tp)
    if tp == 3:
        with pytest.raises(ValueError, match="does not divide"):
            run_prefill(TINY, torch.zeros(1, 8, dtype=torch.long), stages=1, tp=3)


def test_kv_heads_that_neither_split_nor_replicate_evenly_are_refused():
    cfg = TINY.replace(num_heads=12, num_kv_heads=4, intermediate_size=192)  # 4 KV heads over 3 ranks
    with pytest.raises(ValueError, match="KV heads must split evenly"):
        check_tp(cfg, 3)
    cfg = TINY.replace(num_heads=6, num_kv_heads=3, head_dim=16, intermediate_size=192)  # 3 KV heads over 2 ranks
    with pytest.raises(ValueError, match="tp=2 does not divide the 6|KV heads must split"):
        check_tp(cfg, 2)


def _expected_allreduce(layers, B, L, H=64, elem=4):
    return 2 * layers * B * L * H * elem  # two all-reduces of [B, L, H] per layer


@pytest.mark.parametrize("stages,tp", [(2, 2), (1, 4), (4, 1)])
@pytest.mark.parametrize("mode", ["naive", "chunked", "overlapped"])
def test_tp_x_pp_in_process_equals_unchunked_and_counts_the_reduce_traffic(stages, tp, mode):
    cfg = TINY.replace(num_kv_heads=1, qkv_bias=True, o_bias=True)
    B, L = 2, 41
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(2))
    ref = run_prefill(cfg, tokens, mode="unchunked", return_cache=True)
    res = run_prefill(cfg, tokens, mode=mode, stages=stages, tp=tp, chunk_size=10, return_cache=True)
    assert (res.logits - ref.logits).abs().max().item() <= 1e-5
    assert (res.decode_logits - ref.decode_logits).abs().max().item() <= 1e-5
    k = torch.cat([c[0] for c in res.caches], 0)  # every KV head once, stages' layers in order
    assert k.shape == ref.caches[0][0].shape and (k - ref.caches[0][0]).abs().max().item() <= 1e-5
    m = res.metrics
    layers = 4 // stages
    if tp == 1:
        assert "allreduce_bytes_per_stage" not in m
        return
    assert m["tp"] == tp
    assert m["allreduce_bytes_per_stage"] == [_expected_allreduce(layers, B, L)] * stages
    assert m["decode_allreduce_bytes_per_stage"] == [_expected_allreduce(layers, B, 1)] * stages
    assert m["allreduce_prefill_over_decode"] == [L] * stages  # prefill's reduce traffic is L times decode's
    assert m["allreduce_wire_bytes_per_stage"] == [2 * (tp - 1) * b // tp for b in m["allreduce_bytes_per_stage"]]
    chunks = 1 if mode == "naive" else 5
    assert m["allreduce_calls_per_stage"] == [2 * layers * chunks] * stages
    assert all(s >= 0 for s in m["allreduce_s_per_stage"])


def _assert_tp_equals_unchunked(res, ref, stages: int, crossing: str = "matching"):
    """Logits, decode logits and the KV cache (every stage's layers) of a TP run against the unchunked model's; the
    all-reduce payload per stage (two [B, L, H] a layer) and its ratio to one decode token's (L); boundary bytes as
    matching TP ranks send them (a sharded crossing's are checked where it is run)."""
    B, L = ref.caches[0][0].shape[1:3]
    assert (res.logits - ref.logits).abs().max().item() <= 1e-5
    assert (res.decode_logits - ref.decode_logits).abs().max().item() <= 1e-5
    k = torch.cat([c[0] for c in res.caches], 0)
    assert (k - ref.caches[0][0]).abs().max().item() <= 1e-5
    assert res.metrics["allreduce_bytes_per_stage"] == [_expected_allreduce(4 // stages, B, L)] * stages
    assert res.metrics["allreduce_prefill_over_decode"] == [L] * stages
    if crossing != "sharded":
        assert res.metrics["bytes_per_boundary"] == [B * L * 64 * 4] * (stages - 1)


def _gloo_tp_runs(stages: int, cases: list[tuple]):
    """S x 2 gloo processes started once for every case (process start-up is the cost): each case (mode, tokens,
    chunks, tp_comm, tp_boundary) a job; returns each case's result."""
    from pipeline import Job, PipelineSpec, run_jobs
    jobs = [Job(mode, tokens, chunks, return_cache=True, tp_comm=tp_comm, tp_boundary=crossing)
            for mode, tokens, chunks, tp_comm, crossing in cases]
    spec = PipelineSpec(source=TINY.replace(num_kv_heads=1), stages=stages, tp=2, link="gloo", threads=1)
    return [res for [res] in run_jobs(spec, jobs)]


def _tokens(B, L, seed):
    return torch.randint(0, TINY.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))


def test_tp_over_two_gloo_processes_equals_unchunked_with_every_reduce():
    """T = 2 gloo processes, one stage: serial all-reduces (chunked), real asynchronous all-reduces (gloo's worker
    threads) under ISO halves, and torch's reduce-scatter / all-gather (sequence parallelism) (overlapped)."""
    cfg = TINY.replace(num_kv_heads=1)
    one, two = _tokens(1, 33, 4), _tokens(2, 29, 6)
    refs = {id(t): run_prefill(cfg, t, mode="unchunked", return_cache=True) for t in (one, two)}
    cases = [("chunked", one, [8, 8, 8, 8, 1], "serial", "matching"),
             ("overlapped", two, [9, 1, 19], "overlap", "matching"),
             ("overlapped", two, [9, 1, 19], "sequence", "matching")]
    # all-reduce calls of 4 layers: serial two a layer per chunk; ISO two per half (chunks of 1 are not halved);
    # sequence parallel two reduce-scatters and two all-gathers a layer, one closing gather per chunk, chunks of fewer
    # than T tokens all-reduced
    calls = dict(serial=2 * 4 * 5, overlap=2 * 4 * (2 + 1 + 2), sequence=2 * (4 * 4 + 1) + 2 * 4)
    for (_, tokens, _, tp_comm, _), res in zip(cases, _gloo_tp_runs(1, cases), strict=True):
        _assert_tp_equals_unchunked(res, refs[id(tokens)], 1)
        assert res.metrics["allreduce_calls_per_stage"] == [calls[tp_comm]]


def test_a_failing_tp_rank_is_reported_not_a_broken_barrier():
    with pytest.raises(RuntimeError, match="injected failure in stage 1"):
        run_prefill(TINY, torch.zeros(1, 16, dtype=torch.long), stages=2, tp=2, chunk_size=4, fault=("raise", 1),
                    timeout_s=10)


def test_tp_on_a_gpu_in_process_is_refused_with_what_to_run_instead():
    from pipeline import PipelineSpec
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to get past the device check")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 4"):
        PipelineSpec(source="tiny", stages=2, tp=2, device="cuda").validate()


# ---- how the TP ranks combine their sums: serial, overlap (ISO halves), sequence parallelism ---------------------

@pytest.mark.parametrize("tp_comm", ["overlap", "sequence"])
@pytest.mark.parametrize("stages,tp,chunks", [(1, 2, [1, 10, 3, 27]), (2, 2, [7, 7, 7, 7, 7, 6]), (1, 4, [2, 39])])
@pytest.mark.parametrize("mode", ["naive", "overlapped"])
def test_overlapped_and_sequence_parallel_reduces_equal_unchunked(tp_comm, stages, tp, chunks, mode):
    """Odd chunks, a chunk of one token (overlap: no halves; sequence: fewer tokens than ranks, so a plain
    all-reduce), chunks that do not split evenly over T (sequence pads them): logits, decode, every KV entry."""
    cfg = TINY.replace(num_kv_heads=1, qkv_bias=True, o_bias=True)
    B, L = 2, 41
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(5))
    ref = run_prefill(cfg, tokens, mode="unchunked", return_cache=True)
    res = run_prefill(cfg, tokens, mode=mode, stages=stages, tp=tp, chunks=chunks, tp_comm=tp_comm,
                      return_cache=True)
    assert (res.logits - ref.logits).abs().max().item() <= 1e-5
    assert (res.decode_logits - ref.decode_logits).abs().max().item() <= 1e-5
    k = torch.cat([c[0] for c in res.caches], 0)
    v = torch.cat([c[1] for c in res.caches], 0)
    assert (k - ref.caches[0][0]).abs().max().item() <= 1e-5 and (v - ref.caches[0][1]).abs().max().item() <= 1e-5
    m, layers = res.metrics, 4 // stages
    # the payload reduced is the same whichever way: two [B, L, H] sums per layer; decode stays L times smaller
    assert m["allreduce_bytes_per_stage"] == [_expected_allreduce(layers, B, L)] * stages
    assert m["allreduce_prefill_over_decode"] == [L] * stages
    plan = [L] if mode == "naive" else chunks
    row = B * 64 * 4  # one token's hidden state
    if tp_comm == "overlap":  # each chunk of 2+ tokens: both halves all-reduced apart
        assert m["allreduce_calls_per_stage"] == [2 * layers * sum(1 + (c >= 2) for c in plan)] * stages
        assert m["allreduce_wire_bytes_per_stage"] == [2 * (tp - 1) * b // tp for b in m["allreduce_bytes_per_stage"]]
    else:  # per layer 2 reduce-scatters + 2 all-gathers of the chunk padded to T rows, + 1 all-gather per chunk: of
        # the whole chunk where it is sent on, of its last token alone on the last stage (only its logits are wanted)
        sp = [c for c in plan if c >= tp]
        calls = sum(4 * layers + 1 for _ in sp) + 2 * layers * (len(plan) - len(sp))
        wire = sum(4 * layers * (tp - 1) * (-(-c // tp)) * row for c in sp)
        wire += sum(2 * (tp - 1) * 2 * layers * c * row // tp for c in plan if c < tp)
        closing = [sum((tp - 1) * (-(-c // tp)) * row for c in sp)] * (stages - 1) + [len(sp) * (tp - 1) * row]
        assert m["allreduce_calls_per_stage"] == [calls] * stages
        assert m["allreduce_wire_bytes_per_stage"] == [wire + x for x in closing]


@pytest.mark.gpu
@pytest.mark.parametrize("stages,tp,mode,tp_comm,tp_boundary", [
    (1, 2, "chunked", "serial", "matching"), (1, 2, "overlapped", "overlap", "matching"),
    (1, 2, "overlapped", "sequence", "matching"), (2, 2, "overlapped", "serial", "matching"),
    (2, 2, "overlapped", "overlap", "broadcast"), (2, 2, "chunked", "serial", "sharded"),
    (2, 2, "overlapped", "sequence", "sharded")])
def test_tp_over_nccl_equals_unchunked(cuda, stages, tp, mode, tp_comm, tp_boundary):
    """S x T processes, each on a GPU of its own, all-reduces (serial, ISO-overlapped, or reduce-scatter +
    all-gather) and boundaries (between matching TP ranks, sent once and broadcast, or sharded) over NCCL, against
    the unchunked model on a GPU (random weights are drawn on the model's device)."""
    from tests.conftest import need_gpus
    need_gpus(stages * tp)
    cfg = TINY.replace(num_kv_heads=1)
    B, L = 2, 29
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(6))
    ref = run_prefill(cfg, tokens, mode="unchunked", device="cuda", return_cache=True)
    res = run_prefill(cfg, tokens, mode=mode, stages=stages, tp=tp, chunks=[9, 1, 19], link="nccl", device="cuda",
                      tp_comm=tp_comm, tp_boundary=tp_boundary, return_cache=True)
    assert (res.logits.cpu() - ref.logits.cpu()).abs().max().item() <= 1e-4
    assert (res.decode_logits.cpu() - ref.decode_logits.cpu()).abs().max().item() <= 1e-4
    k = torch.cat([c[0].cpu() for c in res.caches], 0)
    assert (k - ref.caches[0][0].cpu()).abs().max().item() <= 1e-4
    assert res.metrics["allreduce_bytes_per_stage"] == [_expected_allreduce(4 // stages, B, L)] * stages


def test_an_emulated_tp_interconnect_delays_each_collective_from_its_completion(monkeypatch):
    """LocalReducer with a 20 ms latency: a blocking all-reduce takes at least that; a started one is usable no
    sooner than 20 ms after it completed, and waiting once that is over does not sleep at all; the time blocked is
    counted. (Lower bounds and the sleep itself are checked, never an upper bound on the time: a loaded or paused
    machine only makes things later.)"""
    import time

    from pipeline.link import LinkModel
    group = LocalGroup(1)
    r = LocalReducer(group, 0, LinkModel(None, 0.02))
    t = torch.ones(4)
    t0 = time.perf_counter()
    assert r(t) is t and time.perf_counter() - t0 >= 0.02
    t0 = time.perf_counter()
    p = r.start(torch.ones(4))
    arrival = p.arrived.result()  # when the emulated transfer is over: 20 ms after the collective completed
    assert arrival - t0 >= 0.02
    p.wait()
    assert time.perf_counter() >= arrival  # not usable sooner
    p = r.start(torch.ones(4))
    arrival = p.arrived.result()
    time.sleep(max(0.0, arrival - time.perf_counter()) + 0.005)  # compute that hides it
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    p.wait()
    assert slept == []  # over already: waiting late costs nothing more
    monkeypatch.undo()
    assert r.stats()["calls"] == 3 and r.stats()["seconds"] >= 0.035
    r.close()


def test_the_harness_runs_tp_comms_side_by_side(tmp_path):
    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=1, tp=2)
    point = run_point(spec, 24, 1, [8, 8, 8], repeats=1, warmup=0, modes=["unchunked", "chunked"],
                      tp_comms=["serial", "overlap", "sequence"])
    assert list(point["modes"]) == ["unchunked", "chunked", "chunked/overlap", "chunked/sequence"]
    for label in ("chunked", "chunked/overlap", "chunked/sequence"):
        m = point["modes"][label]
        assert m["mode"] == "chunked" and m["tp_comm"] == (label.partition("/")[2] or "serial")
        assert m["outputs_match"] and m["bytes_exact"], label


@pytest.mark.parametrize("argv,match", [
    (["--tp-comm", "overlap"], "--tp-comm overlap .* needs --tp 2 or more"),
    (["--tp", "2", "--tp-comm", "iso"], "unknown tp-comm 'iso'"),
    (["--tp-bandwidth-gbps", "1"], "need --tp 2 or more"),
    (["--tp", "2", "--tp-bandwidth-gbps", "0"], "tp-bandwidth-gbps"),
])
def test_bad_tp_comm_options_are_refused_in_one_line(argv, match, capsys):
    from bench.cli import main
    try:
        code = main(["--model", "tiny", "--stages", "1", "--out", "/nonexistent/never-made"] + argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


# ---- the all-reduce in the cost model, the simulator and the TP x PP projection ---------------------------------

def _tp_cost(latency, comm, layers=1, share=0.5, busy=0.0):
    from pipeline.costs import TPCost
    from pipeline.link import LinkModel
    return TPCost(lambda x, p: x * 1.0, layers, 2, LinkModel(None, latency), 4, comm, share,
                  LinkModel(None, busy))  # 1 s per token


@pytest.mark.parametrize("latency,serial,overlap", [
    # halves of 1 token: attention 0.5 s, MLP 0.5 s each; a's reduce runs while b computes and the other way round
    (0.25, 2.5, 2.25),
    # reduces dominate: the comm lane never rests after the first half's attention, and ISO pays 4 reduces, not 2
    (10.0, 22.0, 40.5),
])
def test_tp_cost_serial_and_iso_schedules_by_hand(latency, serial, overlap):
    assert _tp_cost(latency, "serial")(2, 0) == pytest.approx(serial)
    assert _tp_cost(latency, "overlap")(2, 0) == pytest.approx(overlap)
    assert _tp_cost(latency, "overlap")(1, 0) == pytest.approx(1 + 2 * latency)  # one token: not split


def test_tp_cost_of_sequence_parallelism_by_hand():
    """Sequence parallelism: per layer two reduce-scatters and two all-gathers, in turn, then the stage's closing
    all-gather (none when the stage hands on its slices); each moves (T-1)/T of the chunk padded to a multiple of T;
    a chunk of fewer tokens than T runs serially."""
    import dataclasses

    from pipeline.costs import TPCost, ring_half_s
    from pipeline.link import LinkModel
    seq = _tp_cost(0.25, "sequence", layers=3)
    assert seq(2, 0) == pytest.approx(2 + (4 * 3 + 1) * 0.25)
    assert dataclasses.replace(seq, closing="none")(2, 0) == pytest.approx(2 + 4 * 3 * 0.25)
    assert dataclasses.replace(seq, closing="token")(2, 0) == pytest.approx(seq(2, 0))  # latency alone: no bandwidth
    with pytest.raises(ValueError, match="closing must be one of chunk, token, none"):
        dataclasses.replace(seq, closing="all")
    assert seq(1, 0) == pytest.approx(_tp_cost(0.25, "serial", layers=3)(1, 0))  # one token over 2 ranks: serial
    wire = TPCost(lambda x, p: 0.0 * x, 1, 4, LinkModel(1.0, 0.0), 10, "sequence")  # 1 GB/s, 10 B a token, T = 4
    assert wire(5, 0) == pytest.approx(5 * 3 / 4 * 8 * 10 / 1e9)  # 5 tokens padded to 8, 3/4 of them, 5 calls
    last = dataclasses.replace(wire, closing="token")  # the closing all-gather of one row per rank: 4 rows
    assert last(5, 0) == pytest.approx((4 * 3 / 4 * 8 + 3 / 4 * 4) * 10 / 1e9)
    assert float(ring_half_s(LinkModel(1.0, 0.0), 4, 80)) * 2 == pytest.approx(
        float(wire.reduce_s(8)))  # a reduce-scatter + all-gather pair: one all-reduce's bytes
    assert float(seq(np.array([2, 1]), np.array([0, 0]))[0]) == pytest.approx(seq(2, 0))


@pytest.mark.parametrize("comm,without", [("serial", 2.5), ("overlap", 2.25)])
def test_a_boundary_broadcast_comes_before_the_chunk_on_both_lanes(comm, without):
    """Latency 0.25 s per collective: a boundary received once and broadcast first delays the whole chunk's
    schedule by one broadcast, 0.25 s + 8 bytes / 1 GB/s (and busy's share on top); nothing without bytes."""
    import dataclasses

    from pipeline.link import LinkModel
    cost = _tp_cost(0.25, comm)
    assert cost.boundary_s(2) == 0
    once = dataclasses.replace(cost, boundary_bytes_per_token=4, boundary_link=LinkModel(1.0, 0.25))
    assert once(2, 0) == pytest.approx(without + 0.25 + 8e-9)
    assert dataclasses.replace(once, busy=LinkModel(None, 0.1))(2, 0) > once(2, 0) + 0.1  # busy: each reduce too
    assert dataclasses.replace(cost, boundary_bytes_per_token=4)(2, 0) == pytest.approx(without + 0.25)  # on link
    sliced = dataclasses.replace(once, boundary_sliced=True)  # sharded sends: a chunk under T tokens crosses whole
    assert sliced(2, 0) == pytest.approx(once(2, 0)) and sliced(1, 0) == pytest.approx(cost(1, 0))
    assert list(sliced.boundary_s(np.array([1, 2]))) == pytest.approx([0.0, once.boundary_s(2)])
    assert float(once(np.array([2, 2]), np.array([0, 0]))[0]) == pytest.approx(once(2, 0))


def test_an_all_reduces_cpu_share_runs_on_the_compute_lane():
    """0.1 s of each all-reduce is the rank's own work: each block then takes 0.6 s on the compute lane, and the
    0.25 s transfer starts after it: a 0.85, b 1.45, a 2.05, b 2.65. Serial pays both shares: 2 + 2 x 0.35."""
    assert _tp_cost(0.25, "overlap", busy=0.1)(2, 0) == pytest.approx(2.65)
    assert _tp_cost(0.25, "serial", busy=0.1)(2, 0) == pytest.approx(2.7)


def test_the_overlapped_schedule_s_own_costs_by_hand():
    """Latency 0.25 s, busy 0.1 s per all-reduce. posted_busy 0: the all-reduce's own work runs on its lane before
    the wire, the compute lane goes on: blocks posted at 0.5, 1.0, 1.5, 2.0; reduces end 0.85, 1.35, 1.85, 2.35.
    posted_busy 0.5: the compute lane pays 0.05 per block: posted 0.5, 1.05, 1.6, 2.15, the last reduce ends 2.5.
    split_s 0.4 (no busy): each half's compute 1.2 s, blocks of 0.6: posted 0.6, 1.2, 1.8, 2.4, ends 2.65; a split
    that would take more than the halves' compute leaves them none: four reduces in a chain, 1.0 s. Serial chunks
    and one-token chunks (never split) do not change."""
    import dataclasses
    busy = _tp_cost(0.25, "overlap", busy=0.1)
    assert busy(2, 0) == pytest.approx(dataclasses.replace(busy, posted_busy=1.0)(2, 0)) == pytest.approx(2.65)
    assert dataclasses.replace(busy, posted_busy=0.0)(2, 0) == pytest.approx(2.35)
    assert dataclasses.replace(busy, posted_busy=0.5)(2, 0) == pytest.approx(2.5)
    plain = _tp_cost(0.25, "overlap")
    assert dataclasses.replace(plain, split_s=0.4)(2, 0) == pytest.approx(2.65)
    assert dataclasses.replace(plain, split_s=-10.0)(2, 0) == pytest.approx(1.0)
    for cost in (dataclasses.replace(busy, posted_busy=0.0, split_s=0.4),):
        assert cost(1, 0) == pytest.approx(busy(1, 0))
        assert dataclasses.replace(cost, comm="serial")(2, 0) == pytest.approx(_tp_cost(0.25, "serial", busy=0.1)(2, 0))
    with pytest.raises(ValueError, match="posted_busy is a share of busy, from 0 to 1; got 1.5"):
        dataclasses.replace(busy, posted_busy=1.5)


def _overlap_runs(cost, plans):
    """Records of runs whose every chunk took exactly what `cost` says (one stage)."""
    from types import SimpleNamespace

    from pipeline.schedule import StageRecord, chunk_starts
    runs = []
    for chunks in plans:
        rec, t = StageRecord(0, chunks), 0.0
        for x, p in zip(chunks, chunk_starts(chunks)):
            took = float(cost(x, p))
            rec.compute.append((t, t + took))
            t += took
        runs.append(SimpleNamespace(records=[rec]))
    return runs


def test_the_overlapped_schedule_s_costs_are_fitted_from_runs_that_used_it():
    """Chunks timed by a schedule with split_s 4 ms and posted_busy 0.3 (gloo-like: 1 ms of CPU work per
    all-reduce, a 20 MB/s wire): the fit, given the serial fit's compute and links, finds a pair that times every
    chunk of other sizes too within 1%, where the unfitted schedule (all of busy on the compute lane, no split
    cost) is off by more than 10% somewhere."""
    import dataclasses

    from pipeline.costs import ChunkCost, TPCost, calibration_chunks, fit_tp_overlap
    from pipeline.link import LinkModel
    base = TPCost(ChunkCost(1e-8, 2e-8, 1e-4, 6e-3), 4, 2, LinkModel(0.02, 0.0), 256, "serial", 0.4,
                  LinkModel(1.5, 1e-3))
    true = dataclasses.replace(base, comm="overlap", split_s=4e-3, posted_busy=0.3)
    split, share = fit_tp_overlap(_overlap_runs(true, [calibration_chunks(2048)] * 2), [base])
    fitted, unfitted = (dataclasses.replace(base, comm="overlap", split_s=split, posted_busy=share),
                        dataclasses.replace(base, comm="overlap"))
    x = np.array([2, 24, 64, 200, 384, 1000, 2048])
    p = np.array([0, 100, 2000, 64, 1024, 0, 0])
    assert np.allclose(fitted(x, p), true(x, p), rtol=1e-2)
    assert np.max(np.abs(unfitted(x, p) / true(x, p) - 1)) > 0.1
    assert 0.0 <= share <= 1.0


def test_the_overlapped_fit_needs_split_chunks_of_two_sizes():
    import dataclasses

    from pipeline.costs import ChunkCost, TPCost, fit_tp_overlap
    from pipeline.link import LinkModel
    base = TPCost(ChunkCost(0.0, 0.0, 1e-4, 1e-3), 2, 2, LinkModel(None, 1e-3), 256)
    runs = _overlap_runs(dataclasses.replace(base, comm="overlap"), [[64] * 4, [1, 1]])
    with pytest.raises(ValueError, match="split chunks .2 tokens or more. of at least 2 sizes"):
        fit_tp_overlap(runs, [base])
    zero = _overlap_runs(lambda x, p: 0.0 * x, [[32, 32]])  # timed at 0 s: no information
    with pytest.raises(ValueError, match="timed above 0 s"):
        fit_tp_overlap(runs + zero, [base])


def test_a_fitted_all_reduce_splits_into_the_emulated_wire_and_the_cpu_rest():
    from bench.calibration import split_tp_link
    from pipeline.link import LinkModel
    fitted = LinkModel(0.175, 1.3e-3)
    wire, busy = split_tp_link(fitted, LinkModel(0.2, 0.0))
    assert wire == LinkModel(0.2, 0.0)
    assert busy.latency_s == pytest.approx(1.3e-3) and busy.bandwidth_gbps == pytest.approx(1 / (1 / 0.175 - 1 / 0.2))
    assert split_tp_link(fitted, LinkModel()) == (LinkModel(), fitted)  # no emulation: all of it is CPU work
    _, none = split_tp_link(LinkModel(0.3, 0.0), LinkModel(0.2, 1e-3))  # faster than emulated: nothing left over
    assert not none.active


def test_tp_cost_is_bounded_by_its_lanes_and_vectorises():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.integers(2, 5000), st.integers(0, 5000), st.floats(0, 0.05), st.integers(1, 12),
           st.floats(0.1, 0.9))
    def check(x, p, latency, layers, share):
        from pipeline.costs import TPCost
        from pipeline.link import LinkModel
        compute = lambda x, p: 1e-4 * x + 1e-8 * x * (x + p) + 1e-3  # noqa: E731
        link = LinkModel(5.0, latency)
        serial = TPCost(compute, layers, 2, link, 2048, "serial", share)(x, p)
        iso = TPCost(compute, layers, 2, link, 2048, "overlap", share)
        t = iso(x, p)
        xa, xb = x // 2, x - x // 2
        work = compute(xa, p) + compute(xb, p + xa)
        comm = 2 * layers * (float(iso.reduce_s(xa)) + float(iso.reduce_s(xb)))
        assert max(work, comm) - 1e-12 <= t <= work + comm + 1e-12
        assert serial == pytest.approx(compute(x, p) + 2 * layers * float(iso.reduce_s(x)))
        assert float(iso(np.array([x, x]), np.array([p, p]))[1]) == pytest.approx(t)
    check()


def test_the_tp_fit_recovers_compute_and_interconnect_from_per_chunk_reduce_times():
    from types import SimpleNamespace

    from pipeline.costs import ChunkCost, allreduce_s, fit_tp_from_runs
    from pipeline.link import LinkModel
    from pipeline.schedule import StageRecord, chunk_starts
    true, link, layers, bpt = ChunkCost(1e-8, 2e-8, 1e-4, 2e-3), LinkModel(0.5, 3e-4), 3, 1536
    runs = []
    for chunks in ([16, 32, 128, 256, 512, 112], [2048], [256] * 8):
        rec, t = StageRecord(0, chunks), 0.0
        for x, p in zip(chunks, chunk_starts(chunks)):
            red = 2 * layers * float(allreduce_s(link, 2, x * bpt))
            took = float(true(x, p)) + red
            rec.compute.append((t, t + took))
            rec.reduce.append((red, 2 * layers, 2 * layers * x * bpt))
            t += took
        runs.append(SimpleNamespace(records=[rec]))
    (fit,), fitted = fit_tp_from_runs(runs, 2)
    for x, p in ((64, 0), (256, 1024), (2048, 0)):
        assert float(fit(x, p)) == pytest.approx(float(true(x, p)), rel=1e-6)
    assert fitted.bandwidth_gbps == pytest.approx(0.5, rel=1e-6) and fitted.latency_s == pytest.approx(3e-4, rel=1e-6)
    with pytest.raises(ValueError, match="not a TP run"):
        fit_tp_from_runs([SimpleNamespace(records=[StageRecord(0, [4], compute=[(0.0, 1.0)])])], 2)


def test_a_tp_rank_s_roofline_holds_its_share_of_the_weights():
    from pipeline.costs import DEVICES, RooflineCost
    cfg = get_preset("llama3-70b")
    one = RooflineCost(cfg, 80, DEVICES["h100"])
    assert one.layer_params == cfg.params_per_layer
    eight, sixteen = RooflineCost(cfg, 80, DEVICES["h100"], tp=8), RooflineCost(cfg, 80, DEVICES["h100"], tp=16)
    H = cfg.hidden_size
    assert eight.layer_params == pytest.approx(cfg.params_per_layer / 8 + 2 * H * (1 - 1 / 8))  # norms whole
    assert sixteen.kv_heads == 1  # 8 KV heads over 16 ranks: one each, replicated
    assert sixteen.layer_params > cfg.params_per_layer / 16
    assert 0.1 < eight(8192, 0) / one(8192, 0) < 0.2


def test_tp_splits_respect_heads_and_layers():
    from bench.simulate import tp_splits
    assert tp_splits(get_preset("llama3-8b"), 16) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert tp_splits(TINY, 8) == [(2, 4), (4, 2)]  # 4 layers: S <= 4; 4 heads: T <= 4


def test_simulate_gpus_projects_every_split_and_marks_the_fastest(tmp_path, capsys):
    import json

    from bench.simulate import main
    out = tmp_path / "proj"
    assert main(["--gpus", "8", "--models", "llama3-8b", "--links", "nvlink,pcie5", "--prompt-lens", "4096,32768",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "simulate.json").read_text())
    rows = doc["rows"]
    assert doc["environment"]["git_commit"] is None or len(doc["environment"]["git_commit"]) == 40
    assert len(rows) == 4 * 2 * 2 and (out / "simulate.png").exists()
    for r in rows:
        modes = {f"{m}_{c}_ms": r[f"{m}_{c}_ms"] for m in ("naive", "chunked", "overlapped")
                 for c in ("serial", "overlap")}
        assert r["best_ms"] == min(modes.values())
        assert r["overlapped_free_tp_ms"] <= r["overlapped_overlap_ms"] + 1e-9
        assert r["allreduce_bytes_per_stage"][0] == 2 * (32 // r["stages"]) * r["prompt_len"] * 4096 * 2
        if r["tp"] == 1:
            assert r["reduce_exposed_ms"] == 0 and r["reduce_hidden"]
    for key in {(r["link"], r["prompt_len"]) for r in rows}:
        group = [r for r in rows if (r["link"], r["prompt_len"]) == key]
        assert sum(r["fastest"] for r in group) == 1
        assert next(r for r in group if r["fastest"])["best_ms"] == min(r["best_ms"] for r in group)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["points"] == 16 and len(summary["fastest"]) == 4


def test_simulate_gpus_refuses_stages_and_impossible_splits(tmp_path):
    from bench.simulate import main
    with pytest.raises(ValueError, match="drop --stages"):
        main(["--gpus", "8", "--stages", "2", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="cannot be split over 64 GPUs"):
        main(["--gpus", "64", "--models", "tiny", "--prompt-lens", "256", "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_harness_simulates_tp_rows_on_a_fitted_compute_and_interconnect():
    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, tp=2, tp_latency_s=2e-3)
    point = run_point(spec, 64, 1, [16] * 4, repeats=1, warmup=0, modes=["unchunked", "overlapped"],
                      tp_comms=["serial", "overlap", "sequence"], simulate=True)
    cal = point["calibration"]
    assert cal["tp_link"]["latency_s"] >= 1e-3  # the emulated 2 ms per all-reduce, found again
    for label in ("overlapped", "overlapped/overlap"):
        assert point["modes"][label]["sim_ttft_ms"] > 0
    assert point["modes"]["overlapped/sequence"]["sim_ttft_ms"] > 0
    assert np.isnan(point["modes"]["unchunked"]["sim_ttft_ms"])
    overlap = cal["tp_overlap"]  # a calibration run with the overlapped reduce fitted its schedule's own costs
    assert overlap["fitted"] and 0.0 <= overlap["posted_busy"] <= 1.0 and math.isfinite(overlap["split_s"])


@pytest.mark.parametrize("comm", ["overlap", "sequence"])
def test_the_planner_s_calibration_costs_the_run_s_own_reduce(comm):
    """`calibrate` (what --chunk-plan balanced plans from) gives TP stages the spec's tp_comm: the overlapped
    schedule with its own costs fitted, or sequence parallelism closing on the last token on the last stage."""
    from bench.calibration import calibrate
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, tp=2, tp_comm=comm, tp_latency_s=1e-3)
    costs, _, info = calibrate(spec, 64, 1, repeats=1, warmup=0)
    assert [c.comm for c in costs] == [comm, comm] and info["tp_comm"] == comm
    assert [c.closing for c in costs] == ["chunk", "token"]
    assert ("tp_overlap" in info) == (comm == "overlap")
    assert all(float(c(16, 32)) > float(c.compute(16, 32)) for c in costs)  # the all-reduces are in


def test_emulated_all_reduces_share_one_lane():
    """Two all-reduces posted back to back over an emulated 20 ms interconnect end 20 and 40 ms later, not both at
    20 ms (gloo's two worker threads would otherwise carry them side by side)."""
    import time

    from pipeline.link import LinkModel
    r = LocalReducer(LocalGroup(1), 0, LinkModel(None, 0.02))
    t0 = time.perf_counter()
    a, b = r.start(torch.ones(2)), r.start(torch.ones(2))
    first, second = a.arrived.result(), b.arrived.result()  # when each transfer is over
    assert first - t0 >= 0.02 and second - first >= 0.02 - 1e-9  # b's transfer starts when a's ends, not beside it
    a.wait()
    b.wait()
    assert time.perf_counter() - t0 >= 0.04
    assert len(r.log) == 2 and r.stats()["calls"] == 2
    r.close()


def test_least_reduce_takes_each_calls_least_wait_over_the_ranks():
    from pipeline.runner import least_reduce
    from pipeline.schedule import StageRecord
    r0 = StageRecord(0, [4, 4], reduce=[(0.9, 2, 64, (0.1, 0.8)), (0.5, 2, 64, (0.25, 0.25))])
    r1 = StageRecord(0, [4, 4], reduce=[(0.7, 2, 64, (0.6, 0.1)), (0.3, 2, 64, (0.2, 0.1))])
    least = least_reduce(r0, [r0, r1])
    assert least.reduce == [(pytest.approx(0.2), 2, 64, (0.1, 0.1)), (pytest.approx(0.3), 2, 64, (0.2, 0.1))]
    assert r0.reduce[0][0] == 0.9  # the rank's own record is left as it was


def test_the_memory_check_counts_what_tp_replicates():
    """Each TP rank holds the embedding and the head whole, and KV heads fewer than T are replicated."""
    from pipeline import Job, PipelineSpec
    from pipeline.launch import memory_needed
    cfg = TINY  # 2 KV heads
    job = Job("overlapped", torch.zeros(1, 64, dtype=torch.long), [32, 32])
    need = {T: memory_needed(PipelineSpec(source="tiny", stages=1, tp=T), cfg, job) for T in (1, 2, 4)}
    tables = cfg.vocab_size * cfg.hidden_size * 2 * 4  # untied embedding + head, float32
    kv = 2 * cfg.num_layers * 65 * cfg.num_kv_heads * cfg.head_dim * 4
    assert need[2] - need[1] == tables
    assert need[4] - need[1] == 3 * tables + kv  # 4 ranks over 2 KV heads: each KV head twice


def test_a_failing_tp_process_is_named_by_stage_and_tp_rank():
    from pipeline import PipelineError
    with pytest.raises(PipelineError, match=r"stage 1 \(TP rank \d, process [23]\) failed: .*injected failure in "
                                            r"stage 1"):
        run_prefill(TINY, torch.zeros(1, 16, dtype=torch.long), stages=2, tp=2, chunk_size=4, link="gloo",
                    fault=("raise", 1), timeout_s=20, threads=1)


# ---- boundaries between TP stages: matching TP ranks, or once and broadcast -----------------------------------

@pytest.mark.parametrize("mode", ["naive", "chunked", "overlapped"])
@pytest.mark.parametrize("compress", ["none", "fp8"])
def test_a_boundary_sent_once_and_broadcast_equals_matching_sends(mode, compress):
    cfg = TINY.replace(num_kv_heads=1)
    B, L = 2, 37
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(9))
    kw = dict(mode=mode, stages=2, tp=2, chunk_size=7, compress=compress, return_cache=True)
    matching = run_prefill(cfg, tokens, **kw)
    once = run_prefill(cfg, tokens, tp_boundary="broadcast", **kw)
    assert torch.equal(once.logits, matching.logits) and torch.equal(once.decode_logits, matching.decode_logits)
    for (k1, v1), (k2, v2) in zip(once.caches, matching.caches):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    wire = L * (B * 64 * 4 if compress == "none" else B * (64 + 4))
    assert once.metrics["bytes_per_boundary"] == matching.metrics["bytes_per_boundary"] == [wire]  # TP rank 0's
    assert once.metrics["boundary_broadcast_bytes_per_stage"] == [0, wire]  # the receiving stage broadcasts it
    assert "boundary_broadcast_bytes_per_stage" not in matching.metrics


def test_tp_x_pp_over_four_gloo_processes_equals_unchunked_with_every_boundary_crossing():
    """S = 2 x T = 2 gloo processes (four on two cores: correctness only), overlapped, the boundaries crossing between
    matching TP ranks, once and broadcast, or sharded (all-gathered, or kept as slices under sequence parallelism)."""
    cfg = TINY.replace(num_kv_heads=1)
    tokens = _tokens(1, 33, 4)
    ref = run_prefill(cfg, tokens, mode="unchunked", return_cache=True)
    crossings = [("matching", "serial"), ("broadcast", "serial"), ("sharded", "serial"), ("sharded", "sequence")]
    cases = [("overlapped", tokens, [8, 8, 8, 8, 1], tp_comm, crossing) for crossing, tp_comm in crossings]
    for (crossing, tp_comm), res in zip(crossings, _gloo_tp_runs(2, cases), strict=True):
        _assert_tp_equals_unchunked(res, ref, 2, crossing)
        if crossing == "broadcast":
            assert res.metrics["boundary_broadcast_bytes_per_stage"] == [0, 33 * 64 * 4]
        elif crossing == "sharded":  # chunks 8, 8, 8, 8, 1: slices of 4 tokens per rank, gathered back into 2 x that;
            assert res.metrics["bytes_per_boundary"] == [17 * 64 * 4]  # the last token whole
            if tp_comm == "serial":
                assert res.metrics["boundary_gather_bytes_per_stage"] == [0, 32 * 64 * 4]
            else:  # sequence parallel: the slices stay as they are, nothing is all-gathered
                assert "boundary_gather_bytes_per_stage" not in res.metrics
        else:
            assert "boundary_broadcast_bytes_per_stage" not in res.metrics


def test_shard_tokens_slices_every_rank_the_same_length():
    from pipeline.tp import shard_tokens
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    parts = [shard_tokens(t, r, 2) for r in range(2)]
    assert [p.shape for p in parts] == [(2, 3, 3), (2, 3, 3)] and all(p.is_contiguous() for p in parts)
    assert torch.equal(torch.cat(parts, 1)[:, :5], t) and not parts[1][:, 2].any()  # one zero row of padding
    four = [shard_tokens(t[:, :4], r, 3) for r in range(3)]  # 4 tokens over 3 ranks: 2, 2 and none (two pad rows)
    assert torch.equal(torch.cat(four, 1)[:, :4], t[:, :4]) and four[2].shape == (2, 2, 3) and not four[2].any()


def test_only_messages_of_at_least_t_tokens_are_sliced():
    from pipeline.tp import link_tokens, sliced
    assert [sliced(c, 4) for c in (1, 3, 4, 5)] == [False, False, True, True]
    assert [link_tokens(c, 4) for c in (1, 3, 4, 5, 9)] == [1, 3, 1, 2, 3]  # short ones whole, the rest ceil(c/T)


def _matching_and_sharded(seed: int, B: int, L: int, **kw):
    """The same prompt with matching and with sharded boundaries: logits, decode and every cache equal bit for bit.
    Returns both results."""
    cfg = TINY.replace(num_kv_heads=1)
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    matching = run_prefill(cfg, tokens, return_cache=True, **kw)
    sharded = run_prefill(cfg, tokens, tp_boundary="sharded", return_cache=True, **kw)
    assert torch.equal(sharded.logits, matching.logits)
    assert torch.equal(sharded.decode_logits, matching.decode_logits)
    for (k1, v1), (k2, v2) in zip(sharded.caches, matching.caches):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    return matching, sharded


@pytest.mark.parametrize("mode", ["naive", "chunked", "overlapped"])
@pytest.mark.parametrize("tp,chunks,compress", [(2, [7, 7, 7, 7, 7, 2], "none"), (4, [1, 3, 10, 23], "fp8")])
def test_sharded_boundaries_equal_matching_sends(mode, tp, chunks, compress):
    """Each TP rank sends ceil(c/T) of a chunk's c tokens (zero rows pad the last slices), the receiving stage
    all-gathers them; a chunk of fewer tokens than T (and the decode token) crosses whole, as with matching sends:
    the same logits, decode and caches as matching sends, bit for bit, with 1/T of the bytes on each link."""
    B, L = 2, 37
    matching, sharded = _matching_and_sharded(9, B, L, mode=mode, stages=2, tp=tp, chunks=chunks, compress=compress)
    bpt = B * (64 * 4 if compress == "none" else 64 + 4)
    plan = [L] if mode == "naive" else chunks
    per_link = sum(-(-c // tp) if c >= tp else c for c in plan)
    assert sharded.metrics["bytes_per_boundary"] == [per_link * bpt]
    assert matching.metrics["bytes_per_boundary"] == [L * bpt]
    assert sharded.metrics["boundary_gather_bytes_per_stage"] == [0, tp * sum(-(-c // tp) for c in plan
                                                                            if c >= tp) * bpt]
    assert sharded.metrics["decode_bytes_per_boundary"] == [bpt]  # one token: whole, on every link


@pytest.mark.parametrize("mode", ["naive", "overlapped"])
@pytest.mark.parametrize("tp,chunks,compress", [(2, [7, 7, 7, 7, 7, 2], "none"), (4, [1, 3, 10, 23], "fp8")])
def test_sequence_parallel_stages_hand_on_the_slices_they_hold(mode, tp, chunks, compress):
    """Sharded boundaries under sequence parallelism (Megatron's SP x PP): each rank sends the 1/T of the tokens it
    already holds and the next stage computes on it as it arrives, so neither the sending stage's closing all-gather
    nor the receiving stage's all-gather happens (chunks shorter than T, run serially, cross whole). Bit for bit
    the matching sends' logits, decode and caches over three stages (the middle one receives and sends slices);
    the ring bytes saved are exactly the closing all-gathers of the stages that send."""
    B, L = 2, 37
    matching, sharded = _matching_and_sharded(11, B, L, mode=mode, stages=3, tp=tp, chunks=chunks, compress=compress,
                                              tp_comm="sequence")
    plan = [L] if mode == "naive" else chunks
    bpt = B * (64 * 4 if compress == "none" else 64 + 4)
    assert sharded.metrics["bytes_per_boundary"] == [sum(-(-c // tp) if c >= tp else c for c in plan) * bpt] * 2
    assert "boundary_gather_bytes_per_stage" not in sharded.metrics  # nothing is all-gathered, short chunks neither
    closing = (tp - 1) * sum(-(-c // tp) for c in plan if c >= tp) * B * 64 * 4  # per sending stage
    saved = [m - s for m, s in zip(matching.metrics["allreduce_wire_bytes_per_stage"],
                                   sharded.metrics["allreduce_wire_bytes_per_stage"])]
    assert saved == [closing, closing, 0]
    assert sharded.metrics["allreduce_bytes_per_stage"] == matching.metrics["allreduce_bytes_per_stage"]


def test_a_ragged_batch_crosses_sharded_boundaries():
    rows = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 23, 1)]
    alone = [run_prefill("tiny", r[None], mode="unchunked") for r in rows]
    for tp_comm in ("serial", "sequence"):  # sequence parallel: the stages hand on their slices of the packed tokens
        res = run_prefill("tiny", rows, mode="overlapped", stages=3, tp=2, chunk_size=7, tp_boundary="sharded",
                          tp_comm=tp_comm)
        for b, a in enumerate(alone):
            assert (res.logits[b] - a.logits[0]).abs().max().item() <= 1e-5
            assert (res.decode_logits[b] - a.decode_logits[0]).abs().max().item() <= 1e-5
        assert res.metrics["bytes_per_boundary"] == [(7 + 4 + 4 + 1) * 64 * 4] * 2  # steps of 13, 7, 7, 2 tokens


def test_the_harness_runs_both_boundary_kinds_side_by_side():
    from bench.harness import run_point
    from pipeline import PipelineSpec
    point = run_point(PipelineSpec(source="tiny", stages=2, tp=2), 24, 1, [8, 8, 7, 1], repeats=1, warmup=0,
                      modes=["unchunked", "overlapped"], tp_boundaries=["matching", "broadcast", "sharded"])
    assert list(point["modes"]) == ["unchunked", "overlapped", "overlapped/broadcast", "overlapped/sharded"]
    once = point["modes"]["overlapped/broadcast"]
    assert once["tp_boundary"] == "broadcast" and once["outputs_match"] and once["bytes_exact"]
    assert once["boundary_broadcast_bytes_per_stage"] == [0, 24 * 64 * 4]
    sharded = point["modes"]["overlapped/sharded"]  # slices of 4, 4, 4 tokens; the 1-token chunk whole
    assert sharded["outputs_match"] and sharded["bytes_exact"]
    assert sharded["prefill_bytes_per_boundary"] == [13 * 64 * 4]


def test_the_harness_simulates_a_broadcast_boundary_and_replays_it():
    """Over a slow emulated TP lane (2 ms a collective) the broadcast row is simulated with a broadcast before each
    of stage 1's chunks: at least the last chunk's 2 ms more than the matching row on the same fit (the others
    may fall in stage 1's slack); the records keep each measured broadcast for the replay."""
    from bench.harness import run_point
    from pipeline import PipelineSpec
    spec = PipelineSpec(source="tiny", stages=2, tp=2, tp_latency_s=2e-3)
    point = run_point(spec, 64, 1, [16] * 4, repeats=1, warmup=0, modes=["overlapped"],
                      tp_boundaries=["matching", "broadcast", "sharded"], simulate=True)
    matching, once = point["modes"]["overlapped"], point["modes"]["overlapped/broadcast"]
    sharded = point["modes"]["overlapped/sharded"]
    assert once["sim_ttft_ms"] - matching["sim_ttft_ms"] >= 2.0 * 0.9
    assert sharded["sim_ttft_ms"] - matching["sim_ttft_ms"] >= 2.0 * 0.9  # the all-gather, one collective too
    assert sharded["bytes_exact"] and sharded["prefill_bytes_per_boundary"] == [4 * 8 * 64 * 4]
    stage1 = [r for r in point["records"]["overlapped/broadcast"][0] if r.stage == 1][0]
    assert len(stage1.boundary) == 4 and min(stage1.boundary) >= 2e-3 * 0.9
    assert not any([r for r in point["records"]["overlapped"][0] if r.stage == 1][0].boundary)  # matching: none


def test_a_measured_cost_counts_a_chunks_broadcast_with_it():
    from pipeline.schedule import StageRecord
    from pipeline.simulate import MeasuredCost
    rec = StageRecord(1, [4, 4], compute=[(0.0, 1.0), (1.0, 3.0)], boundary=[0.5, 0.25])
    cost = MeasuredCost(rec)
    assert cost(4, 0) == 1.5 and cost(4, 4) == 2.25
    with pytest.raises(ValueError, match="1 boundary collectives for 2 chunks"):
        MeasuredCost(StageRecord(1, [4, 4], compute=[(0.0, 1.0), (1.0, 3.0)], boundary=[0.5]))


def test_the_projection_says_how_a_tp_stage_boundary_should_cross(tmp_path, capsys):
    """A NIC per GPU: T matching sends cost nothing more than one, so the broadcast can only add, while sharded sends
    carry 1/T each; one NIC per stage: the T sends share it and cost more than one send plus a broadcast over
    NVLink, and T slices of 1/T through it cost one send, their all-gather less than a broadcast. The TP fabric is
    its own (--tp-link) for groups within a node: all-reduces over NVLink expose less than over 100GbE."""
    import json

    from bench.simulate import main, project_tp
    from pipeline.config import get_preset
    out = tmp_path / "proj"
    assert main(["--gpus", "16", "--models", "llama3-8b", "--links", "100gbe", "--tp-link", "nvlink",
                 "--prompt-lens", "8192", "--out", str(out)]) == 0
    rows = json.loads((out / "simulate.json").read_text())["rows"]
    both = [r for r in rows if r["tp"] > 1 and r["stages"] > 1]
    assert [(r["tp"], r["stages"]) for r in both] == [(2, 8), (4, 4), (8, 2)]
    for r in rows:
        assert r["tp_link"] == ("nvlink" if r["tp"] <= 8 else "100gbe") and r["link"] == "100gbe"  # 16: two nodes
        assert ("boundary_own_nics" in r) == (r in both)
    for r in both:
        b = r[f"boundary_{r['boundary_tp_comm']}_ms"]
        assert b["matching"] == r[f"overlapped_{r['boundary_tp_comm']}_ms"]
        assert b["matching"] <= b["broadcast"] < b["matching_shared_nic"]
        assert b["sharded"] <= b["sharded_shared_nic"] <= b["broadcast"]
        assert r["boundary_own_nics"] in ("matching", "sharded") and r["boundary_shared_nic"] == "sharded"
        assert r["sharded_over_matching"] == pytest.approx(b["sharded"] / b["matching"])
        assert r["shared_nic_matching_over_broadcast"] == pytest.approx(b["matching_shared_nic"] / b["broadcast"])
        # sequence parallel stages that send the slices they hold and keep the ones they receive: less than the same
        # schedule with matching sends (no closing all-gather, 1/T on each link)
        assert r["sequence_sharded_ms"] <= r["overlapped_sequence_ms"]
        assert r["sequence_sharded_ms"] <= r["sequence_sharded_shared_nic_ms"]
        assert r["sequence_sharded_over_best_boundary"] == pytest.approx(
            r["sequence_sharded_ms"] / min(b["matching"], b["broadcast"], b["sharded"]))
    by_t = {r["tp"]: r["shared_nic_matching_over_broadcast"] for r in both}
    assert by_t[8] > by_t[2]  # the more ranks share the NIC, the more the T sends cost
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    wins = summary["boundary_wins"]
    assert wins["own_nics"]["broadcast"] == 0 and wins["shared_nic"] == {"matching": 0, "broadcast": 0, "sharded": 3}
    assert sum(wins["own_nics"].values()) == 3
    cfg = get_preset("llama3-8b")
    nv = project_tp(cfg, 16, 8, 2, "h100", "100gbe", 8192, tp_link_name="nvlink")
    slow = project_tp(cfg, 16, 8, 2, "h100", "100gbe", 8192)
    assert nv["reduce_exposed_ms"] < slow["reduce_exposed_ms"] and slow["tp_link"] == "100gbe"


def test_tp_link_serves_groups_within_a_node_and_needs_gpus(tmp_path):
    import json

    from bench.simulate import main
    assert main(["--gpus", "8", "--models", "tiny", "--links", "pcie5", "--tp-link", "nvlink", "--node-gpus", "2",
                 "--prompt-lens", "512", "--out", str(tmp_path / "p")]) == 0
    rows = json.loads((tmp_path / "p" / "simulate.json").read_text())["rows"]
    assert {r["tp"]: r["tp_link"] for r in rows} == {2: "nvlink", 4: "pcie5"}
    for argv, match in ((["--tp-link", "nvlink"], "--tp-link names the fabric .* it needs --gpus"),
                        (["--node-gpus", "4"], "--node-gpus says which TP groups --tp-link serves"),
                        (["--gpus", "8", "--node-gpus", "4"], "it needs --tp-link")):
        with pytest.raises(ValueError, match=match):
            main(argv + ["--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["--tp-boundary", "broadcast"], ["--tp", "2", "--stages", "1", "--tp-boundary",
                                                                  "broadcast"]])
def test_a_tp_boundary_needs_tp_stages(argv, capsys):
    from bench.cli import main
    assert main(["--model", "tiny", "--out", "/nonexistent/never-made"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --tp 2 or more and --stages 2 or more" in err
