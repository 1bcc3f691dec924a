"""Every limit and timing of the tunnel, named, with its default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from .access import TunnelAccess
from .addr import as_address
from .frames import DATA_FRAME_OVERHEAD, MAX_FRAME_SIZE

__all__ = ["BackoffConfig", "RateLimits", "StreamConfig", "ServerConfig", "ClientConfig", "ClusterConfig", "redact_url"]

KiB = 1024
MiB = 1024 * KiB
#: Largest flow-control window (as HTTP/2, 2^31 - 1): a peer refuses a larger announced window and
#: resets a stream granted credit past it (``protocol.flow`` uses this one).
MAX_WINDOW = 0x7FFFFFFF


@dataclass(frozen=True)
class BackoffConfig:
    """Reconnect delays: base * factor**n, +- jitter, then capped (PROTOCOL.md 7.2)."""

    base: float = 1.0
    factor: float = 2.0
    jitter: float = 0.3
    max_delay: float = 60.0
    #: A session that lasted this many seconds starts the delays over from ``base``; one that ended
    #: sooner (a server that takes the handshake and hangs up, or sends each new session away at
    #: once) counts as a failed attempt, so the delays keep growing.
    stable_after: float = 10.0
    #: Give up after this many consecutive failed reconnect attempts, the first connection attempt not
    #: counted (None: never).
    max_attempts: Optional[int] = None

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or not 0 <= self.jitter <= 1 or self.max_delay < 0 \
                or self.stable_after < 0:
            raise ValueError("backoff needs base >= 0, factor >= 1, 0 <= jitter <= 1, max_delay >= 0, "
                             "stable_after >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None for no limit)")


@dataclass(frozen=True)
class RateLimits:
    """Per-session limits on what the peer may do (token buckets); None switches one off."""

    streams_per_second: Optional[float] = None
    bytes_per_second: Optional[float] = None
    #: Bucket size as a multiple of the per-second rate.
    burst: float = 2.0


@dataclass(frozen=True)
class StreamConfig:
    """Settings shared by both ends of a tunnel connection."""

    #: Largest frame accepted from the peer (length prefix value).
    max_frame_size: int = MAX_FRAME_SIZE
    #: Largest read from the tunnel connection: reads start at 256 KiB (or this, if smaller); one that
    #: fills half its buffer makes the next ones this size until the connection's next timer tick
    #: (a fresh buffer per read; the pool keeps only small ones).
    read_buffer_size: int = 1 * MiB
    #: Largest data payload this side sends in one frame to a peer of this package with flow control
    #: (and no more than the frame size it announced). A frame is what a stream of the same priority
    #: may wait behind in each round-robin turn, so it also bounds the latency one bulk stream adds
    #: to the others: 256 KiB, one drain budget.
    max_chunk: int = 256 * KiB
    #: The same toward any other peer (Rust FerroTunnel sends 64 KiB and buffers up to 128 frames
    #: per stream, so larger frames would raise its memory per stream).
    legacy_max_chunk: int = 64 * KiB
    #: ``max_chunk`` while no other stream's frames are queued on the session (most of the time:
    #: output is flushed as it is made; never below ``max_chunk``): less CPU per byte, for more
    #: latency behind each such frame (the README's row says how much).
    solo_max_chunk: int = 1 * MiB
    #: Streams open at once on one session; a closed or reset stream frees its slot at once.
    max_streams_per_session: int = 10_000
    #: Bytes a stream may have queued for sending before ``drain()`` waits.
    stream_send_buffer: int = 256 * KiB
    #: Bytes of frames a session may have waiting for the transport (all its streams together)
    #: before every writer waits: a peer that stops reading holds this much of our memory, not
    #: ``stream_send_buffer`` for each of its streams.
    session_send_limit: int = 32 * MiB
    #: Without flow control (a Rust peer): bytes buffered for one stream before the tunnel stops reading.
    stream_recv_buffer: int = 1 * MiB
    #: Flow control (extension): initial per-stream receive window announced to the peer.
    initial_window: int = 256 * KiB
    #: Flow control: a stream whose reader keeps up may grow its window up to this.
    max_window: int = 4 * MiB
    #: Flow control: bytes all streams of a session may hold unread together before credit stops.
    session_recv_budget: int = 64 * MiB
    #: Flow control: the most all streams of a session may hold unread, whatever credit they have
    #: (every new stream starts with ``initial_window`` of it, so the credit alone allows
    #: ``max_streams_per_session`` times that). A Data frame that would pass it resets its stream.
    session_recv_limit: int = 256 * MiB
    #: Whether to announce flow control at all.
    flow_control: bool = True
    #: Client: send a Heartbeat this often. Server: heartbeat extension peers this often.
    heartbeat_interval: float = 30.0
    #: No frame from the peer for this long (not counting time we paused reading) ends the session.
    session_timeout: float = 90.0
    #: Time allowed for the whole handshake (TCP accept/connect to HandshakeAck).
    handshake_timeout: float = 10.0
    #: Largest first frame (Handshake, or HandshakeAck on the client) accepted from a peer that has
    #: not yet completed the handshake; refused from its length prefix (a real one is under 1 KiB).
    max_handshake_frame: int = 64 * KiB
    #: Per-session rate limits applied to what the peer sends (off by default).
    rate_limits: RateLimits = field(default_factory=RateLimits)
    #: After the handshake: largest control frame accepted, refused from its length prefix (Data
    #: frames are bounded by ``max_frame_size``; a real control frame is under 1 KiB).
    max_control_frame: int = 256 * KiB
    #: Frames queued for the peer (replies, credit, stream data) while it does not read: over
    #: this the session stops reading from the peer; still over it after ``session_timeout``, it ends.
    max_queued_output: int = 8 * MiB
    #: Streams the peer opened that wait for ``Session.accept()``; beyond it new ones are refused.
    max_accept_queue: int = 128
    #: Server: resets of client-opened streams per second above which the session ends (rapid reset).
    max_peer_resets_per_second: float = 200.0
    #: Without flow control: how long a stream may hold more than ``stream_recv_buffer`` unread
    #: (which pauses reading the whole tunnel) before it is reset so the tunnel resumes.
    stalled_stream_timeout: float = 30.0

    def __post_init__(self) -> None:
        smallest = DATA_FRAME_OVERHEAD  # an empty Data frame
        if not smallest <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in {smallest}..{MAX_FRAME_SIZE}")
        for name in ("max_chunk", "legacy_max_chunk", "solo_max_chunk"):
            if not 1 <= getattr(self, name) <= MAX_FRAME_SIZE - smallest:
                raise ValueError(f"{name} must be between 1 and {MAX_FRAME_SIZE - smallest}")
        if self.initial_window < 1 or self.max_window < self.initial_window:
            raise ValueError("need 1 <= initial_window <= max_window")
        for name in ("initial_window", "max_window"):  # beyond it: flow on at one end only, or lost credit
            if getattr(self, name) > MAX_WINDOW:
                raise ValueError(f"{name} must be at most {MAX_WINDOW} (2^31 - 1, the protocol's largest window)")
        for name in ("read_buffer_size", "max_streams_per_session", "stream_send_buffer", "session_send_limit",
                     "stream_recv_buffer", "session_recv_budget",
                     "max_handshake_frame", "max_control_frame", "max_queued_output", "max_accept_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.session_send_limit < self.stream_send_buffer:
            raise ValueError(f"session_send_limit ({self.session_send_limit}) must be at least stream_send_buffer "
                             f"({self.stream_send_buffer})")
        if self.session_recv_limit < max(self.session_recv_budget, self.initial_window):
            raise ValueError(f"session_recv_limit ({self.session_recv_limit}) must be at least session_recv_budget "
                             f"({self.session_recv_budget}) and initial_window ({self.initial_window}): raise it with them")
        for name in ("heartbeat_interval", "session_timeout", "handshake_timeout", "max_peer_resets_per_second",
                     "stalled_stream_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class ServerConfig(StreamConfig):
    #: Sessions at once; a handshake beyond it is answered RateLimited.
    max_sessions: int = 1000
    #: Tunnel ids one session may serve (the handshake's and those it registers, the tunnels
    #: extension); a Register beyond it is answered QuotaExceeded. Each counts toward ``max_sessions``.
    max_tunnels_per_session: int = 64
    #: Connections still in their handshake; beyond it a new connection is accepted and closed at once.
    max_pending_handshakes: int = 512
    #: Failed handshakes from one address within ``auth_failure_window`` before it is throttled.
    auth_failure_threshold: int = 5
    auth_failure_window: float = 60.0
    #: Replace a session under the same tunnel id when it received nothing for this long
    #: (default: twice the heartbeat interval).
    stale_session_after: Optional[float] = None
    #: TCP ingress: a public connection with no traffic either way for this long is closed.
    ingress_idle_timeout: float = 300.0
    #: Handshakes pending from one source address; beyond it its new connections are closed at once.
    max_pending_per_address: int = 64
    #: Ports on request (``tcp_port_range``) leased at once to the sessions and registered tunnels
    #: of one source address (counted as ``max_pending_per_address`` counts: an IPv6 address under
    #: its /64); beyond it a handshake asking for one is refused and a Register is answered
    #: QuotaExceeded, both naming this limit. Leases are counted from the bind until the session ends.
    max_ports_per_address: int = 64
    #: Bytes all pending handshakes may hold together before a new connection is refused.
    max_preauth_bytes: int = 8 * MiB
    #: Bytes all sessions (with flow control) together may hold delivered and unread; a Data frame
    #: that would pass it resets its stream, as ``session_recv_limit`` does for one session.
    server_recv_limit: int = 1024 * MiB
    #: Whether client-opened streams are accepted at all (the CLI server has no use for them).
    accept_client_streams: bool = True
    #: Ingress connections at once, per source address and in total (per ingress).
    ingress_max_per_address: int = 4096
    ingress_max_connections: int = 65536
    #: File descriptors a new ingress connection must leave free (below the soft RLIMIT_NOFILE),
    #: so tunnel clients can still connect while visitors take everything else.
    ingress_fd_reserve: int = 256
    #: File descriptors a new tunnel connection must leave free, for the process's own files,
    #: name lookups and registry connections.
    tunnel_fd_reserve: int = 32
    #: Addresses (CIDRs) of balancers whose PROXY protocol v2 header names the real peer, on the
    #: tunnel port and every ingress; a header from any other address closes the connection.
    trusted_proxies: Tuple[str, ...] = ()
    #: With trusted proxies: how long a new connection's first bytes are awaited to look for a
    #: header (a connection that sends nothing in this time goes on without one).
    proxy_header_timeout: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_sessions", "max_tunnels_per_session", "max_pending_handshakes", "max_pending_per_address", "max_preauth_bytes",
                     "max_ports_per_address", "ingress_max_per_address", "ingress_max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("ingress_fd_reserve", "tunnel_fd_reserve"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if isinstance(self.trusted_proxies, str):
            raise ValueError("trusted_proxies must be a tuple of CIDRs, not one string")
        if self.proxy_header_timeout <= 0:
            raise ValueError("proxy_header_timeout must be positive")
        if self.server_recv_limit < self.session_recv_limit:
            raise ValueError(f"server_recv_limit ({self.server_recv_limit}) must be at least session_recv_limit "
                             f"({self.session_recv_limit}): raise it with session_recv_limit")


@dataclass(frozen=True)
class ClientConfig(StreamConfig):
    #: Where the default stream handler forwards each stream.
    local_addr: Tuple[str, int] = ("127.0.0.1", 8000)
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    #: Extra capability strings to announce.
    capabilities: Tuple[str, ...] = ()
    #: Announce this package's extensions (flow control, reasons, drain, ...). False: only
    #: ``basic`` and ``tcp`` (and ``capabilities``), exactly what a Rust FerroTunnel client announces.
    extensions: bool = True
    #: Ask the server for a public TCP port of this session's own (the ``remote-port/1``
    #: extension): a port of the server's ``tcp_port_range``, or 0 for any free one of it. The
    #: handshake is refused, with the reason, when the server cannot give it (outside the range,
    #: taken, no range; a server without the extension). None: ask for none.
    remote_port: Optional[int] = None
    #: Send the local service a PROXY protocol header ("v1" text or "v2" binary) before each
    #: stream's bytes, naming the visitor (from the server, ``visitor-addr/1``); None: none.
    proxy_protocol: Optional[str] = None
    #: Serve this tunnel only at the HTTP/HTTPS ingresses ("http") or only at TCP ones ("tcp");
    #: None: both. With any of ``protocol``, ``basic_auth`` and ``allow`` set, the server must
    #: enforce them (the ``access/1`` extension) or the handshake fails.
    protocol: Optional[str] = None
    #: "USER:PASSWORD" HTTP visitors must send (basic auth). Only its SHA-256 leaves this process.
    basic_auth: Optional[str] = field(default=None, repr=False)
    #: Networks (CIDR) visitors must come from; empty: any (at most ``access.MAX_ALLOW``).
    allow: Tuple[str, ...] = ()
    #: Serve the tunnel id together with other clients that pass pool=True (``pool/1``).
    pool: bool = False
    #: Local connects (to ``local_addr``) made at once; the streams beyond them wait their turn, in
    #: order, and one reset while it waits is never dialed. Per ``TunnelClient``: its
    #: ``more_tunnels`` share its slots (their own configs' value is not used).
    max_connects_in_flight: int = 256
    #: The rules above, checked (derived; None when there are none).
    access: Optional[TunnelAccess] = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "local_addr", as_address(self.local_addr, "local_addr"))
        object.__setattr__(self, "allow", tuple(self.allow))
        n = self.max_connects_in_flight
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_connects_in_flight must be an integer of at least 1, got {n!r}")
        access = TunnelAccess.build(self.protocol, self.basic_auth, self.allow)  # ValueError on a bad one
        if not access.empty:
            if not self.extensions:
                raise ValueError("protocol, basic_auth and allow need extensions=True (they travel in one)")
            if self.protocol == "http" and self.remote_port is not None:
                raise ValueError("remote_port gives a TCP port: it cannot go with protocol='http'")
            object.__setattr__(self, "access", access)
        if self.pool and not self.extensions:
            raise ValueError("pool needs extensions=True (it travels in a negotiated extension)")
        if self.proxy_protocol is not None:
            if self.proxy_protocol not in ("v1", "v2"):
                raise ValueError(f"proxy_protocol must be 'v1' or 'v2', got {self.proxy_protocol!r}")
            if not self.extensions:
                raise ValueError("proxy_protocol needs extensions=True (the visitor's address travels in one)")
        if self.remote_port is not None:
            if isinstance(self.remote_port, bool) or not isinstance(self.remote_port, int) \
                    or not 0 <= self.remote_port <= 65535:
                raise ValueError(f"remote_port must be a port in 0..65535 (0: any free port), got {self.remote_port!r}")
            if not self.extensions:
                raise ValueError("remote_port needs extensions=True (it travels in a negotiated extension)")


@dataclass(frozen=True)
class ClusterConfig:
    """A server as one node of a cluster: who owns which tunnel id lives in Redis, visitors that
    land on another node cross one authenticated link per node pair (see docs/cluster.md)."""

    #: ``redis://[:password@]host:port/db`` or ``rediss://...`` (TLS).
    redis_url: str
    #: This node's name in the cluster (default: host name and tunnel port).
    node_id: str
    #: Where the other nodes reach this node's link listener, ``(host, port)``.
    node_advertise: Tuple[str, int]
    #: The shared secret nodes prove to each other (an HMAC challenge; it never crosses the wire).
    cluster_token: str = field(repr=False, default="")
    #: A node's liveness key lives this long unless refreshed; a dead node's tunnels can be
    #: taken over once it expired.
    node_ttl: float = 5.0
    #: How often a node refreshes its liveness key.
    node_refresh: float = 1.0
    #: A tunnel claim lives this long unless refreshed by its owner.
    claim_ttl: float = 15.0
    #: How often an owner refreshes the claims of its live sessions.
    claim_refresh: float = 3.0
    #: How long a node trusts what Redis said about a tunnel on another node.
    route_cache_ttl: float = 2.0
    #: How long "no such tunnel" is remembered (0: not at all, so a tunnel that just connected on
    #: another node is reachable at once; concurrent lookups of one id still share one question).
    miss_cache_ttl: float = 0.0
    #: Each Redis operation gives up after this long (the node then works locally).
    redis_timeout: float = 1.0
    #: While Redis is unreachable, a node tries it again this often.
    redis_probe_interval: float = 1.0
    #: What a client told "handover pending" waits before it tries again.
    handover_retry: float = 0.5
    #: Once a node finds that Redis lost its records (restarted empty, flushed; or it refused writes
    #: for a while), for this long claims of ids Redis does not know are "pending" and visitors of
    #: such ids get 503, not 404, while every node re-asserts its claims (each does at its next
    #: liveness write). None: 3 s, or node_refresh + redis_timeout + 1 s if that is longer.
    recovery_window: Optional[float] = None
    #: Prefix of every key this cluster writes (several clusters can share one Redis).
    key_prefix: str = "ferrotunnel:"

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        from urllib.parse import urlsplit

        rest = self.redis_url.partition("://")[2]
        try:  # what redis-py's from_url reads: its own error would quote the password
            urlsplit(self.redis_url).port
            if rest.rfind("@") > _authority_end(rest):  # it would connect to a host made of the password
                raise ValueError
        except ValueError:
            raise ValueError(f"redis_url {redact_url(self.redis_url)} is not a valid URL: write it as "
                             "redis://[USER:PASSWORD@]HOST[:PORT][/DB], with any '@', ':', '/', '?' or '#' "
                             "of the password percent-encoded") from None
        if not self.node_id or any(c.isspace() for c in self.node_id) or len(self.node_id) > 128:
            raise ValueError("node_id must be 1..128 characters without spaces")
        if self.miss_cache_ttl < 0:
            raise ValueError("miss_cache_ttl must not be negative")
        if self.recovery_window is None:
            object.__setattr__(self, "recovery_window", max(3.0, self.node_refresh + self.redis_timeout + 1.0))
        for name in ("node_ttl", "node_refresh", "claim_ttl", "claim_refresh", "route_cache_ttl", "redis_timeout",
                     "redis_probe_interval", "handover_retry", "recovery_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.node_refresh * 2 > self.node_ttl:
            raise ValueError("node_refresh must be at most half of node_ttl")
        if self.claim_refresh * 2 > self.claim_ttl:
            raise ValueError("claim_refresh must be at most half of claim_ttl")
        if self.window < self.node_refresh + self.redis_timeout:  # (each node notices at its next write)
            raise ValueError("recovery_window must be at least node_refresh + redis_timeout")

    @property
    def window(self) -> float:
        """``recovery_window`` in seconds (set by now: None became its default)."""
        return float(self.recovery_window or 0.0)

    def __repr__(self) -> str:  # the Redis URL may carry a password
        return (f"ClusterConfig(node_id={self.node_id!r}, redis={redact_url(self.redis_url)!r}, "
                f"node_advertise={self.node_advertise!r})")


def _authority_end(rest: str) -> int:
    """Where the authority of a URL's part after "://" ends (its first "/", "?" or "#")."""
    return min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))


def redact_url(url: str) -> str:
    """``url`` without its password: in the authority (``redis://:secret@host`` ->
    ``redis://:***@host``) and in a ``password=`` query parameter."""
    import re

    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        end = _authority_end(rest)
        if rest.rfind("@") > end:  # an "@" past the authority: a password cut short by "/?#" (refused)
            rest = f"***@{rest[rest.rfind('@') + 1:]}"
        elif "@" in rest[:end]:  # as a URL parser reads it: the user info ends at the authority's last "@"
            at = rest.rfind("@", 0, end)
            rest = f"{rest[:at].split(':', 1)[0]}:***@{rest[at + 1:]}"
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", f"{scheme}{sep}{rest}")
