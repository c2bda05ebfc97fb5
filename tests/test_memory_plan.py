"""memory.py: the start-up plan is measured through the trainer's own code, leaves weights, optimizer and
RNG exactly as they were (a run with the probe equals a run without it), shrinks the KV pool when the
trainer's measured peak grows, says what the worst stage means on 8 GPUs, and train.py prints it once and
logs it in the run folder. CPU: the same code reads resident memory instead of the CUDA allocator."""
import functools
import json
import os

import pytest
import torch

import memory
import model as M
import train as T
from engine import Engine
from fixtures import random_model, tiny_checkpoint, tiny_config


def setup(token_budget, seed=1):
    cfg = T.TrainConfig(token_budget=token_budget, lr=1e-2)
    policy = random_model(tiny_config(), seed=seed)
    engine_model = random_model(tiny_config(), seed=seed).eval().requires_grad_(False)
    return cfg, policy, engine_model


def measure(cfg, policy, engine_model, **kw):
    ctx = T.D.Dist()
    args = dict(device=ctx.device, world_size=1, policy=policy, reference=None, engine_model=engine_model,
                make_engine=functools.partial(Engine, engine_model, max_model_len=300, max_num_seqs=64, vocab_limit=128),
                autocast=functools.partial(T.autocast, cfg, ctx), make_optimizer=functools.partial(T.make_optimizer, cfg=cfg),
                token_budget=cfg.token_budget, longest_sequence=299, max_model_len=300, max_num_seqs=64,
                temperature=0.6, grad_clip=1.0, margin_bytes=0, prompts_per_step=8, group_size=4, free=8 * 2**30)
    args.update(kw)
    return memory.measure_plan(**args)


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    ids, tgt = torch.randint(0, 128, (40,), generator=g), torch.randint(0, 128, (40,), generator=g)
    meta, pos = M.Varlen.from_seqlens([25, 15]), torch.cat([torch.arange(25), torch.arange(15)])
    logp = model(ids, pos, meta, targets=tgt)
    (-(logp * torch.randn(40)).mean()).backward()  # the global RNG: a probe that touched it would show here
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_probe_leaves_weights_optimizer_and_rng_as_they_were():
    """Two identical runs of three steps; one is probed after its first step (optimizer state exists).
    Weights, AdamW state and every later step are bitwise equal; the RNG is as before the probe."""
    cfg, a, eng = setup(512)
    b = random_model(tiny_config(), seed=1)
    opt_a, opt_b = T.make_optimizer(a, cfg), T.make_optimizer(b, cfg)
    torch.manual_seed(5)
    train_step(a, opt_a, 0)
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    plan = measure(cfg, a, eng)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in a.parameters())
    assert plan.optimizer == 2 * plan.gradients == 2 * plan.weights["policy"]  # AdamW's two moments, measured
    train_step(a, opt_a, 1)
    train_step(a, opt_a, 2)
    torch.manual_seed(5)  # the same run without the probe
    for step in (0, 1, 2):
        train_step(b, opt_b, step)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pool_shrinks_when_the_trainers_peak_grows():
    """Same device reading, a 16x larger token budget: the measured update peak grows and the room left
    for the KV pool (free - optimizer - max(peaks) - engine - margin) shrinks by as much; the pool is that
    room unless it exceeds every running sequence at full length. Cost ~1 s idle (two probes, tiny
    model); 38-73 s at load 12-14."""
    small = measure(*setup(512))
    big = measure(*setup(8192))
    assert big.micro_tokens == 8192 and small.micro_tokens == 512
    assert big.train_peak > small.train_peak + 30 * 2**20, (small.train_peak, big.train_peak)
    useful = 64 * 300 * small.kv_bytes_per_token
    for p in (small, big):
        assert p.room == memory.kv_budget(p.free, p.optimizer, p.train_peak, p.rollout_peak, p.engine_fixed, 0)
        assert p.kv_bytes == min(p.room, useful)
    assert big.room < small.room - 30 * 2**20
    # the arithmetic on its own: a larger transient or margin leaves a smaller pool, never a larger one
    assert memory.kv_budget(10, 1, 3, 2, 1, 1) == 4 and memory.kv_budget(10, 1, 4, 2, 1, 1) == 3
    # an explicit engine_memory is used as given, and said to exceed the room when it does
    asked = measure(*setup(512), kv_request=2**40)
    assert asked.kv_bytes == 2**40 and "MORE than the measured room" in asked.kv_source
    capped = measure(*setup(512), kv_cap=2**20)
    assert capped.kv_bytes == 2**20 and capped.kv_source.startswith("capped at 1 MiB")


def real_plan(world, kv_gb):
    """The published 24K stage on H200-sized pools (numbers of the real model's KV layout, not measured)."""
    per_token = 2 * 28 * 2 * 128 * 2  # layers x (K, V) x KV heads x head_dim x bf16 = 28 KiB
    return memory.MemoryPlan(
        device="cuda:0", world_size=world, free=130 * 2**30, resident=6 * 2**30, weights={"policy": 1, "engine": 1}, gradients=1,
        optimizer=2, train_peak=10 * 2**30, rollout_peak=2 * 2**30, engine_fixed=2**30, margin=4 * 2**30,
        room=int(kv_gb * 2**30), kv_bytes=int(kv_gb * 2**30), kv_bytes_per_token=per_token, kv_source="measured",
        micro_tokens=32768,
        prefill_tokens=8192, max_num_seqs=256, max_model_len=1024 + 24576, seqs_per_rank=128 // world * 16,
        prompts_per_step=128, group_size=16)


def test_plan_says_what_8_gpus_at_24k_mean():
    plan = real_plan(8, 100)
    text = plan.text()
    for row in ("weights", "gradients", "optimizer", "activation peak", "graph pool", "margin", "KV pool"):
        assert f"  {row}" in text
    assert plan.kv_tokens == 100 * 2**30 // 28672 and f"{plan.kv_tokens:,} tokens" in text
    assert plan.full_sequences == plan.kv_tokens // 25600 == 146
    # 256 sequences per rank of up to 25,600 tokens: 175 GB of KV if all alive; the pool holds 146
    assert "256 sequences per rank" in text and "175.00 GB of KV" in text
    assert "preempts the youngest" in text and "16 GPUs like this one" in text
    assert plan.recommended_world() == 16  # 128 x 16 / 16 = 128 per rank x 25,600 tokens = 91 GB <= 100
    assert "fits: no preemption" in real_plan(16, 100).text()
    assert real_plan(1, 0.001).recommended_world() is None


def tiny_train_config(tmp_path, out, **kw):
    ckpt = os.path.join(tmp_path, "ckpt")
    if not os.path.exists(ckpt):
        tiny_checkpoint(ckpt, seed=3)
        rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(3, 9) for b in range(2, 4)]
        with open(os.path.join(tmp_path, "train.json"), "w") as f:
            json.dump(rows, f)
    cfg = T.TrainConfig(init_from=ckpt, train_data=os.path.join(tmp_path, "train.json"), out_dir=str(out),
                        instruction="", max_prompt_tokens=60, stages=[T.Stage(steps=2, max_response_tokens=6, group_size=2)],
                        prompts_per_step=4, mini_batches=2, temperature=1.0, lr=1e-3, kl_coef=0.01,
                        entropy_coef=0.01, token_budget=64, gradient_checkpointing=False, ckpt_interval=2,
                        grader_workers=1, engine_memory=2**20, threads=1, export_hf=True, seed=4)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_train_prints_and_logs_the_plan_and_equals_a_run_without_probe(tmp_path, monkeypatch, capsys):
    """train.py end to end (2 steps, tiny checkpoint): the plan is printed once and written to
    out_dir/memory_plan.json; a run whose probe is stubbed out logs the same metrics and ends with the
    same weights. Cost ~1.3 s idle (two short runs with a grader process each); ~8 s at load 12."""
    rows = T.train(tiny_train_config(tmp_path, tmp_path / "probed"))
    printed = capsys.readouterr().out
    assert printed.count("memory plan (cpu") == 1
    saved = json.load(open(tmp_path / "probed" / "memory_plan.json"))
    assert saved["kv_bytes"] == 2**20 and saved["kv_source"] == "engine_memory" and saved["train_peak"] > 0
    assert saved["text"][0].startswith("memory plan (cpu") and "verdict" in saved
    monkeypatch.setattr(memory, "probe_update", lambda *a, **k: (0, 0, 0, 0))
    monkeypatch.setattr(memory, "probe_rollout", lambda *a, **k: (0, 0, 0))
    plain = T.train(tiny_train_config(tmp_path, tmp_path / "plain"))
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time_", "gen_tokens_per_s", "train_tokens_per_s"))}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in plain]
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "probed/hf/model.safetensors"), load_file(tmp_path / "plain/hf/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_plan_is_measured_from_the_allocator():
    """On a GPU the same probe reads the caching allocator: the optimizer's moments are twice the float32
    weights, the update peak is positive, the pool is what is left, and the engine built with it fits."""
    cfg, policy, engine_model = setup(4096)
    policy, engine_model = policy.cuda(), engine_model.cuda().to(torch.bfloat16)
    ctx = T.D.Dist(device=torch.device("cuda"))
    plan = measure(cfg, policy, engine_model, device=ctx.device, free=None, margin_bytes=2**30,
                   make_engine=functools.partial(Engine, engine_model, max_model_len=300, max_num_seqs=64, vocab_limit=128),
                   autocast=functools.partial(T.autocast, cfg, ctx))
    assert plan.optimizer == 2 * plan.weights["policy"] and plan.train_peak > 0 and plan.rollout_peak > 0
    assert plan.kv_bytes <= plan.free - plan.optimizer - plan.margin
    engine = Engine(engine_model, max_model_len=300, max_num_seqs=64, vocab_limit=128, memory_budget=min(plan.kv_bytes, 2**30))
    plan.engine_built(engine)
    assert "memory plan (cuda" in plan.text()
