"""float64 NumPy oracle for batch normalization on the whole global batch.

Everything here is independent of jaxbn's implementation: statistics by
definition, gradients by central finite differences in float64.
"""

import numpy as np

# Relative-error tolerances keyed by dtype (one place for the whole suite).
RTOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3, "float64": 1e-12}


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (max-norm of the difference)."""
    dt = np.complex128 if np.iscomplexobj(actual) or np.iscomplexobj(expected) else np.float64
    a = np.asarray(actual, dt)
    e = np.asarray(expected, dt)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(np.abs(e).max(), 1e-30)
    return float(np.abs(a - e).max() / scale)


def feature_layout(ndim, feature_axes):
    feat = tuple(sorted(a % ndim for a in feature_axes))
    red = tuple(a for a in range(ndim) if a not in feat)
    return feat, red


def np_moments(x, mask=None, feature_axes=(-1,)):
    """Masked mean, biased variance and count (float64)."""
    x = np.asarray(x, np.float64)
    feat, red = feature_layout(x.ndim, feature_axes)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    n = m.sum(red)
    mean = np.where(m, x, 0).sum(red) / np.maximum(n, 1)
    bshape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
    var = np.where(m, (x - mean.reshape(bshape)) ** 2, 0).sum(red) / np.maximum(n, 1)
    return mean, var, n


def np_batch_norm(x, scale, bias, mask=None, feature_axes=(-1,), eps=1e-5):
    x = np.asarray(x, np.float64)
    feat, _ = feature_layout(x.ndim, feature_axes)
    bshape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
    mean, var, n = np_moments(x, mask, feature_axes)
    y = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + eps)
    y = y * np.asarray(scale, np.float64).reshape(bshape) + np.asarray(bias, np.float64).reshape(bshape)
    return y, mean, var, n


def np_ema(old_mean, old_var, mean, var, n, momentum, unbiased=False):
    v = var * n / np.maximum(n - 1, 1) if unbiased else var
    return momentum * old_mean + (1 - momentum) * mean, momentum * old_var + (1 - momentum) * v


def np_grads(x, scale, bias, w, mask=None, feature_axes=(-1,), eps=1e-5, h=1e-5):
    """Gradients of L = Σ w·y with respect to x, scale and bias, by central differences."""
    args = [np.array(a, np.float64) for a in (x, scale, bias)]

    def loss(a):
        return float(np.sum(np.asarray(w, np.float64) * np_batch_norm(*a, mask, feature_axes, eps)[0]))

    grads = []
    for i, arr in enumerate(args):
        g = np.zeros_like(arr)
        flat, gflat = arr.reshape(-1), g.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + h
            lp = loss(args)
            flat[j] = old - h
            lm = loss(args)
            flat[j] = old
            gflat[j] = (lp - lm) / (2 * h)
        grads.append(g)
    return tuple(grads)
