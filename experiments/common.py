"""What the studies share: the process set-up, one training run, the spread over seeds, the record.

Every run is one call of `jaxbn.training.loop.train_and_evaluate` (train.py's library: the same
data pipeline, models, parallel modes and metrics) with a config derived from configs/default.py,
in a temporary work directory deleted afterwards. Runs that compile the same steps (the seeds of
one arm) reuse them: `jaxbn.training.steps.steps_for` caches them, so a study runs its seeds
one after another.

The record of a study (``<out>/<study>.json``; ``<study>_quick.json`` for ``--quick``, so a
quick run never overwrites a full one) holds the command, the settings, the machine and library
versions, and for every run its labels, its full config, its seed, its test loss and accuracy
after each epoch, its logged training loss, and its final figures. It is rewritten after each
run, so an interrupted study leaves the runs it finished (``"status": "running"``).

This module does not import JAX at module level: `prepare_process` must run before JAX starts.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "experiments", "results")

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def prepare_process(num_devices: int) -> None:
    """Sets up this process for a study; call it before anything imports JAX.

    Gives the CPU `num_devices` devices (replacing a device count already in ``XLA_FLAGS``),
    runs on the CPU unless ``JAX_PLATFORMS`` says otherwise (the studies are sized for it),
    puts the repository root on ``sys.path`` (for ``configs``), and keeps freed memory in the
    heap as train.py does (`jaxbn.cpu_memory.keep_heap`; skipped when ``GLIBC_TUNABLES`` is
    set, even to "").

    It also gives JAX a compilation cache in a temporary directory, deleted at exit, unless
    ``JAX_COMPILATION_CACHE_DIR`` is set: runs whose steps differ only in what a program does
    not depend on (the initialization of runs that differ in the learning rate or the batch
    size) then compile it once. XLA:CPU takes seconds to compile the parameters' random
    initialization, which would otherwise dominate a study of short runs.
    """
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={num_devices}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="jaxbn_experiment_cache_")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if "GLIBC_TUNABLES" not in os.environ:
        from jaxbn.cpu_memory import keep_heap  # imports JAX: after the environment is set

        _ALLOCATOR.update(keep_heap())
    else:
        _ALLOCATOR.update(applied=False, reason=f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']!r} was set")


_ALLOCATOR: Dict[str, Any] = {}  # what prepare_process did to the allocator


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``<script>: error: <what> (see --help)``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def comma_list(item: Callable[[str], Any], what: str, *, choices: Sequence[Any] = (),
               positive: bool = False) -> Callable[[str], List[Any]]:
    """An argparse ``type`` for a comma-separated list of `item` values (no repeats)."""

    def parse(text: str) -> List[Any]:
        parts = [p.strip() for p in text.split(",")]
        values = []
        for p in parts:
            try:
                v = item(p)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{p!r} is not {what}") from None
            if choices and v not in choices:
                raise argparse.ArgumentTypeError(f"{p!r} is not one of {', '.join(map(str, choices))}")
            if positive and not (v > 0 and math.isfinite(v)):
                raise argparse.ArgumentTypeError(f"{p!r} is not {what} > 0")
            if v in values:
                raise argparse.ArgumentTypeError(f"{p!r} is given twice")
            values.append(v)
        return values

    return parse


def seed_count(text: str) -> int:
    """An argparse ``type``: the number of seeds, an int >= 1 (the seeds are 0, 1, ...)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seeds (an int >= 1)")
    return n


def add_common_arguments(parser: argparse.ArgumentParser, default_seeds: int) -> None:
    """``--quick``, ``--out`` and ``--seeds``, the same in every study."""
    parser.add_argument("--quick", action="store_true",
                        help="a few steps per arm on a few hundred images (checks that the study runs; "
                             "writes <study>_quick.json/png)")
    parser.add_argument("--out", default=RESULTS_DIR, metavar="DIR",
                        help="directory for the JSON record and the figure (default: experiments/results/)")
    parser.add_argument("--seeds", type=seed_count, default=None, metavar="N",
                        help=f"seeds per point, 0..N-1 (default: {default_seeds}; 1 with --quick)")


def output_paths(out_dir: str, study: str, quick: bool) -> Tuple[str, str]:
    """``(json_path, png_path)`` of `study` under `out_dir` (created)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, study + ("_quick" if quick else ""))
    return stem + ".json", stem + ".png"


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------

def environment() -> Dict[str, Any]:
    """The machine, the JAX devices, the library versions and the repository's commit."""
    from importlib import metadata

    import jax

    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "ml_collections", "jaxbn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "jax_backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "allocator_keep_heap": dict(_ALLOCATOR) or None,
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def quiet_run(config, total_steps: int, log_points: int) -> None:
    """A study's run controls: about `log_points` log lines, only the last step's checkpoint (in
    the run's temporary directory), no progress bar."""
    config.log_every_steps = max(1, total_steps // log_points)
    config.checkpoint_every_steps = total_steps
    config.max_checkpoints_to_keep = 1
    config.progress_bar = False


def train_run(config) -> Dict[str, Any]:
    """Trains `config` with `train_and_evaluate` in a temporary work directory (deleted after).

    Returns:
      ``{'seed', 'config', 'final', 'evals', 'train', 'wall_time_s'}``: the config as a plain
      dict; the final summary (step, test accuracy and loss, test examples, non-finite steps
      skipped, training time and images/s without compilation, traces); the test loss and
      accuracy after each epoch (``evals``); the logged training records (``train``); the
      run's wall time including compilation when its steps were not compiled before.
    """
    from jaxbn.training import loop, metrics
    from jaxbn.training.config import config_dict

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxbn_experiment_") as workdir:
        _, summary = loop.train_and_evaluate(config, workdir)
        records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rows = [r for r in records if not r.get("final")]
    final_keys = ("step", "test_accuracy", "test_loss", "test_examples", "nonfinite_steps", "train_time_s",
                  "images_per_sec", "traces")
    return {
        "seed": config.seed,
        "config": config_dict(config),
        "final": {k: summary.get(k) for k in final_keys},
        "evals": [{k: r[k] for k in ("step", "epoch", "test_loss", "test_accuracy")}
                  for r in rows if "test_loss" in r],
        "train": [{k: r.get(k) for k in ("step", "epoch", "train_loss", "train_accuracy", "learning_rate",
                                         "nonfinite_steps")} for r in rows if "train_loss" in r],
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }


def run_study(study: str, description: str, settings: Dict[str, Any],
              specs: Iterable[Tuple[Dict[str, Any], Any]], json_path: str) -> Dict[str, Any]:
    """Runs each ``(labels, config)`` of `specs` in order, printing one line per run and
    rewriting `json_path` after each; returns the record (``status`` 'complete')."""
    specs = list(specs)
    doc = {"study": study, "description": description,
           "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
           "settings": settings, "environment": environment(), "status": "running", "runs": []}
    t0 = time.perf_counter()
    for i, (labels, config) in enumerate(specs):
        run = {**labels, **train_run(config)}
        doc["runs"].append(run)
        doc["wall_time_s"] = round(time.perf_counter() - t0, 1)
        write_json(json_path, doc)
        final = run["final"]
        skipped = f", {final['nonfinite_steps']} non-finite step(s) skipped" if final["nonfinite_steps"] else ""
        print(f"[{i + 1}/{len(specs)}] {' '.join(f'{k}={v}' for k, v in labels.items())}: test accuracy "
              f"{100 * final['test_accuracy']:.2f}%, test loss {final['test_loss']:.4f} after {final['step']} "
              f"steps{skipped} ({run['wall_time_s']:.1f} s)", flush=True)
    doc["status"] = "complete"
    return doc


def write_json(path: str, doc: Dict[str, Any]) -> None:
    """Writes `doc` to `path` atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------

def spread(values: Sequence[float]) -> Dict[str, Any]:
    """``n``, ``mean``, ``std`` (the sample standard deviation, ddof=1; 0 for one value),
    ``min`` and ``max`` of `values`."""
    import numpy as np

    v = np.asarray(values, np.float64)
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def group_runs(runs: Sequence[Dict[str, Any]], keys: Sequence[str]) -> Dict[tuple, List[Dict[str, Any]]]:
    """The runs grouped by their values of `keys`, in the order they first appear."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def new_figure(width: float, height: float):
    """A Matplotlib figure drawn off-screen (Agg), without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def library_errors() -> tuple:
    """The library's exceptions that a study reports in one line (bad config, data, work directory)."""
    from jaxbn.training.config import ConfigError
    from jaxbn.training.datasets import DataError
    from jaxbn.training.workdir import WorkdirError

    return ConfigError, DataError, WorkdirError
