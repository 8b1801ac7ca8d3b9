r"""Fingerprints of the compiled BatchNorm programs: op counts per kind, collectives,
custom calls, for the layer's training forward+backward in each context jaxbn serves.

A refactoring that should not change what runs is checked by running this on both
trees and comparing (same counts = the same kernels, collectives and fusions):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=<old tree> \
        .venv/bin/python benchmarks/studies/program_fingerprint.py > before.json
    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
        .venv/bin/python benchmarks/studies/program_fingerprint.py > after.json
    diff before.json after.json

Self-contained (no jaxbn helpers beyond its public API), so that it runs on old trees.
"""

import collections
import hashlib
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn

OP = re.compile(r"=\s*\S+\s+([a-z][a-z0-9-]*)\(")


def fingerprint(text: str) -> dict:
    entry = text[text.index("\nENTRY"):]
    ops = collections.Counter(m.group(1) for m in OP.finditer(entry))
    ops = {k: v for k, v in ops.items() if k not in ("parameter", "get-tuple-element", "bitcast", "constant", "tuple")}
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    # The whole program without names, numbering and source locations: equal hashes
    # mean the same instructions, shapes, layouts and fusions.
    norm = re.sub(r"(metadata|frontend_attributes|backend_config)=\{[^}]*\}", "", text)
    norm = re.sub(r"%[\w.-]+", "%", re.sub(r"\.\d+", "", norm))
    tables = re.compile(r"^(HloModule|FileNames|FunctionNames|FileLocations|StackFrames|\d+ )")  # source locations
    norm = "\n".join(ln.strip() for ln in norm.splitlines() if ln.strip() and not tables.match(ln.strip()))
    return {"program_sha256": hashlib.sha256(norm.encode()).hexdigest()[:16], "entry_ops": dict(sorted(ops.items())), "all-reduce": text.count(" all-reduce("),
            "all-gather": text.count(" all-gather("), "custom_calls": targets}


def layer_grad(axis=-1, mask=None, axis_name=None):
    def f(x, params, w):
        def loss(x, params):
            y, st = jaxbn.batch_norm(x, params, jaxbn.init_state(x.shape[axis]), training=True, axis=axis,
                                     mask=mask, axis_name=axis_name)
            return jnp.sum(y * w), st
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return f


def main():
    rng = np.random.default_rng(0)
    out = {}
    nhwc = rng.normal(size=(16, 6, 6, 8)).astype(np.float32)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    keep = jnp.asarray(rng.uniform(size=(16, 1, 1, 1)) < 0.7)
    params = jaxbn.init_params(8)
    ndev = jax.device_count()
    mesh = jax.make_mesh((ndev,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    for kernels in ("0", "1"):
        with jaxbn.cpu_kernel.use(kernels):
            cases = {
                "nhwc": (layer_grad(), nhwc),
                "nchw": (layer_grad(axis=1), nchw),
                "nhwc_masked": (layer_grad(mask=keep), nhwc),
                "nhwc_bf16": (layer_grad(), nhwc.astype(jnp.bfloat16)),
            }
            for name, (f, x) in cases.items():
                text = jax.jit(f).lower(x, params, jnp.ones_like(x)).compile().as_text()
                out[f"kernels={kernels} one device {name}"] = fingerprint(text)
            if ndev > 1:
                body = layer_grad(axis_name="d")
                sm = jax.shard_map(lambda x, p, w: body(x, p, w)[1], mesh=mesh, in_specs=(P("d"), P(), P("d")),
                                   out_specs=P())
                text = jax.jit(sm).lower(nhwc, params, np.ones_like(nhwc)).compile().as_text()
                out[f"kernels={kernels} shard_map nhwc"] = fingerprint(text)
                xs = jax.device_put(nhwc, NamedSharding(mesh, P("d")))
                text = jax.jit(layer_grad()).lower(xs, params, xs).compile().as_text()
                out[f"kernels={kernels} sharded jit nhwc"] = fingerprint(text)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
