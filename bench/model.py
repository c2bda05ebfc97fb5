"""
Forward and forward+backward throughput and peak memory of model.py, random weights.

    python bench/model.py                 # CPU: a reduced shape (same head layout, 4 layers, hidden 768)
    python bench/model.py --full          # the real 1.5B shape (use a GPU)
    python bench/model.py --attention     # also compare varlen attention implementations (memory too)

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
import attention as A  # noqa: E402
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


def sdpa_3d_per_sequence(q, k, v, meta, scale):
    """The packed path before the GPU-readiness work: SDPA on 3-D [heads, n, D] views, which every fused
    backend refuses, so it silently ran on the math backend ([heads, n, n] float32 scores)."""
    out, start = torch.empty_like(q), 0
    for n in meta.seqlens:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                           is_causal=True, scale=scale, enable_gqa=True)
        out[sl] = o.transpose(0, 1)
        start += n
    return out


def cpu_timeit(fn, device, reps):
    """GPU: wall seconds per call. CPU: CPU-seconds of all threads per call (steadier than wall time on a
    machine shared with other jobs)."""
    if device.type == "cuda":
        return timeit(fn, device, reps)
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def bench_attention(device, dtype, seqlens, heads=12, kv_heads=2, head_dim=128, reps=3):
    """Varlen (block-diagonal causal) attention several ways, forward and forward+backward, with the extra
    peak memory of a forward+backward (CUDA allocator; CPU resident memory, measured one after another in
    this process with glibc returning large blocks, so tens of MB are noise)."""
    from memory import Meter
    N = sum(seqlens)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, h, head_dim, generator=g).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    meta = M.Varlen.from_seqlens(seqlens, device)
    scale = head_dim ** -0.5
    doc = torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.tensor(seqlens, device=device))

    def dense(q, k, v, meta, scale):
        idx = torch.arange(N, device=device)
        mask = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    def flex(q, k, v, meta, scale):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, N, N, device=str(device))
        o = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           block_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    impls = [("SDPA per sequence, 4-D (fused backends only)", A.sdpa_per_sequence),
             ("SDPA per sequence, 3-D (before: math backend)", sdpa_3d_per_sequence),
             ("one dense block-diagonal masked SDPA", dense), ("FlexAttention, eager", flex)]
    if device.type == "cuda":
        impls += [(f"{name} (one call per micro-batch)", fn) for name, fn in A.VARLEN_IMPLS.items()
                  if name != "sdpa-per-sequence" and A.varlen_backend(q, k) == name]
    meter = Meter(device)
    meter.precise(True)
    ref = A.sdpa_per_sequence(q, k, v, meta, scale).detach().float()
    rows = []
    for name, fn in impls:
        try:
            def fwd():  # detached inputs: eager FlexAttention on CPU refuses inputs that require grad
                with torch.no_grad():
                    return fn(q.detach(), k.detach(), v.detach(), meta, scale)

            def fwd_bwd():
                fn(q, k, v, meta, scale).float().square().sum().backward()
                q.grad = k.grad = v.grad = None

            err = (fwd().float() - ref).abs().max().item()
            t_f = cpu_timeit(fwd, device, reps)
        except Exception as e:  # an implementation missing on this build is reported, not fatal
            rows.append((name, float("nan"), float("nan"), float("nan"), f"failed: {type(e).__name__}: {str(e)[:60]}"))
            continue
        try:
            t_fb = cpu_timeit(fwd_bwd, device, reps)
            meter.settle()
            meter.reset_peak()
            base = meter.current()
            fwd_bwd()
            rows.append((name, t_f * 1e3, t_fb * 1e3, (meter.peak() - base) / 2**20, err))
        except Exception as e:
            rows.append((name, t_f * 1e3, float("nan"), float("nan"), f"{err:.1e}; backward failed: {str(e)[:50]}"))
    meter.precise(False)
    return rows


def report_model(cfg, device, dtype, seqlens, args):
    r = bench_model(cfg, device, dtype, seqlens, args.reps, args.checkpointing)
    mem = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\nmodel: {r['params'] / 1e9:.3f}B params, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{device.type} {str(dtype).removeprefix('torch.')}, packed {len(seqlens)} seqs = {r['tokens']} tokens, "
          f"checkpointing={args.checkpointing}, log-probs via {'grpo.token_logprobs' if r['logprobs'] else 'hidden mean'}")
    print("| pass | tokens/s | peak memory GB |\n|---|---|---|")
    print(f"| forward | {r['fwd_tok_s']:,.0f} | {mem(r['mem_fwd_gb'])} |")
    print(f"| forward+backward | {r['fwd_bwd_tok_s']:,.0f} | {mem(r['mem_fwd_bwd_gb'])}"
          f"{' (process peak RSS)' if device.type == 'cpu' else ''} |")


def report_attention(device, dtype, seqlens, reps):
    rows = bench_attention(device, dtype, seqlens, reps=reps)
    print(f"\nvarlen attention, {device.type} {str(dtype).removeprefix('torch.')}, 12 q / 2 kv heads, head dim 128, "
          f"seqlens {seqlens}")
    unit = "ms" if device.type == "cuda" else "CPU-ms"
    print(f"| implementation | forward {unit} | forward+backward {unit} | fwd+bwd extra peak MB | max abs err vs 4-D |")
    print("|---|---|---|---|---|")
    for name, ms, ms_fb, mb, err in rows:
        print(f"| {name} | {ms:.1f} | {ms_fb:.1f} | {mb:,.0f} | {err if isinstance(err, str) else f'{err:.1e}'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="real 1.5B shape (default on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--seqlens", default=None, help="comma-separated packed sequence lengths")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--attention", action="store_true", help="compare varlen attention implementations")
    ap.add_argument("--attention-seqlens", default=None, help="their packed lengths (default: --seqlens)")
    ap.add_argument("--attention-only", action="store_true", help="skip the model benchmark")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    full = args.full or device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = M.Config() if full else M.Config(hidden_size=768, intermediate_size=4480, num_hidden_layers=4,
                                           num_attention_heads=6, num_key_value_heads=1, vocab_size=151936)
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else ([4096] * 4 if full else [512, 256, 256])
    if not args.attention_only:
        report_model(cfg, device, dtype, seqlens, args)
    if args.attention or args.attention_only:
        attn = [int(s) for s in args.attention_seqlens.split(",")] if args.attention_seqlens else seqlens
        report_attention(device, dtype, attn, args.reps)


if __name__ == "__main__":
    main()
