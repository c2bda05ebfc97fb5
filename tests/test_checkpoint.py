"""checkpoint.py and train.py's start: a run folder is never destroyed or mixed unless told in so many
words, only sealed checkpoints are resumed from, a damaged newest checkpoint is reported and the previous
one used, the trainer state loads with weights_only=True, exports get ordinary permissions and say "no
space". Tiny random models (tests/fixtures.py), in-process runs of a few steps: 67-95 s in all on the
shared 2-core machine (load average 8-12)."""
import json
import os
import shutil

import pytest
import torch

import checkpoint as C
import model as M
import train as T
from fixtures import tiny_checkpoint

VOLATILE = ("time_", "gen_tokens_per_s", "train_tokens_per_s")


def stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt_inputs")
    ckpt = tiny_checkpoint(str(root / "init"), seed=5, vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(10, 30) for b in range(1, 4)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"init": ckpt, "data": str(root / "train.jsonl")}


def tiny(inputs, out_dir, **kw):
    cfg = T.TrainConfig(init_from=inputs["init"], train_data=inputs["data"], out_dir=str(out_dir), instruction="",
                        stages=[T.Stage(kw.pop("steps", 4), 8, 4)], prompts_per_step=4, mini_batches=2,
                        temperature=1.0, lr=1e-3, kl_coef=0.01, token_budget=64, gradient_checkpointing=False,
                        ckpt_interval=2, keep_last=3, grader_workers=1, engine_memory=2**20, threads=1, seed=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def names(out_dir):
    return sorted(os.listdir(os.path.join(out_dir, "ckpt")))


def weights(path):
    return M.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted 4-step run: checkpoints after steps 1 and 3, its metrics and final export."""
    out = tmp_path_factory.mktemp("reference") / "run"
    rows = T.train(tiny(inputs, out))
    return {"out": str(out), "rows": rows}

# -----------------------------------------------------------------------------
# The run folder


def test_a_second_run_without_resume_is_refused_and_changes_nothing(tmp_path, inputs, reference):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    before = {p: open(os.path.join(dp, p), "rb").read() for dp, _, fs in os.walk(out) for p in fs}
    with pytest.raises(C.RunFolderError) as e:
        T.train(tiny(inputs, out))
    for must in ("already holds a run", "metrics.jsonl (4 lines)", "step_000004", "--resume", "--overwrite",
                 "--out_dir", "nothing was changed"):
        assert must in str(e.value), must
    after = {p: open(os.path.join(dp, p), "rb").read() for dp, _, fs in os.walk(out) for p in fs}
    assert after == before
    # told in so many words: the old run goes, the new one starts at step 0 and keeps its own checkpoints
    rows = T.train(tiny(inputs, out, overwrite=True, steps=2, ckpt_interval=1))
    assert [r["step"] for r in metrics(out)] == [0, 1] and len(rows) == 2
    assert names(out) == ["step_000001", "step_000002"]  # (the old step_000004 would have rotated them away)


def test_prepared_inputs_and_an_empty_log_are_not_a_run(tmp_path, inputs):
    out = tmp_path / "run"
    (out / "demo").mkdir(parents=True)  # what config/demo.py's prepare hook writes before the run
    (out / "demo" / "train.jsonl").write_text("{}\n")
    (out / "metrics.jsonl").write_text("")  # a run killed while loading its model
    assert C.run_evidence(str(out)) == []
    T.train(tiny(inputs, out, steps=1))
    assert C.run_evidence(str(out)) != [] and (out / "demo" / "train.jsonl").exists()


def test_resume_in_a_new_folder_starts_fresh(tmp_path, inputs, capsys):
    rows = T.train(tiny(inputs, tmp_path / "new" / "run", steps=1, resume=True))
    assert [r["step"] for r in rows] == [0] and "holds no run yet; starting a new one" in capsys.readouterr().out


@pytest.mark.parametrize("mishap", ["ckpt moved away", "ckpt is a file", "only an empty step folder"])
def test_resume_refuses_a_run_whose_checkpoints_are_gone(tmp_path, inputs, reference, mishap):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    shutil.rmtree(out / "ckpt")
    if mishap == "ckpt is a file":
        (out / "ckpt").write_text("oops")
    if mishap == "only an empty step folder":
        (out / "ckpt" / "step_000099").mkdir(parents=True)
    log = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(C.RunFolderError, match="holds a run .* but no complete checkpoint to resume from") as e:
        T.train(tiny(inputs, out, resume=True))
    assert "Nothing was deleted" in str(e.value) and "--overwrite" in str(e.value)
    assert (out / "metrics.jsonl").read_bytes() == log  # the old code truncated it and started from scratch


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, inputs, reference, capsys):
    out = tmp_path / "run"
    T.train(tiny(inputs, out, stop_at_step=1, ckpt_interval=2))  # step 0 logged, killed before any checkpoint
    (out / "ckpt").mkdir()
    (out / "ckpt" / "step_000002.tmp").mkdir()  # a first checkpoint the kill cut short
    (out / "ckpt" / "step_000099").mkdir()  # and a folder someone made: never sealed, so not a lost checkpoint
    rows = T.train(tiny(inputs, out, resume=True))
    assert "never finished a checkpoint" in capsys.readouterr().out
    assert stable(metrics(out)) == stable(reference["rows"]) and len(rows) == 4
    assert not (out / "ckpt" / "step_000002.tmp").exists()


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6, 30, 40):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / C.MARKER).write_text('{"files": {}}')
    (root / "step_000001").mkdir()  # no marker: not ours to delete
    C.rotate(str(root), str(root / "step_000006"), keep_last=2)
    assert sorted(os.listdir(root)) == ["step_000001", "step_000004", "step_000006", "step_000030", "step_000040"]
    C.rotate(str(root), str(root / "step_000006"), keep_last=1)
    assert "step_000006" in os.listdir(root) and "step_000004" not in os.listdir(root)


def test_resume_ignores_empty_and_backup_folders(tmp_path, inputs, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    shutil.copytree(out / "ckpt" / "step_000002", out / "ckpt" / "step_000004_backup")
    (out / "ckpt" / "step_000099").mkdir()
    T.train(tiny(inputs, out, resume=True, steps=6))
    text = capsys.readouterr().out
    assert "step_000099: not a finished checkpoint" in text
    assert f"resumed from {out}/ckpt/step_000004: steps 0-3 done, continuing at step 4" in text
    assert [r["step"] for r in metrics(out)] == list(range(6))
    assert (out / "ckpt" / "step_000004_backup").is_dir() and (out / "ckpt" / "step_000099").is_dir()


def flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def garbage(path):
    path.write_bytes(os.urandom(path.stat().st_size))


CORRUPTIONS = {
    "missing shard": lambda d: (d / "__0_0.distcp").unlink(),
    "truncated shard": lambda d: os.truncate(d / "__0_0.distcp", (d / "__0_0.distcp").stat().st_size // 2),
    "bit flip in a shard": lambda d: flip_byte(d / "__0_0.distcp", 0.77),
    "bad metadata": lambda d: garbage(d / ".metadata"),
    "garbage trainer state": lambda d: garbage(d / "trainer_rank0.pt"),
    "no marker": lambda d: (d / C.MARKER).unlink(),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, inputs, reference, kind, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    CORRUPTIONS[kind](out / "ckpt" / "step_000004")
    T.train(tiny(inputs, out, resume=True))  # the old code crashed with a raw traceback on every restart
    text = capsys.readouterr().out
    newest = f"{out}/ckpt/step_000004"
    assert (f"{newest}: damaged" in text and f"moved to {newest}.damaged" in text) if kind != "no marker" \
        else f"{newest}: not a finished checkpoint" in text
    assert f"resumed from {out}/ckpt/step_000002" in text
    assert stable(metrics(out)) == stable(reference["rows"])  # steps 2-3 run again: every step exactly once
    a, b = weights(os.path.join(reference["out"], "hf")), weights(out / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_checksums_catch_what_file_sizes_cannot(tmp_path, inputs, reference, capsys):
    """A shard too big for a crc32 in the marker (the 1.5B model's) is checked tensor by tensor after the load."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    newest = out / "ckpt" / "step_000004"
    marker = json.loads((newest / C.MARKER).read_text())
    del marker["files"]["__0_0.distcp"]["crc32"]
    key = next(k for k in marker["tensor_sums"] if k.startswith("/model/"))
    marker["tensor_sums"][key] += 1  # what one flipped bit in that tensor's bytes would show
    (newest / C.MARKER).write_text(json.dumps(marker))
    T.train(tiny(inputs, out, resume=True))
    text = capsys.readouterr().out
    assert f"{newest}: damaged (1 tensor(s) do not match their checksums, first {key})" in text
    assert f"resumed from {out}/ckpt/step_000002" in text and stable(metrics(out)) == stable(reference["rows"])


def test_element_sums_add_up_over_any_split_and_see_one_flipped_bit():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8):
        x = (torch.randn(1001) * 100).to(dtype)
        whole, bits = C.element_sum(x)
        for parts in (2, 3, 7):  # FSDP's chunks on 2, 3 or 7 ranks
            assert (sum(C.element_sum(c)[0].item() for c in torch.chunk(x, parts)) - whole.item()) % 2**bits == 0
        for bit in range(x.element_size() * 8):
            y = x.clone()
            y.view(torch.uint8)[500 * x.element_size() + bit // 8] ^= 1 << (bit % 8)
            assert (C.element_sum(y)[0].item() - whole.item()) % 2**bits != 0, (dtype, bit)


def test_trainer_state_is_loaded_with_weights_only(tmp_path, inputs, reference):
    """A checkpoint folder from someone else must not run code: a pickle that would call os.mkdir is refused."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    newest = out / "ckpt" / "step_000004"
    evil = tmp_path / "evil_was_here"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(evil),)

    state = torch.load(newest / "trainer_rank0.pt", weights_only=True)  # the genuine file loads
    torch.save({**state, "extra": Evil()}, newest / "trainer_rank0.pt")
    marker = json.loads((newest / C.MARKER).read_text())  # reseal, so that only the loader stands in the way
    marker["files"]["trainer_rank0.pt"] = {"size": (newest / "trainer_rank0.pt").stat().st_size,
                                           "crc32": C.crc32(newest / "trainer_rank0.pt")}
    (newest / C.MARKER).write_text(json.dumps(marker))
    model = M.from_pretrained(inputs["init"])
    with pytest.raises(C.CheckpointDamaged, match="cannot load it"):
        C.load_checkpoint(str(newest), T.D.Dist(), model, T.make_optimizer(model, tiny(inputs, out)), None)
    assert not evil.exists()


def test_console_steps_match_the_metrics_file(tmp_path, inputs, capsys):
    T.train(tiny(inputs, tmp_path / "run", steps=3, ckpt_interval=2))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 0/2", "step 1/2", "step 2/2"]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2]
    assert T.console_line({"step": 499, "reward_mean": 0, "accuracy": 0, "response_len_mean": 0, "response_len_max": 0,
                           "truncated_frac": 0, "time_step": 0, "gen_tokens_per_s": 0}, 500, 1.0, 1).startswith(
        "step 499/499 ")


def test_a_kill_during_the_last_export_is_repaired_on_resume(tmp_path, inputs, reference):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    shutil.rmtree(out / "hf")  # the last checkpoint was sealed, its export never finished
    assert T.train(tiny(inputs, out, resume=True)) == []
    a, b = weights(os.path.join(reference["out"], "hf")), weights(out / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a)

# -----------------------------------------------------------------------------
# Exports and space


def test_exports_get_ordinary_permissions(tmp_path, inputs):
    old = os.umask(0o022)
    try:
        M.save_pretrained(M.from_pretrained(inputs["init"]), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755  # tempfile.mkdtemp gave 0700
    for f in (tmp_path / "hf").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_export_cleans_temporaries_a_kill_left(tmp_path, inputs):
    model = M.from_pretrained(inputs["init"])
    hf = tmp_path / "hf"
    M.save_pretrained(model, str(hf))
    (tmp_path / ".tmp-hf-123-dead").mkdir()  # a kill while writing: a half-written export
    (tmp_path / ".tmp-hf-123-dead" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".tmp-hf-keep").mkdir()  # not ours? it has our prefix, so it is ours
    (tmp_path / ".tmp-other-1").mkdir()  # another folder's temporary: left alone
    M.save_pretrained(model, str(hf))
    assert sorted(os.listdir(tmp_path)) == [".tmp-other-1", "hf"]
    # killed between replace_dir's two renames: hf/ is gone, the old export is T.old and the finished new one T
    new = tmp_path / ".tmp-hf-9-abc"
    shutil.copytree(hf, new)
    os.rename(hf, str(new) + ".old")
    M.recover_temporaries(str(hf))
    assert sorted(os.listdir(tmp_path)) == [".tmp-other-1", "hf"] and (hf / "config.json").exists()


def test_a_full_disk_is_refused_before_writing_and_said_in_words(tmp_path, inputs, monkeypatch):
    model = M.from_pretrained(inputs["init"])
    real = shutil.disk_usage
    monkeypatch.setattr(M.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match="no space left for the export .* GiB free"):
        M.save_pretrained(model, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []
    # a write that fails part-way on a full disk (safetensors: "unexpected pos 704 vs 598") says so too
    import safetensors.torch
    monkeypatch.setattr(M.shutil, "disk_usage", lambda p: real(p)._replace(free=10**12))

    def full(*a, **k):
        monkeypatch.setattr(M.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
        raise RuntimeError("unexpected pos 704 vs 598")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="no space left while writing the export"):
        M.save_pretrained(model, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_that_cannot_fit_stops_the_run_saying_no_space(tmp_path, inputs, monkeypatch):
    out = tmp_path / "run"
    real = shutil.disk_usage
    calls = {"n": 0}

    def shrinking(path):
        calls["n"] += 1  # room for the first checkpoint, then the disk is full
        return real(path)._replace(free=10**12 if calls["n"] <= 2 else 10)

    monkeypatch.setattr(M.shutil, "disk_usage", shrinking)
    with pytest.raises(OSError, match="no space left for checkpoint .*step_000004 .*keep_last"):
        T.train(tiny(inputs, out))
    assert names(out) == ["step_000002"] and C.file_problems(str(out / "ckpt" / "step_000002")) == []
