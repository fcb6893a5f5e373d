-- The job store's SQLite schema as tunelab created it before Alembic (commit 37d82af,
-- Base.metadata.create_all): tests/test_store_versions.py upgrades a database made from it.
CREATE TABLE events (
	seq INTEGER NOT NULL, 
	id VARCHAR(40) NOT NULL, 
	job_id VARCHAR(40) NOT NULL, 
	created_at INTEGER NOT NULL, 
	level VARCHAR(8) NOT NULL, 
	type VARCHAR(16) NOT NULL, 
	message TEXT NOT NULL, 
	data JSON, 
	PRIMARY KEY (seq), 
	UNIQUE (id)
);
CREATE TABLE files (
	seq INTEGER NOT NULL, 
	id VARCHAR(40) NOT NULL, 
	owner VARCHAR(40) NOT NULL, 
	filename VARCHAR(255) NOT NULL, 
	purpose VARCHAR(32) NOT NULL, 
	bytes INTEGER NOT NULL, 
	created_at INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	status_details TEXT, 
	validation JSON, 
	format VARCHAR(32), 
	raw_path VARCHAR(500) NOT NULL, 
	data_path VARCHAR(500), 
	PRIMARY KEY (seq), 
	UNIQUE (id)
);
CREATE TABLE jobs (
	seq INTEGER NOT NULL, 
	id VARCHAR(40) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	owner VARCHAR(40) NOT NULL, 
	status VARCHAR(20) NOT NULL, 
	created_at INTEGER NOT NULL, 
	started_at INTEGER, 
	finished_at INTEGER, 
	model VARCHAR(500) NOT NULL, 
	base_spec VARCHAR(1000) NOT NULL, 
	training_file VARCHAR(40), 
	validation_file VARCHAR(40), 
	suffix VARCHAR(64), 
	seed INTEGER NOT NULL, 
	meta JSON, 
	request JSON NOT NULL, 
	hyperparameters JSON NOT NULL, 
	error JSON, 
	fine_tuned_model VARCHAR(1000), 
	result_files JSON NOT NULL, 
	trained_tokens INTEGER, 
	progress JSON, 
	result JSON, 
	cancel_requested BOOLEAN NOT NULL, 
	lease_owner VARCHAR(100), 
	lease_expires_at FLOAT, 
	attempts INTEGER NOT NULL, 
	PRIMARY KEY (seq), 
	UNIQUE (id)
);
CREATE TABLE keys (
	seq INTEGER NOT NULL, 
	id VARCHAR(40) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	hash VARCHAR(64) NOT NULL, 
	prefix VARCHAR(16) NOT NULL, 
	created_at INTEGER NOT NULL, 
	revoked_at INTEGER, 
	PRIMARY KEY (seq), 
	UNIQUE (id), 
	UNIQUE (hash)
);
CREATE TABLE models (
	seq INTEGER NOT NULL, 
	id VARCHAR(1100) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	owner VARCHAR(40) NOT NULL, 
	job_id VARCHAR(40) NOT NULL, 
	checkpoint_id VARCHAR(40), 
	step INTEGER, 
	metrics JSON, 
	path VARCHAR(500) NOT NULL, 
	created_at INTEGER NOT NULL, 
	PRIMARY KEY (seq), 
	UNIQUE (id), 
	UNIQUE (checkpoint_id)
);
CREATE INDEX ix_keys_name ON keys (name);
CREATE INDEX ix_files_owner ON files (owner);
CREATE INDEX ix_jobs_kind ON jobs (kind);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE INDEX ix_jobs_owner ON jobs (owner);
CREATE INDEX ix_events_job_id ON events (job_id);
CREATE INDEX ix_models_job_id ON models (job_id);
CREATE INDEX ix_models_owner ON models (owner);
