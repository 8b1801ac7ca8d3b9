"""The switch for jaxbn's one-sweep CPU kernels (public face of ``jaxbn/backends/cpu_ffi.py``).

``JAXBN_CPU_KERNEL`` (or ``with jaxbn.cpu_kernel.use(...)`` around the tracing)
chooses: ``auto`` (default) uses the kernels where they are safe and fast, ``0``
never, ``1`` wherever they are available. `available()` builds them on first call
(a few seconds, cached in ``~/.cache/jaxbn``); `build_error()` says why they could
not be built. `moments`, `masked_moments` and `dy_sums` are the kernels as array
functions (float32 results, differentiable, batchable).
"""

from jaxbn.backends.cpu_ffi import available, build_error, can_run, dy_sums, masked_moments, mode, moments, use

__all__ = ["available", "build_error", "mode", "use", "usable", "moments", "masked_moments", "dy_sums"]


def usable(x, feature_axes: tuple) -> bool:
    """Whether the kernels would serve x with these feature axes, traced here and now."""
    return can_run(x, tuple(feature_axes))
