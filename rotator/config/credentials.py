"""Credentials named by `*_env` and `*_file` keys: whether a file can be used (never quoting it),
and the value as a process will read it. Below every section, which all use it."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from rotator.errors import PermanentError
from rotator.safety import (
    shown_path,
)


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
