"""Pools in the Redis registry: the arguments of the pool scripts (see ``scripts``), the answers
they give, and the route to a pool's other nodes.

A pool's record names every node holding at least one of its members; each node refreshes its
own membership with its claims and removes it (compare-and-delete) when its last local member
leaves. A node with an established local member serves visitors itself (``lookup_local`` comes
first); another node spreads its visitors over the member nodes that are up (draining ones only
when no other is left), one link each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, List, Optional, Sequence, Set, Tuple

from ..aio.session import Session
from ..config import ClusterConfig
from ..server.registry import POOL_REFUSAL, SOLO_REFUSAL, Claim, LocalRegistry
from ..server.routes import Route, SpreadRoute
from .redis_base import RedisDown, RegistryStats, as_text, parse_addr, to_ms

__all__ = ["pool_claim_args", "refusal", "member_nodes", "pool_route", "PoolRecords"]

#: Keys per script call when many pools are refreshed or left at once.
_BATCH = 500

log = logging.getLogger("ferrotunnel.cluster")

#: ``remote_route(node_id, (host, port), tunnel_id)`` (the registry's ``RouteFactory``).
_Factory = Callable[[str, Tuple[str, int], str], Awaitable[Optional[Route]]]


def pool_claim_args(config: ClusterConfig, node_id: str, epoch: str, node_prefix: str) -> List[Any]:
    """ARGV of the ``pool_claim`` script (its staleness bounds are the solo claim's)."""
    return [node_id, epoch, to_ms(config.claim_ttl), node_prefix, to_ms(2 * config.claim_refresh),
            to_ms(2 * config.node_refresh)]


def refusal(verdict: str, node: str) -> Optional[Claim]:
    """The refusal for a pool/solo mismatch a claim script answered, else None."""
    if verdict == "pool":
        return Claim(False, reason=f"{POOL_REFUSAL} (a pool member is on node {node})")
    if verdict == "solo":
        return Claim(False, reason=f"{SOLO_REFUSAL} (it is on node {node})")
    return None


def member_nodes(found: Sequence[Any], node_id: str) -> List[Tuple[str, str]]:
    """The other member nodes of a pool from a ``lookup`` answer ``['', '', node, addr, state,
    ...]``: ``(node, addr)``, those up first, then those draining."""
    up: List[Tuple[str, str]] = []
    draining: List[Tuple[str, str]] = []
    for i in range(2, len(found) - 2, 3):
        node, addr, state = as_text(found[i]), as_text(found[i + 1]), as_text(found[i + 2])
        if node != node_id and addr:
            (draining if state == "draining" else up).append((node, addr))
    return up or draining


async def pool_route(remote_route: Optional[_Factory], tunnel_id: str,
                     nodes: Sequence[Tuple[str, str]]) -> Tuple[Optional[Route], str]:
    """A route spreading streams over the links to ``nodes`` (those reachable), and why there is
    none when none is (empty when the pool has no other node)."""
    if not nodes:
        return None, ""
    if remote_route is None:
        return None, "its pool's nodes cannot be reached from this node"

    async def one(node: str, addr: str) -> Optional[Route]:
        try:
            return await remote_route(node, parse_addr(addr), tunnel_id)
        except Exception as exc:  # pragma: no cover - a route factory that raises
            log.warning("registry: no route to node %s at %s for tunnel %s: %s", node, addr, tunnel_id, exc)
            return None

    found = await asyncio.gather(*(one(node, addr) for node, addr in nodes))
    routes = [r for r in found if r is not None]
    if not routes:
        return None, "its pool's nodes cannot be reached from this node"
    return (routes[0] if len(routes) == 1 else SpreadRoute(tunnel_id, routes)), ""


#: ``run(script, keys, args)``: one script call (RedisDown when Redis did not answer).
Run = Callable[[str, List[str], List[Any]], Awaitable[Any]]
#: ``batch(script, [(keys, args), ...])``: one script for many keys, pipelined.
Batch = Callable[[str, List[Tuple[List[str], List[Any]]]], Awaitable[List[Any]]]


class PoolRecords:
    """This node's memberships of pools in Redis, for its ``RedisRegistry``: joined by the claim,
    refreshed with the claims, left (compare-and-delete) when the last local member goes.
    ``lost(session, holder)`` and ``close_local(session, why)`` are the registry's: a member
    whose id another node's solo session holds is handled as a solo session that lost its id."""

    def __init__(self, local: LocalRegistry, config: ClusterConfig, node_id: str, epoch: str, node_prefix: str,
                 key: Callable[[str], str], run: Run, batch: Batch, stats: RegistryStats,
                 lost: Callable[[Session, str], None], close_local: Callable[[Session, str], bool],
                 recovery: Callable[[bool], Tuple[List[str], List[Any]]]) -> None:
        self._local = local
        #: ``recovery(reassert)``: the KEYS and ARGV tails of a claim that may meet lost records
        self._recovery = recovery
        self._claim_args = pool_claim_args(config, node_id, epoch, node_prefix)
        self._owner = [node_id, epoch]
        self._refresh_args = [node_id, epoch, to_ms(config.claim_ttl)]
        self._key, self._run, self._batch, self._stats = key, run, batch, stats
        self._lost, self._close_local = lost, close_local
        #: pools this node left while Redis was down: left in Redis when it is back
        self.orphans: Set[str] = set()

    def claim_call(self, tunnel_id: str, reassert: bool = False) -> Tuple[List[str], List[Any]]:
        keys, args = self._recovery(reassert)
        return [self._key(tunnel_id)] + keys, self._claim_args + args

    async def leave(self, tunnel_id: str) -> None:
        """The last local member of ``tunnel_id`` left: take this node off the pool's record."""
        if self._local.members(tunnel_id):
            return  # a member joined meanwhile
        try:
            await self._run("pool_release", [self._key(tunnel_id)], self._owner)
        except RedisDown:
            self.orphans.add(tunnel_id)

    async def leave_orphans(self) -> None:
        left, self.orphans = self.orphans, set()
        for tunnel_id in sorted(left):
            await self.leave(tunnel_id)

    async def refresh(self, pools: Sequence[str]) -> List[str]:
        """Refresh this node's membership of ``pools`` (one call per ``_BATCH``); a pool whose id
        a solo session of another node now holds loses its local members. The holders, '' if none."""
        out: List[str] = []
        for i in range(0, len(pools), _BATCH):
            part = list(pools[i:i + _BATCH])
            holders = [as_text(h) for h in await self._run("pool_refresh", [self._key(t) for t in part],
                                                           self._refresh_args)]
            out += holders
            for tunnel_id, holder in zip(part, holders):
                if not self._local.members(tunnel_id):  # its last member left meanwhile
                    await self.leave(tunnel_id)
                for member in self._local.members(tunnel_id) if holder else ():
                    self._lost(member, holder)
        return out

    async def reconcile(self, pools: Sequence[str], unreconciled: Set[str]) -> None:
        """Join in Redis the pools joined without it; a solo session of another live node keeps
        its id (one owner) and the local members are closed."""
        answers = await self._batch("pool_claim", [self.claim_call(t, True) for t in pools])
        for tunnel_id, answer in zip(pools, answers):
            verdict, node, _ = (as_text(v) for v in answer)
            if verdict == "pending":
                continue  # asked again at the next refresh
            unreconciled.discard(tunnel_id)
            if verdict in ("dead", "restarted", "draining"):
                self._stats.takeovers += 1
            for member in self._local.members(tunnel_id) if verdict == "solo" else ():
                if self._close_local(member, f"tunnel id {tunnel_id} is held by a client that is not in a pool "
                                             f"on node {node}; this pool member was accepted while Redis was "
                                             f"unreachable and is closed so that one owner remains"):
                    self._stats.conflicts += 1

    async def release_all(self, pools: Sequence[str]) -> None:
        """This node leaves every pool in ``pools`` (closing)."""
        for i in range(0, len(pools), _BATCH):
            await self._run("pool_release", [self._key(t) for t in pools[i:i + _BATCH]], self._owner)
