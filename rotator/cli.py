"""The `rotator` command. Thin: it parses, calls the library, and prints.

Exit codes: 0 success, 1 a rotation or check failed, 2 bad usage or configuration. With `--json`,
stdout carries one JSON document and nothing else; progress and messages go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rotator import logs
from rotator.config import Settings, config_path, load_settings
from rotator.errors import ConfigError, RotatorError

app = typer.Typer(
    name="rotator",
    help="Rotate production API keys on a schedule and store each one-time secret safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $ROTATOR_CONFIG or ./rotator.toml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def settings_or_exit(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]config error:[/red] {escape(str(problem))}")
        raise typer.Exit(2) from None


@contextmanager
def errors_exit() -> Iterator[None]:
    """A RotatorError becomes a one-line message and exit code 1 (2 for configuration)."""
    try:
        yield
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]config error:[/red] {escape(str(problem))}")
        raise typer.Exit(2) from None
    except RotatorError as exc:
        fail(str(exc), 1)


@app.callback()
def main_options(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    logs.configure(log_level)


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    ping: Annotated[bool, typer.Option("--ping", help="Also reach every service.")] = False,
) -> None:
    """Validate the configuration file; report every problem with its key."""
    settings = settings_or_exit(config)
    if ping:
        from rotator.health import ping_all

        failures = 0
        for name, problem in ping_all(settings):
            if problem is None:
                err.print(f"[green]ok[/green]   {name}", highlight=False)
            else:
                failures += 1
                err.print(f"[red]fail[/red] {escape(name)}: {escape(problem)}")
        if failures:
            raise typer.Exit(1)
    err.print(f"[green]{config_path(config)} is valid[/green]", highlight=False)


@app.command()
def scan(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every key with its age and state: due, due_soon, ok, excluded, out_of_scope."""
    from rotator.keyservice import build_keyservice
    from rotator.scan import scan as run_scan

    settings = settings_or_exit(config)
    with errors_exit():
        service = build_keyservice(settings.keyservice)
        try:
            rows = []
            now = time.time()
            with err.status("Scanning…") as status:
                for count, row in enumerate(
                    run_scan(service, settings.policy.to_policy(), now, settings.keyservice.clients), 1
                ):
                    rows.append(row)
                    if count % 100 == 0:
                        status.update(f"Scanning… {count} keys")
        finally:
            service.close()
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    table = Table("client_id", "key_id", "alias", "environment", "age_days", "state")
    colours = {"due": "red", "due_soon": "yellow", "ok": "green"}
    for r in rows:
        d = r.to_dict()
        colour = colours.get(d["state"], "dim")
        table.add_row(d["client_id"], d["key_id"], d["alias"], d["environment"],
                      f"{d['age_days']:.1f}", f"[{colour}]{d['state']}[/{colour}]")
    out.print(table)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    err.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no keys", highlight=False)


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8400,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    seed: Annotated[Path | None, typer.Option(help="Seed file (docs/emulator.md).")] = None,
    token: Annotated[str, typer.Option(envvar="ROTATOR_KEYSERVICE_TOKEN",
                                       help="Management token it accepts.")] = "dev-token",
) -> None:
    """Serve the key-service API (keyservice-api.md) for development and tests."""
    from rotator.keyservice.emulator import Emulator
    from rotator.keyservice.emulator_http import EmulatorServer

    emu = Emulator(token=token)
    if seed is not None:
        try:
            emu.load_seed_file(seed)
        except (OSError, ValueError, KeyError) as exc:
            fail(f"seed file {seed}: {exc}", 2)
    server = EmulatorServer(emu, host, port)
    err.print(f"key-service emulator on {server.url} (Ctrl-C stops it)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

if __name__ == "__main__":
    main()
