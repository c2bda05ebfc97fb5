"""
CUDA graphs for the engine's decode step: one graph per batch-size bucket, captured on first use and
replayed after, so a decode step costs one launch instead of a few hundred kernel launches.

    graphs = DecodeGraphs(lambda bs: engine._run_decode(bs, engine.max_blocks_per_seq))
    logits = graphs(padded_batch_size)    # capture (first time for this size) or replay

What makes a replay correct (all on the caller's side; a graph replays the same kernels on the same
addresses with whatever those addresses hold now):
  - every input lives in a preallocated device buffer the caller fills before each call (token ids,
    positions, slots, block tables, context lengths), sliced the same way for a given batch size;
  - the block table is always passed at its full width (max_blocks_per_seq): the kernels read only up
    to each sequence's context length, so stale entries beyond it are never read;
  - weights are updated in place (Engine.update_weights copies into the existing tensors) and the KV
    cache is never reallocated;
  - host values frozen into the graph (batch size, table width, split count) depend only on the bucket.
The returned tensor is the graph's static output: read it (or copy it) before the next call.

CUDA only: nothing here runs on the CPU path, and it has not been run yet on a GPU in this repository
(see BENCHMARKS.md, "## kernels").
"""
import warnings

import torch


class DecodeGraphs:
    def __init__(self, fn, warmup=2):
        """fn(batch_size) -> tensor: one decode step on static buffers, sync-free."""
        if not torch.cuda.is_available():
            raise RuntimeError("DecodeGraphs: CUDA graphs need a CUDA device")
        self.fn, self.warmup = fn, warmup
        self.graphs = {}  # batch size -> (graph, static output)
        self.pool = None  # one memory pool shared by all graphs (they never run at the same time)
        self.failed = False  # a capture failed once: every later call runs eagerly

    def capture(self, batch_size):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # warm up off the capture (Triton compiles, the allocator settles); these runs rewrite this step's
        # K/V rows with the same values, so they change nothing
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(batch_size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(batch_size)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[batch_size] = (graph, out)
        return out

    def __call__(self, batch_size):
        if self.failed:
            return self.fn(batch_size)
        if batch_size not in self.graphs:
            try:
                self.capture(batch_size)  # capturing records kernels without running them: replay below
            except Exception as e:  # noqa: BLE001 - a capture failure must not stop generation
                warnings.warn(f"DecodeGraphs: capture of batch size {batch_size} failed, running eagerly: {e!r}")
                self.failed = True
                self.reset()
                torch.cuda.synchronize()
                return self.fn(batch_size)
        graph, out = self.graphs[batch_size]
        graph.replay()
        return out

    def reset(self):
        """Drop every graph (e.g. before the engine frees its pool)."""
        self.graphs.clear()
        self.pool = None
