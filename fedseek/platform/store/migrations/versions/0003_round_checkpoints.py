"""resumable jobs: each committed round's checkpoint digest; who runs a job and how

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("runner", sa.String(length=20), nullable=False, server_default="simulate"))
        batch.add_column(sa.Column("owner", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
        batch.drop_column("runner")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("checkpoint_sha256")
