"""The rollout engine (sample.py / engine.py) and its sampler (kernels/sampling.py).

Greedy output against transformers' generate and against our own full forward; the sampler's
distribution against the exact filtered distribution (chi-square); and tests that force each engine
mechanism (prefix sharing, chunked prefill, preemption, stop tokens, limits) and assert it happened
without changing a single token."""
import math

import pytest
import torch

import model as M
from engine import Engine
from fixtures import random_model, tiny_checkpoint, tiny_config
from kernels.sampling import fold_seed, hash_step, row_key, sample_torch, uniform
from sample import generate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The engine runs thousands of tiny ops; on this shared 2-core machine an intra-op thread pool
    made them ~50x slower under load (threads spinning at every op), so these tests use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config(), seed=11)


def prompts_of(lengths, seed=0, low=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, 128, (n,), generator=g).tolist() for n in lengths]


def full_logits(model, prompt, completion):
    """Our own cache-less forward over prompt + completion: logits predicting each completion token."""
    with torch.no_grad():
        lg = model(torch.tensor(prompt + completion)[None])[0].double()
    return lg[len(prompt) - 1:-1]


def chi2_limit(df, z=3.29):
    """Upper 0.05% point of chi-square(df), Wilson-Hilferty. The draws are a pure function of fixed
    seeds, so a pass is deterministic; a broken sampler (wrong temperature, filter or hash) is off by
    orders of magnitude more than this."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_filtered(logits, T, top_p, top_k, vocab_limit=None):
    """float64 reference: temperature, ids < vocab_limit, top-k, then top-p on the renormalised top-k."""
    z = logits.double() / T
    if vocab_limit is not None:
        z[vocab_limit:] = float("-inf")
    order = torch.argsort(z, descending=True, stable=True)
    keep = torch.zeros_like(z, dtype=torch.bool)
    k = len(z) if top_k <= 0 else top_k
    p = torch.softmax(z[order[:k]], 0)
    before = 0.0
    for i in range(k):
        if before < top_p and p[i] > 0:
            keep[order[i]] = True
        before += p[i].item()
    probs = torch.softmax(z.masked_fill(~keep, float("-inf")), 0)
    return probs, keep


def chi2(counts, probs):
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    return (((counts[kept] - expected) ** 2) / expected).sum().item(), int(kept.sum()) - 1


# --------------------------------------------------------------------------- the sampler on its own

def test_hash_is_the_documented_uint32_function():
    """A pure-Python uint32 reference of the comment in kernels/sampling.py (what Triton must match)."""
    MASK = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & MASK
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & MASK
        return x ^ (x >> 16)

    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 2**32, (50, 5), generator=g, dtype=torch.int64)
    keys[0] = torch.tensor([MASK, MASK, MASK, MASK, MASK])  # extremes must not overflow int64
    keys[1] = 0
    ours = hash_step(row_key(*keys[:, :4].T), keys[:, 4]).tolist()
    for row, got in zip(keys.tolist(), ours):
        h = 0
        for x in row:
            h = mix(((h ^ x) + 0x9E3779B9) & MASK)
        assert got == h
    u = uniform(row_key(*keys[:, :4].T), torch.arange(1000))
    assert u.dtype == torch.float32 and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert fold_seed(2**40 + 7) != fold_seed(7) and 0 <= fold_seed(-3) < 2**32


@pytest.mark.parametrize("T,top_p,top_k", [(1.0, 1.0, -1), (0.6, 0.95, -1), (1.3, 1.0, 5), (1.0, 0.7, 8), (0.4, 0.9, 3)])
def test_sampler_matches_exact_filtered_distribution(T, top_p, top_k):
    V, B, vocab_limit = 24, 20000, 20
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2
    logits[vocab_limit:] = 9.0  # padding ids with the largest logits: must never be drawn
    rows = logits.expand(B, V)
    i64 = lambda x: torch.as_tensor(x, dtype=torch.int64).expand(B).contiguous()
    args = (torch.full((B,), T), torch.full((B,), top_p), i64(top_k), i64(1234), i64(7), torch.arange(B) % 16,
            torch.arange(B) // 16)
    tokens, logprobs = sample_torch(rows, *args, vocab_limit=vocab_limit)
    probs, keep = exact_filtered(logits, T, top_p, top_k, vocab_limit)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[~keep].sum() == 0  # filtered-out (and padding) ids never drawn
    stat, df = chi2(counts, probs)
    if df > 0:
        assert stat < chi2_limit(df), (stat, df)
    # log-prob: the temperature-scaled distribution over the whole vocabulary, before any filter
    want = torch.log_softmax(logits.double() / T, 0)[tokens]
    torch.testing.assert_close(logprobs.double(), want, rtol=0, atol=1e-5)
    # the same keys give the same tokens, in any batch order
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))[:500]
    again, _ = sample_torch(rows[perm], *(a[perm] for a in args), vocab_limit=vocab_limit)
    assert torch.equal(again, tokens[perm])


def test_sampler_greedy_rows_and_mixed_batch():
    V = 16
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(5)) * 3
    logits[:, 15] = 100.0  # beyond the vocabulary limit
    T = torch.tensor([0.0, 1.0, 0.0, 0.5])
    ones = torch.ones(4, dtype=torch.int64)
    tokens, logprobs = sample_torch(logits, T, torch.tensor([1.0, 0.9, 0.5, 1.0]), ones * -1, ones, ones, ones,
                                    torch.arange(4), vocab_limit=15)
    assert tokens[0] == logits[0, :15].argmax() and tokens[2] == logits[2, :15].argmax()
    assert (tokens < 15).all()
    torch.testing.assert_close(logprobs[0], torch.log_softmax(logits[0], 0)[tokens[0]])  # greedy: under T = 1
    torch.testing.assert_close(logprobs[3], torch.log_softmax(logits[3] / 0.5, 0)[tokens[3]])


# --------------------------------------------------------------------------- the engine: exactness

def test_greedy_matches_transformers_and_full_forward(tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_checkpoint(tmp_path, seed=1)
    ours = M.from_pretrained(str(tmp_path), dtype=torch.float32)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = prompts_of([3, 16, 21, 40], seed=2)
    comps = generate(ours, prompts, max_new_tokens=24, temperature=0, block_size=8)
    assert [(c.prompt_index, c.sample_index) for c in comps] == [(i, 0) for i in range(4)]
    for p, c in zip(prompts, comps):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=1)
        assert c.token_ids == out[0, len(p):].tolist()
        assert c.finish_reason == ("stop" if c.token_ids[-1] == 1 else "length")
        lg = full_logits(ours, p, c.token_ids)
        assert c.token_ids == lg.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   torch.log_softmax(lg, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0],
                                   rtol=0, atol=1e-4)


def test_prefix_sharing_counts_and_exact_logprobs(tiny):
    prompts = prompts_of([13, 32, 7], seed=3)
    eng = Engine(tiny, block_size=8, num_blocks=200, ignore_eos=True)
    comps = eng.generate(prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, n=4, seed=1)
    assert len(comps) == 12 and [c.prompt_index for c in comps] == [0] * 4 + [1] * 4 + [2] * 4
    assert [c.sample_index for c in comps] == [0, 1, 2, 3] * 3
    # each prompt prefilled once; 3 followers x its full blocks (1, 4, 0) shared
    assert eng.stats["prefill_tokens"] == 13 + 32 + 7
    assert eng.stats["prefix_blocks_shared"] == 3 * (1 + 4 + 0)
    assert eng.stats["tokens_generated"] == 120
    for i in range(3):
        assert len({tuple(c.token_ids) for c in comps[4 * i: 4 * i + 4]}) > 1  # samples of a group differ
    for c in comps:  # shared + copied blocks hold the right K/V: logprobs equal a cache-less forward
        lg = full_logits(tiny, prompts[c.prompt_index], c.token_ids)
        logp = torch.log_softmax(lg / 0.8, -1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0], rtol=0, atol=1e-4)
        for t, row in zip(c.token_ids, logp):  # every token inside its step's top-p set
            assert exact_filtered(row, 1.0, 0.9, -1)[1][t]
    assert eng.pool.num_free == eng.num_blocks and not any(eng.pool.ref)


def test_preemption_and_chunked_prefill_change_nothing(tiny):
    prompts = prompts_of([5, 17, 33], seed=4)
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=20, n=3, seed=5)
    ref = Engine(tiny, block_size=4, num_blocks=500, max_model_len=64, ignore_eos=True).generate(prompts, **kw)
    small = Engine(tiny, block_size=4, num_blocks=14, max_num_seqs=8, max_model_len=64, max_prefill_tokens=8,
                   ignore_eos=True)
    comps = small.generate(prompts, **kw)
    assert small.stats["preemptions"] > 0 and any(c.num_preemptions for c in comps)
    assert small.stats["prefill_tokens"] > 5 + 17 + 33  # preempted sequences recomputed their tokens
    assert small.stats["prefill_steps"] > 3  # 33 tokens in chunks of <= 8
    assert [c.token_ids for c in comps] == [c.token_ids for c in ref]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in comps]), torch.tensor([c.logprobs for c in ref]),
                               rtol=0, atol=1e-4)
    assert small.pool.num_free == small.num_blocks and not any(small.pool.ref)  # every block returned


def test_same_request_alone_or_in_a_crowd_and_seeds(tiny):
    prompts = prompts_of([9, 4, 30, 12, 18], seed=5)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, n=2, seed=42, ignore_eos=True)
    alone = generate(tiny, prompts[:1], **kw)
    crowd = generate(tiny, prompts, max_num_seqs=3, **kw)  # a different engine, different batches
    assert [c.token_ids for c in crowd[:2]] == [c.token_ids for c in alone]
    again = generate(tiny, prompts, max_num_seqs=3, **kw)
    assert [c.token_ids for c in again] == [c.token_ids for c in crowd]
    other = generate(tiny, prompts, max_num_seqs=3, **{**kw, "seed": 43})
    assert [c.token_ids for c in other] != [c.token_ids for c in crowd]


# --------------------------------------------------------------------------- stopping and limits

def test_stop_tokens_eos_and_length(tiny):
    prompt = prompts_of([10], seed=6)
    eng = Engine(tiny, block_size=4, num_blocks=64, ignore_eos=True)
    g = eng.generate(prompt, max_new_tokens=16, temperature=0)[0].token_ids
    assert len(g) == 16
    stop = g[6]
    cut = g.index(stop) + 1
    c = eng.generate(prompt, max_new_tokens=16, temperature=0, stop_token_ids=[stop])[0]
    assert (c.token_ids, c.finish_reason) == (g[:cut], "stop") and len(c.logprobs) == cut
    c = eng.generate(prompt, max_new_tokens=4, temperature=0)[0]
    assert (c.token_ids, c.finish_reason) == (g[:4], "length")
    eos = Engine(tiny, block_size=4, num_blocks=64, eos_token_ids=[g[3]])  # EOS is kept in the output
    c = eos.generate(prompt, max_new_tokens=16, temperature=0)[0]
    assert (c.token_ids, c.finish_reason) == (g[:g.index(g[3]) + 1], "stop")
    short = Engine(tiny, block_size=4, num_blocks=64, max_model_len=13, ignore_eos=True)
    c = short.generate(prompt, max_new_tokens=16, temperature=0)[0]
    assert (c.token_ids, c.finish_reason) == (g[:3], "length")
    # the model config's EOS (id 1) by default
    assert Engine(tiny, num_blocks=8).eos_ids == {1} and not Engine(tiny, num_blocks=8, ignore_eos=True).eos_ids


def test_vocab_limit_never_sampled(tiny):
    prompts = prompts_of([6, 11], seed=7)
    eng = Engine(tiny, num_blocks=64, vocab_limit=40, ignore_eos=True)
    for T in (0.0, 2.0):
        comps = eng.generate(prompts, max_new_tokens=20, temperature=T, n=3)
        assert all(t < 40 for c in comps for t in c.token_ids)


def test_engine_first_token_distribution(tiny):
    """End to end through prefill + fork: 3,000 first tokens against the model's exact distribution."""
    prompt = prompts_of([5], seed=8)
    T, top_k = 1.5, 12
    comps = generate(tiny, prompt, max_new_tokens=1, temperature=T, top_k=top_k, n=3000, seed=3)
    with torch.no_grad():
        logits = tiny(torch.tensor(prompt))[0, -1]
    probs, keep = exact_filtered(logits, T, 1.0, top_k)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in comps]), minlength=128).double()
    assert counts[~keep].sum() == 0
    stat, df = chi2(counts, probs)
    assert stat < chi2_limit(df), (stat, df)
    assert len({c.sample_index for c in comps}) == 3000


# --------------------------------------------------------------------------- weights, caching, errors

def test_update_weights_in_place(tiny):
    a, b = random_model(tiny_config(), seed=21), random_model(tiny_config(), seed=22)
    prompts = prompts_of([7, 15], seed=9)
    want = Engine(b, num_blocks=64).generate(prompts, max_new_tokens=10, temperature=0)
    eng = Engine(a, num_blocks=64)
    ptrs = [p.data_ptr() for p in a.parameters()]
    eng.update_weights(b)
    assert [p.data_ptr() for p in a.parameters()] == ptrs
    assert [c.token_ids for c in eng.generate(prompts, max_new_tokens=10, temperature=0)] == [c.token_ids for c in want]
    sd = {"_orig_mod." + k: v for k, v in b.state_dict().items()}
    eng.update_weights(sd)  # torch.compile's prefix is accepted
    del sd["_orig_mod.model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        eng.update_weights(sd)
    with pytest.raises(ValueError, match="lm_head.weight"):
        eng.update_weights({**b.state_dict(), "lm_head.weight": torch.zeros(3, 3)})


def test_generate_reuses_engine_and_progress_bar(tiny, capsys):
    m = random_model(tiny_config(), seed=31)
    generate(m, [[5, 6, 7]], max_new_tokens=3, num_blocks=32)
    first = m._rollout_engine[1]
    generate(m, [[5, 6]], max_new_tokens=3, num_blocks=32, progress=True)
    assert m._rollout_engine[1] is first
    generate(m, [[5, 6]], max_new_tokens=3, num_blocks=40)
    assert m._rollout_engine[1] is not first and m._rollout_engine[1].num_blocks == 40
    assert "tok_s" in capsys.readouterr().err


def test_request_errors(tiny):
    eng = Engine(tiny, block_size=4, num_blocks=6, max_model_len=20)
    with pytest.raises(ValueError, match=r"prompts\[1\].*max_model_len"):
        eng.generate([[5], list(range(6, 30))], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\].*non-empty"):
        eng.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\].*token ids"):
        eng.generate([[5, 128]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[5]], max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="KV blocks"):
        Engine(tiny, block_size=4, num_blocks=3, max_model_len=64).generate([list(range(6, 16))], max_new_tokens=8)


def test_cli_applies_template_and_reports_speed(tmp_path, monkeypatch, capsys):
    import sample
    tiny_checkpoint(tmp_path, seed=4)
    monkeypatch.setattr("sys.argv", ["sample.py", "--ckpt", str(tmp_path), "--prompt", "What is 1+1?",
                                     "--num-samples", "2", "--max-tokens", "6", "--device", "cpu"])
    sample.main()
    out = capsys.readouterr().out
    assert out.count("=== prompt 0 sample") == 2
    assert "<｜User｜>What is 1+1? Let's think step by step" in out and "<｜Assistant｜>" in out
    assert "tokens/s on cpu" in out


def test_interrupted_call_leaks_nothing(tiny):
    eng = Engine(tiny, block_size=4, num_blocks=64, ignore_eos=True)
    calls = 0
    real = eng._decode_step

    def failing():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        real()
    eng._decode_step = failing
    with pytest.raises(KeyboardInterrupt):
        eng.generate(prompts_of([9, 14]), max_new_tokens=8, temperature=0)
    eng._decode_step = real
    import numpy as np  # numpy token ids are accepted too
    comps = eng.generate([np.array(p).tolist() for p in prompts_of([9, 14])] + [list(np.arange(6, 10))],
                         max_new_tokens=8, temperature=0)
    assert [len(c.token_ids) for c in comps] == [8, 8, 8] and eng.pool.num_free == 64
    assert eng.generate([list(np.arange(6, 10))], max_new_tokens=3, temperature=0)[0].token_ids == comps[2].token_ids[:3]
