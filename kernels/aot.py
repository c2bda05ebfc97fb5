"""
Every Triton kernel compiled ahead of time for a GPU target, on a machine with no GPU and no driver:
registers, spills and shared memory per kernel variant, checked against the target's limits.

    python -m kernels.aot                      # sm_80 and sm_90, the real 1.5B shape: a table; exit 1 on a failure
    python -m kernels.aot --targets 90 --json aot.json

Run it without TRITON_INTERPRET (the interpreter replaces the compiler). tests/test_kernels_aot.py runs
it in CI.

The launches are the real ones, not a hand-written list of signatures: each launch wrapper
(write_kv_cache, decode_attention, ...) is called on CPU tensors at the real shape and the dtypes the
engine uses, while kernels._triton pretends to be a GPU with the target's SM count (so the wrappers pick
the GPU's tiles, warps and split counts), and the launch is caught before it reaches a driver. The
JIT's own binder turns the caught arguments into the signature, constexprs and specialisation a GPU
launch would compile (pointer alignment, ints divisible by 16 or equal to 1), so the set of variants is
exactly what a GPU would compile; duplicates are compiled once. triton.compile then builds each for
GPUTarget("cuda", 80|90, 32) with the ptxas bundled in the wheel, whose log gives registers and spills.

Failures: a compile error, shared memory over the target's per-block limit, any spill (spill stores or
loads, or a stack frame: Triton's n_spills is the local memory size). 255 registers is reported too: at
that count the next change spills.
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings

import torch

TARGETS = {  # compute capability -> the GPU it stands for: SMs (split counts) and shared memory per block
    80: dict(gpu="A100", sms=108, max_shared=166_912),
    90: dict(gpu="H100/H200", sms=132, max_shared=232_448),
}
REAL = dict(q_heads=12, kv_heads=2, head_dim=128, block_size=16, hidden=1536, vocab=151_936,
            vocab_limit=151_665)  # vocab_limit: the tokenizer's size, below the embedding's rows
DECODE_BATCHES = (1, 2, 4, 64, 256)  # 64, 64, 33, 3, 1 splits on 132 SMs (the widest table): the engine's range


def real_launches(s=REAL):
    """(what, call) pairs: every wrapper at the real shape, in the dtypes the engine passes (bf16 model,
    model.Paged's int32/int64 metadata). Buffers are torch.empty: the launches never run."""
    from types import SimpleNamespace as NS
    from kernels.decode_attention import decode_attention
    from kernels.kv_write import write_kv_cache
    from kernels.logprobs import token_logprobs_fused
    from kernels.prefill_attention import prefill_attention
    from kernels.sampling import sample
    bf16, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    Hq, Hkv, D, bs = s["q_heads"], s["kv_heads"], s["head_dim"], s["block_size"]
    kc = torch.empty(8, bs, Hkv, D, dtype=bf16)  # one layer's cache; its strides do not depend on the block count
    scale = D ** -0.5

    def paged(B, new, width):
        return NS(block_tables=torch.zeros(B, width, dtype=i32), context_lens=torch.ones(B, dtype=i32),
                  cu_seqlens_q=torch.arange(0, B * new + 1, new, dtype=i32), max_seqlen_q=new)

    def qkv(N):  # the model's projections, viewed as heads
        return torch.empty(N, Hq, D, dtype=bf16), torch.empty(N, Hkv, D, dtype=bf16)

    def rows(B):
        f, i = torch.ones(B), torch.zeros(B, dtype=i64)
        return dict(temperature=f, top_p=f, top_k=i, seed=i, prompt_idx=i, sample_idx=i, position=i)

    k = qkv(256)[1]
    yield "kv write N=256", lambda: write_kv_cache(k, k, kc, kc, torch.zeros(256, dtype=i64))
    for B in DECODE_BATCHES:
        for width in (64, 513):  # block-table widths: an eager step's, a graph's (max_model_len 8K + prompt)
            yield f"decode B={B} width={width}", lambda B=B, w=width: decode_attention(
                qkv(B)[0], kc, kc, paged(B, 1, w), torch.zeros(B, dtype=i64), scale)
    yield "prefill B=4 new=300", lambda: prefill_attention(qkv(1200)[0], kc, kc, paged(4, 300, 40),
                                                           torch.zeros(1200, dtype=i64), scale)
    for B in (1, 256):
        for filtered in (False, True):
            for limit in (None, s["vocab_limit"]):
                yield f"sample B={B} filtered={filtered} limit={limit}", lambda B=B, f=filtered, lim=limit: sample(
                    torch.empty(B, s["vocab"], dtype=bf16), **rows(B), vocab_limit=lim, filtered=f)
    weight = torch.empty(s["vocab"], s["hidden"], dtype=bf16)  # 467 MB of address space, never touched
    for N in (1000, 16384):
        yield f"logprobs N={N}", lambda N=N: token_logprobs_fused(
            torch.empty(N, s["hidden"], dtype=bf16), weight, torch.zeros(N, dtype=i64))


@contextlib.contextmanager
def caught_launches(sms):
    """Within: kernel[grid](...) records (kernel, args, kwargs) instead of launching, and the wrappers
    tile for a GPU with `sms` SMs."""
    from triton.runtime.jit import JITFunction
    from kernels import _triton
    from kernels.kv_write import _kv_write_kernel
    if not isinstance(_kv_write_kernel, JITFunction):
        raise RuntimeError("kernels.aot: the kernels were defined under TRITON_INTERPRET=1 - run without it "
                           "(the interpreter replaces the compiler)")
    launches, launch = [], JITFunction.run
    JITFunction.run = lambda fn, *args, grid, warmup, **kw: launches.append((fn, args, kw))
    _triton.AOT_SMS = sms
    try:
        yield launches
    finally:
        _triton.AOT_SMS = None
        JITFunction.run = launch


def specialise(fn, backend, args, kwargs):
    """What JITFunction.run would compile for these arguments: (cache key, ASTSource, options). Uses the
    JIT's own binder; these internals are the same from triton 3.6 to 3.9 (checked by hand)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    key = f"{fn.__name__}|{spec}|{sorted(opts.items())}"
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return key, ASTSource(fn, signature, constexprs, attrs), options


PTXAS = dict(regs=r"Used (\d+) registers", stack=r"(\d+) bytes stack frame", spill_stores=r"(\d+) bytes spill stores",
             spill_loads=r"(\d+) bytes spill loads")


def compile_one(src, options, target):
    """triton.compile for a named target; registers and spills from ptxas's own log."""
    import triton
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log: registers, stack, spills
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    log = out.getvalue()
    stats = {}
    for name, pattern in PTXAS.items():
        found = re.search(pattern, log)
        if found is None:
            raise RuntimeError(f"kernels.aot: no '{pattern}' in ptxas's log (taken from a cache?):\n{log}")
        stats[name] = int(found.group(1))
    return dict(stats, shared=int(compiled.metadata.shared), seconds=round(seconds, 2))


def run(targets=(80, 90), launches=real_launches, only=None, progress=print):
    """Compile every distinct variant of `launches` (default: the real shape's) for each target, or of
    the kernels whose name contains `only`. Returns result rows (dicts), `failures` empty when fine."""
    from triton.backends.compiler import GPUTarget
    results = []
    with tempfile.TemporaryDirectory() as cache, fresh_cache(cache):
        for cc in targets:
            target = GPUTarget("cuda", cc, 32)
            variants = list(variants_for(target, TARGETS[cc]["sms"], launches, only).values())
            for i, (fn, src, options, whats) in enumerate(variants):
                progress(f"[sm_{cc}] {i + 1}/{len(variants)} {fn.__name__} ...", end="", flush=True)
                row = compile_and_check(fn, src, options, target, TARGETS[cc]["max_shared"])
                row["launches"] = whats
                progress(f" {row.get('seconds', '-')} s {'; '.join(row['failures']) or 'ok'}")
                results.append(row)
    return results


@contextlib.contextmanager
def fresh_cache(path):
    """Triton's cache pointed at an empty folder: every variant really compiles (ptxas's log, timings)."""
    before = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = before


def variants_for(target, sms, launches, only=None):
    """{JIT cache key: [kernel, ASTSource, options, names of the launches that compile to it]}."""
    from triton.compiler import make_backend
    backend = make_backend(target)
    variants = {}
    for what, call in launches():
        with caught_launches(sms) as caught:
            call()
        for fn, args, kwargs in caught:
            if only is None or only in fn.__name__:
                key, src, options = specialise(fn, backend, args, kwargs)
                variants.setdefault(key, [fn, src, options, []])[3].append(what)
    return variants


def compile_and_check(fn, src, options, target, max_shared):
    import triton
    row = dict(kernel=fn.__name__, target=f"sm_{target.arch}", triton=triton.__version__, num_warps=options.num_warps,
               constexprs={fn.arg_names[k[0]]: v for k, v in src.constants.items() if isinstance(v, (int, bool))})
    try:
        row.update(compile_one(src, options, target))
    except Exception as e:  # noqa: BLE001 - a compile error is a result to report
        row["failures"] = [f"compile error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"]
        return row
    row["failures"] = []
    if row["shared"] > max_shared:
        row["failures"].append(f"shared memory {row['shared']:,} B > {max_shared:,} B")
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        row["failures"].append(f"spills: {row['spill_stores']} B stores, {row['spill_loads']} B loads, "
                               f"{row['stack']} B stack frame")
    row["note"] = "255 registers: the next change may spill" if row["regs"] >= 255 else ""
    return row


def table(results):
    lines = ["| kernel | target | warps | registers | spill stores B | stack B | shared B | compile s | launches "
             "| result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        result = "; ".join(r["failures"]) or "ok" + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['kernel']} | {r['target']} | {r['num_warps']} | {r.get('regs', '-')} | "
                     f"{r.get('spill_stores', '-')} | {r.get('stack', '-')} | {r.get('shared', '-')} | "
                     f"{r.get('seconds', '-')} | {len(r.get('launches', []))} | {result} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[80, 90], choices=sorted(TARGETS))
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--only", default=None, help="only the kernels whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.aot: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice; the default stays on
    t0 = time.perf_counter()
    results = run(args.targets, only=args.only, progress=lambda *a, **kw: print(*a, **kw, file=sys.stderr))
    total = time.perf_counter() - t0
    import triton
    print(f"\ntriton {triton.__version__}, torch {torch.__version__}, {len(results)} variants in {total:.0f} s")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, seconds=round(total, 1), results=results), f, indent=1)
    failed = [r for r in results if r["failures"]]
    if failed:
        print(f"\nFAILED: {len(failed)} variant(s): "
              + "; ".join(f"{r['kernel']} {r['target']}: {', '.join(r['failures'])}" for r in failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
