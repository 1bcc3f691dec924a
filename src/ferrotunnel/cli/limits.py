"""``ferrotunnel server --limit NAME=VALUE``: any numeric limit of ``ServerConfig`` (the README's
table of limits) from the command line, checked as the library checks it."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Dict, Sequence

from .common import UsageError

__all__ = ["parse_limits", "numeric_limits"]

#: Binary size suffixes a byte count may carry (``--limit server_recv_limit=2GiB``).
_SUFFIX = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
_VALUE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
#: Settings that the CLI sets itself (from its own flags), not limits.
_OWN = {"accept_client_streams", "trusted_proxies"}


def numeric_limits() -> Dict[str, type]:
    """Name -> int or float of every numeric field of ``ServerConfig`` (with StreamConfig's)."""
    import ferrotunnel as ft

    hints = typing.get_type_hints(ft.ServerConfig)
    out: Dict[str, type] = {}
    for f in dataclasses.fields(ft.ServerConfig):
        if not f.init or f.name in _OWN:
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args[0] if len(args) == 1 else kind  # Optional[float] -> float
        if base in (int, float):
            out[f.name] = base
    return out


def _value(name: str, kind: type, text: str) -> Any:
    m = _VALUE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SUFFIX or (kind is int and "." in m.group(1) and not unit):
        what = "a whole number, with KiB, MiB or GiB for sizes" if kind is int else "a number (seconds or a rate)"
        raise UsageError(f"--limit {name}={text!r}: the value must be {what}")
    value = float(m.group(1)) * _SUFFIX[unit]
    if kind is int:
        if value != int(value):
            raise UsageError(f"--limit {name}={text!r}: the value must be a whole number of bytes or items")
        return int(value)
    return value


def parse_limits(specs: Sequence[str]) -> Dict[str, Any]:
    """``NAME=VALUE`` strings -> ServerConfig keyword arguments; UsageError (exit 2) naming the
    flag for an unknown name, a malformed value or a name given twice."""
    known = numeric_limits()
    out: Dict[str, Any] = {}
    for spec in specs:
        name, eq, text = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not name:
            raise UsageError(f"--limit {spec!r}: expected NAME=VALUE, e.g. --limit max_sessions=5000")
        kind = known.get(name)
        if kind is None:
            near = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UsageError(f"--limit: no limit named {name[:60]!r}; {hint}the names are those of the README's "
                             "table of limits (ServerConfig)")
        if name in out:
            raise UsageError(f"--limit {name} is given twice")
        out[name] = _value(name, kind, text)
    return out
