"""Model shape: a frozen `ModelConfig`, the presets table, and `ModelConfig.from_hf` for Llama-architecture checkpoints."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# Architectures that share Llama's decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU) and its tensor names.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    # Llama-3.1 style frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_len) or None
    rope_llama3_scaling: tuple[float, float, float, int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def params_per_layer(self) -> int:
        H, D = self.hidden_size, self.head_dim
        attn = H * D * (self.num_heads * 2 + self.num_kv_heads * 2)
        return attn + 3 * H * self.intermediate_size + 2 * H

    @classmethod
    def from_hf(cls, directory: str | Path) -> "ModelConfig":
        """Reads a Hugging Face `config.json` of a Llama-architecture model (Llama, Mistral, Qwen2)."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {directory}")
        hf = json.loads(path.read_text())
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture {model_type!r} (architectures={hf.get('architectures')}) "
                             f"in {path}: only {', '.join(SUPPORTED_MODEL_TYPES)} are supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in {path}: only 'silu' (SwiGLU)")
        if hf.get("mlp_bias", False):
            raise ValueError(f"mlp_bias=True in {path} is not supported")
        if hf.get("sliding_window") and hf.get("use_sliding_window", model_type != "qwen2"):
            raise ValueError(f"sliding-window attention (sliding_window={hf['sliding_window']}) in {path} "
                             "is not supported")
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3 = None
        if rope_type == "llama3":
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                      int(rope["original_max_position_embeddings"]))
        elif rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r} in {path}: only 'default' and 'llama3'")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            rope_llama3_scaling=llama3,
        )


PRESETS: dict[str, ModelConfig] = {
    # unit tests: every op, every mode, in milliseconds
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=160, max_seq_len=1024),
    # CPU demo: a prefill of 2-4k tokens takes a few seconds on two cores
    "small": ModelConfig(vocab_size=4096, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64,
                         intermediate_size=1024, max_seq_len=8192),
    # shape-only presets (random weights): simulator and GPU runs
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                             head_dim=128, intermediate_size=14336, rope_theta=500000.0, max_seq_len=131072),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                              head_dim=128, intermediate_size=28672, rope_theta=500000.0, max_seq_len=131072),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or a Hugging Face directory")
    return PRESETS[name]
