"""One cluster node in this process (a ``ClusterNode``, its ``TunnelServer`` and an HTTP ingress)
on a real redis-server: the harness the in-process cluster tests share."""

from __future__ import annotations

from typing import Any, Optional

import ferrotunnel as ft
from ferrotunnel.config import ClusterConfig

#: Cluster timings short enough for tests and long enough for a loaded CI machine.
TIMING = dict(node_ttl=2.0, node_refresh=0.5, claim_ttl=3.0, claim_refresh=1.0)


class InProcessNode:
    """``name``'s node, tunnel server (``token``) and HTTP ingress, all on ephemeral ports;
    ``timing`` overrides ``TIMING`` and sets other ``ClusterConfig`` fields (e.g. route_cache_ttl)."""

    def __init__(self, name: str, redis_url: str, *, token: str, secret: str, key_prefix: Optional[str] = None,
                 **timing: Any) -> None:
        from ferrotunnel.cluster.node import ClusterNode

        extra = {"key_prefix": key_prefix} if key_prefix is not None else {}
        cfg = ClusterConfig(redis_url=redis_url, node_id=name, node_advertise=("127.0.0.1", 0), cluster_token=secret,
                            **extra, **{**TIMING, **timing})
        self.name = name
        self.node = ClusterNode(cfg, ("127.0.0.1", 0))
        self.server = ft.TunnelServer(("127.0.0.1", 0), token, registry=self.node.registry)
        self.http = ft.HttpIngress(self.server, ("127.0.0.1", 0))

    async def start(self) -> None:
        await self.node.start()  # advertises the port its link listener got (0 in the config above)
        await self.server.start()
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()
        await self.server.close()
        await self.node.close()
