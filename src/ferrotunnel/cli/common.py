"""What the commands share: the usage error (exit 2), environment variables, addresses, files."""

from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["DEFAULT_LOCAL", "UsageError", "env", "env_flag", "parse_addr", "existing_file", "parse_port_range_flag", "parse_port_flag"]


#: Where the client forwards streams without --local-addr.
DEFAULT_LOCAL = "127.0.0.1:8000"


class UsageError(Exception):
    """A bad flag or a missing file: exit code 2."""


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_flag(name: str) -> bool:
    return (env(name) or "").lower() in ("1", "true", "yes", "on")


def parse_addr(text: str, what: str) -> Tuple[str, int]:
    from ..client.client import parse_address

    if "://" in text:
        raise UsageError(f"{what} must be HOST:PORT without a scheme (e.g. 127.0.0.1:7835), got {text!r}")
    try:
        return parse_address(text)
    except ValueError as exc:
        raise UsageError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:8000), got {text!r}: {exc}") from None


def existing_file(path: Optional[str], what: str) -> Optional[str]:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")
    return path


def parse_port_range_flag(text: Optional[str], what: str) -> Optional[Tuple[int, int]]:
    """``LO-HI`` as ``(LO, HI)`` (None when not given); UsageError for a bad one."""
    from ..server.ingress import parse_port_range

    if text is None:
        return None
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def parse_port_flag(text: Optional[str], what: str) -> Optional[int]:
    """A port in 0..65535 (None when not given); UsageError for anything else."""
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise UsageError(f"{what} must be a port in 0..65535 (0: any free port of the server's range), got {text!r}")
    return int(text)
