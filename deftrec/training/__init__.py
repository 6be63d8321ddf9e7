"""Training: optimiser and schedule, validation, DeepSpeed config, checkpoints, the collab job, the one
DeftRec training loop (the Ray Train worker) and its driver, and the Ray Tune search over it."""
