"""Configuration dataclasses only (no torch): data, model components, model, training, jobs, pipeline."""
