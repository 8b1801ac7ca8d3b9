r"""Smoke test: a tiny MLP on 512 Fashion-MNIST images, 16 steps, seconds on a CPU.

Run:

  python train.py --config configs/smoke.py --workdir /tmp/jaxbn_smoke

Expected result: finishes in about 10-20 s (mostly compilation) with "Final
test accuracy: 60.67%" on the first 300 test images (measured with 1 device, 1
process x 8 devices and 2 processes x 4 devices, in every parallel mode, identical;
the same with --config.debug_nan_step=5, tests/test_train.py's reference run, which
checks this figure: update it when the run changes). 16 steps is far from
converged; it only proves the pipeline (data, synchronized BN, checkpoints,
metrics, plot). Used by tests/test_train.py and tests/test_multihost.py.

SGD rather than the default's Adam: the bias of the Dense layer before
BatchNorm has an exactly zero gradient (BN cancels it), so its computed gradient
is float rounding noise, which Adam normalizes into full-size steps. Runs that
differ only in summation order (parallel modes, process layouts) would then
disagree in that parameter and in the BN running mean; with SGD the noise moves
nothing and the tests can compare runs to float precision.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "mlp"
    config.train_examples = 512
    config.test_examples = 300  # not a multiple of the eval batch: the last one is padded
    config.global_batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 2  # 8 steps per epoch
    config.optimizer = "sgd"
    config.learning_rate = 0.05
    config.momentum = 0.9
    config.log_every_steps = 4
    config.checkpoint_every_steps = 5
    config.progress_bar = False
    return config
