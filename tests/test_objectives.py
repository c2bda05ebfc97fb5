"""The terms added beside GRPO's clipped surrogate, each against float64 formulas written from its definition
(value AND gradient): DeepScaleR's aggregation ("deepscaler"), GSPO, CISPO, truncated and masked importance
sampling (TIS / MIS) against the engine's log-probs, and the switches' errors. Under a second in all."""
import math

import pytest
import torch

from grpo import (check_options, is_weights, loss_normaliser, mis_keep, policy_loss)
from test_grpo import random_batch, ref_policy_loss

f64 = torch.float64


def agg_rows(rows, agg, max_len=None, segments=None, gpus=1):
    """Aggregate per-row lists of float64 per-token terms the way each loss_agg defines it."""
    nonempty = [r for r in rows if r]
    flat = [x for r in rows for x in r]
    if not flat:
        return torch.zeros((), dtype=f64)
    if agg == "token-mean":
        return sum(flat) / len(flat)
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    if agg == "seq-mean-token-sum-norm":
        return sum(sum(r) / max_len for r in nonempty) / len(nonempty)
    if agg == "deepscaler":  # each segment's token mean, summed, over the GPU count
        by_seg = {}
        for r, seg in zip(rows, segments):
            by_seg.setdefault(seg, []).extend(r)
        return sum(sum(v) / len(v) for v in by_seg.values() if v) / gpus
    raise ValueError(agg)


def masked_rows(values, mask):
    """[B, T] float64 tensor -> per-row lists of the masked entries (autograd kept)."""
    return [[values[b, t] for t in range(values.shape[1]) if mask[b, t]] for b in range(values.shape[0])]


AGGS = [("token-mean", {}), ("seq-mean-token-mean", {}), ("seq-mean-token-sum-norm", {"max_len": 10}),
        ("deepscaler", {})]
SEGMENTS = [0, 1, 1, 0]  # row -> its verl micro-batch (row 2 is empty)


def agg_kwargs(agg, extra, mask):
    kw = dict(loss_agg=agg, **extra)
    if agg == "deepscaler":
        kw["segments"] = torch.tensor(SEGMENTS)[:, None].expand_as(mask).contiguous()
    return kw


def kl_entropy_part(logp, ref, mask, ent, agg, extra, kl_coef=0.05, ent_coef=0.01):
    d = ref - logp
    kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    return agg_rows(masked_rows(kl_coef * kl - ent_coef * ent, mask), agg, extra.get("max_len"), SEGMENTS)


def check(loss, expect, params, atol_v=1e-6, atol_g=1e-7):
    assert torch.allclose(loss.double(), expect, atol=atol_v), (loss.item(), expect.item())
    for g, g_ref in zip(torch.autograd.grad(loss, params, retain_graph=True),
                        torch.autograd.grad(expect, params, retain_graph=True)):
        assert torch.allclose(g.double(), g_ref, atol=atol_g), (g, g_ref)
        assert g_ref.abs().max() > 0  # the comparison is not between two zeros

# -----------------------------------------------------------------------------
# DeepScaleR's aggregation


def test_deepscaler_agg_matches_formula_and_splits_exactly():
    """Token mean per segment (verl micro-batch), summed, over the GPU count; a micro-batch of this run may
    hold parts of several segments and a segment may span this run's micro-batches and ranks: with the
    global per-segment normaliser the pieces add up exactly."""
    logp, old, ref, adv, mask, ent = random_batch(b=6, t=9, seed=5)
    seg_of_row = [2, 0, 1, 0, 2, 1]
    segments = torch.tensor(seg_of_row)[:, None].expand_as(mask).contiguous()
    gpus = 4
    pg = [[torch.maximum(-adv[b] * torch.exp(logp[b, t] - old[b, t]),
                         -adv[b] * torch.clamp(torch.exp(logp[b, t] - old[b, t]), 0.8, 1.2))
           for t in range(9) if mask[b, t]] for b in range(6)]
    expect = agg_rows(pg, "deepscaler", segments=seg_of_row, gpus=gpus)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]  # this run's micro-batches, cutting across segments
    total = sum(loss_normaliser(mask[s], "deepscaler", segments=segments[s], num_segments=3) for s in parts)
    assert total.tolist() == [float(mask[[1, 3]].sum()), float(mask[[2, 5]].sum()), float(mask[[0, 4]].sum())]
    summed = sum(policy_loss(logp[s], old[s], None, adv[s], mask[s], kl_coef=0.0, loss_agg="deepscaler",
                             normaliser=total * gpus, segments=segments[s], num_segments=3)[0] for s in parts)
    check(summed, expect, (logp,))
    # one call, own counts (gpus 1): the plain sum of segment means
    alone, _ = policy_loss(logp, old, None, adv, mask, kl_coef=0.0, loss_agg="deepscaler", segments=segments)
    assert torch.allclose(alone.double(), expect * gpus, atol=1e-6)
    # not token-mean: the same tokens, weighted per segment
    tm, _ = policy_loss(logp, old, None, adv, mask, kl_coef=0.0)
    assert not torch.allclose(tm, alone, atol=1e-3)
    with pytest.raises(ValueError, match="segments"):
        policy_loss(logp, old, None, adv, mask, kl_coef=0.0, loss_agg="deepscaler")
    with pytest.raises(ValueError, match="normaliser per segment"):
        policy_loss(logp, old, None, adv, mask, kl_coef=0.0, loss_agg="deepscaler", segments=segments,
                    num_segments=3, normaliser=torch.ones(2))

# -----------------------------------------------------------------------------
# GSPO and CISPO


def ref_gspo_rows(logp, old, adv, mask, lo, hi):
    """Per row: GSPO's sequence loss L = max(-A s, -A clip(s)) with s = exp(mean_t(logp - old)) (autograd
    through s), repeated on each of the row's tokens, so that an aggregation weighs the row as it weighs its
    tokens (seq-mean-token-mean: L once per row)."""
    rows = []
    for b in range(logp.shape[0]):
        ts = [t for t in range(logp.shape[1]) if mask[b, t]]
        if not ts:
            rows.append([])
            continue
        s = torch.exp(sum(logp[b, t] - old[b, t] for t in ts) / len(ts))
        L = torch.maximum(-adv[b] * s, -adv[b] * torch.clamp(s, 1 - lo, 1 + hi))
        rows.append([L] * len(ts))  # the same sequence loss on each token (GSPO-token's value)
    return rows


@pytest.mark.parametrize("agg,extra", AGGS)
def test_gspo_matches_sequence_level_formula(agg, extra):
    """GSPO: one ratio per sequence, s = (pi/pi_old)^(1/|y|), clipped per sequence. With seq-mean-token-mean
    this is GSPO's objective exactly (mean over sequences of L); with token-mean each sequence is weighted by
    its token count, with deepscaler by its micro-batch's token mean. The gradient flows through s."""
    logp, old, ref, adv, mask, ent = random_batch(spread=0.15)
    lo, hi = 0.05, 0.08
    loss, met = policy_loss(logp, old, ref, adv, mask, clip_eps=lo, clip_eps_high=hi, kl_coef=0.05, entropy=ent,
                            entropy_coef=0.01, objective="gspo", **agg_kwargs(agg, extra, mask))
    expect = agg_rows(ref_gspo_rows(logp, old, adv, mask, lo, hi), agg, extra.get("max_len"), SEGMENTS) \
        + kl_entropy_part(logp, ref, mask, ent, agg, extra)
    check(loss, expect, (logp, ent))
    # the clip decision is per sequence: a row is clipped on all its tokens or none
    s = [math.exp(float(((logp.detach() - old) * mask).sum(1)[b] / mask[b].sum())) for b in (0, 1, 3)]
    clipped = [(adv[b] > 0 and x > 1 + hi) or (adv[b] < 0 and x < 1 - lo) for b, x in zip((0, 1, 3), s)]
    n = mask.sum(1).double()
    want = sum(float(n[b]) for b, c in zip((0, 1, 3), clipped) if c) / float(n.sum())
    assert abs(float(met["clip_frac"]) - want) < 1e-6 and 0 < want < 1


def test_gspo_packed_equals_padded_and_needs_cu_seqlens():
    logp, old, ref, adv, mask, ent = random_batch(spread=0.15)
    padded, _ = policy_loss(logp, old, None, adv, mask, kl_coef=0.0, objective="gspo", clip_eps=0.05,
                            loss_agg="seq-mean-token-mean")
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    pk = lambda t: t[mask]  # noqa: E731
    packed, _ = policy_loss(pk(logp), pk(old), None, torch.repeat_interleave(adv, lengths), torch.ones(int(cu[-1])),
                            kl_coef=0.0, objective="gspo", clip_eps=0.05, loss_agg="seq-mean-token-mean",
                            cu_seqlens=cu)
    assert torch.allclose(padded, packed, atol=1e-7)
    assert torch.allclose(torch.autograd.grad(padded, logp)[0], torch.autograd.grad(packed, logp)[0], atol=1e-7)
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_loss(pk(logp), pk(old), None, torch.zeros(int(cu[-1])), torch.ones(int(cu[-1])), kl_coef=0.0,
                    objective="gspo")


@pytest.mark.parametrize("agg,extra", AGGS)
def test_cispo_matches_formula_and_clipped_tokens_keep_a_gradient(agg, extra):
    """CISPO: -sg(clip(r, 1-lo, 1+hi)) A logp per token: the clipped weight is a constant coefficient, so a
    token whose ratio left the band still gets gradient -w A (PPO's clip would zero it)."""
    logp, old, ref, adv, mask, ent = random_batch()
    lo, hi = 0.2, 0.28
    loss, met = policy_loss(logp, old, ref, adv, mask, clip_eps=lo, clip_eps_high=hi, kl_coef=0.05, entropy=ent,
                            entropy_coef=0.01, objective="cispo", **agg_kwargs(agg, extra, mask))
    r = torch.exp(logp.detach() - old)
    w = torch.clamp(r, 1 - lo, 1 + hi)
    pg = -w * adv[:, None] * logp
    expect = agg_rows(masked_rows(pg, mask), agg, extra.get("max_len"), SEGMENTS) \
        + kl_entropy_part(logp, ref, mask, ent, agg, extra)
    check(loss, expect, (logp, ent))
    outside = ((r < 1 - lo) | (r > 1 + hi)) & mask
    assert outside.any() and torch.isclose(met["clip_frac"].double(), outside.double().sum() / mask.sum(), atol=1e-6)
    g = torch.autograd.grad(loss, logp)[0]
    assert (g[outside & (adv[:, None] != 0)] != 0).all()  # every clipped token still moves
    # PPO's clip gives some of those tokens no policy gradient at all
    ppo, _ = policy_loss(logp, old, None, adv, mask, clip_eps=lo, clip_eps_high=hi, kl_coef=0.0,
                         **agg_kwargs(agg, extra, mask))
    assert (torch.autograd.grad(ppo, logp)[0][outside] == 0).any()


def test_objective_errors():
    logp, old, ref, adv, mask, _ = random_batch()
    with pytest.raises(ValueError, match="objective"):
        policy_loss(logp, old, ref, adv, mask, objective="ppo2")
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(logp, old, ref, adv, mask, objective="cispo", dual_clip_c=3.0)

# -----------------------------------------------------------------------------
# Truncated / masked importance sampling against the engine's log-probs


def test_tis_weights_value_gradient_and_metrics():
    """TIS: each token's policy-gradient term times min(pi_old / pi_rollout, C), a constant (KL and entropy
    are not reweighted). Metrics: the ratio's mean/max/min over the mask, the fraction truncated, and the
    mean and mean square of the weights (for the effective sample size)."""
    logp, old, ref, adv, mask, ent = random_batch()
    g = torch.Generator().manual_seed(9)
    rollout = old + 0.6 * torch.randn(old.shape, generator=g, dtype=f64)
    C = 1.5
    w, met = is_weights(old, rollout, mask, tis_c=C)
    rho = torch.exp(old - rollout)
    assert torch.allclose(w[mask].double(), rho[mask].clamp(max=C), atol=1e-6)
    m = mask.double()
    assert torch.isclose(met["is_ratio_mean"].double(), (rho * m).sum() / m.sum(), atol=1e-6)
    assert torch.isclose(met["is_ratio_max"].double(), rho[mask].max(), rtol=1e-6)
    assert torch.isclose(met["is_ratio_min"].double(), rho[mask].min(), rtol=1e-6)
    frac = ((rho > C) & mask).double().sum() / m.sum()
    assert 0 < frac < 1 and torch.isclose(met["is_truncated_frac"].double(), frac)
    wd = rho.clamp(max=C)
    assert torch.isclose(met["is_weight_sq_mean"].double(), (wd ** 2 * m).sum() / m.sum(), atol=1e-6)
    loss, _ = policy_loss(logp, old, ref, adv, mask, kl_coef=0.05, entropy=ent, entropy_coef=0.01, is_weight=w)
    r = torch.exp(logp - old)
    pg = torch.maximum(-adv[:, None] * r, -adv[:, None] * torch.clamp(r, 0.8, 1.2)) * wd
    expect = agg_rows(masked_rows(pg, mask), "token-mean") + kl_entropy_part(logp, ref, mask, ent, "token-mean", {})
    check(loss, expect, (logp, ent))
    # no TIS: the metrics describe rho itself, and no weight is returned
    w0, met0 = is_weights(old, rollout, mask)
    assert w0 is None and "is_truncated_frac" not in met0
    assert torch.isclose(met0["is_weight_mean"], met0["is_ratio_mean"])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mis_masks_tokens_or_sequences_and_leaves_the_normaliser(level):
    """MIS keeps a token if rho is in [1/C, C] ("token") or its answer's exp(mean log rho) is ("sequence");
    the loss over the kept tokens equals the formula over them alone: dropped tokens are out of the
    numerator and of every aggregation's denominator (token counts, sequence counts, segment counts)."""
    logp, old, ref, adv, mask, ent = random_batch()
    g = torch.Generator().manual_seed(3)
    shift = torch.tensor([0.0, -0.5, 0.0, 0.1], dtype=f64)[:, None]  # row 1's answer drifted as a whole
    rollout = old + 0.5 * torch.randn(old.shape, generator=g, dtype=f64) + shift
    C = 1.4
    keep = mis_keep(old, rollout, mask, C, level)
    want = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[b, t]]
        for t in ts:
            x = float(old[b, t] - rollout[b, t]) if level == "token" else \
                sum(float(old[b, u] - rollout[b, u]) for u in ts) / len(ts)
            want[b, t] = 1 / C <= math.exp(x) <= C
    assert torch.equal(keep.bool(), want) and 0 < want.sum() < mask.sum()
    if level == "sequence":  # whole rows or nothing
        assert all(want[b][mask[b]].all() or not want[b].any() for b in range(mask.shape[0]))
    r = torch.exp(logp - old)
    d = ref - logp
    term = torch.maximum(-adv[:, None] * r, -adv[:, None] * torch.clamp(r, 0.8, 1.2)) \
        + 0.05 * torch.clamp(torch.exp(d) - d - 1, -10, 10) - 0.01 * ent
    for agg, extra in AGGS:
        kw = agg_kwargs(agg, extra, mask)
        loss, met = policy_loss(logp, old, ref, adv, keep, kl_coef=0.05, entropy=ent, entropy_coef=0.01, **kw)
        check(loss, agg_rows(masked_rows(term, want), agg, extra.get("max_len"), SEGMENTS), (logp, ent))
        assert met["tokens"] == want.sum()
        norm = loss_normaliser(keep, agg, segments=kw.get("segments"))
        if agg == "token-mean":
            assert norm == want.sum()
        if agg == "deepscaler":  # per segment: only the kept tokens count
            assert norm.tolist() == [float(want[[0, 3]].sum()), float(want[[1, 2]].sum())]
    # the MIS-masked tokens get no gradient at all
    loss, _ = policy_loss(logp, old, ref, adv, keep, kl_coef=0.05)
    assert (torch.autograd.grad(loss, logp)[0][mask & ~want] == 0).all()
    with pytest.raises(ValueError, match="level"):
        mis_keep(old, rollout, mask, C, "group")
    with pytest.raises(ValueError, match="c must be > 1"):
        mis_keep(old, rollout, mask, 1.0)


def test_options_refuse_filtered_sampling_and_bad_bounds():
    check_options("deepscaler", "gspo", tis_c=2.0, mis_c=3.0, mis_level="sequence", top_p=1.0, top_k=-1)
    for kw, match in ((dict(tis_c=2.0, top_p=0.95), "top_p < 1 or top_k"), (dict(mis_c=2.0, top_k=20), "top_k"),
                      (dict(tis_c=1.0), "tis_c must be > 1"), (dict(mis_c=0.5), "mis_c must be > 1"),
                      (dict(mis_level="group"), "mis_level"), (dict(objective="ppo"), "objective"),
                      (dict(loss_agg="micro-batch-mean"), "renamed"), (dict(loss_agg="sum"), "loss_agg")):
        with pytest.raises(ValueError, match=match):
            check_options(**kw)
    check_options(top_p=0.9, top_k=5)  # filtering alone is fine: it is only TIS/MIS that need the true pi_rollout
