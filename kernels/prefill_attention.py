"""
Paged prefill / extend attention: the new tokens of each sequence attend causally to that sequence's
cached context, themselves included (prefix sharing, recompute after preemption, chunked prefill).

    paged_attention_torch(q, k_cache, v_cache, meta, positions, scale)    # plain-PyTorch twin (CPU path)
    prefill_attention(q, k_cache, v_cache, meta, positions, scale)        # Triton, same call

q [N, Hq, D]: the new tokens of B sequences, flattened (meta.cu_seqlens_q [B+1] says where each starts);
k_cache, v_cache [num_blocks, block_size, Hkv, D], already holding the new tokens' K/V (the forward
writes them first); meta is model.Paged. Token t of sequence b attends to cached keys at positions
p <= positions[t] and p < context_lens[b]. Returns [N, Hq, D] in q's dtype.

The Triton kernel is flash-attention over a paged cache: one program per (sequence, tile of BLOCK_M new
tokens, query head) walks that sequence's keys in BLOCK_N tiles through its block table, with an online
softmax in fp32 (dots as in decode_attention.py: 16-bit on the GPU, upcast in the interpreter),
stopping at the tile's last query position (causal). The grid comes from host-known values (B,
max_seqlen_q); tiles past a sequence's end exit at once. PyTorch has no paged, prefix-aware
attention without flash-attn: the twin gathers every block of every sequence and masks, which costs
O(B * max_seqlen_q * max_blocks * block_size) memory.
"""
import math

import torch
import torch.nn.functional as F

from kernels._triton import on_gpu, tl, triton
from kernels.decode_attention import native_dot


def paged_attention_torch(q, k_cache, v_cache, meta, positions, scale):
    """Reference paged attention: every query attends to the cached keys of its sequence up to its own
    position. Queries are padded to [B, max_seqlen_q]; keys gathered to [B, max_blocks * block_size].
    Sync-free (no .item(), no data-dependent shapes), so decode can be graph-captured."""
    B, max_blocks = meta.block_tables.shape
    block_size = k_cache.shape[1]
    N, Hq, D = q.shape
    # which sequence each new token belongs to, and its row in the padded query tensor
    token = torch.arange(N, device=q.device)
    seq = torch.searchsorted(meta.cu_seqlens_q[1:].to(torch.int64), token, right=True)
    row = seq * meta.max_seqlen_q + (token - meta.cu_seqlens_q.to(torch.int64)[seq])
    qp = q.new_zeros(B * meta.max_seqlen_q, Hq, D).index_copy_(0, row, q).view(B, meta.max_seqlen_q, Hq, D)
    qpos = torch.full((B * meta.max_seqlen_q,), -1, dtype=torch.int64, device=q.device)
    qpos = qpos.index_copy_(0, row, positions.to(torch.int64)).view(B, meta.max_seqlen_q)
    blocks = meta.block_tables.to(torch.int64)
    k = k_cache[blocks].flatten(1, 2)  # [B, T, Hkv, D] with T = max_blocks * block_size
    v = v_cache[blocks].flatten(1, 2)
    kpos = torch.arange(max_blocks * block_size, device=q.device)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < meta.context_lens[:, None, None].to(torch.int64))
    mask = mask | (qpos[:, :, None] < 0)  # padded query rows: attend anywhere, result discarded (avoids NaN)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                       attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(B * meta.max_seqlen_q, Hq, D)[row]


@triton.jit(do_not_specialize=["s_bt"])  # the block table's width: any max_model_len
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, ctx_ptr, cu_ptr, pos_ptr,
                    qk_scale, block_size, s_qn, s_qh, s_on, s_oh, s_kb, s_kr, s_kh, s_vb, s_vr, s_vh, s_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, NATIVE: tl.constexpr):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    start = tl.load(cu_ptr + b)
    num_new = tl.load(cu_ptr + b + 1) - start
    if tile * BLOCK_M >= num_new:
        return
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < num_new
    tok = (start + m).to(tl.int64)
    qpos = tl.load(pos_ptr + tok, mask=mmask, other=-1)
    ctx = tl.load(ctx_ptr + b)
    hi = tl.minimum(ctx, tl.max(qpos, axis=0) + 1)  # causal: no key past the tile's last query

    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + tok[:, None] * s_qn + h * s_qh + d[None, :], mask=mmask[:, None] & dmask[None, :],
                other=0.0)
    if not NATIVE:  # upcast right after loading (the interpreter's bf16 arithmetic is wrong)
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        blk = tl.load(bt_row + n // block_size, mask=nmask, other=0).to(tl.int64)
        row = (n % block_size).to(tl.int64)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (blk * s_kb + row * s_kr + kvh * s_kh)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (blk * s_vb + row * s_vr + kvh * s_vh)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if NATIVE:  # GPU, 16-bit cache: tensor-core dot on the stored values, fp32 accumulation
            s = tl.dot(q, tl.trans(k))
        else:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
        keep = (n[None, :] <= qpos[:, None]) & (n[None, :] < ctx)
        s = tl.where(keep, s * qk_scale, float("-inf"))  # scale * log2(e): softmax by exp2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet (padding) stays 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if NATIVE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        elif IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(o_ptr + tok[:, None] * s_on + h * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])


def prefill_attention(q, k_cache, v_cache, meta, positions, scale, block_m=None, block_n=None):
    """Triton version of paged_attention_torch (same arguments, same result up to rounding)."""
    B, max_blocks = meta.block_tables.shape
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    assert Hq % Hkv == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty_like(q)
    if N == 0 or B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    gpu = on_gpu(q)
    block_m = block_m or (64 if gpu else 16)
    block_n = block_n or (64 if gpu else 16)
    bt = meta.block_tables
    grid = (B, triton.cdiv(meta.max_seqlen_q, block_m), Hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, bt, meta.context_lens, meta.cu_seqlens_q, positions,
        scale * math.log2(math.e), k_cache.shape[1], q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0), GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=k_cache.dtype == torch.float32, NATIVE=native_dot(q, k_cache),
        num_warps=8)
    return out
