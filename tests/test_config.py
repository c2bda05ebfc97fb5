"""configurator.py: the one typed field table behind train.py's checking and --help. Every mistake is
refused when parsed, before anything loads, naming the field, the value and where it was set; a field
added with an annotation and a comment gets checking and help with nothing else to register."""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest

import configurator as C
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(argv, *patterns):
    with pytest.raises(SystemExit) as e:
        T.load_config(argv)
    for p in patterns:
        assert p in str(e.value), (p, str(e.value))
    return str(e.value)


def config_file(tmp_path, text, name="c.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)

# -----------------------------------------------------------------------------
# The table itself


def test_every_field_has_a_checkable_type_and_a_line_of_help():
    for cls in (T.TrainConfig, T.Stage):
        table = C.describe(cls)
        assert list(table) == [f.name for f in __import__("dataclasses").fields(cls)]
        for f in table.values():
            assert f.help, f"{cls.__name__}.{f.name}: add a trailing comment saying what it means"
            C.type_name(f.type)  # raises for an annotation the checker cannot check
    table = C.describe(T.TrainConfig)
    assert (table["lr"].type, table["lr"].check, table["lr"].section) == (float, "x >= 0", "update")
    assert table["engine_memory"].check == "x > 0" and C.type_name(table["engine_memory"].type) == "float | None"
    assert C.type_name(table["stages"].type) == "list[Stage]" and C.type_name(table["betas"].type) == "tuple[float, float]"


def test_a_new_field_needs_only_its_line(tmp_path, monkeypatch):
    """What another helper does to add a knob: one annotated line with a comment (the check optional)."""
    (tmp_path / "newcfg.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        @dataclass
        class Cfg:
            # knobs
            tis_cap: float = 2.0          # truncated importance-sampling cap [x >= 1]
            mode: str = "tis"             # which correction, see [the paper] for more
            cap_list: list[int] | None = None  # optional list of caps
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    Cfg = importlib.import_module("newcfg").Cfg
    cfg = C.configure(Cfg(), ["--tis_cap=3", "--cap_list=[1, 2]"])
    assert cfg.tis_cap == 3.0 and isinstance(cfg.tis_cap, float) and cfg.cap_list == [1, 2]
    with pytest.raises(SystemExit, match=r"tis_cap = 0.5 .*must satisfy x >= 1"):
        C.configure(Cfg(), ["--tis_cap=0.5"])
    with pytest.raises(SystemExit, match=r"cap_list\[1\] = 'a'.*expected an integer"):
        C.configure(Cfg(), ["--cap_list=[1, 'a']"])
    help_text = C.help_text(Cfg, "usage: x")
    assert "--tis_cap (float, default 2.0; x >= 1)" in help_text and "truncated importance-sampling cap" in help_text
    assert "see [the paper] for more" in help_text  # a bracket that does not mention x is just text
    assert "knobs:" in help_text


def test_unsupported_annotation_and_broken_check_fail_loudly(tmp_path, monkeypatch):
    (tmp_path / "badcfg.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import pathlib

        @dataclass
        class Typed:
            where: pathlib.Path = None  # a path

        @dataclass
        class Checked:
            n: int = 1  # a count [x >=]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("badcfg")
    with pytest.raises(TypeError, match="Typed.where"):
        C.describe(mod.Typed)
    with pytest.raises(SyntaxError):
        C.describe(mod.Checked)

# -----------------------------------------------------------------------------
# The defects of issue 16 (each was accepted before, or failed late naming nothing)


def test_wrong_types_are_refused_when_parsed_naming_field_and_value():
    refused(["--max_steps=abc"], "max_steps = 'abc'", "--max_steps=abc", "int")
    refused(["--lr=abc"], "lr = 'abc'", "float")
    refused(["--betas=abc"], "betas = 'abc'", "tuple[float, float]")
    refused(["--betas=(0.9,)"], "betas", "2 items")
    refused(["--max_steps=1e3"], "max_steps = 1000.0", "expected an integer")
    refused(["--kl_coef=True"], "kl_coef = True", "a number")
    refused(["--top_p=float('nan')"], "top_p")
    refused(["--lr"], "needs a value: --lr=VALUE")
    cfg = T.load_config(["--lr=1", "--betas=0.9,0.95", "--engine_memory=none", "--instruction=2+2"])
    assert cfg.lr == 1.0 and type(cfg.lr) is float and cfg.betas == (0.9, 0.95) and cfg.engine_memory is None
    assert cfg.instruction == "2+2"  # a str field keeps the text as typed


def test_bools_are_read_strictly():
    for text, value in [("on", True), ("true", True), ("1", True), ("yes", True), ("off", False), ("False", False),
                        ("0", False), ("no", False)]:
        assert T.load_config([f"--dynamic_sampling={text}"]).dynamic_sampling is value
    assert T.load_config(["--dynamic_sampling"]).dynamic_sampling is True
    refused(["--resume=maybe"], "resume = 'maybe'", "true/false")
    refused(["--export_hf=2"], "export_hf = '2'")


def test_ranges_are_checked_before_anything_runs():
    msg = refused(["--ckpt_interval=0", "--log_interval=0", "--mini_batches=0"], "ckpt_interval = 0",
                  "log_interval = 0", "mini_batches = 0", "x >= 1")
    assert msg.count("must satisfy") == 3  # every problem at once
    refused(["--top_p=0"], "top_p = 0.0", "0 < x <= 1")
    refused(["--temperature=0"], "temperature = 0.0", "x > 0")
    refused(["--loss_agg=mean"], "loss_agg = 'mean'", "token-mean")  # the allowed values are named
    refused(["--compute_dtype=fp8"], "compute_dtype", "bfloat16")
    refused(["--stages=[]"], "stages = []", "len(x) >= 1")
    refused(["--prompts_per_step=6", "--mini_batches=4"], "prompts_per_step (6)", "4 mini-batches")
    refused(["--resume", "--overwrite"], "choose one")


def test_stage_entries_are_checked_field_by_field(tmp_path):
    refused(["--stages=[(3, 16, 0)]"], "stages[0].group_size = 0", "x >= 1")
    refused(["--stages=[(3, 16, 4), (2, 'long')]"], "stages[1].max_response_tokens = 'long'", "an integer")
    refused(["--stages=[{'steps': 2, 'groupsize': 4}]"], "unknown Stage field 'groupsize'", "'group_size'")
    refused(["--stages=[(1, 2, 3, 4, 5)]"], "Stage has 4 fields")
    refused(["--stages=[{'group_size': 4}]"], "Stage needs steps")
    f = config_file(tmp_path, "config.stages = [Stage(3, 16, 4), (2, 32, 8), {'steps': 1}]\n")
    assert T.load_config([f]).stages == [T.Stage(3, 16, 4), T.Stage(2, 32, 8), T.Stage(1)]
    f = config_file(tmp_path, "config.stages = [Stage(3, 16, -4)]\n", "neg.py")
    refused([f], "stages[0].group_size = -4", f"set by {f}:1")


def test_config_files_refuse_unknown_names_with_the_nearest_field(tmp_path):
    f = config_file(tmp_path, "config.lr = 1e-5\nconfig.kl_coeff = 0\n")
    refused([f], f"{f}:2", "config.kl_coeff", "did you mean 'kl_coef'")
    f = config_file(tmp_path, "learning_rate = 1e-5\n", "bare.py")
    refused([f], f"{f}:1", "learning_rate", "did you mean 'lr'", "start with _")
    f = config_file(tmp_path, "import math\n_steps = 7\nconfig.stages = [Stage(_steps, 8, 2)]\nmini_batches = 1\n"
                              "def _helper():\n    return 1\n", "ok.py")
    cfg = T.load_config([f])
    assert cfg.stages == [T.Stage(7, 8, 2)] and cfg.mini_batches == 1
    f = config_file(tmp_path, "config.lr = 'fast'\n", "typed.py")
    refused([f], "lr = 'fast'", f"set by {f}:1", "a number")
    f = config_file(tmp_path, "x = 1\nconfig.top_p = float('nan')\n", "nan.py")
    refused([f], "x = ...: no such field")  # the first problem stops the file
    f = config_file(tmp_path, "config.top_p = float('nan')\n", "nan2.py")
    refused([f], "top_p = nan", "a finite number")
    refused(["--kl_coeff=0"], "unknown option --kl_coeff", "did you mean 'kl_coef'")
    refused(["1e-5"], "cannot read config file '1e-5'", "--key=value")

# -----------------------------------------------------------------------------
# --help from the same table (issue 14), and the command line


def test_help_lists_every_field_with_type_default_and_meaning(capsys):
    for flag in ("--help", "-h"):
        T.main([flag])
        text = capsys.readouterr().out
        assert "usage: python train.py [CONFIG.py ...] [--key=value ...]" in text
        for f in list(C.describe(T.TrainConfig).values()) + list(C.describe(T.Stage).values()):
            assert f.name in text and f.help.split()[0] in text
        assert "--lr (float, default 1e-06; x >= 0)" in text and "AdamW learning rate" in text
        assert "--max_steps (int, default 0; x >= 0)" in text
        assert "Stage.group_size (int, default 8; x >= 1)" in text
        for must in ("--plot=OUT_DIR", "--resume", "--overwrite", "CONFIG.py", "edits `config`", "start with _"):
            assert must in text, must


def test_command_line_errors_exit_1_without_a_traceback_and_help_exits_0():
    """Two interpreter starts (~3-10 s on the 2-core machine, most of it importing torch)."""
    run = lambda *a: subprocess.run([sys.executable, "train.py", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                    timeout=300)
    r = run("--max_steps=abc")
    assert r.returncode == 1 and "max_steps = 'abc'" in r.stderr and "Traceback" not in r.stderr
    r = run("-h")
    assert r.returncode == 0 and "usage:" in r.stdout and r.stderr == ""
