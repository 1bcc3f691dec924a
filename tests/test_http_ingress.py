"""HttpIngress in-process on both loops: routing, local answers and bounded heads."""

from __future__ import annotations

import asyncio

import ferrotunnel as ft
from conftest import tunnel
from ferrotunnel.server import normalize_host


def test_normalize_host():
    assert normalize_host(" App.Example.:8080 ") == "app.example"
    assert normalize_host("[::1]:80") == "::1"
    assert normalize_host("demo") == "demo"


async def _request(addr, raw: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(raw)
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data


def test_routing_and_local_answers(run):
    async def body():
        async def app(stream):  # an HTTP "service" on the client side
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.read(1000)
            stream.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            stream.write_eof()

        async with tunnel(app, tunnel_id="web") as (server, client, session):
            ing = ft.HttpIngress(server, ("127.0.0.1", 0), max_head=2048, head_timeout=0.3)
            async with ing:
                ok = await _request(ing.address, b"GET / HTTP/1.1\r\nHost: WEB:80\r\n\r\n")
                assert ok.startswith(b"HTTP/1.1 200 OK") and ok.endswith(b"hello")
                assert (await _request(ing.address, b"GET / HTTP/1.1\r\nHost: other\r\n\r\n")).startswith(b"HTTP/1.1 404")
                # /health without a Host, or for a Host no tunnel serves, is the ingress's own answer
                assert (await _request(ing.address, b"GET /health HTTP/1.1\r\n\r\n")).endswith(b"\r\n\r\nok\n")
                assert (await _request(ing.address, b"GET /health HTTP/1.1\r\nHost: other\r\n\r\n")).endswith(b"\r\n\r\nok\n")
                # ...but it no longer shadows a tunnel's paths (it used to answer "ok" for every Host):
                # an app behind a tunnel has its own /health, and it must be the app that answers it
                served = await _request(ing.address, b"GET /health HTTP/1.1\r\nHost: web\r\n\r\n")
                assert served.startswith(b"HTTP/1.1 200 OK") and served.endswith(b"hello")
                big = b"GET / HTTP/1.1\r\nHost: web\r\nX: " + b"a" * 5000 + b"\r\n\r\n"
                assert (await _request(ing.address, big)).startswith(b"HTTP/1.1 431")
                assert (await _request(ing.address, b"GET / HTTP/1.1\r\nHost: web\r\n")).startswith(b"HTTP/1.1 408")
                assert (await _request(ing.address, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
                assert ing.responses.get("404") == 1 and ing.responses.get("431") == 1 and ing.responses.get("200") == 2
    run(body)
