"""Training: optimiser and schedule, validation, DeepSpeed config, checkpoints, the collab job, the Ray Train worker loop and driver, and the in-process trainer."""
