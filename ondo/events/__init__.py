"""ondo.events: the macro layer's deterministic event log, its detectors, replay and analysis."""
