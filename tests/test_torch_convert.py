"""PyTorch BatchNorm checkpoint conversion (jaxbn.torch_convert)."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.torch_convert import (
    batch_norm_kwargs_from_torch,
    from_torch_state_dict,
    nchw_to_nhwc,
    nhwc_to_nchw,
    to_torch_state_dict,
)

TOL = 1e-5


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def numpy_sd(rng, c, prefix=""):
    return {
        prefix + "weight": rng.normal(size=c).astype(np.float32),
        prefix + "bias": rng.normal(size=c).astype(np.float32),
        prefix + "running_mean": rng.normal(size=c).astype(np.float32),
        prefix + "running_var": rng.uniform(0.1, 5.0, c).astype(np.float32),
        prefix + "num_batches_tracked": np.asarray(12, np.int64),
    }


def test_import_does_not_pull_torch_or_flax():
    code = (
        "import sys, jaxbn, jaxbn.folding, jaxbn.torch_convert; "
        "bad = [m for m in ('torch', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_round_trip_with_prefix():
    rng = np.random.default_rng(0)
    sd = numpy_sd(rng, 5, "layer1.bn.")
    sd["layer1.conv.weight"] = np.ones((5, 3, 3, 3), np.float32)  # other modules are ignored.
    params, state, hyper = from_torch_state_dict(sd, prefix="layer1.bn")  # dot added.
    assert hyper == {"unbiased_running_var": True}
    assert state.mean.dtype == jnp.float32 and state.count.dtype == jnp.int32 and int(state.count) == 12
    np.testing.assert_array_equal(params["scale"], sd["layer1.bn.weight"])
    np.testing.assert_array_equal(state.var, sd["layer1.bn.running_var"])

    # The converted arrays are copies: mutating the checkpoint in place changes nothing.
    saved = sd["layer1.bn.running_mean"].copy()
    sd["layer1.bn.running_mean"] += 1.0
    np.testing.assert_array_equal(state.mean, saved)
    sd["layer1.bn.running_mean"] = saved

    back = to_torch_state_dict(params, state, prefix="layer1.bn.")
    assert list(back) == [k for k in sd if k.startswith("layer1.bn.")]
    for k, v in back.items():
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, sd[k])
    assert back["layer1.bn.num_batches_tracked"].dtype == np.int64
    assert back["layer1.bn.num_batches_tracked"].shape == ()


def test_affine_false_and_errors():
    rng = np.random.default_rng(1)
    sd = numpy_sd(rng, 3)
    del sd["weight"], sd["bias"], sd["num_batches_tracked"]
    params, state, _ = from_torch_state_dict(sd)
    assert params == {} and int(state.count) == 0
    assert sorted(to_torch_state_dict(params, state)) == ["num_batches_tracked", "running_mean", "running_var"]

    with pytest.raises(ValueError, match="track_running_stats=False"):
        from_torch_state_dict({"weight": np.ones(3), "bias": np.zeros(3)})
    with pytest.raises(ValueError, match=r"prefixes with running statistics: \['bn1.'\]"):
        from_torch_state_dict(numpy_sd(rng, 3, "bn1."), prefix="bn2.")
    bad = numpy_sd(rng, 3)
    bad["running_var"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"running_var has shape \(4,\), expected \(3,\)"):
        from_torch_state_dict(bad)


def test_layout_helpers():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = nchw_to_nhwc(x)
    assert isinstance(y, np.ndarray) and y.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(nhwc_to_nchw(y), x)
    assert nchw_to_nhwc(jnp.asarray(x)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        nchw_to_nhwc(np.ones((2, 3)))


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


def _torch_bn(torch, c, momentum):
    bn = torch.nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c) + 0.5)
        bn.bias.copy_(torch.randn(c))
    return bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_pytorch(torch, momentum):
    c = 3
    bn = _torch_bn(torch, c, momentum)
    params, state, hyper = from_torch_state_dict(bn)
    assert hyper == {
        "momentum": None if momentum is None else 0.9, "epsilon": 1e-5,
        "unbiased_running_var": True, "axis": -1,
    }
    kw = batch_norm_kwargs_from_torch(bn, data_format="channels_first")
    assert kw["axis"] == 1
    bn.train()  # updates its buffers in place: the converted state must not alias them.
    for step in range(3):
        x = torch.randn(4, c, 5, 3) * 2.0 + 3.0  # batch statistics far from the initial ones.
        with torch.no_grad():
            want = bn(x).numpy()
        state_prev = state
        y, state = jaxbn.batch_norm(x.numpy(), params, state, training=True, **kw)
        assert rel_err(y, want) <= TOL
        assert rel_err(state.mean, bn.running_mean.numpy()) <= TOL
        assert rel_err(state.var, bn.running_var.numpy()) <= TOL
        assert int(state.count) == int(bn.num_batches_tracked) == step + 1
        if step == 2:  # channels-last data with axis=-1 gives the same result.
            y2, state2 = jaxbn.batch_norm(
                nchw_to_nhwc(x.numpy()), params, state_prev, training=True, **hyper
            )
            assert rel_err(nhwc_to_nchw(y2), want) <= TOL
            assert rel_err(state2.var, state.var) <= TOL

    bn.eval()
    x = torch.randn(2, c, 4, 4)
    with torch.no_grad():
        want = bn(x).numpy()
    y, state_eval = jaxbn.batch_norm(x.numpy(), params, state, training=False, **kw)
    assert rel_err(y, want) <= TOL
    assert state_eval is state


def test_state_dict_to_torch_and_back(torch):
    c = 4
    bn = _torch_bn(torch, c, 0.1)
    bn.train()
    with torch.no_grad():
        bn(torch.randn(5, c, 2, 2) + 1.0)
        bn(torch.randn(5, c, 2, 2) * 3.0)
    sd = {"block.bn." + k: v for k, v in bn.state_dict().items()}
    params, state, hyper = from_torch_state_dict(sd, prefix="block.bn.")
    assert hyper == {"unbiased_running_var": True} and int(state.count) == 2

    back = to_torch_state_dict(params, state, as_torch=True)
    assert back["num_batches_tracked"].dtype == torch.int64
    bn2 = torch.nn.BatchNorm2d(c)
    bn2.load_state_dict(back)  # strict: exactly the module's keys.
    for k, v in bn.state_dict().items():
        assert torch.equal(bn2.state_dict()[k], v), k

    bn.eval()
    x = torch.randn(2, c, 3, 3)
    with torch.no_grad():
        want = bn(x).numpy()
    y, _ = jaxbn.batch_norm(nchw_to_nhwc(x.numpy()), params, state, training=False)
    assert rel_err(nhwc_to_nchw(y), want) <= TOL

    # bfloat16 checkpoints load (as float32 params) too.
    params_bf, _, _ = from_torch_state_dict({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                              for k, v in bn.state_dict().items()})
    assert params_bf["scale"].dtype == jnp.float32


def test_kwargs_errors(torch):
    with pytest.raises(ValueError, match="track_running_stats=False"):
        batch_norm_kwargs_from_torch(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        from_torch_state_dict(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="data_format"):
        batch_norm_kwargs_from_torch(torch.nn.BatchNorm1d(3), data_format="NCHW")
