r"""Study 1: test accuracy against the per-device batch size, synchronized BN against per-device BN.

    python experiments/sync_vs_local.py              # the full study (sized for <= 25 min on 2 CPU cores)
    python experiments/sync_vs_local.py --quick      # 8 steps per arm at batch 2 (about a minute)
    python experiments/sync_vs_local.py --arms sync,local --batch-sizes 2,32 --seeds 2 --out /tmp/s

Data-parallel training on 8 devices (virtual CPU devices here, `jax.shard_map`), per-device
batch b in {2, 4, 8, 16, 32}, so global batch 8b. Arms, each in every layer of the model:

  sync          jaxbn.linen.BatchNorm with axis_name='batch': the statistics of the global batch
  local         the same layer with axis_name=None: each device's own statistics (what a user who
                forgets to synchronize gets); running statistics averaged over the devices
  renorm_local  jaxbn.linen.BatchRenorm (Ioffe 2017) with per-device statistics
  group         flax.linen.GroupNorm (Wu & He 2018), which uses no batch statistics

The published shape to compare with (Wu & He 2018, Group Normalization, Table 2: ResNet-50 on
ImageNet, 8 GPUs): per-GPU BN error 23.6, 23.7, 24.8, 27.3, 34.7 % at 32, 16, 8, 4, 2 images per
GPU, GN about 24.1 % throughout. Synchronized BN computes the global batch's statistics, so it
should not degrade as the per-device batch shrinks (the global batch, 16 at b=2, still does).

Model and budget (sized for a 2-core CPU): a ResNet-8 (the project's CIFAR ResNet with one block
per stage, 8/16/32 filters, 9 normalization layers) on the first 5120 Fashion-MNIST training
images for 2 epochs, tested on the first 2000 test images after each epoch. The project's ResNet
recipe (configs/resnet.py: SGD with Nesterov momentum 0.9, weight decay 5e-4, cosine decay)
with the learning rate scaled linearly with the global batch, 0.4 x 8b / 128, and a warm-up of
10 % of the steps (configs/resnet.py's 0.1 per 128 images learns too slowly for this short
budget: 64 % against 77 % test accuracy at 4 images per device in a trial run). Every batch
size trains on the same images, as in Wu & He, so small batches take more steps: 640 at b=2,
40 at b=32. Batch Renorm relaxes its limits over the run (plain BN for the first 10 % of the
steps, r_max = 3 at 80 %, d_max = 5 at 50 %, the paper's proportions); GroupNorm uses 4 groups.

Writes <out>/sync_vs_local.json (every run: config, seed, test loss/accuracy per epoch, final
figures; versions and machine) and <out>/sync_vs_local.png (test error against the per-device
batch, mean and standard deviation over the seeds), and prints a table.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

STUDY = "sync_vs_local"
NUM_DEVICES = 8
ARMS = {  # name: (config.norm, config.bn_sync, label)
    "sync": ("jaxbn", True, "BN, synchronized (jaxbn)"),
    "local": ("jaxbn", False, "BN, per-device statistics"),
    "renorm_local": ("batch_renorm", False, "Batch Renorm, per-device statistics"),
    "group": ("group_norm", True, "GroupNorm (no batch statistics)"),
}
BATCH_SIZES = (2, 4, 8, 16, 32)
SEEDS = 3
BASE_LR, BASE_BATCH = 0.4, 128  # the learning rate for this global batch (4x configs/resnet.py's)
WIDTH, BLOCKS, GROUPS = 8, 1, 4  # ResNet-8 with 8/16/32 filters; GroupNorm groups

FULL = dict(train_examples=5120, test_examples=2000, epochs=2)
QUICK = dict(train_examples=128, test_examples=200, epochs=1)
QUICK_BATCH_SIZES = (2,)  # one compilation per arm


def make_config(arm: str, per_device_batch: int, seed: int, sizes: dict):
    """configs/resnet.py (itself configs/default.py with the ResNet recipe) for one run."""
    from configs import resnet

    norm, sync, _ = ARMS[arm]
    c = resnet.get_config()
    c.resnet_width, c.resnet_blocks = WIDTH, BLOCKS
    c.norm, c.bn_sync = norm, sync
    c.group_norm_groups = GROUPS
    c.parallel = "shard_map"
    c.train_examples, c.test_examples = sizes["train_examples"], sizes["test_examples"]
    c.num_epochs = sizes["epochs"]
    c.global_batch_size = NUM_DEVICES * per_device_batch
    c.learning_rate = BASE_LR * c.global_batch_size / BASE_BATCH
    total = sizes["epochs"] * (sizes["train_examples"] // c.global_batch_size)
    c.warmup_epochs = 0.1 * sizes["epochs"]
    c.renorm_warmup_steps = max(1, total // 10)
    c.seed = seed
    common.quiet_run(c, total, 20)
    return c


def parse_args(argv=None):
    p = common.ArgumentParser(prog="sync_vs_local.py", description=__doc__.split("\n\n")[0].split("\n")[0])
    common.add_common_arguments(p, SEEDS)
    p.add_argument("--arms", type=common.comma_list(str, "an arm", choices=tuple(ARMS)), default=None,
                   help=f"comma-separated arms (default: all: {','.join(ARMS)})")
    p.add_argument("--batch-sizes", type=common.comma_list(int, "a per-device batch size", positive=True),
                   default=None, help="comma-separated per-device batch sizes (default: 2,4,8,16,32; "
                                      "2 with --quick)")
    args = p.parse_args(argv)
    args.arms = args.arms or list(ARMS)
    args.batch_sizes = sorted(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES))
    args.seeds = args.seeds or (1 if args.quick else SEEDS)
    sizes = QUICK if args.quick else FULL
    too_big = [b for b in args.batch_sizes if NUM_DEVICES * b > sizes["train_examples"]]
    if too_big:
        p.error(f"argument --batch-sizes: {too_big[0]} x {NUM_DEVICES} devices exceeds the "
                f"{sizes['train_examples']} training images")
    return args, sizes


def summarize(runs):
    """One row per (arm, per-device batch): the spread of the final test accuracy over seeds."""
    rows = []
    for (arm, b), group in common.group_runs(runs, ("arm", "per_device_batch")).items():
        acc = common.spread([r["final"]["test_accuracy"] for r in group])
        rows.append({"arm": arm, "per_device_batch": b, "global_batch": NUM_DEVICES * b,
                     "seeds": [r["seed"] for r in group], "test_accuracy": acc,
                     "test_loss": common.spread([r["final"]["test_loss"] for r in group]),
                     "nonfinite_steps": sum(r["final"]["nonfinite_steps"] for r in group)})
    return rows


def plot(doc, path: str) -> None:
    """Test error (%) against the per-device batch: one line per arm, mean ± std over seeds,
    each seed a dot; the arms are shifted a little sideways so that their error bars do not
    hide each other."""
    fig = common.new_figure(7.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    markers = dict(zip(ARMS, "osD^"))
    for i, arm in enumerate(ARMS):
        rows = [r for r in doc["summary"] if r["arm"] == arm]
        if not rows:
            continue
        shift = 2 ** (0.03 * (i - 1.5))
        b = [r["per_device_batch"] * shift for r in rows]
        err = [100 * (1 - r["test_accuracy"]["mean"]) for r in rows]
        std = [100 * r["test_accuracy"]["std"] for r in rows]
        line = ax.errorbar(b, err, yerr=std, marker=markers[arm], capsize=4, label=ARMS[arm][2])
        seeds = [(r["per_device_batch"] * shift, 100 * (1 - r["final"]["test_accuracy"]))
                 for r in doc["runs"] if r["arm"] == arm]
        ax.plot(*zip(*seeds), linestyle="none", marker=".", alpha=0.35, color=line.lines[0].get_color())
    ax.set_xscale("log", base=2)
    sizes = sorted({r["per_device_batch"] for r in doc["summary"]})
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel(f"images per device ({NUM_DEVICES} devices; global batch = {NUM_DEVICES} x this)")
    ax.set_ylabel("test error (%)")
    s = doc["settings"]
    ax.set_title(f"ResNet-8 (width {WIDTH}) on Fashion-MNIST, {s['epochs']} epoch(s) of "
                 f"{s['train_examples']} images\nmean ± std over {s['seeds']} seed(s) (dots: single runs)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args, sizes = parse_args(argv)
    common.prepare_process(NUM_DEVICES)
    import jax

    if jax.device_count() != NUM_DEVICES:
        sys.exit(f"sync_vs_local.py: error: needs {NUM_DEVICES} devices, JAX has {jax.device_count()} "
                 f"{jax.default_backend()} device(s) (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r})")
    try:
        json_path, png_path = common.output_paths(args.out, STUDY, args.quick)
    except OSError as e:
        sys.exit(f"sync_vs_local.py: error: cannot create --out {args.out}: {e.strerror}")
    settings = {"mode": "quick" if args.quick else "full", "arms": args.arms, "per_device_batch_sizes":
                args.batch_sizes, "seeds": args.seeds, "devices": NUM_DEVICES, "model": "resnet20",
                "resnet_width": WIDTH, "resnet_blocks": BLOCKS, "group_norm_groups": GROUPS,
                "base_learning_rate": BASE_LR, "base_batch": BASE_BATCH, **sizes,
                "arm_definitions": {a: {"norm": n, "bn_sync": s, "label": l} for a, (n, s, l) in ARMS.items()}}
    specs = [({"arm": arm, "per_device_batch": b, "seed": seed},
              make_config(arm, b, seed, sizes))
             for arm in args.arms for b in args.batch_sizes for seed in range(args.seeds)]
    description = ("Test accuracy of a ResNet-8 on Fashion-MNIST against the per-device batch size on "
                   f"{NUM_DEVICES} devices: synchronized BN (jaxbn), per-device BN, per-device Batch "
                   "Renorm, GroupNorm. Learning rate 0.4 x global batch / 128.")
    try:
        doc = common.run_study(STUDY, description, settings, specs, json_path)
    except common.library_errors() as e:
        sys.exit(f"sync_vs_local.py: error: {e}")
    doc["summary"] = summarize(doc["runs"])
    common.write_json(json_path, doc)
    plot(doc, png_path)
    table = [(ARMS[r["arm"]][2], r["per_device_batch"], r["global_batch"],
              f"{100 * r['test_accuracy']['mean']:.2f} ± {100 * r['test_accuracy']['std']:.2f}",
              f"{100 * r['test_accuracy']['min']:.2f}-{100 * r['test_accuracy']['max']:.2f}",
              r["test_accuracy"]["n"]) for r in doc["summary"]]
    print(common.format_table(("arm", "per device", "global", "test acc % (mean ± std)", "min-max", "seeds"),
                              table))
    print(f"{len(doc['runs'])} runs in {doc['wall_time_s']:.0f} s; wrote {json_path} and {png_path}", flush=True)


if __name__ == "__main__":
    main()
