"""PyTorch train steps of the article's CNN and ResNet-20, in a process of their own.

The same networks as `jaxbn.models.CNN` and `jaxbn.models.ResNet20` (same layers,
parameter counts and initial-scale choices that matter for speed), channels_last
(NHWC in memory, like JAX's arrays), ``torch.nn.BatchNorm2d`` (momentum 0.1 =
Flax's 0.9, eps 1e-5), ``torch.optim.Adam(lr=1e-3)``, softmax cross-entropy;
one step is ``zero_grad``, forward in training mode, ``backward`` and ``step``.
The batch lives in memory (data loading is not timed).

`train_step.py` runs this file as a worker (``--worker``) and interleaves its
samples with the JAX candidates' round by round, so the JAX/PyTorch ratio comes
from the same run; PyTorch's OpenMP threads stay out of the JAX process. The
protocol is one line per request on stdin, ``<model> <steps>``, answered by the
seconds those consecutive steps took on stdout; ``quit`` ends it.

  python benchmarks/torch_train_step.py --models cnn resnet20 --rounds 5   # alone
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SHAPES = {"cnn": (1, 28, 28), "resnet20": (3, 32, 32)}  # C, H, W


def cnn(num_classes=10, features=32, hidden=128):
    """Conv(32, 3×3, VALID) → ReLU → BatchNorm → MaxPool(2×2) → Dense(128) → ReLU → Dense."""
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, features, 3)
            self.bn = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
            self.fc1 = nn.Linear(13 * 13 * features, hidden)
            self.fc2 = nn.Linear(hidden, num_classes)

        def forward(self, x):
            x = torch.max_pool2d(self.bn(torch.relu(self.conv(x))), 2)
            # Flatten in (H, W, C) order, as the JAX model does: a view of channels_last memory.
            x = x.permute(0, 2, 3, 1).flatten(1)
            return self.fc2(torch.relu(self.fc1(x)))

    return CNN()


def resnet20(num_classes=10, width=16, stage_sizes=(3, 3, 3)):
    """CIFAR ResNet (He et al. 2016, §4.2) with projection shortcuts, as `jaxbn.models.ResNet`."""
    import torch
    from torch import nn

    def bn(c, zero=False):
        m = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
        if zero:
            nn.init.zeros_(m.weight)
        return m

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv0 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn0 = bn(cout)
            self.conv1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn1 = bn(cout, zero=True)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x):
            y = torch.relu(self.bn0(self.conv0(x)))
            y = self.bn1(self.conv1(y))
            return torch.relu((x if self.proj is None else self.proj(x)) + y)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn = bn(width)
            blocks, cin = [], width
            for i, n in enumerate(stage_sizes):
                for j in range(n):
                    cout = width * 2**i
                    blocks.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.blocks(torch.relu(self.bn(self.stem(x))))
            return self.head(x.mean(dim=(2, 3)))

    return ResNet()


BUILDERS = {"cnn": cnn, "resnet20": resnet20}


def build(model_name: str, batch: int = 128, seed: int = 0):
    """A closure running `steps` train steps; returns the last loss as a float."""
    import torch

    torch.manual_seed(seed)
    model = BUILDERS[model_name]().to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    c, h, w = SHAPES[model_name]
    x = torch.randn(batch, c, h, w).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(steps: int) -> float:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        return float(loss.detach())

    n_params = sum(p.numel() for p in model.parameters())
    return run, n_params


def worker(models, batch: int) -> int:
    import torch

    runs = {m: build(m, batch)[0] for m in models}
    for r in runs.values():  # warm-up: first-touch, allocator steady state
        r(2)
    print(f"ready torch {torch.__version__} threads {torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        m, k = cmd[0], int(cmd[1])
        t = time.perf_counter()
        runs[m](k)
        print(f"{time.perf_counter() - t!r}", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help="serve '<model> <steps>' requests on stdin")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.models, args.batch)
    steps = {"cnn": 10, "resnet20": 1}
    runs = {m: build(m, args.batch) for m in args.models}
    for m, (run, n) in runs.items():
        run(2)
        ts = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            run(steps[m])
            ts.append((time.perf_counter() - t) / steps[m])
        print(f"{m}: {n} parameters, {1e3 * float(np.median(ts)):.1f} ms/step (median of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
