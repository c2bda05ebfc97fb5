"""eval.py: metrics against hand-computed values, every upstream gold format, malformed rows, resume
after an interruption == one uninterrupted run, rank splitting, and the CLI on a tiny random checkpoint."""
import itertools
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import pytest

import eval as E
import model as M
import tokenizer as TK
from fixtures import tiny_checkpoint

DATA = os.path.join(os.path.dirname(__file__), "data", "eval")


# -----------------------------------------------------------------------------
# metrics


def test_pass_at_k_hand_values():
    assert E.pass_at_k(4, 3, 1) == pytest.approx(0.75)
    assert E.pass_at_k(4, 3, 2) == 1.0                      # any 2 of 4 include a correct one
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5)       # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert E.pass_at_k(16, 2, 4) == pytest.approx(1 - 1001 / 1820)  # 1 - C(14,4)/C(16,4) = 0.45
    assert E.pass_at_k(5, 0, 3) == 0.0
    with pytest.raises(ValueError):
        E.pass_at_k(4, 1, 5)


def test_pass_at_k_matches_enumeration():
    """The estimator is the exact probability that a random k-subset holds a correct sample."""
    for n, c in [(5, 2), (6, 1), (6, 4), (7, 3)]:
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert E.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_stderr_hand_value_and_simulation():
    # three problems, 4 samples: p = 3/4, 0, 1 -> var = (3/4 * 1/4) / 3 -> se = 0.25 / 3
    assert E.pass1_stderr([(4, 3), (4, 0), (4, 4)]) == pytest.approx(0.25 / 3)
    assert E.pass1_stderr([(1, 1), (4, 2)]) is None
    # the estimate agrees with the spread of pass@1 over many simulated evals of fixed problems
    rng = random.Random(0)
    p = [rng.random() for _ in range(30)]
    est, sims = [], []
    for _ in range(2000):
        counts = [(16, sum(rng.random() < pi for _ in range(16))) for pi in p]
        sims.append(sum(c / n for n, c in counts) / len(counts))
        est.append(E.pass1_stderr(counts))
    m = sum(sims) / len(sims)
    empirical = math.sqrt(sum((s - m) ** 2 for s in sims) / (len(sims) - 1))
    assert sum(est) / len(est) == pytest.approx(empirical, rel=0.08)


def test_summarize_lengths_and_truncation():
    recs = [dict(problem_id=0, reward=1.0, length=10, finish_reason="stop"),
            dict(problem_id=0, reward=0.0, length=30, finish_reason="length"),
            dict(problem_id=1, reward=0.0, length=20, finish_reason="stop"),
            dict(problem_id=1, reward=1.0, length=40, finish_reason="stop")]
    r = E.summarize(recs, [1, 2])
    assert r["pass@1"] == pytest.approx(0.5) and r["pass@k"][2] == pytest.approx(1.0)
    assert r["length"] == {"mean": 25, "mean_correct": 25, "mean_wrong": 25, "max": 40}
    assert r["truncated"] == pytest.approx(0.25)
    assert r["stderr"] == pytest.approx(math.sqrt(2 * 0.25) / 2)


# -----------------------------------------------------------------------------
# data


def test_gold_formats():
    assert E.dataset_golds("025") == ["025", "25"]        # AIME: leading zeros
    assert E.dataset_golds("204") == ["204"]
    assert E.dataset_golds(142.0) == ["142"]              # AMC floats
    assert E.dataset_golds(2.5) == ["2.5"]
    assert E.dataset_golds(7) == ["7"]
    assert E.dataset_golds(["9.8\n", "9.81\n"]) == ["9.8", "9.81"]  # Minerva: any of a list
    assert E.dataset_golds(["$2^{1009}$"]) == ["2^{1009}"]          # OlympiadBench: $...$
    assert E.dataset_golds(["$69$,$84$"]) == ["69,84"]
    assert E.dataset_golds("\\$5") == ["\\$5"]            # an escaped dollar is content
    assert E.dataset_golds("\\frac{14}{3}") == ["\\frac{14}{3}"]
    for bad in (None, "", "  ", [], ["$ $"], True, {"a": 1}, float("nan")):
        assert E.dataset_golds(bad) is None, bad


def test_load_dataset_skips_malformed_rows_by_name(tmp_path, capsys):
    rows, skipped = E.load_dataset(os.path.join(DATA, "math.json"))
    assert [r["id"] for r in rows] == [0, 4]             # the row index is the id
    assert len(skipped) == 3 and all("math.json: row" in s for s in skipped)
    assert "row 1" in skipped[0] and "problem" in skipped[1] and "row 3" in skipped[2]
    bad = tmp_path / "aime.json"
    bad.write_text('{"problem": "x"}')
    with pytest.raises(E.DataError, match="aime.json.*JSON list"):
        E.load_dataset(str(bad))
    bad.write_text("[{")
    with pytest.raises(E.DataError, match="aime.json"):
        E.load_dataset(str(bad))
    with pytest.raises(E.DataError, match="nope.json: test set not found"):
        E.load_datasets(str(tmp_path), ["nope"])


# -----------------------------------------------------------------------------
# evaluate() with a scripted engine: exact expected metrics, resume, rank splitting


@dataclass
class Completion:
    token_ids: list
    logprobs: list
    finish_reason: str
    prompt_index: int
    sample_index: int


class ScriptedEngine:
    """Answers each problem with a scripted list of responses (by sample index); a seeded random one
    for problems without a script. Records its calls; can be told to die after some calls."""

    def __init__(self, tokenizer, script=None, die_after=None):
        self.tok, self.script, self.die_after, self.calls = tokenizer, script or {}, die_after, []

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, top_k, n, seed, stop_token_ids, progress=False,
                 first_prompt_index=0):
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((len(prompts), seed, first_prompt_index))
        self.prompts = [self.tok.decode(p) for p in prompts]
        out = []
        for p, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            problem = next((k for k in self.script if k in text), None)
            for s in range(n):
                if problem is not None:
                    resp = self.script[problem][s]
                else:
                    draw = random.Random(f"{seed}/{first_prompt_index + p}/{s}").randint(0, 3)
                    resp = f"<think>hmm</think> \\boxed{{{draw}}}"
                ids_out = self.tok.encode(resp)[:max_new_tokens]
                stop = len(ids_out) < max_new_tokens
                out.append(Completion(ids_out + ([stop_token_ids[0]] if stop else []), [], "stop" if stop else "length",
                                      first_prompt_index + p, s))
        return out


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models here are faster on one thread, and far faster on a machine shared with other jobs."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_checkpoint(path, seed=0)
    return TK.Tokenizer.from_pretrained(str(path))


def right(ans):
    return f"<think>ok</think> The answer is \\boxed{{{ans}}}."


def test_evaluate_scripted_exact_metrics(tokenizer):
    datasets = {"aime": E.load_dataset(os.path.join(DATA, "aime.json"))[0]}
    # problem 0 (gold "025"): 3/4 right, incl. "25" vs "025"; problem 1 (gold "007"): 0/4 (no </think>, wrong)
    script = {"Find 5*5.": [right("025"), right("25"), "\\boxed{25}", right("025")],
              "Find 3+4.": ["\\boxed{007}", right("8"), right("6"), "no answer"]}
    eng = ScriptedEngine(tokenizer, script)
    res = E.evaluate(eng, tokenizer, datasets, n=4, max_tokens=64, progress=False)
    r = res["datasets"]["aime"]
    assert r["pass@1"] == pytest.approx((0.75 + 0) / 2)
    assert r["pass@k"] == {1: pytest.approx(0.375), 2: pytest.approx(0.5), 4: pytest.approx(0.5)}
    assert r["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3) / 2)
    assert res["average"] is None  # not all five sets
    # no-think grading accepts the response without </think>
    res2 = E.evaluate(ScriptedEngine(tokenizer, script), tokenizer, datasets, n=4, max_tokens=64,
                      require_think=False, progress=False)
    assert res2["datasets"]["aime"]["pass@1"] == pytest.approx((1.0 + 0.25) / 2)


def test_every_upstream_gold_format_is_graded(tokenizer):
    names = list(E.SETS)
    datasets, skipped = E.load_datasets(DATA, names)
    assert sum(len(v) for v in skipped.values()) == 3
    answers = {"Find 5*5.": "25", "Find 3+4.": "007", "Compute 12*12.": "144", "Half of 5?": "2.5",
               "Simplify 28/6.": "\\frac{14}{3}", "What is 1+1?": "2", "Estimate g.": "9.81", "Two.": "2",
               "Smallest prime?": "2", "Pairs?": "(1,2),(3,4)"}
    script = {k: [right(v)] * 2 for k, v in answers.items()}
    res = E.evaluate(ScriptedEngine(tokenizer, script), tokenizer, datasets, n=2, max_tokens=64, progress=False)
    for name in names:
        assert res["datasets"][name]["pass@1"] == 1.0, name
    assert res["average"] == 1.0
    table = E.markdown_table(res, "tiny")
    assert "| tiny | 100.0 ± 0.0 |" in table and "| 57.0 |" in table and "28.8" in table


def test_resume_after_interruption_equals_one_run(tmp_path, tokenizer):
    datasets = {k: E.load_dataset(os.path.join(DATA, f"{k}.json"))[0] for k in ("aime", "amc", "olympiad_bench")}
    kw = dict(n=3, max_tokens=64, chunk_size=1, progress=False)
    full = E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, out_jsonl=str(tmp_path / "a/samples.jsonl"), **kw)
    out = str(tmp_path / "b/samples.jsonl")
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(ScriptedEngine(tokenizer, die_after=3), tokenizer, datasets, out_jsonl=out, **kw)
    with open(out, "a") as f:
        f.write('{"dataset": "amc", "problem_id": 1, "sam')  # a line cut short by the interruption
    eng = ScriptedEngine(tokenizer)
    resumed = E.evaluate(eng, tokenizer, datasets, out_jsonl=out, **kw)
    assert len(eng.calls) == 3  # 6 chunks, 3 already on disk
    assert resumed["datasets"] == full["datasets"]
    a, b = E.read_records(str(tmp_path / "a/samples.jsonl")), E.read_records(out)
    assert a == b and len(a) == 6 * 3
    # different settings refuse to reuse the samples
    with pytest.raises(ValueError, match="temperature: 0.6 on disk vs 1.0 now"):
        E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, out_jsonl=out, temperature=1.0, **kw)
    # a record has everything the issue asks for
    rec = next(iter(b.values()))
    assert {"problem_id", "response", "extracted", "reward", "length", "finish_reason"} <= set(rec)


def test_rank_split_covers_every_chunk_once(tmp_path, tokenizer, monkeypatch):
    """world_size=2 in-process (gather/barrier stubbed): the ranks' shards together equal one run."""
    datasets = {k: E.load_dataset(os.path.join(DATA, f"{k}.json"))[0] for k in ("aime", "amc", "minerva")}
    kw = dict(n=2, max_tokens=64, chunk_size=1, progress=False)
    one = E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, out_jsonl=str(tmp_path / "one/s.jsonl"), **kw)
    monkeypatch.setattr(E, "barrier", lambda ws: None)
    monkeypatch.setattr(E, "gather", lambda stats, tok, sec, ws: (stats, tok, sec))
    out, problems = str(tmp_path / "two/s.jsonl"), []
    for rank in (0, 1):
        eng = ScriptedEngine(tokenizer)
        E.evaluate(eng, tokenizer, datasets, out_jsonl=out, rank=rank, world_size=2, **kw)
        # draws are keyed per problem (set seed + the problem's index), so each rank takes a share of every set
        problems.append({(seed, first) for _, seed, first in eng.calls})
        assert os.path.exists(str(tmp_path / f"two/s.rank{rank}.jsonl"))
    assert not problems[0] & problems[1] and len(problems[0]) == len(problems[1]) == 3
    assert len({seed for seed, _ in problems[0]}) == 3  # one problem of each of the three sets on rank 0
    assert E.read_records(out) == E.read_records(str(tmp_path / "one/s.jsonl"))
    E.write_outputs(str(tmp_path / "two"), out, 2, one, "tiny")  # merge: shards -> one file
    assert not [p for p in os.listdir(tmp_path / "two") if ".rank" in p]
    assert E.read_records(out) == E.read_records(str(tmp_path / "one/s.jsonl"))
    assert "| tiny |" in (tmp_path / "two/results.md").read_text()


def test_too_long_prompts_are_reported(tokenizer, capsys):
    datasets = {"aime": E.load_dataset(os.path.join(DATA, "aime.json"))[0]}
    res = E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, n=2, max_tokens=8, max_prompt_tokens=10,
                     progress=False)
    assert res["datasets"]["aime"]["too_long"] == [0, 1] and res["datasets"]["aime"]["problems"] == 0
    assert "aime row 0: prompt has" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the command line on a tiny random checkpoint


def test_cli_tiny_checkpoint_resumes(tmp_path, capsys):
    ckpt = tiny_checkpoint(str(tmp_path / "ckpt"), seed=1)
    out = str(tmp_path / "out")
    argv = ["--ckpt", ckpt, "--data", DATA, "--out", out, "--samples", "2", "--max-tokens", "6", "--grader-workers", "1",
            "--dtype", "float32", "--name", "tiny-random", "--max-prompt-tokens", "200", "--kv-memory-gb", "0.01"]
    res = E.main(argv)
    printed = capsys.readouterr()
    assert "| tiny-random |" in printed.out and "tok/s" in printed.out
    assert "math.json: row 1 has no 'problem'" not in printed.err  # row 1 lacks the answer
    assert "math.json: row 1 has no usable 'answer'" in printed.err
    records = E.read_records(os.path.join(out, "samples.jsonl"))
    assert len(records) == 2 * sum(r["problems"] for r in res["datasets"].values()) == 2 * 10
    assert all(r["length"] <= 6 and r["finish_reason"] in ("stop", "length") for r in records.values())
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["datasets"]["math"]["skipped_rows"][0].endswith("row 1 has no usable 'answer' (None); skipped")
    # run again: everything is on disk, nothing is sampled, same results
    again = E.main(argv)
    assert again["datasets"] == res["datasets"] and again["throughput"]["generated_tokens"] == 0


def test_piped_progress_is_plain_lines(tokenizer, capsys, monkeypatch):
    """Into a log (stderr not a terminal, as under pytest's capture) progress is periodic plain lines with
    counts and an ETA, no carriage returns or cursor movements; on a terminal it stays a tqdm bar."""
    monkeypatch.setattr(E.PlainProgress, "every", 0.0)  # a line per chunk
    datasets = {"aime": E.load_dataset(os.path.join(DATA, "aime.json"))[0]}
    E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, n=2, max_tokens=8, chunk_size=1)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    lines = [line for line in err.splitlines() if line.startswith("eval: ")]
    n = len(datasets["aime"])
    assert len(lines) == n + 1 and lines[-1].startswith(f"eval: {2 * n}/{2 * n} samples (100%) | ")
    assert all("tok/s" in line and "ETA" in line for line in lines)

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass
    assert type(E.make_bar(10, True, Terminal())).__name__ == "tqdm"


def test_cli_defaults_name_the_model_fit_its_context_and_use_float32_on_cpu(tmp_path, monkeypatch, capsys):
    """Without --name/--out/--dtype: the row is named after the run (RUN/hf, not "hf"), results go to the
    git-ignored out/eval/RUN_hf, weights load in float32 on CPU (as in sample.py). A model whose
    max_position_embeddings is smaller than prompt + response budget gets a smaller prompt budget, said
    out loud, so prompts that would overrun it are left out by name. --data may be one JSON file."""
    import torch
    ckpt = tiny_checkpoint(str(tmp_path / "my_run" / "hf"), seed=3, max_position_embeddings=64)
    monkeypatch.chdir(tmp_path)
    loaded = []
    real = M.from_pretrained
    monkeypatch.setattr(M, "from_pretrained", lambda *a, **k: loaded.append(k["dtype"]) or real(*a, **k))
    res = E.main(["--ckpt", ckpt, "--data", os.path.join(DATA, "aime.json"), "--samples", "2", "--max-tokens", "6",
                  "--grader-workers", "1", "--kv-memory-gb", "0.01"])
    printed = capsys.readouterr()
    assert loaded == [torch.float32]
    assert "| my_run/hf |" in printed.out and (tmp_path / "out/eval/my_run_hf/results.md").exists()
    assert "--max-prompt-tokens 2048 lowered to 58, so that prompt + --max-tokens 6 fit" in printed.err
    assert res["config"]["max_prompt_tokens"] == 58 and list(res["datasets"]) == ["aime"]
    assert res["datasets"]["aime"]["too_long"]  # the long AIME prompts, each reported
    assert "prompt has" in printed.err and "> max_prompt_tokens 58; left out" in printed.err
    # a response budget that alone overruns the context: warned, and the run goes on
    assert E.fit_context(E.parse_args(["--ckpt", ckpt, "--data", DATA, "--max-tokens", "64"]), 64, 0) == 63
    assert "--max-tokens 64 alone runs past the model's max_position_embeddings 64" in capsys.readouterr().err
    assert E.model_name("/x/models--org--name/snapshots/abc123") == "org/name"
    assert E.model_name("/x/checkpoints/r1-distill-1.5b") == "r1-distill-1.5b"


def test_torchrun_two_ranks(tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo): chunks dealt to the ranks, each rank's shard merged by
    rank 0 into one samples.jsonl holding every (problem, sample) exactly once; one table, from rank 0.
    (That the shards equal a single-process run is test_rank_split_covers_every_chunk_once.)"""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt = tiny_checkpoint(str(tmp_path / "ckpt"), seed=2)
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(root, "eval.py"), "--ckpt", ckpt, "--data", DATA, "--sets", "aime,amc",
                           "--samples", "2", "--max-tokens", "3", "--chunk-size", "1", "--grader-workers", "1",
                           "--dtype", "float32", "--name", "tiny", "--out", str(tmp_path / "out"), "--max-prompt-tokens", "200",
                           "--kv-memory-gb", "0.01"],
                          env=env, capture_output=True, text=True, timeout=150, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p for p in os.listdir(tmp_path / "out") if ".rank" in p] == []
    merged = E.read_records(str(tmp_path / "out" / "samples.jsonl"))
    assert sorted(merged) == [(s, p, k) for s in ("aime", "amc") for p in (0, 1) for k in (0, 1)]
    assert {r["chunk"] for r in merged.values()} == {0, 1}
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert all(res["datasets"][s]["problems"] == 2 and res["datasets"][s]["samples"] == 4 for s in ("aime", "amc"))
    assert res["throughput"]["generated_tokens"] == sum(r["length"] for r in merged.values())
    assert proc.stdout.count("| tiny |") == 1  # only rank 0 prints the table


def test_real_engine_interrupted_then_resumed_equals_one_run(tmp_path, tokenizer):
    """The same on the real engine and a tiny random checkpoint: the resumed samples (text, lengths,
    finish reasons) are exactly those of an uninterrupted run."""
    import sample
    model = M.from_pretrained(tiny_checkpoint(str(tmp_path / "ckpt"), seed=3), dtype=__import__("torch").float32)
    engine = sample.Engine(model, max_model_len=200 + 5, memory_budget=2**22, vocab_limit=tokenizer.vocab_size)

    class Dies:
        def __init__(self, after):
            self.after, self.calls = after, 0

        def generate(self, *a, **kw):
            if self.calls == self.after:
                raise KeyboardInterrupt
            self.calls += 1
            return engine.generate(*a, **kw)

    datasets = {k: E.load_dataset(os.path.join(DATA, f"{k}.json"))[0] for k in ("aime", "olympiad_bench")}
    kw = dict(n=2, max_tokens=5, chunk_size=1, max_prompt_tokens=200, temperature=1.0, progress=False)
    E.evaluate(engine, tokenizer, datasets, out_jsonl=str(tmp_path / "one.jsonl"), **kw)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(Dies(2), tokenizer, datasets, out_jsonl=str(tmp_path / "two.jsonl"), **kw)
    assert len(E.read_records(str(tmp_path / "two.jsonl"))) == 2 * 2
    again = Dies(99)
    E.evaluate(again, tokenizer, datasets, out_jsonl=str(tmp_path / "two.jsonl"), **kw)
    assert again.calls == 2
    one, two = E.read_records(str(tmp_path / "one.jsonl")), E.read_records(str(tmp_path / "two.jsonl"))
    assert one == two and len(one) == 8
    assert len({r["response"] for r in one.values()}) > 1  # really sampled, not a constant


def test_real_engine_samples_do_not_depend_on_the_number_of_ranks(tmp_path, tokenizer, monkeypatch):
    """1, 2 and 3 ranks (in-process, gather stubbed) on the real engine: every set is split over the
    ranks (a 2-problem set leaves a rank idle at 3) and the union of the shards is the one-rank run,
    response for response: draws are keyed per problem, not per chunk."""
    import sample
    model = M.from_pretrained(tiny_checkpoint(str(tmp_path / "ckpt"), seed=4), dtype=__import__("torch").float32)
    engine = sample.Engine(model, max_model_len=200 + 5, memory_budget=2**22, vocab_limit=tokenizer.vocab_size)
    datasets = {k: E.load_dataset(os.path.join(DATA, f"{k}.json"))[0] for k in ("aime", "amc")}
    kw = dict(n=2, max_tokens=5, chunk_size=2, max_prompt_tokens=200, temperature=1.0, progress=False)
    monkeypatch.setattr(E, "barrier", lambda ws: None)
    monkeypatch.setattr(E, "gather", lambda stats, tok, sec, ws: (stats, tok, sec))
    runs = {}
    for world in (1, 2, 3):
        out = str(tmp_path / f"w{world}/s.jsonl")
        for rank in range(world):
            E.evaluate(engine, tokenizer, datasets, out_jsonl=out, rank=rank, world_size=world, **kw)
        runs[world] = {k: {f: r[f] for f in ("response", "length", "finish_reason")}
                       for k, r in E.read_records(out).items()}
    assert len(runs[1]) == 2 * 2 * 2 and len({r["response"] for r in runs[1].values()}) > 1
    assert runs[2] == runs[1] and runs[3] == runs[1]


def test_prompt_template_choice_is_separate_from_grading(tokenizer):
    datasets = {"aime": E.load_dataset(os.path.join(DATA, "aime.json"))[0]}
    for think in (True, False, None):  # None follows the checkpoint (the fixture's old template: no <think>)
        eng = ScriptedEngine(tokenizer)
        E.evaluate(eng, tokenizer, datasets, n=1, max_tokens=8, think_template=think, require_think=True, progress=False)
        assert all(p.endswith("<｜Assistant｜><think>\n") == bool(think) for p in eng.prompts)
        assert eng.prompts[0].startswith("<｜begin▁of▁sentence｜><｜User｜>Find 5*5. Let's think step by step")
