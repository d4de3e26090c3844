"""A pipeline stage: a contiguous range of layers, their KV cache, and `forward(x, start_pos)`. The first stage
also holds the embedding, the last the final norm and the head; only the last produces logits."""
from __future__ import annotations

import torch

from .graphs import ChunkGraphs
from .model import KVCache, Transformer, load_model
from .ops import Ops
from .ragged import pages_needed


def split_layers(num_layers: int, stages: int | list[int]) -> list[range]:
    """Per-stage layer ranges: `stages` as a count (even split, earlier stages take the remainder) or as an
    explicit list of per-stage layer counts."""
    if isinstance(stages, int):
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if stages > num_layers:
            raise ValueError(f"cannot split {num_layers} layers over {stages} stages (more stages than layers)")
        base, extra = divmod(num_layers, stages)
        counts = [base + (i < extra) for i in range(stages)]
    else:
        counts = list(stages)
        if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
            raise ValueError(f"per-stage layer counts must be positive integers, got {counts}")
        if sum(counts) != num_layers:
            raise ValueError(f"per-stage layer counts {counts} sum to {sum(counts)}, the model has {num_layers}")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


class Stage:
    """Stage `index` of `num_stages`: owns `layers` of the model and their KV cache (with tp > 1, TP rank
    `tp_rank`'s shard of them; `reduce` is the TP group's collectives, `tp_comm` how they are used: `pipeline.tp`)."""

    def __init__(self, source, layers: range, index: int, num_stages: int, dtype=torch.float32, device="cpu",
                 ops: str | Ops = "torch", seed: int = 0, tp_rank: int = 0, tp: int = 1, reduce=None,
                 tp_comm: str = "serial", cuda_graphs: bool = False):
        self.index, self.num_stages = index, num_stages
        self.tp_rank, self.tp = tp_rank, tp
        self.model: Transformer = load_model(source, dtype=dtype, device=device, layers=layers, ops=ops, seed=seed,
                                             tp_rank=tp_rank, tp=tp)
        self.model.reduce = reduce
        self.model.tp_comm = tp_comm
        self.cfg = self.model.cfg
        self.cache: KVCache | None = None
        self.pool = None  # ragged batches: a PagePool (pipeline.ragged)
        # each chunk's forward captured in a CUDA graph once, replayed after (pipeline.graphs); None: eager
        self.graphs = ChunkGraphs() if cuda_graphs else None
        self._caches: dict[tuple[int, int], KVCache] = {}  # with graphs: a cache per (batch, max_len), kept

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def reset_cache(self, batch: int, max_len: int) -> None:
        if self.cache is None or self.cache.batch != batch or self.cache.max_len != max_len:
            if self.graphs is None:
                self.cache = None  # the old one freed before the new one is made
                self.cache = self.model.new_cache(batch, max_len)
            else:  # graphs write into the cache they were captured with: each shape keeps its cache (and graphs),
                # so jobs of several lengths run round-robin in one run_jobs replay instead of re-capturing
                if (batch, max_len) not in self._caches:
                    self._caches[(batch, max_len)] = self.model.new_cache(batch, max_len)
                self.cache = self._caches[(batch, max_len)]
        # stale entries are never read (attention only reads positions < start_pos + C), so no zeroing needed

    def reset_pool(self, lengths: list[int], page_size: int) -> None:
        """A page pool for ragged rows of these lengths: every page free, no row holding any."""
        if self.pool is None or self.pool.num_pages < pages_needed(lengths, page_size) or \
                self.pool.page_size != page_size:
            self.pool = self.model.new_pool(lengths, page_size)
        self.pool.reset(len(lengths))

    def forward_packed(self, x: torch.Tensor, step) -> torch.Tensor:
        """One ragged step (`pipeline.ragged.RaggedStep`): packed rows in, packed hidden [1, N, H] or the ending
        rows' logits [R, V] out."""
        return self.model.forward_packed(x, step, self.pool)

    def forward(self, x: torch.Tensor, start_pos: int, last_only: bool = True,
                tokens: int | None = None) -> torch.Tensor:
        """x: tokens [B, c] (first stage) or hidden [B, c, H] (a TP rank's slice of it under sequence parallelism
        with sharded boundaries: `tokens` gives c). Returns hidden [B, c, H] (or the rank's slice), or logits
        [B, V] on the last stage (last position only). With cuda_graphs, through the chunk's CUDA graph."""
        if self.graphs is None:
            return self.model.forward_chunk(x, start_pos, self.cache, last_only=last_only, tokens=tokens)
        return self.graphs(lambda inp: self.model.forward_chunk(inp, start_pos, self.cache, last_only=last_only,
                                                                tokens=tokens),
                           x, (start_pos, last_only, tokens, self.cache.max_len))  # x's shape gives the batch
