"""
The rollout engine's host bookkeeping, no tensors: the sequences, the block manager (the KV pool's blocks,
reference counts, prompt blocks shared between the samples of a request) and the scheduler (who waits,
who runs, what the next prefill step computes, who is preempted). engine.py drives these; the model
runner (model_runner.py) executes what they decide.

Life of a request (one prompt, n samples):
  1. One *leader* sequence waits for a group of sample indices (at most max_num_seqs, and few enough that
     the pool can hold the group's copies). It is prefilled once, in chunks of at most max_prefill_tokens
     per step, into fresh blocks; logits only at its last position.
  2. When its prompt is fully cached, one token per sample is drawn from that one logits row (each keyed
     by its own sample index) and the leader forks: the followers share the prompt's full blocks
     (refcount + 1) and get their own copy of the partial last block, so no block is ever written by two
     sequences.
  3. Decode steps advance every decoding sequence by one token. A sequence that finishes (EOS, a stop token,
     max_tokens, max_model_len) or is aborted returns its blocks, and a waiting sequence takes its place.
  4. When a decode step needs a block and none is free, the youngest running sequence is preempted: its
     blocks are released and it waits again, to recompute prompt + generated tokens later (in chunks,
     into fresh blocks). Its tokens do not change: the sampler is keyed by position.

Prefix caching: a block filled by prefill is registered under a key of its exact contents and position
(a hash chain over the tokens up to its end). A released block stays in the pool's free list with its
contents until it is reallocated, so a later sequence whose tokens start the same way (another request
with the same system prompt, a preempted sequence coming back) takes those blocks instead of computing
them again. Only full blocks are shared and never written again; the cache is dropped when the weights
change (Engine.update_weights, and every generate() call, since a trainer may copy weights in place).
"""
import hashlib
import math
from collections import deque

import numpy as np


class Sequence:
    """One sample being generated. tokens = prompt + the generated tokens read so far; the first num_cached
    of them have their K/V in the pool. A leader not yet forked stands for every sample index in `group`
    (its own is group[0]). row: its row in the model runner's decode batch, -1 when it has none."""
    __slots__ = ("request", "sample_index", "group", "tokens", "prompt_len", "limit", "logprobs", "top_logprobs",
                 "blocks", "spare", "num_cached", "num_preemptions", "finish_reason", "row", "num_reported", "keys")

    def __init__(self, request, group, tokens, limit):
        self.request, self.group, self.sample_index = request, list(group), group[0]
        self.tokens, self.prompt_len = list(tokens), len(request.prompt)
        self.limit = limit  # total tokens at which it stops for length (max_tokens or max_model_len)
        self.logprobs = []
        self.top_logprobs = [] if request.params.logprobs else None
        self.blocks, self.spare = [], []  # spare: blocks reserved for the followers' partial-block copies
        self.num_cached = self.num_preemptions = self.num_reported = 0
        self.finish_reason, self.row = None, -1
        self.keys = []  # content keys of its full blocks, while it is prefilled (prefix caching)

    @property
    def fork(self):
        return len(self.group)

    @property
    def num_generated(self):
        return len(self.tokens) - self.prompt_len

    @property
    def needs_prefill(self):
        # decoding = exactly the last sampled token is not cached yet
        return self.num_generated == 0 or self.num_cached < len(self.tokens) - 1


def block_keys(tokens, block_size):
    """Content keys of the full blocks of `tokens`: each hashes the previous key and its own tokens, so
    equal keys mean equal tokens at equal positions from the start (a cryptographic hash: a collision
    would hand one request another's K/V)."""
    keys, prev = [], b""
    for i in range(len(tokens) // block_size):
        chunk = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype=np.int64).tobytes()
        prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
        keys.append(prev)
    return keys


class BlockManager:
    """Free list + reference counts over block ids 0..num_blocks-1 (the scratch block is not in it), and
    the prefix cache. Blocks are reused least recently freed first, so reallocation evicts the oldest
    cached contents. Everything per block is numpy: a finished 8K-token sequence returns its 512 blocks in
    a few vectorised operations (an ordered dict of free blocks cost ~0.1 ms per finished sequence, ~40 ms
    when 256 rows finish in one decode step). The free list is a queue of release batches in release order
    with lazy deletion: freed_at[b] says which batch holds block b's current entry (-1: in use), so an entry
    left behind when a block is reclaimed by a prefix hit, or freed again later, is skipped."""

    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        self.freed_at = np.zeros(num_blocks, dtype=np.int64)  # batch 0: every block, free at the start
        self.batches, self.head, self.clock = deque([(0, np.arange(num_blocks))]), 0, 0
        self.num_free = num_blocks
        self.cached, self.key_of = {}, {}  # content key -> block holding it, and back

    def blocks_for(self, num_tokens):
        return math.ceil(num_tokens / self.block_size)

    def alloc(self):
        if self.num_free == 0:
            raise RuntimeError("BlockManager.alloc: no free block")
        while True:
            when, blocks = self.batches[0]
            if self.head == len(blocks):
                self.batches.popleft()
                self.head = 0
                continue
            b = int(blocks[self.head])
            self.head += 1
            if self.freed_at[b] == when:  # its current entry (a stale one: reclaimed or freed again since)
                break
        self.freed_at[b], self.ref[b] = -1, 1
        self.num_free -= 1
        key = self.key_of.pop(b, None)
        if key is not None:  # its contents are about to be overwritten
            del self.cached[key]
        return b

    def share(self, blocks):
        self.ref[blocks] += 1

    def release(self, blocks):
        if blocks:
            b = np.asarray(blocks)
            self.ref[b] -= 1
            freed = b[self.ref[b] == 0]
            if len(freed):
                self.clock += 1
                self.freed_at[freed] = self.clock
                self.batches.append((self.clock, freed))
                self.num_free += len(freed)

    def register(self, block, key):
        """block now holds the K/V that `key` describes."""
        if key not in self.cached and block not in self.key_of:
            self.cached[key], self.key_of[block] = block, key

    def take_cached(self, keys):
        """The blocks holding the longest cached prefix of these keys, each with one more reference."""
        hit = []
        for key in keys:
            b = self.cached.get(key)
            if b is None:
                break
            if self.ref[b] == 0:  # free: out of the free list (its queue entry goes stale)
                self.freed_at[b] = -1
                self.num_free -= 1
            self.ref[b] += 1
            hit.append(b)
        return hit

    def clear_cache(self):
        self.cached.clear()
        self.key_of.clear()


class Scheduler:
    """waiting: sequences not holding blocks (new leaders, preempted sequences), served first come first
    served with preempted ones in front; running: sequences holding blocks, each with its age (admission
    order; a leader's followers share its age), so a finished one leaves in O(1) and the youngest is the
    first to be preempted; prefilling: the running ones whose tokens are not all cached yet. The scheduler
    only decides and books blocks; the engine tells it when a sequence leaves."""

    def __init__(self, blocks: BlockManager, max_num_seqs, max_prefill_tokens, on_preempt, prefix_caching=True):
        self.blocks, self.max_num_seqs, self.max_prefill_tokens = blocks, max_num_seqs, max_prefill_tokens
        self.on_preempt = on_preempt  # engine callback: a sequence is about to lose its blocks
        self.prefix_caching = prefix_caching
        self.waiting, self.running, self.prefilling = deque(), {}, []
        self.num_preemptions, self.admitted, self.cache_hit_blocks = 0, 0, 0

    def add(self, seq):
        self.waiting.append(seq)

    def remove(self, seq):
        """seq leaves for good (finished or aborted): its blocks go back to the pool."""
        if seq.num_cached == 0 and not seq.blocks and seq in self.waiting:  # aborted while waiting
            self.waiting.remove(seq)
            return
        del self.running[seq]
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self.blocks.release(seq.blocks + seq.spare)
        seq.blocks, seq.spare = [], []

    def occupied(self):
        # a leader still prefilling will become `fork` sequences (only prefilling ones are unforked)
        return len(self.running) + sum(s.fork - 1 for s in self.prefilling)

    def _admit_cost(self, seq):
        """Blocks a waiting sequence needs to be prefilled completely and forked."""
        partial = seq.fork > 1 and len(seq.tokens) % self.blocks.block_size != 0
        return self.blocks.blocks_for(len(seq.tokens)) + (seq.fork - 1 if partial else 0)

    def _can_admit(self, seq, occupied):
        if occupied + seq.fork > self.max_num_seqs:
            return False
        # leave every running sequence (the new ones too) a block to grow into, so an admission is not
        # undone by a preemption a few steps later (recompute thrash when the pool is tight)
        watermark = max(1, self.blocks.num_blocks // 100)
        need = self._admit_cost(seq) + (max(watermark, occupied + seq.fork) if self.running else 0)
        return need <= self.blocks.num_free

    def wants_prefill(self):
        """Cheap and side-effect free: will schedule_prefill() find work?"""
        return bool(self.prefilling) or bool(self.waiting) and self._can_admit(self.waiting[0], self.occupied())

    def schedule_prefill(self):
        """Chunks of running sequences still prefilling first, then new admissions, within the token budget.
        Returns [(seq, tokens to compute)], empty when nothing needs prefill (the step is a decode step)."""
        budget, batch = self.max_prefill_tokens, []
        for seq in list(self.prefilling):
            if budget == 0:
                break
            if seq in self.prefilling:  # an earlier grow may have preempted it
                take = min(len(seq.tokens) - seq.num_cached, budget)
                if self.grow(seq, seq.num_cached + take):
                    batch.append((seq, take))
                    budget -= take
        occupied = self.occupied()
        while self.waiting and budget > 0 and self._can_admit(self.waiting[0], occupied):
            seq = self.waiting.popleft()
            self.admitted += 1
            self.running[seq] = (self.admitted, seq.sample_index)
            self.prefilling.append(seq)
            occupied += seq.fork
            if self.prefix_caching:
                self._reuse_cached(seq)
            take = min(len(seq.tokens) - seq.num_cached, budget)
            self.grow(seq, seq.num_cached + take)
            batch.append((seq, take))
            budget -= take
        if not batch and self.waiting and not self.running:
            raise RuntimeError("engine: cannot admit any sequence (KV pool too small for one request)")
        return batch

    def _reuse_cached(self, seq):
        """Start seq on the cached blocks of its longest cached prefix (always leaving its last token to
        compute: its logits are needed)."""
        bs = self.blocks.block_size
        seq.keys = block_keys(seq.tokens, bs)
        usable = (len(seq.tokens) - 1) // bs
        seq.blocks = self.blocks.take_cached(seq.keys[:usable])
        seq.num_cached = len(seq.blocks) * bs
        self.cache_hit_blocks += len(seq.blocks)

    def computed(self, seq, before):
        """seq's K/V now cover its first seq.num_cached tokens (before: the count before this step):
        register the blocks this step filled."""
        bs = self.blocks.block_size
        for i in range(before // bs, min(seq.num_cached // bs, len(seq.keys))):
            self.blocks.register(seq.blocks[i], seq.keys[i])
        if seq.num_cached == len(seq.tokens):
            seq.keys = []

    def grow(self, seq, num_tokens):
        """Make room for num_tokens tokens in seq (and, when that completes a leader's prompt, for its
        followers' partial-block copies), preempting the youngest running sequences when the pool is
        empty. False if seq itself had to be preempted."""
        bs = self.blocks.block_size
        completes = num_tokens == len(seq.tokens)
        spare = seq.fork - 1 if completes and seq.fork > 1 and seq.prompt_len % bs else 0
        while len(seq.blocks) < self.blocks.blocks_for(num_tokens) or len(seq.spare) < spare:
            if self.blocks.num_free == 0:
                victim = self.youngest()
                self.preempt(victim)
                if victim is seq:
                    return False
                continue
            if len(seq.blocks) < self.blocks.blocks_for(num_tokens):
                seq.blocks.append(self.blocks.alloc())
            else:
                seq.spare.append(self.blocks.alloc())
        return True

    def preempt(self, seq):
        """Back to the front of the queue without its blocks, to recompute its tokens later."""
        self.on_preempt(seq)  # the engine has read every sampled token already (it syncs first)
        self.remove(seq)
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def done_prefilling(self, seq):
        self.prefilling.remove(seq)

    def fork(self, leader, follower_groups):
        """Followers share the leader's full prompt blocks and take one reserved spare block each for their
        copy of its partial last block. Returns the followers and the (source, destination) block copies
        the model runner must make."""
        bs = self.blocks.block_size
        full = leader.prompt_len // bs
        followers, copies = [], []
        for group in follower_groups:
            f = Sequence(leader.request, group, leader.tokens, leader.limit)
            self.blocks.share(leader.blocks[:full])
            f.blocks = leader.blocks[:full]
            if len(leader.blocks) > full:
                f.blocks = f.blocks + [leader.spare.pop()]  # reserved when the last chunk was scheduled
                copies.append((leader.blocks[full], f.blocks[-1]))
            f.num_cached = leader.prompt_len
            followers.append(f)
        self.blocks.release(leader.spare)  # spares of samples aborted before the fork
        leader.spare, leader.group = [], leader.group[:1]
        age = self.running[leader][0]
        for f in followers:
            self.running[f] = (age, f.sample_index)
        return followers, copies

    def youngest(self):
        return max(self.running, key=self.running.__getitem__)  # O(running), only when preempting
