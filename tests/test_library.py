"""The kernels as torch custom operators (`kernels.library`): each operator passes torch's own checks (schema, fake
implementation, declared mutations), equals its launcher bit for bit, and a model part built on them compiles with
torch.compile(fullgraph=True) to the same logits and KV cache as the eager Triton part."""
import pytest
import torch

import kernels
from kernels import library, rope_tables
from pipeline.model import load_model
from pipeline.ops import LIBRARY_OPS

B, C, HQ, HKV, D = 2, 7, 4, 2, 16


def _attention_case(seed: int, max_len: int = 24):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, HQ, D, generator=g)
    k, v = (torch.randn(B, C, HKV, D, generator=g) for _ in range(2))
    kc, vc = (torch.randn(B, max_len, HKV, D, generator=g) for _ in range(2))
    return q, k, v, kc, vc


def _paged_case(seed: int, page: int = 4):
    """Two rows packed (chunks 5 and 2 over prefixes 6 and 0) over a shuffled pool of pages."""
    g = torch.Generator().manual_seed(seed)
    lens, prefix = [5, 2], torch.tensor([6, 0], dtype=torch.int32)
    q = torch.randn(sum(lens), HQ, D, generator=g)
    k, v = (torch.randn(sum(lens), HKV, D, generator=g) for _ in range(2))
    pages = 8
    kp, vp = (torch.randn(pages, page, HKV, D, generator=g) for _ in range(2))
    table = torch.randperm(pages, generator=g).to(torch.int32).view(B, pages // B)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    return q, k, v, kp, vp, prefix, table, cu


def test_every_operator_passes_torchs_opcheck():
    q, k, v, kc, vc = _attention_case(0)
    ops = torch.ops.prefill_overlap
    torch.library.opcheck(ops.chunk_attention, (q, k, v, kc, vc, 5))
    torch.library.opcheck(ops.chunk_attention_rows, (q, k, v, kc, vc, torch.tensor([3, 11])))
    q2, k2, v2, kp, vp, prefix, table, cu = _paged_case(1)
    torch.library.opcheck(ops.chunk_attention_paged, (q2, k2, v2, kp, vp, prefix, table, cu, 5, 6))
    torch.library.opcheck(ops.chunk_attention, (q, k, v, kc, vc, 5), dict(window=4))  # a sliding window
    x, r = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    w = torch.randn(32)
    torch.library.opcheck(ops.add_rms_norm, (x, r, w, 1e-5))
    torch.library.opcheck(ops.rms_norm, (x, w, 1e-5))
    cos, sin = rope_tables(D, 64, 10000.0)
    qkv = torch.randn(B, C, (HQ + 2 * HKV) * D)
    qk = qkv[..., :(HQ + HKV) * D].view(B, C, HQ + HKV, D)  # the model's strided q-and-k view
    torch.library.opcheck(ops.rope, (qk, cos, sin, 9))
    torch.library.opcheck(ops.rope_positions, (qk, cos, sin, torch.randint(0, 64, (B, C))))
    gate_up = torch.randn(3, 5, 64)
    torch.library.opcheck(ops.swiglu, (gate_up[..., :32], gate_up[..., 32:]))


@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
@pytest.mark.parametrize("start", ["int", "rows", "paged", "packed-int"])
def test_attention_through_its_operator_equals_the_launcher(start, window):
    if start == "paged":
        q, k, v, kc, vc, prefix, table, cu = _paged_case(2)
        kw = dict(block_table=table, cu_seqlens=cu, max_chunk=5, max_prefix=6)
    elif start == "packed-int":  # rows packed over a dense cache, one int prefix for all: a tensor of it per row
        q, k, v, kc, vc = _attention_case(3)
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        prefix, kw = 4, dict(cu_seqlens=torch.tensor([0, 3, 2 * C], dtype=torch.int32))
    else:
        q, k, v, kc, vc = _attention_case(3)
        prefix, kw = (9 if start == "int" else torch.tensor([0, 13])), {}
    kc2, vc2 = kc.clone(), vc.clone()
    got = library.chunk_attention(q, k, v, kc, vc, prefix, window=window, **kw)
    want = kernels.chunk_attention(q, k, v, kc2, vc2, prefix, window=window, **kw)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the append happened alike
    assert not got.isnan().any()


def test_the_other_operators_equal_their_launchers():
    g = torch.Generator().manual_seed(4)
    x, r, w = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g), torch.randn(32, generator=g)
    for got, want in ((library.add_rms_norm(x, r, w, 1e-5), kernels.add_rms_norm(x, r, w, 1e-5)),
                      (library.add_rms_norm(x, None, w, 1e-5), kernels.add_rms_norm(x, None, w, 1e-5))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    cos, sin = rope_tables(D, 64, 10000.0)
    qk = torch.randn(B, C, HQ + HKV, D, generator=g)
    pos = torch.randint(0, 64, (B, C), generator=g)
    assert torch.equal(library.rope(qk, cos, sin, 9), kernels.rope(qk, cos, sin, 9))
    assert torch.equal(library.rope(qk, cos, sin, pos), kernels.rope(qk, cos, sin, pos))
    assert torch.equal(library.swiglu(x, r), kernels.swiglu(x, r))


def test_the_operators_refuse_what_the_launchers_refuse():
    q, k, v, kc, vc = _attention_case(5)
    with pytest.raises(ValueError, match="max_chunk, max_prefix and check go with cu_seqlens or block_table"):
        library.chunk_attention(q, k, v, kc, vc, 0, max_chunk=3)
    with pytest.raises(ValueError, match="past the cache|outside the KV cache|does not fit"):
        library.chunk_attention(q, k, v, kc, vc, 20)


@pytest.mark.parametrize("layers", [range(0, 2), range(2, 4)], ids=["first", "last"])
def test_a_model_part_on_the_operators_compiles_whole_and_matches_eager(layers):
    """torch.compile(fullgraph=True) of a part's forward_chunk (the first: embedding in; the last: logits out) on
    LIBRARY_OPS: no graph break (fullgraph would raise), the same outputs and KV cache as the eager Triton part,
    chunk after chunk (the second chunk reads the first's cache)."""
    eager = load_model("tiny", "float32", "cpu", layers=layers, ops="triton")
    compiled_part = load_model("tiny", "float32", "cpu", layers=layers, ops=LIBRARY_OPS)
    step = torch.compile(compiled_part.forward_chunk, fullgraph=True)
    c_eager, c_comp = eager.new_cache(B, 32), compiled_part.new_cache(B, 32)
    g = torch.Generator().manual_seed(6)
    x = (torch.randint(0, eager.cfg.vocab_size, (B, 14), generator=g) if layers.start == 0
         else torch.randn(B, 14, eager.cfg.hidden_size, generator=g))
    for start, end in ((0, 9), (9, 14)):
        want, got = eager.forward_chunk(x[:, start:end], start, c_eager), step(x[:, start:end], start, c_comp)
        assert torch.allclose(got, want, atol=1e-5, rtol=0) and not got.isnan().any()
    assert torch.allclose(c_comp.k, c_eager.k, atol=1e-5, rtol=0) and torch.allclose(c_comp.v, c_eager.v, atol=1e-5,
                                                                                         rtol=0)


@pytest.mark.gpu
def test_a_compiled_model_part_on_the_operators_matches_eager_on_a_gpu(cuda):
    """The same on CUDA (the kernels compiled, inductor generating the GPU code around them): float16, one part
    holding the whole tiny model, two chunks."""
    eager = load_model("tiny", "float16", cuda, ops="triton")
    part = load_model("tiny", "float16", cuda, ops=LIBRARY_OPS)
    step = torch.compile(part.forward_chunk, fullgraph=True)
    c_eager, c_comp = eager.new_cache(B, 64), part.new_cache(B, 64)
    x = torch.randint(0, eager.cfg.vocab_size, (B, 40), generator=torch.Generator().manual_seed(7)).to(cuda)
    for start, end in ((0, 33), (33, 40)):
        want, got = eager.forward_chunk(x[:, start:end], start, c_eager), step(x[:, start:end], start, c_comp)
        scale = max(1.0, want.float().abs().max().item())  # float16: inductor may round the fused ops differently
        assert (got.float() - want.float()).abs().max().item() < 2e-2 * scale and not got.isnan().any()
    assert (c_comp.k.float() - c_eager.k.float()).abs().max().item() < 2e-2 * max(1.0, c_eager.k.abs().max().item())
