"""Pipeline-parallel chunked prefill: model, stages, links and schedules."""
from .config import PRESETS, ModelConfig, get_preset
from .model import KVCache, Transformer, load_model, resolve_config
from .ops import TORCH_OPS, TRITON_OPS, Ops, get_ops

__all__ = ["PRESETS", "ModelConfig", "get_preset", "KVCache", "Transformer", "load_model", "resolve_config",
           "TORCH_OPS", "TRITON_OPS", "Ops", "get_ops"]
from .launch import LINKS, Job, PipelineError, PipelineSpec, PrefillResult, run_jobs, run_prefill  # noqa: E402
from .link import LinkModel  # noqa: E402
from .schedule import MODES, chunk_plan  # noqa: E402
from .stage import Stage, split_layers  # noqa: E402

__all__ += ["LINKS", "MODES", "Job", "PipelineError", "PipelineSpec", "PrefillResult", "run_jobs", "run_prefill",
            "LinkModel", "chunk_plan", "Stage", "split_layers"]
