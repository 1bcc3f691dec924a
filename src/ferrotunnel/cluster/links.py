"""Node links: one persistent, authenticated, multiplexed connection per pair of cluster nodes.

A visitor that reaches node B for a tunnel whose client session is on node A crosses one link
B -> A: B opens a stream on its link session to A (the tunnel protocol's own framing and flow
control, one frame to open, no new connection per visitor), with the tunnel id, the visitor's
address and its Host in the stream's headers; A opens a stream on the client's session and
joins the two (``splice``). The tunnel's access rules are checked at B (A publishes them with its
claim, see ``access_records``) and again at A: the allow list and protocol always, basic auth by
the ``ft-access`` header, B's word that it checked the rules A holds now. A stream that arrives over a link is only ever given to a local
session: a visitor crosses at most one hop.

Before the tunnel protocol starts, the two nodes prove to each other that they know the cluster
secret, without sending it (HMAC-SHA256 over both nodes' ids and fresh nonces)::

    A (accepting) -> B : MAGIC, A's node id, nonce_a
    B (dialling)  -> A : MAGIC, B's node id, nonce_b, mac("dial", nonce_a, nonce_b, id_a, id_b)
    A             -> B : mac("accept", nonce_a, nonce_b, id_a, id_b)

Then B speaks first as a tunnel client, with a per-link token derived from the secret and both
nonces (so the handshake's token is worth nothing elsewhere). The link carries visitor bytes in
the clear, like the tunnel port without TLS: run node links on a private network.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import logging
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..addr import format_address
from ..aio.listen import RefusalLog
from ..aio.session import Session
from ..aio.stream import VirtualStream
from ..client.client import TunnelClient
from ..config import ClientConfig, ServerConfig
from ..errors import ConnectionLostError
from ..frames import ErrorCode, Protocol, StreamPriority
from ..lograte import LogRate
from ..protocol.extensions import VISITOR_HEADER
from ..server.guard import kind_of, route_access
from ..server.registry import Route
from ..server.server import TunnelServer
from .access_records import AccessKeys, Published, labelled_mac
from .splice import splice

__all__ = ["LinkServer", "LinkPool", "RemoteRoute", "LinkAuthError", "HEADER_TUNNEL", "HEADER_VISITOR", "HEADER_HOST",
           "HEADER_ACCESS"]

log = logging.getLogger("ferrotunnel.cluster")

MAGIC = b"FTLINK/1"
NONCE_SIZE = 32
MAC_SIZE = 32
#: Longest node id on the wire (ClusterConfig allows 128 characters of UTF-8).
MAX_NODE_ID = 512
#: Seconds the preamble may take before the connection is dropped.
PREAMBLE_TIMEOUT = 5.0
#: Connections at once in their preamble on a node's link port (before a node proved it knows the
#: secret); beyond it new ones are closed at once, so a stranger who reaches the port cannot take
#: the process's descriptors with connections that say nothing.
MAX_LINK_PREAMBLES = 64
#: The same from one address: one stranger cannot take every slot (a node dials each peer once).
MAX_LINK_PREAMBLES_PER_ADDRESS = 4
#: A link's heartbeat, and the silence after which it is declared dead (a partition between nodes:
#: streams on it end, and the next visitor's lookup dials again).
LINK_HEARTBEAT = 1.0
LINK_TIMEOUT = 5.0
#: After a failed dial, visitors for that node are answered at once (503) for this long instead of
#: each waiting for a new dial.
LINK_REDIAL_INTERVAL = 1.0

HEADER_TUNNEL = "ft-tunnel"
HEADER_VISITOR = VISITOR_HEADER
HEADER_HOST = "ft-host"
#: The tag of the access rules the ingress node checked (basic auth included) for this stream.
HEADER_ACCESS = "ft-access"


class LinkAuthError(ConnectionLostError):
    """The other node does not know the cluster secret (or is not a cluster node)."""


def _hello(node_id: bytes, nonce: bytes) -> bytes:
    return MAGIC + len(node_id).to_bytes(2, "big") + node_id + nonce


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise LinkAuthError("the other end closed the connection during the node-link preamble")
        buf += chunk
    return bytes(buf)


async def _read_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Tuple[bytes, bytes]:
    head = await _recv_exactly(loop, sock, len(MAGIC) + 2)
    if head[:len(MAGIC)] != MAGIC:
        raise LinkAuthError("not a ferrotunnel node link (bad preamble)")
    size = int.from_bytes(head[len(MAGIC):], "big")
    if not 1 <= size <= MAX_NODE_ID:
        raise LinkAuthError(f"node id of {size} bytes in the preamble")
    node_id = await _recv_exactly(loop, sock, size)
    nonce = await _recv_exactly(loop, sock, NONCE_SIZE)
    return node_id, nonce


def _printable_id(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii")


def link_token(secret: bytes, nonce_a: bytes, nonce_b: bytes) -> str:
    """The tunnel-protocol token of one link: derived, so the secret never crosses the wire."""
    return labelled_mac(secret, b"ferrotunnel link token", nonce_a, nonce_b).hex()


class _LinkTunnelServer(TunnelServer):
    """The tunnel server behind the node-link listener: a link's token is one its preamble made."""

    def __init__(self, owner: "LinkServer", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def token_ok(self, token: str) -> bool:
        return self.owner.take_token(token)

    async def authorize(self, conn: Any, req: Any) -> None:
        await super().authorize(conn, req)
        # a node that links in after this one began to drain is told at once, as the linked ones were
        if self.owner.draining and conn.opened and not conn.closed:
            conn.session.send_drain()


class LinkServer:
    """Accepts node links on ``bind`` and joins every stream that arrives on one to the local
    session of its tunnel (``local_route(tunnel_id)``)."""

    #: Seconds a token made by a preamble stays valid for its handshake.
    TOKEN_TTL = 10.0

    def __init__(self, node_id: str, secret: str, bind: Tuple[str, int],
                 local_route: Callable[[str], Optional[Route]], config: Optional[ServerConfig] = None) -> None:
        if not secret:
            raise ValueError("a node link needs the cluster secret")
        self.node_id = node_id
        self._secret = secret.encode()
        self._keys = AccessKeys(secret)
        self._bind = bind
        self._local_route = local_route
        # one tunnel server for the links: a session per link, its streams joined to local sessions
        cfg = config or ServerConfig(accept_client_streams=True, max_accept_queue=4096,
                                     max_peer_resets_per_second=1e9, heartbeat_interval=LINK_HEARTBEAT,
                                     session_timeout=LINK_TIMEOUT)
        self.tunnel = _LinkTunnelServer(self, bind, os.urandom(16).hex(), config=cfg, stream_handler=self._on_stream)
        self._tokens: Dict[str, float] = {}  # made by a preamble, good for one handshake
        self._sock: Optional[socket.socket] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._handshakes: "set[asyncio.Task[None]]" = set()
        self._preambles: "collections.Counter[str]" = collections.Counter()  # per address, in their preamble
        self.log_rate = LogRate()  # lines a visitor can cause (one per kind every LOG_RATE_INTERVAL)
        self._refusals = RefusalLog("node link")
        #: streams that arrived over links, by outcome ("joined", "no_session", "refused")
        self.streams: Dict[str, int] = {"joined": 0, "no_session": 0, "refused": 0, "refused_access": 0}
        #: this node is leaving (``announce_drain``): links made from now on are told at once
        self.draining = False

    def take_token(self, token: str) -> bool:
        """Whether ``token`` was made by a preamble in the last TOKEN_TTL seconds (used up)."""
        now = time.monotonic()
        for t in [t for t, made in self._tokens.items() if now - made > self.TOKEN_TTL]:
            del self._tokens[t]
        return self._tokens.pop(token, None) is not None

    @property
    def address(self) -> Tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("the node link listener is not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        host, port = self._bind
        infos = await asyncio.get_running_loop().getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("node %s: node links on %s:%s", self.node_id, *self.address)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors and the like: wait, do not spin
                log.warning("node links: accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            host = peer[0] if isinstance(peer, tuple) else str(peer)
            why = (f"{MAX_LINK_PREAMBLES} connections in their preamble (MAX_LINK_PREAMBLES)"
                   if len(self._handshakes) >= MAX_LINK_PREAMBLES else
                   f"{MAX_LINK_PREAMBLES_PER_ADDRESS} connections from this address in their preamble "
                   "(MAX_LINK_PREAMBLES_PER_ADDRESS)" if self._preambles[host] >= MAX_LINK_PREAMBLES_PER_ADDRESS else "")
            if why:
                self._refusals.refuse(host, "link_preambles", why)
                conn.close()
                continue
            conn.setblocking(False)
            self._preambles[host] += 1
            task = loop.create_task(self._handshake(conn, peer))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._preamble_done, host))

    def _preamble_done(self, host: str, task: "asyncio.Task[None]") -> None:
        self._handshakes.discard(task)
        left = self._preambles[host] - 1
        if left > 0:
            self._preambles[host] = left
        else:
            del self._preambles[host]  # (no entry kept per address that came and went)

    async def _handshake(self, sock: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        me = self.node_id.encode()
        nonce_a = os.urandom(NONCE_SIZE)
        try:
            async with asyncio.timeout(PREAMBLE_TIMEOUT):
                await loop.sock_sendall(sock, _hello(me, nonce_a))
                other, nonce_b = await _read_hello(loop, sock)
                mac = await _recv_exactly(loop, sock, MAC_SIZE)
                if not hmac.compare_digest(mac, labelled_mac(self._secret, b"dial", nonce_a, nonce_b, me, other)):
                    raise LinkAuthError("the dialling node does not know the cluster secret")
                await loop.sock_sendall(sock, labelled_mac(self._secret, b"accept", nonce_a, nonce_b, me, other))
        except (OSError, TimeoutError, LinkAuthError) as exc:
            host = peer[0] if isinstance(peer, tuple) else str(peer)
            self._refusals.refuse(host, "link_auth", str(exc) or type(exc).__name__)
            sock.close()
            return
        self._tokens[link_token(self._secret, nonce_a, nonce_b)] = time.monotonic()
        try:
            await self.tunnel.adopt(sock)
        except OSError:
            sock.close()

    async def _on_stream(self, stream: VirtualStream) -> None:
        headers = dict(stream.headers)
        tunnel_id = headers.get(HEADER_TUNNEL, "")
        route = self._local_route(tunnel_id) if tunnel_id else None
        if route is None:
            self.streams["no_session"] += 1
            self.log_rate.log(log, logging.INFO, "none", time.monotonic(), "node link from %s: no local session for "
                              "tunnel %r; resetting the stream", stream.session.tunnel_id, tunnel_id)
            # a distinct code: the asking node forgets its route (the tunnel moved) and says 503, not 502
            stream.abort(ErrorCode.SESSION_NOT_FOUND, f"no session for tunnel {tunnel_id!r} on node {self.node_id}")
            return
        visitor: Any = None
        if HEADER_VISITOR in headers:
            vhost, _, vport = headers[HEADER_VISITOR].rpartition(":")
            visitor = (vhost, int(vport)) if vport.isdigit() else None
        access = route_access(route)
        if access is not None:  # the tunnel's access rules, enforced here too (this node holds them)
            why = self._refusal(tunnel_id, access, stream.protocol, visitor, headers.get(HEADER_ACCESS))
            if why:
                self.streams["refused_access"] += 1
                log.info("node link: a visitor for tunnel %s refused: %s", tunnel_id, why)
                stream.abort()
                return
        try:
            target = route.open_stream_nowait(stream.protocol, stream.priority, visitor, headers.get(HEADER_HOST))
        except Exception as exc:  # the session is at a limit or closing: the visitor sees a reset
            self.streams["refused"] += 1
            self.log_rate.warning(log, repr(type(exc)), time.monotonic(), "node link: cannot open a stream to tunnel %s: %s",
                                  tunnel_id, exc)
            stream.abort()
            return
        self.streams["joined"] += 1
        splice(stream, target)

    def _refusal(self, tunnel_id: str, access: Any, protocol: Protocol, visitor: Any, checked: Optional[str]) -> str:
        """Why a link stream is refused by the rules of the local session (empty: it is not). The
        credentials stayed at the ingress node: basic auth passes only with the tag of these rules."""
        if not access.serves(kind_of(protocol)):
            return f"the tunnel is not served at {kind_of(protocol)} ingresses"
        if not access.admits(visitor):
            return "the visitor's address is not in the allow list"
        if access.digest is not None:
            expected = self._keys.checked_tag(tunnel_id, self.node_id, access)
            if expected is None or not hmac.compare_digest((checked or "").encode(), expected.encode()):
                return "basic auth was not checked against the current rules at the ingress node"
        return ""

    def announce_drain(self) -> int:
        """Tell the nodes linked to this one that it is leaving: they stop trusting their cached
        routes to it (see ``RemoteRoute.stale``); nodes that link in later are told as their link
        opens. Returns how many were told now."""
        self.draining = True
        return sum(s.send_drain() for s in list(self.tunnel.sessions))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._handshakes):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
        await self.tunnel.close()


class RemoteRoute(Route):
    """A tunnel whose client session is on another node: streams go over the link to it.
    ``published``: the rules that node published for it; ``access`` (what ``route_access`` reads)
    makes the ingress check them, and every stream then carries their tag (``ft-access``): an
    ingress checks a route's access before it opens a stream, as for a local route."""

    __slots__ = ("_tunnel_id", "node_id", "link", "pool", "access", "_tag")

    def __init__(self, tunnel_id: str, node_id: str, link: Session, pool: Optional["LinkPool"] = None,
                 published: Optional[Published] = None) -> None:
        self._tunnel_id = tunnel_id
        self.node_id = node_id
        self.link = link
        self.pool = pool
        self.access = published.access if published is not None else None
        self._tag = published.tag if published is not None and published.access is not None else None

    @property
    def tunnel_id(self) -> str:
        return self._tunnel_id

    def open_stream_nowait(self, protocol: Protocol, priority: StreamPriority, visitor: Any = None,
                           host: Optional[str] = None) -> VirtualStream:
        headers: List[Tuple[str, str]] = [(HEADER_TUNNEL, self._tunnel_id)]
        if isinstance(visitor, tuple) and len(visitor) >= 2:
            headers.append((HEADER_VISITOR, f"{visitor[0]}:{visitor[1]}"))
        if host:
            headers.append((HEADER_HOST, host))
        if self._tag is not None:
            headers.append((HEADER_ACCESS, self._tag))
        stream = self.link.open_stream_nowait(protocol, priority, headers)
        if self.pool is not None:
            self.pool.streams_out += 1
        return stream

    @property
    def stale(self) -> bool:
        """The node at the far end is leaving (it said so over the link) or the link is gone: ask
        Redis again rather than trust the cached route."""
        return self.link.draining.is_set() or self.link.is_closed

    def __repr__(self) -> str:
        return f"<RemoteRoute {self._tunnel_id!r} on node {self.node_id!r}>"


class LinkPool:
    """This node's links to the other nodes, dialled on first use and kept; ``route`` is the
    ``remote_route`` a cluster registry turns "tunnel X is on node N at ADDR" into a route with."""

    def __init__(self, node_id: str, secret: str, config: Optional[ClientConfig] = None,
                 connect_timeout: float = 3.0) -> None:
        if not secret:
            raise ValueError("a node link needs the cluster secret")
        self.node_id = node_id
        self._secret = secret.encode()
        self.config = config or ClientConfig(heartbeat_interval=LINK_HEARTBEAT, session_timeout=LINK_TIMEOUT)
        self.connect_timeout = connect_timeout
        self._links: Dict[str, Session] = {}
        self._dialing: Dict[str, "asyncio.Future[Session]"] = {}
        self._clients: Dict[str, TunnelClient] = {}
        self._failed_at: Dict[str, float] = {}  # node id -> when its last dial failed
        #: dials that failed, and streams opened over links, for the metrics
        self.failures = 0
        self.streams_out = 0

    async def route(self, node_id: str, address: Tuple[str, int], tunnel_id: str,
                    published: Optional[Published] = None) -> Optional[Route]:
        """A route to ``tunnel_id`` over the link to ``node_id`` (dialled if needed), guarded by
        the rules that node ``published``; None if the node cannot be reached (the caller answers
        the visitor, and asks again later)."""
        failed = self._failed_at.get(node_id)
        if failed is not None and time.monotonic() - failed < LINK_REDIAL_INTERVAL and node_id not in self.links():
            return None
        try:
            link = await self.link(node_id, address)
        except (OSError, TimeoutError, ConnectionLostError, ValueError) as exc:  # (ValueError: an address refused)
            self.failures += 1
            self._failed_at[node_id] = time.monotonic()
            log.warning("node link to %s at %s failed: %s", node_id, format_address(*address), exc)
            return None
        self._failed_at.pop(node_id, None)
        return RemoteRoute(tunnel_id, node_id, link, self, published)

    def links(self) -> Dict[str, Session]:
        """The live links, by node id."""
        return {n: s for n, s in self._links.items() if not s.is_closed}

    async def link(self, node_id: str, address: Tuple[str, int]) -> Session:
        session = self._links.get(node_id)
        if session is not None and not session.is_closed:
            return session
        pending = self._dialing.get(node_id)
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._dial(node_id, address))
            self._dialing[node_id] = pending
            pending.add_done_callback(functools.partial(self._dialled, node_id))
        return await asyncio.shield(pending)

    def _dialled(self, node_id: str, _task: "asyncio.Future[Session]") -> None:
        self._dialing.pop(node_id, None)

    async def _dial(self, node_id: str, address: Tuple[str, int]) -> Session:
        loop = asyncio.get_running_loop()
        host, port = address
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        me = self.node_id.encode()
        nonce_b = os.urandom(NONCE_SIZE)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.sock_connect(sock, addr)
                other, nonce_a = await _read_hello(loop, sock)
                if other != node_id.encode():
                    raise LinkAuthError(f"expected node {node_id!r}, reached node {_printable_id(other)!r}")
                await loop.sock_sendall(sock, _hello(me, nonce_b) + labelled_mac(self._secret, b"dial", nonce_a, nonce_b,
                                                                          other, me))
                proof = await _recv_exactly(loop, sock, MAC_SIZE)
                if not hmac.compare_digest(proof, labelled_mac(self._secret, b"accept", nonce_a, nonce_b, other, me)):
                    raise LinkAuthError(f"node {node_id!r} does not know the cluster secret")
        except BaseException:
            sock.close()
            raise
        token = link_token(self._secret, nonce_a, nonce_b)
        client = TunnelClient((host, port), token, tunnel_id=f"link:{self.node_id}:{nonce_b[:4].hex()}",
                              config=self.config)
        session = await client.connect(_refuse, sock=sock)
        old = self._clients.pop(node_id, None)
        if old is not None:
            await old.close()
        self._clients[node_id] = client
        self._links[node_id] = session
        log.info("node link to %s at %s is up", node_id, format_address(host, port))
        return session

    async def close(self) -> None:
        for task in list(self._dialing.values()):
            task.cancel()
        for client in list(self._clients.values()):
            await client.close()
        self._clients.clear()
        self._links.clear()


async def _refuse(stream: VirtualStream) -> None:
    """Streams the accepting node opens toward the dialler: none are expected."""
    stream.abort()
