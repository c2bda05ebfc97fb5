"""
Sample from a model: the rollout engine's front door.

    python sample.py --ckpt DIR --prompt "What is 1+1?" --num-samples 4 --temperature 0.6 --top-p 0.95 --max-tokens 512

applies the checkpoint's chat template and instruction (the demo's: none), prints the completions and
reports tokens/s. From code:

    from sample import generate, Engine
    comps = generate(model, [[ids...], [ids...]], max_new_tokens=512, temperature=0.6, top_p=0.95, n=8, seed=step)
    comps[0].token_ids, comps[0].logprobs, comps[0].finish_reason   # prompt-major: n samples of prompt 0 first

generate() builds an Engine (engine.py: paged KV pool, prefix sharing, continuous batching, preemption)
once and keeps it on the model, rebuilding it only when the engine arguments change. A training loop
that owns a separate inference copy calls engine.update_weights(policy) before each engine.generate.
Requests that join and leave a running batch (a server) use the engine's step-level interface:

    from sample import Engine, SamplingParams
    engine.add_request("id-1", prompt_ids, SamplingParams(max_tokens=256, temperature=0.6, n=4, seed=7))
    while engine.has_unfinished():
        for out in engine.step():   # StepOutput: request_id, sample_index, new_token_ids, new_logprobs, ...
            ...
    engine.abort("id-1")            # a client went away: its blocks are freed at once
"""
import argparse
import os
import sys
import time

import torch

from engine import Completion, Engine, SamplingParams, StepOutput  # noqa: F401  (re-exported for callers)

ENGINE_ATTR = "_rollout_engine"  # where generate() keeps its engine on the model


def generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, n=1, seed=0,
             stop_token_ids=(), progress=False, **engine_kwargs):
    """Completions for len(prompts) * n samples, prompt-major. engine_kwargs (block_size, num_blocks,
    memory_budget, max_num_seqs, max_model_len, max_prefill_tokens, vocab_limit, eos_token_ids,
    ignore_eos, cuda_graphs, allow_kernel_fallback, overlap, prefix_caching) configure the cached engine;
    a change rebuilds it (and its KV pool)."""
    key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in engine_kwargs.items()))
    cached = model.__dict__.get(ENGINE_ATTR)
    device = next(model.parameters()).device
    if cached is None or cached[0] != key or cached[1].device != device:
        if cached is not None:
            del model.__dict__[ENGINE_ATTR]  # free the old pool before sizing the new one
            del cached
        model.__dict__[ENGINE_ATTR] = (key, Engine(model, **engine_kwargs))
    engine = model.__dict__[ENGINE_ATTR][1]
    return engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, n=n, seed=seed, stop_token_ids=stop_token_ids, progress=progress)


def position_limit(max_positions, longest_prompt, max_tokens, ap):
    """The engine's max_model_len: never past the positions the model was trained for (rotary positions
    beyond max_position_embeddings give garbage); the answer is cut there, and the user is told."""
    if longest_prompt >= max_positions:
        ap.error(f"a prompt has {longest_prompt} tokens; the model's max_position_embeddings is {max_positions}")
    if longest_prompt + max_tokens > max_positions:
        print(f"warning: --max-tokens {max_tokens} would run past max_position_embeddings ({max_positions}); "
              f"answers stop at {max_positions - longest_prompt} new tokens for the longest prompt", file=sys.stderr)
    return min(longest_prompt + max_tokens, max_positions)


def main():
    import model as M
    import tokenizer as TK
    ap = argparse.ArgumentParser(description="Sample completions from a checkpoint with the chat template.")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (HF layout with tokenizer files)")
    ap.add_argument("--prompt", action="append", required=True, help="problem text (repeat for several)")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="new tokens per sample (default 512, fewer if the model's max_position_embeddings is smaller)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-template", action="store_true", help="send the prompt text as is")
    ap.add_argument("--instruction", default=None, help="text appended to each prompt (default: the checkpoint's own, "
                    "DeepScaleR's 'Let's think step by step...' unless its tokenizer_config.json says otherwise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on a GPU, float32 on CPU (as eval.py)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False; "
                 f"torch {torch.__version__}); use --device cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = TK.Tokenizer.from_pretrained(args.ckpt)
    model = M.from_pretrained(args.ckpt, device=device, dtype=dtype)
    texts = args.prompt if args.no_template else [tok.chat_prompt(p, instruction=args.instruction) for p in args.prompt]
    prompts = [tok.encode(t) for t in texts]  # warns (tokenizer.UnknownTokenWarning) on text it cannot spell
    limit, longest = model.config.max_position_embeddings, max(map(len, prompts))
    max_tokens = args.max_tokens or max(1, min(512, limit - longest))
    max_len = position_limit(limit, longest, max_tokens, ap)
    engine = Engine(model, vocab_limit=tok.vocab_size, eos_token_ids=tok.eos_token_ids, max_model_len=max_len)
    t0 = time.perf_counter()
    comps = engine.generate(prompts, max_new_tokens=max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, n=args.num_samples, seed=args.seed)
    dt = time.perf_counter() - t0
    for c in comps:
        print(f"=== prompt {c.prompt_index} sample {c.sample_index} ({len(c.token_ids)} tokens, {c.finish_reason})")
        print(tok.decode(prompts[c.prompt_index] + list(c.token_ids)))  # what the model saw, then its answer
    ntok = sum(len(c.token_ids) for c in comps)
    print(f"--- {len(comps)} completions, {ntok} tokens in {dt:.2f} s: {ntok / dt:,.1f} tokens/s on {device.type} "
          f"({engine.stats['preemptions']} preemptions, {engine.stats['prefix_blocks_shared']} prefix blocks shared)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
