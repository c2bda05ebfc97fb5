"""
Triton kernels for the rollout engine, one per file, each beside its plain-PyTorch twin:

    kv_write.py            new K/V rows into the paged cache
    decode_attention.py    paged decode attention (GQA-grouped, split-K with a fixed grid)
    prefill_attention.py   paged prefill / extend attention (new tokens against a cached prefix)
    sampling.py            counter-based sampling (twin: sample_torch)
    logprobs.py            fused lm_head + log-softmax, forward only (twin: grpo.token_logprobs)
    cuda_graphs.py         decode steps captured for every batch-size bucket at start (CUDA only)
    aot.py                 ahead-of-time compile for sm_80 / sm_90 (python -m kernels.aot; no GPU needed)
    _triton.py             triton, or stand-ins where it is not installed (the twins work everywhere)

model.py's attention registry (model.ATTENTION) holds the twins by default (the CPU path);
model.use_triton() swaps the Triton kernels in behind the same calls, and the engine's model runner
(model_runner.py) decides when, after self_check() below. This package is a leaf: it imports nothing of
the project's but its own modules. Imports are lazy so that importing `kernels.sampling` (the engine
does) costs nothing more.
"""


def paged_attention(q, k_cache, v_cache, meta, positions, scale):
    """Decode kernel when every sequence has one new token (meta.max_seqlen_q is a host int: no sync),
    the prefill/extend kernel otherwise."""
    if meta.max_seqlen_q == 1:
        from kernels.decode_attention import decode_attention
        return decode_attention(q, k_cache, v_cache, meta, positions, scale)
    from kernels.prefill_attention import prefill_attention
    return prefill_attention(q, k_cache, v_cache, meta, positions, scale)


def self_check(device, dtype, q_heads, kv_heads, head_dim, block_size, vocab=151_936):
    """Every kernel once against its twin at these shapes, in the variants the engine launches (so this
    also compiles what the engine needs): the KV write bit for bit; decode - with a block table 256
    blocks wide, as under a CUDA graph, so on a GPU the context splits 64 ways, most splits empty - and
    prefill/extend within rounding; the fused sampler on `dtype` logits of `vocab` entries: greedy
    tokens exact, sampled tokens equal to the twin's except on a near-tie (its winning margin below
    kernels.sampling.RACE_EPS, or a top-p cut within MASS_EPS: the GPU's exp is approximate, so a
    correct kernel may break such a tie the other way; one row here is built as a near-tie), log-probs
    close. Raises RuntimeError naming the kernel on a mismatch."""
    import torch
    from types import SimpleNamespace
    from kernels.decode_attention import decode_attention, decode_attention_torch
    from kernels.kv_write import write_kv_cache, write_kv_cache_torch
    from kernels.prefill_attention import paged_attention_torch, prefill_attention
    from kernels.sampling import check_against_twin
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
    nb, lens = 8, [block_size + 3, 2 * block_size]  # two sequences, 2 blocks each, scattered
    kc, vc = rand(nb, block_size, kv_heads, head_dim), rand(nb, block_size, kv_heads, head_dim)
    tables = torch.zeros(2, 256, dtype=torch.int32, device=device)  # past each sequence's blocks: never read
    tables[:, :2] = i32([[5, 2], [7, 0]])
    k, v = rand(3, kv_heads, head_dim), rand(3, kv_heads, head_dim)
    slots = torch.tensor([5 * block_size, 2 * block_size + 2, 0], device=device)
    k2, v2 = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    write_kv_cache_torch(k, v, k2, v2, slots)
    if not (torch.equal(kc, k2) and torch.equal(vc, v2)):
        raise RuntimeError("write_kv_cache differs from its twin")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)

    def agree(name, got, want):
        try:
            torch.testing.assert_close(got.float(), want, **tol)
        except AssertionError as e:
            raise RuntimeError(f"{name} differs from its twin: {e}") from None

    scale = head_dim ** -0.5
    decode = SimpleNamespace(block_tables=tables, context_lens=i32(lens), cu_seqlens_q=i32([0, 1, 2]), max_seqlen_q=1)
    pos = torch.tensor([n - 1 for n in lens], device=device)
    q = rand(2, q_heads, head_dim)
    want = paged_attention_torch(q.float(), kc.float(), vc.float(), decode, pos, scale)
    agree("decode_attention", decode_attention(q, kc, vc, decode, pos, scale), want)
    agree("decode_attention_torch", decode_attention_torch(q, kc, vc, decode, pos, scale), want)
    extend = SimpleNamespace(block_tables=tables[:, :2], context_lens=i32(lens),
                             cu_seqlens_q=i32([0, 5, 5 + lens[1]]), max_seqlen_q=lens[1])
    pos = torch.cat([torch.arange(lens[0] - 5, lens[0]), torch.arange(lens[1])]).to(device)
    q = rand(len(pos), q_heads, head_dim)
    want = paged_attention_torch(q.float(), kc.float(), vc.float(), extend, pos, scale)
    agree("prefill_attention", prefill_attention(q, kc, vc, extend, pos, scale), want)
    check_against_twin(device, dtype, vocab)
