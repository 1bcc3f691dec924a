"""Cluster mode (several servers, one tunnel namespace): ``RedisRegistry``, the registry whose
claims live in Redis. redis-py is imported only when a registry is made (the ``cluster`` extra)."""

from __future__ import annotations

from .redis_registry import RedisRegistry, RegistryStats, RouteFactory, connect

__all__ = ["RedisRegistry", "RegistryStats", "RouteFactory", "connect"]
