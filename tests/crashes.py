"""A worker process dying mid-rotation, for the tests that recover from it."""

from __future__ import annotations

from typing import Any


class Crash(BaseException):
    """The process dies here (SIGKILL, a pod's termination): nothing below the engine catches a
    BaseException, so nothing after this point runs."""


class Dies:
    """A sink whose first write kills the process: the reset or create ran and its answer is only
    in memory. Every other call, and every later write, goes to `sink`."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.died = sink, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def write(self, record: Any, prepared: Any = None) -> Any:
        if not self.died:
            self.died = True
            raise Crash()
        return self.sink.write(record, prepared)
