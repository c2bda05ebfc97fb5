"""
Paged decode attention: one new query token per sequence against its paged K/V cache, GQA-grouped and
split along the context (flash-decoding).

    decode_attention_torch(q, k_cache, v_cache, meta, positions, scale)   # plain-PyTorch twin
    decode_attention(q, k_cache, v_cache, meta, positions, scale)         # Triton, same call

q [N, Hq, D] with N = B (meta.cu_seqlens_q[b] is sequence b's token; a sequence may have none);
k_cache, v_cache [num_blocks, block_size, Hkv, D]; meta is model.Paged with max_seqlen_q == 1. Query b
attends to cached keys at positions < min(context_lens[b], positions[token] + 1) - the same rule as
model.paged_attention_torch. Returns [N, Hq, D] in q's dtype.

Why it is shaped like this:
  - Decode is bandwidth-bound: every K/V byte should be read once. Hq / Hkv query heads share a KV
    head (GQA, 6 in the 1.5B model), so one program serves the whole group: its queries form the M
    rows of a tl.dot, padded to 16 because the GPU's tensor-core dot needs M >= 16.
  - At batch 1 there are only B * Hkv = 2 groups, far too few programs for 132 SMs, so the context is
    split into num_splits pieces, each a program writing a partial (output, log-sum-exp); a second small
    kernel merges them. The grid depends only on host-known shapes (B, the block table's width), never
    on context lengths, so a step can be captured in a CUDA graph; splits past a sequence's end exit
    empty.
  - Softmax statistics and accumulators are fp32. In the interpreter (CPU) values are upcast right
    after loading (its bf16 arithmetic is wrong); on the GPU a 16-bit cache goes into tl.dot as stored
    (tensor cores, fp32 accumulation) and an fp32 cache uses IEEE dots. Block ids and addresses are
    int64 (a 60 GB pool has more than 2^31 elements).
"""
import math

import torch

from kernels._triton import on_gpu, sm_count, tl, triton


def decode_attention_torch(q, k_cache, v_cache, meta, positions, scale):
    """Gather each sequence's blocks, mask, softmax in fp32. Sync-free: fixed shapes only."""
    B, max_blocks = meta.block_tables.shape
    N, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    tok = meta.cu_seqlens_q[:B].to(torch.int64).clamp(max=max(N - 1, 0))
    has_q = meta.cu_seqlens_q[1:] > meta.cu_seqlens_q[:B]
    blocks = meta.block_tables.to(torch.int64)
    k = k_cache[blocks].flatten(1, 2).float()  # [B, T, Hkv, D]
    v = v_cache[blocks].flatten(1, 2).float()
    qb = q[tok].float().view(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bthd->bhgt", qb, k) * scale
    length = torch.minimum(meta.context_lens.to(torch.int64), positions.to(torch.int64)[tok] + 1)
    valid = torch.arange(max_blocks * bs, device=q.device)[None, :] < length[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no keys (only a padded one) gives 0
    o = torch.einsum("bhgt,bthd->bhgd", p, v).reshape(B, Hq, D).to(q.dtype)
    out = torch.zeros_like(q)
    return out.index_copy_(0, tok[has_q], o[has_q]) if N else out


def native_dot(q, k_cache):
    """16-bit tl.dot on the GPU when q and the cache share a 16-bit dtype; the interpreter (CPU) always
    upcasts, because its bf16 arithmetic is wrong."""
    return on_gpu(q) and q.dtype == k_cache.dtype and q.dtype in (torch.bfloat16, torch.float16)


# num_splits and the block table's width (s_bt) are never specialised: one compiled kernel serves every
# batch size and max_model_len
@triton.jit(do_not_specialize=["num_splits", "s_bt"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, cu_ptr, pos_ptr, po_ptr, plse_ptr,
                         qk_scale, block_size, num_splits, s_qn, s_qh, s_kb, s_kr, s_kh, s_vb, s_vr, s_vh, s_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, IEEE: tl.constexpr, NATIVE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    tok = tl.load(cu_ptr + b)
    num_new = tl.load(cu_ptr + b + 1) - tok  # 0 or 1
    qpos = tl.load(pos_ptr + tok + tl.arange(0, 1), mask=tl.arange(0, 1) < num_new, other=-1)
    qpos = tl.max(qpos, axis=0)  # (vector load: a scalar mask trips the interpreter)
    length = tl.minimum(tl.load(ctx_ptr + b), qpos + 1)  # keys 0 .. length-1
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + tok.to(tl.int64) * s_qn + heads[:, None] * s_qh + d[None, :],
                mask=(gmask & (g * 0 < num_new))[:, None] & dmask[None, :], other=0.0)
    if not NATIVE:  # upcast right after loading (the interpreter's bf16 arithmetic is wrong)
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
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
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))  # scale * log2(e): softmax by exp2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if NATIVE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        elif IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    # an empty split leaves m = -inf, l = 0: its log-sum-exp is -inf and the merge gives it weight 0
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = m_i + tl.log2(tl.maximum(l_i, 1e-30))
    base = (b.to(tl.int64) * num_heads + heads) * num_splits + split  # [B, Hq, num_splits] workspace
    tl.store(plse_ptr + base, lse, mask=gmask)
    tl.store(po_ptr + base[:, None] * HEAD_DIM + d[None, :], out, mask=gmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(po_ptr, plse_ptr, cu_ptr, o_ptr, s_on, s_oh, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Splits are read BLOCK_S at a time: a [64 splits, 128] fp32 tile in one warp's registers took 255
    registers and spilled (sm_80/sm_90), a [16, 128] tile takes a quarter of that."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = tl.load(cu_ptr + b)
    num_new = tl.load(cu_ptr + b + 1) - tok
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.maximum(m, tl.load(plse_ptr + base + s0 + sp, mask=s0 + sp < num_splits, other=float("-inf")))
    m = tl.max(m, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all (a padded row): weights 0, output 0
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        smask = s0 + sp < num_splits
        w = tl.exp2(tl.load(plse_ptr + base + s0 + sp, mask=smask, other=float("-inf")) - m)
        parts = tl.load(po_ptr + (base + s0 + sp)[:, None] * HEAD_DIM + d[None, :],
                        mask=smask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        acc += tl.sum(parts * w[:, None], axis=0)
        w_sum += w
    out = acc / tl.maximum(tl.sum(w_sum, axis=0), 1e-30)
    tl.store(o_ptr + tok.to(tl.int64) * s_on + h * s_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=(d < HEAD_DIM) & (d * 0 < num_new))


def num_splits_for(batch, kv_heads, max_context, block_n, sms=None):
    """Enough programs to fill the GPU (about 2 per SM; sms=None: the interpreter), no more splits than
    key tiles, at most 64. Host-only inputs (shapes), so a captured graph and its replays agree."""
    if sms is None:
        return max(1, min(4, triton.cdiv(max_context, block_n)))  # interpreter: keep grids tiny
    want = triton.cdiv(2 * sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_context, block_n), 64))


def decode_attention(q, k_cache, v_cache, meta, positions, scale, num_splits=None, block_n=None):
    """Triton version of decode_attention_torch (same arguments, same result)."""
    B, max_blocks = meta.block_tables.shape
    N, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    assert Hq % Hkv == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.zeros_like(q)  # rows of sequences without a query stay 0, as in the twin
    if N == 0 or B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    G = Hq // Hkv
    gpu = on_gpu(q)
    block_n = block_n or (64 if gpu else 16)
    num_splits = num_splits or num_splits_for(B, Hkv, max_blocks * bs, block_n, sm_count(q.device) if gpu else None)
    part_o = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    bt = meta.block_tables
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, bt, meta.context_lens, meta.cu_seqlens_q, positions, part_o, part_lse,
        scale * math.log2(math.e), bs, num_splits, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0), GROUP=G, GROUP_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n,
        IEEE=k_cache.dtype == torch.float32, NATIVE=native_dot(q, k_cache), num_warps=4)
    _decode_merge_kernel[(B, Hq)](
        part_o, part_lse, meta.cu_seqlens_q, out, out.stride(0), out.stride(1), num_splits,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_S=16, num_warps=1)
    return out
