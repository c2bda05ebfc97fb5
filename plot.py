"""
PNG of a training run's metrics.jsonl (matplotlib optional: without it this says so and does nothing).

    python plot.py out/demo          # or: python train.py --plot=out/demo   -> out/demo/metrics.png
"""
import json
import os
import sys


def plot(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); metrics are in", path)
        return None
    panels = [("reward", ["reward_mean", "val_accuracy"]), ("response length", ["response_len_mean"]),
              ("KL", ["kl"]), ("|engine - trainer| log-prob", ["logp_diff_mean", "logp_diff_max"]),
              ("step time (s)", ["time_step"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if k.startswith("val") else None)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    png = os.path.join(out_dir, "metrics.png")
    fig.savefig(png, dpi=100)
    print("wrote", png)
    return png


if __name__ == "__main__":
    for d in sys.argv[1:] or ["out/demo"]:
        plot(d)
