"""Which loaded version answers which request, and how versions are swapped in and out.

Each model's serving version is one entry in `_serving`; a swap replaces that entry, a single
reference change on the event loop. A request takes its handle before it queues, so requests in
flight finish on the version they started with, and every request that starts after a swap gets
the new one. Replaced and pinned (`?version=N`) versions wait in a small LRU cache; an evicted
version's batcher drains its queue and stops. Its tensors are freed by reference counting when its
last request ends, and on CUDA the freed blocks then go back to the driver (`release_memory`).

The database holds the truth about which version serves. A sync loop compares it with what this
process serves every `SYNC_INTERVAL_S` and swaps by the same path, so a promote made by another
process (another replica, a training worker) arrives here within about one interval. A serving
version that fails to load (a corrupt file) is tried again with exponential backoff, up to
`LOAD_RETRY_MAX_S` apart, rather than read and hashed again on every pass; a pass only looks
whether its file changed (one `stat`), and a changed file (restored by an operator) is tried at
once.

Names are reused: a model deleted and created again is another model. So every comparison with
the database is by identity (`registry.Identity`: the model's id, the version and its sha256),
never by name and number alone. A sync pass drops every handle of a name that now stands for
another model (or none); each load re-checks the identity it read once it is done, before its
handle is cached or swapped in; and a delete takes the same per-name lock as loads and promotes.

Database calls run on the database threads (`service.db.threads`), file reads, hashing and
building in asyncio's pool: a slow database holds up loads, never predictions of loaded versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import get_architecture
from service.checkpoints.remote import ObjectCheckpointStore
from service.checkpoints.validation import state_dict_from_safetensors
from service.db.retry import is_transient
from service.db.tables import ModelRow, VersionRow
from service.db.threads import DatabaseThreads
from service.errors import (
    ModelReplaced,
    NonFiniteOutput,
    NotFound,
    NotServing,
    Overloaded,
    ResponseTooLarge,
)
from service.locks import KeyedLocks
from service.loops import PeriodicLoop
from service.registry import Identity, Registry
from service.serving.batcher import Admission, Batcher, RowsRefused
from service.serving.device import release_memory
from service.serving.drift import DriftMonitor, DriftReading, lower_priority
from service.serving.loaded import LoadedModel, build_loaded
from service.serving.optimize import OptimizeOptions
from service.settings import Settings

log = logging.getLogger(__name__)

# The longest wait between two tries to load a serving version that failed to load; the waits
# double from one sync interval up to it. A promote (or a fixed file and a restart) tries at once.
LOAD_RETRY_MAX_S = 60.0


@dataclass
class LoadFailure:
    """A serving version that failed to load here, and when the sync loop may try it again."""

    version: int
    attempts: int
    retry_at: float
    # The version's file and its (inode, size, mtime) when the load failed; None if unknown.
    path: Path | None = None
    signature: tuple[int, int, int] | None = None


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced, without reading it (blocking)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def forward_threads(settings: Settings) -> int:
    """Threads for forward passes, across all models and versions of this process.

    Each batcher runs one pass at a time, so one busy model never has two passes fighting over
    the cores (each pass already uses every core for intra-op work). The pool only lets
    different models, or the old and new version during a swap, run side by side, so a slow
    model cannot hold up a fast one.
    """
    return settings.FORWARD_THREADS


@dataclass(eq=False)
class Handle:
    """A loaded version with the batcher that feeds it."""

    loaded: LoadedModel
    batcher: Batcher
    # Most samples one request may send before its answer would pass BNSERVE_MAX_RESPONSE_VALUES
    # (outputs, and probabilities for classifiers): one integer comparison per request.
    max_rows: int
    # Samples its batches for the input-drift alarm; None when BNSERVE_DRIFT_SAMPLE_RATE is 0.
    drift: DriftMonitor | None = None

    def too_large(self, n: int, limit: int) -> ResponseTooLarge:
        """The 413 for `n` samples, whose answer would pass `limit` values (n > max_rows)."""
        per_sample = self.loaded.config.num_outputs() * (2 if self.loaded.is_classifier else 1)
        return response_too_large(n, per_sample, limit)

    @property
    def version(self) -> int:
        return self.loaded.version

    async def predict(
        self, x: torch.Tensor, timeout_s: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(outputs, probabilities or None) for the batch `x`, batched with whatever waits;
        503 `timeout` past `timeout_s`, its place in the queue freed (/v1 predict and v2 infer)."""
        try:
            async with asyncio.timeout(timeout_s):
                rows = await self.batcher.submit(x)
        except TimeoutError:
            raise Overloaded(
                f"prediction took longer than {timeout_s} s (BNSERVE_PREDICT_TIMEOUT_S)",
                code="timeout",
                retry_after=1.0,
            ) from None
        return self.split(rows)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A request's rows from the batcher as (outputs, probabilities or None)."""
        if not self.loaded.is_classifier:
            return rows, None
        width = rows.shape[1] // 2
        return rows[:, :width].contiguous(), rows[:, width:].contiguous()


def response_too_large(n: int, per_sample: int, limit: int) -> ResponseTooLarge:
    """The 413 for an answer of `n` samples x `per_sample` values over `limit` values."""
    most = limit // per_sample
    return ResponseTooLarge(
        f"the answer to {n} samples would hold {n * per_sample} values ({per_sample} per "
        f"sample), more than the limit of {limit} (BNSERVE_MAX_RESPONSE_VALUES): send at most "
        f"{most} samples per request" + ("" if most else ", or raise the limit"),
        limit=limit,
        max_samples=most,
    )


def with_probabilities(
    loaded: LoadedModel, drift: DriftMonitor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batcher's forward: for classifiers, outputs and softmax side by side, `[out | p]`.

    The softmax then runs once per batch on the forward thread instead of once per request on
    the event loop (~20 us a request there, measured with py-spy under 64 clients). So does the
    check that every value is finite (NumPy's, a few us a batch where torch.isfinite took ~50):
    rows that overflowed to Inf or NaN are refused (`RowsRefused`), the rest of the batch is
    answered as usual, so no answer ever carries `null` for a number.

    With `drift`, each batch is offered to it once its outputs exist (inputs that overflow are
    the ones most worth measuring); it measures on its own thread. Without, nothing is checked.
    """
    classifier = loaded.is_classifier
    offer = drift.offer if drift is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = loaded.forward(x)
        if offer is not None:
            offer(x)
        rows = torch.cat([out, torch.softmax(out, dim=1)], dim=1) if classifier else out
        finite = np.isfinite(rows.numpy())
        if not finite.all():
            refused = (~finite.reshape(len(finite), -1).all(axis=1)).tolist()
            raise RowsRefused(rows, refused, partial(_non_finite, loaded))
        return rows

    return forward


def _non_finite(loaded: LoadedModel, samples: list[int]) -> NonFiniteOutput:
    return NonFiniteOutput(
        f"the outputs of {loaded.name!r} version {loaded.version} for sample(s) "
        f"{', '.join(map(str, samples[:10]))}{', ...' if len(samples) > 10 else ''} of this "
        "request overflowed to Inf or NaN (inputs far outside what the model was trained on?); "
        "no answer rather than nulls",
        samples=samples[:100],
    )


class ModelManager:
    def __init__(
        self, settings: Settings, registry: Registry, device: torch.device, db: DatabaseThreads
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._db = db
        self.device = device
        self._executor = ThreadPoolExecutor(
            max_workers=forward_threads(settings), thread_name_prefix="forward"
        )
        self.admission = Admission(settings.MAX_QUEUED_SAMPLES)
        # One niced thread measures sampled batches for the drift alarm, only when it is on.
        self._drift_executor = (
            ThreadPoolExecutor(1, thread_name_prefix="drift", initializer=lower_priority)
            if settings.DRIFT_SAMPLE_RATE > 0
            else None
        )
        self._serving: dict[str, Handle] = {}
        self._cache: OrderedDict[tuple[str, int], Handle] = OrderedDict()
        self._wanted: dict[str, Identity] = {}
        self._errors: dict[str, str] = {}
        self._failures: dict[str, LoadFailure] = {}
        # The file of each model's last failed load and its signature before it was read.
        self._failed_files: dict[str, tuple[Path, tuple[int, int, int] | None]] = {}
        self._locks = KeyedLocks()
        self._loading: dict[tuple[str, int], asyncio.Future[Handle]] = {}
        # Per-model `max_batch_size` from the model's serving options, read when it loads.
        self._max_batch: dict[str, int] = {}
        # Counts swaps, so a sync pass can tell which models changed here while it read the DB.
        self._swaps = 0
        self._swapped_at: dict[str, int] = {}
        self._sync_loop = PeriodicLoop("serving sync", settings.SYNC_INTERVAL_S, self.sync_once)
        # Metrics hooks: each forward pass (model, samples, each request's queue wait, forward
        # seconds); each swap (model, version); each change of what is loaded (bytes by version).
        self.on_batch: Callable[[str, int, Sequence[float], float], None] | None = None
        self.on_swap: Callable[[str, int], None] | None = None
        self.on_load_failure: Callable[[str], None] | None = None
        self.on_forget: Callable[[str], None] | None = None
        self.on_loaded: Callable[[dict[tuple[str, int], int]], None] | None = None
        # Each drift measurement (model, version, score or None); called on the drift thread.
        self.on_drift: Callable[[str, int, float | None, float], None] | None = None
        store = registry.store
        if isinstance(store, ObjectCheckpointStore):
            # Remote storage: the local copies of loaded versions are never evicted.
            store.cache.in_use = self.loaded_sha256s

    def loaded_sha256s(self) -> set[str]:
        """The sha256s of every version held here (called from other threads: copies only)."""
        handles = list(self._serving.values()) + list(self._cache.values())
        return {handle.loaded.sha256 for handle in handles}

    # Life cycle

    async def start(self) -> None:
        """Load every serving version, then follow the database in the background."""
        await self.sync_once()
        self._sync_loop.start()

    async def stop(self) -> None:
        await self._sync_loop.stop()
        for handle in [*self._serving.values(), *self._cache.values()]:
            await handle.batcher.close()
        self._executor.shutdown(wait=True)
        if self._drift_executor is not None:
            self._drift_executor.shutdown(wait=True, cancel_futures=True)

    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Loads, promotes and syncs of one model, one at a time (held only while in use)."""
        return self._locks.hold(name)

    # Requests

    async def handle_for(self, name: str, version: int | None = None) -> Handle:
        """The handle that answers a request: the serving one, or a pinned version."""
        serving = self._serving.get(name)
        if version is None:
            return serving if serving is not None else await self._serving_or_raise(name)
        if serving is not None and serving.version == version:
            return serving
        key = (name, version)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        return await self._load_pinned(name, version)

    async def _load_pinned(self, name: str, version: int) -> Handle:
        """Load a version that is neither serving nor cached, for `?version=N`.

        Requests for the same version share one load. Loads of other versions beyond
        `MAX_PINNED_LOADS` are refused with 503 instead of queued: clients alternating between
        more versions than the LRU cache holds would otherwise have every request reload one
        from disk (issue #9: reads that amplify).
        """
        key = (name, version)
        loading = self._loading.get(key)
        if loading is not None:
            return await asyncio.shield(loading)
        if len(self._loading) >= self._settings.MAX_PINNED_LOADS:
            raise Overloaded(
                f"{len(self._loading)} other version load(s) in flight (limit "
                f"{self._settings.MAX_PINNED_LOADS}, BNSERVE_MAX_PINNED_LOADS); retry shortly, "
                "or raise BNSERVE_VERSION_CACHE_SIZE to keep more versions loaded",
                code="loads_in_flight",
                retry_after=1.0,
            )
        future: asyncio.Future[Handle] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            async with self.lock(name):
                handle = self._cache.get(key)
                if handle is None:
                    loaded = await self._load_confirmed(name, version)
                    self._drop_other_models(name, loaded.model_id)
                    handle = self._new_handle(loaded)
                    self._remember(handle)
            future.set_result(handle)
            return handle
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: nobody else may be waiting
            else:
                future.cancel()
            raise
        finally:
            del self._loading[key]

    async def _serving_or_raise(self, name: str) -> Handle:
        """A model that serves in the database but not yet here: a replica that has not synced
        since the model got its first version. Load it now rather than refuse the request, unless
        loading it already failed (the sync loop retries that; a request should not)."""
        model = await self._db.run(self._registry.get_model, name)  # 404 if unknown
        if model.serving_version is None:
            raise NotServing(
                f"model {name!r} has no serving version yet: upload one "
                f"(POST /v1/models/{name}/versions) or promote one",
            )
        if name not in self._errors:
            await self._follow(name)
            serving = self._serving.get(name)
            if serving is not None:
                return serving
        raise NotServing(
            f"model {name!r} version {model.serving_version} is not loaded in this process yet"
            + (f": {self._errors[name]}" if name in self._errors else ""),
            code="not_loaded",
        )

    # Swaps

    async def install(self, loaded: LoadedModel) -> Handle:
        """Make an already loaded and gated version serve (after its promote is recorded)."""
        name = loaded.name
        async with self.lock(name):
            options = await self._db.run(self._registry.serving_options, name)
            self._note_options(name, options)
            await self._db.run(
                self._registry.set_serving, name, loaded.version, model_id=loaded.model_id
            )
            self._drop_other_models(name, loaded.model_id)
            return self._swap(self._new_handle(loaded))

    async def promote(self, name: str, version: int) -> Handle:
        """Load and gate `version` if needed, record it as serving, then swap it in."""
        async with self.lock(name):
            wanted = await self._db.run(self._registry.version_identity, name, version)
            self._drop_other_models(name, wanted.model_id)
            handle = await self._obtain(name, wanted)
            try:
                await self._db.run(
                    self._registry.set_serving, name, version, model_id=wanted.model_id
                )
            except BaseException:
                if handle is not self._serving.get(name):  # the serving one stays where it is
                    self._remember(handle)
                raise
            return self._swap(handle)

    def forget(self, name: str) -> None:
        """Drop every loaded version of a deleted model."""
        handles = [self._serving.pop(name, None)] + [
            self._cache.pop(key) for key in list(self._cache) if key[0] == name
        ]
        for handle in handles:
            if handle is not None:
                self._retire(handle)
        self._wanted.pop(name, None)
        self._max_batch.pop(name, None)
        self._errors.pop(name, None)
        self._failures.pop(name, None)
        self._failed_files.pop(name, None)
        self._swapped_at.pop(name, None)
        self._loaded_changed()
        if self.on_forget is not None:
            self.on_forget(name)

    def _drop_other_models(self, name: str, model_id: str) -> None:
        """Forget what this process holds for `name` when it was another model's (deleted)."""
        held = [self._serving.get(name)] + [h for (n, _), h in self._cache.items() if n == name]
        wanted = self._wanted.get(name)
        if (wanted is not None and wanted.model_id != model_id) or any(
            h is not None and h.loaded.model_id != model_id for h in held
        ):
            log.info("model %s was deleted and created again: dropping its old versions", name)
            self.forget(name)

    @staticmethod
    def _matches(handle: Handle, wanted: Identity) -> bool:
        """Whether `handle` is exactly `wanted`: the same model, version and bytes."""
        loaded = handle.loaded
        return (
            loaded.model_id == wanted.model_id
            and loaded.version == wanted.version
            and loaded.sha256 == wanted.sha256
        )

    def _swap(self, handle: Handle) -> Handle:
        name = handle.loaded.name
        old = self._serving.get(name)
        self._serving[name] = handle  # the swap: one reference change
        self._wanted[name] = Identity(handle.loaded.model_id, handle.version, handle.loaded.sha256)
        self._swaps += 1
        self._swapped_at[name] = self._swaps
        self._errors.pop(name, None)
        self._failures.pop(name, None)
        if old is not None and old is not handle:
            self._remember(old)
        if self.on_swap is not None:
            self.on_swap(name, handle.version)
        self._loaded_changed()
        log.info("model %s now serves version %d", name, handle.version)
        return handle

    async def _obtain(self, name: str, wanted: Identity) -> Handle:
        """The handle for `wanted` to be swapped in: the serving or a cached one, else loaded."""
        assert wanted.version is not None
        current = self._serving.get(name)
        if current is not None and self._matches(current, wanted):
            return current
        cached = self._cache.pop((name, wanted.version), None)
        if cached is not None:
            if self._matches(cached, wanted):
                return cached
            self._retire(cached)
        return self._new_handle(await self._load_confirmed(name, wanted.version, wanted.model_id))

    def _remember(self, handle: Handle) -> None:
        """Keep a non-serving version in the LRU cache, evicting beyond its size."""
        self._cache[(handle.loaded.name, handle.version)] = handle
        self._cache.move_to_end((handle.loaded.name, handle.version))
        while len(self._cache) > self._settings.VERSION_CACHE_SIZE:
            _, evicted = self._cache.popitem(last=False)
            self._retire(evicted)
        self._loaded_changed()

    def loaded_versions(self) -> dict[tuple[str, int], int]:
        """Bytes of parameters and buffers of each version loaded here, serving or cached."""
        out = {(name, h.version): h.loaded.nbytes for name, h in self._serving.items()}
        out.update({key: h.loaded.nbytes for key, h in self._cache.items()})
        return out

    def _loaded_changed(self) -> None:
        if self.on_loaded is not None:
            self.on_loaded(self.loaded_versions())

    @staticmethod
    def _retire(handle: Handle) -> None:
        """Stop feeding a version; once its last request drops it, hand its memory back.

        Requests in flight still hold the handle, so the tensors cannot be freed here. A finalizer
        on the LoadedModel notices when the last reference is gone; it runs during that object's
        teardown, before the module is released, so the release itself is scheduled on the loop.
        """
        handle.batcher.retire()
        device = handle.loaded.device
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            release_memory(device)
            return

        def release_soon() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is exiting
                loop.call_soon_threadsafe(release_memory, device)

        weakref.finalize(handle.loaded, release_soon).atexit = False

    def _note_options(self, name: str, options: dict[str, object]) -> None:
        size = options.get("max_batch_size")
        if isinstance(size, int):
            self._max_batch[name] = size
        else:
            self._max_batch.pop(name, None)

    def _new_handle(self, loaded: LoadedModel) -> Handle:
        name = loaded.name
        drift = self._drift_monitor(loaded)
        batcher = Batcher(
            with_probabilities(loaded, drift),
            max_batch=self._max_batch.get(name, self._settings.MAX_BATCH_SIZE),
            executor=self._executor,
            admission=self.admission,
            on_batch=None if self.on_batch is None else functools.partial(self.on_batch, name),
        )
        per_sample = loaded.config.num_outputs() * (2 if loaded.is_classifier else 1)
        return Handle(loaded, batcher, self._settings.MAX_RESPONSE_VALUES // per_sample, drift)

    def _drift_monitor(self, loaded: LoadedModel) -> DriftMonitor | None:
        if loaded.probe is None or self._drift_executor is None:
            return None

        def on_reading(reading: DriftReading) -> None:
            if self.on_drift is not None:
                self.on_drift(loaded.name, loaded.version, reading.score, reading.cpu_seconds)

        return DriftMonitor(
            loaded.probe,
            rate=self._settings.DRIFT_SAMPLE_RATE,
            threshold=self._settings.DRIFT_THRESHOLD,
            executor=self._drift_executor,
            model=loaded.name,
            version=loaded.version,
            on_reading=on_reading,
        )

    async def _load_confirmed(
        self, name: str, version: int, model_id: str | None = None
    ) -> LoadedModel:
        """Load a version, then check it is still what the name stands for.

        A load takes a while (reading, hashing, the gate, the optimizations); a delete made by
        another process meanwhile must not leave its handle here (404, or 409 `model_replaced`).
        """
        loaded = await self._load(name, version, model_id)
        try:
            now: Identity | None = await self._db.run(
                self._registry.version_identity, name, version
            )
        except NotFound:
            now = None
        if now != Identity(loaded.model_id, loaded.version, loaded.sha256):
            raise await self._db.run(
                self._registry.model_gone, name, loaded.model_id, "it was being loaded"
            )
        return loaded

    async def _load(self, name: str, version: int, model_id: str | None = None) -> LoadedModel:
        """Read the version's rows on a database thread, then `_build` it in another thread."""
        model, row = await self._db.run(
            self._registry.checkpoint_rows, name, version, model_id=model_id
        )
        path = self._registry.store.model_dir(model.id) / row.filename
        # Taken before the read, so a file restored while it was being read counts as changed.
        signature = await asyncio.to_thread(file_signature, path)
        try:
            return await asyncio.to_thread(self._build, model, row)
        except Exception:
            self._failed_files[name] = (path, signature)
            raise

    def _build(self, model: ModelRow, row: VersionRow) -> LoadedModel:
        """Read, verify, build and gate one stored version (blocking, no database)."""
        data = self._registry.store.read(model.id, row.filename, row.sha256)
        self._note_options(model.name, model.serving or {})
        arch = get_architecture(model.architecture)
        return build_loaded(
            name=model.name,
            version=row.version,
            sha256=row.sha256,
            architecture=arch,
            config=arch.parse_config(model.config),
            state_dict=state_dict_from_safetensors(data),
            device=self.device,
            options=OptimizeOptions.from_settings(self._settings),
            preprocess=model.preprocess,
            model_id=model.id,
        )

    # Following the database

    async def sync_once(self) -> None:
        before = self._swaps
        wanted = await self._db.run(self._registry.serving_identities)
        # A model swapped here while the DB was read is newer than what was read: leave it.
        fresh = {name for name, at in self._swapped_at.items() if at > before}
        held = {*self._serving, *self._wanted, *(name for name, _ in self._cache)} - fresh
        for name in held:
            if name not in wanted:  # deleted, possibly by another process
                self.forget(name)
            else:  # or deleted and created again: the same name, another model
                self._drop_other_models(name, wanted[name].model_id)
        for name, ident in wanted.items():
            if name in fresh:
                continue
            current = self._serving.get(name)
            if ident.version is None or (current is not None and self._matches(current, ident)):
                self._wanted[name] = ident
                continue
            if await self._waiting_to_retry(name, ident.version):
                continue
            await self._follow(name)

    async def _follow(self, name: str) -> None:
        async with self.lock(name):
            wanted = (await self._db.run(self._registry.serving_identities)).get(name)
            if wanted is None:
                return  # deleted meanwhile; the next pass forgets it
            self._drop_other_models(name, wanted.model_id)
            self._wanted[name] = wanted
            current = self._serving.get(name)
            if wanted.version is None or (current is not None and self._matches(current, wanted)):
                return
            version = wanted.version
            try:
                handle = await self._obtain(name, wanted)
            except (NotFound, ModelReplaced):
                return  # deleted (and perhaps created again) meanwhile; the next pass follows
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database, not the version: the sync loop backs off
                self._load_failed(name, version, exc)
                return
            self._swap(handle)

    async def _waiting_to_retry(self, name: str, version: int) -> bool:
        """Whether `version` failed to load here, its retry is not due and its file is as it was
        (a `stat`, not a read: an unchanged file would fail the same way)."""
        failure = self._failures.get(name)
        if failure is None or failure.version != version:
            return False
        if asyncio.get_running_loop().time() >= failure.retry_at:
            return False
        if failure.path is None:
            return True
        return await asyncio.to_thread(file_signature, failure.path) == failure.signature

    def _load_failed(self, name: str, version: int, exc: Exception) -> None:
        """Note a failed load of the serving version, and when the sync loop may try again."""
        previous = self._failures.get(name)
        attempts = previous.attempts + 1 if previous and previous.version == version else 1
        delay = min(LOAD_RETRY_MAX_S, self._settings.SYNC_INTERVAL_S * 2.0**attempts)
        retry_at = asyncio.get_running_loop().time() + delay
        path, signature = self._failed_files.pop(name, (None, None))
        self._failures[name] = LoadFailure(version, attempts, retry_at, path, signature)
        if self._errors.get(name) != str(exc):
            log.exception("cannot load %s version %d", name, version)
        log.warning(
            "loading %s version %d failed (attempt %d); next try in %.1f s",
            name,
            version,
            attempts,
            delay,
        )
        self._errors[name] = str(exc)
        if self.on_load_failure is not None:
            self.on_load_failure(name)

    # Introspection

    async def check_readiness(self) -> dict[str, dict[str, object]]:
        """`readiness` against the database as it is now, not as of the last sync pass.

        A promote made by another process shows here as not ready until this process has swapped,
        and so does a model deleted and created again whose old weights this process still holds.
        """
        return self.readiness(await self._db.run(self._registry.serving_identities))

    def readiness(self, wanted: dict[str, Identity] | None = None) -> dict[str, dict[str, object]]:
        """Per model: the version the database wants, the one served here, any load error and
        the non-serving versions loaded for `?version=N` (least recently used first). Ready only
        when the served version is the wanted one of the same model, with the same sha256."""
        out: dict[str, dict[str, object]] = {}
        for name, ident in (self._wanted if wanted is None else wanted).items():
            if ident.version is None:
                continue
            current = self._serving.get(name)
            served = current.version if current is not None else None
            out[name] = {
                "wanted": ident.version,
                "serving": served,
                "ready": current is not None and self._matches(current, ident),
                "error": self._errors.get(name),
                "cached": [v for (n, v) in self._cache if n == name],
            }
        return out

    def _loaded_handle(self, name: str, version: int) -> Handle | None:
        serving = self._serving.get(name)
        handle = serving if serving is not None and serving.version == version else None
        return handle or self._cache.get((name, version))

    def loaded_report(self, name: str, version: int) -> dict[str, object] | None:
        """What serving-time optimizations a version loaded here has; None if not loaded here."""
        handle = self._loaded_handle(name, version)
        return None if handle is None else handle.loaded.optimizations.as_dict()

    def drift_report(self, name: str, version: int) -> dict[str, Any] | None:
        """The input-drift reading of a version loaded here; None if not loaded here or drift
        sampling is off."""
        handle = self._loaded_handle(name, version)
        if handle is None or handle.drift is None:
            return None
        return handle.drift.reading.as_dict()
