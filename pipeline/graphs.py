"""CUDA graphs per stage chunk (`PipelineSpec(cuda_graphs=True)`, `python -m bench --cuda-graphs`).

In-process on a GPU one host thread enqueues every stage's work; a stage's chunk through two Llama-3-8B layers is
about twenty kernel launches (nine a layer: Triton's and cuBLAS's) and the Python around them, 1.7-3.3 ms of host
time in an H200 run's trace (profiled), while the stage computes the chunk in 10-14 ms on a quarter of the SMs: S
stages' enqueueing can pace the pipeline. With graphs the host enqueues a stage's chunk as three calls: the input
copied into the graph's input, the replay, the output copied out.

A chunk is keyed by what its launches depend on: the input's shape and dtype, its start position (an int start
rides in the kernels' arguments), whether only the last position's logits are wanted, the token count under
sequence parallelism, and the KV cache it writes (graphs write into the cache they were captured with: a `Stage`
with graphs keeps one cache per batch and length, and names it in the key). The first time a key is seen the chunk
runs eagerly on a copy of its input (its kernels compile and load outside any capture; the output returned is that
run's) and is then captured on the same copy and stream, without running; every later time the input is copied
into that copy and the graph replayed. A stage's graphs share one memory pool: they replay one after another on
the stage's stream, and each one's output is copied out before the next can run, so a later graph may reuse an
earlier one's scratch memory.
"""
from __future__ import annotations

from typing import Callable

import torch


class ChunkGraphs:
    """One stage's chunks, each captured in a CUDA graph the first time its key is seen and replayed after."""

    def __init__(self):
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph, static input, static output)
        self.pool = None  # the graphs' memory pool (made at the first capture: it needs CUDA)
        self.side: torch.cuda.Stream | None = None  # captures begun on the default stream go here
        self.captured = self.replayed = 0

    def counts(self) -> dict:
        """Captures and replays so far."""
        return dict(captured=self.captured, replayed=self.replayed)

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, key: tuple) -> torch.Tensor:
        """fn(x), through the graph of (x's shape and dtype, `key`): fn must launch the same work for every input
        of that key (no host syncs, no new tensors kept)."""
        key = (tuple(x.shape), x.dtype, *key)
        entry = self.graphs.get(key)
        if entry is None:
            out, self.graphs[key] = self._capture(fn, x)
            self.captured += 1
            return out
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        self.replayed += 1
        return static_out.clone()

    def _capture(self, fn, x):
        """fn run eagerly on a copy of x, then captured on that same copy (so Triton specializes the launches
        alike and compiles nothing during the capture). Returns (the eager output, (graph, input, output))."""
        stream = torch.cuda.current_stream(x.device)
        if stream == torch.cuda.default_stream(x.device):  # CUDA cannot capture the legacy default stream
            if self.side is None:
                self.side = torch.cuda.Stream(x.device)
            self.side.wait_stream(stream)
            stream = self.side
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(stream):
            static_in = x.clone()
            out = fn(static_in)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a call another thread makes meanwhile (a watchdog, a logger) does not void the capture
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                static_out = fn(static_in)
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:  # the capture was invalidated by the failure itself: that one is reported
                    pass
                raise
            graph.capture_end()
        if stream is self.side:  # the caller's stream goes on after the eager run, and uses its output
            caller = torch.cuda.current_stream(x.device)
            caller.wait_stream(stream)
            out.record_stream(caller)
        return out, (graph, static_in, static_out)
