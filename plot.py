"""
PNG of a training run's metrics.jsonl (matplotlib optional: without it this says so and does nothing).

    python plot.py out/demo          # or: python train.py --plot=out/demo   -> out/demo/metrics.png

Each panel shows the raw per-step values faintly and a smoothed line over them (GRPO's per-step reward is
noisy: 16-128 prompts a step); a panel whose values are all zero or absent (KL when the KL term is off)
is left out. The title is the run's folder name.
"""
import json
import os
import sys

PANELS = [("reward", ["reward_mean", "val_accuracy"]), ("response length", ["response_len_mean"]),
          ("KL", ["kl"]), ("|engine - trainer| log-prob", ["logp_diff_mean", "logp_diff_max"]),
          ("step time (s)", ["time_step"])]


def series(rows, key):
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def panels(rows):
    """The PANELS with something to show: at least one non-zero value."""
    return [(title, keys) for title, keys in PANELS if any(v for k in keys for _, v in series(rows, k))]


def smooth(values, span=None):
    """Exponential moving average, debiased at the start (as TensorBoard's slider), over about `span`
    points (default: a 20th of the run, so the trend reads the same at 100 steps or 5,000; at least 5)."""
    span = span or max(1, len(values) // 20, min(5, len(values) // 5))
    w = 1.0 - 1.0 / span
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = w * acc + (1 - w) * v, w * norm + (1 - w)
        out.append(acc / norm)
    return out


def read_rows(path):
    """metrics.jsonl's rows. A line that is not a row is skipped: a kill can cut the last one short (a
    --resume rewrites the log), and plotting a killed run is when a plot is most wanted."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def plot(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"plot: {path} not found (--plot=OUT_DIR takes a run's out_dir)")
    rows = read_rows(path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); metrics are in", path)
        return None
    shown = panels(rows)
    if not shown:
        print("plot: nothing to plot yet in", path)
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.2 * len(shown) + 0.4), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], shown):
        for k in keys:
            pts = series(rows, k)
            if not pts:
                continue
            steps, values = zip(*pts)
            if k.startswith("val"):  # a few evaluations: points, not a trend
                ax.plot(steps, values, marker=".", label=k)
                continue
            raw = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
            ax.plot(steps, smooth(values), color=raw.get_color(), label=f"{k} (smoothed)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.abspath(out_dir)), fontsize=11)
    fig.tight_layout()
    png = os.path.join(out_dir, "metrics.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print("wrote", png)
    return png


if __name__ == "__main__":
    for d in sys.argv[1:] or ["out/demo"]:
        plot(d)
