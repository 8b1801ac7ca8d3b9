"""Datasets: IDX (MNIST-format) files, TFDS, `load_dataset`, `Dataset`, `DataError`.

Loading puts a whole dataset in host memory as NumPy arrays::

    ds = load_dataset("fashion_mnist")      # /usr/share/datasets/fashion-mnist
    ds = load_dataset("path/to/mnist")      # a directory of IDX files
    ds = load_dataset("tfds:cifar10")       # needs `pip install 'jaxbn[tfds]'`

Each split is a dict ``{'image': uint8 (N, H, W, C), 'label': int32 (N,)}``;
batches.py cuts them into training and evaluation batches.

Why plain NumPy rather than ``grain``: the datasets targeted here (60k-image
MNIST-size data) fit in memory, a deterministic resumable permutation with
per-process sharding is a few lines (batches.py), and it adds no dependency.
``grain`` pays off for datasets that must be streamed from disk or need worker
processes for heavy per-example augmentation, neither of which applies.

This module imports only NumPy and the standard library; ``tensorflow_datasets``
is imported only when a ``tfds:`` dataset is requested.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

__all__ = [
    "DEFAULT_DATA_DIR",
    "DataError",
    "Dataset",
    "read_idx",
    "load_idx_dataset",
    "load_tfds_dataset",
    "load_dataset",
]

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

Split = Dict[str, np.ndarray]


class DataError(ValueError):
    """A dataset is missing, unreadable or malformed."""


class Dataset(NamedTuple):
    """An in-memory dataset with its metadata."""

    train: Split  # {'image': uint8 (N, H, W, C), 'label': int32 (N,)}
    test: Split  # same format
    num_classes: int  # labels lie in [0, num_classes)
    image_shape: Tuple[int, int, int]  # (H, W, C)
    name: str  # e.g. 'fashion_mnist', 'idx:/data/mnist', 'tfds:cifar10'


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------

# IDX type code -> big-endian dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: "os.PathLike[str] | str") -> np.ndarray:
    """Reads one IDX (MNIST-format) file, gzip-compressed or raw.

    Compression is detected from the content (gzip magic bytes), not the name.
    The header (two zero bytes, type code, number of dimensions, big-endian
    uint32 sizes) is validated and the payload must have exactly the size the
    header announces.

    Args:
      path: the file to read.

    Returns:
      A writable array with the file's shape, in native byte order (uint8 for
      MNIST images and labels).

    Raises:
      DataError: the file is missing or unreadable, the gzip stream is corrupt
        or truncated, the header is invalid, or the payload is shorter or longer
        than the header announces. The message names the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e

    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path}: corrupt or truncated gzip stream (expected a complete "
                f"gzip-compressed IDX file, {len(raw)} compressed bytes found): {e}"
            ) from e
    else:
        data = raw

    if len(data) < 4:
        raise DataError(
            f"{path}: expected an IDX file with at least a 4-byte header, "
            f"found {len(data)} bytes"
        )
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic number: expected 0x0000TTNN (two zero bytes, "
            f"type code, number of dimensions), found 0x{magic:08x}"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(
            f"{path}: unknown IDX type code: expected one of {known}, found 0x{code:02x}"
        )
    if ndim == 0:
        raise DataError(f"{path}: expected at least 1 dimension in the IDX header, found 0")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_len} bytes for "
            f"{ndim} dimensions, found {len(data)} bytes"
        )
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected = header_len + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing data after payload"
        raise DataError(
            f"{path}: {what}: expected {expected} bytes ({header_len}-byte header + "
            f"shape {shape} of {dtype.name}), found {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header_len)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


# Standard MNIST/Fashion-MNIST file names, and the dot variant used by some mirrors.
_IDX_FILES = {
    ("train", "image"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "label"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "image"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "label"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _missing_hint(directory: str) -> str:
    if _same_path(directory, DEFAULT_DATA_DIR):
        return (
            "Fashion-MNIST is not installed: install it with "
            "`apt-get install dataset-fashion-mnist`."
        )
    names = ", ".join(names[0] for names in _IDX_FILES.values())
    return (
        f"Put the four MNIST-format IDX files ({names}; each raw or gzipped "
        f"with a .gz suffix) in {directory}."
    )


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(b)


def _find_idx_file(directory: str, names: Tuple[str, ...]) -> str:
    candidates = [c for name in names for c in (name + ".gz", name)]
    for candidate in candidates:
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"{directory} is missing {names[0]} (looked for {', '.join(candidates)}). "
        + _missing_hint(directory)
    )


def load_idx_dataset(
    directory: "os.PathLike[str] | str", *, num_classes: int = 10
) -> Dict[str, Split]:
    """Loads the train and test splits of an MNIST-format IDX directory.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each either
    gzipped (``NAME.gz``) or raw; the ``train-images.idx3-ubyte`` dot variant is
    accepted too.

    Args:
      directory: the directory holding the four files.
      num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
      ``{'train': split, 'test': split}`` with each split
      ``{'image': uint8 (N, H, W, 1), 'label': int32 (N,)}``.

    Raises:
      DataError: the directory or a file is missing (the message says which and
        how to get it), a file is malformed, image and label counts differ, or a
        label is out of range.
    """
    directory = os.path.expanduser(os.fspath(directory))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise DataError(f"IDX data directory {directory} {what}. " + _missing_hint(directory))
    paths = {key: _find_idx_file(directory, names) for key, names in _IDX_FILES.items()}

    out: Dict[str, Split] = {}
    for split in ("train", "test"):
        image_path, label_path = paths[(split, "image")], paths[(split, "label")]
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{image_path}: expected uint8 images of shape (N, H, W) or "
                f"(N, H, W, C), found {images.dtype} with shape {images.shape}"
            )
        if images.ndim == 3:
            images = images[..., None]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{label_path}: expected integer labels of shape (N,), found "
                f"{labels.dtype} with shape {labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{split} split in {directory}: expected as many labels as images, "
                f"found {images.shape[0]} images in {image_path} and "
                f"{labels.shape[0]} labels in {label_path}"
            )
        _check_labels(labels, num_classes, label_path)
        out[split] = {"image": images, "label": labels.astype(np.int32)}
    if out["train"]["image"].shape[1:] != out["test"]["image"].shape[1:]:
        raise DataError(
            f"{directory}: expected train and test images of the same shape, found "
            f"{out['train']['image'].shape[1:]} and {out['test']['image'].shape[1:]}"
        )
    return out


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: expected labels in [0, {num_classes - 1}], found labels in "
            f"[{labels.min()}, {labels.max()}]"
        )


# ---------------------------------------------------------------------------
# TFDS and dataset names
# ---------------------------------------------------------------------------


def load_tfds_dataset(name: str, *, data_dir: Optional[str] = None) -> Dataset:
    """Loads the train and test splits of a TFDS dataset into memory.

    Uses ``tfds.load(name, split=['train', 'test'], batch_size=-1,
    as_supervised=False)`` and ``tfds.as_numpy``; the dataset must have
    ``'image'`` and ``'label'`` features. TFDS may download it on first use.

    Args:
      name: the TFDS name, e.g. ``'mnist'`` or ``'cifar10'``.
      data_dir: TFDS data directory (TFDS's default when None).

    Returns:
      A `Dataset` named ``'tfds:NAME'`` with uint8 images (N, H, W, C) and int32
      labels.

    Raises:
      DataError: tensorflow_datasets is not installed, or the dataset lacks
        uint8 ``'image'``/integer ``'label'`` features.
    """
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataError(
            f"loading 'tfds:{name}' needs tensorflow_datasets, which is not "
            f"installed ({e}); install it with `pip install 'jaxbn[tfds]'`, or use "
            f"'fashion_mnist' or a directory of MNIST-format IDX files instead"
        ) from e

    (train_ds, test_ds), info = tfds.load(
        name,
        split=["train", "test"],
        batch_size=-1,
        as_supervised=False,
        with_info=True,
        data_dir=data_dir,
    )
    splits: Dict[str, Split] = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        ex = tfds.as_numpy(ds)
        if "image" not in ex or "label" not in ex:
            raise DataError(
                f"tfds:{name} {split}: expected 'image' and 'label' features, "
                f"found {sorted(ex)}"
            )
        images, labels = np.asarray(ex["image"]), np.asarray(ex["label"])
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"tfds:{name} {split}: expected uint8 images of shape (N, H, W, C), "
                f"found {images.dtype} with shape {images.shape}"
            )
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"tfds:{name} {split}: expected integer labels of shape "
                f"{images.shape[:1]}, found {labels.dtype} with shape {labels.shape}"
            )
        splits[split] = {"image": images, "label": labels.astype(np.int32)}

    num_classes = getattr(info.features["label"], "num_classes", None)
    if num_classes is None:
        num_classes = int(max(s["label"].max(initial=-1) for s in splits.values())) + 1
    for split, s in splits.items():
        _check_labels(s["label"], num_classes, f"tfds:{name} {split}")
    return Dataset(
        train=splits["train"],
        test=splits["test"],
        num_classes=int(num_classes),
        image_shape=tuple(int(d) for d in splits["train"]["image"].shape[1:]),
        name=f"tfds:{name}",
    )


def load_dataset(name: str = "fashion_mnist") -> Dataset:
    """Loads a dataset by name into memory.

    Args:
      name: one of

        * ``'fashion_mnist'``: the IDX files in `DEFAULT_DATA_DIR` (Debian
          package ``dataset-fashion-mnist``);
        * ``'idx:PATH'`` or a directory path: MNIST-format IDX files in PATH
          (see `load_idx_dataset`);
        * ``'tfds:NAME'``: a TFDS dataset such as ``tfds:mnist`` or
          ``tfds:cifar10`` (needs ``pip install 'jaxbn[tfds]'``).

    Returns:
      A `Dataset` with uint8 images (N, H, W, C) and int32 labels.

    Raises:
      DataError: the name is not recognised, or loading fails (see
        `load_idx_dataset` and `load_tfds_dataset`).
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"dataset name must be a non-empty string, got {name!r}")
    if name.startswith("tfds:"):
        return load_tfds_dataset(name[len("tfds:"):])
    if name == "fashion_mnist":
        directory, label = DEFAULT_DATA_DIR, "fashion_mnist"
    elif name.startswith("idx:"):
        directory = name[len("idx:"):]
        label = name
    elif os.sep in name or "/" in name or name.startswith(("~", ".")) or os.path.isdir(name):
        directory, label = name, f"idx:{name}"
    else:
        raise DataError(
            f"unknown dataset {name!r}: expected 'fashion_mnist', a directory of "
            f"MNIST-format IDX files, 'idx:PATH' or 'tfds:NAME' (e.g. 'tfds:mnist')"
        )
    splits = load_idx_dataset(directory)
    return Dataset(
        train=splits["train"],
        test=splits["test"],
        num_classes=10,
        image_shape=tuple(int(d) for d in splits["train"]["image"].shape[1:]),
        name=label,
    )
