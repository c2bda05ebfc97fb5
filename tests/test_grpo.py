"""grpo.py against straightforward float64 formulas: values, gradients and their signs, edges, memory."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grpo import (expand_to_tokens, group_advantages, loss_normaliser, policy_loss, token_logprobs)

f64 = torch.float64

# -----------------------------------------------------------------------------
# group_advantages


def test_group_advantages_matches_formula():
    torch.manual_seed(0)
    r = torch.rand(12, dtype=f64)
    adv = group_advantages(r, 4, eps=1e-6)
    for g in range(3):
        x = r[4 * g:4 * g + 4].tolist()
        mean = sum(x) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / 3)  # unbiased
        expect = [(v - mean) / (std + 1e-6) for v in x]
        assert torch.allclose(adv[4 * g:4 * g + 4].double(), torch.tensor(expect, dtype=f64), atol=1e-5)
    assert adv.dtype == torch.float32


def test_group_advantages_edges():
    # all-equal groups carry no signal: advantage exactly 0 (no 0/0)
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.equal(group_advantages(r, 3), torch.zeros(6))
    # a group of one: mean 0, std 1 (verl's convention)
    r = torch.tensor([1.0, 0.0, 0.5])
    assert torch.allclose(group_advantages(r, 1, eps=1e-6), r / (1 + 1e-6))
    # Dr. GRPO: mean only
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(r, 4, scale_by_std=False), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # binary rewards: the one correct answer of four is pushed up, the wrong ones down
    a = group_advantages(r, 4)
    assert a[0] > 0 and (a[1:] < 0).all()
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


def test_expand_to_tokens():
    cu = torch.tensor([0, 2, 2, 5])
    assert torch.equal(expand_to_tokens(torch.tensor([1.0, 2.0, 3.0]), cu), torch.tensor([1.0, 1, 3, 3, 3]))

# -----------------------------------------------------------------------------
# token_logprobs


def ref_logprobs(h, w, y, temperature):
    """float64 reference: the materialised log-softmax."""
    lp = torch.log_softmax(h.double() @ w.double().t() / temperature, dim=-1)
    return lp.gather(-1, y[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temperature,ct,cv", [(1.0, 8, 13), (0.6, 5, 64), (1.3, None, None)])
def test_token_logprobs_values_and_grads(temperature, ct, cv):
    torch.manual_seed(1)
    n, hd, v = 37, 16, 101
    h64 = torch.randn(n, hd, dtype=f64, requires_grad=True)
    w64 = (0.5 * torch.randn(v, hd, dtype=f64)).requires_grad_()
    y = torch.randint(0, v, (n,))
    g_lp, g_ent = torch.randn(n, dtype=f64), torch.randn(n, dtype=f64)
    lp_ref, ent_ref = ref_logprobs(h64, w64, y, temperature)
    gh_ref, gw_ref = torch.autograd.grad((lp_ref * g_lp).sum() + (ent_ref * g_ent).sum(), (h64, w64),
                                         retain_graph=True)

    h, w = h64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    lp, ent = token_logprobs(h, w, y, temperature, return_entropy=True, chunk_tokens=ct, chunk_vocab=cv)
    gh, gw = torch.autograd.grad((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum(), (h, w))
    assert lp.dtype == ent.dtype == torch.float32
    assert torch.allclose(lp.double(), lp_ref, atol=1e-5)
    assert torch.allclose(ent.double(), ent_ref, atol=1e-5)
    assert torch.allclose(gh.double(), gh_ref, atol=1e-4)
    assert torch.allclose(gw.double(), gw_ref, atol=1e-4)

    # log-probs alone (no entropy asked for) give the same values and the logp-only gradient
    lp2 = token_logprobs(h, w, y, temperature, chunk_tokens=ct, chunk_vocab=cv)
    gh2, gw2 = torch.autograd.grad((lp2 * g_lp.float()).sum(), (h, w))
    gh2_ref, gw2_ref = torch.autograd.grad((lp_ref * g_lp).sum(), (h64, w64))
    assert torch.allclose(lp2, lp)
    assert torch.allclose(gh2.double(), gh2_ref, atol=1e-4) and torch.allclose(gw2.double(), gw2_ref, atol=1e-4)


def test_token_logprobs_shapes_and_requires_grad():
    torch.manual_seed(2)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(30, 8)  # a reference model's frozen head: no weight gradient asked for
    y = torch.randint(0, 30, (2, 5))
    lp = token_logprobs(h, w, y, chunk_tokens=3, chunk_vocab=7)
    assert lp.shape == (2, 5)
    assert torch.allclose(lp.double(), ref_logprobs(h, w, y, 1.0)[0], atol=1e-5)
    lp.sum().backward()
    assert h.grad.shape == h.shape and w.grad is None
    # neither input requires grad (reference model under no_grad)
    with torch.no_grad():
        assert torch.equal(token_logprobs(h, w, y, chunk_tokens=3, chunk_vocab=7), lp.detach())
    # empty micro-batch
    h0 = torch.zeros(0, 8, requires_grad=True)
    w0 = torch.randn(30, 8, requires_grad=True)
    lp0, ent0 = token_logprobs(h0, w0, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert lp0.shape == ent0.shape == (0,)
    (lp0.sum() + ent0.sum()).backward()
    assert torch.equal(w0.grad, torch.zeros_like(w0))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, w, y.float())
    with pytest.raises(ValueError, match="bfloat16"):
        token_logprobs(h, w.bfloat16(), y)
    # an out-of-range id is loud (NaN), not a silently wrong log-prob
    assert token_logprobs(h[0], w, torch.tensor([0, 1, 2, 3, 30])).isnan().tolist() == [False] * 4 + [True]


@pytest.mark.parametrize("ct", [7, None])  # several token chunks (float32 accumulator) or one (direct write)
def test_token_logprobs_bf16(ct):
    torch.manual_seed(3)
    n, hd, v = 24, 32, 200
    h = torch.randn(n, hd).bfloat16().requires_grad_()
    w = (0.3 * torch.randn(v, hd)).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,))
    lp, ent = token_logprobs(h, w, y, return_entropy=True, chunk_tokens=ct, chunk_vocab=50)
    (lp.sum() + ent.sum()).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lp_ref, ent_ref = ref_logprobs(h64, w64, y, 1.0)
    (lp_ref.sum() + ent_ref.sum()).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    # logits are rounded to bf16 on CPU (|z| ~ 3 here): errors ~1e-2, gradients to bf16 precision
    assert torch.allclose(lp.double(), lp_ref, atol=5e-2) and torch.allclose(ent.double(), ent_ref, atol=5e-2)
    assert torch.allclose(h.grad.double(), h64.grad, atol=5e-2, rtol=2e-2)
    assert torch.allclose(w.grad.double(), w64.grad, atol=5e-2, rtol=2e-2)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from grpo import token_logprobs
    torch.set_num_threads(1)

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def naive(h, w, y):
        return torch.log_softmax((h @ w.t()).float(), -1).gather(1, y[:, None]).squeeze(1)

    def ours(h, w, y):
        return token_logprobs(h, w, y, chunk_tokens=256, chunk_vocab=4096)

    def extra_mb(fn, n, hd, v):
        torch.manual_seed(0)
        h = torch.randn(n, hd, requires_grad=True)
        w = torch.randn(v, hd, requires_grad=True)
        y = torch.randint(0, v, (n,))
        g = torch.randn(n)
        base = rss_kb("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        (fn(h, w, y) * g).sum().backward()
        peak = rss_kb("VmHWM")
        grads = (h.grad.numel() + w.grad.numel()) * 4 / 2**20
        return (peak - base) / 1024 - grads

    extra_mb(ours, 300, 64, 5000); extra_mb(naive, 300, 64, 5000)  # warm-up: libraries, thread pools
    print(json.dumps({"ours": extra_mb(ours, 1024, 256, 32768), "naive": extra_mb(naive, 1024, 256, 32768)}))
""")


def test_token_logprobs_peak_memory():
    """Real peak RSS of forward+backward in a fresh process, beyond inputs and their gradients.
    N=1024, H=256, V=32768 float32: one tile is 256 x 4096 x 4 B = 4 MB, the full logits 128 MB."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # a fixed mmap threshold makes glibc return every large block on free, so RSS tracks live tensors rather
    # than heap fragmentation
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, root], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    mb = json.loads(out.stdout.strip().splitlines()[-1])
    tile_mb, acc_w_mb, acc_h_mb = 4, 4096 * 256 * 4 / 2**20, 1024 * 256 * 4 / 2**20
    bound = 4 * tile_mb + acc_w_mb + acc_h_mb + 8  # a few live tiles, float32 accumulators, 8 MB slack
    assert mb["ours"] < bound, mb
    assert mb["naive"] > 2 * 128, mb  # the same measurement does catch materialised logits and their gradient

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_logprobs_cuda_bf16_memory_and_values():
    """On a GPU: bf16 values/gradients near float64, and the allocator's peak stays a few tiles above
    inputs + gradients while the naive version's does not."""
    torch.manual_seed(7)
    n, hd, v, ct, cv = 4096, 256, 32768, 1024, 4096
    h = (0.5 * torch.randn(n, hd, device="cuda")).bfloat16().requires_grad_()
    w = (0.1 * torch.randn(v, hd, device="cuda")).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    g = torch.randn(n, device="cuda")

    def extra_mb(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (fn() * g).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base - 2 * (h.numel() + w.numel())) / 2**20

    ours = extra_mb(lambda: token_logprobs(h, w, y, chunk_tokens=ct, chunk_vocab=cv))
    gh, gw = h.grad.double(), w.grad.double()
    naive = extra_mb(lambda: torch.log_softmax((h @ w.t()).float(), -1).gather(1, y[:, None]).squeeze(1))
    tile_mb = ct * cv * 4 / 2**20
    assert ours < 5 * tile_mb + (n + cv) * hd * 4 / 2**20 + 16, ours
    assert naive > n * v * 4 / 2**20, naive
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lp_ref = torch.log_softmax(h64 @ w64.t(), -1).gather(1, y[:, None]).squeeze(1)
    (lp_ref * g.double()).sum().backward()
    lp = token_logprobs(h, w, y, chunk_tokens=ct, chunk_vocab=cv)
    assert torch.allclose(lp.double(), lp_ref, atol=2e-2)
    assert torch.allclose(gh, h64.grad, atol=2e-2, rtol=2e-2) and torch.allclose(gw, w64.grad, atol=2e-2, rtol=2e-2)


# -----------------------------------------------------------------------------
# policy_loss


def ref_policy_loss(logp, old, ref, adv, mask, eps_lo=0.2, eps_hi=0.2, kl_coef=0.0, ent=None, ent_coef=0.0,
                    agg="token-mean", max_len=None, dual_c=None):
    """float64, padded [B, T] with advantages [B], written straight from the definitions, row by row."""
    rows = []
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            a, r = adv[b], torch.exp(logp[b, t] - old[b, t])
            pg = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_lo, 1 + eps_hi))
            if dual_c is not None and a < 0:
                pg = torch.minimum(pg, -a * dual_c)
            d = ref[b, t] - logp[b, t]
            kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
            e = ent[b, t] if ent is not None else 0.0
            terms.append(pg + kl_coef * kl - ent_coef * e)
        rows.append(terms)
    all_terms = [x for terms in rows for x in terms]
    nonempty = [terms for terms in rows if terms]
    if not all_terms:
        return torch.zeros((), dtype=f64)
    if agg == "token-mean":
        return sum(all_terms) / len(all_terms)
    if agg == "seq-mean-token-mean":
        return sum(sum(terms) / len(terms) for terms in nonempty) / len(nonempty)
    if agg == "seq-mean-token-sum-norm":
        return sum(sum(terms) / max_len for terms in nonempty) / len(nonempty)
    raise ValueError(agg)


def random_batch(b=4, t=7, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=f64) * 3).requires_grad_()
    old = logp.detach() + spread * torch.randn(b, t, generator=g, dtype=f64)  # ratios well both sides of the clip
    ref = logp.detach() + spread * torch.randn(b, t, generator=g, dtype=f64)
    adv = torch.randn(b, generator=g, dtype=f64)
    lengths = torch.tensor([t, 3, 0, 5][:b] + [t] * max(0, b - 4))
    mask = torch.arange(t)[None, :] < lengths[:, None]
    ent = (torch.rand(b, t, generator=g, dtype=f64) * 2).requires_grad_()
    return logp, old, ref, adv, mask, ent


@pytest.mark.parametrize("kw", [
    dict(),
    dict(clip_eps_high=0.28),  # DAPO clip-higher
    dict(dual_clip_c=3.0),
    dict(loss_agg="seq-mean-token-mean"),
    dict(loss_agg="seq-mean-token-sum-norm", max_len=10),
])
def test_policy_loss_matches_formula(kw):
    logp, old, ref, adv, mask, ent = random_batch()
    loss, metrics = policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.05, entropy=ent,
                                entropy_coef=0.01, **kw)
    expect = ref_policy_loss(logp, old, ref, adv, mask, eps_lo=0.2, eps_hi=kw.get("clip_eps_high", 0.2),
                             kl_coef=0.05, ent=ent, ent_coef=0.01, agg=kw.get("loss_agg", "token-mean"),
                             max_len=kw.get("max_len"), dual_c=kw.get("dual_clip_c"))
    g = torch.autograd.grad(loss, (logp, ent))
    g_ref = torch.autograd.grad(expect, (logp, ent))
    assert torch.allclose(loss.double(), expect, atol=1e-6)
    assert torch.allclose(g[0].double(), g_ref[0], atol=1e-7) and torch.allclose(g[1].double(), g_ref[1], atol=1e-7)
    assert g[0][~mask].abs().sum() == 0  # padding gets no gradient
    m = mask.double()
    r = torch.exp(logp.detach() - old)
    assert torch.allclose(metrics["ratio_mean"].double(), (r * m).sum() / m.sum(), atol=1e-6)
    assert torch.isclose(metrics["ratio_max"].double(), r[mask].max(), atol=1e-6)
    assert torch.isclose(metrics["ratio_min"].double(), r[mask].min(), atol=1e-6)
    assert metrics["tokens"] == mask.sum()
    d = ref - logp.detach()
    assert torch.allclose(metrics["kl"].double(), ((torch.exp(d) - d - 1) * m).sum() / m.sum(), atol=1e-6)


def test_clip_fraction_and_clip_edges():
    # one token per case; advantages +1 / -1 and ratios straddling 1 +- 0.2
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 0.9, 1.1, 1.5], dtype=f64)
    adv = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1], dtype=f64)
    logp = torch.zeros(8, dtype=f64, requires_grad=True)
    old = -ratios.log()
    mask = torch.ones(8, dtype=torch.bool)
    loss, met = policy_loss(logp, old, None, adv, mask, clip_eps=0.2, kl_coef=0.0)
    (g,) = torch.autograd.grad(loss, logp)
    # clipped (zero gradient) exactly where the ratio left the trust region in the advantage's direction
    clipped = torch.tensor([False, False, False, True, True, False, False, False])
    assert torch.equal(g == 0, clipped)
    assert met["clip_frac"] == clipped.float().mean()
    # sign: descent raises log-probs with A > 0 and lowers them with A < 0
    assert (g[~clipped & (adv > 0)] < 0).all() and (g[~clipped & (adv < 0)] > 0).all()
    # clip-higher: the ratio-1.5 token with A > 0 is still inside a 0.6 upper bound
    loss, _ = policy_loss(logp, old, None, adv, mask, clip_eps=0.2, clip_eps_high=0.6, kl_coef=0.0)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[3] < 0 and g[4] == 0
    # dual clip: A < 0 and a ratio of 5 -> loss -A * c = 3 per token, no gradient
    loss, met = policy_loss(torch.zeros(1, dtype=f64, requires_grad=True), torch.tensor([-math.log(5.0)]), None,
                            torch.tensor([-1.0]), torch.ones(1, dtype=torch.bool), kl_coef=0.0, dual_clip_c=3.0)
    assert torch.isclose(loss, torch.tensor(3.0, dtype=loss.dtype)) and met["dual_clip_frac"] == 1.0


def test_gradient_signs_of_kl_and_entropy():
    logp = torch.tensor([-1.0, -3.0, -2.0], dtype=f64, requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -2.0], dtype=f64)
    ent = torch.tensor([1.0, 2.0, 3.0], dtype=f64, requires_grad=True)
    mask = torch.ones(3, dtype=torch.bool)
    loss, _ = policy_loss(logp, logp.detach(), ref, torch.zeros(3, dtype=f64), mask, kl_coef=0.1,
                          entropy=ent, entropy_coef=0.01)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, ent))
    # KL pulls logp toward ref: above ref -> positive gradient (descent lowers it), below -> negative, at ref 0
    assert g_logp[0] > 0 and g_logp[1] < 0 and g_logp[2] == 0
    # d k3 / d logp = 1 - exp(ref - logp), token-mean over 3 tokens
    assert torch.allclose(g_logp, 0.1 * (1 - torch.exp(ref - logp.detach())) / 3)
    # the entropy bonus is maximised: descent raises entropy
    assert (g_ent < 0).all() and torch.allclose(g_ent, torch.full((3,), -0.01 / 3, dtype=f64))
    # KL clamp: exp(20) - 20 - 1 is clamped to 10 and stops giving gradient
    loss, met = policy_loss(torch.zeros(1, dtype=f64, requires_grad=True), None, torch.tensor([20.0], dtype=f64),
                            torch.zeros(1), torch.ones(1, dtype=torch.bool), kl_coef=1.0)
    assert loss == 10.0 and met["kl"] == 10.0


def test_training_signs_end_to_end():
    """One SGD step through token_logprobs + policy_loss moves each quantity the way its term says."""
    torch.manual_seed(4)
    h0, w0 = torch.randn(12, 8), torch.randn(40, 8)
    y = torch.randint(0, 40, (12,))
    mask = torch.ones(12, dtype=torch.bool)
    ref = token_logprobs(h0 + 0.3 * torch.randn(12, 8), w0, y)

    def step(adv, kl_coef, entropy_coef):
        w = w0.clone().requires_grad_()
        lp, ent = token_logprobs(h0, w, y, return_entropy=True, chunk_vocab=16)
        loss, met = policy_loss(lp, lp.detach(), ref, adv, mask, kl_coef=kl_coef, entropy=ent,
                                entropy_coef=entropy_coef)
        loss.backward()
        with torch.no_grad():
            lp2, ent2 = token_logprobs(h0, w0 - 0.5 * w.grad, y, return_entropy=True)
            _, met2 = policy_loss(lp2, lp2, ref, adv, mask, kl_coef=kl_coef, entropy=ent2)
        return lp, lp2, met, met2

    adv = torch.tensor([1.0] * 6 + [-1.0] * 6)
    lp, lp2, _, _ = step(adv, 0.0, 0.0)
    assert (lp2[:6] > lp[:6].detach()).all() and (lp2[6:] < lp[6:].detach()).all()
    _, _, met, met2 = step(torch.zeros(12), 1.0, 0.0)
    assert met2["kl"] < met["kl"]  # the KL term is minimised, not maximised (DeepScaleR issue #33)
    _, _, met, met2 = step(torch.zeros(12), 0.0, 1.0)
    assert met2["entropy"] > met["entropy"]


def test_empty_mask_and_nonfinite_padding():
    logp = torch.full((2, 3), float("-inf"), dtype=f64, requires_grad=True)  # padding may hold anything
    old = torch.full((2, 3), float("nan"), dtype=f64)
    ent = torch.full((2, 3), float("nan"), dtype=f64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean", "mean-of-micro-batch-means", "deepscaler"):
        loss, met = policy_loss(logp, old, old, torch.ones(2, dtype=f64), mask, kl_coef=0.1, entropy=ent,
                                entropy_coef=0.1, loss_agg=agg, segments=torch.zeros(2, 3, dtype=torch.long))
        (g,) = torch.autograd.grad(loss, logp)
        assert loss == 0 and torch.equal(g, torch.zeros_like(g))
        assert all(torch.isfinite(v).all() for v in met.values()), met
    # a packed micro-batch of zero tokens (the trainer pads ranks with empty ones)
    e = torch.zeros(0, dtype=f64, requires_grad=True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, met = policy_loss(e, e.detach(), e.detach(), e.detach(), torch.zeros(0, dtype=torch.bool), kl_coef=0.1,
                                loss_agg=agg, cu_seqlens=torch.zeros(1, dtype=torch.long))
        assert loss == 0 and met["ratio_max"] == met["ratio_min"] == 1.0 and met["tokens"] == 0
        loss.backward()
    # a real token next to garbage padding is unaffected
    logp2 = torch.tensor([[-1.0, float("-inf")]], dtype=f64, requires_grad=True)
    old2 = torch.tensor([[-1.2, float("nan")]], dtype=f64)
    loss, _ = policy_loss(logp2, old2, old2, torch.tensor([2.0], dtype=f64), torch.tensor([[True, False]]),
                          kl_coef=0.1)
    (g,) = torch.autograd.grad(loss, logp2)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g[0, 1] == 0


@pytest.mark.parametrize("agg,max_len", [("token-mean", None), ("seq-mean-token-mean", None),
                                         ("seq-mean-token-sum-norm", 8)])
def test_padded_equals_packed(agg, max_len):
    logp, old, ref, adv, mask, ent = random_batch()
    lengths = mask.sum(1)
    kw = dict(kl_coef=0.05, entropy_coef=0.01, loss_agg=agg, max_len=max_len)
    padded, _ = policy_loss(logp, old, ref, adv, mask, entropy=ent, **kw)
    # pack: each row's first `length` tokens, back to back, with per-token advantages
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    pk = lambda t: t[mask]  # noqa: E731
    packed, _ = policy_loss(pk(logp), pk(old), pk(ref), expand_to_tokens(adv, cu), torch.ones(int(cu[-1]), dtype=torch.bool),
                            entropy=pk(ent), cu_seqlens=cu, **kw)
    assert torch.allclose(padded, packed, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(padded, logp)[0], torch.autograd.grad(packed, logp)[0], atol=1e-12)


@pytest.mark.parametrize("agg,max_len", [("token-mean", None), ("seq-mean-token-mean", None),
                                         ("seq-mean-token-sum-norm", 8)])
def test_micro_batches_add_up_to_mini_batch(agg, max_len):
    """Split into unequal micro-batches (as over ranks x accumulation steps): with the global normaliser the
    per-micro-batch losses and their gradients sum to the whole mini-batch's."""
    logp, old, ref, adv, mask, ent = random_batch(b=6, t=9, seed=5)
    kw = dict(kl_coef=0.05, entropy_coef=0.01, loss_agg=agg, max_len=max_len)
    full, _ = policy_loss(logp, old, ref, adv, mask, entropy=ent, **kw)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum(loss_normaliser(mask[s], agg) for s in parts)
    summed = sum(policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], entropy=ent[s], normaliser=total, **kw)[0]
                 for s in parts)
    assert torch.allclose(full, summed, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(full, logp)[0], torch.autograd.grad(summed, logp)[0], atol=1e-12)


def test_mean_of_micro_batch_means():
    """Each micro-batch's token mean divided by the micro-batch count (formerly "micro-batch-mean", mislabelled
    as DeepScaleR's: verl summed the means, see test_deepscaler_*); differs from the mini-batch token-mean
    when micro-batches hold different numbers of tokens. The old name is refused with a pointer."""
    logp, old, ref, adv, mask, ent = random_batch(b=6, t=9, seed=6)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    count = sum(loss_normaliser(mask[s], "mean-of-micro-batch-means") for s in parts)
    assert count == 3
    theirs = sum(policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], kl_coef=0.05,
                             loss_agg="mean-of-micro-batch-means", normaliser=count)[0] for s in parts)
    expect = sum(ref_policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], kl_coef=0.05) for s in parts) / 3
    assert torch.allclose(theirs.double(), expect, atol=1e-9)
    g, g_ref = torch.autograd.grad(theirs, logp)[0], torch.autograd.grad(expect, logp)[0]
    assert torch.allclose(g.double(), g_ref, atol=1e-9)
    ours, _ = policy_loss(logp, old, ref, adv, mask, kl_coef=0.05)
    assert not torch.allclose(ours, theirs, atol=1e-3)
    with pytest.raises(ValueError, match="renamed 'mean-of-micro-batch-means'"):
        policy_loss(logp, old, ref, adv, mask, loss_agg="micro-batch-mean")


def test_on_policy_old_logp_none_and_errors():
    logp, old, ref, adv, mask, _ = random_batch()
    a, _ = policy_loss(logp, None, ref, adv, mask)
    b, _ = policy_loss(logp, logp.detach(), ref, adv, mask)
    assert torch.allclose(a, b)
    assert torch.allclose(torch.autograd.grad(a, logp)[0], torch.autograd.grad(b, logp)[0])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, ref, adv[:2], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, ref, adv, mask[:, :3])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, None, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logp, old, ref, adv, mask, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_loss(logp[mask], old[mask], ref[mask], torch.zeros(int(mask.sum())), torch.ones(int(mask.sum())),
                    loss_agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(logp, old, ref, adv, mask, loss_agg="sum")


def test_token_logprobs_ignore_the_callers_autocast():
    """Under autocast a float32 matmul would be rounded to bf16 in the forward only (the backward runs
    outside autocast): token_logprobs must give the float32 result and gradients there too."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(33, 16, generator=g) * 3).requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 50, (33,), generator=g)
    want = token_logprobs(h, w, y, temperature=0.6)
    (gh_want,) = torch.autograd.grad(want.sum(), h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(h, w, y, temperature=0.6)
    (gh_got,) = torch.autograd.grad(got.sum(), h)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh_got, gh_want, rtol=1e-5, atol=1e-5)
