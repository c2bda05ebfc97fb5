"""
Write new K/V rows into the paged KV cache.

    write_kv_cache_torch(k, v, k_cache, v_cache, slot_mapping)    # the plain-PyTorch twin (CPU path)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)          # the Triton kernel, same call

k, v [N, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (model.py's layout); slot_mapping [N]
int64, slot s = block * block_size + row. Every slot must be valid: the engine points the padded rows of
a captured batch at a scratch block, so neither version checks (a check would sync).

One program per new token copies that token's K and V rows (Hkv * D elements each). Addresses are
computed in int64: a 60 GB bf16 pool holds 3e10 elements, past what int32 offsets can reach.
"""
from kernels._triton import tl, triton


def write_kv_cache_torch(k, v, k_cache, v_cache, slot_mapping):
    """Scatter new K/V rows [N, Hkv, D] into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, block_size,
                     s_kn, s_kh, s_vn, s_vh,  # new rows: [N, Hkv, D], last dim contiguous
                     s_kcb, s_kcr, s_kch, s_vcb, s_vcr, s_vch,  # caches: block, row, head strides
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    blk, row = slot // block_size, slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HEADS) & (d < HEAD_DIM)
    # loads and stores only, no arithmetic on the values: exact for every dtype (bf16 in the interpreter too)
    k = tl.load(k_ptr + n * s_kn + h * s_kh + d, mask=mask)
    tl.store(kc_ptr + blk * s_kcb + row * s_kcr + h * s_kch + d, k, mask=mask)
    v = tl.load(v_ptr + n * s_vn + h * s_vh + d, mask=mask)
    tl.store(vc_ptr + blk * s_vcb + row * s_vcr + h * s_vch + d, v, mask=mask)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """Triton version of write_kv_cache_torch (same arguments, same result)."""
    N, H, D = k.shape
    if N == 0:
        return
    # convert in PyTorch (a no-op when the model and cache dtypes agree): the interpreter's fp32 -> bf16
    # cast truncates where PyTorch rounds to nearest
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "KV cache: head_dim must be contiguous"
    _kv_write_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS=H, HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), num_warps=1)
