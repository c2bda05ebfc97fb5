"""serve.py as a real process on a free localhost port, talked to with the official `openai` client (and
raw HTTP where the client would hide the wire): completions, chat, streaming, n > 1, stop strings,
log-probs, seeds, errors in OpenAI's shape, client disconnects, a full queue, faults inside one request or
the engine (tests/serve_faults.py), and the load test: 64 concurrent streaming clients x 200 tokens, each
equal to the offline API's output for its seed, decoded in shared steps, and its negative control (a
server that serves one request at a time fails it).

Three server processes start together on a tiny random checkpoint with 512 positions: serve.py,
serve_faults.py --max-pending 3 and serve_faults.py --one-at-a-time. Cost: ~2 min on the 2-core dev box
under a load average of ~12 (start-up ~35 s; the load test ~45 s: the offline reference, the concurrent
run, 4 requests one at a time; the control ~10 s)."""
import http.client
import importlib.util
import json
import os
import threading
import time

import openai
import pytest

from fixtures import tiny_checkpoint
from llm import LLM, SamplingParams
from test_sample import one_thread  # noqa: F401,F811  (autouse: one intra-op thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(ROOT, "bench", "serve.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CLIENTS, LOAD_TOKENS, ONE_AT_A_TIME = 64, 200, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tiny_checkpoint(str(tmp_path_factory.mktemp("serve") / "tiny"), seed=3, max_position_embeddings=512)
    config_file = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_file))
    json.dump({**config, "chat_template": CHATML}, open(config_file, "w"))
    return path


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    """serve.py, serve_faults.py and the one-at-a-time control, started at once (start-up dominates)."""
    logs = tmp_path_factory.mktemp("logs")
    started = [bench.start_server(ckpt, log=str(logs / "serve.log")),
               bench.start_server(ckpt, "--max-pending", "3", script="tests/serve_faults.py",
                                  log=str(logs / "faults.log")),
               bench.start_server(ckpt, "--one-at-a-time", script="tests/serve_faults.py", log=str(logs / "lock.log"))]
    try:
        yield [bench.wait_healthy(s) for s in started]
    finally:
        for s in started:
            bench.stop_server(s)


@pytest.fixture(scope="module")
def url(servers):
    return servers[0]


@pytest.fixture(scope="module")
def faulty(servers):
    return servers[1]


@pytest.fixture(scope="module")
def locked(servers):
    return servers[2]


@pytest.fixture(scope="module")
def offline(ckpt, one_thread):  # noqa: F811
    return LLM(ckpt)


def client_for(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)


def post(base, path, body, raw=False):
    """(status, JSON or text) of a POST with a raw body, for what the openai client would not send."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, body=body if raw else json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    return r.status, json.loads(data) if data.startswith("{") else data, dict(r.getheaders())


def healthy(base):
    try:
        return bench.get_json(base + "/health") == {"status": "ok"}
    except OSError:  # urllib's HTTPError (503) is one
        return False


def stats(base):
    return bench.get_json(base + "/stats")


def expect(offline, prompt, **kw):
    return offline.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs


def test_models_and_health(url, ckpt):
    models = client_for(url).models.list().data
    assert [m.id for m in models] == [ckpt] and models[0].max_model_len == 512
    assert client_for(url).models.retrieve(ckpt).id == ckpt
    with pytest.raises(openai.NotFoundError):
        client_for(url).models.retrieve("gpt-4")
    assert bench.get_json(url + "/health") == {"status": "ok"}


def test_completions_equal_the_offline_api(url, ckpt, offline):
    """n > 1, several prompts, stop strings, top-p/top-k, log-probs and greedy: every choice's text,
    finish reason and log-probs are the offline API's; usage counts prompt and completion tokens."""
    c = client_for(url)
    prompts = ["The sum of 2 and 3 is", "Once upon a time"]
    kw = dict(n=2, seed=5, temperature=0.9, top_p=0.9, max_tokens=40, stop=["q", "Z"])
    r = c.completions.create(model=ckpt, prompt=prompts, logprobs=2, extra_body=dict(top_k=40), **kw)
    want = [o for p in prompts for o in expect(offline, p, top_k=40, logprobs=2, **kw)]
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [(ch.text, ch.finish_reason) for ch in r.choices] == [(o.text, o.finish_reason) for o in want]
    assert {ch.finish_reason for ch in r.choices} >= {"stop"}  # a stop string or EOS was met
    for ch, o in zip(r.choices, want):
        assert ch.logprobs.token_logprobs == pytest.approx([d[t].logprob for t, d in zip(o.token_ids, o.logprobs)],
                                                           abs=1e-5)
        assert all(len(top) in (2, 3) for top in ch.logprobs.top_logprobs)
    tok = offline.get_tokenizer()
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    greedy = c.completions.create(model=ckpt, prompt="abc", temperature=0, max_tokens=20)
    assert greedy.choices[0].text == expect(offline, "abc", temperature=0, max_tokens=20)[0].text
    ids = c.completions.create(model=ckpt, prompt=tok.encode("abc"), temperature=0, max_tokens=20)  # token prompt
    assert ids.choices[0].text == greedy.choices[0].text


def test_streaming_sends_each_token_and_equals_non_streaming(url, ckpt):
    """A streamed completion (n = 2, a stop string) arrives one token per chunk (the tokenizer is one
    character per token) and adds up to the non-streamed text; usage rides on the last chunk, or comes in
    OpenAI's extra chunk with include_usage."""
    c = client_for(url)
    kw = dict(model=ckpt, prompt="Stream me", n=2, seed=8, max_tokens=30, stop=["k"])
    whole = c.completions.create(**kw)
    texts, pieces, usage = ["", ""], [0, 0], []
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            pieces[ch.index] += bool(ch.text)
        usage.append(chunk.usage)
    assert texts == [ch.text for ch in whole.choices]
    assert pieces == [len(t) for t in texts]
    assert usage[-1] == whole.usage and all(u is None for u in usage[:-1])
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_equals_offline_chat(url, ckpt, offline):
    """Chat renders the checkpoint's template (here a ChatML-like one): replies equal llm.chat's, streamed
    or not; chat log-probs carry top_logprobs alternatives per token."""
    c = client_for(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    want = offline.chat(messages, SamplingParams(n=2, seed=3, max_tokens=25, logprobs=3), use_tqdm=False)[0]
    assert want.prompt == "<|system|>Be brief.\n<|user|>What is 2+2?\n<|assistant|>"
    r = c.chat.completions.create(model=ckpt, messages=messages, n=2, seed=3, max_tokens=25, logprobs=True,
                                  top_logprobs=3)
    assert [ch.message.content for ch in r.choices] == [o.text for o in want.outputs]
    assert all(ch.message.role == "assistant" for ch in r.choices)
    for ch, o in zip(r.choices, want.outputs):
        assert [e.logprob for e in ch.logprobs.content] == pytest.approx(
            [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)], abs=1e-5)
        assert all(len(e.top_logprobs) == 3 for e in ch.logprobs.content)
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
    streamed = ["", ""]
    for chunk in c.chat.completions.create(model=ckpt, messages=messages, n=2, seed=3, max_tokens=25, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == [o.text for o in want.outputs]
    default = c.chat.completions.create(model=ckpt, messages=messages, seed=1)  # no max_tokens: the context
    assert default.choices[0].finish_reason in ("stop", "length")


def test_seeds_are_reproducible(url, ckpt):
    c = client_for(url)
    run = lambda **kw: c.completions.create(model=ckpt, prompt="seed", max_tokens=24, **kw).choices[0].text
    assert run(seed=42) == run(seed=42) != run(seed=43)
    assert run() != run()  # without a seed every request draws its own


def test_bad_requests_get_openai_errors_naming_the_field(url, ckpt):
    ok = dict(model=ckpt, prompt="hi", max_tokens=4)
    chat = dict(model=ckpt, messages=[{"role": "user", "content": "hi"}])
    cases = [("/v1/completions", {**ok, "model": "gpt-4"}, 404, "model"),
             ("/v1/completions", {**ok, "prompt": "x" * 600}, 400, "prompt"),
             ("/v1/completions", {**ok, "max_tokens": 0}, 400, "max_tokens"),
             ("/v1/completions", {**ok, "max_tokens": -3}, 400, "max_tokens"),
             ("/v1/completions", {**ok, "max_tokens": 600}, 400, "max_tokens"),  # prompt + max_tokens > context
             ("/v1/completions", {**ok, "top_p": 0}, 400, "top_p"),
             ("/v1/completions", {**ok, "top_p": 1.5}, 400, "top_p"),
             ("/v1/completions", {**ok, "temperature": "hot"}, 400, "temperature"),
             ("/v1/completions", {**ok, "logprobs": 21}, 400, "logprobs"),
             ("/v1/completions", {**ok, "n": 0}, 400, "n"),
             ("/v1/completions", {**ok, "stop": 5}, 400, "stop"),
             ("/v1/completions", {**ok, "echo": True}, 400, "echo"),
             ("/v1/completions", {k: v for k, v in ok.items() if k != "prompt"}, 400, "prompt"),
             ("/v1/chat/completions", {**chat, "messages": []}, 400, "messages"),
             ("/v1/chat/completions", {**chat, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
             ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
             ("/v1/chat/completions", {**chat, "top_logprobs": 2}, 400, "top_logprobs"),
             ("/v1/chat/completions", {**chat, "presence_penalty": 1.0}, 400, "presence_penalty")]
    for path, body, status, param in cases:
        got, data, _ = post(url, path, body)
        assert (got, data["error"]["param"]) == (status, param), (body, data)
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    got, data, _ = post(url, "/v1/completions", '{"prompt": "hi", "max_tokens": 4', raw=True)
    assert got == 400 and "malformed JSON" in data["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # what a client sees
        client_for(url).completions.create(model=ckpt, prompt="hi", top_p=2.0)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_p"
    assert bench.get_json(url + "/health") == {"status": "ok"}


def open_stream(base, body):
    """A raw streaming POST: (connection, response) after the first `data:` line arrived."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    next_event(resp)
    return conn, resp


def rest_of_stream(resp):
    """The raw lines up to the chunked body's end (read straight from the socket, as next_event does)."""
    lines = []
    while (line := resp.fp.readline()) not in (b"0\r\n", b""):
        lines.append(line)
    return b"".join(lines).decode()


def next_event(resp):
    while not (line := resp.fp.readline()).startswith(b"data:"):
        assert line, "stream ended"
    return line


def wait_for(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_tokens_stream_while_running_and_a_disconnect_frees_the_blocks(url, ckpt):
    """Tokens reach the client while the request still runs (it is live in the engine after the first
    chunks); closing the connection aborts it: its KV blocks return to the pool long before its 400 tokens.
    The same for a non-streamed request."""
    before = stats(url)
    conn, resp = open_stream(url, dict(model=ckpt, prompt="long", max_tokens=400, seed=1, ignore_eos=True))
    for _ in range(3):
        assert json.loads(next_event(resp)[5:])["choices"][0]["finish_reason"] is None
    during = stats(url)
    assert during["server"]["live"] == 1 and during["kv_blocks"]["free"] < during["kv_blocks"]["total"]
    conn.sock.close()
    conn.close()
    wait_for(lambda: stats(url)["server"]["live"] == 0, "the abort")
    after = stats(url)
    assert after["server"]["aborted"] == before["server"]["aborted"] + 1
    assert after["kv_blocks"]["free"] == after["kv_blocks"]["total"] and after["server"]["pending"] == 0
    assert after["engine"]["tokens_generated"] - before["engine"]["tokens_generated"] < 400
    # the same for a request that is not streamed: its client leaves while it runs
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(dict(model=ckpt, prompt="long", max_tokens=400,
                                                                 ignore_eos=True)),
                 headers={"Content-Type": "application/json"})
    wait_for(lambda: stats(url)["server"]["live"] == 1, "the request to run")
    conn.sock.close()
    conn.close()
    wait_for(lambda: stats(url)["server"]["live"] == 0, "the abort")
    last = stats(url)
    assert last["server"]["aborted"] == after["server"]["aborted"] + 1 and last["server"]["pending"] == 0
    assert last["engine"]["tokens_generated"] - after["engine"]["tokens_generated"] < 400
    assert last["kv_blocks"]["free"] == last["kv_blocks"]["total"]


def test_full_queue_gets_503_and_recovers(faulty, ckpt):
    """--max-pending 3 counts samples (prompts x n): with 2 + 1 samples streaming, the next request gets
    503 (OpenAI error shape, Retry-After); a request that alone exceeds the limit gets 400 naming n; once
    the streaming clients leave, requests are served again."""
    held = [open_stream(faulty, dict(model=ckpt, prompt=f"hold {n}", n=n, max_tokens=400, ignore_eos=True))
            for n in (2, 1)]
    status, data, headers = post(faulty, "/v1/completions", dict(model=ckpt, prompt="one more", max_tokens=4))
    assert status == 503 and data["error"]["type"] == "server_overloaded" and headers.get("retry-after") == "1"
    status, data, _ = post(faulty, "/v1/completions", dict(model=ckpt, prompt="big", n=4, max_tokens=4))
    assert status == 400 and data["error"]["param"] == "n"
    for conn, _ in held:
        conn.sock.close()
        conn.close()
    wait_for(lambda: stats(faulty)["server"]["pending"] == 0, "the held requests to be released")
    status, data, _ = post(faulty, "/v1/completions", dict(model=ckpt, prompt="one more", max_tokens=4))
    assert status == 200 and data["usage"]["completion_tokens"] == 4


def test_a_crash_inside_one_request_fails_only_that_request(faulty, ckpt, offline):
    """A fault in one request's processing: that request gets a 500 (or an error event in its stream) while
    a request running beside it finishes exactly as the offline API says; the server stays up."""
    c = client_for(faulty)
    result = {}
    bystander = threading.Thread(target=lambda: result.setdefault("text", c.completions.create(
        model=ckpt, prompt="bystander", max_tokens=80, seed=6, extra_body=dict(ignore_eos=True)).choices[0].text))
    bystander.start()
    status, data, _ = post(faulty, "/v1/completions", dict(model=ckpt, prompt="CRASH-REQUEST", max_tokens=50))
    assert status == 500 and data["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError, match="internal error"):
        for _ in c.completions.create(model=ckpt, prompt="CRASH-REQUEST", max_tokens=50, stream=True):
            pass
    bystander.join(timeout=120)
    assert result["text"] == expect(offline, "bystander", max_tokens=80, seed=6, ignore_eos=True)[0].text
    assert stats(faulty)["server"]["failed"] >= 2 and bench.get_json(faulty + "/health") == {"status": "ok"}


def test_an_engine_failure_fails_the_running_requests_and_the_server_recovers(faulty, ckpt, offline):
    """A fault in the engine step fails the requests in flight (a streaming one gets an error event); the
    engine is rebuilt empty and the next seeded request equals the offline API's output."""
    c = client_for(faulty)
    conn, resp = open_stream(faulty, dict(model=ckpt, prompt="victim", max_tokens=450, ignore_eos=True))
    status, data, _ = post(faulty, "/v1/completions", dict(model=ckpt, prompt="CRASH-ENGINE", max_tokens=5))
    assert status == 500
    rest = rest_of_stream(resp)
    assert '"error"' in rest and "[DONE]" not in rest
    conn.close()
    wait_for(lambda: healthy(faulty), "the rebuilt engine")
    assert stats(faulty)["server"]["engine_failures"] == 1
    got = c.completions.create(model=ckpt, prompt="after", max_tokens=30, seed=2).choices[0].text
    assert got == expect(offline, "after", max_tokens=30, seed=2)[0].text


def not_batched(m, clients, tokens):
    """The load test's evidence of batching across clients; returns the criteria that failed."""
    failed = []
    if m["max_distinct_requests"] < clients // 2:
        failed.append(f"at most {m['max_distinct_requests']} distinct requests in one decode step")
    if m["decode_steps"] >= clients * tokens // 4:
        failed.append(f"{m['decode_steps']} decode steps for {clients} x {tokens} tokens")
    return failed


def test_load_64_concurrent_streams(url, ckpt, offline):
    """64 concurrent streaming clients x 200 tokens (seeded, ignore_eos): every response completes, each
    with one response id and exactly its offline text (distinct prompts and seeds: a lost, duplicated or
    mixed-up token would show); the engine ran requests of different clients in the same decode steps
    (the control below shows a one-at-a-time server fails this); and the aggregate rate beats the same
    requests sent one at a time."""
    m = bench.measure(url, ckpt, CLIENTS, LOAD_TOKENS, ONE_AT_A_TIME)
    want = offline.generate([r["prompt"] for r in m["reqs"]],
                            [SamplingParams(seed=r["seed"], max_tokens=LOAD_TOKENS, ignore_eos=True) for r in m["reqs"]],
                            use_tqdm=False)
    for got, w in zip(m["concurrent"], want):
        assert got["finish"] == "length" and got["completion_tokens"] == LOAD_TOKENS and len(got["ids"]) == 1
        assert got["text"] == w.outputs[0].text
    assert len({r["text"] for r in m["concurrent"]}) == CLIENTS
    assert [r["text"] for r in m["sequential"]] == [r["text"] for r in m["concurrent"][:ONE_AT_A_TIME]]
    assert not_batched(m, CLIENTS, LOAD_TOKENS) == []
    print("\n" + bench.table(m))
    assert m["concurrent_tok_s"] > 2 * m["sequential_tok_s"]


def test_the_load_test_fails_a_one_at_a_time_server(locked, ckpt):
    """The negative control: the same server behind a lock held for each whole request (8 clients x 30
    tokens to keep it short) still answers correctly but fails both batching criteria."""
    m = bench.measure(locked, ckpt, 8, 30, 2)
    assert all(r["completion_tokens"] == 30 for r in m["concurrent"])
    assert len(not_batched(m, 8, 30)) == 2 and m["max_distinct_requests"] == 1
