"""
Forward and forward+backward throughput and peak memory of model.py, random weights.

    python bench/model.py                 # CPU: a reduced shape (same head layout, 4 layers, hidden 768)
    python bench/model.py --full          # the real 1.5B shape (use a GPU)
    python bench/model.py --attention     # also compare varlen attention implementations

Packed sequences (Varlen), the training layout. Forward+backward computes token log-probs through the
memory-flat routine when grpo.py is importable (never [tokens x vocab]); otherwise a mean of hidden states.
"""
import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps):
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def bench_model(cfg, device, dtype, seqlens, reps, checkpointing):
    with torch.device("meta"):
        model = M.Qwen2(cfg)
    model = model.to_empty(device=device)
    M.init_weights(model)
    model = model.to(dtype)
    model.gradient_checkpointing = checkpointing
    N = sum(seqlens)
    ids = torch.randint(0, cfg.vocab_size, (N,), device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in seqlens])
    meta = M.Varlen.from_seqlens(seqlens, device)
    try:
        import grpo  # noqa: F401
        have_logprobs = True
    except ImportError:
        have_logprobs = False

    def fwd():  # the reference / old log-prob pass: hidden states, then token log-probs
        with torch.no_grad():
            model(ids, pos, meta, targets=ids) if have_logprobs else model(ids, pos, meta)

    def fwd_bwd():
        if have_logprobs:
            out = model(ids, pos, meta, targets=ids).mean()
        else:
            out = model(ids, pos, meta).float().mean()
        out.backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_f = timeit(fwd, device, reps)
    mem_f = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fb = timeit(fwd_bwd, device, reps)
    mem_fb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gb()
    return dict(tokens=N, fwd_tok_s=N / t_f, fwd_bwd_tok_s=N / t_fb, mem_fwd_gb=mem_f, mem_fwd_bwd_gb=mem_fb,
                logprobs=have_logprobs, params=model.num_params())


def bench_attention(device, dtype, seqlens, heads=12, kv_heads=2, head_dim=128, reps=3):
    """Varlen (block-diagonal causal) attention three ways: SDPA per sequence, one dense masked SDPA,
    eager FlexAttention with a document mask."""
    N = sum(seqlens)
    q = torch.randn(N, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(N, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    meta = M.Varlen.from_seqlens(seqlens, device)
    scale = head_dim ** -0.5
    doc = torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.tensor(seqlens, device=device))

    def loop():
        return M.varlen_attention_torch(q, k, v, meta, scale)

    def dense():
        idx = torch.arange(N, device=device)
        mask = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, N, N, device=str(device))
        o = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           block_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    ref = loop()
    rows = []
    for name, fn in [("sdpa per sequence", loop), ("dense masked sdpa", dense), ("flex (eager)", flex)]:
        try:
            err = (fn().float() - ref.float()).abs().max().item()
            rows.append((name, timeit(fn, device, reps) * 1e3, err))
        except Exception as e:  # an implementation missing on this build is reported, not fatal
            rows.append((name, float("nan"), f"failed: {type(e).__name__}"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="real 1.5B shape (default on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--seqlens", default=None, help="comma-separated packed sequence lengths")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--attention", action="store_true", help="compare varlen attention implementations")
    args = ap.parse_args()
    device = torch.device(args.device)
    full = args.full or device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = M.Config() if full else M.Config(hidden_size=768, intermediate_size=4480, num_hidden_layers=4,
                                           num_attention_heads=6, num_key_value_heads=1, vocab_size=151936)
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else ([4096] * 4 if full else [512, 256, 256])
    r = bench_model(cfg, device, dtype, seqlens, args.reps, args.checkpointing)
    mem = lambda x: "-" if x is None else f"{x:.2f}"
    print(f"\nmodel: {r['params'] / 1e9:.3f}B params, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{device.type} {str(dtype).removeprefix('torch.')}, packed {len(seqlens)} seqs = {r['tokens']} tokens, "
          f"checkpointing={args.checkpointing}, log-probs via {'grpo.token_logprobs' if r['logprobs'] else 'hidden mean'}")
    print("| pass | tokens/s | peak memory GB |\n|---|---|---|")
    print(f"| forward | {r['fwd_tok_s']:,.0f} | {mem(r['mem_fwd_gb'])} |")
    print(f"| forward+backward | {r['fwd_bwd_tok_s']:,.0f} | {mem(r['mem_fwd_bwd_gb'])}"
          f"{' (process peak RSS)' if device.type == 'cpu' else ''} |")
    if args.attention:
        rows = bench_attention(device, dtype, seqlens)
        print(f"\nvarlen attention, 12 q / 2 kv heads, head dim 128, seqlens {seqlens}")
        print("| implementation | ms | max abs err vs per-sequence |\n|---|---|---|")
        for name, ms, err in rows:
            print(f"| {name} | {ms:.1f} | {err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
