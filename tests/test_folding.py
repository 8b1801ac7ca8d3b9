"""Folding eval-mode BatchNorm into neighbouring conv/dense layers (jaxbn.folding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.folding import (
    fold_bn_into_next_conv,
    fold_bn_into_next_linear,
    fold_bn_params,
    fold_conv_bn,
    fold_dense_bn,
)

EPS = 1e-3  # not the default, to check it is passed through.
TOL = 1e-5

_SPECS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def bn_vars(rng, c):
    """Random params/state: var spread far from 1, nonzero means, no zeros."""
    params = {
        "scale": rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c),
        "bias": rng.normal(size=c).astype(np.float32),
    }
    state = jaxbn.BatchNormState(
        mean=jnp.asarray(rng.normal(size=c) * 3.0, jnp.float32),
        var=jnp.asarray(np.exp(rng.uniform(-3.0, 3.0, c)), jnp.float32),
        count=jnp.asarray(7, jnp.int32),
    )
    return params, state


def eval_bn(z, params, state):
    return jaxbn.batch_norm(z, params, state, training=False, axis=-1, epsilon=EPS)[0]


def conv(x, k, b, *, strides, padding, groups):
    nd = k.ndim - 2
    y = jax.lax.conv_general_dilated(
        x, k, window_strides=strides, padding=padding, dimension_numbers=_SPECS[nd],
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST,
    )
    return y + b


@pytest.mark.parametrize(
    "spatial, cin, cout, groups, strides",
    [
        ((9,), 4, 6, 1, (2,)),  # 1-D, strided
        ((7, 6), 4, 6, 2, (2, 1)),  # 2-D grouped
        ((7, 6), 4, 8, 4, (1, 2)),  # 2-D depthwise (multiplier 2)
        ((5, 4, 4), 2, 3, 1, (1, 2, 1)),  # 3-D
    ],
)
def test_fold_conv_bn(spatial, cin, cout, groups, strides):
    rng = np.random.default_rng(len(spatial) * 10 + groups)
    ksize = (3,) * len(spatial)
    x = rng.normal(size=(2, *spatial, cin)).astype(np.float32)
    k = rng.normal(size=(*ksize, cin // groups, cout)).astype(np.float32)
    cb = rng.normal(size=cout).astype(np.float32)
    params, state = bn_vars(rng, cout)

    want = eval_bn(conv(x, k, cb, strides=strides, padding="SAME", groups=groups), params, state)
    k2, b2 = fold_conv_bn(k, cb, params, state, epsilon=EPS, feature_group_count=groups)
    assert k2.shape == k.shape and k2.dtype == k.dtype and b2.shape == (cout,)
    got = conv(x, k2, b2, strides=strides, padding="SAME", groups=groups)
    assert rel_err(got, want) <= TOL

    # Without a conv bias and with partial BN params.
    p = {"scale": params["scale"]}
    want = eval_bn(conv(x, k, 0.0, strides=strides, padding="SAME", groups=groups), p, state)
    k2, b2 = fold_conv_bn(k, None, p, state, epsilon=EPS, feature_group_count=groups)
    got = conv(x, k2, b2, strides=strides, padding="SAME", groups=groups)
    assert rel_err(got, want) <= TOL


def test_fold_bn_params_and_none_params():
    rng = np.random.default_rng(0)
    params, state = bn_vars(rng, 5)
    z = rng.normal(size=(3, 5)).astype(np.float32) * 4 + 1
    a, b = fold_bn_params(params, state, epsilon=EPS)
    assert a.dtype == jnp.float32 and a.shape == (5,)
    assert rel_err(a * z + b, eval_bn(z, params, state)) <= TOL
    a, b = fold_bn_params(None, state, epsilon=EPS)
    assert rel_err(a * z + b, eval_bn(z, None, state)) <= TOL
    # Flax's batch_stats mapping works as state.
    a2, b2 = fold_bn_params(None, {"mean": state.mean, "var": state.var}, epsilon=EPS)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def test_fold_dense_bn_and_bf16_dtype():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    w = rng.normal(size=(6, 5)).astype(np.float32)
    c = rng.normal(size=5).astype(np.float32)
    params, state = bn_vars(rng, 5)
    want = eval_bn(jnp.dot(x, w, precision="highest") + c, params, state)
    w2, c2 = fold_dense_bn(w, c, params, state, epsilon=EPS)
    assert rel_err(jnp.dot(x, w2, precision="highest") + c2, want) <= TOL

    w2, c2 = fold_dense_bn(w.astype(jnp.bfloat16), None, params, state, epsilon=EPS)
    assert w2.dtype == jnp.bfloat16 and c2.dtype == jnp.bfloat16


def test_fold_bn_into_next_linear():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)).astype(np.float32) * 2 + 1
    w = rng.normal(size=(6, 3)).astype(np.float32)
    c = rng.normal(size=3).astype(np.float32)
    params, state = bn_vars(rng, 6)
    want = jnp.dot(eval_bn(x, params, state), w, precision="highest") + c
    w2, c2 = fold_bn_into_next_linear(params, state, w, c, epsilon=EPS)
    assert rel_err(jnp.dot(x, w2, precision="highest") + c2, want) <= TOL
    w2, c2 = fold_bn_into_next_linear(params, state, w, None, epsilon=EPS)
    assert rel_err(jnp.dot(x, w2, precision="highest") + c2, want - c) <= TOL


@pytest.mark.parametrize("cin, cout, groups", [(4, 6, 1), (4, 6, 2), (4, 8, 4)])
def test_fold_bn_into_next_conv_valid(cin, cout, groups):
    rng = np.random.default_rng(3 + groups)
    x = rng.normal(size=(2, 7, 6, cin)).astype(np.float32) * 2 + 1
    k = rng.normal(size=(3, 2, cin // groups, cout)).astype(np.float32)
    cb = rng.normal(size=cout).astype(np.float32)
    params, state = bn_vars(rng, cin)
    kw = dict(strides=(2, 1), padding="VALID", groups=groups)
    want = conv(eval_bn(x, params, state), k, cb, **kw)
    k2, b2 = fold_bn_into_next_conv(
        params, state, k, cb, padding="VALID", epsilon=EPS, feature_group_count=groups
    )
    assert rel_err(conv(x, k2, b2, **kw), want) <= TOL


def test_fold_bn_into_next_conv_padding():
    rng = np.random.default_rng(4)
    params, state = bn_vars(rng, 4)
    k = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
    for bad in ("SAME", 1, [(1, 1), (0, 0)], "CIRCULAR"):
        with pytest.raises(ValueError, match="exact only for padding='VALID'"):
            fold_bn_into_next_conv(params, state, k, None, padding=bad)
    # Explicit zero padding is VALID; SAME pads nothing for a 1x1 kernel.
    fold_bn_into_next_conv(params, state, k, None, padding=[(0, 0), (0, 0)])
    k1 = rng.normal(size=(1, 1, 4, 2)).astype(np.float32)
    x = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
    k2, b2 = fold_bn_into_next_conv(params, state, k1, None, padding="SAME", epsilon=EPS)
    want = conv(eval_bn(x, params, state), k1, 0.0, strides=(1, 1), padding="SAME", groups=1)
    assert rel_err(conv(x, k2, b2, strides=(1, 1), padding="SAME", groups=1), want) <= TOL


def test_errors():
    rng = np.random.default_rng(5)
    params, state = bn_vars(rng, 4)
    k = np.ones((3, 3, 2, 6), np.float32)
    with pytest.raises(ValueError, match=r"kernel has 6 output features .* expected 4"):
        fold_conv_bn(k, None, params, state)
    with pytest.raises(ValueError, match=r"conv_bias has shape \(3,\), expected \(4,\)"):
        fold_conv_bn(k[..., :4], np.ones(3, np.float32), params, state)
    with pytest.raises(ValueError, match="feature_group_count=3 does not divide"):
        fold_conv_bn(k[..., :4], None, params, state, feature_group_count=3)
    with pytest.raises(ValueError, match=r"bn_params\['bias'\] has shape \(3,\), expected \(4,\)"):
        fold_conv_bn(k[..., :4], None, {"bias": np.ones(3, np.float32)}, state)
    with pytest.raises(ValueError, match="unexpected keys"):
        fold_bn_params({"gamma": np.ones(4)}, state)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        fold_bn_params(params, state, epsilon=-1.0)
    with pytest.raises(ValueError, match="use fold_dense_bn"):
        fold_conv_bn(np.ones((2, 4), np.float32), None, params, state)
    with pytest.raises(ValueError, match=r"next_kernel has 4 input features .* expected 6"):
        fold_bn_into_next_linear(*bn_vars(rng, 6), np.ones((4, 2), np.float32), None)
    with pytest.raises(ValueError, match=r"2 input features per group .*feature_group_count=1, expected 4"):
        fold_bn_into_next_conv(params, state, k, None, padding="VALID")
    with pytest.raises(TypeError, match="floating-point"):
        fold_dense_bn(np.ones((2, 4), np.int32), None, params, state)


def test_matches_flax_linen_layout():
    nn = pytest.importorskip("flax.linen")
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 4)), jnp.float32)
    model = nn.Sequential([
        nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME", feature_group_count=2, use_bias=True),
        nn.BatchNorm(use_running_average=True, epsilon=EPS),
    ])
    variables = model.init(jax.random.key(0), x)
    params, state = bn_vars(rng, 6)
    cp = variables["params"]["layers_0"]
    cp = {"kernel": jnp.asarray(rng.normal(size=cp["kernel"].shape), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
    variables = {
        "params": {"layers_0": cp, "layers_1": {k: jnp.asarray(v) for k, v in params.items()}},
        "batch_stats": {"layers_1": {"mean": state.mean, "var": state.var}},
    }
    want = model.apply(variables, x)
    k2, b2 = fold_conv_bn(cp["kernel"], cp["bias"], params, variables["batch_stats"]["layers_1"],
                          epsilon=EPS, feature_group_count=2)
    conv_only = nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME", feature_group_count=2)
    got = conv_only.apply({"params": {"kernel": k2, "bias": b2}}, x)
    assert rel_err(got, want) <= TOL

    dense = nn.Dense(3)
    w = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    want = dense.apply({"params": {"kernel": w, "bias": jnp.ones(3)}}, eval_bn(h, params, state))
    w2, c2 = fold_bn_into_next_linear(params, state, w, jnp.ones(3), epsilon=EPS)
    assert rel_err(dense.apply({"params": {"kernel": w2, "bias": c2}}, h), want) <= TOL
