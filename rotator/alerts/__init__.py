"""Alerts: events from the engine, fanned out to the `[[alerts]]` channels of the config."""
