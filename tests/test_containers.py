"""The Dockerfile and docker-compose.yml agree with the code, and the image's install step works.

No Docker engine runs on the project's machines, so the container stack is checked here: both
files parsed, every `BNSERVE_*` value they set is a setting the code has and accepts, every
command names a module that exists, ports, volumes and health checks agree across the files,
and the Dockerfile's install step (`scripts/dev.sh install`) runs for real in a clean virtual
environment, offline: the packages come from this interpreter's environment, so pip resolves
and installs the local tree without downloading anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.healthcheck import healthz_url
from service.settings import Settings
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DEV_SH = REPO / "scripts" / "dev.sh"
PG_DATA = "/var/lib/postgresql/data"


# --- reading the files ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _assignments(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(text))


def docker_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "ENV":
            env.update(_assignments(rest))
    return env


def only(keyword: str) -> str:
    (value,) = [rest for k, rest in dockerfile() if k == keyword]
    return value


def exec_form(text: str) -> list[str]:
    """A JSON-array command (`CMD ["python", "-m", "service"]`)."""
    command = json.loads(text)
    assert isinstance(command, list), text
    assert all(isinstance(w, str) for w in command), text
    return command


def healthcheck_command() -> list[str]:
    rest = only("HEALTHCHECK")
    assert " CMD " in f" {rest}", rest
    return exec_form(rest.split("CMD", 1)[1].strip())


def _interpolate(value: Any) -> str:
    """Compose's `${VAR:-default}` as it reads with VAR unset (the file's own defaults)."""
    text = str(value)
    assert "${" not in re.sub(r"\$\{[A-Z0-9_]+(:?-[^}]*)?\}", "", text), f"no default: {text}"
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # merge keys resolved
    return document


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as its container sees it: the image's ENV, then compose's."""
    env = dict(docker_env())
    env.update({k: _interpolate(v) for k, v in (service.get("environment") or {}).items()})
    return env


def dev_sh_defaults() -> dict[str, str]:
    """`VAR="${VAR:-default}"` assignments and exports of scripts/dev.sh."""
    pattern = re.compile(r'^\s*(?:export\s+)?([A-Z_]+)="\$\{\1:-([^}]*)\}"', re.MULTILINE)
    return dict(pattern.findall(DEV_SH.read_text()))


def module_of(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"], command
    return command[2]


def assert_settings(env: dict[str, str], where: str) -> Settings:
    """Every BNSERVE_* variable in `env` is a setting, and together they are valid ones."""
    fields = set(Settings.model_fields)
    ours = {k: v for k, v in env.items() if k.startswith("BNSERVE_")}
    unknown = sorted(k for k in ours if k.removeprefix("BNSERVE_") not in fields)
    assert not unknown, f"{where}: not settings: {unknown}"
    return Settings(**{k.removeprefix("BNSERVE_"): v for k, v in ours.items()})


# --- the Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_cpu_by_default_and_installs_through_dev_sh():
    args = docker_args()
    assert only("FROM") == "${BASE_IMAGE}"
    assert re.fullmatch(r"python:3\.1[1-9]-slim", args["BASE_IMAGE"]), args
    # The README's PyTorch, from the CPU index by default (the CUDA index is a build argument).
    assert args["TORCH_SPEC"] == dev_sh_defaults()["TORCH_SPEC"]
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "TORCH_INDEX_URL" in DEV_SH.read_text()
    runs = [rest for keyword, rest in dockerfile() if keyword == "RUN"]
    installs = [r for r in runs if "scripts/dev.sh install" in r]
    assert len(installs) == 1, runs
    # No second recipe: nothing else installs Python packages.
    others = [r for r in runs if r not in installs]
    assert not [r for r in others if re.search(r"\bpip\b|\buv\b|requirements", r)], runs
    user = only("USER")
    assert user not in ("root", "0"), user
    assert any("useradd" in r and re.search(rf"\b{user}\b", r) for r in runs), runs
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", ".env"} <= ignored


def test_dockerfile_serves_on_its_port_with_data_on_the_volume_and_the_benchmark_allocator():
    env = docker_env()
    settings = assert_settings(env, "Dockerfile")
    assert settings.HOST == "0.0.0.0"
    assert only("EXPOSE") == str(settings.PORT)
    assert only("VOLUME") == str(settings.DATA_DIR)
    # The allocator tuning is bnserve's own (on by default), not variables that could drift.
    assert settings.MALLOC_TUNING
    assert not {k for k in env if k.startswith("MALLOC_")}
    for command in (exec_form(only("CMD")), healthcheck_command()):
        assert importlib.util.find_spec(module_of(command)) is not None, command
    assert module_of(exec_form(only("CMD"))) == "service"
    assert module_of(healthcheck_command()) == "service.healthcheck"


def test_the_health_check_command_passes_on_a_live_server_and_fails_without_one(server):
    env = {**os.environ, "BNSERVE_HOST": "0.0.0.0", "BNSERVE_PORT": str(server.port)}
    command = [sys.executable, *healthcheck_command()[1:]]
    ok = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    server.stop()
    down = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=60, check=False)
    assert down.returncode == 1
    assert b"unhealthy: http://127.0.0.1:" in down.stderr
    assert healthz_url("::", 8000) == "http://[::1]:8000/healthz"


def _shared_site_dirs() -> list[str]:
    """This interpreter's package folders (those holding installed distributions)."""
    return [
        entry
        for entry in sys.path
        if entry
        and Path(entry).is_dir()
        and Path(entry).resolve() != REPO
        and any(Path(entry).glob("*.dist-info"))
    ]


def test_the_images_install_step_installs_bnserve_in_a_clean_environment(tmp_path):
    """The Dockerfile's RUN line as it is, in a fresh venv that sees this environment's packages
    (so nothing is downloaded: PIP_NO_INDEX), with the image's ARG and ENV values."""
    (install,) = [r for k, r in dockerfile() if k == "RUN" and "scripts/dev.sh install" in r]
    command = re.sub(r"^(--\S+\s+)+", "", install)  # BuildKit's --mount flags
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "_shared.pth").write_text("\n".join(_shared_site_dirs()) + "\n")
    env = {
        **os.environ,
        **docker_args(),
        **{k: v for k, v in docker_env().items() if not k.startswith(("PATH", "BNSERVE_"))},
        "VENV": str(venv),
        "PIP_NO_INDEX": "1",
        # pip reads "0" here as "no build isolation" (its inverted flag): setuptools is shared.
        "PIP_NO_BUILD_ISOLATION": "0",
    }
    result = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The set-up says what it does, a line a step, and keeps pip's own output to itself.
    steps = [line for line in result.stderr.splitlines() if line.startswith("==> ")]
    assert [s.split(" (")[0].split(";")[0] for s in steps] == [
        "==> upgrading pip",
        "==> installing PyTorch",
        f"==> installing bnserve{_install_extras(command)} and its dependencies",
        "==> installed",
    ], result.stderr
    assert "Requirement already satisfied" not in result.stdout + result.stderr
    assert "Successfully installed" not in result.stdout + result.stderr
    # bnserve is now installed in the new environment itself, from this tree, importable from
    # anywhere, with the dev.sh stamp that makes a rerun a no-op.
    probe = (
        "import importlib.metadata as m, service, service.worker.__main__, service.healthcheck; "
        "print(service.__file__); print(m.distribution('bnserve').locate_file(''))"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert Path(found[0]).resolve().is_relative_to(REPO), found
    assert Path(found[1]).resolve().is_relative_to(venv), found
    assert (venv / ".bnserve-installed").read_text().split()[0] == docker_args()["TORCH_SPEC"]

    # `scripts/dev.sh serve` hands its arguments to the server, as its header says: `--help`
    # is the server's own and starts nothing.
    served = subprocess.run(
        ["bash", str(DEV_SH), "serve", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stdout + served.stderr
    assert "==> starting the server: python -m service --help" in served.stderr
    assert "--port" in served.stdout
    assert "--workers" in served.stdout


def _install_extras(command: str) -> str:
    """The extras the Dockerfile's `scripts/dev.sh install "[...]"` asks for."""
    match = re.search(r"dev\.sh install\s+\"?(\[[^\]\"]*\])?", command)
    return (match.group(1) or "") if match else ""


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_runs_api_workers_and_postgres_from_the_image():
    services = compose()["services"]
    assert set(services) == {"api", "worker", "postgres"}
    api, worker = services["api"], services["worker"]
    for service in (api, worker):
        assert service["build"]["context"] == "."
        assert (REPO / service["build"]["context"] / "Dockerfile").is_file()
        assert service["image"] == api["image"]
    assert module_of(api["command"]) == "service"
    assert module_of(worker["command"]) == "service.worker"
    for service in (api, worker):
        assert importlib.util.find_spec(module_of(service["command"])) is not None
    # `--scale worker=N`: nothing that only one container can have.
    assert "ports" not in worker
    assert "container_name" not in worker
    # The workers run in their own service, not in the API's container.
    assert service_env(api)["BNSERVE_WORKERS"] == "0"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_settings_are_real_and_valid(name):
    assert_settings(service_env(compose()["services"][name]), f"docker-compose.yml {name}")


def test_compose_ports_volumes_database_and_health_checks_agree():
    document = compose()
    services = document["services"]
    api, worker, postgres = services["api"], services["worker"], services["postgres"]
    api_env, worker_env = service_env(api), service_env(worker)
    # The published port is the one the API listens on, on loopback unless told otherwise.
    (port,) = api["ports"]
    assert port.rsplit(":", 1)[1] == api_env["BNSERVE_PORT"]
    assert port.startswith("127.0.0.1:")
    # API and workers share one data dir on one named volume, mounted where the setting says.
    declared = set(document["volumes"])
    for service, env in ((api, api_env), (worker, worker_env)):
        (mount,) = service["volumes"]
        volume, target = mount.split(":")[:2]
        assert volume == "data"
        assert volume in declared
        assert target == env["BNSERVE_DATA_DIR"]
    assert docker_env()["BNSERVE_DATA_DIR"] == api_env["BNSERVE_DATA_DIR"]  # the image's VOLUME
    (pg_mount,) = postgres["volumes"]
    assert pg_mount.split(":")[0] in declared
    assert pg_mount.split(":")[1] == PG_DATA
    # Both reach the one PostgreSQL database the postgres service creates.
    url = urlsplit(api_env["BNSERVE_DATABASE_URL"])
    assert worker_env["BNSERVE_DATABASE_URL"] == api_env["BNSERVE_DATABASE_URL"]
    pg_env = {k: _interpolate(v) for k, v in postgres["environment"].items()}
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert (url.username, url.password, url.path) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        "/" + pg_env["POSTGRES_DB"],
    )
    # Health: postgres checks its own database, the API runs the image's check, workers have
    # no port to probe, and every `service_healthy` dependency has a check.
    pg_test = " ".join(postgres["healthcheck"]["test"])
    assert "pg_isready" in pg_test
    assert f"-U {pg_env['POSTGRES_USER']}" in pg_test
    assert f"-d {pg_env['POSTGRES_DB']}" in pg_test
    assert api["healthcheck"]["test"] == ["CMD", *healthcheck_command()]
    assert worker["healthcheck"] == {"disable": True}
    for service in services.values():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy":
                check = services[dependency].get("healthcheck", {})
                assert check.get("test"), dependency
                assert not check.get("disable"), dependency
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_settings_in_the_files_would_be_refused_if_wrong(monkeypatch):
    """The checks above would catch a misspelt or invalid setting (not a vacuous pass)."""
    with pytest.raises(AssertionError, match="not settings"):
        assert_settings({"BNSERVE_WORKER": "0"}, "x")
    with pytest.raises(ValueError, match="PORT"):
        assert_settings({"BNSERVE_PORT": "eighty"}, "x")
    assert _interpolate("${A:-1}/${B:-}") == "1/"
