"""Weights for a range of layers: seeded random initialisation, or Hugging Face safetensors read tensor by tensor,
so a pipeline stage never loads the parts of the checkpoint it does not own. No network access, ever."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig


def hf_tensor_shapes(cfg: ModelConfig, layers: range, first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for the tensors that the given part of the model needs."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {}
    if first or (last and cfg.tie_embeddings):
        shapes["model.embed_tokens.weight"] = (cfg.vocab_size, H)
    for i in layers:
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        }
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    if last:
        shapes["model.norm.weight"] = (H,)
        if not cfg.tie_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


def random_weights(cfg: ModelConfig, layers: range, first: bool, last: bool, seed: int = 0,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights in float32, drawn on `device`. Each tensor's values depend only on (seed, its name,
    the device type), so any split of the layers over stages rebuilds exactly the same model. Drawing on the GPU
    matters: a CPU draws an 8B model's 32 layers in minutes, a GPU in a second."""
    out = {}
    device = torch.device(device)
    for name, shape in hf_tensor_shapes(cfg, layers, first, last).items():
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        randn = lambda: torch.randn(shape, generator=g, device=device)  # noqa: E731
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * randn()
        elif name.endswith("bias"):
            t = 0.02 * randn()
        else:
            t = randn() * (0.5 if "embed" in name else shape[-1] ** -0.5)
        out[name] = t
    return out


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file, or shards with an index)."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in weight_map.items()}
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def load_hf_weights(directory: str | Path, cfg: ModelConfig, layers: range, first: bool,
                    last: bool) -> dict[str, torch.Tensor]:
    """Reads only the tensors of `layers` (plus embedding / final norm / head when first / last)."""
    directory = Path(directory)
    files = _checkpoint_files(directory)
    wanted = hf_tensor_shapes(cfg, layers, first, last)
    missing = [n for n in wanted if n not in files]
    if missing:
        raise KeyError(f"checkpoint {directory} lacks tensor(s) {', '.join(missing[:5])}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    out = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                if tuple(t.shape) != wanted[name]:
                    raise ValueError(f"checkpoint tensor {name} in {path.name} has shape {tuple(t.shape)}, "
                                     f"expected {wanted[name]} from config.json")
                out[name] = t
    return out
