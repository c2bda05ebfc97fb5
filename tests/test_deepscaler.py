"""loss_agg="deepscaler" against DeepScaleR's own verl, run on small packed batches with uneven lengths:
tests/data/verl_partitions.json (verl's Karmarkar-Karp partitions, ties included) and
tests/data/verl_update.json (verl's _balance_batch + update_policy on 2, 8 and 32 emulated GPUs: the
micro-batch layout, the loss and its gradient), the latter also through train_mini_batch itself. See each
file's "provenance". ~15 s (load 9)."""
import json
import os

import pytest
import torch

import distributed as D
import grpo
import train as T

DATA = os.path.join(os.path.dirname(__file__), "data")
f64 = torch.float64


def load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


UPDATE = load("verl_update.json")["cases"]


def test_karmarkar_karp_matches_verl_with_its_tie_breaks():
    cases = load("verl_partitions.json")["cases"]
    assert len(cases) == 78 and any(c["equal_size"] for c in cases) and any(len(c["lengths"]) >= 1024 for c in cases)
    ties = 0
    for c in cases:
        ours = D.karmarkar_karp(c["lengths"], c["k"], c["equal_size"])
        assert ours == c["balanced"], (c["lengths"], c["k"], c["equal_size"])
        assert ours == [sorted(p) for p in c["karmarkar_karp"]]  # the same parts, in verl's (heaviest-first) order
        ties += len(set(c["lengths"])) < len(c["lengths"])
    assert ties > 20  # equal lengths are where a different tie-break would show
    with pytest.raises(ValueError, match="equal size"):
        D.karmarkar_karp([1, 2, 3], 2, True)
    with pytest.raises(ValueError, match="cannot split 1"):
        D.karmarkar_karp([1], 2, False)


@pytest.mark.parametrize("case", UPDATE, ids=[c["name"] for c in UPDATE])
def test_layout_matches_verl(case):
    """Each emulated GPU's share (_balance_batch) and each of its micro-batches per mini-batch
    (rearrange_micro_batches, count = max over GPUs of ceil(tokens / budget)), exactly as verl made them."""
    lengths = [s["prompt_len"] + len(s["response"]) for s in case["seqs"]]
    layout = D.deepscaler_layout(lengths, case["gpus"], 2, case["budget"])
    ranks = sorted(case["ranks"], key=lambda r: r["rank"])
    assert len(ranks) == case["gpus"]
    for g, r in enumerate(ranks):
        assert sorted(i for k in range(2) for mb in layout[k][g] for i in mb) == sorted(r["share"])
        for k in range(2):
            assert layout[k][g] == r["micro"][k]
    counts = [len(layout[k][0]) for k in range(2)]
    assert all(len(layout[k][g]) == counts[k] for k in range(2) for g in range(case["gpus"]))
    with pytest.raises(ValueError, match="equal size"):
        D.deepscaler_layout(lengths[:-1], case["gpus"], 2, case["budget"])


def fixture_samples(case):
    return [T.Sample([3] * s["prompt_len"], list(s["response"]), [0.0] * len(s["response"]), "stop", "1",
                     advantage=s["advantage"]) for s in case["seqs"]]


def our_loss(case, mini, index_of, logits, micro_split, kw):
    """Our loss for one mini-batch from the tempered logits (float64 leaves): the sequences packed into
    micro-batches as `micro_split` says (this run's packing, any), normalised as train_mini_batch does."""
    def packed(seqs):
        lp, ent, adv, old, ref, seg, lens = [], [], [], [], [], [], []
        for s in seqs:
            i = index_of[id(s)]
            z = logits[i]
            logsm = torch.log_softmax(z, -1)
            lp.append(logsm.gather(1, torch.tensor(s.response)[:, None]).squeeze(1))
            ent.append(-(logsm.exp() * logsm).sum(-1))
            r = len(s.response)
            adv += [s.advantage] * r
            old += case["seqs"][i]["old_logp"]
            ref += case["seqs"][i]["ref_logp"]
            seg += [s.segment] * r
            lens.append(r)
        cu = torch.tensor([0] + lens).cumsum(0)
        return torch.cat(lp), torch.cat(ent), torch.tensor(adv, dtype=f64), torch.tensor(old, dtype=f64), \
            torch.tensor(ref, dtype=f64), torch.tensor(seg), cu
    micros = [packed(mini[a:b]) for a, b in micro_split]
    n_seg = max(s.segment for s in mini) + 1
    norm = sum(grpo.loss_normaliser(torch.ones_like(m[0]), "deepscaler", segments=m[5], num_segments=n_seg)
               for m in micros) * case["gpus"]
    total = 0
    for lp, ent, adv, old, ref, seg, cu in micros:
        loss, _ = grpo.policy_loss(lp, old, ref, adv, torch.ones_like(lp), entropy=ent, loss_agg="deepscaler",
                                   normaliser=norm, segments=seg, num_segments=n_seg, cu_seqlens=cu, **kw)
        total = total + loss
    return total


@pytest.mark.parametrize("case", UPDATE, ids=[c["name"] for c in UPDATE])
def test_loss_and_gradient_match_verl(case):
    """split_mini_batches' deepscaler mini-batches and segments + policy_loss: the value of each mini-batch's
    loss and its gradient with respect to every logit equal what verl's update_policy computed (averaged over
    its GPUs), whatever this run's own packing; token-mean's gradient does not."""
    samples = fixture_samples(case)
    index_of = {id(s): i for i, s in enumerate(samples)}
    cfg = T.TrainConfig(loss_agg="deepscaler", mini_batches=2, deepscaler_micro_tokens=case["budget"],
                        kl_coef=case["kl"], entropy_coef=case["ent"], clip_eps=case["clip"])
    stage = T.Stage(1, case["R"], case["n"], deepscaler_gpus=case["gpus"])
    minis = T.split_mini_batches(samples, cfg, stage)
    kw = dict(clip_eps=case["clip"], kl_coef=case["kl"], entropy_coef=case["ent"])
    for k, mini in enumerate(minis):
        assert sorted(index_of[id(s)] for s in mini) == [i for i, s in enumerate(case["seqs"]) if s["mini_batch"] == k]
        want_grad = {i: torch.tensor(s["grad"], dtype=f64) for i, s in enumerate(case["seqs"]) if s["mini_batch"] == k}
        n = len(mini)
        for split in ([(0, n)], [(0, 1), (1, n // 2), (n // 2, n)], [(j, j + 1) for j in range(n)]):
            logits = {i: torch.tensor(s["logits"], dtype=f64, requires_grad=True) for i, s in enumerate(case["seqs"])}
            loss = our_loss(case, mini, index_of, logits, split, kw)
            assert abs(loss.item() - case["mini_batch_loss"][k]) < 1e-6 * (1 + abs(case["mini_batch_loss"][k]))
            grads = torch.autograd.grad(loss, [logits[i] for i in want_grad])
            for (i, want), got in zip(want_grad.items(), grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # the mini-batch token-mean (the gradient this repository used by default) is not verl's
    mini = minis[0]
    logits = {i: torch.tensor(s["logits"], dtype=f64, requires_grad=True) for i, s in enumerate(case["seqs"])}
    for s in mini:
        s.segment = 0  # one segment over the whole mini-batch, one GPU: the token-mean
    tm_case = dict(case, gpus=1)
    loss = our_loss(tm_case, mini, index_of, logits, [(0, len(mini))], kw)
    i0 = next(i for i, s in enumerate(case["seqs"]) if s["mini_batch"] == 0 and s["advantage"] != 0)
    (g,) = torch.autograd.grad(loss, logits[i0])
    assert not torch.allclose(g, torch.tensor(case["seqs"][i0]["grad"], dtype=f64), rtol=1e-2, atol=0)


class LogitTable(torch.nn.Module):
    """A stand-in policy for train_mini_batch, like the toy actor of the fixture's harness: sequence i's
    response logits are a float64 parameter (the fixture's tempered logits z, so the temperature is not
    applied again). It finds each packed sequence by its prompt token, i + 1 (0: an empty micro-batch)."""

    def __init__(self, case):
        super().__init__()
        self.z = torch.nn.ParameterList([torch.tensor(s["logits"], dtype=f64) for s in case["seqs"]])
        self.prompt_len = [s["prompt_len"] for s in case["seqs"]]

    def forward(self, input_ids, positions, meta, targets=None, temperature=1.0, return_entropy=False):
        logp, ent = [], []
        for start, n in zip(meta.cu_seqlens.tolist(), meta.seqlens):
            i = int(input_ids[start]) - 1
            prompt = torch.zeros(n if i < 0 else self.prompt_len[i] - 1, dtype=f64)  # masked positions
            logp.append(prompt)
            ent.append(prompt)
            if i >= 0:
                logsm = torch.log_softmax(self.z[i], -1)
                y = targets[start + len(prompt):start + n]
                logp.append(logsm.gather(1, y[:, None]).squeeze(1))
                ent.append(-(logsm.exp() * logsm).sum(-1))
        return torch.cat(logp), torch.cat(ent)


class GradRecorder:
    """Stands in for AdamW: keeps the gradient at each step and changes nothing (as the harness's did)."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])


@pytest.mark.parametrize("token_budget", [16, 4096])
@pytest.mark.parametrize("case", UPDATE, ids=[c["name"] for c in UPDATE])
def test_trainer_update_reproduces_verl_gradient(case, token_budget):
    """The trainer's own code end to end -- split_mini_batches, micro_batches (this run's packing, into
    several micro-batches or one), train_mini_batch's normaliser (x deepscaler_gpus) and backward -- gives,
    at each optimizer step, the gradient verl's update_policy computed for that mini-batch."""
    samples = [T.Sample([i + 1] * s["prompt_len"], list(s["response"]), [0.0] * len(s["response"]), "stop", "1",
                        advantage=s["advantage"]) for i, s in enumerate(case["seqs"])]
    cfg = T.TrainConfig(loss_agg="deepscaler", mini_batches=2, deepscaler_micro_tokens=case["budget"],
                        token_budget=token_budget, kl_coef=case["kl"], entropy_coef=case["ent"],
                        clip_eps=case["clip"], temperature=case["temperature"], grad_clip=1e9)
    stage = T.Stage(1, case["R"], case["n"], deepscaler_gpus=case["gpus"])
    model, ctx = LogitTable(case), D.Dist()
    opt = GradRecorder(model.parameters())

    def per_token(m, key):  # the fixture's old / reference log-probs on each response token of the micro-batch
        seqs = [([0.0] * (len(s.prompt) - 1) + case["seqs"][s.prompt[0] - 1][key]) for s in m.samples]
        return torch.tensor(sum(seqs, []) or [0.0])  # [0.0]: an empty micro-batch's dummy token

    for k, mini in enumerate(T.split_mini_batches(samples, cfg, stage)):
        micros = T.micro_batches(mini, cfg, ctx)
        assert token_budget > 100 or len(micros) > 1
        for m in micros:
            T.fill_advantages(m)
            m.old_logp, m.ref_logp = per_token(m, "old_logp"), per_token(m, "ref_logp")
        ok, _ = T.train_mini_batch(model, opt, micros, cfg, stage, ctx, D.Accumulator(ctx.device))
        assert ok and len(opt.grads) == k + 1
        for i, s in enumerate(case["seqs"]):
            got = opt.grads[k][i]
            if s["mini_batch"] == k:
                torch.testing.assert_close(got, torch.tensor(s["grad"], dtype=f64), rtol=1e-4, atol=1e-8)
            else:
                assert got is None


def test_split_mini_batches_deepscaler_covers_the_batch_once():
    """Every sample in exactly one mini-batch, segments numbered per mini-batch; the group layout otherwise."""
    case = UPDATE[1]
    samples = fixture_samples(case)
    cfg = T.TrainConfig(loss_agg="deepscaler", mini_batches=2, deepscaler_micro_tokens=case["budget"])
    minis = T.split_mini_batches(samples, cfg, T.Stage(1, 9, case["n"], deepscaler_gpus=case["gpus"]))
    assert sorted(id(s) for mb in minis for s in mb) == sorted(id(s) for s in samples)
    for mb in minis:
        segs = sorted({s.segment for s in mb})
        assert segs == list(range(len(segs))) and len(segs) >= case["gpus"]
    groups = T.split_mini_batches(samples, T.TrainConfig(mini_batches=2), T.Stage(1, 9, case["n"]))
    assert [len(mb) for mb in groups] == [len(samples) // 2] * 2 and groups[0] == samples[:len(samples) // 2]
