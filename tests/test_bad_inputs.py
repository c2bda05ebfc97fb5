"""Bad files and arguments around the model (issue 16): config.json fields of the wrong type, tokenizer or
generation configs that are not JSON objects, an index pointing outside its folder, eval.py's resume reading
records and settings it cannot trust, and sample.py's --device and position checks. Each is refused or
skipped naming the file and field; a few seconds in all."""
import json
import os
import sys

import pytest
import torch

import eval as E
import model as M
import tokenizer as TK
from fixtures import tiny_checkpoint
from test_eval import DATA, ScriptedEngine, tokenizer  # noqa: F401  (tokenizer is a fixture)


def write_config(tmp_path, **changes):
    cfg = M.Config(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16).to_hf()
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


@pytest.mark.parametrize("field,value", [
    ("tie_word_embeddings", "false"),      # was read as True: the file's lm_head silently discarded
    ("vocab_size", True),                  # a bool is not an integer
    ("rms_norm_eps", "1e-6"),
    ("rope_theta", "10000"),
    ("max_position_embeddings", 4096.5),
    ("num_key_value_heads", "2"),
    ("head_dim", [16]),
    ("eos_token_id", ["1"]),
    ("bos_token_id", "0"),
    ("torch_dtype", 16),
    ("rope_parameters", ["default"]),
    ("layer_types", "full_attention"),
    ("architectures", "Qwen2ForCausalLM"),
    ("use_sliding_window", "no"),
    ("attention_dropout", "0"),
])
def test_config_json_fields_are_type_checked(tmp_path, field, value):
    file = write_config(tmp_path, **{field: value})
    with pytest.raises(M.ConfigError, match=f"'{field}'") as e:
        M.Config.from_file(file)
    assert file in str(e.value)


def test_tied_flag_as_a_string_is_refused_not_read_as_true(tmp_path):
    tiny_checkpoint(str(tmp_path), seed=2)
    write = json.loads((tmp_path / "config.json").read_text())
    write["tie_word_embeddings"] = "false"
    (tmp_path / "config.json").write_text(json.dumps(write))
    with pytest.raises(M.ConfigError, match="tie_word_embeddings' must be bool, got \"false\""):
        M.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_tokenizer_and_generation_configs_must_be_json_objects(tmp_path, name):
    tiny_checkpoint(str(tmp_path), seed=2)
    (tmp_path / name).write_text(json.dumps([{"bos_token": "x"}]))  # was an AttributeError
    with pytest.raises(M.CheckpointError, match=f"{name}: expected a JSON object, got list"):
        TK.Tokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 7, ""])
def test_index_weight_map_stays_inside_the_folder(tmp_path, target):
    (tmp_path / "ckpt").mkdir()
    tiny_checkpoint(str(tmp_path / "ckpt"), seed=2)
    os.rename(tmp_path / "ckpt" / "model.safetensors", tmp_path / "outside.safetensors")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": target}}))
    with pytest.raises(M.CheckpointError, match="is not a file inside"):
        M.checkpoint_files(str(tmp_path / "ckpt"))
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    assert M.checkpoint_files(str(tmp_path / "ckpt")) == {
        "model.norm.weight": str(tmp_path / "ckpt" / "model-00001-of-00001.safetensors")}

# -----------------------------------------------------------------------------
# eval.py: resuming from records and settings it cannot trust


def test_eval_resume_skips_and_resamples_wrong_typed_records(tmp_path, tokenizer, capsys):  # noqa: F811
    datasets = {"aime": E.load_dataset(os.path.join(DATA, "aime.json"))[0]}
    kw = dict(n=2, max_tokens=64, chunk_size=1, progress=False)
    full = E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, out_jsonl=str(tmp_path / "a/s.jsonl"), **kw)
    out = tmp_path / "b/s.jsonl"
    E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, out_jsonl=str(out), **kw)
    lines = out.read_text().splitlines()
    bad = [json.loads(line) for line in lines[:3]]
    bad[0]["reward"] = "1.0"  # valid JSON, wrong type: summarize crashed on every rerun, naming nothing
    bad[1]["length"] = None
    bad[2] = [bad[2]]
    out.write_text("\n".join([json.dumps(b) for b in bad] + lines[3:]) + "\n")
    capsys.readouterr()
    eng = ScriptedEngine(tokenizer)
    resumed = E.evaluate(eng, tokenizer, datasets, out_jsonl=str(out), **kw)
    err = capsys.readouterr().err
    assert f"{out}:1: the line has 'reward' = \"1.0\"" in err and f"{out}:2: the line has 'length' = null" in err
    assert f"{out}:3: the line is a list, not an object" in err and "drawn again" in err
    assert len(eng.calls) == 2  # problems 0 and 1 (chunks of one problem) are sampled again, the rest reused
    assert resumed["datasets"] == full["datasets"]
    recs = E.read_records(str(out))
    assert len(recs) == len(E.read_records(str(tmp_path / "a/s.jsonl")))


def test_eval_resume_with_a_corrupt_settings_file_moves_the_samples_aside(tmp_path, tokenizer, capsys):  # noqa: F811
    datasets = {"aime": E.load_dataset(os.path.join(DATA, "aime.json"))[0]}
    kw = dict(n=2, max_tokens=64, chunk_size=1, progress=False)
    out = tmp_path / "s.jsonl"
    first = E.evaluate(ScriptedEngine(tokenizer), tokenizer, datasets, out_jsonl=str(out), **kw)
    (tmp_path / "s.meta.json").write_text('{"n": 2, "temper')  # was a bare JSONDecodeError
    samples = out.read_text()
    eng = ScriptedEngine(tokenizer)
    again = E.evaluate(eng, tokenizer, datasets, out_jsonl=str(out), **kw)
    assert f"{tmp_path / 's.meta.json'} is not a valid settings file" in capsys.readouterr().err
    assert (tmp_path / "s.jsonl.unverified").read_text() == samples  # kept, never deleted
    assert len(eng.calls) == len(datasets["aime"]) and again["datasets"] == first["datasets"]
    assert json.loads((tmp_path / "s.meta.json").read_text())["n"] == 2

# -----------------------------------------------------------------------------
# sample.py's arguments


def run_sample(monkeypatch, *argv):
    import sample
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
    return sample.main()


def test_sample_device_cuda_without_a_gpu_says_so(tmp_path, monkeypatch, capsys):
    tiny_checkpoint(str(tmp_path), seed=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(M, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit) as e:
        run_sample(monkeypatch, "--ckpt", str(tmp_path), "--prompt", "1+1", "--device", "cuda")
    assert e.value.code == 2 and "--device cuda: no CUDA GPU is visible to torch" in capsys.readouterr().err


def test_sample_stops_at_max_position_embeddings(tmp_path, monkeypatch, capsys):
    tiny_checkpoint(str(tmp_path), seed=3, max_position_embeddings=40)
    run_sample(monkeypatch, "--ckpt", str(tmp_path), "--prompt", "1+1", "--no-template", "--max-tokens", "100",
               "--device", "cpu", "--temperature", "1.0", "--num-samples", "4")
    out = capsys.readouterr()
    assert "would run past max_position_embeddings (40)" in out.err and "answers stop at 37 new tokens" in out.err
    heads = [line for line in out.out.splitlines() if line.startswith("=== prompt")]
    lengths = [int(line.split("(")[1].split()[0]) for line in heads]
    assert len(lengths) == 4 and max(lengths) == 37 and "37 tokens, length" in " ".join(heads)  # was up to 100
    with pytest.raises(SystemExit) as e:
        run_sample(monkeypatch, "--ckpt", str(tmp_path), "--prompt", "1" * 40, "--no-template", "--device", "cpu")
    assert e.value.code == 2 and "max_position_embeddings is 40" in capsys.readouterr().err


def test_eval_stops_at_max_position_embeddings_too(tmp_path):
    """eval.py's engine ran to prompt + --max-tokens (32,768 by default) on a model with fewer positions,
    e.g. the demo's 256: answers past the trained positions, and a very long CPU run. Now cut there."""
    tiny_checkpoint(str(tmp_path), seed=3, max_position_embeddings=120)
    tok, model = TK.Tokenizer.from_pretrained(str(tmp_path)), M.from_pretrained(str(tmp_path), dtype=torch.float32)
    datasets = {"val": [{"id": 0, "problem": "1+1", "golds": ["2"], "answer": "2"}]}
    res = E.evaluate(model, tok, datasets, n=4, temperature=1.0, max_tokens=100, max_prompt_tokens=100, progress=False,
                     engine_kwargs={"memory_budget": 2**20})["datasets"]["val"]
    room = 120 - len(tok.encode(tok.chat_prompt("1+1")))  # the prompt is ~76 tokens (DeepScaleR's instruction)
    assert res["length"]["max"] == room and res["truncated"] > 0  # was up to 100 tokens
