"""ondo.telemetry"""
