"""The negotiated extensions beyond protocol v1, in one table used by both handshake sides.

An extension is switched on only when both ends announce it in the handshake capabilities, so a
Rust peer never sees an extension frame. Each entry says what a client announces, what a server
announces, how the value both sides agree on is worked out, and which ``PluginData`` plugin id
(if any) carries its frames, with the name of the ``SessionCore`` method that handles them.

Adding an extension: one ``Extension`` entry in ``EXTENSIONS`` and, if it has frames, its handler.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..config import ClientConfig, StreamConfig
from ..frames import DATA_FRAME_OVERHEAD, MAX_FRAME_SIZE  # (a peer must take more than an empty Data frame)
from .flow import FLOW_PLUGIN_ID, flow_capability, parse_flow_capability
from ..access import ACCESS_CAPABILITY, DROPPED_RULE
from .remoteport import REMOTE_PORT_CAPABILITY, parse_remote_port, remote_port_capability

__all__ = ["Extension", "EXTENSIONS", "EXT_CAPABILITY", "REASON_CAPABILITY", "DRAIN_CAPABILITY", "DRAIN_PLUGIN_ID", "VISITOR_CAPABILITY", "VISITOR_HEADER",
           "PUBLIC_URLS_CAPABILITY", "PUBLIC_URLS_PLUGIN_ID", "REMOTE_PORT_CAPABILITY", "ACCESS_CAPABILITY",
           "POOL_CAPABILITY", "TUNNELS_CAPABILITY", "FRAMES_CAPABILITY", "INSTANCE_CAPABILITY", "new_instance_capability", "instance_of", "Negotiated",
           "client_capabilities", "server_capabilities", "negotiate", "plugin_handlers", "keep_capabilities",
           "BASE_CLIENT_CAPABILITIES", "BASE_SERVER_CAPABILITIES", "MAX_CAPABILITIES", "MAX_CAPABILITY_LEN"]

#: What a Rust client announces, and what a Rust server answers (PROTOCOL.md 3.2, 3.3).
BASE_CLIENT_CAPABILITIES = ("basic", "tcp")
BASE_SERVER_CAPABILITIES = ("basic",)
#: Capabilities kept from a peer's handshake, and the longest one kept (PROTOCOL.md 3.7).
MAX_CAPABILITIES = 32
MAX_CAPABILITY_LEN = 64
_ACCESS_RULE = ACCESS_CAPABILITY + "="

EXT_CAPABILITY = "ferrotunnel-py/1"
REASON_CAPABILITY = "reject-reason/1"
#: A server node that is leaving (a cluster drain) tells its clients to reconnect now.
DRAIN_CAPABILITY = "drain/1"
DRAIN_PLUGIN_ID = "ft.drain/1"
#: After the handshake the server tells the client where visitors reach its tunnel (public URLs).
PUBLIC_URLS_CAPABILITY = "public-urls/1"
PUBLIC_URLS_PLUGIN_ID = "ft.urls/1"

#: A client in a pool: several clients serve one tunnel id together (the server answers it when
#: this client joined, or started, a pool).
POOL_CAPABILITY = "pool/1"
#: More tunnel ids on one session, with Register / RegisterAck (see tunnels.py).
TUNNELS_CAPABILITY = "tunnels/1"

#: Both ends announce the largest frame they accept ("frames/1=N", their ``max_frame_size``): Data
#: frames above ``legacy_max_chunk`` go only to a peer that said it takes them (see SessionCore.max_chunk).
FRAMES_CAPABILITY = "frames/1"
_FRAMES_PREFIX = FRAMES_CAPABILITY + "="

#: Each client (a ``TunnelClient``: one per tunnel of a process) announces a random instance id
#: ("instance/1=HEX"): a server that finds the tunnel id held by a session of the same instance
#: (this client's previous connection, not yet known to be dead) replaces it at once instead of
#: answering TunnelIdTaken.
INSTANCE_CAPABILITY = "instance/1"
_INSTANCE_PREFIX = INSTANCE_CAPABILITY + "="


def new_instance_capability() -> str:
    """A fresh ``instance/1=HEX`` (16 hex digits) for a new client."""
    return _INSTANCE_PREFIX + secrets.token_hex(8)


def instance_of(capabilities: Sequence[str]) -> Optional[str]:
    """The instance id a client announced (None: none, or not 16 hex digits)."""
    for cap in capabilities:
        if cap.startswith(_INSTANCE_PREFIX):
            value = cap[len(_INSTANCE_PREFIX):]
            if len(value) == 16 and all(c in "0123456789abcdef" for c in value):
                return value
    return None


#: What one side announces for an extension: one capability, several, or None.
Announce = Callable[[StreamConfig], Union[None, str, Tuple[str, ...]]]


@dataclass(frozen=True)
class Extension:
    #: Key of the negotiated value in ``Negotiated``.
    name: str
    #: The capability string a client announces (None: clients announce nothing).
    client: Announce
    #: The capability string a server announces (None: servers announce nothing).
    server: Announce
    #: The agreed value from our config and the peer's capabilities; None when it is off.
    agree: Callable[[StreamConfig, Sequence[str]], Any]
    #: PluginData id of the extension's frames, and the SessionCore method that handles them.
    plugin_id: Optional[str] = None
    handler: Optional[str] = None


def _always(cap: str) -> Announce:
    return lambda config: cap


def _never(config: StreamConfig) -> None:
    return None


def _has(cap: str) -> Callable[[StreamConfig, Sequence[str]], Optional[bool]]:
    return lambda config, peer: True if cap in peer else None


def _flow_announce(config: StreamConfig) -> Optional[str]:
    return flow_capability(config.initial_window) if config.flow_control else None


def _flow_agree(config: StreamConfig, peer: Sequence[str]) -> Optional[int]:
    return parse_flow_capability(peer) if config.flow_control else None


def _frames_announce(config: StreamConfig) -> str:
    return f"{_FRAMES_PREFIX}{config.max_frame_size}"


def _frames_agree(config: StreamConfig, peer: Sequence[str]) -> Optional[int]:
    """The largest frame the peer accepts (its length prefix value), if it said so validly."""
    for cap in peer:
        if cap.startswith(_FRAMES_PREFIX):
            value = cap[len(_FRAMES_PREFIX):]
            if value.isascii() and value.isdigit() and len(value) <= 9 and DATA_FRAME_OVERHEAD < int(value) <= MAX_FRAME_SIZE:
                return int(value)
            return None
    return None


def _remote_port_announce(config: StreamConfig) -> Optional[str]:
    port = config.remote_port if isinstance(config, ClientConfig) else None
    return remote_port_capability(port) if port is not None else None


def _remote_port_agree(config: StreamConfig, peer: Sequence[str]) -> Optional[int]:
    # client: the port the server granted (only when one was asked for); server: the port asked for
    if isinstance(config, ClientConfig) and config.remote_port is None:
        return None
    return parse_remote_port(peer)


#: Visitor addresses: a client that sends its local service a PROXY header asks for each stream's
#: visitor address; the server then puts it in the stream's OpenStream headers.
VISITOR_CAPABILITY = "visitor-addr/1"
VISITOR_HEADER = "ft-visitor"


def _visitor_announce(config: StreamConfig) -> Optional[str]:
    return VISITOR_CAPABILITY if isinstance(config, ClientConfig) and config.proxy_protocol else None


def _visitor_agree(config: StreamConfig, peer: Sequence[str]) -> Optional[bool]:
    if isinstance(config, ClientConfig) and not config.proxy_protocol:
        return None  # the client did not ask
    return True if VISITOR_CAPABILITY in peer else None


def _access_announce(config: StreamConfig) -> Optional[Tuple[str, ...]]:
    access = config.access if isinstance(config, ClientConfig) else None
    return access.capabilities() if access is not None and not access.empty else None


def _asked(cap: str, wanted: Callable[[ClientConfig], bool]) -> Callable[[StreamConfig, Sequence[str]], Optional[bool]]:
    """Agreed when a client asked (``wanted``) and the server answered ``cap``; on a server, when
    the client announced something of the extension (the server then reads its request)."""
    def agree(config: StreamConfig, peer: Sequence[str]) -> Optional[bool]:
        if isinstance(config, ClientConfig):
            return True if wanted(config) and cap in peer else None
        return True if any(c == cap or c.startswith(cap + "=") for c in peer) else None
    return agree


def _pool_announce(config: StreamConfig) -> Optional[str]:
    return POOL_CAPABILITY if isinstance(config, ClientConfig) and config.pool else None


EXTENSIONS: Tuple[Extension, ...] = (
    # The peer is this package: it accepts client-opened streams, answers server heartbeats and
    # reads Error{stream_id} as a stream reset.
    Extension("ferrotunnel", _always(EXT_CAPABILITY), _always(EXT_CAPABILITY), _has(EXT_CAPABILITY)),
    # Per-stream credit; the value is the peer's initial per-stream window.
    Extension("flow", _flow_announce, _flow_announce, _flow_agree, FLOW_PLUGIN_ID, "on_credit"),
    # Frame sizes: the value is the largest frame the peer accepts (Data frames above
    # legacy_max_chunk are sent only when it is known).
    Extension("frames", _frames_announce, _frames_announce, _frames_agree),
    # A refused handshake says why: the server adds "reason=<text>" to the ack's capabilities.
    Extension("reject_reason", _always(REASON_CAPABILITY), _never, _has(REASON_CAPABILITY)),
    # Drain: the server sends one PluginData ("ft.drain/1", no payload) when its node leaves; the
    # client opens a new session (through the balancer) at once and lets this one's streams finish.
    Extension("drain", _always(DRAIN_CAPABILITY), _always(DRAIN_CAPABILITY), _has(DRAIN_CAPABILITY),
              DRAIN_PLUGIN_ID, "on_drain"),
    # Public URLs: right after accepting, the server sends one PluginData ("ft.urls/1") listing
    # where visitors reach this session's tunnel (see publicurls.py); the client prints them.
    Extension("public_urls", _always(PUBLIC_URLS_CAPABILITY), _always(PUBLIC_URLS_CAPABILITY),
              _has(PUBLIC_URLS_CAPABILITY), PUBLIC_URLS_PLUGIN_ID, "on_public_urls"),
    # Ports on request (see remoteport.py): a client announces "remote-port/1=N" only when it asks
    # for a port; a server that bound one answers "remote-port/1=PORT" in its ack (never announced
    # otherwise). The value is the port asked for (server) or the port granted (client).
    Extension("remote_port", _remote_port_announce, _never, _remote_port_agree),
    # Visitor addresses (ClientConfig(proxy_protocol=)): the client asks, the server answers it
    # can; its OpenStream frames then carry ("ft-visitor", "HOST:PORT").
    Extension("visitor_addr", _visitor_announce, _always(VISITOR_CAPABILITY), _visitor_agree),
    # Per-tunnel access (see access.py): the client announces its rules as "access/1=..." entries;
    # a server that enforces them answers "access/1" in its ack (never announced otherwise).
    Extension("access", _access_announce, _never,
              _asked(ACCESS_CAPABILITY, lambda c: c.access is not None and not c.access.empty)),
    # Pools: a client announces "pool/1" to serve its tunnel id with other pool clients; a server
    # that put it in the pool answers "pool/1" in its ack.
    Extension("pool", _pool_announce, _never, _asked(POOL_CAPABILITY, lambda c: c.pool)),
    # More tunnel ids on one session (see tunnels.py): a client with several tunnels announces
    # "tunnels/1" (``TunnelClient(more_tunnels=)``); a server that carries them answers it.
    Extension("tunnels", _never, _always(TUNNELS_CAPABILITY), _has(TUNNELS_CAPABILITY)),
)


class Negotiated:
    """What both ends agreed on: ``values[name]`` for each extension that is on."""

    __slots__ = ("values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values: Dict[str, Any] = dict(values)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def get(self, name: str) -> Any:
        return self.values.get(name)

    @property
    def peer_is_ext(self) -> bool:
        return "ferrotunnel" in self.values

    @property
    def flow_window(self) -> Optional[int]:
        """The peer's initial per-stream window when flow control is on, else None."""
        return self.values.get("flow")

    def __repr__(self) -> str:
        return f"Negotiated({sorted(self.values)})"


def _announce(base: Sequence[str], side: str, config: StreamConfig) -> List[str]:
    caps = list(base)
    for ext in EXTENSIONS:
        cap = getattr(ext, side)(config)
        if isinstance(cap, str):
            caps.append(cap)
        elif cap is not None:
            caps.extend(cap)
    return caps


def client_capabilities(config: StreamConfig, extra: Sequence[str] = ()) -> List[str]:
    return _announce(BASE_CLIENT_CAPABILITIES, "client", config) + list(extra)


def server_capabilities(config: StreamConfig) -> List[str]:
    return _announce(BASE_SERVER_CAPABILITIES, "server", config)


def negotiate(config: StreamConfig, peer_capabilities: Sequence[str]) -> Negotiated:
    values = {}
    for ext in EXTENSIONS:
        value = ext.agree(config, peer_capabilities)
        if value is not None:
            values[ext.name] = value
    return Negotiated(values)


def plugin_handlers(negotiated: Negotiated) -> Dict[str, str]:
    """PluginData id -> SessionCore method name, for the extensions that are on."""
    return {ext.plugin_id: ext.handler for ext in EXTENSIONS
            if ext.plugin_id and ext.handler and ext.name in negotiated}


def keep_capabilities(caps: Sequence[str]) -> Tuple[str, ...]:
    """A peer's capabilities, bounded: at most MAX_CAPABILITIES of at most MAX_CAPABILITY_LEN bytes.
    Access rules left out are not dropped in silence (an allow list cut short would let everyone
    in): ``DROPPED_RULE`` takes the last place, and the rules read from it are refused."""
    kept = tuple(c for c in caps if len(c.encode()) <= MAX_CAPABILITY_LEN)[:MAX_CAPABILITIES]
    if len(kept) < len(caps) and any(c.startswith(_ACCESS_RULE) and c not in kept for c in caps):
        kept = kept[:MAX_CAPABILITIES - 1] + (DROPPED_RULE,)
    return kept
