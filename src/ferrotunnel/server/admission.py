"""What a Handshake asks for, checked before a tunnel id is claimed: the token, the version, the
tunnel id, a port on request, access rules and pool membership. ``vet`` either says why the
handshake is refused or returns what was asked for, in a form the server acts on."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

from ..access import TunnelAccess, access_from_capabilities
from ..auth import TokenFormatError, validate_token_format
from ..errors import ConnectionLostError
from ..frames import PROTOCOL_VERSION, HandshakeStatus
from ..protocol.extensions import ACCESS_CAPABILITY, POOL_CAPABILITY, instance_of
from ..protocol.handshake import HandshakeRequest
from ..protocol.remoteport import parse_remote_port
from .http_names import printable
from .public import DNS_LABEL_RULE, is_dns_label
from .session_index import LocalSessions

__all__ = ["Refusal", "Request", "vet", "vet_tunnel", "replace_own", "shown_id", "MAX_TUNNEL_ID_LEN"]

log = logging.getLogger("ferrotunnel.server")

MAX_TUNNEL_ID_LEN = 255

#: C0 controls, DEL and C1 controls: no tunnel id carries one (see ``vet_tunnel``).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown_id(tunnel_id: str) -> str:
    """A tunnel id for a log line. The client chose it, so it is escaped (``printable``: only
    printable ASCII stays as it is), and kept whole up to the longest id there is."""
    return printable(tunnel_id, MAX_TUNNEL_ID_LEN + 1)


@dataclass(frozen=True)
class Refusal:
    status: HandshakeStatus
    why: str
    #: Whether it counts toward the failed-login throttle (only credential failures do).
    counts: bool = True


@dataclass(frozen=True)
class Request:
    session_id: uuid.UUID
    tunnel_id: str
    #: The port asked for (None: none; 0: any of the range).
    remote_port: Optional[int]
    access: Optional[TunnelAccess]
    pool: bool

    def answers(self, granted: Tuple[str, ...]) -> Tuple[str, ...]:
        """The ack's extra capabilities: ``granted`` (a port) and what else was applied."""
        extra = granted
        if self.access is not None:
            extra += (ACCESS_CAPABILITY,)
        if self.pool:
            extra += (POOL_CAPABILITY,)
        return extra


def vet(server: Any, req: HandshakeRequest) -> Union[Refusal, Request]:
    """``server`` gives ``token_ok``, ``domain`` and ``ports`` (a ``PortLeases``)."""
    try:
        validate_token_format(req.token)
    except TokenFormatError as exc:
        return Refusal(HandshakeStatus.INVALID_TOKEN, f"malformed token ({exc})")
    if not server.token_ok(req.token):
        return Refusal(HandshakeStatus.INVALID_TOKEN, "wrong token")
    if not req.version_ok:
        return Refusal(HandshakeStatus.VERSION_MISMATCH,
                       f"client speaks versions {req.min_version}..{req.max_version}, server {PROTOCOL_VERSION}")
    session_id = uuid.uuid4()
    return vet_tunnel(server, req.tunnel_id if req.tunnel_id is not None else str(session_id),
                      tuple(req.capabilities), session_id)


def vet_tunnel(server: Any, asked_id: str, capabilities: Tuple[str, ...],
               session_id: uuid.UUID) -> Union[Refusal, Request]:
    """The tunnel part of ``vet``: the id (lower-cased), a port on request, access rules and pool
    membership from ``capabilities``; also for each tunnel a session registers (tunnels/1)."""
    tunnel_id = asked_id.lower()
    if not tunnel_id or len(tunnel_id.encode()) > MAX_TUNNEL_ID_LEN:
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, f"tunnel id must be 1..{MAX_TUNNEL_ID_LEN} bytes")
    if _CONTROL.search(tunnel_id):
        # The protocol takes any string, but no id that someone typed has a control character,
        # and one that has cannot be a Host or a DNS label: refused with the reason (not
        # retryable, no failed login) rather than carried into routes and log lines
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, f"tunnel id {asked_id[:70]!r} contains control "
                       "characters: choose another tunnel id", False)
    if server.domain and not is_dns_label(tunnel_id):  # not retryable: the client stops and says why
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, f"tunnel id {asked_id[:70]!r} cannot be "
                       f"a DNS label under {server.domain} ({DNS_LABEL_RULE}): choose another tunnel id", False)
    wanted = parse_remote_port(capabilities)  # ports on request: checked before the id is claimed
    why = server.ports.refusal(wanted)
    if why:
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, why, False)
    try:
        access = access_from_capabilities(capabilities)
    except ValueError as exc:
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, f"bad access rules: {exc}", False)
    if access is not None and access.only == "http" and wanted is not None:
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, "a remote port is a TCP port: it cannot serve a "
                       "tunnel restricted to http", False)
    pool = POOL_CAPABILITY in capabilities
    if pool and access is not None and not server.registry.local_only:
        # the members' rules are compared on one node only: across nodes a member without them
        # would serve the pool's visitors unguarded
        return Refusal(HandshakeStatus.UNSUPPORTED_VERSION, "a pool whose members have access rules (protocol, "
                       "basic_auth, allow) cannot span cluster nodes yet: drop the rules or --pool", False)
    return Request(session_id, tunnel_id, wanted, access, pool)


def replace_own(registry: Any, tunnel_id: str, instance: Optional[str]) -> None:
    """A client's own earlier session for ``tunnel_id`` (the same ``instance/1``) ends now: its
    new handshake replaces it instead of meeting TunnelIdTaken (the registry's stale predicate
    stays the server's own: it also decides which claims a cluster node keeps refreshing)."""
    if instance is None or registry.local_session(tunnel_id) is None:
        return
    sessions = registry.local_sessions()
    holders = (sessions.holding(tunnel_id) if isinstance(sessions, LocalSessions)  # no scan of every session
               else [s for s in sessions if s.tunnel_id == tunnel_id])
    for old in [s for s in holders if instance_of(s.capabilities) == instance]:
        log.info("tunnel %s: the same client connected again; its session %s is replaced", shown_id(tunnel_id),
                 old.id)
        old.close(ConnectionLostError("replaced by a new connection of the same client"))
        registry.session_ended(old)
