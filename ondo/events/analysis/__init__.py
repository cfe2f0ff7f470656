"""Correlation analysis over a telemetry database: `ondo analyze`."""
