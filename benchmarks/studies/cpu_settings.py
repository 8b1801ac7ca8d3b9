r"""What governs JAX's CPU speed here: allocator and XLA settings, one process per setting.

  python benchmarks/studies/cpu_settings.py                 # every setting, 2 rounds (~10 min)
  python benchmarks/studies/cpu_settings.py --settings default heap --rounds 3
  python benchmarks/studies/cpu_settings.py --train-py      # also time whole train.py runs

Environment variables such as GLIBC_TUNABLES, LD_PRELOAD and XLA_FLAGS act at
process start, so each setting runs in a fresh process (this script with
``--probe``). The settings alternate round by round (default, A, B, ..., default,
A, B, ...) so a slow spell of the shared machine is spread over all of them; the
table gives per-setting medians over rounds and the ratio to `default` of the same
round.

The probe measures, each in steady state (after 12 warm-up calls, so the
allocator has reached its working set):
  fresh_copy_52MB  y = -x into a newly allocated 52 MB output (what XLA does for
                   every non-donated output)
  bn_*             one BN layer, training forward+backward (bn_layer.py's
                   protocol), jaxbn.linen and flax.linen
  *_ips            train-step images/s (train_step.py's protocol), CNN and ResNet-20

`--train-py` also times `python train.py --config configs/default.py` for a short
run (200 steps of the CNN) under `default` and the recommended setting,
alternating, as whole processes (start-up, compilation, data, checkpoints).
Results: benchmarks/results/studies/cpu_settings.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _common and the other shared modules

import _common  # noqa: E402

LIB = "/usr/lib/x86_64-linux-gnu"
BIG = "4294967296"  # 4 GiB
SETTINGS = {
    "default": {},
    # Transparent huge pages for malloc'd memory: 512x fewer page faults.
    "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    # What the issue tried: raise the mmap threshold (glibc caps it at 32 MiB on 64-bit).
    "mmap_threshold": {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold={BIG}"},
    # Never mmap, never trim, one arena: big buffers are recycled from the heap.
    "heap": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={BIG}"},
    "heap+thp": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                                   f"glibc.malloc.trim_threshold={BIG}:glibc.malloc.hugetlb=1"},
    # The recommended setting with jaxbn's one-sweep CPU kernels turned off (jaxbn/cpu_kernel.py).
    "heap+xla": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={BIG}",
                 "JAXBN_CPU_KERNEL": "0"},
    "heap_2arenas": {"GLIBC_TUNABLES": f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={BIG}"},
    "jemalloc": {"LD_PRELOAD": f"{LIB}/libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": f"{LIB}/libtcmalloc_minimal.so.4"},
    "heap+1thread": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                                       f"glibc.malloc.trim_threshold={BIG}",
                     "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
}


def available(name):
    pre = SETTINGS[name].get("LD_PRELOAD")
    return pre is None or os.path.exists(pre)


# ----------------------------------------------------------------------------
# The probe (runs inside the process under test).


def probe(quick: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import peers
    import train_step

    out = {"loadavg": _common.loadavg()}
    # 1. A fresh 52 MB output, steady state.
    x = jnp.ones((13 * 2**20,), jnp.float32)
    neg = jax.jit(lambda a: -a)
    ts = _common.interleave({"neg": lambda: neg(x)}, rounds=15, warmup=12)["neg"]
    out["fresh_copy_52MB_s"] = float(np.median(ts))
    del x

    # 2. The BN layer, training fwd+bwd.
    for name, shape in (("dram56", (64, 56, 56, 64)), ("cnn", (128, 26, 26, 32))):
        xx = jax.random.normal(jax.random.key(0), shape)
        dy = jax.random.normal(jax.random.key(1), shape)
        s = jnp.ones((shape[-1],))
        b = jnp.zeros((shape[-1],))
        cands = {}
        for p in ("jaxbn.linen", "flax.linen"):
            f = peers.train_step_fn(p, xx, donate=False)
            cands[p] = (lambda f=f: (lambda: f(xx, dy, s, b)))()
        calls = 1 if name == "dram56" else 3
        r = _common.interleave(cands, rounds=5 if quick else 9, calls=calls, warmup=12)
        for p, t in r.items():
            out[f"bn_{name}_{p}_s"] = float(np.median(t))

    # 3. Train steps.
    res = train_step.measure(["cnn", "resnet20"], ["jaxbn", "flax"], rounds=3 if quick else 4,
                             steps={"cnn": 10, "resnet20": 1}, budget_s=30, warmup=2)
    for m, r in res.items():
        for n, v in r.items():
            out[f"{m}_{n}_ips"] = v["images_per_s_median"]
    out["loadavg_end"] = _common.loadavg()
    print("PROBE " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------
# The driver.


def setting_env(name):
    """This process's environment with setting `name` in place of any of the settings' variables."""
    env = dict(os.environ)
    for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "XLA_FLAGS", "JAXBN_CPU_KERNEL"):
        env.pop(k, None)
    env.update(SETTINGS[name])
    return env


def run_setting(name, quick):
    env = setting_env(name)
    env["JAXBN_BENCH_NO_REEXEC"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--probe"] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            d = json.loads(line[6:])
            d["process_wall_s"] = wall
            return d
    print(f"setting {name} failed (rc {r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
    return None


def run_train_py(name, steps, workdir_root):
    env = setting_env(name)
    wd = tempfile.mkdtemp(prefix=f"train_{name}_", dir=workdir_root)
    cmd = [sys.executable, os.path.join(_common.ROOT, "train.py"), "--config",
           os.path.join(_common.ROOT, "configs", "default.py"), f"--config.num_train_steps={steps}",
           "--config.progress_bar=False", "--config.test_examples=2000", f"--workdir={wd}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=_common.ROOT)
    wall = time.perf_counter() - t0
    shutil.rmtree(wd, ignore_errors=True)
    ips = None
    for line in (r.stdout + r.stderr).splitlines():
        if "images/s" in line and "Final test accuracy" in line:
            try:
                ips = float(line.split(" images/s")[0].rsplit(";", 1)[1].strip())
            except (ValueError, IndexError):
                pass
    return {"wall_s": wall, "rc": r.returncode, "images_per_s_reported": ips,
            "tail": (r.stdout + r.stderr)[-400:] if r.returncode else ""}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer rounds inside each probe")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-py", action="store_true", help="also time whole train.py runs")
    ap.add_argument("--train-py-only", action="store_true", help="only the train.py runs")
    ap.add_argument("--train-py-steps", type=int, default=200)
    ap.add_argument("--train-py-rounds", type=int, default=2)
    ap.add_argument("--recommended", default="heap", choices=list(SETTINGS))
    ap.add_argument("--train-py-settings", nargs="+", choices=list(SETTINGS),
                    help="settings to time train.py under (default: default and --recommended)")
    ap.add_argument("--tag", default="cpu_settings", help="results file stem")
    args = ap.parse_args(argv)
    if args.probe:
        probe(args.quick)
        return 0

    import numpy as np

    env = _common.environment()
    print(f"# cpu_settings: {env['cpu']['model_name']}, load {env['loadavg_start']}", flush=True)
    names = [n for n in args.settings if available(n)]
    if "default" not in names:
        names.insert(0, "default")
    runs = {n: [] for n in names}
    if not args.train_py_only:
        for r in range(args.rounds):
            for n in names:
                d = run_setting(n, args.quick)
                if d:
                    runs[n].append(d)
                    print(f"round {r} {n:14s} " + " ".join(
                        f"{k}={v:.4g}" for k, v in d.items() if isinstance(v, float)), flush=True)
    keys = sorted({k for v in runs.values() for d in v for k in d if isinstance(d[k], float)})
    summary = {}
    for n, ds in runs.items():
        if not ds:
            continue
        summary[n] = {k: float(np.median([d[k] for d in ds if k in d])) for k in keys}
        # ratio to default of the same round (speed-up: > 1 is better)
        rat = {}
        for k in keys:
            if k in ("process_wall_s",) or k.startswith("loadavg"):
                continue
            pairs = [(d[k], base[k]) for d, base in zip(ds, runs["default"]) if k in d and k in base]
            if pairs:
                better_high = k.endswith("_ips")
                rat[k] = float(np.median([a / b if better_high else b / a for a, b in pairs]))
        summary[n]["speedup_vs_default"] = rat

    train_py = {}
    if args.train_py or args.train_py_only:
        root = tempfile.mkdtemp(prefix="jaxbn_trainpy_")
        for r in range(args.train_py_rounds):
            for n in args.train_py_settings or ("default", args.recommended):
                d = run_train_py(n, args.train_py_steps, root)
                train_py.setdefault(n, []).append(d)
                print(f"train.py round {r} {n}: {d['wall_s']:.1f} s, rc {d['rc']}, "
                      f"reported {d['images_per_s_reported']} images/s {d['tail']}", flush=True)
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    cols = [("fresh_copy_52MB_s", "fresh 52MB output"), ("bn_dram56_jaxbn.linen_s", "BN 64×56×56×64 jaxbn"),
            ("bn_dram56_flax.linen_s", "BN 64×56×56×64 flax"), ("bn_cnn_jaxbn.linen_s", "BN 128×26×26×32 jaxbn"),
            ("cnn_jaxbn_ips", "CNN step jaxbn"), ("cnn_flax_ips", "CNN step flax"),
            ("resnet20_jaxbn_ips", "ResNet-20 step jaxbn"), ("resnet20_flax_ips", "ResNet-20 step flax")]
    for n, s in summary.items():
        row = [n, "; ".join(f"{k}={v}" for k, v in SETTINGS[n].items()) or "(glibc defaults)"]
        for k, _ in cols:
            if k not in s:
                row.append("")
                continue
            v = s[k]
            val = f"{v:.0f}/s" if k.endswith("_ips") else f"{v * 1e3:.1f} ms"
            row.append(f"{val} (×{s['speedup_vs_default'].get(k, float('nan')):.2f})")
        rows.append(row)
    table = _common.fmt_table(["setting", "environment"] + [c for _, c in cols], rows) if rows else ""
    tp_table = ""
    if train_py:
        tp_rows = [[n, f"{np.median([d['wall_s'] for d in ds]):.1f} s",
                    ", ".join(f"{d['wall_s']:.1f}" for d in ds),
                    ", ".join(str(d['images_per_s_reported']) for d in ds)] for n, ds in train_py.items()]
        tp_table = _common.fmt_table(["setting", "train.py wall (median)", "each run (s)", "images/s reported"],
                                     tp_rows)
    print(table)
    print(tp_table)
    path = _common.save_json(f"studies/{args.tag}.json", {"environment": env, "settings": SETTINGS, "runs": runs,
                                                   "summary": summary, "train_py": train_py,
                                                   "train_py_steps": args.train_py_steps, "table": table,
                                                   "train_py_table": tp_table})
    _common.save_text(f"studies/{args.tag}.md",
                      f"Command: `{_common.command()}`; load average {env['loadavg_start']} at start.\n\n"
                      f"Times are medians over rounds; (×r) = speed-up over `default` in the same round.\n\n"
                      f"{table}\n\n{tp_table}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
