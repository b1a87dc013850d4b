"""Which loaded version answers which request, and how versions are swapped in and out.

Each model's serving version is one entry in `_serving`; a swap replaces that entry, a single
reference change on the event loop. A request takes its handle before it queues, so requests in
flight finish on the version they started with, and every request that starts after a swap gets
the new one. Replaced and pinned (`?version=N`) versions wait in a small LRU cache; an evicted
version's batcher drains its queue and stops. Its tensors are freed by reference counting when its
last request ends, and on CUDA the freed blocks then go back to the driver (`release_memory`).

The database holds the truth about which version serves. A sync loop compares it with what this
process serves every `SYNC_INTERVAL_S` and swaps by the same path, so a promote made by another
process (another replica, a training worker) arrives here within about one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from models import get_architecture
from service.checkpoints.validation import state_dict_from_safetensors
from service.errors import NotFound, NotServing, Overloaded
from service.loops import PeriodicLoop
from service.registry import Registry
from service.serving.batcher import Admission, Batcher
from service.serving.device import release_memory
from service.serving.loaded import LoadedModel, build_loaded
from service.serving.optimize import OptimizeOptions
from service.settings import Settings

log = logging.getLogger(__name__)


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


def with_probabilities(loaded: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batcher's forward: for classifiers, outputs and softmax side by side, `[out | p]`.

    The softmax then runs once per batch on the forward thread instead of once per request on
    the event loop (~20 us a request there, measured with py-spy under 64 clients).
    """
    if not loaded.is_classifier:
        return loaded.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = loaded.forward(x)
        return torch.cat([out, torch.softmax(out, dim=1)], dim=1)

    return forward


class ModelManager:
    def __init__(self, settings: Settings, registry: Registry, device: torch.device) -> None:
        self._settings = settings
        self._registry = registry
        self.device = device
        self._executor = ThreadPoolExecutor(
            max_workers=forward_threads(settings), thread_name_prefix="forward"
        )
        self.admission = Admission(settings.MAX_QUEUED_SAMPLES)
        self._serving: dict[str, Handle] = {}
        self._cache: OrderedDict[tuple[str, int], Handle] = OrderedDict()
        self._wanted: dict[str, int | None] = {}
        self._errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
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
        self.on_loaded: Callable[[dict[tuple[str, int], int]], None] | None = None

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

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

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
                    handle = self._new_handle(await asyncio.to_thread(self._load, name, version))
                    self._remember(handle)
            future.set_result(handle)
            return handle
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: nobody else may be waiting
            else:
                future.cancel()
            if isinstance(exc, NotFound) and name not in self._serving:
                self._locks.pop(name, None)  # no state left behind for names that do not exist
            raise
        finally:
            del self._loading[key]

    async def _serving_or_raise(self, name: str) -> Handle:
        """A model that serves in the database but not yet here: a replica that has not synced
        since the model got its first version. Load it now rather than refuse the request, unless
        loading it already failed (the sync loop retries that; a request should not)."""
        model = await asyncio.to_thread(self._registry.get_model, name)  # 404 if unknown
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
        async with self.lock(loaded.name):
            options = await asyncio.to_thread(self._registry.serving_options, loaded.name)
            self._note_options(loaded.name, options)
            await asyncio.to_thread(self._registry.set_serving, loaded.name, loaded.version)
            return self._swap(self._new_handle(loaded))

    async def promote(self, name: str, version: int) -> Handle:
        """Load and gate `version` if needed, record it as serving, then swap it in."""
        async with self.lock(name):
            handle = await self._obtain(name, version)
            try:
                await asyncio.to_thread(self._registry.set_serving, name, version)
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
        self._swapped_at.pop(name, None)
        self._loaded_changed()

    def _swap(self, handle: Handle) -> Handle:
        name = handle.loaded.name
        old = self._serving.get(name)
        self._serving[name] = handle  # the swap: one reference change
        self._wanted[name] = handle.version
        self._swaps += 1
        self._swapped_at[name] = self._swaps
        self._errors.pop(name, None)
        if old is not None and old is not handle:
            self._remember(old)
        if self.on_swap is not None:
            self.on_swap(name, handle.version)
        self._loaded_changed()
        log.info("model %s now serves version %d", name, handle.version)
        return handle

    async def _obtain(self, name: str, version: int) -> Handle:
        """The handle for `version` to be swapped in: the serving or a cached one, else loaded."""
        current = self._serving.get(name)
        if current is not None and current.version == version:
            return current
        cached = self._cache.pop((name, version), None)
        if cached is not None:
            return cached
        return self._new_handle(await asyncio.to_thread(self._load, name, version))

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
        batcher = Batcher(
            with_probabilities(loaded),
            max_batch=self._max_batch.get(name, self._settings.MAX_BATCH_SIZE),
            executor=self._executor,
            admission=self.admission,
            on_batch=None if self.on_batch is None else functools.partial(self.on_batch, name),
        )
        return Handle(loaded, batcher)

    def _load(self, name: str, version: int) -> LoadedModel:
        """Read, verify, build and gate one stored version (blocking)."""
        model, row, data = self._registry.read_checkpoint(name, version)
        self._note_options(name, model.serving or {})
        arch = get_architecture(model.architecture)
        return build_loaded(
            name=name,
            version=version,
            sha256=row.sha256,
            architecture=arch,
            config=arch.parse_config(model.config),
            state_dict=state_dict_from_safetensors(data),
            device=self.device,
            options=OptimizeOptions.from_settings(self._settings),
        )

    # Following the database

    async def sync_once(self) -> None:
        before = self._swaps
        wanted = await asyncio.to_thread(self._registry.serving_map)
        # A model swapped here while the DB was read is newer than what was read: leave it.
        fresh = {name for name, at in self._swapped_at.items() if at > before}
        gone = {*self._serving, *self._wanted} - set(wanted) - fresh
        for name in gone:  # deleted, possibly by another process
            self.forget(name)
        for name, version in wanted.items():
            if name in fresh:
                continue
            current = self._serving.get(name)
            if version is None or (current is not None and current.version == version):
                self._wanted[name] = version
                continue
            await self._follow(name)

    async def _follow(self, name: str) -> None:
        async with self.lock(name):
            version = (await asyncio.to_thread(self._registry.serving_map)).get(name)
            self._wanted[name] = version
            current = self._serving.get(name)
            if version is None or (current is not None and current.version == version):
                return
            try:
                handle = await self._obtain(name, version)
            except NotFound:
                return  # deleted meanwhile; the next pass forgets it
            except Exception as exc:
                if self._errors.get(name) != str(exc):
                    log.exception("cannot load %s version %d", name, version)
                self._errors[name] = str(exc)
                return
            self._swap(handle)

    # Introspection

    async def check_readiness(self) -> dict[str, dict[str, object]]:
        """`readiness` against the database as it is now, not as of the last sync pass.

        A promote made by another process shows here as not ready until this process has swapped.
        """
        return self.readiness(await asyncio.to_thread(self._registry.serving_map))

    def readiness(
        self, wanted: dict[str, int | None] | None = None
    ) -> dict[str, dict[str, object]]:
        """Per model: the version the database wants, the one served here, any load error and
        the non-serving versions loaded for `?version=N` (least recently used first)."""
        out: dict[str, dict[str, object]] = {}
        for name, version in (self._wanted if wanted is None else wanted).items():
            if version is None:
                continue
            current = self._serving.get(name)
            served = current.version if current is not None else None
            out[name] = {
                "wanted": version,
                "serving": served,
                "ready": served == version,
                "error": self._errors.get(name),
                "cached": [v for (n, v) in self._cache if n == name],
            }
        return out

    def loaded_report(self, name: str, version: int) -> dict[str, object] | None:
        """What serving-time optimizations a version loaded here has; None if not loaded here."""
        serving = self._serving.get(name)
        handle = serving if serving is not None and serving.version == version else None
        handle = handle or self._cache.get((name, version))
        return None if handle is None else handle.loaded.optimizations.as_dict()
