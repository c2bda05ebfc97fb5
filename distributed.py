"""
Data parallelism for train.py and eval.py under torchrun: process group, a step's metrics reduced in one
sync, FSDP2 sharding, weight sync into each rank's engine, and balancing packed sequences across ranks.
One process (no WORLD_SIZE) is world 1, and every function here is then a cheap no-op, so the
single-GPU/CPU path runs the same code.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def setup(device: str | None = None) -> Dist:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU. Call it *after* creating the grading
    pool (its workers must start before CUDA/NCCL initialisation)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    d = Dist(rank, world, local_rank, torch.device(device))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60),
                                device_id=d.device if backend == "nccl" else None)
    return d


def fsdp_path(fsdp: bool, d: Dist) -> bool:
    """Whether train.py shards its models with FSDP2: under torchrun, and on a single GPU too, so that one
    GPU computes exactly as N do (bf16 parameters gathered for every layer, float32 master weights and
    gradient reduction). Without it one GPU kept a float32 residual stream under autocast while its bf16
    reference did not, and the KL was not 0 at a stage's first step. The CPU path stays plain float32."""
    return fsdp and (d.enabled or d.device.type == "cuda")


def ensure_process_group(d: Dist):
    """FSDP2 needs a process group; a single process gets a one-rank group of its own (no torchrun)."""
    if not dist.is_initialized():
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=d.device if backend == "nccl" else None)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def all_reduce(x: torch.Tensor, d: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place on x (a tensor on d.device); returns it."""
    if d.enabled:
        dist.all_reduce(x, op=op)
    return x


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_max(x: torch.Tensor, d: Dist) -> torch.Tensor:
    return all_reduce(x, d, op=dist.ReduceOp.MAX)


def broadcast_object(obj, d: Dist, src=0):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -----------------------------------------------------------------------------
# A step's metrics: summed on the device, reduced across ranks once


class Accumulator:
    """Token-weighted means of per-micro-batch metrics, and maxima/minima, kept on the device until the
    step's one sync."""

    def __init__(self, device):
        self.sums, self.weights, self.device = {}, {}, device
        self.maxes = {"logp_diff_max": torch.zeros((), device=device)}  # minima are kept as maxima of -x

    def add(self, name, value, weight):
        self.sums[name] = self.sums.get(name, 0) + value.float() * weight
        self.weights[name] = self.weights.get(name, 0) + weight

    def extreme(self, name, value, valid=True):
        """Keep the max (or, for a name ending in _min, the min) of value over the step; valid False ignores it."""
        v = value.float() if name.endswith("_max") else -value.float()
        v = torch.where(torch.as_tensor(valid, device=v.device), v, -torch.inf)
        self.maxes[name] = torch.maximum(self.maxes[name], v) if name in self.maxes else v

    def disagreement(self, trainer_logp, m):
        d = (trainer_logp.float() - m.engine_logp).abs() * m.mask
        self.add("logp_diff_mean", d.sum() / m.mask.sum().clamp(min=1), m.mask.sum())
        self.extreme("logp_diff_max", d.max())

    def result(self, ctx):
        names = sorted(self.sums)
        if not names:
            return {}
        packed = torch.stack([torch.as_tensor(self.sums[n], device=self.device).float() for n in names] +
                             [torch.as_tensor(self.weights[n], device=self.device).float() for n in names])
        packed = all_reduce(packed, ctx).tolist()
        out = {n: packed[i] / max(packed[i + len(names)], 1e-12) for i, n in enumerate(names)}
        ext = sorted(self.maxes)
        top = all_max(torch.stack([self.maxes[n].reshape(()) for n in ext]), ctx).tolist()
        out.update({n: v if n.endswith("_max") else -v for n, v in zip(ext, top)})
        if "is_weight_sq_mean" in out:  # effective sample size of the importance weights, as a fraction of n
            out["is_ess"] = out.pop("is_weight_mean") ** 2 / max(out.pop("is_weight_sq_mean"), 1e-12)
        return out


# -----------------------------------------------------------------------------
# FSDP2


def shard_model(model, d: Dist, compute_dtype=None, reshard_after_forward=True):
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head stay whole inside
    the root's forward, where token_logprobs runs). Master weights stay in the model's dtype (float32);
    compute_dtype (bf16 on GPU) is what the layers see, gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    ensure_process_group(d)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def sync_weights(src_model, dst_model):
    """Copy the policy's weights into the engine's model in place (captured CUDA graphs keep pointing at
    the same buffers). A sharded parameter is cast to the engine's dtype *before* it is gathered, one
    tensor at a time, so no full float32 copy of the model ever exists."""
    from torch.distributed.tensor import DTensor
    dst = dict(dst_model.named_parameters(remove_duplicate=False))
    for name, p in src_model.named_parameters():
        target = dst[name]
        value = p.detach()
        if isinstance(value, DTensor):
            value = value.to(target.dtype).full_tensor()
        target.copy_(value)


# -----------------------------------------------------------------------------
# Balancing the update across ranks


def balance(lengths: list[int], world_size: int) -> list[list[int]]:
    """Split sequence indices into world_size parts of near-equal token counts (longest first, each to
    the lightest part). Deterministic, so every rank computes the same split from the same lengths."""
    parts = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += lengths[i]
    return [sorted(p) for p in parts]

# -----------------------------------------------------------------------------
# verl's layout of DeepScaleR's update, reproduced so that loss_agg="deepscaler" gets its exact gradient.
# verl splits with the largest differencing method (Karmarkar-Karp); which sequences share a micro-batch
# decides each token's weight, so its tie-breaks are reproduced too (tests/data/verl_partitions.json holds
# verl's own outputs). A partial solution is k bins, heaviest first; a bin sorts by (tokens, items, its
# (index, length) pairs in insertion order).


def _bin_key(b):
    return (b[0], len(b[1]), b[1])


class _Partial:
    """k bins [tokens, [(index, length), ...]] kept heaviest first. The heap pops the widest spread first,
    then the one with the heaviest first bin."""

    def __init__(self, bins):
        self.bins = sorted(bins, key=_bin_key, reverse=True)

    def spread(self):
        return self.bins[0][0] - self.bins[-1][0]

    def __lt__(self, other):
        if self.spread() != other.spread():
            return self.spread() > other.spread()
        return _bin_key(self.bins[0]) > _bin_key(other.bins[0])

    def absorb(self, other):
        """Heaviest bin with the other's lightest, and so on down: the difference of the two solutions."""
        self.bins = sorted(([a[0] + b[0], a[1] + b[1]] for a, b in zip(self.bins, reversed(other.bins))),
                           key=_bin_key, reverse=True)


def karmarkar_karp(lengths: list[int], k: int, equal_size: bool) -> list[list[int]]:
    """verl's partition of sequence indices into k parts of near-equal total length (equal_size: the same
    number of sequences in each), heaviest part first, each part sorted. Needs len(lengths) >= k."""
    import heapq
    if k < 1 or len(lengths) < k or (equal_size and len(lengths) % k):
        raise ValueError(f"karmarkar_karp: cannot split {len(lengths)} sequences into {k} parts"
                         f"{' of equal size' if equal_size else ''}")
    ordered = sorted((n, i) for i, n in enumerate(lengths))
    if equal_size:  # k consecutive lengths (shortest first) seed one partial solution each
        seeds = [ordered[o:o + k] for o in range(0, len(ordered), k)]
    else:
        seeds = [[item] for item in ordered]
    heap = []
    for seed in seeds:
        bins = [[n, [(i, n)]] for n, i in seed] + [[0, []] for _ in range(k - len(seed))]
        heapq.heappush(heap, _Partial(bins))
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        a.absorb(b)
        heapq.heappush(heap, a)
    return [sorted(i for i, _ in b[1]) for b in heap[0].bins]


def deepscaler_layout(lengths: list[int], gpus: int, mini_batches: int, micro_tokens: int) -> list[list[list[list[int]]]]:
    """How DeepScaleR's verl cut one step's batch (sequence lengths, prompt + response) on `gpus` GPUs:
    layout[k][g] = GPU g's micro-batches (lists of sequence indices) in mini-batch k.

    The batch is first dealt into equal-size, length-balanced shares, one per GPU (ray_trainer's
    _balance_batch; a group may be spread over several GPUs); each GPU cuts its share (indices ascending)
    into `mini_batches` consecutive mini-batches; each mini-batch is split into ceil(tokens / micro_tokens)
    length-balanced micro-batches, that count being the maximum over the GPUs (seqlen_balancing's
    rearrange_micro_batches)."""
    n = len(lengths)
    if n == 0 or n % (gpus * mini_batches):
        raise ValueError(f"deepscaler_layout: {n} sequences do not split into {gpus} GPUs x {mini_batches} "
                         "mini-batches of equal size (as verl requires)")
    per = n // gpus // mini_batches
    shares = karmarkar_karp(lengths, gpus, equal_size=True)
    layout = []
    for k in range(mini_batches):
        chunks = [share[k * per:(k + 1) * per] for share in shares]
        count = max(-(-sum(lengths[i] for i in c) // micro_tokens) for c in chunks)
        if count > per:
            raise ValueError(f"deepscaler_layout: {count} micro-batches of <= {micro_tokens} tokens for {per} "
                             "sequences (verl would stop here): raise deepscaler_micro_tokens")
        layout.append([[[c[j] for j in part] for part in karmarkar_karp([lengths[i] for i in c], count, False)]
                       for c in chunks])
    return layout


def deepscaler_mini_batches(lengths, gpus, mini_batches, micro_tokens):
    """deepscaler_layout as mini-batches of (sequence index, segment) pairs: segment numbers the mini-batch's
    verl micro-batches over all its GPUs, since each one's tokens share a weight in the loss."""
    out = []
    for per_gpu in deepscaler_layout(lengths, gpus, mini_batches, micro_tokens):
        micros = [mb for gpu in per_gpu for mb in gpu]
        out.append([(i, j) for j, mb in enumerate(micros) for i in mb])
    return out
