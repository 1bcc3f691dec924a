"""``IndexedPortLeases``: the server's ports on request (``PortLeases``) with the leased ports
indexed by tunnel id, so that the URLs told to a new session (its handshake, or a Register)
name its own ports without a walk over every port leased to every session (issue 14 row 8);
leases counted per source address (``max_ports_per_address``); any free port of the range
found by random probes, not by a list of the whole range."""

from __future__ import annotations

import random
from typing import Any, Dict, Set, Tuple

from ..addr import address_key
from .admission import shown_id
from .ingress import PortLeases, PortUnavailable
from .public import PublicEndpoint

__all__ = ["IndexedPortLeases", "PortQuotaExceeded"]


class PortQuotaExceeded(PortUnavailable):
    """The session's address holds ``max_ports_per_address`` ports already (a Register is
    answered QuotaExceeded; a handshake is refused RateLimited with the reason: the client
    retries, and gets its port once one of the address's tunnels with a port has ended)."""


class IndexedPortLeases(PortLeases):
    """``PortLeases`` that also knows which ports route to which tunnel id (``endpoints_for``),
    and how many ports each source address holds (``held``; at most ``max_ports_per_address``)."""

    #: Random picks, at most, when any free port of the range is asked for; then the range is
    #: scanned from a random place (binds tried stay at most ``MAX_TRIES`` in all).
    MAX_PROBES = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Leased ports by the (lower-case) tunnel id they route to, in the order they were bound.
        self._by_tunnel: Dict[str, Dict[int, None]] = {}
        self._tunnel_of: Dict[int, str] = {}
        #: Ports held (leased, or being bound) by address key (``addr.address_key``), and
        #: the key each such session is counted under.
        self._by_address: Dict[str, int] = {}
        self._address_of: Dict[Any, str] = {}

    def held(self, peer: Any) -> int:
        """How many ports the address of ``peer`` holds (leased, or being bound), counted as
        ``max_ports_per_address`` counts them."""
        return self._by_address.get(address_key(peer), 0)

    async def lease(self, session: Any, port: int) -> int:
        """Bind ``port`` (0: any free one of the range) for ``session``; the port bound, or
        PortUnavailable with the reason (PortQuotaExceeded over ``max_ports_per_address``)."""
        why = self.refusal(port)
        if why is not None or self.range is None:
            raise PortUnavailable(why)
        self._count(session)  # before any await: concurrent handshakes from one address see it
        try:
            bound = await (super().lease(session, port) if port else self._lease_any(session))
        except BaseException:  # refused, or cancelled with its handshake: the count goes back down
            self._uncount(session)
            raise
        ingress = self.ingresses.get(bound)
        if ingress is not None and ingress.tunnel_id is not None:
            key = ingress.tunnel_id.lower()
            self._by_tunnel.setdefault(key, {})[bound] = None
            self._tunnel_of[bound] = key
        return bound

    def _count(self, session: Any) -> None:
        limit = self.server.config.max_ports_per_address
        who = address_key(session.peer_address)
        held = self._by_address.get(who, 0)
        if held >= limit:
            raise PortQuotaExceeded(
                f"tunnel id {shown_id(session.tunnel_id)!r}: this address holds {held} ports on request already "
                f"(max_ports_per_address={limit}): end one of its tunnels with a port, or ask the operator to raise it")
        self._by_address[who] = held + 1
        self._address_of[session] = who

    def _uncount(self, session: Any) -> None:
        who = self._address_of.pop(session, None)
        if who is None:
            return
        n = self._by_address.get(who, 0) - 1
        if n > 0:
            self._by_address[who] = n
        else:
            self._by_address.pop(who, None)

    async def _lease_any(self, session: Any) -> int:
        """Any free port of the range: up to ``MAX_PROBES`` random picks, then a scan from a random
        place (only when most of the range is leased); at most ``MAX_TRIES`` binds in all."""
        assert self.range is not None
        lo, hi = self.range
        size = hi - lo + 1
        tried: Set[int] = set()

        def candidates() -> Any:
            for _ in range(min(self.MAX_PROBES, 2 * size)):
                yield random.randint(lo, hi)
            start = random.randrange(size)
            for i in range(size):
                yield lo + (start + i) % size

        for p in candidates():
            if p in tried or p in self.ingresses:
                continue
            tried.add(p)
            try:
                return await PortLeases.lease(self, session, p)  # (that one port, as asked for by number)
            except PortUnavailable:
                if len(tried) >= self.MAX_TRIES:
                    break
        raise PortUnavailable(f"no free port in this server's range {lo}-{hi}")

    def release(self, session: Any) -> None:
        port = self.ports.get(session)
        super().release(session)
        self._uncount(session)
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
