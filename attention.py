"""
Attention metadata and packed (varlen) attention, the training and evaluation path.

A batch is flattened to [N] tokens. `Varlen` describes packed sequences (training, evaluation, and the
model's plain calls); `Paged` describes new tokens against the paged KV cache (the engine's prefill and
decode, whose attention lives in kernels/ beside its PyTorch twins). `varlen_attention` is model.py's
ATTENTION["varlen"]: causal attention per sequence that never builds a [heads, n, n] matrix.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: used on CUDA when installed, never required
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


@dataclass
class Varlen:
    """Packed sequences, each causal on its own. seqlens is on the host (the caller built the batch,
    so knowing it costs no sync); cu_seqlens [B+1] int32 is on the device."""
    cu_seqlens: torch.Tensor
    seqlens: list
    max_seqlen: int

    @classmethod
    def from_seqlens(cls, seqlens, device=None):
        seqlens = [int(n) for n in seqlens]
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        if seqlens:
            cu[1:] = torch.tensor(seqlens).cumsum(0)
        return cls(cu.to(device), seqlens, max(seqlens, default=0))


@dataclass
class Paged:
    """New tokens of B sequences whose context lives in the paged KV cache.

    slot_mapping [N] int64: cache slot that receives each new token's K/V (block * block_size + row).
    block_tables [B, max_blocks] int32: the blocks of each sequence, in order (unused entries: any valid id).
    context_lens [B] int32: tokens of context of each sequence *including* its new tokens.
    cu_seqlens_q [B+1] int32: where each sequence's new tokens start in the flattened batch.
    max_seqlen_q: host int, most new tokens of any sequence (1 for decode).
    All tensors keep fixed shapes for a given batch, so a decode step can be captured in a CUDA graph.
    """
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int


# -----------------------------------------------------------------------------
# Packed (varlen) attention for training and evaluation: q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D], causal
# per sequence, never a [heads, n, n] matrix. One flash-class call per micro-batch where the stack has one
# (flash-attn's varlen function, else torch.nn.attention.varlen), else SDPA once per sequence on 4-D tensors
# with the math backend off: what no fused kernel takes raises instead of quietly costing O(n^2) memory.

try:  # PyTorch's own variable-length attention (flash kernels, CUDA only): torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:
    torch_varlen_attn = None

# SDPA backends that tile (O(n) memory). CUDA: flash takes bf16/fp16 with GQA, memory-efficient takes float32
# but has GQA compiled out. CPU: its flash kernel takes every float dtype, GQA included. A caller's narrower
# choice (torch.nn.attention.sdpa_kernel) is respected; the math backend is never allowed.
FUSED_SDPA = {"cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], "cpu": [SDPBackend.FLASH_ATTENTION]}


def fused_sdpa_backends(device_type):
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled()}
    allowed = [b for b in FUSED_SDPA.get(device_type, FUSED_SDPA["cuda"]) if enabled.get(b)]
    if not allowed:
        raise RuntimeError(f"packed attention on {device_type}: none of the tiled SDPA backends "
                           f"{FUSED_SDPA.get(device_type)} is enabled, and the math backend would build [heads, n, n]")
    return allowed


def sdpa_per_sequence(q, k, v, meta: Varlen, scale):
    """SDPA once per sequence on [1, heads, n, D] views (3-D inputs would take the math backend). Float32
    on CUDA: flash refuses it and memory-efficient has no GQA, so the KV heads are expanded first."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.is_cuda and q.dtype == torch.float32:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    out, start = torch.empty_like(q), 0
    with sdpa_kernel(fused_sdpa_backends(q.device.type)):
        for n in meta.seqlens:
            if n:
                sl = slice(start, start + n)
                o = F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                                   v[sl].transpose(0, 1)[None], is_causal=True, scale=scale,
                                                   enable_gqa=gqa)
                out[sl] = o[0].transpose(0, 1)
            start += n
    return out


def torch_varlen_kwargs():
    """Causality and GQA as the installed torch spells them: is_causal=True (2.10) became
    window_size=(-1, 0) (2.11); enable_gqa appeared in 2.12 (earlier releases pass fewer KV heads straight
    to the flash kernel, which supports them). Checked against SDPA once per device (varlen_backend)."""
    params = inspect.signature(torch_varlen_attn).parameters
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return {**kw, "enable_gqa": True} if "enable_gqa" in params else kw, "scale" in params


def torch_varlen(q, k, v, meta: Varlen, scale):
    kw, takes_scale = torch_varlen_kwargs()
    if not takes_scale and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("torch.nn.attention.varlen.varlen_attn of this torch has no scale argument")
    return torch_varlen_attn(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen, **kw,
                             **({"scale": scale} if takes_scale else {}))


def flash_attn_varlen(q, k, v, meta: Varlen, scale):
    return flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                                  softmax_scale=scale, causal=True)


VARLEN_IMPLS = {"flash-attn": flash_attn_varlen, "torch-varlen": torch_varlen, "sdpa-per-sequence": sdpa_per_sequence}
_checked = {}  # (device, dtype, Hq, Hkv, D) -> torch varlen agrees with SDPA there


def varlen_backend(q, k) -> str:
    """Which packed-attention implementation runs for these inputs (a key of VARLEN_IMPLS)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa-per-sequence"
    if flash_attn_varlen_func is not None:
        return "flash-attn"
    if torch_varlen_attn is not None and torch.cuda.get_device_capability(q.device) >= (8, 0):
        key = (str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[2])
        if key not in _checked:
            _checked[key] = check_torch_varlen(*key)
        if _checked[key]:
            return "torch-varlen"
    return "sdpa-per-sequence"


def check_torch_varlen(device, dtype, hq, hkv, d):
    """Forward and backward of torch's varlen attention against SDPA per sequence on a small packed batch
    (GQA, three sequences). Any error or mismatch: warn once and use SDPA per sequence instead."""
    g = torch.Generator(device=device).manual_seed(0)
    meta = Varlen.from_seqlens([37, 1, 90], device)
    x = [torch.randn(128, h, d, device=device, dtype=dtype, generator=g).requires_grad_() for h in (hq, hkv, hkv)]
    try:  # first called from inside a forward maybe: under no_grad, autocast or a checkpoint's saved-tensor hooks
        with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            outs = [[o, *torch.autograd.grad(o.float().square().sum(), x)]
                    for o in (fn(*x, meta, d ** -0.5) for fn in (torch_varlen, sdpa_per_sequence))]
        for a, b in zip(*outs):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        import warnings
        warnings.warn(f"torch.nn.attention.varlen disagrees with SDPA here ({e!r:.300}); packed attention "
                      "uses SDPA once per sequence")
        return False


def varlen_attention(q, k, v, meta: Varlen, scale):
    """model.ATTENTION["varlen"]: the implementation varlen_backend picks."""
    return VARLEN_IMPLS[varlen_backend(q, k)](q, k, v, meta, scale)
