"""
The GRPO objective in one file: group-normalised advantages, memory-flat token log-probs, the clipped
surrogate with a k3 KL penalty and an entropy bonus; its aggregations (DeepScaleR's exact one among them),
GSPO and CISPO beside it, and the rollout/trainer-gap corrections (truncated / masked importance sampling).

The one piece of engineering here is `token_logprobs`. With Qwen2's 151,936-token vocabulary the logits of a
16K-token micro-batch are 5 GB in bf16 and ~35 GB once the float32 softmax and its gradient exist, which is
what limits the context length, not the 1.5B weights. So the lm_head matmul, the log-softmax, the target gather
and the entropy are done tile by tile (tokens x vocabulary), saving only one float32 number per token for the
backward pass, which recomputes each tile's logits instead of storing them.

Everything else is a few lines of arithmetic written to match the definitions (verl/DeepScaleR, DAPO,
Dr. GRPO, GSPO, CISPO, TIS/MIS) and the float64 formulas in tests/test_grpo.py. Imports only torch: model.py imports from here.
"""
import math

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

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "deepscaler",
             "mean-of-micro-batch-means")
OBJECTIVES = ("grpo", "gspo", "cispo")
RENAMED_AGGS = {"micro-batch-mean": "mean-of-micro-batch-means"}


def check_loss_agg(loss_agg):
    if loss_agg in RENAMED_AGGS:
        raise ValueError(f"loss_agg {loss_agg!r} was renamed {RENAMED_AGGS[loss_agg]!r} (it is not what DeepScaleR "
                         "did; that is 'deepscaler')")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def check_options(loss_agg="token-mean", objective="grpo", tis_c=None, mis_c=None, mis_level="token", top_p=1.0,
                  top_k=-1):
    """ValueError naming the option for a bad combination of the loss switches."""
    check_loss_agg(loss_agg)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, c in (("tis_c", tis_c), ("mis_c", mis_c)):
        if c is not None and not c > 1.0:
            raise ValueError(f"{name} must be > 1 (the importance-ratio bound C), got {c}")
    if mis_level not in ("token", "sequence"):
        raise ValueError(f"mis_level must be 'token' or 'sequence', got {mis_level!r}")
    if (tis_c or mis_c) and (top_p < 1.0 or (top_k or 0) > 0):
        raise ValueError("tis_c / mis_c compare pi_old with the engine's sampled log-probs, which are of the "
                         "unfiltered log_softmax(z / T); with top_p < 1 or top_k set that is not the distribution "
                         f"sampled from (top_p={top_p}, top_k={top_k}): set top_p=1.0 and top_k=-1, or turn "
                         "TIS/MIS off")


def _seq_ids(mask, cu_seqlens):
    """Sequence index of every token: the row of a padded [B, T] batch, or from boundaries cu_seqlens [S+1]."""
    if mask.dim() == 2:
        return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask), mask.shape[0]
    if cu_seqlens is None:
        raise ValueError("policy_loss: sequence-level terms of a packed [N] batch need cu_seqlens")
    ids = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=mask.device), cu_seqlens.diff())
    if ids.numel() != mask.numel():
        raise ValueError(f"policy_loss: cu_seqlens covers {ids.numel()} tokens, mask has {mask.numel()}")
    return ids, cu_seqlens.numel() - 1


def _segment_sum(x, ids, n):
    """Sums of x [B, T] or [N] per id (ids the same shape), as [n]."""
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, ids.reshape(-1), x.reshape(-1))


def _seq_token_counts(mask, cu_seqlens):
    """(masked tokens of each sequence [S], that count broadcast to every token)."""
    ids, n = _seq_ids(mask, cu_seqlens)
    per_seq = _segment_sum(mask.float(), ids, n)
    return per_seq, per_seq[ids]


def _check_segments(mask, segments, num_segments):
    if segments is None or segments.shape != mask.shape:
        raise ValueError("policy_loss: loss_agg='deepscaler' needs segments (each token's verl micro-batch, the "
                         f"shape of mask {tuple(mask.shape)})")
    return int(num_segments) if num_segments is not None else int(segments.max()) + 1 if segments.numel() else 1


def loss_normaliser(mask, loss_agg="token-mean", cu_seqlens=None, segments=None, num_segments=None):
    """This micro-batch's share of the denominator: masked tokens (token-mean), non-empty sequences
    (seq-mean-*), 1 if it has any masked token (mean-of-micro-batch-means), or for "deepscaler" the masked
    tokens of each verl micro-batch (segment) as a vector [num_segments]. The trainer sums it over its
    micro-batches and all-reduces it over ranks, then passes the total as policy_loss(normaliser=...), so
    that the per-micro-batch losses *add up* to the mini-batch's loss. (FSDP/DDP average gradients over
    ranks: multiply the loss by the world size to get the sum back.) A token the mask drops (overlong
    filter, MIS) is in neither numerator nor denominator, of every aggregation."""
    check_loss_agg(loss_agg)
    m = mask.float()
    if loss_agg == "token-mean":
        return m.sum()
    if loss_agg == "mean-of-micro-batch-means":
        return (m.sum() > 0).float()
    if loss_agg == "deepscaler":
        return _segment_sum(m, segments, _check_segments(mask, segments, num_segments))
    return (_seq_token_counts(m, cu_seqlens)[0] > 0).sum().float()


def _token_weights(mask, loss_agg, normaliser, max_len, cu_seqlens, segments, num_segments):
    """Weight of each token in the loss, so that loss = sum(weight * per-token loss) for every aggregation."""
    check_loss_agg(loss_agg)
    # counts are integers: clamping at 1 keeps an empty micro-batch at loss 0 instead of 0/0
    norm = torch.as_tensor(normaliser, dtype=torch.float32, device=mask.device).clamp(min=1) \
        if normaliser is not None else None
    if loss_agg == "token-mean":
        return mask / (norm if norm is not None else mask.sum().clamp(min=1))
    if loss_agg == "mean-of-micro-batch-means":
        # each micro-batch's token mean, averaged over the micro-batches of all ranks (normaliser: their count),
        # so a micro-batch's tokens weigh more the fewer there are. Depends on how this run packs.
        w = mask / mask.sum().clamp(min=1)
        return w / norm if norm is not None else w
    if loss_agg == "deepscaler":
        # DeepScaleR's verl: a token mean inside each of its micro-batches, summed (accumulation divisor 1),
        # averaged over its GPUs by FSDP. normaliser: each micro-batch's tokens x its GPU count, so the weights
        # do not depend on how *this* run packs or how many ranks it has.
        n = _check_segments(mask, segments, num_segments)
        denom = norm if norm is not None else _segment_sum(mask, segments, n).clamp(min=1)
        if denom.shape != (n,):
            raise ValueError(f"policy_loss: loss_agg='deepscaler' needs a normaliser per segment ({n}), "
                             f"got shape {tuple(denom.shape)}")
        return mask / denom[segments]
    per_seq, per_token = _seq_token_counts(mask, cu_seqlens)
    n_seq = norm if norm is not None else (per_seq > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return mask / per_token.clamp(min=1) / n_seq
    if max_len is None:  # Dr. GRPO: token sum over a constant, the generation budget, not each answer's length
        raise ValueError("policy_loss: loss_agg='seq-mean-token-sum-norm' needs max_len (the generation budget)")
    return mask / float(max_len) / n_seq


def _check_shapes(logp, old_logp, ref_logp, advantages, mask, entropy, is_weight):
    if logp.dim() not in (1, 2):
        raise ValueError(f"policy_loss: logp must be padded [B, T] or packed [N], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy),
                    ("is_weight", is_weight)):
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

# -----------------------------------------------------------------------------
# The rollout/trainer gap: the engine sampled from pi_rollout (bf16, its own kernels), the trainer's pi_old is
# recomputed in another layout and precision. rho = pi_old / pi_rollout per token, against the engine's sampled
# log-probs, which are of the unfiltered log_softmax(z / T): only valid without top-p / top-k filtering.


def _log_rho(old_logp, rollout_logp, mask):
    """log(pi_old / pi_rollout) on the mask (0 elsewhere), float32, no gradient."""
    return torch.where(mask.bool(), old_logp.detach().float() - rollout_logp.float(), 0.0)


def rollout_ratio(old_logp, rollout_logp, mask):
    """rho = pi_old / pi_rollout on the mask (1 elsewhere); capped at e^80 so it stays finite."""
    return torch.exp(_log_rho(old_logp, rollout_logp, mask).clamp(max=80.0))


def mis_keep(old_logp, rollout_logp, mask, c, level="token", cu_seqlens=None):
    """Masked importance sampling: which tokens keep their loss. level "token": those with rho in [1/c, c];
    "sequence": whole answers whose length-normalised ratio exp(mean log rho) is in [1/c, c] (the product over
    thousands of tokens would leave any fixed band). Returns a float mask, a subset of `mask`."""
    if c is None or c <= 1.0:
        raise ValueError(f"mis_keep: c must be > 1, got {c}")
    m = mask.float()
    log_rho = _log_rho(old_logp, rollout_logp, mask)
    if level == "token":
        inside = log_rho.abs() <= math.log(c)
    elif level == "sequence":
        ids, n = _seq_ids(m, cu_seqlens)
        mean = _segment_sum(log_rho * m, ids, n) / _segment_sum(m, ids, n).clamp(min=1)
        inside = mean[ids].abs() <= math.log(c)
    else:
        raise ValueError(f"mis_keep: level must be 'token' or 'sequence', got {level!r}")
    return m * inside.float()


def is_weights(old_logp, rollout_logp, mask, tis_c=None):
    """Truncated importance sampling: weight min(rho, tis_c) for the policy-gradient term (None: no TIS),
    and this micro-batch's metrics over the mask: rho's mean, max and min, its mean square (for the
    effective sample size (sum w)^2 / (n sum w^2) of the weights used: rho, or min(rho, C) under TIS) and
    the fraction truncated."""
    m = mask.bool()
    rho = rollout_ratio(old_logp, rollout_logp, mask)
    w = rho.clamp(max=tis_c) if tis_c is not None else None
    used = w if w is not None else rho
    mf = m.float()
    n = mf.sum().clamp(min=1)
    met = {"is_ratio_mean": (rho * mf).sum() / n, "is_ratio_max": _masked_extreme(rho, m, torch.amax),
           "is_ratio_min": _masked_extreme(rho, m, torch.amin), "is_weight_mean": (used * mf).sum() / n,
           "is_weight_sq_mean": (used.square() * mf).sum() / n}
    if tis_c is not None:
        met["is_truncated_frac"] = ((rho > tis_c).float() * mf).sum() / n
    return w, met

# -----------------------------------------------------------------------------
# The loss


def _ratio(logp, old, m, objective, cu_seqlens):
    """The importance ratio each token's surrogate uses. GSPO: the sequence's length-normalised ratio
    s = exp(mean over its tokens of (logp - old)) on every token, with the gradient of GSPO-token
    (sg[s] * pi / sg[pi]): d s_t = s * d logp_t, so that a sequence-mean aggregation gives GSPO's gradient."""
    if objective != "gspo":
        return torch.exp(logp - old)
    mf = m.float()
    ids, n = _seq_ids(mf, cu_seqlens)
    mean = _segment_sum((logp - old).detach() * mf, ids, n) / _segment_sum(mf, ids, n).clamp(min=1)
    return torch.exp(mean[ids] + logp - logp.detach())


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.001, entropy=None,
                entropy_coef=0.0, *, clip_eps_high=None, dual_clip_c=None, loss_agg="token-mean",
                normaliser=None, max_len=None, cu_seqlens=None, segments=None, num_segments=None,
                objective="grpo", is_weight=None):
    """GRPO/PPO loss over the masked tokens -> (loss, metrics).

    Padded: logp/old_logp/ref_logp/mask/entropy [B, T], advantages [B] (or [B, T]). Packed: all [N].
    old_logp None means on-policy (ratio 1, gradient A * grad logp); ref_logp may be None when kl_coef is 0.
    Per token, objective "grpo": surrogate max(-A r, -A clip(r, 1-clip_eps, 1+clip_eps_high)) with
    r = exp(logp - old_logp) (dual_clip_c bounds it by -A c where A < 0); "gspo": the same with r the
    sequence's length-normalised ratio (clipped per sequence, see _ratio); "cispo": -sg(clip(r)) A logp, so
    clipped tokens keep a gradient. is_weight (e.g. TIS, no gradient) multiplies that policy-gradient term.
    KL = k3 = exp(ref - logp) - (ref - logp) - 1 clamped to [-10, 10]; loss = agg(pg) + kl_coef agg(KL)
    - entropy_coef agg(entropy).
    loss_agg: "token-mean" (every masked token alike), "seq-mean-token-mean", "seq-mean-token-sum-norm"
    (Dr. GRPO; needs max_len), "deepscaler" (token mean per verl micro-batch: needs segments, each token's
    micro-batch), "mean-of-micro-batch-means". normaliser: the global count from loss_normaliser() summed
    over micro-batches and ranks (for "deepscaler" times verl's GPU count), instead of this micro-batch's own.
    Metrics are detached tensors (no host sync): token means over this micro-batch's mask, and its token count.
    """
    _check_shapes(logp, old_logp, ref_logp, advantages, mask, entropy, is_weight)
    if objective not in OBJECTIVES:
        raise ValueError(f"policy_loss: objective must be one of {OBJECTIVES}, got {objective!r}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("policy_loss: kl_coef != 0 needs ref_logp")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("policy_loss: entropy_coef != 0 needs entropy")
    if dual_clip_c is not None and objective != "grpo":
        raise ValueError(f"policy_loss: dual_clip_c applies to objective 'grpo' only, not {objective!r}")
    m = mask.bool()
    # padding may hold anything (inf, nan): zero it before exp so no nan leaks into values or gradients
    zero = lambda t: torch.where(m, t.float(), 0.0)  # noqa: E731
    logp = zero(logp)
    old = zero(old_logp) if old_logp is not None else logp.detach()
    adv = advantages.float()
    adv = zero(adv[:, None].expand_as(logp) if adv.shape != logp.shape else adv)

    ratio = _ratio(logp, old, m, objective, cu_seqlens)
    lo, hi = clip_eps, clip_eps if clip_eps_high is None else clip_eps_high
    clipped_ratio = ratio.clamp(1.0 - lo, 1.0 + hi)
    if objective == "cispo":
        pg_term = -adv * clipped_ratio.detach() * logp
        clipped = (ratio.detach() != clipped_ratio.detach()).float()
    else:
        surr, surr_clipped = -adv * ratio, -adv * clipped_ratio
        pg = torch.maximum(surr, surr_clipped)
        clipped = (surr_clipped > surr).float()
        pg_term = pg
        if dual_clip_c is not None:  # with A < 0 an exploding ratio would otherwise give an unbounded loss
            if dual_clip_c <= 1.0:
                raise ValueError(f"policy_loss: dual_clip_c must be > 1, got {dual_clip_c}")
            pg_term = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip_c), pg)
    per_token = pg_term if is_weight is None else pg_term * zero(is_weight).detach()
    kl = None
    if ref_logp is not None:
        d = zero(ref_logp) - logp  # k3 estimator of KL(pi || ref): unbiased, non-negative, low variance
        kl = (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
        per_token = per_token + kl_coef * kl
    if entropy is not None:
        per_token = per_token - entropy_coef * zero(entropy)

    w = _token_weights(m.float(), loss_agg, normaliser, max_len, cu_seqlens, segments, num_segments)
    loss = (w * per_token).sum()

    with torch.no_grad():
        mf = m.float()
        n = mf.sum()
        mean = lambda t: (t * mf).sum() / n.clamp(min=1)  # noqa: E731
        metrics = {"tokens": n, "pg_loss": mean(pg_term), "clip_frac": mean(clipped),
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
