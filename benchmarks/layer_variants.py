r"""Layer variants: masks and the NCHW layout. jaxbn with and without its CPU kernels, and Flax Linen.

  python benchmarks/layer_variants.py [--rounds 11]

Times the gradient of ``sum(g * y**2)`` (x, scale and bias; the cotangent depends
on y as in a network) at 16×56×56×64 float32 for:

* NHWC with four masks: none, per example ``(N, 1, 1, 1)``, per position
  ``(N, H, W, 1)`` (both leave out whole rows: the masked row kernel) and per entry
  ``(N, H, W, C)`` (the XLA formulation's select path);
* NCHW (``axis=1``, the slab kernels), without a mask and with a per-example mask
  (the masked slab kernel).

The mask is an input of the jitted function, as a padded batch's would be (a mask
closed over as a constant lets XLA fold the count away); 90 % of the entries are
kept. Peers: ``jaxbn`` (kernels where usable), ``jaxbn[xla]`` (kernels off) and
``flax.linen.BatchNorm(axis=..., mask=...)``, interleaved in one process, medians.
Then the count of valid entries alone, for the per-example and per-position masks:
summing the mask widened to x's shape (what jaxbn did before 2026-11-23, and what
Flax does) against ``jaxbn.moments(...).count`` (the mask's own entries times the
sizes of the axes it is broadcast along). Results: results/layer_variants.json.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

SHAPE = (16, 56, 56, 64)
NCHW = (16, 64, 56, 56)
CASES = {  # name: (layout, mask shape)
    "none": ("nhwc", None),
    "per_example": ("nhwc", (16, 1, 1, 1)),
    "per_position": ("nhwc", (16, 56, 56, 1)),
    "per_entry": ("nhwc", SHAPE),
    "nchw": ("nchw", None),
    "nchw_per_example": ("nchw", (16, 1, 1, 1)),
}


def _loss_fn(peer: str, C: int, axis: int):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jaxbn

    if peer == "flax.linen":
        bn = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.99, epsilon=1e-5)
        variables = bn.init(jax.random.key(0), jnp.zeros((2, C, 1, 1) if axis == 1 else (2, 1, 1, C)))

        def loss(x, p, g, mask):
            v = {"params": p, "batch_stats": variables["batch_stats"]}
            y, _ = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
            return jnp.sum(g * y**2)
    else:
        def loss(x, p, g, mask):
            y = jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, axis=axis, mask=mask)[0]
            return jnp.sum(g * y**2)
    return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn
    from jaxbn import _hlo, cpu_kernel

    C = SHAPE[-1]
    data = {"nhwc": (jax.random.normal(jax.random.key(0), SHAPE) * 2 + 1, jax.random.normal(jax.random.key(1), SHAPE))}
    data["nchw"] = tuple(jnp.transpose(a, (0, 3, 1, 2)) for a in data["nhwc"])
    p = {"scale": jnp.ones(C), "bias": jnp.zeros(C)}
    rng = np.random.default_rng(2)
    peers = (("jaxbn", "auto"), ("jaxbn[xla]", "0"), ("flax.linen", "0"))

    fs, uses_kernel = {}, {}
    for case, (layout, mshape) in CASES.items():
        x, g = data[layout]
        mask = None if mshape is None else jnp.asarray(rng.uniform(size=mshape) < 0.9)
        for peer, mode in peers:
            with cpu_kernel.use(mode):
                f = jax.jit(jax.grad(_loss_fn(peer, C, 1 if layout == "nchw" else -1), argnums=(0, 1)))
                targets = _hlo.custom_calls(_hlo.compiled_text(f, x, p, g, mask))
            fs[(case, peer)] = (f, x, g, mask)
            uses_kernel[(case, peer)] = any(f"jaxbn_{k}moments" in targets for k in ("", "masked_", "slab_", "masked_slab_"))
    cands = {f"{c}|{peer}": (lambda f=f, x=x, g=g, mask=mask: f(x, p, g, mask))
             for (c, peer), (f, x, g, mask) in fs.items()}
    smp = _common.interleave(cands, rounds=args.rounds, calls=3, warmup=2)

    count = {}
    for case in ("per_example", "per_position"):
        mask = jnp.asarray(rng.uniform(size=CASES[case][1]) < 0.9)
        x = data["nhwc"][0]
        widened = jax.jit(lambda x, m: jnp.sum(jnp.broadcast_to(m, x.shape), (0, 1, 2), dtype=jnp.float32))
        own = jax.jit(lambda x, m: jaxbn.moments(x, mask=m).count)
        np.testing.assert_array_equal(np.asarray(widened(x, mask)), np.asarray(own(x, mask)))
        smp_c = _common.interleave({"widened": lambda: widened(x, mask), "own": lambda: own(x, mask)},
                                   rounds=args.rounds, calls=3, warmup=2)
        count[case] = {k: float(np.median(v) * 1e3) for k, v in smp_c.items()}
        # (only .count is returned: XLA drops the statistics, so "own" times the count alone)
        print(f"count, {case} mask: widened {count[case]['widened']:.2f} ms, "
              f"from the mask's own entries {count[case]['own']:.2f} ms", flush=True)

    results = {"environment": _common.environment(), "count_ms": count, "shape_nhwc": SHAPE, "shape_nchw": NCHW, "kept": 0.9,
               "rounds": args.rounds, "cases": {c: {"layout": lay, "mask_shape": ms} for c, (lay, ms) in CASES.items()}}
    rows = []
    for m in CASES:
        row = {
            "median_ms": {peer: float(np.median(smp[f"{m}|{peer}"]) * 1e3) for peer, _ in peers},
            "stats_kernel": {peer: uses_kernel[(m, peer)] for peer, _ in peers},
            "speedup_vs_flax": {peer: _common.ratio(smp, f"{m}|flax.linen", f"{m}|{peer}") for peer, _ in peers},
            "speedup_vs_xla": _common.ratio(smp, f"{m}|jaxbn[xla]", f"{m}|jaxbn"),
        }
        results["cases"][m].update(row)
        rows.append([m, *(f"{row['median_ms'][peer]:.2f}" for peer, _ in peers),
                     f"x{row['speedup_vs_xla']:.2f}", f"x{row['speedup_vs_flax']['jaxbn']:.2f}",
                     "yes" if row["stats_kernel"]["jaxbn"] else "no"])
    print(_common.fmt_table(["case", *(f"{peer} ms" for peer, _ in peers), "jaxbn / [xla]", "jaxbn / flax",
                             "kernel stats"], rows))
    print(f"wrote {_common.save_json('layer_variants.json', results)}")


if __name__ == "__main__":
    main()
