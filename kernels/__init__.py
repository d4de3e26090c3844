"""Triton kernels for chunked prefill, one op per module, each with its plain-torch reference."""
from .compat import patch_interpreter

patch_interpreter()  # Triton 3.6's interpreter under NumPy 2.4 (kernels.compat)
from .chunk_attention import chunk_attention, chunk_attention_ref
from .rmsnorm import add_rms_norm, add_rms_norm_ref
from .rope import rope, rope_ref, rope_tables
from .swiglu import swiglu, swiglu_ref
from . import library  # the launchers above as torch custom operators (torch.compile)

__all__ = ["chunk_attention", "chunk_attention_ref", "add_rms_norm", "add_rms_norm_ref", "rope", "rope_ref",
           "rope_tables", "swiglu", "swiglu_ref", "library"]
