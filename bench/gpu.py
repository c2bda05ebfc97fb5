"""
The GPU check: one command that runs every GPU measurement of this repository on one H100/H200 in at
most 8 minutes (the first Triton compile included) and writes one results file.

    bench/gpu.sh --fetch-wheels        # here, with internet: pure-Python wheels the GPU box lacks -> .whl/
    bench/gpu.sh --commit $(git rev-parse --short HEAD) --out DIR
                                       # on the GPU: every stage; DIR/results.json (default runs/gpu/<date>-<commit>/)
    bench/gpu.sh --smoke               # CPU: the same stages at tiny shapes (tests/test_gpu_check.py runs it in CI)
    bench/gpu.sh --only kernels,rollout --budget 300      # a subset, a shorter deadline; --list shows the stages

Stages run in this order, each under its own time cap and all under one deadline (--budget, 480 s): a
stage is cut at min(its cap, the time left) and a stage with under 10 s left is skipped, so one hang
cannot eat the budget and the file is written whatever happens (after every stage, too).

    env            device, commit, date, versions; installs missing wheels from .whl/ (pip --no-index)
    cuda-tests     pytest on the tests that skip without CUDA (a skipif whose reason names CUDA or a GPU)
    kernels        bench/kernels.py --full: every kernel against its twin at the real shape (max diff,
                   timings, % of copy bandwidth), the engine's start-up self-check, the compiled
                   kernels' registers / spills / shared memory as the JIT built them
    rollout        bench/rollout.py --full, kernels and CUDA graphs on, beside transformers' generate:
                   batch 1 and 64 at 1K context (the 10x and 3x targets)
    rollout-long   the same at 8K context, batch 1 and 256, without transformers (the 60%-of-limit targets;
                   transformers' generate at 256 x 8K alone would take minutes)
    train-step     bench/train_step.py --full: the 8K-stage step's phases and the trainer's memory figures
    logprobs       bench/logprobs.py --full: fused log-probs vs naive, time and memory at N=16,384
    rollout-twins  NANOSCALER_KERNELS=0 bench/rollout.py --full at the rollout stage's cells (PyTorch twins)

The GPU machine has no internet and no checkpoint: every benchmark uses random weights at the real
shape. results.json holds the device, commit, date and versions, and per stage the command, exit code,
seconds, whether it timed out, every markdown table it printed (parsed into rows: every figure) and
its output; a short table of the key figures is printed last.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
# pure-Python wheels the GPU machine may lack: (distribution, version prefix it must have, pip requirement)
NEEDED = [("antlr4-python3-runtime", "4.11", "antlr4-python3-runtime==4.11.1"), ("pytest", "", "pytest==9.0.3")]
FETCH = [r for _, _, r in NEEDED] + ["pluggy", "iniconfig", "packaging", "pygments", "exceptiongroup", "tomli",
                                     "typing_extensions"]  # pytest's dependencies (the last three: Python < 3.11)
PY = sys.executable


@dataclass
class Stage:
    name: str
    full: list  # the command on the GPU
    smoke: list  # the command of --smoke (CPU, tiny shapes)
    cap: float  # seconds, at most (--smoke: capped at 300)
    env: dict = field(default_factory=dict)


STAGES = [
    Stage("cuda-tests", [PY, "-m", "pytest", "-q", "-p", "gpu", "tests"],
          [PY, "-m", "pytest", "-q", "-p", "gpu", "tests/test_kernels.py"], 100),
    Stage("kernels", [PY, "bench/kernels.py", "--full"], [PY, "bench/kernels.py", "--smoke"], 90),
    Stage("rollout", [PY, "bench/rollout.py", "--full", "--batches", "1,64", "--contexts", "1024"],
          [PY, "bench/rollout.py", "--batches", "1", "--contexts", "8", "--gen", "2"], 90),
    Stage("rollout-long", [PY, "bench/rollout.py", "--full", "--batches", "1,256", "--contexts", "8192", "--no-hf"],
          [PY, "bench/rollout.py", "--batches", "1,2", "--contexts", "8", "--gen", "2", "--no-hf"], 100),
    Stage("train-step", [PY, "bench/train_step.py", "--full"],
          [PY, "bench/train_step.py", "--prompts", "1", "--group", "2", "--max-response", "8", "--mean", "4"], 150),
    Stage("logprobs", [PY, "bench/logprobs.py", "--full"],
          [PY, "bench/logprobs.py", "--n", "16", "--hidden", "32", "--vocab", "256", "--reps", "1", "--dtype", "fp32",
           "--skip", "naive", "liger"], 60),
    Stage("rollout-twins", [PY, "bench/rollout.py", "--full", "--batches", "1,64", "--contexts", "1024", "--no-hf"],
          [PY, "bench/rollout.py", "--batches", "1", "--contexts", "8", "--gen", "2", "--no-hf"], 60,
          env={"NANOSCALER_KERNELS": "0"}),
]
MIN_STAGE_S = 10  # a stage with less time left than this is skipped, not started


# ----------------------------------------------------------------------------- pytest plugin (pytest -p gpu)


def pytest_collection_modifyitems(config, items):
    """Keep only the tests that skip without CUDA: those with a skipif whose reason names CUDA or a GPU."""
    def cuda_only(item):
        return any(re.search(r"cuda|gpu", str(m.kwargs.get("reason", "")), re.I) for m in item.iter_markers("skipif"))
    dropped = [i for i in items if not cuda_only(i)]
    items[:] = [i for i in items if cuda_only(i)]
    config.hook.pytest_deselected(items=dropped)


# ----------------------------------------------------------------------------- running stages


def run_stage(cmd, cap, env=None, echo=None):
    """cmd in its own process group, killed with all its children after cap seconds (and any children
    left behind when it exits). Returns (exit code, seconds, timed out, output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    chunks, pending, timed_out = [], "", False
    while True:
        left = t0 + cap - time.perf_counter()
        if left <= 0:
            timed_out = True
            break
        if sel.select(timeout=min(left, 1.0)):
            data = os.read(proc.stdout.fileno(), 1 << 16)
            if not data:
                break  # EOF: the stage and everything it started have closed their output
            text = data.decode(errors="replace")
            chunks.append(text)
            *done, pending = (pending + text).split("\n")
            for line in done if echo else ():
                echo(line)
        elif proc.poll() is not None:
            break  # exited, but a child it left behind holds the pipe open
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if pending and echo:
        echo(pending)
    proc.wait()
    return proc.returncode, time.perf_counter() - t0, timed_out, "".join(chunks)


def tables(text):
    """Every markdown table in text: [{"title": the line above it, "rows": [{header: cell}]}]."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s\-:|]+\|\s*$", lines[i + 1]):
            head = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            title = lines[i - 1].strip() if i and not lines[i - 1].startswith("|") else ""
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(head, cells)))
                i += 1
            found.append({"title": title, "rows": rows})
        else:
            i += 1
    return found


def key_figures(name, result):
    """A few figures per stage for the closing table (all figures are in results.json)."""
    out, rows = result.get("output", ""), [r for t in result.get("tables", []) for r in t["rows"]]
    if name == "cuda-tests":
        m = re.findall(r"^=*\s*(\d+ \w+.*?) in [\d.]+s", out, re.M)
        return m[-1] if m else ""
    if name == "kernels":
        return "; ".join(f"{r['kernel'].split(' (')[0]} {r['shape']}: {r['Triton us']} us ({r['% of copy bw']})"
                         for r in rows if r.get("kernel", "").startswith(("decode", "sampling")) and r.get("Triton us"))
    if name.startswith("rollout"):
        return "; ".join(f"B={r['batch']} ctx={r['context']}: {r['engine decode tok/s']} tok/s "
                         f"({r.get('engine % of limit')} of limit"
                         f"{', HF ' + r['HF decode tok/s'] if r.get('HF decode tok/s', '-') != '-' else ''})"
                         for r in rows if "batch" in r and "engine decode tok/s" in r)
    if name == "train-step":
        step = [r for r in rows if "step" in r.get("phase", "")]
        peak = re.findall(r"peak GPU memory [\d.]+ GB", out)
        return "; ".join([f"step {step[0]['seconds'].strip('*')} s" if step else ""] + peak[-1:])
    if name == "logprobs":
        found = re.findall(r"^(ours|naive|liger)\s+([\d.]+)\s+\S+\s+\S+\s+(\d+)", out, re.M)  # its fixed-width table
        return "; ".join(f"{impl} fwd+bwd {s} s, {mib} MiB extra" for impl, s, mib in found)
    return ""


# ----------------------------------------------------------------------------- environment and wheels


def shown(cmd):
    return shlex.join(["python" if c == PY else c for c in cmd])


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def missing_wheels():
    """[(requirement, why)] for NEEDED distributions absent or at the wrong version."""
    missing = []
    for dist, prefix, req in NEEDED:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append((req, "not installed"))
            continue
        if not version.startswith(prefix):
            missing.append((req, f"version {version}"))
    return missing


def install_wheels(echo):
    """Install what is missing from .whl/ only (the GPU box has no internet). Returns notes."""
    notes = []
    for req, why in missing_wheels():
        cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEELS, req]
        rc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        note = f"{req} ({why}): " + ("installed from .whl/" if rc.returncode == 0 else
                                     f"FAILED to install from .whl/ ({(rc.stderr.strip().splitlines() or ['?'])[-1]})")
        echo(note)
        notes.append(note)
    return notes


def fetch_wheels():
    os.makedirs(WHEELS, exist_ok=True)
    cmd = [PY, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", "any",
           "--implementation", "py", "--python-version", "3.10", "-d", WHEELS, *FETCH]
    print(shlex.join(cmd))
    rc = subprocess.run(cmd).returncode
    print("\n".join(sorted(os.listdir(WHEELS))))
    sys.exit(rc)


DEVICE_PROBE = """
import json, os, torch
d = dict(torch=torch.__version__, cuda=torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
             memory_gb=round(p.total_memory / 1e9, 1), devices=torch.cuda.device_count())
else:
    d["device"] = f"CPU ({os.cpu_count()} cores), no CUDA"
print(json.dumps(d))
"""


def environment(commit, smoke, echo):
    """Versions and the device, probed in a child process: this one never creates a CUDA context (it
    would hold GPU memory through every stage and shift the trainer's memory figures)."""
    from_git = git("rev-parse", "--short", "HEAD")
    env = dict(commit=commit or from_git or "unknown",
               dirty=bool(git("status", "--porcelain", "--untracked-files=no")) if from_git else None,
               date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), smoke=smoke,
               python=sys.version.split()[0])
    probe = subprocess.run([PY, "-c", DEVICE_PROBE], capture_output=True, text=True, timeout=300)
    env.update(json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else
               dict(device=f"probe failed: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"))
    for dist in ("triton", "transformers", "sympy", "antlr4-python3-runtime", "pytest"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    if env.get("capability"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
            env["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = None
    echo(" ".join(f"{k}={v}" for k, v in env.items()))
    return env


# ----------------------------------------------------------------------------- main


def run_stages(stages, smoke, t_start, budget, results, path, echo):
    """Each stage under min(its cap, the time left), results.json rewritten after each."""
    deadline = t_start + budget
    stage_env = {"PYTHONPATH": os.path.join(ROOT, "bench") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                 "PYTHONUNBUFFERED": "1"}  # bench/ on the path: `pytest -p gpu` loads this file's plugin
    for i, s in enumerate(stages):
        cmd = s.smoke if smoke else s.full
        left = deadline - time.perf_counter()
        cap = min(s.cap if not smoke else 300, left)
        r = dict(command=shown(cmd), env=s.env, cap_s=round(cap, 1))
        if cap < MIN_STAGE_S:
            r.update(status="skipped: out of time")
            echo(f"\n=== [{i + 1}/{len(stages)}] {s.name}: skipped, {left:.0f} s left")
        else:
            echo(f"\n=== [{i + 1}/{len(stages)}] {s.name} (cap {cap:.0f} s; {left:.0f} s of {budget:.0f} left): "
                 f"{' '.join(f'{k}={v}' for k, v in s.env.items())} {shown(cmd)}")
            rc, seconds, timed_out, output = run_stage(cmd, cap, {**stage_env, **s.env},
                                                       echo=lambda line, n=s.name: echo(f"[{n}] {line}"))
            status = "timed out" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
            r.update(status=status, exit_code=rc, seconds=round(seconds, 1), timed_out=timed_out,
                     tables=tables(output), output=output[-20000:])
        r["key_figures"] = key_figures(s.name, r)
        results["stages"][s.name] = r
        results["total_s"] = round(time.perf_counter() - t_start, 1)
        with open(path, "w") as f:  # after every stage: a later hang or kill loses nothing
            json.dump(results, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the plumbing only")
    ap.add_argument("--budget", type=float, default=480, help="seconds for everything (default 8 minutes)")
    ap.add_argument("--only", default=None, help="comma-separated stage names")
    ap.add_argument("--out", default=None, help="folder for results.json (default runs/gpu/<date>-<commit>)")
    ap.add_argument("--commit", default=None, help="the commit, where the copy on the GPU has no .git")
    ap.add_argument("--fetch-wheels", action="store_true", help="download the wheels of NEEDED into .whl/ and exit")
    ap.add_argument("--list", action="store_true", help="print the stages and their commands")
    args = ap.parse_args()
    if args.fetch_wheels:
        return fetch_wheels()
    stages = [s for s in STAGES if not args.only or s.name in args.only.split(",")]
    if args.only and len(stages) != len(args.only.split(",")):
        sys.exit(f"--only: unknown stage in {args.only!r}; stages: {', '.join(s.name for s in STAGES)}")
    if args.list:
        for s in STAGES:
            print(f"{s.name:14s} cap {s.cap:4.0f} s  {' '.join(f'{k}={v}' for k, v in s.env.items())} "
                  f"{shown(s.smoke if args.smoke else s.full)}")
        return
    t_start = time.perf_counter()
    echo = lambda line: print(line, flush=True)  # noqa: E731
    notes = install_wheels(echo)
    env = environment(args.commit, args.smoke, echo)
    gpu = env.get("capability") is not None
    if not gpu and not args.smoke:
        sys.exit("bench/gpu.sh: no CUDA device - run it on the GPU, or --smoke here")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(ROOT, "runs", "gpu", f"{stamp}-{env['commit']}{'-smoke' if args.smoke else ''}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = dict(env=env, wheels=notes, budget_s=args.budget, stages={})
    run_stages(stages, args.smoke, t_start, args.budget, results, path, echo)
    print(f"\nGPU check: {env['device']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}, {env['date']}, "
          f"torch {env.get('torch')}, triton {env['triton']}, {results['total_s']:.0f} s of {args.budget:.0f}; {path}")
    print("| stage | status | seconds | key figures |\n|---|---|---|---|")
    for name, r in results["stages"].items():
        print(f"| {name} | {r['status']} | {r.get('seconds', '-')} | {r['key_figures']} |")
    if any(r["status"] != "ok" for r in results["stages"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
