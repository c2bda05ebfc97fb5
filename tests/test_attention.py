"""Packed (varlen) attention: exact against float64, never the math backend (no [heads, n, n] matrix),
linear memory through the model's own forward (measured in a fresh process), the torch varlen adapter for
the torch releases it must run on, and on CUDA the training forward on the fused SDPA backends only."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention as A

import model as M
from fixtures import random_model, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")


def reference(q, k, v, seqlens, scale):
    """float64, sequence by sequence, KV heads repeated, an explicit causal mask."""
    out, start = [], 0
    group = q.shape[1] // k.shape[1]
    for n in seqlens:
        qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        s = qs @ ks.transpose(1, 2) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out.append((s.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def packed(seqlens, hq, hkv, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(seqlens)
    return [torch.randn(n, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_attention_matches_float64(dtype, tol):
    seqlens = [7, 1, 30, 0, 12]  # a one-token and an empty sequence too
    q, k, v = packed(seqlens, 6, 2, 16, dtype)
    meta = M.Varlen.from_seqlens(seqlens)
    assert A.varlen_backend(q, k) == "sdpa-per-sequence"  # CPU
    out = A.varlen_attention(q, k, v, meta, 0.25)
    want = reference(q, k, v, seqlens, 0.25)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    exp = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b.double(), rtol=5 * tol, atol=5 * tol)


def test_math_backend_is_refused_not_used(monkeypatch):
    q, k, v = packed([9, 5], 4, 2, 8, torch.float32)
    meta = M.Varlen.from_seqlens([9, 5])
    with sdpa_kernel([SDPBackend.MATH]):  # a caller that allows only math gets an error, not O(n^2) memory
        with pytest.raises(RuntimeError, match=r"math backend would build \[heads, n, n\]"):
            A.varlen_attention(q, k, v, meta, 0.3)
    # a tiled backend that cannot take the inputs: SDPA finds no viable backend (it may not take math)
    monkeypatch.setitem(A.FUSED_SDPA, "cpu", [SDPBackend.EFFICIENT_ATTENTION])
    with pytest.raises(RuntimeError, match="No viable backend"):
        A.varlen_attention(q, k, v, meta, 0.3)


def fake_varlen(style, causal_ok=True):
    """torch.nn.attention.varlen.varlen_attn as each release spells it, computed with SDPA per sequence."""
    calls = []

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, gqa, scale=None):
        assert torch.equal(cu_q, cu_k) and max_q == max_k
        calls.append(dict(causal=causal, gqa=gqa, scale=scale))
        seqlens = cu_q.diff().tolist()
        if not causal_ok:  # a broken kernel: every token attends to its whole sequence, the future included
            return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)),
                                                             enable_gqa=True)[0].transpose(0, 1)
                              for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())])
        return A.sdpa_per_sequence(q, k, v, M.Varlen.from_seqlens(seqlens), scale or q.shape[-1] ** -0.5)

    if style == "2.10":
        def f(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None)
    elif style == "2.11":
        def f(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), None, scale)
    else:
        def f(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            if not enable_gqa and query.shape[1] != key.shape[1]:
                raise ValueError("Expect query and key/value to have the same number of heads")
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), enable_gqa, scale)
    return f, calls


@pytest.mark.parametrize("style", ["2.10", "2.11", "2.13"])
def test_torch_varlen_adapter_speaks_each_release(monkeypatch, style):
    """2.10: is_causal=True, no scale; 2.11: window_size=(-1, 0) (is_causal removed), GQA passed as is;
    2.12+: enable_gqa=True (it refuses fewer KV heads without it). The self-check accepts a correct
    kernel and refuses, with a warning, one that attends to the future."""
    f, calls = fake_varlen(style)
    monkeypatch.setattr(A, "torch_varlen_attn", f)
    seqlens = [5, 11]
    q, k, v = packed(seqlens, 4, 2, 8, torch.float32)
    meta = M.Varlen.from_seqlens(seqlens)
    out = A.torch_varlen(q, k, v, meta, 8 ** -0.5)
    torch.testing.assert_close(out.double(), reference(q, k, v, seqlens, 8 ** -0.5), rtol=1e-5, atol=1e-5)
    assert calls[-1]["causal"] and calls[-1]["gqa"] == (True if style == "2.13" else None)
    assert calls[-1]["scale"] == (None if style == "2.10" else 8 ** -0.5)
    if style == "2.10":  # no scale argument: a non-default scale cannot be honoured, so it is refused
        with pytest.raises(ValueError, match="no scale argument"):
            A.torch_varlen(q, k, v, meta, 0.1)
    assert A.check_torch_varlen("cpu", torch.float32, 4, 2, 8)
    # the first packed forward runs the check: under no_grad and autocast (a log-prob pass), or inside a
    # checkpointed layer (the update), it must still judge the kernel, not the context
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.check_torch_varlen("cpu", torch.float32, 4, 2, 8)
    x = torch.ones(3, requires_grad=True)
    seen = []
    layer = lambda t: seen.append(A.check_torch_varlen("cpu", torch.float32, 4, 2, 8)) or t * 2  # noqa: E731
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert seen and all(seen) and x.grad.tolist() == [2.0, 2.0, 2.0]
    bad, _ = fake_varlen(style, causal_ok=False)
    monkeypatch.setattr(A, "torch_varlen_attn", bad)
    with pytest.warns(UserWarning, match="uses SDPA once per sequence"):
        assert not A.check_torch_varlen("cpu", torch.float32, 4, 2, 8)


def test_forward_outputs_are_not_views():
    """FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the pre-backward
    hook): the model's outputs are tensors of their own."""
    m = random_model(tiny_config(), seed=1)
    ids = torch.randint(0, 128, (10,))
    meta, pos = M.Varlen.from_seqlens([6, 4]), torch.cat([torch.arange(6), torch.arange(4)])
    logp, ent = m(ids, pos, meta, targets=ids, return_entropy=True)
    assert logp._base is None and ent._base is None and m(ids, pos, meta, targets=ids)._base is None
    assert m(ids, pos, meta)._base is None


MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    sys.path.insert(0, {root!r})
    import torch, attention as A, model as M
    torch.set_num_threads(2)
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    n = {n}
    cfg = M.Config(vocab_size=256, hidden_size=1536, intermediate_size=256, num_hidden_layers=1,
                   num_attention_heads=12, num_key_value_heads=2, head_dim=128, torch_dtype="bfloat16")
    m = M.init_weights(M.Qwen2(cfg)).to(torch.bfloat16)
    ids, pos, meta = torch.randint(0, 256, (n,)), torch.arange(n), M.Varlen.from_seqlens([n])
    real = M.ATTENTION["varlen"]
    stand_in = lambda q, k, v, meta, scale: q * 1.0  # same output, no attention work
    def peak(attention):
        M.ATTENTION["varlen"] = attention
        libc.malloc_trim(0)
        base = rss("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        m(ids, pos, meta, targets=ids).sum().backward()
        m.zero_grad(set_to_none=True)
        return rss("VmHWM") - base
    libc = ctypes.CDLL("libc.so.6")
    w = 256  # warm-up on a short sequence: libraries and kernels initialised outside the measurement
    m(ids[:w], pos[:w], M.Varlen.from_seqlens([w]), targets=ids[:w]).sum().backward()
    m.zero_grad(set_to_none=True)
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: every block over 64 KiB is returned on free, so RSS follows
    print(json.dumps({{"stand_in": peak(stand_in), "real": peak(real),
                      "backend": A.varlen_backend(torch.empty(1, 12, 128, dtype=torch.bfloat16),
                                                  torch.empty(1, 2, 128, dtype=torch.bfloat16))}}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_packed_attention_memory_is_linear_through_the_model():
    """Fresh process, the real head shape (12 q / 2 kv heads, head_dim 128, bf16), one 4,096-token
    sequence, forward + backward through the model's own forward (one layer, small MLP and vocab). The
    attention's share of the peak (real attention minus a stand-in returning q) stays tens of MB; the
    [12, 4096, 4096] float32 scores alone would be 805 MB (the 3-D math path measured 2.7-2.9 GB).
    Cost 7 s on the idle 2-core machine (two 4K-token forward+backward passes); 43-95 s at load 11-20."""
    n = 4096
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(root=ROOT, n=n)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    attention = (got["real"] - got["stand_in"]) / 2**20
    quadratic = 12 * n * n * 4 / 2**20
    assert got["backend"] == "sdpa-per-sequence"
    assert attention < 100, f"attention adds {attention:.0f} MB (quadratic scores alone: {quadratic:.0f} MB): {got}"
    assert got["real"] / 2**20 < quadratic, got  # the whole step's extra peak is below one score matrix


# -----------------------------------------------------------------------------
# CUDA only: run by the GPU check (python -m pytest -q tests/test_attention.py)


def cuda_model(dtype, layers=2):
    cfg = M.Config(vocab_size=512, hidden_size=1536, intermediate_size=1024, num_hidden_layers=layers,
                   num_attention_heads=12, num_key_value_heads=2, head_dim=128, torch_dtype="float32")
    return M.init_weights(M.Qwen2(cfg)).to("cuda", dtype)


@cuda
@pytest.mark.parametrize("master", [torch.bfloat16, torch.float32])
def test_cuda_training_forward_on_flash_or_cudnn_only(monkeypatch, master):
    """The training forward + backward (bf16 weights, or float32 masters under bf16 autocast; one layer,
    checkpointed as in training) with SDPA restricted to flash/cuDNN and torch varlen / flash-attn out of
    the way: a fall to the math (or memory-efficient) backend raises. 20K tokens in 3 sequences: extra
    peak far below the 12 x 16K^2 float32 scores of the longest sequence alone (12.9 GB)."""
    monkeypatch.setattr(A, "torch_varlen_attn", None)
    monkeypatch.setattr(A, "flash_attn_varlen_func", None)
    m = cuda_model(master, layers=1)
    m.gradient_checkpointing = True
    seqlens = [16384, 3000, 1000]
    n = sum(seqlens)
    ids = torch.randint(0, 512, (n,), device="cuda")
    pos = torch.cat([torch.arange(k) for k in seqlens]).cuda()
    meta = M.Varlen.from_seqlens(seqlens, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp = m(ids, pos, meta, targets=ids)
        logp.sum().backward()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(logp).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert extra < 4 * 2**30, f"{extra / 2**30:.2f} GB extra"  # linear: well under 0.2 GB per 1K tokens


@cuda
def test_cuda_float32_expands_kv_heads_instead_of_math():
    """CUDA flash refuses float32 and memory-efficient has no GQA: float32 packed attention expands the KV
    heads and runs on memory-efficient, never math; exact against float64."""
    seqlens = [300, 1, 77]
    q, k, v = packed(seqlens, 12, 2, 128, torch.float32, "cuda")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = A.varlen_attention(q, k, v, M.Varlen.from_seqlens(seqlens, "cuda"), 128 ** -0.5)
        out.sum().backward()
    torch.testing.assert_close(out.double(), reference(q, k, v, seqlens, 128 ** -0.5), rtol=1e-3, atol=1e-3)


@cuda
def test_cuda_packed_attention_picks_one_call_per_micro_batch():
    """Where the installed torch has torch.nn.attention.varlen (2.10+) and the GPU is sm80+, bf16 packed
    attention is one varlen call per micro-batch (flash-attn, when installed, comes first), and it agrees
    with SDPA per sequence, gradients included."""
    q, k, v = packed([1000, 3, 2500], 12, 2, 128, torch.bfloat16, "cuda")
    meta = M.Varlen.from_seqlens([1000, 3, 2500], "cuda")
    backend = A.varlen_backend(q, k)
    if A.flash_attn_varlen_func is not None:
        assert backend == "flash-attn"
    elif A.torch_varlen_attn is not None and torch.cuda.get_device_capability() >= (8, 0):
        assert backend == "torch-varlen", "torch varlen failed its self-check (see the warning)"
    else:
        pytest.skip("no varlen kernel in this stack: SDPA per sequence (checked above)")
    outs = []
    for impl in (A.VARLEN_IMPLS[backend], A.sdpa_per_sequence):
        o = impl(q, k, v, meta, 128 ** -0.5)
        outs.append([o, *torch.autograd.grad(o.float().square().sum(), (q, k, v))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.varlen_attention(q, k, v, meta, 128 ** -0.5)
