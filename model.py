"""
Qwen2 (DeepSeek-R1-Distill-Qwen-1.5B) written by hand: config, decoder, safetensors load/save in the
Hugging Face layout. (Attention metadata and packed attention: attention.py; the tokenizer: tokenizer.py.)

One forward serves every caller. Tokens are flattened to [N] with their positions [N], and an
attention-metadata object says how they relate:
  Varlen - packed independent sequences, causal inside each (training, prefill without a cache);
  Paged  - new tokens of sequences whose keys/values live in a paged KV cache (the engine's decode,
           and prefill/extend against cached prefixes). The new K/V rows are written into the cache
           first, then each query attends to its sequence's cached context.
The forward returns final hidden states [N, H]; logits (for a few rows) or per-token log-probs of
given targets (via grpo.token_logprobs, never [N x vocab] at once) are computed from them.

KV-cache layout, fixed here and shared with the engine (model_runner.py) and kernels/: one tensor per layer and per K/V,
    k_cache[layer], v_cache[layer]: [num_blocks, block_size, num_kv_heads, head_dim]
(flash-attn's paged layout), so a token in slot s lives at block s // block_size, row s % block_size.
"""
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import Paged, Varlen, varlen_attention  # noqa: F401 (Paged, Varlen: model.Paged etc.)
from grpo import token_logprobs

# -----------------------------------------------------------------------------
# Config


class ConfigError(ValueError):
    pass


REQUIRED = object()


def hf_field(hf, name, kind, source, default=None, positive=False):
    """hf[name] if its JSON type is in kind ("int|null"), default if absent; a wrong type is refused naming
    the file and field (true is not an integer, "false" is not a bool)."""
    if name not in hf:
        if default is REQUIRED:
            raise ConfigError(f"{source}: field '{name}' is missing")
        return default
    v = hf[name]
    is_kind = {"int": isinstance(v, int) and not isinstance(v, bool), "bool": isinstance(v, bool),
               "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
               "str": isinstance(v, str), "list": isinstance(v, list), "dict": isinstance(v, dict), "null": v is None}
    if not any(is_kind[k] for k in kind.split("|")):
        raise ConfigError(f"{source}: field '{name}' must be {kind.replace('|', ' or ')}, got {json.dumps(v)}")
    if positive and v is not None and v <= 0:
        raise ConfigError(f"{source}: field '{name}' must be positive, got {v!r}")
    return v


@dataclass
class Config:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    max_position_embeddings: int = 131072
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 151646
    eos_token_id: int | list | None = 151643

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Config":
        """Read a transformers config.json dict: the published style (rope_theta, torch_dtype) or the
        newer one (rope_parameters, dtype). Every field we read is type-checked (a string "false" is not
        a bool); anything we do not implement is refused by name."""
        def refuse(field_name, why):
            raise ConfigError(f"{source}: field '{field_name}' {why}; nanoscaler implements plain Qwen2 only")

        def get(name, kind, default=None, positive=False):
            return hf_field(hf, name, kind, source, default, positive)

        arch = get("architectures", "list|null") or ["Qwen2ForCausalLM"]
        if get("model_type", "str", "qwen2") != "qwen2":
            refuse("model_type", f"is {hf.get('model_type')!r}, expected 'qwen2'")
        if arch != ["Qwen2ForCausalLM"]:
            refuse("architectures", f"is {arch!r}, expected ['Qwen2ForCausalLM']")
        if get("hidden_act", "str", "silu") != "silu":
            refuse("hidden_act", f"is {hf['hidden_act']!r}, expected 'silu'")
        if get("use_sliding_window", "bool|null", False):
            refuse("use_sliding_window", "is true (sliding-window attention)")
        if any(t != "full_attention" for t in get("layer_types", "list|null") or []):
            refuse("layer_types", "asks for sliding-window layers")
        if get("rope_scaling", "dict|null"):
            refuse("rope_scaling", f"is {hf['rope_scaling']!r} (rope scaling)")
        rope = get("rope_parameters", "dict|null") or {}
        if rope.get("rope_type", "default") != "default":
            refuse("rope_parameters", f"has rope_type {rope['rope_type']!r} (rope scaling)")
        if get("attention_dropout", "number", 0.0):
            refuse("attention_dropout", "is non-zero")

        for name in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]:
            get(name, "int", REQUIRED, positive=True)
        heads = hf["num_attention_heads"]
        kv_heads = get("num_key_value_heads", "int|null", positive=True) or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads})")
        head_dim = get("head_dim", "int|null", positive=True) or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            refuse("head_dim", f"is {head_dim}, but hidden_size / num_attention_heads = {hf['hidden_size'] / heads}")
        theta = hf_field(rope, "rope_theta", "number", f"{source}: rope_parameters", None, positive=True)
        theta = theta if theta is not None else get("rope_theta", "number", 10000.0, positive=True)
        dtype = get("dtype", "str|null") or get("torch_dtype", "str|null") or "bfloat16"
        if dtype not in ("float32", "bfloat16", "float16"):
            refuse("torch_dtype", f"is {dtype!r}")
        eos = get("eos_token_id", "int|list|null")
        if isinstance(eos, list) and not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise ConfigError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=get("max_position_embeddings", "int", 131072, positive=True),
            rope_theta=float(theta), rms_norm_eps=float(get("rms_norm_eps", "number", 1e-6, positive=True)),
            tie_word_embeddings=get("tie_word_embeddings", "bool", False), torch_dtype=dtype,
            bos_token_id=get("bos_token_id", "int|null"), eos_token_id=eos,
        )

    @classmethod
    def from_file(cls, path: str) -> "Config":
        try:
            with open(path) as f:
                hf = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf(hf, source=path)

    def to_hf(self) -> dict:
        """config.json in the published style, which every loader (transformers 4/5, vLLM, SGLang) reads."""
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": self.num_hidden_layers, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True,
        }


def rms_norm(x, weight, eps):
    # statistics in float32, result in the input dtype (matches the reference implementation bit for bit)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotary_cos_sin(positions, head_dim, theta, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x, cos, sin):
    # x [N, heads, head_dim]; "rotate half" convention (first half paired with second half)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# The paged twins live beside their Triton kernels (kernels/), which use_triton() below swaps in.
from kernels.kv_write import write_kv_cache_torch  # noqa: E402
from kernels.prefill_attention import paged_attention_torch  # noqa: E402

# Engines swap the paged entries for Triton kernels (kernels/) behind the same signatures: use_triton().
ATTENTION = {"varlen": varlen_attention, "paged": paged_attention_torch, "write_kv": write_kv_cache_torch}


def use_triton(enable=True):
    """Swap ATTENTION's paged entries for the Triton kernels (enable=False restores the twins). Returns the
    previous registry so a caller can restore it. The registry is module-level: this affects every model
    in the process (training's Varlen path does not use these entries). Needs CUDA, or TRITON_INTERPRET=1
    set before the kernels were first imported."""
    from kernels import paged_attention
    from kernels.kv_write import write_kv_cache
    previous = dict(ATTENTION)
    if enable:
        ATTENTION.update(paged=paged_attention, write_kv=write_kv_cache)
    else:
        ATTENTION.update(paged=paged_attention_torch, write_kv=write_kv_cache_torch)
    return previous


def triton_enabled():
    from kernels import paged_attention
    return ATTENTION["paged"] is paged_attention


# -----------------------------------------------------------------------------
# The decoder


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, positions, meta, kv_cache):
        cfg, N = self.cfg, x.shape[0]
        q = self.q_proj(x).view(N, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(N, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(N, cfg.num_key_value_heads, cfg.head_dim)
        # cos/sin in q's dtype: under autocast q is bf16 and must stay so (flash-attn, bf16 SDPA)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if isinstance(meta, Varlen):
            o = ATTENTION["varlen"](q, k, v, meta, scale)
            if kv_cache is not None:  # prefill that also fills the cache: needs slot_mapping, see Engine
                raise ValueError("a Varlen batch does not write the KV cache; use Paged metadata")
        else:
            k_cache, v_cache = kv_cache
            ATTENTION["write_kv"](k, v, k_cache, v_cache, meta.slot_mapping)
            o = ATTENTION["paged"](q, k_cache, v_cache, meta, positions, scale)
        return self.o_proj(o.reshape(N, -1))



class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, meta, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Named like transformers' Qwen2Model so state_dict keys are the checkpoint's keys unchanged."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward (activation checkpointing)
        self.source_path = None  # checkpoint folder we were loaded from (tokenizer files come from there)

    def forward(self, input_ids, positions=None, meta=None, kv_cache=None, *, targets=None,
                temperature=1.0, return_entropy=False):
        """input_ids [N] with positions [N] and meta (Varlen or Paged) -> hidden states [N, H];
        with targets [N]: log-probs of the targets [N] (and entropies) computed inside the forward, so
        the lm_head weight is whole here even under FSDP. kv_cache: (k_caches, v_caches), one per layer.
        The plain call model(input_ids[B, T]) returns logits [B, T, vocab] (tests, small uses)."""
        if input_ids.dim() == 2:
            return self.plain_logits(input_ids)
        h = self.hidden_states(input_ids, positions, meta, kv_cache)
        if targets is None:
            return h
        weight = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):  # float32 master weights: lm_head in the compute dtype,
            dtype = torch.get_autocast_dtype(h.device.type)  # float32 accumulation inside token_logprobs
            h, weight = h.to(dtype), weight.to(dtype)
        return token_logprobs(h, weight, targets, temperature=temperature, return_entropy=return_entropy)

    def hidden_states(self, input_ids, positions, meta, kv_cache=None):
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if kv_cache is None else (kv_cache[0][i], kv_cache[1][i])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, positions, meta, layer_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, meta, layer_cache)
        return self.model.norm(x)

    def logits(self, hidden):
        """Logits for a few rows (the engine's last positions); never call it on a whole training batch."""
        return self.lm_head(hidden)

    def plain_logits(self, input_ids):
        B, T = input_ids.shape
        meta = Varlen.from_seqlens([T] * B, input_ids.device)
        positions = torch.arange(T, device=input_ids.device).repeat(B)
        h = self.hidden_states(input_ids.reshape(-1), positions, meta)
        return self.logits(h).view(B, T, -1)

    def num_params(self):
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def init_weights(model: Qwen2, std=0.02, seed=0):
    """Random weights (benchmarks, demos): normal linear/embedding weights, unit norms, zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# -----------------------------------------------------------------------------
# Checkpoints: safetensors in the Hugging Face layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]


class CheckpointError(ValueError):
    pass


def expected_shapes(cfg: Config) -> dict:
    with torch.device("meta"):
        m = Qwen2(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def checkpoint_files(path: str) -> dict:
    """{tensor name: file} from model.safetensors or a sharded model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> file name")
        for name, fname in weight_map.items():
            # shard files sit beside the index: an absolute path or a "../" would read outside the folder
            if not isinstance(fname, str) or not fname or os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/"):
                raise CheckpointError(f"{index}: weight_map[{name!r}] = {fname!r} is not a file inside {path}")
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    if os.path.exists(single):
        return {name: single for name in safetensors_keys(single)}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def safetensors_keys(file):
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from e


def from_pretrained(path: str, device="cpu", dtype=None) -> Qwen2:
    """Build on the meta device, then load each tensor straight into place (no second full copy)."""
    from safetensors import safe_open
    cfg = Config.from_file(os.path.join(path, "config.json"))
    dtype = DTYPES[cfg.torch_dtype] if dtype is None else dtype
    expected = expected_shapes(cfg)
    files = checkpoint_files(path)
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store it anyway: it is the embedding
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{unexpected[0]} in {files[unexpected[0]]}: unexpected tensor for this config"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    state = {}
    by_file = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"{name} in {file}: shape {shape}, expected {expected[name]}")
                    state[name] = f.get_tensor(name).to(dtype)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from e
    with torch.device("meta"):
        model = Qwen2(cfg)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.source_path = path
    return model.to(device)


def save_pretrained(model: Qwen2, path: str, dtype=None, max_shard_bytes=5 * 2**30, source_path=None,
                    state_dict=None):
    """Write the HF layout atomically: safetensors (sharded with an index past max_shard_bytes),
    config.json, generation_config.json and the tokenizer files of the source checkpoint.
    state_dict: full tensors gathered beforehand (an FSDP-sharded model's own state_dict holds shards).
    The folder gets ordinary permissions (umask applies, 0755/0644 usually); a full disk is refused before
    writing, and a kill part-way leaves a temporary that the next save removes."""
    from safetensors.torch import save_file
    cfg = model.config
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_temporaries(path)
    need = sum(t.numel() * t.element_size() for t in state.values())
    ensure_space(parent, need, f"the export {path}")
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp)  # not tempfile.mkdtemp: its 0700 would hide the export from other users
    try:
        shards = shard_state(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": need}, "weight_map": weight_map}, f, indent=2)
        hf = cfg.to_hf()
        hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        source = source_path or model.source_path
        copy_tokenizer_files(source, tmp)
        if not os.path.exists(os.path.join(tmp, "generation_config.json")):
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
                           "temperature": 0.6, "top_p": 0.95}, f, indent=2)
        mode = os.stat(tmp).st_mode & 0o666  # the umask's file mode (mkdir applied it); safetensors writes 0600
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), mode)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and (no_space(e) or shutil.disk_usage(parent).free < 16 * 2**20):
            raise OSError(errno.ENOSPC, f"no space left while writing the export {path} ({e}); "
                                        f"{shutil.disk_usage(parent).free / 2**30:.2f} GiB free in {parent}") from e
        raise
    return path


def ensure_space(folder, need, what):
    """Refuse a write that cannot fit: a full disk otherwise fails half-way (safetensors: "unexpected pos")."""
    free = shutil.disk_usage(folder).free
    if free < need * 1.05 + 16 * 2**20:
        raise OSError(errno.ENOSPC, f"no space left for {what}: it needs about {need / 2**30:.2f} GiB and "
                                    f"{folder} has {free / 2**30:.2f} GiB free")


def no_space(e):
    """Was e (or what caused it) a full disk?"""
    while e is not None and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        e = e.__cause__ or e.__context__
    return e is not None


def shard_state(state, max_shard_bytes):
    shards, size = [{}], 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def copy_tokenizer_files(source, dest):
    if not source:
        return
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        src = os.path.join(source, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest, name))  # contents only: the export's own permissions


def replace_dir(tmp, path):
    """Swap tmp into path: the old folder survives (as tmp.old) until the new one is in place."""
    old = None
    if os.path.exists(path):
        old = tmp + ".old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def recover_temporaries(path):
    """What a kill during save_pretrained left beside path: when it died between replace_dir's two
    renames, path is missing and T.old holds the previous export while T holds the finished new one
    (T.old exists only once T was complete): T is moved into place. Every other .tmp-NAME-* goes."""
    parent, prefix = os.path.dirname(path), f".tmp-{os.path.basename(path)}-"
    temps = sorted(d for d in os.listdir(parent) if d.startswith(prefix))
    if not os.path.exists(path):
        for d in temps:
            if d.endswith(".old"):
                done = d[:-len(".old")]
                os.rename(os.path.join(parent, done if done in temps else d), path)
                break
    for d in temps:
        if os.path.exists(os.path.join(parent, d)):
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def read_json(path):
    """A JSON object from path ({} if there is no such file); anything else is refused naming the file."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
