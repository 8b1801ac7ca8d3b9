"""The sync-BN checker passes synchronized models and names unsynchronized layers."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import jaxbn
from jaxbn import linen as bl
from jaxbn import nnx as bnnx
from jaxbn.models import CNN, MLP
from jaxbn.sync_check import assert_sync_bn, check_sync_bn

X = (np.random.default_rng(0).normal(size=(16, 8)) * 2 + 1).astype(np.float32)


def _linen(model):
    return model, model.init(jax.random.key(0), X, train=True)


@pytest.mark.parametrize("norm", [bl.BatchNorm, nn.BatchNorm], ids=["jaxbn", "flax"])
def test_synchronized_linen_model_passes(norm, ndev):
    model, v = _linen(MLP(norm=functools.partial(norm, axis_name="batch")))
    report = assert_sync_bn(model, v, X, axis_name="batch")
    assert report.ok and not report.unsynced_layers
    kinds = {r.kind for r in report.rows}
    assert kinds == {"output", "batch_stats", "grad"}
    assert any(r.path.startswith("BatchNorm_0") for r in report.rows if r.kind == "output")


def test_unsynchronized_flax_model_is_caught_and_named(ndev):
    model, v = _linen(MLP(norm=nn.BatchNorm))  # flax#877: no axis_name
    report = check_sync_bn(model, v, X, axis_name="batch")
    assert not report.ok
    assert report.unsynced_layers == ["BatchNorm_0"]
    bad = {(r.kind, r.path.split("/")[0]) for r in report.failures}
    assert ("batch_stats", "BatchNorm_0") in bad and ("output", "BatchNorm_0") in bad
    assert "UNSYNCED BatchNorm BatchNorm_0" in str(report)
    with pytest.raises(AssertionError, match="UNSYNCED BatchNorm BatchNorm_0"):
        assert_sync_bn(model, v, X, axis_name="batch")


class Forgetful(bl.BatchNorm):
    """A BatchNorm subclass, named without "BatchNorm", that drops the axis_name it is given."""

    def __post_init__(self):
        object.__setattr__(self, "axis_name", None)
        super().__post_init__()


class ForgetfulNNX(bnnx.BatchNorm):
    def __init__(self, *args, axis_name=None, **kwargs):
        super().__init__(*args, **kwargs)


def test_unsynchronized_subclass_is_named(ndev):
    model, v = _linen(MLP(norm=functools.partial(Forgetful, axis_name="batch")))
    report = check_sync_bn(model, v, X, axis_name="batch")
    assert not report.ok
    assert report.unsynced_layers == ["BatchNorm_0"]
    assert "UNSYNCED BatchNorm BatchNorm_0" in str(report)
    bad = _NNXNet(functools.partial(ForgetfulNNX, axis_name="batch"), nnx.Rngs(0))
    report = check_sync_bn(bad, None, X)
    assert not report.ok and report.unsynced_layers == ["bn"]


def test_cnn_with_jaxbn_passes(ndev):
    x = np.random.default_rng(1).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    model = CNN(norm=functools.partial(bl.BatchNorm, axis_name="batch"))
    v = model.init(jax.random.key(0), x, train=True)
    assert check_sync_bn(model, v, x, num_devices=4).ok


class _NNXNet(nnx.Module):
    def __init__(self, norm, rngs):
        self.dense = nnx.Linear(8, 6, rngs=rngs)
        self.bn = norm(6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.dense(x))))


def test_nnx_models(ndev):
    good = _NNXNet(functools.partial(bnnx.BatchNorm, axis_name="batch"), nnx.Rngs(0))
    assert check_sync_bn(good, None, X).ok
    bad = _NNXNet(nnx.BatchNorm, nnx.Rngs(0))
    report = check_sync_bn(bad, None, X)
    assert not report.ok and report.unsynced_layers == ["bn"]


def test_checker_errors(ndev):
    model, v = _linen(MLP())
    with pytest.raises(ValueError, match="divisible by num_devices=3"):
        check_sync_bn(model, v, X, num_devices=3)
    with pytest.raises(ValueError, match="num_devices must be in"):
        check_sync_bn(model, v, X, num_devices=1)


def test_lazy_import_from_jaxbn():
    assert jaxbn.check_sync_bn is check_sync_bn


def test_pytest_fixture(sync_bn_check, ndev):
    model, v = _linen(MLP(norm=functools.partial(bl.BatchNorm, axis_name="batch")))
    assert sync_bn_check(model, v, X, num_devices=2).ok


# Training flags (issue 17, item 9): found from the __call__ signature, else named in the message.


def _net(flag, value_for_training):
    """A Linen model whose training flag is `flag` (value_for_training selects training)."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, **kw):
            training = kw.get(flag, not value_for_training) == value_for_training
            x = nn.Dense(6)(x)
            x = bl.BatchNorm(use_running_average=not training, axis_name="batch")(x)
            return nn.Dense(3)(x)

    # A signature with exactly that keyword, as a user's model would have.
    exec_ns = {}
    exec(f"def __call__(self, x, {flag}={not value_for_training!r}):\n"
         f"    return Net.__call__(self, x, **{{{flag!r}: {flag}}})", {"Net": Net}, exec_ns)
    cls = type(f"Net_{flag}", (Net,), {"__call__": exec_ns["__call__"]})
    model = cls()
    return model, model.init(jax.random.key(0), X)


@pytest.mark.parametrize("flag,value", [("train", True), ("training", True), ("is_training", True),
                                        ("use_running_average", False)])
def test_training_flag_found_in_signature(flag, value, ndev):
    model, v = _net(flag, value)
    report = check_sync_bn(model, v, X, num_devices=4)
    assert report.ok, str(report)
    assert report.apply_kwargs == {flag: value} and not report.eval_layers


def test_unknown_training_flag_fails_and_says_what_to_pass(ndev):
    model, v = _net("phase_is_train", True)  # not a known name: the model runs in eval mode
    report = check_sync_bn(model, v, X, num_devices=4)
    assert not report.ok and report.not_training and report.eval_layers == ["BatchNorm_0"]
    text = str(report)
    assert "FAILED" in text and "NO BatchNorm ran in training mode" in text and "apply_kwargs=" in text
    assert check_sync_bn(model, v, X, num_devices=4, apply_kwargs={"phase_is_train": True}).ok
    with pytest.raises(TypeError, match=r"phase_is_train=False.*apply_kwargs=\{\.\.\.\}"):
        check_sync_bn(model, v, X, num_devices=4, apply_kwargs={"train": True})


class _Frozen(nn.Module):
    """BatchNorms built with use_running_average=True and no training flag to change it."""

    @nn.compact
    def __call__(self, x):
        x = bl.BatchNorm(use_running_average=True, axis_name="batch")(nn.Dense(6)(x))
        return nn.BatchNorm(use_running_average=True, axis_name="batch")(nn.Dense(3)(x))


def test_linen_running_averages_fail(ndev):
    model = _Frozen()
    v = model.init(jax.random.key(0), X)
    report = check_sync_bn(model, v, X, num_devices=4)
    assert not report.ok and report.not_training, str(report)
    assert all(r.ok for r in report.rows)  # the numbers agree: only the mode says it checked nothing
    with pytest.raises(AssertionError, match="NO BatchNorm ran in training mode"):
        assert_sync_bn(model, v, X, num_devices=4)


@pytest.mark.parametrize("norm", [bnnx.BatchNorm, nnx.BatchNorm], ids=["jaxbn", "flax"])
def test_nnx_model_in_eval_mode_fails(norm, ndev):
    model = _NNXNet(functools.partial(norm, axis_name="batch"), nnx.Rngs(0))
    model.eval()
    report = check_sync_bn(model, None, X, num_devices=4)
    assert not report.ok and report.not_training and "model.train()" in str(report)
    model.train()
    assert check_sync_bn(model, None, X, num_devices=4).ok


# A forgotten axis_name under shard_map (issue 17, item 8): JAX's error, and the checker's answer.


def test_forgotten_axis_name_under_shard_map_is_named(ndev):
    from jax.sharding import PartitionSpec as P
    model, v = _linen(MLP())  # jaxbn BatchNorm without axis_name

    def step(v, x):
        out, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("batch",))
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P())))
    with pytest.raises(ValueError, match="out_specs which require replication"):
        f(v, X)  # what the user meets (and README's Troubleshooting maps to its cause)
    report = check_sync_bn(model, v, X, num_devices=4)
    assert not report.ok and report.unsynced_layers == ["BatchNorm_0"]
    text = str(report)
    assert "out_specs which require replication" in text and "check_vma=False" in text
    assert "axis_name='batch'" in text
