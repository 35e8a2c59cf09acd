"""`rotator keys init`: the keys an installation needs, made once, each in its own 0600 file.

One Ed25519 signing key per signer (beat, each worker host, each operator who runs
`rotate --enqueue`), the fingerprint HMAC key, the secret the workers derive Idempotency-Keys
with, and the file sink's key. An existing file is never
replaced: running it again adds the signers that are new and prints the whole configuration.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

from rotator.safety import write_private_file
from rotator.signing import public_text, read_private_key, valid_name, write_private_key


@dataclass
class KeySet:
    directory: Path
    public: dict[str, str] = field(default_factory=dict)  # signer name -> ed25519:… public key
    relays: list[str] = field(default_factory=list)
    made: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    def signing_key(self, name: str) -> Path:
        return self.directory / f"{name}.ed25519"

    @property
    def fingerprint_key(self) -> Path:
        return self.directory / "fingerprint.key"

    @property
    def idempotency_key(self) -> Path:
        return self.directory / "idempotency.key"

    @property
    def file_key(self) -> Path:
        return self.directory / "file.key"

    def config(self) -> str:
        """The configuration lines every worker and beat needs (public keys only: nothing secret)."""
        trusted = "\n".join(f'"{name}" = ["{key}"]' for name, key in self.public.items())
        relays = ", ".join(f'"{name}"' for name in self.relays)
        hosts = "\n".join(f"#   {name}: ROTATOR_SIGNING__NAME={name} "
                          f"ROTATOR_SIGNING__PRIVATE_KEY_FILE={self.signing_key(name)}" for name in self.public)
        return f"""[engine]
fingerprint_key_file = {toml_string(self.fingerprint_key)}
idempotency_key_file = {toml_string(self.idempotency_key)}  # every process that rotates or shows live status

# For the encrypted file sink: key_file = {toml_string(self.file_key)}

# Signed task messages across hosts. One host needs none of what follows (its worker and beat sign
# with a key of their own); a fleet adds it to every process's configuration.
[signing]
mode = "enforce"
relays = [{relays}]
# Each process signs as itself: set its name and key file in its own environment (or file), e.g.
{hosts}

[signing.trusted]
{trusted}
"""


def toml_string(path: Path) -> str:
    """A path as a TOML basic string (JSON's escapes are TOML's; a quote or backslash stays inside)."""
    return json.dumps(str(path), ensure_ascii=False)


def init_keys(directory: Path, signers: list[str], operators: tuple[str, ...] = ()) -> KeySet:
    """Make what is missing in `directory` (created 0700); signers other than `operators` are relays."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = KeySet(directory)
    for raw in [*signers, *operators]:
        name = valid_name(raw)
        path = keys.signing_key(name)
        if path.exists():
            key = read_private_key(path)
            keys.kept.append(path)
        else:
            key = write_private_key(path)
            keys.made.append(path)
        keys.public[name] = public_text(key.public_key())
        if raw not in operators:
            keys.relays.append(name)
    for path, kind in ((keys.fingerprint_key, "hmac"), (keys.idempotency_key, "hmac"), (keys.file_key, "fernet")):
        if path.exists():
            keys.kept.append(path)
        else:
            write_private_file(path, Fernet.generate_key() if kind == "fernet" else secrets.token_urlsafe(32).encode())
            keys.made.append(path)
    return keys
