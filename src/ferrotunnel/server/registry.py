"""Who serves which tunnel id: the ``SessionRegistry`` seam, the in-process ``LocalRegistry``
(the default) and ``SessionStore``, the read-only view of the local sessions.

A registry maps a tunnel id to a ``Route`` (see ``routes``): a session of this process
(``LocalRoute``), a pool of them (``PoolRoute``: clients that all claimed the id with ``pool=True``;
each new stream goes to the next member), or a tunnel served by another node. Tunnels are resolved in two steps: the synchronous ``lookup_local`` first, so a
local route costs no await, then the registry's awaitable ``lookup`` only when the registry can
know of routes elsewhere (``Ingress.open_stream`` does this for every ingress; ``resolve`` below
is the same for code that can await).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Dict, Iterator, List, Optional, Protocol as TypingProtocol, Union

from ..access import access_from_capabilities
from ..aio.session import Session
from .routes import LocalRoute, PoolRoute, Route, usable
from .session_index import LocalSessions

__all__ = ["Route", "LocalRoute", "PoolRoute", "Claim", "SessionRegistry", "LocalRegistry", "SessionStore",
           "LocalSessions", "resolve", "first_with_capability", "POOL_REFUSAL", "SOLO_REFUSAL", "ACCESS_REFUSAL"]

#: Why a claim is refused when the id is served by a pool and the claim is not one (and the other
#: way round): said to the client, which can do what it says.
POOL_REFUSAL = "served by a pool; pass --pool to join it"
SOLO_REFUSAL = "held by a client that is not in a pool; a pool (--pool) cannot join it"
#: A pool's members share one set of access rules (the ingress checks a visitor before it knows
#: which member will serve it).
ACCESS_REFUSAL = ("its pool's members have other access rules (protocol, basic_auth, allow): every member of a "
                  "pool needs the same ones")


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

    async def claim(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None, *,
                    pool: bool = False) -> Claim:
        """Take ``tunnel_id`` for ``session``, atomically; refused while a live owner holds it
        (unless ``stale`` says the local holder may be replaced). ``pool``: join the pool that
        serves the id (or start one); a pool claim on an id held by a solo client, or a solo claim
        on a pool's id, is refused with ``reason`` set (``SOLO_REFUSAL`` / ``POOL_REFUSAL``)."""
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
        """The route to ``tunnel_id`` wherever it is served (here, or on another node for a shared
        registry); None when no one serves it. May cross the network, so callers try
        ``lookup_local`` first; an error from a shared store reaches the caller (an ingress treats
        it as no route)."""
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
    """The in-process registry: a dict of tunnel ids to routes of this server's sessions (a
    ``LocalRoute`` for a solo client, a ``PoolRoute`` for a pool)."""

    local_only = True

    def __init__(self) -> None:
        self._routes: Dict[str, Union[LocalRoute, PoolRoute]] = {}
        self._sessions = LocalSessions()

    async def claim(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None, *,
                    pool: bool = False) -> Claim:
        """``claim_nowait`` behind the awaitable signature of ``SessionRegistry.claim``."""
        return self.claim_nowait(tunnel_id, session, stale, pool=pool)

    def refusal(self, tunnel_id: str, stale: Optional[StalePredicate] = None, *, pool: bool = False,
                session: Optional[Session] = None) -> Optional[Claim]:
        """The refusal ``claim_nowait`` would give now to ``session``, or None if it would grant it."""
        current = self._routes.get(tunnel_id)
        if isinstance(current, PoolRoute):
            live = [s for s in current.members if not s.is_closed]
            if not pool and live:
                return Claim(False, reason=POOL_REFUSAL)
            fresh = [s for s in live if stale is None or not stale(s)]  # stale members are replaced anyway
            if fresh and session is not None and _access(fresh[0]) != _access(session):
                return Claim(False, reason=ACCESS_REFUSAL)
        elif current is not None:
            holder = current.session
            if not holder.is_closed and (stale is None or not stale(holder)):
                return Claim(False, reason=SOLO_REFUSAL if pool else "")
        return None

    def claim_nowait(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None, *,
                     pool: bool = False) -> Claim:
        """``claim`` without waiting. A solo holder is replaced when it is closed or ``stale`` says
        so (by a solo or a pool claim). A pool is joined by a pool claim (closed members are
        forgotten, and the first one ``stale`` names is replaced: a member that reconnects takes
        its silent old session's place); a solo claim is refused while any member is open."""
        refused = self.refusal(tunnel_id, stale, pool=pool, session=session)
        if refused is not None:
            return refused
        replaced = None
        current = self._routes.get(tunnel_id)
        if isinstance(current, PoolRoute) and pool:
            for member in list(current.members):  # (members with other rules can only be stale ones here)
                other_rules = _access(member) != _access(session)
                if member.is_closed or ((replaced is None or other_rules) and stale is not None and stale(member)):
                    self._drop(tunnel_id, member)
                    if not member.is_closed:
                        replaced = member
            current = self._routes.get(tunnel_id)
        elif current is not None:  # a closed or stale solo holder, or a pool of closed members
            holders = current.members if isinstance(current, PoolRoute) else [current.session]
            for holder in list(holders):
                self._drop(tunnel_id, holder)
            replaced = next((h for h in holders if not h.is_closed), holders[0] if holders else None)
            current = None
        if pool:
            if not isinstance(current, PoolRoute):
                current = self._routes[tunnel_id] = PoolRoute(tunnel_id)
            current.add(session)
            self._sessions.pool_changed(tunnel_id)
        else:
            self._routes[tunnel_id] = LocalRoute(session)
        self._sessions.add(session)
        return Claim(True, replaced)

    def is_pool(self, tunnel_id: str) -> bool:
        """True while ``tunnel_id`` is served by a pool of this process."""
        return isinstance(self._routes.get(tunnel_id), PoolRoute)

    def members(self, tunnel_id: str) -> List[Session]:
        """The local sessions holding ``tunnel_id`` (one unless it is a pool), oldest first."""
        route = self._routes.get(tunnel_id)
        if route is None:
            return []
        return list(route.members) if isinstance(route, PoolRoute) else [route.session]

    async def release(self, tunnel_id: str, session: Session) -> None:
        """Give ``tunnel_id`` up if ``session`` holds it (alone, or as one member of its pool: the
        pool stays while it has members); ``session`` is forgotten by its id either way."""
        self._drop(tunnel_id, session)

    def session_ended(self, session: Session) -> None:
        """``session`` closed: ``release`` of its tunnel id, at once (no await needed here)."""
        self._drop(session.tunnel_id, session)

    def _drop(self, tunnel_id: str, session: Session) -> None:
        route = self._routes.get(tunnel_id)
        if isinstance(route, PoolRoute):
            if route.remove(session):
                self._sessions.pool_changed(tunnel_id)
                if not route.members:
                    del self._routes[tunnel_id]
        elif route is not None and route.session is session:
            del self._routes[tunnel_id]
        self._sessions.discard(session)

    async def refresh(self, tunnel_id: str, session: Session) -> bool:
        """True while ``session`` holds ``tunnel_id`` (alone or in its pool); an in-process claim
        does not expire, so nothing is renewed."""
        return any(s is session for s in self.members(tunnel_id))

    async def lookup(self, tunnel_id: str) -> Optional[Route]:
        """``lookup_local``: an in-process registry knows no route elsewhere."""
        return self.lookup_local(tunnel_id)

    def lookup_local(self, tunnel_id: str) -> Optional[Route]:
        """The route streams for ``tunnel_id`` can take now: the ``LocalRoute`` of its session
        once the handshake is done, or its ``PoolRoute`` while a member can take a stream; None
        otherwise."""
        route = self._routes.get(tunnel_id)
        if isinstance(route, PoolRoute):
            return route if not route.stale else None
        return route if route is not None and route.session.established else None

    def local_session(self, tunnel_id: str) -> Optional[Session]:
        """The session holding ``tunnel_id``, established or not (for a pool: its oldest
        established member, else its oldest); None if no one holds it."""
        route = self._routes.get(tunnel_id)
        return route.session if route is not None else None

    def get(self, session_id: uuid.UUID) -> Optional[Session]:
        """The session with id ``session_id`` that holds a tunnel id here, or None."""
        return self._sessions.get(session_id)

    def local_sessions(self) -> LocalSessions:
        """The sessions holding a tunnel id here, in the order of their claims: a live view, which
        changes as sessions come and go (copy it to iterate across an await), indexed by session
        id, tunnel id and capability (see ``LocalSessions``)."""
        return self._sessions


def _access(session: Session) -> object:
    return access_from_capabilities(tuple(session.capabilities))


def resolve(registry: SessionRegistry, tunnel_id: str) -> Union[Optional[Route], Awaitable[Optional[Route]]]:
    """A route for ``tunnel_id``: the local one at once (or None when the registry knows only
    local routes), else an awaitable of the registry's answer."""
    route = registry.lookup_local(tunnel_id)
    if route is not None or registry.local_only:
        return route
    return registry.lookup(tunnel_id)


def first_with_capability(registry: SessionRegistry, capability: str) -> Optional[Route]:
    """The oldest established local session that announced ``capability`` (the unnamed TCP
    ingress); its pool's route when it is in a pool whose live members all announced it. With
    a ``LocalSessions`` view (``LocalRegistry``, and registries that wrap one) this costs no scan
    of the sessions that did not announce it."""
    sessions = registry.local_sessions()
    candidates = sessions.with_capability(capability) if isinstance(sessions, LocalSessions) else sessions
    for s in candidates:
        if capability in s.capabilities and s.established:
            route = registry.lookup_local(s.tunnel_id)
            if isinstance(route, PoolRoute):  # every live member announced it
                lacking = (sessions.members_lacking(route, capability) if isinstance(sessions, LocalSessions)
                           else [m for m in route.members if capability not in m.capabilities])
                if not any(usable(m) for m in lacking):
                    return route
            return LocalRoute(s)
    return None


class SessionStore:
    """Live sessions of this server, by session id, by tunnel id and by capability (a read-only
    view over the server's registry)."""

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry

    def get(self, session_id: uuid.UUID) -> Optional[Session]:
        """The local session whose ``id`` is ``session_id`` (a ``uuid.UUID``), or None."""
        sessions = self._registry.local_sessions()
        if isinstance(sessions, LocalSessions):
            return sessions.get(session_id)
        return next((s for s in sessions if s.id == session_id), None)

    def get_by_tunnel_id(self, tunnel_id: str) -> Optional[Session]:
        """The local session holding ``tunnel_id``, established or not (for a pool, one member:
        see ``LocalRegistry.local_session``), or None; never a session of another node."""
        return self._registry.local_session(tunnel_id)

    def find_with_capability(self, capability: str) -> Optional[Session]:
        """The first live session (oldest first) that announced ``capability``."""
        route = first_with_capability(self._registry, capability)
        return route.session if isinstance(route, (LocalRoute, PoolRoute)) else None

    def __len__(self) -> int:
        return len(self._registry.local_sessions())

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._registry.local_sessions()))

    def __contains__(self, session: object) -> bool:
        return isinstance(session, Session) and self.get(session.id) is session
