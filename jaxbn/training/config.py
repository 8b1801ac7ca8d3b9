"""Checking a training config: the allowed choices, `check_config`, `ConfigError`.

The fields themselves are documented in configs/default.py. A run writes its
config to ``workdir/config.json``; `RUN_CONTROL_FIELDS` lists the fields that may
differ when the run is resumed (`saved_config_diffs` names any other difference,
and checkpoints.py refuses to resume then).
"""

from __future__ import annotations

import json
import os
from typing import List

import ml_collections

from jaxbn import models
from jaxbn.training.parallel import PARALLEL_MODES

__all__ = ["ConfigError", "APIS", "NORMS", "OPTIMIZERS", "SCHEDULES", "PARALLEL_MODES", "RUN_CONTROL_FIELDS",
           "REQUIRED_FIELDS", "check_config", "config_dict", "save_config", "saved_config_diffs"]

APIS = ("linen", "nnx")  # the training path: steps.py (Linen) or nnx_steps.py (NNX)
NORMS = ("jaxbn", "flax")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")

REQUIRED_FIELDS = (
    "dataset", "model", "norm", "parallel", "optimizer", "lr_schedule",
    "learning_rate", "global_batch_size", "eval_batch_size", "num_epochs",
    "num_train_steps", "bn_momentum", "bn_epsilon", "seed",
    "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
    "stop_after_steps", "debug_nan_step", "train_examples", "test_examples",
    "warmup_epochs", "momentum", "nesterov", "weight_decay", "progress_bar")

# Config fields that may change when a run is resumed: they do not change the
# trajectory of the parameters.
RUN_CONTROL_FIELDS = frozenset({
    "stop_after_steps", "log_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "progress_bar", "eval_batch_size",
})


class ConfigError(ValueError):
    """A config field has an invalid value or does not fit the devices/data."""


def check_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Validates `config` for `num_devices` devices over `process_count` processes.

    Raises:
      ConfigError: a field is missing or out of range, or the global batch does
        not split evenly over the devices. The message names the field, the
        expected and the actual value.
    """
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ConfigError(f"config is missing fields {missing}; start from configs/default.py")
    _check_choices(config)
    _check_ranges(config)
    _check_batch_split(config.global_batch_size, num_devices, process_count)


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """`config` as the plain dict that workdir/config.json holds."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def save_config(config: ml_collections.ConfigDict, path: str) -> None:
    """Writes `config_dict(config)` to `path` (workdir/config.json)."""
    with open(path, "w") as f:
        json.dump(config_dict(config), f, indent=2, sort_keys=True)


def saved_config_diffs(config: ml_collections.ConfigDict, path: str) -> List[str]:
    """``"field: saved X, now Y"`` for each field outside `RUN_CONTROL_FIELDS` in which
    the config saved at `path` differs from `config`; none when `path` does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    now = config_dict(config)
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RUN_CONTROL_FIELDS and saved.get(k) != now.get(k)]


def _choice(config, field, choices):
    value = config[field]
    if value not in choices:
        raise ConfigError(f"config.{field} must be one of {list(choices)}, got {value!r}")


def _positive(config, field, allow_zero=False, allow_minus_one=False):
    value = config[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > 0 or (allow_zero and value == 0) or (allow_minus_one and value == -1))
    if not ok:
        what = "positive" + (" or 0" if allow_zero else "") + (" or -1" if allow_minus_one else "")
        raise ConfigError(f"config.{field} must be {what}, got {value!r}")


def _check_choices(config) -> None:
    _choice(config, "model", tuple(models.MODELS))
    _choice(config, "norm", NORMS)
    if "api" in config:  # configs written before the field existed mean 'linen'
        _choice(config, "api", APIS)
    _choice(config, "parallel", PARALLEL_MODES)
    _choice(config, "optimizer", OPTIMIZERS)
    _choice(config, "lr_schedule", SCHEDULES)


def _check_ranges(config) -> None:
    for field in ("global_batch_size", "eval_batch_size", "learning_rate", "log_every_steps",
                  "checkpoint_every_steps", "max_checkpoints_to_keep"):
        _positive(config, field)
    _positive(config, "num_epochs", allow_zero=True)
    _positive(config, "num_train_steps", allow_minus_one=True)
    for field in ("train_examples", "test_examples"):
        _positive(config, field, allow_zero=True)
    if config.num_epochs == 0 and config.num_train_steps == -1:
        raise ConfigError("set config.num_epochs > 0 or config.num_train_steps > 0, got "
                          f"num_epochs={config.num_epochs} and num_train_steps={config.num_train_steps}")
    if not 0.0 <= config.bn_momentum <= 1.0:
        raise ConfigError(f"config.bn_momentum must be in [0, 1] (Flax convention: weight of the "
                          f"old running value), got {config.bn_momentum!r}")
    if not config.bn_epsilon >= 0:
        raise ConfigError(f"config.bn_epsilon must be >= 0, got {config.bn_epsilon!r}")
    if not config.warmup_epochs >= 0:
        raise ConfigError(f"config.warmup_epochs must be >= 0, got {config.warmup_epochs!r}")
    if not (isinstance(config.seed, int) and config.seed >= 0):
        raise ConfigError(f"config.seed must be a non-negative int, got {config.seed!r}")


def _check_batch_split(b: int, num_devices: int, process_count: int) -> None:
    if b % num_devices:
        lo, hi = (b // num_devices) * num_devices, (b // num_devices + 1) * num_devices
        hint = f"{lo} or {hi}" if lo else f"{hi}"
        raise ConfigError(
            f"config.global_batch_size={b} must be divisible by the number of devices "
            f"({num_devices} over {process_count} process(es)) so that every device gets the same "
            f"number of examples; use e.g. {hint}")
    if b % process_count:
        raise ConfigError(f"config.global_batch_size={b} must be divisible by the number of "
                          f"processes ({process_count})")
