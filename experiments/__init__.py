"""Studies of what BatchNorm and synchronized statistics do to training (README: "What BatchNorm
does, measured"). Each study is a script, run from the repository root::

    python experiments/sync_vs_local.py     # accuracy against the per-device batch size
    python experiments/bn_vs_lr.py          # BN and the learning rate (the article's claims)

`common` holds what both share; results go to experiments/results/.
"""
