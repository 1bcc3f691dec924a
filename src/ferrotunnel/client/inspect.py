"""The live request inspector: a small local web server that lists the HTTP requests going through
a client's tunnels (the page at ``/``, the rows as JSON at ``/api/requests``), shows each one's
heads and bodies (``/api/requests/ID``), and sends a captured request to the local service again
(replay). The list carries no heads and has an ``ETag`` (the log's generation): the page's polls
send ``If-None-Match`` and get ``304`` with nothing serialised while nothing changed.

    inspector = Inspector("127.0.0.1:4040")
    await inspector.start()
    await client.connect_and_run(inspector.handler(config.local_addr, client.tunnel_id))

It is careful because it shows secrets and can make requests: it answers only requests whose
``Host`` names the address it is bound to (no DNS rebinding) and that come from its own page (a
foreign ``Origin`` or a cross-site ``Sec-Fetch-Site`` gets 403), replays only by POST with a
per-process token that only its page carries, redacts ``Authorization`` and ``Cookie`` (unless
``redact=False``), and warns when it is bound to an address other machines can reach.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
from importlib import resources
from typing import Any, Dict, Optional, Set, Tuple, Union

from ..aio.dial import MAX_CONNECTS_IN_FLIGHT, DialSlots, forward
from ..aio.connection import StreamHandler
from ..aio.stream import VirtualStream
from ..frames import Protocol
from ..protocol.extensions import VISITOR_HEADER
from ..protocol.proxyproto import header_for
from .inspect_http import ExchangeTracker, Head, InspectingBridge, parse_head
from .inspect_store import BODY_LIMIT, MAX_REQUESTS, RequestLog

__all__ = ["Inspector", "ReplayError", "INSPECT_BIND", "REPLAY_TIMEOUT", "MAX_CONNECTIONS", "TOKEN_HEADER"]

log = logging.getLogger("ferrotunnel.inspect")

#: Where the inspector listens by default (ngrok's habit).
INSPECT_BIND = "127.0.0.1:4040"
#: Seconds a replayed request may take (connect, send, whole response) before it counts as failed.
REPLAY_TIMEOUT = 30.0
#: Connections to the inspector's web server at once; more are closed at once.
MAX_CONNECTIONS = 32
#: Seconds an idle keep-alive connection to the inspector stays open.
IDLE_TIMEOUT = 30.0
#: Largest request head (and POST body) the inspector's own web server reads.
REQUEST_LIMIT = 16 * 1024
#: The header a replay must carry the inspector's token in (its page sends it).
TOKEN_HEADER = "x-ferrotunnel-token"
#: Streams of these protocols carry HTTP/1.1 and are recorded; others are only forwarded.
HTTP_PROTOCOLS = frozenset({Protocol.HTTP, Protocol.HTTPS, Protocol.WEB_SOCKET})

_ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
           "/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
           "/inspector.css": ("inspector.css", "text/css; charset=utf-8")}
_TOKEN_SLOT = "{{FT_TOKEN}}"
_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_REASONS = {200: "OK", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large", 502: "Bad Gateway"}

Address = Union[str, Tuple[str, int]]
#: What ``_answer`` gives ``_send``: status, body (JSON, an asset's path, or None for 304), extra header fields.
Answer = Tuple[int, Any, Tuple[Tuple[str, str], ...]]


class ReplayError(Exception):
    """A replay that could not be made; ``status`` is the HTTP status the web API answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _address(addr: Address, what: str) -> Tuple[str, int]:
    if isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[0], str) and isinstance(addr[1], int) \
            and not isinstance(addr[1], bool) and 0 <= addr[1] < 65536:
        return addr[0], addr[1]
    if isinstance(addr, str):
        host, sep, port = addr.rpartition(":")
        if sep and host and port.isdigit() and int(port) < 65536:
            return host.strip("[]"), int(port)
    raise ValueError(f"{what} must be 'HOST:PORT' or (host, port) with a port in 0..65535, got {addr!r}")


def _ip(host: str) -> Optional[Any]:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class Inspector:
    """The request inspector: a ring of the last ``max_requests`` HTTP exchanges (bodies captured
    up to ``body_limit`` bytes each), its web page and JSON API on ``bind``, and ``handler()``s
    that relay tunnel streams to a local service while recording them.

    ``start()`` binds (port 0: any free port; ``url`` then says which), ``close()`` stops serving.
    ``token`` is the per-process secret replays need; it is never logged.
    """

    def __init__(self, bind: Address = INSPECT_BIND, *, max_requests: int = MAX_REQUESTS,
                 body_limit: int = BODY_LIMIT, redact: bool = True, connect_timeout: float = 10.0,
                 max_connects_in_flight: int = MAX_CONNECTS_IN_FLIGHT) -> None:
        self.bind = _address(bind, "the inspector's address")
        self.log = RequestLog(max_requests, body_limit)
        self.redact = redact
        self.connect_timeout = connect_timeout
        #: Its handlers' local connects in flight (``ClientConfig.max_connects_in_flight``'s rule).
        self.dial_slots = DialSlots(max_connects_in_flight)
        self.token = secrets.token_urlsafe(32)
        self._etag_prefix = secrets.token_hex(4)  # a restarted inspector's tags never match the old ones
        self._server: Optional[asyncio.AbstractServer] = None
        self._address: Optional[Tuple[str, int]] = None
        self._writers: Set[asyncio.StreamWriter] = set()
        self._assets: Dict[str, Tuple[bytes, str]] = {}

    def __repr__(self) -> str:  # no token
        return f"<Inspector {self.url if self._address else 'not started'} {len(self.log)} requests>"

    # -- lifecycle
    async def start(self) -> None:
        """Bind and serve the page and the API; OSError when the address cannot be bound."""
        folder = resources.files("ferrotunnel.client").joinpath("inspector")
        for path, (name, ctype) in _ASSETS.items():
            self._assets[path] = (folder.joinpath(name).read_bytes(), ctype)
        host, port = self.bind
        self._server = await asyncio.start_server(self._serve, host, port, limit=REQUEST_LIMIT)
        self._address = self._server.sockets[0].getsockname()[:2]
        ip = _ip(host)
        if host != "localhost" and (ip is None or not ip.is_loopback):
            log.warning("the request inspector at %s is reachable from other machines: anyone who can reach it "
                        "sees the requests through the tunnel and their bodies (bind it to 127.0.0.1 to keep "
                        "it local)", self.url)
        log.info("request inspector at %s", self.url)

    async def close(self) -> None:
        """Stop serving and close the inspector's open connections (recording stops nothing)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for w in list(self._writers):
                w.close()
            await server.wait_closed()

    async def __aenter__(self) -> "Inspector":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) it is bound to (after ``start``)."""
        if self._address is None:
            raise RuntimeError("the inspector is not started")
        return self._address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    # -- recording
    def handler(self, local_addr: Address, tunnel_id: str, proxy_protocol: Optional[str] = None) -> StreamHandler:
        """A stream handler for ``TunnelClient.connect_and_run``: forwards each stream to
        ``local_addr`` (with a PROXY header first when ``proxy_protocol`` is "v1"/"v2") exactly as
        the default handler does, recording the HTTP requests of HTTP streams under ``tunnel_id``."""
        addr = _address(local_addr, "local_addr")
        if proxy_protocol not in (None, "v1", "v2"):
            raise ValueError(f"proxy_protocol must be None, 'v1' or 'v2', got {proxy_protocol!r}")

        async def handle(stream: VirtualStream) -> None:
            visitor = dict(stream.headers).get(VISITOR_HEADER)
            prefix = header_for(proxy_protocol, visitor, addr) if proxy_protocol else b""
            try:
                if stream.protocol not in HTTP_PROTOCOLS:
                    await forward(stream, addr, connect_timeout=self.connect_timeout, wait=False, prefix=prefix,
                                  slots=self.dial_slots)
                    return
                await self._relay(stream, addr, ExchangeTracker(self.log, tunnel_id, visitor, addr, proxy_protocol),
                                  prefix)
            except (OSError, TimeoutError):
                pass  # logged once; the stream was reset

        return handle

    async def _relay(self, stream: VirtualStream, addr: Tuple[str, int], tracker: ExchangeTracker,
                     prefix: bytes) -> None:
        if stream.exception is not None:  # (a visitor that came and went: no connection, as forward())
            return
        bridge = InspectingBridge(tracker)
        slots = self.dial_slots
        if slots.busy < slots.limit:
            slots.busy += 1
        elif not await slots.wait_turn(stream):
            return  # reset while it waited its turn: it holds no slot
        elif stream.exception is not None:  # reset between its turn and this step: the slot goes on
            slots.give_back()
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.get_running_loop().create_connection(lambda: bridge, *addr)
        except (OSError, TimeoutError) as exc:
            log.warning("stream %d: cannot reach local service %s:%s: %s", stream.stream_id, addr[0], addr[1],
                        str(exc) or type(exc).__name__)
            stream.abort()
            raise OSError(str(exc)) from None
        finally:
            slots.give_back()
        if prefix:
            bridge.transport.write(prefix)
        bridge.attach(stream)  # the pipe runs by itself, like forward(wait=False)

    def requests(self) -> list:
        """The rows of ``/api/requests``: newest first, summaries only (no heads, no bodies)."""
        return [ex.summary() for ex in self.log.exchanges()]

    @property
    def etag(self) -> str:
        """The ``ETag`` of ``/api/requests`` now: it changes with every change to the log."""
        return f'"{self._etag_prefix}-{self.log.generation}"'

    def _fresh(self, head: Head) -> bool:
        """Whether ``If-None-Match`` names the list's current tag (weak comparison, RFC 9110 13.1.2)."""
        etag = self.etag
        for value in head.values("if-none-match"):
            for tag in value.split(","):
                tag = tag.strip()
                if tag == "*" or tag.removeprefix("W/") == etag:
                    return True
        return False

    async def replay(self, request_id: int) -> Dict[str, Any]:
        """Send captured request ``request_id`` (head and body as they were) to its local service
        again, record the new exchange and return its row. ReplayError (with the HTTP status to
        answer) when it is unknown, cannot be replayed, or the local service fails."""
        ex = self.log.get(request_id)
        if ex is None:
            raise ReplayError(f"no request {request_id} (it may have left the last {self.log.max_requests})", 404)
        refusal = ex.replay_refusal
        if refusal is not None:
            raise ReplayError(f"request {request_id} cannot be replayed: {refusal}", 409)
        request = ex.request_head + bytes(ex.request_body)
        prefix = header_for(ex.proxy_protocol, None, ex.local_addr) if ex.proxy_protocol else b""
        tracker = ExchangeTracker(self.log, ex.tunnel, "replay", ex.local_addr, None, replay_of=ex.id)
        host, port = ex.local_addr
        writer: Optional[asyncio.StreamWriter] = None
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
                tracker.request_data(memoryview(request))
                writer.write(prefix + request)
                while tracker.pending:
                    chunk = await reader.read(65536)
                    if not chunk:
                        tracker.response_eof()
                        break
                    tracker.response_data(memoryview(chunk))
        except (OSError, TimeoutError) as exc:
            tracker.stop()
            raise ReplayError(f"replay of request {request_id} to {host}:{port} failed: "
                              f"{str(exc) or type(exc).__name__}", 502) from None
        finally:
            if writer is not None:
                writer.close()
        if tracker.first is None:
            raise ReplayError(f"replay of request {request_id}: the captured request could not be read again", 502)
        return tracker.first.row(self.redact)

    # -- the web server
    def _host_ok(self, value: str) -> bool:
        """A Host (or an Origin's host) naming this server: localhost, the bound host, or an IP
        literal that reaches it. A host name that merely resolves here is refused (DNS rebinding)."""
        bound_host, bound_port = self.address
        v = value.strip()
        if v.startswith("["):
            end = v.find("]")
            host, rest = v[1:end], v[end + 1:]
            if end < 0 or rest and not rest.startswith(":"):
                return False
            port = rest[1:] if rest else "80"
        elif v.count(":") == 1:
            host, port = v.split(":")
        elif ":" not in v:
            host, port = v, "80"
        else:
            return False
        if not port.isdigit() or int(port) != bound_port:
            return False
        host = host.lower().rstrip(".")
        if host in ("localhost", self.bind[0].lower()):
            return True
        ip, bound = _ip(host), _ip(bound_host)
        if ip is None or bound is None:
            return False
        return ip == bound or bound.is_unspecified or (bound.is_loopback and ip.is_loopback)

    def _refusal(self, head: Head) -> Optional[Tuple[int, str]]:
        hosts = head.values("host")
        if len(hosts) != 1:
            return 400, "exactly one Host header is required"
        if not self._host_ok(hosts[0]):
            return 403, "this Host is not the inspector's address (DNS rebinding protection)"
        for origin in head.values("origin"):
            if not origin.startswith("http://") or not self._host_ok(origin[7:]):
                return 403, "cross-origin requests are refused"
        site = head.values("sec-fetch-site")
        if site and site[-1].lower() not in ("same-origin", "none"):
            return 403, "cross-site requests are refused"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._writers.add(writer)
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    raw = await reader.readuntil(b"\r\n\r\n")
                try:
                    head = parse_head(raw, True)
                    length = int(head.values("content-length")[0]) if head.values("content-length") else 0
                except ValueError:
                    await self._send(writer, 400, {"error": "not an HTTP/1.1 request"}, close=True)
                    return
                if head.values("transfer-encoding") or length > REQUEST_LIMIT:
                    await self._send(writer, 413, {"error": "request bodies are limited (no chunked coding)"},
                                     close=True)
                    return
                if length:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        await reader.readexactly(length)
                close = "close" in head.tokens("connection") or head.version == "1.0"
                status, body, fields = await self._answer(head)
                await self._send(writer, status, body, close=close, head_only=head.method == "HEAD", fields=fields)
                if close:
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, head: Head) -> Answer:
        refusal = self._refusal(head)
        if refusal is not None:
            return refusal[0], {"error": refusal[1]}, ()
        path = head.target.split("?", 1)[0]
        method = head.method
        if path in self._assets:
            return (200, path, ()) if method in ("GET", "HEAD") else (405, {"error": "use GET"}, ())
        if path == "/api/requests":
            if method not in ("GET", "HEAD"):
                return 405, {"error": "use GET"}, ()
            fields = (("ETag", self.etag),)
            if self._fresh(head):  # nothing changed since the poll that got this tag: nothing to serialise
                return 304, None, fields
            return 200, {"requests": self.requests(), "max_requests": self.log.max_requests,
                         "body_limit": self.log.body_limit, "redacted": self.redact}, fields
        parts = path.split("/")
        if len(parts) in (4, 5) and parts[:3] == ["", "api", "requests"] and parts[3].isdigit():
            request_id = int(parts[3])
            if len(parts) == 4:
                if method not in ("GET", "HEAD"):
                    return 405, {"error": "use GET"}, ()
                ex = self.log.get(request_id)
                if ex is None:
                    return 404, {"error": f"no request {request_id} (it may have left the last "
                                          f"{self.log.max_requests})"}, ()
                return 200, ex.row(self.redact, bodies=True), ()
            if parts[4] == "replay":
                if method != "POST":
                    return 405, {"error": "replay only by POST"}, ()
                sent = head.values(TOKEN_HEADER)
                if len(sent) != 1 or not hmac.compare_digest(sent[0].encode(), self.token.encode()):
                    return 403, {"error": f"replay needs the inspector's token in {TOKEN_HEADER} (its page has it)"}, ()
                try:
                    return 200, await self.replay(request_id), ()
                except ReplayError as exc:
                    return exc.status, {"error": str(exc)}, ()
        return 404, {"error": "not found"}, ()

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: Any, close: bool,
                    head_only: bool = False, fields: Tuple[Tuple[str, str], ...] = ()) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        if body is None:  # 304: no body, no Content-Length
            data = b""
        else:
            if isinstance(body, str):  # an asset
                data, ctype = self._assets[body]
                if body == "/":
                    data = data.replace(_TOKEN_SLOT.encode(), self.token.encode())
            else:
                data, ctype = json.dumps(body).encode(), "application/json"
            lines += [f"Content-Type: {ctype}", f"Content-Length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in fields + _SECURITY_HEADERS]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else data))
        try:
            async with asyncio.timeout(IDLE_TIMEOUT):
                await writer.drain()
        except TimeoutError:  # a reader that never reads: the answer it holds goes now (close would wait for it)
            writer.transport.abort()
            raise
