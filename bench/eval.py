"""
A short eval, timed, through eval.evaluate (engine + grader + JSONL), with random weights, and the
projected time of the full published protocol.

    python bench/eval.py                                  # CPU: a tiny shape (plumbing, not performance)
    python bench/eval.py --full --n 4 --max-tokens 2048   # GPU: the 1.5B shape, AIME-sized (30 problems)
    python bench/eval.py --full --data /path/to/test      # the real AIME prompts instead of synthetic ones

Random weights never choose EOS on purpose (1 in ~150K per token), so nearly every sample runs to
max_tokens: the timing is the worst case for that budget. The tokenizer is a stand-in (no real
checkpoint needed): one token per character on encode, any id printable on decode.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402
import model as M  # noqa: E402
import tokenizer as TK  # noqa: E402

FULL_PROTOCOL = {"problems": 30 + 500 + 83 + 272 + 675, "n": 16, "max_tokens": 32768}


class StandInTokenizer:
    """Characters <-> ids in the real vocabulary's range, with R1's EOS id and template."""

    def __init__(self, vocab_size, eos_id):
        self.vocab_size, self.eos_token_ids, self.pad_token_id = vocab_size, [eos_id], eos_id

    def encode(self, text):
        return [1000 + (ord(c) % 5000) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 95) for i in ids)

    def chat_prompt(self, problem, think=None):
        return TK.chat_template(problem, think=bool(think))


def synthetic_aime(num=30, chars=420, seed=0):
    """AIME-sized problems (AIME 2024 prompts average ~420 characters) with 3-digit golds."""
    g = torch.Generator().manual_seed(seed)
    words = ["triangle", "integer", "let", "find", "the", "number", "of", "points", "such", "that", "$x^2$", "sum"]
    rows = []
    for i in range(num):
        idx = torch.randint(len(words), (chars // 6,), generator=g).tolist()
        rows.append({"id": i, "problem": " ".join(words[j] for j in idx)[:chars], "golds": [f"{i * 37 % 1000:03d}"]})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="the 1.5B shape (GPU)")
    p.add_argument("--data", default=None, help="folder with aime.json (default: 30 synthetic AIME-sized problems)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--problems", type=int, default=None, help="first N problems (default: all 30)")
    p.add_argument("--engine-args", default="{}", help="JSON of extra sample.Engine keyword arguments")
    args = p.parse_args()
    import reward
    import sample
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full:
        cfg, dtype = M.Config(), torch.bfloat16
        n, max_tokens = args.n or 4, args.max_tokens or 2048
    else:  # same head layout as the 1.5B, scaled down
        cfg = M.Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=8192, eos_token_id=8191, bos_token_id=8190)
        dtype = torch.float32
        n, max_tokens = args.n or 2, args.max_tokens or 64
    tok = StandInTokenizer(vocab_size=min(cfg.vocab_size, 151665), eos_id=cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0])
    if not args.full:
        tok.encode = lambda text: [1 + ord(c) % 4000 for c in text]
    rows = E.load_dataset(os.path.join(args.data, "aime.json"))[0] if args.data else synthetic_aime()
    rows = rows[:args.problems] if args.problems else rows

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = M.Qwen2(cfg)
    model = M.init_weights(model.to_empty(device=device), std=0.02).to(dtype).eval()
    engine = sample.Engine(model, max_model_len=E.EvalConfig.max_prompt_tokens + max_tokens,
                           vocab_limit=tok.vocab_size, **json.loads(args.engine_args))
    setup_s = time.perf_counter() - t0

    with reward.Grader() as grader, tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.jsonl")
        res = E.evaluate(engine, tok, {"aime": rows}, n=n, max_tokens=max_tokens, grader=grader, out_jsonl=out)
        t = time.perf_counter()
        again = E.evaluate(engine, tok, {"aime": rows}, n=n, max_tokens=max_tokens, grader=grader, out_jsonl=out,
                           progress=False)
        resume_s = time.perf_counter() - t
        assert again["datasets"] == res["datasets"]
    thr, r = res["throughput"], res["datasets"]["aime"]
    full_tokens = FULL_PROTOCOL["problems"] * FULL_PROTOCOL["n"] * FULL_PROTOCOL["max_tokens"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print("\n| device | shape | problems x n x max_tokens | tokens | eval s | tok/s | truncated | resume s | setup s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {'1.5B' if args.full else 'tiny'} {dtype} | {len(rows)} x {n} x {max_tokens} | "
          f"{thr['generated_tokens']:,} | {thr['seconds']:.1f} | {thr['tokens_per_s']:,.0f} | "
          f"{r['truncated'] * 100:.0f}% | {resume_s:.2f} | {setup_s:.1f} |")
    print(f"\nFull protocol ({FULL_PROTOCOL['problems']} problems x 16 x 32,768): at most {full_tokens / 1e6:,.0f}M "
          f"tokens; at this rate {full_tokens / thr['tokens_per_s'] / 3600:,.1f} h on one device if every sample "
          f"ran to 32K (an upper bound on tokens, but decode at 32K context is slower than at {max_tokens}).")


if __name__ == "__main__":
    main()
