"""Image-classification data: IDX (MNIST-format) files, TFDS, deterministic batching.

The code lives in `jaxbn.training.datasets` (loading) and `jaxbn.training.batches`
(batching); see their docstrings. This module re-exports their public names.
"""

from jaxbn.training.batches import eval_batches, eval_steps, steps_per_epoch, train_batches
from jaxbn.training.datasets import (
    DEFAULT_DATA_DIR,
    DataError,
    Dataset,
    load_dataset,
    load_idx_dataset,
    load_tfds_dataset,
    read_idx,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "DataError",
    "Dataset",
    "read_idx",
    "load_idx_dataset",
    "load_tfds_dataset",
    "load_dataset",
    "steps_per_epoch",
    "eval_steps",
    "train_batches",
    "eval_batches",
]
