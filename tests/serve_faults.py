"""serve.py with faults injected, for tests/test_serve.py (run as a script, like serve.py). A request
whose prompt contains CRASH-REQUEST raises inside its own text processing; one containing CRASH-ENGINE
makes the next engine step raise. Everything else is serve.py unchanged."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
import llm  # noqa: E402
import serve  # noqa: E402

armed = []
process, new_request, step = llm.RequestState.process, llm.LLM.new_request, engine.Engine.step


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


llm.RequestState.process, llm.LLM.new_request, engine.Engine.step = faulty_process, arming_new_request, faulty_step

if __name__ == "__main__":
    serve.main()
