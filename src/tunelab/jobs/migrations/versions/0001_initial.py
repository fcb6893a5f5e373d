"""The schema as it was before Alembic (2026-12): keys, files, jobs, events, models.

Frozen here on purpose (not read from the models): a database created before Alembic has
exactly these tables, and is stamped at this revision in place.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _seq():
    return sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "keys", _seq(),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("revoked_at", sa.Integer, nullable=True))
    op.create_index("ix_keys_name", "keys", ["name"])
    op.create_table(
        "files", _seq(),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("owner", sa.String(40), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_details", sa.Text, nullable=True),
        sa.Column("validation", sa.JSON, nullable=True),
        sa.Column("format", sa.String(32), nullable=True),
        sa.Column("raw_path", sa.String(500), nullable=False),
        sa.Column("data_path", sa.String(500), nullable=True))
    op.create_index("ix_files_owner", "files", ["owner"])
    op.create_table(
        "jobs", _seq(),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Integer, nullable=True),
        sa.Column("finished_at", sa.Integer, nullable=True),
        sa.Column("model", sa.String(500), nullable=False),
        sa.Column("base_spec", sa.String(1000), nullable=False),
        sa.Column("training_file", sa.String(40), nullable=True),
        sa.Column("validation_file", sa.String(40), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("meta", sa.JSON, nullable=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("fine_tuned_model", sa.String(1000), nullable=True),
        sa.Column("result_files", sa.JSON, nullable=False),
        sa.Column("trained_tokens", sa.Integer, nullable=True),
        sa.Column("progress", sa.JSON, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False))
    for col in ("kind", "owner", "status"):
        op.create_index(f"ix_jobs_{col}", "jobs", [col])
    op.create_table(
        "events", _seq(),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=True))
    op.create_index("ix_events_job_id", "events", ["job_id"])
    op.create_table(
        "models", _seq(),
        sa.Column("id", sa.String(1100), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("checkpoint_id", sa.String(40), nullable=True, unique=True),
        sa.Column("step", sa.Integer, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False))
    op.create_index("ix_models_owner", "models", ["owner"])
    op.create_index("ix_models_job_id", "models", ["job_id"])


def downgrade() -> None:
    for table in ("models", "events", "jobs", "files", "keys"):
        op.drop_table(table)
