r"""One BatchNorm layer: jaxbn against its peers, training and evaluation, float32 and bf16.

  python benchmarks/bn_layer.py                # full run (~5 min on 2 CPU cores)
  python benchmarks/bn_layer.py --quick        # two shapes, fewer rounds (~1 min)

What is timed (see peers.py for how each peer is wrapped to compute the same thing):

* train: one jitted call ``(y, dx, dscale, dbias, new_mean, new_var) = f(x, dy,
  scale, bias)``: the training-mode forward, the VJP for a fixed random cotangent
  and the running statistics. ``--cotangent chained`` uses ``dy * y`` instead (a
  function of the output, as in a network: XLA cannot then overlap backward
  reductions of dy with the forward; the 5N roofline is the same). Nothing is donated: JAX would alias a donated dy to
  y (the first output of its shape), and XLA then adds two full copies; inside a
  real train step XLA's buffer assignment reuses dead buffers by itself.
* eval: ``y = g(x, scale, bias, mean, var)`` with running statistics; x is
  donated (y is written in place), a fresh copy of x is made outside the timed
  region.
* copy: ``a = -a`` on a donated 256 MiB float32 array, the bandwidth reference.
  It is one of the interleaved candidates of every shape, so each round has its
  own bandwidth and roofline fractions are medians of per-round ratios.
* PyTorch (channels_last BatchNorm2d) in a subprocess of its own (torch_bn.py).

Roofline (fewest bytes the computation must move, b = bytes per element of x):
  train  5·N·b: the forward reads x and writes y, the backward reads x and dy and
         writes dx, each once. Reachable only if the statistics and the
         normalization share one read of x, which no two-phase implementation can do
         for arrays larger than the caches; the best two-sweep schedule (statistics
         sweep, then apply sweep, in each direction) moves 8·N·b and is reported too.
  eval   2·N·b: read x, write y.
  fraction = (bytes / copy bandwidth of the same round) / time.

All timings are medians over rounds; "x flax" columns are medians of per-round
ratios t(flax.linen) / t(peer) (> 1: faster than Flax). The process re-executes
itself with the allocator setting recommended in README.md (GLIBC_TUNABLES, see
studies/cpu_settings.py); ``--default-allocator`` keeps glibc's defaults.

Results: results/bn_layer.json, results/bn_layer.md (tables), results/bn_layer.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = {
    "cnn": (128, 26, 26, 32),  # the article's CNN: conv output at batch 128
    "resnet-s1": (128, 32, 32, 16),  # ResNet-20 stages at batch 128
    "resnet-s2": (128, 16, 16, 32),
    "resnet-s3": (128, 8, 8, 64),
    "dram-56": (64, 56, 56, 64),  # DRAM-sized (ResNet-50 stage 1 at batch 64): 51 MB
    "dram-112": (32, 112, 112, 64),  # 103 MB
}
DRAM = ("dram-56", "dram-112")
BF16_SHAPES = ("cnn", "resnet-s1", "dram-56")
QUICK = ("cnn", "dram-56")
REF = "flax.linen"
TOL = {"float32": 2e-4, "bfloat16": 6e-2}  # max |diff| / max |ref| against jaxbn, per output


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}, fewer rounds")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="subset of shapes")
    ap.add_argument("--peers", nargs="+", help="subset of training peers (default: all)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per shape (default 11, quick 5)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--donate-dy", action="store_true",
                    help="donate dy in training (JAX then aliases it to y, the first output of its shape, "
                         "and XLA adds two copies: slower, see README)")
    ap.add_argument("--cotangent", choices=("independent", "chained"), default="independent",
                    help="chained: the cotangent is dy * y (a function of the output, as in a network; "
                         "no PyTorch run); default: the fixed random dy")
    ap.add_argument("--no-donate-eval", action="store_true", help="do not donate x in evaluation")
    ap.add_argument("--default-allocator", action="store_true", help="keep glibc's malloc defaults")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="bn_layer", help="results file stem")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.default_allocator:
        _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})

    import jax
    import jax.numpy as jnp
    import numpy as np

    import peers
    from jaxbn import _hlo

    names = list(args.shapes or (QUICK if args.quick else SHAPES))
    rounds = args.rounds or (5 if args.quick else 11)
    donate = args.donate_dy
    donate_eval = not args.no_donate_eval
    train_peers = [p for p in (args.peers or peers.TRAIN_PEERS) if p in peers.TRAIN_PEERS]
    if REF not in train_peers:
        train_peers.append(REF)
    env = _common.environment()
    print(f"# bn_layer: {env['device_kind']}, {env['cpu']['model_name']}, load {env['loadavg_start']}, "
          f"settings {env['settings']}", flush=True)

    torch_res = None
    if args.cotangent != "independent":
        args.no_torch = True  # torch_bn.py times y.backward(dy) for a fixed dy
    if not args.no_torch:
        torch_res = run_torch([SHAPES[n] for n in names],
                              [] if args.no_bf16 else [SHAPES[n] for n in names if n in BF16_SHAPES], rounds)

    bw0 = _common.copy_bandwidth()
    print(f"copy bandwidth {bw0['copy_bw'] / 1e9:.1f} GB/s donated, {bw0['fresh_copy_bw'] / 1e9:.1f} GB/s into a "
          f"fresh output, read {bw0['read_bw'] / 1e9:.1f} GB/s", flush=True)

    big = {"a": jnp.ones((64 * 2**20,), jnp.float32)}
    neg = jax.jit(lambda a: -a, donate_argnums=0)
    copy_bytes = 2 * big["a"].size * 4

    def copy_cand():
        big["a"] = neg(big["a"])
        return big["a"]

    oop_src = jnp.ones((64 * 2**20,), jnp.float32)
    neg_oop = jax.jit(lambda a: -a)

    def copy_oop_cand():  # out of place: the output is a separate (recycled) buffer
        return neg_oop(oop_src)

    results = {"environment": env, "bandwidth_start": bw0, "settings": {
        "rounds": rounds, "donate_dy_train": donate, "cotangent": args.cotangent, "donate_x_eval": donate_eval,
        "momentum": peers.MOMENTUM, "epsilon": peers.EPS,
        "reference": REF, "roofline_bytes": {"train": "5*N*b", "train_two_sweep": "8*N*b", "eval": "2*N*b"},
        "bandwidth": "a = -a on a donated 256 MiB float32 array, interleaved with every shape"},
        "train": {}, "eval": {}, "torch": torch_res}

    # ---------------------------------------------------------------- training
    jobs = [("float32", n) for n in names]
    if not args.no_bf16:
        jobs += [("bfloat16", n) for n in names if n in BF16_SHAPES]
    for dt_name, name in jobs:
        shape = SHAPES[name]
        dt = jnp.dtype(dt_name)
        key = f"{dt_name}/{name}"
        x = (jax.random.normal(jax.random.key(0), shape) * 2.0 + 0.5).astype(dt)
        dy = jax.random.normal(jax.random.key(1), shape).astype(dt)
        C = shape[-1]
        scale = jnp.linspace(0.5, 1.5, C, dtype=jnp.float32)
        bias = jnp.linspace(-1.0, 1.0, C, dtype=jnp.float32)
        fns, mem, nkern, errs, traffic = {}, {}, {}, {}, {}
        ref_out = None
        for p in train_peers:
            f = peers.train_step_fn(p, x, donate=donate, cotangent=args.cotangent)
            if f is None:
                continue
            comp = f.lower(x, dy, scale, bias).compile()
            ma = comp.memory_analysis()
            mem[p] = {"temp_bytes": int(ma.temp_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
                      "alias_bytes": int(ma.alias_size_in_bytes)}
            hlo, numel = comp.as_text(), int(np.prod(shape))
            nkern[p] = len(_hlo.kernels(hlo))
            # bytes of x-sized arrays its kernels read and write, per element (y = -x in float32: 8.0)
            traffic[p] = _hlo.traffic_bytes(hlo, numel // 2) / numel
            out = [np.asarray(o, np.float32) for o in f(x, fresh_copy(dy) if donate else dy, scale, bias)[:4]]
            if ref_out is None:
                ref_out = out
            errs[p] = [float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30)) for a, r in zip(out, ref_out)]
            fns[p] = f
        bad = {p: e for p, e in errs.items() if max(e) > TOL[dt_name]}
        if bad:
            print(f"  WARNING {key}: peers disagree with jaxbn beyond {TOL[dt_name]}: {bad}", flush=True)

        if donate:
            cands = {p: (lambda f=f: (lambda d: f(x, d, scale, bias)))() for p, f in fns.items()}
        else:
            cands = {p: (lambda f=f: (lambda: f(x, dy, scale, bias)))() for p, f in fns.items()}
        prep = {p: (lambda: (fresh_copy(dy),)) for p in fns} if donate else {}
        cands["copy"] = copy_cand
        cands["copy_oop"] = copy_oop_cand
        numel = int(np.prod(shape))
        calls = max(1, int(2e6 // numel))
        budget = 40.0 if name in DRAM else 25.0
        s = _common.interleave(cands, rounds=rounds, calls=calls, prepare=prep, budget_s=budget,
                               warm_each=name not in DRAM)
        nbytes = numel * dt.itemsize
        t_copy, t_oop = s["copy"], s["copy_oop"]
        row = {"shape": shape, "dtype": dt_name, "numel": numel, "bytes_5N": 5 * nbytes, "bytes_8N": 8 * nbytes,
               "calls_per_sample": calls, "rounds": len(t_copy),
               "copy_bw_median": float(np.median(copy_bytes / t_copy)),
               "copy_oop_bw_median": float(np.median(copy_bytes / t_oop)), "peers": {}}
        for p in fns:
            t = s[p]
            k = min(len(t), len(t_copy), len(t_oop))
            bw = copy_bytes / t_copy[:k]
            bw_oop = copy_bytes / t_oop[:k]
            row["peers"][p] = {
                "median_s": float(np.median(t)),
                "speedup_vs_flax": _common.ratio(s, REF, p),
                "roofline_5N": float(np.median(5 * nbytes / bw / t[:k])),
                "roofline_8N": float(np.median(8 * nbytes / bw / t[:k])),
                "roofline_5N_oop": float(np.median(5 * nbytes / bw_oop / t[:k])),
                "temp_bytes": mem[p]["temp_bytes"],
                "kernels": nkern[p],
                "hlo_traffic_bytes_per_element": traffic[p],
                "max_rel_err_vs_jaxbn": errs[p],
                "samples_s": t,
            }
        results["train"][key] = row
        print_train_row(key, row, flush=True)

    # ---------------------------------------------------------------- evaluation
    if not args.no_eval:
        for name in names:
            shape = SHAPES[name]
            x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 0.5
            C = shape[-1]
            vec = [jnp.linspace(0.5, 1.5, C), jnp.linspace(-1.0, 1.0, C), jnp.linspace(-0.5, 0.5, C),
                   jnp.linspace(0.5, 2.0, C)]
            fns, ref_y, errs = {}, None, {}
            for p in peers.EVAL_PEERS:
                g = peers.eval_fn(p, x, donate=donate_eval)
                y = np.asarray(g(fresh_copy(x) if donate_eval else x, *vec))
                ref_y = y if ref_y is None else ref_y
                errs[p] = float(np.max(np.abs(y - ref_y)) / np.max(np.abs(ref_y)))
                fns[p] = g
            if donate_eval:
                cands = {p: (lambda g=g: (lambda xx: g(xx, *vec)))() for p, g in fns.items()}
            else:
                cands = {p: (lambda g=g: (lambda: g(x, *vec)))() for p, g in fns.items()}
            if donate_eval:
                # A fresh copy of x per call; for DRAM-sized x, then evict it from the caches
                # (the copy would otherwise leave part of x cached and beat the bandwidth).
                flush = name in DRAM
                prep = {p: (lambda: (evict(fresh_copy(x)) if flush else fresh_copy(x),)) for p in fns}
            else:
                prep = {}
            cands["copy"] = copy_cand
            numel = x.size
            s = _common.interleave(cands, rounds=rounds, calls=max(1, int(4e6 // numel)), prepare=prep,
                                   budget_s=20.0, warm_each=name not in DRAM)
            nbytes = numel * 4
            t_copy = s["copy"]
            row = {"shape": shape, "dtype": "float32", "bytes_2N": 2 * nbytes, "rounds": len(t_copy), "peers": {}}
            for p in fns:
                t = s[p]
                k = min(len(t), len(t_copy))
                row["peers"][p] = {
                    "median_s": float(np.median(t)),
                    "speedup_vs_flax": _common.ratio(s, REF, p),
                    "roofline_2N": float(np.median(2 * nbytes / (copy_bytes / t_copy[:k]) / t[:k])),
                    "max_rel_err_vs_jaxbn": errs[p],
                    "samples_s": t,
                }
            results["eval"][f"float32/{name}"] = row
            print(f"eval {name:10s} " + "  ".join(
                f"{p}={v['median_s'] * 1e3:.2f}ms({v['roofline_2N']:.0%})" for p, v in row["peers"].items()),
                flush=True)

    results["bandwidth_end"] = _common.copy_bandwidth()
    summarize(results)
    path = _common.save_json(f"{args.tag}.json", results)
    md = tables(results)
    _common.save_text(f"{args.tag}.md", f"Command: `{_common.command()}`\n\n{md}\n")
    try:
        plot(results, os.path.join(_common.RESULTS, f"{args.tag}.png"))
    except Exception as e:  # matplotlib missing or headless trouble: the numbers matter more
        print(f"plot failed: {e}", file=sys.stderr)
    print(md)
    print(f"\nwrote {path}")
    return 0


_copy_fn = None


def fresh_copy(a):
    """A new buffer with a's contents (for arguments that a timed call donates)."""
    global _copy_fn
    import jax

    if _copy_fn is None:
        _copy_fn = jax.jit(lambda a: a + 0 if a.dtype.kind == "f" else a)
    return _copy_fn(a)


_evict_buf = None


def evict(a):
    """Returns `a` after reading 128 MiB of other data (pushes `a` out of the caches)."""
    global _evict_buf
    import jax
    import jax.numpy as jnp

    if _evict_buf is None:
        _evict_buf = (jnp.ones((32 * 2**20,), jnp.float32), jax.jit(jnp.sum))
    jax.block_until_ready(_evict_buf[1](_evict_buf[0]))
    return a


def run_torch(shapes, bf16_shapes, rounds):
    """PyTorch in its own process; None if it is not installed or fails."""
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return None
    except (ImportError, ValueError):
        return None
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        out = tf.name
    cmd = [sys.executable, os.path.join(HERE, "torch_bn.py"), "--out", out, "--rounds", str(rounds),
           "--shapes", *[",".join(map(str, s)) for s in shapes]]
    res = {}
    try:
        r = subprocess.run(cmd + ["--dtypes", "float32"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"torch_bn.py failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        with open(out) as f:
            res["float32"] = json.load(f)
        # One OpenMP thread: on a loaded 2-core machine PyTorch's per-op thread barriers can
        # cost more than the second core brings.
        r = subprocess.run(cmd + ["--dtypes", "float32", "--threads", "1"], capture_output=True, text=True,
                           timeout=600)
        if r.returncode == 0:
            with open(out) as f:
                res["float32_1thread"] = json.load(f)
        if bf16_shapes:
            cmd = cmd[:cmd.index("--shapes") + 1] + [",".join(map(str, s)) for s in bf16_shapes]
            r = subprocess.run(cmd + ["--dtypes", "bfloat16"], capture_output=True, text=True, timeout=600)
            if r.returncode == 0:
                with open(out) as f:
                    res["bfloat16"] = json.load(f)
    except subprocess.TimeoutExpired:
        return res or None
    finally:
        os.unlink(out)
    print(f"torch {res['float32']['torch']}: copy bandwidth {res['float32']['copy_bw'] / 1e9:.1f} GB/s "
          f"(its own process), {res['float32']['threads']} threads", flush=True)
    return res


def torch_time(results, kind, dt_name, shape, variant=None):
    tr = (results.get("torch") or {}).get(variant or dt_name)
    if not tr:
        return None, None
    k = f"{kind}/{dt_name}/{','.join(map(str, shape))}"
    if k not in tr["median_s"]:
        return None, None
    return tr["median_s"][k], tr["copy_bw"]


def summarize(results):
    """Goal-level numbers: median speedup over shapes, worst shape, DRAM rooflines, torch."""
    import numpy as np

    summ = {}
    f32 = {k: v for k, v in results["train"].items() if k.startswith("float32/")}
    for p in ("jaxbn", "jaxbn.linen", "jaxbn+patch"):
        sp = [v["peers"][p]["speedup_vs_flax"] for v in f32.values() if p in v["peers"]]
        if not sp:
            continue
        d = {"train_f32_speedup_median": float(np.median(sp)), "train_f32_speedup_min": float(np.min(sp)),
             "train_f32_roofline_5N_dram": {k: v["peers"][p]["roofline_5N"] for k, v in f32.items()
                                            if k.split("/")[1] in DRAM},
             "train_f32_roofline_8N_dram": {k: v["peers"][p]["roofline_8N"] for k, v in f32.items()
                                            if k.split("/")[1] in DRAM},
             "train_bf16_speedup": {k: v["peers"][p]["speedup_vs_flax"] for k, v in results["train"].items()
                                    if k.startswith("bfloat16/") and p in v["peers"]},
             "temp_bytes_vs_flax": {k: [v["peers"][p]["temp_bytes"], v["peers"][REF]["temp_bytes"]]
                                    for k, v in results["train"].items() if p in v["peers"]}}
        tv = {}
        for k, v in results["train"].items():
            for variant in (None, f"{v['dtype']}_1thread"):
                t_t, bw_t = torch_time(results, "train", v["dtype"], v["shape"], variant)
                if t_t and p in v["peers"]:
                    tv[k + ("" if variant is None else " (torch 1 thread)")] = {
                        "time_ratio_jaxbn_over_torch": v["peers"][p]["median_s"] / t_t,
                        "torch_roofline_5N": v["bytes_5N"] / bw_t / t_t}
        d["torch"] = tv
        if p in ("jaxbn", "jaxbn.linen") and results["eval"]:
            d["eval_roofline_2N"] = {k: v["peers"][p]["roofline_2N"] for k, v in results["eval"].items()
                                     if p in v["peers"]}
        summ[p] = d
    results["summary"] = summ


def print_train_row(key, row, flush=False):
    ps = row["peers"]
    print(f"train {key:20s} copy {row['copy_bw_median'] / 1e9:5.1f} GB/s  " + "  ".join(
        f"{p}={v['median_s'] * 1e3:.2f}ms(x{v['speedup_vs_flax']:.2f},{v['roofline_5N']:.0%})" for p, v in ps.items()),
        flush=flush)


def _ms(t):
    return f"{t * 1e3:.2f}" if t < 0.1 else f"{t * 1e3:.0f}"


def tables(results) -> str:
    env = results["environment"]
    out = [f"Machine: {env['cpu']['model_name']}, {env['cpu']['logical_cpus']} logical CPUs, "
           f"{env['device_kind']}; jax {env['versions'].get('jax')}, flax {env['versions'].get('flax')}; "
           f"settings {env['settings'] or 'defaults'}; load average {env['loadavg_start']} at start, "
           f"{env.get('loadavg_end', '?')} at end; {env['date_utc']}. No GPU in this session.", ""]
    bw = results["bandwidth_start"]
    out.append(f"Copy bandwidth (a = -a, 256 MiB float32): {bw['copy_bw'] / 1e9:.1f} GB/s in place (donated), "
               f"{bw['fresh_copy_bw'] / 1e9:.1f} GB/s into a fresh output; sum: {bw['read_bw'] / 1e9:.1f} GB/s.")
    out.append("")
    for dt_name in ("float32", "bfloat16"):
        rows_in = {k: v for k, v in results["train"].items() if v["dtype"] == dt_name}
        if not rows_in:
            continue
        peers_all = []
        for v in rows_in.values():
            peers_all += [p for p in v["peers"] if p not in peers_all]
        out.append(f"**Training forward+backward, {dt_name}**: time of each peer (ms, median) and speed-up over "
                   f"{REF} (median of per-round ratios; > 1 is faster)")
        out.append("")
        header = ["shape"] + peers_all + ["PyTorch (own process)", "PyTorch, 1 thread"]
        rows = []
        for k, v in rows_in.items():
            r = [k.split("/")[1] + " " + "×".join(map(str, v["shape"]))]
            for p in peers_all:
                e = v["peers"].get(p)
                r.append("" if e is None else f"{_ms(e['median_s'])} (×{e['speedup_vs_flax']:.2f})")
            for variant in (None, f"{dt_name}_1thread"):
                t_t, _ = torch_time(results, "train", dt_name, v["shape"], variant)
                r.append("" if t_t is None else _ms(t_t))
            rows.append(r)
        out.append(_common.fmt_table(header, rows))
        out.append("")
        out.append(f"Roofline fractions, {dt_name} training (bytes/copy-bandwidth over time; 5N = the compulsory "
                   f"traffic, 8N = the best two-sweep schedule), kernels launched, XLA temp memory:")
        out.append("")
        header = ["shape", "peer", "5N roofline", "8N roofline", "5N vs out-of-place copy", "kernels",
                  "HLO traffic (bytes/element)", "temp bytes"]
        rows = []
        for k, v in rows_in.items():
            for p in peers_all:
                e = v["peers"].get(p)
                if e is None:
                    continue
                rows.append([k.split("/")[1], p, f"{e['roofline_5N']:.0%}", f"{e['roofline_8N']:.0%}",
                             f"{e['roofline_5N_oop']:.0%}", e["kernels"],
                             f"{e['hlo_traffic_bytes_per_element']:.0f}", e["temp_bytes"]])
            t_t, bw_t = torch_time(results, "train", dt_name, v["shape"])
            if t_t:
                rows.append([k.split("/")[1], "PyTorch", f"{v['bytes_5N'] / bw_t / t_t:.0%}",
                             f"{v['bytes_8N'] / bw_t / t_t:.0%}", "", "", "", ""])
        out.append(_common.fmt_table(header, rows))
        out.append("")
    if results["eval"]:
        peers_all = list(next(iter(results["eval"].values()))["peers"])
        out.append(f"**Evaluation forward, float32**: ms (median), speed-up over {REF}, and fraction of the 2N "
                   f"roofline")
        out.append("")
        rows = []
        for k, v in results["eval"].items():
            r = [k.split("/")[1]]
            for p in peers_all:
                e = v["peers"][p]
                r.append(f"{_ms(e['median_s'])} (×{e['speedup_vs_flax']:.2f}, {e['roofline_2N']:.0%})")
            t_t, bw_t = torch_time(results, "eval", "float32", v["shape"])
            r.append("" if t_t is None else f"{_ms(t_t)} ({v['bytes_2N'] / bw_t / t_t:.0%})")
            rows.append(r)
        out.append(_common.fmt_table(["shape"] + peers_all + ["PyTorch"], rows))
        out.append("")
    s = results.get("summary", {}).get("jaxbn.linen") or results.get("summary", {}).get("jaxbn")
    if s:
        out.append(f"Summary (jaxbn.linen vs {REF}, float32 training): median speed-up "
                   f"×{s['train_f32_speedup_median']:.2f}, worst shape ×{s['train_f32_speedup_min']:.2f}; "
                   f"DRAM-sized roofline (5N) " + ", ".join(f"{k.split('/')[1]} {v:.0%}" for k, v in
                                                            s["train_f32_roofline_5N_dram"].items()) + ".")
    return "\n".join(out)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {k: v for k, v in results["train"].items() if v["dtype"] == "float32"}
    peers_all = []
    for v in rows.values():
        peers_all += [p for p in v["peers"] if p not in peers_all]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2))
    ax = axes[0]
    w = 0.8 / len(peers_all)
    xs = np.arange(len(rows))
    for i, p in enumerate(peers_all):
        ax.bar(xs + i * w, [v["peers"].get(p, {}).get("speedup_vs_flax", np.nan) for v in rows.values()], w, label=p)
    tt = []
    for v in rows.values():
        t_t, _ = torch_time(results, "train", "float32", v["shape"])
        tt.append(v["peers"][REF]["median_s"] / t_t if t_t else np.nan)
    ax.plot(xs + 0.4, tt, "k*", ms=10, label="PyTorch (own process)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs + 0.4, [k.split("/")[1] for k in rows], rotation=20)
    ax.set_ylabel(f"speed-up over {REF} (training fwd+bwd, float32)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for i, p in enumerate(peers_all):
        ax.bar(xs + i * w, [v["peers"].get(p, {}).get("roofline_5N", np.nan) for v in rows.values()], w, label=p)
    tt = []
    for v in rows.values():
        t_t, bw_t = torch_time(results, "train", "float32", v["shape"])
        tt.append(v["bytes_5N"] / bw_t / t_t if t_t else np.nan)
    ax.plot(xs + 0.4, tt, "k*", ms=10, label="PyTorch")
    ax.axhline(0.6, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs + 0.4, [k.split("/")[1] for k in rows], rotation=20)
    ax.set_ylabel("fraction of the 5N copy-bandwidth roofline")
    env = results["environment"]
    fig.suptitle(f"BatchNorm training step, {env['cpu']['model_name']} ({env['cpu']['logical_cpus']} CPUs), "
                 f"load {env['loadavg_start'][0]}, {env['date_utc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
