"""``IndexedPortLeases``: the server's ports on request (``PortLeases``) with the leased ports
indexed by tunnel id, so that the URLs told to a new session (its handshake, or a Register)
name its own ports without a walk over every port leased to every session (issue 14 row 8)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from .ingress import PortLeases
from .public import PublicEndpoint

__all__ = ["IndexedPortLeases"]


class IndexedPortLeases(PortLeases):
    """``PortLeases`` that also knows which ports route to which tunnel id (``endpoints_for``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Leased ports by the (lower-case) tunnel id they route to, in the order they were bound.
        self._by_tunnel: Dict[str, Dict[int, None]] = {}
        self._tunnel_of: Dict[int, str] = {}

    async def lease(self, session: Any, port: int) -> int:
        bound = await super().lease(session, port)
        ingress = self.ingresses.get(bound)
        if ingress is not None and ingress.tunnel_id is not None:
            key = ingress.tunnel_id.lower()
            self._by_tunnel.setdefault(key, {})[bound] = None
            self._tunnel_of[bound] = key
        return bound

    def release(self, session: Any) -> None:
        port = self.ports.get(session)
        super().release(session)
        if port is not None and port not in self.ingresses:
            self._forget(port)

    def _forget(self, port: int) -> None:
        key = self._tunnel_of.pop(port, None)
        same = self._by_tunnel.get(key) if key is not None else None
        if key is not None and same is not None:
            same.pop(port, None)
            if not same:
                del self._by_tunnel[key]

    def indexed(self) -> int:
        """How many leased ports the index holds (as many as are leased, once their binds are done)."""
        return len(self._tunnel_of)

    def endpoints_for(self, tunnel_id: str) -> Tuple[PublicEndpoint, ...]:
        """The tcp endpoints of the ports leased for ``tunnel_id``: those of ``endpoints()`` that
        route to it, found without reading the others."""
        same = self._by_tunnel.get(tunnel_id.lower())
        if not same:
            return ()
        found = []
        for port in same:
            ingress = self.ingresses.get(port)
            if ingress is not None:
                found.append(PublicEndpoint("tcp", self.public_host, port, ingress.tunnel_id))
        return tuple(found)
