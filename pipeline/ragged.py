"""Batches of prompts of different lengths, as a serving stack runs them: the rows' chunks packed one after another
(no padding), each token at its own position, the KV cache in pages that a stage allocates as chunks arrive.

- `ragged_plan(lengths, chunk_size, token_budget)`: the steps of a prefill. Step k holds the k-th chunk of every
  row still running (up to `chunk_size` tokens each; None: every row whole, in one step), or, with a token budget,
  up to that many tokens a step filled from the rows in order. A row's chunk is empty before it starts and once its
  prompt is done, and rows end at different steps.
- `RaggedStep`: one step's metadata, what `chunk_attention`'s paged path takes (cu_seqlens, prefix lengths) and
  the positions RoPE takes, plus which rows end in it (their last token gives their logits).
- `PagePool`: one stage's K/V pages [layers, num_pages, page_size, Hkv, D] and each row's pages; `reserve` hands
  out free pages as a row's positions grow, `block_table` is the int32 [B, max_pages] the kernel reads;
  `free_row` returns a finished row's pages, `share_prefix` lets a row start from another row's cached prefix
  (its full pages shared, read only; the partial last page copied), as a serving stack's prefix cache does.

On the wire a step's hidden state is [1, N, H] (N: the step's tokens over all rows), so links, codecs and schedules
treat it as a chunk of N tokens of a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import checks
from .ops import host_tensor


@dataclass(frozen=True)
class RaggedStep:
    starts: tuple[int, ...]  # each row's prefix length before this step
    lengths: tuple[int, ...]  # each row's tokens in this step (0: nothing this step)
    ends: tuple[int, ...]  # rows whose prompt ends in this step

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def offsets(self) -> list[int]:
        """cu_seqlens: where each row's tokens start in the packed step, and the total."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    def last_index(self, row: int) -> int:
        """The packed index of `row`'s last token in this step."""
        return self.offsets[row + 1] - 1

    def positions(self) -> list[int]:
        return [p + i for p, n in zip(self.starts, self.lengths) for i in range(n)]

    def split(self, m: int) -> tuple["RaggedStep", "RaggedStep"]:
        """The step's packed tokens [0, m) and [m, N) as two steps, in order: a row cut at m continues in the second
        from where the first leaves it (its first part is the second's prefix). Rows end in neither (`ends` empty):
        logits come from the whole step."""
        if not 0 < m < self.tokens:
            raise ValueError(f"a step of {self.tokens} tokens splits at 1..{self.tokens - 1}, got {m}")
        first = tuple(max(0, min(n, m - o)) for o, n in zip(self.offsets, self.lengths))
        rest = tuple(n - a for n, a in zip(self.lengths, first))
        return (RaggedStep(self.starts, first, ()),
                RaggedStep(tuple(p + a for p, a in zip(self.starts, first)), rest, ()))

    def tensors(self, device) -> dict:
        """cu_seqlens [B+1], prefix lengths [B] (int32) and positions [1, N] (int64) on `device`, and the longest
        chunk and prefix (the kernel's launch hints, from the host: no sync)."""
        return dict(cu_seqlens=host_tensor(self.offsets, torch.int32, device),
                    prefix=host_tensor(self.starts, torch.int32, device),
                    positions=host_tensor(self.positions(), torch.int64, device)[None],
                    max_chunk=max(self.lengths), max_prefix=max(self.starts))


def check_rows(rows, cfg, decode: bool = True) -> list[torch.Tensor]:
    """A ragged batch: a non-empty list of 1-D torch.long (or torch.int32) token tensors, each at least one token,
    ids in the vocabulary of `cfg` (a ModelConfig), each fitting its context (with one more position for decode)."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"tokens: a ragged batch must be a non-empty list of 1-D token tensors, got "
                         f"{type(rows).__name__} of {len(rows) if isinstance(rows, (list, tuple)) else '?'} rows")
    for b, t in enumerate(rows):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tokens must be a torch.long tensor [B, L] or a list of 1-D torch.long tensors (a ragged "
                            f"batch); row {b} of the list is a {type(t).__name__}")
        if t.dtype not in checks.TOKEN_DTYPES or t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"tokens: row {b} of a ragged batch must be a non-empty 1-D torch.long (or torch.int32) "
                             f"tensor, got {t.dtype} {tuple(t.shape)}")
        if t.numel() + decode > cfg.max_seq_len:
            raise ValueError(f"row {b} has {t.numel()} tokens{' (+1 decode)' if decode else ''}, more than "
                             f"{cfg.context}")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"row {b}: token ids must be in [0, {cfg.vocab_size}), got min {lo}, max {hi}")
    return list(rows)


def ragged_plan(lengths: list[int], chunk_size: int | None = None,
                token_budget: int | None = None) -> list[RaggedStep]:
    """The steps of a ragged prefill. Without `token_budget`: every row in chunks of `chunk_size` tokens (None:
    whole), step k holding every row's k-th chunk. With `token_budget` (a serving scheduler's per-step token
    budget, vLLM's max_num_batched_tokens): each step packs up to that many tokens, filled from the rows in order,
    first come first served: a row takes what it has left (at most `chunk_size` per step where given), the next
    row what the budget leaves; the rows behind wait for a later step (their chunk is empty until then)."""
    lengths = checks.int_list("row lengths", lengths, 1)
    if chunk_size is not None:
        chunk_size = checks.positive_int("chunk_size", chunk_size)
    if token_budget is not None:
        token_budget = checks.positive_int("token_budget", token_budget)
    cap = chunk_size or max(lengths)  # a row's most tokens in one step
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths)):
        left, sizes = token_budget or sum(lengths), []  # no budget: one that never binds
        for d, n in zip(done, lengths):
            sizes.append(min(n - d, cap, left))
            left -= sizes[-1]
        ends = tuple(b for b, (d, c, n) in enumerate(zip(done, sizes, lengths)) if c and d + c == n)
        steps.append(RaggedStep(tuple(done), tuple(sizes), ends))
        done = [d + c for d, c in zip(done, sizes)]
    return steps


def decode_step(lengths: list[int]) -> RaggedStep:
    """One decode token per row, each at its own position (the row's length so far)."""
    return RaggedStep(tuple(lengths), (1,) * len(lengths), tuple(range(len(lengths))))


@dataclass
class PagePool:
    """A stage's KV pages for `layers` layers and the rows' page lists. Pages are counted by the rows holding them:
    a page two rows share (a common prefix) goes back to the free list when the last of them lets it go."""
    k: torch.Tensor  # [layers, num_pages, page_size, Hkv, D]
    v: torch.Tensor
    rows: list[list[int]] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    refs: list[int] = field(default_factory=list)  # rows holding each page

    @classmethod
    def create(cls, layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (layers, num_pages, page_size, kv_heads, head_dim)
        pool = cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        pool.reset(0)
        return pool

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    def reset(self, rows: int) -> None:
        """Every page free, `rows` empty rows."""
        self.rows = [[] for _ in range(rows)]
        self.free = list(range(self.num_pages - 1, -1, -1))  # popped from the end: pages 0, 1, 2, ... first
        self.refs = [0] * self.num_pages

    def _row(self, row: int) -> list[int]:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(self.rows):
            raise ValueError(f"page pool: row must be an int in [0, {len(self.rows)}), got {checks.shown(row)}")
        return self.rows[row]

    def _take(self, row: int, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"page pool exhausted: row {row} needs {n} more pages of {self.page_size}, "
                               f"{len(self.free)} of {self.num_pages} are free")
        pages = [self.free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def reserve(self, row: int, length: int) -> None:
        """Pages for `row`'s positions [0, length)."""
        need = -(-length // self.page_size) - len(self._row(row))
        self.rows[row] += self._take(row, max(0, need))

    def free_row(self, row: int) -> None:
        """`row` is done: it lets go of its pages (those no other row shares are free again) and holds none."""
        for p in self._row(row):
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)
        self.rows[row] = []

    def share_prefix(self, row: int, src: int, length: int) -> None:
        """An empty `row` starts from `src`'s cached positions [0, length) (a common prompt prefix, already computed
        there): the full pages among them are shared (the kernel only reads positions below a row's prefix, so
        neither row writes them again), the partial last one is copied into a page of `row`'s own, which its next
        tokens then fill. `row`'s next chunk starts at position `length`."""
        mine, theirs = self._row(row), self._row(src)
        if mine:
            raise ValueError(f"page pool: row {row} already holds pages; share a prefix into an empty row")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= len(theirs) * self.page_size:
            raise ValueError(f"page pool: row {src} holds {len(theirs) * self.page_size} positions; a shared prefix "
                             f"must be an int in [0, that], got {checks.shown(length)}")
        full, rest = divmod(length, self.page_size)
        for p in theirs[:full]:
            self.refs[p] += 1
        self.rows[row] = theirs[:full]
        if rest:
            (page,) = self._take(row, 1)
            src_page = theirs[full]
            self.k[:, page, :rest] = self.k[:, src_page, :rest]
            self.v[:, page, :rest] = self.v[:, src_page, :rest]
            self.rows[row].append(page)

    def block_table(self, device) -> torch.Tensor:
        width = max(1, max((len(r) for r in self.rows), default=1))
        table = torch.full((len(self.rows), width), -1, dtype=torch.int32)
        for b, pages in enumerate(self.rows):
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return host_tensor(table, torch.int32, device)  # no host sync: one host thread may drive every stage

    def row_cache(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `row`'s first `length` positions, gathered from its pages: (k, v) [layers, 1, length, Hkv, D]."""
        pos = torch.arange(length)
        pages = torch.tensor(self.rows[row], dtype=torch.long)[pos // self.page_size].to(self.k.device)
        slots = (pos % self.page_size).to(self.k.device)
        return self.k[:, pages, slots][:, None], self.v[:, pages, slots][:, None]


def pages_needed(lengths: list[int], page_size: int, decode: bool = True) -> int:
    """Pages a pool needs for every row's prompt (and its decode token)."""
    return sum(-(-(n + decode) // page_size) for n in lengths)
