"""Configuration errors name where the value came from and what to do instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from rotator.config import load_settings, settings_from_mapping
from rotator.errors import ConfigError

SINKS = {"sinks": [{"kind": "memory"}]}


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data)
    return [str(p) for p in caught.value.problems]


def test_an_override_names_its_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("ROTATOR_POLICY__MAX_AGE_DAYS", "abc")
    [problem] = problems(SINKS)
    assert problem.startswith("environment variable ROTATOR_POLICY__MAX_AGE_DAYS: policy.max_age_days: ")
    assert "(got 'abc')" in problem


def test_an_override_that_is_not_a_list_names_its_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("ROTATOR_KEYSERVICE__CLIENTS", "acme")
    [problem] = problems(SINKS)
    assert problem.startswith("environment variable ROTATOR_KEYSERVICE__CLIENTS: keyservice.clients: ")


def test_a_value_in_the_file_names_the_file(env: pytest.MonkeyPatch) -> None:
    [problem] = problems({**SINKS, "policy": {"max_age_days": "abc"}})
    assert problem.startswith("<settings>: policy.max_age_days: ") and "(got 'abc')" in problem


@pytest.mark.parametrize(("section", "key", "ways"), [
    ("keyservice", "token", "use `token_env` or `token_file`"),
    ("state", "password", "use `password_env` or `password_file`"),
    ("engine", "fingerprint_key", "use `fingerprint_key_env` or `fingerprint_key_file`"),
])
def test_an_inline_credential_is_refused_without_its_value(env: pytest.MonkeyPatch, section: str, key: str,
                                                          ways: str) -> None:
    [problem] = problems({**SINKS, section: {key: "sk_live_4f9a0c1d2e3b"}})
    assert f"{section}.{key}: unknown key: credentials are never inline; {ways}" in problem
    assert "sk_live" not in problem


def test_an_inline_alert_secret_points_at_secret_env(env: pytest.MonkeyPatch) -> None:
    [problem] = problems({**SINKS, "alerts": [{"url": "json://localhost", "secret": "x"}]})
    assert "alerts[0].secret: unknown key: credentials are never inline; use `secret_env`" in problem


@pytest.mark.parametrize(("data", "hint"), [
    ({"polcy": {}}, "polcy: unknown key; did you mean 'policy'?"),
    ({"policy": {"max_age_dayz": 5}}, "policy.max_age_dayz: unknown key; did you mean 'max_age_days'?"),
    ({"state": {"redis": "redis://x"}}, "state.redis: unknown key; did you mean 'redis_url'?"),
])
def test_a_misspelt_key_gets_a_did_you_mean(env: pytest.MonkeyPatch, data: dict[str, object], hint: str) -> None:
    assert any(hint in p for p in problems({**SINKS, **data}))


def test_a_missing_file_says_what_was_tried_and_how_to_choose(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.chdir(tmp_path)
    env.delenv("ROTATOR_CONFIG", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    text = str(caught.value)
    assert "tried 'rotator.toml' (the default, ./rotator.toml in " in text and str(tmp_path) in text
    assert "--config FILE or ROTATOR_CONFIG=FILE" in text
    env.setenv("ROTATOR_CONFIG", str(tmp_path / "elsewhere.toml"))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "elsewhere.toml' (named by ROTATOR_CONFIG)" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "given.toml")
    assert "given.toml' (given with --config)" in str(caught.value)


def test_an_override_of_a_list_entry_names_its_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("ROTATOR_SINKS__0__DIR", "/x")
    assert any(p.startswith("environment variable ROTATOR_SINKS__0__DIR: sinks") for p in problems(SINKS))


def test_a_list_override_that_is_not_json_names_its_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("ROTATOR_POLICY__EXCLUDE", "acme/x")
    [problem] = problems(SINKS)
    assert problem.startswith("ROTATOR_POLICY__EXCLUDE: policy: not valid JSON") and "acme/x" not in problem


def test_an_override_of_no_section_is_an_error(env: pytest.MonkeyPatch) -> None:
    """Silently ignored, it would leave audit mode on while the operator believes in enforce."""
    env.setenv("ROTATOR_POLCY__MODE", "enforce")
    assert any("ROTATOR_POLCY__MODE" in p and "no such section; did you mean ROTATOR_POLICY__…?" in p
               for p in problems(SINKS)), problems(SINKS)


def test_one_underscore_where_two_belong_is_a_warning(env: pytest.MonkeyPatch) -> None:
    """A warning only: Kubernetes puts `ROTATOR_WEB_PORT=tcp://…` (a Service's link) into every pod."""
    from rotator.config import config_warnings

    env.setenv("ROTATOR_POLICY_MODE", "enforce")
    env.setenv("ROTATOR_WEB_PORT", "tcp://10.96.12.34:9465")
    settings = settings_from_mapping(SINKS)
    warnings = [str(w) for w in config_warnings(settings, "rotator.toml")]
    assert any("ROTATOR_POLICY_MODE" in w and "did you mean ROTATOR_POLICY__MODE?" in w for w in warnings)
    assert not any("ROTATOR_WEB_PORT" in w for w in warnings)


@pytest.mark.parametrize(("sink", "hint"), [
    ({"kind": "file", "key": "x"}, "sinks[0].key: unknown key: credentials are never inline; use `key_env` or `key_file`"),
    ({"kind": "vault", "token": "x"}, "sinks[0].token: unknown key: credentials are never inline; use `token_env`"),
    ({"kind": "file", "dri": "/x"}, "sinks[0].dri: unknown key; did you mean 'dir'?"),
])
def test_sink_keys_get_the_same_hints(env: pytest.MonkeyPatch, sink: dict[str, str], hint: str) -> None:
    env.setenv("ROTATOR_FILE_KEY", "x")
    env.setenv("VAULT_TOKEN", "x")
    assert any(hint in p for p in problems({"sinks": [sink]})), problems({"sinks": [sink]})


def test_a_url_that_does_not_parse_never_shows_its_password(env: pytest.MonkeyPatch) -> None:
    found = problems({**SINKS, "state": {"redis_url": "redis//:hunter2PW@127.0.0.1:16399/0"}})
    assert found and not any("hunter2PW" in p for p in found), found


FERNET = "x" * 43 + "="
SLACK = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/"


NOT_UTF8 = b"\xff\xfe\x00fingerprint-key-\xff"


def bad_configuration(tmp_path: Path, extra_toml: str, environ: dict[str, str],
                      files: dict[str, bytes]) -> tuple[Path, dict[str, str]]:
    """One case of the table as files on disk: the config file and the environment it is read in."""
    import os

    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keyservice]\nurl = "http://127.0.0.1:9"\ntoken_env = "TOKEN"\n[[sinks]]\nkind = "memory"\n'
                      f"{extra_toml.replace('{tmp}', str(tmp_path))}")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}, "TOKEN": "t" * 20,
           "ROTATOR_FINGERPRINT_KEY": "f" * 32, "ROTATOR_FILE_KEY": FERNET, "XDG_STATE_HOME": str(tmp_path), **environ}
    return config, env


def _signing_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption())


PASTED_TOKEN = "eyJhbGciOiJSUzI1NiJ9." + "eyJzdWIiOiJyb3RhdG9yIn0" * 14  # a JWT pasted where a path belongs
#: Bad configurations, each with what check-config says of it and what must never show (a credential).
BAD_CONFIGURATIONS = [
    ("", {"ROTATOR_FINGERPRINT_KEY": "tiny-fp-9"}, {},
     "engine.fingerprint_key_env: fingerprint key: shorter than 16 bytes; `rotator keys init DIR` makes one", "tiny-fp-9"),
    ('[engine]\nfingerprint_key_file = "{tmp}/fp.key"\n', {}, {"fp.key": NOT_UTF8},
     "engine.fingerprint_key_file: fingerprint key: ", None),
    ('[engine]\nidempotency_key_env = "IK"\n', {"IK": "0123456789"}, {},
     "engine.idempotency_key_env: Idempotency-Key secret: shorter than 16 bytes", "0123456789"),
    ('[[sinks]]\nkind = "file"\nkey_env = "FILE_KEY"\n', {"FILE_KEY": "not-a-fernet-key"}, {},
     "sinks[1].key_env: not a Fernet key (32 bytes, url-safe base64)", "not-a-fernet-key"),
    ('[[sinks]]\nkind = "file"\nkey_file = "{tmp}/file.key"\n', {}, {"file.key": NOT_UTF8},
     "sinks[1].key_file: ", None),
    ('[[alerts]]\nurl = "mailtos://alerts:hunter2hunter2@smtp.example.com?to=ops@example.com"\n', {}, {},
     "alerts[0].url: holds a password or a token inline", "hunter2hunter2"),
    (f'[[alerts]]\nurl = "{SLACK}"\n', {}, {}, "alerts[0].url: holds a password or a token inline",
     "TIiajkdnlazkcOXrIdevi7FQ"),
    ('[[alerts]]\nurl = "json://hooks.example.com/x?+Authorization=Bearer%20SEKRETbearer3"\n', {}, {},
     "alerts[0].url: holds a password or a token inline", "SEKRETbearer3"),
    ('[[alerts]]\nurl = "webhook+https://ops:pw-0f9e8d@hooks.example.com/x"\nsecret_env = "WHS"\n',
     {"WHS": "a-long-webhook-secret"}, {}, "alerts[0].url: holds a password or a token inline", "pw-0f9e8d"),
    ('[[alerts]]\nurl = "webhook+https://hooks.example.com/x?token=SEKRETquery9"\nsecret_env = "WHS"\n',
     {"WHS": "a-long-webhook-secret"}, {}, "alerts[0].url: holds a password or a token inline", "SEKRETquery9"),
    ('[[alerts]]\nurl_env = "SLACK_URL"\n', {}, {},
     "alerts[0].url_env: alert URL: environment variable SLACK_URL is not set", None),
    ('[[alerts]]\nurl_file = "{tmp}/alert.url"\n', {}, {"alert.url": b"msteams://team/tokenA/SEKRETteamsB/tokenC\n"},
     "alerts[0].url_file: Apprise does not understand", "SEKRETteamsB"),
    ('[[alerts]]\nurl_file = "{tmp}/alert.url"\n', {}, {"alert.url": b"hunter2SEKRETtoken\n"},
     "alerts[0].url_file: not a URL (scheme://", "hunter2SEKRETtoken"),
    ('[[alerts]]\nurl_file = "{tmp}/alert.url"\n', {}, {"alert.url": b"\n"}, "alerts[0].url_file: alert URL: ", None),
    ('[[alerts]]\nurl = "json://localhost"\nurl_env = "X"\n', {}, {}, "give exactly one of url, url_env or url_file",
     None),
    ('[[sinks]]\nkind = "vault"\nurl = "https://vault.example.com"\nauth = "aprole"\n', {}, {},
     "sinks[1].auth: Input should be 'token', 'approle' or 'kubernetes' (got 'aprole'; did you mean 'approle'?)", None),
    ('[[sinks]]\nkind = "vault"\nurl = "https://vault.example.com"\nauth = "hvs.CAESIJSEKRETvaulttoken0123"\n', {},
     {}, "sinks[1].auth: Input should be 'token', 'approle' or 'kubernetes' (the value is not shown",
     "SEKRETvaulttoken"),
    (f'[engine]\nfingerprint_key_file = "{PASTED_TOKEN}"\n', {}, {},  # too long for a file name: no traceback
     "engine.fingerprint_key_file: fingerprint key: the file named there (not shown", PASTED_TOKEN),
    (f'[engine]\nfingerprint_key_file = "{{tmp}}/{"k" * 300}/fp.key"\n', {}, {},
     "engine.fingerprint_key_file: fingerprint key: the file named there (not shown", None),
    # written 0644 (a Kubernetes Secret's default mode): every signing process refuses it
    ('[signing]\nname = "beat"\nprivate_key_file = "{tmp}/beat.ed25519"\n', {}, {"beat.ed25519": _signing_key_pem()},
     "beat.ed25519 is open to other users (or writable by its group): chmod 600 it", None),
]
BAD_IDS = ["short-fingerprint-key", "fingerprint-key-not-utf8", "short-idempotency-secret", "file-key-not-fernet",
           "file-key-not-utf8", "mail-password-inline", "slack-token-inline", "json-header-token-inline",
           "webhook-password-inline", "webhook-query-token-inline", "alert-url-variable-unset",
           "alert-url-file-apprise-cannot-read", "alert-url-file-bare-token", "alert-url-file-empty", "alert-url-twice",
           "vault-auth-typo", "vault-token-in-auth", "token-pasted-as-a-file-name", "file-name-too-long",
           "signing-key-open-to-others"]


@pytest.mark.parametrize(("extra_toml", "environ", "files", "says", "hidden"), BAD_CONFIGURATIONS, ids=BAD_IDS)
def test_a_bad_configuration_is_one_line_from_check_config_and_rotate(
        tmp_path: Path, extra_toml: str, environ: dict[str, str], files: dict[str, bytes], says: str,
        hidden: str | None) -> None:
    """Each bad file: `check-config` exits 2 with a one-line reason that names the key and never
    quotes a credential (nor does any library's log line); `check-config --ping` and `rotate
    --all-due` say the same, no traceback. Separate processes, so logging is set up as in use."""
    import subprocess
    import sys

    config, env = bad_configuration(tmp_path, extra_toml, environ, files)
    for command in (["check-config"], ["check-config", "--ping"], ["rotate", "--all-due"]):
        run = subprocess.run([sys.executable, "-m", "rotator.cli", *command, "--config", str(config)], env=env,
                             capture_output=True, text=True, timeout=60)
        said = run.stdout + run.stderr
        assert run.returncode == 2 and says in said, (command, said[-1500:])
        assert "Traceback" not in said and (hidden is None or hidden not in said), (command, said[-1500:])


#: Every command that reads a configuration, with what it needs besides.
EVERY_COMMAND = [["check-config"], ["check-config", "--ping"], ["health"], ["health", "--worker"], ["scan"],
                 ["rotate", "--all-due"], ["rotate", "--all-due", "--apply"], ["rotate", "--client-id", "c",
                 "--key-id", "k", "--apply", "--enqueue"], ["status"], ["status", "--history"], ["reconcile"],
                 ["reconcile", "--repair"], ["run"], ["worker"], ["beat"], ["metrics", "--port", "0"],
                 ["web", "--port", "0"], ["keys", "public"]]


@pytest.mark.parametrize(("extra_toml", "environ", "files", "says", "hidden"), BAD_CONFIGURATIONS, ids=BAD_IDS)
def test_a_bad_configuration_stops_every_command_before_it_starts(
        tmp_path: Path, extra_toml: str, environ: dict[str, str], files: dict[str, bytes], says: str,
        hidden: str | None) -> None:
    """The same table through every command that reads a configuration: each exits 2 with the same
    line before it reaches anything (no worker, server or call starts on a file check-config refuses)."""
    from typer.testing import CliRunner

    from rotator.cli import app

    config, env = bad_configuration(tmp_path, extra_toml, environ, files)
    env["ROTATOR_CONFIG"] = str(config)  # restored after each run (commands export the path for Celery)
    for command in EVERY_COMMAND:
        result = CliRunner().invoke(app, [*command, "--config", str(config)], env=env)
        said = result.stdout + result.stderr
        assert result.exit_code == 2 and says in said, (command, result.exception, said[-1500:])
        assert isinstance(result.exception, SystemExit | None), (command, result.exception)
        assert hidden is None or hidden not in said, command


def test_every_problem_of_the_file_in_one_run(env: pytest.MonkeyPatch) -> None:
    """Mistakes in [policy] and in [[sinks]]: all of them in one round, not the sinks' after the
    policy's are fixed."""
    found = problems({"policy": {"max_age_days": "ninety", "mode": "enforcee"},
                      "sinks": [{"kind": "vault", "url": "https://vault.example.com", "auth": "aprole", "pth": "x"}]})
    keys = [p.split(": ")[1] for p in found]
    assert keys == ["policy.max_age_days", "policy.mode", "sinks[0].auth", "sinks[0].pth"], found
    assert any("did you mean 'enforce'?" in p for p in found) and any("did you mean 'path'?" in p for p in found)


def test_a_credential_behind_a_directory_closed_to_the_user_is_one_line(tmp_path: Path) -> None:
    """The README's steps run as root make /etc/rotator 0700; a service running as another user
    cannot even look inside. Every command says so in one line (it was a PermissionError traceback).
    Run as root, the command drops the capabilities that let root read anything (setpriv)."""
    import os
    import shutil
    import subprocess
    import sys

    closed = tmp_path / "keys"
    closed.mkdir()
    (closed / "fp.key").write_text("f" * 32)
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keyservice]\nkind = "emulator"\n[engine]\nfingerprint_key_file = "{closed}/fp.key"\n'
                      '[[sinks]]\nkind = "memory"\n')
    closed.chmod(0)
    as_a_user: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux's setpriv is needed to run as root without reading every file"
        as_a_user = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
        for command in (["check-config"], ["scan"], ["rotate", "--all-due"], ["status"]):
            run = subprocess.run([*as_a_user, sys.executable, "-m", "rotator.cli", *command, "--config", str(config)],
                                 env=env, capture_output=True, text=True, timeout=60)
            said = run.stdout + run.stderr
            assert run.returncode == 2, (command, said[-1500:])
            assert "engine.fingerprint_key_file: fingerprint key: the file" in said, (command, said[-1500:])
            assert "cannot be reached by this user" in said and "Traceback" not in said, (command, said[-1500:])
    finally:
        closed.chmod(0o700)
