r"""PyTorch's BatchNorm2d (cuDNN on a GPU) in a process of its own, same protocol as layer.py.

  python benchmarks/accelerator/torch_device.py --shapes 128,26,26,32 --dtypes float32 --out /tmp/t.json

Never imports JAX (both would hold the accelerator's memory). Uses CUDA when
torch has it, else the CPU (``--device``). Channels-last (N, C, H, W) tensors
(NHWC in memory, like JAX's arrays); parameters in float32 (as jaxbn and Flax
keep them; for bfloat16 inputs cuDNN takes float32 parameters). Per shape and
dtype: training ``y = bn(x)`` and ``torch.autograd.grad(y, (x, weight, bias), dy)``
(running statistics updated, momentum 0.01 = Flax's 0.99), and evaluation
``bn(x)`` under ``torch.inference_mode()``. The bandwidth reference is an
in-place ``neg_`` of a large float32 tensor, interleaved with the shapes; a
sample dispatches `calls` calls and synchronizes once.
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
    ap.add_argument("--bf16-shapes", nargs="*", default=None, help="shapes timed in bfloat16 too (default: all)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--target-s", type=float, default=0.02, help="seconds per sample")
    ap.add_argument("--copy-elems", type=int, default=256 * 2**20)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    big = torch.ones(args.copy_elems, dtype=torch.float32, device=dev)
    cands, meta = {"copy": lambda: big.neg_()}, {}
    for dt_name in args.dtypes:
        dt = getattr(torch, dt_name)
        for s in args.shapes:
            if dt_name != "float32" and args.bf16_shapes is not None and s not in args.bf16_shapes:
                continue
            n, h, w, c = (int(v) for v in s.split(","))
            x = torch.randn(n, c, h, w, device=dev).to(dtype=dt, memory_format=torch.channels_last)
            x.requires_grad_()
            dy = torch.randn(n, c, h, w, device=dev).to(dtype=dt, memory_format=torch.channels_last)
            bn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.01).to(dev).train()

            def train(x=x, dy=dy, bn=bn):
                y = bn(x)
                return torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)

            bne = torch.nn.BatchNorm2d(c, eps=1e-5).to(dev).eval()
            xe = x.detach().clone(memory_format=torch.channels_last)

            def evaluate(xe=xe, bne=bne):
                with torch.inference_mode():
                    return bne(xe)

            for kind, f in (("train", train), ("eval", evaluate)):
                key = f"{kind}/{dt_name}/{n},{h},{w},{c}"
                cands[key] = f
                meta[key] = {"dtype": dt_name, "shape": [n, h, w, c], "numel": n * h * w * c}

    calls = {}
    for k, f in cands.items():  # warm-up and calibration
        f()
        f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        calls[k] = int(min(2000, max(1, round(args.target_s / max(time.perf_counter() - t0, 1e-7)))))
    names = list(cands)
    samples = {k: [] for k in names}
    start = time.perf_counter()
    for r in range(args.rounds):
        for i in np.random.default_rng(r).permutation(len(names)):
            k = names[i]
            f = cands[k]
            sync()
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                f()
            sync()
            samples[k].append((time.perf_counter() - t0) / calls[k])
        if r >= 2 and time.perf_counter() - start > args.budget_s:
            break
    copy_bytes = 2 * args.copy_elems * 4
    t_copy = np.asarray(samples["copy"])
    res = {
        "torch": torch.__version__,
        "device": dev,
        "device_name": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev == "cuda" else None,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
        "copy_bw": float(np.median(copy_bytes / t_copy)),
        "rounds": int(len(t_copy)),
        "results": {},
    }
    for k, m in meta.items():
        t = np.asarray(samples[k])
        j = min(len(t), len(t_copy))
        nbytes = m["numel"] * (2 if m["dtype"] == "bfloat16" else 4)
        roof = (5 if k.startswith("train/") else 2) * nbytes
        res["results"][k] = dict(m, median_s=float(np.median(t)), calls_per_sample=calls[k],
                                 roofline=float(np.median(roof / (copy_bytes / t_copy[:j]) / t[:j])))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
