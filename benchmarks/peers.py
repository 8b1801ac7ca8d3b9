"""The BatchNorm implementations under test, wrapped to compute the same thing.

Every training-mode peer becomes a function

    f(x, dy, scale, bias) -> (y, dx, dscale, dbias, new_mean, new_var)

of a channels-last input ``x`` (N, H, W, C): the training-mode output, the
gradients with respect to x, scale and bias for the cotangent `dy` (one VJP), and
the updated running statistics (momentum 0.99, epsilon 1e-5). Scale, bias and
statistics are float32 of shape (C,) at the interface; a peer that stores them in
another layout (Haiku's (1, 1, 1, C)) reshapes inside, which is free. The output
`y` has x's dtype for every peer (Flax's and jaxbn's Linen modules get
``dtype=x.dtype``, otherwise they would promote bf16 to float32).

Evaluation-mode peers are ``g(x, scale, bias, mean, var) -> y``.

Peers: jaxbn's core function (``jaxbn[xla]``: with its one-sweep CPU kernels
turned off, see jaxbn/cpu_kernel.py) and its Linen module; Flax Linen with the default
fast variance and with the two-pass variance; Flax NNX; Haiku; Equinox (mode
'batch', under `vmap` with an axis name, on the (N·H·W, C) view of x, which is
free); a plain `jnp` version differentiated by autodiff; and, when
``benchmarks/proposed_core.patch`` applies, jaxbn's core with that patch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Optional

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jaxbn  # noqa: E402

MOMENTUM = 0.99
EPS = 1e-5
PATCH = os.path.join(HERE, "proposed_core.patch")

TRAIN_PEERS = ["jaxbn", "jaxbn[xla]", "jaxbn.linen", "jaxbn+patch", "flax.linen", "flax.linen(2pass)", "flax.nnx",
               "haiku", "equinox", "jnp(autodiff)"]
EVAL_PEERS = ["jaxbn", "jaxbn.linen", "flax.linen", "flax.nnx", "haiku", "equinox", "jnp"]


# ----------------------------------------------------------------------------
# jaxbn's core with the proposed patch, loaded side by side with the installed one.

_proposed = None


def proposed_core():
    """jaxbn/batch_norm.py with proposed_core.patch applied, as a module (or None)."""
    global _proposed
    if _proposed is not None or not os.path.exists(PATCH):
        return _proposed
    tmp = tempfile.mkdtemp(prefix="jaxbn_proposed_")
    try:
        dst = os.path.join(tmp, "batch_norm.py")
        shutil.copy(os.path.join(ROOT, "jaxbn", "batch_norm.py"), dst)
        with open(PATCH) as f:
            r = subprocess.run(["patch", "-s", "-p2", "-d", tmp], stdin=f, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"peers: {PATCH} does not apply to jaxbn/batch_norm.py, skipping jaxbn+patch:\n{r.stdout}{r.stderr}",
                  file=sys.stderr)
            return None
        spec = importlib.util.spec_from_file_location("jaxbn_proposed_core", dst)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _proposed = mod
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _proposed


# ----------------------------------------------------------------------------
# Training mode.


def _train_jaxbn(core, kernel="auto"):
    def apply(x, s, b):
        C = x.shape[-1]
        st = core.init_state(C)
        with jaxbn.cpu_kernel.use(kernel):  # decided at trace time, for forward and backward
            y, new = core.batch_norm(x, {"scale": s, "bias": b}, st, training=True, momentum=MOMENTUM, epsilon=EPS)
        return y, (new.mean, new.var)

    return apply


def _train_linen(module_cls, x_example, **kw):
    C = x_example.shape[-1]
    mod = module_cls(use_running_average=False, momentum=MOMENTUM, epsilon=EPS, dtype=x_example.dtype, **kw)
    bs = {"mean": jnp.zeros((C,), jnp.float32), "var": jnp.ones((C,), jnp.float32)}

    def apply(x, s, b):
        y, upd = mod.apply({"params": {"scale": s, "bias": b}, "batch_stats": bs}, x, mutable=["batch_stats"])
        return y, (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

    return apply


def _train_nnx(x_example):
    from flax import nnx

    C = x_example.shape[-1]

    def apply(x, s, b):
        # Built inside the trace: NNX refuses to mutate variables created outside it.
        model = nnx.BatchNorm(C, use_running_average=False, momentum=MOMENTUM, epsilon=EPS,
                              dtype=x_example.dtype, rngs=nnx.Rngs(0))
        model.scale.value = s
        model.bias.value = b
        y = model(x)
        return y, (model.mean.value, model.var.value)

    return apply


def _train_haiku(x_example):
    import haiku as hk

    f = hk.transform_with_state(
        lambda x: hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=MOMENTUM, eps=EPS)(
            x, is_training=True))
    _, state0 = f.init(jax.random.key(0), x_example)
    C = x_example.shape[-1]
    bshape = (1,) * (x_example.ndim - 1) + (C,)

    def apply(x, s, b):
        params = {"batch_norm": {"scale": s.reshape(bshape), "offset": b.reshape(bshape)}}
        y, st = f.apply(params, state0, None, x)
        return y.astype(x.dtype), (st["batch_norm/~/mean_ema"]["average"].reshape(C), st["batch_norm/~/var_ema"]["average"].reshape(C))

    return apply


def _train_equinox(x_example):
    import warnings

    import equinox as eqx

    C = x_example.shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn, state0 = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, axis_name="batch", eps=EPS, momentum=MOMENTUM,
                                                              mode="batch")

    def apply(x, s, b):
        model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (s, b))
        y, st = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x.reshape(-1, C), state0)
        hm, hv = st.get(model.batch_state_index)  # the debiased-later hidden EMA ('batch' mode)
        return y.reshape(x.shape).astype(x.dtype), (hm, hv)

    return apply


def _train_jnp(x_example):
    red = tuple(range(x_example.ndim - 1))

    def apply(x, s, b):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, red)
        var = jnp.var(x32, red)
        y = ((x32 - mean) * jax.lax.rsqrt(var + EPS) * s + b).astype(x.dtype)
        sg = jax.lax.stop_gradient
        new_mean = MOMENTUM * 0.0 + (1 - MOMENTUM) * sg(mean)
        new_var = MOMENTUM * 1.0 + (1 - MOMENTUM) * sg(var)
        return y, (new_mean, new_var)

    return apply


def train_apply(peer: str, x_example) -> Optional[Callable]:
    """``apply(x, scale, bias) -> (y, (new_mean, new_var))`` of a peer, or None."""
    import flax.linen as nn

    if peer == "jaxbn":
        return _train_jaxbn(jaxbn)
    if peer == "jaxbn[xla]":
        return _train_jaxbn(jaxbn, kernel="0")
    if peer == "jaxbn+patch":
        core = proposed_core()
        return None if core is None else _train_jaxbn(core)
    if peer == "jaxbn.linen":
        from jaxbn.linen import BatchNorm

        return _train_linen(BatchNorm, x_example)
    if peer == "flax.linen":
        return _train_linen(nn.BatchNorm, x_example)
    if peer == "flax.linen(2pass)":
        return _train_linen(nn.BatchNorm, x_example, use_fast_variance=False)
    if peer == "flax.nnx":
        return _train_nnx(x_example)
    if peer == "haiku":
        return _train_haiku(x_example)
    if peer == "equinox":
        return _train_equinox(x_example)
    if peer == "jnp(autodiff)":
        return _train_jnp(x_example)
    raise ValueError(f"unknown peer {peer!r}")


def train_step_fn(peer: str, x_example, *, donate: bool = False, cotangent: str = "independent"):
    """Jitted ``f(x, dy, scale, bias)``; with `donate`, dy is donated.

    `cotangent`: ``"independent"`` differentiates ``sum(dy * y)`` (the VJP for the
    cotangent dy, as PyTorch's ``y.backward(dy)``); ``"chained"`` differentiates
    ``sum(dy * y**2) / 2``, whose cotangent ``dy * y`` depends on the output as in a
    network, so XLA cannot start backward reductions before the forward is done.
    """
    apply = train_apply(peer, x_example)
    if apply is None:
        return None
    if cotangent not in ("independent", "chained"):
        raise ValueError(f"cotangent must be 'independent' or 'chained', got {cotangent!r}")
    chained = cotangent == "chained"

    def f(x, dy, scale, bias):
        y, vjp, (m, v) = jax.vjp(apply, x, scale, bias, has_aux=True)
        dx, ds, db = vjp(dy * y if chained else dy)
        return y, dx, ds, db, m, v

    return jax.jit(f, donate_argnums=(1,) if donate else ())


# ----------------------------------------------------------------------------
# Evaluation mode.


def eval_fn(peer: str, x_example, *, donate: bool = True) -> Optional[Callable]:
    """Jitted ``g(x, scale, bias, mean, var) -> y``; x is donated (y may reuse it)."""
    import flax.linen as nn

    C = x_example.shape[-1]
    dt = x_example.dtype
    if peer == "jaxbn":
        def g(x, s, b, m, v):
            st = jaxbn.BatchNormState(mean=m, var=v, count=jnp.zeros((), jnp.int32))
            return jaxbn.batch_norm(x, {"scale": s, "bias": b}, st, training=False, epsilon=EPS)[0]
    elif peer in ("jaxbn.linen", "flax.linen"):
        if peer == "jaxbn.linen":
            from jaxbn.linen import BatchNorm as cls
        else:
            cls = nn.BatchNorm
        mod = cls(use_running_average=True, epsilon=EPS, dtype=dt)

        def g(x, s, b, m, v):
            return mod.apply({"params": {"scale": s, "bias": b}, "batch_stats": {"mean": m, "var": v}}, x)
    elif peer == "flax.nnx":
        from flax import nnx

        def g(x, s, b, m, v):
            mod = nnx.BatchNorm(C, use_running_average=True, epsilon=EPS, dtype=dt, rngs=nnx.Rngs(0))
            mod.scale.value, mod.bias.value, mod.mean.value, mod.var.value = s, b, m, v
            return mod(x)
    elif peer == "haiku":
        import haiku as hk

        f = hk.transform_with_state(
            lambda x, training: hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=MOMENTUM, eps=EPS)(
                x, is_training=training, test_local_stats=False))
        _, state0 = f.init(jax.random.key(0), x_example, True)
        bshape = (1,) * (x_example.ndim - 1) + (C,)

        def g(x, s, b, m, v):
            st = jax.tree.map(lambda a: a, state0)
            st["batch_norm/~/mean_ema"]["average"] = m.reshape(bshape).astype(dt)
            st["batch_norm/~/var_ema"]["average"] = v.reshape(bshape).astype(dt)
            st["batch_norm/~/mean_ema"]["counter"] = jnp.ones((), jnp.int32)  # no zero-debiasing
            st["batch_norm/~/var_ema"]["counter"] = jnp.ones((), jnp.int32)
            params = {"batch_norm": {"scale": s.reshape(bshape), "offset": b.reshape(bshape)}}
            return f.apply(params, st, None, x, False)[0].astype(dt)
    elif peer == "equinox":
        import warnings

        import equinox as eqx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bn, state0 = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, axis_name="batch", eps=EPS,
                                                                  momentum=MOMENTUM, mode="ema", inference=True)

        def g(x, s, b, m, v):
            model = eqx.tree_at(lambda mm: (mm.weight, mm.bias), bn, (s, b))
            st = state0.set(model.ema_state_index, (m, v))
            y, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x.reshape(-1, C), st)
            return y.reshape(x.shape).astype(dt)
    elif peer == "jnp":
        def g(x, s, b, m, v):
            return ((x.astype(jnp.float32) - m) * jax.lax.rsqrt(v + EPS) * s + b).astype(dt)
    else:
        raise ValueError(f"unknown peer {peer!r}")
    return jax.jit(g, donate_argnums=(0,) if donate else ())
