"""
One rank's share of a DeepScaleR 8K-stage GRPO step, timed phase by phase, with random weights, beside the
start-up memory plan that sized its KV pool; and the packed attention's memory at growing lengths.

    python bench/train_step.py --full        # the real 1.5B shape on one GPU (the issue's benchmark)
    python bench/train_step.py               # CPU: a tiny shape, same code path (plumbing, not speed),
                                             # plus attention memory at 1K/2K/4K tokens (real head shape)

The step is the recipe's: 128 prompts x group 8 over 8 GPUs, so one rank rolls out 16 prompts x 8 = 128
responses. Response lengths are drawn from a realistic distribution (mean ~4.8K tokens, ~15% stopped by the
8K cap) and enforced by the benchmark (EOS ignored, each response stopped at its drawn length), so the
engine sees the same ragged continuous batching as a real step. Then train.py's own functions do the rest:
reference log-probs, old log-probs for the second mini-batch, and two clipped-surrogate updates over packed
micro-batches. Grading is not timed here (random tokens hold no answer; see bench/reward.py: ~0.1 s/step).
On a GPU the models take train.py's one-GPU path (FSDP2 on a one-rank group, bf16 compute) and the KV pool
is what memory.py's measured plan gives it (unless --kv-memory-gb).

The 8-GPU step time printed is a PROJECTION from one GPU: ranks run their shares in parallel; the
all-gathers and reduce-scatters of 8 ranks are not in a one-GPU run.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memory  # noqa: E402
import attention as A  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
from engine import Engine  # noqa: E402


def capped_rollout(engine, prompts, group, lengths, cap):
    """engine.generate() with each response stopped at the length drawn for it, through the engine's public
    step-level API: one request per prompt (its samples share the prompt's blocks), a sample aborted once it
    has its tokens (on CUDA the host reads tokens a step late: what it drew past its length is cut here).
    Returns Samples-to-be: (prompt index, token ids, log-probs), prompt-major."""
    from engine import SamplingParams
    engine.reset_stats()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=cap, temperature=0.6, n=group, seed=0,
                                                          prompt_index=i, ignore_eos=True))
    got = {(i, j): ([], []) for i in range(len(prompts)) for j in range(group)}
    while engine.has_unfinished():
        for out in engine.step():
            key = (int(out.request_id), out.sample_index)
            tokens, logprobs = got[key]
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
            if not out.finished and len(tokens) >= lengths[key[0] * group + key[1]]:
                engine.abort(out.request_id, out.sample_index)
    return [(i, got[i, j][0][:n], got[i, j][1][:n]) for (i, j), n in zip(got, lengths)]


def draw_lengths(n, cap, mean, cap_frac, seed):
    """~cap_frac of responses hit the cap; the rest follow a Gamma(2) scaled so the overall mean is `mean`."""
    g = torch.Generator().manual_seed(seed)
    rest_mean = (mean - cap_frac * cap) / (1 - cap_frac)
    hit = torch.rand(n, generator=g) < cap_frac
    gamma = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(2.0 / rest_mean)).sample((n,))
    lengths = torch.where(hit, torch.tensor(float(cap)), gamma.clamp(min(64, cap // 8), cap - 1))
    return [int(x) for x in lengths]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_models(cfg_model, cfg, ctx, seed=0):
    """Policy (float32 masters), reference and engine copy in train.build()'s dtypes and sharding."""
    device = ctx.device
    with torch.device("meta"):
        policy = M.Qwen2(cfg_model)
    policy = M.init_weights(policy.to_empty(device=device), seed=seed)
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    ref, eng = frozen_copy(policy, cfg_model, device, low), frozen_copy(policy, cfg_model, device, low)
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    if T.D.fsdp_path(cfg.fsdp, ctx):  # one GPU: FSDP2 on a one-rank group, as train.py does
        T.D.shard_model(policy, ctx, compute_dtype=None if low == torch.float32 else low)
        policy.reduces_own_grads = True
        T.D.shard_model(ref, ctx)
    return policy, ref, eng


def frozen_copy(policy, cfg_model, device, dtype):
    with torch.device("meta"):
        m = M.Qwen2(cfg_model)
    m = m.to_empty(device=device).to(dtype)
    m.load_state_dict(policy.state_dict())
    return m.eval().requires_grad_(False)


def train_flops(params, tokens, checkpointing):
    """Matmul FLOPs of one forward (2 per weight per token); backward 2x; checkpointing recomputes a forward."""
    return 2 * params * tokens * (4 if checkpointing else 3)


# -----------------------------------------------------------------------------
# Packed attention memory: forward + backward through the model's own forward, one sequence of n tokens,
# the real head shape (12 q / 2 kv heads, head_dim 128), bf16; one layer, small MLP and vocab. The
# attention's share = the step's peak with the real attention minus with a stand-in that returns q.

def sdpa_3d_per_sequence(q, k, v, meta, scale):
    """The packed attention before this benchmark's issue: SDPA on 3-D [heads, n, D] views, which every
    fused backend refuses, so it ran on the math backend ([heads, n, n] float32 scores). Comparison only."""
    out, start = torch.empty_like(q), 0
    for n in meta.seqlens:
        sl = slice(start, start + n)
        o = torch.nn.functional.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                             v[sl].transpose(0, 1), is_causal=True, scale=scale,
                                                             enable_gqa=True)
        out[sl] = o.transpose(0, 1)
        start += n
    return out


def attention_memory_worker(n, device, old=False):
    cfg = M.Config(vocab_size=256, hidden_size=1536, intermediate_size=256, num_hidden_layers=1,
                   num_attention_heads=12, num_key_value_heads=2, head_dim=128, torch_dtype="bfloat16")
    m = M.init_weights(M.Qwen2(cfg)).to(device, torch.bfloat16)
    ids, pos = torch.randint(0, 256, (n,), device=device), torch.arange(n, device=device)
    meter = memory.Meter(device)
    real = M.ATTENTION["varlen"]

    def step(attention, k=n):
        M.ATTENTION["varlen"] = attention
        m(ids[:k], pos[:k], M.Varlen.from_seqlens([k], device), targets=ids[:k]).sum().backward()
        m.zero_grad(set_to_none=True)

    def peak(attention):
        meter.settle()
        meter.reset_peak()
        base = meter.current()
        step(attention)
        return meter.peak() - base

    step(real, 256)  # warm-up: libraries and kernels initialised outside the measurement
    meter.precise(True)
    try:
        stand_in = peak(lambda q, k, v, meta, scale: q * 1.0)
        full = peak(real)
        old_3d = peak(sdpa_3d_per_sequence) if old else None
    finally:  # in-process on CUDA: the step that follows must run the real attention
        M.ATTENTION["varlen"] = real
        meter.precise(False)
    q = torch.empty(1, 12, 128, device=device, dtype=torch.bfloat16)
    return {"tokens": n, "step_extra": full, "attention": full - stand_in, "backend": A.varlen_backend(q, q[:, :2]),
            "quadratic": 12 * n * n * 4, "old_3d_attention": None if old_3d is None else old_3d - stand_in}


def attention_memory(ns, device, old=False):
    """One fresh process per length on CPU (resident memory is per process); in-process on CUDA."""
    rows = []
    for n in ns:
        if device.type == "cuda":
            rows.append(attention_memory_worker(n, device, old))
            continue
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--attention-worker", str(n)]
                           + (["--compare-3d"] if old else []), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print(f"\npacked attention memory, forward+backward through the model ({device.type}, bf16, 12 q / 2 kv heads, "
          f"head_dim 128, one layer, one sequence; backend: {rows[0]['backend']})")
    print("| tokens | step extra peak MB | attention's share MB | [12, n, n] float32 scores MB |"
          + (" old 3-D SDPA (math) share MB |" if old else ""))
    print("|---|---|---|---|" + ("---|" if old else ""))
    for r in rows:
        print(f"| {r['tokens']:,} | {mb(r['step_extra'])} | {mb(r['attention'])} | {mb(r['quadratic'])} |"
              + (f" {mb(r['old_3d_attention'])} |" if old else ""))
    return rows


# -----------------------------------------------------------------------------
# The step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="real 1.5B shape and the 8K stage (GPU)")
    ap.add_argument("--prompts", type=int, default=16, help="this rank's prompts (128 / 8 GPUs)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--max-response", type=int, default=None, help="8192 with --full, 48 on CPU")
    ap.add_argument("--mean", type=float, default=None, help="mean response length (4800 with --full)")
    ap.add_argument("--cap-frac", type=float, default=0.15)
    ap.add_argument("--token-budget", type=int, default=32768)
    ap.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool (default: the measured plan's)")
    ap.add_argument("--margin-gb", type=float, default=T.TrainConfig.memory_margin_gb, help="the plan's margin")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--world", type=int, default=8, help="GPUs of the projected step")
    ap.add_argument("--attention-lengths", default=None, help="comma list; default 1024,2048,4096 (CPU), "
                    "8192,16384,32768 (CUDA); 0 to skip")
    ap.add_argument("--compare-3d", action="store_true", help="attention memory of the old 3-D SDPA too (GBs)")
    ap.add_argument("--attention-only", action="store_true", help="only the attention memory table")
    ap.add_argument("--attention-worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results (plan, phases, attention) to this file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.attention_worker:
        print(json.dumps(attention_memory_worker(args.attention_worker, device, args.compare_3d)))
        return
    lengths_arg = args.attention_lengths or ("8192,16384,32768" if device.type == "cuda" else "1024,2048,4096")
    if args.attention_only:
        attention_memory([int(x) for x in lengths_arg.split(",")], device, args.compare_3d)
        return
    memory.expandable_segments()
    # the attention table first, on an empty device (the 3-D comparison alone needs 12 n^2 float32 scores)
    attn = attention_memory([int(x) for x in lengths_arg.split(",")], device, args.compare_3d) if lengths_arg != "0" else []
    full = args.full
    cfg_model = M.Config() if full else M.Config(vocab_size=512, hidden_size=128, intermediate_size=352,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=32, torch_dtype="float32")
    cap = args.max_response or (8192 if full else 48)
    mean = args.mean or (4800 if full else 30)
    n_resp = args.prompts * args.group
    lengths = draw_lengths(n_resp, cap, mean, args.cap_frac, seed=0)

    cfg = T.TrainConfig(prompts_per_step=args.prompts, mini_batches=2, token_budget=args.token_budget,
                        stages=[T.Stage(steps=1, max_response_tokens=cap, group_size=args.group)],
                        device=device.type, gradient_checkpointing=True, max_prompt_tokens=args.prompt_len,
                        memory_margin_gb=args.margin_gb,
                        engine_memory=int(args.kv_memory_gb * 2**30) if args.kv_memory_gb else None)
    stage = cfg.stages[0]
    ctx = T.D.Dist(device=device)
    policy, ref, eng = build_models(cfg_model, cfg, ctx)
    opt = T.make_optimizer(policy, cfg)
    max_len = args.prompt_len + cap
    make_engine = functools.partial(Engine, eng, max_model_len=max_len, max_num_seqs=256,
                                    vocab_limit=cfg_model.vocab_size)
    t0 = time.perf_counter()
    plan = memory.plan_for_training(cfg, ctx, policy, ref, eng, make_engine, max_len,
                                    functools.partial(T.autocast, cfg, ctx), functools.partial(T.make_optimizer, cfg=cfg))
    engine = make_engine(memory_budget=plan.kv_bytes, ignore_eos=True)
    plan.engine_built(engine)
    t_plan = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg_model.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times = {}

    def phase(name, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times[name] = time.perf_counter() - t
        return out

    phase("weight sync", lambda: T.D.sync_weights(policy, eng))
    comps = phase("rollout", lambda: capped_rollout(engine, prompts, args.group, lengths, cap))
    gen_tokens = sum(len(tokens) for _, tokens, _ in comps)
    samples = [T.Sample(prompts[i], tokens, logprobs, "length", "0") for i, tokens, logprobs in comps]
    rewards = torch.randint(0, 2, (len(samples),), generator=g).float().tolist()  # random 0/1 rewards
    T.set_advantages(samples, rewards, cfg, stage, step=0)
    plans = [T.pack(mb, cfg.token_budget, False, device) for mb in T.split_mini_batches(samples, cfg, stage)]
    for m in (m for p in plans for m in p):
        T.fill_advantages(m)

    def ref_pass():
        for m in (m for p in plans for m in p):
            m.ref_logp = T.logprobs(ref, m, cfg, ctx)

    def old_pass():
        for m in (m for p in plans[1:] for m in p):
            m.old_logp = T.logprobs(policy, m, cfg, ctx)

    phase("reference log-probs", ref_pass)
    phase("old log-probs (mini-batch 2)", old_pass)
    acc = T.D.Accumulator(device)
    phase("update (2 optimizer steps)", lambda: [T.train_mini_batch(policy, opt, p, cfg, stage, ctx, acc) for p in plans])
    if device.type == "cuda":
        plan.observe(device)

    train_tokens = sum(m.input_ids.numel() for p in plans for m in p)
    old_tokens = sum(m.input_ids.numel() for p in plans[1:] for m in p)
    params = policy.num_params()
    flops = {"reference log-probs": 2 * params * train_tokens, "old log-probs (mini-batch 2)": 2 * params * old_tokens,
             "update (2 optimizer steps)": train_flops(params, train_tokens, True)}
    tokens = {"rollout": gen_tokens, "reference log-probs": train_tokens, "old log-probs (mini-batch 2)": old_tokens,
              "update (2 optimizer steps)": train_tokens}
    total = sum(times.values())
    print()
    print(plan.text())
    print(f"(plan measured in {t_plan:.1f} s, before the step; its pool: {engine.num_blocks * engine.block_size:,} tokens)")
    print(f"\n{device.type} {'1.5B shape' if full else 'tiny shape'}, {params / 1e6:.1f}M params: {args.prompts} prompts x "
          f"{args.group} = {n_resp} responses, mean length {sum(lengths) / len(lengths):.0f} "
          f"(cap {cap}, {sum(n >= cap for n in lengths) / n_resp:.0%} at cap), {gen_tokens} generated tokens, "
          f"{train_tokens} packed training tokens; engine: {engine.stats['preemptions']} preemptions, "
          f"max {engine.stats['max_running']} running")
    print("| phase | seconds | share | tokens/s | MFU |\n|---|---|---|---|---|")
    rows = []
    for name, t in times.items():
        tok = tokens.get(name)
        mfu = flops[name] / t / (args.peak_tflops * 1e12) if name in flops and device.type == "cuda" else None
        rows.append({"phase": name, "seconds": t, "tokens": tok, "mfu": mfu})
        print(f"| {name} | {t:.2f} | {t / total:.0%} | {f'{tok / t:,.0f}' if tok else '-'} | "
              f"{f'{mfu:.0%}' if mfu is not None else '-'} |")
    print(f"| **step (one rank)** | **{total:.2f}** | 100% | | |")
    print(f"PROJECTION, not a measurement: {args.world}-GPU step ~{total:.0f} s (each rank runs its share in parallel; "
          f"the collectives of {args.world} ranks are not in a one-GPU run). Targets: <= 150 s, goal <= 90 s; "
          "DeepScaleR's stack: ~395 s.")
    if args.json:
        with open(plan.save(os.path.dirname(os.path.abspath(args.json)))) as f:
            saved = json.load(f)
        with open(args.json, "w") as f:
            json.dump({"plan": saved, "phases": rows, "step_seconds": total, "attention_memory": attn}, f, indent=1)
    T.D.teardown()

if __name__ == "__main__":
    main()
