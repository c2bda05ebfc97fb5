"""
Token sampling with counter-based randomness: the plain-PyTorch twin (sample_torch).

Every random number is a pure function of (seed, prompt index, sample index, position, vocab id), so a
sample never depends on batch composition, on preemption and recompute, or on which device or kernel
drew it, and per-row keys can sit in device tensors under a captured CUDA graph. A fused Triton kernel
added here later must reproduce `uniform()` bit for bit and `sample_torch` token for token.

The hash (all values are unsigned 32-bit integers, arithmetic wraps mod 2^32; here they are held in
int64 tensors and masked with & 0xFFFFFFFF, so no op ever overflows int64 - in Triton use tl.uint32):

    mul32(x, c) = (x * c) mod 2^32, computed as ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & M
    mix32(x)    = murmur3's fmix32:  x ^= x >> 16; x = mul32(x, 0x85EBCA6B); x ^= x >> 13;
                                     x = mul32(x, 0xC2B2AE35); x ^= x >> 16
    step(h, x)  = mix32(((h ^ x) + 0x9E3779B9) & M)
    row key     = step(step(step(step(0, seed), prompt_index), sample_index), position)
    h           = step(row key, vocab_id)
    uniform     = ((h >> 9) + 0.5) * 2^-23, as float32: exact (24 significant bits), strictly inside (0, 1)

seed is taken mod 2^32 (use fold_seed() for wider seeds); the other fields must lie in [0, 2^32).

Sampling (exponential race, the Gumbel-max trick written in log space): with z = logits / T and the
filtered set S (ids < vocab_limit, then top-k, then top-p on the renormalised top-k distribution),
    token = argmax_{i in S}  z_i - log(-log u_i)
which draws i with probability softmax(z restricted to S)_i. No sort is needed without top-p/top-k.
The returned log-prob is log_softmax(logits / T) of the drawn token over the whole vocabulary, before
filtering: the quantity the trainer recomputes. T = 0 is greedy (argmax over ids < vocab_limit) with
the log-prob under T = 1.
"""
import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
M1, M2 = 0x85EBCA6B, 0xC2B2AE35


def mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without overflowing int64 (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    x = x ^ (x >> 16)
    x = mul32(x, M1)
    x = x ^ (x >> 13)
    x = mul32(x, M2)
    return x ^ (x >> 16)


def hash_step(h, x):
    return mix32(((h ^ x) + GOLDEN) & MASK32)


def row_key(seed, prompt_idx, sample_idx, position):
    """[B] int64 tensors -> [B] int64 row keys in [0, 2^32)."""
    h = torch.zeros_like(seed)
    for x in (seed, prompt_idx, sample_idx, position):
        h = hash_step(h, x & MASK32)
    return h


def uniform(key, vocab_ids):
    """key [B] (row_key), vocab_ids [V] -> float32 uniforms [B, V] in (0, 1)."""
    h = hash_step(key[:, None], vocab_ids[None, :])
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def fold_seed(seed: int) -> int:
    """Any Python int -> [0, 2^32), mixing in the high bits (seeds derived from hashes are wide)."""
    seed %= 2 ** 64
    return (seed ^ (seed >> 32)) & MASK32


def filter_mask(z, top_p, top_k):
    """keep-mask [B, V] of top-k, then top-p on the renormalised top-k distribution (the order of HF's
    and vLLM's warpers). A token is kept while the mass strictly before it is < top_p, so the first
    token is always kept. Needs one sort of each row; ties are broken by the lower id (stable sort)."""
    B, V = z.shape
    sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=z.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    keep = rank[None, :] < k[:, None]
    p = torch.softmax(sorted_z.masked_fill(~keep, float("-inf")), dim=-1)
    keep &= (p.cumsum(-1) - p) < top_p[:, None]
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def sample_torch(logits, temperature, top_p, top_k, seed, prompt_idx, sample_idx, position, vocab_limit=None,
                 filtered=None):
    """logits [B, V] (any float dtype); per-row temperature/top_p float, top_k/seed/prompt_idx/sample_idx/
    position int64 (top_k <= 0: off). vocab_limit: ids >= it are never drawn (embedding padding rows).
    filtered: host-known "some row uses top-p/top-k" (None: read it from the tensors, which syncs).
    Returns (token_ids [B] int64, logprobs [B] float32)."""
    B, V = logits.shape
    logits = logits.float()
    greedy = temperature <= 0
    z = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logprobs_all = torch.log_softmax(z, dim=-1)  # before filtering: what the trainer recomputes
    if vocab_limit is not None and vocab_limit < V:
        z = z.clone()
        z[:, vocab_limit:] = float("-inf")
    if filtered is None:
        filtered = bool(((top_p < 1) | (top_k > 0)).any())
    vocab_ids = torch.arange(V, device=logits.device, dtype=torch.int64)
    u = uniform(row_key(seed, prompt_idx, sample_idx, position), vocab_ids)
    score = z - torch.log(-torch.log(u))
    if filtered:
        score = score.masked_fill(~filter_mask(z, top_p, top_k), float("-inf"))
    tokens = torch.where(greedy, z.argmax(-1), score.argmax(-1))
    return tokens, logprobs_all.gather(-1, tokens[:, None])[:, 0]
