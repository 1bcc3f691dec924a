"""Pure-Python twin of the compiled buffer pool (`_pool.pyx`): same names, same behaviour.

A per-thread LIFO of reusable ``bytearray`` buffers (PROTOCOL.md section 6). The three
``FERROTUNNEL_POOL_*`` variables are read once per process, on the first acquire or release.
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional, Tuple

__all__ = ["acquire_bytes", "release_bytes", "pool_stats", "pool_config", "parse_pool_env", "is_exported"]

DEFAULT_MAX_SIZE = 32
DEFAULT_MAX_CAPACITY = 65536
DEFAULT_CAPACITY = 4096
_USIZE_MAX = 2**64 - 1
_SSIZE_MAX = 2**63 - 1


def parse_pool_env(value: Optional[str], default: int) -> int:
    """Digits with an optional leading '+'; unset, unparsable, overflowing or zero -> default."""
    if not value:
        return default
    digits = value[1:] if value[0] == "+" else value
    if not digits or not all("0" <= c <= "9" for c in digits):
        return default
    n = int(digits)
    if n == 0 or n > _USIZE_MAX:
        return default
    return n


_config: Optional[Tuple[int, int, int]] = None
_local = threading.local()


def _load_config() -> Tuple[int, int, int]:
    global _config
    if _config is None:
        env = os.environ
        # a limit beyond what memory can hold behaves like "no limit"
        _config = (
            min(parse_pool_env(env.get("FERROTUNNEL_POOL_MAX_SIZE"), DEFAULT_MAX_SIZE), _SSIZE_MAX),
            min(parse_pool_env(env.get("FERROTUNNEL_POOL_MAX_CAPACITY_BYTES"), DEFAULT_MAX_CAPACITY), _SSIZE_MAX),
            min(parse_pool_env(env.get("FERROTUNNEL_POOL_DEFAULT_CAPACITY_BYTES"), DEFAULT_CAPACITY), _SSIZE_MAX),
        )
    return _config


def pool_config() -> Tuple[int, int, int]:
    """(max buffers per thread, max retained capacity, default capacity), read once per process."""
    return _load_config()


def _stack() -> List[bytearray]:
    try:
        return _local.stack  # type: ignore[no-any-return]
    except AttributeError:
        _local.stack = []
        return _local.stack  # type: ignore[no-any-return]


def acquire_bytes(capacity: int = 0) -> bytearray:
    """A buffer of at least ``max(capacity, FERROTUNNEL_POOL_DEFAULT_CAPACITY_BYTES)`` bytes.

    The most recently released buffer of this thread is reused when there is one; its old
    contents are not cleared, so treat every byte as undefined until you write it.
    """
    cfg = _config or _load_config()
    need = capacity if capacity > cfg[2] else cfg[2]
    stack = _stack()
    if stack:
        buf = stack.pop()
        if len(buf) < need:
            buf.extend(bytes(need - len(buf)))
        return buf
    return bytearray(need)


def release_bytes(buf: bytearray) -> bool:
    """Give a buffer back to this thread's pool; returns whether it was retained.

    Kept only if it is a ``bytearray`` no larger than the capacity limit, the pool is not full,
    and no memoryview still exports it (a viewed buffer must never be handed out again).
    """
    cfg = _config or _load_config()
    if type(buf) is not bytearray or len(buf) > cfg[1]:
        return False
    stack = _stack()
    if len(stack) >= cfg[0]:
        return False
    if is_exported(buf):
        return False
    stack.append(buf)
    return True


def is_exported(buf: bytearray) -> bool:
    """Whether a memoryview (or another buffer consumer) still exports ``buf``."""
    if type(buf) is not bytearray:
        return False
    try:  # resizing raises BufferError while a view exists
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


def pool_stats() -> Tuple[int, int]:
    """(buffers retained, their total capacity in bytes) for the calling thread."""
    stack = _stack()
    return len(stack), sum(len(b) for b in stack)
