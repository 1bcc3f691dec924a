"""HttpIngress against RFC 9112, on both loops: a real TunnelServer, a TunnelClient that forwards to
a small local HTTP app, and visitors on loopback. The head reaches the app byte for byte; the
ingress's answers (400, 404, 431, 502, its own /health) come only where the RFC or the routing
say so; visitor bytes are escaped in logs and bodies; a cut stream looks cut."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import httptools
import pytest

import ferrotunnel as ft
from conftest import free_port, tunnel
from ferrotunnel.server import http as http_mod
from ferrotunnel.server import http1, http_names

WAIT = 20.0  # generous: a slow CI machine must not fail these


class App:
    """A small keep-alive HTTP/1.1 app. It answers ``app `` + the raw head (+ body) it received, so
    a test sees exactly what reached it. ``/half`` sends a head with Content-Length 100 and 50 body
    bytes, then waits; ``/hang`` never answers."""

    def __init__(self) -> None:
        self.heads: list = []
        self.waiting = asyncio.Event()  # a /half or /hang request arrived (and /half's bytes are out)
        self.server: asyncio.AbstractServer

    async def start(self) -> "App":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    @property
    def address(self):
        return self.server.sockets[0].getsockname()[:2]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1]
                fields = {}
                for line in lines[1:]:
                    if b":" in line:
                        name, _, value = line.partition(b":")
                        fields[name.strip().lower()] = value.strip()
                body = b""
                if b"content-length" in fields:
                    body = await reader.readexactly(int(fields[b"content-length"]))
                elif fields.get(b"transfer-encoding") == b"chunked":
                    body = await reader.readuntil(b"0\r\n\r\n")
                if target.endswith(b"/half"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
                    await writer.drain()
                    self.waiting.set()
                    await reader.read()  # until the tunnel side goes away
                    return
                if target.endswith(b"/hang"):
                    self.waiting.set()
                    await reader.read()
                    return
                out = b"app " + head + body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
                await writer.drain()
                if fields.get(b"connection", b"").lower() == b"close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def rig(*, max_head: int = http_mod.MAX_HEAD, head_timeout: float = 30.0, local_addr=None):
    """Tunnel "web" -> the App (or ``local_addr``), behind an HttpIngress. Yields (ingress, app, client)."""
    app = await App().start()
    cfg = ft.ClientConfig(local_addr=local_addr or app.address)
    try:
        async with tunnel(None, client_config=cfg, tunnel_id="web") as (server, client, session):
            async with ft.HttpIngress(server, ("127.0.0.1", 0), max_head=max_head, head_timeout=head_timeout) as ing:
                yield ing, app, client
    finally:
        app.server.close()


async def exchange(addr, raw: bytes) -> bytes:
    """Send ``raw``, read until the ingress (or app) closes; for one-shot requests."""
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(raw)
        return await asyncio.wait_for(r.read(), WAIT)
    finally:
        w.close()


async def response(reader: asyncio.StreamReader):
    """One response with a Content-Length body: (status line, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.I)
    body = await asyncio.wait_for(reader.readexactly(int(m[1])), WAIT) if m else b""
    return head.split(b"\r\n", 1)[0], body


def status(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


# ------------------------------------------------------------------ bytes pass unchanged


def xf(head: bytes, host: bytes, client: bytes = b"127.0.0.1", proto: bytes = b"http") -> bytes:
    """``head`` as the app receives it: X-Forwarded-For/-Proto/-Host added at its end."""
    return head[:-2] + b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n" % (
        client, proto, host)


def test_head_reaches_the_app_byte_for_byte_with_keep_alive_and_chunked_bodies(run):
    async def body():
        async with rig() as (ing, app, client):
            r, w = await asyncio.open_connection(*ing.address)
            first = b"GET /one?x=1 HTTP/1.1\r\nHost: Web.:8080 \r\nX-Odd:   spaced   value \t\r\nAccept: */*\r\n\r\n"
            for piece in (first[:7], first[7:30], first[30:]):  # the head arrives in pieces
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0.05)
            line, got = await response(r)
            assert line == b"HTTP/1.1 200 OK" and got == b"app " + xf(first, b"Web.:8080")
            # keep-alive: every later head is parsed too, and its body delimited
            chunked = (b"POST /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            w.write(chunked)
            head_end = chunked.index(b"\r\n\r\n") + 4
            assert (await response(r))[1] == b"app " + xf(chunked[:head_end], b"web") + chunked[head_end:]
            second = b"GET /two HTTP/1.1\r\nHost: web\r\n\r\n"
            w.write(second)
            assert (await response(r))[1] == b"app " + xf(second, b"web")
            w.close()
            # a head and its body in one write, the body passed through
            post = b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nConnection: close\r\n\r\nBODY"
            assert body_of(await exchange(ing.address, post)) == b"app " + xf(post[:-4], b"web") + b"BODY"
            assert app.heads == [xf(first, b"Web.:8080"), xf(chunked[:head_end], b"web"), xf(second, b"web"),
                                 xf(post[:-4], b"web")]
    run(body)


# ------------------------------------------------------------------ RFC 9112 answers


def test_more_than_one_host_header_is_400(run):
    async def body():
        async with rig() as (ing, app, client):
            for raw in (b"GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: other\r\nHost: web\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: web\r\nhost: web\r\n\r\n"):
                got = await exchange(ing.address, raw)
                assert status(got) == b"HTTP/1.1 400 Bad Request", raw
                assert body_of(got) == b"more than one Host header\n"
            assert app.heads == []  # none of them reached the app
            assert (await exchange(ing.address, b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                    ).startswith(b"HTTP/1.1 200")
    run(body)


def test_whitespace_between_a_field_name_and_the_colon_is_400(run):
    async def body():
        async with rig() as (ing, app, client):
            for raw in (b"GET / HTTP/1.1\r\nHost : web\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost\t: web\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: web\r\nX-A : b\r\n\r\n"):
                got = await exchange(ing.address, raw)
                assert status(got) == b"HTTP/1.1 400 Bad Request", raw
                assert b"whitespace between a header name and the colon" in body_of(got)
            assert app.heads == []
    run(body)


def test_obs_fold_is_400(run):
    async def body():
        async with rig() as (ing, app, client):
            for raw in (b"GET / HTTP/1.1\r\nHost: web\r\nX-A: b\r\n c\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: web\r\nX-A: b\r\n\tc\r\n\r\n",
                        b"GET / HTTP/1.1\r\n Host: web\r\n\r\n"):
                got = await exchange(ing.address, raw)
                assert status(got) == b"HTTP/1.1 400 Bad Request", raw
                assert b"obs-fold" in body_of(got)
            assert app.heads == []
    run(body)


def test_raw_head_checks_hold_when_the_parser_is_lenient(run, monkeypatch):
    """llhttp refuses obs-fold itself; with its lenient_headers flag (or a lenient build) it folds
    the line into the value, and the check on the raw head bytes must still answer 400."""
    strict = httptools.HttpRequestParser

    def lenient(protocol):
        parser = strict(protocol)
        parser.set_dangerous_leniencies(lenient_headers=True)
        return parser

    monkeypatch.setattr(httptools, "HttpRequestParser", lenient)

    async def body():
        async with rig() as (ing, app, client):
            got = await exchange(ing.address, b"GET / HTTP/1.1\r\nHost: web\r\nX-A: b\r\n c\r\n\r\n")
            assert status(got) == b"HTTP/1.1 400 Bad Request" and b"obs-fold" in body_of(got)
            assert app.heads == []
    run(body)


def test_head_violation_unit():
    assert http1.head_violation(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n")
    assert http1.head_violation(b"GET / HTTP/1.1\r\n\tHost: a\r\n\r\n")
    assert http1.head_violation(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    assert http1.head_violation(b"GET / HTTP/1.1\r\nHost: a\r\nX: b : c\r\n\r\n") is None  # in a value: fine
    assert http1.head_violation(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\tc\r\n\r\n") is None


INVALID_HOSTS = [b"", b"  ", b"we b", b"web@evil", b"user:pw@web", b"web:http", b"web:99999", b"web:123456",
                 b"web:-1", b"web:80:80", b"[::1", b"[zz::1]", b"[::1]x", b"[::1]:x", b"[fe80::1%25eth0]",
                 b"web/path", b"web\xff", b"we\\b", b"we\"b"]


def test_invalid_host_is_400(run):
    async def body():
        async with rig() as (ing, app, client):
            for host in INVALID_HOSTS:
                got = await exchange(ing.address, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                assert status(got) == b"HTTP/1.1 400 Bad Request", host
                assert body_of(got).startswith(b"invalid Host header"), host
            assert app.heads == []
            for host in (b"web", b"WEB.:8080", b"web:", b"web:65535", b" web "):  # valid, routed
                got = await exchange(ing.address, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
                assert status(got) == b"HTTP/1.1 200 OK", host
            # valid but no such tunnel: 404, not 400
            got = await exchange(ing.address, b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
            assert status(got) == b"HTTP/1.1 404 Not Found" and body_of(got) == b"no tunnel is connected for ::1\n"
    run(body)


def test_parse_authority_unit():
    assert http_mod.parse_authority(b"App.Example.:8080") == "app.example"
    assert http_mod.parse_authority(b"[::1]:443") == "::1"
    assert http_mod.parse_authority(b"10.0.0.1") == "10.0.0.1"
    for bad in INVALID_HOSTS:
        assert http_mod.parse_authority(bad) is None, bad


def test_absolute_form_target_routes_by_its_authority(run):
    async def body():
        async with rig() as (ing, app, client):
            # the Host names no tunnel, the target's authority does: routed to it, head unchanged
            raw = b"GET http://WEB:8080/path?q=1 HTTP/1.1\r\nHost: nobody\r\nConnection: close\r\n\r\n"
            got = await exchange(ing.address, raw)
            assert status(got) == b"HTTP/1.1 200 OK" and body_of(got) == b"app " + xf(raw, b"WEB:8080")
            # the Host names the tunnel, the target another host: the target wins
            got = await exchange(ing.address, b"GET http://other.example/ HTTP/1.1\r\nHost: web\r\n\r\n")
            assert status(got) == b"HTTP/1.1 404 Not Found"
            assert body_of(got) == b"no tunnel is connected for other.example\n"
            assert app.heads == [xf(raw, b"WEB:8080")]
            for bad in (b"GET http:///x HTTP/1.1\r\nHost: web\r\n\r\n",          # empty authority
                        b"GET http://web@x/ HTTP/1.1\r\nHost: web\r\n\r\n",       # userinfo
                        b"GET http://web:99999/ HTTP/1.1\r\nHost: web\r\n\r\n",   # bad port
                        b"GET ftp://web/ HTTP/1.1\r\nHost: web\r\n\r\n"):         # not http(s)
                got = await exchange(ing.address, bad)
                assert status(got) == b"HTTP/1.1 400 Bad Request", bad
            assert len(app.heads) == 1
    run(body)


def test_head_over_max_head_or_without_an_end_is_431(run):
    async def body():
        limit = 1024
        async with rig(max_head=limit, head_timeout=60.0) as (ing, app, client):
            def head_of(size: int, end: bytes = b"\r\n\r\n") -> bytes:
                start = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\nX-Pad: "
                return start + b"a" * (size - len(start) - len(end)) + end

            exact = head_of(limit)
            assert len(exact) == limit
            got = await exchange(ing.address, exact + b"after the head, not part of it")
            # (Connection: close: what follows the head is not read)
            assert status(got) == b"HTTP/1.1 200 OK" and body_of(got) == b"app " + xf(exact, b"web")
            got = await exchange(ing.address, head_of(limit + 1))
            assert status(got) == b"HTTP/1.1 431 Request Header Fields Too Large"
            got = await exchange(ing.address, head_of(5 * limit))
            assert status(got) == b"HTTP/1.1 431 Request Header Fields Too Large"
            # a head that never ends: 431 as soon as max_head bytes are in, long before the 60 s timeout
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"GET / HTTP/1.1\r\nHost: web\r\nX-Pad: " + b"a" * limit)
            got = await asyncio.wait_for(r.read(), 10)
            w.close()
            assert status(got) == b"HTTP/1.1 431 Request Header Fields Too Large"
            assert ing.responses.get("431") == 3 and "408" not in ing.responses
            assert len(app.heads) == 1
    run(body)


def test_malformed_request_line_is_400(run):
    async def body():
        async with rig() as (ing, app, client):
            for raw in (b"nonsense\r\n\r\n",
                        b"GET /\r\nHost: web\r\n\r\n",               # no version (llhttp takes it)
                        b"GET  / HTTP/1.1\r\nHost: web\r\n\r\n",     # two spaces (llhttp takes it)
                        b"GET / HTTP/1.1 x\r\nHost: web\r\n\r\n",
                        b"GET / HTTP/9.9\r\nHost: web\r\n\r\n",
                        b"GET / HTTP/1.1\nHost: web\n\n",            # bare LF line ends
                        b"G(T / HTTP/1.1\r\nHost: web\r\n\r\n"):
                got = await exchange(ing.address, raw)
                assert status(got) == b"HTTP/1.1 400 Bad Request", raw
                assert body_of(got).startswith(b"malformed request"), raw
            assert app.heads == []
    run(body)


# ------------------------------------------------------------------ /health


def test_health_reaches_the_app_when_a_tunnel_serves_the_host(run):
    async def body():
        async with rig() as (ing, app, client):
            for raw in (b"GET /health HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
                        b"GET /health?deep=1 HTTP/1.1\r\nHost: WEB:80\r\nConnection: close\r\n\r\n",
                        b"GET http://web/health HTTP/1.1\r\nHost: nobody\r\nConnection: close\r\n\r\n"):
                got = await exchange(ing.address, raw)
                host = b"web" if b"http://" in raw else raw.split(b"Host: ")[1].split(b"\r\n")[0]
                assert status(got) == b"HTTP/1.1 200 OK" and body_of(got) == b"app " + xf(raw, host), raw
            # no tunnel for the request: the ingress answers itself
            for raw in (b"GET /health HTTP/1.1\r\n\r\n",
                        b"GET /health HTTP/1.0\r\n\r\n",
                        b"GET /health HTTP/1.1\r\nHost: nobody\r\n\r\n",
                        b"GET http://nobody/health HTTP/1.1\r\nHost: web\r\n\r\n"):
                got = await exchange(ing.address, raw)
                assert status(got) == b"HTTP/1.1 200 OK" and body_of(got) == b"ok\n", raw
            assert len(app.heads) == 3
            # other paths without a Host are still refused
            assert status(await exchange(ing.address, b"GET / HTTP/1.1\r\n\r\n")) == b"HTTP/1.1 400 Bad Request"
    run(body)


# ------------------------------------------------------------------ escaping


def _clean(text: str) -> bool:
    return all(0x20 <= ord(c) < 0x7f for c in text)


def test_visitor_bytes_are_escaped_in_log_lines_and_error_bodies(run, caplog):
    async def body():
        async with rig() as (ing, app, client):
            forged = b"GET /a\n2024-01-01 INFO ferrotunnel.http forged line\x1b[2J HTTP/1.1\r\nHost: web\r\n\r\n"
            bad_host = b"GET / HTTP/1.1\r\nHost: we\xff\\b\r\n\r\n"
            routed = b"GET /a\\b%1b HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"  # llhttp takes "\"
            with caplog.at_level(logging.DEBUG, logger="ferrotunnel"):
                got_forged = await exchange(ing.address, forged)
                got_host = await exchange(ing.address, bad_host)
                got_routed = await exchange(ing.address, routed)
            assert status(got_forged) == status(got_host) == b"HTTP/1.1 400 Bad Request"
            assert status(got_routed) == b"HTTP/1.1 200 OK"
            for got in (got_forged, got_host):
                assert all(0x20 <= b < 0x7f for b in body_of(got).rstrip(b"\n")), got
            assert body_of(got_host) == b"invalid Host header: we\\xff\\x5cb\n"
            messages = [r.getMessage() for r in caplog.records]
            assert all(_clean(m) for m in messages), [m for m in messages if not _clean(m)]
            assert not any(m.startswith("2024-01-01") or "\n" in m for m in messages)
            line = [m for m in messages if "forged line" in m]
            assert len(line) == 1 and "/a\\x0a2024-01-01 INFO" in line[0] and "\\x1b[2J" in line[0]
            assert any("we\\xff\\x5cb" in m for m in messages)
            assert any("/a\\x5cb%1b -> tunnel web" in m for m in messages)
    run(body)


def test_printable_unit():
    p = http_mod.printable
    assert p(b"plain /path?x=1") == "plain /path?x=1"
    assert p(b"a\nb\rc\x1b\x7f\x00\\\xff") == "a\\x0ab\\x0dc\\x1b\\x7f\\x00\\x5c\\xff"
    assert p("t\u00e9") == "t\\xc3\\xa9"
    assert p(b"x" * 500) == "x" * http_names.PRINTABLE_LIMIT + "..."
    assert p(b"\n" * 500, limit=3) == "\\x0a" * 3 + "..."


# ------------------------------------------------------------------ a cut stream looks cut


def test_tunnel_gone_before_any_response_byte_is_502(run):
    async def body():
        async with rig() as (ing, app, client):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"GET /hang HTTP/1.1\r\nHost: web\r\n\r\n")
            await asyncio.wait_for(app.waiting.wait(), WAIT)
            client.session.close()  # the tunnel client's session dies before the app answered
            got = await asyncio.wait_for(r.read(), WAIT)
            w.close()
            assert status(got) == b"HTTP/1.1 502 Bad Gateway"
            assert body_of(got) == b"the tunnel went away before the local service answered\n"
        # a stream reset before the answer: the client cannot reach its local service
        async with rig(local_addr=("127.0.0.1", free_port())) as (ing, app, client):
            got = await exchange(ing.address, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert status(got) == b"HTTP/1.1 502 Bad Gateway" and body_of(got) == b"the local service is unreachable\n"
    run(body)


def test_tunnel_gone_mid_response_aborts_the_visitor(run):
    async def body():
        async with rig() as (ing, app, client):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"GET /half HTTP/1.1\r\nHost: web\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 100" in head
            assert await asyncio.wait_for(r.readexactly(50), WAIT) == b"x" * 50
            await asyncio.wait_for(app.waiting.wait(), WAIT)
            client.session.close()  # killed mid-response: 50 of 100 body bytes sent
            # the visitor must see a reset, not a clean end after a short body
            with pytest.raises(ConnectionResetError):
                rest = await asyncio.wait_for(r.read(), WAIT)
                raise AssertionError(f"clean EOF after a truncated body (then {rest!r})")
            w.close()
    run(body)


def test_the_ingress_answers_a_head_request_with_a_head_only(run):
    """RFC 9110 §9.3.2: its own answers (404, 400, ...) to HEAD carry no body, only the
    Content-Length the body would have had (a body after it was read as the start of the next
    response: curl's "Excess found")."""
    async def body():
        async with rig() as (ing, app, client):
            for method in (b"GET", b"HEAD"):
                for raw in (method + b" / HTTP/1.1\r\nHost: nope\r\n\r\n",
                            method + b" / HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n"):
                    got = await exchange(ing.address, raw)
                    head, _, rest = got.partition(b"\r\n\r\n")
                    length = int(re.search(rb"\r\nContent-Length: (\d+)", head)[1])
                    assert length > 0 and len(rest) == (0 if method == b"HEAD" else length), (raw, got)
    run(body)
