"""`rotator keys`: the keys an installation makes (`init`) and this process's signer (`public`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli.base import (
    ConfigOption,
    JsonOption,
    app,
    fail,
    keys_app,
    need_signer,
    use_config,
)
from rotator.console import err, out, print_json, show

if TYPE_CHECKING:
    pass


app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Argument(help="Where the key files go (made 0700; files 0600).")],
    signer: Annotated[list[str] | None, typer.Option(
        "--signer", metavar="NAME",
        help="A fleet signer (beat, a worker host); repeat it. Default: beat and worker.")] = None,
    operator: Annotated[list[str] | None, typer.Option(
        "--operator", metavar="NAME", help="An operator who runs `rotate --enqueue` (not a relay); repeat it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Make the signing keys (one per signer), the fingerprint key, the workers' Idempotency-Key secret
    and the file sink's key, and print the configuration lines to add. Existing files are kept, never
    replaced."""
    from rotator.keys import init_keys
    from rotator.signing import KeyFileError

    try:
        keys = init_keys(directory.resolve(), signer or ["beat", "worker"], tuple(operator or ()))
    except (KeyFileError, OSError) as exc:
        fail(f"{exc}", 2)
    if as_json:
        print_json({"directory": str(keys.directory), "public_keys": keys.public, "relays": keys.relays,
                    "made": [str(p) for p in keys.made], "kept": [str(p) for p in keys.kept],
                    "fingerprint_key_file": str(keys.fingerprint_key),
                    "idempotency_key_file": str(keys.idempotency_key), "file_key_file": str(keys.file_key),
                    "config": keys.config()})
        return
    for path in keys.made:
        err.print(f"made {show(path)}", highlight=False)
    for path in keys.kept:
        err.print(f"kept {show(path)} (exists; never replaced)", highlight=False)
    for line in keys.config().splitlines():  # line by line: `show` would join lines that a pipe must keep
        out.print(show(line), highlight=False, soft_wrap=True)


@keys_app.command("public")
def keys_public(config: ConfigOption = None) -> None:
    """This process's signer name and public key, as a `\\[signing.trusted]` line for the workers'
    configuration (makes the embedded default key if it is missing)."""
    settings = use_config(config)
    me = need_signer(settings)
    if me is None:
        fail("signing.mode is off: this configuration signs nothing", 1)
    out.print(f'"{me.name}" = ["{me.public()}"]', highlight=False, soft_wrap=True)

