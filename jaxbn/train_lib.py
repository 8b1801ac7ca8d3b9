"""Data-parallel training of `jaxbn.models` with synchronized BatchNorm (names kept for imports).

The code lives in `jaxbn.training`, one module per job (see its docstring);
this module re-exports its public names: `train_and_evaluate(config, workdir)`
(loop.py) and the small functions tests and notebooks use on their own.
"""

from jaxbn.training.checkpoints import CheckpointError, checkpoint_manager, restore_checkpoint
from jaxbn.training.config import NORMS, ConfigError, check_config
from jaxbn.training.distributed import initialize_distributed
from jaxbn.training.loop import train_and_evaluate
from jaxbn.training.metrics import save_plot
from jaxbn.training.parallel import AXIS, PARALLEL_MODES, make_mesh
from jaxbn.training.state import (TrainState, create_learning_rate_schedule, create_model,
                                  create_optimizer, create_train_state)
from jaxbn.training.steps import Steps, eval_step, evaluate, make_steps, train_step

__all__ = [
    "AXIS",
    "PARALLEL_MODES",
    "NORMS",
    "ConfigError",
    "CheckpointError",
    "TrainState",
    "check_config",
    "create_model",
    "create_learning_rate_schedule",
    "create_optimizer",
    "create_train_state",
    "train_step",
    "eval_step",
    "Steps",
    "make_steps",
    "make_mesh",
    "checkpoint_manager",
    "restore_checkpoint",
    "evaluate",
    "save_plot",
    "initialize_distributed",
    "train_and_evaluate",
]
