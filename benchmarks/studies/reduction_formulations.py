r"""Ways to compute two per-channel sums in one pass over memory, as XLA:CPU compiles them.

  python benchmarks/studies/reduction_formulations.py            # 64×56×56×64 float32 (~1 min)
  python benchmarks/studies/reduction_formulations.py --shape 128 26 26 32

The backward needs ``Σdy`` and ``Σdy·(x−μ)`` per channel, the forward ``Σx`` and
``Σ(x−μ)²``. jaxbn computes them as separate reductions (three array reads in the
backward, two in the forward), which is XLA:CPU's floor (see README.md, "The
roofline"). This script times the one-pass alternatives against that, interleaved,
medians, and reports how many x-sized arrays each compiled program writes (a
formulation that materializes its operand moves more bytes, not fewer).
Results: benchmarks/results/studies/reduction_formulations.json.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _common and the other shared modules

import _common  # noqa: E402


def formulations(red):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def add2(a, b):
        return a[0] + b[0], a[1] + b[1]

    def separate(x, dy, mu):  # what jaxbn does
        return jnp.sum(dy, red), jnp.sum(dy * (x - mu), red)

    def variadic(x, dy, mu):
        z = jnp.zeros((), x.dtype)
        return lax.reduce((dy, dy * (x - mu)), (z, z), add2, red)

    def stack(x, dy, mu):
        return jnp.sum(jnp.stack([dy, dy * (x - mu)], -2), red)

    def select(x, dy, mu):
        k = lax.broadcasted_iota(jnp.int32, x.shape[:-1] + (2, x.shape[-1]), x.ndim - 1)
        return jnp.sum(jnp.where(k == 0, dy[..., None, :], (dy * (x - mu))[..., None, :]), red)

    def complex_(x, dy, mu):
        s = jnp.sum(lax.complex(dy, dy * (x - mu)), red)
        return s.real, s.imag

    def broadcast_k(x, dy, mu):  # dy·(x−μ)^k, k ∈ {0, 1}, on a broadcast axis
        k = jnp.arange(2, dtype=x.dtype)[:, None]
        return jnp.sum(dy[..., None, :] * ((x - mu)[..., None, :] * k + (1 - k)), red)

    def two_pass(x, dy, mu):  # forward statistics as jaxbn computes them
        m = jnp.mean(x, red)
        xb, mb = lax.optimization_barrier((x, m))
        return m, jnp.sum(jnp.square(xb - mb), red)

    def welford(x, dy, mu):  # forward statistics in one pass: Chan's merge as a variadic reduce
        def comb(a, b):
            (na, ma, qa), (nb, mb, qb) = a, b
            n = na + nb
            d = mb - ma
            w = nb / jnp.maximum(n, 1)
            return n, ma + d * w, qa + qb + d * d * na * w

        z = jnp.zeros((), x.dtype)
        return lax.reduce((jnp.ones_like(x), x, jnp.zeros_like(x)), (z, z, z), comb, red)

    fs = {"separate (jaxbn, backward)": separate, "variadic lax.reduce": variadic, "jnp.stack": stack,
          "where(iota == 0)": select, "complex64": complex_, "broadcast k": broadcast_k,
          "two-pass (jaxbn, forward)": two_pass, "Welford variadic reduce": welford}
    return {k: jax.jit(f) for k, f in fs.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=4, type=int, default=[64, 56, 56, 64])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--default-allocator", action="store_true")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.default_allocator:
        _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})

    import jax
    import numpy as np

    from jaxbn import _hlo

    shape = tuple(args.shape)
    red = tuple(range(len(shape) - 1))
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 3
    dy = jax.random.normal(jax.random.key(1), shape)
    mu = x.mean(red)
    fs = formulations(red)
    ref = fs["separate (jaxbn, backward)"](x, dy, mu)
    env = _common.environment()
    print(f"# reduction_formulations: {env['cpu']['model_name']}, {shape} float32, load {env['loadavg_start']}",
          flush=True)
    # kernels of each compiled program that write an array of at least x's size
    written = {k: len({name for name, _ in _hlo.large_outputs(_hlo.compiled_text(f, x, dy, mu), x.size)})
               for k, f in fs.items()}
    for k in ("variadic lax.reduce", "jnp.stack", "where(iota == 0)", "complex64", "broadcast k"):
        got = np.asarray(fs[k](x, dy, mu)).reshape(2, -1)
        assert np.allclose(got, np.asarray(ref), rtol=1e-3, atol=1e-2 * np.sqrt(x.size / shape[-1])), k
    s = _common.interleave({k: (lambda f=f: f(x, dy, mu)) for k, f in fs.items()}, rounds=args.rounds,
                           warmup=2, budget_s=120)
    rows = [[k, f"{np.median(t) * 1e3:.1f}", written[k]] for k, t in s.items()]
    table = _common.fmt_table(["formulation", "ms (median)", "arrays ≥ x written"], rows)
    print(table)
    path = _common.save_json("studies/reduction_formulations.json", {
        "environment": env, "shape": shape, "dtype": "float32", "table": table,
        "median_s": {k: float(np.median(t)) for k, t in s.items()}, "x_sized_arrays_written": written})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
