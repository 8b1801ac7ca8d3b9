"""Reporting a run: ``workdir/metrics.jsonl``, its plot, the progress bar.

metrics.jsonl holds one JSON object per event: a train record (``step``,
``epoch``, ``train_loss``, ``train_accuracy``, ``images_per_sec``,
``learning_rate``, ``nonfinite_steps``) every ``config.log_every_steps`` and
before each evaluation or checkpoint, a test record (``step``, ``epoch``,
``test_loss``, ``test_accuracy``, ``test_examples``) after each epoch, and a last
record with ``"final": true`` and the run's summary.
"""

from __future__ import annotations

import json
import os

__all__ = ["MetricsWriter", "read_jsonl", "save_plot", "progress_bar", "fmt"]


def read_jsonl(path: str) -> list:
    """The records of a JSON-lines file; none when it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends JSON lines to workdir/metrics.jsonl on the primary process only."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drops records a resumed run will write again (after `step`, and 'final')."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_jsonl(self.path) if r["step"] <= step and not r.get("final")]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_plot(metrics_path: str, out_path: str) -> None:
    """Plots train/test loss and accuracy from a metrics.jsonl against steps (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in read_jsonl(metrics_path) if not r.get("final")]
    train = [r for r in rows if "train_loss" in r and r["train_loss"] is not None]
    test = [r for r in rows if "test_loss" in r]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate((("loss", "cross-entropy loss"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot([r["step"] for r in train], [r[f"train_{key}"] for r in train], label="train (running)")
        ax.plot([r["step"] for r in test], [r[f"test_{key}"] for r in test], "o-", label="test")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over the training steps (a no-op one when not `enabled`)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)


def fmt(x) -> str:
    """A loss or accuracy for the progress bar: 4 decimals, '-' for None."""
    return "-" if x is None else f"{x:.4f}"
