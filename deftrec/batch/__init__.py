"""Batch jobs on Ray Data: the index job, the evaluation job, baselines and reports."""
