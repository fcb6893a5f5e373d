"""jobs.train_workers: the training processes a fine-tuning job asks for (`"tunelab":
{"workers": N}`; NULL for one), so a worker without Ray never claims a job that needs several.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("train_workers", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("train_workers")
