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
