"""Routes: where a tunnel is served, as an ingress sees it. ``LocalRoute`` is one session of this
process; ``PoolRoute`` is a pool of them (clients that passed ``--pool`` for one tunnel id), each
new stream on the next live member in turn; ``SpreadRoute`` spreads streams over other routes
(the cluster's routes to the other nodes of a pool). The cluster adds its route over a node link.

A route may be cached (per visitor connection, or for ``route_cache_ttl``), so a pool route picks
its member when a stream is opened, never when it is looked up: a member that left is skipped by
the very next stream.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple

from ..aio.session import Session
from ..aio.stream import VirtualStream
from ..errors import ConnectionLostError, FerroTunnelError
from ..frames import ErrorCode, Protocol, StreamPriority
from ..protocol.extensions import VISITOR_CAPABILITY, VISITOR_HEADER

__all__ = ["Route", "LocalRoute", "PoolRoute", "SpreadRoute", "open_on", "moved_away"]


class Route:
    """Where a tunnel is served. Subclasses: ``LocalRoute`` (a session of this process),
    ``PoolRoute`` (a pool of them), ``SpreadRoute`` and the cluster's route over a link to the
    node that owns the tunnel."""

    __slots__ = ()

    @property
    def tunnel_id(self) -> str:
        """The tunnel id this route leads to."""
        raise NotImplementedError

    def open_stream_nowait(self, protocol: Protocol, priority: StreamPriority, visitor: Any = None,
                           host: Optional[str] = None) -> VirtualStream:
        """A new stream to the tunnel. ``visitor`` (its address) and ``host`` (the HTTP Host) say
        who the stream is for; a route that carries the stream further passes them on."""
        raise NotImplementedError

    @property
    def stale(self) -> bool:
        """True when a cached copy of this route should not be used any more."""
        return False


def open_on(session: Session, protocol: Protocol, priority: StreamPriority, visitor: Any = None) -> VirtualStream:
    """A stream on a local session, with the visitor's address when the client asked for it."""
    peer = (visitor[0], visitor[1]) if isinstance(visitor, tuple) and len(visitor) >= 2 else None
    if peer is not None and VISITOR_CAPABILITY in session.capabilities:
        return session.open_stream_nowait(protocol, priority, ((VISITOR_HEADER, f"{peer[0]}:{peer[1]}"),),
                                          peername=peer)
    return session.open_stream_nowait(protocol, priority, peername=peer)


class LocalRoute(Route):
    """A tunnel served by one session of this process."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    @property
    def tunnel_id(self) -> str:
        """The tunnel id of its session."""
        return self.session.tunnel_id

    def open_stream_nowait(self, protocol: Protocol, priority: StreamPriority, visitor: Any = None,
                           host: Optional[str] = None) -> VirtualStream:
        """A new stream on the session (``open_on``: ``visitor``, a ``(host, port)``, goes with it
        to a client that asked for it; ``host`` is not needed locally). ConnectionLostError when
        the session is not connected, LimitExceededError at its stream limit."""
        return open_on(self.session, protocol, priority, visitor)

    def __repr__(self) -> str:
        return f"<LocalRoute {self.session!r}>"


def usable(session: Session) -> bool:
    return session.established and not session.is_closed


def _in_turn(items: Sequence[Any], start: int) -> Iterator[Tuple[int, Any]]:
    """(index, item) of every item once, round-robin from ``start`` (any int: taken modulo)."""
    n = len(items)
    for i in range(n):
        k = (start + i) % n
        yield k, items[k]


class PoolRoute(Route):
    """A tunnel served by a pool of sessions of this process: each new stream goes to the next
    established, open member (round-robin); a member that refuses the stream (closing, or at its
    stream limit) is passed over for the next one. ``members`` is oldest first; the registry adds
    and removes them."""

    __slots__ = ("_tunnel_id", "members", "_next")

    def __init__(self, tunnel_id: str) -> None:
        self._tunnel_id = tunnel_id
        self.members: List[Session] = []
        self._next = 0

    @property
    def tunnel_id(self) -> str:
        return self._tunnel_id

    @property
    def live(self) -> List[Session]:
        """The members a stream may go to now."""
        return [s for s in self.members if usable(s)]

    @property
    def session(self) -> Optional[Session]:
        """One member: the oldest established one, else the oldest."""
        return next((s for s in self.members if usable(s)), self.members[0] if self.members else None)

    def add(self, session: Session) -> None:
        if session not in self.members:
            self.members.append(session)

    def remove(self, session: Session) -> bool:
        """Forget ``session``; True if it was a member."""
        for i, member in enumerate(self.members):
            if member is session:
                del self.members[i]
                if i < self._next:
                    self._next -= 1
                return True
        return False

    def open_stream_nowait(self, protocol: Protocol, priority: StreamPriority, visitor: Any = None,
                           host: Optional[str] = None) -> VirtualStream:
        failed: Optional[FerroTunnelError] = None
        for k, session in _in_turn(self.members, self._next):
            if not usable(session):
                continue
            self._next = (k + 1) % len(self.members)
            try:
                return open_on(session, protocol, priority, visitor)
            except FerroTunnelError as exc:  # closing or at a limit: the next member may take it
                failed = exc
        raise failed or ConnectionLostError(f"no member of the pool for tunnel {self._tunnel_id} is connected")

    @property
    def stale(self) -> bool:
        return not any(usable(s) for s in self.members)

    def __repr__(self) -> str:
        return f"<PoolRoute {self._tunnel_id!r} members={len(self.members)}>"


class SpreadRoute(Route):
    """Streams spread round-robin over several routes to one tunnel (skipping stale ones): a
    cluster node without a member of a pool reaches the pool's other nodes this way."""

    __slots__ = ("_tunnel_id", "routes", "_next")

    def __init__(self, tunnel_id: str, routes: Sequence[Route]) -> None:
        self._tunnel_id = tunnel_id
        self.routes = list(routes)
        self._next = 0

    @property
    def tunnel_id(self) -> str:
        return self._tunnel_id

    def open_stream_nowait(self, protocol: Protocol, priority: StreamPriority, visitor: Any = None,
                           host: Optional[str] = None) -> VirtualStream:
        failed: Optional[FerroTunnelError] = None
        for k, route in _in_turn(self.routes, self._next):
            if route.stale:
                continue
            self._next = (k + 1) % len(self.routes)
            try:
                return route.open_stream_nowait(protocol, priority, visitor, host)
            except FerroTunnelError as exc:
                failed = exc
        raise failed or ConnectionLostError(f"no node of the pool for tunnel {self._tunnel_id} can be reached")

    @property
    def stale(self) -> bool:
        """Stale as soon as any of its routes is: the next lookup asks the registry again."""
        return any(r.stale for r in self.routes)

    def __repr__(self) -> str:
        return f"<SpreadRoute {self._tunnel_id!r} {self.routes!r}>"


def moved_away(registry: Any, tunnel_id: Optional[str], exc: BaseException, stream: Optional[VirtualStream]) -> bool:
    """Whether a stream's reset says its tunnel is no longer where the route led: the node the
    route went to has no session for it (``SESSION_NOT_FOUND`` over its link; the client moved to
    another node). The registry then forgets its cached route, so the next visitor asks again.
    Only a link's word counts (a stream on a connection this node dialed): a tunnel client that
    resets its streams with that code changes nothing."""
    if getattr(exc, "code", None) is not ErrorCode.SESSION_NOT_FOUND or stream is None or not stream.dialed:
        return False
    forget = getattr(registry, "invalidate", None)
    if forget is not None and tunnel_id is not None:
        forget(tunnel_id)
    return True
