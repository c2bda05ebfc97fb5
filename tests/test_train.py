"""train.py: data, packing, recipe switches, checkpoint/resume exactness, NaN handling, validation, and the
CPU demo (a shortened run must learn; the same run with shuffled advantages must not)."""
import json
import math
import os

import pytest
import torch

import demo
import grpo
import model as M
import reward as R
import tokenizer as TK
import train as T
from fixtures import break_kernel_self_check


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The demo's tokenizer, data and warm-started model (shared by every test here)."""
    torch.set_num_threads(1)  # tiny matrices; the machine is shared and two threads thrash under load
    cfg = T.TrainConfig(out_dir=str(tmp_path_factory.mktemp("inputs")), seed=0)
    return demo.prepare(cfg, warm_steps=demo.DEMO_WARM_STEPS)  # the demo's own start: rewards ~0.1-0.2


def tiny(inputs, out_dir, **kw):
    """A few-second run: 4 prompts x group 4, answers of at most 8 tokens."""
    cfg = T.TrainConfig(init_from=inputs.init_from, train_data=inputs.train_data, val_data="", out_dir=str(out_dir),
                        instruction="", stages=[T.Stage(steps=kw.pop("steps", 4), max_response_tokens=8, group_size=4)],
                        prompts_per_step=4, mini_batches=2, temperature=1.0, lr=1e-4, kl_coef=0.001,
                        entropy_coef=0.001, token_budget=64, gradient_checkpointing=False, ckpt_interval=2,
                        grader_workers=1, engine_memory=2**20, threads=1, export_hf=True)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def sample(prompt, response, finish="stop", adv=0.0):
    return T.Sample(list(prompt), list(response), [-0.5] * len(response), finish, "1", advantage=adv)

# -----------------------------------------------------------------------------
# Data and packing


def test_data_loading_counts_drops_and_formats(tmp_path, inputs):
    tok = TK.Tokenizer.from_pretrained(inputs.init_from)
    rows = [{"problem": "1+2", "answer": "3"}, {"problem": "4+5"}, {"problem": "7+1", "answer": 8},
            {"problem": "9+9", "solution": "so \\boxed{18}"}, {"problem": "1" * 50, "answer": "1"}, {"answer": "2"}]
    for name, text in [("d.json", json.dumps(rows)), ("d.jsonl", "\n".join(map(json.dumps, rows)))]:
        (tmp_path / name).write_text(text)
        cfg = T.TrainConfig(instruction="", max_prompt_tokens=20)
        items, counts = T.encode_rows(T.load_rows(str(tmp_path / name)), tok, cfg, name)
        assert [g for _, g in items] == ["3", "8", "18"]
        assert counts == {"rows": 6, "no_problem": 1, "no_answer": 1, "too_long": 1}
        assert tok.decode(items[0][0]) == tok.chat_prompt("1+2", instruction="")
    with pytest.raises(SystemExit, match="no usable rows"):
        T.encode_rows([{"problem": "x"}], tok, cfg, "bad.json")


def test_a_model_with_few_positions_answers_within_them(tmp_path, inputs, capsys):
    """The demo's model has 256 positions while max_prompt_tokens (1024) + responses ask for more: the
    engine stops answers at the last position (as sample.py and eval.py do) and a prompt that leaves no
    room is dropped as too long, instead of running past the positions the model was trained on."""
    rows = [json.loads(line) for line in open(inputs.train_data)][:8] + [{"problem": "1" * 300, "answer": "1"}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)))
    cfg = tiny(inputs, tmp_path / "run", steps=1, train_data=str(tmp_path / "d.jsonl"), export_hf=False,
               stages=[T.Stage(steps=1, max_response_tokens=512, group_size=4)])
    assert cfg.max_prompt_tokens + 512 > 256 == M.Config.from_file(os.path.join(inputs.init_from, "config.json")).max_position_embeddings
    rows = T.train(cfg)
    assert len(rows) == 1 and rows[0]["response_len_max"] <= 256
    assert "1 over 255 tokens" in capsys.readouterr().out


def test_think_split_first_grades_prompt_and_response_as_deepscaler_did():
    """With think_split="first" the <think> a newer template puts in the prompt counts (DeepScaleR decoded
    prompt + response together), and the answer after the first </think> is graded."""
    class CharTok:  # decode joins characters: no tokenizer needed to test the text grade() builds
        eos_token_ids = ["$"]
        decode = staticmethod("".join)
    new, old = list("<User>1+2<Assistant><think>\n"), list("<User>1+2<Assistant>")
    samples = [T.Sample(new, list("3</think>\\boxed{3}$"), [], "stop", "3"),
               T.Sample(old, list("3</think>\\boxed{3}$"), [], "stop", "3"),
               T.Sample(new, list("3</think>\\boxed{3}</think>\\boxed{5}$"), [], "stop", "3")]
    with R.Grader(num_workers=1) as grader:
        last = T.grade(grader, CharTok, samples, T.TrainConfig())
        first = T.grade(grader, CharTok, samples, T.TrainConfig(think_split="first"))
    assert last == [1.0, 1.0, 0.0] and first == [1.0, 0.0, 1.0]


def test_prompt_stream_is_seeded_and_resumable():
    items = list(range(10))
    a = T.PromptStream(items, seed=3)
    first = a.take(7) + a.take(7)  # crosses an epoch boundary: a new permutation
    assert sorted(first[:10]) == items and first[:10] != items
    b = T.PromptStream(items, seed=3, pos=7)
    assert b.take(7) == first[7:]
    assert T.PromptStream(items, seed=4).take(10) != first[:10]


def test_pack_positions_targets_mask_and_budget():
    s1 = sample([0, 2, 7], [8, 9, 1])          # stopped: EOS (1) is the last response token
    s2 = sample([0, 2, 6, 3], [5, 1], adv=2.0)
    s3 = sample([0, 3], [4, 4, 4, 4], finish="length")
    micros = T.pack([s1, s2, s3], budget=10, overlong_filter=False, device="cpu")
    assert [len(m.samples) for m in micros] == [2, 1]  # 5 + 5 tokens fit in 10, the third does not
    m = micros[0]
    assert m.input_ids.tolist() == [0, 2, 7, 8, 9, 0, 2, 6, 3, 5]
    assert m.targets.tolist() == [2, 7, 8, 9, 1, 2, 6, 3, 5, 1]
    assert m.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert m.mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1]  # response tokens only, EOS included
    assert m.engine_logp[m.mask.bool()].tolist() == [-0.5] * 5
    T.fill_advantages(m)
    assert m.adv.tolist() == [0.0] * 5 + [2.0] * 5
    # overlong filtering: a truncated answer keeps its tokens but gets no loss
    kept = T.pack([s3], budget=10, overlong_filter=False, device="cpu")[0].mask.sum()
    filtered = T.pack([s3], budget=10, overlong_filter=True, device="cpu")[0].mask.sum()
    assert (kept, filtered) == (4, 0)


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("config.lr = 5e-5\nconfig.stages = [Stage(3, 16, 4), Stage(2, 32, 8)]\nmini_batches = 4\n")
    cfg = T.load_config([str(f), "--lr=1e-3", "--dynamic_sampling", "--clip_eps_high=0.28", "--out_dir=x/y"])
    assert (cfg.lr, cfg.mini_batches, cfg.dynamic_sampling, cfg.clip_eps_high, cfg.out_dir) == (1e-3, 4, True, 0.28, "x/y")
    assert cfg.total_steps() == 5 and cfg.stage_at(3) == (1, T.Stage(2, 32, 8)) and cfg.stage_start(1) == 3
    with pytest.raises(SystemExit, match="unknown option"):
        T.load_config(["--no_such=1"])


def test_published_recipe_values():
    cfg = T.load_config([os.path.join(os.path.dirname(T.__file__), "config", "deepscaler_1.5b.py")])
    assert (cfg.temperature, cfg.top_p, cfg.prompts_per_step, cfg.mini_batches, cfg.lr, cfg.clip_eps,
            cfg.kl_coef, cfg.entropy_coef, cfg.token_budget, cfg.val_n) == (0.6, 1.0, 128, 2, 1e-6, 0.2, 0.001,
                                                                              0.001, 32768, 8)
    assert [(s.max_response_tokens, s.group_size) for s in cfg.stages] == [(8192, 8), (16384, 16), (24576, 16)]
    assert not (cfg.dynamic_sampling or cfg.overlong_filter or cfg.dr_grpo) and cfg.clip_eps_high is None
    # DeepScaleR's README: context extended at steps 1040 and 1520; 8 GPUs for 8K, 4 x 8 for 16K/24K
    assert [cfg.stage_start(i) for i in (1, 2)] == [1040, 1520] and cfg.stage_at(1519)[0] == 1
    assert [s.deepscaler_gpus for s in cfg.stages] == [8, 32, 32]
    assert (cfg.loss_agg, cfg.deepscaler_micro_tokens, cfg.objective) == ("deepscaler", 32768, "grpo")
    assert cfg.tis_c is None and cfg.mis_c is None  # DeepScaleR had no rollout correction


def test_loss_switch_errors(tmp_path):
    """Bad loss switches stop at config time with the field's name."""
    recipe = os.path.join(os.path.dirname(T.__file__), "config", "deepscaler_1.5b.py")
    for args, match in ((["--tis_c=2.0", "--top_p=0.95"], "top_p < 1 or top_k"), (["--mis_c=2", "--top_k=20"], "top_k"),
                        (["--loss_agg=micro-batch-mean"], "renamed"), (["--objective=ppo"], "objective"),
                        (["--mis_c=1.0"], r"mis_c = 1.0 .*x > 1"), (["--dynamic_sampling"], "dynamic_sampling"),
                        (["--prompts_per_step=6"], r"stages\[1\]: 96 samples .* deepscaler_gpus=32 x mini_batches=2")):
        with pytest.raises(SystemExit, match=match):
            T.load_config([recipe, *args])
    assert T.load_config([recipe, "--tis_c=2.0", "--mis_c=3.0", "--mis_level=sequence"]).tis_c == 2.0

# -----------------------------------------------------------------------------
# Recipe switches, each shown by its effect


def test_dr_grpo_and_shuffled_advantages():
    stage = T.Stage(1, 8, 4)
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    s = [sample([0], [1]) for _ in rewards]
    T.set_advantages(s, rewards, T.TrainConfig(), stage, step=0)
    std = [x.advantage for x in s]
    T.set_advantages(s, rewards, T.TrainConfig(dr_grpo=True), stage, step=0)
    assert [x.advantage for x in s] == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    assert std[0] == pytest.approx(0.75 / (0.5 + 1e-6))  # group std of [1, 0, 0, 0] (unbiased) is 0.5
    T.set_advantages(s, rewards, T.TrainConfig(shuffle_advantages=True), stage, step=0)
    shuffled = [x.advantage for x in s]
    assert sorted(shuffled) == pytest.approx(sorted(std)) and shuffled != pytest.approx(std)


def test_clip_higher_lets_ratios_rise_further(inputs):
    """A positive-advantage token whose ratio is 1.25: clipped at 0.2, free under DAPO's 0.28."""
    model = M.from_pretrained(inputs.init_from)
    s = sample([0, 2, 8, 3], [4, 5, 13], adv=1.0)
    fracs = []
    for high in (None, 0.28):
        cfg = T.TrainConfig(clip_eps_high=high, kl_coef=0.0, entropy_coef=0.0, temperature=1.0)
        m = T.pack([s], 64, False, "cpu")[0]
        T.fill_advantages(m)
        m.old_logp = T.logprobs(model, m, cfg, T.D.Dist()) - 0.223  # ratio e^0.223 = 1.25
        acc = T.D.Accumulator("cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        T.train_mini_batch(model, opt, [m], cfg, T.Stage(1, 8, 1), T.D.Dist(), acc)
        fracs.append(acc.result(T.D.Dist())["clip_frac"])
    assert fracs == [1.0, 0.0]


def test_rollout_correction_metrics_and_objectives_in_the_update(inputs):
    """train_mini_batch with TIS and MIS against the engine's log-probs: tokens whose engine log-prob is 1.0
    higher than the trainer's (rho = e^-1) are masked by MIS (C = 2) and out of every count; the logged ratio
    statistics, truncated/masked fractions and effective sample size follow from the planted ratios. GSPO and
    CISPO run through the same update."""
    model = M.from_pretrained(inputs.init_from)
    ctx = T.D.Dist()
    s1, s2 = sample([0, 2, 8, 3], [4, 5, 13, 1], adv=1.0), sample([0, 2, 7], [6, 1], adv=-1.0)
    cfg = T.TrainConfig(kl_coef=0.0, entropy_coef=0.0, temperature=1.0, tis_c=1.2, mis_c=2.0)
    m = T.pack([s1, s2], 64, False, "cpu")[0]
    T.fill_advantages(m)
    trainer = T.logprobs(model, m, cfg, ctx)
    resp = m.mask.bool()
    shift = torch.zeros_like(trainer)
    idx = resp.nonzero().squeeze(1)
    shift[idx[0]], shift[idx[1]], shift[idx[2]] = 1.0, -0.5, -0.1   # rho = e^-1 (masked), e^0.5 (truncated), e^0.1
    m.engine_logp = torch.where(resp, trainer + shift, 0.0)
    acc = T.D.Accumulator("cpu")
    ok, _ = T.train_mini_batch(model, torch.optim.SGD(model.parameters(), lr=0.0), [m], cfg, T.Stage(1, 8, 2), ctx, acc)
    res = acc.result(ctx)
    n = int(resp.sum())
    assert ok and n == 6 and m.loss_mask.sum() == n - 1
    assert res["is_masked_frac"] == pytest.approx(1 / n)
    kept = [math.exp(0.5), math.exp(0.1)] + [1.0] * (n - 3)
    assert res["is_ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-4)
    assert res["is_ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert res["is_ratio_mean"] == pytest.approx(sum(kept) / len(kept), rel=1e-4)
    assert res["is_truncated_frac"] == pytest.approx(1 / len(kept))
    w = [min(x, 1.2) for x in kept]
    assert res["is_ess"] == pytest.approx((sum(w) / len(w)) ** 2 / (sum(x * x for x in w) / len(w)), rel=1e-4)
    assert "logp_diff_mean" in res  # MIS's pass over the on-policy mini-batch is the trainer's recomputation
    for objective in ("gspo", "cispo"):
        cfg2 = T.TrainConfig(kl_coef=0.0, entropy_coef=0.0, temperature=1.0, objective=objective)
        m.old_logp = None
        ok, grad_norm = T.train_mini_batch(model, torch.optim.SGD(model.parameters(), lr=0.0), [m], cfg2,
                                           T.Stage(1, 8, 2), ctx, T.D.Accumulator("cpu"))
        assert ok and grad_norm > 0


def test_dynamic_sampling_leaves_no_all_equal_group(tmp_path, inputs):
    rows = T.train(tiny(inputs, tmp_path, steps=2, dynamic_sampling=True, max_sampling_rounds=8, ckpt_interval=100))
    for r in rows:
        assert r["all_correct_frac"] == 0.0 and r["all_wrong_frac"] == 0.0
        assert r["samples"] == 16 and r["dropped_groups"] > 0 and r["sampling_rounds"] > 1
    plain = T.train(tiny(inputs, tmp_path / "plain", steps=2, ckpt_interval=100))
    assert sum(r["all_wrong_frac"] + r["all_correct_frac"] for r in plain) > 0  # the switch is what did it


def test_overlong_filter_masks_truncated_answers(tmp_path, inputs):
    """Answers cut at 3 tokens are all truncated: with the filter there is no loss, so no change."""
    cfg = tiny(inputs, tmp_path, steps=1, overlong_filter=True, kl_coef=0.0, entropy_coef=0.0, ckpt_interval=100,
               weight_decay=0.0)  # decoupled decay would move the weights even with zero gradients
    cfg.stages = [T.Stage(1, 3, 4)]
    (row,) = T.train(cfg)
    assert row["truncated_frac"] == 1.0 and row["grad_norm"] == 0.0
    after = M.from_pretrained(os.path.join(cfg.out_dir, "hf")).state_dict()
    before = M.from_pretrained(inputs.init_from).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

# -----------------------------------------------------------------------------
# Checkpoints, resume, NaN handling, validation


VOLATILE = ("time_", "gen_tokens_per_s", "train_tokens_per_s")


def stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, inputs):
    full = T.train(tiny(inputs, tmp_path / "full", steps=4, val_data=inputs.val_data, eval_interval=2, val_n=2))
    killed = tiny(inputs, tmp_path / "killed", steps=4, val_data=inputs.val_data, eval_interval=2, val_n=2,
                  stop_at_step=3)
    T.train(killed)  # checkpoint at step 2, then step 3 logged, then "killed" before its checkpoint
    assert [os.path.basename(p) for p in T.ckpt_dirs(killed.out_dir)] == ["step_000002"]
    killed.stop_at_step, killed.resume = 0, True
    T.train(killed)
    with open(os.path.join(killed.out_dir, "metrics.jsonl")) as f:
        resumed = [json.loads(line) for line in f]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    assert stable(resumed) == stable(full)  # same data order, same samples, same updates: exactly
    assert "val_accuracy" in full[1] and "val_accuracy" not in full[0]
    a = M.from_pretrained(os.path.join(tmp_path / "full", "hf")).state_dict()
    b = M.from_pretrained(os.path.join(killed.out_dir, "hf")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_updates_are_skipped_then_stop(tmp_path, inputs, monkeypatch):
    seen = {"step": 0}
    real_adv, real_loss = T.set_advantages, grpo.policy_loss

    def note_step(samples, rewards, cfg, stage, step):
        seen["step"] = step
        return real_adv(samples, rewards, cfg, stage, step)

    def poisoned(*args, **kwargs):  # steps 0-1 fine, then a NaN loss
        loss, met = real_loss(*args, **kwargs)
        return (loss * float("nan") if seen["step"] >= 2 else loss), met

    monkeypatch.setattr(T, "set_advantages", note_step)
    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    cfg = tiny(inputs, tmp_path, steps=10, ckpt_interval=1, max_bad_steps=2, keep_last=10)
    with pytest.raises(T.TrainingDiverged, match="2 consecutive steps"):
        T.train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["skipped_updates"] for r in rows] == [0, 0, 2, 2]
    assert all({"grader_sympy", "grader_timeouts", "grader_restarts"} <= r.keys() for r in rows)  # grader health
    assert all(r["kernel_fallback"] == 0 for r in rows)
    # the skipped step left the weights alone: the last checkpoint equals the last good one
    kept = [os.path.basename(p) for p in T.ckpt_dirs(cfg.out_dir)]
    assert kept == ["step_000001", "step_000002", "step_000003"]
    model, ref = M.from_pretrained(cfg.init_from), None
    states = []
    for name in kept[1:]:
        opt = T.make_optimizer(model, cfg)
        T.load_checkpoint(os.path.join(cfg.out_dir, "ckpt", name), T.D.Dist(), model, opt, ref)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_kernel_fallback_stops_training_unless_allowed_and_is_in_the_metrics(tmp_path, inputs, monkeypatch):
    """As on a GPU whose Triton kernels fail their self-check (simulated on the CPU): training refuses to
    start; with engine_kernel_fallback=True it runs the PyTorch twins and every metrics row says so."""
    break_kernel_self_check(monkeypatch)
    previous = dict(M.ATTENTION)
    with pytest.raises(RuntimeError, match="self-check failed.*allow_kernel_fallback"):
        T.train(tiny(inputs, tmp_path / "strict", steps=1, ckpt_interval=100, export_hf=False))
    with pytest.warns(UserWarning, match="self-check failed"):
        rows = T.train(tiny(inputs, tmp_path / "allowed", steps=2, ckpt_interval=100, export_hf=False,
                            engine_kernel_fallback=True))
    assert [r["kernel_fallback"] for r in rows] == [1, 1] and M.ATTENTION == previous
    assert [r["kernel_fallback"] for r in read_rows(tmp_path / "allowed")] == [1, 1]

# -----------------------------------------------------------------------------
# The CPU demo, shortened: GRPO must raise the reward; the same run with shuffled advantages must not


def mean_reward(rows):
    return sum(r["reward_mean"] for r in rows) / len(rows)


def test_demo_learns_and_shuffled_advantages_do_not(tmp_path, inputs):
    recipe = os.path.join(os.path.dirname(T.__file__), "config", "demo.py")
    runs = {}
    for name, shuffle in (("grpo", False), ("shuffled", True)):
        cfg = T.load_config([recipe, f"--out_dir={tmp_path / name}", "--prepare=", "--max_steps=50",
                             "--ckpt_interval=1000", f"--shuffle_advantages={shuffle}"])
        cfg.init_from, cfg.train_data = inputs.init_from, inputs.train_data
        runs[name] = T.train(cfg)
    start = {k: mean_reward(v[:10]) for k, v in runs.items()}
    end = {k: mean_reward(v[-10:]) for k, v in runs.items()}
    print("demo test: start", start, "end", end)
    assert abs(start["grpo"] - start["shuffled"]) < 0.08  # same start (same weights, same first prompts)
    # deterministic (fixed seed, one thread); measured here: grpo 0.14 -> 0.22, shuffled 0.10 -> 0.01
    assert end["grpo"] - start["grpo"] >= 0.05
    assert end["shuffled"] - start["shuffled"] <= 0.02
    assert end["grpo"] - end["shuffled"] >= 0.12


def test_resume_drops_a_metrics_line_cut_short_by_the_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "r": 1}\n{"step": 1, "r": 2}\n{"step": 2, "r": 3}\n{"step": 3, "r"')
    T.truncate_log(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]
    T.truncate_log(str(path), 0)  # a fresh run starts an empty log
    assert path.read_text() == ""

# -----------------------------------------------------------------------------
# After training: the export in transformers, sample.py on it by default, the TensorBoard copy of the rows


def read_rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_export_loads_in_transformers_and_samples_in_the_demo_format(tmp_path, inputs, monkeypatch, capsys):
    """The demo's HF export (out_dir/hf after a 2-step run) loads in transformers, model and tokenizer:
    same logits, same token ids (spaces too), and its chat template renders our prompt. `python sample.py
    --ckpt OUT/hf --prompt 23+45` then uses the demo's format (no English instruction) without a warning.
    ~10 s plus the shared demo inputs."""
    import warnings
    transformers = pytest.importorskip("transformers")
    import sample
    cfg = tiny(inputs, tmp_path, steps=2)
    T.train(cfg)
    hf = os.path.join(cfg.out_dir, "hf")
    ours_tok, ours = TK.Tokenizer.from_pretrained(hf), M.from_pretrained(hf, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = ours_tok.chat_prompt("23+45")
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>23+45<｜Assistant｜>"
    assert tok.apply_chat_template([{"role": "user", "content": "23+45"}], tokenize=False,
                                   add_generation_prompt=True) == prompt
    for text in (prompt, "<think></think>\\boxed{68}<｜end▁of▁sentence｜>", "12 + 3 = 15"):
        assert tok(text, add_special_tokens=False).input_ids == ours_tok.encode(text), text
    import eval as E  # eval.py's prompts follow the checkpoint too
    assert E.make_prompts(ours_tok, {"val": [{"id": 0, "problem": "23+45"}]}, E.EvalConfig())[0]["val"][0][1] == \
        ours_tok.encode(prompt)
    x = torch.tensor([ours_tok.encode(prompt + "<think></think>\\boxed{6")])
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-4
    monkeypatch.setattr("sys.argv", ["sample.py", "--ckpt", hf, "--prompt", "23+45", "--num-samples", "2",
                                     "--temperature", "0", "--device", "cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TK.UnknownTokenWarning)
        sample.main()
    out = capsys.readouterr().out
    assert out.count(prompt + "<think>") == 2 and "Let's think" not in out


def test_tensorboard_gets_the_metrics_rows(tmp_path, inputs):
    """--tensorboard writes every numeric field of every metrics.jsonl row, at its step, to out_dir/tb.
    ~5 s plus the shared demo inputs."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny(inputs, tmp_path, steps=3, tensorboard=True)
    T.train(cfg)
    rows = read_rows(cfg.out_dir)
    events = EventAccumulator(os.path.join(cfg.out_dir, "tb"), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert tags == numeric - {"step"} and {"reward_mean", "kl", "grad_norm", "time_step"} <= tags
    for tag in ("reward_mean", "response_len_mean", "kl", "data_pos"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows]
