"""
The rollout engine's internals: a paged KV pool, reference-counted blocks with prompt-prefix sharing,
a scheduler with chunked prefill, continuous batching and preemption by recompute. sample.py is the
front door (generate(), the CLI); read this file to see how a step works.

Life of a request (one prompt, n samples):
  1. One *leader* sequence waits with fork = n. It is prefilled once, in chunks of at most
     max_prefill_tokens per step, into freshly allocated blocks; logits only at its last position.
  2. When its prompt is fully cached, the n first tokens are drawn from that one logits row (each keyed
     by its own sample index) and the leader forks: the n-1 followers share the prompt's full blocks
     (refcount + 1) and get their own copy of the partial last block, so no block is ever written by
     two sequences.
  3. Decode steps advance every running sequence by one token. A sequence that finishes (EOS, a stop
     token, max_new_tokens, max_model_len) returns its blocks and a waiting sequence takes its place.
  4. When a decode step needs a block and none is free, the youngest running sequence is preempted:
     its blocks are released and it waits again, to recompute prompt + generated tokens later (in
     chunks, into fresh blocks). Its tokens do not change: the sampler is keyed by position.

The decode step reads everything from preallocated device buffers (sized max_num_seqs) and runs the
model on a batch padded to a bucket size (`_run_decode`), so a CUDA graph can later wrap that call.
Padded rows point at a reserved scratch block, so every slot the forward writes is valid.
"""
import math
import time
from collections import deque
from dataclasses import dataclass
from numbers import Integral

import torch

import model as M
import kernels
from kernels.sampling import fold_seed, sample_torch


@dataclass
class Completion:
    token_ids: list          # generated tokens, including the EOS/stop token when it stopped on one
    logprobs: list           # log-prob of each token under log_softmax(logits / T), before top-p/top-k
    finish_reason: str       # "stop" (EOS or a stop token) or "length" (max_new_tokens or max_model_len)
    prompt_index: int
    sample_index: int
    num_preemptions: int = 0


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int                # already folded to [0, 2^32)
    stop_ids: frozenset


class Sequence:
    """One response being generated. tokens = prompt + generated; the first num_cached of them have
    their K/V in the pool. fork > 1 only on a leader whose prompt has not been sampled from yet."""
    __slots__ = ("prompt_index", "sample_index", "tokens", "prompt_len", "logprobs", "blocks", "spare",
                 "num_cached", "fork", "num_preemptions", "finish_reason")

    def __init__(self, prompt_index, sample_index, prompt, fork=1):
        self.prompt_index, self.sample_index, self.fork = prompt_index, sample_index, fork
        self.tokens, self.prompt_len = list(prompt), len(prompt)
        self.logprobs, self.blocks = [], []
        self.spare = []  # blocks reserved for the followers' copies of the partial last prompt block
        self.num_cached = self.num_preemptions = 0
        self.finish_reason = None

    @property
    def num_generated(self):
        return len(self.tokens) - self.prompt_len

    @property
    def needs_prefill(self):
        # decoding = exactly the last sampled token is not cached yet
        return self.num_generated == 0 or self.num_cached < len(self.tokens) - 1


class BlockPool:
    """Free list + reference counts over block ids 0..num_blocks-1 (the scratch block is not in it)."""

    def __init__(self, num_blocks):
        self.num_blocks = num_blocks
        self.free = deque(range(num_blocks))
        self.ref = [0] * num_blocks

    def alloc(self):
        b = self.free.popleft()
        self.ref[b] = 1
        return b

    def share(self, b):
        self.ref[b] += 1

    def release(self, blocks):
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)

    @property
    def num_free(self):
        return len(self.free)


def bucket_sizes(max_num_seqs):
    """Decode batch sizes a step is padded to (and a CUDA graph would be captured for)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class Engine:
    """Lives for the whole run: the KV pool is allocated once here, never per call.

    num_blocks / memory_budget (bytes) / gpu_memory_fraction size the pool (see _blocks_from_budget);
    max_num_seqs bounds the running batch (and the decode buffers); max_model_len bounds prompt +
    response (default: the config's limit or the pool, whichever is smaller); max_prefill_tokens is
    the per-step prefill budget (chunked prefill); vocab_limit = tokenizer.vocab_size (ids >= it are
    never sampled); EOS ids come from the config unless eos_token_ids is given; ignore_eos for benchmarks.
    After each generate(), self.stats holds that call's preemptions, prefix_blocks_shared,
    tokens_generated, prefill_tokens (recomputation included), prefill/decode steps, max_running,
    and time / prefill_time / decode_time in seconds."""

    def __init__(self, model: M.Qwen2, *, block_size=16, num_blocks=None, memory_budget=None,
                 gpu_memory_fraction=0.9, max_num_seqs=256, max_model_len=None, max_prefill_tokens=None,
                 vocab_limit=None, eos_token_ids=None, ignore_eos=False):
        cfg = model.config
        self.model, self.cfg = model.eval(), cfg
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < cfg.vocab_size else None
        self.max_prefill_tokens = max_prefill_tokens or (8192 if self.device.type == "cuda" else 2048)
        eos = cfg.eos_token_id if eos_token_ids is None else eos_token_ids
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_ids = frozenset() if ignore_eos else frozenset(int(e) for e in eos)
        self.ignore_eos = ignore_eos
        if block_size <= 0 or max_num_seqs <= 0:
            raise ValueError(f"Engine: block_size ({block_size}) and max_num_seqs ({max_num_seqs}) must be positive")

        self.num_blocks = num_blocks or self._blocks_from_budget(memory_budget, gpu_memory_fraction)
        if self.num_blocks < 1:
            raise ValueError(f"Engine: KV pool of {self.num_blocks} blocks; raise num_blocks or memory_budget")
        shape = (cfg.num_hidden_layers, self.num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: masked-out positions are still multiplied by 0 in attention, and 0 * NaN = NaN
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.scratch = self.num_blocks  # the extra block: padded rows write here
        self.pool = BlockPool(self.num_blocks)
        capacity = self.num_blocks * block_size
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, capacity)
        self.max_blocks_per_seq = math.ceil(self.max_model_len / block_size)
        self._alloc_decode_buffers()
        self.running, self.waiting, self.finished = [], deque(), []
        self.stats = {}
        self.sampler, self.graphs = sample_torch, None  # CPU: the PyTorch twins
        if kernels.enabled_for(self.device):  # CUDA: Triton kernels, fused sampler, decode in CUDA graphs
            self.sampler, self.graphs = kernels.setup_engine(self)

    # ------------------------------------------------------------------ setup

    def kv_bytes_per_block(self):
        c = self.cfg
        return 2 * c.num_hidden_layers * self.block_size * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def _blocks_from_budget(self, memory_budget, fraction):
        """The pool is sized once. On CUDA: a fraction of the memory free after emptying the caching
        allocator (so it can sit beside a trainer that sized itself first), minus what a step's
        activations and sampling temporaries need; elsewhere an explicit byte budget (default 512 MiB)."""
        if memory_budget is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info(self.device)
                memory_budget = int(free * fraction) - self._activation_bytes()
            else:
                memory_budget = 512 * 2**20
        return int(memory_budget // self.kv_bytes_per_block()) - 1  # one block is the scratch block

    def _activation_bytes(self):
        c, f32 = self.cfg, 4
        sampling = self.max_num_seqs * c.vocab_size * f32 * 12  # logits, log-softmax, hash temporaries
        prefill = self.max_prefill_tokens * (2 * c.intermediate_size + 8 * c.hidden_size) * f32
        return sampling + prefill + 2**30

    def _alloc_decode_buffers(self):
        S, dev, i64 = self.max_num_seqs, self.device, torch.int64
        self.buf = {
            "input_ids": torch.zeros(S, dtype=i64, device=dev), "positions": torch.zeros(S, dtype=i64, device=dev),
            "slot_mapping": torch.zeros(S, dtype=i64, device=dev),
            "block_tables": torch.full((S, self.max_blocks_per_seq), self.scratch, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(S, dtype=torch.int32, device=dev),
            "cu_seqlens_q": torch.arange(S + 1, dtype=torch.int32, device=dev),
            # per-row sampling parameters live on the device too (a graph can replay them)
            "temperature": torch.ones(S, device=dev), "top_p": torch.ones(S, device=dev),
            "top_k": torch.zeros(S, dtype=i64, device=dev), "seed": torch.zeros(S, dtype=i64, device=dev),
            "prompt_idx": torch.zeros(S, dtype=i64, device=dev), "sample_idx": torch.zeros(S, dtype=i64, device=dev),
            "position": torch.zeros(S, dtype=i64, device=dev),
        }

    @torch.no_grad()
    def update_weights(self, source):
        """Copy new weights (a state dict or a model) into the engine model's existing tensors in place:
        captured CUDA graphs hold pointers to them. Keys may carry torch.compile's `_orig_mod.` prefix."""
        src = source.state_dict() if isinstance(source, torch.nn.Module) else source
        src = {k.replace("_orig_mod.", ""): v for k, v in src.items()}
        for name, p in self.model.state_dict().items():
            if name not in src:
                if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                    continue  # tied: it is the embedding, copied under its own name
                raise KeyError(f"update_weights: tensor '{name}' missing from the new weights")
            t = src[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"update_weights: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if t.data_ptr() != p.data_ptr():
                p.copy_(t)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, n=1, seed=0,
                 stop_token_ids=(), progress=False, first_prompt_index=0):
        """prompts: lists of token ids. Returns len(prompts) * n Completions, prompt-major.
        Prompt i is keyed as first_prompt_index + i in the sampler, so a rank that generates its slice of
        a global batch draws exactly what one process generating the whole batch would."""
        params = self._check_request(prompts, max_new_tokens, temperature, top_p, top_k, n, stop_token_ids)
        params.seed = fold_seed(int(seed))
        self.params = params
        # a fresh block table each call: a call interrupted by an exception leaks nothing into the next
        self.pool = BlockPool(self.num_blocks)
        self.running, self.waiting, self.finished = [], deque(), []
        for i, prompt in enumerate(prompts):
            # a group never exceeds the running limit, nor a pool that must hold its copies
            group = max(1, min(self.max_num_seqs, self.num_blocks - self._blocks_for(len(prompt)) + 1))
            for s0 in range(0, n, group):
                self.waiting.append(Sequence(first_prompt_index + i, s0, [int(t) for t in prompt],
                                             fork=min(n, s0 + group) - s0))
        self.stats = dict(preemptions=0, prefix_blocks_shared=0, tokens_generated=0, prefill_tokens=0,
                          prefill_steps=0, decode_steps=0, max_running=0, time=0.0, prefill_time=0.0, decode_time=0.0)
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts) * n, unit="seq", desc="generate")
        while self.waiting or self.running:
            done, t = len(self.finished), time.perf_counter()
            if self._prefill_step():  # each step ends in a host sync (the sampled tokens): host timing is exact
                self.stats["prefill_time"] += time.perf_counter() - t
            else:
                self._decode_step()
                self.stats["decode_time"] += time.perf_counter() - t
            self.stats["max_running"] = max(self.stats["max_running"], len(self.running))
            if bar is not None:
                bar.update(len(self.finished) - done)
                bar.set_postfix(tok_s=f"{self.stats['tokens_generated'] / (time.perf_counter() - t0):,.0f}",
                                running=len(self.running), refresh=False)
        if bar is not None:
            bar.close()
        self.stats["time"] = time.perf_counter() - t0
        assert self.pool.num_free == self.num_blocks, "blocks leaked"
        out = [Completion(s.tokens[s.prompt_len:], s.logprobs, s.finish_reason, s.prompt_index, s.sample_index,
                          s.num_preemptions) for s in self.finished]
        self.finished = []
        return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))

    def _check_request(self, prompts, max_new_tokens, temperature, top_p, top_k, n, stop_token_ids):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"generate: n must be a positive int, got {n!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        V = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, Integral) and 0 <= t < V for t in p):
                raise ValueError(f"generate: prompts[{i}] must be a non-empty list of token ids in [0, {V})")
            if len(p) >= self.max_model_len:
                raise ValueError(f"generate: prompts[{i}] has {len(p)} tokens; max_model_len is {self.max_model_len}")
            need = math.ceil(min(len(p) + max_new_tokens, self.max_model_len) / self.block_size)
            if need > self.num_blocks:
                raise ValueError(f"generate: prompts[{i}] may need {need} KV blocks but the pool has "
                                 f"{self.num_blocks}; raise num_blocks/memory_budget or lower max_new_tokens")
        return SamplingParams(max_new_tokens, float(temperature), float(top_p), int(top_k), 0,
                              self.eos_ids | frozenset(int(t) for t in stop_token_ids))

    # ------------------------------------------------------------------ block bookkeeping

    def _blocks_for(self, num_tokens):
        return math.ceil(num_tokens / self.block_size)

    def _grow(self, seq, num_tokens):
        """Make room for num_tokens tokens in seq (and, when that completes a leader's prompt, for its
        followers' partial-block copies), preempting the youngest running sequences when the pool is
        empty. False if seq itself had to be preempted."""
        completes = num_tokens == len(seq.tokens)
        spare = seq.fork - 1 if completes and seq.fork > 1 and seq.prompt_len % self.block_size else 0
        while len(seq.blocks) < self._blocks_for(num_tokens) or len(seq.spare) < spare:
            if self.pool.num_free == 0:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            if len(seq.blocks) < self._blocks_for(num_tokens):
                seq.blocks.append(self.pool.alloc())
            else:
                seq.spare.append(self.pool.alloc())
        return True

    def _preempt(self, seq):
        self.running.remove(seq)
        self.pool.release(seq.blocks + seq.spare)
        seq.blocks, seq.spare, seq.num_cached = [], [], 0
        seq.num_preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq, reason):
        seq.finish_reason = reason
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        self.finished.append(seq)

    def _admit_cost(self, seq):
        """Blocks a waiting sequence needs to be prefilled completely and forked."""
        partial = seq.fork > 1 and len(seq.tokens) % self.block_size != 0
        return self._blocks_for(len(seq.tokens)) + (seq.fork - 1 if partial else 0)

    # ------------------------------------------------------------------ prefill

    def _prefill_step(self):
        """Chunks of running sequences still prefilling first, then new admissions, within the token
        budget. Returns False when nothing needed prefill (the step is a decode step)."""
        budget, batch = self.max_prefill_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq in self.running and seq.needs_prefill:
                take = min(len(seq.tokens) - seq.num_cached, budget)
                if self._grow(seq, seq.num_cached + take):
                    batch.append((seq, take))
                    budget -= take
        watermark = max(1, self.num_blocks // 100)
        occupied = sum(s.fork for s in self.running)  # a leader still prefilling will become `fork` sequences
        while self.waiting and budget > 0 and occupied + self.waiting[0].fork <= self.max_num_seqs:
            seq = self.waiting[0]
            # leave every running sequence (the new ones too) a block to grow into, so an admission is not
            # undone by a preemption a few steps later (recompute thrash when the pool is tight)
            need = self._admit_cost(seq) + (max(watermark, occupied + seq.fork) if self.running else 0)
            if need > self.pool.num_free:
                break
            self.waiting.popleft()
            self.running.append(seq)
            occupied += seq.fork
            take = min(len(seq.tokens), budget)
            self._grow(seq, take)
            batch.append((seq, take))
            budget -= take
        if not batch:
            if self.waiting and not self.running:
                raise RuntimeError("engine: cannot admit any sequence (KV pool too small for one request)")
            return False
        self._run_prefill(batch)
        return True

    def _run_prefill(self, batch):
        bs, dev = self.block_size, self.device
        ids, pos, slots, cu = [], [], [], [0]
        for seq, take in batch:
            span = range(seq.num_cached, seq.num_cached + take)
            ids += seq.tokens[span.start:span.stop]
            pos += span
            slots += [seq.blocks[p // bs] * bs + p % bs for p in span]
            cu.append(cu[-1] + take)
        cols = max(len(seq.blocks) for seq, _ in batch)
        tables = torch.full((len(batch), cols), self.scratch, dtype=torch.int32)
        for i, (seq, _) in enumerate(batch):
            tables[i, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        meta = M.Paged(torch.tensor(slots, device=dev), tables.to(dev),
                       torch.tensor([s.num_cached + t for s, t in batch], dtype=torch.int32, device=dev),
                       torch.tensor(cu, dtype=torch.int32, device=dev), max(t for _, t in batch))
        h = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, (self.k_cache, self.v_cache))
        self.stats["prefill_tokens"] += len(ids)
        self.stats["prefill_steps"] += 1
        done, rows = [], []
        for i, (seq, take) in enumerate(batch):
            seq.num_cached += take
            if seq.num_cached == len(seq.tokens):  # prefill complete: sample from the last position
                done.append(seq)
                rows.append(cu[i + 1] - 1)
        if not done:
            return
        logits = self.model.logits(h[torch.tensor(rows, device=dev)])
        # a leader's one logits row serves all of its samples, each with its own key
        expand = torch.tensor([i for i, s in enumerate(done) for _ in range(s.fork)], device=dev)
        keys = [(s.prompt_index, s.sample_index + j, len(s.tokens)) for s in done for j in range(s.fork)]
        tokens, logprobs = self._sample(logits[expand], keys)
        k = 0
        for seq in done:
            followers = self._fork(seq) if seq.fork > 1 else []
            for s in [seq] + followers:
                self._append(s, tokens[k], logprobs[k])
                k += 1

    def _fork(self, leader):
        """Followers share the leader's full prompt blocks and copy its partial last block (all layers)."""
        full = leader.prompt_len // self.block_size
        followers = []
        copies = []
        for j in range(1, leader.fork):
            f = Sequence(leader.prompt_index, leader.sample_index + j, leader.tokens)
            for b in leader.blocks[:full]:
                self.pool.share(b)
            f.blocks = leader.blocks[:full]
            self.stats["prefix_blocks_shared"] += full
            if len(leader.blocks) > full:
                f.blocks = f.blocks + [leader.spare.pop()]  # reserved when the last chunk was scheduled
                copies.append((leader.blocks[full], f.blocks[-1]))
            f.num_cached = leader.prompt_len
            followers.append(f)
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]
        at = self.running.index(leader) + 1
        self.running[at:at] = followers
        leader.fork = 1
        return followers

    def _append(self, seq, token, logprob):
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        self.stats["tokens_generated"] += 1
        p = self.params
        if token in p.stop_ids:
            self._finish(seq, "stop")
        elif seq.num_generated >= p.max_new_tokens or len(seq.tokens) >= self.max_model_len:
            self._finish(seq, "length")

    # ------------------------------------------------------------------ decode

    def _decode_step(self):
        for seq in list(self.running):  # oldest first; a preempted victim drops out of self.running
            if seq in self.running:
                self._grow(seq, len(seq.tokens))
        seqs = list(self.running)
        if not seqs:
            return
        assert not any(s.needs_prefill for s in seqs), "decode step with a sequence still prefilling"
        B, bs = len(seqs), self.block_size
        padded = next(s for s in bucket_sizes(self.max_num_seqs) if s >= B)
        # block-table width in steps of 16 blocks: few distinct shapes, little padding for the gather
        cols = min(self.max_blocks_per_seq, -(-max(len(s.blocks) for s in seqs) // 16) * 16)
        b = self.buf
        last = [s.tokens[-1] for s in seqs]
        pos = [len(s.tokens) - 1 for s in seqs]
        pad = padded - B
        b["input_ids"][:padded].copy_(torch.tensor(last + [0] * pad))
        b["positions"][:padded].copy_(torch.tensor(pos + [0] * pad))
        b["slot_mapping"][:padded].copy_(torch.tensor([s.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
                                                      + [self.scratch * bs] * pad))
        b["context_lens"][:padded].copy_(torch.tensor([p + 1 for p in pos] + [1] * pad, dtype=torch.int32))
        tables = torch.full((padded, cols), self.scratch, dtype=torch.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        b["block_tables"][:padded, :cols].copy_(tables)
        logits = self._run_decode(padded, cols) if self.graphs is None else self.graphs(padded)
        for s in seqs:
            s.num_cached += 1
        tokens, logprobs = self._sample(logits[:B], [(s.prompt_index, s.sample_index, len(s.tokens)) for s in seqs])
        self.stats["decode_steps"] += 1
        for s, t, lp in zip(seqs, tokens, logprobs):
            self._append(s, t, lp)

    def _run_decode(self, batch_size, cols):
        """The model on the preallocated buffers: the call a CUDA graph (one per bucket) would capture."""
        b = self.buf
        meta = M.Paged(b["slot_mapping"][:batch_size], b["block_tables"][:batch_size, :cols],
                       b["context_lens"][:batch_size], b["cu_seqlens_q"][:batch_size + 1], 1)
        h = self.model(b["input_ids"][:batch_size], b["positions"][:batch_size], meta, (self.k_cache, self.v_cache))
        return self.model.logits(h)

    # ------------------------------------------------------------------ sampling

    def _sample(self, logits, keys):
        """keys: (prompt index, sample index, position) per row. One host sync per step (the tokens)."""
        p, B, b = self.params, logits.shape[0], self.buf
        rows = {"temperature": [p.temperature] * B, "top_p": [p.top_p] * B, "top_k": [p.top_k] * B,
                "seed": [p.seed] * B}
        rows["prompt_idx"], rows["sample_idx"], rows["position"] = (list(col) for col in zip(*keys))
        if B <= self.max_num_seqs:  # per-row parameters in the device buffers, where a graph would read them
            args = {k: b[k][:B].copy_(torch.tensor(v, dtype=b[k].dtype)) for k, v in rows.items()}
        else:  # a leader's first tokens for a group wider than the decode buffers
            args = {k: torch.tensor(v, dtype=b[k].dtype, device=self.device) for k, v in rows.items()}
        filtered = p.temperature > 0 and (p.top_p < 1 or p.top_k > 0)
        tokens, logprobs = self.sampler(logits, args["temperature"], args["top_p"], args["top_k"], args["seed"],
                                        args["prompt_idx"], args["sample_idx"], args["position"], self.vocab_limit,
                                        filtered=filtered)
        return tokens.tolist(), logprobs.tolist()
