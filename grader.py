"""
The batch grader for training: reward.py's fast layers in this process, sympy in worker processes under
a hard per-answer time limit, enforced by killing and replacing the worker (a signal cannot interrupt
sympy stuck in C-level big-integer arithmetic such as 10^{10^{10}}). A timeout scores 0.0; nothing hangs.
Identical (answer, gold) pairs are graded once. `reward.Grader` is this class.

    python reward.py FILE.jsonl      # (or python grader.py FILE.jsonl) grade {response, answer} rows
"""
import json
import os
import select
import subprocess
import sys
import time
from collections import Counter, deque

import reward as R
from reward import _equiv, _gold_strings, extract_answer, is_equiv



def _worker_main(guard=True):
    """Worker loop: one JSON task per stdin line, one JSON result per line on the protocol fd."""
    R._GUARD = guard
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    R._sympy_equal("\\sin^2x+\\cos^2x+e^{0}", "2")  # import sympy, antlr, evalf, simplify before "ready"
    proto.write('["ready"]\n')
    proto.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        tid, pred, golds = json.loads(line)
        proto.write(json.dumps([tid, any(is_equiv(pred, g) for g in golds)]) + "\n")
        proto.flush()


class _Worker:
    def __init__(self, guard):
        here = os.path.dirname(os.path.abspath(__file__))
        boot = f"import sys; sys.path.insert(0, {here!r}); import grader; grader._worker_main({guard})"
        # A fresh interpreter (spawn semantics). multiprocessing's spawn would also re-import the
        # parent's __main__ (train.py, hence torch) in every worker; exec-ing python directly does not.
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf, self.ready, self.task, self.deadline = b"", False, None, 0.0
        self.born = time.monotonic()

    def send(self, tid, pred, golds, timeout):
        self.proc.stdin.write((json.dumps([tid, pred, golds]) + "\n").encode())
        self.proc.stdin.flush()
        self.task, self.deadline = tid, time.monotonic() + timeout

    def read(self):
        """Complete messages so far; None at EOF (the worker died)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x]

    def kill(self):  # SIGKILL: sympy stuck in C would never see a gentler signal
        self.proc.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:  # a dead worker's stdin cannot be flushed
                pass
        self.proc.wait()


class Grader:
    """Batch reward for training. Create it first in train.py, before CUDA/NCCL initialisation:
    workers are fresh interpreters that never import torch, and their start-up (~1 s: sympy +
    antlr) then overlaps model loading. Not thread-safe; one grade() at a time.

    Every sympy comparison runs under `timeout` seconds, enforced by killing and replacing the
    worker (a timeout scores 0.0). `spares` extra workers keep the pool at full strength while a
    killed worker's replacement boots. `guard=False` disables the size guards, for tests only."""

    def __init__(self, num_workers=None, timeout=5.0, spares=1, guard=True, boot_timeout=120.0):
        if num_workers is None:
            num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        if num_workers < 1 or timeout <= 0:
            raise ValueError(f"Grader: need num_workers >= 1 and timeout > 0, got {num_workers}, {timeout}")
        self.timeout, self.guard, self.boot_timeout = float(timeout), guard, boot_timeout
        self.stats = Counter()  # responses, no_answer, unique, fast, sympy, timeouts, restarts
        self._workers = [_Worker(guard) for _ in range(num_workers + spares)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in getattr(self, "_workers", []):
            w.kill()
        self._workers = []

    __del__ = close

    def grade(self, responses, golds, require_think=True):
        """Rewards (0.0/1.0) for responses against golds, in order."""
        if len(responses) != len(golds):
            raise ValueError(f"Grader.grade: {len(responses)} responses but {len(golds)} golds")
        if not self._workers:
            raise RuntimeError("Grader.grade: grader is closed")
        groups = {}  # identical (answer, gold) pairs are graded once
        for i, (resp, gold) in enumerate(zip(responses, golds)):
            pred = extract_answer(resp, require_think)
            if pred is not None:
                groups.setdefault((pred, tuple(_gold_strings(gold))), []).append(i)
        self.stats.update(responses=len(responses), no_answer=len(responses) - sum(map(len, groups.values())),
                          unique=len(groups))
        verdicts, tasks = {}, []
        for key in groups:
            pred, gl = key
            fast = [_equiv(pred, g, False) for g in gl]
            if True in fast or None not in fast:
                verdicts[key] = True in fast
            else:
                tasks.append((key, [g for g, r in zip(gl, fast) if r is None]))
        self.stats.update(fast=len(verdicts), sympy=len(tasks))
        verdicts.update(self._run(tasks))
        out = [0.0] * len(responses)
        for key, idx in groups.items():
            for i in idx:
                out[i] = float(verdicts[key])
        return out

    def _run(self, tasks):
        queue, results, workers = deque(range(len(tasks))), {}, self._workers
        boot_deadline = time.monotonic() + self.boot_timeout
        while len(results) < len(tasks):
            for w in workers:
                if w.ready and w.task is None and queue:
                    tid = queue.popleft()
                    try:
                        w.send(tid, tasks[tid][0][0], tasks[tid][1], self.timeout)
                    except (BrokenPipeError, OSError):
                        queue.appendleft(tid)
                        w.deadline = 0.0  # dead; replaced below
                        w.task = -1
            now = time.monotonic()
            if not any(w.ready for w in workers) and now > boot_deadline:
                raise RuntimeError("Grader: no reward worker started; run `python -c 'import grader; "
                                   "grader._worker_main()'` to see why")
            busy = [w.deadline for w in workers if w.task is not None]
            wait = max(0.0, min(busy) - now) if busy else 0.05
            readable, _, _ = select.select([w.fd for w in workers], [], [], min(wait, 0.25))
            for k, w in enumerate(workers):
                msgs = w.read() if w.fd in readable else []
                dead = msgs is None
                for msg in msgs or []:
                    if msg == ["ready"]:
                        w.ready = True
                    elif msg[0] == w.task:
                        results[tasks[msg[0]][0]] = bool(msg[1])
                        w.task = None
                timed_out = w.task is not None and time.monotonic() > w.deadline
                if dead or timed_out or (not w.ready and time.monotonic() - w.born > self.boot_timeout):
                    if w.task is not None and w.task >= 0:
                        results[tasks[w.task][0]] = False  # a timeout (or crash) scores 0.0
                        self.stats["timeouts"] += 1
                    w.kill()
                    workers[k] = _Worker(self.guard)
                    self.stats["restarts"] += 1
        return results


def grade_file(path, timeout=5.0, workers=None, require_think=True):
    """Grade a JSONL file of {"response", "answer"} rows through the Grader and print the accuracy."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e})")
            if row is not None and not (isinstance(row, dict) and "response" in row and "answer" in row):
                raise SystemExit(f"{path}:{n}: row needs 'response' and 'answer' fields")
            rows += [row] if row is not None else []
    t0 = time.time()
    with Grader(workers, timeout) as grader:
        scores = grader.grade([r["response"] for r in rows], [r["answer"] for r in rows], require_think)
    print(f"accuracy: {sum(scores):.0f}/{len(scores)} = {100 * sum(scores) / max(len(scores), 1):.2f}%  "
          f"({time.time() - t0:.2f} s; {dict(grader.stats)})")


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="grade {response, answer} JSONL rows and print the accuracy")
    ap.add_argument("file")
    ap.add_argument("--no-think", action="store_true", help="responses have no </think> (search the whole text)")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    grade_file(a.file, a.timeout, a.workers, not a.no_think)


if __name__ == "__main__":
    main()
