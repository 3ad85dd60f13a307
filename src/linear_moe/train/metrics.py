"""Run metrics: one JSON line per logged step, TensorBoard scalars, and PNG plots at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends ``{"step": ..., **metrics}`` to ``<run>/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: str = "", config: dict | None = None):
        self.run_dir = Path(run_dir)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(f"train.wandb_project={wandb_project!r} but wandb is not installed (pip install wandb), "
                                 "or leave train.wandb_project empty") from None
            self._wandb = wandb.init(project=wandb_project, name=self.run_dir.name, dir=str(self.run_dir), config=config,
                                     resume="allow")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and throughput.png from metrics.jsonl (when matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for name, keys, ylabel in [("loss.png", ("loss", "eval_loss"), "loss (nats/token)"), ("throughput.png", ("tokens_per_s",), "tokens/s")]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    return written


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v
