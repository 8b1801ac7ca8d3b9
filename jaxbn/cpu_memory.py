"""Keep freed memory in the heap, from inside a running process (XLA:CPU on glibc).

XLA:CPU allocates every output and temporary buffer with ``malloc``. glibc serves
blocks above its mmap threshold (and all of a worker thread's arena trimmings) by
``mmap``/``munmap``, so every call of a jitted function page-faults its large
buffers in again, one zeroed 4 KiB page at a time: at DRAM-sized shapes that, not
the computation, is most of the time (a BatchNorm layer at 64×56×56×64 spends 3–4×
longer with glibc's defaults; see ``benchmarks/studies/cpu_settings.py`` and
``benchmarks/studies/fused_loss.py``).

``train.py`` and the benchmarks start Python with ``GLIBC_TUNABLES`` set (one arena,
no ``mmap``, no trimming), which glibc reads only at start-up. A library user who
does not control how their process starts calls `keep_heap` instead: the same
settings through ``mallopt(3)``, effective from then on. The cost is the same as
the environment variable's: the heap never shrinks, so the process's resident
memory stays at its peak — what a training process wants anyway.

Why our own code: this is three ``mallopt`` calls; no maintained package offers
them, and an allocator swap (tcmalloc via ``LD_PRELOAD``) also needs control over
the process's start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_heap"]

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest value an int parameter takes: freed memory is never returned


def keep_heap() -> dict:
    """Makes glibc keep freed memory for reuse instead of unmapping it.

    Equivalent to starting the process with
    ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``:
    large blocks come from the heap instead of ``mmap``, the heap is never trimmed,
    and threads created from now on share the main arena. Call it once, early
    (before the first large computation); calling it again changes nothing.

    Returns:
      ``{"applied": True, "settings": {...}}`` on glibc, or ``{"applied": False,
      "reason": ...}`` where there is nothing to do (another C library or OS);
      it never raises.
    """
    if not sys.platform.startswith("linux"):
        return {"applied": False, "reason": f"not glibc (platform {sys.platform!r}); nothing to do"}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version
    except (OSError, AttributeError) as e:
        return {"applied": False, "reason": f"no glibc mallopt in this process ({e}); nothing to do"}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    gnu_get_libc_version.restype = ctypes.c_char_p
    settings = {"mmap_max": 0, "trim_threshold": _NEVER_TRIM, "arena_max": 1}
    params = {"mmap_max": _M_MMAP_MAX, "trim_threshold": _M_TRIM_THRESHOLD, "arena_max": _M_ARENA_MAX}
    failed = [k for k, v in settings.items() if mallopt(params[k], v) != 1]
    if failed:
        return {"applied": False, "reason": f"glibc's mallopt refused {failed}"}
    return {"applied": True, "settings": settings, "glibc": gnu_get_libc_version().decode()}
