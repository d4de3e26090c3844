"""The reference model: agrees with Hugging Face transformers, chunked == unchunked, decode == extended forward,
and bad input is refused with a clear message."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from pipeline import ModelConfig, PRESETS, load_model
from tests.conftest import make_hf_checkpoint, read_state


@pytest.mark.parametrize("model_type,gqa,tied", [
    ("llama", False, False),  # MHA, untied
    ("llama", True, False),  # GQA, untied
    ("llama", True, True),  # GQA, tied
    ("llama", False, True),  # MHA, tied
    ("qwen2", True, False),  # q/k/v biases
    ("qwen2", True, True),  # q/k/v biases, tied
    ("mistral", True, False),  # no biases, no sliding window
    ("qwen3", True, False),  # RMSNorm over each head of q and k before RoPE
    ("qwen3", False, True),  # the same, MHA, tied
    ("phi3", True, False),  # q, k, v stored as one qkv_proj, gate and up as one gate_up_proj
    ("phi3", False, True),  # the same, MHA, tied
])
def test_logits_match_transformers(tmp_path, model_type, gqa, tied):
    hf = make_hf_checkpoint(tmp_path, model_type, gqa=gqa, tied=tied)
    ours = load_model(tmp_path)
    tokens = torch.randint(0, 128, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {}),  # every layer windowed (Mistral 7B v0.1)
    ("phi3", {}),  # every layer windowed (Phi-3-mini-4k: 2047)
    ("qwen2", dict(use_sliding_window=True, max_window_layers=1)),  # the layers from max_window_layers on
    ("qwen3", dict(use_sliding_window=True, layer_types=["sliding_attention", "full_attention",
                                                         "sliding_attention"])),  # as layer_types lists them
    ("smollm3", dict(use_sliding_window=True, no_rope_layer_interval=2)),  # the NoPE layers
])
def test_sliding_window_layers_match_transformers(tmp_path, model_type, extra):
    """A sliding window shorter than the prompt, in the layers transformers applies it to: the model whole, a
    2-stage pipeline of T = 2 shards (chunks of 5 across the window's edge), and a ragged batch with decode, each
    against transformers' windowed model; the window is shown to matter (the same model without it differs)."""
    hf = make_hf_checkpoint(tmp_path, model_type, sliding_window=7, **extra)
    cfg = ModelConfig.from_hf(tmp_path)
    types = getattr(hf.config, "layer_types", None) or ["sliding_attention"] * 3
    assert cfg.sliding_window == 7 and cfg.max_seq_len == 256
    assert cfg.window_layers == tuple(i for i, t in enumerate(types) if t == "sliding_attention") != ()
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = hf(tokens).logits
        plain = {"sliding_window": None} | ({"layer_types": ["full_attention"] * 3} if extra else {})
        unwindowed = type(hf)(hf.config.__class__(**{**hf.config.to_dict(), **plain})).eval()
        unwindowed.load_state_dict(hf.state_dict())
        assert (unwindowed(tokens).logits - expected).abs().max().item() > 1e-3  # the window counts
        assert_dense_and_shards_match(tmp_path, expected, tokens, 1e-4, chunk_size=5)
        assert_ragged_rows_match(tmp_path, hf, [tokens[0, :6], tokens[1, :33]], 1e-4, mode="overlapped")


def test_the_kernels_run_a_windowed_checkpoint_as_transformers_does(tmp_path):
    """The Triton kernels (interpreter) on a Mistral checkpoint with a window of 6: a 2-stage chunked pipeline, its
    chunks of 4 crossing the window's edge, and decode, against transformers."""
    from pipeline import run_prefill
    hf = make_hf_checkpoint(tmp_path, "mistral", sliding_window=6, layers=2)
    tokens = torch.randint(0, 128, (1, 19), generator=torch.Generator().manual_seed(12))
    res = run_prefill(tmp_path, tokens, mode="chunked", stages=2, chunk_size=4, link="inprocess", ops="triton")
    with torch.no_grad():
        assert (res.logits - hf(tokens).logits[:, -1]).abs().max().item() <= 1e-4
        nxt = torch.cat([tokens[0], res.logits[0].argmax()[None]])
        assert (res.decode_logits[0] - hf(nxt[None]).logits[0, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("extra,match", [
    (dict(layer_types=["sliding_attention", "full"]), "layer_types .* for each of the 3"),
    (dict(layer_types=None, max_window_layers=-1), "max_window_layers=-1"),
])
def test_bad_window_layers_are_refused(tmp_path, extra, match):
    make_hf_checkpoint(tmp_path, "qwen2", sliding_window=8, use_sliding_window=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(tmp_path)


def test_a_window_at_least_the_context_or_switched_off_changes_nothing(tmp_path):
    make_hf_checkpoint(tmp_path / "long", "mistral", sliding_window=256)
    make_hf_checkpoint(tmp_path / "off", "qwen2", sliding_window=16, use_sliding_window=False)
    make_hf_checkpoint(tmp_path / "llama", "llama", sliding_window=16)  # transformers' Llama has no window
    for d in ("long", "off", "llama"):
        cfg = load_model(tmp_path / d).cfg
        assert cfg.max_seq_len == 256 and cfg.sliding_window is None and cfg.window_layers == (), d


@pytest.mark.parametrize("gqa", [True, False])
def test_llama_attention_bias_puts_biases_on_q_k_v_and_o(tmp_path, gqa):
    """Llama's attention_bias=True means a bias on q, k, v *and* o: dropping o's would shift every logit."""
    hf = make_hf_checkpoint(tmp_path, gqa=gqa, attention_bias=True)
    ours = load_model(tmp_path)
    assert ours.cfg.qkv_bias and ours.cfg.o_bias
    tokens = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


def test_qwen3_attention_bias_and_its_head_norms_match_transformers(tmp_path):
    """Qwen3 reads attention_bias as Llama does (q, k, v and o) and norms each head of q and k with weights of its
    own [head_dim], before RoPE; a head dim other than hidden / heads (Qwen3's is 128 at every size)."""
    hf = make_hf_checkpoint(tmp_path, "qwen3", attention_bias=True, head_dim=24)
    ours = load_model(tmp_path)
    assert ours.cfg.qk_norm and ours.cfg.qkv_bias and ours.cfg.o_bias and ours.cfg.head_dim == 24
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0}


def longrope(pairs: int) -> dict:
    """LongRoPE parameters with `pairs` distinct short and long factors (transformers reads the original length from
    the config's top level)."""
    return {**LONGROPE, "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
            "long_factor": [2.0 + i for i in range(pairs)]}


def assert_dense_and_shards_match(path, expected, tokens, tol, chunk_size=8):
    """The model of checkpoint `path`, whole and as a 2-stage pipeline of T = 2 TP shards (overlapped), gives
    transformers' logits `expected` for `tokens` within `tol`."""
    from pipeline import run_prefill
    with torch.no_grad():
        assert (load_model(path)(tokens) - expected).abs().max().item() <= tol
    res = run_prefill(path, tokens, mode="overlapped", stages=2, tp=2, chunk_size=chunk_size, link="inprocess",
                      decode=False)
    assert (res.logits - expected[:, -1]).abs().max().item() <= tol


def assert_ragged_rows_match(path, hf, rows, tol, mode="chunked"):
    """The rows as one ragged batch through a 2-stage pipeline (chunks of 8): each row's logits and its decode
    logits (after its greedy token) equal transformers' for that row alone within `tol`."""
    from pipeline import run_prefill
    res = run_prefill(path, rows, mode=mode, stages=2, chunk_size=8, link="inprocess")
    with torch.no_grad():
        for b, r in enumerate(rows):
            assert (res.logits[b] - hf(r[None]).logits[0, -1]).abs().max().item() <= tol, b
            nxt = torch.cat([r, res.logits[b].argmax()[None]])
            assert (res.decode_logits[b] - hf(nxt[None]).logits[0, -1]).abs().max().item() <= tol, b


@pytest.mark.parametrize("partial", [1.0, 0.75, 0.5])
def test_phi3_partial_rotary_and_longrope_match_transformers(tmp_path, partial):
    """Phi-3.5 / Phi-4-mini kinds of checkpoint: LongRoPE (short factors and the attention factor up to the original
    length, where the context is capped: past it transformers re-rotates the whole sequence with the long factors,
    which the test shows changes the earlier positions' logits) and a partial rotary embedding (the first R of
    D = 16 dims of each head rotated), every mode through a 2-stage pipeline with T = 2 shards."""
    from pipeline import run_prefill
    rotary = int(16 * partial)
    rope = {**longrope(rotary // 2), "partial_rotary_factor": partial}
    hf = make_hf_checkpoint(tmp_path, "phi3", original_max_position_embeddings=40, partial_rotary_factor=partial,
                            rope_parameters=rope)
    ours = load_model(tmp_path)
    cfg = ours.cfg
    assert cfg.max_seq_len == 40 and cfg.rotary_dims == rotary and cfg.fused_proj
    assert cfg.rope_attention_factor == pytest.approx((1 + math.log(256 / 40) / math.log(40)) ** 0.5)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(tokens).logits
        longer = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(5))
        assert (hf(longer).logits[:, :40] - hf(longer[:, :40]).logits).abs().max().item() > 1e-3
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4
    for mode in ("naive", "chunked", "overlapped"):
        res = run_prefill(tmp_path, tokens[:, :39], mode=mode, stages=2, tp=2, chunk_size=9, link="inprocess")
        with torch.no_grad():
            assert (res.logits - hf(tokens[:, :39]).logits[:, -1]).abs().max().item() <= 1e-4, mode
    with pytest.raises(ValueError, match=r"40 tokens \(\+1 decode\) exceeds the model's max_seq_len 40 \(LongRoPE"):
        run_prefill(tmp_path, tokens, mode="chunked", stages=2, link="inprocess")


@pytest.mark.parametrize("model_type,rope", [
    ("qwen2", {"factor": 4.0, "original_max_position_embeddings": 64}),
    ("llama", {"factor": 8.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5,
               "beta_fast": 16, "beta_slow": 2}),
    ("qwen3", {"factor": 2.0, "original_max_position_embeddings": 128, "rope_theta": 1000.0, "truncate": False}),
    ("llama", {"factor": 4.0, "attention_factor": 1.5}),  # the original length: max_position_embeddings
], ids=["qwen2", "mscale-betas", "untruncated", "attention-factor"])
def test_yarn_matches_transformers(tmp_path, model_type, rope):
    """YaRN (Qwen2.5 and Qwen3 past 32k): static per-frequency divisors and an attention factor, exact at every
    position, so no cap on the context; dense, and a 2-stage pipeline of T = 2 shards whose chunks start
    mid-table. Plain RoPE would be 2e-3 or more off here."""
    hf = make_hf_checkpoint(tmp_path, model_type, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                   **rope})
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.max_seq_len == 256 and cfg.rope_freq_factors is not None and cfg.context_limit is None
    tokens = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert_dense_and_shards_match(tmp_path, expected, tokens, 1e-4, chunk_size=30)


def test_phi3_reads_its_original_length_as_transformers_does(tmp_path):
    """transformers prefers a config's top-level original_max_position_embeddings to the RoPE parameters' (and a
    Phi-3 config always has one: 4096 unless it says otherwise)."""
    make_hf_checkpoint(tmp_path, "phi3", rope_parameters=longrope(8))
    hf = json.loads((tmp_path / "config.json").read_text())
    for top, inner, expected in [(None, 32, 256), (48, 32, 48), (None, None, 256)]:
        rope = {**longrope(8), **({"original_max_position_embeddings": inner} if inner else {})}
        cfg = {k: v for k, v in hf.items() if k != "original_max_position_embeddings"}
        cfg |= {"rope_parameters": rope, **({"original_max_position_embeddings": top} if top else {})}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert ModelConfig.from_hf(tmp_path).max_seq_len == expected, (top, inner)


def test_llama_longrope_matches_transformers(tmp_path):
    """LongRoPE is read for every architecture transformers applies it to, not only Phi-3."""
    hf = make_hf_checkpoint(tmp_path, "llama", rope_parameters={**longrope(8), "original_max_position_embeddings": 32})
    ours = load_model(tmp_path)
    assert ours.cfg.max_seq_len == 32 and ours.cfg.rope_freq_factors is not None
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


GRANITE = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.03125, logits_scaling=8.0)


@pytest.mark.parametrize("extra", [GRANITE, dict(GRANITE, tied=True, attention_bias=True, mlp_bias=True), {}],
                         ids=["granite", "tied-biases", "defaults"])
def test_granite_constants_folded_into_the_weights_match_transformers(tmp_path, extra):
    """Granite 3.x: embeddings x embedding_multiplier, block outputs x residual_multiplier, scores x
    attention_multiplier (instead of 1/sqrt(head_dim); its default is 1.0), logits / logits_scaling, all folded
    into the weights at load; dense, and a 2-stage pipeline of T = 2 shards (the q rows and the o, down
    projections each rank holds are scaled, the bias added once)."""
    hf = make_hf_checkpoint(tmp_path, "granite", **extra)
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.attention_multiplier == extra.get("attention_multiplier", 1.0)
    assert (cfg.o_bias, cfg.mlp_bias) == (extra.get("attention_bias", False), extra.get("mlp_bias", False))
    tokens = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = hf(tokens).logits
    scale = expected.abs().max().item()  # logits / 8 are small: compare relative to their size
    assert_dense_and_shards_match(tmp_path, expected, tokens, 1e-5 * scale)


@pytest.mark.parametrize("extra,nope", [
    (dict(layers=4), (3,)),  # no_rope_layers derived: every fourth layer without RoPE
    (dict(no_rope_layers=[1, 0, 0], tied=True, attention_bias=True, mlp_bias=True), (1, 2)),
    (dict(layers=4, no_rope_layer_interval=2), (1, 3)),
], ids=["every-4th", "listed-tied-biases", "every-2nd"])
def test_smollm3_nope_layers_match_transformers(tmp_path, extra, nope):
    """SmolLM3: layers without RoPE (NoPE) among rotated ones; dense, a 2-stage pipeline of T = 2 shards and a
    ragged batch (rows at their own positions) with decode, each against transformers. Within 1e-5: this small
    random model's attention is nearly uniform, so RoPE in every layer would be only 6e-5 to 5e-4 off here."""
    hf = make_hf_checkpoint(tmp_path, "smollm3", **extra)
    assert ModelConfig.from_hf(tmp_path).nope_layers == nope
    tokens = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert_dense_and_shards_match(tmp_path, expected, tokens, 1e-5)
        assert_ragged_rows_match(tmp_path, hf, [tokens[0, :5], tokens[1]], 1e-5)


def test_phi3_configs_in_the_older_format_read_the_same(tmp_path):
    """Phi-3 128k's config.json as published (transformers 4.x): `rope_scaling` with `type` "su" (or "longrope"),
    the original length and partial_rotary_factor at the top level."""
    make_hf_checkpoint(tmp_path, "phi3", original_max_position_embeddings=64, partial_rotary_factor=0.5,
                       rope_parameters={**longrope(4), "partial_rotary_factor": 0.5})
    new = ModelConfig.from_hf(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    for kind in ("su", "longrope"):
        old = {**hf, "rope_theta": rope["rope_theta"], "partial_rotary_factor": 0.5, "original_max_position_embeddings":
               64, "rope_scaling": {"type": kind, "short_factor": rope["short_factor"],
                                    "long_factor": rope["long_factor"]}}
        (tmp_path / "config.json").write_text(json.dumps(old))
        assert ModelConfig.from_hf(tmp_path) == new
    assert new.rotary_dim == 8 and new.max_seq_len == 64 and new.rope_freq_factors == (1.0, 1.1, 1.2, 1.3)


@pytest.mark.parametrize("model_type,rope", [
    ("llama", {"rope_type": "default", "rope_theta": 500000.0}),
    ("llama", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6}),
], ids=["default", "linear", "llama3", "yarn"])
@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_configs_in_the_transformers_4_format_read_the_same(tmp_path, model_type, rope, key):
    """Most checkpoints on the Hub were saved by transformers 4.x: `rope_theta` at the top level and the scaling,
    if any, under `rope_scaling` (its kind as `rope_type`, or `type` in older ones; `null` without scaling), as
    Llama 3.1's and Qwen2.5's config.json are published. The tests' checkpoints are written by transformers 5
    (`rope_parameters`): both formats must give the same model."""
    make_hf_checkpoint(tmp_path, model_type, rope_parameters=rope)
    new = ModelConfig.from_hf(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    params = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    hf["rope_scaling"] = None if kind == "default" else {key: kind, **params}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    old = ModelConfig.from_hf(tmp_path)
    assert old == new
    assert new.rope_theta == rope["rope_theta"]
    assert (new.rope_llama3_scaling is not None) == (kind == "llama3")
    assert (new.rope_linear_factor != 1.0) == (kind == "linear")
    assert (new.rope_freq_factors is not None) == (kind == "yarn")


def test_a_tied_checkpoint_that_also_stores_its_head_loads_if_the_head_is_the_embedding(tmp_path):
    """Some exports of a tied model save lm_head.weight too: a bit-exact copy of the embedding loads (transformers
    ties them, vLLM skips the head), through a pipeline too, whose last stage holds the head; a head that differs
    is refused naming the choice, since transformers would then untie them and vLLM would not."""
    import transformers
    from pipeline import run_prefill
    make_hf_checkpoint(tmp_path, tied=True)
    state = read_state(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, tmp_path / "model.safetensors")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (load_model(tmp_path)(tokens) - expected).abs().max().item() <= 1e-5
    res = run_prefill(tmp_path, tokens, mode="overlapped", stages=2, chunk_size=16, link="inprocess")
    assert (res.logits - expected[:, -1]).abs().max().item() <= 1e-5
    head = state["model.embed_tokens.weight"].clone()
    head[3, 7] += 1e-3
    save_file({**state, "lm_head.weight": head}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lm_head\.weight that differs from model\.embed_tokens\.weight.*"
                                         r"tie_word_embeddings=true.*set it to false"):
        load_model(tmp_path)


def test_a_fused_checkpoint_is_checked_by_its_own_names(tmp_path):
    """Phi-3's fused tensors are what the checkpoint is checked against: a missing qkv_proj and a gate_up_proj of
    the wrong size are named as stored, and a Llama-named q_proj in a phi3 checkpoint is refused as unused."""
    make_hf_checkpoint(tmp_path, "phi3")
    good = read_state(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    save_file({n: t for n, t in good.items() if n != name}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(tmp_path)
    up = "model.layers.2.mlp.gate_up_proj.weight"
    save_file({**good, up: good[up][:150]}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"gate_up_proj\.weight .* has shape \(150, 64\), expected \(192, 64\)"):
        load_model(tmp_path)
    save_file({**good, "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.weight that this 3-layer model does not use"):
        load_model(tmp_path)


def test_a_projection_takes_a_capped_checkpoint_up_to_its_own_context(tmp_path):
    """`bench simulate` needs shapes only: a LongRoPE checkpoint, capped at its original length (40) for exact
    outputs here, is projected up to its max_position_embeddings (256), and refused past that."""
    from bench.simulate import check_grid
    make_hf_checkpoint(tmp_path, "phi3", original_max_position_embeddings=40, rope_parameters=longrope(8))
    cfg = ModelConfig.from_hf(tmp_path)
    assert (cfg.max_seq_len, cfg.checkpoint_context) == (40, 256)
    check_grid({"phi": cfg}, [256], None)
    with pytest.raises(ValueError, match="prompt length 257 exceeds phi's context of 256 tokens"):
        check_grid({"phi": cfg}, [257], None)
    assert PRESETS["tiny"].checkpoint_context is None


def test_partial_rotary_keeps_k_in_the_rotary_order_and_v_as_stored(tmp_path):
    """The rotated pairs (i, i + R/2) are moved to (j, j + D/2), where rotate-half pairs them; q and k alike, v
    untouched: the cache's k is the checkpoint's k in `rotary_order`, rotated."""
    from pipeline.model import rotary_order
    make_hf_checkpoint(tmp_path, "phi3", partial_rotary_factor=0.5)
    cfg = ModelConfig.from_hf(tmp_path)
    order = rotary_order(cfg).tolist()
    assert order == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert rotary_order(cfg.replace(rotary_dim=None)) is None
    assert sorted(rotary_order(cfg.replace(rotary_dim=6)).tolist()) == list(range(16))
    state = read_state(tmp_path / "model.safetensors")
    ours = load_model(tmp_path)
    qkv = state["model.layers.0.self_attn.qkv_proj.weight"]
    w = ours.layers[0].wqkv.weight.detach()
    q, kv = cfg.num_heads * 16, cfg.num_kv_heads * 16
    assert torch.equal(w[:q + kv].view(-1, 16, 64), qkv[:q + kv].view(-1, 16, 64)[:, order])
    assert torch.equal(w[q + kv:], qkv[q + kv:])


@pytest.mark.parametrize("attention_bias", [False, True])
def test_llama_mlp_bias_puts_biases_on_gate_up_and_down(tmp_path, attention_bias):
    """Llama's mlp_bias=True: biases on gate, up and down (down's added after the MLP's sum), alone or with
    attention_bias."""
    hf = make_hf_checkpoint(tmp_path, mlp_bias=True, attention_bias=attention_bias)
    ours = load_model(tmp_path)
    assert ours.cfg.mlp_bias and ours.cfg.o_bias == attention_bias
    tokens = torch.randint(0, 128, (2, 31), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_mlp_bias_in_a_config_whose_model_has_none_is_ignored_as_transformers_does(tmp_path, model_type):
    """Qwen2's and Mistral's MLPs never have biases, whatever config.json says (transformers ignores mlp_bias
    there): so does this model, and the checkpoint holds no MLP biases to refuse."""
    hf = make_hf_checkpoint(tmp_path, model_type, mlp_bias=True)
    assert not any("mlp" in n and n.endswith("bias") for n, _ in hf.named_parameters())
    ours = load_model(tmp_path)
    assert not ours.cfg.mlp_bias
    tokens = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


def test_a_tensor_the_model_would_not_read_is_refused(tmp_path):
    """A bias the config does not announce (here o_proj's, with attention_bias false) would silently be ignored."""
    make_hf_checkpoint(tmp_path)
    state = read_state(tmp_path / "model.safetensors")
    state["model.layers.1.self_attn.o_proj.bias"] = torch.randn(64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj\.bias.*does not use.*attention_bias"):
        load_model(tmp_path)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    hf = make_hf_checkpoint(tmp_path, rope_parameters=scaling)
    ours = load_model(tmp_path)
    assert ours.cfg.rope_llama3_scaling is not None
    tokens = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("factor", [2.0, 4])
def test_linear_rope_scaling_matches_transformers(tmp_path, factor):
    """rope_type "linear" (position interpolation: every frequency divided by the factor), through the pipeline
    too: the chunks' positions start mid-table."""
    from pipeline import run_prefill
    hf = make_hf_checkpoint(tmp_path, rope_parameters={"rope_type": "linear", "factor": factor,
                                                       "rope_theta": 10000.0})
    ours = load_model(tmp_path)
    assert ours.cfg.rope_linear_factor == factor and ours.cfg.rope_llama3_scaling is None
    tokens = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() <= 1e-4
    res = run_prefill(tmp_path, tokens, mode="overlapped", stages=2, chunk_size=30, link="inprocess")
    assert (res.logits - expected[:, -1]).abs().max().item() <= 1e-4


def test_sharded_checkpoint_loads_only_needed_tensors(tmp_path):
    make_hf_checkpoint(tmp_path, layers=4)
    # reshard: one file per layer plus one for the rest, with an index
    state = read_state(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    weight_map, shards = {}, {}
    for name, t in state.items():
        fname = f"layer{name.split('.')[2]}.safetensors" if ".layers." in name else "rest.safetensors"
        shards.setdefault(fname, {})[name] = t
        weight_map[name] = fname
    for fname, tensors in shards.items():
        save_file(tensors, tmp_path / fname)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "layer3.safetensors").unlink()  # a middle stage must not need the last layer's shard
    mid = load_model(tmp_path, layers=range(1, 3))
    assert not mid.is_first and not mid.is_last and len(mid.layers) == 2
    with pytest.raises(FileNotFoundError, match="layer3.safetensors"):
        load_model(tmp_path)  # the whole model does need it


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 41, 64])
def test_chunked_prefill_equals_unchunked(chunk_size):
    model = load_model("tiny")
    tokens = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(2))
    full, full_cache = model.prefill(tokens)
    chunked, cache = model.prefill(tokens, chunk_size=chunk_size)
    assert (chunked - full).abs().max().item() <= 1e-5
    assert (cache.k - full_cache.k).abs().max().item() <= 1e-5
    assert (cache.v - full_cache.v).abs().max().item() <= 1e-5


def test_decode_equals_forward_over_extended_sequence():
    model = load_model("tiny")
    tokens = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(3))
    _, cache = model.prefill(tokens[:, :29], chunk_size=8, max_len=30)
    step = model.decode(tokens[:, 29], cache, pos=29)
    assert (step - model(tokens)[:, -1]).abs().max().item() <= 1e-5


def test_stage_split_rebuilds_the_same_model():
    """Random weights depend only on (seed, tensor name): any layer split gives the same function."""
    whole = load_model("tiny")
    parts = [load_model("tiny", layers=range(0, 1)), load_model("tiny", layers=range(1, 4))]
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    caches = [p.new_cache(1, 20) for p in parts]
    h = parts[0].forward_chunk(tokens, 0, caches[0])
    logits = parts[1].forward_chunk(h, 0, caches[1], last_only=True)
    assert (logits - whole(tokens)[:, -1]).abs().max().item() <= 1e-5


def test_presets_exist():
    assert {"tiny", "small", "llama3-8b", "llama3-70b"} <= set(PRESETS)
    assert PRESETS["llama3-8b"].num_kv_heads == 8 and PRESETS["llama3-70b"].num_layers == 80


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.mark.parametrize("tokens,error,match", [
    (torch.zeros(1, 4, dtype=torch.int16), TypeError, "torch.long or torch.int32"),
    (torch.zeros(1, 4), TypeError, "torch.long"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"\[B, L\]"),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"\[B, L\]"),
    (torch.full((1, 4), 256, dtype=torch.long), ValueError, "token ids"),
    (torch.full((1, 4), -1, dtype=torch.long), ValueError, "token ids"),
    (torch.zeros(1, 1025, dtype=torch.long), ValueError, "max_seq_len"),
])
def test_bad_tokens_are_refused(tiny, tokens, error, match):
    with pytest.raises(error, match=match):
        tiny(tokens)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_bad_chunk_size_is_refused(tiny, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        tiny.prefill(torch.zeros(1, 4, dtype=torch.long), chunk_size=chunk_size)


@pytest.mark.parametrize("change,match", [
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(rope_theta=float("nan")), "rope_theta must be a positive finite number"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(rotary_dim=7), r"rotary_dim must be an even integer in \[2, head_dim=16\] or None, got 7"),
    (dict(rotary_dim=18), "rotary_dim must be an even integer"),
    (dict(rope_freq_factors=(1.0,) * 7), "rope_freq_factors must be 8 positive numbers .* got \\(1.0,"),
    (dict(rotary_dim=8, rope_freq_factors=(1.0,) * 8), "rope_freq_factors must be 4 positive numbers"),
    (dict(rope_freq_factors=(1.0,) * 7 + (float("inf"),)), "rope_freq_factors must be 8"),
    (dict(rope_attention_factor=0.0), "rope_attention_factor must be a positive finite number"),
    (dict(logits_scaling=0), "logits_scaling must be a positive finite number"),
    (dict(nope_layers=(4,)), r"nope_layers must be a sorted tuple of distinct layer indices in \[0, 4\), got \(4,\)"),
    (dict(nope_layers=(2, 1)), "nope_layers must be a sorted tuple"),
    (dict(nope_layers=[1]), "nope_layers must be a sorted tuple"),
    (dict(attention_multiplier=float("inf")), "attention_multiplier must be a positive finite number"),
    (dict(attention_multiplier=0.1, qk_norm=True), "per-head q/k norms would undo: not both"),
])
def test_bad_model_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["tiny"].replace(**change)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_model("huge")


def test_missing_tensor_is_named(tmp_path):
    make_hf_checkpoint(tmp_path)
    state = read_state(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_wrong_tensor_shape_is_named(tmp_path):
    make_hf_checkpoint(tmp_path)
    state = read_state(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj\.weight.*\(64, 32\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, "RoPE type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": -4.0}}, "yarn RoPE scaling .* positive numeric factor, got -4"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}}, "yarn beta_fast=-1"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": "1"}}, "yarn mscale='1'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0}}, "yarn attention_factor=0"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4},
      "original_max_position_embeddings": 1.5}, "llama3 RoPE scaling .* original_max_position_embeddings must be an "
                                                "integer of at least 2, got 1.5"),
    ({"rope_parameters": {"rope_type": "linear"}}, "linear RoPE scaling .* positive numeric factor, got None"),
    ({"rope_parameters": {"rope_type": "linear", "factor": -2}}, "positive numeric factor, got -2"),
    ({"partial_rotary_factor": 0.5}, "a llama model rotates whole heads"),
    ({"model_type": "granite", "logits_scaling": -8}, "logits_scaling=-8 .* must be a positive number"),
    ({"model_type": "smollm3", "no_rope_layers": [1, 0]}, "must list a 0 or 1 for each of the 3 layers, got \\[1, 0\\]"),
    ({"model_type": "smollm3", "no_rope_layers": [1, 2, 1]}, "must list a 0 or 1 for each of the 3 layers"),
    ({"model_type": "smollm3", "no_rope_layer_interval": 0}, "no_rope_layer_interval=0 .* positive integer"),
    ({"model_type": "granite", "embedding_multiplier": "12"}, "embedding_multiplier='12' .* must be a positive"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.1}, "rotates 1 of 16 head dims: rotate-half needs an even"),
    ({"model_type": "phi3", "partial_rotary_factor": 0}, r"must be a number in \(0, 1\]"),
    ({"original_max_position_embeddings": 1, "rope_parameters": longrope(8)}, "at least 2, got 1"),
    ({"original_max_position_embeddings": 64, "rope_parameters": {**LONGROPE, "short_factor": [1.0] * 5}},
     "needs short_factor, a list of 8 positive numbers .*got a list of 5"),
    ({"original_max_position_embeddings": 64, "rope_parameters": {**LONGROPE, "short_factor": [1.0] * 7 + [0]}},
     "needs short_factor"),
    ({"original_max_position_embeddings": 64, "rope_parameters": {**longrope(8), "attention_factor": -1}},
     "longrope attention_factor=-1"),
])
def test_other_architectures_are_refused(tmp_path, change, match):
    make_hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(tmp_path)


def test_missing_directory_is_refused():
    with pytest.raises(FileNotFoundError, match="does not exist$"):
        load_model("./no/such/model")
    with pytest.raises(FileNotFoundError, match=r"meta-llama/Llama-3\.2-1B does not exist \(models are read from a "
                       r"local directory, never downloaded: .* `hf download meta-llama/Llama-3\.2-1B --local-dir DIR`"):
        load_model("meta-llama/Llama-3.2-1B")


def test_weights_are_made_in_the_target_dtype_one_tensor_at_a_time():
    """A bfloat16 stage is allocated in bfloat16 and filled one tensor at a time: the load's peak memory is the
    model's bytes plus about one float32 source tensor (and the allocator's slack), not a float32 copy of the whole
    stage (the old load: float32 draws, a float32 model, then the cast, 5x the model). Measured in a fresh process
    (peak RSS)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import resource, torch
        from pipeline.config import ModelConfig
        from pipeline.model import load_model
        cfg = ModelConfig(vocab_size=8192, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=128,
                          intermediate_size=4096, max_seq_len=64)
        load_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                               head_dim=16, intermediate_size=64, max_seq_len=8), dtype="bfloat16")  # lazy imports
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = load_model(cfg, dtype="bfloat16")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        print(peak, size)
    """)
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    peak, size = (int(v) for v in res.stdout.split())
    assert size > 150e6  # 83M parameters in bfloat16
    assert peak < 1.6 * size, f"loading peaked at {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


@pytest.mark.parametrize("rows", [[6], [2, 3, 4], [0, 1, 2, 3, 4, 5, 6], [4, 1], [3, 3], []])
def test_select_rows_equals_indexing_and_is_contiguous(rows):
    """The last stage's row pick (`select_rows`): t[:, rows] whatever the list, contiguous (the kernels after it need
    that); a run of consecutive rows is a slice, so no index tensor goes to the device (a blocking copy there stalls
    the host that enqueues every stage)."""
    from pipeline.ops import select_rows
    t = torch.randn(2, 7, 5)
    got = select_rows(t, rows)
    assert torch.equal(got, t[:, torch.tensor(rows, dtype=torch.long)]) and got.is_contiguous()


def test_host_tensor_makes_the_values_on_the_device_in_the_dtype():
    from pipeline.ops import host_tensor
    got = host_tensor([3, 1, 2], torch.int32, "cpu")
    assert got.dtype == torch.int32 and got.tolist() == [3, 1, 2]
    table = torch.tensor([[1, -1]], dtype=torch.int64)
    assert host_tensor(table, torch.int32, torch.device("cpu")).dtype == torch.int32
