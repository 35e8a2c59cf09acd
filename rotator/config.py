"""One validated settings object from a TOML file plus `ROTATOR_<SECTION>__<KEY>` overrides.

Credentials never sit in the file: a `*_env` key names the environment variable that holds one, a
`*_file` key a file. Loading checks that each named credential is there, so a bad deployment stops
at start with the file, the key and the reason instead of at the first rotation.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from rotator.domain import Environment, Severity
from rotator.errors import ConfigError, ConfigProblem, PermanentError
from rotator.policy import Policy, RotationWindow
from rotator.reasons import validation_reason
from rotator.safety import (
    ID_RE,
    ID_RULE,
    excerpt,
    looks_like_secret,
    redact_url,
    shown_path,
    url_has_credentials,
    variable_named,
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
    seed: Path | None = Field(None, description="Seed file for the emulator kind.")
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
        from rotator.keyservice.registry import unknown  # the registry imports no configuration

        problem = unknown(kind)
        if problem is not None:
            raise ValueError(problem)
        return kind

    @field_validator("options")
    @classmethod
    def _options_for_a_plugin(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from rotator.keyservice.registry import BUILTIN

        kind = info.data.get("kind")
        if options and kind in BUILTIN:
            raise ValueError(f"the built-in kind {kind!r} takes none (they are a plugin's settings)")
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
    reconcile_every_s: int = Field(86_400, ge=60, description="Beat: seconds between reconciles.")
    warn_every_s: int = Field(86_400, ge=60, description="Beat: seconds between due-soon sweeps.")
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
    sinks: list[SinkConfig] = Field(default_factory=list)
    alerts: list[AlertConfig] = Field(default_factory=list)

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


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--config FILE`, else `$ROTATOR_CONFIG`, else `./rotator.toml`."""
    return Path(explicit or os.environ.get("ROTATOR_CONFIG") or DEFAULT_PATH)


@cache
def process_settings() -> Settings:
    """This process's configuration, read once: a worker's tasks, its gate and its heartbeat share it."""
    return load_settings()


def load_settings(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, validate and check a configuration; raise `ConfigError` listing every problem."""
    file = config_path(path)
    env = os.environ if environ is None else environ
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(str(file), "-", _not_found(path, file))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(file), "-", f"cannot read: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(str(file), "-", f"not valid TOML: {exc}")]) from None
    return settings_from_mapping(data, source=str(file), environ=env)


def settings_from_mapping(
    data: Mapping[str, Any], *, source: str = "<settings>", environ: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        overrides = _env_overrides(os.environ)  # what pydantic-settings read
        raise ConfigError([ConfigProblem(_origin(e["loc"], source, overrides), _dotted(e["loc"]),
                                         _reason(e, _dotted(e["loc"]))) for e in exc.errors()]
                          + _raw_sink_problems(data, source, env)) from None
    except SettingsError as exc:  # an override that is not even JSON for a list or a table
        field = re.search(r'field "([^"]+)"', str(exc))
        section = field.group(1) if field else ""
        names = sorted(n for path, n in _env_overrides(os.environ).items() if path[0] == section) or ["environment"]
        reason = "not valid JSON for a list or a table (the value is not shown)"
        raise ConfigError([ConfigProblem(", ".join(names), section or "-", reason)]) from None
    problems = list(_stray_overrides(os.environ)) + list(_semantic_problems(settings, source, env))
    if problems:
        raise ConfigError(problems)
    return settings


def _raw_sink_problems(data: Mapping[str, Any], source: str, env: Mapping[str, str]) -> list[ConfigProblem]:
    """The sinks' own problems while another part of the file is invalid: every problem in one run."""
    from rotator.sinks import registry

    if any(path and path[0] == "sinks" for path in _env_overrides(os.environ)):
        return []  # the environment replaces the file's sinks: those are checked once the rest is valid
    sinks = data.get("sinks")
    problems = []
    for index, raw in enumerate(sinks if isinstance(sinks, list) else []):
        if isinstance(raw, Mapping) and isinstance(raw.get("kind"), str):
            options = {k: v for k, v in raw.items() if k != "kind"}
            problems += [ConfigProblem(source, f"sinks[{index}].{key}", reason)
                         for key, reason in registry.check(raw["kind"], options, env)]
    return problems


def _semantic_problems(s: Settings, source: str, env: Mapping[str, str]) -> list[ConfigProblem]:
    """What a field-by-field check cannot see: credentials present, sinks valid for their kind."""
    from rotator.sinks import registry  # the registry imports sink modules only when asked

    problems: list[ConfigProblem] = []

    def need(key: str, env_name: str | None, file: Path | None, what: str) -> None:
        if file is not None:
            wrong = credential_file_problem(file)
            if wrong is not None:
                problems.append(ConfigProblem(source, key.replace("_env", "_file"), f"{what}: {wrong}"))
        elif env_name is None:
            problems.append(ConfigProblem(source, key, f"{what}: name an environment variable or a file"))
        elif not env.get(env_name):
            problems.append(ConfigProblem(source, key, f"{what}: {variable_named(env_name)} is not set"))

    for section, config in (("state", s.state), ("celery", s.celery)):
        if config.password_env is not None or config.password_file is not None:
            need(f"{section}.password_env", config.password_env, config.password_file, "password")
    if s.reader_only:
        # A reader (web, metrics, status) of the view the workers publish: Redis is all it needs,
        # and it holds no token, no sink credential, no fingerprint or signing key.
        return problems
    if s.keyservice.kind == "http":
        need("keyservice.token_env", s.keyservice.token_env, s.keyservice.token_file, "management token")
    elif s.keyservice.seed is not None and file_problem(s.keyservice.seed) is not None:
        problems.append(ConfigProblem(source, "keyservice.seed", f"seed file: {file_problem(s.keyservice.seed)}"))
    need("engine.fingerprint_key_env", s.engine.fingerprint_key_env, s.engine.fingerprint_key_file, "fingerprint key")
    if s.engine.idempotency_key_env is not None or s.engine.idempotency_key_file is not None:
        need("engine.idempotency_key_env", s.engine.idempotency_key_env, s.engine.idempotency_key_file,
             "Idempotency-Key secret")
    for key, env_name, file, what in (
            ("engine.fingerprint_key", s.engine.fingerprint_key_env, s.engine.fingerprint_key_file, "fingerprint key"),
            ("engine.idempotency_key", s.engine.idempotency_key_env, s.engine.idempotency_key_file,
             "Idempotency-Key secret")):
        value = credential_value(env_name, file, env)
        if value is not None and len(value.encode()) < MIN_KEY_BYTES:  # its length is never shown
            problems.append(ConfigProblem(source, f"{key}_{'file' if file is not None else 'env'}", (
                f"{what}: shorter than {MIN_KEY_BYTES} bytes; `rotator keys init DIR` makes one (32 random "
                "bytes, base64), or `openssl rand -base64 32`")))
    if not s.sinks:
        problems.append(ConfigProblem(source, "sinks", "at least one [[sinks]] entry is needed"))
    problems += _broker_problems(s, source)
    problems += _signing_problems(s, source)
    if s.celery.queue.startswith(f"{s.state.namespace}:"):
        problems.append(ConfigProblem(source, "celery.queue", (
            f"starts with state.namespace and ':' ({s.state.namespace}:), the key pattern of the read-only Redis "
            "user: its task messages would be readable by the status page's user; pick another name")))
    for index, sink in enumerate(s.sinks):
        for key, reason in registry.check(sink.kind, sink.options, env):
            problems.append(ConfigProblem(source, f"sinks[{index}].{key}", reason))
    if s.policy.strategy == "overlap" or s.keyservice.kind == "aws-iam":
        why = "aws-iam keys rotate by the overlap strategy" if s.keyservice.kind == "aws-iam" else "strategy = overlap"
        for index, sink in enumerate(s.sinks):
            for key, template in registry.key_id_templates(sink.kind, sink.options):
                suggestion = template.replace("{key_id}", "{alias}")
                problems.append(ConfigProblem(source, f"sinks[{index}].{key}", (
                    f"{template!r} names the key id, which changes with every rotation ({why}): consumers "
                    f"would not find the successor's secret; use {{alias}}, e.g. {suggestion!r}")))
    for index, alert in enumerate(s.alerts):
        problems += _alert_problems(f"alerts[{index}]", alert, source, env, need)
    return problems


def _alert_problems(key: str, alert: AlertConfig, source: str, env: Mapping[str, str],
                    need: Callable[[str, str | None, Path | None, str], None]) -> list[ConfigProblem]:
    """An alert's URL (in the configuration, or read from its url_env or url_file) and its webhook
    secret. A URL with a credential in the configuration itself is refused: it shows wherever the
    configuration does. `need` reports a missing variable or unusable file, as for every credential."""
    problems: list[ConfigProblem] = []
    if alert.url is None:
        need(f"{key}.url_env", alert.url_env, alert.url_file, "alert URL")
    url = alert.resolved_url(env)
    if alert.secret_file is not None:
        need(f"{key}.secret_env", None, alert.secret_file, "webhook secret")
    elif alert.secret_env and not env.get(alert.secret_env):
        problems.append(ConfigProblem(source, f"{key}.secret_env", f"{variable_named(alert.secret_env)} is not set"))
    form = _webhook_secret_problem(alert, env) if url.startswith("webhook+") else None
    if form is not None:
        problems.append(ConfigProblem(source, f"{key}.secret_env", f"webhook secret: {form}"))
    if not url:
        return problems
    # Whatever is wrong with a URL read from a variable or a file is said of that key.
    where = f"{key}.url" if alert.url is not None else f"{key}.url_env" if alert.url_env else f"{key}.url_file"
    scheme = url.partition("://")[0] if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}://.*", url, re.S) else ""
    if url.startswith("webhook+"):
        if not alert.secret_env and alert.secret_file is None:
            problems.append(ConfigProblem(source, f"{key}.secret_env",
                                          "a signed webhook needs secret_env or secret_file"))
        if not url.removeprefix("webhook+").startswith(("http://", "https://")):
            problems.append(ConfigProblem(source, where, "a signed webhook is webhook+http(s)://…"))
        inline = _holds_credential(url.removeprefix("webhook+"))
    else:
        described = _apprise_privacy(url) if scheme else None
        if described is None:  # the value itself is never quoted: it may be a token pasted whole
            problems.append(ConfigProblem(source, where, (
                f"Apprise does not understand a {scheme!r}:// URL (or its form)" if scheme else
                "not a URL (scheme://…); the value is not shown")))
        inline = described is not None and (described[0] != described[1] or _holds_credential(url))
    if inline and alert.url is not None:  # the credential is not quoted
        problems.append(ConfigProblem(source, f"{key}.url", (
            "holds a password or a token inline, where the file shows it to whoever reads it: put the URL in a "
            "file only rotator reads (url_file) or in a variable (url_env)")))
    return problems


def _webhook_secret_problem(alert: AlertConfig, env: Mapping[str, str]) -> str | None:
    """What is wrong with the form of a webhook secret that is there (a `whsec_` one that is not
    base64 of 16 bytes or more); never its value."""
    from rotator.alerts.webhook import signing_key

    try:
        if alert.secret_file is not None:
            value = (alert.secret_file.read_text(encoding="utf-8").strip()
                     if file_problem(alert.secret_file) is None else "")
        else:
            value = env.get(alert.secret_env or "", "")
        if value:
            signing_key(value)
    except PermanentError as exc:
        return str(exc)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read it ({type(exc).__name__})"
    return None


def _broker_problems(s: Settings, source: str) -> list[ConfigProblem]:
    """The broker's redelivery deadline against the longest rotation: Redis's `visibility_timeout`, or
    RabbitMQ's `consumer_timeout` (tasks are acknowledged late, so either redelivers a task still
    running); and RabbitMQ-only settings on another broker."""
    c = s.celery
    longest = longest_rotation_s(s)
    what = (f"the longest rotation (about {longest:.0f}s: recovering an earlier attempt and a fresh one, each "
            "engine.sink_retry_s plus the key-service calls with their retries)")
    problems: list[ConfigProblem] = []
    if c.broker_is_amqp():
        if c.consumer_timeout_s and c.consumer_timeout_s <= longest:
            problems.append(ConfigProblem(source, "celery.consumer_timeout_s", (
                f"must be longer than {what}: RabbitMQ closes the channel of a worker that holds a task "
                "unacknowledged past its consumer_timeout and delivers the task again while it still runs; raise "
                "consumer_timeout on the broker (rabbitmq.conf or a consumer-timeout policy) and state it here")))
        if (c.result_backend is not None and c.result_backend.scheme in REDIS_SCHEMES
                and (c.password_env is not None or c.password_file is not None)):
            problems.append(ConfigProblem(source, "celery.result_backend", (
                "with a RabbitMQ broker, celery.password_env/password_file is RabbitMQ's password and would be "
                "sent to this Redis too; rotator reads no task results: leave result_backend out")))
        return problems
    if c.quorum_queues:
        problems.append(ConfigProblem(source, "celery.quorum_queues", (
            f"quorum queues are a RabbitMQ feature; the broker is {c.broker_url.scheme}://, not amqp://")))
    if c.visibility_timeout_s <= longest:
        problems.append(ConfigProblem(source, "celery.visibility_timeout_s", (
            f"must be longer than {what}, or a running rotation is delivered twice")))
    return problems


#: The longest back-off of an alert's retry; a rotation's or a recovery's may be longer (their leases).
LONGEST_RETRY_WAIT_S = 300


def longest_retry_wait_s(s: Settings) -> float:
    """The longest countdown a task's own retry waits (at the broker, on quorum queues) before it is
    delivered with its signature: an alert's back-off, a busy rotation's, an in-doubt recovery's."""
    return max(LONGEST_RETRY_WAIT_S, s.state.lock_ttl_s / 3, s.engine.in_doubt_horizon_s / 2)


def _signing_problems(s: Settings, source: str) -> list[ConfigProblem]:
    """A key file named but missing, a relay nobody trusts, and a message lifetime shorter than a
    message can legitimately wait (it would be refused as expired)."""
    g = s.signing
    problems: list[ConfigProblem] = []
    if g.mode == "off":
        return problems
    if g.private_key_file is not None:
        wrong = file_problem(g.private_key_file)
        if wrong is None:  # there: what every signing process would refuse (its form, who may read it)
            from rotator.signing import KeyFileError, read_private_key

            try:
                read_private_key(g.private_key_file)
            except KeyFileError as exc:
                wrong = str(exc)
        elif "does not exist" in wrong:
            wrong += "; `rotator keys init DIR` makes signing keys"
        if wrong is not None:
            problems.append(ConfigProblem(source, "signing.private_key_file", wrong))
    for name in g.relays:
        if name not in g.trusted and name != g.name:
            problems.append(ConfigProblem(source, "signing.relays", (
                f"{excerpt(name)} is not in signing.trusted: a relay must be a trusted signer")))
    c = s.celery
    wait, what = ((c.consumer_timeout_s, "celery.consumer_timeout_s") if c.broker_is_amqp()
                  else (c.visibility_timeout_s, "celery.visibility_timeout_s"))
    retry = longest_retry_wait_s(s)
    if g.max_age_s <= wait + retry:
        problems.append(ConfigProblem(source, "signing.max_age_s", (
            f"must be longer than {what} ({wait}s, after which an unacknowledged message is delivered again with its "
            f"first signature) plus the longest retry wait ({retry:g}s), or such a message is refused as expired")))
    return problems


def config_warnings(s: Settings, source: str) -> list[ConfigProblem]:
    """What `check-config` warns about without refusing the file: credentials inside URLs and `*_env`
    values that look like a pasted secret rather than a variable name. No warning quotes the value."""
    warnings: list[ConfigProblem] = []
    urls: list[tuple[str, object]] = [
        ("keyservice.url", s.keyservice.url), ("state.redis_url", s.state.redis_url),
        ("celery.broker_url", s.celery.broker_url), ("celery.result_backend", s.celery.result_backend)]
    names: list[tuple[str, object]] = [("keyservice.token_env", s.keyservice.token_env),
                                       ("engine.fingerprint_key_env", s.engine.fingerprint_key_env),
                                       ("engine.idempotency_key_env", s.engine.idempotency_key_env),
                                       ("state.password_env", s.state.password_env),
                                       ("celery.password_env", s.celery.password_env),
                                       ("web.token_env", s.web.token_env)]
    for index, sink in enumerate(s.sinks):
        for name, value in sink.options.items():
            if name.endswith("url"):
                urls.append((f"sinks[{index}].{name}", value))
            elif name.endswith("_env"):
                names.append((f"sinks[{index}].{name}", value))
    for index, alert in enumerate(s.alerts):
        names += [(f"alerts[{index}].secret_env", alert.secret_env), (f"alerts[{index}].url_env", alert.url_env)]
    # A user name alone (`amqp://rotator@host`, `redis://rotator@host`) is no credential where the
    # password comes from that section's password_env/password_file: that is the intended form.
    user_only_ok = {"state.redis_url": s.state.password_env or s.state.password_file,
                    "celery.broker_url": s.celery.password_env or s.celery.password_file,
                    "celery.result_backend": s.celery.password_env or s.celery.password_file}
    for key, url in urls:
        if url is not None and user_only_ok.get(key) and urlsplit(str(url)).password is None:
            continue
        if url is not None and url_has_credentials(url):
            warnings.append(ConfigProblem(source, key, (
                f"the URL carries credentials ({redact_url(url)}): they show in process listings, shell "
                "history and anything that prints the URL; prefer a *_env or *_file key (state and celery "
                "have password_env/password_file), and keep this file readable by its owner only")))
    if s.signing.mode == "off":
        warnings.append(ConfigProblem(source, "signing.mode", (
            "off: task messages are neither signed nor checked, so anyone who can write to the broker can order a "
            "reset of any key, with any actor in the audit trail; use `enforce` (`rotator keys init` makes the keys)")))
    elif s.signing.mode == "transition":
        warnings.append(ConfigProblem(source, "signing.mode", (
            "transition: unsigned task messages still run (each logged and counted in "
            "rotator_messages_unsigned_accepted_total); switch to `enforce` once every process of "
            "the fleet signs and that count stays flat")))
    if not s.reader_only and s.engine.idempotency_key_env is None and s.engine.idempotency_key_file is None:
        warnings.append(ConfigProblem(source, "engine.idempotency_key_file", (
            "not set: the Idempotency-Keys, each of which reads a live secret from the key service's stored answer, "
            "are derived from the fingerprint key, which also proves a guessed secret; give them a secret of their "
            "own (`rotator keys init` makes idempotency.key), the same for every process that builds an engine. "
            "Set it only while no attempt is in doubt (`rotator status` shows none in flight)")))
    warnings.extend(_one_underscore_overrides(os.environ))
    for key, env_name in names:
        if isinstance(env_name, str) and looks_like_secret(env_name):
            warnings.append(ConfigProblem(source, key, (
                "does not look like an environment variable name (UPPER_CASE_WITH_UNDERSCORES): was a "
                "secret pasted here? The value is not shown; name the variable that holds the secret")))
    return warnings


def _apprise_privacy(url: str) -> tuple[str, str] | None:
    """Apprise's own rendering of the URL with its secrets masked and without (they differ when the
    URL holds a password or a token); None when Apprise does not understand it."""
    from rotator.alerts.apprise_notifier import plugin_for  # only configs with alerts pay for Apprise

    plugin = plugin_for(url)
    if plugin is None:
        return None
    return str(plugin.url(privacy=True)), str(plugin.url(privacy=False))


#: A query parameter (or, for json/form/xml, a header: `+Name`, `-name`, `:name`) whose name says
#: it grants something.
_CREDENTIAL_PARAM: Final = re.compile(r"token|key|secret|auth|pass|pwd|sig|bearer|session|cookie|credential",
                                      re.IGNORECASE)


def _holds_credential(url: str) -> bool:
    """A password in the user part, or a query parameter or header whose name says it is a credential.
    (A token that is a path segment, as in some webhook URLs, cannot be told: the docs say to keep
    every URL that grants something in url_file.)"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    if parts.password or (parts.username and parts.scheme.startswith("http")):
        return True
    return any(_CREDENTIAL_PARAM.search(name.lstrip("+-:")) for name, _ in parse_qsl(parts.query))


def longest_rotation_s(s: Settings) -> float:
    """An upper bound of one `rotate_key` task: settling an earlier attempt (read, replay, store with
    the sink bound, verify) and then a fresh one (read, reset, store, verify), every key-service call
    with all its retries."""
    ks = s.keyservice
    call = min(ks.max_attempts * (ks.timeout_s + ks.retry_max_wait_s), ks.call_deadline_s + ks.timeout_s)
    recovery = 3 * call + s.engine.sink_retry_s
    fresh = 3 * call + s.engine.sink_retry_s
    return recovery + fresh


def url_with_password(url: str, env_name: str | None, file: Path | None) -> str:
    """A redis:// or amqp:// URL with the password named by `env_name`/`file` put in (percent-encoded);
    the URL unchanged when neither is given."""
    if env_name is None and file is None:
        return url
    password = quote(read_credential(env_name, file, "password"), safe="")
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{password}@{host}"))


#: The shortest HMAC key accepted (fingerprints, Idempotency-Keys): a guessable one protects nothing.
MIN_KEY_BYTES = 16


def file_problem(file: Path) -> str | None:
    """Why `file` is not a regular file this process can reach, never raising (a directory on the
    way closed to this user, or a name too long, is a reason, not a traceback); None when it is one."""
    try:
        mode = file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return f"{shown_path(file)} does not exist"
    except PermissionError:
        return f"{shown_path(file)} cannot be reached by this user (a directory on its path is closed to it)"
    except OSError as exc:
        return f"{shown_path(file)} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None if stat.S_ISREG(mode) else f"{shown_path(file)} is not a regular file"


def credential_file_problem(file: Path) -> str | None:
    """Why a credential file cannot be used as it is (never quoting its content); None when it can."""
    wrong = file_problem(file)
    if wrong is not None:
        return wrong
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"{shown_path(file)} is not UTF-8 text"
    except OSError as exc:
        return f"{shown_path(file)} cannot be read ({type(exc).__name__})"
    return f"{shown_path(file)} is empty" if not text.strip() else None


def credential_value(env_name: str | None, file: Path | None, env: Mapping[str, str]) -> str | None:
    """The credential a `*_env`/`*_file` pair names, as the process will read it; None when it is
    not there (that problem is reported on its own)."""
    try:
        if file is not None:
            return file.read_text(encoding="utf-8").strip() if file_problem(file) is None else None
    except (OSError, UnicodeDecodeError):
        return None
    return env.get(env_name or "") or None


def read_credential(env_name: str | None, file: Path | None, what: str) -> str:
    """The value of a credential named by a `*_env` or `*_file` key, stripped of a newline."""
    if file is not None:
        wrong = credential_file_problem(file)
        if wrong is not None:
            raise PermanentError(f"{what}: {wrong}")
        value = file.read_text(encoding="utf-8").strip()
    elif env_name is not None:
        value = os.environ.get(env_name, "")
    else:
        value = ""
    if not value:
        source = str(file) if file is not None else f"${env_name}"
        raise PermanentError(f"{what} is empty or missing ({source})")
    return value


def _not_found(given: str | os.PathLike[str] | None, file: Path) -> str:
    """Which path was tried, where it came from, and how to choose another."""
    if given:
        origin = "given with --config"
    elif os.environ.get("ROTATOR_CONFIG"):
        origin = "named by ROTATOR_CONFIG"
    else:
        origin = f"the default, ./{DEFAULT_PATH} in {excerpt(str(Path.cwd()), 200)}"
    return (f"file not found: tried {excerpt(str(file), 200)} ({origin}); choose the file with --config FILE "
            "or ROTATOR_CONFIG=FILE (`rotator config-reference` lists every key)")


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """`ROTATOR_<SECTION>__<KEY>` variables by the dotted path they override (lower case)."""
    found = {}
    for name in environ:
        if name.upper().startswith("ROTATOR_"):
            path = tuple(name[len("ROTATOR_"):].lower().split("__"))
            if path[0] in Settings.model_fields:
                found[path] = name
    return found


def _sections() -> dict[str, Any]:
    """Each section's name and model."""
    return {name: _model_in(field.annotation) for name, field in Settings.model_fields.items()}


def _stray_overrides(environ: Mapping[str, str]) -> Iterator[ConfigProblem]:
    """`ROTATOR_<SECTION>__<KEY>` variables whose section does not exist: silently ignored, they
    would leave a setting at its default while the operator believes it set."""
    for name in environ:
        if not name.upper().startswith("ROTATOR_"):
            continue
        head, sep, _ = name[len("ROTATOR_"):].lower().partition("__")
        if sep and head not in _sections():
            close = difflib.get_close_matches(head, list(_sections()), n=1)
            hint = f"; did you mean ROTATOR_{close[0].upper()}__…?" if close else ""
            yield ConfigProblem(f"environment variable {name}", head, f"no such section{hint}")


def _one_underscore_overrides(environ: Mapping[str, str]) -> Iterator[ConfigProblem]:
    """`ROTATOR_POLICY_MODE` where `ROTATOR_POLICY__MODE` was meant. A warning, not an error: a
    Kubernetes Service named `rotator-web` puts `ROTATOR_WEB_PORT=tcp://…` into every pod."""
    for name, value in environ.items():
        rest = name[len("ROTATOR_"):].lower() if name.upper().startswith("ROTATOR_") else ""
        if "__" in rest or "://" in value:
            continue
        for section, model in _sections().items():
            key = rest.removeprefix(section + "_")
            if key != rest and model is not None and key in model.model_fields:
                yield ConfigProblem(f"environment variable {name}", f"{section}.{key}",
                                    f"overrides nothing; did you mean ROTATOR_{section.upper()}__{key.upper()}?")


def _origin(loc: tuple[int | str, ...], source: str, overrides: dict[tuple[str, ...], str]) -> str:
    """The environment variable that set the value at `loc`, else the file."""
    parts = tuple(str(p).lower() for p in loc)
    for length in range(len(parts), 0, -1):
        if parts[:length] in overrides:
            return f"environment variable {overrides[parts[:length]]}"
    below = sorted(name for path, name in overrides.items() if path[:len(parts)] == parts)
    if below:  # e.g. ROTATOR_SINKS__0__DIR makes `sinks` a table, not a list
        return "environment variable " + ", ".join(below)
    return source


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the section holding `loc` accepts (its model's fields), for a "did you mean"."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `X`, `list[X]` or `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "-"


def _reason(error: Any, key: str = "") -> str:
    """A validation error's reason, an unknown key's with the keys known at its place."""
    return validation_reason(error, key, _known_keys)
