"""The visitor side of the HTTP ingress (``http.HttpIngress``): one ``HttpBridge`` per visitor
connection parses and routes every request head, delimits bodies, adds X-Forwarded-*, follows the
responses on the current tunnel stream, and moves the connection to another tunnel's stream once
every response owed on the current one has gone out. See ``http`` for the whole picture."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from ..addr import format_peer
from ..aio.bridge import OWN_THRESHOLD, TcpBridge
from ..aio.stream import VirtualStream
from ..errors import ConnectionLostError, FerroTunnelError
from ..frames import DATA_HEADER_SIZE, Protocol
from .http1 import (Chunked, HeadError, PlainHeads, Request, ResponseTracker, check_partial, forwarded_head,
                    forwarded_lines, parse_request, rewrite_repeat)
from ..access import TunnelAccess
from .guard import AccessRefused, authorization_values, refusal, route_access, strip_authorization
from .http_badbody import CHUNKED, DISCARD, HEAD, LENGTH, RAW, WAIT, BadBodyMixin
from .http_names import no_route, printable, response, route_name
from .routes import Route, moved_away

if TYPE_CHECKING:
    from .http import HttpIngress

__all__ = ["HttpBridge"]

log = logging.getLogger("ferrotunnel.http")

_HEAD, _LENGTH, _CHUNKED, _RAW, _WAIT, _DISCARD = HEAD, LENGTH, CHUNKED, RAW, WAIT, DISCARD  # (http_badbody.py)
_BODY = ResponseTracker.LENGTH  # the tracker is in a Content-Length response body


class HttpBridge(BadBodyMixin, TcpBridge):
    """One visitor connection, as the module says; after a 101 (or a 2xx to CONNECT) a raw byte pipe."""

    __slots__ = ("ingress", "_buf", "_state", "_left", "_chunked", "tracker", "_tunnel", "_head_timer",
                 "_next", "stash", "_visitor_eof", "_trusted", "_client", "_mark", "request", "_leaving",
                 "_fast", "_opened_once", "_partial", "_after", "_seen", "_plain", "_guard")

    def __init__(self, ingress: "HttpIngress") -> None:
        super().__init__()
        self.ingress = ingress
        self._buf = bytearray()  # a request head so far
        self._state = _HEAD
        self._left = 0  # Content-Length body bytes still to come
        self._chunked: Optional[Chunked] = None
        self.tracker: Optional[ResponseTracker] = None  # the responses on the current stream
        self._tunnel: Optional[str] = None  # the tunnel of the current stream
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._next: Any = None  # while waiting: ("open", ...), ("reply", ...), ("bad body", ...) or ("upgrade",)
        self.stash: List[bytes] = []  # visitor bytes read while waiting
        self._visitor_eof = False  # the visitor's EOF, held back while waiting
        self._trusted = False  # the connection comes from a trusted proxy: its X-Forwarded-* are kept
        self._client = ""
        self._mark = 0  # bytes_down when the current stream was attached
        self.request: Tuple[bytes, bytes, str] = (b"", b"", "")  # method, target, tunnel id (for logs)
        self._leaving = False  # the current stream is done with; what it still sends is dropped
        self._fast = False  # the read being passed on is body or raw bytes (counted already)
        self._opened_once = False
        self._partial: Optional[Request] = None  # the parser of a head that is not complete yet
        self._after = _HEAD  # the state once the current request's body has passed
        self._seen: Optional[Tuple[bytes, str, bytes]] = None
        self._plain = PlainHeads()
        self._guard: Optional[TunnelAccess] = None  # the current stream's tunnel asks for basic credentials

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.finished:  # refused by a connection cap (when the bridge has one)
            return
        peer = self.peer_address or transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else str(peer or "")
        proxies = self.ingress.server.trusted_proxies
        if proxies is not None:
            sock_peer = transport.get_extra_info("peername")
            self._trusted = isinstance(sock_peer, tuple) and proxies.trusts(sock_peer[0])
        self.ingress.sweeper.add(self)
        self.ingress.connections += 1
        self._head_timer = asyncio.get_running_loop().call_later(self.ingress.head_timeout, self._slow_head)

    def _slow_head(self) -> None:  # the first head only: later ones have the idle timeout
        if not self._opened_once and not self.finished and self._state == _HEAD:
            self.reply("408 Request Timeout", "request head not received in time\n")

    def reply(self, status: str, body: str, bodiless: bool = False) -> None:  # (bodiless: to a HEAD)
        code = status.split()[0]
        self.ingress.responses[code] = self.ingress.responses.get(code, 0) + 1
        if self._head_timer is not None:
            self._head_timer.cancel()
        if self.finished:
            return
        self.leave_stream()
        self.transport.write(response(status, body, bodiless))
        self.close()

    def _reject(self, status: str, reason: str, head: bytes) -> None:
        """An error answer for a request we do not forward, logged with the request line escaped."""
        line = head.lstrip(b"\r\n").split(b"\r\n", 1)[0]
        log.info("http ingress: %s for %s: %s; request line: %s", status.split()[0],
                 format_peer(self.peer_address), reason, printable(line))
        self.reply(status, reason + "\n", line.startswith(b"HEAD "))

    # -- visitor to tunnel
    def pass_owned(self) -> bool:
        return self._fast

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state == _HEAD:
            seen = self._seen  # (Host, tunnel, X-Forwarded-* lines) of the last head routed the full way
            if (seen is not None and nbytes < OWN_THRESHOLD and seen[1] == self._tunnel and not self._buf
                    and not self._leaving and self.stream is not None):
                # a read that is the last plain head again (most keep-alive traffic: PlainHeads), of
                # that Host, keep-alive and without a body, gets its X-Forwarded-* lines written over
                # its empty line in the read buffer (which has room) and leaves from there as one frame
                plain = self._plain
                if plain.bare and plain.host == seen[0]:
                    n = rewrite_repeat(self.read_buffer(), DATA_HEADER_SIZE, nbytes, plain.last, seen[2])
                    if n >= 0:
                        self.tracker.pending.append(plain.answer)  # type: ignore[union-attr]  # (_sent's work)
                        self.send_read(nbytes, n)
                        return
                req = plain.rewrite(self.read_buffer(), DATA_HEADER_SIZE, nbytes, seen[0], seen[2])
                if req is not None:  # another plain head, now the last one
                    self.request = (req.method, req.url, seen[1])
                    if plain.bare:  # what _sent does for a plain head without a body
                        self.tracker.pending.append(plain.answer)  # type: ignore[union-attr]
                    else:
                        self._sent(req, plain.framing, [])
                    self.send_read(nbytes, nbytes - 2 + len(seen[2]))
                    return
        elif state == _RAW or (state == _LENGTH and self._left > nbytes):
            if state == _LENGTH:
                self._left -= nbytes
            self._fast = True
            try:
                super().buffer_updated(nbytes)
            finally:
                self._fast = False
            return
        super().buffer_updated(nbytes)

    def data_received(self, data: bytes) -> None:
        if self._fast:
            self.to_tunnel(data)
        elif self.finished:
            pass
        elif self._state == _WAIT:
            self.stash.append(data)
        else:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Delimit requests in ``data`` (for the current stream: written to it; else a wait starts)."""
        out: List[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _RAW:
                out.append(data[pos:] if pos else data)
                break
            if state == _LENGTH:
                take = min(self._left, n - pos)
                out.append(data[pos:pos + take])
                self._left -= take
                pos += take
                if not self._left:
                    self._state = self._after
            elif state == _CHUNKED:
                assert self._chunked is not None
                try:
                    end = self._chunked.feed(data, pos)
                except HeadError as exc:
                    self._flush_up(out)
                    self.bad_body(exc.status, exc.reason)
                    return
                if end < 0:
                    out.append(data[pos:])
                    break
                out.append(data[pos:end])
                pos = end
                self._state = self._after
                self._chunked = None
            elif state == _HEAD:
                buf = self._buf
                if not buf:
                    while data.startswith(b"\r\n", pos):
                        pos += 2
                    if pos >= n:
                        break
                before = len(buf)
                buf += data[pos:]
                end = buf.find(b"\r\n\r\n", max(0, before - 3))
                max_head = self.ingress.max_head
                if end < 0 or end + 4 > max_head:
                    if len(buf) > max_head:
                        self._flush_up(out)
                        self._wait(("reply", "431 Request Header Fields Too Large",
                                    f"request head too large (over {max_head} bytes)", bytes(buf[:200])))
                        return
                    if self._partial is None:
                        self._partial = Request()
                    try:  # a head that cannot become valid is answered now, not at its end
                        check_partial(self._partial, data[pos:], bytes(buf))
                    except HeadError as exc:
                        self._flush_up(out)
                        self._wait(("reply", exc.status, exc.reason, bytes(buf[:200])))
                        return
                    break
                head = bytes(buf[:end + 4])
                pos = n - (len(buf) - end - 4)
                self._buf = bytearray()
                self._partial = None
                if not self._on_head(head, out):
                    self._flush_up(out)
                    if pos < n:
                        self.stash.append(data[pos:])
                    return
            elif state == _DISCARD:  # after a request that closes the connection: nothing more is read
                break
            else:  # _WAIT
                self.stash.append(data[pos:])
                break
        self._flush_up(out)

    def _flush_up(self, out: List[bytes]) -> None:
        if out:
            self.to_tunnel(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _on_head(self, head: bytes, out: List[bytes]) -> bool:
        """A complete request head: True if it went on the current stream (``out``), False if the
        bridge now waits (for another stream, or to answer it itself)."""
        try:
            req = parse_request(head)
            framing = req.body()
        except HeadError as exc:
            return self._wait(("reply", exc.status, exc.reason, head))
        seen = self._seen  # the last request's Host, tunnel and X-Forwarded-* lines: most repeat them
        if (seen is not None and req.hosts and req.hosts[0] == seen[0] and req.url[:1] == b"/" and not req.xff and not
                req.xfp and not req.xfh and seen[1] == self._tunnel and not self._leaving and self.stream is not None):
            self.request = (req.method, req.url, seen[1])
            out.append(head[:-2] + seen[2])
            return self._sent(req, framing, out)
        try:
            tunnel_id, host, target, health = route_name(req)
        except HeadError as exc:
            return self._wait(("reply", exc.status, exc.reason, head))
        if tunnel_id is None:
            return self._wait(("reply", "200 OK", "ok", None) if health else
                              ("reply", "400 Bad Request", "missing Host header", head))
        tunnel_id = self.ingress.tunnel_for(tunnel_id)
        sni = self.ingress.sni_tunnel(self.transport)
        if sni is not None and sni != tunnel_id:  # HTTPS: the connection was opened for another name
            return self._wait(("reply", "421 Misdirected Request", f"this connection is for {printable(sni)} (its "
                               f"TLS server name), not {printable(tunnel_id)}: open one for that name", head))
        self.request = (req.method, target, tunnel_id)
        fwd = forwarded_head(head, req, self._client, host.decode("ascii"), self.ingress.scheme, self._trusted)
        if target[:1] == b"/":
            self._seen = (host, tunnel_id, forwarded_lines(self._client.encode(), self.ingress.scheme.encode(), host))
        if self.stream is not None and tunnel_id == self._tunnel and not self._leaving:
            guard = self._guard
            if guard is not None:  # basic auth: every request shows its credentials, which the app never sees
                self._seen = None
                refused = refusal(guard, "http", self.peer_address, authorization_values(fwd))
                if refused is not None:
                    self.ingress.count_refused(refused)
                    return self._wait(("reply", refused.status, refused.reason, head))
                fwd = strip_authorization(fwd)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("http %s %s -> tunnel %s stream %d", printable(req.method), printable(target),
                          printable(tunnel_id), self.stream.stream_id)
            out.append(fwd)
            return self._sent(req, framing, out)
        return self._wait(("open", tunnel_id, req, fwd, framing, host.decode("ascii"), health))

    def _sent(self, req: Request, framing: Any, out: List[bytes]) -> bool:
        """The head went (in ``out``) to the current stream: expect its answer and its body."""
        assert self.tracker is not None
        self.tracker.pending.append((req.method, req.upgrade))
        after = _HEAD if req.keep_alive else _DISCARD  # after a "Connection: close" request, nothing
        self._after = after
        if framing == "chunked":
            self._chunked = Chunked()
            self._state = _CHUNKED
        elif framing:
            self._left = framing
            self._state = _LENGTH
        else:
            self._state = after
        if req.upgrade and not framing:  # what follows waits for the answer: 101 makes a raw pipe
            return self._wait(("upgrade",))
        return True

    def _wait(self, action: Any) -> bool:
        """Stop reading the visitor; ``action`` runs once the current stream owes no response."""
        self._state = _WAIT
        self._next = action
        self.transport.pause_reading()
        if action[0] != "upgrade":
            asyncio.get_running_loop().call_soon(self._proceed)
        return False

    def _proceed(self) -> None:
        if self.finished or self._state != _WAIT or self._next is None or self._next[0] not in ("open", "reply"):
            return  # (an upgrade answer, or an open already under way: scheduled twice in one turn)
        tracker = self.tracker
        if self.stream is not None and tracker is not None and not tracker.idle and not self._leaving:
            return  # tunnel_data calls again when the last owed response has gone out
        action, self._next = self._next, None
        if action[0] == "reply":
            _, status, reason, head = action
            if head is None:  # the ingress's own /health, for a request no tunnel takes
                self.reply(status, reason + "\n")
            else:
                self._reject(status, reason, head)
            return
        _, tunnel_id, req, fwd, framing, host, health = action
        self.leave_stream()
        self._next = ("opening", req, fwd, framing, health)
        protocol = Protocol.WEB_SOCKET if req.upgrade else Protocol.HTTP
        self.ingress.open_stream(tunnel_id, protocol, self._opened, self.peer_address, host or None,
                                 authorization_values(fwd))

    def leave_stream(self) -> None:
        """Done with the current stream: what it still sends is dropped; it is closed gracefully."""
        self.detach()
        self._guard = None
        self.tracker = None
        self._tunnel = None
        self._leaving = False

    def _opened(self, route: Optional[Route], result: Union[VirtualStream, FerroTunnelError, None]) -> None:
        pending, self._next = self._next, None
        method, target, tunnel_id = self.request
        if self.finished:  # the visitor left while the route was looked up
            if isinstance(result, VirtualStream):
                result.abort()
            return
        _, req, fwd, framing, health = pending
        if route is None:
            self.reply(*no_route(self.ingress.server.registry, tunnel_id, health), req.method == b"HEAD")
            return
        if isinstance(result, AccessRefused):  # the tunnel's access rules (allow list, basic auth)
            self._reject(result.status, result.reason, fwd[:fwd.find(b"\r\n")])
            return
        if not isinstance(result, VirtualStream):
            self.ingress.log_rate.warning(log, repr(type(result)), time.monotonic(), "http ingress: cannot open a stream to "
                                          "tunnel %s: %s", printable(tunnel_id), printable(str(result)))
            self.reply("502 Bad Gateway", "the tunnel could not take the request\n")
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._opened_once = True
        log.info("http %s %s -> tunnel %s stream %d", printable(method), printable(target), printable(tunnel_id),
                 result.stream_id)
        self.tracker = ResponseTracker()
        self._tunnel = tunnel_id
        access = route_access(route)
        if access is not None and access.digest is not None:
            self._guard = access
            self._seen = None  # no quick path: each request's credentials are checked
            fwd = strip_authorization(fwd)
        self._mark = self.bytes_down
        self._state = _HEAD
        self.attach(result)
        if self.finished:
            return
        out = [fwd]
        going = self._sent(req, framing, out)
        self._flush_up(out)
        if going:
            self._resume()

    def _resume(self) -> None:
        """The wait is over: what the visitor sent meanwhile is delimited now, then reading goes on."""
        stash, self.stash = self.stash, []
        while stash and self._state != _WAIT and not self.finished:
            self._feed(stash.pop(0))
        if self._state == _WAIT:
            self.stash.extend(stash)
            return
        if self.finished:
            return
        if self._visitor_eof:
            self._visitor_eof = False
            super().eof_received()
        elif not self._reading_paused:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self._state == _WAIT:
            self._visitor_eof = True
            self.release_read_buffer()
            return True
        if self.stream is None:  # a visitor that sent no complete head: nothing to answer
            self.close()
            return False
        return super().eof_received()

    # -- tunnel to visitor
    def tunnel_data(self, payload: memoryview) -> None:
        tracker = self.tracker
        if self._leaving or tracker is None:
            if self.stream is not None:
                self.stream.consumed(len(payload))
            return
        n = len(payload)
        if tracker.state == _BODY and tracker.left > n and not tracker.raw:  # a response body, not its end
            tracker.left -= n
            TcpBridge.tunnel_data(self, payload)  # (not super(): the common ways, kept short)
            return
        if tracker.raw or tracker.lost:  # a raw pipe, or responses no longer followed
            super().tunnel_data(payload)
            return
        if n < OWN_THRESHOLD:  # copied once, here: the tracker reads it in place, the TCP side keeps it
            payload = bytes(payload)  # type: ignore[assignment]
        known, pending = tracker.known, tracker.pending
        # one whole response that repeats the last Content-Length one (``known``), owed to a plain head
        # of the quick way (its answer is that very tuple; ``PlainHeads.quick``: none for HEAD): what
        # ResponseTracker.feed makes of it
        if (n < OWN_THRESHOLD and n == len(known) + tracker.known_left and pending and pending[0] is self._plain.quick
                and known and not tracker.state and not tracker.head and payload.startswith(known)):  # type: ignore
            pending.popleft()
            used = n
        else:  # bytes after the last owed response are dropped: they would reach the visitor as the answer
            used = tracker.feed(payload, True)  # to its next request, maybe for another tunnel
        if used < n:  # bytes after the last owed response: nobody asked for them
            if used:
                super().tunnel_data(payload[:used])
            assert self.stream is not None
            self.stream.consumed(n - used)
        else:
            TcpBridge.tunnel_data(self, payload)
        if self._state == _WAIT and self._next is not None:
            if self._next[0] == "upgrade":
                if tracker.answered_upgrade is not None:
                    switched, tracker.answered_upgrade = tracker.answered_upgrade, None
                    self._next = None
                    self._state = _RAW if switched else self._after
                    asyncio.get_running_loop().call_soon(self._resume)
            elif self._next[0] == "bad body":
                if len(tracker.pending) <= 1 or tracker.lost:
                    asyncio.get_running_loop().call_soon(self.settle_bad_body)
            elif tracker.idle:
                self._leaving = True
                asyncio.get_running_loop().call_soon(self._proceed)

    def tunnel_writable(self) -> None:
        if self._state == _WAIT:  # reading stays paused; it resumes when the wait is over
            self._reading_paused = False
            return
        super().tunnel_writable()

    # a stream that ends before any response byte: the local service did not answer
    def tunnel_eof(self) -> None:
        if self._leaving or self.settle_bad_body(final=True):
            return
        if self.bytes_down == self._mark and not self.finished:
            self.reply("502 Bad Gateway", "the local service closed the connection without answering\n")
            return
        if self._state == _WAIT:  # the app ended the connection (a response delimited by its end)
            self.flush_out()
            self.close()
            return
        if self._state != _RAW:  # no more answers on this connection: the request in flight finishes,
            self._after = _DISCARD  # nothing after it is read (nor routed elsewhere), the visitor gets
            if self._state == _HEAD:  # the app's FIN and its own FIN ends the connection
                self._state = _DISCARD
        super().tunnel_eof()

    def tunnel_reset(self, exc: BaseException) -> None:
        """The stream was reset or its session died: a 502 (503 if the tunnel moved) before any response byte,
        after one the visitor's connection is aborted with a RST (a FIN would make a cut response look whole)."""
        if self._leaving:
            return
        if self.finished:
            super().tunnel_reset(exc)
            return
        if self.settle_bad_body(final=True):  # (the app gave up on the malformed body first)
            return
        pending = self._outq
        unsent = sum(len(p) for p in pending) if pending else 0
        tunnel_id = self.request[2]
        if self.bytes_down - self._mark == unsent:  # nothing of the response went out to the visitor
            self._outq = None  # what arrived in this read is dropped with the stream
            lost, moved = isinstance(exc, ConnectionLostError), moved_away(self.ingress.server.registry, tunnel_id, exc, self.stream)
            self.ingress.log_rate.warning(log, (tunnel_id, moved, lost), time.monotonic(), "http ingress: tunnel %s %s "
                                          "before answering; %s", printable(tunnel_id), "moved to another node" if moved
                                          else "went away" if lost else "reset the stream", "503" if moved else "502")
            self.detach()  # (the credit owed for bytes held while the visitor was slow goes back)
            self.reply(*(("503 Service Unavailable", "the tunnel moved to another node; try again\n") if moved else
                         ("502 Bad Gateway", "the tunnel went away before the local service answered\n" if lost
                          else "the local service is unreachable\n")))
            return
        log.warning("http ingress: tunnel %s stream cut after %d response bytes; aborting the visitor's connection",
                    printable(tunnel_id), self.bytes_down - self._mark - unsent)
        super().tunnel_reset(exc)  # an abort with SO_LINGER 0: a RST
