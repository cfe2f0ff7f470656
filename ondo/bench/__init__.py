"""Benchmarks: `ondo bench serve` (online, against a server); more subcommands to come."""
