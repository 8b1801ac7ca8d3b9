r"""End to end: train-step images/s with norm=jaxbn vs norm=flax, same process, interleaved.

  python benchmarks/train_step.py                 # CNN and ResNet-20 at batch 128 (~2 min)
  python benchmarks/train_step.py --models cnn --rounds 5

One jitted step of `jaxbn.models` (the article's CNN on 28×28×1, ResNet-20 on
32×32×3) with optax Adam: forward in training mode, softmax cross-entropy, grads,
running statistics and the optimizer update; the whole train state is donated,
as in train.py. The batch lives on the device (data loading is not timed). Norms:
``jaxbn.linen.BatchNorm`` and ``flax.linen.BatchNorm`` (both momentum 0.9, eps
1e-5), plus ``none`` (the identity in place of every BN layer: the step with
normalization removed, whose speed over Flax's step is the ceiling of what any
BatchNorm could gain end to end) and ``jaxbn+patch`` (jaxbn.linen on the core
with proposed_core.patch) when that file exists and applies. The candidates alternate round by round; each sample is
`steps` consecutive steps; images/s is the median over rounds and the ratio the
median of per-round ratios.

Re-executes itself with the allocator setting of README.md unless
``--default-allocator``. Results: results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

MODELS = {"cnn": ((28, 28, 1), 10), "resnet20": ((32, 32, 3), 10)}
NORMS = ("jaxbn", "flax", "none", "jaxbn+patch")


@contextlib.contextmanager
def _core(norm):
    """While tracing, jaxbn.linen calls the patched core for norm='jaxbn+patch'."""
    if norm != "jaxbn+patch":
        yield
        return
    import jaxbn.linen as jl
    import peers

    core = peers.proposed_core()
    saved = jl.batch_norm, jl.BatchNormState
    jl.batch_norm, jl.BatchNormState = core.batch_norm, core.BatchNormState
    try:
        yield
    finally:
        jl.batch_norm, jl.BatchNormState = saved


def _no_norm():
    """A module taking BatchNorm's arguments that returns its input unchanged."""
    import flax.linen as nn
    import jax.numpy as jnp

    class NoNorm(nn.Module):
        use_running_average: Optional[bool] = None
        momentum: float = 0.99
        epsilon: float = 1e-5
        scale_init: Any = None

        @nn.compact
        def __call__(self, x, use_running_average=None):
            self.variable("batch_stats", "unused", jnp.zeros, ())  # the train step expects the collection
            return x

    return NoNorm


def build(model_name: str, norm: str, batch: int = 128, seed: int = 0):
    """(compiled step, initial state, batch, temp bytes) for one model and norm."""
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import jaxbn.linen
    from jaxbn import models

    cls = {"flax": nn.BatchNorm, "none": _no_norm()}.get(norm, jaxbn.linen.BatchNorm)
    norm_f = functools.partial(cls, momentum=0.9, epsilon=1e-5)
    shape, ncls = MODELS[model_name]
    model = models.MODELS[model_name](num_classes=ncls, norm=norm_f)
    tx = optax.adam(1e-3)
    rng = jax.random.key(seed)
    images = jax.random.normal(rng, (batch,) + shape, jnp.float32)
    labels = jax.random.randint(jax.random.key(seed + 1), (batch,), 0, ncls)
    with _core(norm):
        variables = model.init(rng, images[:2], train=False)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt_state": tx.init(variables["params"])}

    def step(state, images, labels):
        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                                      train=True, mutable=["batch_stats"])
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
            return loss, upd["batch_stats"]

        (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": bs,
                "opt_state": opt_state}, loss

    with _core(norm):
        compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels).compile()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    return compiled, state, (images, labels), temp


def measure(model_names, norms, *, rounds: int, steps: dict, batch: int = 128, budget_s: float = 90.0,
            warmup: int = 2):
    """{model: {norm: {...}}}: images/s per round (interleaved), ratios vs flax, temp bytes."""
    import jax
    import numpy as np

    out = {}
    for m in model_names:
        cands, temps, holders = {}, {}, {}
        for n in norms:
            try:
                fn, state, data, temp = build(m, n, batch)
            except Exception:  # e.g. no patch: skip that candidate
                if n == "jaxbn+patch":
                    continue
                raise
            holders[n] = {"state": state}
            temps[n] = temp

            def run(fn=fn, h=holders[n], data=data, k=steps[m]):
                for _ in range(k):
                    h["state"], loss = fn(h["state"], *data)
                return loss

            cands[n] = run
        s = _common.interleave(cands, rounds=rounds, warmup=warmup, budget_s=budget_s)
        res = {}
        for n, t in s.items():
            ips = batch * steps[m] / t
            res[n] = {"images_per_s_median": float(np.median(ips)), "images_per_s": ips,
                      "temp_bytes": temps[n], "steps_per_sample": steps[m]}
            if n != "flax" and "flax" in s:
                res[n]["speedup_vs_flax"] = _common.ratio(s, "flax", n)
        out[m] = res
        jax.clear_caches()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--default-allocator", action="store_true")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="train_step")
    args = ap.parse_args(argv)
    if not args.default_allocator:
        _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    env = _common.environment()
    print(f"# train_step: {env['cpu']['model_name']}, load {env['loadavg_start']}, settings {env['settings']}",
          flush=True)
    res = measure(args.models, args.norms, rounds=args.rounds, steps={"cnn": 10, "resnet20": 1}, batch=args.batch)
    rows = []
    for m, r in res.items():
        for n, v in r.items():
            rows.append([m, n, f"{v['images_per_s_median']:.0f}",
                         f"×{v['speedup_vs_flax']:.3f}" if "speedup_vs_flax" in v else "1",
                         v["temp_bytes"]])
    table = _common.fmt_table(["model", "norm", "images/s (median)", "speed-up vs flax", "XLA temp bytes"], rows)
    print(table)
    path = _common.save_json(f"{args.tag}.json", {"environment": env, "batch": args.batch, "optimizer": "adam 1e-3",
                                                  "results": res, "table": table})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
