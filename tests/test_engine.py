"""The engine's step-level interface (add_request / step / abort), its per-request parameters, the
host path that reads tokens one step behind (`overlap`, the CUDA default, forced here on the CPU), and
its start-up switches (kernel fallback, CUDA graphs). Tiny random models; the whole file takes ~20-25 s on
the (loaded) 2-core dev box. The CUDA-only tests at the end run on a GPU (bench/gpu.sh):
`python -m pytest -q tests/test_engine.py -k cuda`."""
import importlib.util
import os

import pytest
import torch

import model as M
from engine import Engine, SamplingParams, StepOutput
from fixtures import break_kernel_self_check, random_model, tiny_config
from test_sample import full_logits, one_thread, prompts_of  # noqa: F401  (one_thread: autouse fixture)



def bench_rollout():
    """bench/rollout.py as a module, without putting bench/ on sys.path (its model.py / eval.py / kernels.py
    would shadow the project's)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "rollout.py")
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config(), seed=11)


def run_steps(eng, limit=10_000):
    """Step until done; per (request, sample): tokens, logprobs, top lists, finish reason, outputs seen."""
    got = {}
    for _ in range(limit):
        if not eng.has_unfinished():
            return got
        for out in eng.step():
            assert isinstance(out, StepOutput)
            g = got.setdefault((out.request_id, out.sample_index), dict(tokens=[], logprobs=[], top=[], reason=None))
            assert g["reason"] is None, f"output after the finish: {out}"
            g["tokens"] += out.new_token_ids
            g["logprobs"] += out.new_logprobs
            g["top"] += out.top_logprobs or []
            assert len(out.new_logprobs) == len(out.new_token_ids)
            if out.finished:
                g["reason"] = out.finish_reason
    raise AssertionError("engine did not finish")


# --------------------------------------------------------------------------- step-level == generate

@pytest.mark.parametrize("overlap", [False, True])
def test_steps_stream_exactly_what_generate_returns(tiny, overlap):
    """Streaming the outputs of add_request/step gives, per sample, the tokens, log-probs and finish
    reason of generate(); with `overlap` (tokens read one step behind) too. EOS is live (id 1) and a
    stop token is set, so samples finish on different steps."""
    prompts = prompts_of([5, 17, 9], seed=21)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=4, stop_token_ids=[7, 9])
    want = Engine(tiny, block_size=4, num_blocks=200).generate(prompts, **kw)
    assert {c.finish_reason for c in want} == {"stop", "length"}  # both kinds happen: the test can fail
    eng = Engine(tiny, block_size=4, num_blocks=200, overlap=overlap)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=4,
                                                   stop_token_ids=(7, 9), prompt_index=i))
    got = run_steps(eng)
    assert len(got) == 9 and not eng.requests and eng.pool.num_free == eng.num_blocks
    for c in want:
        g = got[(f"r{c.prompt_index}", c.sample_index)]
        assert (g["tokens"], g["reason"]) == (c.token_ids, c.finish_reason)
        assert g["logprobs"] == pytest.approx(c.logprobs, abs=1e-6)
    assert eng.stats["tokens_generated"] == sum(len(c.token_ids) for c in want)
    # generate() on the same engine afterwards, and its refusal while requests are in flight
    assert [c.token_ids for c in eng.generate(prompts, **kw)] == [c.token_ids for c in want]
    eng.add_request("x", prompts[0], SamplingParams(max_tokens=3))
    with pytest.raises(RuntimeError, match="in flight"):
        eng.generate(prompts, **kw)


def test_overlap_and_prefix_cache_change_no_token_under_preemption(tiny):
    """Reading tokens one step behind (`overlap`) under preemption (which first reads every outstanding
    token), chunked prefill, prefix sharing and EOS, with and without the prefix cache (a preempted
    sequence coming back starts on its cached prompt blocks): the same tokens and log-probs as the plain
    engine, and the cache saves recomputation."""
    prompts = prompts_of([5, 17, 33, 8], seed=22)
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=20, n=3, seed=5, stop_token_ids=[3, 4, 5, 6])
    runs = []
    for overlap, caching in ((False, False), (True, False), (False, True), (True, True)):
        eng = Engine(tiny, block_size=4, num_blocks=22, max_num_seqs=8, max_model_len=64, max_prefill_tokens=8,
                     overlap=overlap, prefix_caching=caching)
        runs.append((eng.generate(prompts, **kw), dict(eng.stats)))
    ref, st0 = runs[0]
    assert st0["preemptions"] > 0 and st0["prefix_blocks_shared"] > 0 and st0["prefix_cache_hits"] == 0
    assert sum(c.finish_reason == "stop" for c in ref) >= 3
    for got, st in runs[1:]:
        assert st["preemptions"] > 0
        assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in ref]
        torch.testing.assert_close(torch.tensor(sum((c.logprobs for c in got), [])),
                                   torch.tensor(sum((c.logprobs for c in ref), [])), rtol=0, atol=1e-5)
        assert st["tokens_generated"] == st0["tokens_generated"] == sum(len(c.token_ids) for c in ref)
    cached = runs[2][1]
    assert cached["prefix_cache_hits"] > 0 and cached["prefill_tokens"] < st0["prefill_tokens"]


def test_discarded_steps_write_only_to_scratch(tiny):
    """With `overlap`, a sample that stopped at step k runs once more in step k+1 before the host reads
    its stop token. That step must write its K/V only to the scratch block: the decode steps' writes
    into real blocks are exactly those of reading at once, and only overlap writes live rows to scratch."""
    prompts = prompts_of([6, 13, 9, 20], seed=27)
    kw = dict(max_new_tokens=20, temperature=1.0, n=4, seed=8, stop_token_ids=[3, 4, 5, 6, 7, 8])
    counts = []
    for overlap in (False, True):
        eng = Engine(tiny, block_size=4, num_blocks=200, overlap=overlap)
        runner, real_forward, real_write = eng.runner, eng.runner._decode_forward, M.ATTENTION["write_kv"]
        c = dict(real=0, live_scratch=0, decoding=False)

        def forward(padded, cols):
            c["decoding"] = True
            try:
                return real_forward(padded, cols)
            finally:
                c["decoding"] = False

        def write(k, v, k_cache, v_cache, slots):
            if c["decoding"]:
                live = slots[:len(runner.rows)] // eng.block_size  # the rows in use (the rest are pad rows)
                c["live_scratch"] += int((live == eng.num_blocks).sum())
                c["real"] += int((slots // eng.block_size != eng.num_blocks).sum())
            return real_write(k, v, k_cache, v_cache, slots)
        runner._decode_forward = forward
        M.ATTENTION["write_kv"] = write
        try:
            comps = eng.generate(prompts, **kw)
        finally:
            M.ATTENTION["write_kv"] = real_write
        layers = tiny.config.num_hidden_layers  # every layer writes its own K/V
        c = {k: v // layers for k, v in c.items()}
        counts.append((c, sum(x.finish_reason == "stop" for x in comps), [x.token_ids for x in comps]))
    (c0, stops, ref), (c1, _, got) = counts
    assert got == ref and stops >= 4
    assert c0["live_scratch"] == 0 and 0 < c1["live_scratch"] <= stops
    assert c1["real"] == c0["real"]


# --------------------------------------------------------------------------- per-request parameters

def test_per_request_params_and_crowd_invariance(tiny):
    """Requests with different temperatures, filters, seeds, lengths and stop ids in one running batch,
    one of them joining late: each draws exactly what it draws alone (the sampler is keyed by seed,
    prompt_index, sample index and position; the batch is float32 on the CPU)."""
    prompts = prompts_of([6, 14, 9, 21], seed=23)
    params = [SamplingParams(max_tokens=10, temperature=0.0, prompt_index=0),
              SamplingParams(max_tokens=7, temperature=1.3, top_k=5, n=2, seed=11, prompt_index=1),
              SamplingParams(max_tokens=12, temperature=0.7, top_p=0.8, seed=12, stop_token_ids=(5,), prompt_index=2),
              SamplingParams(max_tokens=9, temperature=1.0, n=3, seed=13, ignore_eos=True, prompt_index=3)]
    alone = []
    for p, prompt in zip(params, prompts):
        eng = Engine(tiny, block_size=4, num_blocks=100)
        eng.add_request("only", prompt, p)
        alone.append(run_steps(eng))
    crowd = Engine(tiny, block_size=4, num_blocks=100, max_num_seqs=5, overlap=True)
    for i in range(3):
        crowd.add_request(f"r{i}", prompts[i], params[i])
    got = {}
    for _ in range(3):  # the fourth joins a running batch
        for out in crowd.step():
            got.setdefault((out.request_id, out.sample_index), []).extend(out.new_token_ids)
    crowd.add_request("r3", prompts[3], params[3])
    for k, g in run_steps(crowd).items():
        got.setdefault(k, []).extend(g["tokens"])
    assert crowd.stats["max_distinct_requests"] >= 3 and crowd.stats["requests"] == 4
    for i, a in enumerate(alone):
        for (_, s), g in a.items():
            assert got[(f"r{i}", s)] == g["tokens"], (i, s)
    assert alone[1][("only", 0)]["tokens"] != alone[1][("only", 1)]["tokens"]
    # greedy row = argmax of a cache-less forward
    lg = full_logits(tiny, prompts[0], alone[0][("only", 0)]["tokens"])
    assert alone[0][("only", 0)]["tokens"] == lg.argmax(-1).tolist()[:len(alone[0][("only", 0)]["tokens"])]


def test_seed_none_is_picked_and_recorded(tiny):
    eng = Engine(tiny, block_size=4, num_blocks=50)
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True))
    seed = eng.requests["a"].seed
    first = run_steps(eng)[("a", 0)]["tokens"]
    eng.add_request("b", [5, 6, 7], SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True, seed=seed))
    assert run_steps(eng)[("b", 0)]["tokens"] == first  # the recorded seed reproduces the draws


def test_top_logprobs_match_float64_reference(tiny):
    """top-N log-probs of every step (prefill's first token and decode's) against log_softmax(logits / T)
    of a cache-less float64 forward; the sampled token's log-prob too; greedy rows use T = 1."""
    prompt = prompts_of([11], seed=24)[0]
    for T, N in ((0.7, 5), (0.0, 3)):
        eng = Engine(tiny, block_size=4, num_blocks=60, overlap=True)
        eng.add_request("a", prompt, SamplingParams(max_tokens=8, temperature=T, logprobs=N, n=2, seed=3, ignore_eos=True))
        eng.add_request("b", prompt, SamplingParams(max_tokens=8, temperature=T, seed=3, ignore_eos=True))  # no top-N
        got = run_steps(eng)
        assert got[("b", 0)]["top"] == []
        for s in (0, 1):
            g = got[("a", s)]
            assert len(g["top"]) == len(g["tokens"]) == 8 and all(len(t) == N for t in g["top"])
            logp = torch.log_softmax(full_logits(tiny, prompt, g["tokens"]) / (T or 1.0), -1)
            want_v, want_i = logp.topk(N, -1)
            ids = torch.tensor([[i for i, _ in t] for t in g["top"]])
            vals = torch.tensor([[v for _, v in t] for t in g["top"]], dtype=torch.float64)
            assert torch.equal(ids, want_i)
            torch.testing.assert_close(vals, want_v, rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.tensor(g["logprobs"], dtype=torch.float64),
                                       logp.gather(-1, torch.tensor(g["tokens"])[:, None])[:, 0], rtol=0, atol=1e-5)


def test_top_logprobs_never_list_ids_past_the_vocab_limit(tiny):
    """With vocab_limit (the tokenizer's size; the embedding has padding rows past it), the top-N lists hold
    only ids the sampler may draw, even at a step where the padding rows hold nearly all the mass; values stay normalised
    over the whole vocabulary, like the sampled token's log-prob."""
    prompt = prompts_of([9], seed=31)[0]
    V, limit = tiny.config.vocab_size, tiny.config.vocab_size - 6
    with torch.no_grad():
        saved = tiny.lm_head.weight[limit:].clone()
        tiny.lm_head.weight[limit:] = tiny.lm_head.weight[:limit].abs().max() * 50  # padding rows win every step
    try:
        eng = Engine(tiny, block_size=4, num_blocks=40, vocab_limit=limit)
        eng.add_request("a", prompt, SamplingParams(max_tokens=5, temperature=1.0, logprobs=4, seed=1, ignore_eos=True))
        g = run_steps(eng)[("a", 0)]
        assert all(t < limit for t in g["tokens"])
        assert all(len(t) == 4 and all(i < limit for i, _ in t) for t in g["top"])
        logp = torch.log_softmax(full_logits(tiny, prompt, g["tokens"]), -1)
        assert V > limit and bool((logp[:, limit:].exp().sum(-1) > 0.5).any())  # padding rows hold the mass at a step
        want_v, want_i = logp[:, :limit].topk(4, -1)
        assert torch.equal(torch.tensor([[i for i, _ in t] for t in g["top"]]), want_i)
        torch.testing.assert_close(torch.tensor([[v for _, v in t] for t in g["top"]], dtype=torch.float64), want_v,
                                   rtol=1e-5, atol=1e-5)  # float32 at logits ~100: relative precision
    finally:
        with torch.no_grad():
            tiny.lm_head.weight[limit:] = saved


# --------------------------------------------------------------------------- abort

def test_abort_frees_blocks_everywhere(tiny):
    """Abort a decoding sample, one sample of a group still prefilling (not forked yet), a whole waiting
    request, and unknown ids: each ends with finish_reason "abort", its blocks come back, the others
    finish untouched (their tokens equal a run without the aborted ones)."""
    prompts = prompts_of([9, 30, 7], seed=25)
    p = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=2, ignore_eos=True)
    ref = Engine(tiny, block_size=4, num_blocks=64)
    for i, prompt in enumerate(prompts):
        ref.add_request(f"r{i}", prompt, SamplingParams(**{**p.__dict__, "prompt_index": i}))
    want = run_steps(ref)

    eng = Engine(tiny, block_size=4, num_blocks=64, max_num_seqs=6, max_prefill_tokens=8, overlap=True)
    for i, prompt in enumerate(prompts):
        eng.add_request(f"r{i}", prompt, SamplingParams(**{**p.__dict__, "prompt_index": i}))
    got = {}

    def collect(outs):
        for o in outs:
            g = got.setdefault((o.request_id, o.sample_index), dict(tokens=[], reason=None))
            g["tokens"] += o.new_token_ids
            g["reason"] = o.finish_reason if o.finished else g["reason"]
    collect(eng.step())  # r0 (9 tokens) prefilled in 2 chunks of 8...
    assert eng.scheduler.prefilling and eng.scheduler.prefilling[0].fork == 3
    eng.abort("r0", 1)  # ...one of its samples goes before the fork
    eng.abort("r2")  # r2 is still waiting: max_num_seqs 6 holds r0 and r1's groups only
    eng.abort("nope")
    eng.abort("r1", 7)  # no such sample
    for _ in range(6):
        collect(eng.step())
    decoding = [s for s in eng.runner.rows if s.request.id == "r1"]
    assert decoding, "r1 should be decoding by now"
    victim = decoding[0].sample_index
    free_before = eng.pool.num_free
    eng.abort("r1", victim)
    assert eng.pool.num_free > free_before  # its own (not shared) blocks came back at once
    collect(run_steps_outputs(eng))
    assert eng.pool.num_free == eng.num_blocks and not any(eng.pool.ref) and not eng.requests
    assert {k: g["reason"] for k, g in got.items() if g["reason"] == "abort"} == \
        {("r0", 1): "abort", ("r2", 0): "abort", ("r2", 1): "abort", ("r2", 2): "abort", ("r1", victim): "abort"}
    for (rid, s), g in got.items():
        if g["reason"] != "abort":
            assert g["tokens"] == want[(rid, s)]["tokens"]
        else:
            assert g["tokens"] == want[(rid, s)]["tokens"][:len(g["tokens"])]  # a prefix, nothing invented
    assert got[("r1", victim)]["tokens"] and len(got[("r1", victim)]["tokens"]) < 10


def run_steps_outputs(eng):
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    return outs


# --------------------------------------------------------------------------- prefix caching

def test_prefix_cache_across_requests(tiny):
    """Requests that share a 20-token system prompt (5 blocks of 4): a later one, or one arriving while
    the first still runs, starts on the cached blocks (prefill only computes the rest) and draws exactly
    what an engine without the cache draws. A prompt cached whole still computes its last block (its
    logits are needed). New weights drop the cache."""
    system = prompts_of([20], seed=29)[0]
    a, b, c = system + [9, 10, 11], system + [12, 13], system[:8]
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    ref = Engine(tiny, block_size=4, num_blocks=80, prefix_caching=False)
    for rid, prompt in (("a", a), ("b", b), ("c", c), ("c2", c)):
        ref.add_request(rid, prompt, p)
    want = run_steps(ref)
    assert ref.stats["prefix_cache_hits"] == 0
    eng = Engine(tiny, block_size=4, num_blocks=80)
    eng.add_request("a", a, p)
    first = eng.step()  # a is prefilled (its 5 full blocks registered) and decodes...
    assert [(o.request_id, len(o.new_token_ids)) for o in first] == [("a", 1)]
    eng.add_request("b", b, p)  # ...while b arrives: 5 blocks in use by a, shared
    got = run_steps(eng)
    got[("a", 0)]["tokens"][:0] = first[0].new_token_ids
    got[("a", 0)]["logprobs"][:0] = first[0].new_logprobs
    assert eng.stats["prefix_cache_hits"] == 5 and eng.stats["prefill_tokens"] == len(a) + len(b) - 20
    eng.add_request("c", c, p)  # 8 tokens = 2 full blocks, both cached (a and b have finished): reuse 1
    eng.add_request("c2", c, p)
    got.update(run_steps(eng))
    assert eng.stats["prefix_cache_hits"] == 5 + 1 + 1
    for key, g in want.items():
        assert got[key]["tokens"] == g["tokens"], key
        torch.testing.assert_close(torch.tensor(got[key]["logprobs"]), torch.tensor(g["logprobs"]), rtol=0, atol=1e-5)
    assert eng.pool.num_free == eng.num_blocks and not any(eng.pool.ref)
    eng.update_weights(random_model(tiny_config(), seed=30))
    eng.add_request("d", a, p)
    run_steps(eng)
    assert eng.stats["prefix_cache_hits"] == 7  # nothing reused across a weight update
    eng.generate([a], max_new_tokens=3)  # nor across generate() calls (weights may change in place)
    assert eng.stats["prefix_cache_hits"] == 0


# --------------------------------------------------------------------------- bad input

def test_add_request_errors_name_the_field(tiny):
    eng = Engine(tiny, block_size=4, num_blocks=8, max_model_len=40)
    bad = [([5], dict(temperature=float("nan")), "temperature"), ([5], dict(temperature=float("inf")), "temperature"),
           ([5], dict(temperature=-0.5), "temperature"), ([5], dict(top_p=0.0), "top_p"),
           ([5], dict(top_p=float("nan")), "top_p"), ([5], dict(max_tokens=0), "max_tokens"),
           ([5], dict(n=0), "n"), ([5], dict(top_k=-2), "top_k"), ([5], dict(logprobs=21), "logprobs"),
           ([5], dict(stop_token_ids=(3, 128)), "stop_token_ids"),
           ([5], dict(stop_token_ids=tuple(range(2, 40))), "stop_token_ids"), ([5], dict(seed=1.5), "seed"),
           ([], {}, "prompt_token_ids"), ([5, 128], {}, "prompt_token_ids"),
           (list(range(2, 60)), {}, "prompt_token_ids.*max_model_len"),
           ([5], dict(max_tokens=70), "KV blocks")]
    for prompt, kw, field in bad:
        with pytest.raises(ValueError, match=field):
            eng.add_request("a", prompt, SamplingParams(**kw))
    assert not eng.has_unfinished()
    eng.add_request("a", [5], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("a", [6], SamplingParams())
    for T in (float("nan"), float("inf")):  # generate() too, before anything is queued
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            Engine(tiny, block_size=4, num_blocks=16).generate([[5]], max_new_tokens=2, temperature=T)


# --------------------------------------------------------------------------- start-up switches

def test_kernel_fallback_is_an_error_unless_allowed(tiny, monkeypatch):
    """As on a GPU whose kernels fail their self-check (simulated on the CPU): Engine refuses to start,
    or with allow_kernel_fallback=True runs the twins and says why in engine.kernel_fallback."""
    break_kernel_self_check(monkeypatch)
    previous = dict(M.ATTENTION)
    with pytest.raises(RuntimeError, match="self-check failed.*allow_kernel_fallback"):
        Engine(tiny, num_blocks=16)
    with pytest.warns(UserWarning, match="self-check failed"):
        eng = Engine(tiny, num_blocks=16, allow_kernel_fallback=True)
    assert "ptxas" in eng.kernel_fallback and eng.graphs is None and M.ATTENTION == previous
    assert len(eng.generate([[5, 6]], max_new_tokens=3, temperature=0)[0].token_ids) >= 1
    monkeypatch.undo()
    assert Engine(tiny, num_blocks=16).kernel_fallback is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graphs_need_cuda(tiny):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        Engine(tiny, num_blocks=16, cuda_graphs=True)
    assert Engine(tiny, num_blocks=16).graphs is None and Engine(tiny, num_blocks=16).graph_pool_bytes == 0


# --------------------------------------------------------------------------- the host path

def test_packed_upload_carries_every_edit(tiny):
    """The CUDA layout on the CPU: the device image is a separate buffer refreshed only by the one packed
    copy per step (through alternating staging buffers, the table for the rows in use only). Every host
    edit must reach it: the tokens equal the default (shared-buffer) CPU layout's, with preemption,
    forks and rows swapped out as samples finish."""
    prompts = prompts_of([5, 17, 33, 8], seed=28)
    kw = dict(max_new_tokens=15, temperature=1.0, top_p=0.9, n=3, seed=6, stop_token_ids=[3, 4, 5])
    ref = Engine(tiny, block_size=4, num_blocks=22, max_num_seqs=8, max_model_len=64, overlap=True)
    want = ref.generate(prompts, **kw)
    eng = Engine(tiny, block_size=4, num_blocks=22, max_num_seqs=8, max_model_len=64, overlap=True)
    state = eng.runner.new_state(mirror=True)
    assert state.image.data_ptr() != state.host.data_ptr() and len(state.staging) == 2
    got = eng.generate(prompts, **kw)
    assert eng.stats["preemptions"] > 0 and state.turn in (0, 1)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_host_work_per_decode_step_is_flat(tiny):
    """The decode step's tensor work does not grow with the batch or the context (no per-row tensors,
    no block-table rebuild): aten operators per decode step, counted with the stand-in model of
    bench/rollout.py --host, are the same at batch 1 x context 20 and batch 24 x context 300."""
    rollout = bench_rollout()
    NullModel, count_ops = rollout.NullModel, rollout.count_ops
    model = NullModel()

    def ops_per_step(B, ctx):
        eng = Engine(model, num_blocks=B * (ctx // 16 + 4) + 16, max_num_seqs=64, ignore_eos=True)
        prompts = [[2 + (i + j) % 60 for j in range(ctx - i % 16)] for i in range(B)]
        short, long_ = (count_ops(lambda n=n: eng.generate(prompts, max_new_tokens=n, temperature=1.0)) for n in (4, 20))
        return (long_ - short) / 16
    small, big = ops_per_step(1, 20), ops_per_step(24, 300)
    assert small == big and small < 250, (small, big)


# --------------------------------------------------------------------------- CUDA only (bench/gpu.sh)

@cuda_only
def test_cuda_graphs_captured_at_start_and_exact(monkeypatch):
    """On CUDA: every bucket captured when the engine is built (none later), the pool size measured, and
    greedy + sampled completions identical to the eager kernels, to the twins (NANOSCALER_KERNELS=0), and
    without overlap."""
    cfg = tiny_config(num_attention_heads=12, num_key_value_heads=2, hidden_size=192, head_dim=16)
    m = random_model(cfg, seed=12).to("cuda")
    prompts = prompts_of([5, 17, 40, 3], seed=26)
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, n=3, seed=1, stop_token_ids=[7])
    greedy = dict(kw, temperature=0.0)
    previous = dict(M.ATTENTION)
    try:
        eng = Engine(m, block_size=16, num_blocks=64, max_num_seqs=16)
        from model_runner import bucket_sizes
        assert sorted(eng.graphs.graphs) == bucket_sizes(16) and eng.graph_pool_bytes > 0 and eng.overlap
        got, got_greedy = eng.generate(prompts, **kw), eng.generate(prompts, **greedy)
        assert sorted(eng.graphs.graphs) == bucket_sizes(16)  # nothing captured lazily
        eager = Engine(m, block_size=16, num_blocks=64, max_num_seqs=16, cuda_graphs=False, overlap=False)
        assert eager.graphs is None
        assert [c.token_ids for c in eager.generate(prompts, **kw)] == [c.token_ids for c in got]
        monkeypatch.setenv("NANOSCALER_KERNELS", "0")
        M.ATTENTION.update(previous)
        twins = Engine(m, block_size=16, num_blocks=64, max_num_seqs=16)
        assert twins.graphs is None
        assert [c.token_ids for c in twins.generate(prompts, **greedy)] == [c.token_ids for c in got_greedy]
    finally:
        M.ATTENTION.update(previous)


@cuda_only
def test_cuda_graph_capture_failure_names_the_bucket():
    from kernels.cuda_graphs import DecodeGraphs
    x = torch.zeros(8, device="cuda")

    def fn(bs):
        if bs == 4:
            raise RuntimeError("boom")
        return x[:bs] * 2
    with pytest.raises(RuntimeError, match="batch size 4.*cuda_graphs=False"):
        DecodeGraphs(fn, [1, 2, 4, 8])
    g = DecodeGraphs(fn, [1, 2, 8])
    x.fill_(3)
    assert g(8).tolist() == [6.0] * 8 and sorted(g.graphs) == [1, 2, 8]


# --------------------------------------------------------------------------- block manager

def test_block_manager_reuses_least_recently_freed_and_never_hands_out_a_block_twice():
    """The free list is a queue of release batches with lazy deletion: a block reclaimed by a prefix hit
    while free, or freed again later, leaves a stale entry behind that must be skipped. Checked against a
    plain ordered list of free blocks over a random sequence of alloc / release / prefix hits."""
    import random
    from scheduler import BlockManager
    rng = random.Random(0)
    pool, ref_free, held = BlockManager(40, 4), list(range(40)), []
    for step in range(3000):
        op = rng.random()
        if op < 0.45 and pool.num_free:
            b = pool.alloc()
            assert b == ref_free.pop(0) and b not in held  # least recently freed first, never twice
            pool.register(b, ("key", step))
            held.append(b)
        elif op < 0.8 and held:
            batch = rng.sample(held, rng.randint(1, min(6, len(held))))
            for b in batch:
                held.remove(b)
            pool.release(batch)
            ref_free += batch  # one release: its blocks in the order given
        elif pool.cached:
            key, b = rng.choice(sorted(pool.cached.items(), key=lambda kv: kv[1]))
            if b in ref_free:  # a prefix hit on a free block takes it out of the free list
                assert pool.take_cached([key]) == [b]
                ref_free.remove(b)
                held.append(b)
        assert pool.num_free == len(ref_free) and sorted(held + ref_free) == list(range(40))
        assert all(pool.ref[b] == 1 for b in held) and all(pool.ref[b] == 0 for b in ref_free)
