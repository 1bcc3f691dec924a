"""HttpIngress: a public HTTP port that routes each connection by its first request's Host header.

The request head is read (bounded in size and time), the Host is normalised as the Rust server
does (trimmed, port stripped, lower-cased, one trailing dot dropped) and matched against the live
sessions' tunnel ids; from then on the connection's bytes flow both ways unchanged, so
keep-alive, chunked bodies and WebSocket upgrades just work. ``/health`` is answered locally.
Public visitors need no token.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Tuple, Union

from ..aio.bridge import TcpBridge
from ..aio.stream import VirtualStream
from ..errors import FerroTunnelError
from ..frames import Protocol
from .ingress import Ingress
from .registry import Route
from .server import TunnelServer

__all__ = ["HttpIngress", "normalize_host"]

log = logging.getLogger("ferrotunnel.http")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0


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


def _response(status: str, body: str) -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n").encode() + data


class _HttpBridge(TcpBridge):
    __slots__ = ("ingress", "_head", "_routed", "_head_timer", "_request", "_held")

    def __init__(self, ingress: "HttpIngress") -> None:
        super().__init__()
        self.ingress = ingress
        self._head = bytearray()
        self._routed = False
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._request: Tuple[str, str, str] = ("", "", "")  # method, target, tunnel id
        self._held = False  # the head is complete and the registry is looking the tunnel up

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.ingress.sweeper.add(self)
        self.ingress.connections += 1
        self._head_timer = asyncio.get_running_loop().call_later(self.ingress.head_timeout, self._slow_head)

    def _slow_head(self) -> None:
        if not self._routed and not self.finished:
            self._reply("408 Request Timeout", "request head not received in time\n")

    def _reply(self, status: str, body: str) -> None:
        self.ingress.responses[status.split()[0]] = self.ingress.responses.get(status.split()[0], 0) + 1
        self.transport.write(_response(status, body))
        if self._head_timer is not None:
            self._head_timer.cancel()
        self.close()

    def pass_owned(self) -> bool:
        return self._routed

    def data_received(self, data: bytes) -> None:
        if self._routed:
            super().data_received(data)
            return
        if self.finished:
            return
        self._head += data
        if self._held:
            return  # reading is paused; this is the rest of the last read, kept for the stream
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > self.ingress.max_head:
                self._reply("431 Request Header Fields Too Large", "request head too large\n")
            return
        if end + 4 > self.ingress.max_head:
            self._reply("431 Request Header Fields Too Large", "request head too large\n")
            return
        self._route(end)

    def _route(self, end: int) -> None:
        head = bytes(self._head[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._reply("400 Bad Request", "malformed request line\n")
            return
        path = parts[1]
        host = None
        upgrade = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            lname = name.strip().lower()
            if lname == "host" and host is None:
                host = value
            elif lname == "upgrade" and value.strip():
                upgrade = True
        if path == "/health" or path.startswith("/health?"):
            self._reply("200 OK", "ok\n")
            return
        if host is None:
            self._reply("400 Bad Request", "missing Host header\n")
            return
        tunnel_id = normalize_host(host)
        self._request = (parts[0], path, tunnel_id)
        if not self.ingress.open_stream(tunnel_id, Protocol.WEB_SOCKET if upgrade else Protocol.HTTP, self._opened):
            self._held = True
            self.hold_reading()

    def _opened(self, route: Optional[Route], result: Union[VirtualStream, FerroTunnelError, None]) -> None:
        method, path, tunnel_id = self._request
        if route is None:
            self._reply("404 Not Found", f"no tunnel is connected for {tunnel_id}\n")
            return
        if not isinstance(result, VirtualStream):
            log.warning("http ingress: cannot open a stream to tunnel %s: %s", tunnel_id, result)
            self._reply("502 Bad Gateway", "the tunnel could not take the request\n")
            return
        if self.finished:  # the visitor left while the route was looked up
            result.abort()
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._routed = True
        log.info("http %s %s -> tunnel %s stream %d", method, path, tunnel_id, result.stream_id)
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
            if self.stream is not None:
                self.stream.close()
            return
        super().tunnel_eof()

    def tunnel_reset(self, exc: BaseException) -> None:
        if self.bytes_down == 0 and not self.finished:
            self._reply("502 Bad Gateway", "the local service is unreachable\n")
            return
        super().tunnel_reset(exc)


class HttpIngress(Ingress):
    """A public HTTP port routed by Host to the session whose tunnel id matches."""

    kind = "HTTP ingress"

    def __init__(self, server: TunnelServer, address: Tuple[str, int], *, max_head: int = MAX_HEAD,
                 head_timeout: float = HEAD_TIMEOUT, priority: Any = None) -> None:
        super().__init__(server, address, priority)
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.responses: dict = {}

    def protocol_factory(self) -> asyncio.BaseProtocol:
        return _HttpBridge(self)
