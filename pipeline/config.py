"""Model shape: a frozen `ModelConfig`, the presets table, and `ModelConfig.from_hf` for Llama-architecture checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .checks import NotFound

# Architectures that share Llama's decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU): Qwen3 adds an RMSNorm over each
# head of q and of k before RoPE; Phi-3 (and Phi-4, which is model_type phi3) stores q, k, v as one tensor and gate, up
# as another, and may rotate only part of each head; Granite scales embeddings, block outputs, attention scores and
# logits by constants of its config; SmolLM3 leaves RoPE out of some layers (NoPE).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3")


def positive_number(v) -> bool:
    """A finite int or float above 0 (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


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
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # a bias on the output projection (Llama with attention_bias)
    mlp_bias: bool = False  # biases on the gate, up and down projections (Llama with mlp_bias)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k (weights [head_dim]) before RoPE (Qwen3)
    # Llama-3.1 style frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_len) or None
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    rope_linear_factor: float = 1.0  # linear position interpolation (rope_type "linear"): frequencies / factor
    # a sliding attention window (Mistral 7B v0.1: 4096) in the layers `window_layers`: a query there sees the
    # `sliding_window` latest positions up to its own (transformers' mask), its keys in the KV cache all the same;
    # None: full causal attention everywhere
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()
    fused_proj: bool = False  # the checkpoint stores q, k, v as one qkv_proj and gate, up as one gate_up_proj (Phi-3)
    # partial rotary embedding: the first rotary_dim dims of each head rotated (rotate-half within them), the rest
    # passed through; None: all head_dim (Phi-4-mini: 96 of 128)
    rotary_dim: int | None = None
    # per-frequency scaling: frequency i divided by rope_freq_factors[i], cos and sin scaled by the attention factor.
    # LongRoPE (Phi-3 128k, Phi-3.5): its short factors, the context capped at original_max_position_embeddings,
    # where transformers switches to the long factors for the whole sequence; YaRN (Qwen2.5 / Qwen3 past 32k): its
    # blend of interpolated and extrapolated frequencies, static, so no cap
    rope_freq_factors: tuple[float, ...] | None = None
    rope_attention_factor: float = 1.0
    context_limit: str | None = None  # why max_seq_len is below the checkpoint's max_position_embeddings, if it is
    checkpoint_context: int | None = None  # that max_position_embeddings, where max_seq_len is below it
    # Granite's constants, folded into the weights when they are loaded (`Transformer.load_hf_state`): embeddings
    # times embedding_multiplier, each block's attention and MLP outputs times residual_multiplier (before the
    # residual add), attention scores times attention_multiplier (None: 1/sqrt(head_dim)), logits / logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    nope_layers: tuple[int, ...] = ()  # layers whose q and k are not rotated (SmolLM3: every fourth)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        for name in ("rope_theta", "rms_norm_eps", "rope_linear_factor", "rope_attention_factor",
                     "embedding_multiplier", "residual_multiplier", "logits_scaling") + \
                (("attention_multiplier",) if self.attention_multiplier is not None else ()):
            v = getattr(self, name)
            if not positive_number(v):
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.attention_multiplier is not None and self.qk_norm:
            raise ValueError("ModelConfig.attention_multiplier is folded into q's weights, which per-head q/k norms "
                             "would undo: not both")
        for name in ("nope_layers", "window_layers"):
            n = getattr(self, name)
            if not isinstance(n, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in n) \
                    or list(n) != sorted(set(n)) or (n and not 0 <= n[0] <= n[-1] < self.num_layers):
                raise ValueError(f"ModelConfig.{name} must be a sorted tuple of distinct layer indices in "
                                 f"[0, {self.num_layers}), got {n!r}")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be a positive integer or None, got {w!r}")
        if (w is None) != (not self.window_layers):
            raise ValueError(f"ModelConfig.sliding_window ({w!r}) and window_layers ({self.window_layers!r}) go "
                             "together: a window and the layers it applies to, or neither")
        r = self.rotary_dim
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0 or r % 2 or r > self.head_dim):
            raise ValueError(f"ModelConfig.rotary_dim must be an even integer in [2, head_dim={self.head_dim}] or "
                             f"None, got {r!r}")
        f = self.rope_freq_factors
        if f is not None and (len(f) != self.rotary_dims // 2 or not all(map(positive_number, f))):
            raise ValueError(f"ModelConfig.rope_freq_factors must be {self.rotary_dims // 2} positive numbers (one "
                             f"per rotated frequency), got {f if len(f) < 8 else f'{len(f)} values'}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full causal attention)."""
        return self.sliding_window if layer in self.window_layers else None

    @property
    def rotary_dims(self) -> int:
        """How many dims of each head RoPE rotates (all of head_dim unless `rotary_dim` says fewer)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def context(self) -> str:
        """max_seq_len for an error message, with the reason where a checkpoint's feature sets it."""
        return f"max_seq_len {self.max_seq_len}" + (f" ({self.context_limit})" if self.context_limit else "")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def params_per_layer(self) -> int:
        H, D = self.hidden_size, self.head_dim
        attn = H * D * (self.num_heads * 2 + self.num_kv_heads * 2)
        return attn + 3 * H * self.intermediate_size + 2 * H + (2 * D if self.qk_norm else 0)

    @classmethod
    def from_hf(cls, directory: str | Path) -> "ModelConfig":
        """Reads a Hugging Face `config.json` of a Llama-architecture model (Llama, Mistral, Qwen2, Qwen3). Every
        field the model's math depends on is checked: a missing or ill-typed one is named, and so is any option that
        would change the math in a way this model does not implement (it is refused, never ignored)."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise NotFound(f"no config.json in {directory}")
        try:
            hf = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture {model_type!r} (architectures={hf.get('architectures')}) "
                             f"in {path}: only {', '.join(SUPPORTED_MODEL_TYPES)} are supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in {path}: only 'silu' (SwiGLU)")
        window = hf.get("sliding_window")
        if not (window and hf.get("use_sliding_window", model_type not in ("qwen2", "qwen3", "smollm3"))):
            window = None  # none, or switched off (Qwen's and SmolLM3's use_sliding_window false, their default)
        elif isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding_window={window!r} in {path}: must be a positive integer or null")
        elif model_type == "mistral" and hf.get("layer_types") is not None:
            raise ValueError(f"layer_types in {path}: transformers' Mistral model does not read it (every layer is "
                             "windowed) and warns; say which model is meant (an alternating-attention one is not "
                             "supported)")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"pretraining_tp={hf['pretraining_tp']} in {path} is not supported (only 1)")

        def get(name, kind=int, default=None, positive=True):
            if name not in hf or hf[name] is None:
                if default is None:
                    raise ValueError(f"{path} lacks {name!r}, which a {model_type} model needs")
                return default
            v = hf[name]
            ok = (isinstance(v, bool) if kind is bool else
                  isinstance(v, int) and not isinstance(v, bool) if kind is int else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            if not ok or (positive and kind is not bool and v <= 0):
                allowed = {bool: "true or false", int: "a positive integer", float: "a positive number"}[kind]
                raise ValueError(f"{name}={v!r} in {path}: must be {allowed}")
            return kind(v)

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters/rope_scaling in {path} must be an object, got {rope!r}")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if not positive_number(theta):
            raise ValueError(f"rope_theta={theta!r} in {path}: must be a positive number")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if model_type == "phi3" and rope_type in ("su", "yarn"):
            rope_type = "longrope"  # transformers' Phi3Config reads these older names as LongRoPE
        head_dim = get("head_dim", int, hidden // heads if hidden % heads == 0 else None)
        context = get("max_position_embeddings", int, 4096)
        # partial rotary embedding (Phi-4-mini: 0.75), read where transformers' Phi-3 reads it; the Llama-family
        # models rotate whole heads and ignore the field, so a value other than 1 there is refused, not ignored
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise ValueError(f"partial_rotary_factor={partial!r} in {path}: must be a number in (0, 1]")
        rotary = int(head_dim * partial)
        if rotary != head_dim and model_type != "phi3":
            raise ValueError(f"partial_rotary_factor={partial} in {path}: a {model_type} model rotates whole heads "
                             "(only phi3 rotates part of each)")
        if rotary % 2 or rotary < 2:
            raise ValueError(f"partial_rotary_factor={partial} in {path} rotates {rotary} of {head_dim} head dims: "
                             "rotate-half needs an even number, at least 2")
        llama3, linear, freq_factors, attention_factor, limit = None, 1.0, None, 1.0, None
        original = cls._original_length(rope, hf, path, model_type, context, rope_type)
        if rope_type == "llama3":
            try:
                llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                          original)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"llama3 RoPE scaling in {path} needs numeric factor, low_freq_factor, "
                                 f"high_freq_factor and original_max_position_embeddings ({e})") from None
        elif rope_type == "linear":
            linear = rope.get("factor")
            if not positive_number(linear):
                raise ValueError(f"linear RoPE scaling in {path} needs a positive numeric factor, got {linear!r}")
        elif rope_type == "longrope":
            freq_factors, attention_factor = cls._longrope(rope, path, rotary, context, original)
            limit = original
        elif rope_type == "yarn":
            freq_factors, attention_factor = cls._yarn(rope, path, rotary, context, original, float(theta))
        elif rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r} in {path}: only 'default', 'linear', 'llama3', "
                             "'longrope' and 'yarn'")
        # biases exactly where each architecture's Hugging Face model has them (transformers 4.45-5.x):
        # Llama: attention_bias puts one on q, k, v and o, mlp_bias on gate, up and down; Qwen3: attention_bias as
        # Llama's, never on the MLP; Granite and SmolLM3: as Llama; Qwen2: always on q, k, v, never on o or the MLP;
        # Mistral and Phi-3: none (these ignore the flags their models do not read, as transformers does)
        bias = get("attention_bias", bool, False) if model_type in ("llama", "qwen3", "granite", "smollm3") else False
        mlp_bias = get("mlp_bias", bool, False) if model_type in ("llama", "granite", "smollm3") else False
        layers = get("num_hidden_layers")
        nope = cls._nope_layers(hf, path, layers) if model_type == "smollm3" else ()
        granite = {}
        if model_type == "granite":  # transformers' defaults are 1.0, attention_multiplier included
            granite = {name: get(name, float, 1.0) for name in ("embedding_multiplier", "residual_multiplier",
                                                               "attention_multiplier", "logits_scaling")}
        window_layers = cls._window_layers(hf, path, model_type, layers, nope) if window else ()
        cap = min(context, limit or context)
        if not window_layers or window >= cap:  # a window as long as the context changes nothing
            window, window_layers = None, ()
        why = None
        if cap < context:
            why = ("LongRoPE's original_max_position_embeddings: past it, transformers rotates the whole sequence "
                   "with the long factors, which keys already in a KV cache cannot follow")
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", int, heads),
            head_dim=head_dim,
            intermediate_size=get("intermediate_size"),
            rope_theta=float(theta),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            max_seq_len=cap,
            tie_embeddings=get("tie_word_embeddings", bool, False),
            qkv_bias=bias or model_type == "qwen2",
            o_bias=bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            rope_llama3_scaling=llama3,
            rope_linear_factor=float(linear),
            sliding_window=window,
            window_layers=window_layers,
            fused_proj=model_type == "phi3",
            rotary_dim=None if rotary == head_dim else rotary,
            rope_freq_factors=freq_factors,
            rope_attention_factor=attention_factor,
            context_limit=why,
            checkpoint_context=context if why else None,
            nope_layers=nope,
            **granite,
        )

    @staticmethod
    def _window_layers(hf: dict, path: Path, model_type: str, layers: int, nope: tuple[int, ...]) -> tuple[int, ...]:
        """The layers a sliding window applies to, as transformers decides them: every layer of Mistral and Phi-3;
        for Qwen2, Qwen3 and SmolLM3 those `layer_types` calls "sliding_attention", or without it the layers from
        `max_window_layers` on (Qwen; default 28) or the NoPE layers (SmolLM3). Llama and Granite have no sliding
        window (transformers ignores the field there)."""
        if model_type in ("mistral", "phi3"):
            return tuple(range(layers))
        if model_type not in ("qwen2", "qwen3", "smollm3"):
            return ()
        types = hf.get("layer_types")
        if types is None:
            if model_type == "smollm3":
                return nope
            first = hf.get("max_window_layers", 28)
            if isinstance(first, bool) or not isinstance(first, int) or first < 0:
                raise ValueError(f"max_window_layers={first!r} in {path}: must be an integer >= 0")
            return tuple(range(first, layers))
        kinds = ("full_attention", "sliding_attention")
        if not isinstance(types, list) or len(types) != layers or any(t not in kinds for t in types):
            shown = types if not isinstance(types, list) or len(types) <= 8 else f"{len(types)} values"
            raise ValueError(f"layer_types in {path} must list 'full_attention' or 'sliding_attention' for each of "
                             f"the {layers} layers, got {shown}")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")

    @staticmethod
    def _nope_layers(hf: dict, path: Path, layers: int) -> tuple[int, ...]:
        """SmolLM3's layers without RoPE: where `no_rope_layers` (one 0 or 1 per layer, 1 = rotated) has a 0, or
        without it every `no_rope_layer_interval`-th layer (default 4), as transformers derives them."""
        flags = hf.get("no_rope_layers")
        if flags is None:
            every = hf.get("no_rope_layer_interval", 4)
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(f"no_rope_layer_interval={every!r} in {path}: must be a positive integer")
            flags = [int((i + 1) % every != 0) for i in range(layers)]
        if not isinstance(flags, list) or len(flags) != layers or any(f not in (0, 1) or isinstance(f, bool)
                                                                       for f in flags):
            raise ValueError(f"no_rope_layers in {path} must list a 0 or 1 for each of the {layers} layers, got "
                             f"{flags if not isinstance(flags, list) or len(flags) <= 8 else f'{len(flags)} values'}")
        return tuple(i for i, f in enumerate(flags) if f == 0)

    @staticmethod
    def _original_length(rope: dict, hf: dict, path: Path, model_type: str, context: int, rope_type: str) -> int:
        """The pretraining length that llama3, LongRoPE and YaRN scaling start from, where transformers takes it:
        the config's top-level original_max_position_embeddings first (Phi-3's config always has one: 4096 by
        default), else the RoPE parameters', else max_position_embeddings."""
        original = hf.get("original_max_position_embeddings")
        if original is None and model_type == "phi3":
            original = 4096
        if original is None:
            original = rope.get("original_max_position_embeddings", context)
        if rope_type in ("llama3", "longrope", "yarn") and (
                isinstance(original, bool) or not isinstance(original, int) or original < 2):
            raise ValueError(f"{rope_type} RoPE scaling in {path}: original_max_position_embeddings must be an "
                             f"integer of at least 2, got {original!r}")
        return original

    @staticmethod
    def _factor(rope: dict, path: Path, rope_type: str, context: int, original: int) -> float:
        """The scaling factor given, or max_position_embeddings / original (as transformers infers it)."""
        factor = rope.get("factor")
        factor = context / original if factor is None else factor
        if not positive_number(factor):
            raise ValueError(f"{rope_type} RoPE scaling in {path} needs a positive numeric factor, got {factor!r}")
        return float(factor)

    @staticmethod
    def _attention(rope: dict, path: Path, rope_type: str, default) -> float:
        attention = rope.get("attention_factor")
        if attention is None:
            return float(default())
        if not positive_number(attention):
            raise ValueError(f"{rope_type} attention_factor={attention!r} in {path}: must be a positive number")
        return float(attention)

    @classmethod
    def _longrope(cls, rope: dict, path: Path, rotary: int, context: int, original: int):
        """LongRoPE's (short factors, attention factor) from a config, as transformers computes them: the attention
        factor given, or sqrt(1 + ln(factor) / ln(original)) for a factor above 1."""
        short = rope.get("short_factor")
        if not isinstance(short, list) or len(short) != rotary // 2 or not all(map(positive_number, short)):
            got = f"a list of {len(short)}" if isinstance(short, list) else repr(short)
            raise ValueError(f"longrope RoPE scaling in {path} needs short_factor, a list of {rotary // 2} positive "
                             f"numbers (one per rotated frequency), got {got}")
        factor = cls._factor(rope, path, "longrope", context, original)
        attention = cls._attention(rope, path, "longrope", lambda: 1.0 if factor <= 1 else math.sqrt(
            1 + math.log(factor) / math.log(original)))
        return tuple(float(x) for x in short), attention

    @classmethod
    def _yarn(cls, rope: dict, path: Path, rotary: int, context: int, original: int, theta: float):
        """YaRN's (per-frequency divisors, attention factor), as transformers computes them: frequencies that turn
        fewer than beta_slow times over the original length are interpolated (divided by the factor), those that
        turn more than beta_fast times kept, a linear ramp between; the attention factor given, or
        0.1 ln(factor) + 1 (with mscale and mscale_all_dim, their quotient)."""
        factor = cls._factor(rope, path, "yarn", context, original)
        betas = []
        for name, default in (("beta_fast", 32), ("beta_slow", 1)):
            beta = rope.get(name) or default
            if not positive_number(beta):
                raise ValueError(f"yarn {name}={beta!r} in {path}: must be a positive number")
            betas.append(float(beta))
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        for name, v in (("mscale", mscale), ("mscale_all_dim", mscale_all)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"yarn {name}={v!r} in {path}: must be a number")

        def get_mscale(m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        attention = cls._attention(rope, path, "yarn", lambda: get_mscale(mscale) / get_mscale(mscale_all)
                                   if mscale and mscale_all else get_mscale())

        def correction_dim(rotations):  # the dim whose frequency turns `rotations` times over the original length
            return rotary * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low, high = correction_dim(betas[0]), correction_dim(betas[1])
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        divisors = []
        for i in range(rotary // 2):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: kept (extrapolated), 1: interpolated
            divisors.append(1.0 / (ramp / factor + (1.0 - ramp)))
        return tuple(divisors), attention


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
    "llama3-405b": ModelConfig(vocab_size=128256, hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                               head_dim=128, intermediate_size=53248, rope_theta=500000.0, max_seq_len=131072),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or a Hugging Face directory")
    return PRESETS[name]
