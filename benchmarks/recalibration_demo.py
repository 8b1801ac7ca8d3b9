"""Recalibration raises test accuracy when the BN running averages are stale.

    .venv/bin/python benchmarks/recalibration_demo.py [--steps 300] [--momentum 0.999]

Trains ResNet-20 on Fashion-MNIST for a few hundred steps with a high BN momentum
(the EMA lags far behind the weights, as early in training or after weight
averaging), then evaluates on the whole test set three ways: the EMA running
statistics, `jaxbn.inference.recalibrate_batch_stats` over K training batches
(exact population statistics), and PyTorch-style `update_bn` (cumulative average of
per-batch means and unbiased variances, via momentum=None) for comparison.
Writes benchmarks/results/recalibration.json.
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

from jaxbn import data
from jaxbn.inference import recalibrate_batch_stats
from jaxbn import linen as bl
from jaxbn.models import ResNet20

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--momentum", type=float, default=0.999)
    ap.add_argument("--recal_batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()

    ds = data.load_dataset("fashion_mnist")
    model = ResNet20(norm=functools.partial(bl.BatchNorm, momentum=args.momentum))
    x0 = jnp.zeros((1, 28, 28, 1))
    v = model.init(jax.random.key(0), x0, train=True)
    tx = optax.sgd(optax.cosine_decay_schedule(0.1, args.steps), momentum=0.9)
    opt = tx.init(v["params"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(v, opt, batch):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": v["batch_stats"]}, batch["image"], train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), upd
        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, opt = tx.update(g, opt, v["params"])
        return {"params": optax.apply_updates(v["params"], u), "batch_stats": upd["batch_stats"]}, opt, l

    @jax.jit
    def correct(v, batch):
        logits = model.apply(v, batch["image"], train=False)
        return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & batch["mask"])

    def accuracy(v):
        n = sum(int(correct(v, b)) for b in data.eval_batches(ds.test, global_batch_size=500))
        return n / len(ds.test["label"])

    t0 = time.time()
    done, epoch = 0, 0
    while done < args.steps:
        for b in data.train_batches(ds.train, global_batch_size=args.batch, seed=0, epoch=epoch):
            v, opt, l = step(v, opt, b)
            done += 1
            if done == args.steps:
                break
        epoch += 1
    train_s = time.time() - t0

    def recal_batches():
        return (b["image"] for b in data.train_batches(ds.train, global_batch_size=args.batch, seed=1, epoch=0))

    apply_fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
    t1 = time.time()
    v_recal = recalibrate_batch_stats(apply_fn, v, recal_batches(), num_batches=args.recal_batches)
    recal_s = time.time() - t1
    # PyTorch's update_bn: reset and run a cumulative average of per-batch statistics.
    cum_model = ResNet20(norm=functools.partial(bl.BatchNorm, momentum=None, unbiased_running_var=True))
    vc = cum_model.init(jax.random.key(0), x0, train=True)
    vc = {"params": v["params"], "batch_stats": vc["batch_stats"]}
    cum_step = jax.jit(lambda vc, x: cum_model.apply(vc, x, train=True, mutable=["batch_stats"])[1])
    for i, x in enumerate(recal_batches()):
        if i == args.recal_batches:
            break
        vc = {"params": vc["params"], "batch_stats": cum_step(vc, x)["batch_stats"]}

    def drop_count(tree):
        if isinstance(tree, dict):
            return {k: drop_count(t) for k, t in tree.items() if k != "count"}
        return tree

    v_update_bn = {"params": v["params"], "batch_stats": drop_count(vc["batch_stats"])}
    res = {
        "steps": args.steps,
        "bn_momentum": args.momentum,
        "recal_batches": args.recal_batches,
        "test_accuracy_ema": accuracy(v),
        "test_accuracy_recalibrated": accuracy(v_recal),
        "test_accuracy_torch_style_update_bn": accuracy(v_update_bn),
        "train_seconds": round(train_s, 1),
        "recalibration_seconds": round(recal_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "jax": jax.__version__,
    }
    print(json.dumps(res, indent=1))
    print("wrote", _common.save_json("recalibration.json", dict(res, environment=_common.environment())))


if __name__ == "__main__":
    main()
