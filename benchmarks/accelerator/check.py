r"""jaxbn on whatever accelerator JAX finds: correctness, BN-layer speed against the peers, training, results.

  bash scripts/accelerator_check.sh [--quick] [--out DIR]     # (this file's front door)

Each part runs in a process of its own (one JAX client at a time, a crash or a
time-out costs only that part), in this order:

1. ``oracle``: a built-in check against the float64 NumPy oracle (tests/oracle.py)
   on the default backend, needing no pytest: float32, bfloat16, masks, mean 1e4,
   gradients, the Linen module, all devices under shard_map; plus what the
   compiled training step contains (custom calls, optimization barriers) and
   whether ``jax.export`` of it for several platforms works.
2. ``pytest-1dev``: the core's oracle tests and the Linen/NNX modules
   (tests/test_batch_norm.py, test_linen.py, test_nnx.py) on one device;
   ``pytest-ndev``: the multi-device tests (tests/test_sync.py and the ``ndev``
   tests) on every device the machine has (on a CPU: 8 virtual devices, as the
   test suite does). Skipped, saying so, when pytest is not installed.
3. ``layer``: layer.py (one BN layer, training and evaluation, float32 and bf16,
   jaxbn vs Flax Linen / NNX / Equinox, both harnesses, the copy roofline);
   ``torch``: torch_device.py (PyTorch's BatchNorm2d, cuDNN on a GPU) in its own
   process when torch is importable (on a CPU: full mode only).
4. ``train_step`` and ``train_py``: training.py (train-step images/s of the CNN and
   ResNet-20, norm=jaxbn vs norm=flax; train.py runs).

Results: ``benchmarks/results/<device-kind>/accelerator_check[_quick].{json,md}``
(``--out DIR`` elsewhere), and a one-screen summary on stdout. Exit status 1 when
a check failed, a correctness part timed out or a part crashed; 0 otherwise (skips
and benchmark time-outs, whose partial results are kept, are reported, not failures).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from common import _common  # noqa: E402

ROOT = common.ROOT
PY = sys.executable

# Tests of the one-device pytest part in --quick mode (-k expression): oracle, dtypes, masks, large mean, grads.
QUICK_1DEV_K = ("jvp or training_matches_oracle or low_precision or large_mean or (matches_flax_train and default) "
                "or (train_eval_and_grads and default)")
QUICK_NDEV_K = "parallel_equals_global_batch or large_mean or masks_across_devices"
NDEV_TESTS = ["tests/test_sync.py", "tests/test_batch_norm.py::test_large_mean_variance_is_exact_on_first_step",
              "tests/test_linen.py::test_masks_across_devices_are_exact_where_flax_is_not"]
# Time limits (seconds) per part, and the budget after which no part starts ("accel": a GPU or TPU).
LIMITS = {
    ("cpu", "full"): dict(budget=840, oracle=120, pytest1=240, pytestn=180, layer=420, torch=150, train_step=300,
                          train_py=200),
    ("cpu", "quick"): dict(budget=170, oracle=60, pytest1=75, pytestn=50, layer=70, torch=0, train_step=45,
                           train_py=50),
    ("accel", "full"): dict(budget=450, oracle=90, pytest1=150, pytestn=90, layer=200, torch=75, train_step=90,
                            train_py=75),
    ("accel", "quick"): dict(budget=240, oracle=60, pytest1=90, pytestn=60, layer=75, torch=40, train_step=45,
                             train_py=45),
}
ONE_DEV_TESTS = ["tests/test_batch_norm.py", "tests/test_linen.py", "tests/test_nnx.py"]


# ---------------------------------------------------------------------------------------------
# Part "oracle" (runs in a child process: python check.py --part oracle --part-out F)


def oracle_part() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from oracle import RTOL, np_batch_norm, np_ema, np_grads, np_moments, rel_err  # tests/oracle.py

    import jaxbn
    import jaxbn.cpu_kernel
    from jaxbn import _hlo

    platform = jax.devices()[0].platform
    checks = []

    def record(name, err, tol, extra=None):
        ok = bool(np.isfinite(err) and err < tol)
        checks.append(dict(name=name, rel_err=float(err), tol=tol, ok=ok, **(extra or {})))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)

    def data(shape, mean=1.0, std=2.0, seed=0):
        rng = np.random.default_rng(seed)
        return (rng.normal(size=shape) * std + mean).astype(np.float32)

    def guarded(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (a crash is a failed check, the others still run)
            checks.append(dict(name=name, ok=False, error=f"{type(e).__name__}: {str(e)[:500]}"))
            print(f"  FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    shape, C = (6, 3, 4, 5), 5
    params = {"scale": data((C,), 1.0, 0.3, 1), "bias": data((C,), 0.0, 1.0, 2)}
    st0 = jaxbn.BatchNormState(mean=data((C,), 0, 1, 5), var=np.abs(data((C,), 1, 0.3, 6)), count=np.int32(5))
    w = data(shape, 0.0, 1.0, 4)

    def training(masked):
        x = data(shape)
        mask = (np.random.default_rng(3).uniform(size=shape) < 0.6) if masked else None

        def loss(x, p):
            y, st = jaxbn.batch_norm(x, p, st0, training=True, momentum=0.8, mask=mask)
            return jnp.sum(w * y), (y, st)

        (_, (y, st)), (dx, dp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
        assert list(y.devices())[0].platform == platform, y.devices()
        y_ref, mean, var, n = np_batch_norm(x, params["scale"], params["bias"], mask)
        m_ref, v_ref = np_ema(st0.mean, st0.var, mean, var, n, 0.8)
        tag = "masked" if masked else "f32"
        record(f"train {tag} y", rel_err(y, y_ref), RTOL["float32"] * 10)
        record(f"train {tag} running mean/var", max(rel_err(st.mean, m_ref), rel_err(st.var, v_ref)),
               RTOL["float32"] * 10)
        dx_ref, ds_ref, db_ref = np_grads(x, params["scale"], params["bias"], w, mask)
        record(f"train {tag} gradients (x, scale, bias)",
               max(rel_err(dx, dx_ref), rel_err(dp["scale"], ds_ref), rel_err(dp["bias"], db_ref)), 1e-4)
        ye, _ = jax.jit(lambda x: jaxbn.batch_norm(x, params, st, training=False))(x)
        bshape = (1, 1, 1, C)
        ye_ref = ((x - np.asarray(st.mean).reshape(bshape)) / np.sqrt(np.asarray(st.var).reshape(bshape) + 1e-5)
                  * params["scale"] + params["bias"])
        record(f"eval {tag} y", rel_err(ye, ye_ref), RTOL["float32"] * 10)

    def bf16():
        x = jnp.asarray(data((16, 2, 6), mean=3.0, std=2.0), jnp.bfloat16)
        p6 = {"scale": data((6,), 1, 0.3, 1), "bias": data((6,), 0, 1, 2)}
        y, st = jax.jit(lambda x: jaxbn.batch_norm(x, p6, jaxbn.init_state(6), training=True, momentum=0.0))(x)
        assert y.dtype == jnp.bfloat16 and st.var.dtype == jnp.float32
        xd = np.asarray(x.astype(jnp.float32), np.float64)
        y_ref, mean, var, _ = np_batch_norm(xd, p6["scale"], p6["bias"])
        record("bf16 y", rel_err(y.astype(jnp.float32), y_ref), RTOL["bfloat16"])
        record("bf16 float32 statistics", max(rel_err(st.mean, mean), rel_err(st.var, var)), RTOL["float32"] * 10)
        g = jax.jit(jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, p6, st, training=True)[0]
                                               .astype(jnp.float32) ** 2)))(x)
        assert g.dtype == jnp.bfloat16
        record("bf16 gradient finite", 0.0 if bool(jnp.all(jnp.isfinite(g))) else np.inf, 1.0)

    def large_mean():
        x = data((64, 4, 4), mean=1e4, std=1.0, seed=7)
        _, var_ref, _ = np_moments(x)
        st = jax.jit(lambda x: jaxbn.batch_norm(x, None, jaxbn.init_state(4), training=True, momentum=0.0)[1])(x)
        record("mean 1e4, std 1: variance", rel_err(st.var, var_ref), 1e-4)

    def linen():
        import flax.linen as nn

        from jaxbn.linen import BatchNorm

        x = data((8, 4, 4, 3))
        outs = []
        for cls in (BatchNorm, nn.BatchNorm):
            m = cls(use_running_average=False, momentum=0.9, use_fast_variance=False) if cls is nn.BatchNorm \
                else cls(use_running_average=False, momentum=0.9)
            v = m.init(jax.random.key(0), x)
            outs.append(jax.jit(lambda v, x, m=m: m.apply(v, x, mutable=["batch_stats"]))(v, x))
        (y1, s1), (y2, s2) = outs
        record("jaxbn.linen vs flax.linen (train y, stats)",
               max(rel_err(y1, y2), rel_err(s1["batch_stats"]["var"], s2["batch_stats"]["var"])), 1e-5)

    def all_devices():
        n = jax.device_count()
        x = data((n * 4, 3, 5), mean=2.0, std=1.5, seed=9)
        mesh = jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
        p5 = {"scale": data((5,), 1, 0.3, 1), "bias": data((5,), 0, 1, 2)}
        w5 = data(x.shape, 0.0, 1.0, 4)

        def local(x, w):
            def loss(x, p):
                y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(5), training=True, momentum=0.0, axis_name="d")
                return jax.lax.psum(jnp.sum(w * y), "d"), (y, st)

            (_, (y, st)), (dx, dp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p5)
            return y, st.var, dx, jax.lax.psum(dp["scale"], "d")

        f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P("d"), P(), P("d"), P())))
        y, var, dx, ds = f(x, w5)
        y_ref, _, var_ref, _ = np_batch_norm(x, p5["scale"], p5["bias"])
        dx_ref, ds_ref, _ = np_grads(x, p5["scale"], p5["bias"], w5)
        record(f"shard_map over {n} device(s): y, variance", max(rel_err(y, y_ref), rel_err(var, var_ref)), 1e-4)
        record(f"shard_map over {n} device(s): gradients", max(rel_err(dx, dx_ref), rel_err(ds, ds_ref)), 1e-4)

    guarded("train f32", lambda: training(False))
    guarded("train masked", lambda: training(True))
    guarded("bf16", bf16)
    guarded("large mean", large_mean)
    if importlib.util.find_spec("flax") is not None:
        guarded("linen", linen)
    guarded("all devices", all_devices)

    notes = []

    def jvp():
        x = data(shape)
        t = data(shape, 0.0, 1.0, 8)

        def f(x):
            return jaxbn.batch_norm(x, params, st0, training=True)[0]

        try:
            _, ty = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
        except Exception as e:  # noqa: BLE001  (forward mode not supported yet: a note, not a failure)
            notes.append(f"jax.jvp of the training layer: not supported here ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})")
            print(f"  note: {notes[-1]}", flush=True)
            return
        h = 1e-4
        x64, t64 = x.astype(np.float64), t.astype(np.float64)  # x ± h·t rounded to float32 would be off by 1e-3
        ref = (np_batch_norm(x64 + h * t64, params["scale"], params["bias"])[0]
               - np_batch_norm(x64 - h * t64, params["scale"], params["bias"])[0]) / (2 * h)
        record("jvp of the training layer (finite differences)", rel_err(ty, ref), 1e-3)

    guarded("jvp", jvp)

    # ---- what the compiled program contains, and jax.export
    program = {}

    def inspect_program():
        x = jnp.asarray(data((32, 8, 8, 16)))
        p16 = jaxbn.init_params(16)

        def step(x, p):
            def loss(x, p):
                y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(16), training=True)
                return jnp.sum(y * y), st

            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)

        text = jax.jit(step).lower(x, p16).compile().as_text()
        cc = dict(_hlo.custom_calls(text))
        cpu_cc = {k: v for k, v in cc.items() if k.startswith("jaxbn_")}
        program.update(platform=platform, custom_calls=cc, jaxbn_cpu_custom_calls=cpu_cc,
                       opt_barriers=_hlo.count_ops(text, "opt-barrier"), kernels=len(_hlo.kernels(text)))
        if platform != "cpu":
            checks.append(dict(name="no jaxbn CPU custom call in the device program", ok=not cpu_cc,
                               found=cpu_cc))
            print(f"  {'ok  ' if not cpu_cc else 'FAIL'} no jaxbn CPU custom call in the {platform} program: "
                  f"{cpu_cc or 'none'}; opt-barriers: {program['opt_barriers']}", flush=True)
        exports = {}

        def export(plats, label):
            try:
                exp = jax.export.export(jax.jit(step), platforms=plats)(x, p16)
            except Exception as e:  # noqa: BLE001  (a clear refusal is an acceptable answer; recorded as is)
                exports[label] = f"refused: {type(e).__name__}: {' '.join(str(e).splitlines()[:2])[:400]}"
                return
            try:  # serialization needs the optional flatbuffers package
                exports[label] = f"ok ({len(exp.serialize())} bytes serialized)"
            except ImportError as e:
                exports[label] = f"ok (exported; not serialized: {str(e).splitlines()[0][:120]})"

        for plats in (("cpu",), ("cuda",), ("cpu", "cuda"), ("cpu", "cuda", "tpu")):
            export(plats, "+".join(plats))
        with jaxbn.cpu_kernel.use("0"):  # the README's advice for a CPU export of a training step
            for plats in (("cpu",), ("cpu", "cuda")):
                export(plats, "+".join(plats) + " (JAXBN_CPU_KERNEL=0)")
        program["jax_export"] = exports
        # The same step lowered (not compiled) for other platforms from here: jaxbn's CPU custom calls
        # and optimization barriers in a GPU/TPU program are what the issue forbids.
        cross = {}
        for plat in ("cpu", "cuda", "rocm", "tpu"):
            try:
                text = jax.jit(step).trace(x, p16).lower(lowering_platforms=(plat,)).as_text()
                found = sorted(set(re.findall(r"custom_call @(jaxbn_\w+)", text)))
                nbar = text.count("optimization_barrier")
                cross[plat] = (f"jaxbn CPU custom calls {found}" if found else "no jaxbn CPU custom call") + \
                    f", {nbar} optimization barrier(s)"
            except Exception as e:  # noqa: BLE001
                cross[plat] = f"cannot lower: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        program["lowered_for"] = cross
        print(f"  program: custom calls {cc or 'none'}, opt-barriers {program['opt_barriers']}, "
              f"kernels {program['kernels']}", flush=True)
        for k, v in exports.items():
            print(f"  jax.export for {k}: {v[:150]}", flush=True)
        for k, v in cross.items():
            print(f"  lowered from here for {k}: {v}", flush=True)

    guarded("compiled program", inspect_program)
    return {"platform": platform, "device_count": jax.device_count(), "checks": checks, "program": program,
            "notes": notes,
            "passed": sum(c["ok"] for c in checks), "failed": sum(not c["ok"] for c in checks)}


# ---------------------------------------------------------------------------------------------
# The orchestrator


def parse_junit(path: str) -> dict:
    root = ET.parse(path).getroot()
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for tc in root.iter("testcase"):
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        sk = tc.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": tid, "message": (bad.get("message") or "")[:500]})
        elif sk is not None:
            out["skipped"] += 1
            reason = (sk.get("message") or "").strip()
            out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    return out


class Runner:
    def __init__(self, args, env, tmp):
        self.args, self.env, self.tmp = args, env, tmp
        self.parts = {}
        self.t_start = time.perf_counter()

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def child(self, name, cmd, timeout, *, env_extra=None, capture=False, cwd=ROOT):
        """Runs cmd; returns (status, seconds, text or None). status: ok / failed / timeout / out-of-time."""
        timeout = min(timeout, self.left())
        if timeout < 10:
            self.parts[name] = {"status": "skipped", "reason": "out of the time budget (--budget-s)"}
            print(f"[{name}] skipped: out of the time budget", flush=True)
            return "skipped", 0.0, None
        env = dict(self.env, **(env_extra or {}))
        shown = " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(ROOT) else c for c in cmd[1:])
        print(f"[{name}] {shown}"
              f"  (limit {timeout:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, text=True,
                               stdout=subprocess.PIPE if capture else None,
                               stderr=subprocess.STDOUT if capture else None)
            status, text = ("ok" if r.returncode == 0 else "failed"), r.stdout
            rc = r.returncode
        except subprocess.TimeoutExpired as e:
            status, text, rc = "timeout", e.stdout if isinstance(e.stdout, str) else None, None
        dt = time.perf_counter() - t0
        self.parts[name] = {"status": status, "wall_s": round(dt, 1), "returncode": rc}
        print(f"[{name}] {status} in {dt:.0f} s", flush=True)
        return status, dt, text

    def json_part(self, name, cmd, timeout, out_flag="--out", **kw):
        """Runs a part that writes its results to a JSON file; returns them (None if it wrote none)."""
        out = os.path.join(self.tmp, f"{name}.json")
        status, _, text = self.child(name, cmd + [out_flag, out], timeout, **kw)
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        if status not in ("ok", "skipped") and text:
            self.parts[name]["tail"] = text[-3000:]
        return None


def pytest_part(runner: Runner, name: str, targets, kexpr, env_extra, timeout) -> dict:
    junit = os.path.join(runner.tmp, f"{name}.xml")
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o",
           "junit_family=xunit1", *targets]
    if kexpr:
        cmd += ["-k", kexpr]
    status, dt, text = runner.child(name, cmd, timeout, env_extra=env_extra, capture=True)
    res = {"command": " ".join(["python"] + cmd[1:4] + cmd[5:]), "env": env_extra, "status": status,
           "wall_s": round(dt, 1)}
    if os.path.exists(junit):
        res.update(parse_junit(junit))
    last = [ln for ln in (text or "").splitlines() if ln.strip()]
    res["last_line"] = last[-1] if last else None
    if status not in ("ok", "skipped") and not res.get("failures"):
        res["tail"] = (text or "")[-3000:]
    if status == "ok" or res.get("failed"):
        runner.parts[name]["status"] = "ok" if not res.get("failed") else "failed"
    print(f"  {res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped; "
          + "; ".join(f"skipped {n}: {r}" for r, n in res.get("skip_reasons", {}).items()), flush=True)
    for f in res.get("failures", [])[:10]:
        print(f"  FAILED {f['test']}: {f['message'][:200]}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tests, shapes and rounds (about 3 min on a CPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device-kind>/)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["oracle", "pytest", "layer", "torch", "train_step",
                                                              "train_py"], help="parts to leave out")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting parts after this many seconds (default 840, quick 170)")
    ap.add_argument("--part", choices=["oracle"], help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part == "oracle":
        common.write_json(args.part_out, oracle_part())
        return 0
    t_start = time.perf_counter()
    mode = "quick" if args.quick else "full"

    env = dict(os.environ)
    # The device count is this script's choice (one device, then all; 8 virtual ones on a CPU), not the caller's.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    if not env["XLA_FLAGS"]:
        del env["XLA_FLAGS"]
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAXBN_BENCH_NO_REEXEC"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    tmp = tempfile.mkdtemp(prefix="jaxbn_accel_")

    # ---- the device
    print(f"# jaxbn accelerator check ({mode}), python {PY}", flush=True)
    r = subprocess.run([PY, "-c", "import json, sys; sys.path.insert(0, %r); import common; "
                        "print('PROBE' + json.dumps(common.probe(), default=str))" % HERE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
    if r.returncode != 0 or not line:
        print(f"cannot start JAX here:\n{r.stderr[-3000:]}", flush=True)
        return 2
    probe = json.loads(line[0][5:])
    platform, ndev = probe["platform"], probe["device_count"]
    if platform == "cpu" and "GLIBC_TUNABLES" not in env:
        env["GLIBC_TUNABLES"] = _common.RECOMMENDED_GLIBC_TUNABLES  # the CPU setting of benchmarks/README.md
    lim = LIMITS[("cpu" if platform == "cpu" else "accel", mode)]
    if args.budget_s is None:
        args.budget_s = float(lim["budget"])
    kind = common.slug(probe["device_kind"])
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", kind)
    print(f"# {ndev} x {probe['device_kind']} ({platform}; {probe.get('platform_version', '')!s:.80}); "
          f"jax {probe['versions'].get('jax')}, jaxlib {probe['versions'].get('jaxlib')}, "
          f"flax {probe['versions'].get('flax')}; load average {probe['loadavg']}", flush=True)
    runner = Runner(args, env, tmp)
    results = {"command": "bash scripts/accelerator_check.sh" + (" --quick" if args.quick else ""),
               "mode": mode, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "environment": probe, "settings": {"budget_s": args.budget_s, "skip": args.skip,
                                                  "child_env": {k: env.get(k) for k in ("GLIBC_TUNABLES", "XLA_FLAGS",
                                                                                        "PYTHONPATH")}},
               "parts": runner.parts, "notes": []}
    if platform == "cpu":
        results["notes"].append("XLA:CPU on a shared machine: other engineers' tests ran concurrently, so absolute "
                                "times swing between runs; only same-round ratios (interleaved candidates) are "
                                "meaningful. The speed goals are for accelerators.")
    no_prealloc = {} if platform == "cpu" else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    # ---- 1. correctness
    if "oracle" not in args.skip:
        results["oracle"] = runner.json_part("oracle", [PY, os.path.join(HERE, "check.py"), "--part", "oracle"],
                                             lim["oracle"], out_flag="--part-out", env_extra=no_prealloc)
        if results["oracle"] and results["oracle"]["failed"]:
            runner.parts["oracle"]["status"] = "failed"
            print(f"[oracle] {results['oracle']['failed']} check(s) FAILED", flush=True)
    if "pytest" not in args.skip:
        if importlib.util.find_spec("pytest") is None:
            msg = "pytest is not installed in this Python: the test-suite part is skipped (the built-in oracle ran)"
            print(f"[pytest] {msg}", flush=True)
            runner.parts["pytest-1dev"] = runner.parts["pytest-ndev"] = {"status": "skipped", "reason": msg}
        else:
            xla = env.get("XLA_FLAGS", "")
            one = dict(no_prealloc)
            if platform == "cpu":
                one["XLA_FLAGS"] = (xla + " --xla_force_host_platform_device_count=1").strip()
            results["pytest_1dev"] = pytest_part(runner, "pytest-1dev", ONE_DEV_TESTS,
                                                 QUICK_1DEV_K if args.quick else None, one, lim["pytest1"])
            if platform == "cpu":
                many = dict(XLA_FLAGS=(xla + " --xla_force_host_platform_device_count=8").strip())
                results["notes"].append("multi-device tests on the CPU: 8 virtual devices "
                                        "(--xla_force_host_platform_device_count=8), as the test suite runs them")
            else:
                many = dict(no_prealloc)
            if platform != "cpu" and ndev < 2:
                msg = (f"only {ndev} {platform} device: the multi-device tests need 8 devices "
                       f"(tests/test_sync.py NDEV = 8); the built-in check ran shard_map over 1 device")
                print(f"[pytest-ndev] skipped: {msg}", flush=True)
                runner.parts["pytest-ndev"] = {"status": "skipped", "reason": msg}
            else:
                results["pytest_ndev"] = pytest_part(runner, "pytest-ndev", NDEV_TESTS,
                                                     QUICK_NDEV_K if args.quick else None, many, lim["pytestn"])

    # ---- 2. speed of one layer
    import layer

    lp = layer.plan(platform, args.quick)
    if "layer" not in args.skip:
        t = min(lim["layer"], runner.left())
        results["layer"] = runner.json_part("layer", [PY, os.path.join(HERE, "layer.py"), "--budget-s",
                                                      str(round(max(15.0, t - 25.0)))] +
                                            (["--quick"] if args.quick else []), t)
    if "torch" not in args.skip:
        if importlib.util.find_spec("torch") is None:
            reason = "torch is not installed"
        elif platform == "cpu" and args.quick:
            reason = "CPU, --quick: PyTorch (CPU) runs in the full mode only"
        elif platform not in ("cpu", "gpu"):
            reason = f"{platform}: PyTorch's BatchNorm is compared on CUDA GPUs (and the CPU) only"
        else:
            reason = None
        if reason is None and platform == "gpu":
            r = subprocess.run([PY, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                               text=True, timeout=120, env=env)
            if r.stdout.strip() != "True":
                reason = f"torch {results['environment']['versions'].get('torch')} is not a CUDA build (or sees no GPU)"
        if reason:
            print(f"[torch] skipped: {reason}", flush=True)
            runner.parts["torch"] = {"status": "skipped", "reason": reason}
        else:
            shapes = [",".join(map(str, s)) for s in lp["shapes"].values()]
            bf = [",".join(map(str, lp["shapes"][k])) for k in lp["bf16"]]
            cmd = [PY, os.path.join(HERE, "torch_device.py"), "--shapes", *shapes, "--dtypes", "float32", "bfloat16",
                   "--bf16-shapes", *bf, "--rounds", str(lp["rounds"]), "--budget-s", str(max(10, lim["torch"] // 3)),
                   "--target-s", str(lp["target_s"]), "--copy-elems", str(lp["copy_elems"]),
                   "--device", "cpu" if platform == "cpu" else "cuda"]
            if platform == "cpu":
                # One thread: on this shared 2-core machine, loaded by other jobs, PyTorch's spinning OpenMP
                # barriers made its 2-thread BatchNorm 20-200x slower (load average 7-10) in a run of this check.
                cmd += ["--threads", "1"]
                results["notes"].append("PyTorch on the CPU: 1 thread (its 2-thread OpenMP runs collapse on the "
                                        "loaded shared machine)")
            results["torch"] = runner.json_part("torch", cmd, lim["torch"])

    # ---- 3. training
    if "train_step" not in args.skip:
        results["train_step"] = runner.json_part("train_step", [PY, os.path.join(HERE, "training.py"), "--part", "step"]
                                                 + (["--quick"] if args.quick else []), lim["train_step"])
    if "train_py" not in args.skip:
        t = min(lim["train_py"], runner.left())
        results["train_py"] = runner.json_part("train_py", [PY, os.path.join(HERE, "training.py"), "--part", "trainpy",
                                                            "--workdir", os.path.join(tmp, "train"),
                                                            "--timeout-s", str(round(t - 10))]
                                               + (["--quick"] if args.quick else []), t)
        tp = results.get("train_py") or {}
        runs = [v for v in (tp.get("runs") or {}).values() if "skipped" not in v]
        if any(not v.get("ok") and v.get("returncode") != "timeout" for v in runs):
            runner.parts["train_py"]["status"] = "failed"
        elif any(v.get("returncode") == "timeout" for v in runs):
            runner.parts["train_py"]["status"] = "timeout"
        if tp.get("skipped"):
            runner.parts["train_py"] = {"status": "skipped", "reason": tp["skipped"]}

    # ---- 4. results
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["environment"]["loadavg_end"] = _common.loadavg()
    results["goals"] = goals(results)
    import results_md

    stem = "accelerator_check" + ("_quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, stem + ".json")
    common.write_json(jpath, results)
    md = results_md.markdown(results)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    print()
    print(results_md.summary(results))
    print(f"\nwrote {jpath} and {stem}.md ({results['wall_s']:.0f} s)")
    # A failed check or a crashed part fails the run; a time-out (partial results kept) or a skip does not.
    bad = [n for n, p in runner.parts.items() if p.get("status") == "failed"
           or (p.get("status") == "timeout" and n in ("oracle", "pytest-1dev", "pytest-ndev"))]
    return 1 if bad else 0


def goals(results) -> dict:
    """The issue's goals, measured (they are set for accelerators)."""
    lay = results.get("layer") or {}
    s = (lay.get("summary") or {}).get("jaxbn.linen") or {}
    g = {}
    for h in ("vjp", "grad"):
        d = s.get(h) or {}
        g[f"train_f32_speedup_median_{h} (goal >= 1.5)"] = d.get("train_f32_speedup_median")
        g[f"train_bf16_speedup_median_{h} (goal >= 1.5)"] = d.get("train_bf16_speedup_median")
        large = d.get("train_roofline_5N_large") or {}
        g[f"train_roofline_5N_large_{h} (goal >= 0.7)"] = min(large.values()) if large else None
    ev = s.get("eval_roofline_2N") or {}
    g["eval_roofline_2N_median (goal ~ 1.0)"] = (sorted(ev.values())[len(ev) // 2] if ev else None)
    tr = results.get("torch") or {}
    ratios = {}
    for key, row in ((lay.get("train") or {}).get("vjp") or {}).items():
        dt = key.split("/")[0]
        tk = f"train/{dt}/{','.join(map(str, row['shape']))}"
        if tk in (tr.get("results") or {}) and "jaxbn.linen" in row["peers"]:
            ratios[key] = tr["results"][tk]["median_s"] / row["peers"]["jaxbn.linen"]["median_s"]
    g["torch_time_over_jaxbn_linen_train (> 1: jaxbn faster)"] = ratios or None
    return g


if __name__ == "__main__":
    sys.exit(main())
