"""
Token log-probs of the lm_head: grpo.token_logprobs (tiled, logits never materialised) vs naive PyTorch
(log_softmax of the full float32 logits), and Liger's fused linear cross-entropy where installed (CUDA only).

For each implementation, in a fresh process: forward+backward time (median), no-grad forward time (the
reference / old-policy pass), and peak memory beyond the inputs and their gradients (CUDA: the allocator's
peak; CPU: peak RSS, with glibc told to return large blocks on free so RSS tracks live tensors). Memory is
peak - (inputs + gradients), as the issue states the target: for small N the weight gradient (V x H) is alive at
the naive version's peak and hides part of its logits.

    python bench/logprobs.py                  # CPU-sized default: N=512 tokens, H=1536, V=151936, bf16
    python bench/logprobs.py --full           # the real micro-batch: N=16384 (needs a GPU)
    python bench/logprobs.py --n 2048 --skip naive
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo import token_logprobs  # noqa: E402

IMPLS = ("ours", "naive", "liger")


def naive(h, w, y, temperature=1.0):
    logits = (h @ w.t()).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)


def liger(h, w, y):
    # Liger returns a reduced cross-entropy, not per-token log-probs: comparable cost, not a drop-in
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return -liger_fused_linear_cross_entropy(h, w, y, reduction="sum")[None]


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def worker(a):
    """One implementation in this process: prints a JSON line."""
    if a.impl == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            print(json.dumps({"impl": "liger", "skipped": "liger_kernel not installed"}))
            return
        if a.device != "cuda":
            print(json.dumps({"impl": "liger", "skipped": "Triton kernel, CUDA only"}))
            return
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    fn = {"ours": lambda h, w, y: token_logprobs(h, w, y, chunk_tokens=a.chunk_tokens, chunk_vocab=a.chunk_vocab),
          "naive": naive, "liger": liger}[a.impl]
    torch.manual_seed(0)
    h = (torch.randn(a.n, a.hidden, device=a.device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, device=a.device) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, a.vocab, (a.n,), device=a.device)
    g = torch.randn(a.n, device=a.device)

    def step():
        h.grad = w.grad = None
        (fn(h, w, y) * g[:1 if a.impl == "liger" else a.n]).sum().backward()

    step()  # warm-up: libraries, kernels, allocator
    times, cpu = [], []
    for _ in range(a.reps):
        _sync(a.device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(a.device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds of all threads: steadier than wall time on a busy box
    # peak of one more step, from a baseline holding just the inputs, minus the gradients it leaves behind
    grad_mb = (h.numel() + w.numel()) * h.element_size() / 2**20
    h.grad = w.grad = None
    if a.device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20 - grad_mb
    else:
        # glibc keeps freed blocks resident for reuse, so RSS would miss allocations that land on them: from here
        # on every block over 64 KiB is its own mapping, returned on free (set only now: it slows allocation)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        gc.collect()
        libc.malloc_trim(0)  # hand the free heap pages back, so reusing them shows up in RSS again
        base = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        step()
        extra = (_rss_kb("VmHWM") - base) / 1024 - grad_mb
    fwd = []
    with torch.no_grad():
        for _ in range(a.reps):
            _sync(a.device)
            t0 = time.perf_counter()
            out = fn(h, w, y)
            _sync(a.device)
            fwd.append(time.perf_counter() - t0)
    res = {"impl": a.impl, "fwd_bwd_s": statistics.median(times), "fwd_bwd_cpu_s": statistics.median(cpu),
           "fwd_nograd_s": statistics.median(fwd),
           "extra_mb": extra}
    if a.impl != "liger":  # agreement with float64 on a few tokens
        k = min(a.n, 64)
        ref = torch.log_softmax(h[:k].double() @ w.double().t(), -1).gather(1, y[:k, None]).squeeze(1)
        res["max_abs_err_vs_fp64"] = (out[:k].double() - ref).abs().max().item()
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="tokens in the micro-batch")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="N=16384: the 16K-token micro-batch of the issue")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--chunk-vocab", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--skip", nargs="*", default=[], choices=IMPLS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # internal: run one in this process
    a = p.parse_args()
    if a.full:
        a.n = 16384
    if a.impl:
        return worker(a)
    rows = []
    for impl in IMPLS:
        if impl in a.skip:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--n", str(a.n), "--hidden", str(a.hidden),
               "--vocab", str(a.vocab), "--dtype", a.dtype, "--device", a.device, "--reps", str(a.reps)]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        cmd += ["--chunk-tokens", str(a.chunk_tokens)] if a.chunk_tokens else []
        cmd += ["--chunk-vocab", str(a.chunk_vocab)] if a.chunk_vocab else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            err = (out.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"impl": impl, "skipped": f"failed: {err[:80]}"})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"token log-probs: N={a.n} H={a.hidden} V={a.vocab} {a.dtype} on {dev}, torch {torch.__version__}")
    print(f"logits alone would be {a.n * a.vocab * 4 / 2**30:.2f} GiB in float32")
    print(f"{'impl':<8}{'fwd+bwd s':>11}{'cpu s':>9}{'fwd s':>9}{'extra MiB':>11}{'vs naive':>10}{'err vs fp64':>13}")
    naive_t = next((r["fwd_bwd_s"] for r in rows if r["impl"] == "naive" and "skipped" not in r), None)
    for r in rows:
        if "skipped" in r:
            print(f"{r['impl']:<8}  skipped: {r['skipped']}")
            continue
        rel = f"{r['fwd_bwd_s'] / naive_t:.2f}x" if naive_t else "-"
        err = f"{r['max_abs_err_vs_fp64']:.1e}" if "max_abs_err_vs_fp64" in r else "-"
        print(f"{r['impl']:<8}{r['fwd_bwd_s']:>11.3f}{r['fwd_bwd_cpu_s']:>9.2f}{r['fwd_nograd_s']:>9.3f}{r['extra_mb']:>11.0f}{rel:>10}{err:>13}")


if __name__ == "__main__":
    main()
