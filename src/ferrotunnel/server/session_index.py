"""``LocalSessions``: the sessions holding a tunnel id in this process, in the order of their
claims, with the indexes the handshake and stream-open paths need, so that neither costs
O(number of sessions): by session id, by tunnel id, and by capability (built on first use for a
capability, then kept up to date as sessions come and go).

It is what ``LocalRegistry.local_sessions()`` returns (a live view), so a registry that wraps a
``LocalRegistry`` and hands its ``local_sessions()`` on (the cluster's) gives the same indexes.
"""

from __future__ import annotations

import uuid
from typing import Any, Collection, Dict, Iterable, Iterator, List, Optional, Tuple

from ..aio.session import Session

__all__ = ["LocalSessions", "MAX_INDEXED_CAPABILITIES"]

#: Capabilities indexed at once (``with_capability``); a further one is answered by a scan.
MAX_INDEXED_CAPABILITIES = 16


class LocalSessions(Collection[Session]):
    """Sessions by id, oldest claim first. ``add``/``discard`` are the registry's; the rest reads."""

    def __init__(self) -> None:
        self._by_id: Dict[uuid.UUID, Session] = {}
        self._by_tunnel: Dict[str, Dict[uuid.UUID, Session]] = {}
        self._by_capability: Dict[str, Dict[uuid.UUID, Session]] = {}
        #: By pool tunnel id, by capability: (the pool's route, its members without the capability).
        self._pool_lacking: Dict[str, Dict[str, Tuple[Any, List[Session]]]] = {}

    def add(self, session: Session) -> None:
        """Index ``session`` (a session already indexed under its id keeps its place)."""
        sid = session.id
        old = self._by_id.get(sid)
        if old is not None and old is not session:
            self._unindex(old)
        self._by_id[sid] = session
        self._by_tunnel.setdefault(session.tunnel_id, {})[sid] = session
        if self._by_capability:  # (read only once a capability was asked for)
            caps = session.capabilities
            for capability, index in self._by_capability.items():
                if capability in caps:
                    index[sid] = session

    def discard(self, session: Session) -> None:
        """Forget ``session`` if it is the one indexed under its id."""
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
            self._unindex(session)

    def _unindex(self, session: Session) -> None:
        sid = session.id
        same = self._by_tunnel.get(session.tunnel_id)
        if same is not None and same.get(sid) is session:
            del same[sid]
            if not same:
                del self._by_tunnel[session.tunnel_id]
        for index in self._by_capability.values():
            if index.get(sid) is session:
                del index[sid]

    def get(self, session_id: uuid.UUID) -> Optional[Session]:
        """The session with id ``session_id``, or None."""
        return self._by_id.get(session_id)

    def holding(self, tunnel_id: str) -> List[Session]:
        """The sessions whose tunnel id is ``tunnel_id``, oldest claim first."""
        same = self._by_tunnel.get(tunnel_id)
        return list(same.values()) if same else []

    def with_capability(self, capability: str) -> Iterable[Session]:
        """The sessions that announced ``capability``, oldest claim first (a live view: copy it
        to iterate across an await)."""
        index = self._by_capability.get(capability)
        if index is None:
            if len(self._by_capability) >= MAX_INDEXED_CAPABILITIES:
                return [s for s in self._by_id.values() if capability in s.capabilities]
            index = self._by_capability[capability] = {sid: s for sid, s in self._by_id.items()
                                                       if capability in s.capabilities}
        return index.values()

    def pool_changed(self, tunnel_id: str) -> None:
        """The registry added or removed a member of the pool for ``tunnel_id`` (or the pool)."""
        self._pool_lacking.pop(tunnel_id, None)

    def members_lacking(self, route: Any, capability: str) -> List[Session]:
        """The members of pool ``route`` (a ``PoolRoute`` of the registry that keeps this view,
        which calls ``pool_changed`` whenever the members change) that did not announce
        ``capability``: computed once per change of the members, not for every stream."""
        per = self._pool_lacking.get(route.tunnel_id)
        cached = per.get(capability) if per is not None else None
        if cached is not None and cached[0] is route:
            return cached[1]
        lacking = [m for m in route.members if capability not in m.capabilities]
        if per is None:
            per = self._pool_lacking[route.tunnel_id] = {}
        if len(per) < MAX_INDEXED_CAPABILITIES or capability in per:
            per[capability] = (route, lacking)
        return lacking

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._by_id.values())

    def __contains__(self, session: object) -> bool:
        return isinstance(session, Session) and self._by_id.get(session.id) is session

    def __repr__(self) -> str:
        return f"<LocalSessions {len(self._by_id)}>"
