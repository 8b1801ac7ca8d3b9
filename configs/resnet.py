r"""ResNet-20 (He et al. 2016) on Fashion-MNIST: SGD with Nesterov momentum, cosine schedule.

Run:

  python train.py --config configs/resnet.py --workdir runs/resnet
  python train.py --config configs/resnet.py --config.norm=flax --workdir runs/resnet_flax

Expected result: not measured to the end here. On this project's shared 2-core
CPU ResNet-20 trains at only about 15 images/s (measured over 30 steps), so 30
epochs would take days: run it on an accelerator. ResNet-20 on Fashion-MNIST
typically reaches about 93-94 % test accuracy with this recipe; check
metrics.jsonl and metrics.png in the workdir.
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
