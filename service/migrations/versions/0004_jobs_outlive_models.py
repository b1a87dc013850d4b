"""jobs.model_id without a foreign key: deleting a model ends its jobs instead of deleting them

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# SQLite reflects the unnamed constraint of 0001 without a name; batch mode needs one to drop it.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _model_fk_name() -> str | None:
    for fk in sa.inspect(op.get_bind()).get_foreign_keys("jobs"):
        if fk["referred_table"] == "models" and fk["constrained_columns"] == ["model_id"]:
            return fk["name"] or "fk_jobs_model_id_models"
    return None


def upgrade() -> None:
    name = _model_fk_name()
    if name is None:
        return
    with op.batch_alter_table("jobs", schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    # Jobs of deleted models would violate the restored constraint: they go first.
    op.execute("DELETE FROM jobs WHERE model_id NOT IN (SELECT id FROM models)")
    with op.batch_alter_table("jobs", schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.create_foreign_key(
            "fk_jobs_model_id_models", "models", ["model_id"], ["id"], ondelete="CASCADE"
        )
