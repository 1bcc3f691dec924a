"""Warnings a peer or a visitor can cause at will are rate-limited (``LogRate``): one line per
kind every ``LOG_RATE_INTERVAL``, the next one saying how many were held back. Before, a server
opening streams past the client's ``max_streams_per_session`` (or its open rate) got one WARNING
per stream, and each visitor of a tunnel whose local service was down one WARNING per visitor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.lograte import LOG_RATE_INTERVAL, LogRate

from test_core import pair

TOKEN = "log-flood-token-0123"


def _lines(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage() and r.levelno >= logging.WARNING]


def test_log_rate_counts_what_it_holds_back(caplog):
    rate = LogRate(interval=10)
    log = logging.getLogger("ferrotunnel.test")
    caplog.set_level(logging.WARNING, logger="ferrotunnel.test")
    assert rate.warning(log, "a", 0.0, "line %d", 1)
    assert not any(rate.warning(log, "a", 1.0 + i / 10, "line %d", 2) for i in range(50))
    assert rate.warning(log, "b", 1.0, "other %d", 3)  # its own key
    assert rate.warning(log, "a", 10.5, "line %d", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "line 1", "other 3", "line 4 (50 more like it since the last such line; one per 10s)"]
    small = LogRate(interval=10, max_keys=4)
    for k in range(100):
        small.due(k, 0.0)
    assert len(small._last) <= 4  # remembered keys are bounded


def test_streams_refused_by_the_stream_limit_cost_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel.core")
    client, server, rc, rs = pair(max_streams_per_session=2)
    wire = b"".join(F.encode(F.OpenStream(stream_id=sid, protocol=ft.Protocol.TCP)) for sid in range(2, 1002, 2))
    client.receive(wire, 1.0)
    assert len(client.streams) == 2
    assert len(_lines(caplog, "refusing stream")) == 1, _lines(caplog, "refusing stream")
    client.receive(F.encode(F.OpenStream(stream_id=2000, protocol=ft.Protocol.TCP)), 1.0 + LOG_RATE_INTERVAL)
    said = _lines(caplog, "refusing stream")
    assert len(said) == 2 and "max_streams_per_session" in said[1] and "497 more like it" in said[1], said


def test_streams_refused_by_the_open_rate_cost_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel.core")
    client, server, rc, rs = pair(rate_limits=ft.RateLimits(streams_per_second=1, burst=1))
    for sid in range(2, 402, 2):
        client.receive(F.encode(F.OpenStream(stream_id=sid, protocol=ft.Protocol.TCP)), 1.0)
    said = _lines(caplog, "refusing stream")
    assert len(client.streams) <= 2 and len(said) == 1 and "rate" in said[0], said


@contextlib.contextmanager
def _down_service():
    """An address that refuses connections: bound, never listening."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    try:
        yield hole.getsockname()
    finally:
        hole.close()


async def _visits(ingress_cls, tunnel_id: str, down, visit) -> None:
    """A server with an ingress of ``ingress_cls`` and a client of ``tunnel_id`` forwarding to
    ``down``; ``visit(ingress address)`` 30 times."""
    async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server, \
            ingress_cls(server, ("127.0.0.1", 0), *([tunnel_id] if ingress_cls is ft.TcpIngress else [])) as ingress:
        client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=tunnel_id, local_addr=down)
        await client.connect()
        try:
            for _ in range(30):
                await visit(ingress.address)
        finally:
            await client.close()


def test_visitors_of_an_unreachable_local_service_cost_one_line(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel")

    async def visit(address):
        r, w = await asyncio.open_connection(*address)
        w.write(b"hello")
        try:  # the stream is reset: EOF, or a reset if "hello" was still unread
            assert await asyncio.wait_for(r.read(), 10) == b""
        except ConnectionResetError:
            pass
        w.close()

    with _down_service() as down:
        run(lambda: _visits(ft.TcpIngress, "down", down, visit), timeout=60)
    said = _lines(caplog, "cannot reach local service")
    assert len(said) == 1, said
    assert re.search(r"cannot reach local service 127\.0\.0\.1:\d+", said[0])


def test_visitors_of_a_tunnel_with_no_session_cost_one_line(run, caplog):
    caplog.set_level(logging.INFO, logger="ferrotunnel")

    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server, \
                ft.TcpIngress(server, ("127.0.0.1", 0), "nobody") as ingress:
            for _ in range(30):
                r, w = await asyncio.open_connection(*ingress.address)
                assert await asyncio.wait_for(r.read(), 10) == b""
                w.close()

    run(body, timeout=60)
    said = [r.getMessage() for r in caplog.records if "no session for" in r.getMessage()]
    assert len(said) == 1, said


def test_http_requests_to_an_unreachable_local_service_cost_one_line(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel")

    async def visit(address):
        r, w = await asyncio.open_connection(*address)
        w.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        answer = await asyncio.wait_for(r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 502"), answer[:100]
        w.close()

    with _down_service() as down:
        run(lambda: _visits(ft.HttpIngress, "web", down, visit), timeout=60)
    said = _lines(caplog, "before answering")
    assert len(said) == 1, said
