"""Batching: deterministic, resumable training batches and masked evaluation batches.

The order of epoch ``e`` is the permutation drawn from
``np.random.default_rng((seed, e))``, so the batch at any ``(seed, epoch, step)``
can be regenerated after a restart without replaying the epoch, and each of
``process_count`` hosts takes its contiguous share of every global batch.
Evaluation covers the test set exactly once, padding the last batch and marking
real rows with a boolean ``'mask'``. A split is a dict ``{'image': uint8
(N, H, W, C), 'label': int (N,)}`` as datasets.py loads it.

This module imports only NumPy and the standard library.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Iterator, Tuple

import numpy as np

__all__ = ["steps_per_epoch", "eval_steps", "train_batches", "eval_batches"]

Split = Dict[str, np.ndarray]
Batch = Dict[str, np.ndarray]


def _as_int(value: Any, arg: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{arg} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{arg} must be an int, got {value!r}") from None


def _check_sharding(
    global_batch_size: Any, process_index: Any, process_count: Any
) -> Tuple[int, int, int]:
    global_batch_size = _as_int(global_batch_size, "global_batch_size")
    process_index = _as_int(process_index, "process_index")
    process_count = _as_int(process_count, "process_count")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0:
        raise ValueError(f"process_count must be positive, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, {process_count - 1}] "
            f"(process_count={process_count}), got {process_index}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size must be divisible by process_count={process_count}, "
            f"got {global_batch_size}"
        )
    return global_batch_size, process_index, process_count


def _check_split(split: Any) -> int:
    if not isinstance(split, dict) or "image" not in split or "label" not in split:
        found = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise ValueError(f"split must be a dict with 'image' and 'label', got {found}")
    images, labels = split["image"], split["label"]
    if np.asarray(images).dtype != np.uint8:
        raise ValueError(f"split['image'] must be uint8, got {np.asarray(images).dtype}")
    if len(images) != len(labels):
        raise ValueError(
            f"split['image'] and split['label'] must have the same length, got "
            f"{len(images)} and {len(labels)}"
        )
    return len(labels)


def _to_batch(images: np.ndarray, labels: np.ndarray) -> Batch:
    return {
        "image": images.astype(np.float32) * np.float32(1.0 / 255.0),
        "label": labels.astype(np.int32),
    }


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full training batches in one epoch (the last partial one is dropped).

    Args:
      num_examples: size of the training split.
      global_batch_size: examples per step over all processes.

    Returns:
      ``num_examples // global_batch_size``.

    Raises:
      ValueError: global_batch_size is not positive, num_examples is negative,
        or no full batch fits in the split.
    """
    num_examples = _as_int(num_examples, "num_examples")
    global_batch_size = _as_int(global_batch_size, "global_batch_size")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if num_examples < global_batch_size:
        raise ValueError(
            f"global_batch_size must be at most the number of training examples "
            f"({num_examples}) so that an epoch has a full batch, got {global_batch_size}"
        )
    return num_examples // global_batch_size


def eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Number of evaluation batches covering every example (the last one padded).

    Args:
      num_examples: size of the evaluation split.
      global_batch_size: examples per batch over all processes.

    Returns:
      ``ceil(num_examples / global_batch_size)``.

    Raises:
      ValueError: global_batch_size is not positive or num_examples is negative.
    """
    num_examples = _as_int(num_examples, "num_examples")
    global_batch_size = _as_int(global_batch_size, "global_batch_size")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be non-negative, got {num_examples}")
    return -(-num_examples // global_batch_size)


def train_batches(
    split: Split,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Yields this process's share of each training batch of one epoch.

    The epoch's order is ``np.random.default_rng((seed, epoch)).permutation(N)``;
    global batch ``s`` is rows ``[s*B, (s+1)*B)`` of it and the last partial
    batch is dropped. Process ``p`` gets the contiguous rows
    ``[p*B/P, (p+1)*B/P)`` of each global batch, so the shares of all processes
    concatenate, in process order, to the single-process batch. Arguments are
    validated when the function is called, not on the first ``next()``.

    Args:
      split: ``{'image': uint8 (N, H, W, C), 'label': int (N,)}``.
      global_batch_size: B, examples per step over all processes.
      seed: non-negative int; with `epoch` it determines the order.
      epoch: non-negative int.
      process_index: this process, in ``[0, process_count)``.
      process_count: P, number of processes; must divide B.
      start_step: first step to yield, in ``[0, steps_per_epoch]``; earlier
        steps are skipped without touching data, for resuming mid-epoch.

    Returns:
      An iterator of ``{'image': float32 (B/P, H, W, C) in [0, 1],
      'label': int32 (B/P,)}``, ``steps_per_epoch(N, B) - start_step`` batches.

    Raises:
      ValueError: an argument is out of range (the message names it, the
        expected and the actual value).
    """
    n = _check_split(split)
    global_batch_size, process_index, process_count = _check_sharding(
        global_batch_size, process_index, process_count
    )
    seed, epoch = _as_int(seed, "seed"), _as_int(epoch, "epoch")
    start_step = _as_int(start_step, "start_step")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    num_steps = steps_per_epoch(n, global_batch_size)
    if not 0 <= start_step <= num_steps:
        raise ValueError(
            f"start_step must be in [0, {num_steps}] (steps per epoch), got {start_step}"
        )
    return _train_iter(split, n, global_batch_size, seed, epoch, process_index,
                       process_count, start_step, num_steps)


def _train_iter(split, n, global_batch_size, seed, epoch, process_index,
                process_count, start_step, num_steps) -> Iterator[Batch]:
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    local = global_batch_size // process_count
    images, labels = split["image"], split["label"]
    for step in range(start_step, num_steps):
        begin = step * global_batch_size + process_index * local
        idx = perm[begin : begin + local]
        yield _to_batch(images[idx], np.asarray(labels)[idx])


def eval_batches(
    split: Split,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yields this process's share of each evaluation batch, covering the split once.

    Global batch ``s`` is rows ``[s*B, (s+1)*B)`` in order; the last one is
    padded with zero images and label 0 to B rows. Process ``p`` gets rows
    ``[p*B/P, (p+1)*B/P)`` of each padded global batch (possibly all padding).
    Arguments are validated when the function is called.

    Args:
      split: ``{'image': uint8 (N, H, W, C), 'label': int (N,)}``.
      global_batch_size: B, examples per batch over all processes.
      process_index: this process, in ``[0, process_count)``.
      process_count: P, number of processes; must divide B.

    Returns:
      An iterator of ``eval_steps(N, B)`` batches ``{'image': float32
      (B/P, H, W, C) in [0, 1], 'label': int32 (B/P,), 'mask': bool (B/P,)}``,
      with ``mask`` True exactly for real (non-padding) rows.

    Raises:
      ValueError: an argument is out of range (the message names it, the
        expected and the actual value).
    """
    n = _check_split(split)
    global_batch_size, process_index, process_count = _check_sharding(
        global_batch_size, process_index, process_count
    )
    return _eval_iter(split, n, global_batch_size, process_index, process_count)


def _eval_iter(split, n, global_batch_size, process_index, process_count) -> Iterator[Batch]:
    local = global_batch_size // process_count
    images, labels = split["image"], np.asarray(split["label"])
    for step in range(eval_steps(n, global_batch_size)):
        begin = step * global_batch_size + process_index * local
        lo, hi = min(begin, n), min(begin + local, n)
        real = hi - lo
        batch = _to_batch(images[lo:hi], labels[lo:hi])
        if real < local:
            pad = local - real
            batch["image"] = np.concatenate(
                [batch["image"], np.zeros((pad,) + batch["image"].shape[1:], np.float32)]
            )
            batch["label"] = np.concatenate([batch["label"], np.zeros((pad,), np.int32)])
        batch["mask"] = np.arange(local) < real
        yield batch
