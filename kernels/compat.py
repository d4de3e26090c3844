"""Differences between the Triton releases this project supports (3.6 to 3.9) that its kernels must not see.

The default of FP fusion changes in 3.10: `FP_FUSION` is what every launch asks for instead.

Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU path of every kernel test) turns a runtime scalar into a loop
bound with `int(tensor.handle.data)`; a runtime scalar is a one-element array there, and NumPy 2.4 refuses `int()`
of any array that is not 0-d ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel
with a `range` over a runtime bound fails under that pair. Triton 3.7 squeezes the array first; `patch_interpreter`
gives 3.6 the same fix. Compiled kernels (on a GPU) are not affected, nor is any other Triton release.
"""
from __future__ import annotations

import inspect
import os

# Every launch and every ahead-of-time compile asks for fused multiply-adds (a*b+c in one rounding) explicitly:
# Triton 3.6-3.9 fuse by default, Triton 3.10 will not (3.9 warns on every compile that does not say). Asking keeps
# the kernels' code, speed and rounding the same on every release, and the same as what the committed GPU figures
# measured. (The interpreter ignores the option: it runs NumPy.)
FP_FUSION = True


def patch_interpreter() -> bool:
    """Under TRITON_INTERPRET=1, makes the interpreter's scalar-to-index conversion squeeze its one-element array
    where this Triton does not already (3.6). Returns whether it patched anything."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
        patch = interpreter._patch_lang_tensor
        source = inspect.getsource(patch)
    except (ImportError, AttributeError, OSError, TypeError):
        return False  # another interpreter layout: nothing this knows how to fix
    if getattr(patch, "_squeezes_index", False) or "int(self.handle.data)" not in source:
        return False

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patched._squeezes_index = True
    interpreter._patch_lang_tensor = patched
    return True
