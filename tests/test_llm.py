"""The vLLM-style offline API (llm.py): the tutorial's snippet as README shows it, outputs against the
engine's own generate(), stop strings / stop tokens / log-probs / seeds, incremental detokenisation on a
byte-level tokenizer, and chat templates rendered as transformers renders them (the golden reference).
Tiny random checkpoint; the whole file takes ~15 s on the 2-core dev box."""
import contextlib
import io
import json
import os
import re
import shutil
import types

import pytest

import llm as L
from engine import StepOutput
from fixtures import tiny_checkpoint
from test_sample import one_thread  # noqa: F401,F811  (autouse: one intra-op thread)
from llm import LLM, InvalidRequest, SamplingParams
from openai_api import parse_chat, parse_completion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("llm") / "tiny"), seed=3, max_position_embeddings=512)


@pytest.fixture(scope="module")
def llm(ckpt, one_thread):  # noqa: F811
    return LLM(ckpt)


def gen(llm, prompts, **kw):
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def test_readme_snippet_runs_unchanged(tmp_path):
    """README's Serve section opens with the tutorial's vLLM snippet, only the import and the path changed:
    run it as written (the checkpoint path swapped for a tiny one, `prompt` defined as the tutorial does).
    Its context is 64 positions, so max_tokens=512 runs to the context's end (as vLLM's LLM does)."""
    ckpt = tiny_checkpoint(str(tmp_path / "tiny64"), seed=3, max_position_embeddings=64)
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Serve", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from llm import LLM, SamplingParams" in code and "llm.generate(prompt, sampling_params)" in code
    path = re.search(r'LLM\(model="([^"]+)"\)', code).group(1)
    code = code.replace(path, ckpt)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code, "README.md", "exec"), {"prompt": "Hello, my name is"})
    printed = out.getvalue()
    assert printed.startswith("Hello, my name is ") and len(printed.strip()) > len("Hello, my name is") + 5
    assert code.count("LLM(") == 1 and "SamplingParams(temperature=0.8, top_p=0.95, max_tokens=512)" in code


def test_outputs_are_the_engines_tokens_decoded(llm):
    """A seeded LLM.generate draws what engine.generate draws for the same prompt (prompt index 0, same
    seed), and its text is the tokenizer's decoding of those tokens (the EOS a sample stopped on excluded)."""
    tok = llm.get_tokenizer()
    prompts = ["What is 2+2?", "Hello"]
    outs = gen(llm, prompts, n=3, seed=11, max_tokens=40, temperature=0.9, top_p=0.9, top_k=30)
    assert [o.prompt for o in outs] == prompts and all(o.finished for o in outs)
    for o, p in zip(outs, prompts):
        assert o.prompt_token_ids == tok.encode(p)
        ref = llm.engine.generate([o.prompt_token_ids], max_new_tokens=40, temperature=0.9, top_p=0.9, top_k=30,
                                  n=3, seed=11)
        assert [c.index for c in o.outputs] == [0, 1, 2]
        for c, r in zip(o.outputs, ref):
            assert c.token_ids == r.token_ids and c.finish_reason == r.finish_reason
            assert c.cumulative_logprob == pytest.approx(sum(r.logprobs), abs=1e-4)
            body = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
            assert c.text == tok.decode(body, skip_special_tokens=True)
    assert len({c.text for o in outs for c in o.outputs}) == 6  # samples differ


def test_stop_strings_cut_the_text_where_the_full_run_has_them(llm):
    """With stop strings the text is the stop-free run's text cut at the earliest match (the stop string
    kept only with include_stop_str_in_output), its tokens end at the token completing the match, and
    finish_reason/stop_reason say which string it was. A sample's tokens do not depend on the stops."""
    tok = llm.get_tokenizer()
    full = gen(llm, "abc", n=4, seed=5, max_tokens=60, ignore_eos=True)[0].outputs
    stops = ["e", "x", "Q"]
    cut = gen(llm, "abc", n=4, seed=5, max_tokens=60, ignore_eos=True, stop=stops)[0].outputs
    kept = gen(llm, "abc", n=4, seed=5, max_tokens=60, ignore_eos=True, stop=stops, include_stop_str_in_output=True)
    hits = 0
    for f, c, k in zip(full, cut, kept[0].outputs):
        found = [(f.text.find(s), s) for s in stops if s in f.text]
        if not found:
            assert (c.text, c.finish_reason, c.token_ids) == (f.text, "length", f.token_ids)
            continue
        hits += 1
        i, s = min(found)
        assert (c.text, c.finish_reason, c.stop_reason) == (f.text[:i], "stop", s)
        assert k.text == f.text[:i + len(s)] and k.stop_reason == s
        assert c.token_ids == f.token_ids[:len(c.token_ids)]
        assert s in tok.decode(c.token_ids, skip_special_tokens=True)
        assert s not in tok.decode(c.token_ids[:-1], skip_special_tokens=True)
    assert hits >= 2  # the test can fail: most samples meet a stop string


def test_stop_token_ids_and_eos(llm):
    """A stop token id ends the sample with stop_reason = that id and stays in token_ids but not in the
    text; EOS gives stop_reason None; max_tokens gives "length"."""
    full = gen(llm, "xyz", n=8, seed=2, max_tokens=50, ignore_eos=True)[0].outputs
    stop_id = full[0].token_ids[5]
    outs = gen(llm, "xyz", n=8, seed=2, max_tokens=50, stop_token_ids=[stop_id])[0].outputs
    reasons = set()
    for f, o in zip(full, outs):
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in (stop_id, 1)  # 1 is the fixture's EOS
            assert o.stop_reason == (stop_id if o.token_ids[-1] == stop_id else None)
            assert o.text == llm.get_tokenizer().decode(o.token_ids[:-1], skip_special_tokens=True)
            reasons.add(o.stop_reason)
        else:
            assert o.finish_reason == "length" and len(o.token_ids) == 50
        assert o.token_ids == f.token_ids[:len(o.token_ids)]
    assert stop_id in reasons


def test_logprobs_as_vllm_returns_them(llm):
    """logprobs=N: per token a dict holding the sampled token first and the N most likely, ranked 1..N
    best first; the sampled token's log-prob is the engine's and they add up to cumulative_logprob."""
    out = gen(llm, "Hi", n=2, seed=9, max_tokens=12, logprobs=3, temperature=0.7)[0].outputs
    ref = llm.engine.generate([llm.get_tokenizer().encode("Hi")], max_new_tokens=12, temperature=0.7, n=2, seed=9)
    for o, r in zip(out, ref):
        assert len(o.logprobs) == len(o.token_ids) == len(r.token_ids)
        for t, d, lp in zip(o.token_ids, o.logprobs, r.logprobs):
            assert next(iter(d)) == t and d[t].logprob == pytest.approx(lp, abs=1e-5)
            top = sorted((v for k, v in d.items() if v.rank is not None), key=lambda v: v.rank)
            assert [v.rank for v in top] == [1, 2, 3] and len(d) in (3, 4)
            assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
            assert d[t].rank is None or top[d[t].rank - 1] is d[t]
            assert d[t].decoded_token == llm.get_tokenizer().decode([t])
        assert o.cumulative_logprob == pytest.approx(sum(next(iter(d.values())).logprob for d in o.logprobs), abs=1e-4)
    assert gen(llm, "Hi", max_tokens=3)[0].outputs[0].logprobs is None


def test_seeds(ckpt, llm):
    """Same seed -> same samples, also on another LLM; without a seed an LLM(seed=s) is reproducible per
    script (a fresh LLM replays it) and two calls differ; greedy is seed-free."""
    a = gen(llm, "Seed", seed=1, max_tokens=20)[0].outputs[0]
    assert gen(llm, "Seed", seed=1, max_tokens=20)[0].outputs[0].token_ids == a.token_ids
    assert gen(llm, "Seed", seed=2, max_tokens=20)[0].outputs[0].token_ids != a.token_ids
    other = LLM(ckpt, seed=7)
    first = [gen(other, "Seed", max_tokens=20)[0].outputs[0].token_ids for _ in range(2)]
    assert first[0] != first[1]
    assert [gen(LLM(ckpt, seed=7), "Seed", max_tokens=20)[0].outputs[0].token_ids][0] == first[0]
    g = [gen(llm, "Seed", temperature=0, seed=s, max_tokens=10)[0].outputs[0].token_ids for s in (1, 2)]
    assert g[0] == g[1]


def test_bad_arguments_name_the_field(llm):
    for kw, field in [(dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_tokens=0), "max_tokens"),
                      (dict(temperature=-1), "temperature"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
                      (dict(temperature=float("nan")), "temperature"), (dict(stop=[""]), "stop"),
                      (dict(presence_penalty=0.5), "presence_penalty"), (dict(top_k=-2), "top_k")]:
        with pytest.raises(InvalidRequest, match=field) as e:
            SamplingParams(**kw)
        assert e.value.param == field
    with pytest.raises(InvalidRequest, match=r"prompts\[1\] has 600 tokens") as e:
        gen(llm, ["ok", "x" * 600])
    assert not llm.engine.has_unfinished()  # nothing of the refused call was queued
    with pytest.raises(InvalidRequest, match="model"):
        LLM("no/such/checkpoint")


class ByteTokenizer:
    """A byte-level BPE tokenizer (one token per byte), so 'é' is two tokens whose first decodes to U+FFFD."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        self.tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def feed(state, ids, per_step=1):
    """Drive a RequestState by hand, per_step tokens per StepOutput; returns the streamed Deltas."""
    deltas = []
    for k in range(0, len(ids), per_step):
        chunk = ids[k:k + per_step]
        done = k + per_step >= len(ids)
        state.process(StepOutput("r", 0, chunk, [-1.0] * len(chunk), None, done, "length" if done else None))
        deltas += state.take()
        if state.finished:
            break
    return deltas


@pytest.mark.parametrize("per_step", [1, 3])
def test_incremental_detokenisation_never_splits_a_character(per_step):
    tok = ByteTokenizer()
    text = "héllo wörld, 数学 ∑ ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters are several tokens
    state = L.RequestState("r", text, [0], SamplingParams(max_tokens=100), tok, [])
    deltas = feed(state, ids, per_step)
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text == state.output().outputs[0].text
    assert sum(len(d.token_ids) for d in deltas) == len(ids)


def test_stream_holds_back_a_possible_stop_string():
    """While a stop string could still begin in the text, it is not streamed; the streamed pieces add up
    to the final text, cut at the stop string."""
    tok = ByteTokenizer()
    text = "one two three STOP four"
    state = L.RequestState("r", text, [0], SamplingParams(max_tokens=100, stop=["STOP", "xyzzy"]), tok, [])
    deltas = feed(state, tok.encode(text))
    streamed = [d.text for d in deltas]
    assert "".join(streamed) == "one two three " == state.output().outputs[0].text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "STOP"
    assert all("S" not in s for s in streamed)


# --------------------------------------------------------------------------- chat templates

CHATML = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FANCY = ("{{ bos_token }}{%- for m in messages -%}\n  {%- if loop.first and m.role == 'system' -%}"
         "[SYS {{ m.content | tojson }}]\n  {%- elif m.role == 'assistant' -%}{% generation %}A:{{ m.content | trim }}"
         "{{ eos_token }}{% endgeneration %}\n  {%- else -%}U:{{ m.content }}\n  {%- endif -%}\n"
         "  {%- if loop.index > 9 %}{% break %}{% endif -%}\n{%- endfor -%}{% if add_generation_prompt %}A:{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief. «ünïcode»"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>sum</think> 4 "}, {"role": "user", "content": "and 3+3?"}]


def transformers_render(ckpt, template, messages, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt, "tokenizer.json"), bos_token=BOS, eos_token=EOS)
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", [CHATML, FANCY, L.R1_TEMPLATE], ids=["chatml", "fancy", "r1"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(ckpt, template, add_generation_prompt):
    specials = {"bos_token": BOS, "eos_token": EOS}
    ours = L.render_chat(template, CONVERSATION, specials, add_generation_prompt)
    assert ours == transformers_render(ckpt, template, CONVERSATION, add_generation_prompt)


def test_r1_template_is_deepseek_r1s_format():
    got = L.render_chat(L.R1_TEMPLATE, CONVERSATION, {"bos_token": BOS})
    assert got == (f"{BOS}Be brief. «ünïcode»<｜User｜>2+2?<｜Assistant｜> 4 {EOS}<｜User｜>and 3+3?"
                   "<｜Assistant｜><think>\n")
    with pytest.raises(InvalidRequest, match="unsupported role tool") as e:
        L.render_chat(L.R1_TEMPLATE, [{"role": "tool", "content": "x"}], {"bos_token": BOS})
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequest, match="messages"):
        L.render_chat(CHATML, [], {})
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert L.render_chat(CHATML, parts, {}) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"


def test_template_source_and_chat(tmp_path, ckpt, llm):
    """The checkpoint's tokenizer_config.json template is used (a list of named ones: "default"), a
    chat_template.jinja beside it wins, none at all gives R1's; llm.chat == generate(rendered prompt)."""
    d = tmp_path / "ck"
    d.mkdir()
    config = json.load(open(os.path.join(ckpt, "tokenizer_config.json")))
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    assert L.read_chat_template(str(d))[0] == CHATML
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": FANCY}]}))
    assert L.read_chat_template(str(d)) == (FANCY, {"bos_token": BOS, "eos_token": EOS})
    (d / "chat_template.jinja").write_text(CHATML)
    assert L.read_chat_template(str(d))[0] == CHATML
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    assert L.read_chat_template(str(d))[0] == L.R1_TEMPLATE

    messages = [{"role": "user", "content": "hi"}]
    prompt = llm.apply_chat_template(messages)
    assert prompt == L.render_chat(llm.chat_template, messages, llm.special_tokens)
    p = SamplingParams(seed=4, max_tokens=15)
    chat = llm.chat(messages, p, use_tqdm=False)[0]
    assert chat.prompt == prompt and chat.outputs[0].text == llm.generate(prompt, p, use_tqdm=False)[0].outputs[0].text
    assert len(llm.chat([messages, messages + [{"role": "assistant", "content": "x"}, messages[0]]], p,
                        use_tqdm=False)) == 2


def test_text_prompts_get_the_tokenizers_special_tokens_as_in_vllm(tmp_path, ckpt):
    """vLLM tokenizes a generate() or /v1/completions text prompt with the tokenizer's special tokens:
    DeepSeek-R1-Distill's tokenizer_config.json says add_bos_token: true, so its prompts start with BOS
    (as in training). A chat prompt's template writes BOS itself: no second one. Without add_bos_token,
    tokenizer.json's post-processor decides, as in transformers (golden reference)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    d = tmp_path / "bos"
    shutil.copytree(ckpt, d)
    config = json.load(open(d / "tokenizer_config.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    llm = LLM(str(d))
    tok, p, hi = llm.get_tokenizer(), SamplingParams(seed=1, max_tokens=5), [{"role": "user", "content": "hi"}]
    assert llm.generate("abc", p, use_tqdm=False)[0].prompt_token_ids == [0] + tok.encode("abc")
    assert llm.generate({"prompt": "abc"}, p, use_tqdm=False)[0].prompt_token_ids == [0] + tok.encode("abc")
    chat = llm.chat(hi, p, use_tqdm=False)[0]
    assert chat.prompt.startswith(BOS) and chat.prompt_token_ids == tok.encode(chat.prompt)
    assert chat.prompt_token_ids.count(0) == 1
    server = types.SimpleNamespace(llm=llm, model_name="m")  # serve.py's parsing: the same rules
    assert parse_completion(server, {"prompt": "abc"}).prompts == [("abc", [0] + tok.encode("abc"))]
    assert parse_completion(server, {"prompt": "abc", "add_special_tokens": False}).prompts[0][1] == tok.encode("abc")
    assert parse_chat(server, {"messages": hi}).prompts[0][1] == chat.prompt_token_ids
    # no add_bos_token: a post-processor that adds BOS (Llama 3's kind) is followed; add_bos_token false wins
    t = Tokenizer.from_file(str(d / "tokenizer.json"))
    t.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    want = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token=BOS, eos_token=EOS)("abc")
    assert LLM(str(d)).encode("abc") == want["input_ids"] == [0] + tok.encode("abc")
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert LLM(str(d)).encode("abc") == tok.encode("abc")
