"""Data-parallel training of `jaxbn.models` with synchronized BatchNorm, one file per job.

    config.py       ConfigError, check_config, the allowed choices, RUN_CONTROL_FIELDS, config.json
    datasets.py     loading data: IDX files, TFDS, load_dataset, Dataset, DataError (NumPy only)
    batches.py      deterministic, resumable, per-process batching (NumPy only)
    parallel.py     the parallel modes 'shard_map', 'pmap', 'jit' as objects (MODES), the mesh
    state.py        create_model, the learning-rate schedule, the optimizer, TrainState
    steps.py        train_step, eval_step, Steps, make_steps, evaluate
    nnx_state.py    the NNX path (config.api='nnx'): NNX model, NNXTrainer, NNXTrainState
    nnx_steps.py    the NNX path's nnx.jit train/eval steps, NNXSteps, nnx_steps_for
    checkpoints.py  the orbax manager, save/restore, CheckpointError, the resume check
    metrics.py      metrics.jsonl, its plot, the progress bar
    distributed.py  initialize_distributed (several processes)
    loop.py         train_and_evaluate(config, workdir)

Import the module you need (``from jaxbn.training import loop``); this package
imports none of them, so that ``jaxbn.training.datasets`` and
``batches`` need only NumPy.
`jaxbn.train_lib` and `jaxbn.data` re-export the public names in one place.
"""
