"""
Token log-probs (and entropies) of the lm_head with the matmul and the log-softmax fused: the logits
never leave the chip.

    token_logprobs(hidden, weight, targets, temperature, return_entropy)        # twin: grpo's chunked
    token_logprobs_fused(hidden, weight, targets, temperature, return_entropy)  # Triton, forward only

grpo.token_logprobs (the twin, imported from grpo.py) computes log_softmax(hidden @ weight.T / T) at the
targets in [tokens x vocab] tiles through cuBLAS, writing each fp32 tile to memory and reading it back
for the softmax. The kernel here keeps a [BLOCK_T tokens x BLOCK_V vocab] tile of logits in registers:
each program owns BLOCK_T tokens and walks the vocabulary, accumulating an online log-sum-exp, the
target's logit and sum(p * z) for the entropy. It has no backward: it serves the no-grad passes (the
old policy's and the reference model's log-probs), and is wired into nothing until a GPU run shows it
beats the twin (bench/kernels.py --full; BENCHMARKS.md "## kernels").
"""
import torch

from grpo import token_logprobs  # noqa: F401  (the twin, re-exported beside the kernel)
from kernels._triton import on_gpu, tl, triton
from kernels.decode_attention import native_dot


@triton.jit(do_not_specialize=["N"])  # the token count: one kernel for every micro-batch
def _logprobs_kernel(h_ptr, w_ptr, t_ptr, lp_ptr, ent_ptr, N, V, H, s_h, s_w, inv_temp,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                     NATIVE: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < N
    target = tl.load(t_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)  # sum of exp(z - m)
    sz = tl.zeros([BLOCK_T], tl.float32)  # sum of exp(z - m) * z, for the entropy
    zt = tl.zeros([BLOCK_T], tl.float32)  # the target's logit
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * s_h
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * s_w
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            a = tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_cols + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)  # [K, V] of w.T
            if NATIVE:  # GPU, 16-bit weights: tensor cores, fp32 accumulation
                acc = tl.dot(a, b, acc)
            elif IEEE:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:  # the interpreter with 16-bit inputs: upcast (its bf16 arithmetic is wrong)
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        z = tl.where(cmask[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        sz = sz * alpha + tl.sum(e * tl.where(cmask[None, :], z, 0.0), axis=1)
        zt += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lp_ptr + rows, zt - lse, mask=rmask)
    tl.store(ent_ptr + rows, lse - sz / s, mask=rmask)


@torch.no_grad()
def token_logprobs_fused(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """Forward-only Triton version of grpo.token_logprobs (same arguments and results, no autograd)."""
    if hidden.shape[-1] != weight.shape[-1] or hidden.dtype != weight.dtype or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"token_logprobs_fused: hidden {tuple(hidden.shape)} {hidden.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}, targets {tuple(targets.shape)} do not fit")
    if temperature <= 0:
        raise ValueError(f"token_logprobs_fused: temperature must be > 0, got {temperature}")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    N, H = h.shape
    V = w.shape[0]
    lp = torch.empty(N, dtype=torch.float32, device=h.device)
    ent = torch.empty_like(lp)
    if N:
        gpu = on_gpu(h)
        bt, bv, bk = (64, 128, 64) if gpu else (16, 64, 32)
        _logprobs_kernel[(triton.cdiv(N, bt),)](
            h, w, targets.reshape(-1).long(), lp, ent, N, V, H, h.stride(0), w.stride(0), 1.0 / float(temperature),
            BLOCK_T=bt, BLOCK_V=bv, BLOCK_K=bk, NATIVE=native_dot(h, w), IEEE=h.dtype == torch.float32,
            num_warps=8 if gpu else 1)
    if return_entropy:
        return lp.view(lead), ent.view(lead)
    return lp.view(lead)
