"""A run killed with SIGKILL again and again at random moments, its newest checkpoint sometimes damaged
between kills, always restarted with the same --resume command (as a requeue script would): it must
continue from the newest complete checkpoint every time, and end with the metrics and weights of an
uninterrupted run, every step logged exactly once.

Seeded and time-bounded: NANOSCALER_CHAOS_SEED (default 0); the four FORCED moments and MIN_RANDOM random
ones always run, then random kills go on until NANOSCALER_CHAOS_SECONDS (default 0) have passed, so a soak
is NANOSCALER_CHAOS_SECONDS=1800. Cost: one interpreter start per process (7 by default, most of each one
importing torch): 48 s CPU in all; 100 s wall at load average 8 on the shared 2-core machine, 4.5 min at 12."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch

import checkpoint as C
import model as M
import train as T
from test_checkpoint import CORRUPTIONS, stable
from fixtures import tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# moments every run of this test covers, then random ones: (kind, n) for tests/chaos_run.py
FORCED = [("torch_save", 30),   # inside the first checkpoint's DCP shard write
          ("rename", 3),        # the second checkpoint written and sealed, about to be renamed into place
          ("save_file", 1),     # half-way through an export's safetensors file
          ("rename", 5)]        # between the two renames that swap a new export into OUT/hf
MIN_RANDOM = 2                  # random moments every run covers, the first a timer (more: NANOSCALER_CHAOS_SECONDS)


def args(inputs, out):
    return [f"--init_from={inputs['init']}", f"--train_data={inputs['data']}", f"--out_dir={out}", "--instruction=",
            f"--stages=[({STEPS}, 8, 4)]", "--prompts_per_step=4", "--mini_batches=2", "--temperature=1.0",
            "--lr=1e-3", "--kl_coef=0.01", "--token_budget=64", "--gradient_checkpointing=false",
            "--ckpt_interval=1", "--keep_last=3", "--grader_workers=1", "--engine_memory=1048576", "--threads=1",
            "--seed=1", "--device=cpu"]


def launch(inputs, out, kind, n, kill_after=None):
    """One process of the run; kill_after: seconds after its model is built, a SIGKILL from here."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "chaos_run.py"), kind, str(n),
                          *args(inputs, out), "--resume"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines, timer = [], None
    for line in p.stdout:
        lines.append(line)
        if kill_after is not None and line.startswith("data ") and timer is None:
            timer = threading.Timer(kill_after, lambda: p.poll() is None and p.send_signal(signal.SIGKILL))
            timer.start()
    p.wait(timeout=300)
    if timer:
        timer.cancel()
    return p.returncode, "".join(lines)


def newest_complete(out):
    sealed = [p for p in C.ckpt_dirs(out) if not C.file_problems(p)]
    return sealed[-1] if sealed else None


def test_random_kills_and_damage_never_lose_or_repeat_a_step(tmp_path):
    seed = int(os.environ.get("NANOSCALER_CHAOS_SEED", "0"))
    budget = float(os.environ.get("NANOSCALER_CHAOS_SECONDS", "0"))
    rng = random.Random(seed)
    torch.set_num_threads(1)
    inputs = {"init": tiny_checkpoint(str(tmp_path / "init"), seed=5, vocab_size=128, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16),
              "data": str(tmp_path / "train.jsonl")}
    rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(10, 30) for b in range(1, 4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = T.train(T.load_config(args(inputs, tmp_path / "reference")))  # one uninterrupted run

    out = str(tmp_path / "run")
    t0, history, finished = time.time(), [], False
    while not finished:
        i = len(history)
        if i < len(FORCED):
            (kind, n), kill_after = FORCED[i], None
        elif i < len(FORCED) + MIN_RANDOM or time.time() - t0 < budget:
            kind = "timer" if i == len(FORCED) else rng.choice(["torch_save", "rename", "save_file", "timer"])
            n = rng.randint(1, {"torch_save": 200, "rename": 8, "save_file": 3, "timer": 1}[kind])
            kind, kill_after = ("none", rng.uniform(0.0, 3.0)) if kind == "timer" else (kind, None)
        else:
            kind, n, kill_after = "none", 0, None  # the last process runs to the end
        expected = newest_complete(out)
        code, text = launch(inputs, out, kind, n, kill_after)
        history.append((kind, n, kill_after, code))
        note = f"process {len(history)} ({kind} {n} {kill_after}), rc {code}:\n{text[-3000:]}"
        assert code in (0, -signal.SIGKILL), note
        if expected is None:
            assert "resumed from" not in text, note
        elif "resumed from" in text or code == 0:
            assert f"resumed from {expected}:" in text, note
        finished = code == 0
        # between kills, now and then: the newest checkpoint damaged (while an older complete one exists),
        # or a decoy folder a person left
        sealed = [p for p in C.ckpt_dirs(out) if not C.file_problems(p)]
        if not finished and len(sealed) >= 2 and rng.random() < 0.5:
            damage = rng.choice(sorted(CORRUPTIONS))
            from pathlib import Path
            CORRUPTIONS[damage](Path(sealed[-1]))
            history[-1] += (f"damaged {os.path.basename(sealed[-1])}: {damage}",)
        if not finished and rng.random() < 0.2 and os.path.isdir(os.path.join(out, "ckpt")):
            os.makedirs(os.path.join(out, "ckpt", "step_999999"), exist_ok=True)
            if sealed:
                shutil.copytree(sealed[0], sealed[0] + "_backup", dirs_exist_ok=True)

    kinds = {h[0] for h in history}
    print(f"chaos seed {seed}: {len(history)} processes in {time.time() - t0:.0f} s:", *history, sep="\n  ")
    assert len(history) > len(FORCED) and {"torch_save", "rename", "save_file"} <= kinds
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == list(range(STEPS))  # every step exactly once, in order
    assert stable(logged) == stable(reference)
    a = M.from_pretrained(str(tmp_path / "reference" / "hf")).state_dict()
    b = M.from_pretrained(os.path.join(out, "hf")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [d for d in os.listdir(out) if d.startswith(".tmp-hf")]
