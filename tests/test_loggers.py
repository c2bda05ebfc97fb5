"""What reads the metrics rows besides metrics.jsonl: loggers.py's optional TensorBoard / W&B copies
(train.py's hook is tested in test_train.py::test_tensorboard_gets_the_metrics_rows) and plot.py's
panels. No training here: a few seconds in all."""
import sys
import types

import pytest

import loggers
import plot
import train as T


def rows(steps, scale):
    return [{"step": s, "reward_mean": scale * s, "truncated_frac": 0.0, "skipped_updates": 0,
             "note": "text is left out", "val_accuracy": None, "flag": True} for s in steps]


def test_tensorboard_resume_overwrites_the_steps_it_redoes(tmp_path):
    """A run killed after step 3 and resumed from its step-2 checkpoint logs steps 2-3 again: TensorBoard
    then shows each step once, with the resumed values (as metrics.jsonl does)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = T.TrainConfig(out_dir=str(tmp_path), tensorboard=True)
    for steps, scale in ((range(4), 1.0), (range(2, 4), 10.0)):
        m = loggers.Mirrors(cfg)
        for r in rows(steps, scale):
            m.log(r)
        m.close()
    ev = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert sorted(ev.Tags()["scalars"]) == ["reward_mean", "skipped_updates", "truncated_frac"]
    assert [(e.step, e.value) for e in ev.Scalars("reward_mean")] == [(0, 0.0), (1, 1.0), (2, 20.0), (3, 30.0)]


def test_wandb_gets_each_row_at_its_step(tmp_path, monkeypatch):
    """W&B's calls, through a stand-in module (wandb is not a test requirement): one run named after
    out_dir with the config, one log per row at its step, finish on close."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = T.TrainConfig(out_dir=str(tmp_path / "my_run"), wandb=True, lr=3e-6)
    m = loggers.Mirrors(cfg)
    for r in rows(range(2), 1.0):
        m.log(r)
    m.close()
    (_, kw), *logs, fin = calls
    assert kw["name"] == "my_run" and kw["dir"] == cfg.out_dir and kw["config"]["lr"] == 3e-6
    assert kw["config"]["stages"][0]["group_size"] == 8  # Stage dataclasses become plain dicts
    assert logs == [("log", {"reward_mean": float(s), "truncated_frac": 0.0, "skipped_updates": 0.0}, s) for s in (0, 1)]
    assert fin == ("finish",)


@pytest.mark.parametrize("flag,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_package_is_named_and_off_by_default(tmp_path, monkeypatch, flag, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert loggers.Mirrors(T.TrainConfig(out_dir=str(tmp_path))).sinks == []  # off: nothing imported
    with pytest.raises(SystemExit, match=f"--{flag} needs the {flag} package \\(pip install {flag}\\)"):
        loggers.Mirrors(T.TrainConfig(out_dir=str(tmp_path), **{flag: True}))
    assert loggers.Mirrors(T.TrainConfig(out_dir=str(tmp_path), **{flag: True}), enabled=False).sinks == []


def test_plot_leaves_out_all_zero_panels_and_smooths():
    rows = [{"step": s, "reward_mean": (s % 2) * 1.0, "kl": 0.0, "response_len_mean": 7 + s, "logp_diff_mean": None,
             "time_step": 0.5} for s in range(40)]
    rows[10]["val_accuracy"] = 0.25
    assert [t for t, _ in plot.panels(rows)] == ["reward", "response length", "step time (s)"]  # KL all zero
    rows[3]["kl"] = 1e-4
    assert "KL" in [t for t, _ in plot.panels(rows)]
    raw = [r["reward_mean"] for r in rows]
    smoothed = plot.smooth(raw)  # span 5 for 40 points
    assert len(smoothed) == 40 and smoothed[0] == raw[0]  # debiased: starts at the first value, not at 0
    assert plot.smooth([3.0] * 9, span=4) == pytest.approx([3.0] * 9)  # a constant stays itself
    assert max(smoothed[10:]) - min(smoothed[10:]) < 0.3 < max(raw) - min(raw)  # the 0/1 zig-zag flattens
    assert plot.smooth(raw, span=1) == raw


def test_plot_reads_a_killed_runs_log_and_names_a_missing_one(tmp_path):
    """A kill can cut metrics.jsonl's last line short; the plot of that run skips it instead of a
    JSONDecodeError traceback. A folder without metrics.jsonl is named, not a FileNotFoundError."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.1}\n{"step": 1, "reward_mean": 0.2}\n'
                                            '[1, 2]\n{"step": 2, "rew')
    assert [r["step"] for r in plot.read_rows(str(tmp_path / "metrics.jsonl"))] == [0, 1]
    with pytest.raises(SystemExit, match="nowhere/metrics.jsonl not found"):
        plot.plot(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("argv", [["--plot=DIR"], ["--plot", "DIR"]])
def test_train_plot_flag_takes_the_folder_either_way(tmp_path, monkeypatch, argv):
    """`python train.py --plot out/demo` (a space, as most CLIs allow) plots that folder like --plot=out/demo."""
    seen = []
    monkeypatch.setattr(plot, "plot", seen.append)
    T.main([a.replace("DIR", str(tmp_path)) for a in argv])
    assert seen == [str(tmp_path)]
