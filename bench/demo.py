"""
The README's CPU-demo figures, measured the way the README states them: the whole command from a clean
output folder (data, warm-start, 500 GRPO steps, export, plot), and its shuffled-advantages control.

    python bench/demo.py                    # both runs, one after the other (~15-45 min on 2 cores)
    python bench/demo.py --runs grpo        # the GRPO run only

Each run is `python train.py config/demo.py --out_dir=out/bench_demo/RUN [--shuffle_advantages]` in a
child process; its console goes to out/bench_demo/RUN.log. Printed last: one README table row per run
(rewards from metrics.jsonl: mean of the first 10 steps, the step where ~300 s of GRPO time is reached,
mean of the last 10 steps; GRPO time = the sum of the steps' times) and the conditions to state beside
them (CPU, load average before and after, torch, commit, date). The run is deterministic for one machine,
library build and thread count, not across them: give figures from several machines as a range.
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"grpo": [], "shuffled": ["--shuffle_advantages"]}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run(name, out_root, extra):
    out_dir = os.path.join(out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)  # the script's own folder: the warm-start is timed too
    os.makedirs(out_root, exist_ok=True)
    cmd = [sys.executable, "train.py", "config/demo.py", f"--out_dir={out_dir}"] + RUNS[name] + extra
    print(f"{name}: {' '.join(cmd[1:])} > {out_dir}.log", flush=True)
    load0, t0 = os.getloadavg()[0], time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_dir + ".log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            step = re.match(r"step (\d+)/", line)
            if line.startswith("demo") or (step and int(step[1]) % 100 in (0, 1)):
                print(f"  {line.rstrip()}", flush=True)  # the warm-start's lines and a few steps, not 500
    if proc.wait():
        raise SystemExit(f"{name}: train.py exited with {proc.returncode}; see {out_dir}.log")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.time() - t0
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"name": name, "rows": rows, "wall": wall, "load": (load0, os.getloadavg()[0]),
            "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)}


def summary(res, grpo_seconds=300.0):
    rows = res["rows"]
    mean = lambda rs: sum(r["reward_mean"] for r in rs) / len(rs)  # noqa: E731
    elapsed, at = 0.0, rows[-1]
    for r in rows:
        elapsed += r["time_step"]
        if elapsed >= grpo_seconds:
            at = r
            break
    return {"first10": mean(rows[:10]), "at300": at["reward_mean"], "at300_step": at["step"] + 1,
            "last10": mean(rows[-10:]), "grpo_s": sum(r["time_step"] for r in rows), "steps": len(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="grpo,shuffled", help="comma-separated: " + ",".join(RUNS))
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench_demo"))
    ap.add_argument("--max-steps", type=int, default=0, help="stop early (a smoke test of this script)")
    args = ap.parse_args()
    names = [n for n in args.runs.split(",") if n]
    if any(n not in RUNS for n in names):
        raise SystemExit(f"--runs: choose from {list(RUNS)}")
    extra = [f"--max_steps={args.max_steps}"] if args.max_steps else []
    results = [run(n, args.out, extra) for n in names]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    import torch
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; commit {commit}{' (modified)' if dirty else ''}; "
          f"{datetime.date.today()}; `python bench/demo.py {' '.join(sys.argv[1:])}`\n")
    print("| run | reward, first 10 steps | after ~300 s of GRPO | last 10 steps | GRPO time | whole command | "
          "CPU time | load average (start / end) |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        s = summary(res)
        print(f"| {res['name']} | {s['first10']:.3f} | {s['at300']:.3f} (step {s['at300_step']}) | {s['last10']:.3f} "
              f"({s['steps']}) | {s['grpo_s']:.0f} s | {res['wall'] // 60:.0f} min {res['wall'] % 60:.0f} s | "
              f"{res['cpu_s']:.0f} s | {res['load'][0]:.1f} / {res['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
