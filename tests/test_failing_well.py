"""Issue 17 ("Failing well"): the declared dependency ranges are the tested ones, and the
distributed helpers' messages (fast; the multi-process runs are in test_multihost.py)."""

import os
import re
import socket
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins():
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_lower_bounds_are_the_tested_versions():
    """Every lower bound of the core, flax and train requirements is the version constraints.txt
    pins (what CI tests): no range claims versions nobody ran."""
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    extras = project["optional-dependencies"]
    pins = _pins()
    for req in project["dependencies"] + extras["flax"] + extras["train"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.replace(" ", ""))
        assert m, f"{req}: expected NAME>=VERSION"
        name = m.group(1).lower().replace("_", "-")
        assert name in pins, f"{name} is required but not pinned (tested) in constraints.txt"
        assert m.group(2) == pins[name], f"{req}: the tested version is {pins[name]}"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"jax ≥ {pins['jax']}" in readme and f"flax ≥ {pins['flax']}" in readme


def test_waiting_for_names_the_coordinator_when_it_does_not_answer():
    from jaxbn.training import distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert distributed._waiting_for(1, 3, f"127.0.0.1:{port}") == (
            f"process 0 (the coordinator, 127.0.0.1:{port} does not answer yet)")
        s.listen()
        assert distributed._waiting_for(1, 3, f"127.0.0.1:{port}") == (
            f"process(es) 0, 2 to connect to 127.0.0.1:{port}")
    assert distributed._waiting_for(0, 2, "127.0.0.1:1") == "process(es) 1 to connect to 127.0.0.1:1"


def test_peer_failures_are_recognised():
    import jax
    from jaxbn.training import distributed
    gloo = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:2: Connection reset by peer")
    assert distributed.is_peer_failure(gloo)
    assert not distributed.is_peer_failure(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    assert not distributed.is_peer_failure(ValueError("Connection reset by peer"))
    distributed.exit_if_peer_lost(gloo)  # no watch in a single process: returns
    assert not distributed.watching()
