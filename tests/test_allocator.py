"""The allocator tuning takes effect, is exported to child processes, and yields to an operator's
own MALLOC_* variables. Each case runs in a fresh interpreter: mallopt is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only"
)

# Allocate 8 MiB and report whether glibc served it with its own mmap (hblks) or from the heap.
PROBE = """
import ctypes, json, os
from service.serving.allocator import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
applied = tune_allocator() if os.environ.get("TUNE") == "1" else {}
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblks - before
print(json.dumps({"applied": applied, "mapped": mapped,
                  "exported": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_tuning_keeps_forward_sized_blocks_in_the_heap_and_exports_it() -> None:
    untuned = _probe(TUNE="0")
    assert untuned["mapped"] == 1, "glibc's default maps an 8 MiB block on its own"
    tuned = _probe(TUNE="1")
    assert tuned["mapped"] == 0
    assert tuned["applied"] == {
        "MALLOC_MMAP_THRESHOLD_": 32 << 20,
        "MALLOC_TRIM_THRESHOLD_": 256 << 20,
        "MALLOC_ARENA_MAX": 2,
    }
    # Exported, so the API and training workers a server starts get the same allocator.
    assert tuned["exported"] == {k: str(v) for k, v in tuned["applied"].items()}  # type: ignore[attr-defined]


def test_an_operators_own_variable_wins() -> None:
    result = _probe(TUNE="1", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert "MALLOC_MMAP_THRESHOLD_" not in result["applied"]  # type: ignore[operator]
    assert result["mapped"] == 1, "the operator's 1 MiB threshold still maps 8 MiB blocks"
    assert result["exported"]["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)  # type: ignore[index]
