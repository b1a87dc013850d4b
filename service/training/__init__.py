"""Training and BatchNorm recalibration as pure functions a worker process calls."""
