r"""The CPU kernels of two versions of jaxbn/csrc/batch_norm_cpu.cc, timed in one process.

  python benchmarks/studies/kernel_ab.py --base HEAD~1   # a git revision against the working tree
  python benchmarks/studies/kernel_ab.py --base old.cc   # or a file

Builds both sources with jaxbn's compiler flags, registers their FFI targets under
``base_*`` and ``head_*``, checks that both compute the same statistics, and times
``jaxbn_moments`` and ``jaxbn_dy_sums`` on NHWC shapes (x viewed as rows of C),
interleaved in random order, with XLA's plain ``sum`` over the same rows as a
reference read. Reports medians and the median per-round ratio base/head (> 1: the
head is faster). Results: benchmarks/results/studies/kernel_ab.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _common and the other shared modules

import _common  # noqa: E402

SOURCE = "jaxbn/csrc/batch_norm_cpu.cc"
SHAPES = [(64, 56, 56, 64), (16, 26, 26, 32), (16, 8, 8, 64), (32, 16, 16, 128), (8, 28, 28, 256), (40, 32, 32, 8)]


def _build(src_text: str, out: str) -> None:
    import jax

    from jaxbn.backends import build

    with tempfile.NamedTemporaryFile("w", suffix=".cc", delete=False) as f:
        f.write(src_text)
    cmd = [os.environ.get("CXX", "g++"), *build.FLAGS, f"-I{jax.ffi.include_dir()}", f.name, "-o", out]
    subprocess.run(cmd, check=True, capture_output=True)
    os.unlink(f.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a git revision, or a path to a .cc file")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    import jax
    import jax.numpy as jnp
    import numpy as np

    root = _common.ROOT
    if os.path.exists(args.base):
        base_src = open(args.base).read()
    else:
        base_src = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=root, check=True,
                                  capture_output=True, text=True).stdout
    tmp = tempfile.mkdtemp(prefix="jaxbn-ab-")
    for name, text in (("base", base_src), ("head", open(os.path.join(root, SOURCE)).read())):
        so = os.path.join(tmp, f"{name}.so")
        _build(text, so)
        lib = ctypes.cdll.LoadLibrary(so)
        for op, sym in (("moments", "JaxbnMoments"), ("dy_sums", "JaxbnDySums")):
            jax.ffi.register_ffi_target(f"{name}_{op}", jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")

    results = {"environment": _common.environment(), "base": args.base, "rounds": args.rounds, "shapes": {}}
    rows = []
    for shape in SHAPES:
        C = shape[-1]
        x = (jax.random.normal(jax.random.key(0), shape) * 2 + 3).reshape(-1, C)
        dy = jax.random.normal(jax.random.key(1), shape).reshape(-1, C)
        mu = jnp.mean(x, 0)
        out = jax.ShapeDtypeStruct((C,), jnp.float32)
        fs = {}
        for v in ("base", "head"):
            fs[f"moments|{v}"] = jax.jit(lambda x, v=v: jax.ffi.ffi_call(f"{v}_moments", (out, out))(x))
            fs[f"dy_sums|{v}"] = jax.jit(lambda x, v=v: jax.ffi.ffi_call(f"{v}_dy_sums", (out, out))(x, dy, mu))
        fs["xla_sum|ref"] = jax.jit(lambda x: jnp.sum(x, 0))
        for op in ("moments", "dy_sums"):
            a, b = fs[f"{op}|base"](x), fs[f"{op}|head"](x)
            for u, w in zip(a, b):
                np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
        calls = max(1, int(1e8 // x.size))
        smp = _common.interleave({k: (lambda f=f: [f(x) for _ in range(calls)]) for k, f in fs.items()},
                                 rounds=args.rounds, warmup=2)
        row = {"median_ms": {k: float(np.median(v) / calls * 1e3) for k, v in smp.items()},
               "base_over_head": {op: _common.ratio(smp, f"{op}|base", f"{op}|head") for op in ("moments", "dy_sums")}}
        results["shapes"]["x".join(map(str, shape))] = row
        m = row["median_ms"]
        rows.append(["×".join(map(str, shape)), f"{m['moments|base']:.3f}", f"{m['moments|head']:.3f}",
                     f"x{row['base_over_head']['moments']:.2f}", f"{m['dy_sums|base']:.3f}", f"{m['dy_sums|head']:.3f}",
                     f"x{row['base_over_head']['dy_sums']:.2f}", f"{m['xla_sum|ref']:.3f}"])
        print(rows[-1], flush=True)
    print(_common.fmt_table(["shape", "moments base ms", "head ms", "base/head", "dy_sums base ms", "head ms",
                             "base/head", "XLA sum ms"], rows))
    print(f"wrote {_common.save_json('studies/kernel_ab.json', results)}")


if __name__ == "__main__":
    main()
