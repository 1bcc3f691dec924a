"""``RouteLookup``: the lookup side of a ``RedisRegistry``. Which node holds a tunnel id (one Redis
question per id however many visitors ask, answers cached ``route_cache_ttl``), a route to it
over the node link, and why a tunnel that may exist cannot be reached from here (a 503 with that
reason, not a 404): its node stopped, its link is down, its access rules cannot be verified,
Redis is down or recovering its records."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from ..config import ClusterConfig
from ..server.registry import LocalRegistry, Route
from .access_records import AccessKeys, UnreadableRules
from .redis_base import RedisDown, as_text, parse_addr
from .redis_pools import member_nodes, pool_route

__all__ = ["RouteLookup", "RouteFactory"]

log = logging.getLogger("ferrotunnel.cluster")

#: ``remote_route(node_id, (host, port), tunnel_id)``: a Route to that tunnel on that node, or None;
#: for a tunnel with access rules also ``published=`` (``access_records.Published``), which the
#: route must carry as its ``access``.
RouteFactory = Callable[[str, Tuple[str, int], str], Awaitable[Optional[Route]]]

_CACHE_MAX = 10000


class RouteLookup:
    """``ask(tunnel_id)``: the registry's ``lookup`` script answer (raises ``RedisDown``);
    ``gate(tunnel_id)``: the lock its claims of that id take; ``outage()``: Redis is unreachable."""

    def __init__(self, config: ClusterConfig, local: LocalRegistry, keys: AccessKeys,
                 ask: Callable[[str], Awaitable[Any]], gate: Callable[[str], asyncio.Lock],
                 outage: Callable[[], bool], remote_route: Optional[RouteFactory]) -> None:
        self.config, self.node_id, self.remote_route = config, config.node_id, remote_route
        self.local, self.keys, self.ask, self.gate, self.outage = local, keys, ask, gate, outage
        #: monotonic: until then Redis may lack claims not re-asserted yet (after an outage or a loss)
        self.recovering_until = 0.0
        self.cache: Dict[str, Tuple[float, Optional[Route]]] = {}
        self.unreachable: Dict[str, str] = {}  # tunnel id -> why the last lookup could not reach it
        self.inflight: Dict[str, "asyncio.Task[Optional[Route]]"] = {}

    async def lookup(self, tunnel_id: str) -> Optional[Route]:
        route = self.local.lookup_local(tunnel_id)
        if route is not None:
            if self.unreachable:
                self.unreachable.pop(tunnel_id, None)
            return route
        hit = self.cache.get(tunnel_id)
        if hit is not None and hit[0] > time.monotonic() and not (hit[1] is not None and hit[1].stale):
            return hit[1]
        if self.outage():
            return None
        task = self.inflight.get(tunnel_id)
        if task is None:  # one Redis question per id, however many visitors wait for it
            task = self.inflight[tunnel_id] = asyncio.get_running_loop().create_task(self.resolve(tunnel_id))
            task.add_done_callback(lambda t: self.inflight.pop(tunnel_id, None))
        route = await asyncio.shield(task)
        if route is not None and route.stale:  # its node said it is leaving while Redis was asked
            route = await self.resolve(tunnel_id)  # once more: the id may have moved meanwhile
        return route

    async def resolve(self, tunnel_id: str) -> Optional[Route]:
        try:
            found = await self.ask(tunnel_id)
        except RedisDown:
            return None
        route: Optional[Route] = None
        why = ""  # why the tunnel, which exists, cannot be reached from here
        if isinstance(found, int) and found == 1:  # unknown to a Redis that lost its records lately
            why = "the cluster registry is recovering records (Redis restarted, or refused writes lately)"
        elif found and not as_text(found[0]):  # a pool: this node's members first, else the others'
            async with self.gate(tunnel_id):
                local = self.local.lookup_local(tunnel_id)
            if local is not None:
                return local
            route, why = await pool_route(self.remote_route, tunnel_id, member_nodes(found, self.node_id))
            if len(found) == 2:
                why = "every node of its pool has stopped; its clients reconnect to other nodes shortly"
        elif found:
            node, addr = as_text(found[0]), as_text(found[1])
            if node == self.node_id:  # claimed here just now: the claim finishes under its gate
                async with self.gate(tunnel_id):
                    local = self.local.lookup_local(tunnel_id)
                if local is not None:
                    return local  # never cached: lookup() asks the local sessions first anyway
                why = "" if addr else f"its node ({node}) has restarted; the tunnel reconnects shortly"  # (its old claim)
            elif not addr:  # its node died (or restarted): until the client reconnects elsewhere
                why = f"its node ({node}) has stopped; the tunnel reconnects to another node shortly"
            elif self.remote_route is not None:
                route, why = await self._remote(tunnel_id, node, addr, found)
        if why:  # the visitor is told so (503), not that there is no such tunnel (404)
            if len(self.unreachable) >= _CACHE_MAX:
                self.unreachable.clear()
            self.unreachable[tunnel_id] = why
        else:
            self.unreachable.pop(tunnel_id, None)
        if len(self.cache) >= _CACHE_MAX:
            now = time.monotonic()
            self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
        ttl = self.config.route_cache_ttl if route is not None else self.config.miss_cache_ttl
        self.cache[tunnel_id] = (time.monotonic() + ttl, route)
        return route

    async def _remote(self, tunnel_id: str, node: str, addr: str, found: Any) -> Tuple[Optional[Route], str]:
        assert self.remote_route is not None
        route: Optional[Route] = None
        why = ""
        try:  # its rules are checked here: unreadable ones never serve it unguarded
            published = self.keys.read(tunnel_id, node, found[2] if len(found) > 2 else None,
                                       len(found) > 3 and as_text(found[3]) == "1")
            extra = {"published": published} if published.access is not None else {}
            route = await self.remote_route(node, parse_addr(addr), tunnel_id, **extra)
        except UnreadableRules as exc:
            why = f"its access rules cannot be verified on this node: {exc}"
            if self.unreachable.get(tunnel_id) != why:  # once, not for every visitor
                log.warning("registry: tunnel %s on node %s not served here: %s", tunnel_id, node, why)
        except Exception as exc:  # pragma: no cover - a route factory that raises
            log.warning("registry: no route to node %s at %s for tunnel %s: %s", node, addr, tunnel_id, exc)
        if route is None and not why:  # the link said why in the log
            why = f"its node ({node}) cannot be reached from this node"
        return route, why

    def why_missing(self, tunnel_id: str) -> Optional[str]:
        """Why the last lookup of ``tunnel_id`` found no route when the tunnel may well exist (Redis
        down, or its node unreachable from here); None when there is no such tunnel."""
        if self.outage():
            return "the cluster registry is unreachable"
        why = self.unreachable.get(tunnel_id)
        if why is None and time.monotonic() < self.recovering_until:
            # Redis is back but may be empty: the owner of this id may not have re-asserted it yet
            return "the cluster registry is recovering from an outage"
        return why

    def invalidate(self, tunnel_id: str) -> None:
        """Forget the cached route of ``tunnel_id`` (it failed): the next lookup asks Redis."""
        self.cache.pop(tunnel_id, None)

    def cancel(self) -> None:
        for task in list(self.inflight.values()):
            task.cancel()
