"""deployment: institutions' SuperLink node id and public-key digest; schedules' runner

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("institutions") as batch:  # batch: SQLite cannot add constraints in place
        batch.add_column(sa.Column("node_id", sa.String(length=20), nullable=True))
        batch.add_column(sa.Column("public_key_sha256", sa.String(length=64), nullable=True))
        batch.create_unique_constraint("uq_institutions_node_id", ["node_id"])
    with op.batch_alter_table("schedules") as batch:
        batch.add_column(sa.Column("runner", sa.String(length=20), nullable=False, server_default="simulate"))


def downgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("runner")
    with op.batch_alter_table("institutions") as batch:
        batch.drop_constraint("uq_institutions_node_id", type_="unique")
        batch.drop_column("public_key_sha256")
        batch.drop_column("node_id")
