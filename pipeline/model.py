"""A Llama-style decoder (RMSNorm, rotate-half RoPE, GQA attention, SwiGLU) in plain PyTorch, built so that one
`Transformer` can own any contiguous range of layers: the embedding lives on the first part, the final norm and
the head on the last. Every op goes through the `Ops` seam (torch reference or Triton kernels)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels import rope_tables

from . import checks
from .config import ModelConfig, get_preset
from .ops import Ops, get_ops, host_tensor, select_rows
from .ragged import PagePool, RaggedStep, pages_needed
from .tp import check_tp, local_config, shard_state
from .weights import load_hf_weights, random_weights


def model_rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's RoPE cos, sin tables [max_seq_len, head_dim/2] (fp32), every scaling in the config applied."""
    return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_llama3_scaling, device=device,
                       linear_factor=cfg.rope_linear_factor, rotary_dim=cfg.rotary_dim,
                       freq_factors=cfg.rope_freq_factors, attention_factor=cfg.rope_attention_factor)


def rotary_order(cfg: ModelConfig) -> torch.Tensor | None:
    """With partial rotary embedding (`cfg.rotary_dim` R of D dims rotated, pairs (i, i + R/2) for i < R/2, the
    last D - R dims passed through, as transformers' Phi-3 does), the order in which this model keeps each head's
    dims of q and k: new dim j holds the checkpoint's dim order[j], so that the rotated pairs sit at (j, j + D/2)
    for j < R/2, where the rotate-half kernel pairs them, and the passed-through dims fill the rest (their table
    columns have cos 1, sin 0). q and k are permuted alike, so every q.k, hence attention, is unchanged; v is not.
    None when whole heads rotate. The KV cache holds k in this order."""
    D, R = cfg.head_dim, cfg.rotary_dim
    if R is None or R == D:
        return None
    half, rest = R // 2, (D - R) // 2
    first = list(range(half)) + list(range(R, R + rest))
    second = list(range(half, R)) + list(range(R + rest, D))
    return torch.tensor(first + second)


class KVCache:
    """K and V for the layers of one model part: k, v [layers, B, max_len, Hkv, D]."""

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: bool = True, window: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.rope = rope  # False: a NoPE layer, q and k not rotated (`ModelConfig.nope_layers`)
        self.window = window  # a sliding attention window (`ModelConfig.window_layers`), or None
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.attention_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.wqkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)  # fused q, k, v projections
        self.wo = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head of q and of k before RoPE
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))
        self.ffn_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # fused gate, up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def _rotated_qkv(self, x, positions, rope_cos, rope_sin, ops: Ops):
        """x [B, C, H] -> q [B, C, Hq, D], k, v [B, C, Hkv, D] from the fused projection, q and k rotated at
        `positions` (an int start, or a tensor [B, C] of each token's position), except in a NoPE layer."""
        cfg = self.cfg
        B, C, _ = x.shape
        qkv = self.wqkv(x)  # [B, C, (Hq + 2 Hkv) D]
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        v = qkv[..., (Hq + Hkv) * D:].view(B, C, Hkv, D)
        if cfg.qk_norm:  # each head normed with its own weights for q and k, then rotated: contiguous [B, C, h, D]
            eps = cfg.rms_norm_eps
            q = ops.add_rms_norm(qkv[..., :Hq * D].reshape(B, C, Hq, D).contiguous(), None, self.q_norm, eps)[0]
            k = ops.add_rms_norm(qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, C, Hkv, D).contiguous(), None,
                                 self.k_norm, eps)[0]
            if not self.rope:
                return q, k, v
            return ops.rope(q, rope_cos, rope_sin, positions), ops.rope(k, rope_cos, rope_sin, positions), v
        # q's and k's heads sit side by side in the fused projection: one rope call (one launch) rotates both
        qk = qkv[..., :(Hq + Hkv) * D].view(B, C, Hq + Hkv, D)
        if self.rope:
            qk = ops.rope(qk, rope_cos, rope_sin, positions)
        return qk[:, :, :Hq], qk[:, :, Hq:], v

    def attend(self, x, start_pos: int, k_cache, v_cache, rope_cos, rope_sin, ops: Ops):
        """x: the normed input [B, C, H] of the attention at positions [start_pos, start_pos + C). Appends K, V to
        the cache; returns wo's output [B, C, H] (with TP, this rank's partial sum)."""
        B, C, _ = x.shape
        q, k, v = self._rotated_qkv(x, start_pos, rope_cos, rope_sin, ops)
        attn = ops.attention(q, k, v, k_cache, v_cache, start_pos, window=self.window)  # [B, C, Hq, D], appends k, v
        return self.wo(attn.reshape(B, C, -1))

    def attend_packed(self, x, meta: dict, k_pages, v_pages, block_table, rope_cos, rope_sin, ops: Ops,
                      check: bool = True):
        """x: the normed input [1, N, H] of the packed rows of a ragged step (`pipeline.ragged`), each token at
        its own position (meta["positions"]); K/V appended to the rows' pages. Returns wo's output [1, N, H].
        check=False: the kernel's device-side check of the rows and pages was done for this step already (at the
        part's first layer: every layer has the same block table, rows and pool size)."""
        N = x.shape[1]
        q, k, v = self._rotated_qkv(x, meta["positions"], rope_cos, rope_sin, ops)
        attn = ops.attention(q[0], k[0], v[0], k_pages, v_pages, meta["prefix"], block_table=block_table,
                             cu_seqlens=meta["cu_seqlens"], max_chunk=meta["max_chunk"],
                             max_prefix=meta["max_prefix"], check=check, window=self.window)  # [N, Hq, D]
        return self.wo(attn.reshape(1, N, -1))

    def feed_forward(self, x, ops: Ops):
        """x: the normed input [B, C, H] of the MLP; returns w2's output (with TP, this rank's partial sum)."""
        gate_up = self.w13(x)  # [B, C, 2I]
        I = self.cfg.intermediate_size
        return self.w2(ops.swiglu(gate_up[..., :I], gate_up[..., I:]))

    def forward(self, h, residual, attend, ops: Ops, reduce=None):
        """h, residual [B, C, H] (residual None on a part's first block); returns the new (h, residual): norm,
        `attend(x)` (`attend` or `attend_packed` bound to their caches), all-reduce, add + norm, MLP, all-reduce.
        With tensor parallelism this block is one rank's shard (its cfg has this rank's heads and MLP columns) and
        `reduce` sums the row-parallel outputs of wo and w2 over the ranks."""
        eps = self.cfg.rms_norm_eps
        x, residual = ops.add_rms_norm(h, residual, self.attention_norm, eps)
        h = attend(x)
        if reduce is not None:
            h = reduce(h)
        x, residual = ops.add_rms_norm(h, residual, self.ffn_norm, eps)
        h = self.feed_forward(x, ops)
        if reduce is not None:
            h = reduce(h)
        return h, residual



class Transformer(nn.Module):
    """Layers `layers` of a Llama-style model. forward(tokens) is the unchunked prefill of the whole model.
    With tp > 1, the blocks are rank `tp_rank`'s shards (`pipeline.tp`) and `self.reduce` must be set to the TP
    group's all-reduce before running."""

    def __init__(self, cfg: ModelConfig, layers: range | None = None, ops: str | Ops = "torch", tp_rank: int = 0,
                 tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.tp, self.tp_rank = tp, tp_rank
        self.local_cfg = local_config(cfg, tp)  # this rank's heads and MLP columns
        self.reduce = None
        self.tp_comm = "serial"  # how the TP ranks combine their partial sums (TP_COMMS), with tp > 1
        # stage boundaries crossing as 1/T of the tokens per TP rank (tp_boundary "sharded") under sequence
        # parallelism: this part hands on and takes in its own slice, the one sequence parallelism holds, with no
        # all-gather at either end (`hands_on_shards`, `keeps_shard`); set per job by the runner
        self.shard_boundaries = False
        self.layer_ids = range(cfg.num_layers) if layers is None else layers
        if not (0 <= self.layer_ids.start < self.layer_ids.stop <= cfg.num_layers) or self.layer_ids.step != 1:
            raise ValueError(f"layers must be a non-empty contiguous range within [0, {cfg.num_layers}), "
                             f"got {self.layer_ids}")
        self.is_first = self.layer_ids.start == 0
        self.is_last = self.layer_ids.stop == cfg.num_layers
        self.ops = get_ops(ops)
        # parts a stage does not own are None (torchtitan style); forward skips them
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(Block(self.local_cfg, rope=i not in cfg.nope_layers, window=cfg.layer_window(i))
                                    for i in self.layer_ids)
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size)) if self.is_last else None
        self.output = None
        if self.is_last:
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = model_rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, D/2] fp32
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- weights -------------------------------------------------------------------------------------------
    def load_hf_state(self, state) -> None:
        """Copies Hugging Face-named tensors (a mapping, as from `pipeline.weights`: each read or drawn when asked
        for) into this part, one at a time, into the fused qkv and gate/up weights' slices: nothing is held twice."""
        def put(dst: torch.Tensor, name: str) -> None:
            dst.copy_(state[name])  # cast to the parameter's dtype on the way in; the source is dropped here

        def put_rows(dst: torch.Tensor, names: list[str]) -> None:
            row = 0
            for name in names:
                t = state[name]
                dst[row:row + t.shape[0]].copy_(t)
                row += t.shape[0]
                del t
            if row != dst.shape[0]:
                raise ValueError(f"{names} give {row} rows, the fused weight has {dst.shape[0]}")
        order = rotary_order(self.cfg)
        heads = self.local_cfg.num_heads + self.local_cfg.num_kv_heads  # q's and k's, first in wqkv

        def reorder(t: torch.Tensor) -> None:  # q's and k's rows (or a norm's [D]) into the rotary order
            t.copy_(t.view(-1, self.cfg.head_dim, *t.shape[1:])[:, order.to(t.device)].view(t.shape))
        with torch.no_grad():
            if self.is_first:
                put(self.tok_embeddings.weight, "model.embed_tokens.weight")
            for block, i in zip(self.layers, self.layer_ids):
                p = f"model.layers.{i}."
                put(block.attention_norm, p + "input_layernorm.weight")
                put(block.ffn_norm, p + "post_attention_layernorm.weight")
                if self.cfg.qk_norm:
                    put(block.q_norm, p + "self_attn.q_norm.weight")
                    put(block.k_norm, p + "self_attn.k_norm.weight")
                put_rows(block.wqkv.weight, [p + f"self_attn.{n}_proj.weight" for n in "qkv"])
                if self.cfg.qkv_bias:
                    put_rows(block.wqkv.bias, [p + f"self_attn.{n}_proj.bias" for n in "qkv"])
                if order is not None:
                    D = self.cfg.head_dim
                    reorder(block.wqkv.weight[:heads * D])
                    if self.cfg.qkv_bias:
                        reorder(block.wqkv.bias[:heads * D])
                    if self.cfg.qk_norm:
                        reorder(block.q_norm)
                        reorder(block.k_norm)
                put(block.wo.weight, p + "self_attn.o_proj.weight")
                if self.cfg.o_bias:
                    put(block.wo.bias, p + "self_attn.o_proj.bias")
                put_rows(block.w13.weight, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
                put(block.w2.weight, p + "mlp.down_proj.weight")
                if self.cfg.mlp_bias:
                    put_rows(block.w13.bias, [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"])
                    put(block.w2.bias, p + "mlp.down_proj.bias")
            if self.is_last:
                put(self.norm, "model.norm.weight")
                put(self.output.weight, "model.embed_tokens.weight" if self.cfg.tie_embeddings else "lm_head.weight")
            self._fold_constants()

    def _fold_constants(self) -> None:
        """Granite's constants (`ModelConfig.embedding_multiplier` ...) folded into the loaded weights, so the
        kernels run Llama's math: the embedding scaled; q's rows (weight and bias) by attention_multiplier x
        sqrt(head_dim), since attention scales scores by 1/sqrt(head_dim) and RoPE is linear; o and down projections
        (weights and biases) by residual_multiplier; the head by 1 / logits_scaling (a tied head is the embedding
        unscaled, as in transformers). Each in the parameter's dtype, in place."""
        cfg = self.cfg
        q_rows = self.local_cfg.num_heads * cfg.head_dim
        q_scale = 1.0 if cfg.attention_multiplier is None else cfg.attention_multiplier * cfg.head_dim ** 0.5
        scales = [(self.tok_embeddings.weight if self.is_first else None, cfg.embedding_multiplier),
                  (self.output.weight if self.is_last else None, 1.0 / cfg.logits_scaling)]
        for block in self.layers:
            scales += [(block.wqkv.weight[:q_rows], q_scale),
                       (block.wqkv.bias[:q_rows] if cfg.qkv_bias else None, q_scale),
                       (block.wo.weight, cfg.residual_multiplier), (block.wo.bias, cfg.residual_multiplier),
                       (block.w2.weight, cfg.residual_multiplier), (block.w2.bias, cfg.residual_multiplier)]
        for t, scale in scales:
            if t is not None and scale != 1.0:
                t.mul_(scale)

    # ---- running -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].wo.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].wo.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        return KVCache(len(self.layers), batch, max_len, self.local_cfg.num_kv_heads, self.cfg.head_dim, self.dtype,
                       self.device)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in checks.TOKEN_DTYPES:
            raise TypeError(f"tokens must be a torch.long or torch.int32 tensor [B, L], got "
                            f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape [B, L] with B, L >= 1, got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens is longer than max_seq_len {self.cfg.max_seq_len}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got min {lo}, max {hi}")

    @torch.no_grad()
    def forward_chunk(self, x: torch.Tensor, start_pos: int, cache: KVCache, last_only: bool = False,
                      tokens: int | None = None):
        """One chunk through this part's layers.

        x: tokens [B, C] on the first part, else the hidden state [B, C, H] from the previous part (with
        `keeps_shard(C)`, this rank's slice [B, ceil(C/T), H] of it; `tokens` then gives C).
        Returns logits [B, C, V] (or [B, V] with last_only) on the last part, else the hidden state [B, C, H] (with
        `hands_on_shards`, of a sequence-parallel chunk this rank's slice of it).
        """
        C = x.shape[1] if tokens is None else tokens
        if start_pos + C > cache.max_len:
            raise ValueError(f"positions [{start_pos}, {start_pos + C}) do not fit the cache ({cache.max_len})")
        # a hidden state sliced out of a longer one is copied to rows the row-wise kernels can view (no-op otherwise)
        h = self.tok_embeddings(x) if self.is_first else x.contiguous()
        rope = (self.rope_cos, self.rope_sin, self.ops)
        starts = (start_pos, start_pos + C // 2)  # the token halves of the ISO schedule
        schedule = self._schedule(C)
        h, residual = self._layers(
            h, schedule, lambda i, x: self.layers[i].attend(x, start_pos, cache.k[i], cache.v[i], *rope),
            lambda j, i, x: self.layers[i].attend(x, starts[j], cache.k[i], cache.v[i], *rope), C,
            [C - 1] if last_only and self.is_last else None)
        if not self.is_last:  # the residual stream: the one tensor that crosses a stage boundary
            return h if residual is None else h + residual
        x, _ = self.ops.add_rms_norm(h, residual, self.norm, self.cfg.rms_norm_eps)
        logits = self.output(x)
        return logits[:, -1] if last_only else logits

    def new_pool(self, lengths: list[int], page_size: int) -> PagePool:
        """A page pool for ragged rows of these lengths (and one decode token each): this part's layers, this
        rank's KV heads."""
        return PagePool.create(len(self.layers), pages_needed(lengths, page_size), page_size,
                               self.local_cfg.num_kv_heads, self.cfg.head_dim, self.dtype, self.device)

    @torch.no_grad()
    def forward_packed(self, x: torch.Tensor, step: RaggedStep, pool: PagePool) -> torch.Tensor:
        """One ragged step through this part's layers (`pipeline.ragged`): the rows' chunks packed, x tokens
        [1, N] on the first part, else the hidden state [1, N, H]; each row's K/V go to its pages in `pool`
        (reserved here, as the positions grow). Returns, on the last part, logits [R, V] at the last token of the
        R rows whose prompt ends in this step (in `step.ends` order); else the hidden state [1, N, H]. With TP,
        tp_comm applies as to a dense chunk: "overlap" halves the packed tokens (a row cut in two continues in the
        second half over the first half's K/V, `RaggedStep.split`), "sequence" shards them over the ranks between
        attentions."""
        for b, (p, n) in enumerate(zip(step.starts, step.lengths)):
            if n:
                pool.reserve(b, p + n)
        if step.tokens and max(p + n for p, n in zip(step.starts, step.lengths)) > self.cfg.max_seq_len:
            raise ValueError(f"a row's positions pass max_seq_len {self.cfg.max_seq_len}")
        table = pool.block_table(self.device)
        h = self.tok_embeddings(x) if self.is_first else x.contiguous()
        rope = (self.rope_cos, self.rope_sin, self.ops)
        schedule = self._schedule(step.tokens)
        if schedule == "overlap":  # each token half's metadata; the whole step's is not needed
            halves = [half.tensors(self.device) for half in step.split(step.tokens // 2)]
        else:
            meta = step.tensors(self.device)
        h, residual = self._layers(
            h, schedule,  # the rows and pages checked at the first layer only: the same for every layer
            lambda i, x: self.layers[i].attend_packed(x, meta, pool.k[i], pool.v[i], table, *rope, check=i == 0),
            lambda j, i, x: self.layers[i].attend_packed(x, halves[j], pool.k[i], pool.v[i], table, *rope,
                                                         check=i == 0),
            step.tokens, [step.last_index(b) for b in step.ends] if self.is_last else None)
        if not self.is_last:
            return h if residual is None else h + residual
        if not step.ends:  # no row's prompt ends in this step
            return h.new_empty((0, self.cfg.vocab_size))
        x, _ = self.ops.add_rms_norm(h, residual, self.norm, self.cfg.rms_norm_eps)
        return self.output(x)[0]

    def _schedule(self, tokens: int) -> str:
        """How this part combines its TP ranks' partial sums on a chunk of `tokens` tokens: tp_comm, unless the
        chunk is too short for it (one token has no halves; fewer tokens than ranks, no shards), then serial."""
        if self.reduce is None or (self.tp_comm == "overlap" and tokens < 2) or \
                (self.tp_comm == "sequence" and tokens < self.tp):
            return "serial"
        return self.tp_comm

    def hands_on_shards(self) -> bool:
        """Whether this part sends the chunks it runs sequence parallel as the slice of their tokens its TP rank
        holds (`shard_boundaries`, not the last part), with no closing all-gather. A chunk of fewer tokens than T
        (run serially) crosses whole, as every sharded boundary that short does (`pipeline.tp.sliced`)."""
        return self.shard_boundaries and not self.is_last

    def keeps_shard(self, tokens: int) -> bool:
        """Whether a received boundary of `tokens` tokens stays this TP rank's 1/T slice, the one sequence
        parallelism computes on (`shard_boundaries`, a sequence-parallel chunk), rather than being all-gathered."""
        return self.shard_boundaries and not self.is_first and self._schedule(tokens) == "sequence"

    def _layers(self, h, schedule: str, attend, attend_half, tokens: int, rows: list[int] | None = None):
        """This part's layers on a chunk of `tokens` tokens, under `schedule` (`_schedule`): `attend(i, x)` is
        layer i's attention of the whole chunk, `attend_half(j, i, x)` of token half j (ISO overlap). Returns (h,
        residual) of the whole chunk, or of the tokens at indices `rows` alone (the last part's logits need only
        those; a sequence-parallel chunk then all-gathers them alone); residual None when already added in."""
        if schedule == "sequence":
            return self._layers_sequence_parallel(h, attend, tokens, rows), None
        if schedule == "overlap":
            h, residual = self._layers_overlapped(h, h.shape[1] // 2, attend_half)
        else:
            residual = None
            for i, block in enumerate(self.layers):
                h, residual = block(h, residual, lambda x, i=i: attend(i, x), self.ops, self.reduce)
        if rows is None:
            return h, residual
        return select_rows(h, rows), None if residual is None else select_rows(residual, rows)

    def _layers_overlapped(self, h, m: int, attend):
        """ISO-style overlap of the reduce (tp_comm="overlap"): the chunk's tokens in two halves, [0, m) and
        [m, C); each half's all-reduce is posted asynchronously and runs while the other half computes:
        attention(a), attention(b), then mlp(a) once a's reduce is in, mlp(b), ... `attend(j, i, x)` is layer i's
        attention of half j (wo's partial sum); half b attends to half a's keys, appended to the cache by then.
        Returns (h, residual) of the whole chunk."""
        eps = self.cfg.rms_norm_eps
        pending = [h[:, :m], h[:, m:]]  # a tensor, or an all-reduce in flight (Pending)
        residual = [None, None]
        value = lambda p: p if isinstance(p, torch.Tensor) else p.wait()  # noqa: E731
        for i, block in enumerate(self.layers):
            for j in (0, 1):
                x, residual[j] = self.ops.add_rms_norm(value(pending[j]), residual[j], block.attention_norm, eps)
                pending[j] = self.reduce.start(attend(j, i, x))
            for j in (0, 1):
                x, residual[j] = self.ops.add_rms_norm(pending[j].wait(), residual[j], block.ffn_norm, eps)
                pending[j] = self.reduce.start(block.feed_forward(x, self.ops))
        h = torch.cat([value(p) for p in pending], dim=1)
        return h, torch.cat(residual, dim=1)

    def _layers_sequence_parallel(self, h, attend, C: int, rows: list[int] | None = None):
        """Megatron sequence parallelism (tp_comm="sequence"): between the row-parallel outputs and the next
        column-parallel inputs, each rank holds 1/T of the tokens; wo and w2's partial sums are reduce-scattered
        over tokens, the residual add and the norms run on this rank's n = ceil(C/T) tokens, and an all-gather
        rebuilds the whole chunk for wqkv and w13 (the chunk is padded to T·n rows for the collectives).
        `attend(i, x)` is layer i's attention of the whole chunk. h: the chunk [B, C, H], or with
        `shard_boundaries` on a part that is not the first, this rank's slice [B, n, H] as the previous part handed
        it on. Returns the whole chunk's residual stream [B, C, H] (one more all-gather), or with
        `hands_on_shards` this rank's slice of it, or with `rows` the tokens at those indices [B, len(rows), H]
        (each rank offers the ones it holds, zeros for the others, and an all-gather of len(rows) per rank
        assembles them)."""
        B, H = h.shape[0], h.shape[2]
        T, eps, reduce = self.tp, self.cfg.rms_norm_eps, self.reduce
        n = -(-C // T)
        pad = lambda t: t if T * n == C else torch.nn.functional.pad(t, (0, 0, 0, T * n - C))  # noqa: E731
        payload = B * C * H * h.element_size()
        mine = slice(self.tp_rank * n, (self.tp_rank + 1) * n)
        if not self.keeps_shard(C):
            h = pad(h)[:, mine]
        elif h.shape[1] != n:
            raise ValueError(f"a sequence-parallel slice of a {C}-token chunk over tp={T} has {n} rows, got "
                             f"{h.shape[1]}")
        h, residual = h.contiguous(), None  # this rank's tokens of the residual stream
        for i, block in enumerate(self.layers):
            x, residual = self.ops.add_rms_norm(h, residual, block.attention_norm, eps)
            out = attend(i, reduce.all_gather(x)[:, :C])
            h = reduce.reduce_scatter(pad(out), payload)
            x, residual = self.ops.add_rms_norm(h, residual, block.ffn_norm, eps)
            h = reduce.reduce_scatter(pad(block.feed_forward(reduce.all_gather(x)[:, :C], self.ops)), payload)
        h = (h + residual).contiguous()
        if self.hands_on_shards():
            return h
        if rows is None:
            return reduce.all_gather(h)[:, :C]
        if not rows:
            return h[:, :0]
        # token r is row r % n of rank r // n: each rank offers the wanted tokens it holds (zeros elsewhere)
        want = host_tensor(rows, torch.long, h.device)
        owner, local = want // n, want % n
        offered = torch.where((owner == self.tp_rank)[None, :, None], h[:, local], 0).contiguous()
        everyone = reduce.all_gather(offered).view(B, T, len(rows), H)  # rank by rank
        return everyone[:, owner, torch.arange(len(rows), device=h.device)]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, chunk_size: int | None = None, cache: KVCache | None = None,
                max_len: int | None = None):
        """Whole model only. Prefill in chunks of `chunk_size` (None: one chunk). Returns (logits [B, L, V], cache)."""
        if not (self.is_first and self.is_last):
            raise RuntimeError("prefill() needs the whole model; pipeline stages use forward_chunk()")
        self.check_tokens(tokens)
        B, L = tokens.shape
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive integer, got {checks.shown(chunk_size)}")
        if cache is None:
            cache = self.new_cache(B, max_len or L)
        step = chunk_size or L
        logits = [self.forward_chunk(tokens[:, s:s + step], s, cache) for s in range(0, L, step)]
        return torch.cat(logits, dim=1), cache

    @torch.no_grad()
    def decode(self, token: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """One decode step: token [B] at position `pos` (the prompt length so far). Returns logits [B, V]."""
        self.check_tokens(token[:, None])
        return self.forward_chunk(token[:, None], pos, cache, last_only=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unchunked prefill: tokens [B, L] -> logits [B, L, V]."""
        return self.prefill(tokens)[0]


def resolve_config(source: str | Path | ModelConfig) -> ModelConfig:
    """A preset name, a Hugging Face directory or a ModelConfig -> its ModelConfig."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, nn.Module):  # a model already loaded: each stage (process) builds its own layers
        raise TypeError(f"model source must be a preset name, a Hugging Face directory or a ModelConfig, got "
                        f"{checks.shown(source)}: pass what it was loaded from (every stage loads its own layers)")
    if not isinstance(source, (str, Path)):
        raise TypeError(f"model source must be a preset name, a directory or a ModelConfig, got {checks.shown(source)}")
    if str(source).strip() == "":
        raise ValueError(f"model source must be a preset name or a Hugging Face directory, got {str(source)!r}")
    if Path(source).is_dir():
        return ModelConfig.from_hf(source)
    if isinstance(source, Path) or "/" in source or source.startswith("."):
        if Path(source).exists():
            raise ValueError(f"model {source} is a file; give the Hugging Face directory that holds config.json")
        hub = isinstance(source, str) and source.count("/") == 1 and not source.startswith(("/", ".", "~"))
        raise checks.NotFound(f"model directory {source} does not exist" + (
            f" (models are read from a local directory, never downloaded: if {source} is a Hugging Face Hub id, "
            f"download it first, e.g. `hf download {source} --local-dir DIR`, and give DIR)" if hub else ""))
    return get_preset(source)


def load_model(source: str | Path | ModelConfig, dtype: torch.dtype | str = torch.float32, device="cpu",
               layers: range | None = None, ops: str | Ops = "torch", seed: int = 0, tp_rank: int = 0,
               tp: int = 1) -> Transformer:
    """Builds layers `layers` (default all) of a preset (seeded random weights) or a Hugging Face directory
    (safetensors, only the tensors those layers need, after checking the checkpoint against config.json).
    dtype: float32, float16 or bfloat16 (name or torch dtype). tp > 1: rank `tp_rank`'s shard of those layers
    (`pipeline.tp`); the same weights as tp = 1, split."""
    cfg = resolve_config(source)
    dtype = checks.DTYPES[checks.dtype_name(dtype)]
    device = checks.device(device)
    checks.integer("seed", seed)
    if layers is not None and not isinstance(layers, range):
        raise TypeError(f"layers must be a range of layer indices, got {checks.shown(layers)}")
    layers = range(cfg.num_layers) if layers is None else layers
    get_ops(ops)
    check_tp(cfg, tp)
    checks.integer("tp_rank", tp_rank)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank must be in [0, {tp}), got {tp_rank}")
    with torch.device("meta"):
        model = Transformer(cfg, layers, ops, tp_rank, tp).to(dtype)
    first, last = model.is_first, model.is_last
    if isinstance(source, ModelConfig) or not Path(source).is_dir():
        state = random_weights(cfg, layers, first, last, seed, device=device)
    else:
        state = load_hf_weights(source, cfg, layers, first, last)
    # allocated straight in the target dtype on the target device, then filled one tensor at a time: the peak is
    # this part's weights plus one source tensor (in float32, or the checkpoint's dtype)
    model = model.to_empty(device=device)
    model.load_hf_state(shard_state(state, cfg, tp_rank, tp))
    # RoPE tables stay fp32 whatever the model dtype (and were left uninitialised by to_empty)
    model.rope_cos, model.rope_sin = model_rope_tables(cfg, device)
    return model.eval()
