"""Sinks: where rotated secrets are stored. One registry maps `kind` to a class.

Built-in kinds are imported only when used. Third-party sinks register an entry point in the
`rotator.sinks` group (`kind = "package.module:Class"`), and then work like the built-in ones.
"""

from __future__ import annotations

from rotator.sinks import registry

__all__ = ["registry"]
