"""One validated settings object from a TOML file plus `ROTATOR_<SECTION>__<KEY>` overrides.

Credentials never sit in the file: a `*_env` key names the environment variable that holds one, a
`*_file` key a file. Loading checks that each named credential is there, so a bad deployment stops
at start with the file, the key and the reason instead of at the first rotation.

The package, by concern, each importing only those before it: `credentials` (what a `*_env` or
`*_file` key names), `sections` (the models, one per section), `checks` (across keys and beyond the
file) and `load` (the file, the overrides, and where each problem came from).
"""

from __future__ import annotations

from rotator.config.checks import (
    LONGEST_RETRY_WAIT_S,
    config_warnings,
    longest_retry_wait_s,
    longest_rotation_s,
)
from rotator.config.credentials import (
    MIN_KEY_BYTES,
    credential_file_problem,
    credential_value,
    file_problem,
    read_credential,
    url_with_password,
)
from rotator.config.load import (
    config_path,
    load_settings,
    process_settings,
    settings_from_mapping,
)
from rotator.config.sections import (
    AMQP_SCHEMES,
    DEFAULT_PATH,
    EVENTS,
    REDIS_SCHEMES,
    AlertConfig,
    CeleryConfig,
    EngineConfig,
    EnvName,
    KeyServiceConfig,
    PolicyConfig,
    ReloadConfig,
    Section,
    Settings,
    SigningConfig,
    SinkConfig,
    StateConfig,
    ViewConfig,
    WebConfig,
)
from rotator.errors import ConfigError

__all__ = [
    "AMQP_SCHEMES",
    "DEFAULT_PATH",
    "EVENTS",
    "LONGEST_RETRY_WAIT_S",
    "MIN_KEY_BYTES",
    "REDIS_SCHEMES",
    "AlertConfig",
    "CeleryConfig",
    "ConfigError",
    "EngineConfig",
    "EnvName",
    "KeyServiceConfig",
    "PolicyConfig",
    "ReloadConfig",
    "Section",
    "Settings",
    "SigningConfig",
    "SinkConfig",
    "StateConfig",
    "ViewConfig",
    "WebConfig",
    "config_path",
    "config_warnings",
    "credential_file_problem",
    "credential_value",
    "file_problem",
    "load_settings",
    "longest_retry_wait_s",
    "longest_rotation_s",
    "process_settings",
    "read_credential",
    "settings_from_mapping",
    "url_with_password",
]
