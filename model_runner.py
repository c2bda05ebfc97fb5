"""
The rollout engine's device side: the KV pool, the persistent decode batch, the model, the sampler and
the CUDA graphs. engine.py says which sequences join or leave the decode batch; this file keeps every
row's inputs where the device can read them and runs the steps.

The decode batch is persistent. Row r holds one sequence's inputs in preallocated arrays (PackedBuffers):
where its input token comes from, its position, block table, stop ids and sampling parameters. They are
edited in place on the host only when something happens (a row joins; every 16 tokens a row gains a
block; a leaving row is replaced by the last row), and reach the device in ONE packed non-blocking copy
per step. The input token of a row that decoded last step is that step's sampled token, read on the
device (`sampled[src]`), so the host never needs it before launching the next step; on CUDA it reads the
sampled tokens back one step behind (engine.py). Everything from the packed buffer to the logits is one
function of fixed shapes per batch bucket (_decode_forward), which CUDA graphs capture at start.

Row invariants (pad rows, r >= the batch size, too): the block table covers every position below the
row's input position, and slot = table[r, pos // block_size] * block_size + pos % block_size is computed
on the device; a pad row sits at position 0 of the scratch block. A row whose input token is one of its
own stop ids (it stopped on the previous token, which the host has not read yet) writes to the scratch
slot: whatever it samples is discarded.
"""
import bisect
import math
import os
import warnings

import numpy as np
import torch

import kernels
import model as M
from kernels.cuda_graphs import DecodeGraphs
from kernels.sampling import sample_torch

MAX_STOP_IDS = 16  # stop ids per request (EOS included) that the device-side check sees
MAX_TOP_LOGPROBS = 20


def bucket_sizes(max_num_seqs):
    """Decode batch sizes a step is padded to (one CUDA graph each)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def kernels_wanted(device):
    """The Triton kernels (and with them CUDA graphs) run on CUDA unless NANOSCALER_KERNELS=0 (the
    deliberate escape hatch back to the PyTorch twins)."""
    return device.type == "cuda" and os.environ.get("NANOSCALER_KERNELS", "1") != "0"


def install_kernels(device, dtype, cfg, block_size, allow_fallback=False):
    """Check every kernel against its twin at the engine's shapes (this also compiles them), then put the
    Triton attention into model.ATTENTION. Returns (sampler, fallback reason or None). A failed check is an
    error unless allow_fallback; then the twins are used and the reason is returned for the metrics."""
    from kernels.sampling import sample
    try:
        kernels.self_check(device, dtype, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, block_size)
    except Exception as e:  # noqa: BLE001 - whatever broke, the kernels are not trustworthy here
        if not allow_fallback:
            raise RuntimeError(f"kernels: self-check failed on {device}: {e!r}. Refusing to fall back to the "
                               "PyTorch twins silently: pass Engine(allow_kernel_fallback=True) (train.py: "
                               "--engine_kernel_fallback=True) to allow it, "
                               "or set NANOSCALER_KERNELS=0") from e
        reason = f"kernel self-check failed: {e!r}"
        warnings.warn(f"{reason}; the engine runs the PyTorch twins, without CUDA graphs")
        return sample_torch, reason
    M.use_triton()
    return sample, None


class PackedBuffers:
    """Named per-row arrays in one byte buffer. `np[name]` are host views the engine edits in place; `dev[name]`
    the device image the step reads. On CUDA the image is refreshed by upload(): the used prefix of the buffer
    is copied into one of two pinned staging buffers (alternating, so a copy still in flight never sees the
    next step's edits) and from there to the device in one non-blocking copy. On the CPU the image is the
    host buffer itself. The last field (the block table) is uploaded only for the rows in use."""

    def __init__(self, fields, rows, device, mirror=None):
        """mirror: keep a separate device image (default: on CUDA; tests force it on the CPU)."""
        offsets, end = {}, 0
        for name, dtype, shape in fields:
            nbytes = rows * math.prod(shape) * dtype.itemsize
            offsets[name] = end
            end = -(-(end + nbytes) // 64) * 64  # aligned for every dtype's view
        self.host = torch.zeros(end, dtype=torch.uint8)
        self.mirror = device.type == "cuda" if mirror is None else mirror
        self.image = torch.zeros(end, dtype=torch.uint8, device=device) if self.mirror else self.host
        pin = device.type == "cuda"
        self.staging = [torch.empty(end, dtype=torch.uint8, pin_memory=pin) for _ in range(2)] if self.mirror else []
        self.np, self.dev, self.turn = {}, {}, 0
        for name, dtype, shape in fields:
            nbytes = rows * math.prod(shape) * dtype.itemsize
            o = offsets[name]
            self.np[name] = self.host[o:o + nbytes].view(dtype).view(rows, *shape).numpy()
            self.dev[name] = self.image[o:o + nbytes].view(dtype).view(rows, *shape)
        name, dtype, shape = fields[-1]
        self.last_offset, self.last_row_bytes = offsets[name], math.prod(shape) * dtype.itemsize

    def upload(self, rows):
        if not self.mirror:
            return
        n = self.last_offset + rows * self.last_row_bytes
        buf = self.staging[self.turn]
        self.turn ^= 1
        buf[:n].copy_(self.host[:n])
        self.image[:n].copy_(buf[:n], non_blocking=True)


class Pending:
    """One decode step's sampled tokens on their way to the host. On CUDA the copies into pinned buffers
    are queued behind the step and read() waits for them; on the CPU they are simply there."""

    def __init__(self, seqs, tokens, logprobs, top, out):
        self.seqs, self.event = seqs, None
        if tokens.is_cuda:
            B = len(seqs)
            self.tokens, self.logprobs = out[0][:B], out[1][:B]
            self.tokens.copy_(tokens, non_blocking=True)
            self.logprobs.copy_(logprobs, non_blocking=True)
            top = None if top is None else tuple(t.to("cpu", non_blocking=True) for t in top)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tokens, self.logprobs = tokens, logprobs
        self.top = top

    def read(self):
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), self.logprobs.tolist(), top_lists(self.top, len(self.seqs))


def top_lists(top, rows):
    """(ids [B, N], logprobs [B, N]) -> per row a list of N (id, logprob) pairs; None -> [None] * rows."""
    if top is None:
        return [None] * rows
    return [list(zip(i, v)) for i, v in zip(top[0].tolist(), top[1].tolist())]


class ModelRunner:
    def __init__(self, model, *, block_size, num_blocks, max_num_seqs, max_model_len, vocab_limit,
                 cuda_graphs=None, allow_kernel_fallback=False):
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.block_size, self.num_blocks, self.vocab_limit = block_size, num_blocks, vocab_limit
        shape = (cfg.num_hidden_layers, num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: masked-out positions are still multiplied by 0 in attention, and 0 * NaN = NaN
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.scratch = num_blocks  # the extra block: pad rows and discarded tokens write here
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        S, i64, dev = max_num_seqs, torch.int64, self.device
        self.max_num_seqs, self.buckets = S, bucket_sizes(S)
        self.fields = [
            ("src", i64, ()), ("token", i64, ()), ("positions", i64, ()), ("stop_ids", i64, (MAX_STOP_IDS,)),
            ("seed", i64, ()), ("prompt_idx", i64, ()), ("sample_idx", i64, ()), ("top_k", i64, ()),
            ("temperature", torch.float32, ()), ("top_p", torch.float32, ()),
            ("block_tables", torch.int32, (self.max_blocks_per_seq,))]  # last: uploaded only for the rows in use
        # host-only per-row facts: blocks in the table, total tokens at which the row stops for length,
        # top-N log-probs wanted
        self.num_blocks_of, self.limit, self.top_n = (np.zeros(S, dtype=np.int64) for _ in range(3))
        self.arange = np.arange(S)
        self.rows = []  # the sequence in each row
        self.requests_in_batch = {}  # request -> rows it holds (distinct requests per decode step)
        self.num_filtered = self.num_top = 0  # rows with top-p/top-k; rows wanting top-N log-probs
        self.sampled = torch.zeros(S, dtype=i64, device=dev)  # the last decode step's tokens, by its rows
        self.cu_seqlens = torch.arange(S + 1, dtype=torch.int32, device=dev)
        cuda = self.device.type == "cuda"
        self.out = [(torch.empty(S, dtype=i64, pin_memory=True), torch.empty(S, dtype=torch.float32, pin_memory=True))
                    for _ in range(2)] if cuda else [(None, None)] * 2
        self.out_turn = 0
        self.state = self.new_state()
        self.sampler, self.kernel_fallback, self.graphs, self.graph_pool_bytes = sample_torch, None, None, 0
        if cuda_graphs and not cuda:
            raise ValueError(f"Engine: cuda_graphs=True needs a CUDA device, the model is on {self.device}")
        triton = kernels_wanted(self.device)
        if triton:
            self.sampler, self.kernel_fallback = install_kernels(self.device, self.dtype, cfg, block_size,
                                                                 allow_kernel_fallback)
            triton = self.kernel_fallback is None
        if cuda_graphs is None:
            cuda_graphs = triton and os.environ.get("NANOSCALER_CUDA_GRAPHS", "1") != "0"
        if cuda_graphs:
            self.capture_graphs()

    # ------------------------------------------------------------------ the persistent batch

    def new_state(self, mirror=None):
        """Fresh packed buffers, every row a pad row (the batch must be empty)."""
        assert not self.rows, "new_state with rows in the batch"
        self.state = PackedBuffers(self.fields, self.max_num_seqs, self.device, mirror)
        for r in range(self.max_num_seqs):
            self._pad_row(r)
        return self.state

    def _pad_row(self, r):
        f = self.state.np
        f["src"][r], f["token"][r], f["positions"][r], f["stop_ids"][r] = -1, 0, 0, -1
        f["block_tables"][r, 0] = self.scratch
        self.num_blocks_of[r], self.limit[r], self.top_n[r] = 0, 1 << 62, 0

    def add_row(self, seq):
        """seq starts decoding: its last token (known on the host) is the next input."""
        r = len(self.rows)
        self.rows.append(seq)
        seq.row = r
        req, f = seq.request, self.state.np
        p = req.params
        f["src"][r], f["token"][r], f["positions"][r] = -1, seq.tokens[-1], len(seq.tokens) - 1
        f["stop_ids"][r] = req.stop_row
        f["seed"][r], f["prompt_idx"][r], f["sample_idx"][r] = req.seed, p.prompt_index, seq.sample_index
        f["top_k"][r], f["temperature"][r], f["top_p"][r] = p.top_k, p.temperature, p.top_p
        n = len(seq.blocks)
        f["block_tables"][r, :n] = seq.blocks
        self.num_blocks_of[r], self.limit[r], self.top_n[r] = n, seq.limit, p.logprobs or 0
        self.requests_in_batch[req] = self.requests_in_batch.get(req, 0) + 1
        self.num_filtered += req.filtered
        self.num_top += bool(p.logprobs)

    def remove_row(self, seq):
        """seq leaves the batch; the last row moves into its place (one row copied, nothing else moves)."""
        r, last = seq.row, len(self.rows) - 1
        req = seq.request
        self.requests_in_batch[req] -= 1
        if not self.requests_in_batch[req]:
            del self.requests_in_batch[req]
        self.num_filtered -= req.filtered
        self.num_top -= bool(req.params.logprobs)
        if r != last:
            moved = self.rows[r] = self.rows[last]
            moved.row = r
            for name, a in self.state.np.items():
                if name != "block_tables":
                    a[r] = a[last]
            n = self.num_blocks_of[last]
            table = self.state.np["block_tables"]
            table[r, :n] = table[last, :n]
            for a in (self.num_blocks_of, self.limit, self.top_n):
                a[r] = a[last]
        self.rows.pop()
        seq.row = -1
        self._pad_row(last)

    def rows_needing_block(self):
        """Rows whose input position starts a block they do not have yet (one row in 16 per step)."""
        B = len(self.rows)
        return np.flatnonzero(self.num_blocks_of[:B] * self.block_size <= self.state.np["positions"][:B])

    def append_block(self, r, block):
        self.rows[r].blocks.append(block)
        self.state.np["block_tables"][r, self.num_blocks_of[r]] = block
        self.num_blocks_of[r] += 1

    def rows_at_limit(self):
        """Rows whose last sampled token (unread) is their last one: they must not run another step."""
        B = len(self.rows)
        return np.flatnonzero(self.state.np["positions"][:B] + 1 >= self.limit[:B])

    # ------------------------------------------------------------------ decode

    def launch_decode(self):
        """One decode step over every row: upload, forward (a graph replay on CUDA), sample. Returns the
        Pending tokens; nothing here waits for the device."""
        B = len(self.rows)
        padded = self.buckets[bisect.bisect_left(self.buckets, B)]
        self.state.upload(padded)
        if self.graphs is not None:
            logits = self.graphs(padded)
        else:  # a table only as wide as the longest row needs (few distinct widths: multiples of 16 blocks)
            cols = min(self.max_blocks_per_seq, -(-int(self.num_blocks_of[:B].max()) // 16) * 16)
            logits = self._decode_forward(padded, cols)
        d = self.state.dev
        tokens, logprobs = self.sampler(logits[:B], d["temperature"][:B], d["top_p"][:B], d["top_k"][:B],
                                        d["seed"][:B], d["prompt_idx"][:B], d["sample_idx"][:B],
                                        d["positions"][:B] + 1, self.vocab_limit, filtered=self.num_filtered > 0)
        self.sampled[:B].copy_(tokens)
        top = None
        if self.num_top:
            top = self._top_logprobs(logits[:B], d["temperature"][:B], int(self.top_n[:B].max()))
        pending = Pending(list(self.rows), tokens, logprobs, top, self.out[self.out_turn])
        self.out_turn ^= 1
        # every row now decodes its own sampled token, one position further
        f = self.state.np
        f["src"][:B] = self.arange[:B]
        f["positions"][:B] += 1
        return pending

    def _decode_forward(self, padded, cols):
        """Packed buffers -> logits [padded, V]: fixed shapes per bucket, no host sync (a CUDA graph's body)."""
        d, bs = self.state.dev, self.block_size
        src = d["src"][:padded]
        ids = torch.where(src >= 0, self.sampled[src.clamp(min=0)], d["token"][:padded])
        pos = d["positions"][:padded]
        table = d["block_tables"][:padded, :cols]
        slots = table.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs
        stopped = (ids[:, None] == d["stop_ids"][:padded]).any(1)  # sampled past its stop: discard
        slots = torch.where(stopped, self.scratch * bs, slots)
        meta = M.Paged(slots, table, (pos + 1).int(), self.cu_seqlens[:padded + 1], 1)
        h = self.model(ids, pos, meta, (self.k_cache, self.v_cache))
        return self.model.logits(h)

    def _top_logprobs(self, logits, temperature, n):
        """The n most likely tokens of log_softmax(logits / T) (T = 1 for greedy rows), as the sampler's log-probs
        (normalised over the whole vocabulary, as those are), among the ids the sampler may draw (< vocab_limit)."""
        t = torch.where(temperature > 0, temperature, 1.0)
        logprobs = torch.log_softmax(logits.float() / t[:, None], dim=-1)
        values, ids = logprobs[:, :self.vocab_limit].topk(n, dim=-1)
        return ids, values

    @torch.no_grad()
    def capture_graphs(self):
        """Every decode bucket captured now, largest first, into one memory pool. All rows are pad rows at
        this point, so the warm-up runs write only to the scratch block."""
        if self.rows:
            raise RuntimeError("capture_graphs: the decode batch must be empty")
        self.state.upload(self.max_num_seqs)
        torch.cuda.synchronize(self.device)
        self.graphs = DecodeGraphs(lambda bs: self._decode_forward(bs, self.max_blocks_per_seq), self.buckets)
        self.graph_pool_bytes = self.graphs.pool_bytes

    # ------------------------------------------------------------------ prefill

    def prefill(self, batch):
        """batch: [(seq, n)]: compute the next n tokens of each (K/V into the pool). Returns the hidden
        states at the last computed position of every sequence, [len(batch), H]."""
        bs, dev = self.block_size, self.device
        ids, takes, starts = [], [], []
        for seq, take in batch:
            ids += seq.tokens[seq.num_cached:seq.num_cached + take]
            takes.append(take)
            starts.append(seq.num_cached)
        cols = max(len(seq.blocks) for seq, _ in batch)
        tables = torch.full((len(batch), cols), self.scratch, dtype=torch.int32)
        for i, (seq, _) in enumerate(batch):
            tables[i, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        takes_t, starts_t = torch.tensor(takes), torch.tensor(starts)
        which = torch.repeat_interleave(torch.arange(len(batch)), takes_t)
        cu = torch.zeros(len(batch) + 1, dtype=torch.int32)
        cu[1:] = takes_t.cumsum(0)
        pos = starts_t[which] + torch.arange(len(ids)) - cu[:-1].long()[which]
        slots = tables[which, pos // bs].long() * bs + pos % bs
        meta = M.Paged(slots.to(dev), tables.to(dev), (starts_t + takes_t).int().to(dev), cu.to(dev), max(takes))
        h = self.model(torch.tensor(ids, device=dev), pos.to(dev), meta, (self.k_cache, self.v_cache))
        return h[(cu[1:] - 1).long().to(dev)]

    def sample_rows(self, logits, members):
        """Tokens for prefill-completed sequences: members[i] = (seq, sample index) draws from logits[i].
        Returns host lists (tokens, logprobs, top-N pairs or None per row): this synchronises."""
        dev = self.device
        reqs = [s.request for s, _ in members]
        col = lambda xs, dtype=torch.int64: torch.tensor(xs, dtype=dtype, device=dev)
        temperature = col([r.params.temperature for r in reqs], torch.float32)
        tokens, logprobs = self.sampler(
            logits, temperature, col([r.params.top_p for r in reqs], torch.float32),
            col([r.params.top_k for r in reqs]), col([r.seed for r in reqs]),
            col([r.params.prompt_index for r in reqs]), col([i for _, i in members]),
            col([len(s.tokens) for s, _ in members]), self.vocab_limit, filtered=any(r.filtered for r in reqs))
        n = max(r.params.logprobs or 0 for r in reqs)
        top = top_lists(self._top_logprobs(logits, temperature, n) if n else None, len(members))
        return tokens.tolist(), logprobs.tolist(), top

    def copy_blocks(self, copies):
        """(source, destination) block pairs, every layer's K and V (a fork's partial last blocks)."""
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]
