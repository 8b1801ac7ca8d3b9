r"""End to end on the default backend: train-step images/s (norm=jaxbn vs norm=flax) and short train.py runs.

  python benchmarks/accelerator/training.py --part step --out /tmp/step.json [--quick]
  python benchmarks/accelerator/training.py --part trainpy --out /tmp/trainpy.json --workdir /tmp/w [--quick]

``step``: ``benchmarks/train_step.py``'s ``measure`` (one jitted Adam step of
`jaxbn.models`' CNN and ResNet-20 at batch 128, the state donated, candidates
interleaved round by round).

``trainpy``: ``train.py --config configs/smoke.py`` (and, in full mode, 100 steps
of the default CNN config) in a subprocess; its final line and wall time. When
Fashion-MNIST is not installed (``/usr/share/datasets/fashion-mnist``, a Debian
package, absent on a lent accelerator machine), a synthetic dataset of random
images in the same IDX format is written first (accuracy then means nothing;
the run proves the pipeline).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_PY_MODULES = ("absl", "ml_collections", "optax", "orbax.checkpoint", "matplotlib", "tqdm")


def step_part(quick: bool, out_path: str = None) -> dict:
    """Each model in turn (the results so far are written to `out_path` after each, so a time-out keeps them)."""
    import jax

    import train_step

    platform = jax.devices()[0].platform
    if platform == "cpu":
        models = ["cnn"] if quick else ["cnn", "resnet20"]
        steps = {"cnn": 2 if quick else 5, "resnet20": 1}
        rounds, budget = (3, 10.0) if quick else (7, 45.0)
    else:
        models = ["cnn", "resnet20"]
        steps = {"cnn": 50, "resnet20": 20}
        rounds, budget = (5, 10.0) if quick else (9, 30.0)
    t0 = time.perf_counter()
    out = {"platform": platform, "batch": 128, "optimizer": "adam 1e-3", "rounds": rounds, "steps_per_sample": steps,
           "models": {}}
    for model in models:
        res = train_step.measure([model], ["jaxbn", "flax"], rounds=rounds, steps=steps, batch=128, budget_s=budget)
        for m, r in res.items():
            out["models"][m] = {n: {k: v for k, v in d.items() if k != "images_per_s"} for n, d in r.items()}
            print(f"  train step {m:9s} " + "  ".join(
                f"{n}={d['images_per_s_median']:.0f} img/s" + (f" (x{d['speedup_vs_flax']:.2f})" if "speedup_vs_flax"
                                                               in d else "") for n, d in r.items()), flush=True)
        out["wall_s"] = time.perf_counter() - t0
        if out_path:
            common.write_json(out_path, out)
    return out


def _dataset_flag(tmp: str) -> tuple:
    """('--config.dataset=...' or None, description): real Fashion-MNIST when installed, else synthetic IDX."""
    try:
        from jaxbn.training.datasets import DEFAULT_DATA_DIR
    except Exception:  # noqa: BLE001
        DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
    if os.path.isdir(DEFAULT_DATA_DIR) and os.listdir(DEFAULT_DATA_DIR):
        return None, f"fashion_mnist ({DEFAULT_DATA_DIR})"
    sys.path.insert(0, os.path.join(common.ROOT, "tests"))
    import helpers  # tests/helpers.py: the IDX writer of the test suite

    rng = np.random.default_rng(0)
    splits = {s: {"image": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  "label": rng.integers(0, 10, (n,), dtype=np.uint8)} for s, n in (("train", 2048), ("test", 2000))}
    d = helpers.write_idx_dir(os.path.join(tmp, "synthetic_idx"), splits)
    return f"--config.dataset={d}", f"synthetic random IDX images in {d} (Fashion-MNIST not installed)"


def trainpy_part(quick: bool, workdir: str, timeout_s: float) -> dict:
    missing = [m for m in TRAIN_PY_MODULES if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        return {"skipped": f"train.py needs {', '.join(missing)}, not importable here"}
    os.makedirs(workdir, exist_ok=True)
    flag, data_desc = _dataset_flag(workdir)
    runs = [("smoke", ["--config", "configs/smoke.py"])]
    if not quick:
        runs.append(("default_cnn_100_steps", ["--config", "configs/default.py", "--config.num_train_steps=100",
                                               "--config.progress_bar=False", "--config.test_examples=2000",
                                               "--config.log_every_steps=50"]))
    out = {"dataset": data_desc, "runs": {}}
    deadline = time.perf_counter() + timeout_s
    for name, cfg in runs:
        left = deadline - time.perf_counter()
        if left < 20:
            out["runs"][name] = {"skipped": "out of time"}
            continue
        cmd = [sys.executable, "train.py", *cfg, f"--workdir={os.path.join(workdir, name)}"]
        if flag:
            cmd.append(flag)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, timeout=left)
            rc, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        wall = time.perf_counter() - t0
        final = ([ln for ln in text.splitlines() if ln.startswith("Final test accuracy:")]
                 or [ln for ln in text.splitlines() if "Final test accuracy" in ln])
        m = re.search(r"(\d+) images/s", final[-1]) if final else None
        out["runs"][name] = {"command": " ".join(cmd[1:]), "returncode": rc, "wall_s": wall,
                             "final_line": final[-1] if final else None,
                             "images_per_s": float(m.group(1)) if m else None,
                             "ok": rc == 0 and bool(final),
                             "tail": None if (rc == 0 and final) else text[-3000:]}
        print(f"  train.py {name}: rc={rc}, {wall:.0f} s: {final[-1] if final else text[-400:]}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("step", "trainpy"), required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    args = ap.parse_args(argv)
    if args.part == "step":
        res = step_part(args.quick, args.out)
    else:
        import tempfile

        res = trainpy_part(args.quick, args.workdir or tempfile.mkdtemp(prefix="jaxbn_accel_train_"), args.timeout_s)
    common.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
