"""Every Triton kernel against its plain-PyTorch twin (kernels/). On CPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), so sizes are tiny; on a GPU the same tests run on the
device. Shapes are odd on purpose: non-power-of-two head dims and block sizes, context lengths at and
around block boundaries, sequences with empty and full last blocks, GQA groups of 1, 2 and 6."""
import math
import random

import pytest
import torch

import model as M
from fixtures import random_model, tiny_config
from kernels import paged_attention
from model import triton_enabled, use_triton
from kernels.decode_attention import decode_attention, decode_attention_torch
from kernels.kv_write import write_kv_cache, write_kv_cache_torch
from kernels.prefill_attention import paged_attention_torch, prefill_attention

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def paged_batch(ctx_before, new_counts, block_size, num_blocks, extra_cols=0, seed=0):
    """Metadata for sequences holding ctx_before tokens that get new_counts more, in scattered blocks."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots, cu, pos = [], [], [0], []
    width = max(-(-(b + n) // block_size) for b, n in zip(ctx_before, new_counts)) + extra_cols
    for before, n in zip(ctx_before, new_counts):
        need = -(-(before + n) // block_size)
        own = [free.pop() for _ in range(need)]
        tables.append(own + [rng.randrange(num_blocks) for _ in range(width - need)])  # unused: any valid id
        slots += [own[p // block_size] * block_size + p % block_size for p in range(before, before + n)]
        pos += list(range(before, before + n))
        cu.append(cu[-1] + n)
    meta = M.Paged(torch.tensor(slots, dtype=torch.int64, device=DEV),
                   torch.tensor(tables, dtype=torch.int32, device=DEV),
                   torch.tensor([b + n for b, n in zip(ctx_before, new_counts)], dtype=torch.int32, device=DEV),
                   torch.tensor(cu, dtype=torch.int32, device=DEV), max(new_counts))
    return meta, torch.tensor(pos, dtype=torch.int64, device=DEV)


def caches(num_blocks, block_size, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (torch.randn(shape, generator=g).to(DEV, dtype), torch.randn(shape, generator=g).to(DEV, dtype))


def close(got, want, dtype):
    # kernels compute in fp32 from the same (upcast) inputs as the fp32 reference: only the output's
    # rounding to dtype separates them
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


# ----------------------------------------------------------------------------- KV write


@pytest.mark.parametrize("dtype,src_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_kv_write_matches_twin(dtype, src_dtype):
    nb, bs, H, D = 5, 3, 3, 24  # odd block size, heads, head dim
    kc, vc = caches(nb, bs, H, D, dtype)
    slots = torch.tensor([0, nb * bs - 1, 7, 3, 8], dtype=torch.int64, device=DEV)  # first, last, any order
    k = torch.randn(len(slots), H, D, device=DEV).to(src_dtype)
    v = torch.randn(len(slots), H, D, device=DEV).to(src_dtype)
    want_k, want_v = kc.clone(), vc.clone()
    write_kv_cache_torch(k, v, want_k, want_v, slots)
    write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # a copy: bit for bit
    assert not torch.equal(kc, caches(nb, bs, H, D, dtype)[0])  # something was written


def test_kv_write_into_layer_view_and_empty():
    L, nb, bs, H, D = 3, 4, 4, 2, 16
    kc = torch.zeros(L, nb, bs, H, D, device=DEV)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(2, H, D, device=DEV), torch.randn(2, H, D, device=DEV)
    slots = torch.tensor([5, 15], device=DEV)
    write_kv_cache(k, v, kc[1], vc[1], slots)
    assert torch.equal(kc[1].view(-1, H, D)[slots], k) and torch.equal(vc[1].view(-1, H, D)[slots], v)
    assert kc[0].abs().sum() == 0 and kc[2].abs().sum() == 0  # other layers untouched
    write_kv_cache(k[:0], v[:0], kc[0], vc[0], slots[:0])  # no new rows: a no-op, not an error


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_twins(group, dtype):
    bs, Hkv, D = 4, 2, 24
    # context lengths (incl. the new token) at and around block boundaries: 1, k*bs - 1, k*bs, k*bs + 1
    ctx = [1, 7, 8, 9, 16]
    meta, pos = paged_batch([c - 1 for c in ctx], [1] * len(ctx), bs, num_blocks=16, extra_cols=1, seed=group)
    kc, vc = caches(16, bs, Hkv, D, dtype, seed=1)
    q = torch.randn(len(ctx), Hkv * group, D, device=DEV).to(dtype)
    want = paged_attention_torch(q.float(), kc.float(), vc.float(), meta, pos, 0.3)
    close(decode_attention_torch(q.float(), kc.float(), vc.float(), meta, pos, 0.3), want, torch.float32)
    for splits in (1, 3):  # 3 splits of a 1-token context: two are empty
        got = decode_attention(q, kc, vc, meta, pos, 0.3, num_splits=splits)
        assert got.dtype == dtype
        close(got, want, dtype)


def test_decode_long_context_split_and_missing_query():
    """Several key tiles per split, a block size that is not a power of two, and a sequence with no
    new token this step (its output row stays 0, the others are unaffected)."""
    bs, Hkv, D, G = 5, 1, 16, 2
    ctx = [37, 1, 23]
    meta, pos = paged_batch([c - 1 for c in ctx], [1, 1, 1], bs, num_blocks=20, seed=3)
    kc, vc = caches(20, bs, Hkv, D, torch.float32, seed=2)
    q = torch.randn(3, G, D, device=DEV)
    want = paged_attention_torch(q, kc, vc, meta, pos, 0.25)
    close(decode_attention(q, kc, vc, meta, pos, 0.25, num_splits=2, block_n=16), want, torch.float32)
    # sequence 1 has no query: cu_seqlens_q = [0, 1, 1, 2], tokens are sequences 0 and 2
    cu = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=DEV)
    meta2 = M.Paged(meta.slot_mapping[[0, 2]], meta.block_tables, meta.context_lens, cu, 1)
    got = decode_attention(q[[0, 2]], kc, vc, meta2, pos[[0, 2]], 0.25, num_splits=2)
    close(got, want[[0, 2]], torch.float32)
    close(decode_attention_torch(q[[0, 2]], kc, vc, meta2, pos[[0, 2]], 0.25), want[[0, 2]], torch.float32)


@pytest.mark.parametrize("splits", [20, 64])
def test_decode_merge_over_many_splits(splits):
    """More splits than the merge kernel reads at once (16): a 300-token context in 16-key tiles keeps
    splits 0-18 busy (so the second group of 16 holds real partials) and the rest empty; a 5-token
    sequence beside it leaves nearly every split empty. 64 is the GPU's most (batch 1-2)."""
    bs, Hkv, D, G = 16, 1, 16, 6
    ctx = [300, 5]
    meta, pos = paged_batch([c - 1 for c in ctx], [1, 1], bs, num_blocks=24, seed=11)
    kc, vc = caches(24, bs, Hkv, D, torch.float32, seed=12)
    q = torch.randn(2, G, D, device=DEV)
    want = paged_attention_torch(q, kc, vc, meta, pos, 0.25)
    close(decode_attention(q, kc, vc, meta, pos, 0.25, num_splits=splits, block_n=16), want, torch.float32)


# ----------------------------------------------------------------------------- prefill / extend


@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_extend_matches_twin(group, dtype):
    bs, Hkv, D = 4, 2, 24
    # a fresh prefill, an extend crossing block boundaries (chunked prefill / recompute), an extend
    # that fills its last block exactly, a decode-like single token and a sequence with no new tokens
    before = [0, 5, 4, 8, 3]
    new = [7, 11, 4, 1, 0]
    meta, pos = paged_batch(before, new, bs, num_blocks=24, seed=group)
    kc, vc = caches(24, bs, Hkv, D, dtype, seed=4)
    q = torch.randn(sum(new), Hkv * group, D, device=DEV).to(dtype)
    want = paged_attention_torch(q.float(), kc.float(), vc.float(), meta, pos, 0.2)
    got = prefill_attention(q, kc, vc, meta, pos, 0.2)
    assert got.shape == q.shape and got.dtype == dtype
    close(got, want, dtype)


def test_prefill_several_query_and_key_tiles():
    bs, Hkv, D, G = 16, 1, 16, 1
    meta, pos = paged_batch([20, 0], [35, 33], bs, num_blocks=8, seed=5)  # 3 query tiles of 16
    kc, vc = caches(8, bs, Hkv, D, torch.float32, seed=6)
    q = torch.randn(68, G, D, device=DEV)
    close(prefill_attention(q, kc, vc, meta, pos, 0.25), paged_attention_torch(q, kc, vc, meta, pos, 0.25),
          torch.float32)


# ----------------------------------------------------------------------------- in the model


def test_model_with_triton_matches_twins():
    """The registry swap: prefill, extend and decode through model.forward give the twins' logits."""
    cfg = tiny_config(num_attention_heads=6, num_key_value_heads=1, hidden_size=96, head_dim=16, num_hidden_layers=2)
    m = random_model(cfg, seed=7)
    bs, nb = 4, 12
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (7, 4)]
    steps = [([0, 0], [4, 3]), ([4, 3], [2, 0]), ([6, 3], [1, 1])]  # prefill, extend, decode
    results = []
    for triton in (False, True):
        previous = use_triton(triton)
        try:
            assert triton_enabled() == triton
            kc = torch.zeros(cfg.num_hidden_layers, nb, bs, cfg.num_key_value_heads, cfg.head_dim)
            vc = torch.zeros_like(kc)
            logits = []
            with torch.no_grad():
                for before, new in steps:
                    meta, pos = paged_batch(before, new, bs, nb, seed=9)  # same blocks every step (same seed)
                    meta = M.Paged(*(t.cpu() for t in (meta.slot_mapping, meta.block_tables, meta.context_lens,
                                                       meta.cu_seqlens_q)), meta.max_seqlen_q)
                    ids = torch.cat([s[b:b + n] for s, b, n in zip(seqs, before, new)])
                    logits.append(m.logits(m(ids, pos.cpu(), meta, (kc, vc))))
            results.append((logits, kc))
        finally:
            M.ATTENTION.update(previous)
    assert M.ATTENTION["paged"] is paged_attention_torch  # restored
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert torch.equal(results[0][1][0], results[1][1][0])  # layer 0's K: the same rows in the same slots
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)


def test_dispatch_picks_decode_for_one_token():
    bs, Hkv, D, G = 4, 1, 16, 2
    meta, pos = paged_batch([3, 8], [1, 1], bs, num_blocks=8)
    kc, vc = caches(8, bs, Hkv, D, torch.float32)
    q = torch.randn(2, G, D, device=DEV)
    close(paged_attention(q, kc, vc, meta, pos, 0.25), paged_attention_torch(q, kc, vc, meta, pos, 0.25),
          torch.float32)


# ----------------------------------------------------------------------------- GPU only


@cuda_only
def test_int64_offsets_past_2_pow_31_elements():
    """A pool past 2^31 elements (4.3 GB of bf16): writes and reads in the last block must land there."""
    bs, H, D = 16, 2, 128
    nb = (2**31) // (bs * H * D) + 2
    kc = torch.zeros(nb, bs, H, D, dtype=torch.bfloat16, device=DEV)
    vc = torch.zeros_like(kc)
    last = nb - 1
    k = torch.randn(bs, H, D, device=DEV, dtype=torch.bfloat16)
    slots = torch.arange(last * bs, (last + 1) * bs, device=DEV)
    write_kv_cache(k, k, kc, vc, slots)
    assert torch.equal(kc[last], k) and kc[last - 1].abs().sum() == 0
    meta = M.Paged(slots[-1:], torch.tensor([[last]], dtype=torch.int32, device=DEV),
                   torch.tensor([bs], dtype=torch.int32, device=DEV), torch.tensor([0, 1], dtype=torch.int32, device=DEV), 1)
    q = torch.randn(1, 12, D, device=DEV, dtype=torch.bfloat16)
    pos = torch.tensor([bs - 1], device=DEV)
    want = paged_attention_torch(q.float(), kc[last:].float(), vc[last:].float(),
                                 M.Paged(meta.slot_mapping, torch.zeros_like(meta.block_tables), meta.context_lens,
                                         meta.cu_seqlens_q, 1), pos, 0.1)
    close(decode_attention(q, kc, vc, meta, pos, 0.1), want, torch.bfloat16)


# ----------------------------------------------------------------------------- sampling


def sampling_rows(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    ints = lambda hi: torch.randint(0, hi, (B,), generator=g).to(DEV)
    return dict(top_p=torch.ones(B, device=DEV), top_k=torch.zeros(B, dtype=torch.int64, device=DEV),
                seed=ints(2**62) * 3, prompt_idx=ints(1000), sample_idx=ints(64),
                position=ints(2**33))  # wide seeds and positions: the hash takes them mod 2^32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_kernel_matches_twin(dtype):
    from kernels.sampling import sample, sample_torch
    B, V = 24, 3001  # three chunks of 1024 with a ragged last one
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, V, generator=g) * 4).to(DEV, dtype)
    temperature = torch.tensor([1.0, 0.6, 0.0, 1.7] * (B // 4), device=DEV)
    rows = sampling_rows(B)
    for limit in (None, 2990):
        want = sample_torch(logits, temperature, **rows, vocab_limit=limit, filtered=False)
        got = sample(logits, temperature, **rows, vocab_limit=limit, filtered=False, block_v=1024)
        assert torch.equal(got[0], want[0])  # same tokens
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        if limit:
            assert int(got[0].max()) < limit


def test_sampling_kernel_ties_limit_and_draw_distribution():
    from kernels.sampling import sample, sample_torch
    B, V = 8, 300
    # greedy on exact ties: the first index wins, also across chunk boundaries (ids 10, 100, 299 tie)
    logits = torch.zeros(B, V, device=DEV)
    logits[:, [10, 100, 299]] = 5.0
    logits[:, 295] = 9.0  # the largest, but past vocab_limit
    zero = torch.zeros(B, device=DEV)
    rows = sampling_rows(B, seed=2)
    tok, lp = sample(logits, zero, **rows, vocab_limit=290, filtered=False, block_v=64)
    assert tok.tolist() == [10] * B
    torch.testing.assert_close(lp, sample_torch(logits, zero, **rows, vocab_limit=290)[1])
    # T = 1 on 3 tokens: many draws follow softmax (a broken hash or race would skew this)
    n = 64
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2], device=DEV)).repeat(n, 1)
    rows = sampling_rows(n, seed=3)
    tok, _ = sample(logits, torch.ones(n, device=DEV), **rows, filtered=False)
    assert torch.equal(tok, sample_torch(logits, torch.ones(n, device=DEV), **rows)[0])
    counts = torch.bincount(tok, minlength=3).float() / n
    assert (counts - torch.tensor([0.5, 0.3, 0.2], device=DEV)).abs().max() < 0.2


def filtered_rows(logits, temperature, top_p, top_k, draws, seed):
    """Every (top_p, top_k) pair on every logits row, `draws` times each (different sample indices):
    the draws spread over the kept set, so a wrongly kept or dropped token shows up as a different id."""
    R = logits.shape[0]
    grid = [(r, p, k, d) for r in range(R) for p in top_p for k in top_k for d in range(draws)]
    rows = sampling_rows(len(grid), seed=seed)
    rows["top_p"] = torch.tensor([p for _, p, _, _ in grid], device=DEV)
    rows["top_k"] = torch.tensor([k for _, _, k, _ in grid], device=DEV)
    rows["sample_idx"] = torch.tensor([d for *_, d in grid], device=DEV)
    idx = torch.tensor([r for r, *_ in grid], device=DEV)
    return logits[idx], temperature[idx], rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_kernel_top_p_top_k_match_twin(dtype):
    """top-k, top-p and both inside the kernel (no sort): the same tokens and log-probs as the twin's
    sort-based filter, with ragged tiles, vocab_limit < V, greedy rows (which ignore the filters) and
    rows of duplicated logits (ties at the boundary, which the twin's stable sort gives to the low ids)."""
    from kernels.sampling import sample, sample_torch
    V, g = 1000, torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=g) * 3
    logits[2] = (logits[2] * 2).round() / 2  # ~40 distinct values: every boundary falls inside a tie
    logits[3] = (logits[3] / 2).round()
    logits, temperature, rows = filtered_rows(logits.to(DEV, dtype), torch.tensor([1.0, 0.7, 1.5, 0.0], device=DEV),
                                              (0.3, 0.9, 0.95, 1.0), (1, 5, 50, -1), draws=1, seed=6)
    want = sample_torch(logits, temperature, **rows, vocab_limit=990)
    got = sample(logits, temperature, **rows, vocab_limit=990, block_v=256)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert int(got[0].max()) < 990


def test_sampling_kernel_ties_at_the_boundary():
    """Large groups of equal logits cut by top-k and by top-p: many draws per row, each equal to the
    twin's, land only on the kept set, whose ties are the lowest ids (the twin's stable sort)."""
    from kernels.sampling import filter_mask, sample, sample_torch
    V = 300
    logits = torch.zeros(2, V)
    logits[:, 7::3] = 1.0  # 98 ties at 1.0 (ids 7, 10, ...) above 202 at 0.0
    logits[1, 150] = -0.0  # -0.0 ties with 0.0
    logits, temperature, rows = filtered_rows(logits.to(DEV), torch.tensor([1.0, 3.0], device=DEV),
                                              (0.3, 1.0), (2, 120, -1), draws=6, seed=7)
    want = sample_torch(logits, temperature, **rows)
    got = sample(logits, temperature, **rows, block_v=128)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    keep = filter_mask(logits.float() / temperature[:, None], rows["top_p"], rows["top_k"])
    assert keep.gather(1, got[0][:, None]).all()
    k2 = (rows["top_k"] == 2) & (rows["top_p"] == 1)  # top-2 of 98 tied maxima: ids 7 and 10, both drawn
    assert set(got[0][k2].tolist()) == {7, 10}
    drawn = got[0][(rows["top_k"] == 120) & (rows["top_p"] == 1)]  # the 98 ones and the 22 lowest-id zeros
    zeros = drawn[(drawn % 3 != 1) | (drawn < 7)]
    assert len(zeros) > 0 and zeros.max() <= 32  # the 22nd zero is id 32


def test_sampling_kernel_filter_edges():
    """top_k >= V (off), top_k above vocab_limit, and top_p small enough to keep only the argmax."""
    from kernels.sampling import sample, sample_torch
    V, g = 400, torch.Generator().manual_seed(8)
    logits = (torch.randn(6, V, generator=g) * 2).to(DEV)
    logits[:, 390:] = 10.0  # the largest logits lie past vocab_limit: they must not count in the filter
    rows = sampling_rows(6, seed=9)
    rows["top_k"] = torch.tensor([V, V + 5, 395, 2, 0, 1], device=DEV)
    rows["top_p"] = torch.tensor([1.0, 0.9, 0.9, 1e-6, 1e-6, 0.9], device=DEV)
    t = torch.full((6,), 1.2, device=DEV)
    want = sample_torch(logits, t, **rows, vocab_limit=390)
    got = sample(logits, t, **rows, vocab_limit=390, block_v=128)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[0][3:].tolist() == logits[3:, :390].argmax(-1).tolist()  # tiny top_p / top_k=1: the argmax
    # top_p = 1 is off in the twin too: a float32 cumsum reaches 1.0 early and used to drop a tail of
    # tiny but nonzero mass (the kernel keeps the whole top-k)
    from kernels.sampling import filter_mask
    z = torch.randn(1, 2000, generator=g).to(DEV) * 10
    assert int(filter_mask(z, torch.ones(1, device=DEV), torch.tensor([500], device=DEV)).sum()) == 500


def test_sampling_kernel_top_p_on_exact_multiples():
    """20 equal maxima (p = 0.05 each) under top_p = 0.3: the mass before the 7th is 6 x 0.05, below top_p
    in exact arithmetic (and in the twin) but equal to it in float32, so the kernel must not round it."""
    from kernels.sampling import sample, sample_torch
    V, n = 256, 32
    logits = torch.full((n, V), -40.0, device=DEV)
    logits[:, 100:120] = 2.0
    rows = sampling_rows(n, seed=10)
    rows["top_p"] = torch.full((n,), 0.3, device=DEV)
    t = torch.ones(n, device=DEV)
    got, want = sample(logits, t, **rows, block_v=64), sample_torch(logits, t, **rows)
    assert torch.equal(got[0], want[0])
    assert set(got[0].tolist()) == set(range(100, 107))


# ----------------------------------------------------------------------------- in the engine


def test_engine_greedy_unchanged_with_kernels():
    """Greedy completions through the engine (chunked prefill, prefix sharing, preemption by recompute)
    are the same with the Triton kernels as with the twins; the fused sampler draws the same tokens."""
    from engine import Engine
    from kernels.sampling import sample
    cfg = tiny_config(num_attention_heads=6, num_key_value_heads=1, hidden_size=96, head_dim=16)
    m = random_model(cfg, seed=11)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 13)]

    def run(triton):
        eng = Engine(m, block_size=4, num_blocks=6, max_num_seqs=8, max_model_len=32, max_prefill_tokens=8,
                     ignore_eos=True)
        if triton:
            eng.sampler = sample  # what model_runner.install_kernels installs on CUDA
        out = eng.generate(prompts, max_new_tokens=6, temperature=0.0, n=2)
        return [c.token_ids for c in out], eng.stats

    want, _ = run(False)
    previous = use_triton()
    try:
        got, stats = run(True)
    finally:
        M.ATTENTION.update(previous)
    assert got == want
    assert stats["preemptions"] > 0 and stats["prefix_blocks_shared"] > 0  # the hard paths ran


def test_engine_top_p_top_k_unchanged_with_fused_sampler():
    """Sampled completions with top-p and top-k through the engine: the fused sampler (its filter has no
    sort) gives the twin's tokens and log-probs (attention stays on the twins: the sampler is under test)."""
    from engine import Engine
    from kernels.sampling import sample
    cfg = tiny_config()
    m = random_model(cfg, seed=13)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 7)]

    def run(sampler, **kw):
        eng = Engine(m, block_size=4, num_blocks=16, max_num_seqs=8, max_model_len=32, ignore_eos=True)
        eng.sampler = sampler or eng.sampler
        out = eng.generate(prompts, max_new_tokens=5, temperature=1.3, n=2, seed=3, **kw)
        return [c.token_ids for c in out], [c.logprobs for c in out]

    for kw in (dict(top_p=0.8), dict(top_k=7), dict(top_p=0.9, top_k=20)):
        want, got = run(None, **kw), run(sample, **kw)
        assert got[0] == want[0]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), rtol=1e-5, atol=1e-5)
    assert run(None, top_p=0.8)[0] != run(None)[0]  # the filter changes the draws: the test can fail


@cuda_only
def test_engine_cuda_graphs_greedy_unchanged(monkeypatch):
    """On CUDA the engine turns on the kernels, the fused sampler and CUDA graphs by itself: greedy
    completions equal the twins' (NANOSCALER_KERNELS=0), through replays of captured buckets."""
    from engine import Engine
    cfg = tiny_config(num_attention_heads=12, num_key_value_heads=2, hidden_size=192, head_dim=16)
    m = random_model(cfg, seed=12).to(DEV)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 40)]
    previous = dict(M.ATTENTION)
    try:
        monkeypatch.setenv("NANOSCALER_KERNELS", "0")
        ref = Engine(m, block_size=16, num_blocks=64, max_num_seqs=8, ignore_eos=True)
        assert ref.graphs is None
        want = ref.generate(prompts, max_new_tokens=24, temperature=0.0, n=2)
        monkeypatch.setenv("NANOSCALER_KERNELS", "1")
        eng = Engine(m, block_size=16, num_blocks=64, max_num_seqs=8, ignore_eos=True)
        assert triton_enabled() and eng.graphs is not None
        got = eng.generate(prompts, max_new_tokens=24, temperature=0.0, n=2)
        assert len(eng.graphs.graphs) > 0
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        got2 = eng.generate(prompts, max_new_tokens=24, temperature=0.0, n=2)  # replays only
        assert [c.token_ids for c in got2] == [c.token_ids for c in want]
    finally:
        M.ATTENTION.update(previous)


def test_self_check_and_engine_fallback(monkeypatch):
    """The kernels pass their self-check at a real-model-like shape; a failing check is an error for the
    engine unless the fallback to the twins is allowed, and then it is reported (tests/test_engine.py
    checks the same through Engine)."""
    import kernels
    from model_runner import install_kernels
    kernels.self_check(DEV, torch.float32, q_heads=12, kv_heads=2, head_dim=16, block_size=4, vocab=300)
    kernels.self_check(DEV, torch.bfloat16, q_heads=12, kv_heads=2, head_dim=128, block_size=16, vocab=300)

    def broken(*a, **kw):
        raise RuntimeError("no compiler for this GPU")
    monkeypatch.setattr(kernels, "self_check", broken)
    previous = dict(M.ATTENTION)
    with pytest.raises(RuntimeError, match="self-check failed.*allow_kernel_fallback"):
        install_kernels(DEV, torch.float32, tiny_config(), 4)
    with pytest.warns(UserWarning, match="self-check failed"):
        sampler, reason = install_kernels(DEV, torch.float32, tiny_config(), 4, allow_fallback=True)
    from kernels.sampling import sample_torch
    assert sampler is sample_torch and "no compiler" in reason and M.ATTENTION == previous


def twin_with(change):
    """A stand-in for the fused sampler: the twin's draws, then change(logits, tokens, logprobs)."""
    from kernels.sampling import sample_torch

    def sampler(logits, *rows, **kw):
        tokens, logprobs = sample_torch(logits, *rows, **kw)
        change(logits, tokens, logprobs)
        return tokens, logprobs
    return sampler


def test_self_check_sampler_tolerates_near_ties_only():
    """The sampler check (twin stand-ins, no kernel; 5,000 entries: small tensors, ~1 s): the twin itself
    passes; the other token of the built near-tie row passes (a GPU's approximate exp may break that tie
    the other way); a different token on an ordinary row, a different greedy token, or a log-prob off by
    0.01 fail."""
    from kernels.sampling import check_against_twin, sample_torch
    V = 5_000

    def other_of_tie(logits, tokens, logprobs):
        tied = (logits[5] == 8).nonzero()[:, 0].tolist()
        assert len(tied) == 2 and int(tokens[5]) in tied
        tokens[5] = tied[0] if int(tokens[5]) == tied[1] else tied[1]

    check_against_twin(DEV, torch.bfloat16, V, sampler=sample_torch)
    check_against_twin(DEV, torch.bfloat16, V, sampler=twin_with(other_of_tie))
    with pytest.raises(RuntimeError, match=r"rows \[0\] are not near-ties"):
        check_against_twin(DEV, torch.bfloat16, V, sampler=twin_with(lambda lg, t, lp: t.__setitem__(0, t[0] + 1)))
    with pytest.raises(RuntimeError, match=r"rows \[1\] are not near-ties"):  # row 1 is greedy
        check_against_twin(DEV, torch.bfloat16, V, sampler=twin_with(lambda lg, t, lp: t.__setitem__(1, t[1] + 1)))
    with pytest.raises(RuntimeError, match="log-probs differ"):
        check_against_twin(DEV, torch.bfloat16, V, sampler=twin_with(lambda lg, t, lp: lp.add_(0.01)))


def test_acceptable_draws_margins():
    """The rule itself on built rows: a race decided by less than RACE_EPS accepts either token, by more
    only the winner; greedy ties go to the first id, exactly; a top-p cut within MASS_EPS of a token
    accepts that token kept or dropped, a cut farther away does not."""
    from kernels.sampling import RACE_EPS, acceptable_draws, row_key, uniform
    V = 64
    zeros = torch.zeros(4, dtype=torch.int64)
    rows = dict(top_p=torch.ones(4), top_k=zeros, seed=torch.full((4,), 5), prompt_idx=torch.arange(4), sample_idx=zeros,
                position=zeros)
    noise = -torch.log(-torch.log(uniform(row_key(rows["seed"], rows["prompt_idx"], rows["sample_idx"],
                                                  rows["position"]), torch.arange(V)).double()))
    logits = torch.full((4, V), -50.0, dtype=torch.float64)
    for r, gap in enumerate((0.1 * RACE_EPS, 10 * RACE_EPS)):  # id 3 beats id 9 by `gap` in race score
        logits[r, 3], logits[r, 9] = 4 - noise[r, 3] + gap, 4 - noise[r, 9]
    logits[2:, [3, 9]] = 4.0  # rows 2-3: greedy, an exact tie
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    ok = lambda tokens: acceptable_draws(torch.tensor(tokens), logits, t, **rows).tolist()
    assert ok([3, 3, 3, 3]) == [True, True, True, True]
    assert ok([9, 9, 9, 9]) == [True, False, False, False]
    # top-p: per row, id a of mass 0.6 and id b of 0.4 (the rest ~0), b the id with the highest race noise,
    # a the lowest: b wins whenever it is kept. b's mass before is 0.6: kept by top_p 0.6 + 1e-6 (but
    # within MASS_EPS: dropping it is accepted too), kept by 0.7, dropped by 0.5
    a, b = noise.argmin(-1), noise.argmax(-1)
    logits = torch.full((4, V), -50.0, dtype=torch.float64)
    logits[range(4), a], logits[range(4), b] = math.log(0.6), math.log(0.4)
    rows["top_p"] = torch.tensor([0.6 + 1e-6, 0.6 + 1e-6, 0.7, 0.5])
    t = torch.ones(4)
    assert ok([b[0], a[1], a[2], b[3]]) == [True, True, False, False]
    assert ok([b[0], b[1], b[2], a[3]]) == [True, True, True, True]  # the twin's own draws

def test_cuda_graphs_refuse_cpu():
    from kernels.cuda_graphs import DecodeGraphs
    with pytest.raises(RuntimeError, match="CUDA"):
        DecodeGraphs(lambda bs: None)
    assert not kernels_enabled_on_cpu()


def kernels_enabled_on_cpu():
    from model_runner import kernels_wanted
    return kernels_wanted(torch.device("cpu"))


def test_twins_work_without_triton():
    """requirements.txt installs Triton on Linux only: elsewhere model.py and the twins must still import
    and run, and a kernel launch must say what is missing."""
    import subprocess
    import sys
    code = """
import sys
sys.modules['triton'] = None  # makes `import triton` raise ImportError
import torch, model as M
from kernels.kv_write import write_kv_cache, write_kv_cache_torch
k = torch.randn(2, 1, 4)
kc, vc = torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4)
write_kv_cache_torch(k, k, kc, vc, torch.tensor([0, 3]))
assert torch.equal(kc.view(-1, 1, 4)[3], k[1])
try:
    write_kv_cache(k, k, kc, vc, torch.tensor([0, 3]))
except ImportError as e:
    print('refused:', e)
"""
    root = __import__("os").path.dirname(M.__file__)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: _kv_write_kernel: Triton is not installed" in out.stdout


# ----------------------------------------------------------------------------- fused log-probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprobs_match_grpo(dtype):
    from kernels.logprobs import token_logprobs, token_logprobs_fused
    g = torch.Generator().manual_seed(5)
    N, H, V = 37, 48, 301  # odd everywhere: ragged token, hidden and vocab tiles
    h = torch.randn(2, N, H, generator=g).to(DEV, dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(DEV, dtype)
    t = torch.randint(0, V, (2, N), generator=g).to(DEV)
    lp, ent = token_logprobs_fused(h, w, t, temperature=0.7, return_entropy=True)
    # float64 reference from the same (rounded) inputs; grpo's chunked twin must agree too
    logp = torch.log_softmax(h.double() @ w.double().T / 0.7, dim=-1)
    want_lp = logp.gather(-1, t[..., None])[..., 0]
    want_ent = -(logp.exp() * logp).sum(-1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert lp.shape == t.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), want_lp, **tol)
    torch.testing.assert_close(ent.double(), want_ent, **tol)
    twin_lp, twin_ent = token_logprobs(h, w, t, temperature=0.7, return_entropy=True)
    if dtype == torch.float32:
        torch.testing.assert_close(lp, twin_lp.float(), **tol)
        torch.testing.assert_close(ent, twin_ent.float(), **tol)
    # the twin's bf16 matmul rounds the logits to bf16; the kernel keeps them in fp32: never worse
    assert (lp.double() - want_lp).abs().max() <= (twin_lp.double() - want_lp).abs().max() + 1e-6
