"""Tensor parallelism: the ranks' process groups, the per-step broadcast, the worker processes."""
