r"""Smoke test: a tiny MLP on 512 Fashion-MNIST images, 16 steps, a few seconds on a CPU.

Run:

  python train.py --config configs/smoke.py --workdir /tmp/jaxbn_smoke

Expected result: finishes in seconds with "Final test accuracy" around 60-75 %
on the first 300 test images (16 steps is far from converged; it only proves the
pipeline: data, sync BN, checkpoints, metrics, plot). Used by tests/test_train.py
and tests/test_multihost.py.
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
    config.log_every_steps = 4
    config.checkpoint_every_steps = 3
    config.progress_bar = False
    return config
