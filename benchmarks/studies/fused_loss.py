r"""One BN layer as users call it: the gradient of a scalar loss, and the allocator a library user has.

  python benchmarks/studies/fused_loss.py                  # 6 shapes, 3 allocator settings, 2 passes (~8 min)
  python benchmarks/studies/fused_loss.py --shapes cnn dram-56 --passes 1

Two harnesses, both one jitted call (``benchmarks/peers.py`` wraps every peer alike):

* ``vjp``: ``(y, dx, dscale, dbias, stats) = f(x, dy, scale, bias)``, the VJP for a fixed
  cotangent (bn_layer.py's harness, as PyTorch's ``y.backward(dy)``);
* ``grad``: ``jax.value_and_grad`` of ``sum(dy * y**2) / 2`` inside the same jit (the
  accelerator check's harness): the loss is fused with the layer, the cotangent
  ``dy * y`` is a function of the output.

Three allocator settings, each in a process of its own (glibc reads its tunables at
start-up): ``default`` (what a library user's process has), ``keep_heap``
(``jaxbn.cpu_memory.keep_heap()`` called at the start, no environment needed) and
``tunables`` (``GLIBC_TUNABLES`` as train.py and the benchmarks set it). Passes
alternate the settings so a slow spell of the shared machine is spread over all.

Per program it also reports the HLO traffic (bytes per element of x moved by the
compiled program's kernels, ``jaxbn._hlo.traffic_bytes``): the cost of the fused
loss is visible there, independent of the machine's load.

Results: benchmarks/results/studies/fused_loss.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(BENCH, "accelerator"))

import _common  # noqa: E402

PEERS = ("jaxbn", "jaxbn[xla]", "flax.linen")
SETTINGS = ("default", "keep_heap", "tunables")
OUT = os.path.join(BENCH, "results", "studies")


def probe(setting: str, shapes, rounds: int) -> dict:
    """Times both harnesses for every peer and shape in this process."""
    kept = None
    if setting == "keep_heap":
        import jaxbn.cpu_memory

        kept = jaxbn.cpu_memory.keep_heap()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bn_layer
    import layer
    import peers
    from jaxbn import _hlo

    out = {"setting": setting, "keep_heap": kept, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "rows": {}}
    for name in shapes:
        shape = bn_layer.SHAPES[name]
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
        dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
        c = shape[-1]
        s, b = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32), jnp.asarray(rng.normal(size=c), jnp.float32)
        fns, traffic = {}, {}
        for peer in PEERS:
            for harness, make in (("vjp", peers.train_step_fn), ("grad", layer.grad_fn)):
                f = make(peer, x)
                text = f.lower(x, dy, s, b).compile().as_text()
                traffic[f"{peer} {harness}"] = _hlo.traffic_bytes(text, x.size // 2) / x.size
                for _ in range(3):  # warm: compile, and let the allocator reach its working set
                    jax.block_until_ready(f(x, dy, s, b))
                fns[f"{peer} {harness}"] = f
        t0 = time.perf_counter()
        jax.block_until_ready(fns["flax.linen vjp"](x, dy, s, b))
        reps = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-4)))
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    o = f(x, dy, s, b)
                jax.block_until_ready(o)
                times[k].append((time.perf_counter() - t0) / reps * 1e3)
        row = {}
        for k, ts in times.items():
            harness = k.split()[-1]
            ref = np.asarray(times[f"flax.linen {harness}"])
            row[k] = {"ms": float(np.median(ts)), "x_flax": float(np.median(ref / np.asarray(ts))),
                      "traffic_bytes_per_element": traffic[k]}
        out["rows"][name] = row
        print(f"  {setting:9s} {name:10s} " + "  ".join(f"{k} {v['ms']:.2f}" for k, v in row.items()),
              file=sys.stderr, flush=True)
    return out


def main(argv=None):
    import bn_layer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(bn_layer.SHAPES), default=list(bn_layer.SHAPES))
    ap.add_argument("--passes", type=int, default=2, help="passes over the settings (alternating)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape in each process")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--probe", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.shapes, args.rounds)))
        return

    env0 = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXBN_BENCH_NO_REEXEC")}
    env0["XLA_FLAGS"] = " ".join(f for f in env0.get("XLA_FLAGS", "").split()
                                 if "force_host_platform_device_count" not in f)
    env = _common.environment()
    runs = []
    for p in range(args.passes):
        for setting in SETTINGS:
            e = dict(env0)
            if setting == "tunables":
                e["GLIBC_TUNABLES"] = _common.RECOMMENDED_GLIBC_TUNABLES
            cmd = [sys.executable, __file__, "--probe", setting, "--rounds", str(args.rounds), "--shapes", *args.shapes]
            r = subprocess.run(cmd, env=e, stdout=subprocess.PIPE, text=True)
            if r.returncode != 0:
                sys.exit(f"fused_loss.py: error: the {setting} probe exited {r.returncode}")
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    import numpy as np

    summary = {}
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        for name in args.shapes:
            for k in mine[0]["rows"][name]:
                vals = [r["rows"][name][k] for r in mine]
                summary.setdefault(setting, {}).setdefault(name, {})[k] = {
                    "ms": float(np.median([v["ms"] for v in vals])),
                    "x_flax": float(np.median([v["x_flax"] for v in vals])),
                    "traffic_bytes_per_element": vals[0]["traffic_bytes_per_element"]}
    medians = {setting: {k: float(np.median([summary[setting][n][k]["x_flax"] for n in args.shapes]))
                         for k in summary[setting][args.shapes[0]]} for setting in SETTINGS}
    env["loadavg_end"] = _common.loadavg()
    result = {"command": "python benchmarks/studies/fused_loss.py " + " ".join(argv or sys.argv[1:]),
              "environment": env, "settings": {"tunables": _common.RECOMMENDED_GLIBC_TUNABLES},
              "summary": summary, "median_x_flax_over_shapes": medians, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fused_loss.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = [f"Command: `{result['command'].strip()}`; {env['date_utc']}; {env['cpu']['model_name']}, "
          f"{env['cpu']['logical_cpus']} logical CPUs; load {env.get('loadavg_start')} at start, "
          f"{env['loadavg_end']} at end. ms per call (median over passes of per-process medians), "
          "× flax.linen in the same harness and process, and HLO traffic in bytes per element of x.", ""]
    header = ["setting", "shape"] + [f"{p} {h}" for h in ("vjp", "grad") for p in PEERS]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in SETTINGS:
        for name in args.shapes:
            cells = [summary[setting][name][f"{p} {h}"] for h in ("vjp", "grad") for p in PEERS]
            md.append(f"| {setting} | {name} | " + " | ".join(
                f"{c['ms']:.2f} (×{c['x_flax']:.2f}, {c['traffic_bytes_per_element']:.0f} B)" for c in cells) + " |")
    md += ["", "Median over shapes of × flax.linen:", ""]
    for setting in SETTINGS:
        md.append(f"- {setting}: " + ", ".join(f"{k} ×{v:.2f}" for k, v in medians[setting].items()
                                                if not k.startswith("flax")))
    with open(os.path.join(args.out, "fused_loss.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
