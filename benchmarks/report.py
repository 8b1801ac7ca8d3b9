"""Rebuilds the results section of benchmarks/README.md from results/*.md and *.json.

  python benchmarks/report.py

Only the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` is
replaced; the rest of the README is hand-written.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _read(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f) if name.endswith(".json") else f.read()


def build() -> str:
    parts = []
    md = _read("bn_layer.md")
    if md:
        parts += ["### One BN layer (`bn_layer.py`)", "", md.strip(), "",
                  "![speed-up over Flax and roofline fractions](results/bn_layer.png)", ""]
    ts = _read("train_step.json")
    if ts:
        env = ts["environment"]
        parts += ["### End to end: train step (`train_step.py`)", "",
                  f"Command: `python benchmarks/train_step.py`; batch {ts['batch']}, {ts['optimizer']}; load "
                  f"{env['loadavg_start']} at start, {env.get('loadavg_end')} at end; settings {env['settings']}.",
                  "", ts["table"], ""]
    md = _read("sync.md")
    if md:
        parts += ["### Synchronized BN, 8 virtual CPU devices (`sync.py`)", "", md.strip(), ""]
    md = _read("sync_2dev.md")
    if md:
        parts += ["### Synchronized BN, 2 virtual CPU devices, one per core (`sync.py --devices 2`)", "",
                  md.strip(), ""]
    md = _read("studies/cpu_settings.md")
    if md:
        parts += ["### CPU settings (`studies/cpu_settings.py`)", "", md.strip(), ""]
    return "\n".join(parts)


def main():
    with open(README) as f:
        text = f.read()
    if START not in text or END not in text:
        sys.exit(f"{README} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(f"{head}{START}\n{build()}\n{END}{tail}")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
