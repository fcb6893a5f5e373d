"""The platform's state and its job workers.

- store: files, fine-tuning jobs, events, checkpoints, models, evaluations and API keys, in one
  database reached through SQLAlchemy (SQLite under the data dir; a PostgreSQL URL works too);
- uploads: an uploaded file converted and validated with tunelab.data;
- spec: an OpenAI fine-tuning request -> the TrainConfig `tunelab train` uses;
- worker: claims queued jobs under a lease it renews, runs them, resumes a dead worker's job.

Dependencies point down only: jobs -> train / evaluate / data. The HTTP layer (tunelab.server)
sits above and never runs training itself.
"""
