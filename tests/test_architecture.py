"""The shape of the package: a straight import stack, backends behind one interface
chosen once per call, and device groups validated up front."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import backends
from jaxbn.backends import context
from oracle import RTOL, np_batch_norm, np_grads, rel_err

PKG = Path(jaxbn.__file__).parent
core = importlib.import_module("jaxbn.batch_norm")  # the attribute jaxbn.batch_norm is the function


def _imports() -> dict:
    """Module name -> the jaxbn modules it imports (at any depth, importlib included)."""
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"
            ):
                names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
            out |= {r for r in map(resolve, names) if r and r != m}
        graph[m] = out
    return graph


def test_no_import_cycle():
    graph = _imports()
    # The package face only re-exports: edges into "jaxbn" itself are not part of the stack.
    graph = {m: {d for d in deps if d != "jaxbn"} for m, deps in graph.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(path + [m, d])}"
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_stack_points_down():
    graph = _imports()
    below_core = {"jaxbn._types", "jaxbn._checks", "jaxbn._stats", "jaxbn._linear_op"}
    for m, deps in graph.items():
        if m.startswith("jaxbn.backends") or m in below_core:
            assert "jaxbn.batch_norm" not in deps, f"{m} imports the core"
            assert not any(d in ("jaxbn.linen", "jaxbn.nnx") or d.startswith("jaxbn.training") for d in deps), m
    for m in below_core:
        assert not any(d.startswith("jaxbn.backends") for d in graph[m]), f"{m} imports a backend"
    # The core asks the backends for reductions only through `select` and the interface.
    assert graph["jaxbn.batch_norm"] - {"jaxbn"} <= below_core | {"jaxbn.backends", "jaxbn.backends.context"}


def test_import_jaxbn_imports_no_framework():
    code = (
        "import sys, jaxbn, jaxbn.cpu_kernel\n"
        "bad = [m for m in ('flax', 'optax', 'orbax', 'torch', 'tensorflow', 'equinox', 'ml_collections')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


class _Recording(backends.Reductions):
    """The XLA formulation, recording which reductions ran."""

    name = "recording"

    def __init__(self):
        self.calls = []

    def moments(self, x, mask, lay):
        self.calls.append("moments")
        return backends.XLA.moments(x, mask, lay)

    def dy_sums(self, x, dy, mean, lay):
        self.calls.append("dy_sums")
        return backends.XLA.dy_sums(x, dy, mean, lay)


def test_one_backend_serves_forward_and_backward(monkeypatch):
    rec = _Recording()
    chosen = []

    def select(x, lay):
        chosen.append(x.shape)
        return rec

    monkeypatch.setattr(core, "select", select)
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (16, 5)).astype(np.float32)
    w = rng.normal(size=(16, 5)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)

    def loss(x, params):
        y, _ = jaxbn.batch_norm(x, params, jaxbn.init_state(5), training=True)
        return jnp.sum(y * w)

    dx, dp = jax.grad(loss, argnums=(0, 1))(x, {"scale": scale, "bias": bias})
    assert chosen == [x.shape] and rec.calls == ["moments", "dy_sums"]
    dx_ref, ds_ref, db_ref = np_grads(x, scale, bias, w)
    assert rel_err(dx, dx_ref) < 1e-4 and rel_err(dp["scale"], ds_ref) < 1e-4 and rel_err(dp["bias"], db_ref) < 1e-4


def _lay(x):
    from jaxbn._checks import layout

    return layout(x, -1)


def test_select_by_context(ndev):
    x = jnp.ones((8, 4), jnp.float32)
    with jaxbn.cpu_kernel.use("0"):
        assert context.kind() == "spmd"  # eager on 8 devices: XLA's partitioner may split the program
        assert backends.select(x, _lay(x)).name == "spmd(xla)"
    mesh = jax.make_mesh((ndev,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = {}

    def body(x):
        seen["kind"], seen["sel"] = context.kind(), backends.select(x, _lay(x))
        return x

    with jaxbn.cpu_kernel.use("auto"):
        jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(jnp.ones((ndev * 2, 4)))
        assert seen["kind"] == "manual"
        assert seen["sel"] in (backends.CPU, backends.XLA)
        assert (seen["sel"] is backends.CPU) == jaxbn.cpu_kernel.available()
        jax.jit(body)(jax.device_put(jnp.ones((ndev, 4)), NamedSharding(mesh, P("d"))))
        assert seen["kind"] == "spmd" and seen["sel"].name.startswith("spmd(")
        with backends.custom_partitioning(False):
            jax.jit(lambda x: body(x))(jax.device_put(jnp.ones((ndev, 4)), NamedSharding(mesh, P("d"))))
            assert seen["kind"] == "spmd"
            assert seen["sel"] is backends.XLA  # the kernels are not used where XLA must split them


def test_custom_partitioning_switch_same_statistics(ndev):
    """With the declared partitioning off, XLA's own split gives the same global statistics."""
    mesh = jax.make_mesh((ndev,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(5)
    x = rng.normal(1e3, 2.0, (ndev * 4, 3)).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    _, mean, var, _ = np_batch_norm(x, np.ones(3), np.zeros(3))
    for on in (True, False):
        with backends.custom_partitioning(on):
            m = jax.jit(lambda x: jaxbn.moments(x))(xs)
        assert rel_err(m.mean, mean) < RTOL["float32"] and rel_err(m.var, var) < 1e-4, on


@pytest.mark.parametrize(
    "groups, pattern",
    [
        ([[0, 1, 2, 3], [4, 5, 6]], r"got \[\[0, 1, 2, 3\], \[4, 5, 6\]\]"),
        ([[0, 1, 2, 3, 4, 5], [6, 7]], r"groups of equal size"),
        ([[0, 1, 2, 3], [3, 4, 5, 6]], r"each index in range\(8\) exactly once"),
    ],
)
def test_bad_axis_index_groups_named_before_xla(ndev, groups, pattern):
    x = np.random.default_rng(0).normal(size=(ndev, 4, 3)).astype(np.float32)
    f = jax.pmap(lambda x: jaxbn.moments(x, axis_name="d", axis_index_groups=groups).mean, axis_name="d")
    with pytest.raises(ValueError, match=r"axis_index_groups must split the 8 devices of the axis.*" + pattern):
        f(x)


def test_chan_merge_rows_is_exact_in_float64_on_the_host():
    from jaxbn._stats import merge_rows

    rng = np.random.default_rng(7)
    parts = [rng.normal(1e8, 1.0, size=n) for n in (5, 0, 17, 3)]  # an empty part adds nothing
    ns = np.array([len(p) for p in parts], np.float64)
    means = np.array([p.mean() if len(p) else 0.0 for p in parts])
    m2s = np.array([((p - p.mean()) ** 2).sum() if len(p) else 0.0 for p in parts])
    n, mean, m2 = merge_rows(ns, means, m2s, xp=np)
    whole = np.concatenate(parts)
    assert isinstance(mean, np.floating) and n == whole.size
    assert abs(mean - whole.mean()) / 1e8 < 1e-15 and abs(m2 / n - whole.var()) / whole.var() < 1e-9


def test_vmap_axes_are_merged_by_local_sums():
    """Under vmap every example is a participant: no per-example buffer of the whole batch."""
    b = 48
    x = np.random.default_rng(1).normal(size=(b, 5, 3)).astype(np.float32)
    f = jax.vmap(lambda x: jaxbn.moments(x, axis=-1, axis_name="b"), axis_name="b")
    jaxpr = jax.make_jaxpr(f)(x)
    shapes = [v.aval.shape for e in jaxpr.eqns for v in e.outvars if hasattr(v.aval, "shape")]
    assert not [s for s in shapes if list(s).count(b) > 1], shapes
    m = f(x)
    ref_mean, ref_var = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).var(0)
    assert rel_err(m.mean[0], ref_mean) < 1e-5 and rel_err(m.var[7], ref_var) < 1e-5
