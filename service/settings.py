"""All of bnserve's settings, read from `BNSERVE_*` environment variables (or a `.env` file).

This is the only place that reads the environment; everything else takes a `Settings` object, so
tests build their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Shorter bearer tokens are refused: a short one can be guessed, an empty one matches nothing sent.
MIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BNSERVE_", env_file=".env", extra="ignore", frozen=True
    )

    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=0, le=65535)
    DATA_DIR: Path = Path("./data")
    # Empty means the SQLite file `<DATA_DIR>/bnserve.db`; `postgresql://` selects PostgreSQL.
    DATABASE_URL: str = ""
    DEVICE: str = "auto"
    API_TOKEN: str | None = None
    PROTECT_READS: bool = False
    # Host names the server answers for (the Host header); empty means the bind address and the
    # loopback names. `*` allows any, `*.example.com` any subdomain.
    ALLOWED_HOSTS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    WORKERS: int = Field(1, ge=0, le=64)
    # API processes (uvicorn workers) on this host; each follows the database like a replica.
    API_WORKERS: int = Field(1, ge=1, le=64)
    # Open connections per API process; beyond it the longest-waiting idle one is closed, or if
    # none is idle the new request gets a JSON 503 before its body is read.
    MAX_CONNECTIONS: int = Field(1024, ge=1)
    # A connection that has not sent a whole request head this long after it opened (or after the
    # first bytes of its next request) is closed: idle and byte-a-time sockets cannot hold slots.
    HEADER_TIMEOUT_S: float = Field(5.0, gt=0, le=300)
    # An idle keep-alive connection between two requests is closed after this (uvicorn's own timer).
    KEEP_ALIVE_S: int = Field(5, ge=1, le=300)
    # One log line per request; off by default because it is on the hot path of every prediction.
    ACCESS_LOG: bool = False
    MAX_UPLOAD_BYTES: int = Field(1 << 30, gt=0)
    # What a dataset's arrays may declare once decompressed; unset means MAX_UPLOAD_BYTES.
    MAX_DATASET_BYTES: int | None = Field(None, gt=0)
    # Threads that read, scan, check and store uploads, apart from the pools predictions use.
    UPLOAD_THREADS: int = Field(2, ge=1, le=64)
    # Python modules imported at start that register extra architectures (comma-separated).
    ARCHITECTURE_PLUGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Dynamic batching: concurrent requests for one version are gathered into one forward pass.
    # A request never waits for company: whatever queued while the model was busy goes in the
    # next pass (service/serving/batcher.py), so the only knob is the largest pass.
    MAX_BATCH_SIZE: int = Field(64, ge=1, le=65536)
    # Threads for forward passes per process; each model (version) runs one pass at a time, so
    # these only let different models run side by side (serving/manager.py).
    FORWARD_THREADS: int = Field(4, ge=1, le=64)
    # A prediction body's own limit, far below the upload limit and refused (413) before it is
    # read: 16 MiB holds a JSON batch of ~500 CIFAR-sized samples, or 1,300 as binary float32.
    MAX_PREDICT_BODY_BYTES: int = Field(16 << 20, gt=0)
    # Largest batch one request may carry.
    MAX_REQUEST_BATCH: int = Field(1024, ge=1)
    # Samples waiting across all batchers before new predictions get 503 + Retry-After.
    MAX_QUEUED_SAMPLES: int = Field(4096, ge=1)
    PREDICT_TIMEOUT_S: float = Field(30.0, gt=0)
    # torch.compile each loaded version (compiled and warmed before it serves; seconds per load).
    COMPILE: bool = False
    # Loaded non-serving versions kept for `?version=N` (LRU); serving versions never count.
    VERSION_CACHE_SIZE: int = Field(2, ge=0)
    # Loads of `?version=N` versions from disk at once; more get 503 rather than thrash.
    MAX_PINNED_LOADS: int = Field(1, ge=1, le=64)
    # How often each API process reads the serving versions from the database.
    SYNC_INTERVAL_S: float = Field(1.0, gt=0, le=60)

    # Training workers.
    WORKER_POLL_S: float = Field(0.5, gt=0)
    WORKER_HEARTBEAT_S: float = Field(1.0, gt=0)
    # A running job whose heartbeat is older than this is taken to have lost its worker.
    JOB_STALE_AFTER_S: float = Field(15.0, gt=0)
    JOB_MAX_ATTEMPTS: int = Field(2, ge=1)
    # PyTorch threads per worker; 0 shares this machine's cores among the server's workers, so
    # several workers do not oversubscribe the CPU (which slows each of them several-fold).
    WORKER_THREADS: int = Field(0, ge=0)
    # Create and train a demo model on first start with an empty registry.
    DEMO: bool = True
    LOG_LEVEL: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("ARCHITECTURE_PLUGINS", "ALLOWED_HOSTS", mode="before")
    @classmethod
    def _split_plugins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("API_TOKEN")
    @classmethod
    def _check_token(cls, value: str | None) -> str | None:
        # Unset or empty (`BNSERVE_API_TOKEN=` in a .env file): the server keeps its own token.
        if value is None or value == "":
            return None
        if len(value.strip()) < MIN_TOKEN_LENGTH or value != value.strip():
            raise ValueError(
                f"BNSERVE_API_TOKEN must be at least {MIN_TOKEN_LENGTH} characters with no "
                "surrounding whitespace (or unset it to have one generated in the data dir)"
            )
        return value

    @field_validator("DEVICE")
    @classmethod
    def _check_device(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("BNSERVE_DEVICE must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _check_db(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("BNSERVE_DATABASE_URL must be a sqlite:// or postgresql:// URL")
        return value

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, with the psycopg 3 driver named for PostgreSQL."""
        url = self.DATABASE_URL or f"sqlite:///{(self.DATA_DIR / 'bnserve.db').resolve()}"
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return url

    @property
    def max_dataset_bytes(self) -> int:
        return self.MAX_DATASET_BYTES or self.MAX_UPLOAD_BYTES

    def allowed_hosts(self) -> list[str]:
        """The Host header names to answer: the setting, or the bind address and loopback."""
        if self.ALLOWED_HOSTS:
            return list(self.ALLOWED_HOSTS)
        return [self.HOST, "localhost", "127.0.0.1", "::1"]

    def worker_threads(self) -> int:
        if self.WORKER_THREADS:
            return self.WORKER_THREADS
        return max(1, (os.cpu_count() or 1) // max(1, self.WORKERS))

    @property
    def checkpoint_dir(self) -> Path:
        return self.DATA_DIR / "checkpoints"

    @property
    def dataset_dir(self) -> Path:
        return self.DATA_DIR / "datasets"

    @property
    def upload_dir(self) -> Path:
        return self.DATA_DIR / "uploads"

    @property
    def metrics_dir(self) -> Path:
        """The API processes' metric files when BNSERVE_API_WORKERS > 1, a folder per server."""
        return self.DATA_DIR / "metrics"

    @property
    def resume_dir(self) -> Path:
        """Training jobs' per-epoch states, so an interrupted job resumes instead of restarting."""
        return self.DATA_DIR / "resume"

    @property
    def token_file(self) -> Path:
        return self.DATA_DIR / "api-token"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process (a worker) these same settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Path):
            text = str(value.resolve())
        else:
            text = str(value)
        env[f"BNSERVE_{name}"] = text
    return env
