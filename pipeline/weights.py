"""Weights for a range of layers: seeded random initialisation, or Hugging Face safetensors read tensor by tensor,
so a pipeline stage never loads the parts of the checkpoint it does not own. No network access, ever."""
from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checks import NotFound
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
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        if cfg.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,), p + "mlp.down_proj.bias": (H,)}
    if last:
        shapes["model.norm.weight"] = (H,)
        if not cfg.tie_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


# Checkpoints that store several of Llama's tensors as one, stacked by rows (Phi-3: q, k and v in qkv_proj; gate and
# up in gate_up_proj): the fused name -> the Llama names it holds, in row order.
FUSED_TENSORS = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def checkpoint_layout(cfg: ModelConfig, layers: range, first: bool, last: bool) -> dict[str, tuple[str, int, int]]:
    """Where each tensor of `hf_tensor_shapes` (Llama's names, which the model and `pipeline.tp` read) is in the
    checkpoint: its name -> (the stored tensor's name, first row, end row). The same name and all its rows, except
    in a checkpoint with fused projections (`cfg.fused_proj`), where q, k and v are row ranges of one qkv_proj and
    gate and up of one gate_up_proj."""
    shapes = hf_tensor_shapes(cfg, layers, first, last)
    layout = {name: (name, 0, shape[0]) for name, shape in shapes.items()}
    if cfg.fused_proj:
        for i in layers:
            p = f"model.layers.{i}."
            for fused, parts in FUSED_TENSORS.items():
                row = 0
                for part in parts:
                    rows = shapes[p + part][0]
                    layout[p + part] = (p + fused, row, row + rows)
                    row += rows
    return layout


def stored_shapes(cfg: ModelConfig, layers: range, first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor name -> shape, for the tensors that the given part of the model reads."""
    shapes = hf_tensor_shapes(cfg, layers, first, last)
    stored: dict[str, tuple[int, ...]] = {}
    for name, (where, _, end) in checkpoint_layout(cfg, layers, first, last).items():
        rows = max(end, stored[where][0]) if where in stored else end
        stored[where] = (rows, *shapes[name][1:])
    return stored


class LazyState(Mapping):
    """Hugging Face tensor name -> tensor, made when asked for (drawn, or read from the checkpoint) and not kept: a
    model copies one tensor at a time into its own (already target-dtype) parameters, so loading never holds a
    second copy of the stage's weights."""

    def __init__(self, names, make):
        self._names, self._make = dict.fromkeys(names), make

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def random_weights(cfg: ModelConfig, layers: range, first: bool, last: bool, seed: int = 0,
                   device="cpu") -> LazyState:
    """Seeded random weights in float32, drawn on `device` when asked for. Each tensor's values depend only on
    (seed, its name, the device type), so any split of the layers over stages rebuilds exactly the same model. Drawing
    on the GPU matters: a CPU draws an 8B model's 32 layers in minutes, a GPU in a second."""
    device = torch.device(device)
    shapes = hf_tensor_shapes(cfg, layers, first, last)

    def draw(name):
        shape = shapes[name]
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        randn = lambda: torch.randn(shape, generator=g, device=device)  # noqa: E731
        t = randn()  # scaled in place: one float32 tensor alive at a time
        if name.endswith("norm.weight"):
            return t.mul_(0.1).add_(1.0)
        if name.endswith("bias"):
            return t.mul_(0.02)
        return t.mul_(0.5 if "embed" in name else shape[-1] ** -0.5)
    return LazyState(shapes, draw)


# Tensors some checkpoints carry that no model reads (old Llama exports saved RoPE's inverse frequencies).
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


def checkpoint_index(directory: str | Path, names=None) -> dict[str, TensorEntry]:
    """Tensor name -> (file, shape, dtype) of a safetensors checkpoint (one file, or shards with an index), from the
    files' headers only (no tensor data is read): every file, or with `names` only the shards that hold those (a
    pipeline stage need not have the others). A truncated or corrupt file, a shard the index names but that is
    missing, or an index that disagrees with its shards is an error that names the file."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        wanted_files = weight_map.values() if names is None else [weight_map[n] for n in names if n in weight_map]
        files = sorted({directory / f for f in wanted_files})
    elif single.is_file():
        weight_map, files = None, [single]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin"))[:2]
        hint = (f" (found {', '.join(pickles)}: PyTorch pickle checkpoints are not read, loading them can run code; "
                f"convert with transformers: from_pretrained(dir).save_pretrained(new_dir) writes safetensors)"
                if pickles else "")
        raise NotFound(f"no model.safetensors or model.safetensors.index.json in {directory}{hint}")
    entries: dict[str, TensorEntry] = {}
    for path in files:
        if not path.is_file():
            raise NotFound(f"checkpoint shard {path.name} (listed in {index.name}) is missing from "
                                    f"{directory}")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    entries[name] = TensorEntry(path, tuple(sl.get_shape()), sl.get_dtype())
        except (OSError, SafetensorError) as e:
            raise ValueError(f"checkpoint file {path} cannot be read (truncated or not safetensors): {e}") from None
    if weight_map is not None:
        opened = {p.name for p in files}
        for name, fname in weight_map.items():
            if fname in opened and (name not in entries or entries[name].file.name != fname):
                raise ValueError(f"{index.name} puts {name} in {fname}, but "
                                 + (f"it is in {entries[name].file.name}" if name in entries else "no shard holds it"))
        unlisted = [n for n in entries if n not in weight_map]
        if unlisted:
            raise ValueError(f"{entries[unlisted[0]].file.name} holds {unlisted[0]}, which {index.name} does not "
                             "list")
    return entries


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _tied_copy(entries: dict[str, TensorEntry], directory) -> bool:
    """Whether a tied model's checkpoint stores its head as an exact copy of the embedding (some exports save both):
    transformers then ties them and vLLM skips the head, so it is read as the embedding. A head that differs is an
    error: transformers would untie them (a head of its own) and vLLM would not, and which one the checkpoint means
    only its author knows."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if embed not in entries or (entries[head].shape, entries[head].dtype) != (entries[embed].shape,
                                                                              entries[embed].dtype):
        return False
    tensors = []
    for name in (embed, head):
        try:
            with safe_open(entries[name].file, framework="pt") as f:
                tensors.append(f.get_tensor(name))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"checkpoint file {entries[name].file} cannot be read: {e}") from None
    if not torch.equal(*tensors):
        raise ValueError(f"checkpoint {directory} has an lm_head.weight that differs from model.embed_tokens.weight, "
                         "but config.json says tie_word_embeddings=true (the head is the embedding): set it to false "
                         "to use the stored head, or remove the tensor to tie them")
    return True


def validate_checkpoint(directory: str | Path, cfg: ModelConfig, layers: range | None = None, first: bool = True,
                        last: bool = True) -> dict[str, TensorEntry]:
    """Checks a checkpoint against what `cfg` defines, before any tensor is read: every tensor the model (or the
    part `layers`, `first`, `last` of it) needs is present with its shape and a floating-point dtype, and no file
    looked at holds anything else (a tensor the model would not read, such as an o_proj bias the config does not
    announce, would silently change the function). Returns the index (`checkpoint_index`)."""
    layers = range(cfg.num_layers) if layers is None else layers
    wanted = stored_shapes(cfg, layers, first, last)
    entries = checkpoint_index(directory, None if (first and last and len(layers) == cfg.num_layers) else wanted)
    known = stored_shapes(cfg, range(cfg.num_layers), True, True)
    missing = [n for n in wanted if n not in entries]
    if missing:
        raise ValueError(f"checkpoint {directory} lacks tensor(s) {_names(missing)} that config.json implies")
    unexpected = [n for n in entries if n not in known and not IGNORED_TENSORS.fullmatch(n)]
    # a stored head is compared where the head is built (the last part; the whole model's upfront check included)
    if cfg.tie_embeddings and "lm_head.weight" in unexpected and (not last or _tied_copy(entries, directory)):
        unexpected.remove("lm_head.weight")
    if unexpected:
        hint = ""
        if any(n.endswith("_proj.bias") for n in unexpected):
            hint = " (biases the config does not announce: check attention_bias, mlp_bias and the model_type)"
        elif "lm_head.weight" in unexpected and cfg.tie_embeddings:
            hint = " (config.json says tie_word_embeddings=true: the head is the embedding)"
        raise ValueError(f"checkpoint {directory} has tensor(s) {_names(unexpected)} that this {cfg.num_layers}-layer "
                         f"model does not use{hint}; refusing to load it partly")
    for name, shape in wanted.items():
        e = entries[name]
        if e.shape != shape:
            raise ValueError(f"checkpoint tensor {name} in {e.file.name} has shape {e.shape}, expected {shape} from "
                             "config.json")
        if e.dtype not in FLOAT_DTYPES:
            raise ValueError(f"checkpoint tensor {name} in {e.file.name} is {e.dtype}: only {', '.join(FLOAT_DTYPES)} "
                             "weights are supported (quantized checkpoints are not)")
    return entries


def load_hf_weights(directory: str | Path, cfg: ModelConfig, layers: range, first: bool,
                    last: bool) -> LazyState:
    """Validates the checkpoint (`validate_checkpoint`), then gives the tensors of `layers` (plus embedding / final
    norm / head when first / last), each read from its file when asked for."""
    entries = validate_checkpoint(directory, cfg, layers, first, last)
    layout = checkpoint_layout(cfg, layers, first, last)
    handles: dict[Path, object] = {}

    def read(name):
        where, start, end = layout[name]
        path = entries[where].file
        try:
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            if where == name:
                return handles[path].get_tensor(name)
            return handles[path].get_slice(where)[start:end]  # only these rows of the fused tensor are read
        except (OSError, SafetensorError) as e:
            raise ValueError(f"checkpoint file {path} cannot be read: {e}") from None
    return LazyState(layout, read)
