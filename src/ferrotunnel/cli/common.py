"""What the commands share: the usage error (exit 2), environment variables, addresses, files."""

from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["UsageError", "env", "env_flag", "parse_addr", "existing_file"]


class UsageError(Exception):
    """A bad flag or a missing file: exit code 2."""


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_flag(name: str) -> bool:
    return (env(name) or "").lower() in ("1", "true", "yes", "on")


def parse_addr(text: str, what: str) -> Tuple[str, int]:
    from ..client.client import parse_address

    try:
        return parse_address(text)
    except ValueError:
        raise UsageError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:8000), got {text!r}") from None


def existing_file(path: Optional[str], what: str) -> Optional[str]:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")
    return path
