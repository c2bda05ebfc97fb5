"""
The OpenAI wire format for serve.py: a request body is checked into prompts and an llm.SamplingParams
(every error names its field, in OpenAI's error shape), and the engine thread's llm.Deltas become
responses or server-sent-event chunks (`data: {...}` lines, then `data: [DONE]`).

Fields: OpenAI's (model, prompt / messages, max_tokens / max_completion_tokens, temperature, top_p, n,
stream, stream_options.include_usage, stop, seed, logprobs / top_logprobs) and vLLM's extras (top_k,
ignore_eos, stop_token_ids, include_stop_str_in_output, skip_special_tokens, add_special_tokens (default:
true for completions, so a DeepSeek-R1-Distill prompt starts with BOS; false for chat, whose template writes it),
add_generation_prompt, chat_template_kwargs). Fields we cannot honour (echo, suffix, best_of > n, logit_bias,
tools, a JSON response_format, penalties) are refused with a 400 rather than ignored. Usage is in every response: a
streamed one carries it on the chunk that finishes the last choice, or, with include_usage, in OpenAI's
extra final chunk with no choices.
"""
import json
import time
from dataclasses import dataclass

from llm import InvalidRequest, SamplingParams


class APIError(Exception):
    def __init__(self, status, message, param=None, type_="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.type, self.code, self.headers = status, param, type_, code, headers

    def body(self):
        return error_body(str(self), self.param, self.type, self.code)


class Overloaded(APIError):
    def __init__(self, message):
        super().__init__(503, message, None, "server_overloaded", "server_overloaded", {"Retry-After": "1"})


def error_body(message, param, type_="invalid_request_error", code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def models_response(name, created, max_model_len):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(created),
                                        "owned_by": "nanoscaler", "max_model_len": max_model_len}]}


# --------------------------------------------------------------------------- requests

KINDS = {"int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
         "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
         "bool": (lambda v: isinstance(v, bool), "a boolean"),
         "str": (lambda v: isinstance(v, str), "a string"),
         "dict": (lambda v: isinstance(v, dict), "an object"),
         "list": (lambda v: isinstance(v, list), "an array")}


def get(body, name, kind, default=None):
    v = body.get(name)
    if v is None:
        return default
    ok, what = KINDS[kind]
    if not ok(v):
        raise InvalidRequest(name, f"'{name}' must be {what}, got {json.dumps(v)[:80]}")
    return v


@dataclass
class Parsed:
    prompts: list          # (text or None, token ids) per prompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_n: int | None      # top log-probs per token, None: no log-probs


async def read_body(request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(None, f"malformed JSON body: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequest(None, "the JSON body must be an object")
    return body


def check_model(server, body):
    model = get(body, "model", "str")
    if model is not None and model != server.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{server.model_name}`",
                       "model", code="model_not_found")


def refuse_unsupported(body, chat):
    rules = [("echo", lambda v: v is True), ("suffix", lambda v: v is not None),
             ("logit_bias", lambda v: bool(v)), ("tools", lambda v: bool(v)), ("functions", lambda v: bool(v)),
             ("response_format", lambda v: isinstance(v, dict) and v.get("type") not in (None, "text")),
             ("best_of", lambda v: v is not None and v != body.get("n", 1))]
    for name, bad in rules:
        if bad(body.get(name)):
            raise InvalidRequest(name, f"'{name}' is not supported by this server")


def sampling_params(body, max_tokens, logprobs, renames):
    """SamplingParams from the fields both endpoints share; its errors renamed to the endpoint's field."""
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequest("stop", "'stop' must be a string or an array of strings")
    kw = dict(n=get(body, "n", "int", 1), temperature=get(body, "temperature", "number", 1.0),
              top_p=get(body, "top_p", "number", 1.0), top_k=get(body, "top_k", "int", 0),
              seed=get(body, "seed", "int"), stop=stop, stop_token_ids=get(body, "stop_token_ids", "list"),
              ignore_eos=get(body, "ignore_eos", "bool", False), max_tokens=max_tokens, logprobs=logprobs,
              include_stop_str_in_output=get(body, "include_stop_str_in_output", "bool", False),
              skip_special_tokens=get(body, "skip_special_tokens", "bool", True),
              presence_penalty=get(body, "presence_penalty", "number", 0.0),
              frequency_penalty=get(body, "frequency_penalty", "number", 0.0),
              repetition_penalty=get(body, "repetition_penalty", "number", 1.0),
              min_p=get(body, "min_p", "number", 0.0), min_tokens=get(body, "min_tokens", "int", 0))
    try:
        return SamplingParams(**kw)
    except InvalidRequest as e:
        if e.param not in renames:
            raise
        raise InvalidRequest(renames[e.param], str(e).replace(e.param, renames[e.param], 1)) from None


def check_room(server, prompts, max_tokens, field):
    """vLLM's rule: prompt + max_tokens must fit in the context (None: whatever room is left)."""
    limit = server.llm.max_model_len
    for _, ids in prompts:
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise InvalidRequest(field, f"'{field}' is too large: {max_tokens}. This model's maximum context length "
                                        f"is {limit} tokens and your request has {len(ids)} input tokens "
                                        f"({max_tokens} > {limit} - {len(ids)})")


def common(body):
    stream = get(body, "stream", "bool", False)
    options = get(body, "stream_options", "dict", {})
    return stream, bool(stream and options.get("include_usage"))


def parse_completion(server, body):
    check_model(server, body)
    refuse_unsupported(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt", "'prompt' must be a string, an array of strings, or token ids")
    llm = server.llm
    specials = get(body, "add_special_tokens", "bool", True)  # vLLM's default here: the tokenizer's BOS
    prompts = [llm.prompt_ids(p if isinstance(p, str) else {"prompt_token_ids": p}, "prompt", specials) for p in prompt]
    max_tokens = get(body, "max_tokens", "int", 16)
    logprobs = get(body, "logprobs", "int")
    params = sampling_params(body, max_tokens, logprobs, {})
    check_room(server, prompts, max_tokens, "max_tokens")
    stream, include_usage = common(body)
    return Parsed(prompts, params, stream, include_usage, logprobs)


def parse_chat(server, body):
    check_model(server, body)
    refuse_unsupported(body, chat=True)
    llm = server.llm
    kwargs = get(body, "chat_template_kwargs", "dict", {})
    text = llm.apply_chat_template(body.get("messages"), get(body, "add_generation_prompt", "bool", True), **kwargs)
    prompts = [llm.prompt_ids(text, "messages", get(body, "add_special_tokens", "bool", False))]  # the template wrote them
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get(body, field, "int")
    top_n = get(body, "top_logprobs", "int", 0) if get(body, "logprobs", "bool", False) else None
    if top_n is None and body.get("top_logprobs") is not None:
        raise InvalidRequest("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    params = sampling_params(body, max_tokens, top_n, {"max_tokens": field, "logprobs": "top_logprobs"})
    check_room(server, prompts, max_tokens, field)
    stream, include_usage = common(body)
    return Parsed(prompts, params, stream, include_usage, top_n)


# --------------------------------------------------------------------------- responses

class Builder:
    """Turns a job's Deltas into OpenAI chunks or one response. Choice i*n + j is prompt i's sample j."""

    def __init__(self, server, job, parsed, chat):
        self.chat, self.tok, self.top_n = chat, server.llm.tokenizer, parsed.top_n
        self.n = parsed.params.n
        self.prompt_of = {rid: i for i, rid in enumerate(job.rids)}
        self.id = job.rids[0].rsplit("-", 1)[0]
        self.created, self.model = int(time.time()), server.model_name
        self.include_usage = parsed.include_usage
        total = len(parsed.prompts) * self.n
        self.prompt_tokens = sum(len(ids) for _, ids in parsed.prompts)
        self.completion_tokens, self.num_choices, self.num_finished = 0, total, 0
        self.text, self.finish, self.logprobs = [""] * total, [None] * total, [[] for _ in range(total)]
        self.offsets = [0] * total

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, choice, delta):
        """Log-probs of a delta's tokens: chat's `content` entries or the completions' four lists."""
        if self.top_n is None:
            return None
        name = lambda t: self.tok.decode([t])
        clamp = lambda v: max(v, -9999.0)  # JSON has no -inf (vLLM clamps the same way)
        entries = [(t, lp, top or []) for t, (lp, top) in zip(delta.token_ids, delta.logprobs)]
        if self.chat:
            return [{"token": name(t), "logprob": clamp(lp), "bytes": list(name(t).encode()),
                     "top_logprobs": [{"token": name(a), "logprob": clamp(v), "bytes": list(name(a).encode())}
                                      for a, v in top[:self.top_n]]} for t, lp, top in entries]
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            out["tokens"].append(name(t))
            out["token_logprobs"].append(clamp(lp))
            out["top_logprobs"].append({name(t): clamp(lp), **{name(a): clamp(v) for a, v in top[:self.top_n]}})
            out["text_offset"].append(self.offsets[choice])
            self.offsets[choice] += len(name(t))
        return out

    def absorb(self, rid, delta):
        """Account one Delta; returns (choice index, its log-probs in wire form)."""
        choice = self.prompt_of[rid] * self.n + delta.index
        self.completion_tokens += len(delta.token_ids)
        self.text[choice] += delta.text
        lp = self._logprobs(choice, delta)
        if lp is not None:
            self.logprobs[choice].append(lp)
        if delta.finish_reason is not None:
            self.finish[choice] = delta.finish_reason
            self.num_finished += 1
        return choice, lp

    def opening_chunks(self):
        if not self.chat:
            return []
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(self.num_choices)]

    def chunk(self, rid, delta):
        choice, lp = self.absorb(rid, delta)
        if self.chat:
            body = {"index": choice, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": None if lp is None else {"content": lp}}
            head = self._head("chat.completion.chunk")
        else:
            body = {"index": choice, "text": delta.text, "logprobs": lp}
            head = self._head("text_completion")
        body["finish_reason"] = delta.finish_reason
        if delta.finish_reason is not None:
            body["stop_reason"] = delta.stop_reason
        chunk = {**head, "choices": [body]}
        if self.num_finished == self.num_choices and not self.include_usage:
            chunk["usage"] = self.usage()  # the last choice finished: usage rides on its chunk
        return chunk

    def closing_chunks(self):
        if not self.include_usage:
            return []
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return [{**self._head(obj), "choices": [], "usage": self.usage()}]

    def response(self):
        choices = []
        for i in range(self.num_choices):
            if self.chat:
                lp = None if self.top_n is None else {"content": [e for part in self.logprobs[i] for e in part]}
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i]},
                                "logprobs": lp, "finish_reason": self.finish[i]})
            else:
                lp = None
                if self.top_n is not None:
                    lp = {k: [x for part in self.logprobs[i] for x in part[k]]
                          for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                choices.append({"index": i, "text": self.text[i], "logprobs": lp, "finish_reason": self.finish[i]})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}


def failure(payload):
    if isinstance(payload, InvalidRequest):
        return APIError(400, str(payload), payload.param)
    return APIError(500, str(payload), None, "server_error")


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_events(job, builder):
    try:
        for chunk in builder.opening_chunks():
            yield sse(chunk)
        async for kind, rid, payload in job.events():
            if kind == "deltas":
                for delta in payload:
                    yield sse(builder.chunk(rid, delta))
            elif kind == "error":
                yield sse(failure(payload).body())
                return
        if job.open:  # closed early: the client went away
            return
        for chunk in builder.closing_chunks():
            yield sse(chunk)
        yield "data: [DONE]\n\n"
    finally:
        job.close()


async def collect(job, builder):
    try:
        async for kind, rid, payload in job.events():
            if kind == "deltas":
                for delta in payload:
                    builder.absorb(rid, delta)
            elif kind == "error":
                raise failure(payload)
        return builder.response()
    finally:
        job.close()


async def handle(server, request, chat):
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, StreamingResponse
    body = await read_body(request)
    parsed = parse_chat(server, body) if chat else parse_completion(server, body)
    job = server.job(request, parsed.prompts, parsed.params, "chatcmpl" if chat else "cmpl")
    builder = Builder(server, job, parsed, chat)
    if parsed.stream:  # the background task closes a job whose stream never started
        return StreamingResponse(stream_events(job, builder), media_type="text/event-stream",
                                 background=BackgroundTask(job.close))
    return JSONResponse(await collect(job, builder))
