r"""Synchronized BatchNorm on 8 virtual CPU devices: collectives per layer and step-time overhead.

  python benchmarks/sync.py              # (re-executes with --xla_force_host_platform_device_count=8)
  python benchmarks/sync.py --devices 2  # as many devices as this machine has cores

For one BN layer (training forward + VJP, gradients for x, scale and bias) at
equal per-device batch:

* collectives: counted in the program JAX emits (StableHLO: all_reduce /
  all_gather / reduce_scatter / collective_permute ops) and in the program XLA
  compiles (after its combiners), for the forward alone and for forward+backward
  (backward = the difference). The data-parallel sum of the parameter gradients
  is counted too: under shard_map with checked types autodiff emits it for a
  replicated parameter, under pmap the benchmark's step emits it with ``psum`` (one
  per parameter; XLA combines them). It exists with or without synchronized
  statistics; jaxbn's synchronized backward needs no separate one.
* step time: the synchronized layer (``axis_name='batch'``) against the same
  layer with per-device statistics (``axis_name=None``), under ``shard_map`` and
  ``pmap``, interleaved round by round; overhead = median per-round ratio - 1.
  Flax Linen's synchronized BatchNorm is measured the same way for reference, and
  jaxbn without its CPU kernels (``jaxbn[xla]``, see jaxbn/cpu_kernel.py).
  The cotangent is a function of the layer's output, ``dy = g * y`` (the loss
  ``sum(g * y**2) / 2``), as in a network, where the backward cannot start before
  the forward is done. With an independent cotangent (``--cotangent independent``,
  the default before 2026-11-23) XLA may compute backward reductions of ``dy``
  while a device waits at the forward's all-reduce, which hides part of the
  collective's cost in a way no network can.
* barrier control (``barriers``): the same BN math with per-device statistics in
  both variants, whose "synchronized" variant waits at an all-reduce exactly where
  synchronized BN has its two (after the forward's and the backward's sums; the
  results are discarded) and compiles to the same collectives as jaxbn's
  synchronized layer. Its overhead is what the barriers alone cost at equal work:
  the floor of any synchronized BN on this machine, measured.
* collective latency: the time one all-reduce of a BN-sized payload adds to a
  program when it sits on the critical path (programs with 0 and 2 chained
  all-reduces, interleaved), and from it the least overhead synchronized
  statistics can have: the all-reduces the synchronized layer adds (compiled
  program, synchronized minus local: one, since the local layer also sums its
  parameter gradients over devices) times that latency. Under pmap both variants
  sum their per-device parameter gradients with ``psum``, as every data-parallel
  step does (shard_map's autodiff inserts the same sum).

All 8 "devices" share this machine's 2 cores, so the absolute times are those of
8 small layers run concurrently; the ratios are what this measures. With more
devices than cores a collective also makes every device wait for the slowest of
8 threads time-sharing 2 cores, which the per-device-statistics baseline never
does; ``--devices 2`` (one device per core) separates that from the cost of the
collectives themselves. Results: results/sync.json and results/sync.md
(``sync_<N>dev.*`` for other device counts).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

NDEV = 8  # default; --devices
# jaxbn[xla]: jaxbn without its CPU kernels (jaxbn/cpu_kernel.py). barriers: a control, the XLA formulation
# with per-device statistics whose reductions, when "synchronized", wait for an all-reduce at the places where
# synchronized BN has its two (the results discarded): what the barriers alone cost at equal work.
KINDS = ("jaxbn", "jaxbn[xla]", "flax", "barriers")
SHAPES = {  # per-device shapes (global batch = 8 x the first dimension)
    "cnn": (16, 26, 26, 32),  # the article's CNN at global batch 128
    "resnet-s1": (16, 32, 32, 16),  # ResNet-20 stage 1 at global batch 128
    "resnet-s3": (16, 8, 8, 64),
    "dram-56": (8, 56, 56, 64),  # 64x56x56x64 global: 6.4 MB per device
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--calls", type=int, default=5, help="calls per sample (the mean is the sample)")
    ap.add_argument("--budget", type=float, default=60, help="seconds of timing per shape (fewer rounds if over)")
    ap.add_argument("--devices", type=int, default=NDEV, help="virtual CPU devices (default 8)")
    ap.add_argument("--cotangent", choices=("chained", "independent"), default="chained",
                    help="chained: dy = g * y, as in a network (default); independent: dy = g")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--default-allocator", action="store_true")
    args = ap.parse_args(argv)
    ndev = args.devices
    env_add = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={ndev}"}
    if not args.default_allocator:
        env_add["GLIBC_TUNABLES"] = _common.RECOMMENDED_GLIBC_TUNABLES
    _common.ensure_env(env_add)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn
    from jaxbn import _hlo

    if jax.device_count() < ndev:
        sys.exit(f"sync.py needs {ndev} devices, found {jax.device_count()}: run it as a script "
                 f"(it sets XLA_FLAGS=--xla_force_host_platform_device_count={ndev})")
    env = _common.environment()
    print(f"# sync: {jax.device_count()} x {env['device_kind']}, load {env['loadavg_start']}", flush=True)
    mesh = jax.make_mesh((ndev,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("batch"))
    repl = NamedSharding(mesh, P())

    def layer(kind, sync, api_="shard_map"):
        """(x, scale, bias) -> y on one device's slice."""
        name = "batch" if sync else None
        if kind.startswith("jaxbn"):
            setting = "0" if kind == "jaxbn[xla]" else "auto"  # jaxbn[xla]: without the CPU kernels

            def f(x, s, b):
                C = x.shape[-1]
                if not sync and api_ == "shard_map":
                    # Per-device statistics: the parameters' gradients are summed over
                    # devices by autodiff (one all-reduce, as for Flax's local layer).
                    s, b = jax.lax.pcast((s, b), "batch", to="varying")
                with jaxbn.cpu_kernel.use(setting):
                    return jaxbn.batch_norm(x, {"scale": s, "bias": b}, jaxbn.init_state(C), training=True,
                                            momentum=0.99, axis_name=name)[0]
        elif kind == "barriers":
            def f(x, s, b):
                if not sync and api_ == "shard_map":
                    s, b = jax.lax.pcast((s, b), "batch", to="varying")
                return barrier_bn(name, api_)(x, s, b)
        else:
            mod = nn.BatchNorm(use_running_average=False, momentum=0.99, axis_name=name)

            def f(x, s, b):
                C = x.shape[-1]
                bs = {"mean": jnp.zeros((C,)), "var": jnp.ones((C,))}
                return mod.apply({"params": {"scale": s, "bias": b}, "batch_stats": bs}, x,
                                 mutable=["batch_stats"])[0]
        return f

    def barrier_bn(name, api_):
        """BN with per-device statistics (two-pass forward, [Σdy, Σdy·(x - μ)] backward);
        with `name`, each set of sums first waits for an all-reduce of itself (the sum
        is then discarded: v + 0·psum(v), which XLA keeps since NaN·0 is NaN), and under
        shard_map the parameter gradients come from the backward's all-reduce, as in
        synchronized BN: the same collectives as jaxbn's synchronized layer."""
        red = (0, 1, 2)

        def fwd(x, s, b):
            m = jnp.mean(x, red)
            st = jnp.stack([m, jnp.mean(jnp.square(x - m), red)])
            inv = jax.lax.rsqrt(st[1] + 1e-5)
            pinv = inv  # what the parameter gradients are scaled by (replicated when synchronized)
            if name is not None:
                g = jax.lax.psum(st, name)
                st = st + 0.0 * g
                inv = jax.lax.rsqrt(st[1] + 1e-5)
                pinv = jax.lax.rsqrt(g[1] / ndev + 1e-5)
            return (x - st[0]) * (inv * s) + b, (x, s, st[0], inv, pinv)

        def bwd(res, dy):
            x, s, m, inv, pinv = res
            loc = jnp.stack([jnp.sum(dy, red), jnp.sum(dy * (x - m), red)])
            glob = None if name is None else jax.lax.psum(loc, name)
            s1, s2 = loc if glob is None else loc + 0.0 * glob
            n = x.size // x.shape[-1]
            a = inv * s
            dx = dy * a - (a * s1 / n + (x - m) * (a * inv * inv * s2 / n))
            p1, p2 = glob if glob is not None and api_ == "shard_map" else loc
            return dx, p2 * pinv, p1

        f = jax.custom_vjp(lambda x, s, b: fwd(x, s, b)[0])
        f.defvjp(fwd, bwd)
        return f

    chained = args.cotangent == "chained"

    def fwd_bwd(f):
        def g(x, dy, s, b):
            y, vjp = jax.vjp(f, x, s, b)
            return (y,) + tuple(vjp(dy * y if chained else dy))  # chained: the loss sum(dy * y**2) / 2
        return g

    def collective_latency(C):
        """Seconds one all-reduce of a (devices, 3, C) payload adds on the critical path."""
        def prog(k):
            def f(x):
                for _ in range(k):  # each all-reduce depends on the previous one's result
                    t = jnp.broadcast_to(jnp.sum(x, axis=0), (ndev, 3, C))
                    x = x + jax.lax.psum(t, "batch")[0, 0] * 1e-6
                return x
            return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
        xs = jax.device_put(jax.random.normal(jax.random.key(2), (ndev * 8, C)), shard)
        fs = {k: prog(k) for k in (0, 2)}
        calls = 20
        smp = _common.interleave({k: (lambda f=f: [f(xs) for _ in range(calls)]) for k, f in fs.items()},
                                 rounds=max(args.rounds, 11), warmup=2)
        return float(np.median((smp[2] - smp[0]) / calls) / 2)

    def shard_map_fns(kind, sync):
        f = layer(kind, sync)
        specs = dict(mesh=mesh, in_specs=(P("batch"), P("batch"), P(), P()),
                     out_specs=(P("batch"), P("batch"), P(), P()))
        full = jax.jit(jax.shard_map(fwd_bwd(f), **specs))
        fwd = jax.jit(jax.shard_map(lambda x, dy, s, b: f(x, s, b), **dict(specs, out_specs=P("batch"))))
        return full, fwd

    def pmap_fns(kind, sync):
        f = layer(kind, sync, "pmap")

        def g(x, dy, s, b):
            y, dx, ds, db = fwd_bwd(f)(x, dy, s, b)
            # Per-device parameter gradients (pmap's convention), summed over devices as
            # every data-parallel step does (shard_map's autodiff inserts the same sum).
            ds, db = jax.lax.psum((ds, db), "batch")
            return y, dx, ds, db

        return (jax.pmap(g, axis_name="batch", in_axes=(0, 0, None, None)),
                jax.pmap(lambda x, dy, s, b: f(x, s, b), axis_name="batch", in_axes=(0, 0, None, None)))

    results = {"environment": env, "devices": ndev, "cotangent": args.cotangent, "shapes": {}, "collectives": {},
               "collective_latency_s": {}}
    for sname in args.shapes:
        shape = SHAPES[sname]
        gshape = (ndev * shape[0],) + shape[1:]
        C = shape[-1]
        x = jax.device_put(jax.random.normal(jax.random.key(0), gshape) * 2 + 0.5, shard)
        dy = jax.device_put(jax.random.normal(jax.random.key(1), gshape), shard)
        s = jax.device_put(jnp.linspace(0.5, 1.5, C), repl)
        b = jax.device_put(jnp.linspace(-1, 1, C), repl)
        to_p = jax.pmap(lambda a: a)
        xp, dyp = to_p(x.reshape((ndev,) + shape)), to_p(dy.reshape((ndev,) + shape))
        cands, coll = {}, {}
        for api in ("shard_map", "pmap"):
            for kind in KINDS:
                for sync in (True, False):
                    full, fwd = (shard_map_fns if api == "shard_map" else pmap_fns)(kind, sync)
                    args_ = (x, dy, s, b) if api == "shard_map" else (xp, dyp, s, b)
                    key = f"{api}/{kind}/{'sync' if sync else 'local'}"
                    lf, lw = full.lower(*args_), fwd.lower(*args_)
                    c_full = _hlo.count_collectives(lf.as_text())
                    c_fwd = _hlo.count_collectives(lw.as_text())
                    h_full = _hlo.count_collectives(lf.compile().as_text())
                    h_fwd = _hlo.count_collectives(lw.compile().as_text())
                    coll[key] = {"emitted_fwd": c_fwd, "emitted_bwd": c_full - c_fwd, "compiled_fwd": h_fwd,
                                 "compiled_bwd": h_full - h_fwd}
                    cands[key] = (lambda full=full, a=args_: full(*a))
        # correctness: synchronized jaxbn equals the single-device layer on the global batch
        ref = jaxbn.batch_norm(np.asarray(x), {"scale": np.asarray(s), "bias": np.asarray(b)},
                               jaxbn.init_state(C), training=True)[0]
        got = np.asarray(cands["shard_map/jaxbn/sync"]()[0])
        err = float(np.max(np.abs(got - np.asarray(ref))))
        smp = _common.interleave(cands, rounds=args.rounds, calls=args.calls, warmup=2, budget_s=args.budget)
        row = {"per_device_shape": shape, "global_shape": gshape, "max_abs_err_vs_single_device": err,
               "median_s": {k: float(np.median(v)) for k, v in smp.items()}, "overhead": {}}
        for api in ("shard_map", "pmap"):
            for kind in KINDS:
                row["overhead"][f"{api}/{kind}"] = _common.ratio(smp, f"{api}/{kind}/sync", f"{api}/{kind}/local") - 1
            row[f"{api}/jaxbn_sync_vs_flax_sync"] = _common.ratio(smp, f"{api}/flax/sync", f"{api}/jaxbn/sync")
        lat = results["collective_latency_s"].setdefault(C, collective_latency(C))
        row["collective_latency_s"] = lat
        row["overhead_floor"] = {}
        for api in ("shard_map", "pmap"):  # all-reduces the synchronized layer adds, after XLA's combiner
            extra = sum(coll[f"{api}/jaxbn/sync"][k] - coll[f"{api}/jaxbn/local"][k]
                        for k in ("compiled_fwd", "compiled_bwd"))
            row["overhead_floor"][api] = extra * lat / row["median_s"][f"{api}/jaxbn/local"]
        results["shapes"][sname] = row
        results["collectives"] = coll  # the same for every shape
        print(f"{sname:10s} err {err:.1e} all-reduce {lat * 1e6:.0f} us " + "  ".join(
            f"{k}: {v:+.0%}" for k, v in row["overhead"].items()), flush=True)

    rows = [[k, v["emitted_fwd"], v["emitted_bwd"], v["compiled_fwd"], v["compiled_bwd"]]
            for k, v in results["collectives"].items()]
    t1 = _common.fmt_table(["API/layer/statistics", "emitted fwd", "emitted bwd", "compiled fwd", "compiled bwd"],
                           rows)
    rows = []
    for sname, r in results["shapes"].items():
        rows.append([f"{sname} {'×'.join(map(str, r['per_device_shape']))}"] + [
            f"{r['median_s'][f'{api}/{kind}/sync'] * 1e3:.2f} ms ({r['overhead'][f'{api}/{kind}']:+.0%})"
            for api in ("shard_map", "pmap") for kind in KINDS] + [
            f"×{r['shard_map/jaxbn_sync_vs_flax_sync']:.2f}",
            f"{r['collective_latency_s'] * 1e6:.0f} µs",
            f"+{r['overhead_floor']['shard_map']:.0%} / +{r['overhead_floor']['pmap']:.0%}"])
    t2 = _common.fmt_table(["per-device shape"] + [f"{api} {kind}" for api in ("shard_map", "pmap") for kind in KINDS]
                           + ["jaxbn vs flax (sync, shard_map)", "one all-reduce",
                              "floor shard_map / pmap (jaxbn)"], rows)
    md = (f"Collectives per BN layer ({ndev} devices; emitted = in JAX's program, compiled = after XLA):\n\n{t1}\n\n"
          f"Synchronized layer time (fwd+bwd) and overhead over the same layer with per-device statistics "
          f"(median of per-round ratios), cotangent {args.cotangent}; 'one all-reduce' = the time one all-reduce "
          f"adds on the critical path, 'floor' = the overhead that alone implies for jaxbn (the all-reduces the "
          f"synchronized layer adds to the compiled program, times that time):\n\n{t2}\n")
    print(md)
    stem = "sync" if ndev == NDEV else f"sync_{ndev}dev"
    if not chained:
        stem += "_independent_dy"
    path = _common.save_json(f"{stem}.json", results)
    _common.save_text(f"{stem}.md", f"Command: `{_common.command()}`; load {env['loadavg_start']}.\n\n{md}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
