"""
train.py's checkpoints, and the rules that keep a run folder safe.

    OUT/metrics.jsonl           one row per step (train.py)
    OUT/ckpt/step_000040/       a torch.distributed.checkpoint folder: each rank writes its own shards (so FSDP
                                needs no gather) and its trainer state (step, data position, RNG)
    OUT/hf/                     an HF-layout export of the policy, replaced with each checkpoint

Complete or not at all: a checkpoint is written to step_N.tmp; when every rank is done, rank 0 writes
complete.json last (each file and its size, a crc32 of the small files, a checksum of every tensor) and
renames the folder. Only a folder named exactly step_N whose complete.json matches its files counts: an
empty step_000099, a step_000030_backup copy or a .tmp left by a kill is never resumed from. A checkpoint
whose files or tensors do not match is reported by name, moved aside to step_N.damaged, and the previous
complete one is used. Rotation keeps the newest `keep_last` and never touches the one just written.

Tensor checksums: each tensor's elements read as integers of their own width and summed in that width
(mod 2^32 for float32, 2^16 for bf16): any single-bit error changes the sum; it is one pass over memory,
never a re-read of the files (cost against the save: BENCHMARKS.md, bench/checkpoint.py); and the sums
over FSDP shards add up to the whole tensor's, so a run resumed on another number of GPUs checks the same
numbers.

The trainer state loads with weights_only=True. DCP's own .metadata is a pickle: resume only folders you
trust (README, "Resuming and recovering").

The run folder (prepare_out_dir): a folder "holds a run" when it has a non-empty metrics.jsonl, anything in
ckpt/, or hf/ (the demo's prepared inputs in OUT/demo/ do not count). Without --resume such a folder is
refused (--overwrite deletes the old run; another --out_dir starts a new one). With --resume a new or empty
folder starts fresh; a run that never finished a checkpoint starts again from step 0; a run whose
checkpoints are all gone or damaged is refused, naming what was found.
"""
import errno
import json
import os
import re
import shutil
import warnings
import zlib

import torch

import distributed as D
import model as M

MARKER = "complete.json"
STEP_DIR = re.compile(r"step_(\d+)")
SMALL_FILE = 64 * 2**20  # files up to this size get a crc32 in the marker (the trainer states, .metadata)


class RunFolderError(SystemExit):
    """out_dir cannot be used as asked; nothing was changed. Printed without a traceback."""


class CheckpointDamaged(Exception):
    def __init__(self, message, touched_ref=False):
        super().__init__(message)
        self.touched_ref = touched_ref  # the failed load wrote into the reference model


def step_dirs(out_dir):
    """[(step, path)] of the folders named exactly step_N under OUT/ckpt, by step."""
    root = os.path.join(out_dir, "ckpt")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.fullmatch(d))]
    return sorted(p for p in found if os.path.isdir(p[1]))


def ckpt_dirs(out_dir):
    """Paths of the checkpoints that claim to be complete (a marker), oldest first."""
    return [p for _, p in step_dirs(out_dir) if os.path.isfile(os.path.join(p, MARKER))]


def read_marker(path):
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_problems(path):
    """What is wrong with a checkpoint's files ([] = nothing): the marker, each file's size, small files' crc32."""
    marker = read_marker(path)
    if marker is None:
        return [f"{MARKER} is missing or unreadable"]
    problems = []
    for name, info in marker["files"].items():
        file = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) != info.get("size"):
            problems.append(f"{name} has {os.path.getsize(file)} bytes, {info.get('size')} were written")
        elif "crc32" in info and crc32(file) != info["crc32"]:
            problems.append(f"{name} does not match its checksum")
    return problems

# -----------------------------------------------------------------------------
# Tensor checksums


INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def element_sum(t):
    """(sum of t's elements read as integers of their own width, accumulated in that width, bits): one
    pass over memory at memcpy speed, and additive over any split of the elements (FSDP shards)."""
    flat = t.detach().reshape(-1).contiguous()
    size = flat.element_size()
    ints = flat.view(INT[size])
    total = ints.sum(dtype=torch.int64) if size == 1 else ints.sum(dtype=INT[size])  # widening is 10x slower
    return total.to(torch.int64), 8 * size


def tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from tensors(tree[k], f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tensors(v, f"{prefix}/{i}")


def counted_here(t, ctx):
    """Each element is counted once over all ranks: a DTensor's shard on every rank (but one copy of a
    replicated dimension), a plain tensor, the same on every rank, on rank 0."""
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(t, DTensor):
        return ctx.rank == 0
    coord = t.device_mesh.get_coordinate() or []
    return all(c == 0 for p, c in zip(t.placements, coord) if isinstance(p, Replicate))


def tensor_sums(payload, ctx):
    """{name: checksum} of every tensor, whole: the element sum mod 2^bits (bits = the element width),
    added up over the ranks' shards, so a checkpoint checks the same on any number of GPUs."""
    from torch.distributed.tensor import DTensor
    names, sums, bits = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU tensors: one memory-bound pass; a parallel region per tensor costs more
    try:
        for name, t in tensors(payload):
            local = t.to_local() if isinstance(t, DTensor) else t
            total, width = element_sum(local) if counted_here(t, ctx) else (torch.zeros((), dtype=torch.int64), 0)
            names.append(name)
            sums.append(total.to(ctx.device))
            bits.append(width or 8 * local.element_size())
    finally:
        torch.set_num_threads(threads)
    if not sums:
        return {}
    totals = D.all_reduce(torch.stack(sums), ctx).tolist()  # one collective, one host sync
    return {n: v % 2**b for n, v, b in zip(names, totals, bits)}

# -----------------------------------------------------------------------------
# Saving


def train_payload(model, opt, ref, stage):
    """What DCP saves and loads: the policy, its optimizer and, after stage 0, the reference (stage 0's
    is init_from). Its tensors are the live ones, so a load fills the model in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    payload = {"model": msd, "optim": osd}
    if ref is not None and stage > 0:
        payload["ref"] = ref.state_dict()
    return payload


def dcp(op, payload, path, ctx):
    with warnings.catch_warnings():  # without a process group DCP warns that it assumes one process: the intent
        if not ctx.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        op(payload, checkpoint_id=path)


def local_bytes(payload):
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for _, t in tensors(payload))


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(cfg, ctx, model, opt, ref, state):
    from torch.distributed.checkpoint import save
    root = os.path.join(cfg.out_dir, "ckpt")
    final = os.path.join(root, f"step_{state['step']:06d}")
    tmp = final + ".tmp"
    payload = train_payload(model, opt, ref, state["stage"])
    need = D.all_reduce(torch.tensor(float(local_bytes(payload)), device=ctx.device), ctx).item()
    err = None
    if ctx.rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            M.ensure_space(root, need, f"checkpoint {final} (keep fewer: keep_last; then --resume)")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            err = e
    raise_everywhere(err, ctx)
    trainer_file = os.path.join(tmp, f"trainer_rank{ctx.rank}.pt")
    try:
        dcp(save, payload, tmp, ctx)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if ctx.device.type == "cuda" else None}
        torch.save({**state, "rng": rng}, trainer_file)
        fsync_file(trainer_file)
    except Exception as e:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if M.no_space(e) or shutil.disk_usage(root).free < 16 * 2**20:
            raise OSError(errno.ENOSPC, f"no space left while writing checkpoint {final} ({e}); the previous "
                                        "checkpoints are intact: free some space and run again with --resume") from e
        raise
    sums = tensor_sums(payload, ctx)
    D.barrier(ctx)  # every rank's files are written
    err = None
    if ctx.rank == 0:
        try:
            seal(tmp, final, state["step"], ctx.world_size, sums)
            rotate(root, final, cfg.keep_last)
        except Exception as e:
            err = e
    raise_everywhere(err, ctx)
    if cfg.export_hf:
        export(cfg, ctx, model)


def export(cfg, ctx, model):
    """OUT/hf: the policy in the HF layout (every rank helps gather FSDP shards; rank 0 writes)."""
    full = None
    if D.is_sharded(model):  # every rank takes part in gathering the shards; rank 0 writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    err = None
    if ctx.rank == 0:
        try:
            M.save_pretrained(model, os.path.join(cfg.out_dir, "hf"), source_path=cfg.init_from, state_dict=full)
        except Exception as e:
            err = e
    raise_everywhere(err, ctx)


def raise_everywhere(err, ctx):
    """Rank 0 met err: every rank raises (the others would otherwise wait for it at the next collective)."""
    message = D.broadcast_object(None if err is None else f"{type(err).__name__}: {err}", ctx)
    if err is not None:
        raise err
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")


def seal(tmp, final, step, world_size, sums):
    """The completion marker, written last, then the rename that makes the checkpoint visible."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        size = os.path.getsize(os.path.join(tmp, name))
        files[name] = {"size": size, **({"crc32": crc32(os.path.join(tmp, name))} if size <= SMALL_FILE else {})}
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": step, "world_size": world_size, "files": files, "tensor_sums": sums}, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # only a folder we could not use (resume moves damaged ones aside first)
        move_aside(final, "replaced")
    os.rename(tmp, final)
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(root, final, keep_last):
    """Delete complete checkpoints older than the newest keep_last; never the one just written."""
    out_dir = os.path.dirname(root)
    step = int(STEP_DIR.fullmatch(os.path.basename(final)).group(1))
    older = [p for s, p in step_dirs(out_dir) if s < step and os.path.isfile(os.path.join(p, MARKER))]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        os.rename(old, old + ".deleting")  # a kill inside rmtree then leaves no half-deleted step_N behind
        shutil.rmtree(old + ".deleting", ignore_errors=True)


def move_aside(path, why):
    dest, i = f"{path}.{why}", 1
    while os.path.exists(dest):
        i += 1
        dest = f"{path}.{why}{i}"
    os.rename(path, dest)
    return dest

# -----------------------------------------------------------------------------
# Loading


def agree(err, ctx, touched_ref):
    """Raise CheckpointDamaged on every rank if any rank met an error."""
    errors = [e for e in D.all_gather_objects(None if err is None else f"{type(err).__name__}: {err}", ctx) if e]
    if errors:
        raise CheckpointDamaged(f"cannot load it ({errors[0][:300]})", touched_ref)


def load_checkpoint(path, ctx, model, opt, ref):
    """Trainer state, policy, optimizer and reference from a checkpoint folder, every tensor checked
    against the marker's checksums; raises CheckpointDamaged (on every rank) when anything does not match."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import set_state_dict
    marker = read_marker(path) or {}
    mine = os.path.join(path, f"trainer_rank{ctx.rank}.pt")  # absent when resuming on more ranks than saved
    state, err = None, None
    try:
        state = torch.load(mine if os.path.exists(mine) else os.path.join(path, "trainer_rank0.pt"), weights_only=True)
        if not isinstance(state, dict) or not {"step", "stage", "data_pos", "bad_steps", "rng"} <= set(state):
            raise ValueError(f"not a trainer state: {str(state)[:100]}")
    except Exception as e:
        err = e
    agree(err, ctx, False)  # every rank enters DCP's collective load, or none does
    payload = train_payload(model, opt, ref, state["stage"])
    touched_ref = "ref" in payload  # the load writes into the live tensors
    try:
        dcp(load, payload, path, ctx)
    except Exception as e:  # DCP reports a failure on one rank to all of them
        err = e
    agree(err, ctx, touched_ref)
    sums = tensor_sums(payload, ctx)
    expected = marker.get("tensor_sums", {})
    bad = sorted(k for k in set(sums) | set(expected) if sums.get(k) != expected.get(k))
    if bad:
        raise CheckpointDamaged(f"{len(bad)} tensor(s) do not match their checksums, first {bad[0]}", touched_ref)
    set_state_dict(model, opt, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
    if "ref" in payload:
        ref.load_state_dict(payload["ref"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state

# -----------------------------------------------------------------------------
# The run folder: what it holds, and what a run may do with it


def run_evidence(out_dir):
    """What makes out_dir hold a run, in words ([] = nothing: a new folder, or only prepared inputs)."""
    found = []
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        with open(metrics, "rb") as f:
            found.append(f"metrics.jsonl ({sum(1 for _ in f)} lines)")
    ckpt = os.path.join(out_dir, "ckpt")
    if os.path.exists(ckpt) and not os.path.isdir(ckpt):
        found.append("ckpt (not a folder)")
    elif os.path.isdir(ckpt) and os.listdir(ckpt):
        names = sorted(os.listdir(ckpt))
        found.append(f"ckpt/ ({', '.join(names[-3:])}{', ...' if len(names) > 3 else ''})")
    if os.path.exists(os.path.join(out_dir, "hf")):
        found.append("hf/ (an export)")
    return found


def last_logged_step(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return -1
    with open(path) as f:
        return max((logged_step(line) for line in f), default=-1)


def never_checkpointed(out_dir, cfg):
    """A run killed before its first checkpoint was sealed: no export, no folder in ckpt/ that was ever
    sealed (damaged ones moved aside included; an empty step_N someone made does not count), and no logged
    step after the first checkpoint was due. Restarting it from step 0 is what resuming means for it."""
    ckpt = os.path.join(out_dir, "ckpt")
    if os.path.exists(os.path.join(out_dir, "hf")) or (os.path.exists(ckpt) and not os.path.isdir(ckpt)):
        return False
    if os.path.isdir(ckpt) and any(os.path.exists(os.path.join(ckpt, d, MARKER)) for d in os.listdir(ckpt)):
        return False
    return last_logged_step(out_dir) < cfg.ckpt_interval


def prepare_out_dir(cfg, ctx, say=print):
    """Apply the run-folder rules (module docstring): [] for a fresh start, else the checkpoints to try,
    newest first (the first has passed the file checks). Rank 0 decides and acts; every rank gets the same
    answer, or the same RunFolderError."""
    decision = None
    if ctx.rank == 0:
        try:
            decision = ("ok", decide(cfg, say))
        except RunFolderError as e:
            decision = ("refused", str(e))
    kind, value = D.broadcast_object(decision, ctx)
    if kind == "refused":
        raise RunFolderError(value)
    D.barrier(ctx)
    return value


def decide(cfg, say):
    out = cfg.out_dir
    evidence = run_evidence(out)
    os.makedirs(out, exist_ok=True)
    if cfg.overwrite:
        if evidence:
            discard_run(out)
            say(f"--overwrite: deleted the earlier run in {out} ({'; '.join(evidence)})")
        return []
    if not cfg.resume:
        if evidence:
            raise RunFolderError(
                f"{out} already holds a run ({'; '.join(evidence)}); nothing was changed. To continue it: --resume. "
                f"To start a new run: another --out_dir. To delete it and start again: --overwrite")
        return []
    found, notes = [], []
    for _, path in reversed(step_dirs(out)):
        if not os.path.exists(os.path.join(path, MARKER)):
            notes.append(f"{path}: not a finished checkpoint (no {MARKER}); ignored")
        elif found:
            found.append(path)  # older ones: checked only if the newer ones fail to load
        elif problems := file_problems(path):
            notes.append(f"{path}: damaged ({'; '.join(problems[:3])}); moved to {move_aside(path, 'damaged')}")
        else:
            found.append(path)
    for n in notes:
        say(f"--resume: {n}")
    clean_unfinished(out)
    if found:
        return found
    if not evidence:
        say(f"--resume: {out} holds no run yet; starting a new one")
        return []
    if never_checkpointed(out, cfg):
        say(f"--resume: {out} holds a run that never finished a checkpoint ({'; '.join(evidence)}); "
            "starting it again from step 0")
        return []
    raise RunFolderError(
        f"--resume: {out} holds a run ({'; '.join(evidence)}) but no complete checkpoint to resume from"
        + (": " + " | ".join(notes) if notes else "") + ". Nothing was deleted. If ckpt/ was moved or is not "
        "mounted, put it back; to start again from step 0: --overwrite (deletes the old run) or another --out_dir")


def clean_unfinished(out_dir):
    """Checkpoint writes and deletions a kill cut short (step_N.tmp, step_N.deleting) only take space."""
    root = os.path.join(out_dir, "ckpt")
    for d in os.listdir(root) if os.path.isdir(root) else []:
        name, _, suffix = d.rpartition(".")
        if suffix in ("tmp", "deleting") and STEP_DIR.fullmatch(name):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def discard_run(out_dir):
    """--overwrite: the old run's files, and only those (prepared inputs and anything else stay)."""
    for name in ("metrics.jsonl", "metrics.png"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in ["ckpt", "hf"] + [d for d in os.listdir(out_dir) if d.startswith(".tmp-hf-")]:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def resume(cfg, ctx, candidates, model, opt, ref, say=print):
    """(path, trainer state) of the newest checkpoint that loads whole; each damaged one is reported,
    moved aside and skipped."""
    touched_ref = False
    for i, path in enumerate(candidates):  # the first passed prepare_out_dir's file checks already
        problems = D.broadcast_object(file_problems(path) if ctx.rank == 0 and i > 0 else [], ctx)
        if not problems:
            try:
                return path, checked_stage(load_checkpoint(path, ctx, model, opt, ref), touched_ref, path)
            except CheckpointDamaged as e:
                problems, touched_ref = [str(e)], touched_ref or e.touched_ref
        if ctx.rank == 0:
            say(f"--resume: {path}: damaged ({'; '.join(problems[:3])}); moved to {move_aside(path, 'damaged')}")
        D.barrier(ctx)
    raise RunFolderError(f"--resume: no checkpoint in {cfg.out_dir}/ckpt loads intact (each was moved aside as "
                         "damaged; see above). Nothing else was changed; to start again: --overwrite or another --out_dir")


def checked_stage(state, touched_ref, path):
    if touched_ref and state["stage"] == 0:
        # a damaged later-stage checkpoint was loaded into the reference, which stage 0 takes from init_from
        raise RunFolderError(f"--resume: the damaged checkpoint(s) are moved aside; run again with --resume to "
                             f"continue from {path}")
    return state

# -----------------------------------------------------------------------------
# metrics.jsonl on resume


def truncate_log(path, step):
    """A fresh run starts an empty log; a resumed one keeps the steps before its checkpoint, so that the
    steps it runs again appear once."""
    rows = []
    if step and os.path.exists(path):
        with open(path) as f:
            rows = [line.rstrip("\n") + "\n" for line in f if -1 < logged_step(line) < step]
    with open(path + ".tmp", "w") as f:  # the old log stays whole until the new one is
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def logged_step(line):
    try:
        step = json.loads(line).get("step", -1)
    except (ValueError, AttributeError):  # a line the kill cut short
        return -1
    return step if isinstance(step, int) and not isinstance(step, bool) else -1
