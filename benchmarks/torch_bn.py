"""PyTorch CPU BatchNorm2d timings, in a process of their own (bn_layer.py runs this).

PyTorch's OpenMP threads spin after each op and slow XLA down when both run in
one process, so PyTorch is timed here, alone, with the same protocol: the copy
bandwidth and every shape interleaved round by round, medians over rounds.

Each training sample is ``y = bn(x)`` plus ``torch.autograd.grad(y, (x, weight,
bias), dy)`` for a channels_last (N, C, H, W) tensor (NHWC in memory, like JAX's
arrays) in training mode (running statistics updated, momentum 0.01 = Flax's
0.99); each evaluation sample is ``bn(x)`` under ``torch.inference_mode()``. The
bandwidth is an in-place ``neg_`` of a 256 MiB float32 tensor (read + write).

  python benchmarks/torch_bn.py --shapes 128,26,26,32 64,56,56,64 --out /tmp/torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", required=True, help="NHWC shapes as N,H,W,C")
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget-s", type=float, default=60.0, help="time budget for all timed rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    cands, meta = {}, {}

    big = torch.ones(64 * 2**20, dtype=torch.float32)
    cands["copy"] = lambda: big.neg_()

    for dt_name in args.dtypes:
        dt = getattr(torch, dt_name)
        for (n, h, w, c) in shapes:
            x = torch.randn(n, c, h, w).to(dtype=dt, memory_format=torch.channels_last).requires_grad_()
            dy = torch.randn(n, c, h, w).to(dtype=dt, memory_format=torch.channels_last)
            bn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.01)  # float32 parameters
            bn.train()
            key = f"train/{dt_name}/{n},{h},{w},{c}"

            def train(x=x, dy=dy, bn=bn):
                y = bn(x)
                return torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)

            cands[key] = train
            bne = torch.nn.BatchNorm2d(c, eps=1e-5).eval()
            xe = x.detach().clone(memory_format=torch.channels_last)

            def evaluate(xe=xe, bne=bne):
                with torch.inference_mode():
                    return bne(xe)

            cands[f"eval/{dt_name}/{n},{h},{w},{c}"] = evaluate
            meta[key] = {"dtype": dt_name, "shape": [n, h, w, c]}

    for f in cands.values():  # warm-up
        for _ in range(2):
            f()
    samples = {k: [] for k in cands}
    names = list(cands)
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = [names[i] for i in np.random.default_rng(r).permutation(len(names))]
        for k in order:
            f = cands[k]
            calls = 1 if k == "copy" else max(1, int(3e6 // _numel(k)))
            if k != "copy":
                f()  # untimed: x in cache, as bn_layer.py's warm_each
            t = time.perf_counter()
            for _ in range(calls):
                f()
            samples[k].append((time.perf_counter() - t) / calls)
        if r >= 4 and time.perf_counter() - t0 > args.budget_s:
            break
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
        "copy_bw": 2 * big.numel() * 4 / float(np.median(samples["copy"])),
        "median_s": {k: float(np.median(v)) for k, v in samples.items()},
        "samples_s": samples,
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


def _numel(key: str) -> int:
    return int(np.prod([int(v) for v in key.rsplit("/", 1)[1].split(",")]))


if __name__ == "__main__":
    sys.exit(main())
