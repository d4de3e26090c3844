"""`kernels.fast_launch`: a direct launch of a compiled kernel is the launch Triton's own path makes.

No GPU here, so the compiled path runs against fakes: Triton's JIT (not its interpreter) with a driver that names a
Hopper GPU and a compile step that returns a recording kernel per cache key. Triton's binding, specialization and
cache lookup are real: a direct launch must reach the very kernel object Triton's path picks for the same call, with
the same arguments, or the cache key missed something that Triton's specialization reads."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton.backends.compiler import GPUTarget

from kernels import fast_launch


@triton.jit(do_not_specialize=["n"])
def _toy_kernel(X, Y, n, m, s, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


TOY = fast_launch.DirectLaunch(_toy_kernel, pointers=2)


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 1234

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class FakeKernel:
    """What Triton's compile returns, recording every launch: through Triton's path or a direct one."""

    def __init__(self, log):
        self.function, self.packed_metadata, self.log = object(), object(), log

    def launch_metadata(self, grid, stream, *args):
        return None

    @property
    def run(self):
        return self._run

    def _run(self, gx, gy, gz, stream, function, packed, meta, enter, exit_, *args):
        assert function is self.function and packed is self.packed_metadata and stream == 1234
        self.log.append(dict(kernel=self, grid=(gx, gy, gz), args=args))


LAUNCHERS = [("kernels.chunk_attention", "CHUNK_LAUNCH"), ("kernels.chunk_attention", "MERGE_LAUNCH"),
             ("kernels.paged_attention", "PAGED_LAUNCH"), ("kernels.paged_attention", "CHECK_ROWS_LAUNCH"),
             ("kernels.rmsnorm", "_LAUNCH"), ("kernels.rope", "_LAUNCH"), ("kernels.swiglu", "_LAUNCH"),
             ("pipeline.link", "_WAIT_LAUNCH")]


def _as_jit(fn):
    """A new JITFunction of the kernel's Python function: under TRITON_INTERPRET=1 `triton.jit` made an
    interpreter's; on a GPU machine the kernel's own JITFunction holds real compiled kernels, which the fakes must
    neither see nor join."""
    from triton.runtime import jit
    if isinstance(fn, jit.JITFunction):
        return jit.JITFunction(fn.fn, do_not_specialize=fn.do_not_specialize,
                               do_not_specialize_on_alignment=fn.do_not_specialize_on_alignment)
    return jit.JITFunction(fn.fn, **fn.kwargs)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The compiled launch path over CPU tensors: returns the launch log and a `paths` list ("jit" or "direct" per
    launch, in order)."""
    import importlib

    from triton.runtime import driver, jit
    log, paths = [], []
    # Triton 3.9's specialization imports gluon, which asserts that triton.language's functions are compiled ones
    # unless the interpreter's flag is set: imported here, under the flag
    with contextlib.suppress(ImportError):
        importlib.import_module("triton.experimental.gluon")
    # the launchers' modules imported as the rest of the process has them (under the flag: interpreted kernels) before
    # the flag goes: one first imported without it would keep compiled kernels for every later test
    modules = {module: sys.modules.get(module) or importlib.import_module(module) for module, _ in LAUNCHERS}
    modules[__name__] = sys.modules[__name__]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    saved = driver._active
    driver.set_active(FakeDriver())

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = FakeKernel(log)
        self.device_caches[device][0][key] = kernel
        return kernel
    monkeypatch.setattr(jit.JITFunction, "_do_compile", fake_compile)
    real_jit_run = jit.JITFunction.run

    def jit_run(self, *args, **kwargs):
        paths.append("jit")
        return real_jit_run(self, *args, **kwargs)
    monkeypatch.setattr(jit.JITFunction, "run", jit_run)
    real_direct = fast_launch._run_compiled

    def direct(*args):
        paths.append("direct")
        return real_direct(*args)
    monkeypatch.setattr(fast_launch, "_run_compiled", direct)
    for module, name in LAUNCHERS + [(__name__, "TOY")]:
        mod = modules[module]
        launcher = getattr(mod, name)
        monkeypatch.setattr(launcher, "fn", _as_jit(launcher.fn))
        monkeypatch.setattr(launcher, "cache", {})
        monkeypatch.setattr(launcher, "_layout", None)
        if hasattr(mod, "launching"):  # CPU tensors are refused off the interpreter: the fakes take them
            monkeypatch.setattr(mod, "launching", lambda op, device: contextlib.nullcontext())
    try:
        yield log, paths
    finally:
        driver._active = saved


def _same_launch(a: dict, b: dict, fresh: set[int] = frozenset()) -> None:
    """Two recorded launches: the same compiled kernel, grid and arguments (tensors by dtype, shape, strides and
    address; positions in `fresh` are buffers the launcher allocates per call: by dtype, shape and strides)."""
    assert a["kernel"] is b["kernel"], "a direct launch reached another compiled kernel than Triton's path"
    assert a["grid"] == b["grid"]
    assert len(a["args"]) == len(b["args"])
    for i, (x, y) in enumerate(zip(a["args"], b["args"])):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor)
            assert (x.dtype, x.shape, x.stride()) == (y.dtype, y.shape, y.stride()), i
            if i not in fresh:
                assert x.data_ptr() == y.data_ptr(), i
        else:
            assert type(x) is type(y) and x == y, (i, x, y)


def _jit_then_direct(call, log, paths, fresh=frozenset()):
    """`call` through Triton's path, then twice on the launcher's (a miss may take Triton's path once): the last
    call's launches must be direct and equal Triton's, launch by launch."""
    with fast_launch.jit_launches():
        n0 = len(log)
        call()
        jit_launches = log[n0:]
    assert jit_launches, "the call launched nothing"
    call()
    n1, p1 = len(log), len(paths)
    call()
    direct = log[n1:]
    assert paths[p1:] == ["direct"] * len(direct), paths[p1:]
    assert len(direct) == len(jit_launches)
    for a, b in zip(direct, jit_launches):
        _same_launch(a, b, fresh)


INTS = st.sampled_from([0, 1, 2, 3, 15, 16, 17, 32, 48, 2 ** 31 - 1, 2 ** 31, -1, -16, 2 ** 40])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_direct_launches_of_a_toy_kernel_reach_the_kernel_triton_picks(fake_gpu, data):
    """Scalars of every specialization class (1, multiples of 16, widths, bools and floats, an unspecialized int),
    tensors of several dtypes at aligned and misaligned addresses, constexprs given and defaulted: every example
    adds to the same cache, so a key that conflated two of Triton's specializations launches the wrong kernel."""
    log, paths = fake_gpu
    dtypes = [torch.float16, torch.float32, torch.int32, torch.bfloat16]
    tensors = []
    for _ in range(2):
        t = torch.empty(64, dtype=data.draw(st.sampled_from(dtypes)))
        tensors.append(t[data.draw(st.sampled_from([0, 1, 8, 16])):])
    n = data.draw(st.one_of(INTS, st.sampled_from([2 ** 33])))
    m = data.draw(st.one_of(INTS, st.booleans()))
    s = data.draw(st.one_of(INTS, st.sampled_from([0.5, 1.0, 16.0])))
    kwargs = dict(BLOCK=data.draw(st.sampled_from([16, 32])))
    if data.draw(st.booleans()):
        kwargs["FLAG"] = data.draw(st.booleans())
    kwargs["num_warps"] = data.draw(st.sampled_from([1, 4]))
    grid = data.draw(st.sampled_from([(1,), (2, 3), (4, 1, 5)]))
    call = lambda: TOY[grid](*tensors, n, m, s, **kwargs)  # noqa: E731
    if not -2 ** 31 <= n < 2 ** 31:  # an unspecialized int past 32 bits: Triton types it i64; Triton's path always
        before = len(paths)
        call(), call()
        assert paths[before:] == ["jit", "jit"]
        return
    _jit_then_direct(call, log, paths)


def test_chunk_attention_launches_directly_what_tritons_path_launches(fake_gpu):
    """The dense launcher over shapes, dtypes, start kinds, windows, split prefixes (the merge kernel too), packed
    GQA and misaligned views, all into one cache, each against Triton's path."""
    from kernels import chunk_attention
    log, paths = fake_gpu
    g = torch.Generator().manual_seed(0)
    cases = [
        dict(B=1, C=64, Hq=32, Hkv=8, D=128, P=0, dtype=torch.float16),
        dict(B=1, C=64, Hq=32, Hkv=8, D=128, P=100, dtype=torch.float16),
        dict(B=2, C=1, Hq=4, Hkv=1, D=64, P=37, dtype=torch.float32),
        dict(B=1, C=17, Hq=2, Hkv=2, D=80, P=5, dtype=torch.float16, window=8),
        dict(B=3, C=9, Hq=8, Hkv=2, D=16, P="tensor", dtype=torch.float16),
        dict(B=1, C=33, Hq=1, Hkv=1, D=1, P=3, dtype=torch.float32),
        dict(B=1, C=40, Hq=4, Hkv=2, D=64, P=300, dtype=torch.float16,
             config=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, num_splits=3)),
        dict(B=1, C=16, Hq=8, Hkv=2, D=32, P=64, dtype=torch.float16,
             config=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, pack_gqa=True)),
        dict(B=1, C=64, Hq=32, Hkv=8, D=128, P=0, dtype=torch.float16, offset=8),  # q and out misaligned
    ]
    for case in cases:
        B, C, Hq, Hkv, D, dtype = (case[k] for k in ("B", "C", "Hq", "Hkv", "D", "dtype"))
        P = case["P"]
        max_len = (P if isinstance(P, int) else 50) + C + 3
        off = case.get("offset", 0)
        q = torch.randn(B * C * Hq * D + off, generator=g).to(dtype)[off:].view(B, C, Hq, D)
        out = torch.empty(B * C * Hq * D + off, dtype=dtype)[off:].view(B, C, Hq, D)
        k, v = (torch.randn(B, C, Hkv, D, generator=g).to(dtype) for _ in range(2))
        kc, vc = (torch.zeros(B, max_len, Hkv, D, dtype=dtype) for _ in range(2))
        start = torch.tensor([3, 50, 0][:B], dtype=torch.int32) if P == "tensor" else P
        call = lambda: chunk_attention(q, k, v, kc, vc, start, out=out, config=case.get("config"),  # noqa: E731
                                       window=case.get("window"))
        splits = (case.get("config") or {}).get("num_splits", 1)
        # the split path's float32 partials and log-sum-exp are allocated per call (arguments 5 and 6)
        # (the main kernel's arguments 5 and 6, the merge kernel's 0 and 1)
        _jit_then_direct(call, log, paths, fresh={0, 1, 5, 6} if splits > 1 else frozenset())
    kernels = {id(entry["kernel"]) for entry in log}
    assert len(kernels) >= len(cases), "fewer compiled kernels than distinct specializations: a key conflated some"


def test_paged_and_small_kernels_launch_directly_what_tritons_path_launches(fake_gpu):
    from kernels import add_rms_norm, rope, swiglu
    from kernels.paged_attention import paged_chunk_attention
    from kernels.rope import rope_tables
    log, paths = fake_gpu
    x, r = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    w = torch.randn(64)
    _jit_then_direct(lambda: add_rms_norm(x, r, w, 1e-5), log, paths, fresh={3, 4})
    _jit_then_direct(lambda: add_rms_norm(x, None, w, 1e-6), log, paths, fresh={1, 3, 4})
    g, u = torch.randn(3, 7, 96), torch.randn(3, 7, 96)
    _jit_then_direct(lambda: swiglu(g, u), log, paths, fresh={2})
    cos, sin = rope_tables(32, 64, 10000.0)
    xq = torch.randn(2, 6, 4, 32)
    for start in (0, 9, torch.randint(0, 50, (2, 6))):
        _jit_then_direct(lambda: rope(xq, cos, sin, start), log, paths, fresh={3})
    # paged: a two-row batch, pages of 16, packed chunks of 3 and 5
    Hq, Hkv, D, page = 4, 2, 32, 16
    kc, vc = (torch.zeros(8, page, Hkv, D, dtype=torch.float16) for _ in range(2))
    bt = torch.tensor([[5, 2, 7], [0, 1, 3]], dtype=torch.int32)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q = torch.randn(8, Hq, D).half()
    kn, vn = (torch.randn(8, Hkv, D).half() for _ in range(2))
    prefix = torch.tensor([10, 20], dtype=torch.int32)
    out = torch.empty_like(q)
    _jit_then_direct(lambda: paged_chunk_attention(q, kn, vn, kc, vc, prefix, bt, cu, 5, out=out), log, paths)
    from pipeline.link import _gpu_sleep  # the emulated link's wait kernel: no pointer, one unspecialized int
    _jit_then_direct(lambda: _gpu_sleep(2e-3), log, paths)
    short = log[-1]["kernel"]
    n = len(log)
    _gpu_sleep(5.0)  # past int32 nanoseconds: three waits of the one compiled kernel (no int64 compile in a run)
    waits = log[n:]
    assert [w["args"][0] for w in waits] == [2 ** 31 - 1, 2 ** 31 - 1, 5 * 10 ** 9 - 2 * (2 ** 31 - 1)]
    assert all(w["kernel"] is short for w in waits) and paths[-3:] == ["direct"] * 3


def test_triton_path_serves_hooks_debug_other_grids_and_the_switch(fake_gpu, monkeypatch):
    from triton import knobs
    log, paths = fake_gpu
    x, y = torch.empty(16), torch.empty(16)
    call = lambda grid=(1,): TOY[grid](x, y, 3, 4, 0.5, BLOCK=16)  # noqa: E731
    call(), call()
    assert paths[-2:] == ["jit", "direct"]
    with fast_launch.jit_launches():
        call()
    assert paths[-1] == "jit" and fast_launch.ENABLED
    call(lambda meta: (1,))  # a grid function: Triton's path evaluates it
    assert paths[-1] == "jit"
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        call()
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert paths[-1] == "jit"
    monkeypatch.setattr(knobs.runtime, "debug", True)
    call()
    assert paths[-1] == "jit"
    monkeypatch.setattr(knobs.runtime, "debug", False)
    monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "consan")
    call()
    assert paths[-1] == "jit"
    monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced by torch.compile: Triton's launch
    call()
    assert paths[-1] == "jit"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    call()
    assert paths[-1] == "direct"
    before = len(paths)
    with pytest.raises(Exception):  # a keyword value that does not hash goes to Triton, which refuses it
        TOY[(1,)](x, y, 3, 4, 0.5, BLOCK=[16])
    assert paths[before:] == ["jit"]


def test_the_cache_is_bounded(fake_gpu, monkeypatch):
    log, paths = fake_gpu
    monkeypatch.setattr(fast_launch, "MAX_ENTRIES", 4)
    x, y = torch.empty(16), torch.empty(16)
    for m in range(10):  # ten keywords, ten specializations
        TOY[(1,)](x, y, 3, 4, 0.5, BLOCK=16 * (m + 1))
        assert len(TOY.cache) <= 4
    TOY[(1,)](x, y, 3, 4, 0.5, BLOCK=160)
    assert paths[-1] == "direct"


def test_equal_scalars_of_different_types_are_different_specializations(fake_gpu):
    """1, True and 1.0 are equal (and hash equal) in Python; Triton makes 1 a constexpr, True an i1 and 1.0 an fp32:
    three compiled kernels."""
    log, paths = fake_gpu
    x, y = torch.empty(16), torch.empty(16)
    for m, s in [(1, 2.0), (True, 2.0), (1.0, 2.0), (3, 16), (3, 16.0), (3, 17), (3, False)]:
        _jit_then_direct(lambda: TOY[(1,)](x, y, 5, m, s, BLOCK=16), log, paths)
    assert len({id(e["kernel"]) for e in log}) == 7


def test_a_kernel_made_for_the_interpreter_is_always_launched_by_it():
    """Under TRITON_INTERPRET=1 (every CPU test) `triton.jit` makes an interpreter's function: never launched
    directly, nothing cached, the output the interpreter's."""
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(_toy_kernel, InterpretedFunction):
        pytest.skip("this process compiles kernels (no TRITON_INTERPRET)")
    from kernels import swiglu, swiglu_ref
    from kernels.swiglu import _LAUNCH
    g, u = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.allclose(swiglu(g, u), swiglu_ref(g, u), atol=1e-6)
    assert _LAUNCH.cache == {} and _LAUNCH._layout == dict(direct=False)


def test_new_chunk_lengths_and_row_counts_launch_directly_when_triton_would_reuse_its_kernel(fake_gpu):
    """The key holds an int's specialization class, not its value: a chunk length never launched before (and the
    strides that follow from it), or a packed batch of a new token count, is launched directly where Triton's path
    picks the same compiled kernel, and is that kernel with those arguments."""
    from kernels import chunk_attention
    from kernels.paged_attention import paged_chunk_attention
    log, paths = fake_gpu
    kc, vc = (torch.zeros(1, 400, 2, 64, dtype=torch.float16) for _ in range(2))
    fresh_direct = 0
    for i, C in enumerate([33, 49, 50, 31, 47, 48, 64]):  # chunks over a prefix, each length new
        q, k, v = torch.randn(1, C, 4, 64).half(), torch.randn(1, C, 2, 64).half(), torch.randn(1, C, 2, 64).half()
        out = torch.empty_like(q)
        n, p = len(log), len(paths)
        chunk_attention(q, k, v, kc, vc, 100 + i, out=out)
        fresh_direct += paths[p:] == ["direct"]
        got = log[n:]
        with fast_launch.jit_launches():
            n = len(log)
            chunk_attention(q, k, v, kc, vc, 100 + i, out=out)
        _same_launch(got[0], log[n])
    assert fresh_direct >= 4  # lengths of a class launched before (33 and 48: new; their tiles as the launcher picks)
    page = 16
    kc, vc = (torch.zeros(16, page, 2, 64, dtype=torch.float16) for _ in range(2))
    bt = torch.arange(16, dtype=torch.int32).view(2, 8)
    prefix = torch.tensor([5, 9], dtype=torch.int32)
    fresh_direct = 0
    for a, b in [(3, 4), (2, 7), (5, 6), (1, 12), (8, 8)]:  # packed rows: every step a new token count N
        cu = torch.tensor([0, a, a + b], dtype=torch.int32)
        q, kn, vn = torch.randn(a + b, 4, 64).half(), torch.randn(a + b, 2, 64).half(), torch.randn(a + b, 2, 64).half()
        out = torch.empty_like(q)
        n, p = len(log), len(paths)
        paged_chunk_attention(q, kn, vn, kc, vc, prefix, bt, cu, max(a, b), out=out)
        fresh_direct += paths[p:] == ["direct"]
        got = log[n:]
        with fast_launch.jit_launches():
            n = len(log)
            paged_chunk_attention(q, kn, vn, kc, vc, prefix, bt, cu, max(a, b), out=out)
        assert len(got) == len(log[n:])
        for x, y in zip(got, log[n:]):
            _same_launch(x, y)
    assert fresh_direct >= 2
