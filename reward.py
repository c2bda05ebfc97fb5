"""
Outcome reward for GRPO (DeepScaleR): 1.0 if the model's final answer is the ground truth, else 0.0.

The reward is the only signal GRPO learns from: a wrong 0 teaches that a right answer is wrong, a wrong 1
teaches a mistake. This file turns responses into rewards; grader.py decides whether two answers are the
same (symbolic.py is its sympy layer). Dependencies run one way: reward -> grader -> symbolic.

    python reward.py FILE.jsonl [--no-think] [--timeout S] [--workers N]   # grade {response, answer} rows

Rules (where a choice was debatable it follows what the evaluation sets' own golds need):
  Extraction  the last \\boxed{}/\\fbox{} after the last </think> (R1 templates open <think> in the prompt,
              so only </think> is required; think_split="first" is DeepScaleR's rule, see extract_answer);
              boxes joined only by a connector ("\\boxed{-2} and \\boxed{1}") are one answer -2, 1. Golds
              stored boxed are unboxed the same way; an empty gold is dropped.
  Text        $, \\left, spacing, \\displaystyle, \\dfrac/\\tfrac/\\cfrac, \\text{} wrappers are noise.
              Units and words after a value are dropped (42\\text{ cm}, 7 days, 10 square units; one-letter
              units only after a space: 5h may be 5 times h); percent/pct read as %; "and"/"or" join list items;
              a label before = is dropped (x = 5, f(x) = ..., \\frac{AB}{CD} = \\frac23, m\\angle A = 30, [ABC] =),
              but not an expression (x + y = 5 is not 5), and values labelled one each pair by label (x = 1, y = 2
              is y = 2, x = 1, not x = 2, y = 1); a = b = c keeps the last part; an \\approx tail after
              a value is dropped, n \\approx 40 is 40. "(D) Alina", \\textbf{(D) } 12 and "D. x = 42" are the choice D;
              words compare case-blind (Yes = yes). Degrees are dropped from an angle (90^\\circ is 90) and are
              pi/180 inside a trig function (\\cos(90^\\circ - x) is \\sin x).
  Numbers     exact: 2/4 = 1/2 (an unreduced fraction is the same number), 025 = 25, 142.0 = 142, 2 3/4 and
              2\\frac34 are mixed numbers, 3^2 5^3 7 and 2^2 3 5 17 are products (a space multiplies only
              next to a power: 1 000 is 1000). A whole answer 58,500 (commas, no spaces,
              3-digit groups; also x = 58,500) is a thousands-separated number -- a gold only that, an answer
              also the list 58, 500; 12, 500 with a space, and commas inside brackets ((2,251,252)), are lists,
              as the eval golds need (2400, 1350, 864; 27,54,108). x% also reads x/100. A repeating decimal is
              its fraction (0.1\\overline{6} is 1/6).
              A decimal gold (a measurement, or money) accepts answers within 1e-4 relative AND within half a
              unit of its last stated digit (2718.54 rejects 2718.45 and accepts 2718.541; Minerva's 9.6 keeps
              its 1e-4 tolerance); other golds are exact, except that a decimal answer of 10+ significant
              digits stands for the value it rounds (0.142857142857143 is 1/7, 0.1428571 is not; digits past
              the 15th are a double's noise: 7.0710678118654755 is 5\\sqrt2). Values that
              are undefined or complex-infinite (1/0, a clock time 5:00 read as 5/0) equal nothing; clock
              times compare as times (08:34 p.m. is 20:34).
  Structure   a bare comma list is a set (MATH's "all solutions, separated by commas"; duplicates count
              once) -- an ordered answer like "a, h, k" loses only if permuted; \\{..\\} is a set, and bare
              braces do not print ({1, 3} is the list 1, 3); \\emptyset = \\varnothing = \\{\\};
              ( ) and [ ] tuples and intervals are ordered and their brackets matter; a tuple gold may be
              written as a bare list; \\pm gives both signs (and all sign choices inside a tuple); ; separates
              whole solutions; \\cup is a union; matrices compare entrywise, a vector also as a tuple.
  Relations   an inequality in one variable is its interval (x > 2 is (2, \\infty)); two relations are the
              same when LHS - RHS of one is a nonzero constant k times the other's, with the same operator
              (k > 0) or the flipped one (k < 0, inequalities only): 2 - x \\geq 0 is x \\leq 2, 3x-6y+9=0 is
              y = x/2 + 3/2, and \\tan x = b is not \\cot x = b. != is \\neq; x \\neq 1 is the union
              (-\\infty,1) \\cup (1,\\infty).
  Symbolic    letters are variables, equal when equal at random points (e and i are constants); identities
              (\\csc^2 t = 1 + \\cot^2 t) are decided by sympy, numerically, with simplify() last; sympy must
              parse the whole answer (its lenient mode drops what it cannot read); sums and integrals compare
              as written, never evaluated.

Cost and bounds: grader.equal decides most answers in this process without sympy (exact Fractions/Decimals
behind size guards); the rest goes to Grader's worker processes, under a hard per-answer time limit
enforced by killing the worker (a timeout scores 0.0 and is counted in Grader.health()). reward() and
is_equiv() called directly use a shared one-worker Grader, so nothing runs unbounded. If sympy's LaTeX
parser (antlr4-python3-runtime 4.11) cannot load, Grader refuses to start and says what to install.
"""
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter, deque

import grader
import symbolic

# ----------------------------------------------------------------------------------------------
# extraction

MAX_BOX = 4000  # a \boxed{} longer than this is not an answer (and scanning it costs time)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_GAP_NOISE = re.compile(r"\$|\\[()\[\]]|\\(?:quad|qquad|text|textbf|mathrm|mbox)(?![a-zA-Z])|\\[,;:! ]|[{}~]|\s+")


def _box_at(text, start):
    """(content, end) of the \\boxed/\\fbox at start; None if unterminated, empty or absurdly long."""
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": TeX takes the next token
        m = re.match(r"[^\s$]+", text[i:i + 100])
        return (m.group(0), i + m.end()) if m else None
    depth, window = 0, text[i:i + MAX_BOX]
    for m in re.finditer(r"\\.|[{}]", window, re.S):  # \{ and \} are literal braces, not groups
        if m.group(0) == "{":
            depth += 1
        elif m.group(0) == "}":
            depth -= 1
            if depth == 0:
                content = window[1:m.start()].strip()
                return (content, i + m.end()) if content else None
    return None


def boxed_answer(text):
    """The last \\boxed{...} of text, joined with the boxes just before it when only a connector separates
    them ("\\boxed{-2} and \\boxed{1}" is the answer -2, 1); None when there is no complete box."""
    starts = [m.start() for m in _BOX.finditer(text)][-16:]
    if not starts:
        return None
    last = _box_at(text, starts[-1])
    if last is None:
        return None
    parts, nxt = [last[0]], starts[-1]
    for s in reversed(starts[:-1]):
        box = _box_at(text, s)
        if box is None or box[1] > nxt or nxt - box[1] > 400:  # nested in the next one, or far from it
            break
        gap = _GAP_NOISE.sub(" ", text[box[1]:nxt]).strip()
        if len(gap) > 40 or re.search(r"[.:!?]|\n", gap) or not re.search(r"^$|^[,;&]|[,;&]$|\b(?:and|or)\b", gap):
            break
        parts.insert(0, box[0])
        nxt = s
    return ", ".join(parts)


def extract_answer(text, require_think=True, think_split="last"):
    """The final boxed answer after the last </think> (see the module docstring); None when absent.
    think_split="first" is DeepScaleR's rule instead (its reward saw prompt + response): the text must hold
    <think> and </think>, and the answer is sought between the first </think> and the next one."""
    if not isinstance(text, str):
        return None
    if require_think and think_split == "first":
        if "<think>" not in text or "</think>" not in text:
            return None
        text = text.split("</think>")[1]
    elif require_think:
        cut = text.rfind("</think>")
        if cut < 0:
            return None
        text = text[cut + len("</think>"):]
    return boxed_answer(text)


def gold_strings(gold):
    """Golds as stored: "025", 142.0, ["$\\frac{1}{2}$", "0.5\\n"], "\\boxed{24}", a whole solution ending
    in "The final answer is $28\\%$" -> list of answer strings (empty ones dropped)."""
    out = []
    for g in gold if isinstance(gold, (list, tuple)) else [gold]:
        if isinstance(g, bool) or g is None:
            continue
        if isinstance(g, float):
            g = str(int(g)) if g.is_integer() else repr(g)
        g = g if isinstance(g, str) else str(g)
        if "\\boxed" in g or "\\fbox" in g:
            g = boxed_answer(g) or ""
        elif len(g) > 200 and (m := re.findall(r"final answer is:?\s*\$?([^$\n]{1,200}?)\$?\.?\s*(?:I hope|$)", g)):
            g = m[-1]
        if g.strip():
            out.append(g)
    return out


def is_equiv(pred, gold):
    """Are two answer strings the same mathematical answer? (gold decides the numeric tolerance) Bounded:
    what needs sympy runs in a worker under a time limit."""
    r = grader.equal(pred, gold)
    return r if r is not None else _shared_grader().grade_answers([pred], [gold])[0] == 1.0


def reward(response, gold, require_think=True):
    """1.0 if the extracted answer matches any acceptable gold, else 0.0. Bounded like is_equiv."""
    pred = extract_answer(response, require_think)
    if pred is None:
        return 0.0
    fast = [grader.equal(pred, g) for g in gold_strings(gold)]
    if True in fast or None not in fast:
        return float(True in fast)
    return _shared_grader().grade_answers([pred], [gold])[0]


_shared, _shared_lock = None, threading.Lock()


def _shared_grader():
    """One worker for direct reward()/is_equiv() calls (notebooks, eval.py without a Grader), started on
    the first answer that needs sympy and closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared._workers:
            _shared = Grader(num_workers=1, timeout=5.0, spares=0)
            atexit.register(_shared.close)
        return _shared

# ----------------------------------------------------------------------------------------------
# the batch grader: sympy in worker processes under a hard time limit


def _worker_main(guard=True):
    """Worker loop: one JSON task per stdin line, one JSON result per line on the protocol fd."""
    symbolic.GUARD = guard
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    try:  # import sympy and antlr, and exercise evalf and simplify, before "ready"
        symbolic.load().parse_latex_("\\frac{1}{2}")
        grader.equal("\\sin^2x+\\cos^2x+e^{0}", "2", symbolic=True)
    except Exception as e:
        proto.write(json.dumps(["error", f"{type(e).__name__}: {e}"]) + "\n")
        proto.flush()
        return
    proto.write('["ready"]\n')
    proto.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        tid, pred, golds = json.loads(line)
        proto.write(json.dumps([tid, any(grader.equal(pred, g, symbolic=True) is True for g in golds)]) + "\n")
        proto.flush()


class _Worker:
    def __init__(self, guard):
        here = os.path.dirname(os.path.abspath(__file__))
        boot = f"import sys; sys.path.insert(0, {here!r}); import reward; reward._worker_main({guard})"
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
    killed worker's replacement boots. `guard=False` disables the size guards, for tests only.
    Refuses to start (RuntimeError) when sympy's LaTeX parser cannot load."""

    HEALTH = ("sympy", "timeouts", "restarts")

    def __init__(self, num_workers=None, timeout=5.0, spares=1, guard=True, boot_timeout=120.0):
        if num_workers is None:
            num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        if num_workers < 1 or timeout <= 0:
            raise ValueError(f"Grader: need num_workers >= 1 and timeout > 0, got {num_workers}, {timeout}")
        problem = symbolic.parser_problem()
        if problem:
            raise RuntimeError(f"Grader: {problem}")
        self.timeout, self.guard, self.boot_timeout = float(timeout), guard, boot_timeout
        self.stats = Counter()  # responses, no_answer, unique, fast, sympy, timeouts, restarts
        self._reported = Counter()
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

    def health(self):
        """Since the last call: answers sent to sympy, answers that timed out (scored 0.0), workers
        restarted -- as grader_* fields for a metrics row."""
        now = Counter({k: self.stats[k] for k in self.HEALTH})
        out = {f"grader_{k}": now[k] - self._reported[k] for k in self.HEALTH}
        self._reported = now
        return out

    def grade(self, responses, golds, require_think=True, think_split="last"):
        """Rewards (0.0/1.0) for responses against golds, in order (think_split: see extract_answer)."""
        if len(responses) != len(golds):
            raise ValueError(f"Grader.grade: {len(responses)} responses but {len(golds)} golds")
        return self.grade_answers([extract_answer(r, require_think, think_split) for r in responses], golds)

    def grade_answers(self, answers, golds):
        """Rewards for already extracted answers (None: no answer) against golds, in order."""
        if not self._workers:
            raise RuntimeError("Grader.grade: grader is closed")
        groups = {}  # identical (answer, gold) pairs are graded once
        for i, (pred, gold) in enumerate(zip(answers, golds)):
            if pred is not None:
                groups.setdefault((pred, tuple(gold_strings(gold))), []).append(i)
        self.stats.update(responses=len(answers), no_answer=len(answers) - sum(map(len, groups.values())),
                          unique=len(groups))
        verdicts, tasks = {}, []
        for key in groups:
            pred, gl = key
            fast = [grader.equal(pred, g) for g in gl]
            if True in fast or None not in fast:
                verdicts[key] = True in fast
            else:
                tasks.append((key, [g for g, r in zip(gl, fast) if r is None]))
        self.stats.update(fast=len(verdicts), sympy=len(tasks))
        verdicts.update(self._run(tasks))
        out = [0.0] * len(answers)
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
                raise RuntimeError("Grader: no reward worker started; run `python -c 'import reward; "
                                   "reward._worker_main()'` to see why")
            busy = [w.deadline for w in workers if w.task is not None]
            wait = max(0.0, min(busy) - now) if busy else 0.05
            readable, _, _ = select.select([w.fd for w in workers], [], [], min(wait, 0.25))
            for k, w in enumerate(workers):
                msgs = w.read() if w.fd in readable else []
                dead = msgs is None
                for msg in msgs or []:
                    if msg == ["ready"]:
                        w.ready = True
                    elif msg[0] == "error":  # sympy's parser failed to load in a fresh interpreter
                        self.close()
                        raise RuntimeError(f"Grader: reward workers cannot load sympy's LaTeX parser ({msg[1]}); "
                                           f"install {symbolic.ANTLR} {symbolic.ANTLR_VERSION}: "
                                           f"pip install '{symbolic.ANTLR}=={symbolic.ANTLR_VERSION}.*'")
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
    with Grader(workers, timeout) as g:
        scores = g.grade([r["response"] for r in rows], [r["answer"] for r in rows], require_think)
    print(f"accuracy: {sum(scores):.0f}/{len(scores)} = {100 * sum(scores) / max(len(scores), 1):.2f}%  "
          f"({time.time() - t0:.2f} s; {dict(g.stats)})")


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
