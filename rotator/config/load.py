"""Reading a configuration: the file, the `ROTATOR_<SECTION>__<KEY>` overrides, and every problem
named by where it came from (the file or the variable), the key and why."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)
from pydantic_settings import SettingsError

from rotator.config.checks import (
    _env_overrides,
    _model_in,
    _raw_sink_problems,
    _semantic_problems,
    _stray_overrides,
)
from rotator.config.sections import (
    DEFAULT_PATH,
    Settings,
)
from rotator.errors import ConfigError, ConfigProblem
from rotator.reasons import validation_reason
from rotator.safety import (
    excerpt,
)


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
