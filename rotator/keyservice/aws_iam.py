"""AWS IAM users' access keys as keys (`[keyservice] kind = "aws-iam"`).

One Client ID (the AWS account), one key per access key: `key_id` is the `AccessKeyId`, `alias`
the user name, `environment` the user's `rotator:environment` tag (default PRODUCTION), `status`
Active/Inactive, and a user tagged `rotator:exempt` is left alone with the tag's value as reason.
Which users: a path prefix, a tag and a group, each optional. Every value from AWS passes the same
checks as the HTTP adapter's.

An access key cannot be reset, so it rotates by the overlap strategy only: a successor key for
the same user (IAM allows two per user), its secret stored and verified, then after the grace the
old key deactivated and, `delete_after_s` later, deleted. A user's two keys are listed as a pair
(the older `replaced_by` the newer, while the newer is Active); whether it is rotator's, the engine proves from the
sinks. IAM stores no answers (CreateAccessKey has no idempotency token), so replays are empty and
a create whose answer is lost is in doubt, never retried blindly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import boto3
import botocore.exceptions as bx
import botocore.loaders
import botocore.session
from botocore.config import Config as BotoConfig

from rotator.budget import READ, WRITE, RateBudget
from rotator.config import KeyServiceConfig
from rotator.domain import (
    ApiKey,
    ClientInfo,
    Environment,
    IssuedKey,
    LastUse,
    Replay,
    ReplayAnswer,
    Scope,
    Secret,
    utc_iso,
)
from rotator.errors import (
    ForbiddenError,
    InDoubtError,
    NotFoundError,
    PermanentError,
    ProtocolError,
    RefusedError,
    RotatorError,
    TransientError,
    UnusableAnswerError,
)
from rotator.keyservice.transport import judged
from rotator.safety import excerpt, is_id, text_problem

PROVIDER = "aws-iam"
BUDGET_ID = "aws-iam"  # the budget's name in the state store: IAM's rate is the account's
NOT_RESET = ("AWS IAM access keys cannot be reset, only created, deactivated and deleted: they rotate by "
             "the overlap strategy only")
DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
          "SignatureDoesNotMatch", "ExpiredToken"}
NOT_YET = {"InvalidClientTokenId", "SignatureDoesNotMatch"}  # what a key IAM has not propagated yet gets
VERIFY_FIRST_WAIT_S, VERIFY_MAX_WAIT_S = 0.5, 5.0
DEFAULT_GRACE_S = 7 * 86_400.0
_MODELS = botocore.loaders.create_loader()  # IAM's and STS's models parsed once a process, not once a service


class _Access(NamedTuple):
    key_id: str
    created: float
    status: str  # ACTIVE, INACTIVE or UNKNOWN


class AwsIamKeyService:
    """IAM behind rotator's KeyService protocol, plus the two-stage retirement (deactivate, then
    revoke) and the last use the engine checks before deactivating."""

    cannot_reset = NOT_RESET  # plans and the engine use the overlap strategy, or refuse a reset unsent
    stores_answers = False  # no idempotent replay: a refused create is final, an unanswered one is in doubt

    def __init__(self, config: KeyServiceConfig, *, grace_s: float = DEFAULT_GRACE_S,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.grace_s = grace_s  # the policy's overlap grace: with delete_after_s, when an old key may go
        self._sleep, self._clock = sleep, clock  # verify_secret's waits
        core = botocore.session.Session()
        core.register_component("data_loader", _MODELS)
        self._session = boto3.session.Session(region_name=config.region or "us-east-1", botocore_session=core)
        self._endpoint = str(config.endpoint_url) if config.endpoint_url else None
        self._settings = BotoConfig(retries={"max_attempts": config.max_attempts, "mode": "standard"},
                                    connect_timeout=config.timeout_s, read_timeout=config.timeout_s)
        self._iam: Any = self._client("iam")
        self._sts: Any = self._client("sts")
        # CreateAccessKey is sent once: a retry after a lost answer would make a second key
        self._iam_once: Any = self._client("iam", self._settings.merge(
            BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"})))
        self._account: str | None = None
        #: The fleet's rate budget (rotator.budget): IAM publishes no rate-limit headers, so only
        #: `requests_per_second` paces it, for every process together; each IAM call spends from it.
        self.budget: RateBudget | None = None

    @property
    def delete_after_s(self) -> float:
        return self.config.delete_after_s

    def _client(self, name: str, settings: BotoConfig | None = None, **credentials: str) -> Any:
        made = self._session.client(name, endpoint_url=self._endpoint, config=settings or self._settings,
                                    **credentials)
        if name == "iam":  # IAM's throttling is account-wide; STS's token check is not IAM's
            made.meta.events.register("before-call.iam.*", self._spend)
        return made

    def _spend(self, model: Any, **_: Any) -> None:
        """Before each IAM call (not botocore's own retries): wait for the shared rate's slot, or
        raise `BudgetSpent` (the engine defers the key)."""
        if self.budget is not None:
            self.budget.wait_or_defer(BUDGET_ID, WRITE if model.name == "CreateAccessKey" else READ)

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
        user = self._user_of(client_id, key_id)
        for key in self._keys_of(user, self._tags(user)):
            if key.key_id == key_id:
                return key
        raise NotFoundError(f"no access key {key_id} in account {client_id}")

    def last_used(self, client_id: str, key_id: str) -> LastUse | None:
        """When, where and for which service the key last authenticated; None if never."""
        used = self._last_used_answer(client_id, key_id).get("AccessKeyLastUsed") or {}
        when: Any = used.get("LastUsedDate")
        if not hasattr(when, "timestamp"):  # never used: no date, service and region "N/A"
            return None
        service, region = used.get("ServiceName", "N/A"), used.get("Region", "N/A")
        for value in (service, region):
            if text_problem(value) is not None:
                raise ProtocolError(f"iam GetAccessKeyLastUsed {key_id}: {excerpt(value)} is not printable text")
        return LastUse(float(when.timestamp()), str(service), str(region))

    # --- the overlap strategy ---------------------------------------------------------------
    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        raise RefusedError(f"{NOT_RESET}; nothing was sent", status=None)

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        return ReplayAnswer(Replay.EMPTY)  # IAM stores no answers

    def replay_create(self, client_id: str, replaces: str | None, idempotency_key: str) -> ReplayAnswer:
        return ReplayAnswer(Replay.EMPTY)  # IAM stores no answers: the engine settles from the listing

    def create_key(self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str,
                   replaces: str | None = None) -> IssuedKey:
        """A new access key for user `alias` (the idempotency key is unused: IAM has none).

        At IAM's limit of two keys, an Inactive key other than `replaces` whose delete time has
        passed is deleted first; otherwise the create is refused before it is sent."""
        where = f"iam CreateAccessKey for user {excerpt(alias)}"
        try:
            if client_id != self.account():
                raise NotFoundError(f"account {excerpt(client_id)} is not the one of these credentials")
            if text_problem(alias) is not None:
                raise ProtocolError(f"the user name {text_problem(alias)}")
            tags = self._tags(alias)
            environment = self._environment(tags, f"iam user {alias}")
            self._make_room(alias, replaces)
        except RefusedError:
            raise
        except RotatorError as exc:
            raise RefusedError(f"{where}: {exc}; nothing was created", status=exc.status) from None
        answer = self._create(alias, where).get("AccessKey") or {}
        key_id, secret = answer.get("AccessKeyId"), answer.get("SecretAccessKey")
        created: Any = answer.get("CreateDate")
        if (not is_id(key_id) or not isinstance(secret, str) or not secret or not hasattr(created, "timestamp")
                or answer.get("UserName") != alias):
            raise UnusableAnswerError(f"{where}: the answer has no usable user, key id, secret or CreateDate")
        key = ApiKey(client_id, str(key_id), alias, environment, (), int(created.timestamp()), None, False,
                     "ACTIVE", self._exempt(tags), replaces=replaces, provider=PROVIDER)
        return IssuedKey(key, Secret(secret))

    def deactivate_key(self, client_id: str, key_id: str) -> None:
        """Switch the key off (it can be switched back on until it is deleted); NotFoundError when gone."""
        user = self._user_of(client_id, key_id)
        self._call(lambda: self._iam.update_access_key(UserName=user, AccessKeyId=key_id, Status="Inactive"),
                   f"iam UpdateAccessKey {key_id}")

    def revoke_key(self, client_id: str, key_id: str) -> None:
        """Delete the key for good; NotFoundError when it is gone already."""
        user = self._user_of(client_id, key_id)
        self._call(lambda: self._iam.delete_access_key(UserName=user, AccessKeyId=key_id),
                   f"iam DeleteAccessKey {key_id}")

    def verify_secret(self, client_id: str, secret: Secret, key_id: str | None = None) -> bool:
        """True when (`key_id`, `secret`) signs sts:GetCallerIdentity as exactly the key's user.

        IAM is eventually consistent, a new key is refused for seconds: InvalidClientTokenId and
        SignatureDoesNotMatch are retried with back-off for `verify_timeout_s`, then it is False."""
        if key_id is None or not is_id(key_id):
            raise PermanentError("aws-iam: a secret is verified together with its access key id")
        if client_id != self.account():
            return False
        sts = self._client("sts", aws_access_key_id=key_id, aws_secret_access_key=secret.reveal())
        try:
            identity = self._identity(sts, key_id)
        finally:
            with contextlib.suppress(Exception):
                sts.close()
        if identity is None:
            return False
        try:
            user = self._user_of(client_id, key_id)
            answer = self._call(lambda: self._iam.get_user(UserName=user), f"iam GetUser {user}")
            arn = (answer.get("User") or {}).get("Arn")
        except NotFoundError:
            return False
        return isinstance(arn, str) and identity.get("Arn") == arn

    def close(self) -> None:
        for client in (self._iam, self._iam_once, self._sts):
            with contextlib.suppress(Exception):
                client.close()

    # --- internals ---------------------------------------------------------------------------
    def _identity(self, sts: Any, key_id: str) -> dict[str, Any] | None:
        """GetCallerIdentity polled while the key may not have propagated; None past the bound."""
        deadline = self._clock() + self.config.verify_timeout_s
        wait = VERIFY_FIRST_WAIT_S
        while True:
            identity = self._call(lambda: _identity_or_none(sts), f"sts GetCallerIdentity as {key_id}")
            if identity is not None:
                return dict(identity)
            left = deadline - self._clock()
            if left <= 0:
                return None
            self._sleep(min(wait, left))
            wait = min(wait * 2, VERIFY_MAX_WAIT_S)

    def _make_room(self, user: str, replaces: str | None) -> None:
        keys = self._access_keys(user)
        if replaces is not None and replaces not in {k.key_id for k in keys}:
            raise RefusedError(f"key {excerpt(replaces)} is not an access key of user {user}; nothing was created",
                               status=None)
        if len(keys) < 2:
            return
        delete_at = keys[-1].created + self.grace_s + self.config.delete_after_s
        stale = [k for k in keys if k.status == "INACTIVE" and k.key_id != replaces]
        if stale and time.time() >= delete_at:
            with contextlib.suppress(NotFoundError):
                self._call(lambda: self._iam.delete_access_key(UserName=user, AccessKeyId=stale[0].key_id),
                           f"iam DeleteAccessKey {stale[0].key_id}")
            return
        listed = ", ".join(f"{k.key_id} {k.status.lower()}" for k in keys)
        why = (f"inactive key {stale[0].key_id} may be deleted from {utc_iso(delete_at)} (grace + delete_after_s)"
               if stale else "no inactive key but the replaced one to delete")
        raise RefusedError(f"user {user} has two access keys, IAM's limit ({listed}): {why}; nothing was created",
                           status=None)

    def _create(self, user: str, where: str) -> Any:
        """CreateAccessKey once: a 4xx proves it did not run; no answer or a 5xx leaves it in doubt."""
        try:
            return self._iam_once.create_access_key(UserName=user)
        except bx.ClientError as exc:
            code, status = _code(exc), _status(exc)
            raise judged(status, f"{where}: {code or status}", refused="nothing was created",
                         in_doubt="the key may exist") from None
        except bx.NoCredentialsError:
            raise RefusedError(f"{where}: no AWS credentials; nothing was sent", status=None) from None
        except (bx.BotoCoreError, OSError) as exc:
            raise InDoubtError(f"{where}: no answer ({type(exc).__name__}); the key may exist") from None

    def _user_of(self, client_id: str, key_id: str) -> str:
        """The key's user: UpdateAccessKey and DeleteAccessKey without one act on the caller's keys."""
        user = self._last_used_answer(client_id, key_id).get("UserName")
        problem = text_problem(user)
        if problem is not None:
            raise ProtocolError(f"iam GetAccessKeyLastUsed {key_id}: the user name {problem}")
        return str(user)

    def _last_used_answer(self, client_id: str, key_id: str) -> Any:
        if client_id != self.account() or not is_id(key_id):
            raise NotFoundError(f"no access key {excerpt(key_id)} in account {excerpt(client_id)}")
        try:
            return self._call(lambda: self._iam.get_access_key_last_used(AccessKeyId=key_id),
                              f"iam GetAccessKeyLastUsed {key_id}")
        except ForbiddenError:
            raise
        except PermanentError:
            raise NotFoundError(f"no access key {key_id} in account {client_id}") from None

    def _keys_of(self, user: Any, tags: dict[str, str]) -> Iterator[ApiKey]:
        """The user's keys, oldest first; of two, the older is `replaced_by` the newer."""
        where = f"iam user {excerpt(user)}"
        problem = text_problem(user)
        if problem is not None:
            raise ProtocolError(f"{where}: the user name {problem}")
        environment = self._environment(tags, where)
        exempt = self._exempt(tags)
        keys = self._access_keys(user)
        # Only an Active newer key can be a successor: an older Active key beside a newer Inactive
        # one is not retiring (it is the one in use).
        paired = len(keys) == 2 and keys[1].status == "ACTIVE"
        pair = [k.key_id for k in keys] if paired else [None, None]
        for index, access in enumerate(keys):
            yield ApiKey(self.account(), access.key_id, str(user), environment, (), int(access.created), None,
                         False, access.status, exempt, replaces=pair[0] if index == 1 else None,
                         replaced_by=pair[1] if index == 0 else None, provider=PROVIDER)

    def _access_keys(self, user: Any) -> list[_Access]:
        found = []
        for page in self._pages("list_access_keys", "AccessKeyMetadata", UserName=user):
            for meta in page:
                key_id, created = meta.get("AccessKeyId"), meta.get("CreateDate")
                if not is_id(key_id) or not hasattr(created, "timestamp"):
                    raise ProtocolError(f"iam user {excerpt(user)}: an access key without a usable id or CreateDate")
                status = str(meta.get("Status", "")).upper()
                found.append(_Access(str(key_id), float(created.timestamp()),
                                     status if status in ("ACTIVE", "INACTIVE") else "UNKNOWN"))
        return sorted(found, key=lambda k: (k.created, k.key_id))

    def _exempt(self, tags: dict[str, str]) -> str | None:
        exempt = tags.get(self.config.exempt_tag)
        if exempt is not None and (not exempt or text_problem(exempt) is not None):
            exempt = "exempt by its tag"  # a reason that is empty or not printable text is not repeated
        return exempt

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
            code, status = _code(exc), _status(exc)
            if code in DENIED:
                raise ForbiddenError(f"{where}: access denied ({code}); see the IAM policy in the README") from None
            if code in ("NoSuchEntity", "NoSuchEntityException"):
                raise NotFoundError(f"{where}: not found") from None
            if code in ("Throttling", "ThrottlingException") or status >= 500:
                raise TransientError(f"{where}: {code or status}") from None
            raise PermanentError(f"{where}: {code or status}") from None
        except bx.NoCredentialsError:
            raise PermanentError(f"{where}: no AWS credentials (environment, profile or instance role)") from None
        except (bx.BotoCoreError, OSError) as exc:
            raise TransientError(f"{where}: {type(exc).__name__}") from None
        except RotatorError:
            raise


def _code(exc: bx.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: bx.ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status if isinstance(status, int) else 0


def _identity_or_none(sts: Any) -> Any:
    """GetCallerIdentity's answer, or None when the key is not (yet) known or its signature fails."""
    try:
        return sts.get_caller_identity()
    except bx.ClientError as exc:
        if _code(exc) in NOT_YET:
            return None
        raise


def build(config: KeyServiceConfig, grace_s: float) -> AwsIamKeyService:
    """`kind = "aws-iam"`: the access keys of IAM users; `grace_s` dates a deactivated key's deletion."""
    return AwsIamKeyService(config, grace_s=grace_s)
