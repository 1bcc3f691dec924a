"""Server fixes, on both loops, with real sockets on 127.0.0.1: the pre-auth byte bound holds while
bytes arrive (not only when a connection is admitted); a malformed chunked body is answered 400
at once and never reaches the app as if whole; an HTTP/1.0 request with Transfer-Encoding is
refused (RFC 9112 §6.1); tunnel ids reach the server's log lines escaped, and ids with control
characters are refused at admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import Any, AsyncIterator, List, Optional, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.errors import HandshakeError, RetryableHandshakeError

from conftest import free_port
from test_http_proxy import get, response, two_tunnels

TOKEN = "server-fixes-token"
WAIT = 20.0  # only to catch a hang


async def until(cond: Any, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the peer ends the connection within ``timeout`` (EOF or a reset; what is left
    of a response before the end is read and dropped)."""
    try:
        await asyncio.wait_for(reader.read(), timeout)
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------ 1: max_preauth_bytes while bytes arrive


def test_pending_handshakes_hold_at_most_max_preauth_bytes_as_their_bytes_arrive(run, caplog):
    caplog.set_level(logging.INFO, logger="ferrotunnel")
    cap = 64 * 1024

    async def body():
        cfg = ft.ServerConfig(max_preauth_bytes=cap, handshake_timeout=60.0)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            # all admitted while nothing is held ...
            conns = [await asyncio.open_connection(*server.address) for _ in range(8)]
            await until(lambda: server.pending_handshakes == 8)
            # ... then each sends all but the last byte of a 32 KiB Handshake: 8 x 32 KiB held
            # unless the bound holds as the bytes arrive
            frame_len = 32 * 1024
            partial = struct.pack(">I", frame_len) + b"\x00\x00" + b"x" * (frame_len - 3)
            for _, w in conns:
                w.write(partial)
            for _, w in conns:
                await w.drain()
            ended = await asyncio.gather(*(closed_by_peer(r, 3.0) for r, _ in conns))
            held = server.preauth_bytes
            assert held <= cap, held
            assert sum(ended) >= 6, ended  # two of them together are over the cap already
            assert server.pending_handshakes == 8 - sum(ended)
            assert server.refused_connections["max_preauth_bytes"] == sum(ended)
            # the total leaves exactly with the connections
            for _, w in conns:
                w.close()
            await until(lambda: server.pending_handshakes == 0)
            assert server.preauth_bytes == 0
            # and when a handshake is accepted: a real one is served, and holds nothing after
            r, w = await asyncio.open_connection(*server.address)
            w.write(F.encode(F.Handshake(token=TOKEN, tunnel_id="honest", capabilities=["basic"])))
            ack = F.FrameDecoder().feed(await asyncio.wait_for(r.read(65536), WAIT))[0]
            assert ack.status == F.HandshakeStatus.SUCCESS
            assert server.preauth_bytes == 0 and server.pending_handshakes == 0
            w.close()
    run(body)
    lines = [r.getMessage() for r in caplog.records if "max_preauth_bytes" in r.getMessage()]
    assert len(lines) == 1, lines  # several closed, one line (per address and interval)


# ------------------------------------------------------------------ 2: a malformed chunked body


class BodyApp:
    """An app that records what each of its connections received and how it ended: "eof" (the
    tunnel closed it gracefully: a request could look whole) or "reset". It answers nothing."""

    def __init__(self) -> None:
        self.received: List[bytes] = []
        self.endings: List[str] = []
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> "BodyApp":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> Tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        ending = "eof"
        try:
            while data := await reader.read(65536):
                got += data
        except ConnectionError:
            ending = "reset"
        finally:
            self.received.append(bytes(got))
            self.endings.append(ending)
            writer.close()


@contextlib.asynccontextmanager
async def one_tunnel(app: Any, tunnel_id: str = "web") -> AsyncIterator[Any]:
    """A server, a client for ``tunnel_id`` forwarding to ``app``, and an HttpIngress: the ingress."""
    server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    async with server:
        client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=tunnel_id,
                                 config=ft.ClientConfig(local_addr=app.address))
        task = asyncio.create_task(client.connect_and_run())
        try:
            await server.wait_for_session(tunnel_id, timeout=WAIT)
            async with ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
                yield ing
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


BAD_CHUNKED = b"POST /bad HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"


def test_a_malformed_chunked_body_is_answered_400_at_once_and_its_stream_reset(run, caplog):
    caplog.set_level(logging.INFO, logger="ferrotunnel")

    async def body():
        app = await BodyApp().start()
        try:
            async with one_tunnel(app) as ing:
                r, w = await asyncio.open_connection(*ing.address)
                w.write(BAD_CHUNKED + get("web", "/after"))
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)  # not the 300 s idle timeout
                assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"\r\nConnection: close\r\n" in head
                assert await closed_by_peer(r, WAIT)  # and the connection is closed after it
                w.close()
                # the app's connection was reset (whatever of the request it had read): it never
                # sees a request that looks whole, nor anything after it
                await until(lambda: app.endings)
                assert app.endings == ["reset"], app.endings
                assert b"/after" not in app.received[0] and not app.received[0].endswith(b"0\r\n\r\n")
        finally:
            assert app.server is not None
            app.server.close()
    run(body)
    assert any("400" in r.getMessage() and "chunk" in r.getMessage() for r in caplog.records)


def test_a_malformed_chunked_body_after_a_pipelined_request_is_answered_after_its_response(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            bad = BAD_CHUNKED.replace(b"Host: web", b"Host: api")
            for first, second in ((get("api", "/first"), bad), (get("web", "/first"), bad)):  # same stream, another
                r, w = await asyncio.open_connection(*ing.address)
                w.write(first + second + get("web", "/never"))
                line, got = await response(r)
                assert line == b"HTTP/1.1 200 OK" and got.endswith(b" GET /first "), got
                line, _ = await asyncio.wait_for(response(r), 10)
                assert line == b"HTTP/1.1 400 Bad Request"
                assert await closed_by_peer(r, WAIT)
                w.close()
            assert not any(b"/never" in h for h in apps["web"].heads + apps["api"].heads)
    run(body)


# ------------------------------------------------------------------ 3: HTTP/1.0 with Transfer-Encoding


def test_an_http10_request_with_transfer_encoding_is_refused_and_nothing_after_it_is_forwarded(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            for before in (b"", get("web", "/first")):
                r, w = await asyncio.open_connection(*ing.address)
                w.write(before + b"POST /1 HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + get("api", "/2", "Connection: close\r\n"))
                if before:
                    assert (await response(r))[1] == b"web GET /first "
                line, _ = await asyncio.wait_for(response(r), 10)
                assert line == b"HTTP/1.1 400 Bad Request"
                assert await closed_by_peer(r, WAIT)
                w.close()
            assert apps["api"].heads == []  # the request after it never reaches any tunnel
            assert [h.split(b" ")[1] for h in apps["web"].heads] == [b"/first"]  # nor does it
    run(body)


def test_http11_chunked_and_http10_without_transfer_encoding_still_pass():
    from ferrotunnel.server.http1 import HeadError, parse_request

    assert parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").body() == "chunked"
    assert parse_request(b"POST / HTTP/1.0\r\nHost: a\r\nContent-Length: 3\r\n\r\n").body() == 3
    with pytest.raises(HeadError) as bad:
        parse_request(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").body()
    assert bad.value.status.startswith("400") and "HTTP/1.0" in bad.value.reason


# ------------------------------------------------------------------ 4: tunnel ids in log lines


def _server_lines(caplog: Any) -> List[str]:
    """The messages logged by the server package (the client's own lines may show its own id)."""
    return [r.getMessage() for r in caplog.records if "/ferrotunnel/server/" in r.pathname.replace("\\", "/")]


def _clean(text: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in text)


def test_tunnel_ids_reach_the_server_log_escaped(run, caplog):
    caplog.set_level(logging.DEBUG, logger="ferrotunnel")
    primary, more = "a\u2028b\u202e", "c\u2029d\u00e9"  # (line and paragraph separators, bidi override)

    async def body():
        echo = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = free_port()
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(port, port))
        async with server:
            local = echo.sockets[0].getsockname()[:2]
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=primary,
                                     config=ft.ClientConfig(local_addr=local),
                                     more_tunnels=[ft.Tunnel(more, ft.ClientConfig(local_addr=local, remote_port=port))])
            task = asyncio.create_task(client.connect_and_run())
            try:
                await until(lambda: client.carries_more_tunnels)
                r, w = await asyncio.open_connection("127.0.0.1", port)  # the registered tunnel's own port
                await closed_by_peer(r, WAIT)
                w.close()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await until(lambda: not list(server.sessions))
        echo.close()
    run(body)
    lines = _server_lines(caplog)
    assert all(_clean(m) for m in lines), [m for m in lines if not _clean(m)]
    assert any("established" in m and "a\\xe2\\x80\\xa8b" in m for m in lines), lines
    assert any("registered on session" in m and "c\\xe2\\x80\\xa9d" in m for m in lines), lines
    assert any("leased to tunnel c\\xe2\\x80\\xa9d" in m for m in lines), lines
    assert any("-> tunnel c\\xe2\\x80\\xa9d" in m for m in lines), lines


def test_a_tunnel_id_with_control_characters_is_refused_with_the_reason(run, caplog):
    caplog.set_level(logging.DEBUG, logger="ferrotunnel")
    forged = "x\n2026-01-01 00:00:00,000 ferrotunnel.server INFO handshake from 10.9.9.9:1 refused"

    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            at = "%s:%d" % server.address
            for tid in (forged, "tab\there", "esc\x1b[2J", "del\x7f", "c1\x85"):
                client = ft.TunnelClient(at, TOKEN, tunnel_id=tid)
                with pytest.raises(HandshakeError) as refused:
                    await client.connect()
                assert not isinstance(refused.value, RetryableHandshakeError)  # the client stops and says why
                assert "control character" in str(refused.value), str(refused.value)
                await client.close()
            assert not list(server.sessions)
            assert not server.throttled(("127.0.0.1", 0))  # a refused id is no failed login
            # an id in printable text (spaces and non-ASCII letters included) is still served
            ok = ft.TunnelClient(at, TOKEN, tunnel_id="my app \u00e9")
            await ok.connect()
            await until(lambda: server.sessions.get_by_tunnel_id("my app \u00e9") is not None)
            await ok.close()
    run(body)
    lines = _server_lines(caplog)
    assert all(_clean(m) for m in lines), [m for m in lines if not _clean(m)]
    assert not any(m.startswith("2026-01-01") for m in lines)


def test_a_handshake_cancelled_after_its_claim_leaves_no_session_behind(run, monkeypatch):
    """The connection closes (here: the handshake timer) while the server still awaits something
    after claiming the tunnel id (a port bind, a slow shared registry): the claim and the session
    go with it. Before, the closed session stayed registered, held its id and counted toward
    max_sessions, and the honest client's wait was counted as a failed login."""
    async def body():
        cfg = ft.ServerConfig(handshake_timeout=0.3, max_sessions=1, auth_failure_threshold=1)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            real_grant = server.ports.grant

            async def slow_grant(*args, **kwargs):
                await asyncio.sleep(1.0)  # longer than the handshake timer
                return await real_grant(*args, **kwargs)

            monkeypatch.setattr(server.ports, "grant", slow_grant)
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="db")
            with pytest.raises(ft.FerroTunnelError):
                await client.connect()
            await asyncio.sleep(0.1)
            assert len(server.registry.local_sessions()) == 0  # nothing kept: no id held, no slot taken
            assert not server.throttled(("127.0.0.1", 1))
            monkeypatch.setattr(server.ports, "grant", real_grant)
            other = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="db")
            await other.connect()  # the id and the one session slot are free
            assert [s.tunnel_id for s in server.registry.local_sessions()] == ["db"]
            await other.close()
    run(body)


def test_the_throttle_counts_an_ipv6_host_by_its_prefix_and_a_mapped_address_as_ipv4(run):
    """Failed logins from addresses of one /64 (what one IPv6 host is usually given) throttle
    them all; an IPv4 address and its ::ffff: form are one address. Before, each exact address
    string had its own count: rotating within a /64 never met auth_failure_threshold."""
    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=3)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            for i in range(3):
                server.auth_failure((f"2001:db8:1:2::{i + 1:x}", 40000 + i))
            assert server.throttled(("2001:db8:1:2:ffff:ffff:ffff:ffff", 1))
            assert not server.throttled(("2001:db8:1:3::1", 1))  # the next /64 is someone else
            for _ in range(3):
                server.auth_failure(("10.1.2.3", 5))
            assert server.throttled(("::ffff:10.1.2.3", 6)) and server.throttled(("10.1.2.3", 7))
            assert not server.throttled(("10.1.2.4", 8))
    run(body)
