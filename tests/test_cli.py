"""The `bnserve` CLI against a real server (in-process, through click's runner), and its exit codes.

`python -m service` runs as a child process where the test is about what starts (or does not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner, Result

from service.cli import exits
from service.cli.app import PROGRESS_FROM_BYTES, cli
from tests.conftest import REPO, TOKEN, ThreadServer, free_port, pt_bytes, trained_state_dict
from tests.helpers_jobs import WorkerThread, blobs, npz_bytes, wait_until

# in_features 4,100: fc1 alone is 4100 x 64 float32 (1 MiB), so `upload` draws its progress bar.
WIDE = {"in_features": 4100}


@pytest.fixture
def run(server: ThreadServer):
    """Run `bnserve ARGS` against the server, with the token from the environment."""
    runner = CliRunner()

    def _run(*args: str, token: str | None = TOKEN, stdin: str | None = None) -> Result:
        env = {"BNSERVE_URL": server.url, "BNSERVE_API_TOKEN": token, "BNSERVE_DATA_DIR": None}
        return runner.invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)

    return _run


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_models_upload_predict_promote(run, tmp_path: Path):
    assert "mlp_bn" in _ok(run("architectures"))
    assert "created model wide" in _ok(
        run("create", "wide", "mlp_bn", "--config", json.dumps(WIDE))
    )
    weights = tmp_path / "w.pt"
    weights.write_bytes(pt_bytes(trained_state_dict("mlp_bn", seed=1, **WIDE)))
    assert weights.stat().st_size > PROGRESS_FROM_BYTES
    assert "wide version 1 (serving)" in _ok(run("upload", "wide", str(weights), "--note", "one"))
    assert "version 2 (not serving)" in _ok(run("upload", "wide", str(weights), "--no-promote"))
    listed = json.loads(_ok(run("versions", "wide", "--json")))
    assert [(v["version"], v["serving"]) for v in listed] == [(1, True), (2, False)]
    assert "now serves version 2 (was 1)" in _ok(run("promote", "wide", "2"))

    x = np.random.default_rng(0).normal(size=(3, 4100)).astype(np.float32)
    (tmp_path / "x.json").write_text(json.dumps({"inputs": x.tolist()}))
    np.save(tmp_path / "x.npy", x)
    from_json = json.loads(_ok(run("predict", "wide", str(tmp_path / "x.json"), "--json")))
    from_npy = json.loads(_ok(run("predict", "wide", str(tmp_path / "x.npy"), "--json")))
    from_stdin = json.loads(
        _ok(run("predict", "wide", "-", "--json", stdin=json.dumps(x.tolist())))
    )
    assert from_json["version"] == from_npy["version"] == from_stdin["version"] == 2
    np.testing.assert_allclose(from_npy["outputs"], from_json["outputs"], rtol=1e-5)
    assert from_stdin["predictions"] == from_json["predictions"]
    table = _ok(run("predict", "wide", "--inputs", json.dumps(x[:1].tolist()), "--version", "1"))
    assert "wide v1" in table
    assert "probability" in table
    assert "wide" in _ok(run("models"))


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["versions", "nope"], exits.NOT_FOUND, "404 model_not_found"),
        (["create", "Bad Name", "mlp_bn"], exits.ERROR, "422 invalid_name"),
        (["promote", "nope", "1"], exits.NOT_FOUND, "404 model_not_found"),
        (["predict", "nope", "--inputs", "[1, 2]"], exits.NOT_FOUND, "404 model_not_found"),
        (["cancel", "nope"], exits.NOT_FOUND, "404 job_not_found"),
        (["predict", "nope"], exits.USAGE, "give either FILE"),
        (["promote", "nope", "zero"], exits.USAGE, "is not a valid integer"),
    ],
)
def test_errors_print_code_and_detail_and_exit_as_documented(run, args, code, said):
    result = run(*args)
    assert result.exit_code == code, result.output
    assert said in result.stderr


def test_auth_conflict_and_unreachable_exit_codes(run, server: ThreadServer, tmp_path: Path):
    assert run("create", "m", "mlp_bn").exit_code == 0
    conflict = run("create", "m", "mlp_bn")
    assert conflict.exit_code == exits.CONFLICT
    assert "409 model_exists" in conflict.stderr
    denied = run("create", "other", "mlp_bn", token="wrong-token-0123456789")
    assert denied.exit_code == exits.UNAUTHORIZED
    assert "401 unauthorized" in denied.stderr
    # No token given: the one the server keeps in its data dir is used.
    data_dir = tmp_path / "data-dir"
    data_dir.mkdir()
    (data_dir / "api-token").write_text(TOKEN + "\n")
    from_file = run("create", "other", "mlp_bn", "--data-dir", str(data_dir), token=None)
    assert from_file.exit_code == 0, from_file.output
    gone = CliRunner().invoke(cli, ["models", "--url", f"http://127.0.0.1:{free_port()}"])
    assert gone.exit_code == exits.UNREACHABLE
    assert "cannot reach" in gone.stderr


def test_datasets_jobs_and_cancel(run, tmp_path: Path):
    _ok(run("create", "blobs", "mlp_bn"))
    x, y = blobs(64)
    (tmp_path / "b.npz").write_bytes(npz_bytes(x=x, y=y))
    uploaded = json.loads(
        _ok(run("datasets", "upload", str(tmp_path / "b.npz"), "--name", "b", "--json"))
    )
    assert uploaded["num_samples"] == 64
    assert uploaded["id"] in _ok(run("datasets", "list"))
    # By name; --detach prints the id only.
    job_id = _ok(run("train", "blobs", "b", "--epochs", "2", "--lr", "0.1", "--detach")).strip()
    assert job_id in _ok(run("jobs"))
    assert json.loads(_ok(run("jobs", job_id, "--json")))["status"] == "queued"
    assert "cancel requested (cancelled)" in _ok(run("cancel", job_id))
    followed = run("follow", job_id)
    assert followed.exit_code == exits.JOB_CANCELLED
    assert f"job {job_id} cancelled" in followed.stdout
    again = run("cancel", job_id)
    assert again.exit_code == exits.CONFLICT
    assert "409 job_finished" in again.stderr
    refused = run("train", "blobs", "b", "--lr", "0.1")  # no --epochs: the server says so
    assert refused.exit_code == exits.ERROR
    assert "422 missing_field" in refused.stderr


def test_train_follows_the_job_to_its_outcome(run, settings, tmp_path: Path):
    _ok(run("create", "blobs", "mlp_bn"))
    x, y = blobs(200)
    (tmp_path / "b.npz").write_bytes(npz_bytes(x=x, y=y))
    dataset = json.loads(_ok(run("datasets", "upload", str(tmp_path / "b.npz"), "--json")))
    worker = WorkerThread(settings).start()
    try:
        result = run(
            "train", "blobs", dataset["id"], "--epochs", "3", "--batch-size", "16", "--lr", "0.05"
        )
    finally:
        worker.stop()
    assert result.exit_code == 0, result.output
    # keep "best" by default: the epoch it kept, and why the run ended (issue 16's fields)
    assert "succeeded: version 1 (promoted), epoch " in result.stdout
    assert " kept, completed" in result.stdout
    for epoch in (1, 2, 3):  # one line per epoch, above the bar, with its learning rate
        line = next(t for t in result.stderr.splitlines() if t.startswith(f"epoch {epoch}  "))
        assert "train loss" in line
        assert line.endswith("lr 0.05")
    listed = run("jobs")
    assert listed.exit_code == 0, listed.output
    assert "completed" in listed.stdout


def _python_m_service(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BNSERVE_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_m_service_help_starts_nothing_and_unknown_arguments_are_refused(tmp_path: Path):
    data_dir = tmp_path / "data"
    shown = _python_m_service("--help", data_dir=data_dir)
    assert shown.returncode == 0, shown.stderr
    for option in ("--host", "--port", "--data-dir", "--workers", "BNSERVE_PORT"):
        assert option in shown.stdout
    refused = _python_m_service("--bogus", data_dir=data_dir)
    assert refused.returncode == exits.USAGE
    assert "No such option '--bogus'" in refused.stderr
    invalid = _python_m_service("--device", "gpu", data_dir=data_dir)
    assert invalid.returncode == exits.USAGE
    assert "--device" in invalid.stderr
    assert not data_dir.exists()  # no migration, no token, no demo: nothing started
    # bnserve serve is the same command.
    serve_help = CliRunner().invoke(cli, ["serve", "--help"])
    assert serve_help.exit_code == 0
    assert "--api-workers" in serve_help.stdout
    worker_help = CliRunner().invoke(cli, ["worker", "--help"])
    assert worker_help.exit_code == 0
    assert "BNSERVE_WORKER_THREADS" in worker_help.stdout


def test_python_m_service_serves_with_its_options(tmp_path: Path):
    """What `scripts/dev.sh serve --port N` runs: the options reach the server."""
    data_dir, port = tmp_path / "given", free_port()
    args = ["--port", str(port), "--data-dir", str(data_dir), "--workers", "0", "--no-demo"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args, "--log-level", "warning"],
        cwd=REPO,
        env={**env, "BNSERVE_DEVICE": "cpu"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def healthy() -> bool | None:
            assert proc.poll() is None, "the server exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).is_success or None
            except httpx.TransportError:
                return None

        wait_until(healthy, 90, "the server on the given port", interval=0.2)
        assert (data_dir / "api-token").exists()  # the token went into the given data dir
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json() == []  # --no-demo
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_follow_exits_with_job_failed(run, settings, tmp_path: Path):
    _ok(run("create", "blobs", "mlp_bn"))
    x, y = blobs(64)
    (tmp_path / "b.npz").write_bytes(npz_bytes(x=x, y=y))
    dataset = json.loads(_ok(run("datasets", "upload", str(tmp_path / "b.npz"), "--json")))
    job_id = _ok(run("train", "blobs", dataset["id"], "--epochs", "1", "--lr", "0.1", "--detach"))
    # The dataset's file goes missing under the queued job: the worker can only fail it.
    for stored in settings.dataset_dir.glob(f"{dataset['sha256']}.*"):
        stored.unlink()
    worker = WorkerThread(settings).start()
    try:
        result = run("follow", job_id.strip())
    finally:
        worker.stop()
    assert result.exit_code == exits.JOB_FAILED, result.output
    assert f"job {job_id.strip()} failed: " in result.stderr
