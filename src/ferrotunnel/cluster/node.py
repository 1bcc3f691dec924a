"""A tunnel server as one node of a cluster: the Redis registry (who owns which tunnel id), the
node-link listener (visitors from other nodes for tunnels served here) and the link pool (this
node's visitors for tunnels served elsewhere), started and stopped together."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

from ..config import ClusterConfig, redact_url
from ..server.registry import Route
from .access_records import Published
from .links import LinkPool, LinkServer
from .redis_registry import RedisRegistry

__all__ = ["ClusterNode"]

log = logging.getLogger("ferrotunnel.cluster")


class ClusterNode:
    """Pass ``node.registry`` to the ``TunnelServer``; ``start`` before serving, ``drain`` on a
    graceful stop (other nodes may take this node's tunnels over at once), ``close`` at the end.

    ``node_bind`` is where the node-link listener binds; ``config.node_advertise`` is where the
    other nodes reach it (the same unless a balancer or NAT sits between nodes)."""

    def __init__(self, config: ClusterConfig, node_bind: Tuple[str, int], *, epoch: Optional[str] = None,
                 redis_client: Any = None) -> None:
        if not config.cluster_token:
            raise ValueError("a cluster node needs the cluster secret (ClusterConfig.cluster_token)")
        self.config = config
        self.links_out = LinkPool(config.node_id, config.cluster_token)
        self.registry = RedisRegistry(config, remote_route=self._remote_route, epoch=epoch, client=redis_client)
        self.links_in = LinkServer(config.node_id, config.cluster_token, node_bind, self.registry.lookup_local)

    async def _remote_route(self, node_id: str, address: Tuple[str, int], tunnel_id: str,
                            published: Optional[Published] = None) -> Optional[Route]:
        return await self.links_out.route(node_id, address, tunnel_id, published)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def link_address(self) -> Tuple[str, int]:
        return self.links_in.address

    async def start(self) -> None:
        await self.links_in.start()
        if self.config.node_advertise[1] == 0:  # port 0 (tests): advertise the port the links got
            self.registry.advertise = self.links_in.address
        await self.registry.start()
        log.info("node %s: cluster registry %s, node links on %s:%s (advertised as %s:%s)", self.node_id,
                 redact_url(self.config.redis_url), *self.links_in.address, *self.registry.advertise)

    async def drain(self) -> None:
        """Say this node is leaving: its tunnels may be taken over by other nodes at once (in
        Redis), and the nodes linked to it stop using their cached routes to it."""
        await self.registry.drain()
        told = self.links_in.announce_drain()
        log.info("node %s: draining; told %d linked nodes", self.node_id, told)

    def busy(self) -> bool:
        """Streams this node carries to other nodes (its visitors for their tunnels) are open."""
        return any(len(s.multiplexer) for s in self.links_out.links().values())

    async def close(self) -> None:
        await self.registry.close()
        await self.links_out.close()
        await self.links_in.close()

    def stats(self) -> Dict[str, Any]:
        """Figures for the metrics: streams carried in over links, links out, registry counters."""
        links = self.links_out.links()
        return {"links_in": dict(self.links_in.streams), "links_out": len(links),
                "streams_out": self.links_out.streams_out,
                "link_rtt": {peer: s.rtt for peer, s in links.items() if s.rtt is not None},
                "link_failures": self.links_out.failures, "registry": self.registry.stats,
                "outage": self.registry.outage, "draining": self.registry.draining}
