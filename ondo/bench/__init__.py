"""Benchmarks: offline throughput with its roofline and baselines, and serving load."""
