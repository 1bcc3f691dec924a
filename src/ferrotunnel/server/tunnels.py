"""The server side of the tunnels extension (see protocol/tunnels.py): the further tunnel ids one
connection's client registers. Each is vetted and claimed like a handshake's tunnel id (token
policy, DNS label, a port on request, access rules, pools) and becomes a ``TunnelAlias`` of the
connection's session in the registry; the answers go out in the order the Registers came."""

from __future__ import annotations

import logging
import uuid
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

from ..addr import format_peer as _where
from ..aio.session import Session, TunnelAlias
from ..errors import ConnectionLostError
from ..frames import Protocol, RegisterStatus
from ..protocol.extensions import INSTANCE_CAPABILITY, instance_of
from .admission import Refusal, replace_own, vet_tunnel
from .ingress import PortUnavailable

__all__ = ["Registrations"]

log = logging.getLogger("ferrotunnel.server")

_Answer = Tuple[RegisterStatus, str]


class Registrations:
    """The tunnel ids a connection's client registered (``aliases``, by id), and those waiting
    for an answer. ``may_claim(id)`` is the connection's token policy: why the id may not be
    claimed with the token of its handshake, or None."""

    def __init__(self, server: Any, conn: Any, session: Session, may_claim: Any) -> None:
        self.server = server
        self.conn = conn
        self.session = session
        self.may_claim = may_claim
        self.aliases: Dict[str, TunnelAlias] = {}
        self._queue: Deque[Tuple[str, Tuple[str, ...]]] = deque()
        self._busy = False

    def received(self, tunnel_id: str, protocol: Protocol, capabilities: Tuple[str, ...]) -> None:
        """A Register: answered in turn. A client that sends more than ``max_tunnels_per_session``
        before the answers come breaks the protocol: the connection ends."""
        if len(self._queue) >= self.server.config.max_tunnels_per_session:
            log.info("session %s from %s: %d Registers waiting for an answer (max_tunnels_per_session): "
                     "closing", self.session.id, _where(self.conn.peer_address), len(self._queue))
            self.conn.close(ConnectionLostError("too many Register frames waiting for an answer"))
            return
        self._queue.append((tunnel_id, capabilities))
        if not self._busy:
            self._busy = True
            self.conn.spawn(self._run())

    async def _run(self) -> None:
        try:
            while self._queue and not self.conn.closed:
                tunnel_id, caps = self._queue.popleft()
                status, text = await self._register(tunnel_id, caps)
                if self.conn.closed:
                    break
                self.conn.core.send_register_ack(status, text)
        finally:
            self._busy = False

    async def _register(self, asked: str, caps: Tuple[str, ...]) -> _Answer:
        server, conn, session = self.server, self.conn, self.session
        shown = asked[:70]
        if len(self.aliases) + 1 >= server.config.max_tunnels_per_session:
            return self._refuse(asked, RegisterStatus.QUOTA_EXCEEDED, f"tunnel id {shown!r}: this connection serves "
                                f"{len(self.aliases) + 1} tunnels already (max_tunnels_per_session)")
        # the tunnel is the client's own: its instance id is the session's, whatever the Register says
        caps = tuple(c for c in caps if not c.startswith(INSTANCE_CAPABILITY))
        instance = instance_of(session.capabilities)
        if instance is not None:
            caps += (f"{INSTANCE_CAPABILITY}={instance}",)
        asked_for = vet_tunnel(server, asked, caps, uuid.uuid4())
        if isinstance(asked_for, Refusal):
            return self._refuse(asked, RegisterStatus.INVALID_SERVICE_NAME, asked_for.why)
        tunnel_id = asked_for.tunnel_id
        if tunnel_id == session.tunnel_id or tunnel_id in self.aliases:
            return self._refuse(asked, RegisterStatus.SERVICE_NAME_TAKEN,
                                f"tunnel id {tunnel_id!r} is served on this connection already")
        why = self.may_claim(tunnel_id)
        if why:
            return self._refuse(asked, RegisterStatus.INVALID_SERVICE_NAME, why)
        if len(server.registry.local_sessions()) >= server.config.max_sessions:
            return self._refuse(asked, RegisterStatus.QUOTA_EXCEEDED, f"tunnel id {tunnel_id!r}: the server serves "
                                "as many tunnels as it may (max_sessions); retry-after=5")
        alias = session.alias(asked_for.session_id, tunnel_id, caps)
        registry = server.registry
        replace_own(registry, tunnel_id, instance)
        claim = await registry.claim(tunnel_id, alias, server.is_stale, pool=asked_for.pool)
        if conn.closed:
            if claim.granted:
                await registry.release(tunnel_id, alias)
            return RegisterStatus.SUCCESS, ""  # (not sent)
        if not claim.granted:
            said = f" ({claim.reason})" if claim.reason else ""
            retry = f"; retry-after={claim.retry_after:g}" if claim.retry_after is not None else ""
            return self._refuse(asked, RegisterStatus.SERVICE_NAME_TAKEN, f"tunnel id {tunnel_id!r} is in use{said}{retry}")
        if claim.replaced is not None:
            log.info("tunnel %s: replacing stale session %s (registered on session %s from %s)", tunnel_id,
                     claim.replaced.id, session.id, _where(conn.peer_address))
            claim.replaced.close(ConnectionLostError("replaced by a new connection for the same tunnel id"))
        try:
            await server.ports.grant(alias, asked_for.remote_port, claim.replaced)
        except PortUnavailable as exc:
            await registry.release(tunnel_id, alias)
            return self._refuse(asked, RegisterStatus.INVALID_SERVICE_NAME, str(exc))
        if conn.closed:
            server.ports.release(alias)
            await registry.release(tunnel_id, alias)
            return RegisterStatus.SUCCESS, ""
        self.aliases[tunnel_id] = alias
        log.info("tunnel %s registered on session %s from %s", tunnel_id, session.id, _where(conn.peer_address))
        return RegisterStatus.SUCCESS, " ".join(server.public_urls(tunnel_id, caps))

    def _refuse(self, asked: str, status: RegisterStatus, why: str) -> _Answer:
        log.info("session %s from %s: Register of tunnel id %r refused (%s): %s", self.session.id,
                 _where(self.conn.peer_address), asked[:70], status.name, why)
        return status, why

    def closed(self) -> None:
        """The connection ended: every registered tunnel id (and its port on request) is let go."""
        self._queue.clear()
        for tunnel_id, alias in list(self.aliases.items()):
            self.server.ports.release(alias)
            self.server.registry.session_ended(alias)
            log.info("tunnel %s (registered on session %s) closed", tunnel_id, self.session.id)
        self.aliases.clear()

    def find(self, tunnel_id: str) -> Optional[TunnelAlias]:
        """The alias serving ``tunnel_id`` on this connection, if any."""
        return self.aliases.get(tunnel_id)
