"""Pipeline-parallel chunked prefill: model, stages, links and schedules."""
from .config import PRESETS, ModelConfig, get_preset
from .model import KVCache, Transformer, load_model, resolve_config
from .ops import TORCH_OPS, TRITON_OPS, Ops, get_ops

__all__ = ["PRESETS", "ModelConfig", "get_preset", "KVCache", "Transformer", "load_model", "resolve_config",
           "TORCH_OPS", "TRITON_OPS", "Ops", "get_ops"]
