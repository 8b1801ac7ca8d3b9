r"""End to end: train-step time of `jaxbn.models`, against Flax's BatchNorm, Flax's max-pool and PyTorch.

  python benchmarks/train_step.py                 # CNN and ResNet-20 at batch 128 (~3 min)
  python benchmarks/train_step.py --models cnn --rounds 5
  python benchmarks/train_step.py --norms jaxbn flax --rounds 15   # what results/train_step.json holds

One jitted step of `jaxbn.models` (the article's CNN on 28×28×1, ResNet-20 on
32×32×3) with optax Adam: forward in training mode, softmax cross-entropy, grads,
running statistics and the optimizer update; the whole train state is donated,
as in train.py. The batch lives on the device (data loading is not timed). Norms:
``jaxbn.linen.BatchNorm`` and ``flax.linen.BatchNorm`` (both momentum 0.9, eps
1e-5), plus ``none`` (the identity in place of every BN layer: the step with
normalization removed, whose speed over Flax's step is the ceiling of what any
BatchNorm could gain end to end) and ``jaxbn+patch`` (jaxbn.linen on the core
with proposed_core.patch) when that file exists and applies.

The CNN's max-pool: every norm runs with the model's own pool
(`jaxbn.max_pool.max_pool`: reshape + max, exact first-maximum gradient) and,
as ``<norm>+flaxpool``, with ``flax.linen.max_pool`` (whose XLA:CPU gradient is
a slow ``select_and_scatter``); both give the same outputs and gradients
(tests/test_max_pool.py). ``--pools`` picks which.

The convolutions: the models' own (`jaxbn.conv.conv_general_dilated`: im2col on
the CPU for the first layer's narrow patches) and, as ``<norm>+laxconv``,
``flax.linen.Conv``'s ``lax.conv_general_dilated`` (the same variables and, up
to summation order, values; tests/test_conv.py). ``--convs`` picks which.

PyTorch (``torch``): the same networks, channels_last, Adam, in a worker process
of their own (torch_train_step.py; its OpenMP threads stay out of this process),
whose samples are interleaved with the JAX candidates' round by round and timed
inside the worker; ``--no-torch`` leaves it out. ``speedup_vs_torch`` is the
median of per-round ratios PyTorch time / candidate time (> 1: JAX faster).

The candidates alternate round by round in a fresh random order; each sample is
`steps` consecutive steps (10 for the CNN, 1 for ResNet-20); times are medians
over rounds and ratios medians of per-round ratios.

Re-executes itself with the allocator setting of README.md and train.py (the
PyTorch worker inherits it) unless ``--default-allocator``. Results:
results/train_step.json.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

MODELS = {"cnn": ((28, 28, 1), 10), "resnet20": ((32, 32, 3), 10)}
NORMS = ("jaxbn", "flax", "none", "jaxbn+patch")
POOLS = ("jaxbn", "flax")  # the CNN's max-pool: jaxbn.max_pool.max_pool or flax.linen.max_pool
CONVS = ("jaxbn", "lax")  # the models' convolutions: jaxbn.conv.conv_general_dilated or lax's
STEPS = {"cnn": 10, "resnet20": 1}


@contextlib.contextmanager
def _conv(conv):
    """While tracing, the models' convolutions are flax.linen.Conv's own for conv='lax'."""
    if conv != "lax":
        yield
        return
    import flax.linen as nn

    from jaxbn import models

    saved, models._CONV = models._CONV, nn.Conv
    try:
        yield
    finally:
        models._CONV = saved


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


def build(model_name: str, norm: str, batch: int = 128, seed: int = 0, pool: str = "jaxbn", conv: str = "jaxbn"):
    """(compiled step, initial state, batch, temp bytes) for one model, norm, (CNN) max-pool and convolution."""
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
    extra = {"pool": nn.max_pool} if model_name == "cnn" and pool == "flax" else {}
    model = models.MODELS[model_name](num_classes=ncls, norm=norm_f, **extra)
    tx = optax.adam(1e-3)
    rng = jax.random.key(seed)
    images = jax.random.normal(rng, (batch,) + shape, jnp.float32)
    labels = jax.random.randint(jax.random.key(seed + 1), (batch,), 0, ncls)
    with _core(norm), _conv(conv):
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

    with _core(norm), _conv(conv):
        compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels).compile()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    return compiled, state, (images, labels), temp


class TorchWorker:
    """torch_train_step.py --worker: PyTorch's train steps in a process of their own."""

    def __init__(self, model_names, batch: int, threads: Optional[int] = None):
        cmd = [sys.executable, os.path.join(HERE, "torch_train_step.py"), "--worker", "--batch", str(batch),
               "--models", *model_names] + (["--threads", str(threads)] if threads else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.banner = self.proc.stdout.readline().strip()
        if not self.banner.startswith("ready"):
            raise RuntimeError(f"torch worker did not start: {self.banner!r}")
        self.times = {m: [] for m in model_names}

    def run(self, model: str, steps: int) -> float:
        self.proc.stdin.write(f"{model} {steps}\n")
        t = float(self.proc.stdout.readline())
        self.times[model].append(t)
        time.sleep(0.05)  # let PyTorch's OpenMP threads stop spinning before the next JAX sample
        return t

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def _cand_name(norm: str, pool: str, conv: str = "jaxbn") -> str:
    return norm + ("" if pool == "jaxbn" else "+flaxpool") + ("" if conv == "jaxbn" else "+laxconv")


def measure(model_names, norms, *, rounds: int, steps: dict, batch: int = 128, budget_s: float = 120.0,
            warmup: int = 2, pools=("jaxbn",), convs=("jaxbn",), torch: Optional[TorchWorker] = None):
    """{model: {candidate: {...}}}: per-round times (interleaved), ratios vs flax, flax's pool, lax's
    convolution, PyTorch.

    `pools` (the CNN's): ``"jaxbn"`` runs the model as it is, ``"flax"`` adds
    ``<norm>+flaxpool`` candidates; `convs`: ``"lax"`` adds ``<norm>+laxconv``
    candidates; `torch` (a `TorchWorker`) adds ``torch``.
    """
    import jax
    import numpy as np

    out = {}
    for m in model_names:
        cands, temps, holders = {}, {}, {}
        variants = [(p, "jaxbn") for p in (pools if m == "cnn" else ("jaxbn",))]
        variants += [("jaxbn", c) for c in convs if c != "jaxbn"]
        for n in norms:
            for pool, conv in variants:
                name = _cand_name(n, pool, conv)
                try:
                    fn, state, data, temp = build(m, n, batch, pool=pool, conv=conv)
                except Exception:  # e.g. no patch: skip that candidate
                    if n == "jaxbn+patch":
                        continue
                    raise
                holders[name] = {"state": state}
                temps[name] = temp

                def run(fn=fn, h=holders[name], data=data, k=steps[m]):
                    for _ in range(k):
                        h["state"], loss = fn(h["state"], *data)
                    return loss

                cands[name] = run
        if torch is not None:
            cands["torch"] = lambda m=m: torch.run(m, steps[m])
        s = _common.interleave(cands, rounds=rounds, warmup=warmup, budget_s=budget_s)
        if torch is not None:  # the worker's own clock, without the pipe round trip and the pause
            s["torch"] = np.asarray(torch.times[m][-len(s["torch"]):])
        res = {}
        for n, t in s.items():
            ips = batch * steps[m] / t
            res[n] = {"ms_per_step_median": float(1e3 * np.median(t) / steps[m]),
                      "images_per_s_median": float(np.median(ips)), "images_per_s": ips,
                      "temp_bytes": temps.get(n), "steps_per_sample": steps[m]}
            norm = max((k for k in NORMS if n.startswith(k)), key=len, default="")
            flax_ref = "flax" + n[len(norm):]  # the same pool and convolution with Flax's BatchNorm
            if n not in ("torch", flax_ref) and flax_ref in s:
                res[n]["speedup_vs_flax"] = _common.ratio(s, flax_ref, n)
            if n != "torch" and "+flaxpool" not in n and f"{n}+flaxpool" in s:
                res[n]["speedup_vs_flax_pool"] = _common.ratio(s, f"{n}+flaxpool", n)
            if n != "torch" and "+laxconv" not in n and f"{n}+laxconv" in s:
                res[n]["speedup_vs_lax_conv"] = _common.ratio(s, f"{n}+laxconv", n)
            if n != "torch" and "torch" in s:
                res[n]["speedup_vs_torch"] = _common.ratio(s, "torch", n)
        out[m] = res
        jax.clear_caches()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    ap.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS), help="the CNN's max-pool(s)")
    ap.add_argument("--convs", nargs="+", choices=CONVS, default=list(CONVS), help="the models' convolutions")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    ap.add_argument("--torch-threads", type=int, default=None, help="PyTorch's threads (default: torch's own)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget-s", type=float, default=120.0, help="per model; at least 5 rounds run")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--default-allocator", action="store_true")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="train_step")
    ap.add_argument("--note", default="", help="a remark stored with the results (e.g. 'machine shared')")
    args = ap.parse_args(argv)
    if not args.default_allocator:
        _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    env = _common.environment()
    print(f"# train_step: {env['cpu']['model_name']}, load {env['loadavg_start']}, settings {env['settings']}",
          flush=True)
    torch = None if args.no_torch else TorchWorker(args.models, args.batch, args.torch_threads)
    try:
        res = measure(args.models, args.norms, rounds=args.rounds, steps=STEPS, batch=args.batch,
                      budget_s=args.budget_s, pools=args.pools, convs=args.convs, torch=torch)
    finally:
        if torch is not None:
            torch.close()

    def x(v, k):
        return f"×{v[k]:.2f}" if k in v else ""

    rows = []
    for m, r in res.items():
        for n, v in r.items():
            rows.append([m, n, f"{v['ms_per_step_median']:.1f}", f"{v['images_per_s_median']:.0f}",
                         x(v, "speedup_vs_flax"), x(v, "speedup_vs_flax_pool"), x(v, "speedup_vs_lax_conv"),
                         x(v, "speedup_vs_torch"),
                         v["temp_bytes"] if v["temp_bytes"] is not None else ""])
    table = _common.fmt_table(["model", "candidate", "ms/step (median)", "images/s (median)",
                               "speed-up vs norm=flax", "speed-up vs flax max_pool", "speed-up vs lax conv",
                               "speed-up vs PyTorch",
                               "XLA temp bytes"], rows)
    print(table)
    path = _common.save_json(f"{args.tag}.json", {
        "environment": env, "command": _common.command(), "note": args.note, "batch": args.batch,
        "optimizer": "adam 1e-3", "torch_worker": None if torch is None else torch.banner,
        "rounds": {m: len(next(iter(r.values()))["images_per_s"]) for m, r in res.items()},
        "results": res, "table": table})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
