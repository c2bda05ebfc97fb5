"""
The CPU demo's inputs, built in code: a tiny character-level tokenizer with DeepSeek-R1's special tokens,
a synthetic 2-digit addition task whose answers are \\boxed{} (graded by the real reward.py), and a short
supervised warm-start so the random model knows the response format before GRPO starts.

`python train.py config/demo.py` calls `prepare(cfg)` (the recipe's `prepare` hook) before loading
anything: it writes <out_dir>/demo/{tokenizer, checkpoint, train.jsonl, val.json} once, and points the
config at them. Everything after that is the normal path: Tokenizer.from_pretrained, from_pretrained,
the Engine, the Grader, the GRPO update.

Why a warm-start at all: a random model never writes `</think> \\boxed{..}`, so every reward is 0 and
GRPO has nothing to rank. The warm-start stops at a FIXED number of steps chosen by measurement
(supervised accuracy jumps sharply, see DEMO_WARM_STEPS) so that the format is learnt but the sums
mostly are not: the rise after that is GRPO's doing.
"""
import json
import os
import random
import time

import torch

import model as M

import tokenizer as TK

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CHARS = "0123456789+=}"
WORDS = ["\\boxed{"]  # one token: the demo's answers are then 7 tokens, <think></think>\boxed{68}<eos>
# The prompt format, carried by the checkpoint so sample.py / eval.py / transformers' apply_chat_template
# all build "<bos><｜User｜>23+45<｜Assistant｜>": a real Jinja chat template (R1-distill's shape, no
# system prompt) and, under tokenizer.INSTRUCTION_KEY, an empty instruction.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
            "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")

# the tiny Qwen2: ~0.5M parameters, vocabulary = specials + the characters above, padded to 32 rows
MODEL = dict(vocab_size=32, hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=10000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=1)
DEMO_WARM_STEPS = 120  # chosen by measurement (README CPU demo): format learnt, sums mostly not
DEMO_WARM_LR = 1e-3
DEMO_WARM_BATCH = 64


def write_tokenizer(path):
    """A character-level tokenizer in Qwen2's own form (byte-level BPE with no merges, so one token per
    character), written as tokenizer.json for the normal Tokenizer.from_pretrained. Why Qwen2's form:
    transformers 5 rebuilds any model_type=qwen2 tokenizer as byte-level BPE from the file's vocabulary,
    so only this form tokenizes the same there (spaces included) as here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in list(dict.fromkeys(CHARS)) + WORDS + ["Ġ"]:  # Ġ: the byte-level spelling of a space
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(WORDS)  # matched whole before the character split
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)


def tokenizer_config():
    """Special tokens as plain strings (transformers 5 refuses a bare {"content": ...} dict); the prompt
    format (chat template, empty instruction); the context length."""
    return {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[1],
            "model_max_length": MODEL["max_position_embeddings"], "chat_template": TEMPLATE, TK.INSTRUCTION_KEY: ""}


def problems(seed, n):
    """n addition problems a+b (a two digits, b one digit), in the dataset's JSON row form."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        rows.append({"problem": f"{a}+{b}", "answer": str(a + b), "solution": f"\\boxed{{{a + b}}}"})
    return rows


def response(row):
    """The target format: an empty thought, then the boxed answer (short answers keep rollouts cheap)."""
    return f"<think></think>\\boxed{{{row['answer']}}}"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def warm_start(model, tok, rows, steps, lr, batch, seed, log_every_s=5.0):
    """Plain next-token cross-entropy on prompt + correct response (loss on the response only).
    Prints a progress line every log_every_s seconds (plain lines: they read well in a log file too)."""
    g = torch.Generator().manual_seed(seed)
    t0 = last = time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    examples = []
    for r in rows:
        p = tok.encode(tok.chat_prompt(r["problem"], instruction=""))
        y = tok.encode(response(r)) + tok.eos_token_ids[:1]
        examples.append((p, y))
    model.train()
    for step in range(steps):
        idx = torch.randint(len(examples), (batch,), generator=g).tolist()
        ids, tgt, mask, lens = [], [], [], []
        for i in idx:
            p, y = examples[i]
            t = p + y
            ids += t[:-1]
            tgt += t[1:]
            mask += [0.0] * (len(p) - 1) + [1.0] * len(y)
            lens.append(len(t) - 1)
        meta = M.Varlen.from_seqlens(lens)
        pos = torch.cat([torch.arange(n) for n in lens])
        logp = model(torch.tensor(ids), pos, meta, targets=torch.tensor(tgt))
        m = torch.tensor(mask)
        loss = -(logp * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if time.time() - last >= log_every_s or step + 1 == steps:
            last, took = time.time(), time.time() - t0
            print(f"demo warm-start: step {step + 1}/{steps} | loss {loss.item():.3f} | {took:.0f}s, "
                  f"ETA {took / (step + 1) * (steps - step - 1):.0f}s", flush=True)
    return model


def prepare(cfg, warm_steps=DEMO_WARM_STEPS):
    """The recipe's hook: build (once) and point cfg at the demo's tokenizer, warm-started model and data."""
    root = os.path.join(cfg.out_dir, "demo")
    ckpt = os.path.join(root, f"init_warm{warm_steps}_seed{cfg.seed}")
    train, val = os.path.join(root, "train.jsonl"), os.path.join(root, "val.json")
    tok_dir = os.path.join(root, "tokenizer")
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(train):
        print(f"demo: writing 2,000 addition problems to {train} and {val}", flush=True)
        rows = problems(seed=1234, n=2000)
        write_jsonl(train, rows[:1800])
        with open(val, "w") as f:  # eval.py reads DeepScaleR's JSON-list form
            json.dump(rows[1800:], f)
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        print(f"demo: a {MODEL['num_hidden_layers']}-layer Qwen2 learns the answer format by {warm_steps} supervised "
              f"steps (once; ~40 s on 2 idle CPU cores) -> {ckpt}", flush=True)
        write_tokenizer(tok_dir)
        tok = TK.Tokenizer.from_pretrained(tok_dir)
        torch.manual_seed(cfg.seed)
        model = M.init_weights(M.Qwen2(M.Config(**MODEL)), std=0.02, seed=cfg.seed)
        with open(train) as f:
            rows = [json.loads(line) for line in f]
        warm_start(model, tok, rows, warm_steps, DEMO_WARM_LR, DEMO_WARM_BATCH, cfg.seed)
        M.save_pretrained(model, ckpt, source_path=tok_dir)
    elif M.read_json(os.path.join(ckpt, "tokenizer_config.json")) != tokenizer_config():
        write_tokenizer(ckpt)  # built by an older version: today's tokenizer files (same vocabulary and ids)
    cfg.init_from, cfg.train_data, cfg.val_data = ckpt, train, val
    return cfg
