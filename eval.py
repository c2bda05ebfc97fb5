"""
Evaluation: pass@1 over the DeepScaleR test sets (AIME 2024, AMC 2023, MATH-500, Minerva Math,
OlympiadBench), laid out like the paper's table, with the published numbers beside ours.

    python eval.py --ckpt CKPT_DIR --data DATA_DIR --out runs/eval
    torchrun --nproc_per_node=8 eval.py --ckpt CKPT_DIR --data DATA_DIR --out runs/eval
    python eval.py ... --sets aime --samples 4 --max-tokens 2048  # a short eval
    python eval.py --ckpt out/demo/hf --data out/demo/demo/val.json --samples 4 --max-tokens 24  # the CPU demo

The published protocol by default: 16 samples per problem, temperature 0.6, top_p 0.95, 32,768 new
tokens; pass@1 is the mean correctness, printed with its standard error (the sampling noise of n
samples), plus the unbiased pass@k for k <= n.

Every sample is appended to OUT/samples.jsonl (one shard per rank under torchrun) as soon as its chunk
of problems finishes, so an interrupted eval resumes where it stopped. Every set is spread over all
ranks (a contiguous slice each: AIME's 30 problems keep 8 GPUs busy, not one), each slice cut into
chunks of chunk_size problems per generate() call. A sample's draws are keyed by (seed, set, problem
index, sample, position), so it is the same whatever the number of ranks or chunks, and whether or not
the run was interrupted.

The trainer's periodic validation calls evaluate() in-process with its own engine and grader.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

# Published pass@1 (%) from the DeepScaleR blog / README, in the paper's column order.
SETS = {"aime": "AIME 2024", "math": "MATH 500", "amc": "AMC 2023", "minerva": "Minerva Math",
        "olympiad_bench": "OlympiadBench"}
PUBLISHED = {
    "DeepSeek-R1-Distill-Qwen-1.5B": {"aime": 28.8, "math": 82.8, "amc": 62.9, "minerva": 26.5,
                                      "olympiad_bench": 43.3, "avg": 48.9},
    "DeepScaleR-1.5B-Preview": {"aime": 43.1, "math": 87.8, "amc": 73.6, "minerva": 30.2,
                                "olympiad_bench": 50.0, "avg": 57.0},
}


@dataclass
class EvalConfig:
    n: int = 16                    # samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 32768        # new tokens per sample
    seed: int = 0
    require_think: bool = True     # grading: the answer must follow </think> (False: --no-think)
    think_template: bool | None = None  # prompt: end with "<think>\n"? None follows the checkpoint
    max_prompt_tokens: int = 2048  # longer prompts are reported and left out, never silently
    chunk_size: int = 64           # problems per generate() call: the unit of resume
    ks: list = field(default_factory=list)  # pass@k to report; empty: powers of two up to n, and n

    def pass_ks(self):
        ks = self.ks or sorted({2 ** i for i in range(int(math.log2(self.n)) + 1)} | {self.n})
        bad = [k for k in ks if not 1 <= k <= self.n]
        if bad:
            raise ValueError(f"pass@k needs 1 <= k <= n={self.n}, got k={bad}")
        return ks

    def fingerprint(self):
        """What must match for samples on disk to be reused (resume)."""
        d = asdict(self)
        d.pop("ks")  # reporting only
        return d


# -----------------------------------------------------------------------------
# Data: DeepScaleR's JSON test sets (a list of {"problem": str, "answer": str | float | list, ...})


class DataError(ValueError):
    pass


def dataset_golds(answer):
    """A set's gold, once at load, as strings any of which is correct (None if unusable): "025" (AIME: "25"
    added), 142.0 (AMC floats), ["0.01\\n", "0.02\\n"] (Minerva: any of several), ["$2^{1009}$"]
    (OlympiadBench: dollars dropped). reward.gold_strings unpacks what is left (boxes) when grading."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        if not math.isfinite(answer):
            return None
        return [str(int(answer)) if float(answer).is_integer() else repr(float(answer))]
    if isinstance(answer, list):
        golds = [g for a in answer for g in (dataset_golds(a) or [])]
        return list(dict.fromkeys(golds)) or None
    if not isinstance(answer, str):
        return None
    s = strip_dollars(answer.strip()).strip()
    if not s:
        return None
    golds = [s]
    if s.isdigit() and len(s) > 1 and s[0] == "0":
        golds.append(str(int(s)))
    return golds


def strip_dollars(s):
    """Remove math-mode delimiters ($...$, and $a$,$b$ lists), keeping escaped \\$ signs."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(s[i:i + 2])
            i += 2
            continue
        if s[i] != "$":
            out.append(s[i])
        i += 1
    return "".join(out)


def load_dataset(path):
    """-> (rows, skipped). Each row: {"id": row index, "problem", "golds", "answer" (as upstream)}.
    A malformed row is skipped with a message naming the file and row, never a crash."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read test set ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of problems, got {type(data).__name__}")
    rows, skipped = [], []
    for i, r in enumerate(data):
        why = None
        if not isinstance(r, dict):
            why = f"is a {type(r).__name__}, not an object"
        elif not isinstance(r.get("problem"), str) or not r["problem"].strip():
            why = "has no 'problem' text"
        elif dataset_golds(r.get("answer")) is None:
            why = f"has no usable 'answer' ({r.get('answer')!r})"
        if why:
            skipped.append(f"{path}: row {i} {why}; skipped")
            continue
        # the row index is the id: unique and stable, unlike the upstream id fields (idx, unique_id, id)
        rows.append({"id": i, "problem": r["problem"], "golds": dataset_golds(r["answer"]), "answer": r["answer"]})
    return rows, skipped


def load_datasets(data_dir, names):
    datasets, skipped = {}, {}
    for name in names:
        path = os.path.join(data_dir, f"{name}.json")
        if not os.path.exists(path):
            raise DataError(f"{path}: test set not found (see README: DeepScaleR's deepscaler/data/test/*.json)")
        datasets[name], skipped[name] = load_dataset(path)
        for msg in skipped[name] if os.environ.get("RANK", "0") == "0" else []:  # once under torchrun
            print(f"warning: {msg}", file=sys.stderr)
    return datasets, skipped


# -----------------------------------------------------------------------------
# Metrics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass1_stderr(counts):
    """Standard error of pass@1 from sampling, with the problems held fixed: each problem's mean of
    n_i Bernoulli draws has variance p(1-p)/n_i, estimated without bias by p̂(1-p̂)/(n_i-1).
    counts: [(n_i, c_i)]. None when some problem has a single sample."""
    if not counts or any(n < 2 for n, _ in counts):
        return None
    var = sum((c / n) * (1 - c / n) / (n - 1) for n, c in counts)
    return math.sqrt(var) / len(counts)


def summarize(samples, ks):
    """Per-set metrics from sample records {problem_id, reward, length, finish_reason}."""
    by_problem = {}
    for s in samples:
        by_problem.setdefault(s["problem_id"], []).append(s)
    counts = [(len(v), sum(x["reward"] > 0.5 for x in v)) for v in by_problem.values()]
    if not counts:
        return {"problems": 0, "samples": 0, "pass@1": None, "stderr": None, "pass@k": {}}
    n_min = min(n for n, _ in counts)
    correct = [s["length"] for s in samples if s["reward"] > 0.5]
    wrong = [s["length"] for s in samples if s["reward"] <= 0.5]
    truncated = sum(s["finish_reason"] == "length" for s in samples)
    return {
        "problems": len(counts), "samples": len(samples),
        "pass@1": sum(c / n for n, c in counts) / len(counts),
        "stderr": pass1_stderr(counts),
        # spread over problems too: the noise of drawing this problem set from a larger pool
        "stderr_problems": stdev([c / n for n, c in counts]) / math.sqrt(len(counts)) if len(counts) > 1 else None,
        "pass@k": {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks if k <= n_min},
        "length": {"mean": mean([s["length"] for s in samples]), "mean_correct": mean(correct),
                   "mean_wrong": mean(wrong), "max": max(s["length"] for s in samples)},
        "truncated": truncated / len(samples),
    }


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def stdev(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt(x, scale=100.0, digits=1):
    return "–" if x is None else f"{x * scale:.{digits}f}"


def markdown_table(results, name="ours"):
    """The paper's table (pass@1 %, ± standard error for ours), published reference rows first;
    then a details table: pass@k, response lengths, truncated fraction."""
    names = list(SETS)
    head = "| Model | " + " | ".join(SETS.values()) + " | Avg. |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for model, row in PUBLISHED.items():
        lines.append(f"| {model} (published) | " + " | ".join(f"{row[k]:.1f}" for k in names) + f" | {row['avg']:.1f} |")
    sets = results["datasets"]
    cells = []
    for k in names:
        r = sets.get(k)
        if r is None or r["pass@1"] is None:
            cells.append("–")
        else:
            cells.append(fmt(r["pass@1"]) + (f" ± {fmt(r['stderr'])}" if r["stderr"] is not None else ""))
    avg = results.get("average")
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(avg) if avg is not None else '–'} |")
    notes = [f"± is the standard error of pass@1 from sampling {results['config']['n']} responses per problem "
             "(the problems held fixed)."] if "config" in results else []
    if avg is None and sets:
        notes.append("Avg. is shown only when all five sets were evaluated.")
    lines += ([""] + notes) if notes else []
    ks = sorted({k for r in sets.values() for k in r["pass@k"]})
    lines += ["", "| Set | problems | samples/problem | " + " | ".join(f"pass@{k}" for k in ks)
              + " | mean len | len correct | len wrong | truncated | left out |",
              "|" + "---|" * (len(ks) + 8)]
    for k, r in sets.items():
        L = r.get("length", {})
        left_out = len(r.get("too_long", [])) + len(r.get("skipped_rows", []))
        lines.append(f"| {SETS.get(k, k)} | {r['problems']} | {r['samples'] // max(r['problems'], 1)} | "
                     + " | ".join(fmt(r["pass@k"].get(kk)) for kk in ks)
                     + f" | {fmt(L.get('mean'), 1, 0)} | {fmt(L.get('mean_correct'), 1, 0)} | "
                     f"{fmt(L.get('mean_wrong'), 1, 0)} | {fmt(r.get('truncated'))}% | {left_out} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Sample records on disk (JSONL, appended as we go)


def shard_path(out_jsonl, rank, world_size):
    if world_size == 1:
        return out_jsonl
    stem, ext = os.path.splitext(out_jsonl)
    return f"{stem}.rank{rank}{ext}"


STAT_FIELDS = ("dataset", "problem_id", "sample", "reward", "length", "finish_reason")


def record_problem(r):
    """Why a parsed samples.jsonl line cannot be reused (None: it can). The metrics read these fields."""
    if not isinstance(r, dict):
        return f"is a {type(r).__name__}, not an object"
    for name, ok in (("dataset", lambda v: isinstance(v, str)), ("finish_reason", lambda v: isinstance(v, str)),
                     ("problem_id", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                     ("sample", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                     ("length", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                     ("reward", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))):
        if name not in r:
            return f"has no '{name}'"
        if not ok(r[name]):
            return f"has '{name}' = {json.dumps(r[name])[:40]}, not a valid value"
    return None


def read_records(out_jsonl, compact=False, report=None):
    """All records in out_jsonl and its rank shards, keyed (set, problem_id, sample). A line that is not
    a usable record (cut short by an interruption, or a field of the wrong type) is left out, so its
    chunk is sampled again, and named in `report` (a list of messages) when given. compact: only the
    fields metrics need (a full 32K-token eval holds ~1 GB of response text)."""
    stem, ext = os.path.splitext(out_jsonl)
    records = {}
    for path in [out_jsonl] + sorted(glob.glob(f"{glob.escape(stem)}.rank*{ext}")):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                    why = record_problem(r)
                except json.JSONDecodeError:
                    why = "is not valid JSON (cut short?)"
                if why:
                    if report is not None and line.strip():
                        report.append(f"{path}:{lineno}: the line {why}; its sample is drawn again")
                    continue
                records[(r["dataset"], r["problem_id"], r["sample"])] = {k: r[k] for k in STAT_FIELDS} if compact else r
    return records


def append_records(path, records):
    with open(path, "a+") as f:
        if f.tell() > 0:  # after an interrupted write the last line may lack its newline
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_meta(out_jsonl, meta, write):
    """Samples on disk are reused only if they were drawn with the same settings. A samples.meta.json that
    cannot be read says nothing about them: they are moved aside (named, never deleted) and drawn again."""
    path = os.path.splitext(out_jsonl)[0] + ".meta.json"
    old = read_meta(path) if os.path.exists(path) else None
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{path}: the samples next to it were drawn with different settings "
                             + ", ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, (a, b) in diff.items())
                             + "; use another --out or delete them")
    elif write:
        if os.path.exists(path):
            stem, ext = os.path.splitext(out_jsonl)
            for p in [out_jsonl, path] + glob.glob(f"{glob.escape(stem)}.rank*{ext}"):
                if os.path.exists(p):
                    os.replace(p, p + ".unverified")
            print(f"warning: {path} is not a valid settings file; the samples beside it were moved to "
                  "*.unverified and are drawn again", file=sys.stderr)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)


def read_meta(path):
    try:
        with open(path) as f:
            old = json.load(f)
        return old if isinstance(old, dict) else None
    except (OSError, ValueError):
        return None


# -----------------------------------------------------------------------------
# Generation and grading


def make_prompts(tokenizer, datasets, cfg, verbose=True):
    """Tokenized prompts per set; prompts over max_prompt_tokens are reported and left out (the
    decision depends only on the data, so chunks stay the same across resumes)."""
    prompts, too_long = {}, {}
    for name, rows in datasets.items():
        prompts[name], too_long[name] = [], []
        for row in rows:
            ids = tokenizer.encode(tokenizer.chat_prompt(row["problem"], think=cfg.think_template))
            if len(ids) > cfg.max_prompt_tokens:
                too_long[name].append(row["id"])
                if verbose:
                    print(f"warning: {name} row {row['id']}: prompt has {len(ids)} tokens > max_prompt_tokens "
                          f"{cfg.max_prompt_tokens}; left out", file=sys.stderr)
            else:
                prompts[name].append((row, ids))
    return prompts, too_long


def chunks(prompts, chunk_size, rank=0, world_size=1):
    """This rank's share: a contiguous slice of every set, cut into chunks of at most chunk_size problems.
    [(set, index of the chunk's first problem in the set, [(row, ids)])]."""
    out = []
    for name, items in prompts.items():
        lo, hi = len(items) * rank // world_size, len(items) * (rank + 1) // world_size
        for c in range(lo, hi, chunk_size):
            out.append((name, c, items[c:min(c + chunk_size, hi)]))
    return out


def set_seed(seed, name):
    # a stable hash (Python's hash() is salted per process), so ranks and resumes agree; the engine keys
    # each draw by the problem's index in its set on top of it (generate's first_prompt_index)
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def grade(responses, golds, require_think, grader):
    """Reward per response: 1.0 if its answer matches any of its gold strings (reward.py takes lists)."""
    if grader is not None:
        return [float(x) for x in grader.grade(responses, golds, require_think=require_think)]
    import reward
    return [float(reward.reward(r, g, require_think=require_think)) for r, g in zip(responses, golds)]


def extract(response, require_think):
    import reward
    return reward.extract_answer(response, require_think=require_think)


def as_engine(engine_or_model, tokenizer, cfg, engine_kwargs=None):
    if not isinstance(engine_or_model, torch.nn.Module):
        return engine_or_model
    import sample  # never past the positions the model was trained for (as sample.py): answers stop there
    limit = min(cfg.max_prompt_tokens + cfg.max_tokens, engine_or_model.config.max_position_embeddings)
    kw = dict(max_model_len=limit, vocab_limit=tokenizer.vocab_size, eos_token_ids=list(tokenizer.eos_token_ids))
    return sample.Engine(engine_or_model, **{**kw, **(engine_kwargs or {})})


def run_chunk(engine, tokenizer, name, index, items, cfg, grader, eos, progress=False):
    """Sample n responses for each problem of the chunk (index: its first problem's index in the set) and
    grade them -> sample records. progress: the engine's own bar (tokens/s, running sequences)."""
    comps = engine.generate([ids for _, ids in items], max_new_tokens=cfg.max_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.n, seed=set_seed(cfg.seed, name),
                            stop_token_ids=eos, progress=progress, first_prompt_index=index)
    if len(comps) != len(items) * cfg.n:
        raise RuntimeError(f"engine returned {len(comps)} completions for {len(items)} prompts x n={cfg.n}")
    texts = [tokenizer.decode(strip_eos(c.token_ids, eos)) for c in comps]
    golds = [items[c.prompt_index - index][0]["golds"] for c in comps]  # the engine numbers prompts from index
    rewards = grade(texts, golds, cfg.require_think, grader)
    records = []
    for c, text, r in zip(comps, texts, rewards):
        row, ids = items[c.prompt_index - index]
        records.append({"dataset": name, "problem_id": row["id"], "sample": c.sample_index, "chunk": index,
                        "response": text, "extracted": extract(text, cfg.require_think), "reward": r,
                        "length": len(c.token_ids), "finish_reason": c.finish_reason, "prompt_tokens": len(ids)})
    return records


def strip_eos(ids, eos):
    ids = list(ids)
    while ids and ids[-1] in eos:
        ids.pop()
    return ids


def evaluate(engine_or_model, tokenizer, datasets, *, n=16, temperature=0.6, top_p=0.95, top_k=-1,
             max_tokens=32768, seed=0, require_think=True, think_template=None, max_prompt_tokens=2048,
             chunk_size=64, ks=(), grader=None, out_jsonl=None, resume=True, rank=0, world_size=1,
             run_info=None, progress=True, engine_kwargs=None):
    """Sample, grade and summarize. datasets: {set name: rows from load_dataset}. Every set is split over
    the ranks; every rank returns the same results (compact stats are all-gathered).
    With out_jsonl, each sample is appended to it (rank shards under world_size > 1) and, with
    resume, samples already there are reused. A model gets a fresh sample.Engine (engine_kwargs)."""
    cfg = EvalConfig(n, temperature, top_p, top_k, max_tokens, seed, require_think, think_template,
                     max_prompt_tokens, chunk_size, list(ks))
    ks = cfg.pass_ks()
    engine = as_engine(engine_or_model, tokenizer, cfg, engine_kwargs)
    eos = list(tokenizer.eos_token_ids)
    prompts, too_long = make_prompts(tokenizer, datasets, cfg, verbose=rank == 0)
    mine = chunks(prompts, chunk_size, rank, world_size)
    done, path = {}, None
    if out_jsonl:
        os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
        path = shard_path(out_jsonl, rank, world_size)
        meta = {**cfg.fingerprint(), "sample_keys": "per-problem", **(run_info or {})}  # not per chunk, as before
        if not resume and rank == 0:
            for p in [out_jsonl] + glob.glob(f"{glob.escape(os.path.splitext(out_jsonl)[0])}.rank*.jsonl"):
                if os.path.exists(p):
                    os.remove(p)
            meta_path = os.path.splitext(out_jsonl)[0] + ".meta.json"
            if os.path.exists(meta_path):
                os.remove(meta_path)
        if rank == 0:  # first: it may move unverifiable samples aside
            check_meta(out_jsonl, meta, write=True)
        barrier(world_size)
        if rank != 0:
            check_meta(out_jsonl, meta, write=False)
        report = []
        done = read_records(out_jsonl, compact=True, report=report) if resume else {}
        for msg in report if rank == 0 else []:
            print(f"warning: {msg}", file=sys.stderr)

    total = sum(len(items) for _, _, items in mine) * cfg.n
    bar = make_bar(total, progress and rank == 0)
    stats, new_tokens, t0 = [], 0, time.perf_counter()
    for name, index, items in mine:
        keys = [(name, row["id"], s) for row, _ in items for s in range(cfg.n)]
        have = [done.get(k) for k in keys]
        if all(have):
            records = have
        else:  # sample the whole chunk again: it is deterministic, so the samples already on disk recur
            records = run_chunk(engine, tokenizer, name, index, items, cfg, grader, eos,
                                progress and rank == 0 and sys.stderr.isatty())
            new = [r for r in records if (r["dataset"], r["problem_id"], r["sample"]) not in done]
            new_tokens += sum(r["length"] for r in records)
            if path:
                append_records(path, new)
        stats += [{k: r[k] for k in STAT_FIELDS} for r in records]
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{new_tokens / max(elapsed, 1e-9):,.0f} tok/s")
        bar.update(len(records))
    bar.close()
    elapsed = time.perf_counter() - t0

    stats, new_tokens, elapsed = gather(stats, new_tokens, elapsed, world_size)
    results = {"config": asdict(cfg), "run_info": run_info or {}, "datasets": {}, "throughput": {
        "generated_tokens": new_tokens, "seconds": elapsed, "tokens_per_s": new_tokens / max(elapsed, 1e-9)}}
    for name in datasets:
        r = summarize([s for s in stats if s["dataset"] == name], ks)
        r["too_long"] = too_long[name]
        results["datasets"][name] = r
    vals = [results["datasets"].get(k, {}).get("pass@1") for k in SETS]
    results["average"] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    return results


def make_bar(total, enabled, stream=None):
    """Advances a chunk at a time, for the ETA of the whole eval. On a terminal, a tqdm bar (and the
    engine's bar shows the chunk in flight); piped into a log, plain lines instead of cursor movements."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return PlainProgress(total, stream)
    from tqdm import tqdm
    return tqdm(total=total, unit="sample", desc="eval", disable=not enabled, dynamic_ncols=True, file=stream)


class PlainProgress:
    """tqdm's update / set_postfix_str / close as one line per `every` seconds (and a last one)."""
    every = 30.0

    def __init__(self, total, stream):
        self.total, self.stream, self.n, self.postfix = total, stream, 0, ""
        self.t0 = self.last = time.perf_counter()

    def update(self, n):
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self.print()

    def set_postfix_str(self, s):
        self.postfix = s

    def print(self):
        self.last = now = time.perf_counter()
        took = now - self.t0
        eta = took / self.n * (self.total - self.n) if self.n else float("nan")
        print(f"eval: {self.n}/{self.total} samples ({100 * self.n / max(self.total, 1):.0f}%) | {self.postfix} | "
              f"{took:.0f}s, ETA {eta:.0f}s", file=self.stream, flush=True)

    def close(self):
        if self.n:
            self.print()


def barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def gather(stats, tokens, seconds, world_size):
    """Compact per-sample stats (no response text) from every rank; tokens add up, time is the slowest."""
    if world_size == 1:
        return stats, tokens, seconds
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, (stats, tokens, seconds))
    return [s for p in parts for s in p[0]], sum(p[1] for p in parts), max(p[2] for p in parts)


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalConfig()
    p.add_argument("--ckpt", required=True, help="a Qwen2 checkpoint folder in the Hugging Face layout")
    p.add_argument("--data", required=True, help="folder with DeepScaleR's test sets (aime.json, ...), or one "
                   "such JSON file (a set named after the file, e.g. the demo's out/demo/demo/val.json)")
    p.add_argument("--out", default=None, help="folder for samples.jsonl, results.json, results.md "
                   "(default: out/eval/NAME, NAME as in --name with / as _)")
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of " + ",".join(SETS))
    p.add_argument("--limit", type=int, default=None, help="first N problems of each set (short evals)")
    # not --n alone: torchrun's own parser takes it for an abbreviation of --nnodes / --nproc-per-node
    p.add_argument("--samples", "--n", dest="n", type=int, default=d.n, help="samples per problem")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="new tokens per sample")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--k", default="", help="comma-separated pass@k to report (default: powers of two up to n)")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="problems per generate call (resume unit)")
    p.add_argument("--no-think", action="store_true", help="grade models that do not use <think> (require_think=False)")
    tmpl = p.add_mutually_exclusive_group()
    tmpl.add_argument("--think-template", dest="think_template", action="store_true", default=None,
                      help="end the prompt with '<think>\\n' (default: follow the checkpoint's template)")
    tmpl.add_argument("--no-think-template", dest="think_template", action="store_false")
    p.add_argument("--no-resume", action="store_true", help="discard samples already in --out")
    p.add_argument("--name", default=None, help="row name in the table (default: the checkpoint folder, with its "
                   "parent for a training run's export: out/demo/hf -> demo/hf)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="bfloat16 on CUDA, float32 on CPU (as sample.py)")
    p.add_argument("--grader-workers", type=int, default=None)
    p.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool size (default: the engine's choice)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded at once (engine default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    row_name = args.name or model_name(args.ckpt)
    out_dir = args.out or os.path.join("out", "eval", row_name.replace("/", "_"))
    import distributed
    import model as M
    import tokenizer as TK
    import reward
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETS]
    if unknown:
        raise SystemExit(f"--sets: unknown set(s) {unknown}; choose from {list(SETS)}")
    if os.path.isfile(args.data):  # one set, named after its file
        if args.sets != ",".join(SETS):
            raise SystemExit(f"--sets chooses files in a --data folder; {args.data} is one file")
        names = [os.path.splitext(os.path.basename(args.data))[0]]
        datasets, skipped = load_datasets(os.path.dirname(os.path.abspath(args.data)), names)
    else:
        datasets, skipped = load_datasets(args.data, names)
    if args.limit is not None:
        datasets = {k: v[:args.limit] for k, v in datasets.items()}
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    # the grader's worker processes start before CUDA/NCCL (reward.py), overlapping the model load
    with reward.Grader(num_workers=args.grader_workers) as grader:
        d = distributed.setup()  # NCCL on CUDA, gloo on CPU; a long timeout, as ranks finish unevenly
        rank, world_size, device = d.rank, d.world_size, d.device
        tokenizer = TK.Tokenizer.from_pretrained(args.ckpt)
        dtype = M.DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
        model = M.from_pretrained(args.ckpt, device=device, dtype=dtype).eval()
        max_prompt_tokens = fit_context(args, model.config.max_position_embeddings, rank)
        out_jsonl = os.path.join(out_dir, "samples.jsonl")
        results = evaluate(model, tokenizer, datasets, n=args.n, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed,
                           require_think=not args.no_think, think_template=args.think_template,
                           max_prompt_tokens=max_prompt_tokens, chunk_size=args.chunk_size, ks=ks,
                           grader=grader, out_jsonl=out_jsonl, resume=not args.no_resume, rank=rank,
                           world_size=world_size, run_info={"ckpt": os.path.abspath(args.ckpt), "limit": args.limit},
                           engine_kwargs=engine_kwargs(args))
    if rank == 0:
        for name, msgs in skipped.items():
            results["datasets"][name]["skipped_rows"] = msgs
        write_outputs(out_dir, out_jsonl, world_size, results, row_name)
    distributed.teardown()
    return results


def model_name(ckpt):
    """A row name that says which model: the folder, with its parent when the folder is a training run's
    export (out/demo/hf -> demo/hf) or a step checkpoint; org/name for a Hugging Face cache snapshot."""
    parts = os.path.abspath(ckpt).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    if parts[-1] in ("hf", "export", "final") or parts[-1].startswith(("step_", "checkpoint")):
        return "/".join(parts[-2:])
    return parts[-1]


def fit_context(args, max_positions, rank):
    """Prompt + response must fit the model's max_position_embeddings (later positions were never
    trained): the prompt budget shrinks to leave room for --max-tokens, so longer prompts are left out
    with the usual per-prompt warning; a --max-tokens that alone overruns it is reported (answers stop there)."""
    say = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    where = f"max_position_embeddings {max_positions} in {os.path.join(args.ckpt, 'config.json')}"
    if args.max_tokens >= max_positions:
        say(f"warning: --max-tokens {args.max_tokens} alone runs past the model's {where}; answers stop there")
        return min(args.max_prompt_tokens, max_positions - 1)
    if args.max_prompt_tokens + args.max_tokens > max_positions:
        say(f"note: --max-prompt-tokens {args.max_prompt_tokens} lowered to {max_positions - args.max_tokens}, "
            f"so that prompt + --max-tokens {args.max_tokens} fit the model's {where}")
        return max_positions - args.max_tokens
    return args.max_prompt_tokens


def engine_kwargs(args):
    kw = {}
    if args.kv_memory_gb is not None:
        kw["memory_budget"] = int(args.kv_memory_gb * 2**30)
    if args.max_num_seqs is not None:
        kw["max_num_seqs"] = args.max_num_seqs
    return kw


def write_outputs(out_dir, out_jsonl, world_size, results, name):
    """Rank 0: merge the rank shards into samples.jsonl, then results.json and results.md."""
    if world_size > 1:
        records = read_records(out_jsonl)
        tmp = out_jsonl + ".tmp"
        with open(tmp, "w") as f:
            for key in sorted(records):
                f.write(json.dumps(records[key]) + "\n")
        os.replace(tmp, out_jsonl)
        for p in glob.glob(f"{glob.escape(os.path.splitext(out_jsonl)[0])}.rank*.jsonl"):
            os.remove(p)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown_table(results, name)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    t = results["throughput"]
    print(f"{t['generated_tokens']:,} tokens generated in {t['seconds']:.1f} s ({t['tokens_per_s']:,.0f} tok/s)")


if __name__ == "__main__":
    main()
