"""The model registry: models, their numbered versions and which one serves, in the database.

Blocking (SQLAlchemy sessions, file I/O): call it from a thread, never from the event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from models import Architecture, ConfigError, UnknownArchitecture, get_architecture
from service.checkpoints.store import CheckpointStore
from service.db.tables import ModelRow, VersionRow, utcnow
from service.errors import Conflict, InvalidInput, NotFound, shorten
from service.files import disk_full_as_error
from service.names import NAME_PATTERN

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


def _no_version(name: str, version: int) -> NotFound:
    return NotFound(
        f"model {name!r} has no version {shorten(str(version))}", code="version_not_found"
    )


class Registry:
    def __init__(self, sessions: sessionmaker[Session], store: CheckpointStore) -> None:
        self._sessions = sessions
        self.store = store

    def close(self) -> None:
        """Close the pooled database connections (on shutdown)."""
        bind = self._sessions.kw.get("bind")
        if isinstance(bind, Engine):
            bind.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # Models

    def create_model(
        self,
        name: str,
        architecture: str,
        config: dict[str, Any],
        serving: dict[str, Any] | None = None,
    ) -> ModelRow:
        check_name(name)
        _, cfg = parse_config(architecture, config)
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
        with self._tx() as session:
            row = session.scalar(
                select(ModelRow)
                .where(ModelRow.name == name)
                .options(selectinload(ModelRow.versions))
            )
            if row is None:
                raise NotFound(f"model {shorten(name)!r} does not exist", code="model_not_found")
            return row

    def list_models(self) -> list[ModelRow]:
        with self._tx() as session:
            return list(
                session.scalars(
                    select(ModelRow)
                    .options(selectinload(ModelRow.versions))
                    .order_by(ModelRow.name)
                )
            )

    def delete_model(self, name: str) -> None:
        with self._tx() as session:
            model_id = session.scalar(select(ModelRow.id).where(ModelRow.name == name))
            if model_id is None:
                raise NotFound(f"model {shorten(name)!r} does not exist", code="model_not_found")
            session.execute(delete(VersionRow).where(VersionRow.model_id == model_id))
            session.execute(delete(ModelRow).where(ModelRow.id == model_id))
        # Rows first: a crash here leaves files without rows, which recovery removes.
        self.store.delete_model(model_id)

    def serving_map(self) -> dict[str, int | None]:
        """Every model's serving version: what each API process converges to."""
        with self._tx() as session:
            rows = session.execute(select(ModelRow.name, ModelRow.serving_version))
            return {name: version for name, version in rows}

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
    ) -> VersionRow:
        """Store canonical safetensors bytes as the model's next version, crash-safely."""
        model = self.get_model(name)
        staged = self.store.stage(model.id, data)
        try:
            with disk_full_as_error(self.store.root), self._tx() as session:
                # One statement both locks the model row (PostgreSQL) and takes the next number;
                # SQLite's BEGIN IMMEDIATE already serializes writers. Rolled back with the
                # transaction, so numbers stay gap-free.
                version = session.scalar(
                    update(ModelRow)
                    .where(ModelRow.id == model.id)
                    .values(last_version=ModelRow.last_version + 1)
                    .returning(ModelRow.last_version)
                )
                if version is None:
                    raise NotFound(f"model {name!r} was deleted", code="model_not_found")
                row = VersionRow(
                    model_id=model.id,
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
        except BaseException:
            self.store.discard(staged)
            raise
        self.store.publish(staged, row.version)
        return row

    def get_version(self, name: str, version: int) -> VersionRow:
        if not 1 <= version <= MAX_VERSION:
            self.get_model(name)
            raise _no_version(name, version)
        with self._tx() as session:
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

    def set_serving(self, name: str, version: int) -> None:
        if not 1 <= version <= MAX_VERSION:
            raise _no_version(name, version)
        with self._tx() as session:
            model_id = session.scalar(select(ModelRow.id).where(ModelRow.name == name))
            if model_id is None:
                raise NotFound(f"model {shorten(name)!r} does not exist", code="model_not_found")
            exists = session.scalar(
                select(VersionRow.id).where(
                    VersionRow.model_id == model_id, VersionRow.version == version
                )
            )
            if exists is None:
                raise _no_version(name, version)
            session.execute(
                update(ModelRow)
                .where(ModelRow.id == model_id)
                .values(serving_version=version, promoted_at=utcnow())
            )

    def serving_options(self, name: str) -> dict[str, Any]:
        """A model's stored serving options (empty: the settings' defaults)."""
        with self._tx() as session:
            row = session.execute(
                select(ModelRow.id, ModelRow.serving).where(ModelRow.name == name)
            ).first()
            if row is None:
                raise NotFound(f"model {name!r} does not exist", code="model_not_found")
            return dict(row.serving or {})

    def read_checkpoint(self, name: str, version: int) -> tuple[ModelRow, VersionRow, bytes]:
        model = self.get_model(name)
        row = self.get_version(name, version)
        return model, row, self.store.read(model.id, row.filename, row.sha256)

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
        with self._tx() as session:
            known: dict[str, dict[str, str]] = {
                model_id: {} for model_id in session.scalars(select(ModelRow.id))
            }
            for model_id, filename, sha in session.execute(
                select(VersionRow.model_id, VersionRow.filename, VersionRow.sha256)
            ):
                known.setdefault(model_id, {})[filename] = sha
        return known
