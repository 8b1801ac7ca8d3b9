"""Tests for jaxbn.training.datasets and jaxbn.training.batches (re-exported as jaxbn.data): IDX
reading, dataset loading and deterministic batching."""

import builtins
import gzip
import os
import sys

import numpy as np
import pytest

from helpers import idx_bytes, write_file, write_idx_dir
from jaxbn.training import batches as batching, datasets
from jaxbn.training.datasets import DataError


def _make_split(rng, n, hw=(28, 28)):
    return {
        "image": rng.integers(0, 256, size=(n, *hw), dtype=np.uint8),
        "label": rng.integers(0, 10, size=(n,), dtype=np.uint8),
    }


def _write_dir(directory, *, compress=True, n_train=12, n_test=5, dotted=False, seed=0):
    rng = np.random.default_rng(seed)
    splits = {"train": _make_split(rng, n_train), "test": _make_split(rng, n_test)}
    write_idx_dir(directory, splits, compress=compress, dotted=dotted)
    return splits


def test_jaxbn_data_reexports_the_public_names():
    import jaxbn.data

    assert sorted(jaxbn.data.__all__) == sorted(datasets.__all__ + batching.__all__)
    for module in (datasets, batching):
        assert all(getattr(jaxbn.data, name) is getattr(module, name) for name in module.__all__)


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype,shape", [
    (np.uint8, (7, 4, 3)), (np.uint8, (9,)), (np.int16, (3, 2)),
    (np.int32, (5,)), (np.float32, (2, 3)), (np.float64, (4,)), (np.int8, (2, 2, 2, 2)),
])
def test_read_idx_round_trip(tmp_path, compress, dtype, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_file(tmp_path / ("x.gz" if compress else "x"), idx_bytes(arr), compress)
    out = datasets.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_detects_compression_from_content(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw_named_gz = write_file(tmp_path / "raw.gz", idx_bytes(arr), compress=False)
    gz_named_raw = write_file(tmp_path / "gz", idx_bytes(arr), compress=True)
    np.testing.assert_array_equal(datasets.read_idx(raw_named_gz), arr)
    np.testing.assert_array_equal(datasets.read_idx(gz_named_raw), arr)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_truncated_payload(tmp_path, compress):
    payload = idx_bytes(np.zeros((4, 5, 5), np.uint8))
    path = write_file(tmp_path / "imgs", payload[:-3], compress)
    with pytest.raises(DataError) as e:
        datasets.read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg
    assert f"expected {len(payload)} bytes" in msg and f"found {len(payload) - 3}" in msg


def test_read_idx_trailing_bytes(tmp_path):
    payload = idx_bytes(np.zeros((3,), np.uint8)) + b"\x00"
    path = write_file(tmp_path / "labels", payload, compress=False)
    with pytest.raises(DataError, match="trailing data.*expected 11 bytes.*found 12"):
        datasets.read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="gzip") as e:
        datasets.read_idx(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("payload,match", [
    (b"\x00\x00", "at least a 4-byte header, found 2 bytes"),
    (b"\x01\x02\x08\x01" + b"\x00" * 8, "bad IDX magic number.*found 0x01020801"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX type code.*found 0x07"),
    (b"\x00\x00\x08\x00", "expected at least 1 dimension"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header: expected 16 bytes"),
    (b"", "found 0 bytes"),
])
def test_read_idx_corrupt_header(tmp_path, payload, match):
    path = write_file(tmp_path / "bad-idx", payload, compress=False)
    with pytest.raises(DataError, match=match) as e:
        datasets.read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        datasets.read_idx(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------
# load_idx_dataset / load_dataset
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress,dotted", [(True, False), (False, False), (True, True), (False, True)])
def test_load_idx_dataset_round_trip(tmp_path, compress, dotted):
    splits = _write_dir(tmp_path / "d", compress=compress, dotted=dotted)
    out = datasets.load_idx_dataset(tmp_path / "d")
    assert set(out) == {"train", "test"}
    for split, n in (("train", 12), ("test", 5)):
        assert out[split]["image"].dtype == np.uint8
        assert out[split]["image"].shape == (n, 28, 28, 1)
        assert out[split]["label"].dtype == np.int32
        np.testing.assert_array_equal(out[split]["image"][..., 0], splits[split]["image"])
        np.testing.assert_array_equal(out[split]["label"], splits[split]["label"])


def test_load_dataset_names(tmp_path):
    _write_dir(tmp_path / "d")
    for name, expected in ((str(tmp_path / "d"), f"idx:{tmp_path / 'd'}"),
                           (f"idx:{tmp_path / 'd'}", f"idx:{tmp_path / 'd'}")):
        ds = datasets.load_dataset(name)
        assert isinstance(ds, datasets.Dataset)
        assert ds.name == expected
        assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
        assert ds.train["image"].shape == (12, 28, 28, 1)
        assert ds.test["label"].shape == (5,)
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*tfds:NAME"):
        datasets.load_dataset("mnist")


def test_missing_directory_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        datasets.load_idx_dataset(missing)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "Put the four MNIST-format IDX files" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "apt-get" not in msg


def test_missing_default_directory_message(monkeypatch, tmp_path):
    fake_default = str(tmp_path / "fashion-mnist")
    monkeypatch.setattr(datasets, "DEFAULT_DATA_DIR", fake_default)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        datasets.load_dataset("fashion_mnist")
    assert fake_default in str(e.value)


def test_missing_file_message(tmp_path):
    _write_dir(tmp_path / "d")
    os.remove(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as e:
        datasets.load_idx_dataset(tmp_path / "d")
    msg = str(e.value)
    assert "missing t10k-labels-idx1-ubyte" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(tmp_path / "d") in msg
    assert "Put the four MNIST-format IDX files" in msg


def test_count_mismatch_and_label_range(tmp_path):
    d = tmp_path / "d"
    _write_dir(d)
    write_file(d / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros((4,), np.uint8)), True)
    with pytest.raises(DataError, match="found 5 images .* and 4 labels"):
        datasets.load_idx_dataset(d)
    write_file(d / "t10k-labels-idx1-ubyte.gz",
               idx_bytes(np.array([0, 1, 2, 10, 3], np.uint8)), True)
    with pytest.raises(DataError, match=r"expected labels in \[0, 9\].*\[0, 10\]"):
        datasets.load_idx_dataset(d)


def test_corrupt_file_in_dataset_names_file(tmp_path):
    d = tmp_path / "d"
    _write_dir(d, compress=False)
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        datasets.load_idx_dataset(d)
    assert str(path) in str(e.value)


@pytest.mark.skipif(not os.path.isdir(datasets.DEFAULT_DATA_DIR),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = datasets.load_dataset("fashion_mnist")
    assert ds.name == "fashion_mnist"
    assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert ds.train["image"].shape == (60000, 28, 28, 1)
    assert ds.test["image"].shape == (10000, 28, 28, 1)
    assert ds.train["image"].dtype == np.uint8
    for split in (ds.train, ds.test):
        assert split["label"].dtype == np.int32
        assert split["label"].min() == 0 and split["label"].max() == 9
    assert set(np.bincount(ds.train["label"])) == {6000}


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def _indexed_split(n, hw=(2, 2)):
    """A split whose first pixel encodes the example index (n <= 256)."""
    image = np.zeros((n, *hw, 1), np.uint8)
    image[:, 0, 0, 0] = np.arange(n)
    return {"image": image, "label": (np.arange(n) % 10).astype(np.int32)}


def _ids(batch):
    return np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int)


def test_train_batches_format_and_determinism():
    split = _indexed_split(103)
    kw = dict(global_batch_size=10, seed=3)
    a = list(batching.train_batches(split, epoch=0, **kw))
    b = list(batching.train_batches(split, epoch=0, **kw))
    c = list(batching.train_batches(split, epoch=1, **kw))
    assert len(a) == batching.steps_per_epoch(103, 10) == 10
    for batch in a:
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (10, 2, 2, 1)
        assert batch["label"].dtype == np.int32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        np.testing.assert_array_equal(batch["label"], _ids(batch) % 10)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    ids_a = np.concatenate([_ids(x) for x in a])
    ids_c = np.concatenate([_ids(x) for x in c])
    assert not np.array_equal(ids_a, ids_c)
    expected = np.random.default_rng((3, 0)).permutation(103)[:100]
    np.testing.assert_array_equal(ids_a, expected)
    for ids in (ids_a, ids_c):
        assert len(np.unique(ids)) == len(ids) == 100


def test_train_batches_pixel_scaling():
    split = {"image": np.array([0, 51, 255], np.uint8).reshape(3, 1, 1, 1),
             "label": np.zeros(3, np.int32)}
    (batch,) = batching.train_batches(split, global_batch_size=3, seed=0, epoch=0)
    assert sorted(batch["image"].ravel().tolist()) == pytest.approx([0.0, 0.2, 1.0])


def test_train_batches_process_shares_concatenate():
    split = _indexed_split(50)
    kw = dict(global_batch_size=8, seed=7, epoch=2)
    full = list(batching.train_batches(split, **kw))
    p0 = list(batching.train_batches(split, process_index=0, process_count=2, **kw))
    p1 = list(batching.train_batches(split, process_index=1, process_count=2, **kw))
    assert len(full) == len(p0) == len(p1) == 6
    for f, x, y in zip(full, p0, p1):
        assert x["image"].shape[0] == y["image"].shape[0] == 4
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([x[key], y[key]]), f[key])


def test_train_batches_start_step_resumes():
    split = _indexed_split(64)
    kw = dict(global_batch_size=8, seed=11, epoch=5)
    full = list(batching.train_batches(split, **kw))
    resumed = list(batching.train_batches(split, start_step=3, **kw))
    assert len(resumed) == 5
    for x, y in zip(full[3:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert list(batching.train_batches(split, start_step=8, **kw)) == []


def test_eval_batches_cover_once_with_mask():
    split = _indexed_split(23)
    batches = list(batching.eval_batches(split, global_batch_size=10))
    assert len(batches) == batching.eval_steps(23, 10) == 3
    for b in batches:
        assert set(b) == {"image", "label", "mask"}
        assert b["image"].shape == (10, 2, 2, 1) and b["mask"].dtype == np.bool_
    ids = np.concatenate([_ids(b)[b["mask"]] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(23))
    assert batches[-1]["mask"].tolist() == [True] * 3 + [False] * 7
    assert not batches[-1]["image"][3:].any() and not batches[-1]["label"][3:].any()
    # Exact multiple: no padding, every batch still has a mask.
    exact = list(batching.eval_batches(_indexed_split(20), global_batch_size=10))
    assert len(exact) == 2 and all(b["mask"].all() for b in exact)


@pytest.mark.parametrize("n", [23, 13, 3])
def test_eval_batches_process_shares(n):
    split = _indexed_split(n)
    full = list(batching.eval_batches(split, global_batch_size=10))
    shares = [list(batching.eval_batches(split, global_batch_size=10, process_index=p,
                                     process_count=2)) for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(full)
    seen = []
    for f, x, y in zip(full, *shares):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([x[key], y[key]]), f[key])
        seen += [_ids(x)[x["mask"]], _ids(y)[y["mask"]]]
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch_size=0), "global_batch_size must be positive, got 0"),
    (dict(global_batch_size=-4), "global_batch_size must be positive, got -4"),
    (dict(global_batch_size=10, process_count=3), "divisible by process_count=3, got 10"),
    (dict(global_batch_size=10, process_index=2, process_count=2),
     r"process_index must be in \[0, 1\].*got 2"),
    (dict(global_batch_size=10, process_index=-1), r"process_index must be in \[0, 0\].*got -1"),
    (dict(global_batch_size=10, process_count=0), "process_count must be positive, got 0"),
    (dict(global_batch_size=2.5), "global_batch_size must be an int, got 2.5"),
])
def test_batching_argument_errors(kwargs, match):
    split = _indexed_split(30)
    with pytest.raises(ValueError, match=match):
        batching.train_batches(split, seed=0, epoch=0, **kwargs)  # raises before next()
    with pytest.raises(ValueError, match=match):
        batching.eval_batches(split, **kwargs)


def test_train_batches_specific_errors():
    split = _indexed_split(30)
    kw = dict(global_batch_size=10)
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 3\].*got 4"):
        batching.train_batches(split, seed=0, epoch=0, start_step=4, **kw)
    with pytest.raises(ValueError, match="seed must be non-negative, got -1"):
        batching.train_batches(split, seed=-1, epoch=0, **kw)
    with pytest.raises(ValueError, match="epoch must be non-negative, got -2"):
        batching.train_batches(split, seed=0, epoch=-2, **kw)
    with pytest.raises(ValueError, match=r"at most the number of training examples \(30\).*got 40"):
        batching.train_batches(split, seed=0, epoch=0, global_batch_size=40)
    with pytest.raises(ValueError, match="same length, got 30 and 29"):
        batching.train_batches({"image": split["image"], "label": split["label"][:-1]},
                           seed=0, epoch=0, **kw)
    with pytest.raises(ValueError, match="must be uint8, got float32"):
        batching.eval_batches({"image": split["image"].astype(np.float32),
                           "label": split["label"]}, **kw)
    assert batching.steps_per_epoch(np.int64(30), 10) == 3
    assert batching.eval_steps(0, 10) == 0


# ---------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------


def _tfds_available():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _tfds_available(), reason="tensorflow_datasets not installed")
def test_tfds_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        ds = datasets.load_dataset("tfds:mnist")
    assert ds.name == "tfds:mnist" and ds.num_classes == 10
    assert ds.image_shape == (28, 28, 1)
    for split in (ds.train, ds.test):
        assert split["image"].dtype == np.uint8 and split["image"].shape[1:] == (28, 28, 1)
        assert split["label"].dtype == np.int32
        assert split["label"].shape == split["image"].shape[:1]
    batch = next(batching.eval_batches(ds.test, global_batch_size=8))
    assert batch["image"].shape == (8, 28, 28, 1)


def test_tfds_missing_message(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorflow_datasets" or name.startswith("tensorflow_datasets."):
            raise ImportError("No module named 'tensorflow_datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError) as e:
        datasets.load_dataset("tfds:cifar10")
    msg = str(e.value)
    assert "tfds:cifar10" in msg and "tensorflow_datasets" in msg
    assert "pip install 'jaxbn[tfds]'" in msg


@pytest.mark.parametrize("module", [datasets, batching], ids=["datasets", "batches"])
def test_module_imports_only_numpy_and_stdlib(module):
    import subprocess
    import sys

    code = ("import sys, importlib.util\n"
            "spec = importlib.util.spec_from_file_location('d', %r)\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "bad = [k for k in ('jax', 'tensorflow', 'tensorflow_datasets', 'flax')"
            " if k in sys.modules]\n"
            "assert not bad, bad\n") % module.__file__
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tfds_code_path_with_a_stand_in_module(monkeypatch):
    """The TFDS branch, offline and without TensorFlow: a stand-in for the two tfds calls
    jaxbn makes (`load(..., batch_size=-1, with_info=True)` and `as_numpy`)."""
    import types

    rng = np.random.default_rng(0)
    fake_splits = {
        "train": {"image": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, 6)},
        "test": {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, 4)},
    }
    calls = []

    def load(name, *, split, batch_size, as_supervised, with_info, data_dir):
        calls.append((name, tuple(split), batch_size, as_supervised, with_info))
        info = types.SimpleNamespace(features={"label": types.SimpleNamespace(num_classes=10)})
        return [fake_splits[s] for s in split], info

    fake = types.SimpleNamespace(load=load, as_numpy=lambda d: d)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = datasets.load_dataset("tfds:cifar10")
    assert calls == [("cifar10", ("train", "test"), -1, False, True)]
    assert ds.name == "tfds:cifar10" and ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(ds.train["image"], fake_splits["train"]["image"])
    assert ds.test["label"].dtype == np.int32
    batch = next(batching.train_batches(ds.train, global_batch_size=2, seed=0, epoch=0))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    fake_splits["test"] = {"image": fake_splits["test"]["image"].astype(np.float32), "label": fake_splits["test"]["label"]}
    with pytest.raises(datasets.DataError, match="tfds:cifar10 test: expected uint8 images"):
        datasets.load_dataset("tfds:cifar10")
