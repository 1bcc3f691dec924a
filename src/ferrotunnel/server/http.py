"""HttpIngress: a public HTTP port that routes each connection by its first request's Host header.

The first request head is parsed with httptools (llhttp, the parser uvicorn uses), bounded in size
(``max_head``) and time (``head_timeout``), and checked as RFC 9112 asks: one Host header, a
valid Host, no whitespace between a field name and its colon, no obs-fold. A request with an
absolute-form target (``GET http://app.example/ HTTP/1.1``) is routed by the target's authority,
otherwise by Host; the name is normalised as the Rust server does (port stripped, lower-cased, one
trailing dot dropped) and matched against the live sessions' tunnel ids. From then on the
connection's bytes flow both ways unchanged (the head exactly as it was received), so keep-alive,
chunked bodies and WebSocket upgrades just work; nothing after the first head is parsed.

``/health`` is answered locally only for a request that does not route to a tunnel (no Host, or
no tunnel for it): an app behind a tunnel gets its own ``/health``. Public visitors need no token.
Whatever a visitor sent appears in log lines and error bodies only escaped (``printable``).

A tunnel stream that is reset, or whose session dies, before any response byte reached the
visitor becomes a 502; after that the visitor's connection is aborted with a RST, so a truncated
response is not taken for a complete one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import struct
from typing import Any, List, Optional, Tuple, Union

import httptools

from ..aio.bridge import TcpBridge
from ..aio.stream import VirtualStream
from ..errors import ConnectionLostError, FerroTunnelError
from ..frames import Protocol
from .ingress import Ingress
from .registry import Route
from .server import TunnelServer

__all__ = ["HttpIngress", "normalize_host", "printable"]

log = logging.getLogger("ferrotunnel.http")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
#: At most this many bytes of visitor input go into one log line or error body (escaped).
PRINTABLE_LIMIT = 200

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST


def normalize_host(value: str) -> str:
    """Host header to tunnel id: trim, drop the port (keep a bare IPv6 address), lower-case,
    drop one trailing dot."""
    host = value.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    return host


# -------------------------------------------------------------------- escaping visitor input

_UNSAFE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # control bytes, DEL, non-ASCII and the backslash


def _hex(m: "re.Match[bytes]") -> bytes:
    return b"\\x%02x" % m[0][0]


def printable(data: Union[bytes, bytearray, memoryview, str], limit: int = PRINTABLE_LIMIT) -> str:
    """Visitor input for a log line or an error body: printable ASCII as it is, every other byte
    (control bytes, DEL, non-ASCII, the backslash) as ``\\xNN``; at most ``limit`` input bytes,
    then ``...``."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
    cut = len(raw) > limit
    if cut:
        raw = raw[:limit]
    text = _UNSAFE.sub(_hex, raw).decode("ascii")
    return text + "..." if cut else text


# -------------------------------------------------------------------- RFC 9112 checks

#: reg-name / IPv4address of RFC 3986: unreserved, sub-delims and pct-encoded, at least one.
_REG_NAME = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_IPV6 = re.compile(rb"[0-9A-Fa-f:.]+")
#: The start of an absolute-form target: scheme "://" authority (up to "/", "?" or "#").
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")
#: A field line that starts with whitespace: obs-fold (or whitespace before the first field).
_OBS_FOLD = re.compile(rb"\n[ \t]")
#: Whitespace between a field name and the colon (the name is everything before the first colon).
_SPACE_COLON = re.compile(rb"\n[^:\r\n]*[ \t]:")
#: method SP request-target SP HTTP-version CRLF (the method a token).
_REQUEST_LINE = re.compile(rb"(?:\r\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r\n")


def parse_authority(raw: bytes) -> Optional[str]:
    """A Host field value or the authority of an absolute-form target to a tunnel id, or None when
    it is invalid (RFC 9112 §3.2, RFC 3986 §3.2.2): empty, a character outside reg-name (so no
    userinfo, no space, nothing raw), a bad IPv6 literal or a port that is not 0..65535."""
    value = raw.strip(b" \t")
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return None
        literal, rest = value[1:end], value[end + 1:]
        if not _IPV6.fullmatch(literal):
            return None
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return None
    else:
        host, sep, port = value.partition(b":")
        if not _REG_NAME.fullmatch(host):
            return None
        rest = sep + port
    if rest:
        port = rest[1:]
        if rest[:1] != b":" or (port and (not port.isdigit() or len(port) > 5 or int(port) > 65535)):
            return None
    return normalize_host(value.decode("ascii"))


def head_violation(head: bytes) -> Optional[str]:
    """What RFC 9112 forbids in a request head that a lenient parser may let through: obs-fold
    (a field line starting with SP or HTAB, §5.2) and whitespace between a field name and the
    colon (§5.1). ``head`` is the head up to its end; None if neither is there."""
    if _OBS_FOLD.search(head):
        return "obs-fold (a header line starting with whitespace) is not allowed"
    if _SPACE_COLON.search(head):
        return "whitespace between a header name and the colon is not allowed"
    return None


def _head_end(data: bytes) -> int:
    """Where a complete head (as llhttp accepted it: CRLF line ends, maybe empty lines first) ends."""
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    return len(data) if end < 0 else end + 4



def _why_missing(registry: Any, tunnel_id: str) -> Optional[str]:
    """Why a cluster registry found no route other than "no such tunnel" (Redis or the owning
    node unreachable), or None."""
    why = getattr(registry, "why_missing", None)
    return why(tunnel_id) if why is not None else None

class _Complete(Exception):
    """Raised from on_headers_complete: llhttp stops at the end of the first head."""


class _Head:
    """httptools callbacks for the first request head: the target, the Host values, an Upgrade."""

    __slots__ = ("url", "hosts", "upgrade", "complete", "parser", "fed")

    def __init__(self) -> None:
        self.url = b""
        self.hosts: List[bytes] = []
        self.upgrade = False
        self.complete = False
        self.fed = 0  # bytes given to the parser (never more than max_head)
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"host":
            self.hosts.append(value)
        elif lname == b"upgrade" and value.strip():
            self.upgrade = True

    def on_headers_complete(self) -> None:
        self.complete = True
        raise _Complete

    def feed(self, data: bytes) -> None:
        """Parse on; HttpParserError for a malformed head. Stops at the end of the head."""
        self.fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self.complete:
                raise
        except httptools.HttpParserUpgrade:  # not reached (the callback stops llhttp first); never let it out
            if not self.complete:
                raise httptools.HttpParserError("upgrade before the end of the head") from None


def _response(status: str, body: str) -> bytes:
    data = body.encode("ascii", "backslashreplace")
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n").encode() + data


def _is_health(path: bytes) -> bool:
    return path == b"/health" or path.startswith(b"/health?")


class _HttpBridge(TcpBridge):
    __slots__ = ("ingress", "_head", "_routed", "_head_timer", "_request", "_held", "_parse")

    def __init__(self, ingress: "HttpIngress") -> None:
        super().__init__()
        self.ingress = ingress
        self._head = bytearray()  # everything read before routing: forwarded as it is
        self._routed = False
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._request: Tuple[bytes, bytes, str, bool] = (b"", b"", "", False)  # method, target, tunnel id, /health
        self._held = False  # the head is complete and the registry is looking the tunnel up
        self._parse: Optional[_Head] = None  # made at the first byte; dropped once the head is complete

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.finished:  # refused by a connection cap (when the bridge has one)
            return
        self.ingress.sweeper.add(self)
        self.ingress.connections += 1
        self._head_timer = asyncio.get_running_loop().call_later(self.ingress.head_timeout, self._slow_head)

    def _slow_head(self) -> None:
        if not self._routed and not self.finished:
            self._reply("408 Request Timeout", "request head not received in time\n")

    def _reply(self, status: str, body: str) -> None:
        code = status.split()[0]
        self.ingress.responses[code] = self.ingress.responses.get(code, 0) + 1
        if self._head_timer is not None:
            self._head_timer.cancel()
        if self.finished:
            return
        self.transport.write(_response(status, body))
        self.close()

    def _reject(self, status: str, reason: str) -> None:
        """An error answer for a request we do not forward, logged with the request line escaped."""
        head = bytes(self._head)
        line = head.lstrip(b"\r\n").split(b"\r\n", 1)[0]
        log.info("http ingress: %s for %s: %s; request line: %s", status.split()[0],
                 self.peer_address, reason, printable(line))
        self._reply(status, reason + "\n")

    def pass_owned(self) -> bool:
        return self._routed

    def data_received(self, data: bytes) -> None:
        if self._routed:
            super().data_received(data)
            return
        if self.finished:
            return
        self._head += data
        parse = self._parse
        if parse is None:
            if self._held:
                return  # reading is paused; this is the rest of the last read, kept for the stream
            self._parse = parse = _Head()
        max_head = self.ingress.max_head
        room = max_head - parse.fed
        try:
            parse.feed(data if len(data) <= room else data[:room])
        except httptools.HttpParserError as exc:
            self._malformed(parse, exc)
            return
        if not parse.complete:
            if parse.fed >= max_head:
                self._reject("431 Request Header Fields Too Large",
                             f"request head too large (over {max_head} bytes)")
            return
        self._parse = None
        self._route(parse)

    def _malformed(self, parse: _Head, exc: Exception) -> None:
        head = bytes(self._head[:parse.fed])
        if (isinstance(exc, (httptools.HttpParserInvalidMethodError, httptools.HttpParserInvalidURLError))
                or not _REQUEST_LINE.match(head)):
            reason = "malformed request line"
        else:
            reason = head_violation(head[:_head_end(head)]) or "malformed request head (%s)" % printable(str(exc))
        self._reject("400 Bad Request", reason)

    def _route(self, parse: _Head) -> None:
        head = bytes(self._head)
        # llhttp takes an HTTP/0.9-style line ("GET /" without a version) and several spaces
        # between the parts; RFC 9112 §3 wants exactly method SP target SP version
        if not _REQUEST_LINE.match(head):
            self._reject("400 Bad Request", "malformed request line")
            return
        problem = head_violation(head[:_head_end(head)])
        if problem is not None:  # llhttp refuses these itself unless built or set lenient
            self._reject("400 Bad Request", problem)
            return
        if len(parse.hosts) > 1:
            self._reject("400 Bad Request", "more than one Host header")
            return
        tunnel_id: Optional[str] = None
        if parse.hosts:
            tunnel_id = parse_authority(parse.hosts[0])
            if tunnel_id is None:
                self._reject("400 Bad Request", "invalid Host header: %s" % printable(parse.hosts[0]))
                return
        target = parse.url
        path = target
        absolute = _ABSOLUTE.match(target)
        if absolute is not None:  # absolute-form: the target's authority wins over Host (RFC 9112 §3.2.2)
            if absolute[1].lower() not in (b"http", b"https"):
                self._reject("400 Bad Request", "unsupported scheme in the request target")
                return
            tunnel_id = parse_authority(absolute[2])
            if tunnel_id is None:
                self._reject("400 Bad Request", "invalid authority in the request target: %s" % printable(absolute[2]))
                return
            path = target[absolute.end():] or b"/"
        health = _is_health(path)
        if tunnel_id is None:
            if health:
                self._reply("200 OK", "ok\n")
            else:
                self._reject("400 Bad Request", "missing Host header")
            return
        self._request = (parse.parser.get_method(), target, tunnel_id, health)
        protocol = Protocol.WEB_SOCKET if parse.upgrade else Protocol.HTTP
        if not self.ingress.open_stream(tunnel_id, protocol, self._opened):
            self._held = True
            self.hold_reading()

    def _opened(self, route: Optional[Route], result: Union[VirtualStream, FerroTunnelError, None]) -> None:
        method, target, tunnel_id, health = self._request
        if route is None:
            if health:  # the ingress's own /health, for a request no tunnel takes
                self._reply("200 OK", "ok\n")
            elif (why := _why_missing(self.ingress.server.registry, tunnel_id)) is not None:  # a cluster node
                self._reply("503 Service Unavailable", f"tunnel {printable(tunnel_id)} is not on this node and "
                            f"{why}; try again shortly\n")
            else:
                self._reply("404 Not Found", f"no tunnel is connected for {printable(tunnel_id)}\n")
            return
        if not isinstance(result, VirtualStream):
            log.warning("http ingress: cannot open a stream to tunnel %s: %s", printable(tunnel_id),
                        printable(str(result)))
            self._reply("502 Bad Gateway", "the tunnel could not take the request\n")
            return
        if self.finished:  # the visitor left while the route was looked up
            result.abort()
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._routed = True
        log.info("http %s %s -> tunnel %s stream %d", printable(method), printable(target), printable(tunnel_id),
                 result.stream_id)
        head_bytes = bytes(self._head)
        self._head = bytearray()
        self.attach(result)
        super().data_received(head_bytes)
        if self._held:
            self._held = False
            self.release_reading()

    # a stream that ends before any response byte: the local service did not answer
    def tunnel_eof(self) -> None:
        if self.bytes_down == 0 and not self.finished:
            self._reply("502 Bad Gateway", "the local service closed the connection without answering\n")
            return
        super().tunnel_eof()

    def tunnel_reset(self, exc: BaseException) -> None:
        """The stream was reset or its session died: a 502 if the visitor got no response byte yet,
        otherwise the visitor's connection is aborted with a RST (a FIN would make a truncated
        response look complete)."""
        if self.finished:
            super().tunnel_reset(exc)
            return
        pending = self._outq
        unsent = sum(len(p) for p in pending) if pending else 0
        if self.bytes_down == unsent:  # nothing of the response went out to the visitor
            self._outq = None  # what arrived in this read is dropped with the stream
            lost = isinstance(exc, ConnectionLostError)
            log.warning("http ingress: tunnel %s %s before answering; 502", printable(self._request[2]),
                        "went away" if lost else "reset the stream")
            self._reply("502 Bad Gateway", "the tunnel went away before the local service answered\n" if lost
                        else "the local service is unreachable\n")
            return
        log.warning("http ingress: tunnel %s stream cut after %d response bytes; aborting the visitor's connection",
                    printable(self._request[2]), self.bytes_down - unsent)
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        super().tunnel_reset(exc)


class HttpIngress(Ingress):
    """A public HTTP port routed by Host (or an absolute-form target's authority) to the session
    whose tunnel id matches."""

    kind = "HTTP ingress"

    def __init__(self, server: TunnelServer, address: Tuple[str, int], *, max_head: int = MAX_HEAD,
                 head_timeout: float = HEAD_TIMEOUT, priority: Any = None) -> None:
        super().__init__(server, address, priority)
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.responses: dict = {}

    def protocol_factory(self) -> TcpBridge:
        return _HttpBridge(self)
