"""Faults of the work directory: unwritable, full; `WorkdirError` says which, where and what was kept.

`check_writable` runs before any training starts (one clear line instead of an
``OSError`` traceback mid-run). `is_disk_full` recognises "no space left on
device" however it arrives (an ``OSError`` from Python, or orbax/tensorstore's
``RESOURCE_EXHAUSTED ... [os_error_code='28']``), and `disk_full_error` turns it
into a message naming the file being written, the free space there and the last
complete checkpoint, which a rerun after freeing space resumes from.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import Optional

__all__ = ["WorkdirError", "check_writable", "is_disk_full", "disk_full_error", "free_bytes"]


class WorkdirError(RuntimeError):
    """The work directory cannot be written (read-only, no permission, disk full)."""


def check_writable(workdir: str) -> None:
    """Creates `workdir` (and ``workdir/checkpoints`` if absent) and checks that a file can be
    created and removed in both.

    Raises:
      WorkdirError: naming the directory, the reason and what to do.
    """
    for path in (workdir, os.path.join(workdir, "checkpoints")):
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".jaxbn-write-check-"):
                pass
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(f"checking that {path} can be written", path, workdir, None) from e
            reason = e.strerror or str(e)
            if e.errno == errno.EROFS:
                reason = "read-only file system"
            raise WorkdirError(
                f"cannot write to the workdir {workdir}: {path}: {reason}. Checkpoints and metrics go "
                f"there; choose a writable --workdir (nothing was trained)") from e


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, means "no space left on device"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str) -> Optional[int]:
    """Bytes free for an unprivileged user on `path`'s file system (None when unknown)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def _size(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # unreachable


def disk_full_error(doing: str, path: str, workdir: str, kept_step: Optional[int]) -> WorkdirError:
    """The `WorkdirError` for a full disk while `doing` (e.g. "saving the checkpoint of step
    10") at `path`; `kept_step` is the last complete checkpoint (None: there is none)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if kept_step is None:
        kept = "no checkpoint was complete yet, so a rerun starts from scratch"
    else:
        kept = (f"kept the last complete checkpoint {os.path.join(ckpt_dir, str(kept_step))} "
                f"(step {kept_step}), which a rerun resumes from")
    return WorkdirError(
        f"disk full (no space left on device) while {doing}, at {path} ({_size(free_bytes(path))} free "
        f"there); {kept}. Free some space (or use another --workdir) and run the same command again")
