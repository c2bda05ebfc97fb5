"""
Triton kernels for the rollout engine, one per file, each beside its plain-PyTorch twin:

    kv_write.py            new K/V rows into the paged cache
    decode_attention.py    paged decode attention (GQA-grouped, split-K with a fixed grid)
    prefill_attention.py   paged prefill / extend attention (new tokens against a cached prefix)
    sampling.py            counter-based sampling (twin: sample_torch)
    cuda_graphs.py         decode steps captured once per batch-size bucket (CUDA only)

model.py's attention registry (model.ATTENTION) holds the twins by default (the CPU path);
use_triton() swaps the Triton kernels in behind the same calls. Imports are lazy so that importing
`kernels.sampling` (the engine does) costs nothing more.
"""


def paged_attention(q, k_cache, v_cache, meta, positions, scale):
    """Decode kernel when every sequence has one new token (meta.max_seqlen_q is a host int: no sync),
    the prefill/extend kernel otherwise."""
    if meta.max_seqlen_q == 1:
        from kernels.decode_attention import decode_attention
        return decode_attention(q, k_cache, v_cache, meta, positions, scale)
    from kernels.prefill_attention import prefill_attention
    return prefill_attention(q, k_cache, v_cache, meta, positions, scale)


def use_triton(enable=True):
    """Swap model.ATTENTION's paged entries for the Triton kernels (enable=False restores the twins).
    Returns the previous registry so a caller can restore it. The registry is module-level: this affects
    every model in the process (training's Varlen path does not use these entries). Needs CUDA, or TRITON_INTERPRET=1 set
    before the kernels were first imported."""
    import model as M
    from kernels.kv_write import write_kv_cache, write_kv_cache_torch
    from kernels.prefill_attention import paged_attention_torch
    previous = dict(M.ATTENTION)
    if enable:
        M.ATTENTION.update(paged=paged_attention, write_kv=write_kv_cache)
    else:
        M.ATTENTION.update(paged=paged_attention_torch, write_kv=write_kv_cache_torch)
    return previous


def triton_enabled():
    import model as M
    return M.ATTENTION["paged"] is paged_attention


def enabled_for(device):
    """Whether an engine on `device` should use the kernels and CUDA graphs: on CUDA unless the
    environment says NANOSCALER_KERNELS=0 (the escape hatch back to the PyTorch twins)."""
    import os
    return device.type == "cuda" and os.environ.get("NANOSCALER_KERNELS", "1") != "0"


def setup_engine(engine):
    """The engine's hook (engine.py calls it on CUDA): Triton attention in the registry, the fused
    sampler, and decode steps captured once per batch-size bucket with the block table at full width
    (the kernels read only up to each context length). Returns (sampler, graphs)."""
    from kernels.cuda_graphs import DecodeGraphs
    from kernels.sampling import sample
    use_triton()
    return sample, DecodeGraphs(lambda bs: engine._run_decode(bs, engine.max_blocks_per_seq))
