"""
Token sampling with counter-based randomness: the plain-PyTorch twin (sample_torch) and the fused
Triton kernel (sample).

Every random number is a pure function of (seed, prompt index, sample index, position, vocab id), so a
sample never depends on batch composition, on preemption and recompute, or on which device or kernel
drew it, and per-row keys can sit in device tensors under a captured CUDA graph. The fused Triton kernel
(`sample`) reproduces `uniform()` bit for bit and `sample_torch` token for token.

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
which draws i with probability softmax(z restricted to S)_i. S is a prefix of the row sorted by z
descending, ties by lower id. The twin finds it with a sort; the kernel finds its last value tau with
searches over the float order (each pass counts, or sums the mass of, the entries above 16 candidate
values) and keeps z > tau plus the lowest-id ties at tau. top_p >= 1 is off. Both compute the top-p mass
in float32 in different orders, so where the mass before a token is within rounding of top_p (seen up
to ~1e-5 on a flat 20,000-entry row, where the twin's own float32 softmax sum is that far from float64)
the two may keep a token or two more or fewer; a draw differs only if it lands on one of them.
The returned log-prob is log_softmax(logits / T) of the drawn token over the whole vocabulary, before
filtering: the quantity the trainer recomputes. T = 0 is greedy (argmax over ids < vocab_limit) with
the log-prob under T = 1.
"""
import torch

from kernels._triton import on_gpu, tl, triton

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
    # top_p >= 1 is off: float32 cumsums reach 1.0 early and would drop a tail of tiny but nonzero mass
    keep &= ((p.cumsum(-1) - p) < top_p[:, None]) | (top_p[:, None] >= 1)
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


RACE_EPS = 1e-5  # race scores this close (relative to the winner's, at least 1) are a near-tie
MASS_EPS = 1e-4  # a token whose top-p mass-before is this close to top_p may be kept or dropped


def acceptable_draws(tokens, logits, temperature, top_p, top_k, seed, prompt_idx, sample_idx, position,
                     vocab_limit=None):
    """Which of `tokens` [B] (another implementation's draws, e.g. the fused kernel's on a GPU, whose
    exp is approximate - ex2.approx - and whose log is libdevice's, not torch's) sample_torch could
    have drawn but for float rounding. Greedy rows: exactly the twin's argmax. Sampled rows: the token
    must be kept by the filter with top_p widened by MASS_EPS, and its race score (float64 here) must
    be within RACE_EPS of the best score over the tokens kept even with top_p narrowed by MASS_EPS.
    So a different token passes only on a near-tie: its row's winning margin is below RACE_EPS (or the
    top-p cut falls within MASS_EPS of it). Returns bool [B]."""
    B, V = logits.shape
    greedy = temperature <= 0
    z = logits.double() / torch.where(greedy, 1.0, temperature.double())[:, None]
    if vocab_limit is not None and vocab_limit < V:
        z[:, vocab_limit:] = float("-inf")
    ids = torch.arange(V, device=logits.device)
    u = uniform(row_key(seed, prompt_idx, sample_idx, position), ids).double()
    score = z - torch.log(-torch.log(u))
    # top-k exactly as the twin (z / T is exact in both), top-p with the mass-before compared in float64
    sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    in_k = ids[None, :] < k[:, None]
    p = torch.softmax(sorted_z.masked_fill(~in_k, float("-inf")), dim=-1)
    before = p.cumsum(-1) - p
    off = (top_p >= 1)[:, None]
    narrow = in_k & ((before < top_p.double()[:, None] - MASS_EPS) | off | (ids == 0)[None, :])
    wide = in_k & ((before < top_p.double()[:, None] + MASS_EPS) | off)
    narrow, wide = (torch.zeros_like(m).scatter_(-1, order, m) for m in (narrow, wide))
    best = score.masked_fill(~narrow, float("-inf")).max(-1).values
    mine = score.gather(-1, tokens[:, None])[:, 0]
    sampled_ok = wide.gather(-1, tokens[:, None])[:, 0] & (mine >= best - RACE_EPS * best.abs().clamp(min=1))
    return torch.where(greedy, tokens == z.argmax(-1), sampled_ok)


# -----------------------------------------------------------------------------
# The fused Triton kernel


@triton.jit
def _hash_step(h, x):
    """step(h, x) of the module docstring on uint32 (wrapping arithmetic is the mod 2^32)."""
    x = (h ^ x) + 0x9E3779B9
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _load_z(row, v0, V, div, BLOCK_V: tl.constexpr):
    ids = v0 + tl.arange(0, BLOCK_V)
    z = tl.load(row + ids, mask=ids < V, other=float("-inf")).to(tl.float32)  # upcast first (bf16 interpreter)
    return ids, tl.math.div_rn(z, div)  # IEEE division, as torch's


@triton.jit
def _race_tile(z, ids, v0, key, greedy, allowed):
    """The tile's best race score, its id (first among ties, as torch.argmax) and its z."""
    h = _hash_step(key, ids.to(tl.uint32))
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    score = tl.where(greedy, z, z - tl.log(-tl.log(u)))
    score = tl.where(allowed, score, float("-inf"))
    c_best = tl.max(score, axis=0)
    c_id = tl.argmax(score, axis=0)
    c_z = tl.sum(tl.where(ids == v0 + c_id, z, 0.0), axis=0)
    return c_best, v0 + c_id, c_z


@triton.jit
def _key(x):
    """float32 -> int64 in the floats' order (-0.0 as +0.0): the bisection runs over these integers."""
    b = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _unkey(k):
    b = k.to(tl.int32)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _search(row, V, limit, div, m, z_norm, need, lo, hi, MASS: tl.constexpr, BLOCK_V: tl.constexpr,
            PROBES: tl.constexpr):
    """Smallest key t in (lo, hi] with pred(t), for a pred that is monotone (false, then true) and true
    at hi. MASS=False: pred(t) = #{z >= f(t)} < need (top-k); MASS=True: sum_{z > f(t)} e^(z - m) / z_norm
    < need (top-p). f = _unkey; only ids < limit count. A pass over the row tests PROBES evenly spaced keys
    (a (PROBES+1)-ary search), so 2^32 keys take ~8 passes. Returns t and the count and mass of the set
    measured at t (callers start hi where both are 0)."""
    j = tl.arange(0, PROBES)
    cnt_hi = tl.zeros([1], tl.float32)
    mass_hi = tl.zeros([1], tl.float32)
    while tl.max(hi - lo, axis=0) > 1:
        d = tl.maximum((hi - lo) // (PROBES + 1), 1)
        t = lo + (j + 1) * d  # [PROBES] int64, increasing
        f = _unkey(tl.minimum(t, hi))
        cnt = tl.zeros([PROBES], tl.float32)
        mass = tl.zeros([PROBES], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            ids, z = _load_z(row, v0, V, div, BLOCK_V)
            if MASS:
                above = z[:, None] > f[None, :]
            else:
                above = z[:, None] >= f[None, :]
            above = above & (ids < limit)[:, None]
            cnt += tl.sum(above.to(tl.float32), axis=0)
            mass += tl.sum(tl.where(above, tl.exp(z - m)[:, None], 0.0), axis=0)
        if MASS:
            ok = mass / z_norm < need
        else:
            ok = cnt < need
        ok = ok | (t >= hi)
        n_false = tl.sum((~ok).to(tl.int64), axis=0)  # probes 0 .. n_false-1 fail, the rest pass
        at = (j == n_false) & (t < hi)  # the first passing probe, if it lies below hi
        moved = tl.sum(at.to(tl.int32), axis=0) > 0
        cnt_hi = tl.where(moved, tl.sum(tl.where(at, cnt, 0.0), axis=0), cnt_hi)
        mass_hi = tl.where(moved, tl.sum(tl.where(at, mass, 0.0), axis=0), mass_hi)
        hi = tl.where(moved, lo + (n_false + 1) * d, hi)
        lo = lo + n_false * d
    return hi, cnt_hi, mass_hi


@triton.jit(do_not_specialize=["vocab_limit"])  # the tokenizer's size: any value, one kernel
def _sample_kernel(logits_ptr, s_row, temp_ptr, top_p_ptr, top_k_ptr, seed_ptr, prompt_ptr, sidx_ptr, pos_ptr,
                   tok_ptr, lp_ptr, V, vocab_limit, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_S: tl.constexpr, PROBES: tl.constexpr):
    """One program per row. Pass 1: temperature, log-sum-exp (for the log-prob), the counter-based
    uniforms and the exponential race with a running first-index argmax. With FILTER, rows with top-k
    and/or top-p then find the kept set's boundary value tau by searches over the float order (_search,
    no sort), and a last pass reruns the race over the kept set: z > tau, plus the ties z == tau that the
    twin's stable sort puts first (lowest ids), counted with a running cumsum."""
    r = tl.program_id(0)
    lane = tl.arange(0, 1)  # [1]-shaped scalars: the interpreter is happier with vectors
    t = tl.load(temp_ptr + r + lane)
    greedy = t <= 0
    div = tl.where(greedy, 1.0, t)
    key = tl.zeros([1], tl.uint32)
    key = _hash_step(key, (tl.load(seed_ptr + r + lane) & 0xFFFFFFFF).to(tl.uint32))
    key = _hash_step(key, (tl.load(prompt_ptr + r + lane) & 0xFFFFFFFF).to(tl.uint32))
    key = _hash_step(key, (tl.load(sidx_ptr + r + lane) & 0xFFFFFFFF).to(tl.uint32))
    key = _hash_step(key, (tl.load(pos_ptr + r + lane) & 0xFFFFFFFF).to(tl.uint32))
    row = logits_ptr + r.to(tl.int64) * s_row
    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    m_lim = tl.full([1], float("-inf"), tl.float32)  # max, sum and min over ids < vocab_limit (for filtering)
    s_lim = tl.zeros([1], tl.float32)
    min_lim = tl.full([1], float("inf"), tl.float32)
    best = tl.full([1], float("-inf"), tl.float32)
    best_id = tl.zeros([1], tl.int32)
    best_z = tl.zeros([1], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ids, z = _load_z(row, v0, V, div, BLOCK_V)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if FILTER:
            z_lim = tl.where(ids < vocab_limit, z, float("-inf"))
            m_new = tl.maximum(m_lim, tl.max(z_lim, axis=0))
            s_lim = s_lim * tl.exp(m_lim - m_new) + tl.sum(tl.exp(z_lim - m_new), axis=0)
            m_lim = m_new
            min_lim = tl.minimum(min_lim, tl.min(tl.where(ids < vocab_limit, z, float("inf")), axis=0))
        c_best, c_id, c_z = _race_tile(z, ids, v0, key, greedy, ids < vocab_limit)
        better = c_best > best  # strictly: an earlier chunk wins ties
        best_id = tl.where(better, c_id, best_id)
        best_z = tl.where(better, c_z, best_z)
        best = tl.where(better, c_best, best)
    if FILTER:
        top_k = tl.load(top_k_ptr + r + lane)
        top_p = tl.load(top_p_ptr + r + lane)
        k_on = (top_k > 0) & (top_k < vocab_limit) & ~greedy  # the twin ignores filters for greedy rows
        p_on = (top_p < 1.0) & ~greedy
        k = top_k.to(tl.float32)
        k_min, k_max = _key(min_lim), _key(m_lim)
        # top-k: tau_k = the k-th largest z = f(t - 1) for the smallest t with #{z >= f(t)} < k;
        # #{z > tau_k} and their mass come back with it (measured at t)
        t_k, n_gt, mass_gt = _search(row, V, vocab_limit, div, m_lim, 1.0, k, k_min,
                                     tl.where(k_on, k_max + 1, k_min + 1), False, BLOCK_S, PROBES)
        tau_k = _unkey(t_k - 1)
        ties_k = k - n_gt  # how many of the entries equal to tau_k top-k keeps: the lowest ids
        z_norm = tl.where(k_on, mass_gt + ties_k * tl.exp(tau_k - m_lim), s_lim)  # top-p renormalises over top-k
        # top-p: a token is kept while the mass strictly before it (sorted order) is < top_p, so
        # tau_p = the smallest z >= tau_k whose mass strictly above is < top_p; G = that mass
        t_p, _, g = _search(row, V, vocab_limit, div, m_lim, z_norm, top_p, t_k - 2,
                            tl.where(p_on, k_max, t_k - 1), True, BLOCK_S, PROBES)
        tau = _unkey(t_p)
        g = g / z_norm
        g64 = g.to(tl.float64)
        p_tau64 = (tl.exp(tau - m_lim) / z_norm).to(tl.float64)
        top_p64 = top_p.to(tl.float64)
        k_ties = k_on & (tau == tau_k)
        seen = tl.zeros([1], tl.float32)
        best2 = tl.full([1], float("-inf"), tl.float32)
        best_id2 = tl.zeros([1], tl.int32)
        best_z2 = tl.zeros([1], tl.float32)
        end = tl.where(tl.max((k_on | p_on).to(tl.int32), axis=0) > 0, V, 0)
        for v0 in range(0, end, BLOCK_V):
            ids, z = _load_z(row, v0, V, div, BLOCK_V)
            tie = (z == tau) & (ids < vocab_limit)
            j = seen + tl.cumsum(tie.to(tl.float32), axis=0) - tie.to(tl.float32)  # earlier ties of tau
            seen += tl.sum(tie.to(tl.float32), axis=0)
            # float64: g + j * p_tau in float32 can round up onto top_p (6 x 0.05 = 0.3000000119 in float32)
            tie = tie & (~k_ties | (j < ties_k)) & (~p_on | (g64 + j.to(tl.float64) * p_tau64 < top_p64))
            c_best, c_id, c_z = _race_tile(z, ids, v0, key, greedy, (ids < vocab_limit) & ((z > tau) | tie))
            better = c_best > best2
            best_id2 = tl.where(better, c_id, best_id2)
            best_z2 = tl.where(better, c_z, best_z2)
            best2 = tl.where(better, c_best, best2)
        filtered = k_on | p_on
        best_id = tl.where(filtered, best_id2, best_id)
        best_z = tl.where(filtered, best_z2, best_z)
    tl.store(tok_ptr + r + lane, best_id.to(tl.int64))
    tl.store(lp_ptr + r + lane, best_z - (m + tl.log(s)))


def sample(logits, temperature, top_p, top_k, seed, prompt_idx, sample_idx, position, vocab_limit=None,
           filtered=None, block_v=None, probes=16):
    """Triton version of sample_torch (same arguments, same tokens): one program per row; rows with
    top-p/top-k find their kept set by searches over the float order instead of a sort. filtered (a
    host bool) compiles the filtering in or out; None reads it from the tensors (a sync)."""
    if filtered is None:
        filtered = bool(((top_p < 1) | (top_k > 0)).any())
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logprobs
    gpu = on_gpu(logits)
    block_v = min(block_v or (4096 if gpu else 32768), triton.next_power_of_2(V))
    # the interpreter pays per op, not per element; on a GPU a search tile is [BLOCK_S, probes] in registers:
    # BLOCK_V/4 took 255 registers (sm_90, triton 3.6) and BLOCK_V/8 spilled under triton 3.9's ptxas 13
    # flags (python -m kernels.aot); BLOCK_V/16 is 138-170 on both. Its speed is unmeasured.
    block_s = max(block_v // 16, 16) if gpu else block_v
    _sample_kernel[(B,)](logits, logits.stride(0), temperature.float().contiguous(), top_p.float().contiguous(),
                         top_k.long().contiguous(), seed, prompt_idx, sample_idx, position, tokens, logprobs, V,
                         V if vocab_limit is None else min(vocab_limit, V), FILTER=bool(filtered),
                         BLOCK_V=block_v, BLOCK_S=block_s, PROBES=probes,
                         num_warps=8 if gpu else 1)
    return tokens, logprobs


def check_against_twin(device, dtype, vocab, sampler=None):
    """kernels.self_check's sampler part: `sampler` (default: the fused kernel) against sample_torch on
    rows plain T=0.6, greedy, T=1, top-p, top-p + top-k, and a near-tie, with `dtype` logits of `vocab`
    entries. Raises RuntimeError unless every token is an acceptable_draws one and the log-probs of
    the tokens both drew agree."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, vocab, generator=g) * 3
    rows = [torch.tensor(x, device=device) for x in ([0.6, 0.0, 1.0, 0.6, 0.6, 1.0], [1.0, 1.0, 1.0, 0.95, 0.9, 1.0],
                                                     [0, 0, 0, 0, 50, 0], [7, 7, 2**40, 7, 7, 7], [0, 1, 2, 3, 4, 5],
                                                     [0, 1, 0, 0, 1, 0], [3, 4, 5, 6, 7, 8])]
    limit = vocab - 10
    # row 5: the two ids < limit whose race noise -log(-log u) is closest get the same logit, far above
    # the rest: at the real vocabulary their race is closer than float32 can tell
    noise = -torch.log(-torch.log(uniform(row_key(*(r[5:6].cpu() for r in rows[3:])), torch.arange(limit)).double()))[0]
    order = noise.argsort()
    i = (noise[order[1:]] - noise[order[:-1]]).argmin()
    logits[5] = -40.0
    logits[5, order[i:i + 2]] = 8.0
    logits = logits.to(device, dtype)
    got = (sampler or sample)(logits, *rows, vocab_limit=limit)
    want = sample_torch(logits, *rows, vocab_limit=limit)
    ok = acceptable_draws(got[0], logits, *rows, vocab_limit=limit)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:, 0].tolist()
        raise RuntimeError(f"sample drew {got[0].tolist()}, its twin {want[0].tolist()}: rows {bad} are not near-ties")
    same = got[0] == want[0]
    try:
        torch.testing.assert_close(got[1][same], want[1][same], rtol=1e-4, atol=1e-3)
    except AssertionError as e:
        raise RuntimeError(f"sample's log-probs differ from its twin's: {e}") from None
