"""
Rollout throughput of the engine (sample.py / engine.py), random weights, EOS ignored, beside
transformers' generate on the same device and beside the memory-bandwidth limit.

    python bench/rollout.py                      # CPU, a tiny shape, a reduced grid
    python bench/rollout.py --full               # the real 1.5B shape (GPU): batch 1/64/256 x context 1K/8K
    python bench/rollout.py --batches 1,64 --contexts 1024 --gen 64 --no-hf
    python bench/rollout.py --host               # the engine's own host time per decode step (stand-in model)

Each cell: B prompts of `context` random tokens, one sample each, `gen` new tokens.
  decode tok/s  engine: B * (gen - 1) / time in decode steps (engine.stats; the first token comes from prefill)
                transformers: B * (gen - 1) / (time of its last step's logits - time of its first)
  e2e tok/s     = B * gen / time(gen)                      (prefill included)
  limit tok/s   = B / ((weight bytes + KV bytes read per step) / measured bandwidth), KV at the mean
                  context of the decode (context + gen / 2); the ceiling a decode step cannot beat.
transformers: the same weights in Qwen2ForCausalLM, greedy, min_new_tokens = max_new_tokens = gen.

--host times only the engine's bookkeeping: a stand-in model (NullModel) that obeys model.py's forward
contract and returns zeros (64-entry vocabulary), the real sampler, one thread. Each cell: B prompts of
about `context` tokens (staggered by up to 15 so rows cross block boundaries on different steps), `gen`
new tokens; host ms per decode step = engine.stats decode_time / decode_steps, the median of --runs calls;
CPU ms per decode step: the same from the thread's CPU time (time.thread_time; steadier under load);
aten ops, Python function calls and torch.tensor() constructions (host lists turned into tensors) per
decode step: load-independent counts, from two calls of different lengths (the difference / 16 steps).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from engine import Engine  # noqa: E402

TINY = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=65536, torch_dtype="float32",
            bos_token_id=0, eos_token_id=1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device, dtype):
    """Device copy bandwidth, bytes read + written per second (best of 5)."""
    n = (1 << 30 if device.type == "cuda" else 1 << 27) // dtype.itemsize
    a = torch.empty(n, dtype=dtype, device=device).fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * dtype.itemsize / best


def weight_bytes_per_step(model):
    """Every weight is read once per decode step except the embedding (B rows only, unless tied)."""
    total = 0
    for name, p in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_engine(engine, prompts, gen, device):
    kw = dict(temperature=1.0, top_p=1.0, seed=0)
    engine.generate(prompts[:1], max_new_tokens=2, **kw)  # warm-up
    tg = timed(lambda: engine.generate(prompts, max_new_tokens=gen, **kw), device)
    st = engine.stats
    assert st["tokens_generated"] == len(prompts) * gen
    return len(prompts) * (gen - 1) / st["decode_time"], len(prompts) * gen / tg, st["preemptions"]


def hf_twin(model, device, dtype):
    import transformers
    hf_cfg = transformers.Qwen2Config(**model.config.to_hf())
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(hf_cfg).to(dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto transformers: {missing[:3]} {unexpected[:3]}")
    return hf.eval()


def bench_hf(hf, prompts, gen, device):
    """Decode time from timestamps taken at each step's logits (the first right after prefill)."""
    import transformers
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    class Clock(transformers.LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    def run(n):
        clock = Clock()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, logits_processor=transformers.LogitsProcessorList([clock]))
        return clock.stamps
    run(2)  # warm-up
    t0 = time.perf_counter()
    stamps = run(gen)
    sync(device)
    tg = time.perf_counter() - t0
    assert len(stamps) == gen
    return len(prompts) * (gen - 1) / (stamps[-1] - stamps[0]), len(prompts) * gen / tg


def stress(model, device, args):
    """A GRPO-shaped call: P prompts x n samples with EOS live, a pool too small for all of them at once:
    continuous batching and preemption as normal operation. Prints the engine's stats."""
    P, n, gen = args.stress
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 128, (P,), generator=g).tolist()
    prompts = [torch.randint(2, model.config.vocab_size, (k,), generator=g).tolist() for k in lens]
    blocks = max(-(-(max(lens) + gen) // 16) + 1, args.stress_blocks)
    engine = Engine(model, num_blocks=blocks, max_num_seqs=256, max_model_len=max(lens) + gen,
                    eos_token_ids=list(range(2, 2 + args.stress_eos)))
    comps = engine.generate(prompts, max_new_tokens=gen, temperature=1.0, n=n, seed=0)
    lengths = [len(c.token_ids) for c in comps]
    st = engine.stats
    print(f"\nstress: {P} prompts x {n} = {len(comps)} responses, {blocks} blocks x 16 in the pool, "
          f"lengths {min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}), "
          f"{sum(c.finish_reason == 'stop' for c in comps)} stopped on EOS")
    print("| " + " | ".join(st) + " |\n|" + "---|" * len(st))
    print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in st.values()) + " |")


class NullModel(torch.nn.Module):
    """model.py's forward contract with the device work removed: hidden states and logits are zeros. What
    is left of a decode step is the engine's own host work (and the sampler over a 64-entry vocabulary)."""

    def __init__(self, vocab=64, hidden=8):
        super().__init__()
        self.config = M.Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                               num_attention_heads=1, num_key_value_heads=1, head_dim=hidden,
                               max_position_embeddings=1 << 20, torch_dtype="float32", bos_token_id=0, eos_token_id=1)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, hidden)

    def forward(self, input_ids, positions=None, meta=None, kv_cache=None):
        return torch.zeros(input_ids.shape[0], self.config.hidden_size)

    def logits(self, hidden):
        return torch.zeros(hidden.shape[0], self.config.vocab_size)


def count_ops(fn):
    """aten operators dispatched while fn() runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def count_calls(fn):
    """Python function calls (and torch.tensor constructions from host data) while fn() runs."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof)
    tensors = sum(v[1] for f, v in stats.stats.items() if f[2] == "<built-in method torch.tensor>")
    return stats.total_calls, tensors


def host_overhead(args):
    """The engine's host time per decode step with a stand-in model; prints a table."""
    torch.set_num_threads(1)
    batches = [int(x) for x in (args.batches or "1,64,256").split(",")]
    contexts = [int(x) for x in (args.contexts or "1024,8192").split(",")]
    gen = args.gen or 64
    model = NullModel()
    commit = os.environ.get("NANOSCALER_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nhost overhead: stand-in model (zeros, vocab 64), CPU 1 thread, commit {commit}, "
          f"{time.strftime('%Y-%m-%d')}, gen {gen}, median of {args.runs} runs, load {os.getloadavg()[0]:.2f}")
    print("| batch | context | host ms per decode step | CPU ms per decode step | runs (ms) | aten ops per step "
          "| Python calls per step | torch.tensor() per step |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for ctx in contexts:
        for B in batches:
            lens = [max(1, ctx - i % 16) for i in range(B)]
            prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in lens]
            # room for every row at once beyond the admission headroom (a block per running row + 1%)
            blocks = B * (-(-(ctx + gen) // 16) + 1)
            engine = Engine(model, num_blocks=blocks + blocks // 50 + 16, max_num_seqs=B,
                            max_model_len=ctx + gen + 16, ignore_eos=True)
            kw = dict(temperature=1.0, top_p=1.0, seed=0)
            cpu, decode_step = [0.0], engine._decode_step

            def timed_decode_step():  # this thread's CPU time: far less disturbed by a loaded machine than wall time
                t = time.thread_time()
                decode_step()
                cpu[0] += time.thread_time() - t
            engine._decode_step = timed_decode_step
            runs, cpu_runs = [], []
            for _ in range(args.runs):
                cpu[0] = 0.0
                engine.generate(prompts, max_new_tokens=gen, **kw)
                st = engine.stats
                assert st["max_running"] == B and st["decode_steps"] == gen - 1, st  # all B rows in every step
                runs.append(1e3 * st["decode_time"] / st["decode_steps"])
                cpu_runs.append(1e3 * cpu[0] / st["decode_steps"])
            engine._decode_step = decode_step
            short, long_ = (count_ops(lambda n=n: engine.generate(prompts, max_new_tokens=n, **kw)) for n in (9, 25))
            ops = (long_ - short) / 16
            short, long_ = (count_calls(lambda n=n: engine.generate(prompts, max_new_tokens=n, **kw)) for n in (9, 25))
            calls, tensors = ((b - a) / 16 for a, b in zip(short, long_))
            med, cpu_med = sorted(runs)[len(runs) // 2], sorted(cpu_runs)[len(runs) // 2]
            print(f"| {B} | {ctx} | {med:.2f} | {cpu_med:.2f} | {', '.join(f'{r:.2f}' for r in runs)} | {ops:.0f} "
                  f"| {calls:.0f} | {tensors:.0f} |", flush=True)
            del engine
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def fmt(x):
    return x if isinstance(x, str) else f"{x:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="real 1.5B shape (default on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--batches", default=None, help="comma-separated; default 1,64,256")
    ap.add_argument("--contexts", default=None, help="comma-separated prompt lengths; default 1024,8192 (GPU), 1024 (CPU)")
    ap.add_argument("--gen", type=int, default=None, help="new tokens per sample (default 128 GPU, 16 CPU)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--stress", type=int, nargs=3, metavar=("PROMPTS", "N", "GEN"), default=None,
                    help="instead of the grid: one GRPO-shaped call with EOS live and a small pool")
    ap.add_argument("--stress-blocks", type=int, default=512)
    ap.add_argument("--stress-eos", type=int, default=4, help="ids 2..2+k-1 act as EOS (random weights)")
    ap.add_argument("--host", action="store_true", help="instead of the grid: the engine's host ms per decode step")
    ap.add_argument("--runs", type=int, default=5, help="--host: calls per cell (the median is reported)")
    args = ap.parse_args()
    if args.host:
        return host_overhead(args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    full = args.full or gpu
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    cfg = M.Config() if full else M.Config(**TINY)
    batches = [int(x) for x in (args.batches or "1,64,256").split(",")]
    contexts = [int(x) for x in (args.contexts or ("1024,8192" if gpu else "1024")).split(",")]
    gen = args.gen or (128 if gpu else 16)

    with torch.device("meta"):
        model = M.Qwen2(cfg)
    model = M.init_weights(model.to_empty(device=device), std=0.02).to(dtype)
    if args.stress:
        return stress(model, device, args)
    bw = measure_bandwidth(device, dtype)
    wbytes = weight_bytes_per_step(model)
    max_len = max(contexts) + gen
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize  # K and V
    hf = None
    if not args.no_hf:
        try:
            hf = hf_twin(model, device, dtype)
        except Exception as e:  # transformers missing or incompatible: the engine still runs
            print(f"transformers unavailable: {e}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, commit {commit}, {time.strftime('%Y-%m-%d')}, {model.num_params() / 1e6:.1f}M params "
          f"({'1.5B shape' if full else 'tiny shape'}), {str(dtype).removeprefix('torch.')}, gen {gen} tokens, "
          f"KV {kv_token / 1024:.1f} KiB/token, bandwidth {bw / 1e9:.1f} GB/s")
    print("| batch | context | engine decode tok/s | engine e2e tok/s | HF decode tok/s | HF e2e tok/s "
          "| bandwidth limit tok/s | engine % of limit | preemptions |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for ctx in contexts:
        for B in batches:
            prompts = torch.randint(0, cfg.vocab_size, (B, ctx), generator=g).tolist()
            limit = B / ((wbytes + B * (ctx + gen / 2) * kv_token) / bw)
            try:  # a pool sized for this cell, freed before transformers runs (both need the memory)
                blocks = B * (-(-(ctx + gen) // 16) + 1)  # + the admission headroom: all B rows run at once
                engine = Engine(model, num_blocks=blocks + blocks // 50 + 16, max_num_seqs=B,
                                max_model_len=max_len, ignore_eos=True)
                dec, e2e, pre = bench_engine(engine, prompts, gen, device)
            except torch.OutOfMemoryError:
                dec = e2e = pre = "OOM"
            engine = None
            if gpu:
                torch.cuda.empty_cache()
            hd = he = "-"
            if hf is not None:
                try:
                    hd, he = bench_hf(hf, prompts, gen, device)
                except torch.OutOfMemoryError:
                    hd = he = "OOM"
                if gpu:
                    torch.cuda.empty_cache()
            pct = "-" if isinstance(dec, str) else f"{100 * dec / limit:.0f}%"
            print(f"| {B} | {ctx} | {fmt(dec)} | {fmt(e2e)} | {fmt(hd)} | {fmt(he)} | {fmt(limit)} | {pct} | {pre} |",
                  flush=True)


if __name__ == "__main__":
    main()
