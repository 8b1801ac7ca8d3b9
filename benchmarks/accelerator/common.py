"""Helpers of the accelerator check: paths, the device probe, the timing loop, JSON I/O.

Not a test module. Imports jax only inside functions: the orchestrator
(check.py) never imports it, so each part runs in a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common  # noqa: E402  (benchmarks/_common.py: versions, cpu model, ratios, tables)


def slug(device_kind: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``; the results folder's name."""
    s = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
    return s or "unknown"


def write_json(path: str, payload: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_common._json_default)
        f.write("\n")


def probe() -> Dict[str, Any]:
    """What the default backend is: platform, device kind and count, runtime and library versions."""
    import jax

    devs = jax.devices()
    d = devs[0]
    out: Dict[str, Any] = {
        "backend": jax.default_backend(),
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": len(devs),
        "local_device_count": jax.local_device_count(),
        "devices": [str(x) for x in devs[:16]],
        "versions": _common.versions(),
        "cpu": _common.cpu_model(),
        "loadavg": _common.loadavg(),
    }
    try:
        out["platform_version"] = d.client.platform_version  # e.g. the CUDA runtime/driver versions
    except Exception as e:  # noqa: BLE001
        out["platform_version"] = f"unavailable: {e}"
    try:
        stats = d.memory_stats() or {}
        out["memory_bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001
        pass
    try:
        out["jax_environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001
        out["jax_environment_info"] = f"unavailable: {e}"
    if d.platform == "gpu":
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.memory,"
                                "clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"unavailable: {e}"
    return out


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def interleave(cands: Dict[str, Callable[[], Any]], *, rounds: int, target_s: float, budget_s: float,
               max_calls: int = 2000, seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """Seconds per call of each candidate, one sample per round, candidates interleaved.

    Unlike ``_common.interleave`` (one ``block_until_ready`` per call, right for a
    CPU), a sample here dispatches `calls` calls back to back and waits once at the
    end: on an accelerator that is the device's throughput, not the host's launch
    latency. `calls` is calibrated per candidate so that a sample lasts about
    `target_s`. The order of the candidates is a fresh random permutation each
    round; after 3 rounds, `budget_s` stops early. Returns
    ``{name: {"samples_s": array, "calls": k}}``.
    """
    names = list(cands)
    calls = {}
    for n in names:  # warm-up (compile, first touch) and calibration
        block(cands[n]())
        block(cands[n]())
        t0 = time.perf_counter()
        block(cands[n]())
        t1 = max(time.perf_counter() - t0, 1e-7)
        calls[n] = int(min(max_calls, max(1, round(target_s / t1))))
    rng = np.random.default_rng(seed)
    samples = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        for i in rng.permutation(len(names)):
            n = names[i]
            f, k = cands[n], calls[n]
            t0 = time.perf_counter()
            out = None
            for _ in range(k):
                out = f()
            block(out)
            samples[n].append((time.perf_counter() - t0) / k)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {n: {"samples_s": np.asarray(samples[n]), "calls": calls[n]} for n in names}


def median_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Median over rounds of a / b (same-round pairs)."""
    k = min(len(a), len(b))
    return float(np.median(np.asarray(a[:k]) / np.asarray(b[:k])))
