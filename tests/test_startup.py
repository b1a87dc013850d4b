"""A bad start says what is wrong in one line per setting and leaves the data dir as it was.

Issue #10: `BNSERVE_PORT=abc` printed a 17-line pydantic traceback naming `PORT`, and
`BNSERVE_DEVICE=cuda` on a CPU machine failed only after the demo model had been created.
Each test runs the real `python -m service` (or `service.worker`) process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# A device no machine here has: with no CUDA it is "not available", with CUDA "not visible".
MISSING_DEVICE = "cuda:99"


def _start(module: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Start `module` with `env` on `data_dir`; it must stop by itself."""
    full = {
        **os.environ,
        "BNSERVE_DATA_DIR": str(data_dir),
        "BNSERVE_DEVICE": "cpu",
        "BNSERVE_WORKERS": "0",
        "BNSERVE_DEMO": "true",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"BNSERVE_PORT": "abc"},
            ["bnserve: invalid setting BNSERVE_PORT='abc': ", "an integer >= 0 and <= 65535"],
        ),
        (
            {"BNSERVE_LOG_LEVEL": "loud", "BNSERVE_DEMO": "maybe"},
            ["BNSERVE_LOG_LEVEL='loud'", "one of debug, info, warning, error", "BNSERVE_DEMO"],
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable_and_its_values(tmp_path, env, expected):
    data_dir = tmp_path / "data"
    result = _start("service", data_dir, **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == len(env), lines  # one line per bad setting, nothing else
    for text in expected:
        assert text in result.stderr, result.stderr
    assert all(line.startswith("bnserve: invalid setting BNSERVE_") for line in lines), lines
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BNSERVE_API_TOKEN", "short-secret"),
        ("BNSERVE_DATABASE_URL", "mysql://u:secret@db/x"),
        ("BNSERVE_STORAGE_URL", "s3://AKIAX:secret@bucket/p"),
    ],
)
def test_a_secret_is_never_echoed_in_its_error(tmp_path, name, value):
    result = _start("service", tmp_path / "data", **{name: value})
    assert result.returncode == 2, result.stderr
    assert f"invalid setting {name}: " in result.stderr
    assert "secret" not in result.stderr, result.stderr


@pytest.mark.parametrize("module", ["service", "service.worker"])
def test_a_missing_device_fails_before_anything_is_written(tmp_path, module):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = _start(module, data_dir, BNSERVE_DEVICE=MISSING_DEVICE)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = _lines(result.stderr)
    assert line.startswith(f"bnserve: BNSERVE_DEVICE={MISSING_DEVICE} but "), line
    assert "this machine has: auto, cpu" in line, line
    # No database, no token, no demo model or dataset: the data dir is as it was.
    assert list(data_dir.iterdir()) == []


def test_a_plugin_that_does_not_import_fails_before_anything_is_written(tmp_path):
    data_dir = tmp_path / "data"
    result = _start("service", data_dir, BNSERVE_ARCHITECTURE_PLUGINS="no_such_plugin_module")
    assert result.returncode == 2, result.stderr
    (line,) = _lines(result.stderr)
    assert line.startswith("bnserve: BNSERVE_ARCHITECTURE_PLUGINS: "), line
    assert "no_such_plugin_module" in line, line
    assert not data_dir.exists()


@pytest.mark.parametrize("api_workers", ["1", "2"])
def test_a_port_in_use_fails_before_anything_is_written(tmp_path, api_workers):
    """uvicorn binds after the app's lifespan (migrations, the demo); bnserve binds first."""
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _start(
            "service", data_dir, BNSERVE_PORT=str(port), BNSERVE_API_WORKERS=api_workers
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in _lines(result.stderr) if x.startswith("bnserve: ")]
    assert f"cannot listen on 127.0.0.1:{port} (BNSERVE_HOST, BNSERVE_PORT)" in line, line
    assert not data_dir.exists()


def test_an_unreachable_database_fails_in_one_line_without_the_url(tmp_path):
    """A PostgreSQL that refuses connections (nothing listens on the port): no migration
    traceback, no password echoed, nothing written to the data dir."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    url = f"postgresql://bnserve:s3cret-password@127.0.0.1:{port}/nowhere"
    data_dir = tmp_path / "data"
    result = _start("service", data_dir, BNSERVE_DATABASE_URL=url)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in _lines(result.stderr) if x.startswith("bnserve: ")]
    assert line.startswith("bnserve: cannot use the database of BNSERVE_DATABASE_URL: "), line
    assert "s3cret-password" not in result.stderr
    assert not data_dir.exists()
