"""
An OpenAI-compatible server on our engine (FastAPI + uvicorn, the stack vLLM serves with):

    python serve.py --ckpt checkpoints/r1-distill-1.5b --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "checkpoints/r1-distill-1.5b", "prompt": "1+1=", "max_tokens": 16}'

POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
/health, and /stats (the engine's counters). One thread owns the engine (EngineLoop): between steps it
admits new requests and aborts those whose clients went away, so requests from different clients decode
in the same step (continuous batching across requests). Each step's tokens go through llm.RequestState,
the offline API's own text side, and on to the request's asyncio queue, so a token is streamed as soon as
it is sampled and a seeded request returns exactly what LLM.generate returns for it. HTTP requests are
parsed and answered in openai_api.py.
"""
import argparse
import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import traceback

import openai_api as api
from llm import LLM, InvalidRequest
from model import CheckpointError

log = logging.getLogger("serve")


class Sink:
    """Where the engine thread delivers a client's items: an asyncio queue on the server's event loop."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()


def deliver(batch):
    for sink, item in batch:
        sink.queue.put_nowait(item)


class EngineLoop:
    """The one thread that touches the engine. Others talk to it through `inbox` (add, abort) and hear back
    through each request's Sink: ("deltas", request_id, [Delta]), ("done", request_id, RequestState) or
    ("error", request_id, exception). A failure inside one request's processing fails that request only; a
    failure of the engine step fails the requests in flight and the engine is rebuilt empty."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.inbox = queue.SimpleQueue()
        self.live = {}  # request id -> (RequestState, Sink): engine thread only
        self.outbox = []  # (sink, item) to hand to the event loop in one call per step
        self.counts = dict(added=0, finished=0, aborted=0, failed=0, engine_failures=0, steps=0)
        self.alive = True
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def add(self, request_id, text, ids, params, sink):
        self.inbox.put(("add", request_id, text, ids, params, sink))

    def abort(self, request_id):
        self.inbox.put(("abort", request_id))

    def _run(self):
        try:
            while True:
                self._drain(block=not self.live and not self.llm.engine.has_unfinished())
                if self.live or self.llm.engine.has_unfinished():
                    self._step()
                self._flush()
        except BaseException:
            self.alive = False  # /health reports it; nothing can be served any more
            log.exception("engine thread died")
            raise

    def _post(self, sink, item):
        self.outbox.append((sink, item))

    def _flush(self):
        """One wake-up of the event loop per step, not one per request: with many streams the two threads
        would otherwise trade the GIL for every token."""
        if self.outbox:
            batch, self.outbox = self.outbox, []
            batch[0][0].loop.call_soon_threadsafe(deliver, batch)

    def _drain(self, block):
        while True:
            try:
                cmd = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if cmd[0] == "add":
                _, rid, text, ids, params, sink = cmd
                try:
                    self.live[rid] = (self.llm.new_request(text, ids, params, request_id=rid), sink)
                    self.counts["added"] += 1
                except Exception as e:  # noqa: BLE001 - a bad request must not stop the loop
                    self._post(sink, ("error", rid, e))
            elif cmd[0] == "abort" and cmd[1] in self.live:
                del self.live[cmd[1]]
                self.llm.engine.abort(cmd[1])
                self.counts["aborted"] += 1

    def _step(self):
        outputs = None
        try:
            outputs = self.llm.engine.step()
        except Exception:  # noqa: BLE001
            log.exception("engine step failed: failing %d request(s) and rebuilding the engine", len(self.live))
        if outputs is None:  # outside the except block: its traceback would keep the old engine (and pool) alive
            self.counts["engine_failures"] += 1
            for rid, (_, sink) in self.live.items():
                self._post(sink, ("error", rid, RuntimeError("the engine failed while running this request")))
            self.live = {}
            self._flush()  # the clients hear it before the (slow, on CUDA) rebuild
            self.llm.rebuild_engine()
            return
        self.counts["steps"] += 1
        touched = {}
        for out in outputs:
            entry = self.live.get(out.request_id)
            if entry is None:
                continue  # aborted or failed already
            try:
                if entry[0].process(out):  # a stop string: the engine stops the sample now
                    self.llm.engine.abort(out.request_id, out.sample_index)
                touched[out.request_id] = entry
            except Exception as e:  # noqa: BLE001
                self._fail(out.request_id, e)
        for rid, (state, sink) in touched.items():
            if rid not in self.live:
                continue
            try:
                deltas = state.take()
            except Exception as e:  # noqa: BLE001
                self._fail(rid, e)
                continue
            if deltas:
                self._post(sink, ("deltas", rid, deltas))
            if state.finished:
                del self.live[rid]
                self.counts["finished"] += 1
                self._post(sink, ("done", rid, state))

    def _fail(self, rid, error):
        log.error("request %s failed: %s", rid, "".join(traceback.format_exception(error)))
        _, sink = self.live.pop(rid)
        self.llm.engine.abort(rid)
        self.counts["failed"] += 1
        self._post(sink, ("error", rid, RuntimeError(f"internal error while processing this request ({type(error).__name__})")))


class Server:
    """What the HTTP handlers share: the LLM, its engine loop, the served name and the admission count."""

    def __init__(self, llm, model_name, max_pending):
        self.llm, self.model_name, self.max_pending = llm, model_name, max_pending
        self.loop_thread = EngineLoop(llm)
        self.pending = 0  # samples admitted whose Job has not closed (event loop side)
        self.ids = itertools.count()
        self.started = time.time()

    def admit(self, count, param):
        """count = samples (prompts x n): what memory in flight grows with."""
        if not self.loop_thread.alive:
            raise api.APIError(503, "the engine thread is not running", None, "server_error")
        if count > self.max_pending:
            raise InvalidRequest(param, f"{count} samples in one request; this server runs at most {self.max_pending}")
        if self.pending + count > self.max_pending:
            raise api.Overloaded(f"server busy: {self.pending} samples in flight (limit {self.max_pending}); retry later")
        self.pending += count

    def job(self, request, prompts, params, prefix):
        """Queue prompts x params.n samples as engine requests; returns the Job that follows them."""
        count = len(prompts) * params.n
        self.admit(count, "n" if params.n > 1 else "prompt")
        job = Job(self, request, [f"{prefix}-{next(self.ids)}-{i}" for i in range(len(prompts))], count)
        for rid, (text, ids) in zip(job.rids, prompts):
            self.loop_thread.add(rid, text, ids, params, job.sink)
        return job

    def stats(self):
        eng = self.llm.engine  # None while it is being rebuilt
        pool = getattr(eng, "pool", None)
        return dict(engine=dict(getattr(eng, "stats", {})), server=dict(self.loop_thread.counts, pending=self.pending,
                                                        live=len(self.loop_thread.live)),
                    kv_blocks=dict(total=getattr(eng, "num_blocks", None), free=getattr(pool, "num_free", None)))


class Job:
    """One HTTP request's engine requests. It closes once: when every one finished, or when its client went
    away (a watcher task waits for the disconnect), aborting whatever is still running."""

    def __init__(self, server, request, rids, count):
        self.server, self.rids, self.open, self.count = server, rids, set(rids), count
        self.sink = Sink(asyncio.get_running_loop())
        self.closed = False
        self.watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if self.open:
            log.info("client went away: aborting %d request(s)", len(self.open))
        self.close()

    async def events(self):
        """Items from the engine thread until every request finished (or the job was closed)."""
        while self.open and not self.closed:
            item = await self.sink.queue.get()
            if item is None:
                return
            kind, rid, payload = item
            if kind in ("done", "error"):
                self.open.discard(rid)
            yield kind, rid, payload

    def close(self):
        if self.closed:
            return
        self.closed = True
        for rid in self.open:
            self.server.loop_thread.abort(rid)
        self.server.pending -= self.count
        self.sink.queue.put_nowait(None)  # wakes a consumer waiting in events()
        if self.watcher is not asyncio.current_task():
            self.watcher.cancel()


def build_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(_app):
        server.loop_thread.start()  # the engine thread starts with the server, on its event loop's watch
        yield

    app = FastAPI(title="nanoscaler", version="1", lifespan=lifespan)

    @app.exception_handler(api.APIError)
    async def api_error(_request, e: api.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(InvalidRequest)
    async def invalid(_request, e: InvalidRequest):
        return JSONResponse(api.error_body(str(e), e.param), status_code=400)

    @app.get("/health")
    async def health():
        if not server.loop_thread.alive or server.llm.engine is None:
            why = "the engine thread is not running" if not server.loop_thread.alive else "the engine is being rebuilt"
            return JSONResponse(api.error_body(why, None, "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return server.stats()

    @app.get("/v1/models")
    async def models():
        return api.models_response(server.model_name, server.started, server.llm.max_model_len)

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        api.check_model(server, {"model": model})
        return api.models_response(server.model_name, server.started, server.llm.max_model_len)["data"][0]

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.handle(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.handle(server, request, chat=True)

    return app


def main(argv=None):
    ap = argparse.ArgumentParser(description="OpenAI-compatible server for a checkpoint (FastAPI + uvicorn).")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (HF layout with tokenizer files)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="the model name clients send (default: --ckpt)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="CUDA: share of free memory for the KV pool")
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool size in bytes (CPU default 512 MiB)")
    ap.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per request")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one decode step")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-pending", type=int, default=1024,
                    help="most samples (prompts x n) admitted at once, running or waiting; more get 503")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn
    try:
        llm = LLM(args.ckpt, dtype=args.dtype, device=args.device, seed=None, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                  kv_cache_memory_bytes=args.kv_cache_memory, block_size=args.block_size,
                  enforce_eager=args.enforce_eager)
    except (InvalidRequest, CheckpointError) as e:
        ap.error(str(e))
    server = Server(llm, args.served_model_name or args.ckpt, args.max_pending)
    log.info("serving %s on http://%s:%d (max_model_len %d, %d KV blocks of %d, device %s)", server.model_name,
             args.host, args.port, llm.max_model_len, llm.engine.num_blocks, args.block_size, llm.device)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
