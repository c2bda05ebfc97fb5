"""
Copies of train.py's metrics rows for the dashboards RL people watch. out_dir/metrics.jsonl stays the
record (resume, plot.py and the tests read it); these mirrors are optional and off by default:

    python train.py config/demo.py --tensorboard     # out/demo/tb; then: tensorboard --logdir out/demo
    WANDB_MODE=offline python train.py config/demo.py --wandb   # no network; `wandb sync` uploads later

Each numeric field of a row becomes a scalar of the same name at the row's step; text, lists and None
are left out. A resumed run overwrites what the killed run logged after its checkpoint (TensorBoard's
purge_step), as metrics.jsonl does. W&B starts a new run per launch (it cannot rewrite past steps).
"""
import dataclasses
import os


class Mirrors:
    """One log(row) call per step feeds every enabled dashboard. enabled=False (ranks other than 0):
    nothing is imported or written."""

    def __init__(self, cfg, enabled=True):
        self.sinks = []
        if enabled and cfg.tensorboard:
            self.sinks.append(TensorBoard(os.path.join(cfg.out_dir, "tb")))
        if enabled and cfg.wandb:
            self.sinks.append(WandB(cfg))

    def log(self, row):
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self.sinks:
            sink.log(scalars, row["step"])

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def need(package, flag):
    raise SystemExit(f"--{flag} needs the {package} package (pip install {package}); without the flag "
                     "metrics.jsonl alone is written")


class TensorBoard:
    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            need("tensorboard", "tensorboard")
        self.writer_class, self.log_dir, self.writer = SummaryWriter, log_dir, None

    def log(self, scalars, step):
        if self.writer is None:  # opened at the first row: a resumed run purges the steps it redoes
            self.writer = self.writer_class(self.log_dir, purge_step=step)
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps every row it logged

    def close(self):
        if self.writer is not None:
            self.writer.close()


class WandB:
    def __init__(self, cfg):
        try:
            import wandb
        except ImportError:
            need("wandb", "wandb")
        self.wandb = wandb
        config = {k: v for k, v in dataclasses.asdict(cfg).items()}
        # WANDB_MODE=offline (no network) and WANDB_PROJECT are read by wandb itself
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanoscaler"),
                              name=os.path.basename(os.path.abspath(cfg.out_dir)), dir=cfg.out_dir, config=config)

    def log(self, scalars, step):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()
