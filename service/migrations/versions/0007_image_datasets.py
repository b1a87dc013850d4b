"""datasets.kind, classes, image_size: image datasets (class folders in a .zip or .tar)

Their samples have no shape of their own (the pipeline of the model trained on them gives it), so
x_shape becomes nullable.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="tensors")
        )
        batch_op.add_column(sa.Column("classes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("image_size", sa.JSON(), nullable=True))
        batch_op.alter_column("x_shape", existing_type=sa.JSON(), nullable=True)


def downgrade() -> None:
    # x_shape stays nullable: an image dataset's row has none to give it.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("image_size")
        batch_op.drop_column("classes")
        batch_op.drop_column("kind")
