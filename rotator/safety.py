"""Checks for values that come from outside: ids, free text, URLs, credential names, local dirs.

Every value a key service sends, an operator types or the disk holds is data, never a path, markup
or a terminal command. The functions here decide what is acceptable; they never repair a value
silently (a bad id is refused, not "sanitised"), and what they report quotes at most a short,
escaped excerpt of the value.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

#: Client ids and key ids: 1..128 of [A-Za-z0-9_.-], never "." or "..".
ID_RE: Final = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.-]{1,128}")
ID_RULE: Final = "1 to 128 characters of A-Z a-z 0-9 _ . - (not '.' or '..')"
#: Free text (aliases, names): no C0/C1 controls, DEL, line separators, bidi overrides, surrogates.
# Control characters, line and paragraph separators, bidi controls, invisible format characters
# (zero-width space and joiner-less marks, BOM, word joiner, soft hyphen; the emoji ZWJ is kept) and
# lone surrogates.
_INVISIBLE: Final = "\u00ad\u061c\u200b\u200c\u200e\u200f\u2060-\u2064\ufeff"
UNSAFE_TEXT_RE: Final = re.compile(
    f"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069{_INVISIBLE}\ud800-\udfff]")
MAX_ALIAS_LEN: Final = 200
EXCERPT_LEN: Final = 40
ENV_NAME_RE: Final = re.compile(r"[A-Z_][A-Z0-9_]*")
_TERMINAL_UNSAFE_RE: Final = re.compile(
    f"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069{_INVISIBLE}]")
_JSON_TYPES: Final = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null",
                      float: "a number", int: "an integer", str: "a string"}


def is_id(value: object) -> bool:
    return type(value) is str and ID_RE.fullmatch(value) is not None


def excerpt(value: object, limit: int = EXCERPT_LEN) -> str:
    """A short, escaped quotation of a value for a message: `repr` of at most `limit` characters.

    Only strings and small numbers are quoted; any other JSON value is named by its type."""
    if type(value) is str:
        more = len(value) - limit
        return repr(value[:limit]) + (f"… ({len(value)} characters)" if more > 0 else "")
    if type(value) is int:
        text = str(value) if value.bit_length() < 128 else f"an integer of {len(str(value))} digits"
        return text
    return _JSON_TYPES.get(type(value), type(value).__name__)


def text_problem(value: object, limit: int = MAX_ALIAS_LEN) -> str | None:
    """Why a free-text value (an alias, a name) is refused, or None when it is acceptable."""
    if type(value) is not str:
        return "is not a string"
    if len(value) > limit:
        return f"is longer than {limit} characters ({len(value)})"
    if UNSAFE_TEXT_RE.search(value):
        return "contains control characters"
    return None


def terminal_safe(text: object) -> str:
    """The text with every control character removed (ESC, BEL, C0, C1, DEL, bidi overrides); tabs
    and line breaks become spaces. For lines and table cells shown to a person."""
    value = str(text)
    value = value.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return _TERMINAL_UNSAFE_RE.sub("", value)


# --- URLs and credentials ------------------------------------------------------------------------

_USERINFO_RE: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/?#\s]*)@")


def redact_url(url: object) -> str:
    """`scheme://user:secret@host/…` -> `scheme://user:***@host/…`; a lone user part (often a token)
    becomes `***@`. Anything that is not a URL with credentials comes back as it was."""
    return _USERINFO_RE.sub(_redacted_userinfo, str(url))


def redact_urls_in(text: str) -> str:
    """Every URL inside a text (a log line, an error) with its credentials redacted, and the
    Idempotency-Key of a stored-answer path (`…/responses/<key>`, which reads the live secret)
    replaced by `{IdempotencyKey}`."""
    if "@" in text:
        text = _USERINFO_RE.sub(_redacted_userinfo, text)
    if "responses/" in text:
        text = _STORED_ANSWER_RE.sub(r"\1{IdempotencyKey}", text)
    return text


_STORED_ANSWER_RE: Final = re.compile(r"(/responses/+)[^/\s\"'?#]+")


def _redacted_userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match.group("userinfo").partition(":")
    if sep:
        return f"{match.group('scheme')}{user}:***@"
    return f"{match.group('scheme')}***@"


def url_has_credentials(url: object) -> bool:
    """True for a URL carrying a user or password (`https://user:token@host`, `redis://:pw@host`)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return False
    return bool(parts.username or parts.password)


def strip_credentials(url: str) -> str:
    """The URL without its user and password (for showing where something is)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_url(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def looks_like_secret(name: str) -> bool:
    """A `*_env` value that looks like a pasted credential rather than an environment variable name:
    not UPPER_CASE_WITH_UNDERSCORES, longer than 64, a long part mixing letters and digits, or
    random-looking (high character entropy)."""
    if not ENV_NAME_RE.fullmatch(name) or len(name) > 64:
        return True
    for part in name.split("_"):
        if len(part) >= 12 and any(c.isdigit() for c in part) and any(c.isalpha() for c in part):
            return True
    return len(name) >= 20 and _entropy(name) >= 4.3


def might_be_secret(value: str) -> bool:
    """Any value that could be a pasted credential (quoted in no message): long, a run that mixes
    letters and digits, or random-looking. A word, a path or a small number is not."""
    if len(value) > 40:
        return True
    for run in re.split(r"[\s/:._-]+", value):
        if len(run) >= 12 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return True
    return len(value) >= 16 and re.fullmatch(r"[A-Za-z0-9+/=_.~-]+", value) is not None and _entropy(value) >= 3.8


def variable_named(name: str) -> str:
    """How a message names the variable of a `*_env` key: by name, unless the name looks like a
    pasted secret (then it is not repeated)."""
    if looks_like_secret(name):
        return "the environment variable named there (the name looks like a secret, so it is not shown)"
    return f"environment variable {name}"


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


# --- local directories -----------------------------------------------------------------------------

def private_dir_problem(path: Path) -> str | None:
    """Why an existing directory is not private enough for secrets or code-bearing state, or None:
    a symlink, not a directory, writable by group or others, or owned by another user."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else type(exc).__name__
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 700 it"
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return f"belongs to another user (uid {info.st_uid})"
    return None


def private_state_dir(environ: Any = None) -> Path:
    """rotator's private state directory (`$XDG_STATE_HOME/rotator`, else `~/.local/state/rotator`),
    created 0700 if missing. Raises `PermissionError` for one that others could write to."""
    env = os.environ if environ is None else environ
    base = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    directory = base / "rotator"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    problem = private_dir_problem(directory)
    if problem is not None:
        raise PermissionError(f"state directory {directory} {problem}")
    return directory


def shown_path(path: Path) -> str:
    """A credential file's path for a message: shown when it looks like a path (a directory part,
    or a short plain file name), withheld when it may be a credential pasted where a file belongs."""
    text = str(path)
    plain_name = (len(text) <= 32 and _entropy(text) < 3.6
                  and re.fullmatch(r"[A-Za-z][A-Za-z_-]*(\.[A-Za-z]{1,8})?", text) is not None)
    if ("/" in text and not any(len(part) >= 20 for part in text.split("/"))) or plain_name:
        return f"the file {excerpt(text)}"
    return "the file named there (not shown: it does not look like a path, it may be a pasted credential)"


def no_core_dumps() -> list[str]:
    """Keep the secrets this process holds out of core files: RLIMIT_CORE 0 and, on Linux, not
    dumpable (no core, no ptrace by other users' processes). Inherited by forked children (Celery's
    pool). Returns what could not be set, for a log line; never raises."""
    import ctypes
    import resource
    import sys

    missed: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        missed.append(f"RLIMIT_CORE ({type(exc).__name__})")
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                missed.append(f"PR_SET_DUMPABLE (errno {ctypes.get_errno()})")
        except (OSError, AttributeError) as exc:
            missed.append(f"PR_SET_DUMPABLE ({type(exc).__name__})")
    return missed


#: prctl(2) options.
PR_SET_DUMPABLE: Final = 4
PR_GET_DUMPABLE: Final = 3


def write_private_file(path: Path, data: bytes) -> None:
    """A new file of mode 0600 holding `data`; an existing one is never replaced (FileExistsError).
    Written beside and linked into place, so a process that reads it meanwhile never sees half of it."""
    import contextlib
    import uuid

    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
