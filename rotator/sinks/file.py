"""An encrypted file per key, for local use and the embedded demo.

Fernet (AES-128-CBC + HMAC) from `cryptography` with a key from env or a file. Each write goes to
a temporary file (mode 0600), is fsynced and renamed over the old one, so a reader sees the old or
the new secret, never half of one; the previous version stays beside it as `*.prev`.

The disk is not trusted either: the sink root must be a real directory (not a symlink) that only its
owner can write to; every file operation is relative to a directory opened segment by segment with
`O_NOFOLLOW` (created 0700), files are opened `O_NOFOLLOW | O_NONBLOCK` and must be regular files
(a planted symlink or FIFO is refused, never followed or blocked on), and a path that would resolve
outside the root is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from cryptography.fernet import Fernet, InvalidToken
from pydantic import Field, field_validator

from rotator.config import credential_value, read_credential
from rotator.domain import ApiKey, KeyRef, Secret
from rotator.errors import PermanentError, ProtocolError, TransientError
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, StoredState
from rotator.safety import private_dir_problem
from rotator.sinks.base import (
    MAX_SEGMENT_BYTES,
    SinkSettings,
    check_template,
    encode,
    ref_of_document,
    refuse_if_stale,
    render,
    secret_from_document,
    state_from_document,
)

MAX_STORED_BYTES = 1 << 20  # a stored document is a few hundred bytes
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW
_READ = os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
MAX_FILE_BYTES = 1 << 20

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

        def credential_problems(self, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
            yield from super().credential_problems(env)
            value = credential_value(self.key_env, self.key_file, env)
            if value is not None and not _is_fernet_key(value):  # the value is never shown
                yield ("key_file" if self.key_file is not None else "key_env",
                       "not a Fernet key (32 bytes, url-safe base64); `rotator keys init DIR` makes one (file.key)")

    def __init__(self, config: Config, fingerprint: Fingerprinter) -> None:
        self.config = config
        self._fingerprint = fingerprint
        key = read_credential(config.key_env, config.key_file, "file sink key")
        if not _is_fernet_key(key):
            raise PermanentError("file sink key is not a Fernet key (32 bytes, url-safe base64)")
        self._fernet = Fernet(key.encode())

    def location(self, key: ApiKey) -> str:
        """Where this key's secret lives in this sink (two keys must never share one)."""
        return f"{self.describe()}:{render(self.config.path, key)}"

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"file:{self.config.dir}" + (f"/{ref}" if ref else "")

    def _file(self, key: ApiKey) -> Path:
        """The key's file (through `render`), refused if it would resolve outside the sink root."""
        relative = render(self.config.path, key)
        if len(relative.rsplit("/", 1)[-1].encode()) > MAX_SEGMENT_BYTES - len(".prev"):
            raise PermanentError(f"file sink: the file name for {key.ref} is too long")
        target = self.config.dir / relative
        root = self.config.dir.resolve()
        if not target.resolve().is_relative_to(root):
            raise PermanentError(f"file sink: the path for {key.ref} resolves outside {self.config.dir}; refused")
        return target

    def prepare(self, key: ApiKey) -> None:
        """The key's directory exists and takes a file, and the file there (if any) is this key's or
        its predecessor's, so the write after the reset can succeed."""
        target = self._file(key)
        where = f"prepare {target.parent}"
        directory = self._directory(key, create=True, where=where)
        assert directory is not None
        try:
            probe = f".tmp-probe-{secrets.token_hex(8)}"
            os.close(os.open(probe, _CREATE, 0o600, dir_fd=directory))
            os.unlink(probe, dir_fd=directory)
            self._read_at(directory, target.name, f"read {target}", key, writing=True)
        except OSError as exc:
            raise _classify(exc, where) from None
        finally:
            os.close(directory)

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        target = self._file(record.key)
        name = target.name
        where = f"write {target}"
        directory = self._directory(record.key, create=True, where=where)
        assert directory is not None
        try:
            current = self._read_at(directory, name, where, record.key, writing=True)
            if refuse_if_stale(current, record, where):
                assert current is not None
                return current
            data = self._fernet.encrypt(encode(record).encode())
            tmp = f".tmp-{secrets.token_hex(8)}"
            fd = os.open(tmp, _CREATE, 0o600, dir_fd=directory)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                if current is not None:  # a regular file of this key (or its predecessor): keep it as *.prev
                    prev = name + ".prev"
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(prev, dir_fd=directory)
                    os.link(name, prev, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
                os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=directory)
            os.fsync(directory)
            state = self._read_at(directory, name, where, record.key)
        except OSError as exc:
            raise _classify(exc, where) from None
        finally:
            os.close(directory)
        if state is None or state.fingerprint != record.fingerprint:
            raise PermanentError(f"{where}: read-back does not match what was written")
        return state

    def annotate(self, record: SecretRecord) -> None:
        return None

    def stored_refs(self) -> Iterator[tuple[str, KeyRef]]:
        """Every key this sink holds a document for, with where: `reconcile` reports the ones the
        key service no longer knows (orphans: dead secrets left behind)."""
        for folder, _dirs, names in os.walk(self.config.dir, followlinks=False):
            for name in sorted(names):
                path = Path(folder) / name
                if name.endswith(".prev") or name.startswith(".tmp-"):
                    continue
                try:
                    found = path.lstat()  # a planted symlink or FIFO is not followed or opened
                    if not stat.S_ISREG(found.st_mode) or found.st_size > MAX_STORED_BYTES:
                        continue
                    ref = ref_of_document(json.loads(self._fernet.decrypt(path.read_bytes())))
                except (OSError, InvalidToken, ValueError):
                    continue  # not a file of this sink (another key, or not rotator's)
                if ref is not None:
                    yield str(path), ref

    def read_state(self, key: ApiKey) -> StoredState | None:
        target = self._file(key)
        return self._state(key, self._read(key, target.name, f"read {target}"), f"read {target}")

    def read_previous(self, key: ApiKey) -> StoredState | None:
        target = self._file(key)
        where = f"read {target}.prev"
        return self._state(key, self._read(key, target.name + ".prev", where), where)

    def read_secret(self, key: ApiKey) -> Secret | None:
        target = self._file(key)
        loaded = self._read(key, target.name, f"read {target}")
        return None if loaded is None else secret_from_document(loaded[0], f"read {target}", key)

    def ping(self) -> None:
        where = f"check {self.config.dir}"
        root = self._root(create=True, where=where)
        assert root is not None
        try:
            probe = f".tmp-probe-{secrets.token_hex(8)}"
            os.close(os.open(probe, _CREATE, 0o600, dir_fd=root))
            os.unlink(probe, dir_fd=root)
        except OSError as exc:
            raise _classify(exc, where) from None
        finally:
            os.close(root)

    def close(self) -> None:
        return None

    # --- every file operation is relative to a directory opened without following symlinks ------
    def _root(self, *, create: bool, where: str) -> int | None:
        """The sink root, opened; refused if it is a symlink, not a directory, writable by group or
        others, or another user's. None when it does not exist and `create` is false."""
        root = self.config.dir
        try:
            if create and not os.path.lexists(root):
                root.mkdir(parents=True, mode=0o700)
            info = os.lstat(root)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _classify(exc, where) from None
        if stat.S_ISREG(info.st_mode):
            raise PermanentError(f"{where}: {os.strerror(errno.ENOTDIR)}")
        problem = private_dir_problem(root)
        if problem is not None:
            raise PermanentError(f"{where}: the sink root {root} {problem}; refused")
        try:
            return os.open(root, _DIRECTORY)
        except OSError as exc:
            raise _classify(exc, where) from None

    def _directory(self, key: ApiKey, *, create: bool, where: str) -> int | None:
        """The key's directory under the root, walked one segment at a time with O_NOFOLLOW (a
        planted symlink anywhere on the way is refused); created 0700 when `create`."""
        parts = render(self.config.path, key).split("/")[:-1]
        fd = self._root(create=create, where=where)
        if fd is None:
            return None
        for part in parts:
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PermanentError(f"{where}: {part!r} is a symlink or not a directory; refused") from None
                raise _classify(exc, where) from None
            os.close(fd)
            fd = child
            if os.fstat(fd).st_mode & 0o022:
                os.close(fd)
                raise PermanentError(f"{where}: directory {part!r} is writable by group or others; refused")
        return fd

    def _read(self, key: ApiKey, name: str, where: str) -> tuple[Any, str] | None:
        directory = self._directory(key, create=False, where=where)
        if directory is None:
            return None
        try:
            return self._load_at(directory, name, where)
        except OSError as exc:
            raise _classify(exc, where) from None
        finally:
            os.close(directory)

    def _state(self, key: ApiKey, loaded: tuple[Any, str] | None, where: str, *,
               writing: bool = False) -> StoredState | None:
        if loaded is None:
            return None
        return state_from_document(loaded[0], self._fingerprint, where, version=loaded[1], key=key, writing=writing)

    def _read_at(self, directory: int, name: str, where: str, key: ApiKey, *,
                 writing: bool = False) -> StoredState | None:
        return self._state(key, self._load_at(directory, name, where), where, writing=writing)

    def _load_at(self, directory: int, name: str, where: str) -> tuple[Any, str] | None:
        """The decrypted document of one file of `directory` and its version: never read through a
        symlink, never a FIFO or device (opened non-blocking, checked to be a regular file first)."""
        try:
            fd = os.open(name, _READ, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PermanentError(f"{where}: is a symlink; refused") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PermanentError(f"{where}: not a regular file; refused")
            if info.st_size > MAX_FILE_BYTES:
                raise ProtocolError(f"{where}: larger than {MAX_FILE_BYTES} bytes; not a secret file")
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            token = b"".join(chunks)
        finally:
            os.close(fd)
        try:
            doc = json.loads(self._fernet.decrypt(token))
        except InvalidToken:
            raise ProtocolError(f"{where}: cannot decrypt (another key, or a damaged file)") from None
        return doc, str(info.st_mtime_ns)


def _classify(exc: OSError, where: str) -> Exception:
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientError(f"{where}: {reason}")
    return PermanentError(f"{where}: {reason}")


def _is_fernet_key(value: str) -> bool:
    try:
        Fernet(value.encode())
    except ValueError:
        return False
    return True
