"""Prometheus metrics for a TunnelServer (needs the optional ``prometheus_client``).

Values are read from the server when scraped, so the data path pays nothing for them.
Serves ``/metrics`` and ``/health/ready`` on its own address.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, List, Optional, Tuple

__all__ = ["MetricsServer"]

log = logging.getLogger("ferrotunnel.metrics")


class _Collector:
    def __init__(self, server: Any, ingresses: List[Any], node: Any = None) -> None:
        self.server = server
        self.ingresses = ingresses
        self.node = node

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        srv = self.server
        sessions = list(srv.sessions)
        yield GaugeMetricFamily("ferrotunnel_sessions", "Live tunnel sessions", value=len(sessions))
        yield GaugeMetricFamily("ferrotunnel_streams", "Open streams over all sessions",
                                value=sum(len(s.multiplexer) for s in sessions if s.primary is s))
        frames_in, bytes_in, frames_out, bytes_out = srv.traffic_totals()
        c = CounterMetricFamily("ferrotunnel_frames", "Frames on the tunnel connections", labels=["direction"])
        c.add_metric(["in"], frames_in)
        c.add_metric(["out"], frames_out)
        yield c
        c = CounterMetricFamily("ferrotunnel_bytes", "Wire bytes on the tunnel connections", labels=["direction"])
        c.add_metric(["in"], bytes_in)
        c.add_metric(["out"], bytes_out)
        yield c
        c = CounterMetricFamily("ferrotunnel_handshake_failures", "Refused handshakes by status", labels=["status"])
        for status, n in sorted(srv.handshake_failures.items()):
            c.add_metric([status], n)
        c.add_metric(["TLS"], srv.tls_failures)
        yield c
        g = GaugeMetricFamily("ferrotunnel_heartbeat_rtt_seconds", "Heartbeat round trip per session",
                              labels=["tunnel_id"])
        for s in sessions:
            if s.rtt is not None:
                g.add_metric([s.tunnel_id], s.rtt)
        yield g
        c = CounterMetricFamily("ferrotunnel_refused_connections", "Connections refused by a limit",
                                labels=["listener", "limit"])
        for limit, n in sorted(srv.refused_connections.items()):
            c.add_metric(["tunnel", limit], n)
        for limit, n in sorted(srv.ingress_gate.refused.items()):
            c.add_metric(["ingress", limit], n)
        yield c
        c = CounterMetricFamily("ferrotunnel_accept_paused", "Times accepting paused: accept() out of descriptors",
                                labels=["listener", "errno"])
        for name, n in sorted(srv.listener_exhaustion.items()):
            c.add_metric(["tunnel", name], n)
        for ing in self.ingresses:
            for name, n in sorted(ing.listener_exhaustion.items()):
                c.add_metric([f"{type(ing).__name__}:%s:%s" % ing.address, name], n)
        yield c
        if self.node is not None:
            yield from _cluster_metrics(self.node)
        c = CounterMetricFamily("ferrotunnel_ingress_connections", "Public connections accepted", labels=["ingress"])
        for ing in self.ingresses:
            host, port = ing.address
            c.add_metric([f"{type(ing).__name__}:{host}:{port}"], ing.connections)
        yield c


def _cluster_metrics(node: Any) -> Iterable[Any]:
    """A cluster node's figures: streams carried over node links each way, link round trips,
    registry operations (count, errors, seconds), outage and drain state."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    st = node.stats()
    c = CounterMetricFamily("ferrotunnel_cluster_streams", "Streams carried over node links", labels=["direction", "outcome"])
    for outcome, n in sorted(st["links_in"].items()):
        c.add_metric(["in", outcome], n)
    c.add_metric(["out", "opened"], st["streams_out"])
    yield c
    g = GaugeMetricFamily("ferrotunnel_cluster_link_rtt_seconds", "Heartbeat round trip of each node link", labels=["node"])
    for peer, rtt in sorted(st["link_rtt"].items()):
        g.add_metric([peer], rtt)
    yield g
    yield GaugeMetricFamily("ferrotunnel_cluster_links", "Live links to other nodes", value=st["links_out"])
    reg = st["registry"]
    yield CounterMetricFamily("ferrotunnel_cluster_registry_operations", "Redis operations", value=reg.ops)
    yield CounterMetricFamily("ferrotunnel_cluster_registry_errors", "Redis operations that failed", value=reg.errors)
    yield CounterMetricFamily("ferrotunnel_cluster_registry_seconds", "Time spent in Redis operations",
                              value=reg.op_seconds)
    yield CounterMetricFamily("ferrotunnel_cluster_takeovers", "Tunnel ids taken over from other nodes",
                              value=reg.takeovers)
    yield CounterMetricFamily("ferrotunnel_cluster_registry_reasserts", "Times Redis no longer knew this node "
                              "(lost records, or its liveness key expired) and it re-asserted its claims",
                              value=reg.reasserts)
    c = CounterMetricFamily("ferrotunnel_cluster_sessions_moved", "Local sessions whose tunnel id went to "
                            "another node", labels=["how"])
    c.add_metric(["handover"], reg.handovers)  # asked to move while this node drained
    c.add_metric(["lost"], reg.lost)  # closed: another node held the id
    c.add_metric(["conflict"], reg.conflicts)  # closed: both granted during a Redis outage
    yield c
    yield GaugeMetricFamily("ferrotunnel_cluster_registry_outage", "1 while Redis is unreachable",
                            value=1 if st["outage"] else 0)
    yield GaugeMetricFamily("ferrotunnel_cluster_draining", "1 while this node drains", value=1 if st["draining"] else 0)


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/health/ready`` on ``address``."""

    def __init__(self, server: Any, address: Tuple[str, int], ingresses: Optional[List[Any]] = None,
                 node: Any = None) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise RuntimeError("metrics need prometheus_client: pip install 'ferrotunnel[metrics]'") from None
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(server, ingresses or [], node))  # type: ignore[arg-type]
        self.server = server
        self._bind = address
        self._srv: Optional[asyncio.Server] = None

    @property
    def address(self) -> Tuple[str, int]:
        from ..aio.transport import bound_address

        return bound_address(self._srv, "metrics server")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else ""
        if path == "/metrics":
            body, ctype, status = generate_latest(self.registry), CONTENT_TYPE_LATEST, "200 OK"
        elif path == "/health/ready":
            ready = self.server.is_serving
            body, ctype = (b"ready\n" if ready else b"not ready\n"), "text/plain"
            status = "200 OK" if ready else "503 Service Unavailable"
        else:
            body, ctype, status = b"not found\n", "text/plain", "404 Not Found"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def start(self) -> None:
        host, port = self._bind
        self._srv = await asyncio.start_server(self._handle, host, port)
        log.info("metrics on http://%s:%s/metrics", *self.address)

    async def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
