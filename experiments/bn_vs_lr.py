r"""Study 2: the article's claims: does BatchNorm widen the usable learning rates and speed up training?

    python experiments/bn_vs_lr.py                   # the full study (sized for <= 25 min on 2 CPU cores)
    python experiments/bn_vs_lr.py --quick           # a few steps per arm (well under a minute)
    python experiments/bn_vs_lr.py --models none,after_relu --optimizers adam --lrs 1e-3,1e-1 --seeds 2

The article's CNN (jaxbn.models.CNN: Conv 3x3x32 -> ReLU -> BN -> MaxPool -> Dense 128 -> ReLU ->
Dense 10) in three variants:

  none         no normalization layer (the article's baseline)
  after_relu   BatchNorm after the ReLU (the article's model, configs/default.py)
  before_relu  BatchNorm before the ReLU (Conv -> BN -> ReLU, where Ioffe & Szegedy put it)

each trained with Adam and with SGD with momentum 0.9 at learning rates 1e-4, 1e-3, 1e-2 and
1e-1, constant (the article's schedule), batch 128, on one device, from 3 seeds (the seed sets
both the initialization and the data order).

Budget (sized for a 2-core CPU): the first 10000 Fashion-MNIST training images for 6 epochs
(468 steps), tested on the first 2000 test images after each epoch, so the test loss is known
every 78 steps.

Writes <out>/bn_vs_lr.json (every run: config, seed, test loss/accuracy per epoch, training loss
as logged, final figures; versions and machine) and <out>/bn_vs_lr.png (final test accuracy
against the learning rate, mean and standard deviation over the seeds, and the test loss against
the steps at each rate), and prints a table.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

STUDY = "bn_vs_lr"
MODELS = {  # name: (config.norm, config.cnn_norm_before_relu, label)
    "none": ("none", False, "no BN"),
    "after_relu": ("jaxbn", False, "BN after ReLU (the article's)"),
    "before_relu": ("jaxbn", True, "BN before ReLU (Ioffe & Szegedy)"),
}
OPTIMIZERS = {"adam": "Adam", "sgd": "SGD, momentum 0.9"}
LEARNING_RATES = (1e-4, 1e-3, 1e-2, 1e-1)
SEEDS = 3
BATCH = 128

FULL = dict(train_examples=10000, test_examples=2000, epochs=6)
QUICK = dict(train_examples=256, test_examples=200, epochs=2)
QUICK_LEARNING_RATES = (1e-2,)  # one compilation per (model, optimizer)


def make_config(model: str, optimizer: str, lr: float, seed: int, sizes: dict):
    """configs/default.py (the article's CNN, batch 128) for one run, with a constant learning rate."""
    from configs import default

    norm, before_relu, _ = MODELS[model]
    c = default.get_config()
    c.model = "cnn"
    c.norm, c.cnn_norm_before_relu = norm, before_relu
    c.optimizer, c.learning_rate, c.lr_schedule = optimizer, lr, "constant"
    c.momentum, c.nesterov = 0.9, False  # sgd only
    c.global_batch_size = BATCH
    c.train_examples, c.test_examples = sizes["train_examples"], sizes["test_examples"]
    c.num_epochs = sizes["epochs"]
    total = sizes["epochs"] * (sizes["train_examples"] // BATCH)
    c.seed = seed
    common.quiet_run(c, total, 30)
    return c


def parse_args(argv=None):
    p = common.ArgumentParser(prog="bn_vs_lr.py", description=__doc__.split("\n\n")[0].split("\n")[0])
    common.add_common_arguments(p, SEEDS)
    p.add_argument("--models", type=common.comma_list(str, "a model variant", choices=tuple(MODELS)),
                   default=None, help=f"comma-separated model variants (default: all: {','.join(MODELS)})")
    p.add_argument("--optimizers", type=common.comma_list(str, "an optimizer", choices=tuple(OPTIMIZERS)),
                   default=None, help="comma-separated optimizers (default: adam,sgd)")
    p.add_argument("--lrs", type=common.comma_list(float, "a learning rate", positive=True), default=None,
                   help="comma-separated learning rates (default: 1e-4,1e-3,1e-2,1e-1; 1e-2 with --quick)")
    args = p.parse_args(argv)
    args.models = args.models or list(MODELS)
    args.optimizers = args.optimizers or list(OPTIMIZERS)
    args.lrs = sorted(args.lrs or (QUICK_LEARNING_RATES if args.quick else LEARNING_RATES))
    args.seeds = args.seeds or (1 if args.quick else SEEDS)
    return args, (QUICK if args.quick else FULL)


def summarize(runs):
    """One row per (optimizer, learning rate, model): the spread over seeds of the final test
    accuracy and loss, and of the best test accuracy over the epochs."""
    rows = []
    for (opt, lr, model), group in common.group_runs(runs, ("optimizer", "learning_rate", "model")).items():
        rows.append({
            "optimizer": opt, "learning_rate": lr, "model": model, "seeds": [r["seed"] for r in group],
            "test_accuracy": common.spread([r["final"]["test_accuracy"] for r in group]),
            "test_loss": common.spread([r["final"]["test_loss"] for r in group]),
            "best_test_accuracy": common.spread([max(e["test_accuracy"] for e in r["evals"]) for r in group]),
            "nonfinite_steps": sum(r["final"]["nonfinite_steps"] for r in group),
        })
    return sorted(rows, key=lambda r: (list(OPTIMIZERS).index(r["optimizer"]), r["learning_rate"],
                                       list(MODELS).index(r["model"])))


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


def plot(doc, path: str) -> None:
    """Top: final test accuracy against the learning rate, one panel per optimizer (mean ± std over
    seeds; dots: single runs). Below, one row per optimizer: the test loss against the steps at
    each learning rate (mean over seeds; band: min to max)."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    s = doc["settings"]
    opts, lrs = s["optimizers"], s["learning_rates"]
    colors = dict(zip(MODELS, ("tab:gray", "tab:blue", "tab:orange")))
    cols = max(2, len(lrs))
    fig = common.new_figure(3.4 * cols, 3.2 * (1 + len(opts)))
    grid = fig.add_gridspec(1 + len(opts), 2 * cols)
    for i, opt in enumerate(opts):
        span = (2 * cols) // len(opts)
        ax = fig.add_subplot(grid[0, i * span:(i + 1) * span])
        for model in s["models"]:
            rows = [r for r in doc["summary"] if r["optimizer"] == opt and r["model"] == model]
            x = [r["learning_rate"] for r in rows]
            y = [100 * r["test_accuracy"]["mean"] for r in rows]
            e = [100 * r["test_accuracy"]["std"] for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=4, color=colors[model], label=MODELS[model][2])
            pts = [(r["learning_rate"], 100 * r["final"]["test_accuracy"]) for r in doc["runs"]
                   if r["optimizer"] == opt and r["model"] == model]
            ax.plot(*zip(*pts), linestyle="none", marker=".", alpha=0.35, color=colors[model])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (constant)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{OPTIMIZERS[opt]}: accuracy after {s['epochs']} epochs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        for j, lr in enumerate(lrs):
            ax = fig.add_subplot(grid[1 + i, 2 * j:2 * j + 2])
            for model in s["models"]:
                runs = [r for r in doc["runs"] if r["optimizer"] == opt and r["model"] == model
                        and r["learning_rate"] == lr]
                if not runs:
                    continue
                steps = [e["step"] for e in runs[0]["evals"]]
                loss = np.array([[e["test_loss"] for e in r["evals"]] for r in runs])
                ax.plot(steps, loss.mean(0), marker="o", markersize=3, color=colors[model],
                        label=MODELS[model][2])
                ax.fill_between(steps, loss.min(0), loss.max(0), color=colors[model], alpha=0.2)
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else NullFormatter())
            ax.set_xlabel("step")
            ax.set_ylabel("test loss")
            ax.set_title(f"{OPTIMIZERS[opt]}, lr {_lr_text(lr)}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"The article's CNN on Fashion-MNIST: {s['train_examples']} training images, batch {BATCH},\n"
                 f"{s['seeds']} seed(s); test loss: mean, band from min to max", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    args, sizes = parse_args(argv)
    common.prepare_process(1)
    import jax

    if jax.device_count() != 1:  # a device count from the environment was replaced
        sys.exit(f"bn_vs_lr.py: error: expected 1 device, JAX has {jax.device_count()}")
    try:
        json_path, png_path = common.output_paths(args.out, STUDY, args.quick)
    except OSError as e:
        sys.exit(f"bn_vs_lr.py: error: cannot create --out {args.out}: {e.strerror}")
    steps_per_epoch = sizes["train_examples"] // BATCH
    settings = {"mode": "quick" if args.quick else "full", "models": args.models, "optimizers": args.optimizers,
                "learning_rates": args.lrs, "seeds": args.seeds, "devices": 1, "model": "cnn",
                "global_batch_size": BATCH, "lr_schedule": "constant", "sgd_momentum": 0.9, **sizes,
                "steps": sizes["epochs"] * steps_per_epoch, "eval_every_steps": steps_per_epoch,
                "model_definitions": {m: {"norm": n, "cnn_norm_before_relu": b, "label": l}
                                      for m, (n, b, l) in MODELS.items()}}
    specs = [({"model": model, "optimizer": opt, "learning_rate": lr, "seed": seed},
              make_config(model, opt, lr, seed, sizes))
             for opt in args.optimizers for model in args.models for lr in args.lrs for seed in range(args.seeds)]
    description = ("The article's CNN on Fashion-MNIST without BN, with BN after the ReLU (the article's) and "
                   "before it, over constant learning rates, with Adam and with SGD with momentum.")
    try:
        doc = common.run_study(STUDY, description, settings, specs, json_path)
    except common.library_errors() as e:
        sys.exit(f"bn_vs_lr.py: error: {e}")
    doc["summary"] = summarize(doc["runs"])
    common.write_json(json_path, doc)
    plot(doc, png_path)
    table = [(OPTIMIZERS[r["optimizer"]], _lr_text(r["learning_rate"]), MODELS[r["model"]][2],
              f"{100 * r['test_accuracy']['mean']:.2f} ± {100 * r['test_accuracy']['std']:.2f}",
              f"{100 * r['test_accuracy']['min']:.2f}-{100 * r['test_accuracy']['max']:.2f}",
              f"{r['test_loss']['mean']:.4f}" if math.isfinite(r["test_loss"]["mean"]) else "non-finite",
              r["nonfinite_steps"]) for r in doc["summary"]]
    print(common.format_table(("optimizer", "lr", "model", "test acc % (mean ± std)", "min-max", "test loss",
                               "skipped steps"), table))
    print(f"{len(doc['runs'])} runs in {doc['wall_time_s']:.0f} s; wrote {json_path} and {png_path}", flush=True)


if __name__ == "__main__":
    main()
