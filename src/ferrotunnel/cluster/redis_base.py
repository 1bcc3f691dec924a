"""What the Redis registry's modules share: its counters, the "Redis did not answer" signal, the
conversions of Redis answers, and the redis-py client (imported only when a registry is made)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

from ..config import ClusterConfig

__all__ = ["RegistryStats", "RedisDown", "as_text", "to_ms", "parse_addr", "redis_module", "connect"]


@dataclass
class RegistryStats:
    """For the node's metrics: Redis operations (a pipeline is one), failed ones, seconds in them;
    ids taken over from dead, restarted or draining nodes; local sessions closed because another
    node held their id after an outage (``conflicts``) or took it over (``lost``)."""

    ops: int = 0
    errors: int = 0
    op_seconds: float = 0.0
    takeovers: int = 0
    conflicts: int = 0
    lost: int = 0
    #: ids that moved to another node while this one drained (their old sessions finish their streams)
    handovers: int = 0


class RedisDown(Exception):
    """Redis did not answer (already logged): the caller falls back to local answers."""


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else "" if value is None else str(value)


def to_ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def parse_addr(addr: str) -> Tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def redis_module() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise ImportError("cluster mode needs redis-py: pip install 'ferrotunnel[cluster]'") from exc
    return aioredis


def connect(config: ClusterConfig) -> Any:
    """A ``redis.asyncio`` client: ``redis_timeout`` bounds, one retry (a connection a restart broke)."""
    aioredis = redis_module()
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.from_url(config.redis_url, socket_timeout=config.redis_timeout,
                             socket_connect_timeout=config.redis_timeout, retry=Retry(NoBackoff(), 1),
                             client_name=f"ferrotunnel:{config.node_id}")
