"""prompts.condition_image + condition_sha256: a prompt may carry a doodle (its bytes, not a path)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns: existing prompts stay as they are (text-only), no table rewrite needed
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("condition_image", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("condition_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("condition_sha256")
        batch.drop_column("condition_image")
