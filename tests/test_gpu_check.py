"""bench/gpu.sh, the one command for the GPU, cannot rot between GPU runs: its CPU smoke mode runs every
stage at tiny shapes and writes the results file; its stage runner cuts a hung stage (and what it
started) at the stage's cap, and skips stages the deadline leaves no time for."""
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench/gpu.py by path: bench/ on sys.path would shadow the project's reward.py, model.py, ... for every later test
_spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "bench", "gpu.py"))
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def test_smoke_runs_every_stage_and_writes_the_results_file(tmp_path):
    """Cost: ~60 CPU-seconds (8 Python processes, each importing torch), ~180 s wall on the shared
    2-core machine at load 11-12."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the stages decide for themselves
    run = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["env"]["smoke"] and res["env"]["torch"] and res["env"]["commit"]
    assert list(res["stages"]) == [s.name for s in gpu.STAGES]
    assert all(s["status"] == "ok" and not s["timed_out"] for s in res["stages"].values())
    rows = lambda name: [r for t in res["stages"][name]["tables"] for r in t["rows"]]  # noqa: E731
    assert "2 skipped" in res["stages"]["cuda-tests"]["key_figures"]  # test_kernels.py's CUDA-only tests, selected
    assert {r.get("kernel") for r in rows("kernels")} >= {"decode attention (1 layer)", "KV write (1 layer)"}
    assert "self-check" in res["stages"]["kernels"]["output"] and "passed" in res["stages"]["kernels"]["output"]
    for name in ("rollout", "rollout-long", "rollout-twins"):
        assert any(r.get("engine decode tok/s") for r in rows(name)), name
    assert res["stages"]["rollout-twins"]["env"] == {"NANOSCALER_KERNELS": "0"}
    assert any("step" in r.get("phase", "") for r in rows("train-step"))
    assert "ours" in res["stages"]["logprobs"]["key_figures"]
    closing = run.stdout[run.stdout.rindex("| stage | status |"):]  # the short table comes last
    assert closing.count("| ok |") == len(gpu.STAGES)


def test_stage_runner_cuts_a_hang_and_its_children():
    """A stage that prints then hangs is killed at its cap with its output kept; a stage that exits but
    leaves a child holding the pipe returns at once, and the child is killed. Cost: ~3 s."""
    rc, seconds, timed_out, out = gpu.run_stage([sys.executable, "-c", "print('started', flush=True); "
                                                 "import time; time.sleep(60)"], cap=2)
    assert timed_out and 2 <= seconds < 10 and "started" in out and rc != 0
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(p.pid, flush=True)")
    rc, seconds, timed_out, out = gpu.run_stage([sys.executable, "-c", code], cap=30)
    assert rc == 0 and not timed_out and seconds < 10
    child = int(out.split()[0])
    time.sleep(0.5)
    try:
        os.kill(child, 0)
        alive = open(f"/proc/{child}/stat").read().split()[2] != "Z"  # a zombie awaiting init is dead
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive


def test_stages_past_the_deadline_are_skipped(tmp_path):
    """--budget 5 leaves no stage its 10 s minimum: recorded as skipped, exit code 1. Cost: ~5 s."""
    run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--only", "logprobs", "--budget", "5",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["stages"]["logprobs"]["status"] == "skipped: out of time"
    assert "| logprobs | skipped: out of time |" in run.stdout


def test_markdown_tables_become_rows():
    text = "intro\ndevice X, commit abc\n| a | b |\n|---|---:|\n| 1 | 2,048 |\n| 3 | - |\nafter\n| c |\n|---|\n| x |\n"
    assert gpu.tables(text) == [
        {"title": "device X, commit abc", "rows": [{"a": "1", "b": "2,048"}, {"a": "3", "b": "-"}]},
        {"title": "after", "rows": [{"c": "x"}]}]
