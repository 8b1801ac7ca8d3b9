"""The README's functional-API example runs as written (8 devices)."""

import pathlib
import re


def test_readme_functional_example(ndev):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert int(scope["state"].count) == 1
    assert scope["grads"]["scale"].shape == (64,)
