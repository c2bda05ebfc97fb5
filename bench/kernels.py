"""
Each Triton kernel (kernels/) against its plain-PyTorch twin, and flash-attn where installed, with the
bytes each must move and the share of measured device bandwidth it reaches. Last, the bandwidth limit
of a whole decode step at the real 1.5B shape (the targets of the kernels work item).

    python bench/kernels.py            # CPU: tiny shapes through Triton's interpreter (correctness
                                       #      and plumbing only: interpreter timings mean nothing)
    python bench/kernels.py --full     # GPU: the real shape (Hq 12, Hkv 2, head_dim 128, bf16, 28 layers),
                                       #      then the engine's self-check and the JIT's registers/spills
    python bench/kernels.py --smoke    # CPU: the smallest shapes, seconds (bench/gpu.sh --smoke)

Every kernel's output is checked against its twin before it is timed (max abs difference printed;
for sampling, the number of tokens that differ; for bf16 log-probs the twin's bf16 logits are the
less accurate side).
GPU times: CUDA events, median of --reps runs after warm-up.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from kernels.decode_attention import decode_attention, decode_attention_torch  # noqa: E402
from kernels.kv_write import write_kv_cache, write_kv_cache_torch  # noqa: E402
from kernels.prefill_attention import paged_attention_torch, prefill_attention  # noqa: E402
from kernels.logprobs import token_logprobs, token_logprobs_fused  # noqa: E402
from kernels.sampling import sample, sample_torch  # noqa: E402

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


def timeit(fn, device, reps):
    fn()  # warm-up (Triton compiles here)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(device):
    """Device copy, bytes read + written per second (best of 5)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.ones(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = min(timeit(lambda: b.copy_(a), device, 1) for _ in range(5))
    return 2 * n / best


def paged_setup(B, ctx_before, new, Hkv, D, dtype, device, block_size=16, seed=0):
    """B sequences of ctx_before cached tokens plus `new` new ones, in scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-(ctx_before + new) // block_size)
    nb = B * per_seq + 1
    kc = torch.randn(nb, block_size, Hkv, D, generator=g).to(device, dtype)
    vc = torch.randn(nb, block_size, Hkv, D, generator=g).to(device, dtype)
    tables = torch.randperm(nb - 1, generator=g)[:B * per_seq].view(B, per_seq).to(torch.int32)
    p = torch.arange(ctx_before, ctx_before + new)
    slots = (tables[:, p // block_size].long() * block_size + p % block_size).reshape(-1)
    meta = M.Paged(slots.to(device), tables.to(device),
                   torch.full((B,), ctx_before + new, dtype=torch.int32, device=device),
                   torch.arange(0, B * new + 1, new, dtype=torch.int32, device=device), new)
    return kc, vc, meta, p.repeat(B).to(device)


def row(name, shape, t_kernel, t_twin, nbytes, bw, err, t_flash=None, kernel_label="Triton"):
    gbs = nbytes / t_kernel / 1e9
    flash = "-" if t_flash is None else f"{t_flash * 1e6:,.1f}"
    print(f"| {name} | {shape} | {t_kernel * 1e6:,.1f} | {t_twin * 1e6:,.1f} | {flash} | {t_twin / t_kernel:.2f}x "
          f"| {nbytes / 1e6:,.2f} | {gbs:,.1f} | {100 * nbytes / t_kernel / bw:.0f}% | {err:.1e} |", flush=True)


def bench_decode(B, ctx, Hq, Hkv, D, dtype, device, bw, reps):
    kc, vc, meta, pos = paged_setup(B, ctx - 1, 1, Hkv, D, dtype, device)
    q = torch.randn(B, Hq, D, device=device).to(dtype)
    scale = D ** -0.5
    out = decode_attention(q, kc, vc, meta, pos, scale)
    err = (out.float() - decode_attention_torch(q, kc, vc, meta, pos, scale).float()).abs().max().item()
    t_k = timeit(lambda: decode_attention(q, kc, vc, meta, pos, scale), device, reps)
    t_t = timeit(lambda: paged_attention_torch(q, kc, vc, meta, pos, scale), device, reps)  # the registry default
    t_f = None
    if flash_attn_with_kvcache is not None and device.type == "cuda":
        t_f = timeit(lambda: flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=meta.context_lens,
                                                     block_table=meta.block_tables, softmax_scale=scale, causal=True),
                     device, reps)
    nbytes = 2 * B * ctx * Hkv * D * kc.element_size() + 2 * q.numel() * q.element_size()
    row("decode attention (1 layer)", f"B={B} ctx={ctx}", t_k, t_t, nbytes, bw, err, t_f)


def bench_prefill(B, before, new, Hq, Hkv, D, dtype, device, bw, reps):
    kc, vc, meta, pos = paged_setup(B, before, new, Hkv, D, dtype, device)
    q = torch.randn(B * new, Hq, D, device=device).to(dtype)
    scale = D ** -0.5
    out = prefill_attention(q, kc, vc, meta, pos, scale)
    err = (out.float() - paged_attention_torch(q.float(), kc.float(), vc.float(), meta, pos, scale)).abs().max().item()
    t_k = timeit(lambda: prefill_attention(q, kc, vc, meta, pos, scale), device, reps)
    t_t = timeit(lambda: paged_attention_torch(q, kc, vc, meta, pos, scale), device, reps)
    nbytes = 2 * B * (before + new) * Hkv * D * kc.element_size() + 2 * q.numel() * q.element_size()
    flops = 4 * B * Hq * D * new * (before + (new + 1) / 2)
    row("prefill attention (1 layer)", f"B={B} cached={before} new={new}", t_k, t_t, nbytes, bw, err)
    print(f"|  | (compute: {flops / t_k / 1e12:,.1f} TFLOP/s Triton, {flops / t_t / 1e12:,.1f} TFLOP/s twin) "
          "| | | | | | | | |")


def bench_kv_write(N, Hkv, D, dtype, device, bw, reps):
    kc, vc, meta, _ = paged_setup(N, 0, 1, Hkv, D, dtype, device)
    k = torch.randn(N, Hkv, D, device=device).to(dtype)
    v = torch.randn(N, Hkv, D, device=device).to(dtype)
    k2, v2 = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, meta.slot_mapping)
    write_kv_cache_torch(k, v, k2, v2, meta.slot_mapping)
    err = float(not (torch.equal(kc, k2) and torch.equal(vc, v2)))
    t_k = timeit(lambda: write_kv_cache(k, v, kc, vc, meta.slot_mapping), device, reps)
    t_t = timeit(lambda: write_kv_cache_torch(k, v, kc, vc, meta.slot_mapping), device, reps)
    nbytes = 4 * N * Hkv * D * kc.element_size()  # read new rows, write cache rows
    row("KV write (1 layer)", f"N={N}", t_k, t_t, nbytes, bw, err)


def bench_sampling(B, V, limit, device, bw, reps):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=g) * 3).to(device, torch.bfloat16)
    t = torch.full((B,), 0.6, device=device)
    i64 = lambda hi: torch.randint(0, hi, (B,), generator=g).to(device)
    rows = dict(top_p=torch.ones(B, device=device), top_k=torch.zeros(B, dtype=torch.int64, device=device),
                seed=i64(2**32), prompt_idx=i64(100), sample_idx=i64(16), position=i64(8192))
    got = sample(logits, t, **rows, vocab_limit=limit, filtered=False)
    want = sample_torch(logits, t, **rows, vocab_limit=limit, filtered=False)
    err = (got[0] != want[0]).float().sum().item()  # tokens that differ
    t_k = timeit(lambda: sample(logits, t, **rows, vocab_limit=limit, filtered=False), device, reps)
    t_t = timeit(lambda: sample_torch(logits, t, **rows, vocab_limit=limit, filtered=False), device, reps)
    row("sampling T=0.6 (tokens differing)", f"B={B} V={V}", t_k, t_t, B * V * 2, bw, err)


def bench_logprobs(N, H, V, dtype, device, bw, reps):
    """No-grad token log-probs + entropy (old-policy / reference passes): fused kernel vs grpo's chunks."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(device, dtype)
    w = (torch.randn(V, H, generator=g) * 0.02).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    with torch.no_grad():
        got = token_logprobs_fused(h, w, t, return_entropy=True)
        want = token_logprobs(h, w, t, return_entropy=True)
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
        t_k = timeit(lambda: token_logprobs_fused(h, w, t, return_entropy=True), device, reps)
        t_t = timeit(lambda: token_logprobs(h, w, t, return_entropy=True), device, reps)
    row("token log-probs + entropy (no grad)", f"N={N} H={H} V={V}", t_k, t_t, (N * H + V * H) * h.element_size(),
        bw, err)
    flops = 2 * N * H * V
    print(f"|  | (compute: {flops / t_k / 1e12:,.1f} TFLOP/s Triton, {flops / t_t / 1e12:,.1f} TFLOP/s twin) "
          "| | | | | | | | |")


def self_check_row(Hq, Hkv, D, dtype, device, vocab=151936):
    """The engine's start-up check (kernels.self_check) at this shape: pass, or the reason it fails."""
    import kernels
    t0 = time.perf_counter()
    try:
        kernels.self_check(device, dtype, Hq, Hkv, D, 16, vocab=vocab)
        result = "passed"
    except Exception as e:  # noqa: BLE001 - the report is the point
        result = f"FAILED: {e!r}"[:300]
    print(f"\nself-check (kernels.self_check, Hq {Hq} Hkv {Hkv} head_dim {D} {str(dtype).removeprefix('torch.')} "
          f"block 16 vocab {vocab:,}): {result} in {time.perf_counter() - t0:.1f} s")


def compiled_kernels(device):
    """Registers, spills and shared memory of every kernel variant the JIT compiled in this process
    (the GPU's own numbers; kernels/aot.py computes the same ahead of time without a GPU)."""
    import triton
    from triton.runtime.jit import JITFunction
    import kernels.decode_attention, kernels.kv_write, kernels.logprobs, kernels.prefill_attention, kernels.sampling
    mods = (kernels.kv_write, kernels.decode_attention, kernels.prefill_attention, kernels.sampling, kernels.logprobs)
    print(f"\nCompiled kernel variants (triton {triton.__version__}, as the JIT built them on this GPU)")
    print("| kernel | variant | registers | spills (Triton's n_spills) | shared B |\n|---|---|---|---|---|")
    for fn in (v for m in mods for v in vars(m).values() if isinstance(v, JITFunction)):
        compiled = [k for cache in fn.device_caches.values() for k in cache[0].values()]
        for i, k in enumerate(compiled):
            k._init_handles()  # registers and spills come from loading the binary
            print(f"| {fn.__name__} | {i} | {k.n_regs} | {k.n_spills} | {k.metadata.shared:,} |")


def decode_limits(bw, label):
    """Bandwidth limit of one decode step of the real model: all weights (bar the embedding) plus the
    KV cache of every sequence read once per step."""
    cfg = M.Config()
    c = cfg
    layer = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
             + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim  # q/k/v biases
             + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
             + 2 * c.hidden_size)
    weights = 2 * (c.num_hidden_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size)  # bf16
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
    print(f"\nDecode-step bandwidth limit at the 1.5B shape ({label} {bw / 1e9:,.0f} GB/s): "
          f"weights {weights / 1e9:.2f} GB per step, KV {kv_token / 1024:.0f} KiB per token of context")
    print("| batch | context | bytes per step | step time at the limit | limit tok/s | 60% target tok/s |")
    print("|---|---|---|---|---|---|")
    for B, ctx in ((1, 1024), (1, 8192), (64, 1024), (256, 1024), (256, 8192)):
        nbytes = weights + B * ctx * kv_token
        step = nbytes / bw
        print(f"| {B} | {ctx} | {nbytes / 1e9:.2f} GB | {step * 1e3:.2f} ms | {B / step:,.0f} | {0.6 * B / step:,.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the real shape (needs a GPU)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, the smallest shapes: plumbing only (gpu.sh --smoke)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if args.full and not gpu:
        sys.exit("--full needs a CUDA GPU (the interpreter would take hours at the real shape)")
    reps = args.reps or (50 if gpu else 1 if args.smoke else 2)
    dtype = torch.bfloat16 if gpu else torch.float32
    Hq, Hkv, D = (12, 2, 128) if args.full else (4, 2, 16) if args.smoke else (12, 2, 64)
    bw = measure_bandwidth(device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name(device) if gpu else "CPU, Triton interpreter (timings NOT performance)"
    print(f"\n{name}, commit {commit}, {time.strftime('%Y-%m-%d')}, {str(dtype).removeprefix('torch.')}, "
          f"Hq {Hq} Hkv {Hkv} head_dim {D}, block 16, copy bandwidth {bw / 1e9:,.1f} GB/s, "
          f"flash-attn {'installed' if flash_attn_with_kvcache else 'not installed'}")
    print("| kernel | shape | Triton us | twin us | flash-attn us | twin / Triton | MB moved | Triton GB/s "
          "| % of copy bw | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.full:
        for B, ctx in ((1, 1024), (1, 8192), (64, 1024), (256, 1024), (256, 8192)):
            bench_decode(B, ctx, Hq, Hkv, D, dtype, device, bw, reps)
        for B, before, new in ((1, 0, 4096), (8, 0, 1024), (8, 2048, 512)):
            bench_prefill(B, before, new, Hq, Hkv, D, dtype, device, bw, reps)
        for N in (256, 8192):
            bench_kv_write(N, Hkv, D, dtype, device, bw, reps)
        for B in (1, 64, 256):
            bench_sampling(B, 151936, 151665, device, bw, reps)
        bench_logprobs(8192, 1536, 151936, dtype, device, bw, max(3, reps // 10))
        self_check_row(Hq, Hkv, D, dtype, device)
        compiled_kernels(device)
    elif args.smoke:
        bench_decode(1, 8, Hq, Hkv, D, dtype, device, bw, reps)
        bench_prefill(1, 4, 5, Hq, Hkv, D, dtype, device, bw, reps)
        bench_kv_write(2, Hkv, D, dtype, device, bw, reps)
        bench_sampling(1, 1024, 1000, device, bw, reps)
        bench_logprobs(8, 16, 64, dtype, device, bw, 1)
        self_check_row(Hq, Hkv, D, dtype, device, vocab=256)
    else:
        bench_decode(2, 40, Hq, Hkv, D, dtype, device, bw, reps)
        bench_prefill(2, 16, 17, Hq, Hkv, D, dtype, device, bw, reps)
        bench_kv_write(8, Hkv, D, dtype, device, bw, reps)
        bench_sampling(2, 151936, 151665, device, bw, reps)
        bench_logprobs(48, 64, 2048, dtype, device, bw, 1)
        self_check_row(Hq, Hkv, D, dtype, device, vocab=2048)
    decode_limits(bw if gpu else 3.0e12, "measured copy bandwidth" if gpu else
                  "an assumed H100 copy bandwidth (PLATFORM.md: about 3.0 TB/s), NOT measured here:")


if __name__ == "__main__":
    main()
