"""Artifacts other stages read: collaborative embeddings and the model export (no training code)."""
