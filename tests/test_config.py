"""Configuration: one valid file, many broken ones, each with its own message; env overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.config import config_warnings, load_settings, settings_from_mapping
from rotator.errors import ConfigError

VALID = """
[keyservice]
kind = "http"
url = "http://127.0.0.1:8400"
token_env = "ROTATOR_KEYSERVICE_TOKEN"

[policy]
max_age_days = 90
warn_before_days = 14
mode = "enforce"
exclude = ["acme-prod/key_legacy", "acme-test/*"]
window = "Mon-Fri 09:00-17:00 Europe/Paris"

[state]
redis_url = "redis://127.0.0.1:6379/0"

[[sinks]]
kind = "file"
dir = "./secrets"
key_env = "ROTATOR_FILE_KEY"

[[alerts]]
url = "json://127.0.0.1:9000/hook"
events = ["rotation.failed"]
"""

runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(text)
    return path


@pytest.fixture
def file_key(env: pytest.MonkeyPatch) -> None:
    env.setenv("ROTATOR_FILE_KEY", "x" * 43 + "=")
    env.setenv("ROTATOR_IDEMPOTENCY_KEY", "i" * 32)


def test_valid_file_loads(tmp_path: Path, file_key: None) -> None:
    """The example file validates and `check-config` exits 0."""
    settings = load_settings(write(tmp_path, VALID))
    assert settings.policy.mode == "enforce"
    assert settings.sinks[0].kind == "file"
    result = runner.invoke(app, ["check-config", "--config", str(tmp_path / "rotator.toml")])
    assert result.exit_code == 0, result.output


BROKEN = [
    ("unknown section", VALID + "\n[polcy]\nmax_age_days = 3\n", "polcy", "unknown key"),
    ("unknown key", VALID.replace("max_age_days = 90", "max_age = 90"), "policy.max_age", "unknown key"),
    ("wrong type", VALID.replace("max_age_days = 90", 'max_age_days = "ninety"'), "policy.max_age_days", "integer"),
    ("warn not below max", VALID.replace("max_age_days = 90", "max_age_days = 10"), "policy", "warn_before_days (14) must be below max_age_days (10)"),
    ("negative age", VALID.replace("max_age_days = 90", "max_age_days = -1"), "policy.max_age_days", "greater than 0"),
    ("token env unset", VALID.replace('token_env = "ROTATOR_KEYSERVICE_TOKEN"', 'token_env = "NO_SUCH_TOKEN_VAR"'), "keyservice.token_env", "NO_SUCH_TOKEN_VAR is not set"),
    ("unknown sink kind", VALID.replace('kind = "file"', 'kind = "vautl"'), "sinks[0].kind", "did you mean 'vault'"),
    ("bad url", VALID.replace('url = "http://127.0.0.1:8400"', 'url = "not a url"'), "keyservice.url", "URL"),
    ("bad mode", VALID.replace('mode = "enforce"', 'mode = "yolo"'), "policy.mode", "'audit' or 'enforce'"),
    ("bad exclude", VALID.replace('"acme-test/*"', '"acme-test"'), "policy.exclude", "not 'client_id/key_id'"),
    ("bad environment", VALID.replace("[policy]", '[policy]\nenvironments = ["STAGING"]'), "policy.environments[0]", "PRODUCTION"),
    ("bad window", VALID.replace("Mon-Fri 09:00", "Mon-Fri 9"), "policy.window", "not of the form"),
    ("no sinks", VALID.split("[[sinks]]")[0], "sinks", "at least one"),
    ("not toml", VALID + "\n[policy\n", "-", "not valid TOML"),
    ("sink unknown key", VALID.replace('dir = "./secrets"', 'dri = "./secrets"'), "sinks[0].dri", "unknown key"),
    ("sink key env unset", VALID.replace('key_env = "ROTATOR_FILE_KEY"', 'key_env = "NO_FILE_KEY"'), "sinks[0].key_env", "NO_FILE_KEY is not set"),
    ("sink bad template", VALID.replace('dir = "./secrets"', 'dir = "./secrets"\npath = "{tenant}/{key_id}"'), "sinks[0].path", "may only use"),
    ("unknown event", VALID.replace('events = ["rotation.failed"]', 'events = ["rotation.exploded"]'), "alerts[0].events", "unknown event 'rotation.exploded'"),
    ("redis scheme", VALID.replace('redis_url = "redis://127.0.0.1:6379/0"', 'redis_url = "http://127.0.0.1:6379/0"'), "state.redis_url", "scheme 'http'"),
    ("visibility too short", VALID.replace("[state]", "[celery]\nvisibility_timeout_s = 300\n[state]"), "celery.visibility_timeout_s", "longer than the longest rotation"),
    ("consumer timeout too short", VALID.replace("[state]", '[celery]\nbroker_url = "amqp://rotator@127.0.0.1:5672/rotator"\nconsumer_timeout_s = 900\n[state]'), "celery.consumer_timeout_s", "longer than the longest rotation"),
    ("quorum on redis", VALID.replace("[state]", "[celery]\nquorum_queues = true\n[state]"), "celery.quorum_queues", "RabbitMQ feature; the broker is redis://"),
    ("rabbit password to redis", VALID.replace("[state]", '[celery]\nbroker_url = "amqps://rotator@mq:5671/rotator"\nresult_backend = "redis://127.0.0.1:6379/2"\npassword_env = "ROTATOR_FILE_KEY"\n[state]'), "celery.result_backend", "RabbitMQ's password and would be sent to this Redis"),
    ("bad queue name", VALID.replace("[state]", '[celery]\nqueue = "rotator jobs"\n[state]'), "celery.queue", "pattern"),
    ("bad alert url", VALID.replace('url = "json://127.0.0.1:9000/hook"', 'url = "slak://x/y"'), "alerts[0].url", "Apprise does not understand a 'slak'"),
    ("webhook not http", VALID.replace('url = "json://127.0.0.1:9000/hook"', 'url = "webhook+ftp://x"\nsecret_env = "ROTATOR_FILE_KEY"'), "alerts[0].url", "webhook+http(s)"),
    ("inline credential", VALID.replace('token_env = "ROTATOR_KEYSERVICE_TOKEN"', 'token = "s3cr3t"'), "keyservice.token", "unknown key"),
]


@pytest.mark.parametrize(("name", "text", "key", "reason"), BROKEN, ids=[b[0] for b in BROKEN])
def test_check_config_reports_file_key_and_reason(
    tmp_path: Path, file_key: None, name: str, text: str, key: str, reason: str
) -> None:
    """`check-config` exits 2 and names the file, the key and the reason."""
    path = write(tmp_path, text)
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if "config error" in line]
    where = f"{path}: " if key == "-" else f"{path}: {key}: "  # a problem of the whole file names no key
    assert any(f"{where}{reason}" in line or (where in line and reason in line) for line in lines), result.output
    assert all(": -: " not in line for line in lines), result.output


def test_every_problem_reported_at_once(tmp_path: Path, file_key: None) -> None:
    """Several mistakes give several lines, not only the first."""
    text = VALID.replace("max_age = 90", "").replace('mode = "enforce"', 'mode = "x"').replace(
        "warn_before_days = 14", 'warn_before_days = "y"')
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    keys = {p.key for p in info.value.problems}
    assert {"policy.mode", "policy.warn_before_days"} <= keys


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a configuration error naming the path."""
    result = runner.invoke(app, ["check-config", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "file not found" in result.output


def test_environment_overrides_the_file(tmp_path: Path, file_key: None, env: pytest.MonkeyPatch) -> None:
    """ROTATOR_POLICY__MAX_AGE_DAYS=60 wins over the file; a bad override is reported."""
    env.setenv("ROTATOR_POLICY__MAX_AGE_DAYS", "60")
    assert load_settings(write(tmp_path, VALID)).policy.max_age_days == 60
    env.setenv("ROTATOR_POLICY__MAX_AGE_DAYS", "sixty")
    with pytest.raises(ConfigError, match="policy.max_age_days"):
        load_settings(tmp_path / "rotator.toml")


def test_config_path_from_environment(tmp_path: Path, file_key: None, env: pytest.MonkeyPatch) -> None:
    """Without --config the path comes from $ROTATOR_CONFIG."""
    env.setenv("ROTATOR_CONFIG", str(write(tmp_path, VALID)))
    assert load_settings().policy.window == "Mon-Fri 09:00-17:00 Europe/Paris"


def test_redis_and_broker_passwords_come_from_env_or_file_never_the_url(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[state]` and `[celery]` take `password_env`/`password_file`: the URLs stay password-free, the
    real Redis (requirepass) and the broker connection work, and a missing variable is a config
    problem naming the key, without the value."""
    import redis
    from kombu import Connection

    from rotator.config import settings_from_mapping
    from rotator.embedded import PrivateRedis
    from rotator.errors import ConfigError
    from rotator.runtime import build_state

    password = "pw with/odd:chars@and%"
    with PrivateRedis() as server:
        redis.Redis.from_url(server.url).config_set("requirepass", password)
        (tmp_path / "broker-pw").write_text(password + "\n")
        monkeypatch.setenv("REDIS_PW", password)
        monkeypatch.setenv("ROTATOR_KEYSERVICE_TOKEN", "x")
        monkeypatch.setenv("ROTATOR_FINGERPRINT_KEY", "f" * 20)
        data = {"state": {"redis_url": server.url + "/0", "password_env": "REDIS_PW"},
                "celery": {"broker_url": server.url + "/1", "password_file": str(tmp_path / "broker-pw")},
                "sinks": [{"kind": "memory"}]}
        settings = settings_from_mapping(data)
        assert password not in str(settings.state.redis_url) + str(settings.celery.broker_url)
        assert build_state(settings).client.ping()
        with Connection(settings.celery.broker(), connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(str(settings.state.redis_url)).ping()
        monkeypatch.delenv("REDIS_PW")
        with pytest.raises(ConfigError) as info:
            settings_from_mapping(data)
        assert [p.key for p in info.value.problems] == ["state.password_env"]
        assert password not in str(info.value)


AMQP = VALID.replace("[state]", """[celery]
broker_url = "amqp://rotator@127.0.0.1:5672/rotator"
password_env = "ROTATOR_FILE_KEY"
visibility_timeout_s = 60
{extra}
[engine]
idempotency_key_env = "ROTATOR_IDEMPOTENCY_KEY"
[state]""")


def _celeryconf(path: Path) -> dict[str, Any]:
    """The Celery settings a worker started with this file would use (a fresh interpreter: celeryconf
    reads the file once, at import)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, rotator.celeryconf as c; print(json.dumps({k: getattr(c, k) for k in dir(c) "
            "if k.islower() and not k.startswith('_') and isinstance(getattr(c, k), (str, int, bool, dict, list))}))")
    env = {**os.environ, "ROTATOR_CONFIG": str(path), "XDG_STATE_HOME": str(path.parent / "state")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.splitlines()[-1]))


def test_rabbitmq_broker_skips_the_redis_visibility_check_and_confirms_publishes(
    tmp_path: Path, file_key: None
) -> None:
    """An amqp:// broker: visibility_timeout_s is not checked (nor warned about) nor handed to the
    transport; publishes are confirmed; the queue is a classic one named by `queue`; a user name in
    the URL with password_env is no warning."""
    path = write(tmp_path, AMQP.format(extra='queue = "rotator-prod"'))
    settings = load_settings(path)
    assert settings.celery.broker_is_amqp() and settings.celery.consumer_timeout_s == 1800
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    conf = _celeryconf(path)
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_default_queue"] == "rotator-prod" and conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert "task_default_queue_type" not in conf and "task_default_exchange_type" not in conf
    assert "amqp://rotator:" in conf["broker_url"]  # the password from password_env, not the file


def test_quorum_queues_settings(tmp_path: Path, file_key: None) -> None:
    """`quorum_queues = true`: a quorum default queue on a topic exchange (native delayed delivery for
    countdowns), quorum detection on; a Redis broker keeps its visibility_timeout and gets no AMQP option."""
    conf = _celeryconf(write(tmp_path, AMQP.format(extra="quorum_queues = true\nconsumer_timeout_s = 0")))
    assert conf["task_default_queue_type"] == "quorum" and conf["task_default_exchange_type"] == "topic"
    assert conf["worker_detect_quorum_queues"] is True and conf["broker_native_delayed_delivery_queue_type"] == "quorum"
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    redis_conf = _celeryconf(write(tmp_path, VALID))
    assert redis_conf["broker_transport_options"] == {"visibility_timeout": 3600}
    assert redis_conf["task_default_queue"] == "rotator" and "task_default_queue_type" not in redis_conf


def test_idempotency_keys_derive_from_a_secret_only_the_workers_hold(tmp_path: Path) -> None:
    """`rotator keys init` makes the workers' Idempotency-Key secret; with it the keys no longer
    derive from the fingerprint key (which a live page holds); without it check-config warns, and
    a secret under 16 bytes is refused."""
    from rotator.keys import init_keys
    from rotator.protocol import derivation_id
    from rotator.runtime import build_fingerprinter, build_idempotency_secret

    keys = init_keys(tmp_path / "keys", ["worker"])
    assert keys.idempotency_key in keys.made and keys.idempotency_key.stat().st_mode & 0o777 == 0o600
    engine = tomllib.loads(keys.config())["engine"]
    base: dict[str, Any] = {"keyservice": {"kind": "emulator"}, "sinks": [{"kind": "memory"}]}
    own = settings_from_mapping({**base, "engine": engine}, environ={})
    shared = settings_from_mapping({**base, "engine": {"fingerprint_key_file": engine["fingerprint_key_file"]}},
                                   environ={})
    assert "engine.idempotency_key_file" in [w.key for w in config_warnings(shared, "f")]
    assert "engine.idempotency_key_file" not in [w.key for w in config_warnings(own, "f")]
    secret = build_idempotency_secret(own)
    assert secret is not None and build_idempotency_secret(shared) is None
    assert derivation_id(secret) != derivation_id(build_fingerprinter(own).derive(b"idempotency-key"))
    (tmp_path / "short").write_text("only-15-bytes!!")
    with pytest.raises(ConfigError, match="idempotency_key_file: Idempotency-Key secret: shorter than 16 bytes"):
        settings_from_mapping({**base, "engine": {**engine, "idempotency_key_file": str(tmp_path / "short")}},
                              environ={})
    with pytest.raises(ConfigError, match="idempotency_key_file"):
        settings_from_mapping({**base, "engine": {**engine, "idempotency_key_file": str(tmp_path / "gone")}},
                              environ={})


def test_keys_init_prints_toml_for_any_directory(tmp_path: Path) -> None:
    """The lines `keys init` prints are TOML that names the files it made, piped or not, whatever
    the directory is called (a quote or a backslash in it used to end the string early)."""
    from typer.testing import CliRunner

    from rotator.cli import app

    directory = tmp_path / 'ops "rotator" \\ keys'
    result = CliRunner().invoke(app, ["keys", "init", str(directory)])
    assert result.exit_code == 0, result.output
    engine = tomllib.loads(result.stdout)["engine"]
    assert engine == {"fingerprint_key_file": str(directory / "fingerprint.key"),
                      "idempotency_key_file": str(directory / "idempotency.key")}
    assert Path(engine["fingerprint_key_file"]).stat().st_mode & 0o777 == 0o600
