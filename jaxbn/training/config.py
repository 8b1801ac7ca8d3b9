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

__all__ = ["ConfigError", "APIS", "NORMS", "NORM_VARIANTS", "OPTIMIZERS", "SCHEDULES", "PARALLEL_MODES",
           "RUN_CONTROL_FIELDS", "REQUIRED_FIELDS", "VARIANT_FIELDS", "check_config", "config_dict",
           "save_config", "saved_config_diffs", "variant_field"]

APIS = ("linen", "nnx")  # the training path: steps.py (Linen) or nnx_steps.py (NNX)
NORMS = ("jaxbn", "flax")  # the two BatchNorm implementations (A/B runs)
# Other normalizations, for the studies in experiments/ (Linen path only): 'batch_renorm' is
# jaxbn.linen.BatchRenorm, 'group_norm' flax.linen.GroupNorm, 'none' no normalization layer.
NORM_VARIANTS = ("batch_renorm", "group_norm", "none")
_BATCH_STAT_NORMS = ("jaxbn", "flax", "batch_renorm")  # the norms that config.bn_sync applies to
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")

REQUIRED_FIELDS = (
    "dataset", "model", "norm", "parallel", "optimizer", "lr_schedule",
    "learning_rate", "global_batch_size", "eval_batch_size", "num_epochs",
    "num_train_steps", "bn_momentum", "bn_epsilon", "seed",
    "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
    "stop_after_steps", "debug_nan_step", "train_examples", "test_examples",
    "warmup_epochs", "momentum", "nesterov", "weight_decay", "progress_bar")

# Fields for the model and normalization variants (configs/default.py documents them). They
# are optional: a config, or a saved config.json, without one means the value here, which is
# what runs did before the field existed.
VARIANT_FIELDS = {
    "bn_sync": True,
    "renorm_warmup_steps": 5000,
    "group_norm_groups": 8,
    "cnn_norm_before_relu": False,
    "resnet_width": 16,
    "resnet_blocks": 3,
}

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
    saved, now = {**VARIANT_FIELDS, **saved}, {**VARIANT_FIELDS, **now}
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RUN_CONTROL_FIELDS and saved.get(k) != now.get(k)]


def variant_field(config: ml_collections.ConfigDict, name: str):
    """``config[name]`` for a field of `VARIANT_FIELDS`, or its default there when `config` lacks it."""
    return config.get(name, VARIANT_FIELDS[name])


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
    _choice(config, "norm", NORMS + NORM_VARIANTS)
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
    _check_variants(config)


def _check_variants(config) -> None:
    """The fields of `VARIANT_FIELDS`: types, ranges, and the models, norms and modes they fit."""
    v = {name: variant_field(config, name) for name in VARIANT_FIELDS}
    for name in ("bn_sync", "cnn_norm_before_relu"):
        if not isinstance(v[name], bool):
            raise ConfigError(f"config.{name} must be True or False, got {v[name]!r}")
    for name, least in (("renorm_warmup_steps", 0), ("group_norm_groups", 1), ("resnet_width", 1),
                        ("resnet_blocks", 1)):
        if not (isinstance(v[name], int) and not isinstance(v[name], bool) and v[name] >= least):
            raise ConfigError(f"config.{name} must be an int >= {least}, got {v[name]!r}")
    if not v["bn_sync"]:
        if config.norm not in _BATCH_STAT_NORMS:
            raise ConfigError(f"config.bn_sync=False (per-device statistics) applies to norm "
                              f"{list(_BATCH_STAT_NORMS)}, got norm={config.norm!r}")
        if config.parallel == "jit":
            raise ConfigError("config.bn_sync=False needs parallel 'shard_map' or 'pmap': under 'jit' "
                              "the step sees the whole batch and its statistics are global")
    if v["cnn_norm_before_relu"] and config.model != "cnn":
        raise ConfigError(f"config.cnn_norm_before_relu=True applies to model 'cnn', got {config.model!r}")
    resnet = [f"{name}={v[name]}" for name in ("resnet_width", "resnet_blocks")
              if v[name] != VARIANT_FIELDS[name]]
    if resnet and config.model != "resnet20":
        raise ConfigError(f"config.{' and config.'.join(resnet)} apply to model 'resnet20', got "
                          f"{config.model!r}")
    if config.get("api", "linen") == "nnx":
        changed = [f"{name}={v[name]!r}" for name in VARIANT_FIELDS if v[name] != VARIANT_FIELDS[name]]
        if config.norm not in NORMS or changed:
            what = ", ".join(([f"norm={config.norm!r}"] if config.norm not in NORMS else []) + changed)
            raise ConfigError(f"config.api='nnx' trains BatchNorm models only ({', '.join(NORMS)}) with the "
                              f"default variant fields; {what} need(s) api='linen'")


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
