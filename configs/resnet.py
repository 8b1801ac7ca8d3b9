r"""ResNet-20 (He et al. 2016) on Fashion-MNIST: SGD with Nesterov momentum, cosine schedule.

Run:

  python train.py --config configs/resnet.py --workdir runs/resnet
  python train.py --config configs/resnet.py --config.norm=flax --workdir runs/resnet_flax

Expected result: not measured to the end here. On this project's 2-core CPU
ResNet-20 trains at about 110 images/s (quiet machine, 60 steps:
`python train.py --config configs/resnet.py --config.num_train_steps=60
--config.log_every_steps=20`), so the 30 epochs take about 4.5 hours; use an
accelerator or fewer epochs (`--config.num_epochs=N`). ResNet-20 on
Fashion-MNIST typically reaches about 93-94 % test accuracy with this recipe (a
literature figure, not ours); check metrics.jsonl and metrics.png in the workdir.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet20"
    config.optimizer = "sgd"
    config.learning_rate = 0.1  # for a global batch of 128; scale linearly with the batch
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 5e-4
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.num_epochs = 30
    config.checkpoint_every_steps = 1000
    return config
