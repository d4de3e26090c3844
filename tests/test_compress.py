"""Compressed stage-boundary sends (pipeline.compress): the codecs against float64, and a compressed pipeline equal
to the unchunked model with the same rounding applied at the boundaries, in every mode and link."""
from __future__ import annotations

import re

import pytest
import torch

from pipeline import run_prefill
from pipeline.compress import FP8_MAX, Codec, check_codec
from pipeline.config import get_preset
from pipeline.model import load_model

TINY = get_preset("tiny")


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 17, 96), (2, 5, 33)])
def test_fp8_codec_rounds_each_element_to_e4m3_of_its_tokens_scale(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])[None, :, None]  # tokens of any size
    x[0, 0, :3] = torch.tensor([0.0, -1e-30, 7.5])
    codec = Codec("fp8")
    wire = codec.encode(x)
    assert wire.dtype == torch.uint8 and wire.shape == (*shape[:2], shape[2] + 4)
    assert codec.wire(shape, torch.float32) == (tuple(wire.shape), torch.uint8)
    y = codec.decode(wire, torch.float32)
    x64 = x.double()
    scale = x64.abs().amax(-1, keepdim=True) / FP8_MAX
    # e4m3: 3 mantissa bits (half an ulp is 2^-4 relative); below 2^-6 subnormal, steps of 2^-9, all times the scale
    bound = torch.maximum(x64.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
    assert ((y.double() - x64).abs() <= bound).all()
    assert (y.abs().amax(-1) <= x.abs().amax(-1) * (1 + 2 ** -4)).all()  # the largest element survives


def test_fp8_codec_keeps_zero_and_huge_tokens_finite():
    x = torch.zeros(1, 3, 8)
    x[0, 1] = 3e38
    x[0, 2, 0] = -1e-38
    y = Codec("fp8").decode(Codec("fp8").encode(x), torch.float32)
    assert torch.isfinite(y).all() and (y[0, 0] == 0).all()
    assert torch.allclose(y[0, 1], x[0, 1], rtol=2 ** -4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_sizes(dtype):
    B, H = 3, 64
    assert Codec("none").bytes_per_token(B, H, dtype) == B * H * dtype.itemsize
    assert Codec("fp8").bytes_per_token(B, H, dtype) == B * (H + 4)
    if dtype == torch.float32:
        assert Codec("bf16").bytes_per_token(B, H, dtype) == B * H * 2
        x = torch.randn(B, 5, H)
        assert torch.equal(Codec("bf16").decode(Codec("bf16").encode(x), dtype), x.bfloat16().float())


@pytest.mark.parametrize("name,dtype,match", [("zstd", None, "unknown boundary compression 'zstd'"),
                                              ("bf16", torch.float16, "needs a float32 model"),
                                              ("bf16", torch.bfloat16, "needs a float32 model")])
def test_codecs_that_would_not_shrink_the_sends_are_refused(name, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_codec(name, dtype)


def _boundary_rounded_reference(cfg, tokens, codec, stages=2, device="cpu"):
    """The whole model unchunked, each stage-boundary hidden state passed through the codec: per-token scales make
    this what a chunked, compressed pipeline computes."""
    from pipeline.stage import split_layers
    h, caches = tokens, []
    parts = split_layers(cfg.num_layers, stages)
    for i, layers in enumerate(parts):
        m = load_model(cfg, layers=layers, device=device)
        cache = m.new_cache(tokens.shape[0], tokens.shape[1] + 1)
        h = m.forward_chunk(h, 0, cache, last_only=i == len(parts) - 1)
        caches.append(cache)
        if i < len(parts) - 1:
            h = codec.decode(codec.encode(h), torch.float32)
    return h.cpu(), caches


@pytest.mark.parametrize("name", ["bf16", "fp8"])
@pytest.mark.parametrize("mode,link", [("naive", "inprocess"), ("chunked", "inprocess"), ("overlapped", "inprocess"),
                                       ("overlapped", "gloo")])
def test_a_compressed_pipeline_equals_the_model_rounded_at_its_boundaries(name, mode, link):
    B, L = 2, 37
    tokens = torch.randint(0, TINY.vocab_size, (B, L), generator=torch.Generator().manual_seed(7))
    ref_logits, ref_caches = _boundary_rounded_reference(TINY, tokens, Codec(name))
    res = run_prefill(TINY, tokens, mode=mode, stages=2, chunks=[1, 12, 5, 19], link=link, compress=name,
                      return_cache=True, **({"threads": 1} if link == "gloo" else {}))
    assert (res.logits - ref_logits).abs().max().item() <= 1e-5
    assert (res.caches[1][0] - ref_caches[1].k[:, :, :L]).abs().max().item() <= 1e-5
    plain = run_prefill(TINY, tokens, mode="unchunked")
    assert (res.logits - plain.logits).abs().max().item() > 1e-5  # the rounding is really there
    per_token = Codec(name).bytes_per_token(B, TINY.hidden_size, torch.float32)
    assert res.metrics["bytes_per_boundary"] == [L * per_token]
    assert res.metrics["decode_bytes_per_boundary"] == [per_token]


def test_the_harness_reports_lossy_rows_against_the_same_run_uncompressed():
    from bench.harness import run_point
    from pipeline import PipelineSpec
    point = run_point(PipelineSpec(source="tiny", stages=2), 24, 1, [8, 8, 8], repeats=1, warmup=0,
                      modes=["unchunked", "overlapped"], compress=["none", "fp8"])
    assert list(point["modes"]) == ["unchunked", "overlapped", "overlapped/fp8"]
    lossy, plain = point["modes"]["overlapped/fp8"], point["modes"]["overlapped"]
    assert lossy["compress"] == "fp8" and lossy["bytes_exact"] and lossy["outputs_match"]
    assert lossy["prefill_bytes_per_boundary"] == [24 * (64 + 4)]
    assert 0 < lossy["max_abs_dlogits_vs_uncompressed"] and 0 < lossy["rel_dlogits"] < 0.2
    assert 0 <= lossy["greedy_match_fraction"] <= 1
    assert plain["outputs_match"] and plain["max_abs_dlogits"] <= 1e-4


def test_one_lossy_codec_leaves_the_baseline_uncompressed():
    """--compress fp8 alone: every pipelined row is fp8 and keeps its mode's name; the unchunked baseline crosses no
    boundary, so it is neither compressed nor reported as lossy."""
    from bench.harness import run_point
    from pipeline import PipelineSpec
    point = run_point(PipelineSpec(source="tiny", stages=2), 24, 1, [8, 8, 8], repeats=1, warmup=0,
                      modes=["naive", "unchunked"], compress=["fp8"])
    assert list(point["modes"]) == ["naive", "unchunked"]
    assert point["modes"]["unchunked"]["compress"] == "none" and point["modes"]["unchunked"]["max_abs_dlogits"] == 0
    assert point["modes"]["naive"]["compress"] == "fp8" and point["modes"]["naive"]["bytes_exact"]
    assert "max_abs_dlogits_vs_uncompressed" not in point["modes"]["naive"]  # no uncompressed row in this run


@pytest.mark.parametrize("argv,match", [
    (["--stages", "1", "--compress", "fp8"], "needs --stages 2 or more"),
    (["--compress", "bf16", "--dtype", "bfloat16"], "needs a float32 model"),
    (["--compress", "lz4"], "unknown compression 'lz4'"),
])
def test_bad_compress_options_are_refused_in_one_line(argv, match, capsys):
    from bench.cli import main
    try:
        code = main(["--model", "tiny", "--out", "/nonexistent/never-made"] + argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_a_compressed_pipeline_on_gpu_streams_equals_the_rounded_model(cuda, name):
    B, L = 2, 37
    tokens = torch.randint(0, TINY.vocab_size, (B, L), generator=torch.Generator().manual_seed(7))
    ref_logits, _ = _boundary_rounded_reference(TINY, tokens.cuda(), Codec(name), device="cuda")
    res = run_prefill(TINY, tokens, mode="overlapped", stages=2, chunk_size=8, device="cuda", compress=name,
                      bandwidth_gbps=1e-3)
    assert (res.logits - ref_logits).abs().max().item() <= 1e-4
    assert res.metrics["bytes_per_boundary"] == [L * Codec(name).bytes_per_token(B, TINY.hidden_size, torch.float32)]
