"""AWS IAM users' access keys as keys (`[keyservice] kind = "aws-iam"`), reported, not rotated.

One Client ID (the AWS account), one key per access key: `key_id` is the `AccessKeyId`, `alias`
the user name, `environment` the user's `rotator:environment` tag (default PRODUCTION), `status`
Active/Inactive, and a user tagged `rotator:exempt` is left alone with the tag's value as reason.
Which users: a path prefix, a tag and a group, each optional.

An access key cannot be reset, only created, deactivated and deleted, so it rotates only with
the overlap strategy, which this version does not have: `scan`, `status`, the metrics and the
due-soon/overdue alerts work (audit mode, as check-config demands); a reset is refused before
anything is sent. Every value from AWS passes the same checks as the HTTP adapter's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions as bx
from botocore.config import Config as BotoConfig

from rotator.config import KeyServiceConfig
from rotator.domain import ApiKey, ClientInfo, Environment, IssuedKey, ReplayAnswer, Scope, Secret
from rotator.errors import (
    ForbiddenError,
    NotFoundError,
    PermanentError,
    ProtocolError,
    RefusedError,
    RotatorError,
    TransientError,
)
from rotator.safety import excerpt, is_id, text_problem

NOT_RESET = ("AWS IAM access keys cannot be reset, only created, deactivated and deleted (the overlap "
             "strategy), which this version does not do")
DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
          "SignatureDoesNotMatch", "ExpiredToken"}


class AwsIamKeyService:
    """The read side of IAM (list, get) behind rotator's KeyService protocol."""

    cannot_reset = NOT_RESET  # plans and the engine refuse a reset before sending anything

    def __init__(self, config: KeyServiceConfig) -> None:
        self.config = config
        session = boto3.session.Session(region_name=config.region or "us-east-1")
        endpoint = str(config.endpoint_url) if config.endpoint_url else None
        settings = BotoConfig(retries={"max_attempts": config.max_attempts, "mode": "standard"},
                              connect_timeout=config.timeout_s, read_timeout=config.timeout_s)
        self._iam: Any = session.client("iam", endpoint_url=endpoint, config=settings)
        self._sts: Any = session.client("sts", endpoint_url=endpoint, config=settings)
        self._account: str | None = None

    # --- reading ---------------------------------------------------------------------------
    def account(self) -> str:
        if self._account is None:
            identity = self._call(self._sts.get_caller_identity, "sts GetCallerIdentity")
            account = identity.get("Account")
            if not is_id(account):
                raise ProtocolError(f"sts GetCallerIdentity: account {excerpt(account)} is not an id")
            self._account = str(account)
        return self._account

    def list_clients(self) -> Iterator[ClientInfo]:
        yield ClientInfo(self.account(), "AWS account", Environment.PRODUCTION)

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        if client_id != self.account():
            return
        members = self._group_members()
        for page in self._pages("list_users", "Users", PathPrefix=self.config.user_path_prefix):
            for user in page:
                name = user.get("UserName")
                if members is not None and name not in members:
                    continue
                tags = self._tags(name)
                if not self._tag_matches(tags):
                    continue
                yield from self._keys_of(name, tags)

    def get_key(self, client_id: str, key_id: str) -> ApiKey:
        if client_id != self.account() or not is_id(key_id):
            raise NotFoundError(f"no access key {excerpt(key_id)} in account {excerpt(client_id)}")
        try:
            used = self._call(lambda: self._iam.get_access_key_last_used(AccessKeyId=key_id),
                              f"iam GetAccessKeyLastUsed {key_id}")
        except ForbiddenError:
            raise
        except PermanentError:
            raise NotFoundError(f"no access key {key_id} in account {client_id}") from None
        for key in self._keys_of(used.get("UserName"), self._tags(used.get("UserName"))):
            if key.key_id == key_id:
                return key
        raise NotFoundError(f"no access key {key_id} in account {client_id}")

    # --- what IAM cannot do (in this version) ----------------------------------------------
    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        raise RefusedError(f"{NOT_RESET}; nothing was sent", status=None)

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        from rotator.domain import Replay

        return ReplayAnswer(Replay.EMPTY)  # nothing was ever sent, so nothing is stored

    def create_key(self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str) -> IssuedKey:
        raise PermanentError("aws-iam: creating access keys needs the overlap strategy (not in this version)")

    def revoke_key(self, client_id: str, key_id: str) -> None:
        raise PermanentError("aws-iam: deleting access keys needs the overlap strategy (not in this version)")

    def verify_secret(self, client_id: str, secret: Secret) -> bool:
        raise PermanentError("aws-iam: no secret of an access key is held in this version")

    def close(self) -> None:
        for client in (self._iam, self._sts):
            with contextlib.suppress(Exception):
                client.close()

    # --- internals ---------------------------------------------------------------------------
    def _keys_of(self, user: Any, tags: dict[str, str]) -> Iterator[ApiKey]:
        where = f"iam user {excerpt(user)}"
        problem = text_problem(user)
        if problem is not None:
            raise ProtocolError(f"{where}: the user name {problem}")
        environment = self._environment(tags, where)
        exempt = tags.get(self.config.exempt_tag)
        if exempt is not None and (not exempt or text_problem(exempt) is not None):
            exempt = "exempt by its tag"  # a reason that is empty or not printable text is not repeated
        for page in self._pages("list_access_keys", "AccessKeyMetadata", UserName=user):
            for meta in page:
                key_id, created = meta.get("AccessKeyId"), meta.get("CreateDate")
                if not is_id(key_id) or not hasattr(created, "timestamp"):
                    raise ProtocolError(f"{where}: an access key without a usable id or CreateDate")
                status = str(meta.get("Status", "")).upper()
                yield ApiKey(self.account(), str(key_id), str(user), environment, (), int(created.timestamp()),
                             None, False, status if status in ("ACTIVE", "INACTIVE") else "UNKNOWN",
                             exempt)

    def _environment(self, tags: dict[str, str], where: str) -> Environment:
        value = tags.get(self.config.environment_tag, "PRODUCTION").upper()
        try:
            return Environment(value)
        except ValueError:
            raise ProtocolError(f"{where}: tag {self.config.environment_tag} is {excerpt(value)}, "
                                "not PRODUCTION or SANDBOX") from None

    def _tags(self, user: Any) -> dict[str, str]:
        tags: dict[str, str] = {}
        for page in self._pages("list_user_tags", "Tags", UserName=user):
            for tag in page:
                tags[str(tag.get("Key"))] = str(tag.get("Value", ""))
        return tags

    def _tag_matches(self, tags: dict[str, str]) -> bool:
        wanted = self.config.user_tag
        if wanted is None:
            return True
        key, sep, value = wanted.partition("=")
        return key in tags and (not sep or tags[key] == value)

    def _group_members(self) -> set[str] | None:
        if self.config.group is None:
            return None
        members: set[str] = set()
        for page in self._pages("get_group", "Users", GroupName=self.config.group):
            members.update(str(user.get("UserName")) for user in page)
        return members

    def _pages(self, operation: str, field: str, **args: Any) -> Iterator[list[Any]]:
        where = f"iam {operation}"
        pages = self._iam.get_paginator(operation).paginate(**args)
        iterator = iter(pages)
        while True:
            page = self._call(lambda: next(iterator, None), where)
            if page is None:
                return
            yield list(page.get(field) or [])

    def _call(self, call: Any, where: str) -> Any:
        try:
            return call()
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in DENIED:
                raise ForbiddenError(f"{where}: access denied ({code}); see the IAM policy in the README") from None
            if code in ("NoSuchEntity", "NoSuchEntityException"):
                raise NotFoundError(f"{where}: not found") from None
            if code in ("Throttling", "ThrottlingException") or (isinstance(status, int) and status >= 500):
                raise TransientError(f"{where}: {code or status}") from None
            raise PermanentError(f"{where}: {code or status}") from None
        except bx.NoCredentialsError:
            raise PermanentError(f"{where}: no AWS credentials (environment, profile or instance role)") from None
        except (bx.BotoCoreError, OSError) as exc:
            raise TransientError(f"{where}: {type(exc).__name__}") from None
        except RotatorError:
            raise
