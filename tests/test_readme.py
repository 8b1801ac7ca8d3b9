"""The README runs as written: its functional-API example (8 devices) and its full-run figures (the committed runs)."""

import pathlib
import re


def test_readme_functional_example(ndev):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert int(scope["state"].count) == 1
    assert scope["grads"]["scale"].shape == (64,)


RUNS = {  # results/<name>/ (written by benchmarks/studies/readme_runs.sh): README row, configs/default.py row
    "default_jaxbn": ("`python train.py --workdir runs/default_jaxbn`", "this config (default_jaxbn)"),
    "default_flax": ("`python train.py --config.norm=flax --workdir runs/default_flax`", "flax    --config.norm=flax"),
    "default_nnx": ("`python train.py --config.api=nnx --workdir runs/default_nnx`", "jaxbn   --config.api=nnx"),
    "constant_lr_jaxbn": ("`python train.py --config.lr_schedule=constant`", "jaxbn   --config.lr_schedule"),
    "constant_lr_flax": ("`python train.py --config.lr_schedule=constant --config.norm=flax`",
                         "flax    --config.lr_schedule"),
}


def test_stated_full_run_figures_are_the_committed_runs():
    """README's results table and configs/default.py state each full run's accuracy, wall time and
    images/s as its committed metrics.jsonl has them (rerunning readme_runs.sh without updating
    the text fails here)."""
    import json

    root = pathlib.Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    config_doc = (root / "configs" / "default.py").read_text()
    for name, (readme_key, config_key) in RUNS.items():
        lines = (root / "results" / name / "metrics.jsonl").read_text().splitlines()
        final = [json.loads(line) for line in lines if '"final"' in line][-1]
        acc = f"{100 * final['test_accuracy']:.2f} %"
        wall, ips = f"{final['wall_time_s']:.0f} s", f"{final['images_per_sec']:.0f}"
        row = next(line for line in readme.splitlines() if line.startswith(f"| {readme_key} |"))
        cells = [c.strip() for c in row.replace("*", "").strip("|").split("|")]
        assert cells[2:5] == [acc, wall, ips], (name, row, acc, wall, ips)
        crow = next(line for line in config_doc.splitlines() if config_key in line)
        assert crow.split()[-5:] == acc.split() + wall.split() + [ips], (name, crow, acc, wall, ips)
        cfg = json.loads((root / "results" / name / "config.json").read_text())
        assert cfg["num_epochs"] == 10 and cfg["model"] == "cnn", (name, cfg)
