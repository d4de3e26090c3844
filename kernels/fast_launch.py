"""Launching a compiled Triton kernel again without Triton's per-call binding.

`kernel[grid](*args, **constexprs)` binds every argument, specializes it (a tensor's dtype and 16-byte alignment, an
int's width, whether it is 1 or a multiple of 16), builds a cache key of the whole and looks the compiled kernel up:
for chunk_attention's 33 arguments and 17 constexprs that is 20-40 us of this project's 2-core CPU per launch (measured
with the driver and compiler faked), most of the 37 us "Triton's launch" took of an H200 host's time, against 9-12 us
of kernel at prefix 0 / chunk 64. `DirectLaunch` keeps, per specialization, the compiled kernel Triton returned from
one such launch and afterwards calls its launcher directly (`CompiledKernel.run`, with the arguments Triton's own
`JITFunction.run` passes it: the same in Triton 3.6 to 3.9).

Its key holds everything Triton's specialization reads, so equal keys mean the same compiled kernel: each tensor's
dtype and data pointer modulo 16, for every specialized int whether it is 1, a multiple of 16 and within 32 bits (not
its value: a chunk length or stride Triton compiles no new kernel for is no new entry), every scalar's type (1, True
and 1.0 are equal in Python, not to Triton), every keyword (constexprs and launch options) and the device; a
`do_not_specialize` int must fit in 32 bits (Triton types a larger one i64: its path runs). The kernel's tensor arguments come first
(`pointers` of them), its constexprs after its runtime arguments. A call that does not fit that, a launch hook,
Triton's debug mode or an instrumented compile, tracing by torch.compile, a kernel made for the interpreter
(TRITON_INTERPRET=1) or `ENABLED = False` take Triton's path. `tests/test_fast_launch.py` checks on CPU, Triton's
binding and cache real with the driver and compiler faked, that every direct launch is the one Triton's path makes:
the same compiled kernel, the same arguments."""
from __future__ import annotations

import contextlib
import operator

import torch
from triton import knobs
from triton.runtime import driver

ENABLED = True  # False: every launch through Triton's `kernel[grid](...)` (`jit_launches` for a while)
MAX_ENTRIES = 1024  # per kernel: specializations kept; past it the cache restarts
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1  # what Triton types i32; past it, i64


class DirectLaunch:
    """`launcher[grid](*args, **kwargs)` launches `fn` as `fn[grid](*args, **kwargs)` does; `pointers`: how many of
    the leading arguments are tensors (every later one is a scalar)."""

    def __init__(self, fn, pointers: int):
        self.fn, self.pointers = fn, pointers
        self.cache: dict = {}
        self._layout = None  # read from the compiled path's JITFunction at the first launch (not the interpreter's)

    def _read_layout(self) -> dict:
        params = getattr(self.fn, "params", None)
        if params is None:  # the interpreter's (`triton.jit` under TRITON_INTERPRET=1, read when the kernel was made)
            self._layout = dict(direct=False)
            return self._layout
        n = sum(1 for p in params if not p.is_constexpr)
        scalars = range(self.pointers, n)
        self._layout = dict(
            direct=not any(p.is_constexpr for p in params[:n]), runtime=n,
            # the constexprs follow the runtime arguments (checked on a miss); defaults fill what a call leaves out
            const_names=[p.name for p in params[n:]], const_defaults={p.name: p.default for p in params[n:]},
            spec=_getter([i for i in scalars if not params[i].do_not_specialize]),
            dns=_getter([i for i in scalars if params[i].do_not_specialize]),
            ptrs=operator.itemgetter(*range(self.pointers)) if self.pointers > 1 else None)
        return self._layout

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def key(self, lay: dict, args: tuple, kwargs: dict, device):
        """The specialization of this call (None: Triton's path must take it)."""
        if len(args) != lay["runtime"]:
            return None
        try:
            ptrs = lay["ptrs"](args) if lay["ptrs"] else args[:self.pointers]
            tensors = tuple([(t.dtype, t.data_ptr() & 15) for t in ptrs])
        except AttributeError:  # a pointer argument that is not a tensor
            return None
        for v in lay["dns"](args):
            if type(v) is int and not INT32_MIN <= v <= INT32_MAX:
                return None
        # a specialized int as Triton classes it (1, a multiple of 16, 32 bits or not), not its value: a new chunk
        # length or stride that Triton compiles no new kernel for is no new entry either
        ints = tuple([(v == 1, not v & 15, INT32_MIN <= v <= INT32_MAX) if type(v) is int else None
                      for v in lay["spec"](args)])
        return device, tensors, ints, tuple(map(type, args[self.pointers:])), tuple(kwargs.items())

    def launch(self, grid, args, kwargs):
        if not ENABLED or type(grid) is not tuple or _hooked() or torch.compiler.is_compiling():
            return self.fn[grid](*args, **kwargs)  # (traced by torch.compile: the launch it knows, Triton's)
        lay = self._layout or self._read_layout()
        if not lay["direct"] or self.fn.pre_run_hooks:
            return self.fn[grid](*args, **kwargs)
        active = driver.active
        device = active.get_current_device()
        key = self.key(lay, args, kwargs, device)
        if key is None:
            return self.fn[grid](*args, **kwargs)
        try:
            hit = self.cache.get(key)
        except TypeError:  # a keyword value that does not hash: Triton's path, which takes it as it can
            return self.fn[grid](*args, **kwargs)
        if hit is None:
            compiled = self.fn[grid](*args, **kwargs)
            hit = self._entry(compiled, args, kwargs)
            if hit is not None:
                if len(self.cache) >= MAX_ENTRIES:
                    self.cache.clear()
                self.cache[key] = hit
            return compiled
        run, function, packed, consts = hit
        g = grid + (1, 1)
        _run_compiled(run, g[0], g[1], g[2], active.get_current_stream(device), function, packed, args + consts)
        return None

    def _entry(self, compiled, args, kwargs):
        """What a direct launch of `compiled` needs, or None if this call is not one to repeat directly."""
        if getattr(compiled, "function", None) is None or not hasattr(compiled, "packed_metadata"):
            return None  # not a loaded compiled kernel (an asynchronous compile, another Triton)
        if any(isinstance(a, torch.Tensor) for a in args[self.pointers:]):
            return None
        names, defaults = self._layout["const_names"], self._layout["const_defaults"]
        if any(name not in names for name in kwargs if name not in _OPTIONS):
            return None
        consts = tuple(kwargs.get(name, defaults[name]) for name in names)
        return compiled.run, compiled.function, compiled.packed_metadata, consts


# launch options a call may give besides the kernel's own constexprs (Triton's CUDA options that this project passes)
_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg"})


def _getter(indices):
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices)


def _run_compiled(run, gx, gy, gz, stream, function, packed, args):
    """The launch itself, as Triton's `JITFunction.run` calls it (no launch metadata: no hook is set)."""
    run(gx, gy, gz, stream, function, packed, None, None, None, *args)


def _hooked() -> bool:
    """A launch hook (a profiler's, e.g. proton: Triton 3.6-3.9 keep them in chains, empty unless one is added),
    Triton's debug mode or an instrumented compile (proton's, or 3.9's FP sanitizer): Triton's path, which serves
    them (its cache key reads these modes; this one does not)."""
    rt, comp = knobs.runtime, knobs.compilation
    return (_set(rt.launch_enter_hook) or _set(rt.launch_exit_hook) or bool(rt.debug)
            or bool(comp.instrumentation_mode) or bool(getattr(comp, "fpsan_homomorphic_casts", False)))


def _set(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


@contextlib.contextmanager
def jit_launches():
    """Every launch through Triton's `kernel[grid](...)` for the duration (to time the two paths against each
    other)."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved
