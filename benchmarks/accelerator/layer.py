r"""Speed of one BatchNorm layer on the default backend: jaxbn against Flax (Linen, NNX) and Equinox.

  python benchmarks/accelerator/layer.py --out /tmp/layer.json [--quick]

Run by check.py (part "layer"); one process, every peer interleaved round by
round with a bandwidth reference (``a = -a`` on a large donated float32 array),
so that each round has its own roofline. Peers are wrapped by
``benchmarks/peers.py`` to compute the same thing.

Harnesses (both jitted, nothing donated):

* ``vjp``: ``f(x, dy, scale, bias) -> (y, dx, dscale, dbias, mean, var)``, the VJP for
  a fixed cotangent dy (``peers.train_step_fn``, as PyTorch's ``y.backward(dy)``).
* ``grad``: ``jax.value_and_grad`` of the scalar loss ``sum(dy * y**2) / 2`` (in
  float32) with respect to x, scale and bias, plus the running statistics: the
  cotangent ``dy * y`` is a function of the output, as in a network.
* ``eval``: ``y = g(x, scale, bias, mean, var)`` (``peers.eval_fn``), in place like the copy: x donated, each
  output the next call's input, statistics that make the map the identity (checked separately, not donated,
  with random statistics).

Roofline (b = bytes per element of x, N elements): training 5·N·b (read x, write
y; read x and dy, write dx), 8·N·b for the best two-sweep schedule; evaluation
2·N·b. A fraction is (bytes / copy bandwidth of the same round) / time, median
over rounds; "× flax" is the median of per-round ratios t(flax.linen) / t(peer).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402  (puts benchmarks/ and the repository root on sys.path)
from common import block  # noqa: E402
import numpy as np  # noqa: E402

REF = "flax.linen"
# NHWC shapes: the article's CNN and ResNet-20 (batch 128) from bn_layer.py, plus large ones.
ACCEL_LARGE = {"hbm-56": (256, 56, 56, 64), "hbm-112": (128, 112, 112, 64)}  # 205 MB, 411 MB in float32


def plan(platform: str, quick: bool) -> dict:
    """Shapes, dtypes, peers, rounds and time budgets for this platform and mode."""
    import bn_layer

    shapes = dict(bn_layer.SHAPES)
    shapes.update(ACCEL_LARGE)
    peers_all = ["jaxbn", "jaxbn.linen", "flax.linen", "flax.nnx"]
    if importlib.util.find_spec("equinox") is not None:
        peers_all.append("equinox")
    if importlib.util.find_spec("haiku") is not None:
        peers_all.append("haiku")
    absent = [f"{m}: not importable" for m in ("equinox", "haiku") if importlib.util.find_spec(m) is None]
    if platform == "cpu":
        if quick:
            return dict(shapes={k: shapes[k] for k in ("resnet-s3", "cnn")}, large=(), bf16=("resnet-s3",),
                        peers=["jaxbn", "jaxbn.linen", "flax.linen"],
                        absent=absent + [f"{q}: left out in --quick" for q in peers_all
                                         if q not in ("jaxbn", "jaxbn.linen", "flax.linen")],
                        rounds=3, target_s=0.03, budget_s=3.0,
                        copy_elems=16 * 2**20, harnesses=("vjp", "grad"))
        return dict(shapes={k: shapes[k] for k in ("cnn", "resnet-s1", "resnet-s3", "dram-56", "dram-112")},
                    large=("dram-56", "dram-112"), bf16=("cnn", "dram-56"), peers=peers_all, absent=absent, rounds=11,
                    target_s=0.05, budget_s=15.0,
                    copy_elems=64 * 2**20, harnesses=("vjp", "grad"))
    names = ("cnn", "resnet-s1", "resnet-s3", "hbm-56", "hbm-112")
    if quick:
        names = ("cnn", "resnet-s1", "hbm-56")
    return dict(shapes={k: shapes[k] for k in names}, large=("hbm-56", "hbm-112"),
                bf16=tuple(k for k in ("cnn", "resnet-s1", "hbm-56", "hbm-112") if k in names), peers=peers_all,
                absent=absent,
                rounds=5 if quick else 7, target_s=0.02, budget_s=3.0 if quick else 6.0,
                copy_elems=256 * 2**20, harnesses=("vjp", "grad"))


def grad_fn(peer: str, x_example):
    """Jitted ``h(x, dy, scale, bias) -> (loss, dx, dscale, dbias, mean, var)`` for ``sum(dy * y**2) / 2``."""
    import jax
    import jax.numpy as jnp

    import peers

    apply = peers.train_apply(peer, x_example)
    if apply is None:
        return None

    def h(x, dy, scale, bias):
        def loss(x, s, b):
            y, stats = apply(x, s, b)
            y = y.astype(jnp.float32)
            return 0.5 * jnp.sum(dy.astype(jnp.float32) * y * y), stats

        (l, (m, v)), (dx, ds, db) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
        return l, dx, ds, db, m, v

    return jax.jit(h)


def _rel(a, r) -> float:
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    return float(np.max(np.abs(a - r)) / max(float(np.max(np.abs(r))), 1e-30))


def run(quick: bool, out_path: str = None, budget_s: float = 1e9) -> dict:
    """Times every job of `plan`; writes the results so far to `out_path` after each job; stops starting
    jobs after `budget_s` seconds (those left are listed under "not_run")."""
    import time

    import jax
    import jax.numpy as jnp

    import bn_layer
    import peers

    platform = jax.devices()[0].platform
    p = plan(platform, quick)
    out = {"platform": platform, "device_kind": jax.devices()[0].device_kind,
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
           "reference": REF, "momentum": peers.MOMENTUM, "epsilon": peers.EPS,
           "roofline_bytes": {"train": "5*N*b", "train_two_sweep": "8*N*b", "eval": "2*N*b"},
           "train": {h: {} for h in p["harnesses"]}, "eval": {}, "errors": []}

    big = {"a": jnp.ones((p["copy_elems"],), jnp.float32)}
    neg = jax.jit(lambda a: -a, donate_argnums=0)
    copy_bytes = 2 * p["copy_elems"] * 4

    def copy_cand():
        big["a"] = neg(big["a"])
        return big["a"]

    s = common.interleave({"copy": copy_cand}, rounds=5, target_s=p["target_s"], budget_s=2.0)
    out["bandwidth"] = {"copy_bytes": copy_bytes, "copy_bw": float(np.median(copy_bytes / s["copy"]["samples_s"]))}
    print(f"  copy bandwidth {out['bandwidth']['copy_bw'] / 1e9:.1f} GB/s ({copy_bytes / 2**20:.0f} MiB moved)",
          flush=True)

    jobs = [("float32", n) for n in p["shapes"]] + [("bfloat16", n) for n in p["shapes"] if n in p["bf16"]]
    t_start = time.perf_counter()
    out["not_run"] = []
    for dt_name, name in jobs:
        if time.perf_counter() - t_start > budget_s:
            out["not_run"].append(f"{dt_name}/{name}")
            print(f"  {dt_name}/{name}: not run (out of the layer part's {budget_s:.0f} s)", flush=True)
            continue
        shape = p["shapes"][name]
        dt = jnp.dtype(dt_name)
        key = f"{dt_name}/{name}"
        numel = int(np.prod(shape))
        nbytes = numel * dt.itemsize
        x = (jax.random.normal(jax.random.key(0), shape) * 2.0 + 0.5).astype(dt)
        dy = jax.random.normal(jax.random.key(1), shape).astype(dt)
        C = shape[-1]
        scale = jnp.linspace(0.5, 1.5, C, dtype=jnp.float32)
        bias = jnp.linspace(-1.0, 1.0, C, dtype=jnp.float32)
        for harness in p["harnesses"]:
            fns, errs, ref = {}, {}, None
            for peer in p["peers"]:
                try:
                    f = (peers.train_step_fn(peer, x) if harness == "vjp" else grad_fn(peer, x))
                    if f is None:
                        continue
                    res = f(x, dy, scale, bias)[:4]
                except Exception as e:  # noqa: BLE001  (a peer that cannot run here is reported, not fatal)
                    out["errors"].append(f"{harness} {key} {peer}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                if ref is None:
                    ref = res
                errs[peer] = [_rel(a, r) for a, r in zip(res, ref)]
                fns[peer] = f
            cands = {q: (lambda f=f: (lambda: f(x, dy, scale, bias)))() for q, f in fns.items()}
            cands["copy"] = copy_cand
            s = common.interleave(cands, rounds=p["rounds"], target_s=p["target_s"], budget_s=p["budget_s"])
            t_copy = s["copy"]["samples_s"]
            row = {"shape": list(shape), "dtype": dt_name, "numel": numel, "rounds": int(len(t_copy)),
                   "copy_bw_median": float(np.median(copy_bytes / t_copy)), "peers": {}}
            for q in fns:
                t = s[q]["samples_s"]
                k = min(len(t), len(t_copy))
                bw = copy_bytes / t_copy[:k]
                row["peers"][q] = {
                    "median_s": float(np.median(t)),
                    "calls_per_sample": s[q]["calls"],
                    "speedup_vs_flax": (common.median_ratio(s[REF]["samples_s"], t) if REF in s else None),
                    "roofline_5N": float(np.median(5 * nbytes / bw / t[:k])),
                    "roofline_8N": float(np.median(8 * nbytes / bw / t[:k])),
                    "max_rel_err_vs_jaxbn": errs[q],
                }
            out["train"][harness][key] = row
            print(f"  {harness:4s} {key:20s} copy {row['copy_bw_median'] / 1e9:6.1f} GB/s  " + "  ".join(
                f"{q}={v['median_s'] * 1e3:.3f}ms(x{(v['speedup_vs_flax'] or 0):.2f},{v['roofline_5N']:.0%})"
                for q, v in row["peers"].items()), flush=True)
            bad = {q: e for q, e in errs.items() if max(e) > bn_layer.TOL[dt_name]}
            if bad:
                out["errors"].append(f"{harness} {key}: peers disagree with jaxbn beyond {bn_layer.TOL[dt_name]}: "
                                     f"{bad}")
        # ------------------------------------------------------------ evaluation
        # Checked with random statistics (not donated); timed in place like the copy: x donated and each call's
        # output fed to the next, with statistics that make the map the identity (mean 0, var + eps = 1, scale 1,
        # bias 0) so the values stay put over thousands of calls. XLA cannot know that; the work is the same.
        vec = [jnp.linspace(0.5, 1.5, C, dtype=jnp.float32), jnp.linspace(-1.0, 1.0, C, dtype=jnp.float32),
               jnp.linspace(-0.5, 0.5, C, dtype=jnp.float32), jnp.linspace(0.5, 2.0, C, dtype=jnp.float32)]
        f32 = jnp.float32
        ident = [jnp.ones((C,), f32), jnp.zeros((C,), f32), jnp.zeros((C,), f32), jnp.full((C,), 1.0 - peers.EPS, f32)]
        fns, errs, ref, bufs = {}, {}, None, {}
        for peer in [q for q in p["peers"] if q in peers.EVAL_PEERS]:
            try:
                y = peers.eval_fn(peer, x, donate=False)(x, *vec)
                g = peers.eval_fn(peer, x, donate=True)
                block(g(x + 0 if dt_name == "float32" else (x.astype(f32) + 0).astype(dt), *ident))
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"eval {key} {peer}: {type(e).__name__}: {str(e)[:300]}")
                continue
            ref = y if ref is None else ref
            errs[peer] = _rel(y, ref)
            fns[peer] = g
            bufs[peer] = x + 0 if dt_name == "float32" else (x.astype(jnp.float32) + 0).astype(dt)

        def eval_cand(q):
            def call():
                bufs[q] = fns[q](bufs[q], *ident)
                return bufs[q]
            return call

        cands = {q: eval_cand(q) for q in fns}
        cands["copy"] = copy_cand
        s = common.interleave(cands, rounds=p["rounds"], target_s=p["target_s"], budget_s=p["budget_s"])
        drift = {q: _rel(bufs[q], x) for q in fns}
        if max(drift.values(), default=0.0) > 1e-6:
            out["errors"].append(f"eval {key}: the identity statistics moved x by {drift}")
        t_copy = s["copy"]["samples_s"]
        row = {"shape": list(shape), "dtype": dt_name, "numel": numel, "rounds": int(len(t_copy)),
               "donated": True, "peers": {}}
        for q in fns:
            t = s[q]["samples_s"]
            k = min(len(t), len(t_copy))
            row["peers"][q] = {
                "median_s": float(np.median(t)),
                "calls_per_sample": s[q]["calls"],
                "speedup_vs_flax": (common.median_ratio(s[REF]["samples_s"], t) if REF in s else None),
                "roofline_2N": float(np.median(2 * nbytes / (copy_bytes / t_copy[:k]) / t[:k])),
                "max_rel_err_vs_jaxbn": errs[q],
            }
        out["eval"][key] = row
        print(f"  eval {key:20s} " + "  ".join(
            f"{q}={v['median_s'] * 1e3:.3f}ms(x{(v['speedup_vs_flax'] or 0):.2f},{v['roofline_2N']:.0%})"
            for q, v in row["peers"].items()), flush=True)
        del x, dy, bufs
        out["summary"] = summarize(out, p)
        if out_path:
            common.write_json(out_path, out)
    out["summary"] = summarize(out, p)
    if out_path:
        common.write_json(out_path, out)
    return out


def summarize(out: dict, p: dict) -> dict:
    """The goals' numbers for jaxbn.linen (and jaxbn) against flax.linen."""
    summ = {}
    for peer in ("jaxbn.linen", "jaxbn"):
        d = {}
        for harness, rows in out["train"].items():
            f32 = [v["peers"][peer]["speedup_vs_flax"] for k, v in rows.items()
                   if k.startswith("float32/") and peer in v["peers"] and v["peers"][peer]["speedup_vs_flax"]]
            bf16 = [v["peers"][peer]["speedup_vs_flax"] for k, v in rows.items()
                    if k.startswith("bfloat16/") and peer in v["peers"] and v["peers"][peer]["speedup_vs_flax"]]
            d[harness] = {
                "train_f32_speedup_median": float(np.median(f32)) if f32 else None,
                "train_f32_speedup_min": float(np.min(f32)) if f32 else None,
                "train_bf16_speedup_median": float(np.median(bf16)) if bf16 else None,
                "train_roofline_5N_large": {k: v["peers"][peer]["roofline_5N"] for k, v in rows.items()
                                            if k.split("/")[1] in p["large"] and peer in v["peers"]},
            }
        d["eval_roofline_2N"] = {k: v["peers"][peer]["roofline_2N"] for k, v in out["eval"].items()
                                 if peer in v["peers"]}
        d["eval_speedup_vs_flax"] = {k: v["peers"][peer]["speedup_vs_flax"] for k, v in out["eval"].items()
                                     if peer in v["peers"]}
        summ[peer] = d
    return summ


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    args = ap.parse_args(argv)
    run(args.quick, args.out, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
