"""Builds the CPU kernels' shared library (``jaxbn/csrc/batch_norm_cpu.cc``).

Compiled on first use with the system's C++ compiler against the XLA FFI headers
that ship with jaxlib, and cached in ``$JAXBN_CACHE_DIR`` (default
``~/.cache/jaxbn``) under a hash of the source, jaxlib, the compiler, the flags
and the CPU, so that a changed input never loads a stale library. The file is
published atomically: concurrent builders never load a partial one.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

__all__ = ["SOURCE", "FLAGS", "compile_library"]

SOURCE = Path(__file__).parent.parent / "csrc" / "batch_norm_cpu.cc"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    d = os.environ.get("JAXBN_CACHE_DIR")
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxbn"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def compile_library(source: Path = SOURCE) -> Path:
    """The path of the built library (compiled now unless cached); RuntimeError if it cannot be."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    import jaxlib

    key = hashlib.sha256(
        "\0".join([source.read_text(), jaxlib.__version__, version, _cpu_id(), " ".join(FLAGS)]).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"batch_norm_cpu-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError:  # e.g. a read-only home: build for this process only
        out = Path(tempfile.mkdtemp(prefix="jaxbn-")) / out.name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders never load a partial file
    return out
