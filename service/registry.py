"""The model registry: models, their numbered versions and which one serves, in the database.

Blocking (SQLAlchemy sessions, file I/O): call it from a thread, never from the event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from models import Architecture, ConfigError, UnknownArchitecture, get_architecture
from service.checkpoints.remote import ObjectCheckpointStore
from service.checkpoints.store import CheckpointStore
from service.db.engine import read_sessions
from service.db.tables import ModelRow, VersionRow, utcnow
from service.errors import BNServeError, Conflict, InvalidInput, ModelReplaced, NotFound, shorten
from service.files import disk_full_as_error
from service.jobs import end_jobs_of_deleted_model
from service.names import NAME_PATTERN
from service.preprocess.pipeline import Preprocess

# Version numbers are 64-bit signed integers in the database; a larger one can name no version
# (and would make the driver raise OverflowError).
MAX_VERSION = 2**63 - 1


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid model name {shorten(name)!r}: use 1-64 characters a-z, 0-9, '_' or '-', "
            "starting with a letter or digit",
            code="invalid_name",
        )
    return name


def parse_config(architecture: str, config: dict[str, Any] | None) -> tuple[Architecture, Any]:
    """The architecture and its validated config, or a 422 naming each bad field."""
    try:
        arch = get_architecture(architecture)
    except UnknownArchitecture as exc:
        raise InvalidInput(str(exc.args[0]), code="unknown_architecture") from None
    try:
        return arch, arch.parse_config(config or {})
    except ConfigError as exc:
        raise InvalidInput(
            f"invalid config for architecture {architecture}: {exc}",
            code="invalid_config",
            errors=exc.errors,
        ) from None


@dataclass(frozen=True)
class Identity:
    """What a name stands for now: the model's id, and its serving version's number and sha256.

    Names are reused (a model deleted and created again), ids and sha256s are not: whatever
    loads, caches, swaps or syncs compares these, never the name and number alone.
    """

    model_id: str
    version: int | None
    sha256: str | None


# Runs inside the transaction that adds a version, with that version's row (a job records its
# result there, so that the version exists exactly when the job says it published).
InTransaction = Callable[[Session, "VersionRow"], None]


def _no_version(name: str, version: int) -> NotFound:
    return NotFound(
        f"model {name!r} has no version {shorten(str(version))}", code="version_not_found"
    )


class Registry:
    def __init__(
        self, sessions: sessionmaker[Session], store: CheckpointStore | ObjectCheckpointStore
    ) -> None:
        self._sessions = sessions
        self._reads = read_sessions(sessions)
        self.store = store

    def close(self) -> None:
        """Close the pooled database connections (on shutdown)."""
        bind = self._sessions.kw.get("bind")
        if isinstance(bind, Engine):
            bind.dispose()
        self.store.close()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A transaction that only reads: on SQLite it never waits for the write lock."""
        with self._reads.begin() as session:
            yield session

    # Models

    def create_model(
        self,
        name: str,
        architecture: str,
        config: dict[str, Any],
        serving: dict[str, Any] | None = None,
        preprocess: Preprocess | None = None,
    ) -> ModelRow:
        check_name(name)
        _, cfg = parse_config(architecture, config)
        if preprocess is not None:
            problem = preprocess.image.check_for(tuple(cfg.input_shape()))
            if problem is not None:
                raise InvalidInput(
                    f"invalid preprocess.image: {problem}", code="invalid_preprocess"
                )
        exists = Conflict(f"model {name!r} already exists", code="model_exists")
        try:
            with self._tx() as session:
                if session.scalar(select(ModelRow.id).where(ModelRow.name == name)) is not None:
                    raise exists
                row = ModelRow(
                    id=uuid.uuid4().hex,
                    name=name,
                    architecture=architecture,
                    config=cfg.model_dump(mode="json"),
                    serving=serving,
                    preprocess=preprocess.model_dump(mode="json") if preprocess else None,
                    last_version=0,
                )
                session.add(row)
                session.flush()
                row.versions = []
        except IntegrityError:
            # Another process created the same name between the check and the insert (possible
            # on PostgreSQL, where the check takes no lock): the unique index decides.
            raise exists from None
        return row

    def get_model(self, name: str) -> ModelRow:
        with self._read() as session:
            row = session.scalar(
                select(ModelRow)
                .where(ModelRow.name == name)
                .options(selectinload(ModelRow.versions))
            )
            if row is None:
                raise NotFound(f"model {shorten(name)!r} does not exist", code="model_not_found")
            return row

    def list_models(self) -> list[ModelRow]:
        with self._read() as session:
            return list(
                session.scalars(
                    select(ModelRow)
                    .options(selectinload(ModelRow.versions))
                    .order_by(ModelRow.name)
                )
            )

    def delete_model(self, name: str) -> str:
        """Delete a model with its versions and files; its queued and running jobs end
        `cancelled` in the same transaction (their rows stay). Returns the model's id."""
        with self._tx() as session:
            # Locked first (PostgreSQL), so a job created meanwhile is either seen here or refused.
            model_id = session.scalar(
                select(ModelRow.id).where(ModelRow.name == name).with_for_update()
            )
            if model_id is None:
                raise NotFound(f"model {shorten(name)!r} does not exist", code="model_not_found")
            end_jobs_of_deleted_model(session, model_id, name)
            session.execute(delete(VersionRow).where(VersionRow.model_id == model_id))
            session.execute(delete(ModelRow).where(ModelRow.id == model_id))
        # Rows first: a crash here leaves files without rows, which recovery removes.
        self.store.delete_model(model_id)
        return model_id

    def serving_map(self) -> dict[str, int | None]:
        """Every model's serving version number (see `serving_identities` for what to compare)."""
        return {name: ident.version for name, ident in self.serving_identities().items()}

    def serving_identities(self) -> dict[str, Identity]:
        """Every model's id and serving version with its sha256: what each API process follows."""
        serving = (VersionRow.model_id == ModelRow.id) & (
            VersionRow.version == ModelRow.serving_version
        )
        with self._read() as session:
            rows = session.execute(
                select(
                    ModelRow.name, ModelRow.id, ModelRow.serving_version, VersionRow.sha256
                ).outerjoin(VersionRow, serving)
            )
            return {name: Identity(mid, version, sha) for name, mid, version, sha in rows}

    def version_identity(self, name: str, version: int) -> Identity:
        """The model's current id with this version's sha256 (404 when either is gone)."""
        row = self.get_version(name, version)
        return Identity(row.model_id, row.version, row.sha256)

    def check_identity(self, name: str, model_id: str, what: str) -> None:
        """Raise when `name` is no longer the model `model_id` (deleted, maybe created again)."""
        current = self.get_model(name)
        if current.id != model_id:
            raise self.model_gone(name, model_id, f"this {what} was in progress")

    def model_gone(self, name: str, model_id: str, during: str) -> BNServeError:
        """The error for a model deleted (and perhaps created again) while `during` ran.

        Outside any transaction: a nested one would wait on the caller's SQLite write lock.
        """
        with self._tx() as session:
            now = session.scalar(select(ModelRow.id).where(ModelRow.name == name))
        if now is None or now == model_id:
            return NotFound(
                f"model {name!r} was deleted while {during}; nothing was stored",
                code="model_not_found",
            )
        return ModelReplaced(
            f"model {name!r} was deleted and created again while {during}; nothing was stored "
            "for the new model, which may have another architecture or config: send it again"
        )

    # Versions

    def add_version(
        self,
        name: str,
        data: bytes,
        *,
        source: str,
        note: str | None = None,
        report: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        model_id: str | None = None,
        promote: bool = False,
        in_transaction: InTransaction | None = None,
    ) -> VersionRow:
        """Store canonical safetensors bytes as the model's next version, crash-safely.

        `model_id` is the model the bytes were checked against: when it was deleted meanwhile
        (even if its name was created again) nothing is stored, 404 or 409 `model_replaced`.
        With `promote` the version serves from the same commit; `in_transaction` runs inside it.
        """
        if model_id is None:
            model_id = self.get_model(name).id
        staged = self.store.stage(model_id, data)
        version: int | None = None
        try:
            with disk_full_as_error(self.store.root), self._tx() as session:
                # One statement both locks the model row (PostgreSQL) and takes the next number;
                # SQLite's BEGIN IMMEDIATE already serializes writers. Rolled back with the
                # transaction, so numbers stay gap-free. By id: a re-created name is another row.
                version = session.scalar(
                    update(ModelRow)
                    .where(ModelRow.id == model_id)
                    .values(last_version=ModelRow.last_version + 1)
                    .returning(ModelRow.last_version)
                )
                if version is not None:
                    row = VersionRow(
                        model_id=model_id,
                        version=version,
                        sha256=staged.sha256,
                        size_bytes=staged.size_bytes,
                        source=source,
                        note=note,
                        filename=f"v{version}.safetensors",
                        report=report or {},
                        lineage=lineage,
                        created_at=utcnow(),
                    )
                    session.add(row)
                    if promote:
                        session.execute(
                            update(ModelRow)
                            .where(ModelRow.id == model_id)
                            .values(serving_version=version, promoted_at=utcnow())
                        )
                    if in_transaction is not None:
                        session.flush()
                        in_transaction(session, row)
        except BaseException:
            self.store.discard(staged)
            raise
        if version is None:
            self.store.discard(staged)
            self.store.delete_model(model_id)  # the deleted model's folder, if this re-made it
            raise self.model_gone(name, model_id, "this version was being stored")
        try:
            self.store.publish(staged, row.version)
        except FileNotFoundError:
            # The model was deleted between the commit and the rename, its folder with it.
            raise self.model_gone(name, model_id, "this version was being stored") from None
        return row

    def get_version(self, name: str, version: int) -> VersionRow:
        if not 1 <= version <= MAX_VERSION:
            self.get_model(name)
            raise _no_version(name, version)
        with self._read() as session:
            row = session.scalar(
                select(VersionRow)
                .join(ModelRow)
                .where(ModelRow.name == name, VersionRow.version == version)
            )
        if row is None:
            # Outside the transaction: a nested one would wait on this one's SQLite write lock.
            self.get_model(name)  # 404 for the model first, when that is what is missing
            raise _no_version(name, version)
        return row

    def list_versions(self, name: str) -> list[VersionRow]:
        return list(self.get_model(name).versions)

    def set_serving(self, name: str, version: int, *, model_id: str | None = None) -> None:
        """Make `version` serve; with `model_id`, only while the name still is that model."""
        if not 1 <= version <= MAX_VERSION:
            raise _no_version(name, version)
        with self._tx() as session:
            found = session.scalar(select(ModelRow.id).where(ModelRow.name == name))
            if found is None and model_id is None:
                raise NotFound(f"model {shorten(name)!r} does not exist", code="model_not_found")
            if found is not None and model_id in (None, found):
                exists = session.scalar(
                    select(VersionRow.id).where(
                        VersionRow.model_id == found, VersionRow.version == version
                    )
                )
                if exists is None:
                    raise _no_version(name, version)
                session.execute(
                    update(ModelRow)
                    .where(ModelRow.id == found)
                    .values(serving_version=version, promoted_at=utcnow())
                )
                return
        assert model_id is not None
        raise self.model_gone(name, model_id, "its version was being promoted")

    def serving_options(self, name: str) -> dict[str, Any]:
        """A model's stored serving options (empty: the settings' defaults)."""
        with self._read() as session:
            row = session.execute(
                select(ModelRow.id, ModelRow.serving).where(ModelRow.name == name)
            ).first()
            if row is None:
                raise NotFound(f"model {name!r} does not exist", code="model_not_found")
            return dict(row.serving or {})

    def read_checkpoint(
        self, name: str, version: int, *, model_id: str | None = None
    ) -> tuple[ModelRow, VersionRow, bytes]:
        """The model, the version and its verified bytes (`checkpoint_rows`, then the file)."""
        model, row = self.checkpoint_rows(name, version, model_id=model_id)
        return model, row, self.store.read(model.id, row.filename, row.sha256)

    def checkpoint_rows(
        self, name: str, version: int, *, model_id: str | None = None
    ) -> tuple[ModelRow, VersionRow]:
        """The model and the version, read in one transaction so that they belong together;
        with `model_id`, only while the name still is that model. No file is read, so this can
        run on a database thread."""
        if 1 <= version <= MAX_VERSION:
            with self._read() as session:
                found = session.execute(
                    select(ModelRow, VersionRow)
                    .join(VersionRow, VersionRow.model_id == ModelRow.id)
                    .where(ModelRow.name == name, VersionRow.version == version)
                ).first()
        else:
            found = None
        if found is not None and model_id in (None, found[0].id):
            model, row = found
            return model, row
        if found is None:
            current = self.get_model(name)  # 404 for the model first, when that is what is missing
            if model_id in (None, current.id):
                raise _no_version(name, version)
        assert model_id is not None
        raise self.model_gone(name, model_id, "one of its versions was being loaded")

    def open_checkpoint(self, name: str, version: int) -> tuple[VersionRow, BinaryIO]:
        """The version's stored file, verified and opened at its start (the caller closes it)."""
        model = self.get_model(name)
        row = self.get_version(name, version)
        return row, self.store.open_verified(model.id, row.filename, row.sha256)

    def recover_store(self) -> list[str]:
        """Reconcile checkpoint files with the rows after a crash (run on start)."""
        return self.store.recover(self._recorded_files)

    def _recorded_files(self) -> dict[str, dict[str, str]]:
        """Model id -> {filename: sha256} of every recorded version."""
        with self._read() as session:
            known: dict[str, dict[str, str]] = {
                model_id: {} for model_id in session.scalars(select(ModelRow.id))
            }
            for model_id, filename, sha in session.execute(
                select(VersionRow.model_id, VersionRow.filename, VersionRow.sha256)
            ):
                known.setdefault(model_id, {})[filename] = sha
        return known
