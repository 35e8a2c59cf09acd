"""The sections of the configuration file as pydantic models, each key with its type, default and
meaning (docs/configuration.md is generated from them), and the checks of one value alone."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rotator.aliases import DEFAULT_TEMPLATE as DEFAULT_ALIAS_TEMPLATE
from rotator.aliases import template_problem
from rotator.config.credentials import (
    credential_value,
    read_credential,
    url_with_password,
)
from rotator.domain import Environment, Severity
from rotator.errors import PermanentError
from rotator.policy import Policy, RotationWindow
from rotator.safety import (
    ID_RE,
    ID_RULE,
    excerpt,
    looks_like_secret,
    might_be_secret,
    url_has_credentials,
)

DEFAULT_PATH = "rotator.toml"


EVENTS = (
    "rotation.succeeded",
    "rotation.failed",
    "rotation.secret_at_risk",
    "rotation.in_doubt",
    "rotation.recovered",
    "key.due_soon",
    "key.overdue",
    "drift.detected",
    "keyservice.protocol_error",
    "security.forged_message",
)


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


#: Broker URL schemes of kombu's RabbitMQ (py-amqp) transport.
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp", "pyamqps")


REDIS_SCHEMES = ("redis", "rediss", "unix")


_EXCLUDE_RE = re.compile(r"^[^/\s]+/[^/\s]+$")


class Section(BaseModel):
    """Every section refuses keys it does not know, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_CREDENTIAL_WORDS = ("token", "password", "secret", "key", "credential")


def _inline_credential(name: str, value: object) -> str | None:
    """Why a plugin's option holds a credential inline (named, never quoted), as every built-in key
    refuses one; None when it does not. `*_env` must name a variable, `*_file` a file."""
    if name.endswith("_env"):
        ok = isinstance(value, str) and not looks_like_secret(value)
        return None if ok else f"option {name} must name an environment variable (the value is not shown)"
    if name.endswith("_file"):
        return None
    if any(word in name.lower() for word in _CREDENTIAL_WORDS):
        return (f"option {name}: credentials are never inline; use `{name}_env` or `{name}_file` "
                "(the value is not shown)")
    if isinstance(value, str) and (url_has_credentials(value) if "://" in value else might_be_secret(value)):
        return f"option {name} looks like a credential or a URL with one; keep it in a `*_env` or `*_file` option"
    return None


class KeyServiceConfig(Section):
    kind: str = Field(
        "http", description=("`http`: the API of docs/keyservice-api.md; `emulator`: in-process; `aws-iam`: the "
                             "access keys of AWS IAM users, rotated by the overlap strategy (docs/strategies.md); "
                             "or a plugin's, from the `rotator.keyservices` entry point (docs/plugins.md).")
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="A plugin key service's own settings; the built-in kinds take none.")
    url: HttpUrl = Field(HttpUrl("http://127.0.0.1:8400"), description="Base URL (http kind).")
    token_env: EnvName | None = Field(
        "ROTATOR_KEYSERVICE_TOKEN", description="Variable holding the management token."
    )
    token_file: Path | None = Field(None, description="File holding the management token.")
    clients: list[str] | None = Field(
        None, description="Client IDs to manage; omitted: every Client ID the token manages."
    )
    timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one try, seconds: connect, headers and the whole body."
    )
    max_attempts: int = Field(5, ge=1, le=20, description="Tries per call on transient errors.")
    call_deadline_s: float = Field(
        120.0, gt=0, description="Deadline of one whole call, every try and wait included; no retry starts after it.")
    retry_max_wait_s: float = Field(
        30.0, ge=0, description="Longest wait between tries, also the cap on `Retry-After`."
    )
    per_page: int = Field(100, ge=1, le=100, description="Keys fetched per page while listing.")
    max_share_of_rate_limit: float = Field(
        0.2, gt=0, le=1, description=("The share of each rate-limit window (of the calls it had left when the "
                                      "fleet first saw it) that the whole fleet may spend; the rest is the "
                                      "platform's (docs/operations.md, \"The rate budget\")."))
    rate_limit_reserve: float = Field(
        0.1, ge=0, lt=1, description=("Below this share of a window's limit left, the fleet sends nothing until "
                                      "the window resets."))
    requests_per_second: float | None = Field(
        None, gt=0, description=("Pace every worker together to this many calls a second (a shared token "
                                 "bucket), for a key service that publishes no rate-limit headers (AWS IAM)."))
    burst: int = Field(10, ge=1, le=10_000, description="Calls that may go at once under `requests_per_second`.")
    seed: Path | None = Field(None, description="Seed file for the emulator kind.")
    successors: bool = Field(
        True, description=("The key service creates successors (`Replaces`/`ReplacedBy`, docs/keyservice-api.md). "
                           "false: the contract as the payment API publishes it (aliases unique per Client ID, no "
                           "links): the overlap strategy's alias-template mode, a new key under a derived alias "
                           "(`alias_template`) whose sinks' place is its base alias (`{base_alias}` in sink paths). "
                           "http and emulator kinds."))
    alias_template: str = Field(
        DEFAULT_ALIAS_TEMPLATE, description=("successors = false: the alias of a lineage's next key, from its base "
                                             "alias and the rotation number (`payouts`, `payouts--r1`, "
                                             "`payouts--r2`…); `{alias}` first, then at most 16 characters "
                                             "of letters, digits, space and `._~+#-`, then `{n}`."))
    clock_skew_s: float = Field(
        86_400, ge=0, description="A date from the key service may be this far ahead of this host's clock."
    )
    region: str | None = Field(None, description="aws-iam: the AWS region of the STS endpoint (IAM is global).")
    endpoint_url: HttpUrl | None = Field(None, description="aws-iam: another IAM/STS endpoint (tests, proxies).")
    user_path_prefix: str = Field(
        "/", pattern=r"^/([\x21-\x7e]*/)?$", description="aws-iam: only users under this path, e.g. `/service/`.")
    user_tag: str | None = Field(
        None, description="aws-iam: only users with this tag, `Key` or `Key=Value`, e.g. `rotator:managed=true`.")
    group: str | None = Field(None, description="aws-iam: only members of this IAM group.")
    exempt_tag: str = Field(
        "rotator:exempt", description="aws-iam: a user with this tag is left alone; its value says why.")
    environment_tag: str = Field(
        "rotator:environment", description="aws-iam: a user's environment (PRODUCTION or SANDBOX; default PRODUCTION).")
    delete_after_s: float = Field(
        7 * 86_400, ge=0, description=("aws-iam: an access key deactivated after its grace is deleted this much "
                                       "later (it can be switched back on until then)."))
    verify_timeout_s: float = Field(
        60.0, gt=0, le=900, description=("aws-iam: how long a new access key is retried with sts:GetCallerIdentity "
                                         "while IAM propagates it (often 5-15 s)."))

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        """A kind the registry knows and can import (a plugin whose module fails is said here)."""
        from rotator.keyservice import registry  # imports no configuration

        try:
            registry.resolve(kind)
        except PermanentError as exc:
            raise ValueError(str(exc)) from None
        return kind

    @field_validator("alias_template")
    @classmethod
    def _derivable(cls, template: str) -> str:
        problem = template_problem(template)
        if problem is not None:
            raise ValueError(f"{template!r} {problem}")
        return template

    @field_validator("options")
    @classmethod
    def _options_for_a_plugin(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from rotator.keyservice.registry import BUILTIN

        kind = info.data.get("kind")
        if options and kind in BUILTIN:
            raise ValueError(f"the built-in kind {kind!r} takes none (they are a plugin's settings)")
        wrong = [why for name, value in options.items() if (why := _inline_credential(str(name), value))]
        if wrong:
            raise ValueError("; ".join(wrong))
        return options

    @field_validator("clients")
    @classmethod
    def _client_ids(cls, clients: list[str] | None) -> list[str] | None:
        for client in clients or []:
            if not ID_RE.fullmatch(client):
                raise ValueError(f"{excerpt(client)} is not a Client ID ({ID_RULE})")
        return clients


class PolicyConfig(Section):
    max_age_days: int = Field(90, gt=0, description="A key is due when its age >= this.")
    warn_before_days: int = Field(14, ge=0, description="Due soon this many days before due.")
    environments: list[Environment] = Field(
        [Environment.PRODUCTION], description="Environments in scope; others are left alone."
    )
    mode: Literal["audit", "enforce"] = Field(
        "audit", description="`audit`: scheduled runs only report; `enforce`: they rotate."
    )
    exclude: list[str] = Field(
        [], description=("`client_id/key_id` or `client_id/*` left alone: never rotated by the schedule or "
                         "repaired by `reconcile --repair`; a manual rotation needs `--force --include-out-of-scope`.")
    )
    window: str | None = Field(
        None, description="Scheduled rotations only inside e.g. `Mon-Fri 09:00-17:00 Europe/Paris`."
    )
    strategy: Literal["reset", "overlap"] = Field(
        "reset", description=("`reset`: a new secret for the same key, the old one dies at once; `overlap`: a "
                              "successor key with the same alias and scopes, stored and verified, then the old "
                              "key revoked after `overlap_grace_s` (the Auto-generated key is always reset). "
                              "See docs/strategies.md."))
    overlap_grace_s: float = Field(
        7 * 86_400, ge=0, description="overlap: how long the old key keeps working after its successor is stored.")

    @field_validator("exclude")
    @classmethod
    def _exclude_shape(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not _EXCLUDE_RE.match(pattern):
                raise ValueError(f"{pattern!r} is not 'client_id/key_id' or 'client_id/*'")
        return patterns

    @field_validator("window")
    @classmethod
    def _window_parses(cls, text: str | None) -> str | None:
        if text is not None:
            RotationWindow.parse(text)
        return text

    @model_validator(mode="after")
    def _warn_below_max(self) -> PolicyConfig:
        if self.warn_before_days >= self.max_age_days:
            raise ValueError(
                f"warn_before_days ({self.warn_before_days}) must be below "
                f"max_age_days ({self.max_age_days})"
            )
        if self.overlap_grace_s >= self.max_age_days * 86_400:
            raise ValueError(f"overlap_grace_s ({self.overlap_grace_s:g}) must be below max_age_days "
                             f"({self.max_age_days} d): a successor would be due before its predecessor is revoked")
        return self

    def to_policy(self) -> Policy:
        return Policy(
            max_age_days=self.max_age_days,
            warn_before_days=self.warn_before_days,
            environments=frozenset(self.environments),
            exclude=tuple(self.exclude),
            strategy=self.strategy,
            overlap_grace_s=self.overlap_grace_s,
        )

    def rotation_window(self) -> RotationWindow | None:
        return RotationWindow.parse(self.window) if self.window else None


class StateConfig(Section):
    redis_url: AnyUrl = Field(
        AnyUrl("redis://127.0.0.1:6379/0"), description="Locks, attempt records, history."
    )
    namespace: str = Field("rotator", pattern=r"^[A-Za-z0-9_.:-]+$", description="Key prefix.")
    lock_ttl_s: int = Field(60, ge=5, description="Lease of a per-key lock; renewed while working.")
    history_max: int = Field(1000, ge=10, description="Entries kept in the audit history.")
    password_env: EnvName | None = Field(None, description="Variable holding Redis's password (not in the URL).")
    password_file: Path | None = Field(None, description="File holding Redis's password.")

    def url(self) -> str:
        """`redis_url` with the password from `password_env`/`password_file` (never print it)."""
        return url_with_password(str(self.redis_url), self.password_env, self.password_file)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: AnyUrl) -> AnyUrl:
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"scheme {url.scheme!r} is not redis://, rediss:// or unix://")
        return url


class CeleryConfig(Section):
    broker_url: AnyUrl = Field(AnyUrl("redis://127.0.0.1:6379/1"), description="Celery broker.")
    result_backend: AnyUrl | None = Field(None, description="Optional result backend.")
    password_env: EnvName | None = Field(
        None, description="Variable holding the broker's (and a Redis result backend's) password.")
    password_file: Path | None = Field(None, description="File holding that password.")

    def broker(self) -> str:
        """`broker_url` with the password from `password_env`/`password_file` (never print it)."""
        return url_with_password(str(self.broker_url), self.password_env, self.password_file)

    def backend(self) -> str | None:
        if self.result_backend is None:
            return None
        return url_with_password(str(self.result_backend), self.password_env, self.password_file)
    scan_every_s: int = Field(3600, ge=1, description="Beat: seconds between scans.")
    recover_every_s: int = Field(300, ge=1, description="Beat: seconds between recovery sweeps.")
    reconcile_every_s: int = Field(
        86_400, ge=60, description=("Beat: seconds between full reconciles (every key against every sink); in "
                                    "`enforce` mode each also repairs what a replay can repair."))
    repair_every_s: int = Field(
        900, ge=0, le=21_600, description=(
            "Beat, `enforce` mode: seconds between automatic repair sweeps (attempt records, and the sinks of keys "
            "reset in the last two days), which replay and store a secret a sink or a wiped Redis lost, never "
            "resetting afresh. At most 6 h, so it runs at least four times while the key service keeps a reset's "
            "answer (24 h); 0: off."))
    warn_every_s: int = Field(86_400, ge=60, description="Beat: seconds between due-soon sweeps.")
    alert_outbox_dir: Path | None = Field(
        None, description=("Worker: the directory of its outbox of critical alerts, which it delivers without the "
                            "broker (made 0700 when missing; an existing one must be private, which check-config "
                            "checks; keep it across restarts); omitted: the private state directory "
                            "(`$XDG_STATE_HOME/rotator`)."))
    beat_lock_ttl_s: int = Field(
        30, ge=3, le=600, description=(
            "Beat: the lease that lets one of several beats schedule. A standby takes over within this plus "
            "a sixth of it (at most 5 s) once the leader is frozen or unreachable, at once when it stopped or "
            "died on the standby's machine."))
    visibility_timeout_s: int = Field(
        3600, ge=60, description=("Redis (any non-RabbitMQ) broker: redeliver an unacknowledged task after this; "
                                  "must exceed the longest rotation. Not used with RabbitMQ.")
    )
    result_expires_s: int = Field(86_400, ge=60, description="Results kept this long.")
    concurrency: int = Field(2, ge=1, le=64, description="Worker processes of `rotator worker`.")
    queue: str = Field(
        "rotator", pattern=r"^[A-Za-z0-9_.:-]{1,200}$",
        description=("Celery queue (on RabbitMQ also the exchange) that workers consume and beat and "
                     "`rotate --enqueue` publish to; a new name moves a deployment to a new queue."))
    quorum_queues: bool = Field(
        False, description=("RabbitMQ broker: declare `queue` as a replicated quorum queue (topic exchange, native "
                            "delayed delivery for retries). An existing queue keeps its type: switch with a new "
                            "`queue` name."))
    consumer_timeout_s: int = Field(
        1800, ge=0, description=("RabbitMQ broker: the broker's delivery acknowledgement timeout (`consumer_timeout` "
                                 "in rabbitmq.conf, or a `consumer-timeout` policy on the queue), seconds; 0: "
                                 "disabled there. rotator cannot read it: state it so it is checked against the "
                                 "longest rotation."))

    def broker_is_amqp(self) -> bool:
        """RabbitMQ (`amqp://`, `amqps://`, `pyamqp://`, `pyamqps://`): acknowledgement deadlines come from
        the broker's `consumer_timeout`, not from Redis's `visibility_timeout`."""
        return self.broker_url.scheme in AMQP_SCHEMES


class EngineConfig(Section):
    sink_retry_s: float = Field(
        300.0, gt=0, description="Keep retrying transient sink failures this long before at-risk."
    )
    verify: bool = Field(True, description="Check the new secret with the key service's token call.")
    in_doubt_horizon_s: float = Field(
        90.0, ge=60, description=("A reset with no conclusive answer stays in doubt this long (the key service's own "
                                  "request deadline, 60 s in the contract, plus time in flight) before an unchanged "
                                  "key counts as not run and the same Idempotency-Key is sent again."))
    fingerprint_key_env: EnvName | None = Field(
        "ROTATOR_FINGERPRINT_KEY", description=(
            "Variable holding the fingerprint key: the HMAC key (16 bytes or more) that proves a stored copy of a "
            "secret is the live one without revealing either; `rotator keys init DIR` makes one. Keep it as long "
            "as the sinks hold fingerprints made with it."))
    fingerprint_key_file: Path | None = Field(None, description="File holding that key.")
    idempotency_key_env: EnvName | None = Field(
        None, description=("Variable holding the secret the Idempotency-Keys are derived with (16 bytes or more): "
                           "the same for every process that builds an engine (workers, beat, `rotate --apply`, "
                           "`reconcile`, a live page or `status`); readers of the published view need none. "
                           "Unset: derived from the fingerprint key."))
    idempotency_key_file: Path | None = Field(None, description="File holding that secret.")


class WebConfig(Section):
    host: str = Field("127.0.0.1", description="`rotator web`: address to bind; any but loopback needs a credential.")
    port: int = Field(9465, ge=1, le=65535, description="`rotator web`: port to listen on.")
    token_env: EnvName | None = Field(
        None, description="Variable holding the page's bearer token (also the Basic password).")
    token_file: Path | None = Field(None, description="File holding that token.")
    username: str = Field("rotator", min_length=1, description="Basic user name that goes with the token.")
    refresh_s: int = Field(30, ge=1, le=3600, description="Seconds between the page's refreshes.")
    cache_s: float = Field(
        10.0, ge=0, description="A snapshot of the fleet serves every request for this long (spares the key service).")
    read_timeout_s: float = Field(
        10.0, gt=0, le=300, description=("A request (head and body) must arrive whole within this long, or its "
                                          "connection is closed; the page and `rotator metrics` alike."))
    max_connections: int = Field(
        256, ge=8, le=65536, description=("Open connections the page (and `rotator metrics`) keeps at most, lowered "
                                          "to fit the file-descriptor limit; one more closes the one idle longest."))


class ViewConfig(Section):
    """What `rotator web`, `rotator metrics` and `rotator status` show, and where it comes from."""

    source: Literal["live", "published"] = Field(
        "live", description=("`live`: they scan the key service and read the sinks themselves (their config needs "
                             "the token and the sink credentials); `published`: they read the view the workers "
                             "publish to Redis, and need nothing but a Redis user that may read (docs/operations.md, "
                             "\"Read-only parts\")."))
    publish_every_s: int = Field(
        0, ge=0, description=("Beat: seconds between the workers' publications of the fleet view (a scan of the "
                              "key service and a read of each sink per key, like one page load); 0: not published."))

    @property
    def published(self) -> bool:
        return self.source == "published"


class SigningConfig(Section):
    """Who may put a task in the queue (docs/operations.md, "Signed task messages")."""

    mode: Literal["enforce", "transition", "off"] = Field(
        "enforce", description=("`enforce`: every published task message is signed and a worker runs only messages "
                                "signed by a trusted signer, fresh and not yet consumed; `transition` (a rolling "
                                "upgrade): also runs unsigned messages, counted and logged; `off`: signs and checks "
                                "nothing, so anyone who can write to the broker can order a reset (warned)."))
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9@._:-]{1,128}$",
        description="Signer name of this process (beat, a worker host, an operator); omitted: `user@host`.")
    private_key_file: Path | None = Field(
        None, description=("This process's Ed25519 private key (PEM, mode 0600; `rotator keys init` makes one); "
                           "omitted: `signing.key` in the private state directory, made on first use."))
    trusted: dict[str, list[str]] = Field(
        default_factory=dict, description=("Signers a worker accepts: name = [public keys] (`ed25519:…`; several "
                                           "per signer so keys roll over). This process's own key is always trusted."))
    relays: list[str] = Field(
        [], description=("Trusted signers whose messages may continue another signer's (beat, worker hosts): a "
                         "retry or the scan's fan-out keeps the actor it started with. This process is one."))
    max_age_s: int = Field(
        86_400, ge=60, description=("A message older than this (from its signing) is refused: longer than any "
                                    "queue wait the fleet allows (celery.visibility_timeout_s or "
                                    "consumer_timeout_s, retry countdowns, a backlog)."))

    @field_validator("trusted")
    @classmethod
    def _public_keys(cls, trusted: dict[str, list[str]]) -> dict[str, list[str]]:
        from rotator.signing import parse_public

        for name, keys in trusted.items():
            if not re.fullmatch(r"[A-Za-z0-9@._:-]{1,128}", name):
                raise ValueError(f"signer name {excerpt(name)} is not 1-128 of A-Z a-z 0-9 @ . _ : -")
            if not keys:
                raise ValueError(f"signer {name!r} has no public key")
            for key in keys:
                try:
                    parse_public(key)
                except ValueError as exc:
                    raise ValueError(f"signer {name!r}: {exc}") from None
        return trusted


class SinkConfig(BaseModel):
    """A sink entry: `kind` picks the sink; its other keys are checked by that sink's model."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AlertConfig(Section):
    url: str | None = Field(None, description=(
        "An Apprise URL, or `webhook+https://…` for a signed webhook, when it holds no credential; one that "
        "holds a password or a token goes in url_env or url_file."))
    url_env: EnvName | None = Field(None, description="Variable holding that URL (one with a credential).")
    url_file: Path | None = Field(None, description="File holding that URL (one with a credential).")
    events: list[str] | None = Field(None, description="Events to send; omitted: every event.")
    min_severity: Literal["info", "warning", "error", "critical"] = Field(
        "info", description="Send only events at least this severe."
    )
    secret_env: EnvName | None = Field(None, description="Signed webhook: the variable holding its secret.")
    secret_file: Path | None = Field(None, description="Signed webhook: the file holding its secret.")
    dedupe_window_s: int = Field(
        86_400, ge=0, description="The same event for the same key is not repeated within this."
    )

    @model_validator(mode="after")
    def _one_url(self) -> AlertConfig:
        given = [name for name in ("url", "url_env", "url_file") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of url, url_env or url_file (given: {', '.join(given) or 'none'})")
        return self

    def resolved_url(self, env: Mapping[str, str] | None = None) -> str:
        """The URL, read from its variable or file when it is kept there."""
        if self.url is not None:
            return self.url
        return read_credential(self.url_env, self.url_file, "alert URL") if env is None else \
            credential_value(self.url_env, self.url_file, env) or ""

    @field_validator("events")
    @classmethod
    def _known_events(cls, events: list[str] | None) -> list[str] | None:
        for name in events or []:
            if name not in EVENTS:
                raise ValueError(f"unknown event {name!r}; known: {', '.join(EVENTS)}")
        return events

    @property
    def severity(self) -> Severity:
        return Severity[self.min_severity.upper()]


class AuditConfig(Section):
    """The tamper-evident audit trail (docs/operations.md, "The audit trail")."""

    hmac_key_file: Path | None = Field(
        None, description=("File holding the key the audit chain's hashes are keyed with (HMAC-SHA256, at least 16 "
                           "bytes; `openssl rand -base64 32`): whoever can write Redis but not read this file cannot "
                           "recompute the chain after an edit. Every process that writes history (workers, the CLI) "
                           "and `rotator audit verify` need the same file; omitted: plain SHA-256."))
    origin: str | None = Field(
        None, pattern=r"^[!-~][ -~]{0,199}$",
        description="The checkpoint's origin line, the trail's name; omitted: `rotator/<state.namespace>`.")


_K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # a DNS-1123 label: a namespace's or a Deployment's name
K8S_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ReloadConfig(Section):
    """A hook run once every sink holds a key's new secret (any strategy): tells its consumers to
    read it again. Never the secret; a failing hook is the event `reload.failed`, not a failed
    rotation (the secret is stored)."""

    kind: Literal["http", "kubernetes"] = Field(description=(
        "http: a signed POST to an application's reload endpoint (signed as the webhooks are); kubernetes: a "
        "rollout restart of `deployments` through the Kubernetes API."))
    clients: list[str] | None = Field(None, description="Only for keys of these Client IDs; omitted: every one.")
    aliases: list[str] | None = Field(None, description=(
        "Only for keys of these base aliases (a lineage's, see `keyservice.alias_template`); omitted: every key."))
    url: str | None = Field(None, description="http: the reload endpoint, http(s)://…, without credentials.")
    secret_env: EnvName | None = Field(None, description="http: the variable holding the signing secret.")
    secret_file: Path | None = Field(None, description="http: the file holding the signing secret.")
    namespace: str | None = Field(None, pattern=_K8S_NAME, description="kubernetes: the Deployments' namespace.")
    deployments: list[Annotated[str, Field(pattern=_K8S_NAME)]] = Field(
        default_factory=list, description="kubernetes: the Deployments restarted (`kubectl rollout restart`).")
    api_url: str | None = Field(None, description=(
        "kubernetes: the API server; omitted: the in-cluster one (KUBERNETES_SERVICE_HOST and _PORT)."))
    token_file: Path = Field(K8S_SERVICE_ACCOUNT / "token", description=(
        "kubernetes: the service account token, read again at every call (projected tokens rotate)."))
    ca_file: Path | None = Field(K8S_SERVICE_ACCOUNT / "ca.crt", description=(
        "kubernetes: the API server's CA bundle (the in-cluster one by default)."))
    timeout_s: float = Field(10.0, gt=0, le=120, description="Each call's time-out.")
    tries: int = Field(3, ge=1, le=10, description="Calls before the hook counts as failed (1 s, then doubling).")

    @model_validator(mode="after")
    def _complete(self) -> ReloadConfig:
        if self.kind == "http":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError("an http reload hook needs url = \"http(s)://…\"")
            if (self.secret_env is None) == (self.secret_file is None):
                raise ValueError("an http reload hook is signed: give exactly one of secret_env or secret_file")
        elif not self.namespace or not self.deployments:
            raise ValueError("a kubernetes reload hook needs namespace and deployments")
        elif self.api_url is not None and not (self.api_url.startswith("https://") or re.match(
                r"http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)", self.api_url)):
            raise ValueError("api_url is https://… (the service account token goes with every call)")
        return self

    def signing_secret(self) -> str:
        return read_credential(self.secret_env, self.secret_file, "reload hook secret")


class Settings(BaseSettings):
    """The whole configuration. Environment variables override the file."""

    model_config = SettingsConfigDict(
        env_prefix="ROTATOR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    keyservice: KeyServiceConfig = KeyServiceConfig()
    policy: PolicyConfig = PolicyConfig()
    state: StateConfig = StateConfig()
    celery: CeleryConfig = CeleryConfig()
    engine: EngineConfig = EngineConfig()
    web: WebConfig = WebConfig()
    signing: SigningConfig = SigningConfig()
    view: ViewConfig = ViewConfig()
    audit: AuditConfig = AuditConfig()
    sinks: list[SinkConfig] = Field(default_factory=list)
    alerts: list[AlertConfig] = Field(default_factory=list)
    reload: list[ReloadConfig] = Field(default_factory=list)

    @property
    def reader_only(self) -> bool:
        """A reader's configuration (web, metrics, status of the view the workers publish): no
        `[[sinks]]`, no credential to act with."""
        return self.view.published and not self.sinks

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init arguments; environment variables win over it.
        return (env_settings, init_settings)


#: A query parameter (or, for json/form/xml, a header: `+Name`, `-name`, `:name`) whose name says
#: it grants something.
_CREDENTIAL_PARAM: Final = re.compile(r"token|key|secret|auth|pass|pwd|sig|bearer|session|cookie|credential",
                                      re.IGNORECASE)
