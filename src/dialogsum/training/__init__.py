"""Training: the `train` recipe and its checkpoints."""
