"""The request inspector (issue 13, point 4), in process on both loops: a real TunnelServer with an
HTTP ingress, a TunnelClient serving its streams with ``Inspector.handler``, and a local app. Rows
appear for what visitors send (keep-alive, pipelined, HEAD, chunked), the ring and the body
capture are bounded, secrets are redacted, the web server refuses foreign Hosts and Origins, and
replay needs POST and the token and reaches the local app again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel.client.inspect import TOKEN_HEADER, Inspector
from ferrotunnel.client.inspect_http import ExchangeTracker
from ferrotunnel.client.inspect_store import RequestLog

TOKEN = "inspector-token"
WAIT = 20.0


class App:
    """A keep-alive HTTP/1.1 app: answers ``app <method> <target> <body>`` with a Content-Length
    (``/chunked`` in chunked coding, ``/204`` with 204, HEAD without a body, ``/ws`` with 101 and
    then an echo), and keeps every head it received."""

    def __init__(self) -> None:
        self.heads: List[bytes] = []
        self.proxy_lines: List[bytes] = []  # PROXY v1 headers that opened connections
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> "App":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> Tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    def paths(self) -> List[bytes]:
        return [h.split(b" ")[1] for h in self.heads]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = True
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if first and head.startswith(b"PROXY "):
                    line, _, head = head.partition(b"\r\n")
                    self.proxy_lines.append(line)
                first = False
                self.heads.append(head)
                method, target = head.split(b" ")[:2]
                m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
                body = await reader.readexactly(int(m[1])) if m else b""
                if re.search(rb"\r\ntransfer-encoding: *chunked", head, re.I):
                    body = await reader.readuntil(b"0\r\n\r\n")
                out = b"app %s %s %s" % (method, target, body)
                if target == b"/ws":
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
                    while data := await reader.read(65536):
                        writer.write(b"echo:" + data)
                    return
                if target == b"/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"%x\r\n%s\r\n3\r\nend\r\n0\r\n\r\n" % (len(out), out))
                elif target == b"/204":
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                elif method == b"HEAD":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: s=1\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(out), out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def inspected(tcp: bool = False, proxy_protocol: Optional[str] = None, **kwargs: Any):
    """An app behind a tunnel "web" whose client records with an Inspector; an HttpIngress (and a
    TcpIngress with ``tcp``). Yields (ingress, app, inspector[, tcp ingress])."""
    app = await App().start()
    server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    task: Optional[asyncio.Task] = None
    try:
        async with server, Inspector(("127.0.0.1", 0), **kwargs) as insp:
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="web",
                                     config=ft.ClientConfig(local_addr=app.address, proxy_protocol=proxy_protocol))
            task = asyncio.create_task(client.connect_and_run(insp.handler(app.address, "web", proxy_protocol)))
            await server.wait_for_session("web", timeout=10)
            async with ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
                if tcp:
                    async with ft.TcpIngress(server, ("127.0.0.1", 0), "web") as tcp_ing:
                        yield ing, app, insp, tcp_ing
                else:
                    yield ing, app, insp
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert app.server is not None
        app.server.close()


async def response(reader: asyncio.StreamReader, head_only: bool = False) -> Tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.I)
    if re.search(rb"\r\nTransfer-Encoding: chunked", head, re.I):
        return head.split(b"\r\n", 1)[0], await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT)
    body = await asyncio.wait_for(reader.readexactly(int(m[1])), WAIT) if m and not head_only else b""
    return head.split(b"\r\n", 1)[0], body


async def api(insp: Inspector, method: str, path: str, headers: Optional[Dict[str, str]] = None,
              host: Optional[str] = "default") -> Tuple[int, Dict[str, str], bytes]:
    """One request to the inspector's web server: (status, headers in lower case, body)."""
    h, p = insp.address
    r, w = await asyncio.open_connection(h, p)
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {h}:{p}" if host == "default" else f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()] + ["Connection: close"]
    w.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await asyncio.wait_for(r.read(), WAIT)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in
              (line.decode().partition(":") for line in head.split(b"\r\n")[1:])}
    return status, fields, body


async def rows(insp: Inspector, n: int, done: bool = True) -> List[Dict[str, Any]]:
    """The rows of /api/requests once there are ``n`` (all finished, with ``done``)."""
    async with asyncio.timeout(WAIT):
        while True:
            status, _, body = await api(insp, "GET", "/api/requests")
            assert status == 200, body
            got = json.loads(body)["requests"]
            if len(got) >= n and (not done or all(r["state"] != "pending" for r in got)):
                return got
            await asyncio.sleep(0.02)


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: web\r\n{extra}\r\n".encode()


def test_keep_alive_and_pipelined_requests_become_rows_in_order(run):
    async def body():
        async with inspected() as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(get("/one"))
            assert await response(r) == (b"HTTP/1.1 200 OK", b"app GET /one ")
            w.write(get("/two"))  # the same keep-alive connection
            assert await response(r) == (b"HTTP/1.1 200 OK", b"app GET /two ")
            # pipelined in one write: HEAD (a length, no body), chunked, 204, a POST with a body
            w.write(b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\n" + get("/chunked") + get("/204")
                    + b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello" + get("/last"))
            assert (await response(r, head_only=True))[0] == b"HTTP/1.1 200 OK"
            assert b"app GET /chunked " in (await response(r))[1]
            assert (await response(r))[0] == b"HTTP/1.1 204 No Content"
            assert await response(r) == (b"HTTP/1.1 200 OK", b"app POST /p hello")
            assert await response(r) == (b"HTTP/1.1 200 OK", b"app GET /last ")
            got = await rows(insp, 7)
            w.close()
            assert app.paths() == [b"/one", b"/two", b"/h", b"/chunked", b"/204", b"/p", b"/last"]
            assert [(x["method"], x["path"], x["status"]) for x in reversed(got)] == [
                ("GET", "/one", 200), ("GET", "/two", 200), ("HEAD", "/h", 200), ("GET", "/chunked", 200),
                ("GET", "/204", 204), ("POST", "/p", 200), ("GET", "/last", 200)]
            one = got[-1]
            assert one["tunnel"] == "web" and one["visitor"] == "127.0.0.1" and one["state"] == "done"
            assert one["duration_ms"] is not None and one["duration_ms"] >= 0
            assert "request_head" not in one and "response_head" not in one  # the list carries no heads
            heads = json.loads((await api(insp, "GET", f"/api/requests/{one['id']}"))[2])
            assert heads["request_head"].startswith("GET /one HTTP/1.1\r\n") and "Host: web" in heads["request_head"]
            assert heads["response_head"].startswith("HTTP/1.1 200 OK\r\n")
            assert one["response_size"] == len(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: s=1\r\n"
                                               b"Content-Length: 13\r\n\r\napp GET /one ")
            assert one["request_size"] == len(app.heads[0])
            post = got[1]
            assert post["request_size"] == len(app.heads[5]) + 5
            status, _, detail = await api(insp, "GET", f"/api/requests/{post['id']}")
            detail = json.loads(detail)
            assert status == 200 and detail["request_body"] == "hello" and not detail["request_body_truncated"]
            assert detail["response_body"] == "app POST /p hello"
            chunked = json.loads((await api(insp, "GET", f"/api/requests/{got[3]['id']}"))[2])
            assert chunked["response_body"].endswith("3\r\nend\r\n0\r\n\r\n")  # as on the wire
    run(body)


def test_big_bodies_pass_byte_for_byte_and_are_counted_whole(run):
    async def body():
        async with inspected() as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            payload = bytes(range(256)) * 8192  # 2 MiB, both ways (the app echoes it)
            w.write(b"POST /big HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            assert await response(r) == (b"HTTP/1.1 200 OK", b"app POST /big " + payload)
            w.write(get("/after"))
            assert (await response(r))[1] == b"app GET /after "
            got = await rows(insp, 2)
            w.close()
            big = got[1]
            assert big["path"] == "/big" and big["request_size"] == len(app.heads[0]) + len(payload)
            assert big["response_size"] > len(payload) + len(b"app POST /big ")
            detail = json.loads((await api(insp, "GET", f"/api/requests/{big['id']}"))[2])
            assert detail["request_body_truncated"] and len(detail["request_body"].encode("utf-8", "replace")) > 0
            assert got[0]["path"] == "/after" and got[0]["status"] == 200
    run(body)


def test_the_ring_is_bounded_and_bodies_are_capped(run):
    async def body():
        async with inspected(max_requests=3, body_limit=10) as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            for i in range(4):
                w.write(get(f"/{i}"))
                await response(r)
            w.write(b"POST /big HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
            await response(r)
            got = await rows(insp, 3)
            w.close()
            assert [x["path"] for x in got] == ["/big", "/3", "/2"]
            assert [x["id"] for x in got] == [5, 4, 3]
            assert len(insp.log) == 3
            big = json.loads((await api(insp, "GET", f"/api/requests/{got[0]['id']}"))[2])
            assert big["request_body"] == "x" * 10 and big["request_body_truncated"]
            assert big["response_body"] == "app POST /" and big["response_body_truncated"]
            assert big["request_size"] == len(app.heads[-1]) + 100  # counted whole, kept capped
            assert not big["replayable"]
            status, _, out = await api(insp, "POST", f"/api/requests/{got[0]['id']}/replay", {TOKEN_HEADER: insp.token})
            assert status == 409 and b"body" in out
            assert (await api(insp, "GET", "/api/requests/1"))[0] == 404  # gone from the ring
    run(body)


def test_authorization_and_cookie_are_redacted_unless_asked_not_to(run):
    secret = "Authorization: Bearer s3cr3t-value\r\nCookie: session=c00kie-value\r\n"
    for redact in (True, False):
        async def body():
            async with inspected(redact=redact) as (ing, app, insp):
                r, w = await asyncio.open_connection(*ing.address)
                w.write(get("/private", secret))
                await response(r)
                got = await rows(insp, 1)
                w.close()
                _, _, listing = await api(insp, "GET", "/api/requests")
                _, _, detail = await api(insp, "GET", f"/api/requests/{got[0]['id']}")
                assert b"s3cr3t-value" in app.heads[0]  # the app got it untouched either way
                assert b"s3cr3t-value" not in listing and b"Set-Cookie" not in listing  # no heads in the list
                assert (b"s3cr3t-value" in detail) is not redact and (b"c00kie-value" in detail) is not redact
                assert (b"Set-Cookie: s=1" in detail) is not redact
                if redact:
                    assert "Authorization: [redacted]" in json.loads(detail)["request_head"]
                    assert "Cookie: [redacted]" in json.loads(detail)["request_head"]
        run(body)


def test_foreign_hosts_and_origins_are_refused(run):
    async def body():
        async with inspected() as (ing, app, insp):
            port = insp.address[1]
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}"):
                assert (await api(insp, "GET", "/api/requests", host=host))[0] == 200, host
            assert (await api(insp, "GET", "/api/requests",
                              {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}))[0] == 200
            for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", f"10.1.2.3:{port}",
                         f"[::2]:{port}"):
                status, fields, out = await api(insp, "GET", "/api/requests", host=host)
                assert status == 403 and b"Host" in out, host
                assert b'"requests"' not in out
            assert (await api(insp, "GET", "/", host=f"rebound.example:{port}"))[0] == 403
            assert (await api(insp, "GET", "/api/requests", host=None))[0] == 400
            for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"https://127.0.0.1:{port}"):
                assert (await api(insp, "GET", "/api/requests", {"Origin": origin}))[0] == 403, origin
            assert (await api(insp, "GET", "/api/requests", {"Sec-Fetch-Site": "cross-site"}))[0] == 403
            assert (await api(insp, "GET", "/api/requests", {"Sec-Fetch-Site": "same-site"}))[0] == 403
    run(body)


def test_replay_needs_post_and_the_token_and_reaches_the_app_again(run):
    async def body():
        async with inspected() as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"PUT /r?q=1 HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n\r\nbody")
            assert (await response(r))[1] == b"app PUT /r?q=1 body"
            first = (await rows(insp, 1))[0]
            w.close()
            path = f"/api/requests/{first['id']}/replay"
            port = insp.address[1]
            refused = [
                ("POST", {}), ("POST", {TOKEN_HEADER: "wrong"}), ("POST", {TOKEN_HEADER: insp.token[:-1]}),
                ("POST", {TOKEN_HEADER: insp.token, "Origin": "http://evil.example"}),
                ("POST", {TOKEN_HEADER: insp.token, "Sec-Fetch-Site": "cross-site"}),
            ]
            for method, headers in refused:
                assert (await api(insp, method, path, headers))[0] == 403, headers
            assert (await api(insp, "GET", path, {TOKEN_HEADER: insp.token}))[0] == 405
            assert (await api(insp, "POST", path, {TOKEN_HEADER: insp.token}, host=f"evil.example:{port}"))[0] == 403
            assert app.paths() == [b"/r?q=1"]  # nothing refused reached the app
            status, _, out = await api(insp, "POST", path, {TOKEN_HEADER: insp.token,
                                                            "Origin": f"http://127.0.0.1:{port}"})
            assert status == 200, out
            new = json.loads(out)
            assert app.paths() == [b"/r?q=1", b"/r?q=1"]
            assert app.heads[1] == app.heads[0]  # the head as it was captured
            assert new["replay_of"] == first["id"] and new["status"] == 200 and new["state"] == "done"
            assert new["method"] == "PUT" and new["visitor"] == "replay" and new["tunnel"] == "web"
            assert new["response_size"] == first["response_size"]
            got = await rows(insp, 2)
            assert [x["id"] for x in got] == [new["id"], first["id"]]
            assert (await api(insp, "POST", "/api/requests/999/replay", {TOKEN_HEADER: insp.token}))[0] == 404
    run(body)


def test_the_visitor_comes_from_the_stream_header_and_proxy_headers_are_sent(run):
    """With proxy_protocol the server names the visitor in the stream's ft-visitor header: the row
    shows it (HOST:PORT), the app gets the PROXY header first, and a replay sends PROXY UNKNOWN."""
    async def body():
        async with inspected(proxy_protocol="v1") as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            port = w.get_extra_info("sockname")[1]
            w.write(get("/pp"))
            assert (await response(r))[1] == b"app GET /pp "
            row = (await rows(insp, 1))[0]
            w.close()
            assert row["visitor"] == f"127.0.0.1:{port}"
            assert app.proxy_lines[0].startswith(f"PROXY TCP4 127.0.0.1 127.0.0.1 {port} ".encode())
            status, _, out = await api(insp, "POST", f"/api/requests/{row['id']}/replay", {TOKEN_HEADER: insp.token})
            assert status == 200, out
            assert app.proxy_lines[1:] == [b"PROXY UNKNOWN"] and app.paths() == [b"/pp", b"/pp"]
    run(body)


def test_upgrades_and_tcp_streams_pass_untouched(run):
    async def body():
        async with inspected(tcp=True) as (ing, app, insp, tcp):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
            line, _ = await response(r, head_only=True)
            assert line == b"HTTP/1.1 101 Switching Protocols"
            raw = b"GET /not-a-request HTTP/1.1\r\nHost: web\r\n\r\n"  # raw bytes after the upgrade
            w.write(raw)
            assert await asyncio.wait_for(r.readexactly(len(raw) + 5), WAIT) == b"echo:" + raw
            w.close()
            rt, wt = await asyncio.open_connection(*tcp.address)
            wt.write(b"GET /over-tcp HTTP/1.1\r\nHost: web\r\n\r\n")
            assert (await response(rt))[1] == b"app GET /over-tcp "
            wt.close()
            got = await rows(insp, 1)
            assert [(x["path"], x["status"], x["state"]) for x in got] == [("/ws", 101, "upgraded")]
            assert not got[0]["replayable"]
            assert app.paths() == [b"/ws", b"/over-tcp"]
    run(body)


def test_the_page_carries_the_token_and_the_api_never_does(run):
    async def body():
        async with inspected() as (ing, app, insp):
            status, fields, page = await api(insp, "GET", "/")
            assert status == 200 and fields["content-type"].startswith("text/html")
            assert insp.token.encode() in page and b"{{FT_TOKEN}}" not in page
            assert "frame-ancestors 'none'" in fields["content-security-policy"]
            assert fields["x-frame-options"] == "DENY"
            for asset in ("/inspector.js", "/inspector.css"):
                assert (await api(insp, "GET", asset))[0] == 200
            assert b"http://" not in (await api(insp, "GET", "/inspector.js"))[2]  # no outside asset
            assert insp.token.encode() not in (await api(insp, "GET", "/api/requests"))[2]
            assert insp.token not in repr(insp)
            assert (await api(insp, "GET", "/nope"))[0] == 404
            assert (await api(insp, "DELETE", "/api/requests"))[0] == 405
    run(body)


def test_a_non_loopback_bind_is_warned_about(run, caplog):
    async def body():
        caplog.set_level(logging.WARNING, logger="ferrotunnel.inspect")
        async with Inspector(("0.0.0.0", 0)) as insp:
            assert any("other machines" in r.getMessage() for r in caplog.records)
            assert insp.token not in caplog.text
            port = insp.address[1]
            assert (await api(insp, "GET", "/api/requests", host=f"127.0.0.1:{port}"))[0] == 200
            assert (await api(insp, "GET", "/api/requests", host=f"rebound.example:{port}"))[0] == 403
        caplog.clear()
        async with Inspector(("127.0.0.1", 0)):
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    run(body)


def test_bad_arguments_are_clear_errors():
    for bad in ("nope", ("127.0.0.1", 70000), "host:port", 4040):
        with pytest.raises(ValueError, match="HOST:PORT"):
            Inspector(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_requests"):
        Inspector(max_requests=0)
    with pytest.raises(ValueError, match="body_limit"):
        Inspector(body_limit=-1)
    with pytest.raises(ValueError, match="proxy_protocol"):
        Inspector().handler("127.0.0.1:80", "t", proxy_protocol="v3")


def test_the_tracker_reads_the_same_exchanges_whatever_the_split():
    """Both directions of one connection, fed whole, byte by byte and in odd pieces."""
    requests = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nT: 1\r\n\r\n"
                b"\r\nHEAD /c HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /d HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
                b"GET /e HTTP/1.1\r\nHost: x\r\n\r\n")
    responses = (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
                 b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"
                 b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    results = []
    for size in (len(requests) + len(responses), 1, 7, 13):
        log = RequestLog()
        t = ExchangeTracker(log, "t", None, ("127.0.0.1", 1))
        for data, feed in ((requests, t.request_data), (responses, t.response_data)):
            for i in range(0, len(data), size):
                feed(memoryview(data[i:i + size]))
        t.response_eof()
        results.append([(e.method, e.target, e.status, e.state, e.request_size, e.response_size,
                         bytes(e.request_body), bytes(e.response_body)) for e in reversed(log.exchanges())])
    assert all(r == results[0] for r in results)
    assert [(m, p, s, st) for m, p, s, st, *_ in results[0]] == [
        ("GET", "/a", 200, "done"), ("POST", "/b", 201, "done"), ("HEAD", "/c", 200, "done"),
        ("GET", "/d", 304, "done"), ("GET", "/e", 200, "done")]
    assert results[0][1][6] == b"5;ext=1\r\nhello\r\n0\r\nT: 1\r\n\r\n"
    assert results[0][4][7] == b"until the end"
    assert sum(r[4] for r in results[0]) == len(requests) - 2  # all but the empty line before HEAD
    assert sum(r[5] for r in results[0]) == len(responses) - len(b"HTTP/1.1 100 Continue\r\n\r\n")


def test_what_is_not_http_is_not_recorded():
    log = RequestLog()
    t = ExchangeTracker(log, "t", None, ("127.0.0.1", 1))
    t.request_data(memoryview(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n"))
    assert not t.following and len(log) == 0
    t = ExchangeTracker(log, "t", None, ("127.0.0.1", 1))
    t.request_data(memoryview(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    t.response_data(memoryview(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"))
    assert not t.following  # an answer nobody asked for: the pairing cannot be trusted from here
    assert [e.state for e in log.exchanges()] == ["done"]


def test_a_chunked_request_past_the_body_limit_is_not_followed_chunk_by_chunk():
    """Tiny chunks past what is captured only cost the client's event loop (Python calls per
    chunk; an audit measured 2 MiB of 1-byte chunks at 3 s): the connection's recording ends
    there, shown incomplete, while the bytes themselves still pass (the bridge relays them)."""
    log = RequestLog(body_limit=100)
    t = ExchangeTracker(log, "t", None, ("127.0.0.1", 1))
    t.request_data(memoryview(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"))
    for _ in range(200):  # 1,200 bytes of body in 1-byte chunks (600 pieces), past the 100 captured
        t.request_data(memoryview(b"1\r\na\r\n"))
    assert not t.following
    (ex,) = log.exchanges()
    assert ex.state == "incomplete" and len(ex.request_body) == 100 and ex.replay_refusal
    before = ex.request_size
    t.request_data(memoryview(b"1\r\na\r\n" * 1000))  # no longer looked at
    assert ex.request_size == before
    # ordinary chunks past the limit (and a small body within it) are followed to the end
    for body_limit, chunk, count in ((100, b"x" * 65536, 40), (1000, b"a", 60)):
        log = RequestLog(body_limit=body_limit)
        t = ExchangeTracker(log, "t", None, ("127.0.0.1", 1))
        one = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        t.request_data(memoryview(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"))
        for _ in range(count):
            t.request_data(memoryview(one))
        t.request_data(memoryview(b"0\r\n\r\n"))
        t.response_data(memoryview(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
        assert t.following and [e.state for e in log.exchanges()] == ["done"], body_limit


def test_a_reader_that_never_reads_does_not_hold_its_answer(run, monkeypatch):
    """The inspector's own server gives each answer IDLE_TIMEOUT to leave: connections that ask
    for a big answer (a request's row with its captured bodies) and never read it are cut then
    (before, they held it for good, and MAX_CONNECTIONS of them locked the page out)."""
    import socket

    from ferrotunnel.client import inspect as inspect_mod

    monkeypatch.setattr(inspect_mod, "IDLE_TIMEOUT", 0.5)

    async def body():
        async with Inspector(("127.0.0.1", 0), body_limit=800_000) as insp:
            ex = insp.log.new("t", None, ("127.0.0.1", 1), None, "POST", "/", b"POST / HTTP/1.1\r\n\r\n", False)
            ex.request_body_data(memoryview(b"\xff" * 800_000))  # about 5 MB of JSON in its row
            host, port = insp.address
            stalled = []
            for _ in range(inspect_mod.MAX_CONNECTIONS):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect((host, port))
                s.sendall(f"GET /api/requests/{ex.id} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                stalled.append(s)  # and never read
            await asyncio.sleep(2.0)  # past IDLE_TIMEOUT: they were cut
            r, w = await asyncio.open_connection(host, port)
            w.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(r.read(), 10)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            w.close()
            for s in stalled:
                s.close()

    run(body)
