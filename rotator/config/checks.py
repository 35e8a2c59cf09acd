"""Checks across keys and sections, and of what lies outside the file (credentials there, their
length and form, the broker and the signing set-up): every problem at load, with its key."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, get_args
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel

from rotator.config.credentials import (
    MIN_KEY_BYTES,
    credential_file_problem,
    credential_value,
    file_problem,
)
from rotator.config.sections import (
    _CREDENTIAL_PARAM,
    REDIS_SCHEMES,
    AlertConfig,
    Settings,
)
from rotator.errors import ConfigProblem, PermanentError
from rotator.safety import (
    excerpt,
    looks_like_secret,
    redact_url,
    url_has_credentials,
    variable_named,
)


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
    outbox = s.celery.alert_outbox_dir
    if outbox is not None and outbox.exists():
        from rotator.safety import private_dir_problem

        wrong = private_dir_problem(outbox) if outbox.is_dir() else "is not a directory"
        if wrong is not None:
            problems.append(ConfigProblem(source, "celery.alert_outbox_dir", (
                f"{outbox} {wrong}; a worker would send its critical alerts through the broker instead")))
    if s.audit.hmac_key_file is not None:
        wrong = credential_file_problem(s.audit.hmac_key_file)
        if wrong is None and len(s.audit.hmac_key_file.read_bytes().strip()) < MIN_KEY_BYTES:
            wrong = f"shorter than {MIN_KEY_BYTES} bytes; `openssl rand -base64 32` makes one"
        if wrong is not None:
            problems.append(ConfigProblem(source, "audit.hmac_key_file", f"audit HMAC key: {wrong}"))
    if s.reader_only:
        # A reader (web, metrics, status) of the view the workers publish: Redis is all it needs,
        # and it holds no token, no sink credential, no fingerprint or signing key.
        return problems
    if s.keyservice.kind == "http":
        need("keyservice.token_env", s.keyservice.token_env, s.keyservice.token_file, "management token")
    elif s.keyservice.seed is not None and file_problem(s.keyservice.seed) is not None:
        problems.append(ConfigProblem(source, "keyservice.seed", f"seed file: {file_problem(s.keyservice.seed)}"))
    for name, value in s.keyservice.options.items():  # a plugin's credentials: there, like every other
        if name.endswith("_env") and isinstance(value, str):
            need(f"keyservice.options.{name}", value, None, "plugin credential")
        elif name.endswith("_file") and isinstance(value, str):
            need(f"keyservice.options.{name.removesuffix('_file')}_env", None, Path(value), "plugin credential")
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
        problems += _overlap_place_problems(s, source)
    for index, alert in enumerate(s.alerts):
        problems += _alert_problems(f"alerts[{index}]", alert, source, env, need)
    for index, hook in enumerate(s.reload):
        if hook.kind == "http":
            need(f"reload[{index}].secret_env", hook.secret_env, hook.secret_file, "reload hook secret")
            if _holds_credential(str(hook.url)):
                problems.append(ConfigProblem(source, f"reload[{index}].url", (
                    "holds a credential; the call is signed with secret_env or secret_file, so the URL needs none")))
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
    with all its retries, and after each store the reload hooks, every try timing out."""
    ks = s.keyservice
    call = min(ks.max_attempts * (ks.timeout_s + ks.retry_max_wait_s), ks.call_deadline_s + ks.timeout_s)
    hooks = sum(float(hook.tries * (len(hook.deployments) if hook.kind == "kubernetes" else 1) * hook.timeout_s
                      + 2 ** (hook.tries - 1) - 1) for hook in s.reload)  # the back-off between tries: 1 s, doubling
    recovery = 3 * call + s.engine.sink_retry_s + hooks
    fresh = 3 * call + s.engine.sink_retry_s + hooks
    return recovery + fresh


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


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `X`, `list[X]` or `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _overlap_place_problems(s: Settings, source: str) -> list[ConfigProblem]:
    """The overlap strategy's new key must be found where the old one was: a sink path may not name
    the key id, nor, in the alias-template mode (`keyservice.successors = false`), the alias."""
    from rotator.sinks import registry  # the registry imports sink modules only when asked

    why = "aws-iam keys rotate by the overlap strategy" if s.keyservice.kind == "aws-iam" else "strategy = overlap"
    by_alias = not s.keyservice.successors and s.keyservice.kind in ("http", "emulator")
    moving = ("key_id", "alias") if by_alias else ("key_id",)
    problems = []
    for index, sink in enumerate(s.sinks):
        for key, template in registry.key_id_templates(sink.kind, sink.options, moving):
            if by_alias:
                suggestion = template.replace("{key_id}", "{base_alias}").replace("{alias}", "{base_alias}")
                what = (f"names the key id or alias, which change with every rotation ({why}, alias template "
                        f"{s.keyservice.alias_template!r})")
            else:
                suggestion = template.replace("{key_id}", "{alias}")
                what = f"names the key id, which changes with every rotation ({why})"
            problems.append(ConfigProblem(source, f"sinks[{index}].{key}", (
                f"{template!r} {what}: consumers would not find the new key's secret; use "
                f"{{{'base_alias' if by_alias else 'alias'}}}, e.g. {suggestion!r}")))
    return problems
