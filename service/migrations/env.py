"""Alembic environment: migrations run on the connection that `service.db.engine.migrate` passes."""

from __future__ import annotations

from alembic import context

from service.db.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
context.run_migrations()
