"""Small fixtures shared by the tests: tiny random Qwen2 checkpoints and a tiny tokenizer with the
R1-distill special tokens. Nothing here needs the network or ../shared/data."""
import json
import os

import torch

import model as M

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
OLD_TEMPLATE = "{{bos_token}}{% for m in messages %}...{% endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}"
NEW_TEMPLATE = OLD_TEMPLATE.replace("{{'<｜Assistant｜>'}}", "{{'<｜Assistant｜><think>\\n'}}")


def tiny_config(**overrides) -> M.Config:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float32",
                bos_token_id=0, eos_token_id=1, max_position_embeddings=4096)
    base.update(overrides)
    return M.Config(**base)


def random_model(cfg: M.Config, seed=0, std=0.2) -> M.Qwen2:
    """Every parameter random (biases and norms too), so a wrong wiring cannot hide."""
    torch.manual_seed(seed)
    m = M.Qwen2(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return m


def write_tokenizer(path, vocab_size=128, new_template=False):
    """A character-level tokenizer: specials first, then printable ASCII, padded out to vocab_size
    would exceed the tiny vocab, so only as many characters as fit are kept."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in chars:
        if len(vocab) >= vocab_size:
            break
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": {"content": SPECIALS[0]}, "eos_token": {"content": SPECIALS[1]},
                   "chat_template": NEW_TEMPLATE if new_template else OLD_TEMPLATE}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)


def tiny_checkpoint(path, seed=0, new_template=False, **overrides):
    cfg = tiny_config(**overrides)
    write_tokenizer(path, cfg.vocab_size, new_template)
    M.save_pretrained(random_model(cfg, seed), path, source_path=path)
    return path


def break_kernel_self_check(monkeypatch):
    """As on a GPU whose Triton kernels fail their self-check, simulated on the CPU: the engine believes
    kernels are wanted and the self-check raises a compiler error."""
    import kernels
    import model_runner

    def broken(*a, **kw):
        raise RuntimeError("ptxas: no such target")
    monkeypatch.setattr(model_runner, "kernels_wanted", lambda device: True)
    monkeypatch.setattr(kernels, "self_check", broken)
