"""
CUDA graphs for the engine's decode step: one graph per batch-size bucket, all captured up front (when the
engine is built), replayed after, so a decode step costs one launch instead of a few hundred.

    graphs = DecodeGraphs(lambda bs: runner._decode_forward(bs, max_blocks_per_seq), buckets)
    logits = graphs(padded_batch_size)    # replay; the returned tensor is the graph's static output

Captured when the engine starts, not lazily in the middle of a rollout (right after the weight
all-gathers, when memory is tightest): the trainer sizes itself, then the engine's KV pool, then these
graphs, whose pool size is measured (pool_bytes) for the memory plan. Largest bucket first, so the smaller
ones reuse its memory; one pool for all (they never run at the same time). A capture failure is an error
naming the bucket (the engine has a switch to run eagerly instead), never a silent fallback.

What makes a replay correct (all on the caller's side; a graph replays the same kernels on the same
addresses with whatever those addresses hold now):
  - every input lives in a preallocated device buffer the caller fills before each call, sliced the same
    way for a given batch size; the block table is passed at its full width (the kernels read only up to
    each sequence's context length, so stale entries beyond it are never read);
  - weights are updated in place (Engine.update_weights) and the KV cache is never reallocated;
  - host values frozen into the graph (batch size, table width, split count) depend only on the bucket;
  - during capture every row of the caller's buffers must be a pad row (the warm-up runs really execute:
    their K/V writes must land in a scratch block).
Capture uses the thread-local capture mode, so another thread's unrelated CUDA calls (a data loader, a
grader) neither break the capture nor get captured.
"""
import torch


class DecodeGraphs:
    def __init__(self, fn, batch_sizes=(), warmup=2):
        """fn(batch_size) -> tensor: one decode step on static buffers, sync-free."""
        if not torch.cuda.is_available():
            raise RuntimeError("DecodeGraphs: CUDA graphs need a CUDA device")
        self.fn, self.warmup = fn, warmup
        self.graphs = {}  # batch size -> (graph, static output)
        self.pool = None  # one memory pool shared by all graphs
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        for bs in sorted(batch_sizes, reverse=True):
            try:
                self.capture(bs)
            except Exception as e:
                self.graphs.clear()
                raise RuntimeError(f"DecodeGraphs: capturing the decode step for batch size {bs} failed: {e!r}. "
                                   "Run eagerly with Engine(cuda_graphs=False) or NANOSCALER_CUDA_GRAPHS=0") from e
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-ups' temporaries, so what stays reserved is the graphs' pool
        self.pool_bytes = max(0, torch.cuda.memory_reserved() - before)

    def capture(self, batch_size):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the capture (Triton compiles, the allocator settles)
            for _ in range(self.warmup):
                self.fn(batch_size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.fn(batch_size)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[batch_size] = (graph, out)
        return out

    def __call__(self, batch_size):
        graph, out = self.graphs[batch_size]
        graph.replay()
        return out

    def reset(self):
        """Drop every graph (e.g. before the engine frees its pool)."""
        self.graphs.clear()
        self.pool = None
