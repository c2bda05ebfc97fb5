"""model.py against transformers' Qwen2ForCausalLM (golden reference), plus our own invariants:
packed == per-sequence, paged prefill + decode == full forward, save/load round trips, and every error."""
import json
import os

import pytest
import torch

import model as M

import tokenizer as TK
from fixtures import random_model, tiny_checkpoint, tiny_config, write_tokenizer

transformers = pytest.importorskip("transformers")


def hf_model(path, dtype=torch.float32):
    return transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("tied,heads,kv_heads,style", [
    (False, 4, 2, "old"), (True, 4, 4, "new"), (False, 6, 1, "new"), (True, 8, 2, "old"),
])
def test_logits_match_transformers(tmp_path, tied, heads, kv_heads, style):
    tiny_checkpoint(tmp_path, seed=heads + kv_heads, tie_word_embeddings=tied, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, hidden_size=heads * 16, rope_theta=500.0 + heads)
    if style == "new":  # transformers 5 style: rope_parameters + dtype
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        cfg["dtype"] = cfg.pop("torch_dtype")
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = M.from_pretrained(str(tmp_path), dtype=torch.float32)
    ref = hf_model(tmp_path)
    x = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4
    assert ours.config.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_sharded_checkpoint_and_save_loads_in_transformers(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_checkpoint(src, seed=3)
    ref = hf_model(src)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = M.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float32)
    M.save_pretrained(ours, str(out), source_path=str(src), max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # temp folder renamed away
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert rel_err(hf_model(out)(x).logits, ref(x).logits) < 1e-5
        assert rel_err(M.from_pretrained(str(out), dtype=torch.float32)(x), ref(x).logits) < 1e-5


def test_bf16_load_matches_transformers_bf16(tmp_path):
    tiny_checkpoint(tmp_path, seed=5)
    ours = M.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = ours(x), hf_model(tmp_path, torch.bfloat16)(x).logits
        exact = hf_model(tmp_path)(x).logits
    assert rel_err(a, b) < 3e-2 and rel_err(a, exact) < 3e-2


def test_packed_equals_per_sequence():
    m = random_model(tiny_config(), seed=2)
    lens = [5, 1, 17, 9]
    seqs = [torch.randint(0, 128, (n,)) for n in lens]
    meta = M.Varlen.from_seqlens(lens)
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        packed = m.logits(m(torch.cat(seqs), pos, meta))
        single = torch.cat([m(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)


def make_cache(cfg, num_blocks, block_size, dtype=torch.float32):
    shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def paged_meta(block_tables, ctx_before, new_counts, block_size):
    """Metadata for appending new_counts tokens to sequences that already hold ctx_before tokens."""
    slots, cu = [], [0]
    for table, before, n in zip(block_tables, ctx_before, new_counts):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(before, before + n)]
        cu.append(cu[-1] + n)
    return M.Paged(torch.tensor(slots), torch.tensor(block_tables, dtype=torch.int32),
                   torch.tensor([b + n for b, n in zip(ctx_before, new_counts)], dtype=torch.int32),
                   torch.tensor(cu, dtype=torch.int32), max(new_counts))


def test_paged_prefill_extend_decode_match_full_forward():
    cfg = tiny_config()
    m = random_model(cfg, seed=4)
    bs = 4
    cache = make_cache(cfg, 16, bs)
    tables = [[3, 7, 1, 0, 9], [2, 5, 11, 12, 13], [4, 6, 8, 10, 14]]  # scattered blocks
    seqs = [torch.randint(0, 128, (n,)) for n in (6, 9, 3)]
    full = [m(s[None])[0] for s in seqs]
    with torch.no_grad():
        # 1) prefill the first part of each prompt
        first = [4, 8, 1]
        meta = paged_meta(tables, [0, 0, 0], first, bs)
        ids = torch.cat([s[:n] for s, n in zip(seqs, first)])
        pos = torch.cat([torch.arange(n) for n in first])
        h = m(ids, pos, meta, cache)
        torch.testing.assert_close(m.logits(h), torch.cat([f[:n] for f, n in zip(full, first)]), rtol=1e-4, atol=1e-4)
        # 2) extend: the rest of each prompt attends to the cached prefix (chunked prefill)
        rest = [len(s) - n for s, n in zip(seqs, first)]
        meta = paged_meta(tables, first, rest, bs)
        ids = torch.cat([s[n:] for s, n in zip(seqs, first)])
        pos = torch.cat([torch.arange(n, len(s)) for s, n in zip(seqs, first)])
        h = m(ids, pos, meta, cache)
        torch.testing.assert_close(m.logits(h), torch.cat([f[n:] for f, n in zip(full, first)]), rtol=1e-4, atol=1e-4)
        # 3) decode one token per sequence
        nxt = torch.randint(0, 128, (3,))
        meta = paged_meta(tables, [len(s) for s in seqs], [1, 1, 1], bs)
        h = m(nxt, torch.tensor([len(s) for s in seqs]), meta, cache)
        want = torch.stack([m(torch.cat([s, t[None]])[None])[0, -1] for s, t in zip(seqs, nxt)])
        torch.testing.assert_close(m.logits(h), want, rtol=1e-4, atol=1e-4)


def test_targets_give_token_logprobs():
    m = random_model(tiny_config(), seed=6)
    ids = torch.randint(0, 128, (12,))
    meta, pos = M.Varlen.from_seqlens([12]), torch.arange(12)
    targets = torch.randint(0, 128, (12,))
    logp = m(ids, pos, meta, targets=targets, temperature=0.7)
    want = torch.log_softmax(m(ids[None])[0] / 0.7, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_same_grads():
    m = random_model(tiny_config(), seed=7)
    x = torch.randint(0, 128, (2, 11))
    m(x).square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(x).square().mean().backward()
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_tokenizer_and_both_templates(tmp_path):
    write_tokenizer(tmp_path / "old")
    write_tokenizer(tmp_path / "new", new_template=True)
    old, new = TK.Tokenizer.from_pretrained(str(tmp_path / "old")), TK.Tokenizer.from_pretrained(str(tmp_path / "new"))
    assert not old.think_in_template and new.think_in_template
    p_old, p_new = old.chat_prompt("What is 2+2?"), new.chat_prompt("What is 2+2?")
    assert p_old == ("<｜begin▁of▁sentence｜><｜User｜>What is 2+2? Let's think step by step and output the "
                     "final answer within \\boxed{}.<｜Assistant｜>")
    assert p_new == p_old + "<think>\n"
    assert old.encode(p_old)[0] == 0 and old.encode(p_old).count(2) == 1  # BOS and <｜User｜> are single tokens
    assert old.decode(old.encode(p_new)) == p_new
    assert old.eos_token_ids == [1] and old.pad_token_id == 1


def test_unknown_characters_warn_once_naming_the_file(tmp_path):
    """Text a tokenizer cannot spell is reported, never silent: the fixture's WordLevel maps it to its
    unknown token ' ', the demo's byte-level BPE (no merges, 21 tokens) drops it. Known text is silent."""
    import warnings
    import demo
    write_tokenizer(tmp_path / "wordlevel")
    demo.write_tokenizer(str(tmp_path / "demo"))
    cases = {"wordlevel": ("What is 12 + 34?", "12+34 é", ["é"]),
             "demo": ("12 + 34", "What is 12+34?", ["?", "W", "a", "h", "i", "s", "t"])}
    for name, (fine, bad, lost) in cases.items():
        tok = TK.Tokenizer.from_pretrained(str(tmp_path / name))
        assert not tok.spells_everything
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning here fails the test
            tok.encode(tok.chat_prompt(fine, instruction=""))
        with pytest.warns(TK.UnknownTokenWarning) as w:
            tok.encode(bad)
        msg = str(w[0].message)
        assert str(tmp_path / name / "tokenizer.json") in msg
        assert all(repr(c) in msg for c in lost) and "' '" not in msg.split("(in")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tok.encode(bad)  # once per character: a dataset of such rows warns once


def test_checkpoint_carries_its_instruction(tmp_path):
    """tokenizer_config.json's nanoscaler_instruction replaces DeepScaleR's instruction by default (the
    demo's is empty); an explicit instruction still wins; a non-string is refused by file and field."""
    write_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert TK.Tokenizer.from_pretrained(str(tmp_path)).instruction == TK.MATH_INSTRUCTION
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, TK.INSTRUCTION_KEY: "Answer briefly."}))
    tok = TK.Tokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_prompt("1+1") == "<｜begin▁of▁sentence｜><｜User｜>1+1 Answer briefly.<｜Assistant｜>"
    assert tok.chat_prompt("1+1", instruction="") == "<｜begin▁of▁sentence｜><｜User｜>1+1<｜Assistant｜>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, TK.INSTRUCTION_KEY: 3}))
    with pytest.raises(M.CheckpointError, match=f"tokenizer_config.json: field '{TK.INSTRUCTION_KEY}'"):
        TK.Tokenizer.from_pretrained(str(tmp_path))

# --------------------------------------------------------------------------- errors, messages checked

def write_config(path, **changes):
    cfg = tiny_config().to_hf()
    cfg.update(changes)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return os.path.join(path, "config.json")


@pytest.mark.parametrize("changes,field", [
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_config_refuses_unsupported(tmp_path, changes, field):
    file = write_config(tmp_path, **changes)
    with pytest.raises(M.ConfigError, match=f"'{field}'") as e:
        M.Config.from_file(file)
    assert file in str(e.value)


def test_config_reads_published_deepseek_config(tmp_path):
    published = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                 "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
                 "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21,
                 "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28,
                 "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
                 "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936}
    (tmp_path / "config.json").write_text(json.dumps(published))
    cfg = M.Config.from_file(str(tmp_path / "config.json"))
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.torch_dtype) == (128, 2, 10000.0, "bfloat16")
    assert M.expected_shapes(cfg)["model.layers.0.self_attn.k_proj.weight"] == (256, 1536)
    with torch.device("meta"):
        assert 1.77e9 < M.Qwen2(cfg).num_params() < 1.78e9  # 1.78B with the untied lm_head


def test_bad_json_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(M.ConfigError, match="config.json"):
        M.Config.from_file(str(tmp_path / "config.json"))


def test_checkpoint_errors_name_tensor_and_file(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)

    bad = dict(good)
    del bad["model.layers.1.mlp.up_proj.weight"]
    save_file(bad, file)
    with pytest.raises(M.CheckpointError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        M.from_pretrained(str(tmp_path))

    bad = dict(good, **{"model.layers.9.extra": torch.zeros(3)})
    save_file(bad, file)
    with pytest.raises(M.CheckpointError, match="model.layers.9.extra in .*model.safetensors: unexpected"):
        M.from_pretrained(str(tmp_path))

    bad = dict(good, **{"model.norm.weight": torch.zeros(65)})
    save_file(bad, file)
    with pytest.raises(M.CheckpointError, match=r"model.norm.weight in .*model.safetensors: shape \(65,\)"):
        M.from_pretrained(str(tmp_path))

    save_file(good, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(M.CheckpointError, match="model.safetensors"):
        M.from_pretrained(str(tmp_path))
    file.write_bytes(b"garbage" * 10)
    with pytest.raises(M.CheckpointError, match="model.safetensors"):
        M.from_pretrained(str(tmp_path))
    file.unlink()
    with pytest.raises(M.CheckpointError, match="no model.safetensors"):
        M.from_pretrained(str(tmp_path))


def test_tokenizer_errors(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(M.CheckpointError, match="tokenizer.json"):
        TK.Tokenizer.from_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<nope>"}))
    with pytest.raises(M.CheckpointError, match="'<nope>' is not in the vocabulary"):
        TK.Tokenizer.from_pretrained(str(tmp_path))


def test_autocast_forward_keeps_bf16_and_logprobs_close():
    """float32 master weights under bf16 autocast (one-GPU training): attention inputs stay bf16 and the
    lm_head log-probs are bf16 products with float32 accumulation, close to the float32 values."""
    m = random_model(tiny_config(), seed=8)
    ids = torch.randint(0, 128, (20,))
    meta, pos = M.Varlen.from_seqlens([12, 8]), torch.cat([torch.arange(12), torch.arange(8)])
    seen = []
    real = M.ATTENTION["varlen"]
    M.ATTENTION["varlen"] = lambda q, *a: seen.append(q.dtype) or real(q, *a)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = m(ids, pos, meta, targets=ids)
    finally:
        M.ATTENTION["varlen"] = real
    assert seen and all(d == torch.bfloat16 for d in seen)
    want = m(ids, pos, meta, targets=ids)
    assert logp.dtype == torch.float32 and (logp - want).abs().max() < 0.15
    logp.sum().backward()
    assert m.lm_head.weight.grad is not None and torch.isfinite(m.lm_head.weight.grad).all()
