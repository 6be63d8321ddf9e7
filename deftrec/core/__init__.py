"""Leaf helpers that import no other project module: typed-config machinery, artifacts (atomic directories, manifests, checksums, the one fingerprint rule), caches, Ray connection, logging."""
