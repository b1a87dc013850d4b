"""Intra-op threads for serving: one forward at a time per model, so the threads fit the cores."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from service.settings import usable_cpus
from tests.conftest import make_settings
from tests.helpers_api import running


def test_the_default_shares_the_cores_among_the_api_processes(tmp_path: Path) -> None:
    cpus = usable_cpus()
    assert make_settings(tmp_path).serve_threads() == cpus
    assert make_settings(tmp_path, API_WORKERS=2).serve_threads() == max(1, cpus // 2)
    assert make_settings(tmp_path, SERVE_THREADS=3).serve_threads() == 3


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_usable_cpus_follows_the_affinity_mask() -> None:
    assert usable_cpus() == len(os.sched_getaffinity(0))


def _threads_of_a_new_thread() -> int:
    """What a forward thread sees: PyTorch sets each thread's OpenMP count when it first runs."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_started_server_uses_them(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        with running(tmp_path, SERVE_THREADS=1, DEMO=False) as (_, client):
            assert client.get("/healthz").status_code == 200
            assert _threads_of_a_new_thread() == 1
    finally:
        torch.set_num_threads(before)
