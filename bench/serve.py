"""
Serving throughput: C concurrent streaming clients against one `serve.py` versus the same requests sent
one at a time, with the official openai client. Every request is seeded and ignores EOS, so each runs
its full max_tokens and the two runs do the same work.

    python bench/serve.py --tiny                          # a tiny random checkpoint (CPU, ~1 min on 2 cores)
    python bench/serve.py --ckpt DIR --clients 64 --max-tokens 256 --sequential 8

Prints a table: requests, tokens, the engine's decode steps, wall time, aggregate tokens/s (the clients
run in this process, on the same cores as the server), the most distinct requests the engine ran in one
decode step (from the server's /stats), the ratio, and the same requests through LLM.generate in this
process with no HTTP (the engine's own rate, for the server's overhead). The one-at-a-time rate is measured on
the first --sequential requests (a rate, so a subset suffices). tests/test_serve.py's load test uses the
functions here.
"""
import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(ckpt, *args, script="serve.py", threads=1, log=None):
    """A serve.py process (or a script wrapping it) on a free localhost port: (process, base URL, log file).
    Its output goes to `log` (a path) or is dropped. Call wait_healthy before use, stop_server after."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    out = open(log, "w") if log else subprocess.DEVNULL
    cmd = [sys.executable, os.path.join(ROOT, script), "--ckpt", ckpt, "--port", str(port), "--log-level", "warning",
           *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def wait_healthy(server, startup_s=300):
    proc, url, log = server
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = open(log).read()[-3000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode} during start-up\n{tail}")
        try:
            if get_json(url + "/health", timeout=2).get("status") == "ok":
                return url
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server at {url} not healthy after {startup_s} s")


def stop_server(server):
    """Terminate our own process (by its handle), kill it if it does not stop."""
    proc = server[0]
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def server_process(ckpt, *args, **kw):
    """start_server + wait_healthy; yields the base URL, stops the server on exit."""
    server = start_server(ckpt, *args, **kw)
    try:
        yield wait_healthy(server)
    finally:
        stop_server(server)


def requests_for(clients, max_tokens, seed0=1000):
    """Distinct prompts and seeds, so a response mixed up with another's cannot pass the comparison."""
    return [dict(prompt=f"Request {i}: count to {i % 7 + 3}.", seed=seed0 + i, max_tokens=max_tokens)
            for i in range(clients)]


async def stream_one(client, model, req):
    """One streaming completion; returns its text, completion token count (usage), chunk count and the
    response ids seen (one id per response: anything else would be a mixed stream)."""
    text, chunks, ids, usage, finish = [], 0, set(), None, None
    stream = await client.completions.create(model=model, prompt=req["prompt"], max_tokens=req["max_tokens"],
                                             seed=req["seed"], temperature=1.0, stream=True,
                                             extra_body=dict(ignore_eos=True))
    async for chunk in stream:
        chunks += 1
        ids.add(chunk.id)
        for c in chunk.choices:
            text.append(c.text)
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    return dict(text="".join(text), chunks=chunks, ids=ids, finish=finish,
                completion_tokens=usage.completion_tokens if usage else None)


async def run_clients(url, model, reqs, concurrent):
    """All requests at once (concurrent) or one after another; returns (results in order, wall seconds)."""
    from openai import AsyncOpenAI  # its default connection pool (1,000) admits every client at once
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(stream_one(client, model, r) for r in reqs))
    else:
        results = [await stream_one(client, model, r) for r in reqs]
    wall = time.perf_counter() - t0
    await client.close()
    return list(results), wall


def measure(url, model, clients, max_tokens, sequential):
    """Concurrent run, then the one-at-a-time run on the first `sequential` requests, with the engine's
    counters (/stats) around each. Returns a dict of everything the table and the test need."""
    reqs = requests_for(clients, max_tokens)
    steps = lambda: get_json(url + "/stats")["engine"]
    s0 = steps()
    conc, conc_wall = asyncio.run(run_clients(url, model, reqs, concurrent=True))
    s1 = steps()
    seq, seq_wall = asyncio.run(run_clients(url, model, reqs[:sequential], concurrent=False))
    s2 = steps()
    tokens = lambda rs: sum(r["completion_tokens"] or 0 for r in rs)
    return dict(reqs=reqs, concurrent=conc, concurrent_wall=conc_wall, concurrent_tok_s=tokens(conc) / conc_wall,
                sequential=seq, sequential_wall=seq_wall, sequential_tok_s=tokens(seq) / seq_wall,
                max_distinct_requests=s1["max_distinct_requests"], decode_steps=s1["decode_steps"] - s0["decode_steps"],
                sequential_decode_steps=s2["decode_steps"] - s1["decode_steps"])


def offline_rate(ckpt, reqs, threads):
    """The same requests through LLM.generate in this process (no HTTP): (tokens/s, wall seconds)."""
    sys.path.insert(0, ROOT)
    import torch
    from llm import LLM, SamplingParams
    torch.set_num_threads(threads)
    llm = LLM(ckpt)
    t0 = time.perf_counter()
    outs = llm.generate([r["prompt"] for r in reqs], [SamplingParams(seed=r["seed"], max_tokens=r["max_tokens"],
                                                                     ignore_eos=True) for r in reqs], use_tqdm=False)
    wall = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / wall, wall


def table(m):
    conc, seq = m["concurrent"], m["sequential"]
    rows = [("concurrent", len(conc), sum(r["completion_tokens"] for r in conc), m["decode_steps"],
             m["concurrent_wall"], m["concurrent_tok_s"]),
            ("one at a time", len(seq), sum(r["completion_tokens"] for r in seq), m.get("sequential_decode_steps", ""),
             m["sequential_wall"], m["sequential_tok_s"])]
    if "offline_tok_s" in m:
        rows.append(("offline LLM.generate, no HTTP", len(conc), sum(r["completion_tokens"] for r in conc), "",
                     m["offline_wall"], m["offline_tok_s"]))
    lines = ["| mode | requests | tokens | decode steps | wall s | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {n} | {tok} | {st} | {wall:.2f} | {rate:,.0f} |" for name, n, tok, st, wall, rate in rows]
    lines.append(f"speed-up {m['concurrent_tok_s'] / m['sequential_tok_s']:.1f}x; most distinct requests in one "
                 f"decode step: {m['max_distinct_requests']}; load average {os.getloadavg()[0]:.1f}")
    return "\n".join(lines)


def tiny_checkpoint(path):
    """The tests' tiny random Qwen2 (tests/fixtures.py) with 512 positions."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from fixtures import tiny_checkpoint as make
    return make(path, seed=3, max_position_embeddings=512)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint folder (default with --tiny: a tiny random one)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--url", help="an already running server (else one is started)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--sequential", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    ap.add_argument("--no-offline", action="store_true", help="skip the in-process LLM.generate row")
    ap.add_argument("--server-args", default="", help="extra serve.py flags, e.g. '--max-num-seqs 128'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or tiny_checkpoint(os.path.join(tmp, "tiny"))
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(server_process(ckpt, *args.server_args.split(), threads=args.threads,
                                                                 log=os.path.join(tmp, "server.log")))
            model = get_json(url + "/v1/models")["data"][0]["id"]
            m = measure(url, model, args.clients, args.max_tokens, args.sequential)
        if not args.url and not args.no_offline:
            m["offline_tok_s"], m["offline_wall"] = offline_rate(ckpt, m["reqs"], args.threads)
    print(f"{args.clients} streaming clients x {args.max_tokens} tokens, ckpt {args.ckpt or 'tiny (tests/fixtures.py)'}")
    print(table(m))


if __name__ == "__main__":
    main()
