"""Training workers: processes that claim jobs from the database, train, and publish versions."""
