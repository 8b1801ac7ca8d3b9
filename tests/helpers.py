"""Helpers shared by the tests (import as ``import helpers``: pytest puts tests/ on sys.path).

IDX files: `idx_bytes` encodes an array in the MNIST file format, `write_file`
writes bytes (optionally gzipped), `write_idx_dir` writes a dataset directory
that `jaxbn.training.datasets.load_idx_dataset` reads, and `write_small_idx` a
small raw copy of Fashion-MNIST for training runs.
"""

import gzip
import os
import pathlib

import numpy as np

# The four files of an MNIST-format dataset directory.
IDX_NAMES = {
    ("train", "image"): "train-images-idx3-ubyte",
    ("train", "label"): "train-labels-idx1-ubyte",
    ("test", "image"): "t10k-images-idx3-ubyte",
    ("test", "label"): "t10k-labels-idx1-ubyte",
}

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
              np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """`arr` as an IDX file: two zero bytes, type code, ndim, big-endian sizes and data."""
    header = bytes([0, 0, _IDX_CODES[arr.dtype.type], arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_file(path, payload: bytes, compress: bool = False):
    """Writes `payload` (gzipped when `compress`) to `path`; returns `path`."""
    if compress:
        payload = gzip.compress(payload)
    pathlib.Path(path).write_bytes(payload)
    return path


def write_idx_dir(directory, splits, *, compress: bool = False, dotted: bool = False) -> str:
    """Writes ``splits = {'train': {'image', 'label'}, 'test': ...}`` as the four IDX files.

    Names get a ``.gz`` suffix when `compress`, and ``train-images.idx3-ubyte``
    style dots when `dotted`. Returns the directory.
    """
    os.makedirs(directory, exist_ok=True)
    for (split, key), name in IDX_NAMES.items():
        if dotted:
            name = name.replace("-idx", ".idx")
        name += ".gz" if compress else ""
        write_file(os.path.join(directory, name), idx_bytes(splits[split][key]), compress)
    return str(directory)


def write_small_idx(directory, num_train: int = 512, num_test: int = 300) -> str:
    """The first examples of Fashion-MNIST as raw IDX files (loads in milliseconds)."""
    from jaxbn.training import datasets

    ds = datasets.load_dataset("fashion_mnist")
    splits = {name: {"image": split["image"][:n, ..., 0], "label": split["label"][:n].astype(np.uint8)}
              for name, split, n in (("train", ds.train, num_train), ("test", ds.test, num_test))}
    return write_idx_dir(directory, splits)


# ---- train.py's library in tests: one smoke run, its state on the host, comparisons.


def smoke_config(data_dir, **overrides):
    """configs/smoke.py on `data_dir`, with one NaN batch at step index 5 (every run skips it:
    the counter must survive resumes), then `overrides`."""
    from configs import smoke

    config = smoke.get_config()
    config.dataset = data_dir
    config.debug_nan_step = 5
    for k, v in overrides.items():
        config[k] = v
    return config


def run_training(config, workdir):
    from jaxbn import train_lib

    return train_lib.train_and_evaluate(config, str(workdir))


def host(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def assert_trees_close(a, b, rtol=0.0, atol=0.0):
    """Leaf by leaf (exact by default), naming the first leaf that differs."""
    import jax

    flat_a, flat_b = jax.tree.leaves_with_path(host(a)), jax.tree.leaves(host(b))
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def read_metrics(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
