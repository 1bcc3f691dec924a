"""The server side of the tunnels extension (see protocol/tunnels.py): the further tunnel ids one
connection's client registers. Each is vetted and claimed like a handshake's tunnel id (token
policy, DNS label, a port on request, access rules, pools) and becomes a ``TunnelAlias`` of the
connection's session in the registry; the answers go out in the order the Registers came."""

from __future__ import annotations

import logging
import uuid
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple, Union

from ..addr import format_peer as _where
from ..aio.session import Session, TunnelAlias
from ..errors import ConnectionLostError
from ..frames import Protocol, RegisterStatus
from ..protocol.extensions import INSTANCE_CAPABILITY, instance_of
from .admission import MAX_TUNNEL_ID_LEN, Refusal, replace_own, shown_id, vet_tunnel
from .ingress import PortUnavailable
from .ports import PortQuotaExceeded

__all__ = ["Registrations", "MAX_REGISTER_REFUSALS"]

log = logging.getLogger("ferrotunnel.server")

_Answer = Tuple[RegisterStatus, str]

#: Registers one connection may have refused; the next refusal ends the connection (a client
#: that keeps asking for ids it may not have is not served answers and log lines without end).
MAX_REGISTER_REFUSALS = 64
#: A queued Register beyond ``max_tunnels_per_session``: only counted (answered QuotaExceeded).
_Over = int


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
        #: Registers waiting for their turn (at most ``max_tunnels_per_session``; those beyond
        #: it are only counted, each answered QuotaExceeded in its turn).
        self._queue: Deque[Union[Tuple[str, Tuple[str, ...]], _Over]] = deque()
        self._queued = 0
        self._busy = False
        self.refused = 0

    def received(self, tunnel_id: str, protocol: Protocol, capabilities: Tuple[str, ...]) -> None:
        """A Register: answered in turn. Beyond ``max_tunnels_per_session`` waiting, it is only
        counted and answered QuotaExceeded; an id longer than any allowed is kept cut (refused)."""
        if self._queued >= self.server.config.max_tunnels_per_session:
            if self._queue and isinstance(self._queue[-1], int):
                self._queue[-1] += 1
            else:
                self._queue.append(1)
        else:
            self._queued += 1
            self._queue.append((tunnel_id[:MAX_TUNNEL_ID_LEN + 1], capabilities))
        if not self._busy:
            self._busy = True
            self.conn.spawn(self._run())

    async def _run(self) -> None:
        try:
            while self._queue and not self.conn.closed:
                item = self._queue[0]
                if isinstance(item, int):
                    answer = (RegisterStatus.QUOTA_EXCEEDED, f"more than {self.server.config.max_tunnels_per_session}"
                              " Registers waiting for an answer (max_tunnels_per_session)")
                    if item > 1:
                        self._queue[0] = item - 1
                    else:
                        self._queue.popleft()
                    self._answer(*answer, "?")
                    continue
                self._queue.popleft()
                self._queued -= 1
                try:
                    status, text = await self._register(*item)
                except Exception:  # a bug: the Register still gets its answer, so later ones keep their order
                    log.exception("session %s: Register of tunnel id %r failed", self.session.id, item[0][:70])
                    status, text = RegisterStatus.INVALID_SERVICE_NAME, "the server failed to register this tunnel"
                self._answer(status, text, item[0])
        finally:
            self._busy = False

    def _answer(self, status: RegisterStatus, text: str, asked: str) -> None:
        if self.conn.closed:
            return
        if status != RegisterStatus.SUCCESS:
            self.refused += 1
            if self.refused > MAX_REGISTER_REFUSALS:
                log.info("session %s from %s: more than %d Registers refused (MAX_REGISTER_REFUSALS): closing",
                         self.session.id, _where(self.conn.peer_address), MAX_REGISTER_REFUSALS)
                self.conn.close(ConnectionLostError(f"more than {MAX_REGISTER_REFUSALS} Registers refused"))
                return
            log.info("session %s from %s: Register of tunnel id %r refused (%s): %s", self.session.id,
                     _where(self.conn.peer_address), asked[:70], status.name, text)
        self.conn.core.send_register_ack(status, text)

    async def _register(self, asked: str, caps: Tuple[str, ...]) -> _Answer:
        server, session = self.server, self.session
        shown = asked[:70]
        if not server.is_serving:  # closing, or a cluster node leaving: its clients move elsewhere
            return RegisterStatus.QUOTA_EXCEEDED, f"tunnel id {shown!r}: this server is shutting down; retry-after=1"
        if not policy_covers_registers(server):
            return RegisterStatus.INVALID_SERVICE_NAME, (
                f"tunnel id {shown!r}: this server decides which tunnel ids a client may claim in its own policy, "
                "which does not cover further tunnels on a connection: connect with this tunnel id instead")
        if len(self.aliases) + 1 >= server.config.max_tunnels_per_session:
            return (RegisterStatus.QUOTA_EXCEEDED, f"tunnel id {shown!r}: this connection serves "
                                f"{len(self.aliases) + 1} tunnels already (max_tunnels_per_session)")
        # the tunnel is the client's own: its instance id is the session's, whatever the Register says
        caps = tuple(c for c in caps if not c.startswith(INSTANCE_CAPABILITY))
        instance = instance_of(session.capabilities)
        if instance is not None:
            caps += (f"{INSTANCE_CAPABILITY}={instance}",)
        asked_for = vet_tunnel(server, asked, caps, uuid.uuid4())
        if isinstance(asked_for, Refusal):
            return (RegisterStatus.INVALID_SERVICE_NAME, asked_for.why)
        tunnel_id = asked_for.tunnel_id
        if tunnel_id == session.tunnel_id or tunnel_id in self.aliases:
            return (RegisterStatus.SERVICE_NAME_TAKEN,
                                f"tunnel id {tunnel_id!r} is served on this connection already")
        why = self.may_claim(tunnel_id)
        if why:
            return (RegisterStatus.INVALID_SERVICE_NAME, why)
        if len(server.registry.local_sessions()) >= server.config.max_sessions:
            return (RegisterStatus.QUOTA_EXCEEDED, f"tunnel id {tunnel_id!r}: the server serves "
                                "as many tunnels as it may (max_sessions); retry-after=5")
        alias = session.alias(asked_for.session_id, tunnel_id, caps)
        replace_own(server.registry, tunnel_id, instance)
        try:
            return await self._claim(alias, asked_for.pool, asked_for.remote_port)
        finally:  # (also when the connection's end cancels this task: the claim may have been made)
            if tunnel_id not in self.aliases or self.aliases[tunnel_id] is not alias:  # refused, or cut short
                server.ports.release(alias)
                server.registry.session_ended(alias)

    async def _claim(self, alias: TunnelAlias, pool: bool, remote_port: Optional[int]) -> _Answer:
        """Claim ``alias``'s id; on any way out but success the caller lets go of what was taken."""
        server, conn, session = self.server, self.conn, self.session
        registry, tunnel_id = server.registry, alias.tunnel_id
        claim = await registry.claim(tunnel_id, alias, server.is_stale, pool=pool)
        if conn.closed:
            return RegisterStatus.SUCCESS, ""  # (not sent)
        if not claim.granted:
            said = f" ({claim.reason})" if claim.reason else ""
            retry = f"; retry-after={claim.retry_after:g}" if claim.retry_after is not None else ""
            return RegisterStatus.SERVICE_NAME_TAKEN, f"tunnel id {tunnel_id!r} is in use{said}{retry}"
        if claim.replaced is not None:
            log.info("tunnel %s: replacing stale session %s (registered on session %s from %s)", shown_id(tunnel_id),
                     claim.replaced.id, session.id, _where(conn.peer_address))
            claim.replaced.close(ConnectionLostError("replaced by a new connection for the same tunnel id"))
        try:
            await server.ports.grant(alias, remote_port, claim.replaced)
        except PortQuotaExceeded as exc:  # max_ports_per_address: a quota, not a bad request
            return RegisterStatus.QUOTA_EXCEEDED, str(exc)
        except PortUnavailable as exc:
            return RegisterStatus.INVALID_SERVICE_NAME, str(exc)
        if conn.closed:
            return RegisterStatus.SUCCESS, ""
        self.aliases[tunnel_id] = alias
        log.info("tunnel %s registered on session %s from %s", shown_id(tunnel_id), session.id,
                 _where(conn.peer_address))
        return RegisterStatus.SUCCESS, " ".join(server.public_urls(tunnel_id, alias.capabilities))

    def closed(self) -> None:
        """The connection ended: every registered tunnel id (and its port on request) is let go
        (one being claimed is let go by its task, which the connection's end cancels)."""
        self._queue.clear()
        for tunnel_id, alias in list(self.aliases.items()):
            self.server.ports.release(alias)
            self.server.registry.session_ended(alias)
            log.info("tunnel %s (registered on session %s) closed", shown_id(tunnel_id), self.session.id)
        self.aliases.clear()


def policy_covers_registers(server: Any) -> bool:
    """Whether ``server``'s policy says which further tunnel ids a session may claim: a subclass
    that overrides ``authorize`` (where a handshake's id may be restricted) must override
    ``claim_policy`` too, or its sessions may register no further ids (fail closed)."""
    mro = type(server).__mro__
    owner = {name: next((i for i, c in enumerate(mro) if name in vars(c)), len(mro)) for name in ("authorize",
                                                                                                "claim_policy")}
    return owner["claim_policy"] <= owner["authorize"]
