"""
The rollout engine: requests in, tokens out. sample.py is the front door (generate(), the CLI); this file
is the engine's public face and its step loop. Three parts do the work, nano-vllm style:

    scheduler.py     sequences, the block manager (pool, refcounts, prompt sharing, prefix cache), the
                     scheduler (waiting/running, admission, chunked prefill, preemption by recompute)
    model_runner.py  the KV pool, the persistent decode batch, model + sampler, CUDA graphs
    engine.py        requests and their parameters, the step loop, outputs and stats

Two ways in:

    engine.generate(prompts, max_new_tokens=..., temperature=..., n=8, seed=step)   # a whole batch
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=64, temperature=0.6, n=4, seed=1))
    while engine.has_unfinished():                                                    # requests that join
        for out in engine.step(): ...   # StepOutput: new tokens of a sample, finished or not  and leave

A step is either a prefill step (chunks of prompts, and recomputation after preemption) or a decode step
(one token for every decoding sequence). Every token is drawn by a counter-based sampler keyed by (seed,
prompt_index, sample_index, position), so a sample's tokens do not depend on what else runs, on batching,
chunking or preemption. On CUDA the host reads a decode step's tokens back one step behind (`overlap`):
it launches step k+1 before it looks at step k's tokens, so it never waits for the device between decode
steps. A sample that stopped at step k has then already been run once more in step k+1: that step wrote
only to the scratch block and its token is discarded; a block it took for that step (when its stop token
fell on a block boundary) goes straight back to the pool, never written. Anything that could preempt a
sequence first reads every outstanding token, so nothing is preempted on a guess.
"""
import itertools
import math
import secrets
import time
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

import model as M
from kernels.sampling import fold_seed
from model_runner import MAX_STOP_IDS, MAX_TOP_LOGPROBS, ModelRunner
from scheduler import BlockManager, Scheduler, Sequence


@dataclass
class SamplingParams:
    """Per request; checked by add_request (errors name the field)."""
    max_tokens: int = 16            # new tokens per sample
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0              # (0, 1]
    top_k: int = -1                 # -1 or 0 = off
    n: int = 1                      # samples of this prompt (they share the prompt's KV blocks)
    seed: int | None = None         # None: the engine picks one (Request.seed)
    stop_token_ids: tuple = ()      # besides the engine's EOS ids (unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int | None = None     # also return the top-N log-probs of each step's distribution
    prompt_index: int = 0           # sampler key: same prompt, params, seed and prompt_index -> same tokens


@dataclass
class StepOutput:
    request_id: str
    sample_index: int
    new_token_ids: list
    new_logprobs: list              # log_softmax(logits / T) of each new token (as Completion.logprobs)
    top_logprobs: list | None       # with params.logprobs = N: per new token, N (id, logprob) pairs, best first
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" (when finished)


@dataclass
class Completion:
    token_ids: list          # generated tokens, including the EOS/stop token when it stopped on one
    logprobs: list           # log-prob of each token under log_softmax(logits / T), before top-p/top-k
    finish_reason: str       # "stop" (EOS or a stop token) or "length" (max_new_tokens or max_model_len)
    prompt_index: int
    sample_index: int
    num_preemptions: int = 0


class Request:
    __slots__ = ("id", "prompt", "params", "seed", "stop_ids", "stop_row", "filtered", "seqs", "num_open")

    def __init__(self, request_id, prompt, params, seed, stop_ids):
        self.id, self.prompt, self.params, self.seed = request_id, prompt, params, seed
        self.stop_ids = stop_ids
        self.stop_row = np.full(MAX_STOP_IDS, -1, dtype=np.int64)  # the device-side copy, padded with -1
        self.stop_row[:len(stop_ids)] = sorted(stop_ids)
        self.filtered = params.temperature > 0 and (params.top_p < 1 or params.top_k > 0)
        self.seqs, self.num_open = [], params.n  # its sequences; samples not finished yet


def new_stats():
    return dict(preemptions=0, prefix_blocks_shared=0, prefix_cache_hits=0, tokens_generated=0, prefill_tokens=0,
                prefill_steps=0, decode_steps=0, max_running=0, requests=0, max_distinct_requests=0, time=0.0,
                prefill_time=0.0, decode_time=0.0)


class Engine:
    """Lives for the whole run: the KV pool is allocated (and on CUDA the decode graphs captured) once here.

    num_blocks / memory_budget (bytes) / gpu_memory_fraction size the pool (see _blocks_from_budget);
    max_num_seqs bounds the decode batch; max_model_len bounds prompt + response (default: the config's
    limit or the pool, whichever is smaller); max_prefill_tokens is the per-step prefill budget (chunked
    prefill); vocab_limit = tokenizer.vocab_size (ids >= it are never sampled); EOS ids come from the
    config unless eos_token_ids is given; ignore_eos (benchmarks) turns them off for every request.
    cuda_graphs: None = on with the kernels on CUDA (NANOSCALER_CUDA_GRAPHS=0 turns them off), False = eager.
    allow_kernel_fallback: a failed kernel self-check is an error unless True; then the PyTorch twins run and
    kernel_fallback says why. overlap: read sampled tokens one step behind (default: on CUDA).
    prefix_caching: a request starts on the cached K/V blocks of the longest prefix it shares with earlier
    ones (scheduler.py); dropped by update_weights and at every generate() call.
    stats: cumulative counters (generate() starts them afresh, so after it they are that call's), among
    them max_distinct_requests, the most requests with a sample in one decode step."""

    def __init__(self, model: M.Qwen2, *, block_size=16, num_blocks=None, memory_budget=None,
                 gpu_memory_fraction=0.9, max_num_seqs=256, max_model_len=None, max_prefill_tokens=None,
                 vocab_limit=None, eos_token_ids=None, ignore_eos=False, cuda_graphs=None,
                 allow_kernel_fallback=False, overlap=None, prefix_caching=True):
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
        if len(self.eos_ids) > MAX_STOP_IDS:
            raise ValueError(f"Engine: eos_token_ids has {len(self.eos_ids)} ids, at most {MAX_STOP_IDS}")
        self.num_blocks = num_blocks or self._blocks_from_budget(memory_budget, gpu_memory_fraction)
        if self.num_blocks < 1:
            raise ValueError(f"Engine: KV pool of {self.num_blocks} blocks; raise num_blocks or memory_budget")
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, self.num_blocks * block_size)
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self.prefix_caching = prefix_caching
        # start-up order: the pool (sized above, after the trainer sized itself), then the graphs
        self.runner = ModelRunner(model, block_size=block_size, num_blocks=self.num_blocks,
                                  max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                  vocab_limit=self.vocab_limit, cuda_graphs=cuda_graphs,
                                  allow_kernel_fallback=allow_kernel_fallback)
        self.kernel_fallback = self.runner.kernel_fallback  # None, or why the kernels are not in use
        self.graph_pool_bytes = self.runner.graph_pool_bytes
        self.stats = new_stats()
        self._ids = itertools.count()
        self._reset()

    def _reset(self):
        """Empty pool, queues and batch (also after an exception inside generate())."""
        self.pool = BlockManager(self.num_blocks, self.block_size)
        self.scheduler = Scheduler(self.pool, self.max_num_seqs, self.max_prefill_tokens, self._on_preempt,
                                   self.prefix_caching)
        for seq in list(self.runner.rows):
            self.runner.remove_row(seq)
        self.requests, self.pending, self.num_finished = {}, None, 0
        self._touched, self._outputs, self._track = {}, [], True

    # ------------------------------------------------------------------ setup

    @property
    def k_cache(self):
        return self.runner.k_cache

    @property
    def v_cache(self):
        return self.runner.v_cache

    @property
    def max_blocks_per_seq(self):
        return self.runner.max_blocks_per_seq

    @property
    def sampler(self):
        return self.runner.sampler

    @sampler.setter
    def sampler(self, fn):  # tests put the fused sampler on the CPU path
        self.runner.sampler = fn

    @property
    def graphs(self):
        return self.runner.graphs

    def kv_bytes_per_block(self):
        c = self.cfg
        return 2 * c.num_hidden_layers * self.block_size * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def _blocks_from_budget(self, memory_budget, fraction):
        """The pool is sized once. On CUDA: a fraction of the memory free after emptying the caching
        allocator (so it can sit beside a trainer that sized itself first), minus what a step's
        activations, sampling temporaries and decode graphs need; elsewhere an explicit byte budget
        (default 512 MiB)."""
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
        self.pool.clear_cache()  # cached K/V belong to the old weights

    def reset_stats(self):
        self.stats = new_stats()

    # ------------------------------------------------------------------ checking requests

    def _check_prompt(self, prompt, where):
        V = self.cfg.vocab_size
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not prompt or \
                not all(isinstance(t, Integral) and 0 <= t < V for t in prompt):
            raise ValueError(f"{where} must be a non-empty list of token ids in [0, {V})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"{where} has {len(prompt)} tokens; max_model_len is {self.max_model_len}")
        return [int(t) for t in prompt]

    def _check_params(self, p, who, name=lambda f: f):
        """Every field of a SamplingParams; errors say `who: <field> ...` (name() maps a field to what the
        caller called it, e.g. max_tokens -> max_new_tokens for generate())."""
        def bad(field, why):
            raise ValueError(f"{who}: {name(field)} {why}, got {getattr(p, field)!r}")

        def integer(field, low):
            v = getattr(p, field)
            if not isinstance(v, Integral) or isinstance(v, bool) or v < low:
                bad(field, f"must be an int >= {low}")
        integer("max_tokens", 1)
        integer("n", 1)
        integer("top_k", -1)
        integer("prompt_index", 0)
        for field in ("temperature", "top_p"):
            v = getattr(p, field)
            if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v):
                bad(field, "must be a finite number")
        if p.temperature < 0:
            bad("temperature", "must be >= 0 (0 is greedy)")
        if not 0 < p.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if p.seed is not None and (not isinstance(p.seed, Integral) or isinstance(p.seed, bool)):
            bad("seed", "must be an int or None")
        if p.logprobs is not None and (not isinstance(p.logprobs, Integral) or not 0 <= p.logprobs <= MAX_TOP_LOGPROBS):
            bad("logprobs", f"must be None or an int in [0, {MAX_TOP_LOGPROBS}]")
        V = self.cfg.vocab_size
        stops = p.stop_token_ids
        if isinstance(stops, Integral) or not all(isinstance(t, Integral) and 0 <= t < V for t in stops):
            bad("stop_token_ids", f"must be a list of token ids in [0, {V})")
        if len(self._stop_ids(p)) > MAX_STOP_IDS:
            bad("stop_token_ids", f"with the EOS ids must hold at most {MAX_STOP_IDS} distinct ids")

    def _check_fits(self, prompt, max_tokens, where):
        need = math.ceil(min(len(prompt) + max_tokens, self.max_model_len) / self.block_size)
        if need > self.num_blocks:
            raise ValueError(f"{where} may need {need} KV blocks but the pool has {self.num_blocks}; "
                             "raise num_blocks/memory_budget or lower max_new_tokens")

    def _stop_ids(self, p):
        return (frozenset() if p.ignore_eos else self.eos_ids) | frozenset(int(t) for t in p.stop_token_ids)

    # ------------------------------------------------------------------ the step-level interface

    def add_request(self, request_id, prompt_token_ids, params=None):
        """Queue a prompt for params.n samples. ValueError naming the field for bad input."""
        params = SamplingParams() if params is None else params
        if request_id in self.requests:
            raise ValueError(f"add_request: request_id {request_id!r} is already in use")
        prompt = self._check_prompt(prompt_token_ids, "add_request: prompt_token_ids")
        self._check_params(params, "add_request")
        self._check_fits(prompt, params.max_tokens, "add_request: prompt_token_ids")
        self._add(request_id, prompt, params)

    def _add(self, request_id, prompt, params):
        seed = fold_seed(int(params.seed) if params.seed is not None else secrets.randbits(64))
        req = Request(request_id, prompt, params, seed, self._stop_ids(params))
        limit = min(len(prompt) + params.max_tokens, self.max_model_len)
        # a leader's group never exceeds the batch, nor a pool that must hold its partial-block copies
        group = max(1, min(self.max_num_seqs, self.num_blocks - self.pool.blocks_for(len(prompt)) + 1))
        for s0 in range(0, params.n, group):
            seq = Sequence(req, range(s0, min(params.n, s0 + group)), prompt, limit)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.stats["requests"] += 1

    @torch.no_grad()
    def step(self):
        """One scheduler step. Returns a StepOutput for every sample that got new tokens or finished since
        the last call (tokens may arrive a step late on CUDA, never twice, never lost)."""
        self._track = True
        self._step()
        outputs, self._outputs = self._outputs, []
        for seq in self._touched:
            req, k = seq.request, seq.prompt_len + seq.num_reported
            top = None if seq.top_logprobs is None else seq.top_logprobs[seq.num_reported:]
            outputs.append(StepOutput(req.id, seq.sample_index, seq.tokens[k:], seq.logprobs[seq.num_reported:],
                                      top, seq.finish_reason is not None, seq.finish_reason))
            seq.num_reported = seq.num_generated
        self._touched = {}
        for out in outputs:  # a request is forgotten once its last sample's last output is out
            req = self.requests.get(out.request_id)
            if out.finished and req is not None and req.num_open == 0:
                del self.requests[out.request_id]
        return outputs

    def abort(self, request_id, sample_index=None):
        """Stop one sample (or all of a request's samples) now and free its blocks; it finishes with
        finish_reason "abort". Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in list(req.seqs):
            if seq.finish_reason is not None or (sample_index is not None and sample_index not in seq.group):
                continue
            if sample_index is not None and seq.fork > 1:  # one sample of a group not forked yet
                seq.group.remove(sample_index)
                seq.sample_index = seq.group[0]
                self._aborted_before_fork(req, [sample_index])
                continue
            self._aborted_before_fork(req, seq.group[1:])
            self._finish(seq, "abort")

    def _aborted_before_fork(self, req, indices):
        for i in indices:
            req.num_open -= 1
            self.num_finished += 1
            self._outputs.append(StepOutput(req.id, i, [], [], [] if req.params.logprobs else None, True, "abort"))

    def has_unfinished(self):
        return self._busy() or bool(self._touched) or bool(self._outputs)

    def _busy(self):
        return bool(self.scheduler.waiting or self.scheduler.running or self.pending is not None)

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, n=1, seed=0,
                 stop_token_ids=(), progress=False, first_prompt_index=0):
        """prompts: lists of token ids. Returns len(prompts) * n Completions, prompt-major.
        Prompt i is keyed as first_prompt_index + i in the sampler, so a rank that generates its slice of
        a global batch draws exactly what one process generating the whole batch would. Built on the
        step-level interface; refuses to run beside requests added with add_request."""
        if self.has_unfinished():
            raise RuntimeError("generate: the engine has requests in flight (add_request/step); finish or abort them first")
        names = {"max_tokens": "max_new_tokens"}
        params = [SamplingParams(max_new_tokens, temperature, top_p, top_k, n, seed, tuple(stop_token_ids),
                                 prompt_index=first_prompt_index + i) for i in range(len(prompts))]
        checked = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self._check_params(p, "generate", lambda f: names.get(f, f))
            checked.append(self._check_prompt(prompt, f"generate: prompts[{i}]"))
            self._check_fits(checked[-1], max_new_tokens, f"generate: prompts[{i}]")
        self.reset_stats()
        self.pool.clear_cache()  # a trainer may have copied new weights into the model in place since
        t0, call = time.perf_counter(), next(self._ids)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts) * n, unit="seq", desc="generate")
        try:
            self._track = False  # no StepOutputs: the completions are collected at the end
            ids = [f"generate-{call}-{i}" for i in range(len(prompts))]
            for rid, prompt, p in zip(ids, checked, params):
                self._add(rid, prompt, p)
            while self._busy():
                done = self.num_finished
                self._step()
                if bar is not None:
                    bar.update(self.num_finished - done)
                    bar.set_postfix(tok_s=f"{self.stats['tokens_generated'] / (time.perf_counter() - t0):,.0f}",
                                    running=len(self.scheduler.running), refresh=False)
        except BaseException:
            self._reset()  # nothing of an interrupted call leaks into the next
            raise
        finally:
            self._track = True
            if bar is not None:
                bar.close()
        self.stats["time"] = time.perf_counter() - t0
        out = []
        for rid in ids:
            req = self.requests.pop(rid)
            for seq in sorted(req.seqs, key=lambda s: s.sample_index):
                out.append(Completion(seq.tokens[seq.prompt_len:], seq.logprobs, seq.finish_reason,
                                      req.params.prompt_index, seq.sample_index, seq.num_preemptions))
        assert self.pool.num_free == self.num_blocks, "blocks leaked"
        return out

    # ------------------------------------------------------------------ the step loop

    def _step(self):
        sch = self.scheduler
        if sch.wants_prefill() or (not self.runner.rows and self.pending is None):
            self._flush()  # prefill syncs anyway; and a preemption must not act on unread tokens
            t = time.perf_counter()
            hits = sch.cache_hit_blocks
            batch = sch.schedule_prefill()
            self.stats["prefix_cache_hits"] += sch.cache_hit_blocks - hits
            if batch:
                self._prefill(batch)
                self._account(t, "prefill_time")
                return
        if self.runner.rows:
            t = time.perf_counter()
            self._decode_step()
            self._account(t, "decode_time")
        else:
            self._flush()

    def _account(self, t, key):
        dt = time.perf_counter() - t
        self.stats[key] += dt
        self.stats["time"] += dt
        self.stats["max_running"] = max(self.stats["max_running"], len(self.scheduler.running))

    def _flush(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._read(pending)

    def _prefill(self, batch):
        h = self.runner.prefill(batch)
        self.stats["prefill_tokens"] += sum(take for _, take in batch)
        self.stats["prefill_steps"] += 1
        done, rows = [], []
        for i, (seq, take) in enumerate(batch):
            seq.num_cached += take
            self.scheduler.computed(seq, seq.num_cached - take)
            if seq.num_cached == len(seq.tokens):  # complete: sample from the last position
                self.scheduler.done_prefilling(seq)
                done.append(seq)
                rows.append(i)
        if not done:
            return
        logits = self.model.logits(h[torch.tensor(rows, device=h.device)])
        # a leader's one logits row serves every sample of its group, each with its own key
        expand = torch.tensor([i for i, s in enumerate(done) for _ in s.group], device=h.device)
        members = [(s, idx) for s in done for idx in s.group]
        tokens, logprobs, top = self.runner.sample_rows(logits[expand], members)
        k = 0
        for seq in done:
            if seq.fork > 1:
                followers, copies = self.scheduler.fork(seq, [[i] for i in seq.group[1:]])
                self.runner.copy_blocks(copies)
                self.stats["prefix_blocks_shared"] += len(followers) * (seq.prompt_len // self.block_size)
                seq.request.seqs.extend(followers)
            else:
                followers = []
            for s in [seq] + followers:
                self._append(s, tokens[k], logprobs[k], top[k])
                if s.finish_reason is None:
                    self.runner.add_row(s)
                k += 1

    def _decode_step(self):
        self._grow_rows()
        if not self.runner.rows:  # all preempted: the next step recomputes
            return
        pending = self.runner.launch_decode()
        self.stats["decode_steps"] += 1
        self.stats["max_distinct_requests"] = max(self.stats["max_distinct_requests"],
                                                  len(self.runner.requests_in_batch))
        if self.overlap:  # read the previous step's tokens while this one runs
            previous, self.pending = self.pending, pending
            if previous is not None:
                self._read(previous)
            # rows whose unread token is their last must not run again (they finish when it is read)
            for r in self.runner.rows_at_limit()[::-1]:
                self.runner.remove_row(self.runner.rows[r])
        else:
            self._read(pending)

    def _grow_rows(self):
        """A block for every row whose next position starts one. Short of blocks: first read outstanding
        tokens (finished rows return theirs), then preempt the youngest running sequences."""
        while True:
            need = self.runner.rows_needing_block()
            if len(need) <= self.pool.num_free:
                for r in need:
                    self.runner.append_block(r, self.pool.alloc())
                return
            if self.pending is not None:
                self._flush()
            else:
                self.scheduler.preempt(self.scheduler.youngest())

    def _on_preempt(self, seq):
        assert self.pending is None, "preempting with unread tokens"
        if seq.row >= 0:
            self.runner.remove_row(seq)
        self.stats["preemptions"] += 1

    def _read(self, pending):
        """A decode step's tokens: _append for every row, inlined (it runs B times per step)."""
        tokens, logprobs, top = pending.read()
        touched, n = self._touched if self._track else None, 0
        for seq, t, lp, tp in zip(pending.seqs, tokens, logprobs, top):
            if seq.finish_reason is not None:  # it stopped (or was aborted) before this token: discard it
                continue
            seq.tokens.append(t)
            seq.logprobs.append(lp)
            n += 1
            if seq.top_logprobs is not None:
                seq.top_logprobs.append(tp[:seq.request.params.logprobs])
            if t in seq.request.stop_ids:
                self._finish(seq, "stop")
            elif len(seq.tokens) >= seq.limit:
                self._finish(seq, "length")
            elif touched is not None:
                touched[seq] = None
        self.stats["tokens_generated"] += n

    def _append(self, seq, token, logprob, top):
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        if seq.top_logprobs is not None:
            seq.top_logprobs.append(top[:seq.request.params.logprobs])
        self.stats["tokens_generated"] += 1
        if token in seq.request.stop_ids:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.limit:
            self._finish(seq, "length")
        elif self._track:
            self._touched[seq] = None

    def _finish(self, seq, reason):
        seq.finish_reason = reason
        if seq.row >= 0:
            self.runner.remove_row(seq)
        self.scheduler.remove(seq)
        seq.request.num_open -= 1
        self.num_finished += 1
        if self._track:
            self._touched[seq] = None
