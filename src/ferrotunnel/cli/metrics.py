"""Prometheus metrics for a TunnelServer (needs the optional ``prometheus_client``).

Values are read from the server when scraped, so the data path pays nothing for them.
Serves ``/metrics`` and ``/health/ready`` on its own address, one request per connection: at
most ``MAX_METRICS_CONNECTIONS`` at once, each leaving the ingresses' descriptor reserve
(``ingress_fd_reserve``) free, each over within ``METRICS_EXCHANGE_TIMEOUT``, so the listener
cannot take the descriptors that tunnel clients and visitors need.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, List, Optional, Tuple

__all__ = ["MetricsServer", "MAX_METRICS_CONNECTIONS", "METRICS_EXCHANGE_TIMEOUT"]

log = logging.getLogger("ferrotunnel.metrics")

#: Connections at once on the metrics listener (a scrape takes one); a new one beyond it, or one
#: whose descriptor would leave fewer than ``ingress_fd_reserve`` free, is closed at once, counted
#: in ``ferrotunnel_refused_connections_total{listener="metrics"}`` and logged once per interval.
MAX_METRICS_CONNECTIONS = 32
#: Seconds one metrics connection may take from its accept to its close: reading the request
#: head, writing the answer and the drain of it to a peer that reads; then it is dropped.
METRICS_EXCHANGE_TIMEOUT = 10.0


class _Collector:
    def __init__(self, server: Any, ingresses: List[Any], node: Any = None, gate: Any = None) -> None:
        self.server = server
        self.ingresses = ingresses
        self.node = node
        self.gate = gate  # the metrics listener's ConnectionGate (its refusals are reported)

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
        # One series per session: pool members (``--pool``) share a tunnel id, so the session id
        # keeps the label sets apart (an exposition with a label set twice is invalid).
        g = GaugeMetricFamily("ferrotunnel_heartbeat_rtt_seconds", "Heartbeat round trip per session",
                              labels=["tunnel_id", "session"])
        seen = set()
        for s in sessions:
            rtt = s.rtt
            if rtt is not None and s.id not in seen:
                seen.add(s.id)
                g.add_metric([s.tunnel_id, str(s.id)], rtt)
        yield g
        c = CounterMetricFamily("ferrotunnel_refused_connections", "Connections refused by a limit",
                                labels=["listener", "limit"])
        for limit, n in sorted(srv.refused_connections.items()):
            c.add_metric(["tunnel", limit], n)
        for limit, n in sorted(srv.ingress_gate.refused.items()):
            c.add_metric(["ingress", limit], n)
        if self.gate is not None:
            for limit, n in sorted(self.gate.refused.items()):
                c.add_metric(["metrics", limit], n)
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
        from ..aio.gate import ConnectionGate

        #: ``MAX_METRICS_CONNECTIONS`` at once (one address may hold them all: scrapers are few)
        #: and the ingresses' descriptor reserve; refusals counted by limit, logged once per interval.
        self.gate = ConnectionGate(MAX_METRICS_CONNECTIONS, MAX_METRICS_CONNECTIONS, "metrics listener",
                                   server.config.ingress_fd_reserve)
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(server, ingresses or [], node, self.gate))  # type: ignore[arg-type]
        self.server = server
        self._bind = address
        self._srv: Optional[asyncio.Server] = None

    @property
    def address(self) -> Tuple[str, int]:
        from ..aio.transport import bound_address

        return bound_address(self._srv, "metrics server")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.gate.enter(host, transport):
            transport.abort()
            return
        done = False
        try:
            async with asyncio.timeout(METRICS_EXCHANGE_TIMEOUT):
                await self._exchange(reader, writer)
            done = True
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            if not done:
                transport.abort()  # with what is still buffered for a peer that stopped reading
            self.gate.leave(host)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, its answer, and the close once the answer is out."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        head = await reader.readuntil(b"\r\n\r\n")
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
        await writer.drain()
        writer.close()
        await writer.wait_closed()  # what drain left buffered is out too

    async def start(self) -> None:
        host, port = self._bind
        self._srv = await asyncio.start_server(self._handle, host, port)
        log.info("metrics on http://%s:%s/metrics", *self.address)

    async def close(self) -> None:
        if self._srv is not None:
            self._srv.close()
