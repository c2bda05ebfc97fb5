"""distributed.py: balancing is deterministic and even; FSDP2 on CPU (gloo, 2 processes) shards our
model, computes log-probs inside the forward, and syncs bf16 weights into an engine model exactly."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_balance_is_even_and_complete():
    lengths = [8192, 700, 5000, 5000, 123, 4096, 8192, 1, 300, 2500, 7000]
    parts = D.balance(lengths, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)  # greedy LPT bound
    assert D.balance(lengths, 3) == parts  # every rank computes the same split
    assert D.balance([], 2) == [[], []]
    assert D.balance([5, 5], 1) == [[0, 1]]


def test_single_process_is_a_noop():
    d = D.Dist()
    x = torch.ones(3)
    assert D.all_reduce(x, d) is x and x.tolist() == [1, 1, 1]
    assert D.all_gather_objects({"a": 1}, d) == [{"a": 1}]
    assert D.broadcast_object(7, d) == 7


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{root!r}, {tests!r}]
    import distributed as D, model as M
    from fixtures import tiny_config, random_model
    d = D.setup("cpu")
    cfg = tiny_config()
    policy, full = random_model(cfg, seed=0), random_model(cfg, seed=0)
    D.shard_model(policy, d)
    ids = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(0))
    meta, pos = M.Varlen.from_seqlens([6, 4]), torch.cat([torch.arange(6), torch.arange(4)])
    a = policy(ids, pos, meta, targets=ids)
    b = full(ids, pos, meta, targets=ids)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    engine = random_model(cfg, seed=1).to(torch.bfloat16)
    D.sync_weights(policy, engine)
    for (n, p), q in zip(engine.named_parameters(), full.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), n
    total = D.all_reduce(torch.tensor([d.rank + 1.0]), d)
    assert total.item() == 3.0
    open({out!r} + f"/ok{{d.rank}}", "w").close()  # one marker per rank (printed lines can interleave)
    D.teardown()
""")


def test_fsdp_two_processes_gloo(tmp_path):
    script = tmp_path / "fsdp_check.py"
    script.write_text(SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), out=str(tmp_path)))
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
