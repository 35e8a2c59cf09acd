"""An encrypted file per key, for local use and the embedded demo.

Fernet (AES-128-CBC + HMAC) from `cryptography` with a key from env or a file. Each write goes to
a temporary file (mode 0600), is fsynced and renamed over the old one, so a reader sees the old or
the new secret, never half of one; the previous version stays beside it as `*.prev`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import ClassVar

from cryptography.fernet import Fernet, InvalidToken
from pydantic import Field, field_validator

from rotator.config import read_credential
from rotator.domain import ApiKey, KeyRef
from rotator.errors import PermanentError, ProtocolError, TransientError
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, StoredState
from rotator.sinks.base import (
    SinkSettings,
    check_template,
    encode,
    refuse_if_stale,
    render,
    state_from_document,
)

# Out of space or quota may clear; a read-only or forbidden place will not.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.EBUSY}


class EncryptedFileSink:
    kind: ClassVar[str] = "file"
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    class Config(SinkSettings):
        dir: Path = Field(Path("./secrets"), description="Directory of the encrypted files.")
        path: str = Field("{client_id}/{key_id}.secret", description="File name template.")
        key_env: str | None = Field("ROTATOR_FILE_KEY", description="Variable with a Fernet key.")
        key_file: Path | None = Field(None, description="File with a Fernet key.")

        _check_path = field_validator("path")(check_template)

    def __init__(self, config: Config, fingerprint: Fingerprinter) -> None:
        self.config = config
        self._fingerprint = fingerprint
        key = read_credential(config.key_env, config.key_file, "file sink key")
        try:
            self._fernet = Fernet(key.encode())
        except ValueError:
            raise PermanentError(
                "file sink key is not a Fernet key (32 bytes, url-safe base64)"
            ) from None

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"file:{self.config.dir}" + (f"/{ref}" if ref else "")

    def _file(self, key: ApiKey) -> Path:
        return self.config.dir / render(self.config.path, key)

    def prepare(self, key: ApiKey) -> None:
        """The key's directory exists and takes a file (so the write after the reset can succeed)."""
        directory = self._file(key).parent
        where = f"prepare {directory}"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise _classify(exc, where) from None

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        target = self._file(record.key)
        where = f"write {target}"
        current = self._read(target, where)
        if refuse_if_stale(current, record, where):
            assert current is not None
            return current
        data = self._fernet.encrypt(encode(record).encode())
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)  # created 0600
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                if target.exists():
                    prev = target.with_name(target.name + ".prev")
                    with contextlib.suppress(FileNotFoundError):
                        prev.unlink()
                    os.link(target, prev)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _classify(exc, where) from None
        state = self._read(target, where)
        if state is None or state.fingerprint != record.fingerprint:
            raise PermanentError(f"{where}: read-back does not match what was written")
        return state

    def annotate(self, record: SecretRecord) -> None:
        return None

    def read_state(self, key: ApiKey) -> StoredState | None:
        target = self._file(key)
        return self._read(target, f"read {target}")

    def read_previous(self, key: ApiKey) -> StoredState | None:
        target = self._file(key)
        return self._read(target.with_name(target.name + ".prev"), f"read {target}.prev")

    def ping(self) -> None:
        where = f"check {self.config.dir}"
        try:
            self.config.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryFile(dir=self.config.dir):
                pass
        except OSError as exc:
            raise _classify(exc, where) from None

    def close(self) -> None:
        return None

    def _read(self, path: Path, where: str) -> StoredState | None:
        try:
            token = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _classify(exc, where) from None
        try:
            doc = json.loads(self._fernet.decrypt(token))
        except InvalidToken:
            raise ProtocolError(f"{where}: cannot decrypt (another key, or a damaged file)") from None
        return state_from_document(doc, self._fingerprint, where, version=str(int(path.stat().st_mtime_ns)))


def _classify(exc: OSError, where: str) -> Exception:
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientError(f"{where}: {reason}")
    return PermanentError(f"{where}: {reason}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
