"""
vLLM's offline API on our engine. The DeepScaleR tutorial's snippet runs with only the import changed:

    from llm import LLM, SamplingParams
    llm = LLM(model="checkpoints/DeepScaleR-1.5B-Preview")          # a local HF-layout folder
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=512)
    outputs = llm.generate(prompt, sampling_params)
    for output in outputs:
        print(output.prompt, output.outputs[0].text)

    llm.chat([{"role": "user", "content": "What is 1+1?"}], sampling_params)   # the checkpoint's chat template

Names and defaults are vLLM's. Each prompt becomes one engine request (engine.add_request) with params.n
samples; everything text-side happens here, token by token, in RequestState: incremental detokenisation,
stop strings (the engine stops on token ids only; a stop string aborts the sample), log-probs with their
top-N alternatives. serve.py feeds the same RequestState from its engine thread, so a seeded request
streams exactly the text this file returns for it.
"""
import functools
import gc
import itertools
import json
import os
import random
import time
from dataclasses import dataclass

import torch

import engine as E
import model as M
import tokenizer as TK

MAX_LOGPROBS = 20  # vLLM's default max_logprobs; also the engine's limit
GREEDY_BELOW = 1e-5  # vLLM treats temperatures below this as greedy


class InvalidRequest(ValueError):
    """A bad argument; `param` names it (serve.py returns it as OpenAI's error `param`)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """vLLM's SamplingParams, the fields our engine implements, with vLLM's names and defaults.

    Where we differ from vLLM:
    - log-probs (`logprobs`, `cumulative_logprob`) are of log_softmax(logits / temperature) (temperature 1
      for greedy), the distribution the token is drawn from before top-p/top-k, as the GRPO trainer needs
      them; vLLM's default is the raw logits' log-softmax. cumulative_logprob is filled even without
      `logprobs`. A sampled token outside the top-N has rank None (vLLM ranks it in the whole vocabulary).
    - without `seed`, a request of LLM(seed=s) draws a seed from a generator seeded with s (reproducible
      per script); a server request without seed gets a random one.
    - a seeded sample's random draws are keyed by (seed, sample index, position) only, so they do not
      depend on the batch (two prompts with one seed share a random stream, as vLLM's per-request
      generators do).
    - stop strings: the earliest match in the text wins (vLLM: the first in list order that matches).
    - presence/frequency/repetition penalties, min_p, min_tokens and prompt_logprobs are not implemented:
      they are accepted at their neutral values only, anything else is refused.
    Not a difference: text prompts are tokenized as vLLM does (LLM.encode): generate() adds the tokenizer's
    special tokens (DeepSeek-R1-Distill's BOS), chat() does not (its template writes them).
    """
    n: int = 1
    temperature: float = 1.0         # < 1e-5 is greedy
    top_p: float = 1.0               # (0, 1]
    top_k: int = 0                   # 0 or -1: off
    seed: int | None = None
    stop: str | list | None = None   # strings that end a sample (not included in its text)
    stop_token_ids: list | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16      # None: up to the model's context
    logprobs: int | None = None      # per token, the sampled token's log-prob and the top-N alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    prompt_logprobs: int | None = None

    def __post_init__(self):
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self.verify()

    def verify(self):
        def integer(name, low, value=None):
            v = getattr(self, name) if value is None else value
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise InvalidRequest(name, f"{name} must be an integer >= {low}, got {v!r}")

        def number(name):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
                raise InvalidRequest(name, f"{name} must be a finite number, got {v!r}")
            return v
        integer("n", 1)
        if number("temperature") < 0:
            raise InvalidRequest("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise InvalidRequest("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        integer("top_k", -1)
        if self.max_tokens is not None:
            integer("max_tokens", 1)
        if self.seed is not None:
            integer("seed", -2**63)
        if self.logprobs is not None:
            integer("logprobs", 0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidRequest("logprobs", f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest("stop", f"stop must be a non-empty string or a list of them, got {s!r}")
        for t in self.stop_token_ids:
            integer("stop_token_ids", 0, t)
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
                              ("min_p", 0.0), ("min_tokens", 0), ("prompt_logprobs", None)):
            if getattr(self, name) != neutral:
                raise InvalidRequest(name, f"{name} is not supported by this engine (only {neutral!r})")

    def to_engine(self, max_tokens, seed):
        greedy = self.temperature < GREEDY_BELOW
        return E.SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else float(self.temperature),
                                top_p=1.0 if greedy else float(self.top_p),
                                top_k=-1 if greedy or self.top_k <= 0 else self.top_k, n=self.n, seed=seed,
                                stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
                                logprobs=self.logprobs)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = the most likely token; None: below the top-N
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None            # per token: {token_id: Logprob}, the sampled token first, then the top-N
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id; None for EOS or length

    def finished(self):
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool
    prompt_logprobs: list | None = None


@dataclass
class Delta:
    """What one sample produced since the last take (serve.py streams these)."""
    index: int
    text: str
    token_ids: list
    logprobs: list                   # per token (logprob, top-N (id, logprob) pairs or None)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class SampleState:
    """One sample's tokens and text as they arrive. Detokenisation is incremental: only a window of the
    last few tokens is decoded per step (a byte-level BPE token can end inside a UTF-8 character, which
    decodes to U+FFFD until the next token completes it, so text is released only when it is whole)."""

    def __init__(self, index, want_logprobs):
        self.index, self.want_logprobs = index, want_logprobs
        self.token_ids, self.entries, self.text, self.cumulative = [], [], "", 0.0
        self.num_text = 0                # token_ids[:num_text] are text (a final stop token is not)
        self.prefix = self.read = 0      # detokenizer window: token_ids[prefix:read] already decoded
        self.scan_from = 0               # stop strings are searched from here on
        self.sent_text = self.sent_tokens = 0
        self.final_sent = False
        self.finish_reason = self.stop_reason = None


class RequestState:
    """A request's samples, fed the engine's StepOutputs; the text side of both LLM and serve.py."""

    def __init__(self, request_id, prompt, prompt_token_ids, params, tokenizer, eos_ids):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.tok, self.eos_ids = params, tokenizer, frozenset(eos_ids)
        self.samples = [SampleState(i, params.logprobs is not None) for i in range(params.n)]
        self.max_stop = max(map(len, params.stop), default=0)
        # text that a later token could still turn into a stop string is held back while streaming
        self.holdback = self.max_stop - 1 if self.max_stop and not params.include_stop_str_in_output else 0

    @property
    def finished(self):
        return all(s.finish_reason is not None for s in self.samples)

    def process(self, out: E.StepOutput) -> bool:
        """Take one StepOutput. True when a stop string ended the sample: the caller aborts it in the engine
        (tokens sampled past the stop string are dropped here)."""
        s = self.samples[out.sample_index]
        if s.finish_reason is not None:
            return False  # e.g. the "abort" that follows a stop string
        tops = out.top_logprobs or [None] * len(out.new_token_ids)
        last = len(out.new_token_ids) - 1
        for k, (token, lp, top) in enumerate(zip(out.new_token_ids, out.new_logprobs, tops)):
            s.token_ids.append(token)
            s.entries.append((lp, top))
            s.cumulative += lp
            # the token the engine stopped on (EOS or a stop token id) is not text, as in vLLM
            if out.finished and k == last and out.finish_reason == "stop" \
                    and not self.params.include_stop_str_in_output:
                break
            s.num_text = len(s.token_ids)
            if self._detokenize(s, final=False) and self._match_stop(s):
                return True
        if out.finished:
            if self._detokenize(s, final=True) and self._match_stop(s):
                return True
            s.finish_reason = out.finish_reason
            if out.finish_reason == "stop" and s.token_ids:
                t = s.token_ids[-1]
                s.stop_reason = t if t in self.params.stop_token_ids and t not in self.eos_ids else None
        return False

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def _detokenize(self, s, final):
        """Extend s.text by the window's new characters; returns how many were added."""
        before = self._decode(s.token_ids[s.prefix:s.read])
        after = self._decode(s.token_ids[s.prefix:s.num_text])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return 0
        s.text += after[len(before):]
        s.prefix, s.read = s.read, s.num_text
        return len(after) - len(before)

    def _match_stop(self, s):
        """The earliest stop string in the text not searched yet (a match may start in text searched before,
        up to max_stop - 1 characters back): the text is cut there and the sample finishes."""
        if not self.max_stop:
            return False
        hits = [(i, stop) for stop in self.params.stop if (i := s.text.find(stop, s.scan_from)) >= 0]
        s.scan_from = max(0, len(s.text) - self.max_stop + 1)
        if not hits:
            return False
        i, stop = min(hits)
        s.text = s.text[:i + len(stop) if self.params.include_stop_str_in_output else i]
        s.finish_reason, s.stop_reason = "stop", stop
        return True

    def take(self):
        """A Delta for every sample with something new since the last take; text that could still become
        a stop string is held back until the sample finishes."""
        deltas = []
        for s in self.samples:
            if s.final_sent:
                continue
            done = s.finish_reason is not None
            visible = len(s.text) if done else max(s.sent_text, len(s.text) - self.holdback)
            if not done and visible == s.sent_text and s.sent_tokens == len(s.token_ids):
                continue
            deltas.append(Delta(s.index, s.text[s.sent_text:visible], s.token_ids[s.sent_tokens:],
                                s.entries[s.sent_tokens:], s.finish_reason, s.stop_reason))
            s.sent_text, s.sent_tokens, s.final_sent = visible, len(s.token_ids), done
        return deltas

    def output(self):
        outs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.cumulative,
                                 self._logprob_dicts(s) if s.want_logprobs else None, s.finish_reason, s.stop_reason)
                for s in self.samples]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished)

    def _logprob_dicts(self, s):
        dicts = []
        for token, (lp, top) in zip(s.token_ids, s.entries):
            top = top or []
            ranks = {t: r for r, (t, _) in enumerate(top, 1)}
            d = {token: Logprob(lp, ranks.get(token), self.tok.decode([token]))}
            for r, (t, v) in enumerate(top, 1):
                d.setdefault(t, Logprob(v, r, self.tok.decode([t])))
            dicts.append(d)
        return dicts


# --------------------------------------------------------------------------- chat templates

# DeepSeek-R1's prompt format (system prompts first, assistant turns without their reasoning, and the
# generation prompt opening a <think> block), for checkpoints that carry no template of their own.
R1_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] %}{% endif %}"
    "{% endfor %}{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] or '' %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% elif m['role'] != 'system' %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def read_chat_template(path):
    """(template, special token strings) of a checkpoint folder: chat_template.jinja if present, else
    tokenizer_config.json's chat_template (a string, or a list of named templates: "default"), else R1's."""
    config = M.read_json(os.path.join(path, "tokenizer_config.json"))
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    specials = {k: TK.token_content(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None}
    return template or R1_TEMPLATE, specials


@functools.lru_cache(maxsize=16)
def compile_template(template):
    """The template compiled as transformers compiles chat templates: a sandboxed, immutable Jinja
    environment with trim_blocks/lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII, and the
    globals raise_exception / strftime_now; {% generation %} blocks render their body."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):  # transformers marks assistant spans with it; we only render them
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template)


def render_chat(template, messages, specials, add_generation_prompt=True, **kwargs):
    """messages: [{"role", "content"}], content a string or OpenAI text parts (joined with newlines)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "messages must be a non-empty list of {role, content} objects")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest("messages", f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequest("messages", f"messages[{i}].content: only text parts are supported")
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest("messages", f"messages[{i}].content must be a string or a list of text parts")
        flat.append({**m, "content": content})
    import jinja2
    try:
        return compile_template(template).render(messages=flat, add_generation_prompt=add_generation_prompt,
                                                 **specials, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise InvalidRequest("messages", f"chat template: {e}") from e


# --------------------------------------------------------------------------- LLM

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}


class LLM:
    """A checkpoint folder (HF layout: config.json, safetensors, tokenizer files) and an engine over it.

    vLLM's arguments: dtype ("auto": bfloat16 on CUDA, float16 if the config says so; float32 elsewhere),
    seed, max_model_len, max_num_seqs, gpu_memory_utilization (CUDA: share of free memory for the KV
    pool), kv_cache_memory_bytes (the pool's size in bytes; default on CPU 512 MiB), block_size,
    max_num_batched_tokens (prefill tokens per step), enforce_eager (no CUDA graphs). Ours: device.
    The engine belongs to this object: one generate/chat at a time (serve.py drives it from one thread)."""

    def __init__(self, model, tokenizer=None, *, dtype="auto", seed=0, max_model_len=None, max_num_seqs=256,
                 gpu_memory_utilization=0.9, kv_cache_memory_bytes=None, block_size=16,
                 max_num_batched_tokens=None, enforce_eager=False, device=None):
        if not os.path.isdir(model):
            raise InvalidRequest("model", f"LLM: model must be a local checkpoint folder; {model!r} is not one "
                                          f"(a Hub model: `hf download {model} --local-dir DIR` first)")
        self.model_path = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = TK.Tokenizer.from_pretrained(tokenizer or model)
        self.chat_template, self.special_tokens = read_chat_template(tokenizer or model)
        self.add_bos = M.read_json(os.path.join(tokenizer or model, "tokenizer_config.json")).get("add_bos_token")
        self.net = M.from_pretrained(model, device=self.device, dtype=self._dtype(model, dtype))
        self.engine_kwargs = dict(block_size=block_size, memory_budget=kv_cache_memory_bytes,
                                  gpu_memory_fraction=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, max_prefill_tokens=max_num_batched_tokens,
                                  vocab_limit=self.tokenizer.vocab_size, eos_token_ids=self.tokenizer.eos_token_ids,
                                  cuda_graphs=False if enforce_eager else None)
        self.engine = E.Engine(self.net, **self.engine_kwargs)
        self.max_model_len = self.engine.max_model_len
        self.seeds = random.Random(seed) if seed is not None else None
        self.ids = itertools.count()

    def _dtype(self, path, dtype):
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype == "auto":
            if self.device.type != "cuda":
                return torch.float32
            cfg = M.read_json(os.path.join(path, "config.json"))
            return torch.float16 if cfg.get("torch_dtype", cfg.get("dtype")) == "float16" else torch.bfloat16
        if dtype not in DTYPES:
            raise InvalidRequest("dtype", f"LLM: dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]

    def get_tokenizer(self):
        return self.tokenizer

    def rebuild_engine(self):
        """A fresh engine (empty pool) after the old one failed; the old pool is freed first."""
        self.engine = None
        gc.collect()  # the old engine's reference cycles, so that its pool is really freed
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.engine = E.Engine(self.net, **self.engine_kwargs)

    # ------------------------------------------------------------------ requests

    def encode(self, text, add_special_tokens=True):
        """Token ids of a text prompt as transformers' tokenizer gives them to vLLM. add_special_tokens (vLLM's
        default for generate() and /v1/completions; chat renders its own): a tokenizer_config.json with
        add_bos_token decides as Llama-style tokenizers do (DeepSeek-R1-Distill's: true, so BOS first, as
        in training), else tokenizer.json's post-processor (Qwen's adds nothing). As in vLLM, text that
        already starts with the BOS string gets a second one: pass {"prompt_token_ids": ...} instead."""
        ids = self.tokenizer.encode(text)
        if not add_special_tokens or self.add_bos is False:
            return ids
        if self.add_bos:
            return [self.tokenizer.tok.token_to_id(self.tokenizer.bos_token)] + ids
        if self.tokenizer.tok.post_processor is None:
            return ids
        return self.tokenizer.tok.encode(text, add_special_tokens=True).ids

    def prompt_ids(self, prompt, param="prompt", add_special_tokens=True):
        """(text or None, token ids) of a string, {"prompt": text} (vLLM's TextPrompt) or {"prompt_token_ids":
        [...]} (vLLM's TokensPrompt)."""
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            text, ids = prompt, self.encode(prompt, add_special_tokens)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        else:
            raise InvalidRequest(param, f"{param} must be a string, {{'prompt': text}} or {{'prompt_token_ids': [...]}}, "
                                        f"got {type(prompt).__name__}")
        V = self.net.config.vocab_size  # not the engine's: serve.py calls this while it may be rebuilt
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise InvalidRequest(param, f"{param}: token ids must be integers in [0, {V})")
        if not ids:
            raise InvalidRequest(param, f"{param} is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(param, f"{param} has {len(ids)} tokens; this model's context is {self.max_model_len} "
                                        "tokens, which must hold the prompt and at least one generated token")
        return text, ids

    def new_request(self, text, ids, params, request_id=None):
        """Queue one prompt in the engine; returns its RequestState. No seed: one from the LLM's generator."""
        request_id = request_id or str(next(self.ids))
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = params.seed if params.seed is not None or self.seeds is None else self.seeds.getrandbits(63)
        try:
            self.engine.add_request(request_id, ids, params.to_engine(max_tokens, seed))
        except ValueError as e:  # the engine names the field in its message
            raise InvalidRequest(None, str(e)) from e
        return RequestState(request_id, text, ids, params, self.tokenizer, self.tokenizer.eos_token_ids)

    def drive(self, states, progress=None):
        """Step the engine until every state is finished. A stop string aborts its sample in the engine."""
        live = {s.request_id: s for s in states}
        try:
            while live:
                for out in self.engine.step():
                    st = live.get(out.request_id)
                    if st is None:
                        continue
                    if st.process(out):
                        self.engine.abort(out.request_id, out.sample_index)
                    if st.finished:
                        del live[out.request_id]
                        if progress is not None:
                            progress.update(1)
                if live and not self.engine.has_unfinished():
                    raise RuntimeError(f"engine went idle with requests {sorted(live)[:5]} unfinished")
        except BaseException:
            self.abort_all(list(live))  # nothing of an interrupted call stays in the engine
            raise

    def abort_all(self, request_ids):
        for rid in request_ids:
            self.engine.abort(rid)
        while self.engine.has_unfinished():
            self.engine.step()

    def _params_list(self, sampling_params, count):
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise InvalidRequest("sampling_params", f"{len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        """prompts: a string, a {"prompt": text} or {"prompt_token_ids": [...]} dict, or a list of them;
        sampling_params: one for all or one per prompt. Returns a RequestOutput per prompt, in order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._params_list(sampling_params, len(prompts))
        items = [self.prompt_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]  # all checked first
        states = []
        try:
            for (text, ids), p in zip(items, params):
                states.append(self.new_request(text, ids, p))
        except BaseException:
            self.abort_all(s.request_id for s in states)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(states), desc="Processed prompts", unit="prompt")
        try:
            self.drive(states, bar)
        finally:
            if bar is not None:
                bar.close()
        return [s.output() for s in states]

    def apply_chat_template(self, messages, add_generation_prompt=True, chat_template=None, **kwargs):
        return render_chat(chat_template or self.chat_template, messages, self.special_tokens,
                           add_generation_prompt, **kwargs)

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None, add_generation_prompt=True,
             chat_template_kwargs=None):
        """messages: one conversation ([{"role", "content"}, ...]) or a list of them, rendered with the
        checkpoint's chat template (DeepSeek-R1's when it has none) and generated as prompts."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.apply_chat_template(c, add_generation_prompt, chat_template, **(chat_template_kwargs or {}))
                 for c in conversations]
        prompts = [{"prompt": t, "prompt_token_ids": self.encode(t, add_special_tokens=False)} for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
