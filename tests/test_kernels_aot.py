"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 at the real model shape, on CPU, with
no GPU and no driver (kernels/aot.py): no compile error, shared memory within the target's limit, no
register spill. The compiler runs in a subprocess because tests/conftest.py turns the interpreter on,
and the interpreter replaces the compiler."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
triton = pytest.importorskip("triton")


def compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """The real shape (12/2 heads, head_dim 128, block 16, vocab 151,936, bf16) through the launch
    wrappers: 7 distinct variants per target (decode at batch 1-256 and two table widths compiles to
    one split and one merge kernel; the sampler with and without filtering), 14 compiles. Cost: ~16
    CPU-seconds (triton 3.9): 25 s wall on the 2-core dev machine at load 1, 63 s at load 12."""
    out = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(out)], cwd=ROOT, env=compiler_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    kernels = {"_kv_write_kernel", "_decode_split_kernel", "_decode_merge_kernel", "_prefill_kernel", "_sample_kernel",
               "_logprobs_kernel"}
    for target in ("sm_80", "sm_90"):
        mine = [r for r in rows if r["target"] == target]
        assert {r["kernel"] for r in mine} == kernels
        assert len(mine) == 7  # one variant per kernel, two for the sampler: nothing batch- or length-specific
        for r in mine:
            assert r["failures"] == [] and r["spill_stores"] == r["spill_loads"] == r["stack"] == 0
            assert 0 < r["regs"] <= 255 and r["shared"] <= 232_448
    decode = [r for r in rows if r["kernel"] == "_decode_split_kernel"]
    assert all(len(r["launches"]) == 10 for r in decode)  # batches 1, 2, 4, 64, 256 x 2 widths: one kernel


BAD_KERNELS = '''
import torch
import triton
import triton.language as tl


@triton.jit
def spills(x_ptr, o_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # a [64, 128] fp32 tile kept alive across a reduction, in one warp: 256 values per thread
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(o_ptr + offs, x * tl.sum(x, axis=0)[None, :])


@triton.jit
def transpose(x_ptr, o_ptr, N: tl.constexpr):
    # a [256, 256] fp32 tile transposed through shared memory: 256 KiB
    x = tl.load(x_ptr + tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(o_ptr + tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :], tl.trans(x))


@triton.jit
def dot(a_ptr, b_ptr, o_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    a = tl.load(a_ptr + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(b_ptr + tl.arange(0, K)[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(o_ptr + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], tl.dot(a, b))


def launches():
    x = torch.empty(64 * 128)
    yield "spills", lambda: spills[(1,)](x, x, ROWS=64, COLS=128, num_warps=1)
    yield "shared", lambda: transpose[(1,)](torch.empty(256 * 256), torch.empty(256 * 256), N=256, num_warps=8)
    yield "K=8", lambda: dot[(1,)](torch.empty(16 * 8, dtype=torch.bfloat16), torch.empty(8 * 16, dtype=torch.bfloat16),
                                   torch.empty(16 * 16), M=16, K=8, N=16)
'''


def test_aot_reports_spills_shared_memory_and_compile_errors(tmp_path):
    """The checks can fail: a kernel that spills, one that needs more shared memory than sm_90 has, and
    a 16-bit tl.dot with K=8 (fine in the interpreter, refused by the GPU compiler). Cost: ~12 CPU-s."""
    (tmp_path / "bad_kernels.py").write_text(BAD_KERNELS)
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import bad_kernels
        from kernels import aot
        rows = aot.run((90,), launches=bad_kernels.launches, progress=lambda *a, **k: None)
        print(json.dumps([dict(kernel=r["kernel"], launches=r["launches"], failures=r["failures"]) for r in rows]))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=compiler_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["launches"][0]: r["failures"] for r in json.loads(run.stdout.strip().splitlines()[-1])}
    assert len(rows["spills"]) == 1 and rows["spills"][0].startswith("spills:")
    assert rows["shared"] == ["shared memory 262,144 B > 232,448 B"], rows["shared"]
    assert len(rows["K=8"]) == 1 and rows["K=8"][0].startswith("compile error"), rows["K=8"]
