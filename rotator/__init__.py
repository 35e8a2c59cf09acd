"""rotator: rotate production API keys on a schedule without ever losing the one-time secret."""

__version__ = "0.1.0"
