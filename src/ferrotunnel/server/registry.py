"""Who serves which tunnel id: the ``SessionRegistry`` seam, the in-process ``LocalRegistry``
(the default) and ``SessionStore``, the read-only view of the local sessions.

A registry maps a tunnel id to a ``Route``. Today a route is a session of this process
(``LocalRoute``); the type leaves room for a pool of local sessions and for a tunnel owned by
another node. Tunnels are resolved in two steps: the synchronous ``lookup_local`` first, so a
local route costs no await, then the registry's awaitable ``lookup`` only when the registry can
know of routes elsewhere (``Ingress.open_stream`` does this for every ingress; ``resolve`` below
is the same for code that can await).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Dict, Iterator, Optional, Protocol as TypingProtocol, Union

from ..aio.session import Session
from ..aio.stream import VirtualStream
from ..frames import Protocol, StreamPriority
from ..protocol.extensions import VISITOR_CAPABILITY, VISITOR_HEADER

__all__ = ["Route", "LocalRoute", "Claim", "SessionRegistry", "LocalRegistry", "SessionStore", "resolve",
           "first_with_capability"]


class Route:
    """Where a tunnel is served. Subclasses: ``LocalRoute`` (a session of this process) and the
    cluster's route over a link to the node that owns the tunnel."""

    __slots__ = ()

    @property
    def tunnel_id(self) -> str:
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


class LocalRoute(Route):
    """A tunnel served by one session of this process."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    @property
    def tunnel_id(self) -> str:
        return self.session.tunnel_id

    def open_stream_nowait(self, protocol: Protocol, priority: StreamPriority, visitor: Any = None,
                           host: Optional[str] = None) -> VirtualStream:
        session = self.session
        if isinstance(visitor, tuple) and len(visitor) >= 2 and VISITOR_CAPABILITY in session.capabilities:
            return session.open_stream_nowait(protocol, priority, ((VISITOR_HEADER, f"{visitor[0]}:{visitor[1]}"),))
        return session.open_stream_nowait(protocol, priority)

    def __repr__(self) -> str:
        return f"<LocalRoute {self.session!r}>"


@dataclass(frozen=True)
class Claim:
    """The answer to ``claim``: granted or not, and the stale local session it displaced, if any
    (the caller closes it). Refused with ``retry_after`` set, the id is not held by a live holder
    but is being handed over (its holder is stale, dead or draining): the client should try again
    after that many seconds, rather than be told the id is taken."""

    granted: bool
    replaced: Optional[Session] = None
    retry_after: Optional[float] = None
    #: Why it was refused, for the log and the client (no secret in it).
    reason: str = ""


#: Asked about the session holding a tunnel id: may a new claim replace it?
StalePredicate = Callable[[Session], bool]


class SessionRegistry(TypingProtocol):
    """The seam for a shared registry of tunnels. Every method that may cross the network is async."""

    #: True when ``lookup`` can find nothing that ``lookup_local`` did not (an in-process registry).
    local_only: bool

    async def claim(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None) -> Claim:
        """Take ``tunnel_id`` for ``session``, atomically; refused while a live owner holds it
        (unless ``stale`` says the local holder may be replaced)."""
        ...

    async def release(self, tunnel_id: str, session: Session) -> None:
        """Give ``tunnel_id`` up, if ``session`` holds it."""
        ...

    def session_ended(self, session: Session) -> None:
        """A local session has closed: forget it now (no new stream may be routed to it) and
        release its tunnel id (a shared registry does that part in the background)."""
        ...

    async def refresh(self, tunnel_id: str, session: Session) -> bool:
        """Keep a claim alive; False if ``session`` no longer holds it."""
        ...

    async def lookup(self, tunnel_id: str) -> Optional[Route]:
        ...

    def lookup_local(self, tunnel_id: str) -> Optional[Route]:
        """The route of an established local session for ``tunnel_id``, without waiting."""
        ...

    def local_session(self, tunnel_id: str) -> Optional[Session]:
        """The local session holding ``tunnel_id`` (established or not), if any."""
        ...

    def local_sessions(self) -> Collection[Session]:
        """The sessions of this process, oldest first."""
        ...


class LocalRegistry:
    """The in-process registry: a dict of tunnel ids to sessions of this server."""

    local_only = True

    def __init__(self) -> None:
        self._routes: Dict[str, LocalRoute] = {}
        self._by_id: Dict[uuid.UUID, Session] = {}

    async def claim(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None) -> Claim:
        return self.claim_nowait(tunnel_id, session, stale)

    def claim_nowait(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None) -> Claim:
        replaced = None
        current = self._routes.get(tunnel_id)
        if current is not None:
            holder = current.session
            if not holder.is_closed and (stale is None or not stale(holder)):
                return Claim(False)
            self._drop(tunnel_id, holder)
            replaced = holder
        self._routes[tunnel_id] = LocalRoute(session)
        self._by_id[session.id] = session
        return Claim(True, replaced)

    async def release(self, tunnel_id: str, session: Session) -> None:
        self._drop(tunnel_id, session)

    def session_ended(self, session: Session) -> None:
        self._drop(session.tunnel_id, session)

    def _drop(self, tunnel_id: str, session: Session) -> None:
        route = self._routes.get(tunnel_id)
        if route is not None and route.session is session:
            del self._routes[tunnel_id]
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]

    async def refresh(self, tunnel_id: str, session: Session) -> bool:
        route = self._routes.get(tunnel_id)
        return route is not None and route.session is session

    async def lookup(self, tunnel_id: str) -> Optional[Route]:
        return self.lookup_local(tunnel_id)

    def lookup_local(self, tunnel_id: str) -> Optional[Route]:
        route = self._routes.get(tunnel_id)
        return route if route is not None and route.session.established else None

    def local_session(self, tunnel_id: str) -> Optional[Session]:
        route = self._routes.get(tunnel_id)
        return route.session if route is not None else None

    def get(self, session_id: uuid.UUID) -> Optional[Session]:
        return self._by_id.get(session_id)

    def local_sessions(self) -> Collection[Session]:
        return self._by_id.values()


def resolve(registry: SessionRegistry, tunnel_id: str) -> Union[Optional[Route], Awaitable[Optional[Route]]]:
    """A route for ``tunnel_id``: the local one at once (or None when the registry knows only
    local routes), else an awaitable of the registry's answer."""
    route = registry.lookup_local(tunnel_id)
    if route is not None or registry.local_only:
        return route
    return registry.lookup(tunnel_id)


def first_with_capability(registry: SessionRegistry, capability: str) -> Optional[Route]:
    """The oldest established local session that announced ``capability`` (the unnamed TCP ingress)."""
    for s in registry.local_sessions():
        if capability in s.capabilities and s.established:
            return LocalRoute(s)
    return None


class SessionStore:
    """Live sessions of this server, by session id, by tunnel id and by capability (a read-only
    view over the server's registry)."""

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry

    def get(self, session_id: uuid.UUID) -> Optional[Session]:
        return next((s for s in self._registry.local_sessions() if s.id == session_id), None)

    def get_by_tunnel_id(self, tunnel_id: str) -> Optional[Session]:
        return self._registry.local_session(tunnel_id)

    def find_with_capability(self, capability: str) -> Optional[Session]:
        """The first live session (oldest first) that announced ``capability``."""
        route = first_with_capability(self._registry, capability)
        return route.session if isinstance(route, LocalRoute) else None

    def __len__(self) -> int:
        return len(self._registry.local_sessions())

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._registry.local_sessions()))

    def __contains__(self, session: object) -> bool:
        return isinstance(session, Session) and self.get(session.id) is session
