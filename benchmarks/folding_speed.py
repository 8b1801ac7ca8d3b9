"""Inference speed-up of a BN-folded ResNet-20 on this machine.

    .venv/bin/python benchmarks/folding_speed.py [--batch 256] [--reps 20]

Times the evaluation-mode forward of ResNet-20 (28×28×1 inputs) with its
BatchNorms and the folded, BN-free model from `jaxbn.inference.fold_batch_norms`,
interleaved in one process; reports medians and their ratio. Also checks the
outputs agree. Writes benchmarks/results/folding_speed.json.
"""

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.inference import fold_batch_norms
from jaxbn.models import ResNet20

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.batch, 28, 28, 1))
    model = ResNet20()
    v = model.init(jax.random.key(1), x[:2], train=True)
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])  # non-trivial statistics
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    fmodel, fv, report = fold_batch_norms(model, v, x)
    f_bn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    f_fold = jax.jit(lambda v, x: fmodel.apply(v, x, train=False))
    y0, y1 = f_bn(v, x), f_fold(fv, x)
    err = float(jnp.abs(y0 - y1).max() / jnp.abs(y0).max())
    times = _common.interleave({"bn": lambda: f_bn(v, x), "folded": lambda: f_fold(fv, x)}, rounds=args.reps)
    med = {k: float(np.median(t)) for k, t in times.items()}
    res = {
        "batch": args.batch,
        "median_seconds": med,
        "speedup": med["bn"] / med["folded"],
        "images_per_second": {k: args.batch / t for k, t in med.items()},
        "max_rel_output_diff": err,
        "folded_layers": len(report.folded),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "jax": jax.__version__,
    }
    print(json.dumps(res, indent=1))
    print("wrote", _common.save_json("folding_speed.json", dict(res, environment=_common.environment())))


if __name__ == "__main__":
    main()
