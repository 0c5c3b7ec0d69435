"""Training: absl entry point (``python -m attnlab.train``), jitted step, checkpoints, metrics."""
