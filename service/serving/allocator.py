"""glibc's allocator tuned for forward passes, set from inside the process at start.

A conv net's forward pass allocates and frees activations of a few MiB each. glibc serves blocks
above its mmap threshold (128 KiB at first) with a fresh `mmap` and gives them back with `munmap`,
so every pass page-faults its activations in again, and it trims the heap's free top back to the
OS at 128 KiB. `bench/serving.py --malloc` measured resnet18 at 1.2-1.5x with the values below on
a 2-core machine and mlp_bn unchanged (README, Performance). Set with `mallopt()` here rather than
by `MALLOC_*` variables in one launcher script, every way of starting bnserve gets them: `python
-m service`, `python -m service.worker`, a container, and the benchmark's in-process limit, which
must run with the same allocator as the server it bounds. The variables are also exported for the
processes a server starts (API workers, training workers), since glibc reads them at exec.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, MutableMapping

logger = logging.getLogger(__name__)

# mallopt() parameters (malloc.h) and glibc's environment variable for each.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

TUNING: dict[str, tuple[int, int]] = {
    # 32 MiB is glibc's largest mmap threshold on 64-bit: activations up to it stay in the heap.
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 << 20),
    # Keep up to 256 MiB of freed heap for the next pass instead of returning it every time.
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 256 << 20),
    # Two arenas: forward threads share freed blocks, and memory does not grow per thread.
    "MALLOC_ARENA_MAX": (_M_ARENA_MAX, 2),
}


def tune_allocator(environ: MutableMapping[str, str] | None = None) -> dict[str, int]:
    """Apply `TUNING` to this process and export it for its children; return what was applied.

    A `MALLOC_*` variable already in the environment wins: glibc applied it at exec, and an
    operator who set it meant it. On other C libraries nothing happens.
    """
    env = os.environ if environ is None else environ
    mallopt = _mallopt()
    if mallopt is None:
        return {}
    applied: dict[str, int] = {}
    for variable, (parameter, value) in TUNING.items():
        if variable in env:
            continue
        if mallopt(parameter, value) != 1:
            logger.warning("mallopt(%s) refused %d; allocator left as it was", variable, value)
            continue
        env[variable] = str(value)
        applied[variable] = value
    return applied


def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    del gnu_get_libc_version
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
