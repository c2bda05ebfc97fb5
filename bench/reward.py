"""
Benchmark and real-data check for reward.py.

  python bench/reward.py --check-golds ../shared/data/test
      every gold of every eval set, boxed the way a model writes it, must earn 1.0, and a really
      different gold (another row's answer) must earn 0.0.
  python bench/reward.py [--mix train|eval|worst] [--batches 10] [--workers 1 2]
      realistic R1-style responses (long reasoning, then a boxed answer; golds from DeepScaleR's
      training set, or the eval sets): responses/s in one process, and latency of a 2,048-response
      training step through Grader at each worker count, also with an answer that hangs sympy.
      --mix worst: 2,048 unique answers that all need sympy (identities, huge powers, towers).
  python bench/reward.py --grade rows.jsonl [--workers 4] [--timeout 5] [--no-think]
      grade a JSONL file of {response, answer} rows and print the accuracy (same as python reward.py FILE).
  python bench/reward.py --corpus tests/data/reward_corpus.jsonl [--show]
      agreement with answer-equivalence cases collected from public graders' test suites: each
      (prediction, gold, verdict) boxed in two R1-style responses (with <think>, and with only </think>).
"""
import argparse
import glob
import json
import os
import random
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grader as G  # noqa: E402
import reward as R  # noqa: E402
import symbolic  # noqa: E402
from fractions import Fraction  # noqa: E402


def load_golds(data_dir):
    out = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
        with open(path) as f:
            out[os.path.basename(path)] = [row["answer"] for row in json.load(f)]
    return out


def model_writes(g):
    """How a model boxes a stored gold: no $ signs, AIME's 025 as 25, AMC's 142.0 as 142."""
    s = re.sub(r"(?<!\\)\$", "", g.strip()).strip()
    if s.isdigit():
        s = str(int(s))
    return s


def number(s):
    """(Fraction, written as a decimal) for a rational constant answer, else None."""
    n = G._number(G.normalize(s).replace(G.THOUSANDS, ""))
    if n is None or len(n.vals) != 1 or not isinstance(n.vals[0], Fraction):
        return None
    return n.vals[0], n.inexact, n.pct


def _value(s):
    """Independent numeric reading of a gold (raw parse_latex, no normalisation), or None."""
    s = s.split("=")[-1]  # "x=5" is the answer 5
    try:
        sp = symbolic.load()
        v = complex(sp.parse_latex_(s).xreplace(
            {sp.Symbol("pi"): sp.pi}).evalf(30))
        return v
    except Exception:
        return None


def really_differs(a, golds_b):
    """a differs from every gold in golds_b as a string and, where both are numbers, in value."""
    for b in golds_b:
        if model_writes(a) == model_writes(b):
            return False
        va, vb = _value(model_writes(a)), _value(model_writes(b))
        if va is not None and vb is not None and abs(va - vb) <= 1e-9 * max(abs(va), abs(vb), 1e-30):
            return False
    return True


def restyled(s):
    """The same answer written the way models also write it."""
    out = [s.replace("\\frac", "\\dfrac")]
    if G.THOUSANDS not in G.normalize(s):  # 58,500 is a number; 58, 500 would be a list
        out.append(s.replace(",", ", "))
    n = number(s)
    if n and "%" not in s:
        out.append(f"x = {s}")
        v = n[0]
        if v.denominator != 1 and 10**6 % v.denominator == 0:  # terminating decimal
            out.append(str(float(v)))
        elif "." in s and "e" not in s and "times" not in s:
            out.append(f"\\frac{{{v.numerator}}}{{{v.denominator}}}")
    if s[:1] in "([" and s[-1:] in ")]":
        out.append(f"\\left{s[0]} {s[1:-1]} \\right{s[-1]}")
    return out


def near_misses(s):
    """Answers that look like the gold but are wrong: off by one, reciprocal, other bracket, reversed."""
    out = []
    n = number(s)
    if n and "%" not in s:
        v = n[0]
        if n[1]:  # a measurement: off by 1%, beyond the 1e-4 tolerance
            out.append(repr(float(v) * 1.01))
        else:
            out.append(str(v + 1) if v.denominator == 1 else f"\\frac{{{v.numerator + 1}}}{{{v.denominator}}}")
        if v != 0:
            out.append(f"-({s})")
        if v not in (0, 1, -1):
            out.append(f"\\frac{{1}}{{{s}}}")
    node = G._struct(G.normalize(s))
    if node[0] == "seq" and len(node[2]) >= 2:
        ns = G.normalize(s)
        out.append({"(": "[", "[": "("}[ns[0]] + ns[1:])
        if node[2][::-1] != node[2] and node[1] == "()" and not all(x[0] == "elem" and number(x[1])
                                                                     is None for x in node[2]):
            out.append("(" + ",".join(x[1] for x in node[2][::-1] if x[0] == "elem") + ")")
    if node[0] == "set" and len(node[1]) >= 2 and all(x[0] == "elem" for x in node[1]):
        out.append(",".join(x[1] for x in node[1][1:]))
    if s.count("\\pm") == 1:
        out.append(s.replace("\\pm", "+"))
    return out


def check_golds(data_dir):
    failures, n_right, n_wrong, n_near = [], 0, 0, 0
    for name, rows in load_golds(data_dir).items():
        golds = [R.gold_strings(g) for g in rows]
        for i, gl in enumerate(golds):
            for g in gl:  # each acceptable form, boxed, earns 1.0
                resp = f"Reasoning...</think>\nSo the answer is $\\boxed{{{model_writes(g)}}}$."
                n_right += 1
                if R.reward(resp, rows[i]) != 1.0:
                    failures.append((name, i, "right answer scored 0", model_writes(g), gl))
                for v in restyled(model_writes(g)):
                    n_right += 1
                    if R.reward(f"...</think> \\boxed{{{v}}}", rows[i]) != 1.0:
                        failures.append((name, i, "restyled right answer scored 0", v, gl))
                for v in near_misses(model_writes(g)):
                    if not really_differs(v, gl):
                        continue
                    n_near += 1
                    if R.reward(f"...</think> \\boxed{{{v}}}", rows[i]) != 0.0:
                        failures.append((name, i, "near miss scored 1", v, gl))
            for k in range(1, len(golds)):  # the next row whose answer really differs
                other = golds[(i + k) % len(golds)]
                if other and really_differs(other[0], gl):
                    break
            resp = f"Reasoning...</think>\nSo the answer is $\\boxed{{{model_writes(other[0])}}}$."
            n_wrong += 1
            if R.reward(resp, rows[i]) != 0.0:
                failures.append((name, i, "wrong answer scored 1", model_writes(other[0]), gl))
    print(f"check-golds: {n_right} right answers (golds boxed as stored and restyled), {n_wrong} other "
          f"rows' answers, {n_near} near misses; {len(failures)} failures")
    for f in failures:
        print("  FAIL", f)
    return failures

# ----------------------------------------------------------------------------------------------
# the answer-equivalence corpus (tests/data/reward_corpus.jsonl; tests/test_reward_corpus.py uses this too)

REASONING = ("Okay, let me work through this. First I set up the equations and simplify. Wait, let me "
             "double-check the arithmetic: that gives \\boxed{17} as a tentative value, but no, I made an error. "
             "Recomputing carefully, everything is consistent now.")


def r1_responses(pred):
    """The prediction as a distilled R1 model ends its answer, in both chat-template styles: the response
    opens with <think> itself, or the template opened it and the response has only </think>."""
    body = pred if "\\boxed" in pred else f"\\boxed{{{pred}}}"
    return [f"<think>\n{REASONING}\n</think>\n\nWe solve step by step.\n\n**Final Answer**\n\\[\n{body}\n\\]",
            f"{REASONING}\n</think>\n\nTherefore, the final answer is ${body}$."]


def corpus_agreement(path, grade):
    """grade(responses, golds) -> rewards. Returns (rows, per-row list of agreeing response styles)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    responses = [r for row in rows for r in r1_responses(row["pred"])]
    rewards = grade(responses, [row["gold"] for row in rows for _ in range(2)])
    return rows, [[(rewards[2 * i + k] == 1.0) == row["same"] for k in range(2)] for i, row in enumerate(rows)]


def corpus_report(path, workers, timeout, show):
    t = time.perf_counter()
    with R.Grader(num_workers=workers, timeout=timeout) as g:
        rows, agree = corpus_agreement(path, g.grade)
        health = g.health()
    print(f"corpus {path}: {len(rows)} cases x 2 response styles, graded in {time.perf_counter() - t:.1f} s {health}")
    groups = {}
    for row, ok in zip(rows, agree):
        for key in ("all", "split " + row["split"], "source " + row["source"], "kind " + row["kind"]):
            groups.setdefault(key, []).extend(ok)
    print(f"| {'group':32s} | responses | agree | % |\n|---|---|---|---|")
    for key in sorted(groups, key=lambda k: (k != "all", k.split()[0] != "split", k)):
        v = groups[key]
        print(f"| {key:32s} | {len(v):5d} | {sum(v):5d} | {100 * sum(v) / len(v):5.1f} |")
    if show:
        for row, ok in zip(rows, agree):
            if not all(ok):
                print(f"  DISAGREE [{row['split']}/{row['source']}] pred {row['pred']!r} gold {row['gold']!r} "
                      f"want {row['same']} (styles agreeing {sum(ok)}/2)")
    return groups

# ----------------------------------------------------------------------------------------------


WORDS = ("Let me think about this carefully . We have the equation and we need to find the value of "
         "x such that the condition holds . Wait , maybe I should double-check that step . Hmm , so "
         "substituting back gives $x^2 + 3x - 4 = 0$ which factors as $(x+4)(x-1) = 0$ . Therefore the "
         "roots are $x = 1$ and $x = -4$ . But the problem asks for the sum of all such values , so "
         "using Vieta we get $\\frac{-b}{a}$ . Alternatively , consider the case where $n$ is odd .").split()


def make_response(rng, answer, n_words):
    think = " ".join(rng.choice(WORDS) for _ in range(n_words))
    if rng.random() < 0.3:  # R1 often boxes intermediate results inside its reasoning too
        think += f" so tentatively \\boxed{{{rng.randint(1, 99)}}} but let me verify."
    return (f"{think}\n</think>\n\nTo summarise, we solved for the quantity step by step.\n\n"
            f"**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]")


def variants(g):
    """Correct answers, mostly written like the gold."""
    out = [g] * 4
    n = number(g)
    if n and n[0].denominator != 1 and n[0].denominator < 1000:
        out += [f"\\dfrac{{{n[0].numerator}}}{{{n[0].denominator}}}", f"x = {g}"]
    elif n:
        out += [f"x = {g}", f"{g}."]
    return out


def nearby(rng, g, golds):
    """A wrong answer a model gives: a nearby integer, a slip in a fraction, or another problem's answer."""
    n = number(g)
    if n and n[0].denominator == 1 and rng.random() < 0.8:
        return str(int(n[0]) + rng.choice([-1, 1]) * rng.choice([1, 1, 2, 3, 10, int(n[0]) or 5]))
    if n and rng.random() < 0.8:
        return f"\\frac{{{n[0].numerator + rng.randint(1, 3)}}}{{{n[0].denominator}}}"
    if rng.random() < 0.5:
        return g + "+1"  # a symbolic slip
    return model_writes(R.gold_strings(rng.choice(golds))[0])


def make_batch(rng, golds, n_prompts=128, group=16, n_words=(1500, 4000)):
    """One training step: per prompt, a pass rate drawn uniformly; right answers mostly written like
    the gold; wrong ones from 1-3 per-group mistakes (so answers repeat within a group); 5 % truncated."""
    responses, answers = [], []
    for _ in range(n_prompts):
        gold = rng.choice(golds)
        g = model_writes(R.gold_strings(gold)[0])
        p_right = rng.random()
        mistakes = [nearby(rng, g, golds) for _ in range(rng.randint(1, 3))]
        for _ in range(group):
            if rng.random() < 0.05:
                responses.append(make_response(rng, g, rng.randint(*n_words))[:-12])  # truncated
            else:
                ans = rng.choice(variants(g)) if rng.random() < p_right else rng.choice(mistakes)
                responses.append(make_response(rng, ans, rng.randint(*n_words)))
            answers.append(gold)
    return responses, answers


# DeepScaleR's training golds (shared/data/train: AIME + MATH) are 67 % integers, 11 % fractions, 10 %
# other numeric expressions (radicals, pi), 12 % symbolic/structured; used when that data is absent.
BUILTIN_GOLDS = [str(n) for n in (3, 7, 12, 25, 36, 48, 100, 113, 204, 315, 601, 899, 2, 5, 10, 18, 24, 60, 90, 120,
                                  1, 4, 6, 9, 16, 30, 45, 64, 72, 144, 210, 243, 500, 1000)] + [
    "\\frac{1}{2}", "\\frac{3}{4}", "\\frac{14}{3}", "-\\frac{5}{12}", "\\frac{7}{64}", "2\\sqrt{3}", "3\\sqrt{13}",
    "\\frac{\\sqrt{2}}{2}", "16\\pi", "\\frac{9\\pi}{2}", "(3,4]", "(2, -1)", "x^3+3x-6", "\\text{(C)}", "0.5"]


def worst_batch(seed, n=2048):
    """Every answer unique and none decided by the exact evaluator: trig and log identities, 1 KB products of
    big powers, towers the guards refuse -- each one a sympy task for a worker."""
    rng, responses, golds = random.Random(seed), [], []
    for i in range(n):
        k, kind = rng.randint(2, 10**6), i % 4
        if kind == 0:
            ans, gold = f"\\sin^2({k}x)+\\cos^2({k}x)", rng.choice(["1", "2"])
        elif kind == 1:
            ans, gold = f"\\ln(e^{{{k % 50}}} x)", f"{k % 50} + \\ln x"
        elif kind == 2:
            ans = "\\cdot".join(f"{p}^{{{4000 + (k + j) % 997}}}" for j, p in enumerate([2, 3, 5, 7, 11, 13] * 8))[:1000]
            gold = str(k)
        else:
            ans, gold = f"{k % 9 + 2}^{{{k % 9 + 2}^{{{k % 9 + 2}^{{{k % 7 + 2}}}}}}}", "1"
        responses.append(make_response(rng, ans, rng.randint(200, 400)))
        golds.append(gold)
    return responses, golds


def time_batches(make, batches, nw, timeout):
    """p50/p99/max seconds of Grader.grade on `batches` fresh batches, and the grader's counters per batch."""
    with R.Grader(num_workers=nw, timeout=timeout) as grader:
        resp, ans = make(10**6)
        grader.grade(resp[:64], ans[:64])
        while not all(w.ready for w in grader._workers):  # every worker (and the spare) booted: not timed
            grader.grade(["</think>\\boxed{\\sin^2 x+\\cos^2 x}"], ["1"])
        grader.stats.clear()
        times, cpu = [], 0.0
        for b in range(batches):
            r2, a2 = make(b + 1)
            t, c = time.perf_counter(), time.process_time()
            grader.grade(r2, a2)
            times.append(time.perf_counter() - t)
            cpu += time.process_time() - c
        times.sort()
        return times, cpu / batches, {k: round(v / batches) for k, v in grader.stats.items()}


def bench(mix, data_dir, batches, worker_counts, timeout):
    if mix == "worst":
        make, desc = worst_batch, "worst case: 2,048 unique answers, all for sympy"
    else:
        golds = [g for rows in load_golds(data_dir).values() for g in rows if R.gold_strings(g)] \
            if os.path.isdir(data_dir) else BUILTIN_GOLDS
        make, desc = (lambda seed: make_batch(random.Random(seed), golds)), f"{mix} mix, golds from {data_dir}"
        resp, ans = make(0)
        R.is_equiv("\\sin^2x+\\cos^2x+e^{0}", "2")  # boot the shared sympy worker outside the timing
        t = time.perf_counter()
        single = [R.reward(r, a) for r, a in zip(resp, ans)]
        dt = time.perf_counter() - t
        print(f"{desc}: one process, reward() per response: {len(resp) / dt:.0f} responses/s "
              f"({dt:.2f} s per 2,048; mean reward {sum(single) / len(single):.3f})")
    print("| mix | workers | batches | p50 s | p99 s | max s | parent CPU s/batch | per batch | load |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for nw in worker_counts:
        times, cpu, st = time_batches(make, batches, nw, timeout)
        p50, p99 = statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]
        print(f"| {mix} | {nw} | {batches} | {p50:.3f} | {p99:.3f} | {times[-1]:.3f} | {cpu:.3f} | {st} | "
              f"{os.getloadavg()[0]:.1f} |")
    if mix == "worst":
        return
    # with the guard off 10^{10^{10}} hangs sympy in C: the pool kills the worker at the timeout
    with R.Grader(num_workers=worker_counts[-1], timeout=timeout, guard=False) as grader:
        grader.grade(*make(10**6))
        lat = []
        for b, at in enumerate((0, 1024, 2047)):  # the hanging answer first, in the middle, last
            r2, a2 = make(100 + b)
            r2[at] = "</think> \\boxed{10^{10^{10}}}"
            t = time.perf_counter()
            assert grader.grade(r2, a2)[at] == 0.0
            lat.append(time.perf_counter() - t)
        print(f"guard off, one hanging answer per batch at 0, 1024, 2047 (timeout {timeout} s): batch "
              f"latency {', '.join(f'{x:.3f}' for x in lat)} s; {grader.health()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-golds", metavar="DIR")
    ap.add_argument("--grade", metavar="JSONL", help="grade {response, answer} rows and print the accuracy")
    ap.add_argument("--corpus", metavar="JSONL", help="agreement on (pred, gold, same) cases; --show lists disagreements")
    ap.add_argument("--show", action="store_true")
    ap.add_argument("--no-think", action="store_true", help="with --grade: responses have no </think>")
    ap.add_argument("--mix", choices=["train", "eval", "worst"], default="train")
    ap.add_argument("--data", help="golds for the train/eval mix (default ../shared/data/train or test; a built-in "
                                   "representative list when absent)")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count()])
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    if args.check_golds:
        sys.exit(1 if check_golds(args.check_golds) else 0)
    if args.corpus:
        sys.exit(0 if corpus_report(args.corpus, args.workers[0], args.timeout, args.show) else 1)
    if args.grade:
        sys.exit(R.grade_file(args.grade, args.timeout, args.workers[0] if len(args.workers) == 1 else None,
                            not args.no_think))
    here = os.path.dirname(os.path.abspath(__file__))
    data = args.data or os.path.join(here, "../../shared/data", "test" if args.mix == "eval" else "train")
    bench(args.mix, data, args.batches, args.workers, args.timeout)
