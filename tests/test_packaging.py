"""Packaging metadata that installers read: no deprecated forms (each one warns on every install)."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_a_backend_that_reads_it() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # PEP 639; the `{ text = … }` table is deprecated
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]  # the first setuptools that reads PEP 639
