"""The client side of the tunnels extension (see protocol/tunnels.py): further tunnels served on
one ``TunnelClient``'s connection (``TunnelClient(more_tunnels=[Tunnel(...), ...])``), each
with its own local service, options and access rules. They are registered after each handshake;
a server that does not answer ``tunnels/1`` (a Rust one, or an older one) leaves them to the
caller (``TunnelClient.carries_more_tunnels`` is False; the CLI then gives each a connection
of its own)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from ..aio.connection import StreamHandler
from ..aio.stream import VirtualStream
from ..config import ClientConfig
from ..errors import AuthenticationError, HandshakeError, RetryableHandshakeError
from ..frames import HandshakeStatus, Protocol, RegisterStatus
from ..protocol.extensions import client_capabilities
from ..protocol.handshake import retry_after_hint
from ..protocol.tunnels import TUNNEL_HEADER

__all__ = ["Tunnel", "dispatching_handler", "register_capabilities", "register_protocol", "refusal_error",
           "RegisterWaiters", "tunnels_by_id"]


@dataclass(frozen=True)
class Tunnel:
    """One more tunnel on a ``TunnelClient``'s connection: its id, its ``config`` (the fields of
    one tunnel: ``local_addr``, ``proxy_protocol``, ``remote_port``, ``access``, ``pool``; the
    connection's own settings come from the client's config) and the ``handler`` of its streams
    (default: forward each to ``config.local_addr``)."""

    tunnel_id: str
    config: ClientConfig = ClientConfig()
    handler: Optional[StreamHandler] = None

    def __post_init__(self) -> None:
        if not isinstance(self.tunnel_id, str) or not self.tunnel_id:
            raise ValueError("a tunnel needs a tunnel id (a non-empty str)")


def register_capabilities(tunnel: Tunnel) -> Tuple[str, ...]:
    """What a Register for ``tunnel`` carries: what a session of its own would announce."""
    return tuple(client_capabilities(tunnel.config))


def register_protocol(tunnel: Tunnel) -> Protocol:
    """HTTP for a tunnel restricted to HTTP, TCP otherwise (informative: the rules travel in the
    capabilities)."""
    access = tunnel.config.access
    return Protocol.HTTP if access is not None and access.only == "http" else Protocol.TCP


def refusal_error(tunnel_id: str, status: RegisterStatus, reason: str) -> HandshakeError:
    """The error a refused Register raises from ``connect``, of the class that gives it the right
    retry semantics: a tunnel id in use is retried like TunnelIdTaken (and given up after
    ``MAX_SUSPECT_ATTEMPTS``); a pending handover or a full server is retried; an id the token may
    not claim is an AuthenticationError; anything else stops the client."""
    said = reason or status.name
    message = said if repr(tunnel_id.lower()) in said else f"tunnel id {tunnel_id!r} refused by the server: {said}"
    hint = retry_after_hint(reason)  # bounded as on the handshake path: never 0, never for ever
    exc: HandshakeError
    if status == RegisterStatus.SERVICE_NAME_TAKEN or (status == RegisterStatus.QUOTA_EXCEEDED and hint is not None):
        exc = RetryableHandshakeError(message, HandshakeStatus.TUNNEL_ID_TAKEN if status ==
                                      RegisterStatus.SERVICE_NAME_TAKEN else HandshakeStatus.RATE_LIMITED, reason)
        exc.retry_after = hint
    elif "not allowed for this token" in reason:
        exc = AuthenticationError(reason, HandshakeStatus.INVALID_TOKEN, reason)
    else:
        exc = HandshakeError(message, None, reason)
    exc.tunnel_id = tunnel_id  # type: ignore[attr-defined]
    return exc


class RegisterWaiters:
    """The answers a connection awaits, one future per registered id (lower case)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.futures: Dict[str, "asyncio.Future[Tuple[str, ...]]"] = {}

    def expect(self, tunnel_id: str) -> "asyncio.Future[Tuple[str, ...]]":
        fut = self.futures[tunnel_id] = self.loop.create_future()
        return fut

    def answered(self, tunnel_id: str, status: RegisterStatus, text: str) -> None:
        """A RegisterAck: the URLs (split) on success, else ``refusal_error``."""
        fut = self.futures.get(tunnel_id)
        if fut is None or fut.done():
            return
        if status == RegisterStatus.SUCCESS:
            fut.set_result(tuple(u for u in text.split(" ") if u))
        else:
            fut.set_exception(refusal_error(tunnel_id, status, text))

    def fail(self, exc: BaseException) -> None:
        """The connection ended: every unanswered Register fails with ``exc``."""
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # the caller may have stopped waiting: never "never retrieved"


def dispatching_handler(primary: Optional[StreamHandler], handlers: Mapping[str, StreamHandler]) -> StreamHandler:
    """One stream handler for a connection that carries several tunnels: a stream naming a
    registered tunnel (``ft-tunnel``) goes to its handler, one without the header to ``primary``,
    and one naming any other tunnel is aborted."""
    async def handle(stream: VirtualStream) -> None:
        name: Optional[str] = None
        for key, value in stream.headers:
            if key == TUNNEL_HEADER:
                name = value
                break
        handler = primary if name is None else handlers.get(name)
        if handler is None:
            stream.abort()
            return
        await handler(stream)

    return handle


def tunnels_by_id(tunnels: Sequence[Tunnel], primary_id: str) -> Dict[str, Tunnel]:
    """``tunnels`` by lower-cased id; ValueError for an id given twice (or the primary's)."""
    seen: Dict[str, Tunnel] = {}
    for t in tunnels:
        key = t.tunnel_id.lower()
        if key in seen or key == primary_id.lower():
            raise ValueError(f"tunnel id {t.tunnel_id!r} is given twice")
        seen[key] = t
    return seen

