"""Shared helpers of the performance benchmarks: timing, bandwidth, environment, results.

Timing rules (a shared 2-core machine whose speed swings 2-5x between runs):

* Only ratios measured in the same process, with the candidates interleaved
  round by round (the order rotates each round), mean anything; every summary
  is a median over rounds, and every ratio is the median of per-round ratios
  (so a slow spell of the machine hits both sides of a ratio equally).
* Warm-up calls (compilation, first-touch of buffers) are discarded.
* Each sample ends with ``block_until_ready``; buffers a timed call donates are
  prepared outside the timed region.

Not a test module: nothing here is collected by pytest.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# The allocator setting recommended by studies/cpu_settings.py (see README.md): glibc
# serves every allocation from one heap (one arena, no mmap) and never trims it, so
# XLA's fresh outputs and per-step temp buffers are recycled instead of being
# mmapped, page-faulted and zeroed by the kernel again on every call. (Raising
# glibc.malloc.mmap_threshold alone does not do it: glibc caps it at 32 MiB, and
# the worker threads' arenas still unmap their big blocks.)
RECOMMENDED_GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                              "glibc.malloc.trim_threshold=4294967296")


def ensure_env(env: Dict[str, str]) -> None:
    """Re-executes this script with `env` added unless it is already set.

    glibc reads GLIBC_TUNABLES and XLA reads XLA_FLAGS once, at start-up, so they
    cannot be changed from inside a running process. ``--no-reexec`` (or
    ``JAXBN_BENCH_NO_REEXEC=1``) keeps the current environment.
    """
    if os.environ.get("JAXBN_BENCH_NO_REEXEC") == "1" or "--no-reexec" in sys.argv:
        return
    missing = {k: v for k, v in env.items() if k == "XLA_FLAGS" and v not in os.environ.get(k, "")
               or k != "XLA_FLAGS" and k not in os.environ}
    if not missing:
        return
    new = dict(os.environ)
    for k, v in missing.items():
        new[k] = (new.get(k, "") + " " + v).strip() if k == "XLA_FLAGS" else v
    new["JAXBN_BENCH_NO_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable] + sys.argv, new)


def loadavg() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> dict:
    info = {"model_name": platform.processor() or "unknown", "logical_cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "Model name":
                info["model_name"] = v
            elif k in ("Core(s) per socket", "Socket(s)", "Thread(s) per core", "L3 cache", "L2 cache",
                       "Hypervisor vendor"):
                info[k.lower().replace("(s)", "s").replace(" ", "_")] = v
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    import importlib.metadata as md

    for pkg in ("jax", "jaxlib", "flax", "optax", "dm-haiku", "equinox", "numpy", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def environment() -> dict:
    """Device kind, versions, machine and the settings that change CPU speed."""
    import jax

    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "versions": versions(),
        "cpu": cpu_model(),
        "settings": {k: os.environ.get(k) for k in
                     ("XLA_FLAGS", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "LD_PRELOAD", "OMP_NUM_THREADS")
                     if os.environ.get(k) is not None},
        "loadavg_start": loadavg(),
        "gpu": "none: this session has no GPU; all numbers are XLA:CPU",
    }


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def interleave(cands: Dict[str, Callable[[], Any]], *, rounds: int, calls: int = 1,
               warmup: int = 2, prepare: Optional[Dict[str, Callable[[], Any]]] = None,
               budget_s: Optional[float] = None, warm_each: bool = False,
               seed: int = 0) -> Dict[str, np.ndarray]:
    """Seconds per call of each candidate, one sample per round, interleaved.

    ``cands[name](*prepared)`` runs one call; ``prepare[name]()`` (optional, not
    timed) builds its arguments (e.g. a fresh copy of a donated buffer). Each
    sample is the mean over `calls` calls; the candidate order is a fresh random
    permutation every round (a fixed rotation would always put the same candidate
    after the cache-flushing bandwidth copy). `warm_each` makes one untimed call
    before each sample (cache-resident shapes: as inside a network, where the
    producer just wrote x). `budget_s` stops early (keeping at least 5 rounds)
    when the time runs out. Returns ``{name: array of per-round seconds}``.
    """
    names = list(cands)
    prepare = prepare or {}
    rng = np.random.default_rng(seed)
    for n in names:  # warm-up: compile, first-touch, allocator steady state
        for _ in range(warmup):
            args = prepare[n]() if n in prepare else ()
            block(cands[n](*args))
    samples = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(rounds):
        order = [names[i] for i in rng.permutation(len(names))]
        for n in order:
            if warm_each:
                args = block(prepare[n]()) if n in prepare else ()
                block(cands[n](*args))
            tot = 0.0
            for _ in range(calls):
                args = block(prepare[n]()) if n in prepare else ()
                t0 = time.perf_counter()
                block(cands[n](*args))
                tot += time.perf_counter() - t0
            samples[n].append(tot / calls)
        if budget_s is not None and r >= 4 and time.perf_counter() - t_start > budget_s:
            break
    return {n: np.asarray(v) for n, v in samples.items()}


def ratio(samples: Dict[str, np.ndarray], num: str, den: str) -> float:
    """Median over rounds of samples[num] / samples[den] (same-round pairs)."""
    k = min(len(samples[num]), len(samples[den]))
    return float(np.median(samples[num][:k] / samples[den][:k]))


def copy_bandwidth(nbytes: int = 256 * 2**20, rounds: int = 7) -> dict:
    """Bytes/s of a large float32 copy (read + write), as XLA:CPU runs it.

    ``donated``: ``y = -x`` in place (the input buffer is donated, so no fresh
    output is allocated): the roofline's bandwidth. ``fresh``: the same op into a
    newly allocated output, which shows what the allocator costs. ``read``: a
    sum over the whole array (reads only).
    """
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    neg_d = jax.jit(lambda a: -a, donate_argnums=0)
    neg_f = jax.jit(lambda a: -a)
    rsum = jax.jit(lambda a: jnp.sum(a))
    state = {"a": jnp.ones((n,), jnp.float32)}
    src = jnp.ones((n,), jnp.float32)

    def donated():
        state["a"] = neg_d(state["a"])
        return state["a"]

    s = interleave({"donated": donated, "fresh": lambda: neg_f(src), "read": lambda: rsum(src)},
                   rounds=rounds, warmup=2)
    med = {k: float(np.median(v)) for k, v in s.items()}
    return {
        "bytes": nbytes,
        "donated_s": med["donated"], "fresh_s": med["fresh"], "read_s": med["read"],
        "copy_bw": 2 * nbytes / med["donated"],  # read + write
        "fresh_copy_bw": 2 * nbytes / med["fresh"],
        "read_bw": nbytes / med["read"],
    }


def command() -> str:
    """This run's command line as the results files quote it: ``python benchmarks/... args``."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(["python", script, *sys.argv[1:]])


def _results_path(name: str) -> str:
    """results/<name> (a name such as "studies/x.json" lands in a subfolder), its folder made."""
    path = os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def save_text(name: str, text: str) -> str:
    """Writes `text` (a markdown table, say) to results/<name>; returns the path."""
    path = _results_path(name)
    with open(path, "w") as f:
        f.write(text)
    return path


def save_json(name: str, payload: dict) -> str:
    """Writes `payload` to results/<name> with the load average at the end; returns the path."""
    path = _results_path(name)
    payload = dict(payload)
    payload.setdefault("environment", {})
    payload["environment"]["loadavg_end"] = loadavg()
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)
