"""
GRPO the DeepScaleR way, in one file that reads top to bottom.

usage: python train.py [CONFIG.py ...] [--key=value ...]     (torchrun --nproc_per_node=N train.py ...: N GPUs)
       python train.py --plot=OUT_DIR (or --plot OUT_DIR)     (OUT_DIR/metrics.png; needs matplotlib)
       python train.py -h | --help                            (this, then every field)

    python train.py config/demo.py                        # the CPU demo (minutes, 2 cores)
    python train.py config/deepscaler_1.5b.py --init_from=/path/to/DeepSeek-R1-Distill-Qwen-1.5B

Arguments apply in order; every field is checked before anything loads (configurator.py). A CONFIG.py is
Python that edits `config`, a TrainConfig whose defaults are the published recipe (`config.lr = 1e-5`); names
it sets that are not fields are refused, so helper variables start with _. --key=value takes a Python literal
(str fields: the text as typed; bools: true/false, a bare --flag is true). A folder that holds a run is
refused unless --resume (continue it; a new folder starts fresh) or --overwrite (delete it): README,
"Resuming and recovering".

Each step:
  1. take the step's prompts (shuffled by seed; this rank's share, whole groups only);
  2. roll out `group_size` answers each with the Engine on the current weights;
  3. grade them with the batch Grader, in a thread while the reference/old log-prob passes run;
  4. group-normalised advantages; then per mini-batch (2 per step in the recipe): pack the sequences into
     micro-batches of at most `token_budget` tokens, compute log-probs inside the model's forward
     (memory-flat), and take one clipped-surrogate optimizer step. The first mini-batch of a step is
     exactly on-policy, so its old log-probs are the current ones and that pass is skipped;
  5. copy the new weights into the engine, log one JSONL row, checkpoint (checkpoint.py) / validate now and then.
World size is a variable throughout: rank and world size come from torchrun's environment and
torch.distributed is initialised only when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA).
"""
import copy
import functools
import importlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import checkpoint as C
import distributed as D
import eval as E
import grpo
import memory
import model as M
import tokenizer as TK
from checkpoint import ckpt_dirs, load_checkpoint, logged_step, save_checkpoint, truncate_log  # noqa: F401
from configurator import ConfigError, check_fields, configure, help_text
from loggers import Mirrors
from packing import fill_advantages, loss_agg_of, micro_batches, pack, split_mini_batches  # noqa: F401 (pack: tests)

# -----------------------------------------------------------------------------
# Config

@dataclass
class Stage:
    """One context-length stage: at its start the reference becomes the current weights and the
    optimizer resets (DeepScaleR's 8K -> 16K -> 24K)."""
    steps: int                       # training steps in this stage [x >= 1]
    max_response_tokens: int = 8192  # longest rollout answer, in tokens [x >= 1]
    group_size: int = 8              # answers sampled per prompt; advantages are normalised within a group [x >= 1]
    deepscaler_gpus: int = 8         # GPUs DeepScaleR ran this stage on (8 for 8K, 32 for 16K/24K): the layout loss_agg="deepscaler" reproduces [x >= 1]

@dataclass
class TrainConfig:
    # one line per field, `name: type = default  # meaning for --help [optional check on x]` (configurator.py)
    # inputs and outputs
    init_from: str = ""              # HF checkpoint folder: the policy and the first reference start here
    train_data: str = ""             # DeepScaleR JSON list, JSONL, or parquet (problem, answer[, solution])
    val_data: str = ""               # comma-separated eval files for periodic validation ("" = none)
    out_dir: str = "out/run"         # one run per folder: metrics.jsonl, ckpt/, hf/ [x.strip() != ""]
    prepare: str = ""                # "module:function" that builds inputs before loading (the demo's)
    prepare_args: dict = field(default_factory=dict)  # keyword arguments for `prepare`
    # data
    prompts_per_step: int = 128      # prompts per step, all ranks together (DeepScaleR's train_batch_size) [x >= 1]
    max_prompt_tokens: int = 1024    # longer prompts are dropped (and counted) [x >= 1]
    instruction: str = TK.MATH_INSTRUCTION  # appended to every problem in the prompt ("" = none)
    # rollout
    stages: list[Stage] = field(default_factory=lambda: [Stage(1040, 8192, 8)])  # run in order; written --stages="[(steps, max_response_tokens, group_size), ...]" [len(x) >= 1]
    temperature: float = 0.6         # rollout sampling temperature; the update's log-probs use it too [x > 0]
    top_p: float = 1.0               # nucleus sampling mass (1 = off) [0 < x <= 1]
    top_k: int = -1                  # sample among the k likeliest tokens (-1 = off) [x == -1 or x >= 1]
    require_think: bool = True       # grade only what follows </think>
    think_split: str = "last"        # answer after the last </think>; "first": DeepScaleR's rule (README "Differences") [x in ("last", "first")]
    # update
    mini_batches: int = 2            # optimizer steps per training step, each on a share of the step's groups [x >= 1]
    token_budget: int = 32768        # tokens per micro-batch (per GPU) [x >= 1]
    lr: float = 1e-6                 # AdamW learning rate [x >= 0]
    warmup_steps: int = 0            # linear warm-up from lr/warmup (never 0: DeepScaleR's step 0 ran at lr 0) [x >= 0]
    weight_decay: float = 0.01       # AdamW decoupled weight decay [x >= 0]
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates [all(0 <= b < 1 for b in x)]
    grad_clip: float = 1.0           # the global gradient norm is clipped to this [x > 0]
    clip_eps: float = 0.2            # PPO ratio clip: the ratio is kept within 1 +- clip_eps [x > 0]
    kl_coef: float = 0.001           # k3 estimator; 0 skips the reference model entirely [x >= 0]
    entropy_coef: float = 0.001      # weight of the entropy bonus (0 = none)
    loss_agg: str = "token-mean"     # how token losses are weighted (grpo.LOSS_AGGS; README "The loss"); "deepscaler" is DeepScaleR's exact gradient [x in grpo.LOSS_AGGS or x in grpo.RENAMED_AGGS]
    deepscaler_micro_tokens: int = 32768  # verl's ppo_max_token_len_per_gpu, for loss_agg="deepscaler" only [x >= 1]
    objective: str = "grpo"          # "grpo" (per-token PPO clip), "gspo" (per-sequence ratio), "cispo" [x in grpo.OBJECTIVES]
    # the rollout/trainer gap, against the engine's sampled log-probs (needs top_p = 1, no top_k)
    tis_c: float | None = None       # truncated IS: pg loss weighted by min(pi_old / pi_rollout, C), e.g. 2.0 [x > 1]
    mis_c: float | None = None       # masked IS: drop tokens (or answers) with the ratio outside [1/C, C] [x > 1]
    mis_level: str = "token"         # masked IS per "token" or per "sequence" (length-normalised ratio of the answer) [x in ("token", "sequence")]
    # the newer variants people ask for (all off in DeepScaleR's recipe)
    clip_eps_high: float | None = None  # DAPO clip-higher (0.28) [x > 0]
    dual_clip_c: float | None = None    # dual-clip bound on negative-advantage losses [x > 1]
    dynamic_sampling: bool = False   # DAPO: drop all-equal groups, refill from the next prompts
    max_sampling_rounds: int = 4     # dynamic sampling: most rollout rounds per step [x >= 1]
    overlong_filter: bool = False    # DAPO: truncated answers get no loss (default: graded like any other)
    dr_grpo: bool = False            # Dr. GRPO: no std scaling, token sums over the generation budget
    shuffle_advantages: bool = False  # control experiment: advantages permuted across samples
    # engine
    engine_dtype: str = "auto"       # bfloat16 on CUDA, float32 on CPU [x == "auto" or x in M.DTYPES]
    engine_memory: float | None = None  # KV-cache bytes (None: measured at start-up, memory.py) [x > 0]
    engine_max_num_seqs: int = 256   # most sequences the engine decodes at once [x >= 1]
    engine_kernel_fallback: bool = False  # CUDA: a failed kernel self-check runs the PyTorch twins (metric kernel_fallback), not an error
    memory_margin_gb: float = 4.0    # GPU memory the measured plan keeps free beyond its probe (memory.py) [x >= 0]
    # system
    device: str = "auto"             # auto (CUDA if present), cpu, cuda [x == "auto" or x.startswith(("cpu", "cuda"))]
    compute_dtype: str = "bfloat16"  # autocast dtype on CUDA; master weights stay float32 [x in M.DTYPES]
    gradient_checkpointing: bool = True  # recompute each layer in backward (less activation memory)
    fsdp: bool = True                # FSDP2 under torchrun and on one GPU (False: replicate, all-reduce gradients)
    seed: int = 0                    # data order, sampling and initial RNG state
    threads: int = 0                 # torch CPU threads (0: torch's default) [x >= 0]
    # bookkeeping
    max_steps: int = 0               # stop early (0 = run every stage); the schedule does not depend on it [x >= 0]
    log_interval: int = 1            # console line every this many steps (metrics.jsonl gets every step) [x >= 1]
    tensorboard: bool = False        # also send each metrics row to TensorBoard, in out_dir/tb (loggers.py)
    wandb: bool = False              # also send each metrics row to W&B (WANDB_MODE=offline needs no network)
    ckpt_interval: int = 20          # checkpoint every this many steps, and at the end [x >= 1]
    keep_last: int = 3               # complete checkpoints kept (older ones are deleted) [x >= 1]
    export_hf: bool = True           # with each checkpoint, an HF-layout export of the policy in out_dir/hf
    eval_interval: int = 0           # validate every this many steps (0 = no periodic validation) [x >= 0]
    val_n: int = 8                   # validation samples per problem [x >= 1]
    val_max_tokens: int = 0          # validation answer length (0 = the stage's max_response_tokens) [x >= 0]
    max_bad_steps: int = 3           # consecutive non-finite updates before the run stops [x >= 1]
    grader_workers: int | None = None  # grading worker processes (None: up to 8, one per core) [x >= 1]
    grader_timeout: float = 10.0     # seconds per answer before the grader gives up on it [x > 0]
    resume: bool = False             # continue out_dir's run from its newest complete checkpoint (none yet: start)
    overwrite: bool = False          # delete out_dir's earlier run (metrics.jsonl/.png, ckpt/, hf/) and start afresh
    stop_at_step: int = 0            # testing: exit after this many steps, no checkpoint (a simulated kill) [x >= 0]

    def total_steps(self):
        return sum(s.steps for s in self.stages)

    def stage_at(self, step):
        """(stage index, Stage) for a 0-based step (past the schedule: the last stage)."""
        i = 0
        while i + 1 < len(self.stages) and step >= self.stage_start(i + 1):
            i += 1
        return i, self.stages[i]

    def stage_start(self, index):
        return sum(s.steps for s in self.stages[:index])

def load_config(argv):
    """Config files (Python that edits `config`) and --key=value overrides, in order; every field is then
    checked against its type and range (configurator.py), before anything loads."""
    return check_config(configure(TrainConfig(), argv, Stage=Stage, TrainConfig=TrainConfig))

def check_config(cfg):
    """The field table's checks (again, for configs built in code) and the rules that join two fields."""
    if check_fields(cfg).prompts_per_step % cfg.mini_batches:
        raise ConfigError(f"prompts_per_step ({cfg.prompts_per_step}) must split into {cfg.mini_batches} mini-batches")
    check_objective(cfg)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues out_dir's run and --overwrite deletes it: choose one")
    return cfg

# -----------------------------------------------------------------------------
# Data: rows -> (prompt ids, gold answer), a seeded order, and a position saved with each checkpoint

def load_rows(path):
    """A JSON list, JSONL or parquet file -> its rows (encode_rows decides which are usable)."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        with open(path) as f:
            rows = [json_or_none(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    except ImportError:
        raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to JSON")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read training data ({e})") from e
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: expected a list of objects with 'problem' and 'answer'")
    return rows

def json_or_none(line):
    try:
        return json.loads(line)
    except ValueError:
        return None  # a malformed JSONL row: encode_rows drops and counts it

def usable_answer(row):
    """eval.py's reading of the answer (so training and validation agree on a gold), else the solution's
    boxed answer."""
    golds = E.dataset_golds(row.get("answer"))
    if golds:
        return golds[0]
    if isinstance(row.get("solution"), str):
        from reward import extract_answer
        return extract_answer(row["solution"], require_think=False)
    return None

def prompt_limit(cfg, engine):
    """The longest prompt kept: max_prompt_tokens, less where the model's positions leave no room to answer."""
    return min(cfg.max_prompt_tokens, engine.max_model_len - 1)

def encode_rows(rows, tok, cfg, source, limit=None):
    """(prompt ids, gold) for usable rows; counts of what was dropped, so the user sees it. A row that is
    not an object counts as one without a problem: a malformed row is never a crash. Prompts longer than
    limit (default max_prompt_tokens) count as too long."""
    limit = limit or cfg.max_prompt_tokens
    items, counts = [], {"rows": len(rows), "no_problem": 0, "no_answer": 0, "too_long": 0}
    for r in rows:
        r = r if isinstance(r, dict) else {}
        problem, gold = r.get("problem"), usable_answer(r)
        if not isinstance(problem, str) or not problem.strip():
            counts["no_problem"] += 1
            continue
        if gold is None:
            counts["no_answer"] += 1
            continue
        ids = tok.encode(tok.chat_prompt(problem, instruction=cfg.instruction))
        if len(ids) > limit:
            counts["too_long"] += 1
            continue
        items.append((ids, gold))
    if not items:
        raise SystemExit(f"{source}: no usable rows ({counts})")
    return items, counts

class PromptStream:
    """An endless seeded shuffle: epoch e is randperm(seed + e); `pos` counts prompts consumed so far."""

    def __init__(self, items, seed, pos=0):
        self.items, self.seed, self.pos = items, seed, pos
        self._epoch, self._order = None, None

    def take(self, k):
        out = []
        for _ in range(k):
            epoch, i = divmod(self.pos, len(self.items))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(len(self.items), generator=g).tolist()
            out.append(self.items[self._order[i]])
            self.pos += 1
        return out

# -----------------------------------------------------------------------------
# Rollout: generate, grade, keep (dynamic sampling), advantages

@dataclass
class Sample:
    prompt: list
    response: list
    engine_logp: list
    finish: str
    gold: str
    reward: float = 0.0
    advantage: float = 0.0
    segment: int = 0          # loss_agg="deepscaler": its verl micro-batch within its mini-batch

def generate(engine, tok, batch, cfg, stage, seed, first_prompt_index):
    comps = engine.generate([p for p, _ in batch], max_new_tokens=stage.max_response_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            n=stage.group_size, seed=seed, stop_token_ids=tok.eos_token_ids,
                            first_prompt_index=first_prompt_index)
    return [Sample(batch[i // stage.group_size][0], list(c.token_ids), list(c.logprobs), c.finish_reason,
                   batch[i // stage.group_size][1]) for i, c in enumerate(comps)]

def grade(grader, tok, samples, cfg):
    eos = set(tok.eos_token_ids)
    texts = [tok.decode(s.response[:-1] if s.response and s.response[-1] in eos else s.response) for s in samples]
    if cfg.think_split == "first":  # DeepScaleR graded prompt + response: a <think> in the prompt counts
        texts = [tok.decode(s.prompt) + t for s, t in zip(samples, texts)]
    return grader.grade(texts, [s.gold for s in samples], require_think=cfg.require_think, think_split=cfg.think_split)

def rollout_seed(cfg, step, rnd):
    """The same on every rank: the engine keys each draw by the prompt's global index instead, so the
    samples do not depend on how many ranks share the step."""
    return (cfg.seed * 1_000_003 + step * 1009 + rnd) * 131

def collect(engine, grader, tok, data, cfg, stage, step, ctx, pool):
    """This rank's samples for the step (prompt-major, group after group) and a future of their rewards.
    With dynamic sampling, groups whose answers all got the same reward (zero advantage: no signal) are
    dropped and refilled from the next prompts, for at most max_sampling_rounds rounds."""
    share, g = cfg.prompts_per_step // ctx.world_size, stage.group_size
    kept, dropped, rnd = [], 0, 0
    while True:
        batch = data.take(cfg.prompts_per_step)[ctx.rank * share:(ctx.rank + 1) * share]
        samples = generate(engine, tok, batch, cfg, stage, rollout_seed(cfg, step, rnd), ctx.rank * share)
        if not cfg.dynamic_sampling:
            return samples, pool.submit(grade, grader, tok, samples, cfg), {}
        for s, r in zip(samples, grade(grader, tok, samples, cfg)):
            s.reward = float(r)
        for i in range(0, len(samples), g):
            group = samples[i:i + g]
            if len({s.reward for s in group}) > 1:
                kept += group
            else:
                dropped += 1
        rnd += 1
        # every rank takes the same prompts per round, so all ranks must agree on when to stop
        short = D.all_max(torch.tensor(float(len(kept) < share * g), device=ctx.device), ctx)
        if short.item() == 0 or rnd >= cfg.max_sampling_rounds:
            break
    kept = kept[:share * g]
    done = pool.submit(lambda: [s.reward for s in kept])
    return kept, done, {"dropped_groups": dropped, "sampling_rounds": rnd}

def set_advantages(samples, rewards, cfg, stage, step):
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = grpo.group_advantages(r, stage.group_size, scale_by_std=not cfg.dr_grpo) if len(r) else r
    if cfg.shuffle_advantages:  # same values, no relation to the answers they are attached to
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        adv = adv[torch.randperm(len(adv), generator=g)]
    for s, rew, a in zip(samples, rewards, adv.tolist()):
        s.reward, s.advantage = float(rew), a

# -----------------------------------------------------------------------------
# The update's batches (packing.py) come from every rank's samples

def gather_samples(samples, ctx):
    """Every rank's samples, rank after rank (= the step's global prompt order, groups intact)."""
    if not ctx.enabled:
        return samples
    parts = D.all_gather_objects([(s.prompt, s.response, s.engine_logp, s.finish, s.gold, s.reward) for s in samples], ctx)
    return [Sample(*fields) for part in parts for fields in part]

# -----------------------------------------------------------------------------
# Log-probs and the update

def autocast(cfg, ctx):
    if ctx.device.type == "cuda" and cfg.compute_dtype != "float32":
        return torch.autocast("cuda", dtype=M.DTYPES[cfg.compute_dtype])
    return torch.autocast("cpu", enabled=False)

@torch.no_grad()
def logprobs(model, micro, cfg, ctx):
    with autocast(cfg, ctx):
        return model(micro.input_ids, micro.positions, micro.meta, targets=micro.targets,
                     temperature=cfg.temperature).float()

def check_objective(cfg):
    """The loss switches, checked when the config is read (SystemExit names the field)."""
    try:
        grpo.check_options(cfg.loss_agg, cfg.objective, cfg.tis_c, cfg.mis_c, cfg.mis_level, cfg.top_p, cfg.top_k)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if cfg.loss_agg == "deepscaler" and (cfg.dr_grpo or cfg.dynamic_sampling):
        raise SystemExit("loss_agg='deepscaler' reproduces DeepScaleR's verl layout, which had neither dr_grpo "
                         "(its own aggregation) nor dynamic_sampling (a batch of varying size)")
    for i, st in enumerate(cfg.stages if cfg.loss_agg == "deepscaler" else []):
        if (cfg.prompts_per_step * st.group_size) % (st.deepscaler_gpus * cfg.mini_batches):
            raise SystemExit(f"stages[{i}]: {cfg.prompts_per_step * st.group_size} samples per step do not split "
                             f"into deepscaler_gpus={st.deepscaler_gpus} x mini_batches={cfg.mini_batches} equal "
                             "shares (loss_agg='deepscaler' emulates verl's)")

def prepare_corrections(model, micros, cfg, ctx, acc):
    """Masked importance sampling needs pi_old for every token before the update (the normaliser counts only
    the tokens it keeps), so the on-policy first mini-batch gets a no-grad pass too; elsewhere loss_mask is
    the mask."""
    for m in micros:
        m.loss_mask = m.mask
        if not cfg.mis_c:
            continue
        if m.old_logp is None:
            m.old_logp = logprobs(model, m, cfg, ctx)
            acc.disagreement(m.old_logp, m)
        m.loss_mask = grpo.mis_keep(m.old_logp, m.engine_logp, m.mask, cfg.mis_c, cfg.mis_level,
                                    m.meta.cu_seqlens.long())
        n = m.mask.sum()
        acc.add("is_masked_frac", (n - m.loss_mask.sum()) / n.clamp(min=1), n)

def train_mini_batch(model, opt, micros, cfg, stage, ctx, acc):
    """One optimizer step over a mini-batch. The loss is normalised by the global count (tokens, or
    sequences for seq-mean aggregations, or each verl micro-batch's tokens for "deepscaler") over all
    micro-batches and ranks, so N ranks equal 1 rank (except "mean-of-micro-batch-means", which depends on
    the packing by definition)."""
    agg = loss_agg_of(cfg)
    prepare_corrections(model, micros, cfg, ctx, acc)
    norm = D.all_reduce(sum(grpo.loss_normaliser(m.loss_mask, agg, m.meta.cu_seqlens.long(), m.segments,
                                                 m.num_segments) for m in micros), ctx)
    if agg == "deepscaler":  # FSDP averaged DeepScaleR's gradients over its GPUs
        norm = norm * stage.deepscaler_gpus
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=ctx.device)
    for m in micros:
        with autocast(cfg, ctx):
            logp, ent = model(m.input_ids, m.positions, m.meta, targets=m.targets, temperature=cfg.temperature,
                              return_entropy=True)
        old = m.old_logp if m.old_logp is not None else logp.detach()
        is_w, is_met = grpo.is_weights(old, m.engine_logp, m.loss_mask, cfg.tis_c)
        loss, met = grpo.policy_loss(
            logp, m.old_logp, m.ref_logp, m.adv, m.loss_mask, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
            entropy=ent if cfg.entropy_coef else None, entropy_coef=cfg.entropy_coef,
            clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c, loss_agg=agg, normaliser=norm,
            max_len=stage.max_response_tokens, cu_seqlens=m.meta.cu_seqlens.long(), segments=m.segments,
            num_segments=m.num_segments, objective=cfg.objective, is_weight=is_w)
        # gradients are averaged over ranks (DDP/FSDP convention): scale back up to the global sum
        (loss * ctx.world_size).backward()
        loss_sum += loss.detach()
        for name in ("clip_frac", "pg_loss", "kl"):  # kl is absent without a reference
            acc.add(name, met.get(name, torch.zeros(())), met["tokens"])
        acc.add("entropy", (ent.detach().float() * m.mask).sum() / m.mask.sum().clamp(min=1), m.mask.sum())
        for name, value in is_met.items():
            if name in ("is_ratio_max", "is_ratio_min"):
                acc.extreme(name, value, met["tokens"] > 0)
            else:
                acc.add(name, value, met["tokens"])
        if m.old_logp is None:  # on-policy: this forward is the trainer's recomputation of the engine's
            acc.disagreement(logp.detach(), m)
    sync_grads(model, ctx)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced over ranks
        grad_norm = grad_norm.full_tensor()
    bad = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).float()
    ok = not D.all_max(bad, ctx).item()  # every rank steps, or none does
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok, float(grad_norm)

def sync_grads(model, ctx):
    """Plain data parallelism: average gradients over ranks. (An FSDP-wrapped model reduces its own.)"""
    if ctx.world_size == 1 or getattr(model, "reduces_own_grads", False):
        return
    for p in model.parameters():
        if p.grad is not None:
            D.all_reduce(p.grad, ctx)
            p.grad.div_(ctx.world_size)

# -----------------------------------------------------------------------------
# The loop, its log (metrics.jsonl; the plot is plot.py) and its console line

def console_line(row, total, elapsed, steps_done):
    """One step's line. Steps are 0-based, as in metrics.jsonl: the last of 500 is step 499/499."""
    eta = elapsed / max(steps_done, 1) * (total - row["step"] - 1)
    return (f"step {row['step']}/{total - 1} | reward {row['reward_mean']:.3f} acc {row['accuracy']:.3f} | "
            f"len {row['response_len_mean']:.0f}/{row['response_len_max']} trunc {row['truncated_frac']:.2f} | "
            f"kl {row.get('kl', 0):.4f} ent {row.get('entropy', 0):.3f} clip {row.get('clip_frac', 0):.3f} | "
            f"dlogp {row.get('logp_diff_mean', 0):.1e} | {row['time_step']:.2f}s "
            f"({row['gen_tokens_per_s']:.0f} gen tok/s) | ETA {eta / 60:.1f}m")

class TrainingDiverged(RuntimeError):
    pass

def build(cfg, ctx):
    """Policy (float32 master weights), frozen reference, the engine's own copy of the weights, and the
    memory plan that sized the engine's KV pool: probe -> KV pool -> the engine captures its graphs."""
    from sample import Engine
    tok = TK.Tokenizer.from_pretrained(cfg.init_from)
    model = M.from_pretrained(cfg.init_from, device=ctx.device, dtype=torch.float32)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    low = M.DTYPES[cfg.compute_dtype] if ctx.device.type == "cuda" else torch.float32
    ref = (M.from_pretrained(cfg.init_from, device=ctx.device, dtype=low).eval().requires_grad_(False)
           if cfg.kl_coef else None)
    if D.fsdp_path(cfg.fsdp, ctx):
        # FSDP2 (on one GPU too: the same numerics as N): each rank keeps 1/world of the float32 master
        # weights, gradients and AdamW moments; layers compute in `low` and gradients are reduce-scattered
        # in float32. The frozen reference is sharded too.
        D.shard_model(model, ctx, compute_dtype=None if low == torch.float32 else low)
        model.reduces_own_grads = True
        if ref is not None:
            D.shard_model(ref, ctx)
    edtype = low if cfg.engine_dtype == "auto" else M.DTYPES[cfg.engine_dtype]
    engine_model = M.from_pretrained(cfg.init_from, device=ctx.device, dtype=edtype).eval().requires_grad_(False)
    # a model with fewer positions than the schedule asks for (the demo's 256) answers up to its last one,
    # as sample.py and eval.py do; prompts are then held to leave it at least one
    max_len = min(cfg.max_prompt_tokens + max(s.max_response_tokens for s in cfg.stages),
                  engine_model.config.max_position_embeddings)
    make_engine = functools.partial(Engine, engine_model, max_model_len=max_len, max_num_seqs=cfg.engine_max_num_seqs,
                                    vocab_limit=tok.vocab_size, eos_token_ids=tok.eos_token_ids,
                                    allow_kernel_fallback=cfg.engine_kernel_fallback)
    plan = memory.plan_for_training(cfg, ctx, model, ref, engine_model, make_engine, max_len,
                                    functools.partial(autocast, cfg, ctx), functools.partial(make_optimizer, cfg=cfg))
    engine = make_engine(memory_budget=plan.kv_bytes)
    plan.engine_built(engine)
    if ctx.rank == 0:
        print(plan.text(), flush=True)
    return tok, model, ref, engine, plan

def make_optimizer(model, cfg):
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

def rollout_stats(samples, rewards, group_size, ctx):
    """Global (all-rank) reward / length / group statistics of the step's samples."""
    n_groups = len(samples) // group_size if group_size else 0
    groups = [rewards[i * group_size:(i + 1) * group_size] for i in range(n_groups)]
    lens = [len(s.response) for s in samples]
    t = torch.tensor([sum(rewards), sum(r >= 1.0 for r in rewards), len(samples), sum(lens),
                      sum(s.finish == "length" for s in samples), sum(min(g) >= 1.0 for g in groups),
                      sum(max(g) <= 0.0 for g in groups), n_groups], dtype=torch.float64, device=ctx.device)
    t = D.all_reduce(t, ctx).tolist()
    mx = int(D.all_max(torch.tensor(max(lens, default=0), device=ctx.device), ctx).item())
    n, g = max(t[2], 1), max(t[7], 1)
    return {"reward_mean": t[0] / n, "accuracy": t[1] / n, "samples": int(t[2]), "response_len_mean": t[3] / n,
            "response_len_max": mx, "gen_tokens": int(t[3]), "truncated_frac": t[4] / n,
            "all_correct_frac": t[5] / g, "all_wrong_frac": t[6] / g}

def validate(cfg, ctx, engine, tok, grader, stage, step):
    """Periodic validation through eval.py's own code (its prompts, grading and pass@1)."""
    datasets = {os.path.splitext(os.path.basename(p))[0]: E.load_dataset(p)[0] for p in cfg.val_data.split(",") if p}
    vtok = copy.copy(tok)  # eval.py's prompts with this recipe's instruction: validation asks what training asks
    vtok.chat_prompt = functools.partial(tok.chat_prompt, instruction=cfg.instruction)
    res = E.evaluate(engine, vtok, datasets, n=cfg.val_n, temperature=cfg.temperature, top_p=cfg.top_p,
                     top_k=cfg.top_k, max_tokens=cfg.val_max_tokens or stage.max_response_tokens, seed=cfg.seed + step,
                     require_think=cfg.require_think, grader=grader,
                     max_prompt_tokens=prompt_limit(cfg, engine),
                     rank=ctx.rank, world_size=ctx.world_size, progress=False)
    out = {f"val_{name}": r["pass@1"] for name, r in res["datasets"].items()}
    scores = [v for v in out.values() if v is not None]
    if scores:
        out["val_accuracy"] = sum(scores) / len(scores)
    return out

def run(cfg, ctx, grader):
    torch.manual_seed(cfg.seed)
    master = ctx.rank == 0
    say = print if master else (lambda *a, **k: None)
    if cfg.prompts_per_step % ctx.world_size:
        raise SystemExit(f"prompts_per_step ({cfg.prompts_per_step}) must divide across {ctx.world_size} ranks: "
                         "each rank rolls out whole groups of its own prompts")
    candidates = C.prepare_out_dir(cfg, ctx, say)  # before anything loads: never mixes or destroys runs
    tok, model, ref, engine, plan = build(cfg, ctx)
    limit = prompt_limit(cfg, engine)
    items, counts = encode_rows(load_rows(cfg.train_data), tok, cfg, cfg.train_data, limit)
    say(f"data {cfg.train_data}: {len(items)} prompts (dropped: {counts['too_long']} over "
        f"{limit} tokens, {counts['no_answer']} without a usable answer, "
        f"{counts['no_problem']} without a problem) | model {model.num_params() / 1e6:.2f}M params | world {ctx.world_size}")
    opt = make_optimizer(model, cfg)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    step, pos, bad = 0, 0, 0
    if candidates:
        path, state = C.resume(cfg, ctx, candidates, model, opt, ref, say)
        step, pos, bad = state["step"], state["data_pos"], state["bad_steps"]
        say(f"resumed from {path}: steps 0-{step - 1} done, continuing at step {step} (data position {pos})")
    if master:
        truncate_log(metrics_path, step)
        plan.save(cfg.out_dir)
    mirrors = Mirrors(cfg, enabled=master)  # TensorBoard / W&B copies of metrics.jsonl, when asked for
    data = PromptStream(items, cfg.seed, pos)
    last = min(cfg.total_steps(), cfg.max_steps or cfg.total_steps())
    rows, t_run, first = [], time.time(), step
    pool = ThreadPoolExecutor(1)  # grading runs beside the log-prob passes
    while step < last:
        t0 = time.time()
        si, stage = cfg.stage_at(step)
        if step > 0 and step == cfg.stage_start(si):  # new context stage: new reference, fresh optimizer
            if ref is not None:
                ref.load_state_dict(model.state_dict())
            opt = make_optimizer(model, cfg)
            say(f"stage {si}: responses up to {stage.max_response_tokens} tokens, group {stage.group_size}")
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        D.sync_weights(model, engine.model)  # in place (captured graphs stay valid); gathers FSDP shards
        t_sync = time.time()
        samples, rewards_future, extra = collect(engine, grader, tok, data, cfg, stage, step, ctx, pool)
        t_gen = time.time()
        # mini-batches are cut from the whole step's groups, then each rank takes a token-balanced share
        everyone = gather_samples(samples, ctx)
        plans = [micro_batches(mb, cfg, ctx) for mb in split_mini_batches(everyone, cfg, stage)]
        micros = [m for p in plans for m in p]
        acc = D.Accumulator(ctx.device)
        if ref is not None:
            for m in micros:
                m.ref_logp = logprobs(ref, m, cfg, ctx)
        t_ref = time.time()
        for m in (m for p in plans[1:] for m in p):  # the first mini-batch is on-policy: skipped
            m.old_logp = logprobs(model, m, cfg, ctx)
            acc.disagreement(m.old_logp, m)
        t_old = time.time()
        rewards = rewards_future.result()
        t_grade = time.time()
        all_rewards = [r for part in D.all_gather_objects(list(rewards), ctx) for r in part]
        set_advantages(everyone, all_rewards, cfg, stage, step)
        for m in micros:
            fill_advantages(m)
        results = [train_mini_batch(model, opt, p, cfg, stage, ctx, acc) for p in plans]
        t_upd = time.time()
        skipped = sum(not ok for ok, _ in results)
        bad = bad + 1 if skipped else 0
        row = {"step": step, "stage": si, "lr": lr, **rollout_stats(samples, rewards, stage.group_size, ctx),
               **acc.result(ctx), **extra, "grad_norm": sum(g for _, g in results) / len(results),
               "skipped_updates": skipped, "data_pos": data.pos, "kernel_fallback": int(engine.kernel_fallback is not None)}
        train_tokens = D.all_reduce(torch.tensor(sum(m.input_ids.numel() for m in micros), device=ctx.device), ctx)
        row.update(time_sync=t_sync - t0, time_rollout=t_gen - t_sync, time_ref=t_ref - t_gen,
                   time_old=t_old - t_ref, time_grade_wait=t_grade - t_old, time_update=t_upd - t_grade,
                   gen_tokens_per_s=row["gen_tokens"] / max(t_gen - t_sync, 1e-9),
                   train_tokens_per_s=train_tokens.item() / max(t_upd - t_grade, 1e-9))
        if skipped:
            say(f"step {step}: non-finite loss or gradient in {skipped} mini-batch(es); update skipped "
                f"({bad} in a row, stopping at {cfg.max_bad_steps})")
        step += 1
        if cfg.eval_interval and cfg.val_data and (step % cfg.eval_interval == 0 or step == last):
            tv = time.time()
            row.update(validate(cfg, ctx, engine, tok, grader, stage, step))
            row["time_val"] = time.time() - tv
        health = grader.health()  # this step's answers sent to sympy, timed out (scored 0.0), workers restarted
        row.update(zip(health, D.all_reduce(torch.tensor([*health.values()], device=ctx.device), ctx).tolist()))
        row["time_step"] = time.time() - t0
        rows.append(row)
        if master and len(rows) == 1 and ctx.device.type == "cuda":  # the plan beside what a real step used
            say(plan.observe(ctx.device, cfg.out_dir))
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            mirrors.log(row)
            if (step - 1) % cfg.log_interval == 0 or step == last:
                print(console_line(row, last, time.time() - t_run, step - first), flush=True)
        if bad >= cfg.max_bad_steps:  # logged first, so the metrics show the failures
            raise TrainingDiverged(
                f"{bad} consecutive steps had a non-finite loss or gradient norm (last grad norm "
                f"{row['grad_norm']}); stopped. The last good checkpoint is in {cfg.out_dir}/ckpt; "
                "try a lower lr or check the data.")
        if cfg.stop_at_step and step == cfg.stop_at_step:
            say(f"stop_at_step={step}: exiting without a checkpoint (simulated kill)")
            return rows
        if step % cfg.ckpt_interval == 0 or step == last:
            tc = time.time()
            save_checkpoint(cfg, ctx, model, opt, ref, {"step": step, "stage": si, "data_pos": data.pos,
                                                        "bad_steps": bad})
            say(f"checkpoint {cfg.out_dir}/ckpt/step_{step:06d} after step {step - 1} ({time.time() - tc:.1f}s)")
    pool.shutdown()
    mirrors.close()
    if candidates and step == first and cfg.export_hf:  # resumed at the end: a kill may have cut the last export
        C.export(cfg, ctx, model)
    if master and rows:
        from plot import plot
        plot(cfg.out_dir)
    return rows

def train(cfg):
    from reward import Grader
    check_config(cfg)  # a config built in code gets the command line's checks
    memory.expandable_segments()  # before CUDA's allocator starts
    # the grader's worker processes are forked before any CUDA/NCCL state exists
    if cfg.threads:  # before the demo's warm-start too
        torch.set_num_threads(cfg.threads)
    with Grader(num_workers=cfg.grader_workers, timeout=cfg.grader_timeout) as grader:
        ctx = D.setup(None if cfg.device == "auto" else cfg.device)
        try:
            if cfg.prepare:  # a recipe's input builder (the demo's): rank 0 first, then the others reuse it
                module, _, fn = cfg.prepare.partition(":")
                prepare = getattr(importlib.import_module(module), fn)
                if ctx.rank == 0:
                    cfg = prepare(cfg, **cfg.prepare_args)
                D.barrier(ctx)
                if ctx.rank != 0:
                    cfg = prepare(cfg, **cfg.prepare_args)
            for name in ("init_from", "train_data"):
                if not getattr(cfg, name):
                    raise SystemExit(f"set --{name}=... (or use a config file that sets it)")
            return run(cfg, ctx, grader)
        finally:
            D.teardown()

def main(argv):
    if "-h" in argv or "--help" in argv:  # the docstring up to "Each step:", then every field
        return print(help_text(TrainConfig, __doc__.split("Each step:")[0].strip()), end="")
    plot_dirs = [a.partition("=")[2] or (argv[i + 1:] or ["."])[0]  # --plot=DIR or --plot DIR
                 for i, a in enumerate(argv) if a.partition("=")[0] == "--plot"]
    if not plot_dirs:
        return train(load_config(argv))
    from plot import plot
    for d in plot_dirs:
        plot(d)

if __name__ == "__main__":
    main(sys.argv[1:])
