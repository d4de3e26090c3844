"""Cost models, the chunk planner, the pipeline simulator and the pause-corrected clock: checked against brute force
and against schedules worked out by hand."""
import dataclasses
import itertools

import numpy as np
import pytest

from pipeline.costs import (ChunkCost, RooflineCost, calibration_chunks, fit_chunk_cost, fit_link,
                            get_device, link_preset, roofline_stage_costs, stage_max)
from pipeline.config import get_preset
from pipeline.link import LinkModel
from bench.pauses import ActiveClock
from pipeline.plan import plan_chunks, predicted_makespan
from pipeline.schedule import StageRecord, chunk_plan
from pipeline.simulate import MeasuredCost, replay, simulate

COST = ChunkCost(a=2e-9, b=4e-9, c=1e-5, d=3e-4)


# ---- fitting ---------------------------------------------------------------------------------------------------

def _grid():
    return [(x, p) for x in (16, 48, 128, 256, 512) for p in (0, 300, 1000, 1800)]


def test_fit_recovers_exact_coefficients():
    samples = [(x, p, float(COST(x, p))) for x, p in _grid()]
    fit = fit_chunk_cost(samples)
    for name in "abcd":
        assert getattr(fit, name) == pytest.approx(getattr(COST, name), rel=1e-6)


def test_ragged_step_cost_is_each_rows_attention_plus_the_steps_tokens():
    """A packed step costs a·x_b² + b·x_b·p_b per row, c per packed token and d once; a single-row batch costs
    what the dense chunk does; the simulator runs on it and a (x, p) that is no step is refused."""
    from pipeline.costs import ChunkCost, RaggedStepCost
    from pipeline.ragged import ragged_plan
    from pipeline.simulate import simulate
    base = ChunkCost(a=2e-6, b=1e-6, c=3e-4, d=5e-3)
    steps = ragged_plan([10, 3, 25], 8)
    cost = RaggedStepCost(base, steps)
    pos = 0
    for st in steps:
        want = sum(base.a * x * x + base.b * x * q for x, q in zip(st.lengths, st.starts)) + base.c * st.tokens + base.d
        assert cost(st.tokens, pos) == pytest.approx(want, rel=1e-12)
        pos += st.tokens
    assert cost(steps[1].tokens, steps[0].tokens) != pytest.approx(float(base(steps[1].tokens, steps[0].tokens)))
    alone = RaggedStepCost(base, ragged_plan([20], 8))  # one row: the dense chunks' costs
    assert [alone(x, p) for x, p in ((8, 0), (8, 8), (4, 16))] == pytest.approx(
        [float(base(x, p)) for x, p in ((8, 0), (8, 8), (4, 16))], rel=1e-12)
    sim = simulate("overlapped", [st.tokens for st in steps], [cost, cost])
    assert sim.records[1].compute[-1][1] == pytest.approx(sim.makespan_s)
    with pytest.raises(ValueError, match="no step \\(or token half of one\\) of 9 tokens starts at 1"):
        cost(9, 1)


def test_ragged_step_cost_names_token_halves_and_costs_them_as_the_model_splits_them():
    """TP's overlapped schedule splits each packed step's tokens in two (`RaggedStep.split`): the first x tokens from
    the step's start, or the last from p, are each a step of their own (a row cut in two continues over its first
    part); a single row's halves cost what the dense halves do, and so does the TP overlap model on top of them, the
    attention's share included."""
    from pipeline.costs import ChunkCost, RaggedStepCost, TPCost, attention_share
    from pipeline.link import LinkModel
    from pipeline.ragged import ragged_plan
    base = ChunkCost(a=2e-6, b=1e-6, c=3e-4, d=5e-3)
    steps = ragged_plan([10, 3, 25], 8)  # the first step packs 8 + 3 + 8 tokens
    cost = RaggedStepCost(base, steps)
    first, second = cost.step(9, 0), cost.step(10, 9)
    assert (first.starts, first.lengths) == ((0, 0, 0), (8, 1, 0))
    assert (second.starts, second.lengths) == ((8, 1, 0), (0, 2, 8))  # row 1 continues after its first token
    assert cost(9, 0) == pytest.approx(base.a * 65 + base.b * 0 + base.c * 9 + base.d, rel=1e-12)
    assert cost(10, 9) == pytest.approx(base.a * 68 + base.b * 2 + base.c * 10 + base.d, rel=1e-12)
    for x, p in ((9, 1), (5, 3), (20, 0), (3, 17)):  # no step, no half: not from its start, nor to its end
        with pytest.raises(ValueError, match=f"no step \\(or token half of one\\) of {x} tokens starts at {p}"):
            cost(x, p)
    cfg = get_preset("tiny")
    alone = RaggedStepCost(base, ragged_plan([20], 8))  # one row in chunks of 8: 8, 8, 4
    dense_share, ragged_share = attention_share(cfg), attention_share(cfg, alone)
    link = LinkModel(1.0, 1e-4)
    dense_tp = TPCost(base, cfg.num_layers, 2, link, 256, "overlap", dense_share)
    ragged_tp = TPCost(alone, cfg.num_layers, 2, link, 256, "overlap", ragged_share)
    for x, p in ((8, 0), (8, 8), (4, 16), (4, 0), (4, 4), (2, 16), (2, 18)):
        assert alone(x, p) == pytest.approx(float(base(x, p)), rel=1e-12)
        assert ragged_share(x, p) == pytest.approx(float(dense_share(x, p)), rel=1e-12)
    for x, p in ((8, 0), (8, 8), (4, 16)):
        assert ragged_tp(x, p) == pytest.approx(dense_tp(x, p), rel=1e-12)


def test_fit_takes_each_points_median_so_a_minority_of_outliers_does_not_bend_it():
    rng = np.random.default_rng(0)
    samples = []
    for x, p in _grid():  # per point 3 exact repeats, one stalled (2-20x) and one too fast (0.1-0.9x)
        t = float(COST(x, p))
        samples += [(x, p, t)] * 3 + [(x, p, t * rng.uniform(2, 20)), (x, p, t * rng.uniform(0.1, 0.9))]
    rng.shuffle(samples)
    fit = fit_chunk_cost(samples)
    xs, ps = np.meshgrid([16, 100, 512], [0, 900, 1800])
    np.testing.assert_allclose(fit(xs, ps), COST(xs, ps), rtol=1e-6)


def test_a_windowed_stage_s_cost_reads_the_prefix_its_window_leaves():
    """A stage whose layers have a sliding window W (all, or a share of them) reads min(p, W - 1) prefix keys there;
    the fit recovers such a cost exactly, which the unwindowed form cannot; the per-stage share is the model's
    window layers in each stage; a window that reads no prefix at all (W = 1 everywhere) fits without the b term."""
    from pipeline import ModelConfig
    from pipeline.costs import stage_windows
    half = ChunkCost(2e-9, 4e-8, 1e-5, 3e-4, window=300, windowed=0.5)
    assert float(half(10, 1000)) == pytest.approx(2e-7 + 4e-7 * (500 + 299 / 2) + 1e-4 + 3e-4, rel=1e-12)
    full = dataclasses.replace(half, window=None, windowed=0.0)
    assert float(half(10, 200)) == pytest.approx(float(full(10, 200)), rel=1e-12)  # inside the window: no change
    for true in (half, ChunkCost(2e-9, 4e-8, 1e-5, 3e-4, window=700, windowed=1.0)):
        samples = [(x, p, float(true(x, p))) for x, p in _grid()]
        fit = fit_chunk_cost(samples, window=true.window, windowed=true.windowed)
        assert (fit.window, fit.windowed) == (true.window, true.windowed)
        for name in "abcd":
            assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6)
        blind = fit_chunk_cost(samples)  # the full-causal form on the same times, projected to longer prefixes
        xs, ps = np.meshgrid([16, 128, 512], [0, 1000, 8000])
        assert np.abs(blind(xs, ps) / true(xs, ps) - 1).max() > 0.15
        np.testing.assert_allclose(fit(xs, ps), true(xs, ps), rtol=1e-6)
    nothing = ChunkCost(1e-9, 5e-9, 1e-5, 3e-4, window=1, windowed=1.0)
    fit = fit_chunk_cost([(x, p, float(nothing(x, p))) for x, p in _grid()], window=1, windowed=1.0)
    assert fit.b == 0.0 and fit.a == pytest.approx(1e-9, rel=1e-6)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64, sliding_window=9, window_layers=(0, 1, 4))
    assert stage_windows(cfg, [range(0, 2), range(2, 4), range(4, 6)]) == [
        dict(window=9, windowed=1.0), {}, dict(window=9, windowed=0.5)]
    assert stage_windows(dataclasses.replace(cfg, sliding_window=None, window_layers=()), [range(6)]) == [{}]
    for bad, match in ((dict(window=0, windowed=1.0), "window must be a positive integer"),
                       (dict(window=None, windowed=0.5), "windowed is the share"),
                       (dict(window=8, windowed=1.5), "windowed is the share")):
        with pytest.raises(ValueError, match=match):
            ChunkCost(1e-9, 1e-9, 1e-5, 1e-4, **bad)


def test_a_window_s_pairs_and_attention_share_count_what_each_query_sees():
    """window_pairs against a count query by query; the attention's share of a layer's FLOPs (where a TP layer's
    first all-reduce falls) counts those pairs in the windowed share of the layers, dense and ragged alike."""
    from pipeline.costs import RaggedStepCost, attention_share, window_pairs
    from pipeline.ragged import ragged_plan
    for x, p, W in itertools.product((1, 5, 17), (0, 3, 40), (1, 4, 30, 100)):
        assert window_pairs(x, p, W) == sum(min(p + i + 1, W) for i in range(x))
    cfg = dataclasses.replace(get_preset("tiny"), sliding_window=6, window_layers=(0, 1, 2, 3))
    H, D, I, Hq, Hkv = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads
    for f in (0.0, 0.5, 1.0):
        share = attention_share(cfg, windowed=f)
        for x, p in ((8, 0), (8, 30), (3, 100)):
            pairs = (1 - f) * (x * p + x * (x + 1) / 2) + f * sum(min(p + i + 1, 6) for i in range(x))
            attn = 2 * H * D * (2 * Hq + 2 * Hkv) * x + 4 * Hq * D * pairs
            assert float(share(x, p)) == pytest.approx(attn / (attn + 6 * H * I * x), rel=1e-12)
        alone = RaggedStepCost(ChunkCost(1e-9, 1e-9, 1e-5, 1e-4, 6, f or 0.0), ragged_plan([20], 8))
        ragged = attention_share(cfg, alone, f)
        assert [ragged(x, q) for x, q in ((8, 0), (8, 8), (4, 16))] == pytest.approx(
            [float(share(x, q)) for x, q in ((8, 0), (8, 8), (4, 16))], rel=1e-12)
    assert float(attention_share(cfg, windowed=1.0)(8, 100)) < float(attention_share(cfg)(8, 100))


def test_the_calibration_fits_each_stage_with_the_window_of_its_layers():
    """`calibrate` (what --simulate and --chunk-plan balanced fit) on a model with a window in its last two layers:
    the first stage's cost is the full-causal form, the second's reads min(p, W - 1), and the results say so."""
    from bench.calibration import calibrate
    from pipeline import PipelineSpec
    cfg = dataclasses.replace(get_preset("tiny"), sliding_window=5, window_layers=(2, 3))
    costs, _, info = calibrate(PipelineSpec(source=cfg, stages=2, link="inprocess"), 64, 1, repeats=1, warmup=0)
    assert [(c.window, c.windowed) for c in costs] == [(None, 0.0), (5, 1.0)]
    assert [c.get("window") for c in info["stage_costs"]] == [None, 5] and info["stage_costs"][1]["windowed"] == 1.0
    assert [ChunkCost(**c) for c in info["stage_costs"]] == costs
    assert "min(p, window - 1)" in info["stage_cost_form"]


def test_fit_drops_a_term_the_data_drives_negative():
    # pure c·x + d data with a slight downward bend: the x² term would go negative, and is dropped instead
    samples = [(x, p, 1e-5 * x + 1e-3 - 1e-11 * x * x) for x, p in _grid()]
    fit = fit_chunk_cost(samples)
    assert min(fit.a, fit.b, fit.c, fit.d) >= 0
    assert fit.a == 0.0


@pytest.mark.parametrize("samples, needle", [
    ([(16, 0, 1.0), (32, 0, 2.0), (64, 0, 3.0), (16, 8, 1.0), (32, 8, 2.0)], "at least 6 distinct"),
    ([(16, p, 1.0) for p in range(10)] + [(32, p, 1.0) for p in range(10)], "3 chunk lengths"),
    ([(x, 0, 1.0) for x in range(1, 10)], "2 prefix lengths"),
    ([(0, 0, 1.0)] * 6, "chunk must be > 0"),
    ([(16, -1, 1.0)] * 6, "prefix >= 0"),
])
def test_fit_refuses_too_few_or_bad_points(samples, needle):
    with pytest.raises(ValueError, match=needle):
        fit_chunk_cost(samples)


def test_fit_link_recovers_bandwidth_and_latency():
    link = fit_link([(n, 2e-5 + n / 5e9) for n in (1e4, 1e5, 1e6, 1e7)])
    assert link.bandwidth_gbps == pytest.approx(5.0, rel=1e-6)
    assert link.latency_s == pytest.approx(2e-5, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 sizes"):
        fit_link([(1000, 1e-3), (1000, 2e-3)])


def test_calibration_chunks_cover_the_prompt_with_several_sizes():
    for L in (1, 7, 256, 2048, 3001):
        chunks = calibration_chunks(L)
        assert sum(chunks) == L and min(chunks) >= 1
    assert set(calibration_chunks(2048)[:5]) == {16, 32, 128, 256, 512}  # and the remainder last
    # the measured modes' own chunk sizes too (shorter than the prompt), each seen where the others are
    plan = calibration_chunks(4096, extra={2048, 1024, 4096, 0})
    assert sum(plan) == 4096 and set(plan[:6]) == {32, 64, 256, 512, 1024, 2048}
    assert calibration_chunks(2048, extra=()) == calibration_chunks(2048)
    with pytest.raises(ValueError, match="positive"):
        calibration_chunks(0)


# ---- roofline ----------------------------------------------------------------------------------------------------

def test_roofline_matches_hand_figures_for_a_compute_bound_chunk():
    cfg = get_preset("llama3-8b")
    dev = get_device("h100")
    cost = RooflineCost(cfg, layers=1, device=dev)
    x, p = 4096, 8192
    gemm = 2 * cfg.params_per_layer * x / (989e12 * dev.gemm_efficiency)
    attn = 4 * 32 * 128 * (x * p + x * (x + 1) / 2) / (989e12 * dev.attention_efficiency)
    elem = (12 * 4096 + 4 * 14336) * x * 2 / (3350e9 * dev.memory_efficiency)
    assert float(cost(x, p)) == pytest.approx(gemm + attn + elem + 8 * dev.launch_s, rel=1e-12)
    # a one-token chunk is weight-bound: reading the layer's weights
    assert float(cost(1, 0)) > cfg.params_per_layer * 2 / (3350e9 * dev.memory_efficiency)


@pytest.mark.parametrize("x,p", [(4096, 8192), (2048, 0), (1000, 3500), (512, 100_000)])
def test_roofline_counts_a_sliding_windows_pairs(x, p):
    """In a windowed layer query i (position p + i) attends to min(p + i + 1, W) positions: the attention term is
    that many pairs (counted one by one here), compute-bound at these sizes; the rest of the layer is unchanged."""
    W = 4096
    cfg = get_preset("llama3-8b").replace(sliding_window=W, window_layers=(0, 9))
    dev = get_device("h100")
    pairs = sum(min(p + i + 1, W) for i in range(x))
    full = x * p + x * (x + 1) / 2
    saved = 4 * 32 * 128 * (full - pairs) / (989e12 * dev.attention_efficiency)
    plain, windowed = RooflineCost(cfg, layers=3, device=dev), RooflineCost(cfg, layers=3, device=dev, windowed=2)
    assert float(plain(x, p) - windowed(x, p)) == pytest.approx(2 * saved, rel=1e-9, abs=1e-15)
    assert [c.windowed for c in roofline_stage_costs(cfg, 4, "h100")] == [1, 1, 0, 0]


def test_roofline_stages_split_like_the_engine_and_only_the_last_has_the_head():
    costs = roofline_stage_costs(get_preset("llama3-70b"), 3, "a100")
    assert [c.layers for c in costs] == [27, 27, 26]
    assert [c.last_stage for c in costs] == [False, False, True]
    assert costs[0].memory_bytes(1024) > 27 * get_preset("llama3-70b").params_per_layer * 2


def test_memory_counts_the_embedding_on_the_first_stage_and_the_head_on_the_last():
    """70B over 3 stages, batch 4, 72k tokens: stage 0 holds 27 layers + the 128256 x 8192 embedding + its KV cache,
    80.9 GB, which an 80 GB H100 does not fit (the projection used to leave the embedding out and say it fits)."""
    cfg = get_preset("llama3-70b")
    costs = roofline_stage_costs(cfg, 3, "h100", batch=4)
    L = 73728 + 1
    kv = lambda layers: layers * 4 * L * 2 * 8 * 128 * 2  # noqa: E731
    table = 128256 * 8192 * 2
    assert costs[0].memory_bytes(L) == 27 * cfg.params_per_layer * 2 + table + kv(27)
    assert costs[1].memory_bytes(L) == 27 * cfg.params_per_layer * 2 + kv(27)
    assert costs[2].memory_bytes(L) == 26 * cfg.params_per_layer * 2 + table + kv(26)
    assert costs[0].memory_bytes(L) > 80e9
    from bench.simulate import project
    assert project(cfg, 3, "h100", "nvlink", 73728, batch=4)["fits_in_memory"] is False
    one = roofline_stage_costs(cfg.replace(tie_embeddings=True), 1, "h100")[0]  # one stage, tied: one table
    assert one.memory_bytes(1) == 80 * cfg.params_per_layer * 2 + table + 80 * 2 * 8 * 128 * 2


def test_projection_uses_the_balanced_plan_it_announces():
    """`chunk_plan` was shadowed by the uniform helper: every point ran 2048-token chunks. 70B on 8 stages over
    NVLink at 4k: the planner's 16 x 256 (182 ms), not 2 x 2048 (524 ms)."""
    from bench.simulate import project
    row = project(get_preset("llama3-70b"), 8, "h100", "nvlink", 4096)
    assert row["plan"] == "balanced" and row["chunks"] == 16 and row["first_chunk"] == row["last_chunk"] == 256
    assert row["overlapped_ms"] == pytest.approx(182.07, abs=0.05)
    uniform = project(get_preset("llama3-70b"), 8, "h100", "nvlink", 4096, plan="uniform", chunk_size=2048)
    assert uniform["chunks"] == 2 and uniform["overlapped_ms"] > 500


def test_projection_table_prints_prompt_lengths_as_given():
    """1000 tokens read '0k' in the projection table; lengths that are not whole k are printed whole."""
    from bench.simulate import project, table
    rows = [project(get_preset("llama3-8b"), 2, "h100", "nvlink", L) for L in (1000, 4096)]
    lines = table(rows).splitlines()
    assert " 1000 " in lines[1] and " 4k " in lines[2] and " 0k " not in table(rows)


def test_unknown_presets_are_named():
    with pytest.raises(ValueError, match="unknown device preset 'tpu'"):
        get_device("tpu")
    with pytest.raises(ValueError, match="unknown link preset 'carrier-pigeon'"):
        link_preset("carrier-pigeon")
    assert link_preset("nvlink", "h100").bandwidth_gbps > link_preset("pcie5").bandwidth_gbps > \
        link_preset("100gbe").bandwidth_gbps


# ---- planner -----------------------------------------------------------------------------------------------------

def _brute_force(L, g, S, link, bpt, K):
    bounds = list(range(0, L, g)) + [L]
    N = len(bounds) - 1
    best = (np.inf, None)
    for r in range(N):
        for cuts in itertools.combinations(range(1, N), r):
            b = [0, *cuts, N]
            chunks = [bounds[j] - bounds[i] for i, j in zip(b[:-1], b[1:])]
            if K is None or len(chunks) == K:
                best = min(best, (predicted_makespan(chunks, COST, S, link, bpt), chunks))
    return best


@pytest.mark.parametrize("L, g, S", [(1000, 100, 2), (1030, 64, 4), (777, 50, 3), (300, 300, 2)])
@pytest.mark.parametrize("link", [None, LinkModel(0.001, 1e-3)])
@pytest.mark.parametrize("K", [None, 1, 3])
def test_planner_is_optimal_against_brute_force(L, g, S, link, K):
    if K is not None and K > -(-L // g):
        with pytest.raises(ValueError, match="num_chunks must be in"):
            plan_chunks(L, COST, S, g, num_chunks=K)
        return
    value, _ = _brute_force(L, g, S, link, 4096, K)
    plan = plan_chunks(L, COST, S, g, link=link, bytes_per_token=4096, num_chunks=K)
    assert sum(plan.chunks) == L and (K is None or len(plan.chunks) == K)
    assert plan.predicted_s == pytest.approx(value, rel=1e-12)
    assert plan.predicted_s == pytest.approx(predicted_makespan(plan.chunks, COST, S, link, 4096), rel=1e-12)


def _every_cap(L, g, S, cost, link, bpt):
    """The planner's objective minimised by trying every distinct cap (one DP each): slow, simple, exact."""
    bounds = np.array(list(range(0, L, g)) + [L])
    N = len(bounds) - 1
    x = lambda a, b: bounds[b] - bounds[a]  # noqa: E731
    t = {(a, b): float(cost(x(a, b), bounds[a])) for a in range(N) for b in range(a + 1, N + 1)}
    e = {k: v + (link.delay_s(int(x(*k)) * bpt) if link else 0.0) for k, v in t.items()}
    best = np.inf
    for cap in sorted(set(e.values())):
        f = np.full(N + 1, np.inf)
        f[0] = 0.0
        arg = [0] * (N + 1)
        for b in range(1, N + 1):
            cands = [(f[a] + t[a, b], a) for a in range(b) if e[a, b] <= cap]
            if cands:
                f[b], arg[b] = min(cands)
        if np.isfinite(f[N]):
            path, b = [], N
            while b:
                path.append((arg[b], b))
                b = arg[b]
            best = min(best, f[N] + (S - 1) * max(e[k] for k in path))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_planner_is_exact_where_a_sampled_search_was_not(seed):
    """40-70 boundaries give ~800-2500 distinct caps, past the 256 the planner used to sample from: every cap,
    tried one by one, finds nothing better than the planner."""
    rng = np.random.default_rng(seed)
    cost = ChunkCost(*(rng.uniform(0, 1) * np.array([2e-9, 4e-9, 1e-5, 3e-4])))
    L, g, S = int(rng.integers(40, 70)) * 64, 64, int(rng.integers(2, 9))
    link = LinkModel(float(rng.uniform(0.5, 20)), 2e-5) if seed % 2 else None
    plan = plan_chunks(L, cost, S, g, link=link, bytes_per_token=16384)
    assert plan.predicted_s == pytest.approx(_every_cap(L, g, S, cost, link, 16384), rel=1e-12)
    assert plan.predicted_s == pytest.approx(predicted_makespan(plan.chunks, cost, S, link, 16384), rel=1e-12)


def test_planner_finds_the_70b_plan_that_sampling_missed():
    """70B over 8 stages on 100 GbE at 16k tokens, granularity 256: 64 chunks of 256 (672.5 ms predicted), not the
    32 x 512 (702.0 ms) a search over 256 sampled caps settled on."""
    from pipeline.costs import link_preset
    cfg = get_preset("llama3-70b")
    plan = plan_chunks(16384, stage_max(roofline_stage_costs(cfg, 8, "h100")), 8, 256, link=link_preset("100gbe"),
                       bytes_per_token=cfg.hidden_size * 2)
    assert plan.chunks == [256] * 64 and plan.predicted_s == pytest.approx(0.67254, abs=1e-5)


def test_balanced_chunks_shrink_as_the_prefix_grows_and_beat_uniform():
    attention_heavy = ChunkCost(a=1e-8, b=2e-8, c=1e-5, d=1e-4)
    L, S = 8192, 4
    uniform = chunk_plan(L, 512)
    plan = plan_chunks(L, attention_heavy, S, 128, num_chunks=len(uniform))
    assert plan.chunks[0] > plan.chunks[-1]
    assert plan.predicted_s < predicted_makespan(uniform, attention_heavy, S)


def test_planner_respects_max_chunk_and_scales_to_long_prompts():
    plan = plan_chunks(131072, COST, 8, 512, max_chunk=4096)
    assert sum(plan.chunks) == 131072 and max(plan.chunks) <= 4096


@pytest.mark.parametrize("kw, needle", [
    (dict(prompt_len=0), "prompt_len must be a positive integer"),
    (dict(granularity=-4), "granularity must be a positive integer"),
    (dict(stages=0), "stages must be a positive integer"),
    (dict(granularity=2000), "granularity 2000 is larger than the prompt"),
    (dict(num_chunks=50), "num_chunks must be in 1..16"),
    (dict(max_chunk=10), "max_chunk 10 is smaller than the granularity"),
    (dict(prompt_len=100_000, granularity=32), "3125 pieces; the planner takes up to 1024 \\(granularity >= 98\\)"),
])
def test_planner_refuses_bad_input(kw, needle):
    args = dict(prompt_len=1000, cost=COST, stages=2, granularity=64) | kw
    with pytest.raises(ValueError, match=needle):
        plan_chunks(**args)


# ---- simulator ---------------------------------------------------------------------------------------------------

PER_TOKEN = lambda x, p: 0.001 * np.asarray(x, dtype=float)  # noqa: E731  1 ms per token
SLOW_LINK = LinkModel(bandwidth_gbps=1e-6)  # 1000 B/s: a 10-token chunk at 1 B/token takes 10 ms


@pytest.mark.parametrize("mode, expected", [
    ("unchunked", 0.160),  # one device, 2 × 80 ms
    ("naive", 0.240),  # 80 compute + 80 send + 80 compute
    ("chunked", 0.170),  # blocking sends: stage 0 spends 20 ms per chunk (10 compute + 10 send)
    ("overlapped", 0.100),  # 8 × 10 ms on stage 0, then the last chunk's send and compute
])
def test_simulator_matches_hand_worked_schedules(mode, expected):
    sim = simulate(mode, [10] * 8, [PER_TOKEN, PER_TOKEN], SLOW_LINK, bytes_per_token=1)
    assert sim.makespan_s == pytest.approx(expected, abs=1e-12)
    if mode != "unchunked":
        assert sim.metrics["bytes_per_boundary"] == [80]


@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_overlapped_with_a_free_link_is_the_flow_shop_bound(S):
    chunks = [64, 200, 64, 128, 96]
    sim = simulate("overlapped", chunks, [COST] * S)
    t = [float(COST(x, sum(chunks[:k]))) for k, x in enumerate(chunks)]
    assert sim.makespan_s == pytest.approx(sum(t) + (S - 1) * max(t), rel=1e-12)
    assert sim.metrics["exposed_comm_s"] == pytest.approx(0.0, abs=1e-12)


def test_simulated_run_reads_like_a_measured_one():
    sim = simulate("overlapped", [10] * 8, [PER_TOKEN] * 3, SLOW_LINK, bytes_per_token=1)
    assert {"ttft_s", "exposed_comm_s", "bubble_fraction", "ideal_s", "equal_stage_formula_s",
            "bytes_per_boundary"} <= set(sim.metrics)
    lanes = {(e["stage"], e["lane"]) for e in sim.events}
    assert {(0, "compute"), (0, "send"), (1, "send"), (2, "compute")} <= lanes
    assert all(set(e) == {"stage", "lane", "name", "start", "end"} for e in sim.events)
    # a stage never runs two chunks at once, and chunks run in order
    for s in range(3):
        comp = sorted((e["start"], e["end"]) for e in sim.events if e["stage"] == s and e["lane"] == "compute")
        assert all(a_end <= b_start + 1e-15 for (_, a_end), (b_start, _) in zip(comp, comp[1:]))


def test_overlap_hides_a_link_slower_than_naive_and_chunking_needs_it():
    stages = [PER_TOKEN] * 4
    naive = simulate("naive", [10] * 16, stages, SLOW_LINK, 1).makespan_s
    chunked = simulate("chunked", [10] * 16, stages, SLOW_LINK, 1).makespan_s
    over = simulate("overlapped", [10] * 16, stages, SLOW_LINK, 1).makespan_s
    assert over < chunked < naive


def test_simulator_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown mode"):
        simulate("eager", [4], [COST])
    with pytest.raises(ValueError, match=r"chunk sizes\[1\] must be a positive integer"):
        simulate("chunked", [4, 0], [COST])
    with pytest.raises(ValueError, match="one cost per stage"):
        simulate("chunked", [4], [])


@pytest.mark.parametrize("mode", ["unchunked", "naive", "chunked", "overlapped"])
@pytest.mark.parametrize("S", [2, 3])
def test_replay_of_a_run_reproduces_it(mode, S):
    # a simulated run is a run whose every interval the event model explains: replayed on its own compute times it
    # comes back identical, and a run whose chunk took longer replays with that chunk's time
    chunks = [64, 200, 64, 128, 96]
    link = LinkModel(bandwidth_gbps=1e-3, latency_s=2e-4)
    sim = simulate(mode, chunks, [COST, ChunkCost(0, 0, 2e-5, 1e-4), COST][:S], link, bytes_per_token=4)
    again = replay(mode, sim.records, link, bytes_per_token=4)
    assert again.makespan_s == pytest.approx(sim.makespan_s, rel=1e-12)
    # pytest.approx compares flat sequences only (pytest >= 9.2 refuses nested ones)
    assert [t for e in again.events for t in (e["start"], e["end"])] == pytest.approx(
        [t for e in sim.events for t in (e["start"], e["end"])], rel=1e-12)
    a, b = sim.records[-1].compute[-1]
    sim.records[-1].compute[-1] = (a, b + 0.5)  # the last stage stalled 0.5 s on the last chunk
    assert replay(mode, sim.records, link, 4).makespan_s == pytest.approx(sim.makespan_s + 0.5, rel=1e-9)


STAGE_TIMES = {  # hand-worked schedules: (mode, per-stage cost, chunks) -> (free-link makespan, equal-stage formula)
    # naive, stages of 1 s and 3 s: 1 + 3 = 4 s; the formula takes the slowest stage twice: 3 + 3 = 6 s
    "naive-unequal": ("naive", [lambda x, p: 1.0, lambda x, p: 3.0], [4], 4.0, 6.0),
    # chunked, both stages [1, 3, 1, 3] s on the four chunks, free link: blocking sends wait for the receiver, so
    # stage 0 starts chunk 2 at 4 and hands it over at 7 (stage 1 busy with chunk 1): 13 s; formula 8 + 3 = 11 s
    "chunked-blocking": ("chunked", [lambda x, p: [1.0, 3.0][int(p) % 2]] * 2, [1, 1, 1, 1], 13.0, 11.0),
    # overlapped, same work: sends never block the sender, the flow-shop bound holds: 8 + 3 = 11 s
    "overlapped": ("overlapped", [lambda x, p: [1.0, 3.0][int(p) % 2]] * 2, [1, 1, 1, 1], 11.0, 11.0),
}


@pytest.mark.parametrize("case", list(STAGE_TIMES))
def test_the_bound_is_the_free_link_makespan_not_the_equal_stage_formula(case):
    from pipeline.simulate import free_link_bound
    mode, costs, chunks, makespan, formula = STAGE_TIMES[case]
    run = simulate(mode, chunks, costs)  # a run whose compute times are exactly these
    assert free_link_bound(mode, run.records) == pytest.approx(makespan, abs=1e-12)
    assert run.metrics["equal_stage_formula_s"] == pytest.approx(formula, abs=1e-12)
    assert run.metrics["ideal_s"] == pytest.approx(sum(sum(b - a for a, b in r.compute) for r in run.records) / 2)
    slower = simulate(mode, chunks, costs, LinkModel(None, 0.25))  # a link that costs time: above the bound
    assert slower.makespan_s > free_link_bound(mode, slower.records) - 1e-12


def test_measured_cost_refuses_an_incomplete_or_foreign_run():
    record = StageRecord(0, [4, 4], compute=[(0.0, 1.0)])
    with pytest.raises(ValueError, match="1 compute intervals for 2 chunks"):
        MeasuredCost(record)
    cost = MeasuredCost(StageRecord(0, [4, 4], compute=[(0.0, 1.0), (1.0, 3.0)]))
    assert cost(4, 4) == 2.0
    with pytest.raises(ValueError, match="no chunk of 8 tokens at position 0"):
        cost(8, 0)
    with pytest.raises(ValueError, match="stage records"):
        replay("chunked", [])


def test_stage_max_takes_the_slowest_stage_per_chunk():
    fast, slow_prefix = ChunkCost(0, 0, 1e-3, 0), ChunkCost(0, 1e-6, 0, 0)
    f = stage_max([fast, slow_prefix])
    assert float(f(10, 0)) == pytest.approx(1e-2)
    assert float(f(10, 10_000)) == pytest.approx(0.1)


# ---- pauses ------------------------------------------------------------------------------------------------------

def test_active_clock_cuts_pauses_out():
    clock = ActiveClock([(3.0, 3.5), (1.0, 2.0)])
    assert [clock(t) for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.2, 4.0)] == [0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.5]
    assert clock.paused_between(0.5, 4.0) == pytest.approx(1.5)
    assert ActiveClock([])(7.0) == 7.0


def test_pause_correction_rederives_a_runs_figures():
    from bench.pauses import cut_pauses
    from pipeline.launch import PrefillResult
    rec0 = StageRecord(0, [1, 1], compute=[(0.0, 1.0), (1.0, 4.0)], send=[(1.0, 1.1), (4.0, 4.1)], bytes_sent=8)
    rec1 = StageRecord(1, [1, 1], compute=[(1.1, 2.1), (4.1, 5.1)], recv_wait=[(0.0, 1.1), (2.1, 4.1)])
    res = PrefillResult("overlapped", [1, 1], None, {"ttft_s": 5.1, "decode_s": 0.3}, [], records=[rec0, rec1],
                        t_start=0.0, t_end=5.1)
    cut_pauses(res, ActiveClock([(2.0, 4.0)]))  # chunk 1 of stage 0 was paused for 2 of its 3 seconds
    assert res.metrics["ttft_s"] == pytest.approx(3.1)
    assert res.metrics["wall_ttft_s"] == pytest.approx(5.1)
    assert res.metrics["paused_s"] == pytest.approx(2.0)
    assert res.metrics["compute_s"] == pytest.approx([2.0, 1.9])  # stage 1's chunk 0 ran into the pause too
    assert res.metrics["decode_s"] == 0.3
    assert max(e["end"] for e in res.timeline) == pytest.approx(3.1)


def test_a_run_seen_paused_throughout_keeps_its_wall_clock_figures():
    """A starved monitor can report a 'pause' covering a whole short run; cutting it would leave a TTFT of 0."""
    from bench.pauses import cut_pauses
    from pipeline.launch import PrefillResult
    rec = StageRecord(0, [1], compute=[(1.0, 1.5)])
    res = PrefillResult("unchunked", [1], None, {"ttft_s": 0.5}, [], records=[rec], t_start=1.0, t_end=1.5)
    cut_pauses(res, ActiveClock([(0.9, 1.6)]))
    assert res.metrics["ttft_s"] == 0.5 and res.metrics["wall_ttft_s"] == 0.5
    assert res.metrics["pause_cut"] is False and res.metrics["paused_s"] == pytest.approx(0.5)
    assert res.records == [rec] and (res.t_start, res.t_end) == (1.0, 1.5)


def test_a_chunk_seen_paused_throughout_keeps_the_runs_wall_clock_figures():
    """A chunk's compute cannot lie wholly in a machine pause (it resumes to compute): a 'pause' that covers one is a
    starved monitor, and cutting it would leave a compute of 0 and a bound of 0 (a division by zero in the harness,
    seen under a loaded CPU)."""
    from bench.pauses import cut_pauses
    from pipeline.launch import PrefillResult
    from pipeline.simulate import free_link_bound
    rec0 = StageRecord(0, [1, 1], compute=[(0.0, 1.0), (1.0, 2.0)], send=[(1.0, 1.0), (2.0, 2.0)], bytes_sent=8)
    rec1 = StageRecord(1, [1, 1], compute=[(1.0, 2.0), (2.0, 3.0)], recv_wait=[(0.0, 1.0), (2.0, 2.0)])
    res = PrefillResult("overlapped", [1, 1], None, {"ttft_s": 3.0}, [], records=[rec0, rec1], t_start=0.0,
                        t_end=3.0)
    cut_pauses(res, ActiveClock([(0.9, 2.1)]))  # every stage's chunks 1 (stage 0) and 0 (stage 1) inside the pause
    assert res.metrics["pause_cut"] is False and res.metrics["ttft_s"] == 3.0
    assert res.metrics["paused_s"] == pytest.approx(1.2) and res.records == [rec0, rec1]
    assert free_link_bound("overlapped", res.records) > 0


def test_steadiness_tells_stops_from_slow_downs():
    from bench.pauses import steadiness
    counts = [1000] * 10 + [400] * 4 + [990] * 6 + [3] * 5  # 20 windows ran (4 at 40% speed), 5 were stopped in
    stopped = [False] * 20 + [True] * 5
    s = steadiness(counts, stopped)
    assert s == dict(windows=25, stopped_fraction=0.2, slowed_fraction=0.2, median_speed=1.0)
    with pytest.raises(ValueError, match="stopped in every window"):
        steadiness([1, 2], [True, True])


def test_spin_windows_counts_every_window():
    from bench.pauses import spin_windows
    counts, stopped = spin_windows(0.05, window_s=0.01)
    assert len(counts) == len(stopped) == 5 and sum(counts) > 0
    with pytest.raises(ValueError, match="must be positive"):
        spin_windows(0, 0.01)


def test_the_pause_monitor_ends_quietly_when_its_parent_is_gone():
    """A run interrupted while it starts the pause monitor closes the monitor's pipe before the monitor says
    "ready" (seen once in CI: SIGTERM between two points of a sweep): the monitor then ends at once with exit code
    0 and writes nothing to the stderr it shares with the interrupted run (a BrokenPipeError traceback there came
    after the run's own last line). With its parent there, it reports the pauses it saw as JSON."""
    import json
    import subprocess
    import sys

    from bench.pauses import _MONITOR
    proc = subprocess.Popen([sys.executable, "-c", _MONITOR, "0.01"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the monitor has started up, let alone printed "ready"
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == ""
    proc = subprocess.Popen([sys.executable, "-c", _MONITOR, "0.01"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    out, err = proc.communicate("", timeout=60)
    assert isinstance(json.loads(out), list) and err == ""


def test_the_default_granularity_is_32_and_never_too_fine_for_the_planner():
    from pipeline.plan import MAX_BOUNDARIES, check_granularity, default_granularity
    assert [default_granularity(L) for L in (1, 31, 32, 4096, 32768, 32769, 131072)] == [1, 31, 32, 32, 32, 33, 128]
    for L in (1, 31, 32768, 32769, 100_000, 131072, 1_000_003):
        g = default_granularity(L)
        check_granularity(L, g)  # no error: a prompt shorter than 32 tokens is one piece
        assert -(-L // g) <= MAX_BOUNDARIES and (g in (32, L) or -(-L // (g - 1)) > MAX_BOUNDARIES)  # the finest
