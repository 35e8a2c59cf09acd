"""The configuration and the services: `check-config`, `health`, `config-reference`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli.base import (
    ConfigOption,
    Flag,
    app,
    report_checks,
    settings_or_exit,
    use_config,
)
from rotator.config import config_path
from rotator.console import err, show

if TYPE_CHECKING:
    pass


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    ping: Annotated[bool, Flag("--ping", help="Also reach every service.")] = False,
) -> None:
    """Validate the configuration file; report every problem with its key."""
    settings = settings_or_exit(config)
    from rotator.config import config_warnings

    for warning in config_warnings(settings, str(config_path(config))):
        err.print(f"[yellow]warning:[/yellow] {show(warning)}")
    if ping:
        from rotator.health import ping_all

        report_checks(ping_all(settings))
    err.print(f"[green]{show(config_path(config))} is valid[/green]", highlight=False)


@app.command()
def health(
    config: ConfigOption = None,
    worker: Annotated[bool, Flag("--worker", help="Also check this host's worker's heartbeat.")] = False,
    node: Annotated[str | None, typer.Option(help="The worker's node name (default celery@HOSTNAME).")] = None,
) -> None:
    """Probe for systemd and Kubernetes: Redis and the broker answer (and, with --worker, this
    host's worker has beaten in Redis within 20 s). Exit 0 healthy, 1 not; one line per check.
    Never calls the key service."""
    settings = use_config(config)
    from rotator.probe import probe

    report_checks(probe(settings, worker, node))


@app.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), generated from the settings models."""
    from rotator.reference import render

    print(render(), end="")
