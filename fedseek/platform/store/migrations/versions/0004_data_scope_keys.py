"""data scopes name the dataset, the slicing scheme and the slice (ledger_math.DataScope keys)

Existing values ("all", a bare period name) stay as they are: they parse as slices of an unknown
dataset and scheme and so compose sequentially with every later release (conservative).

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "privacy_ledger"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("data_scope", existing_type=sa.String(length=200), type_=sa.String(length=512),
                               existing_nullable=False)


def downgrade() -> None:
    for table in ("jobs", "privacy_ledger"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("data_scope", existing_type=sa.String(length=512), type_=sa.String(length=200),
                               existing_nullable=False)
