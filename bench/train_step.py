"""
One rank's share of a DeepScaleR 8K-stage GRPO step, timed phase by phase, with random weights.

    python bench/train_step.py --full        # the real 1.5B shape on one GPU (the issue's benchmark)
    python bench/train_step.py               # CPU: a tiny shape, same code path (plumbing, not speed)

The step is the recipe's: 128 prompts x group 8 over 8 GPUs, so one rank rolls out 16 prompts x 8 = 128
responses. Response lengths are drawn from a realistic distribution (mean ~4.8K tokens, ~15% stopped by the
8K cap) and enforced by the benchmark (EOS ignored, each response stopped at its drawn length), so the
engine sees the same ragged continuous batching as a real step. Then train.py's own functions do the rest:
reference log-probs, old log-probs for the second mini-batch, and two clipped-surrogate updates over packed
micro-batches. Grading is not timed here (random tokens hold no answer; see bench/reward.py: ~0.1 s/step).

The projected 8-GPU step time is this rank's time: ranks run their shares in parallel; the all-gathers and
reduce-scatters of the update are inside the measured update only when run under torchrun.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import train as T  # noqa: E402
from engine import Engine  # noqa: E402


class LengthCappedEngine(Engine):
    """The engine with each response stopped at a length drawn for it (benchmarks only)."""
    target_lengths = {}

    def _append(self, seq, token, logprob):
        super()._append(seq, token, logprob)
        if seq.finish_reason is None and seq.num_generated >= self.target_lengths[(seq.prompt_index, seq.sample_index)]:
            self._finish(seq, "length")


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


def build_models(cfg_model, device, seed=0):
    with torch.device("meta"):
        policy = M.Qwen2(cfg_model)
    policy = M.init_weights(policy.to_empty(device=device), seed=seed)
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    return policy, frozen_copy(policy, cfg_model, device, low), frozen_copy(policy, cfg_model, device, low)


def frozen_copy(policy, cfg_model, device, dtype):
    with torch.device("meta"):
        m = M.Qwen2(cfg_model)
    m = m.to_empty(device=device).to(dtype)
    m.load_state_dict(policy.state_dict())
    return m.eval().requires_grad_(False)


def train_flops(params, tokens, checkpointing):
    """Matmul FLOPs of one forward (2 per weight per token); backward 2x; checkpointing recomputes a forward."""
    return 2 * params * tokens * (4 if checkpointing else 3)


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
    ap.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool (default: the engine's choice)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    ap.add_argument("--world", type=int, default=8, help="GPUs of the projected step")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
                        device=device.type, gradient_checkpointing=True)
    stage = cfg.stages[0]
    ctx = T.D.Dist(device=device)
    policy, ref, eng = build_models(cfg_model, device)
    policy.gradient_checkpointing = True
    opt = T.make_optimizer(policy, cfg)
    engine = LengthCappedEngine(eng, max_model_len=args.prompt_len + cap + 1, max_num_seqs=256,
                                memory_budget=int(args.kv_memory_gb * 2**30) if args.kv_memory_gb else None,
                                vocab_limit=cfg_model.vocab_size, ignore_eos=True)
    engine.target_lengths = {(i // args.group, i % args.group): n for i, n in enumerate(lengths)}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg_model.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]

    times = {}

    def phase(name, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times[name] = time.perf_counter() - t
        return out

    phase("weight sync", lambda: T.D.sync_weights(policy, eng))
    comps = phase("rollout", lambda: engine.generate(prompts, max_new_tokens=cap, temperature=0.6, n=args.group, seed=0))
    gen_tokens = sum(len(c.token_ids) for c in comps)
    samples = [T.Sample(prompts[c.prompt_index], list(c.token_ids), list(c.logprobs), c.finish_reason, "0")
               for c in comps]
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
    acc = T.Accumulator(device)
    phase("update (2 optimizer steps)", lambda: [T.train_mini_batch(policy, opt, p, cfg, stage, ctx, acc) for p in plans])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    train_tokens = sum(m.input_ids.numel() for p in plans for m in p)
    old_tokens = sum(m.input_ids.numel() for p in plans[1:] for m in p)
    params = policy.num_params()
    flops = {"reference log-probs": 2 * params * train_tokens, "old log-probs (mini-batch 2)": 2 * params * old_tokens,
             "update (2 optimizer steps)": train_flops(params, train_tokens, True)}
    tokens = {"rollout": gen_tokens, "reference log-probs": train_tokens, "old log-probs (mini-batch 2)": old_tokens,
              "update (2 optimizer steps)": train_tokens}
    total = sum(times.values())
    print(f"\n{device.type} {'1.5B shape' if full else 'tiny shape'}, {params / 1e6:.1f}M params: {args.prompts} prompts x "
          f"{args.group} = {n_resp} responses, mean length {sum(lengths) / len(lengths):.0f} "
          f"(cap {cap}, {sum(n >= cap for n in lengths) / n_resp:.0%} at cap), {gen_tokens} generated tokens, "
          f"{train_tokens} packed training tokens; engine: {engine.stats['preemptions']} preemptions, "
          f"max {engine.stats['max_running']} running")
    print("| phase | seconds | share | tokens/s | MFU |\n|---|---|---|---|---|")
    for name, t in times.items():
        tok = tokens.get(name)
        mfu = flops[name] / t / (args.peak_tflops * 1e12) if name in flops and device.type == "cuda" else None
        print(f"| {name} | {t:.2f} | {t / total:.0%} | {f'{tok / t:,.0f}' if tok else '-'} | "
              f"{f'{mfu:.0%}' if mfu is not None else '-'} |")
    print(f"| **step (one rank)** | **{total:.2f}** | 100% | | |")
    if peak is not None:
        print(f"peak GPU memory {peak:.1f} GB")
    print(f"projected {args.world}-GPU step time: {total:.0f} s (each rank runs its share in parallel; "
          f"collectives not included in a single-GPU run). DeepScaleR's stack: ~395 s.")


if __name__ == "__main__":
    main()
