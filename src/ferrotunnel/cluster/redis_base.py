"""What the Redis registry's modules share: its counters, the "Redis did not answer" signal, the
conversions of Redis answers, and the redis-py client (imported only when a registry is made)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Tuple

from ..config import ClusterConfig

__all__ = ["RegistryStats", "RedisDown", "RedisCalls", "as_text", "to_ms", "parse_addr", "redis_module", "connect"]

log = logging.getLogger("ferrotunnel.cluster")


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
    #: times this node found Redis no longer knew it (lost records, or its liveness key expired)
    reasserts: int = 0


class RedisDown(Exception):
    """Redis did not answer (already logged): the caller falls back to local answers. ``refused``:
    it answered with an error (out of memory, a read-only replica): no outage, but nothing it
    was asked to record was recorded, so a claim must not be granted on the strength of it."""

    def __init__(self, refused: bool = False) -> None:
        super().__init__()
        self.refused = refused


class RedisCalls:
    """Each Redis operation of a registry, bounded by ``timeout`` and counted in ``stats``. No
    answer starts an outage (said once; later calls fail at once until a probe answers). An error
    reply is said once until ``writes_accepted`` (a liveness write went through) and raised as
    ``RedisDown(refused=True)``: an error reply only, Redis answering each probe, would otherwise
    flap between outage and recovery, and every node would grant every id locally meanwhile."""

    def __init__(self, url: str, timeout: float, stats: RegistryStats) -> None:
        self.url, self.timeout, self.stats = url, timeout, stats
        self.outage = False
        self.refusing = False
        mod = redis_module()
        self._refusal = mod.ResponseError
        self._errors = (mod.RedisError, OSError, TimeoutError)

    async def call(self, fn: Callable[[], Awaitable[Any]], probe: bool = False) -> Any:
        if self.outage and not probe:
            raise RedisDown()
        self.stats.ops += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                return await fn()
        except self._refusal as exc:
            self.stats.errors += 1
            if not self.refusing:
                self.refusing = True
                log.warning("registry: Redis at %s refuses: %s; claims are refused (clients retry) until it "
                            "accepts writes again", self.url, exc)
            raise RedisDown(refused=True) from exc
        except self._errors as exc:
            self.stats.errors += 1
            self.went_down(exc)
            raise RedisDown() from exc
        finally:
            self.stats.op_seconds += time.monotonic() - t0

    def went_down(self, exc: BaseException) -> None:
        if not self.outage:
            self.outage = True
            why = str(exc) or f"no answer within {self.timeout} s"
            log.warning("registry: Redis at %s unreachable: %s; serving local tunnels only", self.url, why)

    def writes_accepted(self) -> bool:
        """A write went through; True if that ends a refusal episode."""
        if not self.refusing:
            return False
        self.refusing = False
        log.info("registry: Redis at %s accepts writes again", self.url)
        return True


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
