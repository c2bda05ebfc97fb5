"""
train.py's checkpoints: torch.distributed.checkpoint (each rank writes its own shards, so FSDP needs no
gather), written to step_N.tmp and renamed when complete, the last `keep_last` kept, plus a Hugging Face
export of the policy in OUT/hf. Each rank also saves its trainer state (step, data position, RNG), so a
resumed run continues exactly where the killed one checkpointed.
"""
import os
import shutil
import warnings

import torch

import distributed as D
import model as M


def ckpt_dirs(out_dir):
    root = os.path.join(out_dir, "ckpt")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))


def dcp(op, path, ctx, model, opt, ref, stage):
    """torch.distributed.checkpoint's save or load (op) of the policy, its optimizer and, after stage 0,
    the reference (stage 0's is init_from). Returns the payload, which a load has filled in."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    payload = {"model": msd, "optim": osd}
    if ref is not None and stage > 0:
        payload["ref"] = ref.state_dict()
    with warnings.catch_warnings():  # without a process group DCP warns that it assumes one process: the intent
        if not ctx.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        op(payload, checkpoint_id=path)
    return payload


def save_checkpoint(cfg, ctx, model, opt, ref, state):
    from torch.distributed.checkpoint import save
    final = os.path.join(cfg.out_dir, "ckpt", f"step_{state['step']:06d}")
    tmp = final + ".tmp"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    D.barrier(ctx)
    dcp(save, tmp, ctx, model, opt, ref, state["stage"])
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if ctx.device.type == "cuda" else None}
    torch.save({**state, "rng": rng}, os.path.join(tmp, f"trainer_rank{ctx.rank}.pt"))
    D.barrier(ctx)
    full = None
    if cfg.export_hf and D.is_sharded(model):  # every rank takes part in gathering the shards; rank 0 writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # a checkpoint folder exists only once it is complete
        for old in ckpt_dirs(cfg.out_dir)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if cfg.export_hf:
            M.save_pretrained(model, os.path.join(cfg.out_dir, "hf"), source_path=cfg.init_from, state_dict=full)
    D.barrier(ctx)


def load_checkpoint(path, ctx, model, opt, ref):
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import set_state_dict
    mine = os.path.join(path, f"trainer_rank{ctx.rank}.pt")  # absent when resuming on more ranks than saved
    state = torch.load(mine if os.path.exists(mine) else os.path.join(path, "trainer_rank0.pt"), weights_only=False)
    payload = dcp(load, path, ctx, model, opt, ref, state["stage"])
    set_state_dict(model, opt, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
    if "ref" in payload:
        ref.load_state_dict(payload["ref"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state
