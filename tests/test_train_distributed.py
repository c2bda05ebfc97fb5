"""train.py under torchrun on CPU (gloo): 2 ranks with FSDP2 reach the same weights as 1 process on the same
global batch; a run killed under torchrun resumes on a different number of processes (DCP reshards);
a stage switch changes length and group size, resets the reference to the current weights and the
optimizer; loss_agg="deepscaler" (with masked importance sampling) gives the same gradients on 1, 2 and 8
ranks. Rollouts are injected (fixed token ids and rewards) so sampling cannot make the test flaky."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M
import train as T
from fixtures import tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [T.Stage(1, 8, 2), T.Stage(2, 12, 4)]  # step 0 in stage 0; steps 1-2 in stage 1


def fixed_collect(engine, grader, tok, data, cfg, stage, step, ctx, pool):
    """The step's global batch, made up deterministically; this rank keeps its contiguous share."""
    batch = data.take(cfg.prompts_per_step)
    samples, rewards = [], []
    for i, (prompt, gold) in enumerate(batch):
        for j in range(stage.group_size):
            g = torch.Generator().manual_seed(step * 1000 + i * 10 + j)
            n = int(torch.randint(1, stage.max_response_tokens + 1, (1,), generator=g))
            response = torch.randint(6, 60, (n,), generator=g).tolist()
            samples.append(T.Sample(prompt, response, [-1.0] * n, "length", gold))
            rewards.append(float((i + j + step) % 3 == 0))
    per_rank = len(samples) // ctx.world_size
    lo, hi = ctx.rank * per_rank, (ctx.rank + 1) * per_rank
    mine = rewards[lo:hi]
    return samples[lo:hi], pool.submit(lambda: mine), {}


def config(inputs, out_dir, **kw):
    cfg = T.TrainConfig(init_from=inputs["ckpt"], train_data=inputs["data"], out_dir=str(out_dir), instruction="",
                        stages=list(STAGES), prompts_per_step=4, mini_batches=2, temperature=0.8, lr=1e-3,
                        kl_coef=0.01, entropy_coef=0.01, token_budget=48, gradient_checkpointing=True,
                        ckpt_interval=1, keep_last=5, grader_workers=1, engine_memory=2**20, threads=1, seed=3)
    for k, v in kw.items():
        setattr(cfg, k, [T.Stage(*s) if isinstance(s, list) else s for s in v] if k == "stages" else v)
    return cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = tiny_checkpoint(str(root / "ckpt"), seed=11, vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(3, 9) for b in range(2, 4)]
    (root / "train.json").write_text(json.dumps(rows))
    return {"ckpt": ckpt, "data": str(root / "train.json"), "root": root}


SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch, train as T, test_train_distributed as TD
T.collect = TD.fixed_collect
cfg = TD.config(json.loads({inputs!r}), {out!r}, **json.loads({kw!r}))
torch.set_num_threads(1)
T.train(cfg)
"""


def torchrun(tmp_path, inputs, out_dir, nproc, **kw):
    script = tmp_path / f"run_{os.path.basename(str(out_dir))}.py"
    plain = {"ckpt": inputs["ckpt"], "data": inputs["data"]}
    script.write_text(SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), inputs=json.dumps(plain),
                                    out=str(out_dir), kw=json.dumps(kw)))
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def weights(out_dir):
    return M.from_pretrained(os.path.join(out_dir, "hf")).state_dict()


def dcp_payload(ckpt_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / (os.path.basename(ckpt_dir) + ".pt")
    dcp_to_torch_save(ckpt_dir, str(out))
    return torch.load(out, weights_only=False)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def close(a, b):
    # float32 sums in another order; AdamW turns a tiny gradient's rounding into up to ~1% of one lr (1e-3)
    # step, so 2e-5 absolute (typical differences are 1e-7; an unnormalised or missing rank's gradient moves
    # weights by whole steps)
    return all(torch.allclose(a[k], b[k], rtol=0, atol=2e-5) for k in a)


def test_two_ranks_equal_one_rank_kill_resume_and_stage_switch(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(T, "collect", fixed_collect)
    torch.set_num_threads(1)
    one = tmp_path / "one"
    T.train(config(inputs, one))  # the reference: one process, the same global batches
    two = tmp_path / "two"
    out = torchrun(tmp_path, inputs, two, 2)
    assert "world 2" in out

    # 1) N ranks == 1 rank (FSDP2 over 2 processes vs the plain single-process path), after 3 steps
    w1, w2 = weights(one), weights(two)
    start = M.from_pretrained(inputs["ckpt"]).state_dict()
    assert not close(w1, start)  # the run did move the weights
    assert close(w2, w1)
    m1, m2 = metrics(one), metrics(two)
    for a, b in zip(m1, m2):
        assert a["samples"] == b["samples"] and abs(a["reward_mean"] - b["reward_mean"]) < 1e-9
        assert abs(a["kl"] - b["kl"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * (1 + a["grad_norm"])

    # 2) the stage switch: longer answers and bigger groups from step 1, the reference = the weights at the
    #    boundary, a fresh optimizer (2 optimizer steps per training step: AdamW's count restarted at the switch)
    assert [r["samples"] for r in m1] == [8, 16, 16] and [r["stage"] for r in m1] == [0, 1, 1]
    assert max(r["response_len_max"] for r in m1[1:]) > 8 >= m1[0]["response_len_max"]
    for run in (one, two):
        ckpts = T.ckpt_dirs(str(run))
        at_switch = dcp_payload(ckpts[0], tmp_path / run.name)
        later = dcp_payload(ckpts[1], tmp_path / run.name)
        assert all(torch.equal(later["ref"][k], at_switch["model"][k]) for k in at_switch["model"])
        steps = {float(s["step"]) for s in later["optim"]["state"].values()}
        assert steps == {2.0}, steps

    # 3) kill under torchrun after the step-1 checkpoint, resume in ONE process: DCP reshards 2 -> 1
    killed = tmp_path / "killed"
    torchrun(tmp_path, inputs, killed, 2, stop_at_step=2)
    assert [os.path.basename(p) for p in T.ckpt_dirs(str(killed))] == ["step_000001"]
    T.train(config(inputs, killed, resume=True))
    assert close(weights(killed), w1)
    assert [r["step"] for r in metrics(killed)] == [0, 1, 2]

    # 4) and the other way: killed in one process, resumed on 2 ranks (1 -> 2)
    grown = tmp_path / "grown"
    T.train(config(inputs, grown, stop_at_step=2))
    torchrun(tmp_path, inputs, grown, 2, resume=True)
    assert close(weights(grown), w1)
    assert [r["step"] for r in metrics(grown)] == [0, 1, 2]


DEEPSCALER = dict(loss_agg="deepscaler", deepscaler_micro_tokens=20, prompts_per_step=8, mis_c=30.0, ckpt_interval=100,
                  stages=[T.Stage(1, 8, 4, deepscaler_gpus=4), T.Stage(1, 12, 8, deepscaler_gpus=8)])


def test_deepscaler_gradient_is_the_same_on_1_2_and_8_ranks(tmp_path, inputs, monkeypatch):
    """DeepScaleR's layout (4 emulated GPUs in stage 0, 8 in stage 1; 2-4 verl micro-batches per GPU and
    mini-batch) is a property of the batch, not of this run: each token's weight comes from its verl
    micro-batch, so 1 process, 2 and 8 FSDP ranks (each packing its own share into 48-token micro-batches)
    get the same gradient norms and weights. Masked importance sampling (C = 30 against the injected
    engine log-probs of -1) drops some tokens from those micro-batches' counts, across ranks. Cost: ~130 s of
    CPU time (8 processes on 2 cores is most of it); 3 min 15 s wall at load average ~15."""
    monkeypatch.setattr(T, "collect", fixed_collect)
    torch.set_num_threads(1)
    runs = {1: tmp_path / "w1"}
    T.train(config(inputs, runs[1], **DEEPSCALER))
    for n in (2, 8):
        runs[n] = tmp_path / f"w{n}"
        kw = {k: v for k, v in DEEPSCALER.items() if k != "stages"}
        kw["stages"] = [[s.steps, s.max_response_tokens, s.group_size, s.deepscaler_gpus] for s in DEEPSCALER["stages"]]
        assert f"world {n}" in torchrun(tmp_path, inputs, runs[n], n, **kw)
    m = {n: metrics(d) for n, d in runs.items()}
    print("deepscaler grad norms per step:", {n: [r["grad_norm"] for r in rows] for n, rows in m.items()},
          "masked:", [r["is_masked_frac"] for r in m[1]])
    assert [r["samples"] for r in m[1]] == [32, 64]
    assert all(0.0 < r["is_masked_frac"] < 0.9 for r in m[1])  # MIS did drop some tokens, not all
    for n in (2, 8):
        for a, b in zip(m[1], m[n]):
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * (1 + a["grad_norm"]), (n, a["grad_norm"], b["grad_norm"])
            assert abs(a["is_masked_frac"] - b["is_masked_frac"]) < 1e-9 and abs(a["kl"] - b["kl"]) < 1e-6
    w = {n: weights(d) for n, d in runs.items()}
    assert not close(w[1], M.from_pretrained(inputs["ckpt"]).state_dict())
    assert close(w[2], w[1]) and close(w[8], w[1])
    # and it is not token-mean's gradient: the same batches, another aggregation
    tm = tmp_path / "token_mean"
    T.train(config(inputs, tm, **dict(DEEPSCALER, loss_agg="token-mean")))
    assert abs(metrics(tm)[0]["grad_norm"] - m[1][0]["grad_norm"]) > 1e-3 * m[1][0]["grad_norm"]
