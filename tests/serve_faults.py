"""serve.py with faults injected, for tests/test_serve.py (run as a script, like serve.py). A request
whose prompt contains CRASH-REQUEST raises inside its own text processing; one containing CRASH-ENGINE
makes the next engine step raise. With --one-at-a-time it is also the load test's negative control: the
HTTP handler runs behind a lock held until the response ends, one request at a time. Everything else is
serve.py unchanged."""
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
import llm  # noqa: E402
import openai_api  # noqa: E402
import serve  # noqa: E402

armed = []
process, new_request, step, handle = llm.RequestState.process, llm.LLM.new_request, engine.Engine.step, openai_api.handle


def faulty_process(self, out):
    if self.prompt and "CRASH-REQUEST" in self.prompt:
        raise RuntimeError("injected fault inside one request")
    return process(self, out)


def arming_new_request(self, text, ids, params, request_id=None):
    if text and "CRASH-ENGINE" in text:
        armed.append(True)
    return new_request(self, text, ids, params, request_id)


def faulty_step(self):
    if armed:
        armed.clear()
        raise RuntimeError("injected engine fault")
    return step(self)


lock = None


async def one_at_a_time(server, request, chat):
    """The whole request, admission to the last streamed byte, under one lock."""
    global lock
    lock = lock or asyncio.Lock()
    await lock.acquire()
    try:
        response = await handle(server, request, chat)
    except BaseException:
        lock.release()
        raise
    if not hasattr(response, "body_iterator"):
        lock.release()
        return response
    inner = response.body_iterator

    async def body():
        try:
            async for part in inner:
                yield part
        finally:
            lock.release()
    response.body_iterator = body()
    return response


llm.RequestState.process, llm.LLM.new_request, engine.Engine.step = faulty_process, arming_new_request, faulty_step

if __name__ == "__main__":
    if "--one-at-a-time" in sys.argv:
        sys.argv.remove("--one-at-a-time")
        openai_api.handle = one_at_a_time
    serve.main()
