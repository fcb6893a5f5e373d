"""Alembic's environment, run programmatically only: `tunelab.jobs.store.migrate` passes the
open connection (inside its transaction and lock) as config.attributes["connection"]."""
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
