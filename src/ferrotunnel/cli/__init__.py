"""The command line: ``ferrotunnel server|client|certs|demo|version``, the demo and the metrics
endpoint. The top layer: it configures and runs the library, nothing imports it."""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
