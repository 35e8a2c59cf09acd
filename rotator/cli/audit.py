"""`rotator audit`: export the tamper-evident audit trail with a signed checkpoint, verify an export."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from rotator.cli.base import (
    ConfigOption,
    JsonOption,
    _App,
    app,
    errors_exit,
    fail,
    need_signer,
    settings_or_exit,
    use_config,
)
from rotator.console import err, out, print_json, show

audit_app = _App(help="The tamper-evident audit trail: export it with a signed checkpoint, verify an export.",
                 no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def parse_since(text: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since {text!r} is neither Unix seconds nor an ISO 8601 date or time", 2)
    return when.timestamp() if when.tzinfo else when.replace(tzinfo=UTC).timestamp()


@audit_app.command("export")
def audit_export(
    config: ConfigOption = None,
    since: Annotated[str | None, typer.Option(help="Only entries from this time (Unix seconds or ISO 8601).")] = None,
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Write the audit trail Redis holds as JSON Lines, oldest first, each entry with its place in
    the chain (`seq`, `prev`, `hash`), and a last line with a checkpoint signed by this process's
    signing key (the count of entries chained so far and the head hash). Keep each export: the next
    one is verified against it (`audit verify --after`), so entries Redis trimmed since stay proven."""
    from rotator.audit import GENESIS, KEYED, Checkpoint
    from rotator.runtime import build_state

    settings = use_config(config)
    signer = need_signer(settings)
    if signer is None:
        fail("audit export signs its checkpoint, and signing.mode is off (no signing key in use)", 2)
    from_time = parse_since(since) if since is not None else None
    with errors_exit():
        state = build_state(settings)
        entries, head = state.audit_snapshot()
    chained = sorted((e for e in entries if isinstance(e.get("hash"), str) and isinstance(e.get("seq"), int)),
                     key=lambda e: int(e["seq"]))
    unchained = len(entries) - len(chained)
    if from_time is not None:  # from the first entry at or after it, every later one (writers' clocks differ)
        start = next((n for n, e in enumerate(chained) if float(e.get("time") or 0) >= from_time), len(chained))
        chained = chained[start:]
    count, digest, alg = head if head is not None else (0, GENESIS, "")
    origin = settings.audit.origin or f"rotator/{settings.state.namespace}"
    first = int(chained[0]["seq"]) if chained else count + 1
    keyed = alg == KEYED  # the head's, whatever this export holds (none, with --since)
    note = Checkpoint(origin, count, digest, first, keyed).sign(signer.name, signer.key)
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in chained) + json.dumps({"checkpoint": note}) + "\n"
    if output is None:
        out.file.write(text)
        out.file.flush()
    else:
        partial = output.with_name(output.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, output)
    err.print(f"exported {len(chained)} entries" + (f" (seq {first} to {count})" if chained else "")
              + f"; checkpoint of {count} entries signed by {show(signer.name)}", highlight=False)
    if chained and first != 1 and from_time is None:
        err.print(f"Redis keeps the last {settings.state.history_max} entries: this export starts at seq {first}; "
                  "`rotator audit verify FILE --after PREVIOUS_EXPORT` proves the two join", highlight=False)
    if unchained:
        err.print(f"{unchained} entries written by a release without the audit chain are left out", highlight=False)


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="An export of `rotator audit export`.")],
    after: Annotated[Path | None, typer.Option(help="The previous export: this one must continue it.")] = None,
    public_key: Annotated[list[str] | None, typer.Option(
        "--public-key", metavar="NAME=ed25519:KEY",
        help="A key the checkpoint may be signed with; repeat it. Default: the configuration's signers.")] = None,
    hmac_key_file: Annotated[Path | None, typer.Option(
        help="The audit chain's HMAC key (default: audit.hmac_key_file of the configuration).")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check every entry's hash, that each follows the one before, and the checkpoint's signature,
    count and head. Exit 0 with the count when intact; exit 1 naming the first edited, deleted,
    reordered or inserted entry."""
    from rotator.audit import AuditError, Checkpoint, open_note, verify
    from rotator.config import read_credential

    trusted, key = _trust(public_key, config)
    if hmac_key_file is not None:
        key = read_credential(None, hmac_key_file, "audit HMAC key").encode()
    try:
        previous: Checkpoint | None = None
        if after is not None:
            previous = open_note(str(json.loads(_lines(after)[-1])["checkpoint"]), trusted)[0]
        verified = verify(_lines(file), trusted, key, previous)
    except (AuditError, ValueError, KeyError, TypeError) as exc:
        if as_json:
            print_json({"intact": False, "problem": str(exc)})
        else:
            err.print(f"[red]not intact:[/red] {show(exc)}")
        raise typer.Exit(1) from None
    if as_json:
        print_json({"intact": True, "entries": verified.count, "first_seq": verified.first_seq,
                    "last_seq": verified.last_seq, "head": verified.head, "signer": verified.signer,
                    "unkeyed": verified.unkeyed})
        return
    span = f" (seq {verified.first_seq} to {verified.last_seq})" if verified.count else ""
    out.print(f"intact: {verified.count} entries{span}, checkpoint signed by {show(verified.signer)}",
              highlight=False)
    if verified.unkeyed:
        err.print(f"{verified.unkeyed} entries are not keyed (written before audit.hmac_key_file was set): they are "
                  "checked by SHA-256 only, so only an earlier export whose head was keyed (--after) proves they were "
                  "not rewritten", highlight=False)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {show(path)}: {type(exc).__name__}", 2)


def _trust(given: list[str] | None, config: Path | None) -> tuple[dict[str, list[Any]], bytes | None]:
    """The keys a checkpoint may be signed with, and the chain's HMAC key, from `--public-key` or
    from the configuration (its trusted signers and this process's own key)."""
    from rotator.config import read_credential
    from rotator.signing import parse_public

    trusted: dict[str, list[Any]] = {}
    if given:
        for item in given:
            name, sep, text = item.partition("=")
            try:
                trusted.setdefault(name, []).append(parse_public(text))
            except Exception:
                fail(f"--public-key {show(item)}: expected NAME=ed25519:KEY", 2)
            if not sep or not name:
                fail(f"--public-key {show(item)}: expected NAME=ed25519:KEY", 2)
        return trusted, None
    from rotator.gate import key_path

    settings = settings_or_exit(config)
    for name, keys in settings.signing.trusted.items():
        trusted.setdefault(name, []).extend(parse_public(k) for k in keys)
    own = settings.signing.private_key_file
    try:
        exists = (own or key_path(settings)).exists()
    except OSError:
        exists = False
    me = need_signer(settings) if exists else None  # never made here: a verifier signs nothing
    if me is not None:
        trusted.setdefault(me.name, []).append(me.key.public_key())
    key_file = settings.audit.hmac_key_file
    return trusted, read_credential(None, key_file, "audit HMAC key").encode() if key_file else None
