"""Per-thread buffer pool configured by the ``FERROTUNNEL_POOL_*`` variables (read once)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _impl

if TYPE_CHECKING:
    from ._pool_py import acquire_bytes, is_exported, parse_pool_env, pool_config, pool_stats, release_bytes
    IMPLEMENTATION: str
else:
    _mod, IMPLEMENTATION = _impl.load("_pool", "_pool_py")
    acquire_bytes = _mod.acquire_bytes
    release_bytes = _mod.release_bytes
    pool_stats = _mod.pool_stats
    pool_config = _mod.pool_config
    parse_pool_env = _mod.parse_pool_env
    is_exported = _mod.is_exported

__all__ = ["IMPLEMENTATION", "acquire_bytes", "release_bytes", "pool_stats", "pool_config", "parse_pool_env", "is_exported"]
