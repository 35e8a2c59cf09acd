"""Key-service adapters: the HTTP contract of docs/keyservice-api.md, its emulator, and AWS IAM."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotator.config import KeyServiceConfig, read_credential

if TYPE_CHECKING:
    from rotator.protocols import KeyService


def build_keyservice(config: KeyServiceConfig, grace_s: float = 7 * 86_400) -> KeyService:
    """The adapter a config asks for. `emulator` serves a seeded emulator inside this process.
    `grace_s` is the policy's overlap grace (AWS IAM: when a deactivated key may be deleted)."""
    if config.kind == "aws-iam":
        from rotator.keyservice.aws_iam import AwsIamKeyService

        return AwsIamKeyService(config, grace_s=grace_s)
    from rotator.keyservice.http import HttpKeyService

    if config.kind == "emulator":
        from rotator.keyservice.emulator_http import start_in_process

        server = start_in_process(config.seed)
        return HttpKeyService.from_config(config, url=server.url, token=server.emulator.token)
    token = read_credential(config.token_env, config.token_file, "keyservice management token")
    return HttpKeyService.from_config(config, url=str(config.url), token=token)
