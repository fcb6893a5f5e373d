"""The job store's schema versions (Alembic). `Store` upgrades a database to the head on start;
see `tunelab.jobs.store.migrate`. A new revision: add a file under versions/ whose
`down_revision` is the current head, and bump `store.SCHEMA_HEAD`."""
