"""Parallelism: the process grid, tensor parallelism and the pipeline schedule."""
