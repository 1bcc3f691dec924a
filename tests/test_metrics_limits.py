"""The metrics listener (``cli/metrics.py``) within its limits: connections beyond
``MAX_METRICS_CONNECTIONS`` and those inside the ingresses' descriptor reserve are closed at once
(counted, logged once) while a scrape after them still works; one timeout covers the whole
exchange, the drain to a scraper that stopped reading included; the CLI server with a low
RLIMIT_NOFILE still takes tunnel clients while idle metrics connections pile up; and every series
of ``/metrics`` has its own label set when pool members share a tunnel id. Real servers on
127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

import ferrotunnel as ft

from conftest import free_port

pytest.importorskip("prometheus_client")

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ferrotunnel.cli import metrics as M  # noqa: E402

TOKEN = "metrics-limits-token"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_") or k in (
    "FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS")}


async def scrape(address: Tuple[str, int], path: str = "/metrics") -> Tuple[bytes, str]:
    """What a scraper sees: (status line, body)."""
    r, w = await asyncio.open_connection(*address)
    w.write(f"GET {path} HTTP/1.1\r\nHost: metrics\r\nAccept: text/plain\r\n\r\n".encode())
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body.decode()


async def closed_soon(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the server closes (EOF or reset) within ``within`` seconds, sending nothing."""
    try:
        got = await asyncio.wait_for(reader.read(1), within)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert got == b"", got  # an idle connection is never answered
    return True


async def scrape_when_free(address: Tuple[str, int], within: float = 10) -> Tuple[bytes, str]:
    """``scrape``, again while the listener still refuses (closes or resets) the connection."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(ConnectionError):
            status, text = await scrape(address)
            if status:
                return status, text
        assert time.monotonic() < deadline, "every scrape refused"
        await asyncio.sleep(0.05)


def series(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], int]:
    """Each series of an exposition (name and label set) with the number of times it appears."""
    seen: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], int] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            seen[key] = seen.get(key, 0) + 1
    return seen


# ---------------------------------------------------------------- connection cap and descriptors

def test_metrics_connections_beyond_the_cap_are_closed_at_once(run, caplog):
    cap, extra = getattr(M, "MAX_METRICS_CONNECTIONS", 32), 8

    async def body():
        caplog.set_level(logging.WARNING, logger="ferrotunnel.listen")
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            ms = M.MetricsServer(server, ("127.0.0.1", 0))
            await ms.start()
            idle: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            try:
                for _ in range(cap + extra):  # idle: no request sent
                    idle.append(await asyncio.open_connection(*ms.address))
                closed = await asyncio.gather(*(closed_soon(r, 2.0) for r, _ in idle))
                assert closed.count(True) == extra and closed.count(False) == cap, closed
            finally:
                for _, w in idle:
                    w.close()
            async with asyncio.timeout(10):  # the server sees the idle ones go
                while ms.gate.open:
                    await asyncio.sleep(0.02)
            status, text = await scrape(ms.address)
            assert status == b"HTTP/1.1 200 OK"
            assert "ferrotunnel_sessions 0.0" in text
            got = series(text)
            assert got[("ferrotunnel_refused_connections_total", (("limit", "total"), ("listener", "metrics")))] == 1
            assert f'ferrotunnel_refused_connections_total{{limit="total",listener="metrics"}} {float(extra)}' in text
            assert (await scrape(ms.address, "/health/ready"))[0] == b"HTTP/1.1 200 OK"
            await ms.close()
        lines = [r for r in caplog.records if "metrics" in r.getMessage() and "refusing" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]  # one line for the whole episode
    run(body, timeout=60)


def test_metrics_connection_inside_the_descriptor_reserve_is_closed_at_once(run):
    """The ingresses' rule: a connection whose descriptor leaves fewer than ``ingress_fd_reserve``
    free is closed before it is read (here the reserve is every descriptor but one)."""
    async def body():
        cfg = ft.ServerConfig(ingress_fd_reserve=resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            ms = M.MetricsServer(server, ("127.0.0.1", 0))
            await ms.start()
            r, w = await asyncio.open_connection(*ms.address)
            w.write(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(), 5) == b""  # not answered
            w.close()
            text = generate_latest(ms.registry).decode()
            assert 'ferrotunnel_refused_connections_total{limit="fd_reserve",listener="metrics"} 1.0' in text
            await ms.close()
    run(body, timeout=30)


class _Huge:
    """A collector whose exposition is far larger than the socket buffers (12 MB)."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("test_huge", "big labels", labels=["blob"])
        for i in range(12):
            g.add_metric([str(i) * 1_000_000], i)
        yield g


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_metrics_exchange_timeout_covers_the_drain(run, monkeypatch):
    """A scraper that sends its request and then never reads: the answer cannot drain, and the
    connection is dropped when the exchange's time is up (not held for ever)."""
    monkeypatch.setattr(M, "METRICS_EXCHANGE_TIMEOUT", 0.5, raising=False)

    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            ms = M.MetricsServer(server, ("127.0.0.1", 0))
            ms.registry.register(_Huge())  # type: ignore[arg-type]
            await ms.start()
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ms.address)
                await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n")
                await asyncio.sleep(0.2)  # accepted, being answered
                held = _open_fds()
                started = time.monotonic()
                while _open_fds() >= held:  # the server's end of the connection goes
                    assert time.monotonic() - started < 8, "the stalled scrape is held past its timeout"
                    await asyncio.sleep(0.05)
            finally:
                sock.close()
            assert ms.gate.open == 0
            await ms.close()
    run(body, timeout=60)


# ---------------------------------------------------------------- the CLI server with few descriptors

class _Output:
    def __init__(self, p: subprocess.Popen) -> None:
        self.p, self.lines = p, []  # type: ignore[var-annotated]
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            assert time.monotonic() < end and self.p.poll() is None, f"{text!r} not seen: {self.lines[-20:]}"
            time.sleep(0.05)


def _limit_fds(n: int) -> Any:
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return pre


def test_cli_idle_metrics_connections_leave_the_tunnel_port_its_descriptors():
    """The CLI server with RLIMIT_NOFILE 300 and --metrics: 280 idle metrics connections (what
    took every descriptor before) hold at most MAX_METRICS_CONNECTIONS; a tunnel client still
    connects meanwhile, a scrape works once they are gone, and each limit that refused logged once."""
    tunnel_port, metrics_port = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{tunnel_port}",
                          "--metrics", "--metrics-bind", f"127.0.0.1:{metrics_port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**ENV, "FERROTUNNEL_TOKEN": TOKEN},
                         preexec_fn=_limit_fds(300))
    out = _Output(p)
    idle: List[socket.socket] = []
    try:
        out.wait_for("metrics on http://")
        for _ in range(280):
            idle.append(socket.create_connection(("127.0.0.1", metrics_port), timeout=5))
        time.sleep(0.5)

        async def connect_client() -> None:
            client = ft.TunnelClient(f"127.0.0.1:{tunnel_port}", TOKEN, tunnel_id="after",
                                     config=ft.ClientConfig(handshake_timeout=5))
            try:
                await client.connect()
            finally:
                await client.close()

        asyncio.run(connect_client())  # refused (out of descriptors) when nothing capped the metrics
        for s in idle:
            s.close()
        idle.clear()
        status, text = asyncio.run(scrape_when_free(("127.0.0.1", metrics_port)))
        assert status == b"HTTP/1.1 200 OK", status
        refused = [ln for ln in text.splitlines()
                   if ln.startswith("ferrotunnel_refused_connections_total{") and 'listener="metrics"' in ln]
        assert refused, text  # mostly "fd_reserve" here: 300 descriptors leave 44 below the reserve
        assert all(n == 1 for n in series(text).values())
        p.terminate()
        p.wait(15)
        refusals = [ln.rsplit("(", 1)[1].split(")")[0] for ln in out.lines if "metrics listener: refusing" in ln]
        assert refusals and len(refusals) == len(set(refusals)), out.lines[-20:]  # one line per limit
    finally:
        for s in idle:
            s.close()
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- one label set per series

def test_pool_members_sharing_a_tunnel_id_have_their_own_series(run):
    async def body():
        sc = ft.ServerConfig(heartbeat_interval=0.05, session_timeout=2)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=sc) as server:
            ingresses = [ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="shared"),
                         ft.HttpIngress(server, ("127.0.0.1", 0))]
            for ing in ingresses:
                await ing.start()
            ms = M.MetricsServer(server, ("127.0.0.1", 0), ingresses)
            await ms.start()
            at = "%s:%d" % server.address
            clients = [ft.TunnelClient(at, TOKEN, tunnel_id=tid, config=ft.ClientConfig(pool=True))
                       for tid in ("shared", "shared", "solo")]
            tasks = [asyncio.create_task(c.connect_and_run()) for c in clients]
            try:
                async with asyncio.timeout(20):
                    while sum(1 for s in server.sessions if s.established and s.rtt is not None) < 3:
                        await asyncio.sleep(0.05)
                status, text = await scrape(ms.address)
                assert status == b"HTTP/1.1 200 OK"
                dup = {k: n for k, n in series(text).items() if n > 1}
                assert not dup, dup  # a label set twice is an invalid exposition
                rtt = [dict(labels) for (name, labels) in series(text) if name == "ferrotunnel_heartbeat_rtt_seconds"]
                ids = {str(s.id): s.tunnel_id for s in server.sessions}
                assert sorted(r["tunnel_id"] for r in rtt) == ["shared", "shared", "solo"]
                assert {r["session"]: r["tunnel_id"] for r in rtt} == ids
                assert "ferrotunnel_sessions 3.0" in text
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for ing in ingresses:
                    await ing.close()
                await ms.close()
    run(body, timeout=60)
