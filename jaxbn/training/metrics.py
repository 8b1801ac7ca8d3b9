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
from typing import Callable, Optional, Tuple

from absl import logging

from jaxbn.training.workdir import disk_full_error, is_disk_full

__all__ = ["MetricsError", "MetricsWriter", "read_jsonl", "save_plot", "progress_bar", "fmt"]


class MetricsError(ValueError):
    """metrics.jsonl is corrupt somewhere other than a torn last line."""


def read_jsonl(path: str) -> list:
    """The records of a JSON-lines file (none when it does not exist).

    A last line that is not valid JSON is what a crash or a full disk in the
    middle of a write leaves: it is dropped, with a warning naming the file.

    Raises:
      MetricsError: any other line is not a JSON object with an integer
        ``step`` (the message names the file and the line).
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("expected a JSON object with an integer 'step'")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == last:
                logging.warning("%s: dropped its torn last line %d (%d bytes, %r), left by a write "
                                "that was interrupted", path, i + 1, len(line), line[:60])
                break
            raise MetricsError(
                f"{path}, line {i + 1}: not a metrics record ({e}): {line[:80]!r}. The file is "
                f"corrupt; delete that line (or the file, losing the run's metrics history) and run "
                f"again") from None
        records.append(record)
    return records


class MetricsWriter:
    """Appends JSON lines to workdir/metrics.jsonl on the primary process only.

    A full disk raises `workdir.WorkdirError` naming the file and
    `latest_checkpoint()`, the last complete checkpoint.
    """

    def __init__(self, path: str, enabled: bool, latest_checkpoint: Callable[[], Optional[int]] = lambda: None):
        self.path, self.enabled, self.latest_checkpoint = path, enabled, latest_checkpoint

    def truncate_after(self, step: int) -> None:
        """Drops records a resumed run will write again (after `step`, and 'final')."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [] if step < 0 else [r for r in read_jsonl(self.path) if r["step"] <= step and not r.get("final")]
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            self._raise_if_disk_full(e, f"rewriting {self.path}")
            raise

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                self._raise_if_disk_full(e, f"appending step {record.get('step')} to {self.path}")
                raise

    def _raise_if_disk_full(self, e: OSError, doing: str) -> None:
        if is_disk_full(e):
            raise disk_full_error(doing, self.path, os.path.dirname(self.path),
                                  self.latest_checkpoint()) from e


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


FALLBACK_COLUMNS = 100  # the bar's width when the terminal reports none (a pty without a size)
FALLBACK_ROWS = 24


def terminal_columns(fp) -> Tuple[Optional[int], Optional[int]]:
    """``(columns, rows)`` for the bar on `fp`: the terminal's size less one column (as tqdm's
    own ``dynamic_ncols``), `FALLBACK_COLUMNS` (or $COLUMNS) when a terminal reports 0 columns,
    (and `FALLBACK_ROWS` rows when it reports none), and ``(None, None)`` when `fp` is not a
    terminal (tqdm's fixed-width bar)."""
    try:
        cols, rows = os.get_terminal_size(fp.fileno())
    except (AttributeError, ValueError, OSError):
        return None, None
    if cols <= 1:
        env = os.environ.get("COLUMNS", "")
        cols = int(env) if env.isdigit() and int(env) > 1 else FALLBACK_COLUMNS + 1
    # Rows only matter to nested bars, but must not be left unset: tqdm then asks the terminal
    # itself and, told 0, hides the bar.
    return cols - 1, (rows - 1 if rows > 1 else FALLBACK_ROWS)


def progress_bar(total: int, initial: int, enabled: bool, file=None):
    """A tqdm bar over the training steps (a no-op one when not `enabled`) on `file` (stderr).

    Its width follows the terminal's as it is resized; tqdm's own ``dynamic_ncols``
    would take a terminal that reports 0 columns (a pty that was given no size) at its
    word and print no bar at all, so the width comes from `terminal_columns`.
    """
    import sys

    from tqdm import tqdm

    file = sys.stderr if file is None else file
    ncols, nrows = terminal_columns(file) if enabled else (None, None)
    bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", mininterval=1.0,
               smoothing=0.1, file=file, ncols=ncols, nrows=nrows)
    if enabled:
        # tqdm calls `dynamic_ncols(fp)` for the size before each refresh when it is set.
        bar.dynamic_ncols = terminal_columns
    return bar


def fmt(x) -> str:
    """A loss or accuracy for the progress bar: 4 decimals, '-' for None."""
    return "-" if x is None else f"{x:.4f}"
