"""
Packing for the update: a step's samples -> mini-batches (whole groups, or the ones DeepScaleR's verl made
on its GPUs, for loss_agg="deepscaler") -> this rank's micro-batches of at most token_budget tokens
(prompt + response back to back, positions restarting per sequence), balanced across ranks.
"""
import math
from dataclasses import dataclass

import torch
from torch.distributed import ReduceOp

import distributed as D
import grpo
import model as M

@dataclass
class Micro:
    input_ids: torch.Tensor   # [N] prompt + response of each sequence, without its last token
    positions: torch.Tensor   # [N] restart at 0 for each sequence
    meta: M.Varlen
    targets: torch.Tensor     # [N] the next token
    mask: torch.Tensor        # [N] 1 where the target is a response token (EOS included)
    engine_logp: torch.Tensor  # [N] the engine's sampled log-probs at those targets
    samples: list             # the Samples inside, in order
    adv: torch.Tensor = None  # [N] filled once rewards are in
    old_logp: torch.Tensor = None  # [N] None: on-policy (the first mini-batch of a step)
    ref_logp: torch.Tensor = None  # [N] None: no KL term
    segments: torch.Tensor = None  # [N] each token's verl micro-batch (loss_agg="deepscaler")
    num_segments: int = 1
    loss_mask: torch.Tensor = None  # [N] mask less the tokens masked importance sampling drops

def pack(samples, budget, overlong_filter, device):
    """Greedy in order: a sequence that would overflow the budget starts the next micro-batch."""
    groups, cur, n = [], [], 0
    for s in samples:
        length = len(s.prompt) + len(s.response) - 1
        if cur and n + length > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += length
    if cur:
        groups.append(cur)
    return [build_micro(g, overlong_filter, device) for g in groups]

def build_micro(samples, overlong_filter, device):
    ids, tgt, mask, elp, lens, seg = [], [], [], [], [], []
    for s in samples:
        tokens = s.prompt + s.response
        p, r = len(s.prompt), len(s.response)
        keep = 0.0 if overlong_filter and s.finish == "length" else 1.0
        ids += tokens[:-1]
        tgt += tokens[1:]
        mask += [0.0] * (p - 1) + [keep] * r
        elp += [0.0] * (p - 1) + [float(x) for x in s.engine_logp]
        lens.append(p + r - 1)
        seg += [s.segment] * (p + r - 1)
    if not samples:  # an empty micro-batch (ranks pad to the same count): one masked dummy token
        ids, tgt, mask, elp, lens, seg = [0], [0], [0.0], [0.0], [1], [0]
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    return Micro(t(ids, torch.long), positions, M.Varlen.from_seqlens(lens, device), t(tgt, torch.long),
                 t(mask, torch.float32), t(elp, torch.float32), samples, segments=t(seg, torch.long))

def fill_advantages(micro):
    # [0.0]: an empty (padding) micro-batch's one dummy token
    per_seq = torch.tensor([s.advantage for s in micro.samples] or [0.0], device=micro.mask.device)
    micro.adv = grpo.expand_to_tokens(per_seq, micro.meta.cu_seqlens.long())

def loss_agg_of(cfg):
    return "seq-mean-token-sum-norm" if cfg.dr_grpo else cfg.loss_agg

def split_mini_batches(samples, cfg, stage):
    """The step's samples (every rank's, in prompt order) -> mini-batches, the same on every rank. Whole groups
    per mini-batch; or, for loss_agg="deepscaler", the mini-batches DeepScaleR's verl made on its
    stage.deepscaler_gpus GPUs (each GPU's share cut in order; a group may span mini-batches), each sample
    marked with its verl micro-batch (segment) so that its tokens get that micro-batch's weight."""
    if loss_agg_of(cfg) == "deepscaler":
        lengths = [len(s.prompt) + len(s.response) for s in samples]  # verl's attention_mask.sum(-1)
        minis = D.deepscaler_mini_batches(lengths, stage.deepscaler_gpus, cfg.mini_batches, cfg.deepscaler_micro_tokens)
        for i, segment in (pair for mb in minis for pair in mb):
            samples[i].segment = segment
        return [[samples[i] for i, _ in mb] for mb in minis]
    groups = [samples[i:i + stage.group_size] for i in range(0, len(samples), stage.group_size)]
    per = math.ceil(len(groups) / cfg.mini_batches) if groups else 0
    return [sum(groups[i * per:(i + 1) * per], []) for i in range(cfg.mini_batches)]

def micro_batches(mini_batch, cfg, ctx):
    """This rank's micro-batches of a mini-batch: sequences dealt so that every rank gets about the same
    number of tokens (D.balance is deterministic, so the ranks agree without talking), packed, and padded
    with empty micro-batches so that every rank runs the same number (FSDP's collectives need it)."""
    num_segments = max((s.segment for s in mini_batch), default=0) + 1
    if ctx.enabled:
        parts = D.balance([len(s.prompt) + len(s.response) for s in mini_batch], ctx.world_size)
        mini_batch = [mini_batch[i] for i in parts[ctx.rank]]
    micros = pack(mini_batch, cfg.token_budget, cfg.overlong_filter, ctx.device)
    n = int(D.all_reduce(torch.tensor(len(micros), device=ctx.device), ctx, op=ReduceOp.MAX).item())
    micros += [build_micro([], cfg.overlong_filter, ctx.device) for _ in range(n - len(micros))]
    for m in micros:  # deepscaler: the mini-batch's verl micro-batches, on every rank alike
        m.num_segments = num_segments
    return micros
