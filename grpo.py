"""
The GRPO objective in one file: group-normalised advantages, memory-flat token log-probs, the clipped
surrogate with a k3 KL penalty and an entropy bonus.

The one piece of engineering here is `token_logprobs`. With Qwen2's 151,936-token vocabulary the logits of a
16K-token micro-batch are 5 GB in bf16 and ~35 GB once the float32 softmax and its gradient exist, which is
what limits the context length, not the 1.5B weights. So the lm_head matmul, the log-softmax, the target gather
and the entropy are done tile by tile (tokens x vocabulary), saving only one float32 number per token for the
backward pass, which recomputes each tile's logits instead of storing them.

Everything else is a few lines of arithmetic written to match the definitions (verl/DeepScaleR, DAPO,
Dr. GRPO) and the float64 formulas in tests/test_grpo.py. Imports only torch: model.py imports from here.
"""
import torch
from torch.autograd.function import once_differentiable

# -----------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, group_size, eps=1e-6, scale_by_std=True):
    """rewards [N], consecutive groups of `group_size` answers to one prompt -> advantages [N] (float32).

    (r - group mean) / (group std + eps) with the unbiased std, as verl/DeepScaleR compute it; a group of one
    gets mean 0 and std 1 (verl's convention, so a lone answer keeps its raw reward). scale_by_std=False is
    Dr. GRPO's mean-only variant, which does not up-weight nearly-unanimous groups. All-equal groups give 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    if group_size == 1:
        mean, std = torch.zeros_like(r), torch.ones_like(r)
    else:
        mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)  # torch.std is unbiased by default
    adv = r - mean
    if scale_by_std:
        adv = adv / (std + eps)
    return adv.view(-1)


def expand_to_tokens(values, cu_seqlens):
    """Per-sequence values [S] -> per-token values [N] of a packed batch with boundaries cu_seqlens [S+1]
    (e.g. a sequence's advantage on each of its tokens, as DeepScaleR broadcasts it)."""
    if cu_seqlens.dim() != 1 or values.shape != (cu_seqlens.numel() - 1,):
        raise ValueError(f"expand_to_tokens: values {tuple(values.shape)} needs cu_seqlens of length S+1, "
                         f"got {tuple(cu_seqlens.shape)}")
    return torch.repeat_interleave(values, cu_seqlens.diff())

# -----------------------------------------------------------------------------
# Token log-probs without materialised logits

_TILE_BYTES = 128 * 2**20  # one float32 tile of logits; forward/backward hold about three at once
_cuda_out_dtype = True     # whether torch.mm(..., out_dtype=float32) works here (torch >= 2.8-ish on CUDA)


def _mm_f32(a, b):
    """a @ b as float32. 16-bit inputs go through the tensor cores with float32 accumulation; where torch can
    hand back that accumulator (CUDA, mm's out_dtype) we skip rounding every logit to bf16 first, which would
    cost ~|logit| * 2^-9 of log-prob accuracy."""
    global _cuda_out_dtype
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _cuda_out_dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # this torch has no out_dtype: round to bf16, then widen
            _cuda_out_dtype = False
    return (a @ b).float()


def _mm_acc(acc, a, b):
    """acc + a @ b in float32; acc None starts the sum (no zero-filled buffer)."""
    if acc is None:
        return _mm_f32(a, b)
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    return acc.add_(_mm_f32(a, b))


def _tile_logits(h, w, inv_temp):
    """Float32 logits [tokens, vocab slice] of one tile, already divided by the temperature."""
    z = _mm_f32(h, w.t())
    return z.mul_(inv_temp) if inv_temp != 1.0 else z


def _local_targets(targets, v0, width):
    """Column of each target inside the vocabulary slice [v0, v0+width), and whether it is there at all.
    Clamp + mask instead of boolean indexing keeps the GPU free of host syncs."""
    inside = (targets >= v0) & (targets < v0 + width)
    return (targets - v0).clamp(0, width - 1), inside


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, want_entropy, chunk_tokens, chunk_vocab):
        n, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else None
        for t0 in range(0, n, chunk_tokens):
            h, y = hidden[t0:t0 + chunk_tokens], targets[t0:t0 + chunk_tokens]
            # NaN until the target's slice is seen: an out-of-range target id shows up as NaN, not a silent value
            z_y = torch.full((h.shape[0],), float("nan"), device=h.device)
            tile_lse, tile_ent = [], []
            for v0 in range(0, vocab, chunk_vocab):
                z = _tile_logits(h, weight[v0:v0 + chunk_vocab], inv_temp)
                col, inside = _local_targets(y, v0, z.shape[1])
                z_y = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), z_y)
                l = torch.logsumexp(z, dim=1)
                tile_lse.append(l)
                if want_entropy:  # entropy of the softmax within this slice: -sum q log q
                    log_q = z.sub_(l[:, None])
                    tile_ent.append(-(log_q.exp() * log_q).sum(1))
            tile_lse = torch.stack(tile_lse)           # [slices, tokens]
            lse_c = torch.logsumexp(tile_lse, dim=0)   # online log-sum-exp, merged once per token chunk
            lse[t0:t0 + chunk_tokens] = lse_c
            logp[t0:t0 + chunk_tokens] = z_y - lse_c
            if want_entropy:
                # p = w_s * q on slice s with w_s = exp(lse_s - lse), so H = sum_s w_s (H_s + lse - lse_s):
                # no cancellation between two large numbers as in lse - sum(p z)
                w_s = (tile_lse - lse_c).exp()
                ent[t0:t0 + chunk_tokens] = (w_s * (torch.stack(tile_ent) + lse_c - tile_lse)).sum(0)
        ctx.set_materialize_grads(False)  # an unused entropy output then costs nothing in backward
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temp, ctx.chunk_tokens, ctx.chunk_vocab = inv_temp, chunk_tokens, chunk_vocab
        return (logp, ent) if want_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None and grad_ent is None or not (need_h or need_w):
            return None, None, None, None, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        ct, cv, inv_t = ctx.chunk_tokens, ctx.chunk_vocab, ctx.inv_temp
        # d/dz_j of logp_y is [j=y] - p_j and of H is -p_j (log p_j + H); z = logits / T adds a factor 1/T
        g = (grad_logp.float() if grad_logp is not None else torch.zeros_like(lse)) * inv_t
        ge = grad_ent.float() * inv_t if grad_ent is not None else None
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if need_w else None
        # vocabulary outermost: each weight slice's gradient is complete after one sweep over the tokens, so its
        # float32 accumulator is a slice (not a 0.9 GB copy of the whole lm_head) and is cast only once
        for v0 in range(0, vocab, cv):
            w = weight[v0:v0 + cv]
            acc_w = None
            for t0 in range(0, n, ct):
                h, y, g_c = hidden[t0:t0 + ct], targets[t0:t0 + ct], g[t0:t0 + ct]
                log_p = _tile_logits(h, w, inv_t).sub_(lse[t0:t0 + ct, None])
                p = log_p.exp()
                if ge is not None:  # -(g + ge (log p + H)), built in place over log_p
                    neg_coef = log_p.add_(ent[t0:t0 + ct, None]).mul_(-ge[t0:t0 + ct, None]).sub_(g_c[:, None])
                else:
                    neg_coef = -g_c[:, None]
                dz = p.mul_(neg_coef)  # -p (g + ge (log p + H)); the target's +g is added next
                col, inside = _local_targets(y, v0, dz.shape[1])
                dz.scatter_add_(1, col[:, None], torch.where(inside, g_c, 0.0)[:, None])
                dz = dz.to(hidden.dtype)
                if need_h:
                    _mm_acc(grad_h[t0:t0 + ct], dz, w)
                if need_w and n <= ct:  # one token chunk: nothing to accumulate, write the slice directly
                    torch.mm(dz.t(), h, out=grad_w[v0:v0 + cv])
                elif need_w:
                    acc_w = _mm_acc(acc_w, dz.t(), h)
            if acc_w is not None:
                grad_w[v0:v0 + cv] = acc_w
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        return grad_h, grad_w, None, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                   chunk_tokens=None, chunk_vocab=None):
    """log_softmax(hidden @ weight.T / temperature) at `targets`, never holding more than a tile of logits.

    hidden [..., H] and weight [V, H] (the lm_head; both float32 or both bf16/fp16, float32 accumulation),
    targets [...] int64 -> log-probs [...] float32, plus the entropy [...] of the same distribution when
    return_entropy. Differentiable in hidden and weight (either may not require grad, e.g. the reference
    model). A tile is chunk_tokens x chunk_vocab logits; the defaults keep it near 128 MB of float32.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [..., H] and [V, H]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if targets.shape != hidden.shape[:-1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be integer ids of shape {tuple(hidden.shape[:-1])}, "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    lead = targets.shape
    vocab = weight.shape[0]
    cv = int(chunk_vocab or min(vocab, 8192))
    ct = int(chunk_tokens or max(16, _TILE_BYTES // (4 * cv)))
    # the caller's autocast must not reach inside: it would round the forward's logits to bf16 while the
    # backward (which runs outside autocast) recomputes them in float32 against that forward's log-sum-exp
    with torch.autocast(hidden.device.type, enabled=False):
        out = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
                                   1.0 / float(temperature), bool(return_entropy), max(1, ct), max(1, cv))
    # not a view when no reshape is needed (the model's [N] case): an in-place op on a view returned by an
    # FSDP-wrapped forward would skip its pre-backward hook (FSDP2 warns about exactly that)
    own = lambda t: t if t.shape == lead else t.view(lead)  # noqa: E731
    return (own(out[0]), own(out[1])) if return_entropy else own(out)

# -----------------------------------------------------------------------------
# The loss

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "micro-batch-mean")


def _seq_token_counts(mask, cu_seqlens):
    """(masked tokens of each sequence [S], that count broadcast to every token) for padded [B, T] rows or a
    packed [N] batch with boundaries cu_seqlens [S+1]."""
    if mask.dim() == 2:
        per_seq = mask.sum(1)
        return per_seq, per_seq[:, None].expand_as(mask)
    if cu_seqlens is None:
        raise ValueError("policy_loss: sequence-level aggregation of a packed [N] batch needs cu_seqlens")
    seq_of_token = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=mask.device),
                                           cu_seqlens.diff())
    if seq_of_token.numel() != mask.numel():
        raise ValueError(f"policy_loss: cu_seqlens covers {seq_of_token.numel()} tokens, mask has {mask.numel()}")
    per_seq = torch.zeros(cu_seqlens.numel() - 1, device=mask.device).index_add_(0, seq_of_token, mask)
    return per_seq, per_seq[seq_of_token]


def loss_normaliser(mask, loss_agg="token-mean", cu_seqlens=None):
    """This micro-batch's share of the denominator: masked tokens (token-mean) or non-empty sequences
    (seq-mean-*). The trainer sums it over its micro-batches and all-reduces it over ranks, then passes the
    total as policy_loss(normaliser=...), so that the per-micro-batch losses *add up* to the mini-batch mean.
    (FSDP/DDP average gradients over ranks: multiply the loss by the world size to get the sum back.)"""
    m = mask.float()
    if loss_agg in ("token-mean", "micro-batch-mean"):
        return m.sum()
    if loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        return (_seq_token_counts(m, cu_seqlens)[0] > 0).sum().float()
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def _token_weights(mask, loss_agg, normaliser, max_len, cu_seqlens):
    """Weight of each token in the loss, so that loss = sum(weight * per-token loss) for every aggregation."""
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    # counts are integers: clamping at 1 keeps an empty micro-batch at loss 0 instead of 0/0
    norm = torch.as_tensor(normaliser, dtype=torch.float32, device=mask.device).clamp(min=1) \
        if normaliser is not None else None
    if loss_agg == "token-mean":
        return mask / (norm if norm is not None else mask.sum().clamp(min=1))
    if loss_agg == "micro-batch-mean":
        # DeepScaleR's own: a mean over this micro-batch's tokens, then divided by its gradient-accumulation
        # count (normaliser), so a micro-batch's tokens weigh more the fewer there are
        w = mask / mask.sum().clamp(min=1)
        return w / norm if norm is not None else w
    per_seq, per_token = _seq_token_counts(mask, cu_seqlens)
    n_seq = norm if norm is not None else (per_seq > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return mask / per_token.clamp(min=1) / n_seq
    if max_len is None:  # Dr. GRPO: token sum over a constant, the generation budget, not each answer's length
        raise ValueError("policy_loss: loss_agg='seq-mean-token-sum-norm' needs max_len (the generation budget)")
    return mask / float(max_len) / n_seq


def _check_shapes(logp, old_logp, ref_logp, advantages, mask, entropy):
    if logp.dim() not in (1, 2):
        raise ValueError(f"policy_loss: logp must be padded [B, T] or packed [N], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    ok = advantages.shape == logp.shape or (logp.dim() == 2 and advantages.shape == logp.shape[:1])
    if not ok:
        raise ValueError(f"policy_loss: advantages {tuple(advantages.shape)} must be [B] or [B, T] for padded "
                         f"logp {tuple(logp.shape)}, or per-token [N] for packed")


def _masked_extreme(x, m, reduce):
    """max or min of x over the mask; 1.0 (a neutral ratio) when the mask is empty, even for 0 tokens."""
    fill = -torch.inf if reduce is torch.amax else torch.inf
    vals = torch.cat([torch.where(m, x, fill).reshape(-1), x.new_full((1,), fill)])
    return torch.where(m.any(), reduce(vals), 1.0)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.001, entropy=None,
                entropy_coef=0.0, *, clip_eps_high=None, dual_clip_c=None, loss_agg="token-mean",
                normaliser=None, max_len=None, cu_seqlens=None):
    """GRPO/PPO loss over the masked tokens -> (loss, metrics).

    Padded: logp/old_logp/ref_logp/mask/entropy [B, T], advantages [B] (or [B, T]). Packed: all [N].
    old_logp None means on-policy (ratio 1, gradient A * grad logp); ref_logp may be None when kl_coef is 0.
    Per token: surrogate max(-A r, -A clip(r, 1-clip_eps, 1+clip_eps_high)) with r = exp(logp - old_logp)
    (dual_clip_c bounds it by -A c where A < 0), KL = k3 = exp(ref - logp) - (ref - logp) - 1 clamped to
    [-10, 10], and loss = agg(surrogate) + kl_coef agg(KL) - entropy_coef agg(entropy).
    loss_agg: "token-mean" (every masked token alike), "seq-mean-token-mean", "seq-mean-token-sum-norm"
    (Dr. GRPO; needs max_len), "micro-batch-mean" (DeepScaleR's own). normaliser: the global count from
    loss_normaliser() summed over micro-batches and ranks, instead of this micro-batch's own count.
    Metrics are detached tensors (no host sync): token means over this micro-batch's mask, and its token count.
    """
    _check_shapes(logp, old_logp, ref_logp, advantages, mask, entropy)
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("policy_loss: kl_coef != 0 needs ref_logp")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("policy_loss: entropy_coef != 0 needs entropy")
    m = mask.bool()
    # padding may hold anything (inf, nan): zero it before exp so no nan leaks into values or gradients
    zero = lambda t: torch.where(m, t.float(), 0.0)  # noqa: E731
    logp = zero(logp)
    old = zero(old_logp) if old_logp is not None else logp.detach()
    adv = advantages.float()
    adv = zero(adv[:, None].expand_as(logp) if adv.shape != logp.shape else adv)

    ratio = torch.exp(logp - old)
    lo, hi = clip_eps, clip_eps if clip_eps_high is None else clip_eps_high
    surr, surr_clipped = -adv * ratio, -adv * ratio.clamp(1.0 - lo, 1.0 + hi)
    pg = torch.maximum(surr, surr_clipped)
    if dual_clip_c is not None:  # with A < 0 an exploding ratio would otherwise give an unbounded loss
        if dual_clip_c <= 1.0:
            raise ValueError(f"policy_loss: dual_clip_c must be > 1, got {dual_clip_c}")
        pg_term = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip_c), pg)
    else:
        pg_term = pg
    per_token = pg_term
    kl = None
    if ref_logp is not None:
        d = zero(ref_logp) - logp  # k3 estimator of KL(pi || ref): unbiased, non-negative, low variance
        kl = (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
        per_token = per_token + kl_coef * kl
    if entropy is not None:
        per_token = per_token - entropy_coef * zero(entropy)

    w = _token_weights(m.float(), loss_agg, normaliser, max_len, cu_seqlens)
    loss = (w * per_token).sum()

    with torch.no_grad():
        mf = m.float()
        n = mf.sum()
        mean = lambda t: (t * mf).sum() / n.clamp(min=1)  # noqa: E731
        metrics = {"tokens": n, "pg_loss": mean(pg_term),
                   "clip_frac": mean((surr_clipped > surr).float()),
                   "ratio_mean": mean(ratio),
                   "ratio_max": _masked_extreme(ratio, m, torch.amax),
                   "ratio_min": _masked_extreme(ratio, m, torch.amin),
                   "approx_kl_old": mean(old - logp)}
        if dual_clip_c is not None:
            metrics["dual_clip_frac"] = mean((pg_term < pg).float())
        if kl is not None:
            metrics["kl"] = mean(kl)
        if entropy is not None:
            metrics["entropy"] = mean(zero(entropy))
    return loss, metrics
