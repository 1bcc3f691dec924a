"""The HTTP ingress as a per-request reverse proxy, on both loops: two tunnels, two apps, and
visitors whose keep-alive connections move between them. Every request reaches the app its own
Host names and no other; responses keep their order; bodies (Content-Length, chunked) are only
delimited, never re-routed; X-Forwarded-* are set (appended for a trusted proxy, replaced for
anyone else); a WebSocket-style upgrade becomes a raw pipe; ``<id>.<domain>`` routes to ``<id>``."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Dict, List, Optional

import ferrotunnel as ft

TOKEN = "http-proxy-token"
WAIT = 20.0


class App:
    """A keep-alive HTTP/1.1 app named ``name``: answers ``<name> <method> <target> <body>`` with
    a Content-Length, and records every head it received. ``/ws`` answers 101 and then echoes raw
    bytes; ``/refuse-upgrade`` answers 400 to an upgrade; ``/eof`` answers without a length and
    closes; HEAD gets a Content-Length and no body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.heads: List[bytes] = []
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> "App":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    @property
    def address(self):
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                method, target = head.split(b" ")[:2]
                fields: Dict[bytes, bytes] = {}
                for line in head.split(b"\r\n")[1:]:
                    if b":" in line:
                        k, _, v = line.partition(b":")
                        fields[k.strip().lower()] = v.strip()
                body = b""
                if b"content-length" in fields:
                    body = await reader.readexactly(int(fields[b"content-length"]))
                elif fields.get(b"transfer-encoding") == b"chunked":
                    body = await reader.readuntil(b"0\r\n\r\n")
                if target == b"/ws":
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
                    while data := await reader.read(65536):
                        writer.write(self.name.encode() + b":" + data)
                    return
                out = b"%s %s %s %s" % (self.name.encode(), method, target, body)
                if target == b"/refuse-upgrade":
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
                elif target == b"/extra":  # an answer, then one nobody asked for
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)
                                 + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
                elif target == b"/eof":
                    writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + out)
                    await writer.drain()
                    return
                elif method == b"HEAD":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def two_tunnels(*, domain: Optional[str] = None, trusted: Optional[List[str]] = None):
    """Tunnels "web" and "api" to their own apps, behind one HttpIngress. Yields (ingress, apps)."""
    apps = {n: await App(n).start() for n in ("web", "api")}
    cfg = ft.ServerConfig(trusted_proxies=tuple(trusted)) if trusted else ft.ServerConfig()
    server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg)
    tasks = []
    try:
        async with server:
            for name, app in apps.items():
                client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=name,
                                         config=ft.ClientConfig(local_addr=app.address))
                tasks.append(asyncio.create_task(client.connect_and_run()))
                await server.wait_for_session(name, timeout=10)
            async with ft.HttpIngress(server, ("127.0.0.1", 0), domain=domain) as ing:
                yield ing, apps
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for app in apps.values():
            assert app.server is not None
            app.server.close()


async def response(reader: asyncio.StreamReader, head_only: bool = False):
    """One response: (status line, body) — the body by its Content-Length (none for HEAD)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.I)
    body = await asyncio.wait_for(reader.readexactly(int(m[1])), WAIT) if m and not head_only else b""
    return head.split(b"\r\n", 1)[0], body


def get(host: str, path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def test_a_keep_alive_connection_alternating_two_hosts_reaches_two_apps(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            for i in range(6):
                name = ("web", "api")[i % 2]
                w.write(get(name, f"/{i}"))
                line, got = await response(r)
                assert line == b"HTTP/1.1 200 OK" and got == f"{name} GET /{i} ".encode(), (i, got)
            # pipelined, alternating, in one write: answered in order, each by its own app
            w.write(get("web", "/p1") + get("api", "/p2") + get("api", "/p3") + get("web", "/p4"))
            for name, path in (("web", "/p1"), ("api", "/p2"), ("api", "/p3"), ("web", "/p4")):
                assert (await response(r))[1] == f"{name} GET {path} ".encode()
            w.close()
            assert [h.split(b" ")[1] for h in apps["web"].heads] == [b"/0", b"/2", b"/4", b"/p1", b"/p4"]
            assert [h.split(b" ")[1] for h in apps["api"].heads] == [b"/1", b"/3", b"/5", b"/p2", b"/p3"]
            assert all(b"Host: web\r\n" in h for h in apps["web"].heads)
            assert all(b"Host: api\r\n" in h for h in apps["api"].heads)
    run(body)


def test_bodies_are_delimited_never_re_routed(run):
    """A body that looks like a request for the other tunnel stays a body of the first request;
    the request after it is routed by its own Host."""
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            smuggled = get("api", "/smuggled")
            w.write(b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
                    + b"POST /b HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
                    + get("api", "/c"))
            assert (await response(r))[1] == b"web POST /a " + smuggled
            line, got = await response(r)
            assert line == b"HTTP/1.1 200 OK" and got.startswith(b"web POST /b "), got
            assert (await response(r))[1] == b"api GET /c "
            w.close()
            assert [h.split(b" ")[1] for h in apps["api"].heads] == [b"/c"]
    run(body)


def test_a_head_response_and_interim_answers_keep_the_count(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\n" + get("api", "/after"))
            line, got = await response(r, head_only=True)
            assert line == b"HTTP/1.1 200 OK" and got == b""
            assert (await response(r))[1] == b"api GET /after "
            w.close()
    run(body)


def test_forwarded_headers_are_replaced_for_visitors_and_appended_for_a_trusted_proxy(run):
    spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
    for trusted in (None, ["127.0.0.1/32"]):
        async def body():
            async with two_tunnels(trusted=trusted) as (ing, apps):
                r, w = await asyncio.open_connection(*ing.address)
                w.write(get("web", "/", spoof) + get("web", "/2"))
                await response(r)
                await response(r)
                w.close()
                first, second = apps["web"].heads
                if trusted:  # the front proxy's values are kept; the address it came from is appended
                    assert b"X-Forwarded-For: 6.6.6.6, 127.0.0.1\r\n" in first
                    assert b"X-Forwarded-Proto: https\r\n" in first and b"X-Forwarded-Host: evil.example\r\n" in first
                else:  # anyone else's are replaced
                    assert b"6.6.6.6" not in first and b"evil.example" not in first
                    assert b"X-Forwarded-For: 127.0.0.1\r\n" in first
                    assert b"X-Forwarded-Proto: http\r\n" in first and b"X-Forwarded-Host: web\r\n" in first
                for head in (first, second):
                    assert head.count(b"X-Forwarded-For:") == 1 and head.count(b"X-Forwarded-Host:") == 1
                assert b"X-Forwarded-For: 127.0.0.1\r\n" in second
        run(body)


def test_a_domain_routes_subdomains_and_bare_ids_keep_working(run):
    async def body():
        async with two_tunnels(domain="Example.Test") as (ing, apps):
            port = ing.address[1]
            for host, name in ((f"web.example.test:{port}", "web"), (f"API.Example.Test.:{port}", "api"),
                               ("web", "web"), ("api.example.test", "api")):
                r, w = await asyncio.open_connection(*ing.address)
                w.write(get(host, "/x", "Connection: close\r\n"))
                assert (await response(r))[1] == f"{name} GET /x ".encode(), host
                w.close()
            r, w = await asyncio.open_connection(*ing.address)
            w.write(get("nope.example.test"))
            line, got = await response(r)
            assert line == b"HTTP/1.1 404 Not Found" and got == b"no tunnel is connected for nope\n"
            w.close()
            assert b"X-Forwarded-Host: web.example.test:%d\r\n" % port in apps["web"].heads[0]
    run(body)


def test_an_upgrade_becomes_a_raw_pipe_and_a_refused_one_does_not(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            # refused: the connection stays HTTP and the next request is routed by its Host
            w.write(get("web", "/refuse-upgrade", "Upgrade: test\r\nConnection: Upgrade\r\n") + get("api", "/next"))
            line, got = await response(r)
            assert line == b"HTTP/1.1 400 Bad Request" and got.startswith(b"web GET /refuse-upgrade")
            assert (await response(r))[1] == b"api GET /next "
            # switched: from then on bytes are not parsed; a "request" for api is raw data to web
            w.write(get("web", "/ws", "Upgrade: test\r\nConnection: Upgrade\r\n") + get("api", "/raw"))
            line = (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)).split(b"\r\n")[0]
            assert line == b"HTTP/1.1 101 Switching Protocols"
            echoed = b"web:" + get("api", "/raw")
            got = await asyncio.wait_for(r.readexactly(len(echoed)), WAIT)
            assert got == echoed
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(8), WAIT) == b"web:ping"
            w.close()
            assert [h.split(b" ")[1] for h in apps["api"].heads] == [b"/next"]
    run(body)


def test_after_a_response_ended_by_close_the_visitor_connection_closes(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(get("web", "/eof") + get("api", "/never"))
            got = await asyncio.wait_for(r.read(), WAIT)
            assert got == b"HTTP/1.1 200 OK\r\n\r\nweb GET /eof "
            w.close()
            assert apps["api"].heads == []
    run(body)


def test_a_later_request_for_no_tunnel_or_a_bad_head_is_answered_after_the_earlier_response(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            for second, status in ((get("nobody"), b"HTTP/1.1 404 Not Found"),
                                   (b"GET / HTTP/1.1\r\nHost: web\r\nHost: api\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
                                   (b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
                                    b"\r\n\r\n", b"HTTP/1.1 400 Bad Request")):
                r, w = await asyncio.open_connection(*ing.address)
                w.write(get("web", "/first") + second)
                assert (await response(r))[1] == b"web GET /first "
                line, _ = await response(r)
                assert line == status, second
                assert await asyncio.wait_for(r.read(), WAIT) == b""  # and the connection is closed
                w.close()
            assert len(apps["web"].heads) == 3 and apps["api"].heads == []
    run(body)


# ------------------------------------------------------------------ the framing, unit by unit

def test_chunked_bodies_end_where_they_end_wherever_they_are_split():
    from ferrotunnel.server.http1 import Chunked, HeadError

    body = b"5\r\nhello\r\n1A;ext=\"x\"\r\n" + b"z" * 26 + b"\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n"
    for split in range(1, len(body)):
        c = Chunked()
        first = c.feed(body[:split], 0)
        if first >= 0:
            assert split == len(body) and first == len(body), split
            continue
        end = c.feed(body[split:] + b"NEXT", 0)
        assert split + end == len(body), split
    assert Chunked().feed(b"xx0\r\n\r\nGET", 2) == 7  # no trailers, from an offset
    for bad in (b"g\r\n", b"5\r\nhelloXX", b"5\nhello", b"1" * 17 + b"\r\n", b"5;" + b"e" * 5000):
        try:
            Chunked().feed(bad, 0)
        except HeadError:
            continue
        raise AssertionError(bad)


def test_the_response_tracker_counts_answers_wherever_they_are_split():
    from ferrotunnel.server.http1 import ResponseTracker

    stream = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
              b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"                   # to HEAD: no body
              b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"          # no body
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    for split in range(1, len(stream)):
        t = ResponseTracker()
        for method in (b"POST", b"HEAD", b"GET", b"GET"):
            t.sent(method, False)
        assert t.feed(stream[:split], True) == split
        assert not t.idle
        assert t.feed(stream[split:] + b"EXTRA", True) == len(stream) - split, split
        assert t.idle
    t = ResponseTracker()
    t.sent(b"GET", True)
    t.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw")
    assert t.raw and t.answered_upgrade is True
    t = ResponseTracker()
    t.sent(b"GET", False)
    t.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert not t.idle  # delimited by the stream's end


def test_a_repeated_head_is_forwarded_like_the_first_and_routed_by_its_host(run):
    """Heads taken by the quick way (a plain head in a read of its own, the last Host again) reach
    the app exactly as the first did; a repeat for another Host, or with X-Forwarded-*, or with a
    second Host, takes the general way."""
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            for _ in range(4):
                w.write(get("web", "/same"))
                assert (await response(r))[1] == b"web GET /same "
            w.write(get("api", "/same"))
            assert (await response(r))[1] == b"api GET /same "
            for _ in range(2):
                w.write(get("web", "/same"))
                assert (await response(r))[1] == b"web GET /same "
            w.write(get("web", "/same", "X-Forwarded-For: 10.9.9.9\r\n"))
            assert (await response(r))[1] == b"web GET /same "
            for _ in range(2):  # HEAD: the same response head as to GET, but without its body
                w.write(b"HEAD /same HTTP/1.1\r\nHost: web\r\n\r\n")
                line, got = await response(r, head_only=True)
                assert line == b"HTTP/1.1 200 OK" and got == b""
            for i in range(2):  # a plain head with a body that comes in a later read
                w.write(b"POST /post HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\n")
                await asyncio.sleep(0.05)
                w.write(b"hel%dX" % i)
                assert (await response(r))[1] == b"web POST /post hel%dX" % i
            w.write(get("web", "/same", "Host: api\r\n"))
            line, _ = await response(r)
            assert line == b"HTTP/1.1 400 Bad Request"
            w.close()
            heads = apps["web"].heads
            assert len(heads) == 11 and len(set(heads[:6])) == 1 and heads[9] == heads[10], heads
            assert heads[0].endswith(b"\r\nHost: web\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
                                     b"X-Forwarded-Host: web\r\n\r\n"), heads[0]
            assert b"10.9.9.9" not in heads[6] and heads[6].count(b"X-Forwarded-For") == 1
            assert apps["api"].heads == [heads[0].replace(b"web", b"api")]
    run(body)


def test_plain_heads_parse_as_llhttp_does():
    """parse_plain (no llhttp) takes only heads llhttp takes, and reads them the same way."""
    import pytest

    from ferrotunnel.server.http1 import HeadError, parse_plain, parse_request_llhttp

    from test_http_kernel import OTHER as other, PLAIN as plain  # one list of heads, shared with the kernels' test

    attrs = ("url", "hosts", "upgrade", "te", "cl", "xff", "xfp", "xfh", "method", "keep_alive")
    for head in plain + other:
        try:
            req = parse_plain(b"xx" + head + b"yy", 2, len(head) + 2)
        except HeadError as exc:
            with pytest.raises(HeadError, match=exc.reason):
                parse_request_llhttp(head)
            continue
        assert (req is not None) == (head in plain), head
        if req is not None:
            ref = parse_request_llhttp(head)
            assert [getattr(req, a) for a in attrs] == [getattr(ref, a) for a in attrs], head
            assert req.body() == ref.body()


def test_a_repeated_response_head_is_read_as_the_first_for_the_request_it_answers():
    from ferrotunnel.server.http1 import ResponseTracker

    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    t = ResponseTracker()
    for method, upgrade, body in ((b"GET", False, b"abc"), (b"GET", False, b"abc"), (b"HEAD", False, b""),
                                  (b"POST", False, b"abc"), (b"GET", True, b"abc"), (b"GET", False, b"abc")):
        t.sent(method, upgrade)
        assert t.feed(resp + body + b"HTTP/1.1 200 OK", True) == len(resp + body), method
        assert t.idle
        assert t.answered_upgrade is (False if upgrade else None)
        t.answered_upgrade = None
    assert t.known == resp and t.known_left == 3
    t.sent(b"GET", False)
    t.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
    assert t.state == t.LENGTH and t.left == 30


def test_bytes_an_app_sends_unasked_never_reach_the_visitor(run):
    """A response nobody asked for (after the one owed) is dropped: it would otherwise be read as
    the answer to the visitor's next request, which may be for another tunnel."""
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(get("web", "/extra"))
            assert (await response(r))[1] == b"web GET /extra "
            await asyncio.sleep(0.3)  # the unasked answer arrives meanwhile
            w.write(get("api", "/next") + get("web", "/again"))
            assert (await response(r))[1] == b"api GET /next "
            assert (await response(r))[1] == b"web GET /again "
            w.close()
    run(body)


def test_an_upgrade_with_a_body_is_refused(run):
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"POST / HTTP/1.1\r\nHost: web\r\nUpgrade: x\r\nContent-Length: 1\r\n\r\nX"
                    + get("web", "/admin", "X-Forwarded-For: 127.0.0.1\r\n"))
            line, text = await response(r)
            assert line == b"HTTP/1.1 400 Bad Request" and b"upgrade" in text, (line, text)
            w.close()
            assert apps["web"].heads == []
    run(body)
