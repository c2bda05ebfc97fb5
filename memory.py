"""
The start-up memory plan: how much of each device the rollout engine's KV pool may take, measured.

The KV pool is allocated once and sits beside the trainer for the whole run, so it gets what the trainer
does not need at its worst. That worst is measured, not estimated, before the pool exists:
  1. one worst-case micro-batch (the token budget, or the longest sequence of the schedule if longer)
     forward + backward through the trainer's own model and autocast, then an AdamW step (and the gradient
     clip) on stand-ins that share the gradients' storage, so the optimizer's state and its foreach
     temporaries are allocated and counted while the real weights and optimizer are never touched;
  2. one rollout-sized engine step on a throwaway engine with a small pool: a full prefill chunk, then
     the first tokens and one decode step of max_num_seqs sequences (sampling over the vocabulary), which
     also captures the decode CUDA graphs the real engine will hold;
then the pool gets what is free minus the optimizer's state, the larger transient peak, the engine's
fixed buffers and graph pool, and a stated margin (memory_margin_gb: NCCL and allocator fragmentation,
what the allocator cannot see). Start-up order: probe -> KV pool -> graph capture. Weights, optimizer
and RNG are exactly as before the probe (tests/test_memory_plan.py).

    plan = measure_plan(...)                           # train.build() does this
    engine = Engine(..., memory_budget=plan.kv_bytes)
    plan.engine_built(engine); print(plan.text()); plan.save(out_dir)

CUDA readings are the caching allocator's (memory_allocated / max_memory_allocated, free memory from
cudaMemGetInfo); on CPU the same code reads the process's resident memory (glibc told to return large
blocks to the system, so RSS follows live tensors) and MemAvailable.
"""
import ctypes
import gc
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

GB = 2**30
CPU_KV_CAP = 512 * 2**20  # a CPU run (demo, tests) gets at most the engine's own CPU default


# -----------------------------------------------------------------------------
# Allocator readings, the same calls on CUDA and CPU


class Meter:
    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.libc = None
        if not self.cuda and os.path.exists("/proc/self/status"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None

    def settle(self, collect=False):
        if collect:  # reference cycles (a captured graph's closure holds its engine) need the collector
            gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        elif self.libc is not None:
            self.libc.malloc_trim(0)  # hand freed heap pages back, so reusing them shows up in RSS again

    def current(self):
        """Live bytes: allocated tensors (CUDA), resident memory (CPU)."""
        return torch.cuda.memory_allocated(self.device) if self.cuda else _proc("VmRSS")

    def held(self):
        """Bytes held from the device after settle(): reserved by the allocator (CUDA), resident (CPU)."""
        return torch.cuda.memory_reserved(self.device) if self.cuda else _proc("VmRSS")

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else _proc("VmHWM")

    def free(self):
        if self.cuda:
            return torch.cuda.mem_get_info(self.device)[0]
        return _proc("MemAvailable", "/proc/meminfo")

    def precise(self, on):
        """CPU: every block over 64 KiB its own mapping, returned on free, so RSS follows live tensors (slower;
        only while probing). Off: the values glibc's own dynamic tuning converges to (mmap threshold 32 MiB,
        trim threshold twice that), since setting one switches that tuning off."""
        if self.libc is not None:
            self.libc.mallopt(-3, 65536 if on else 32 * 2**20)  # M_MMAP_THRESHOLD
            self.libc.mallopt(-1, 128 * 1024 if on else 64 * 2**20)  # M_TRIM_THRESHOLD


def _proc(field_name, path="/proc/self/status"):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def local_bytes(tensors):
    """Bytes this rank holds (a sharded DTensor counts its local shard)."""
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# -----------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    device: str
    world_size: int
    free: int                  # device memory free with every model loaded, after the probe
    resident: int              # live bytes then (CUDA: allocated tensors; CPU: resident memory)
    weights: dict              # bytes on this rank: policy (float32 masters), reference, engine copy
    gradients: int
    optimizer: int             # AdamW moments, allocated at the first step
    train_peak: int            # worst micro-batch fwd+bwd / AdamW step, beyond weights and optimizer state
    rollout_peak: int          # one rollout-sized engine step, beyond weights, pool and graphs
    engine_fixed: int          # the engine's decode buffers and CUDA-graph pool
    margin: int
    room: int                  # what the measured peaks leave for the pool (before any cap)
    kv_bytes: int
    kv_bytes_per_token: int
    kv_source: str             # "measured", "engine_memory" (the user's), or "cap ..."
    micro_tokens: int          # tokens of the probed micro-batch
    prefill_tokens: int        # tokens of the probed prefill chunk
    max_num_seqs: int
    max_model_len: int
    seqs_per_rank: int         # the worst stage's sequences per rank per step
    prompts_per_step: int
    group_size: int
    attention: str = ""
    graph_pool_measured: int | None = None  # what the real engine reports after capturing its graphs
    observed: dict = field(default_factory=dict)

    @property
    def planned_peak(self):
        """What the allocator should peak at in a step: resident + optimizer + pool + graphs + transient."""
        transient = max(self.train_peak, self.rollout_peak)
        return self.resident + self.optimizer + self.kv_bytes + self.engine_fixed + transient

    @property
    def kv_tokens(self):
        return self.kv_bytes // self.kv_bytes_per_token

    @property
    def full_sequences(self):
        return self.kv_tokens // self.max_model_len

    def recommended_world(self):
        """Fewest ranks (dividing prompts_per_step) whose pools of this size hold every running sequence
        of the worst stage at full length at once."""
        for w in range(1, self.prompts_per_step + 1):
            running = min(self.prompts_per_step // w * self.group_size, self.max_num_seqs)
            if self.prompts_per_step % w == 0 and running * self.max_model_len <= self.kv_tokens:
                return w
        return None

    def verdict(self):
        running = min(self.seqs_per_rank, self.max_num_seqs)
        need = running * self.max_model_len * self.kv_bytes_per_token
        head = (f"worst stage: {self.seqs_per_rank} sequences per rank ({self.prompts_per_step} prompts x group "
                f"{self.group_size} / {self.world_size}), up to {self.max_model_len:,} tokens each, at most "
                f"{running} running: {fmt(need)} of KV if all were alive at full length")
        if self.full_sequences >= running:
            return head + " -> fits: no preemption"
        w = self.recommended_world()
        dev = "GPUs" if self.device.startswith("cuda") else "devices"
        more = f"{w} {dev} like this one would hold them all" if w else f"no number of such {dev} holds them all"
        return (head + f" -> the pool holds {self.full_sequences} at full length; when more grow long the engine "
                f"preempts the youngest and recomputes it later (correct, slower); {more} "
                "(DeepScaleR ran its 16K/24K stages on 32)")

    def rows(self):
        w = self.weights
        act = max(self.train_peak, self.rollout_peak)
        rows = [
            ("free after loading", self.free, "device memory free with all models loaded"),
            ("weights", sum(w.values()), " + ".join(f"{k} {fmt(v)}" for k, v in w.items())),
            ("gradients", self.gradients, "float32, this rank's shard"),
            ("optimizer", self.optimizer, "AdamW moments (allocated at the first step)"),
            ("activation peak", act, f"update {fmt(self.train_peak)} ({self.micro_tokens:,}-token micro-batch "
             f"fwd+bwd+step), rollout {fmt(self.rollout_peak)} ({self.prefill_tokens:,}-token prefill, "
             f"{self.max_num_seqs} sampled rows)"),
            ("graph pool", self.engine_fixed, "engine decode buffers + CUDA graphs" + (
                f" (captured: {fmt(self.graph_pool_measured)})" if self.graph_pool_measured is not None else "")),
            ("margin", self.margin, "memory_margin_gb: NCCL, fragmentation, what the allocator does not see"),
            ("KV pool", self.kv_bytes, f"{self.kv_tokens:,} tokens = {self.full_sequences} sequences of "
             f"{self.max_model_len:,} at once ({self.kv_source})"),
        ]
        return rows

    def text(self):
        lines = [f"memory plan ({self.device}, rank 0 of {self.world_size}, packed attention: {self.attention})"]
        lines += [f"  {name:<19}{fmt(b):>10}   {note}" for name, b, note in self.rows()]
        lines.append("  " + self.verdict())
        if self.observed:
            lines.append(f"  planned peak {fmt(self.planned_peak)}; observed "
                         + ", ".join(f"{k} {fmt(v)}" for k, v in self.observed.items()))
        return "\n".join(lines)

    def engine_built(self, engine):
        """The real engine captured its graphs after the pool: keep what it reports beside the reserve."""
        measured = getattr(engine, "graph_pool_bytes", None)
        self.graph_pool_measured = int(measured) if measured is not None else None
        if engine.device.type == "cuda":  # from here on the allocator's peak is the run's, not the probe's
            torch.cuda.reset_peak_memory_stats(engine.device)

    def observe(self, device, out_dir=None):
        """After a real step on CUDA: the allocator's peaks beside the plan (saved with it). Returns a line."""
        self.observed = {"max_memory_allocated": torch.cuda.max_memory_allocated(device),
                         "max_memory_reserved": torch.cuda.max_memory_reserved(device),
                         "device_total": torch.cuda.get_device_properties(device).total_memory}
        if out_dir:
            self.save(out_dir)
        return (f"memory after the first step: planned peak {fmt(self.planned_peak)}; observed "
                + ", ".join(f"{k} {fmt(v)}" for k, v in self.observed.items()))

    def save(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        d = asdict(self)
        d.update(planned_peak=self.planned_peak, kv_tokens=self.kv_tokens, full_sequences=self.full_sequences,
                 verdict=self.verdict(), recommended_world=self.recommended_world(), text=self.text().splitlines())
        path = os.path.join(out_dir, "memory_plan.json")
        with open(path + ".tmp", "w") as f:
            json.dump(d, f, indent=1)
        os.replace(path + ".tmp", path)
        return path


def fmt(b):
    return f"{b / GB:.2f} GB" if abs(b) >= GB else f"{b / 2**20:.1f} MB"


def kv_budget(free, optimizer, train_peak, rollout_peak, engine_fixed, margin):
    """What the KV pool may take: free memory less what the trainer and the engine will still allocate."""
    return free - optimizer - max(train_peak, rollout_peak) - engine_fixed - margin


# -----------------------------------------------------------------------------
# The probe


def worst_micro_batch(token_budget, longest_sequence):
    """Sequence lengths of the largest micro-batch packing can build: the budget filled with the longest
    sequences (one sequence longer than the budget forms a micro-batch of its own)."""
    total = max(token_budget, longest_sequence)
    lens = []
    while sum(lens) < total:
        lens.append(min(longest_sequence, total - sum(lens)))
    return lens


def probe_update(model, lens, vocab, autocast, make_optimizer, temperature, meter, grad_clip):
    """(fwd+bwd peak, step peak, gradient bytes, optimizer bytes) of one worst-case micro-batch. Peaks are
    above the live memory before the forward. Nothing of the model or the real optimizer changes."""
    import model as M
    device = meter.device
    g = torch.Generator().manual_seed(0)  # a private generator: the global RNG streams stay untouched
    n = sum(lens)
    ids = torch.randint(0, vocab, (n,), generator=g).to(device)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    positions = torch.cat([torch.arange(k) for k in lens]).to(device)
    meta = M.Varlen.from_seqlens(lens, device)
    meter.settle()
    meter.reset_peak()
    base = meter.current()
    with autocast():
        logp, ent = model(ids, positions, meta, targets=targets, temperature=temperature, return_entropy=True)
    (logp.float().mean() + 1e-3 * ent.float().mean()).backward()
    del logp, ent
    fwd_bwd = meter.peak() - base
    params = [p for p in model.parameters() if p.grad is not None]
    grads = local_bytes(p.grad for p in params)
    # AdamW on stand-ins that *are* the gradients: its state and foreach temporaries are allocated as in a
    # real step, and what it writes lands in gradients that are thrown away next
    stand_ins = [torch.nn.Parameter(p.grad.detach()) for p in params]
    for s, p in zip(stand_ins, params):
        s.grad = p.grad
    opt = make_optimizer(stand_ins)
    torch.nn.utils.clip_grad_norm_(stand_ins, grad_clip)
    opt.step()
    optimizer = local_bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    step = meter.peak() - base
    del opt, stand_ins, params
    model.zero_grad(set_to_none=True)
    meter.settle()
    return fwd_bwd, step, grads, optimizer


def probe_rollout(make_engine, max_num_seqs, max_model_len, vocab, block_size, meter):
    """(peak, fixed bytes, prefill tokens) of a throwaway engine's rollout-sized step: one full prefill
    chunk, its first tokens drawn for max_num_seqs samples, one decode step of them all. fixed = what the
    engine keeps beyond its pool (decode buffers, and the CUDA graphs it captured)."""
    meter.settle()
    held0 = meter.held()
    prefill_cap = 16384
    engine = make_engine(num_blocks=math.ceil(prefill_cap / block_size) + max_num_seqs + 16, ignore_eos=True)
    pool = engine.k_cache.numel() * engine.k_cache.element_size() * 2
    prompt_len = max(1, min(engine.max_prefill_tokens, prefill_cap, max_model_len - 2))
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    meter.reset_peak()
    base = meter.current()
    engine.generate([prompt], max_new_tokens=2, temperature=1.0, n=max_num_seqs, seed=0)
    peak = meter.peak() - base
    meter.settle()
    fixed = max(meter.held() - held0 - pool, int(getattr(engine, "graph_pool_bytes", 0) or 0), 0)
    del engine
    meter.settle(collect=meter.cuda)
    return peak, fixed, prompt_len


def measure_plan(*, device, world_size, policy, reference, engine_model, make_engine, autocast, make_optimizer,
                 token_budget, longest_sequence, max_model_len, max_num_seqs, temperature, grad_clip,
                 margin_bytes, prompts_per_step, group_size, kv_request=None, kv_cap=None, free=None):
    """Probe (update, then rollout), then size the pool. kv_request: the user's explicit pool (bytes);
    kv_cap: an upper bound (CPU runs); free: override the device reading (tests)."""
    import attention as A
    meter = Meter(device)
    cfg = engine_model.config
    # the packed-attention choice first (on CUDA it checks torch's varlen kernel once, outside any forward)
    dtype = autocast_dtype(autocast, meter)
    q = torch.empty(1, cfg.num_attention_heads, cfg.head_dim, device=meter.device, dtype=dtype)
    attention = A.varlen_backend(q, q[:, :cfg.num_key_value_heads])
    devices = [meter.device] if meter.cuda else []
    with torch.random.fork_rng(devices=devices):  # belt and braces: the probe draws from private generators
        meter.precise(True)
        try:
            fwd_bwd, step, grads, optimizer = probe_update(policy, worst_micro_batch(token_budget, longest_sequence),
                                                           cfg.vocab_size, autocast, make_optimizer, temperature,
                                                           meter, grad_clip)
            rollout, fixed, prefill = probe_rollout(make_engine, max_num_seqs, max_model_len, cfg.vocab_size,
                                                    16, meter)
        finally:
            meter.precise(False)
    free = meter.free() if free is None else free
    resident = meter.current()
    train_peak = max(fwd_bwd, step - optimizer)
    kv_itemsize = engine_model.model.embed_tokens.weight.element_size()  # the engine's cache dtype
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kv_itemsize
    useful = max_num_seqs * max_model_len * per_token  # more than every running sequence at full length is waste
    room = kv_budget(free, optimizer, train_peak, rollout, fixed, margin_bytes)
    if kv_request:
        kv, source = int(kv_request), "engine_memory" + ("" if kv_request <= room else ", MORE than the measured room")
    else:
        kv = min(room, useful)
        source = "measured" if room <= useful else "capped at every running sequence at full length"
        if kv_cap is not None and kv_cap < kv:
            kv, source = kv_cap, f"capped at {kv_cap / 2**20:.0f} MiB on {meter.device.type}"
    weights = {"policy": local_bytes(policy.parameters()), "engine": local_bytes(engine_model.parameters())}
    if reference is not None:
        weights["reference"] = local_bytes(reference.parameters())
    return MemoryPlan(
        device=str(meter.device), world_size=world_size, free=free, resident=resident, weights=weights, gradients=grads,
        optimizer=optimizer, train_peak=train_peak, rollout_peak=rollout, engine_fixed=fixed, margin=margin_bytes,
        room=int(room), kv_bytes=max(0, int(kv)), kv_bytes_per_token=per_token, kv_source=source,
        micro_tokens=max(token_budget, longest_sequence), prefill_tokens=prefill, max_num_seqs=max_num_seqs,
        max_model_len=max_model_len, seqs_per_rank=prompts_per_step // world_size * group_size,
        prompts_per_step=prompts_per_step, group_size=group_size,
        attention=attention)


def autocast_dtype(autocast, meter):
    """The dtype packed attention sees in the update (the autocast dtype, or float32)."""
    with autocast():
        return torch.get_autocast_dtype(meter.device.type) if torch.is_autocast_enabled(meter.device.type) \
            else torch.float32


def plan_for_training(cfg, ctx, model, ref, engine_model, make_engine, max_len, autocast, make_optimizer):
    """train.py's plan: sized for the schedule's worst stage (longest responses, largest group); every rank
    takes the smallest pool, so all ranks schedule alike. Refuses a pool that cannot hold one sequence."""
    import distributed as D
    worst = max(cfg.stages, key=lambda s: (cfg.max_prompt_tokens + s.max_response_tokens) * s.group_size)
    plan = measure_plan(
        device=ctx.device, world_size=ctx.world_size, policy=model, reference=ref, engine_model=engine_model,
        make_engine=make_engine, autocast=autocast, make_optimizer=make_optimizer, token_budget=cfg.token_budget,
        longest_sequence=max_len - 1, max_model_len=max_len, max_num_seqs=cfg.engine_max_num_seqs,
        temperature=cfg.temperature, grad_clip=cfg.grad_clip, margin_bytes=int(cfg.memory_margin_gb * GB),
        prompts_per_step=cfg.prompts_per_step, group_size=worst.group_size, kv_request=cfg.engine_memory,
        kv_cap=None if ctx.device.type == "cuda" else CPU_KV_CAP)
    smallest = D.all_reduce(torch.tensor(plan.kv_bytes, device=ctx.device), ctx, op=torch.distributed.ReduceOp.MIN)
    plan.kv_bytes = int(smallest.item())
    if not cfg.engine_memory and plan.kv_bytes < max_len * plan.kv_bytes_per_token:
        raise SystemExit(plan.text() + f"\nthe KV pool ({fmt(plan.kv_bytes)}) cannot hold one {max_len}-token "
                         "sequence: lower token_budget or memory_margin_gb, use more GPUs, or set engine_memory")
    return plan


def expandable_segments():
    """PyTorch's allocator grows segments in place instead of adding new ones: the KV pool, FSDP's buffers
    and the activations fragment less. Set before CUDA's allocator starts; a user's own setting wins."""
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
