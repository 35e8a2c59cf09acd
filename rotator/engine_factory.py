"""Build the parts the engine needs from settings, in one place."""

from __future__ import annotations

from rotator.config import Settings, read_credential
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretSink
from rotator.sinks import registry


def build_fingerprinter(settings: Settings) -> Fingerprinter:
    engine = settings.engine
    return Fingerprinter(
        read_credential(engine.fingerprint_key_env, engine.fingerprint_key_file, "fingerprint key")
    )


def build_sinks(settings: Settings, fingerprint: Fingerprinter | None = None) -> list[SecretSink]:
    fp = fingerprint or build_fingerprinter(settings)
    return [registry.build(s.kind, s.options, fp) for s in settings.sinks]
