"""Image-classification data: IDX (MNIST-format) files, TFDS, deterministic batching.

The code lives in `jaxbn.training.data` (see its docstring); this module
re-exports its public names.
"""

from jaxbn.training.data import (
    DEFAULT_DATA_DIR,
    DataError,
    Dataset,
    eval_batches,
    eval_steps,
    load_dataset,
    load_idx_dataset,
    load_tfds_dataset,
    read_idx,
    steps_per_epoch,
    train_batches,
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
