"""Key-service adapters: the HTTP contract of docs/keyservice-api.md, its emulator, AWS IAM, and
any a plugin registers (`rotator.keyservice.registry`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotator.config import KeyServiceConfig
from rotator.keyservice import registry

if TYPE_CHECKING:
    from rotator.protocols import KeyService


def build_keyservice(config: KeyServiceConfig, grace_s: float = 7 * 86_400) -> KeyService:
    """The adapter a config asks for (`kind`, through the registry). `grace_s` is the policy's
    overlap grace (AWS IAM: when a deactivated key may be deleted)."""
    return registry.resolve(config.kind)(config, grace_s)
