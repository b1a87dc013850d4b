"""All of bnserve's settings, read from `BNSERVE_*` environment variables (or a `.env` file).

This is the only place that reads the environment; everything else takes a `Settings` object, so
tests build their own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
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
    # Where checkpoints and datasets live: empty is the data dir (one host, or hosts sharing the
    # folder with working file locks); `s3://bucket/prefix` is any S3-compatible object store,
    # reached with the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION,
    # ...), so replicas on different hosts share only it and the database (README).
    STORAGE_URL: str = ""
    # Bytes of downloaded versions and datasets each process keeps in `<DATA_DIR>/cache` when the
    # storage is remote, half for each (least recently used go first; what this process is
    # reading or has loaded is never evicted).
    CACHE_BYTES: int = Field(4 << 30, ge=0)
    # An object in remote storage that no row names is deleted once it is older than this: a
    # crash between an object's write and its row's commit leaves one, and a publish still in
    # flight on another replica (write, then commit) is younger than this, so it is kept.
    STORAGE_SWEEP_GRACE_S: float = Field(3600.0, gt=0)
    DEVICE: str = "auto"
    API_TOKEN: str | None = None
    # Reads and predictions need the token too; /readyz then names no models to callers without it.
    PROTECT_READS: bool = False
    # A second token that opens /metrics alone (for a scraper); set, /metrics always needs a token.
    METRICS_TOKEN: str | None = None
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
    # Entries (files and folders) an image dataset's .zip or .tar may hold, counted from its
    # directory (tar: header by header) before any image is read.
    MAX_DATASET_FILES: int = Field(100_000, ge=2)
    # Threads that read, scan, check and store uploads, apart from the pools predictions use.
    UPLOAD_THREADS: int = Field(2, ge=1, le=64)
    # Threads for database calls per API process, apart from the pools that parse inputs and run
    # forward passes: a slow or locked database makes only requests that need it wait.
    DB_THREADS: int = Field(8, ge=1, le=64)
    # How long a SQLite write waits for another writer's lock before it fails ("database is
    # locked"); background loops and workers then retry with backoff.
    DB_BUSY_TIMEOUT_S: float = Field(30.0, gt=0, le=600)
    # Python modules imported at start that register extra architectures (comma-separated).
    ARCHITECTURE_PLUGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Dynamic batching: concurrent requests for one version are gathered into one forward pass.
    # A request never waits for company: whatever queued while the model was busy goes in the
    # next pass (service/serving/batcher.py), so the only knob is the largest pass.
    MAX_BATCH_SIZE: int = Field(64, ge=1, le=65536)
    # Threads for forward passes per process; each model (version) runs one pass at a time, so
    # these only let different models run side by side (serving/manager.py).
    FORWARD_THREADS: int = Field(4, ge=1, le=64)
    # PyTorch intra-op threads for forward passes in each API process. 0: the CPUs this process
    # may use, shared out when BNSERVE_API_WORKERS > 1 (never more threads than cores, which only
    # make OpenMP's workers wait for each other). Measured on 2 idle cores, 2 threads served
    # resnet18 at 1.6x of 1 (README, Performance); 1 is better only where other busy processes
    # share the cores.
    SERVE_THREADS: int = Field(0, ge=0, le=1024)
    # A prediction body's own limit, far below the upload limit and refused (413) before it is
    # read: 16 MiB holds a JSON batch of ~500 CIFAR-sized samples, or 1,300 as binary float32.
    MAX_PREDICT_BODY_BYTES: int = Field(16 << 20, gt=0)
    # Pixels (width x height) an image may declare; checked from its header before decoding, so a
    # small file that declares a huge image (a decompression bomb) costs nothing. 4096 x 4096.
    MAX_IMAGE_PIXELS: int = Field(4096 * 4096, ge=1)
    # Largest batch one request may carry.
    MAX_REQUEST_BATCH: int = Field(1024, ge=1)
    # Most values one answer may hold (outputs, plus probabilities for classifiers; /v2 counts
    # the outputs asked for): more is refused with 413 before the forward. 2 Mi values are ~22 MB
    # of JSON; a 12 KB request to a 10,000-class model once asked for 444 MB (issue #17).
    MAX_RESPONSE_VALUES: int = Field(2 << 20, ge=1)
    # Samples waiting across all batchers before new predictions get 503 + Retry-After.
    MAX_QUEUED_SAMPLES: int = Field(4096, ge=1)
    PREDICT_TIMEOUT_S: float = Field(30.0, gt=0)
    # glibc allocator thresholds for forward passes (service/serving/allocator.py), set at start;
    # an explicit MALLOC_* variable wins. Measured 1.2-1.5x for resnet18 here (README).
    MALLOC_TUNING: bool = True
    # torch.compile each loaded version (compiled and warmed before it serves; seconds per load).
    COMPILE: bool = False
    # Loaded non-serving versions kept for `?version=N` (LRU); serving versions never count.
    VERSION_CACHE_SIZE: int = Field(2, ge=0)
    # Loads of `?version=N` versions from disk at once; more get 503 rather than thrash.
    MAX_PINNED_LOADS: int = Field(1, ge=1, le=64)
    # How often each API process reads the serving versions from the database.
    SYNC_INTERVAL_S: float = Field(1.0, gt=0, le=60)
    # Share of served batches whose inputs are compared with the first BN layers' running
    # statistics (service/serving/drift.py); 0 (default) builds no probe and costs nothing.
    DRIFT_SAMPLE_RATE: float = Field(0.0, ge=0, le=1)
    # Drift score (mean symmetric KL per channel) past which the alarm turns on and one warning
    # is logged; ~0-0.2 for inputs like the training data, ~5+ for unnormalized pixels.
    DRIFT_THRESHOLD: float = Field(1.0, gt=0)

    # Training workers.
    WORKER_POLL_S: float = Field(0.5, gt=0)
    WORKER_HEARTBEAT_S: float = Field(1.0, gt=0)
    # A running job whose heartbeat is older than this is taken to have lost its worker.
    JOB_STALE_AFTER_S: float = Field(15.0, gt=0)
    JOB_MAX_ATTEMPTS: int = Field(2, ge=1)
    # Jobs that ended (succeeded, failed, cancelled) longer ago than this are deleted, at start
    # and by each API process in the background (0 keeps them forever); default 30 days.
    JOB_RETENTION_S: float = Field(30 * 24 * 3600.0, ge=0)
    # PyTorch threads per worker; 0 shares this machine's cores among the server's workers, so
    # several workers do not oversubscribe the CPU (which slows each of them several-fold).
    WORKER_THREADS: int = Field(0, ge=0)
    # Threads per worker that augment and normalize the next training batches of an image dataset
    # while the step runs (training/loader.py); 0 builds each batch in the training thread. The
    # batches are the same for any count (each sample's augmentation has its own seed).
    LOADER_THREADS: int = Field(2, ge=0, le=64)
    # fp32 precision of CUDA matmuls and convolutions in the API and the workers: `ieee` (true
    # fp32) or `tf32` (tensor cores, ~1e-3 relative); the gate's and the optimizations' checks
    # loosen with it (service/serving/precision.py). PyTorch's own default runs convs in TF32.
    FP32_PRECISION: Literal["ieee", "tf32"] = "ieee"
    # Test-only fault injection, never for production: `after_publish` makes a training worker
    # SIGKILL itself right after it stored a job's version, before it marks the job finished;
    # `after_object_put` makes any process SIGKILL itself when a version's object is in remote
    # storage and its row not yet committed.
    TEST_CRASH_POINT: Literal["", "after_publish", "after_object_put"] = ""
    # Create and train a demo model on the first start of an empty registry.
    DEMO: bool = True
    LOG_LEVEL: Literal["debug", "info", "warning", "error"] = "info"
    # `text` lines, or `json`: one object a line (service/logs.py), for the app and uvicorn alike.
    LOG_FORMAT: Literal["text", "json"] = "text"

    @field_validator("ARCHITECTURE_PLUGINS", "ALLOWED_HOSTS", mode="before")
    @classmethod
    def _split_plugins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("API_TOKEN", "METRICS_TOKEN")
    @classmethod
    def _check_token(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Unset or empty (`BNSERVE_API_TOKEN=` in a .env file): the server keeps its own token.
        if value is None or value == "":
            return None
        if len(value.strip()) < MIN_TOKEN_LENGTH or value != value.strip():
            generated = " (or unset it to have one generated in the data dir)"
            raise ValueError(
                f"BNSERVE_{info.field_name} must be at least {MIN_TOKEN_LENGTH} characters with "
                "no surrounding whitespace" + (generated if info.field_name == "API_TOKEN" else "")
            )
        return value

    @field_validator("DEVICE")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("BNSERVE_DEVICE must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _check_db(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("BNSERVE_DATABASE_URL must be a sqlite:// or postgresql:// URL")
        return value

    @field_validator("STORAGE_URL")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if value and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^/].*)?", value):
            raise ValueError(
                "BNSERVE_STORAGE_URL must be empty (the data dir) or s3://bucket[/prefix] with a "
                "valid bucket name"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _remote_storage_needs_shared_state(self) -> Settings:
        """Remote storage means replicas on several hosts: SQLite and a token file in each host's
        data dir cannot be shared across them, so such a start is refused rather than split."""
        if self.STORAGE_URL and not self.DATABASE_URL.startswith("postgresql"):
            raise ValueError(
                "BNSERVE_STORAGE_URL (remote storage) needs a postgresql:// BNSERVE_DATABASE_URL: "
                "SQLite cannot be shared across hosts"
            )
        if self.STORAGE_URL and not self.API_TOKEN:
            raise ValueError(
                "BNSERVE_STORAGE_URL (remote storage) needs BNSERVE_API_TOKEN: a token generated "
                "in one host's data dir would differ on the others"
            )
        return self

    @property
    def remote_storage(self) -> bool:
        return bool(self.STORAGE_URL)

    @property
    def cache_dir(self) -> Path:
        """This process's copies of remote objects (remote storage only)."""
        return self.DATA_DIR / "cache"

    def storage_sweep_interval_s(self) -> float:
        """How often unreferenced remote objects are swept: a quarter of the grace, 10 s - 1 h."""
        return min(3600.0, max(10.0, self.STORAGE_SWEEP_GRACE_S / 4))

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

    def serve_threads(self) -> int:
        if self.SERVE_THREADS:
            return self.SERVE_THREADS
        return max(1, usable_cpus() // self.API_WORKERS)

    def db_connections(self) -> int:
        """Pooled connections per process: one per database and upload thread, and two spare."""
        return self.DB_THREADS + self.UPLOAD_THREADS + 2

    def job_prune_interval_s(self) -> float:
        """How often old jobs are pruned: a tenth of the retention, between 1 s and an hour."""
        return min(3600.0, max(1.0, self.JOB_RETENTION_S / 10))

    def worker_threads(self) -> int:
        if self.WORKER_THREADS:
            return self.WORKER_THREADS
        return max(1, usable_cpus() // max(1, self.WORKERS))

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


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
