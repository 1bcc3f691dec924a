"""Three cluster nodes in one process on one real redis-server: tunnels spread over the nodes,
visitors through every node's HTTP and TCP ingress reach the right tunnel, byte-exact, crossing
at most one node link; two clients claiming one id on two nodes at once leave one owner."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest


import ferrotunnel as ft

from inproc_nodes import InProcessNode
from redis_server import RedisServer

TOKEN = "cluster-nodes-token"
SECRET = "cluster-nodes-secret"


async def _name_app(name: str):
    """An HTTP/1.1 app that answers every request with its name; anything else is echoed."""

    async def handle(reader, writer):
        try:
            first = await reader.read(4)
            if first == b"ECHO":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                return
            head = first + await reader.readuntil(b"\r\n\r\n")
            body = f"{name} {head.split(b' ')[1].decode()}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


class Node(InProcessNode):
    def __init__(self, name: str, redis_url: str) -> None:
        super().__init__(name, redis_url, token=TOKEN, secret=SECRET)


async def _teardown(tasks, nodes, apps) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for n in nodes:
        await n.close()
    for a in apps:
        a.close()


async def _get(addr, host: str, path: str = "/") -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = await asyncio.wait_for(r.read(), 15)
    w.close()
    return data


def test_visitors_on_every_node_reach_the_right_tunnel(run):
    async def body():
        with RedisServer() as redis:
            nodes = [Node(n, redis.url) for n in ("a", "b", "c")]
            apps, clients, tasks = [], [], []
            try:
                for n in nodes:
                    await n.start()
                for i in range(6):
                    app, addr = await _name_app(f"app{i}")
                    apps.append(app)
                    home = nodes[i % 3]
                    c = ft.TunnelClient("%s:%d" % home.server.address, TOKEN, tunnel_id=f"t{i}",
                                        config=ft.ClientConfig(local_addr=addr))
                    clients.append(c)
                    tasks.append(asyncio.create_task(c.connect_and_run()))
                    await home.server.wait_for_session(f"t{i}", timeout=10)
                # every node, every tunnel: two thirds of these cross a link
                jobs = [(n, i, k) for n in nodes for i in range(6) for k in range(3)]
                answers = await asyncio.gather(*(_get(n.http.address, f"t{i}", f"/{n.name}/{k}") for n, i, k in jobs))
                for (n, i, k), answer in zip(jobs, answers):
                    assert answer.startswith(b"HTTP/1.1 200"), (n.name, i, answer[:200])
                    assert answer.endswith(f"app{i} /{n.name}/{k}".encode()), (n.name, i, answer[-100:])
                joined = sum(n.node.links_in.streams["joined"] for n in nodes)
                assert joined == 2 * 6 * 3  # the visitors that landed elsewhere crossed exactly one link
                # byte-exact both ways through a TCP ingress on a node that does not own the tunnel
                async with ft.TcpIngress(nodes[1].server, ("127.0.0.1", 0), tunnel_id="t0") as ing:
                    blob = os.urandom(4 * 1024 * 1024)
                    r, w = await asyncio.open_connection(*ing.address)
                    w.write(b"ECHO")

                    async def send():
                        for j in range(0, len(blob), 65536):
                            w.write(blob[j:j + 65536])
                            await w.drain()
                        w.write_eof()

                    sender = asyncio.create_task(send())
                    got = await asyncio.wait_for(r.read(), 30)
                    await sender
                    w.close()
                    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest() and len(got) == len(blob)
                # an unknown tunnel is 404 everywhere
                assert (await _get(nodes[2].http.address, "nope")).startswith(b"HTTP/1.1 404")
            finally:
                await _teardown(tasks, nodes, apps)
    run(body, timeout=120)


def test_two_clients_claiming_one_id_on_two_nodes_leave_one_owner(run):
    async def body():
        with RedisServer() as redis:
            nodes = [Node(n, redis.url) for n in ("a", "b")]
            try:
                for n in nodes:
                    await n.start()
                for round_ in range(10):
                    tid = f"race{round_}"
                    clients = [ft.TunnelClient("%s:%d" % n.server.address, TOKEN, tunnel_id=tid,
                                               config=ft.ClientConfig(handshake_timeout=5)) for n in nodes]
                    results = await asyncio.gather(*(c.connect() for c in clients), return_exceptions=True)
                    won = [r for r in results if isinstance(r, ft.Session)]
                    lost = [r for r in results if not isinstance(r, ft.Session)]
                    assert len(won) == 1 and len(lost) == 1, results
                    assert isinstance(lost[0], ft.RetryableHandshakeError)
                    holders = [n for n in nodes if n.server.sessions.get_by_tunnel_id(tid) is not None
                               and not n.server.sessions.get_by_tunnel_id(tid).is_closed]
                    assert len(holders) == 1
                    for c in clients:
                        await c.close()
            finally:
                for n in nodes:
                    await n.close()
    run(body, timeout=120)


def test_a_redis_outage_keeps_local_tunnels_and_answers_503_across_nodes(run):
    """Redis stops: visitors of tunnels on the node they reach are served as before; visitors for
    a tunnel on another node get 503 once the cached route expired; Redis comes back (empty): the
    nodes re-assert their claims and cross-node visitors are served again."""

    async def body():
        with RedisServer() as redis:
            nodes = [Node(n, redis.url) for n in ("a", "b")]
            apps, tasks = [], []
            try:
                for n in nodes:
                    await n.start()
                for i, home in enumerate(nodes):
                    app, addr = await _name_app(f"app{i}")
                    apps.append(app)
                    c = ft.TunnelClient("%s:%d" % home.server.address, TOKEN, tunnel_id=f"t{i}",
                                        config=ft.ClientConfig(local_addr=addr))
                    tasks.append(asyncio.create_task(c.connect_and_run()))
                    await home.server.wait_for_session(f"t{i}", timeout=10)
                assert (await _get(nodes[1].http.address, "t0")).startswith(b"HTTP/1.1 200")  # across
                redis.stop()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while True:  # the cached route expires (route_cache_ttl), then the registry is asked
                    answer = await _get(nodes[1].http.address, "t0")
                    if answer.startswith(b"HTTP/1.1 503"):
                        break
                    assert loop.time() < deadline, answer[:200]
                    await asyncio.sleep(0.2)
                assert b"cluster registry is unreachable" in answer
                for n, i in ((nodes[0], 0), (nodes[1], 1)):  # local tunnels: unaffected
                    assert (await _get(n.http.address, f"t{i}")).startswith(b"HTTP/1.1 200")
                assert all(not n.server.sessions.get_by_tunnel_id(f"t{i}").is_closed for i, n in enumerate(nodes))
                redis.start()  # empty: the nodes must re-assert their claims
                back = loop.time()
                while not (await _get(nodes[1].http.address, "t0")).startswith(b"HTTP/1.1 200"):
                    assert loop.time() - back < 15, "cross-node visitors were not served again"
                    await asyncio.sleep(0.2)
                for n in nodes:
                    assert not n.node.registry.outage
            finally:
                await _teardown(tasks, nodes, apps)
    run(body, timeout=120)


def test_a_nodes_metrics_count_streams_links_and_registry_work(run):
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from ferrotunnel.cli.metrics import MetricsServer

    async def body():
        with RedisServer() as redis:
            nodes = [Node(n, redis.url) for n in ("a", "b")]
            apps, tasks = [], []
            try:
                for n in nodes:
                    await n.start()
                app, addr = await _name_app("app0")
                apps.append(app)
                c = ft.TunnelClient("%s:%d" % nodes[0].server.address, TOKEN, tunnel_id="t0",
                                    config=ft.ClientConfig(local_addr=addr))
                tasks.append(asyncio.create_task(c.connect_and_run()))
                await nodes[0].server.wait_for_session("t0", timeout=10)
                for k in range(3):  # through node b: over the link to a
                    assert (await _get(nodes[1].http.address, "t0", f"/{k}")).startswith(b"HTTP/1.1 200")
                text_a = generate_latest(MetricsServer(nodes[0].server, ("127.0.0.1", 0), node=nodes[0].node).registry).decode()
                text_b = generate_latest(MetricsServer(nodes[1].server, ("127.0.0.1", 0), node=nodes[1].node).registry).decode()
                assert 'ferrotunnel_cluster_streams_total{direction="in",outcome="joined"} 3.0' in text_a
                assert 'ferrotunnel_cluster_streams_total{direction="out",outcome="opened"} 3.0' in text_b
                assert "ferrotunnel_cluster_links 1.0" in text_b and "ferrotunnel_cluster_links 0.0" in text_a
                assert "ferrotunnel_cluster_registry_outage 0.0" in text_a
                assert "ferrotunnel_cluster_draining 0.0" in text_a
                assert 'ferrotunnel_cluster_sessions_moved_total{how="handover"} 0.0' in text_a
                ops = [ln for ln in text_b.splitlines() if ln.startswith("ferrotunnel_cluster_registry_operations_total")]
                assert ops and float(ops[0].split()[-1]) > 0
                await nodes[0].node.drain()
                text_a = generate_latest(MetricsServer(nodes[0].server, ("127.0.0.1", 0), node=nodes[0].node).registry).decode()
                assert "ferrotunnel_cluster_draining 1.0" in text_a
            finally:
                await _teardown(tasks, nodes, apps)
    run(body, timeout=60)


def test_a_node_that_links_in_after_the_drain_began_is_told_at_once(run):
    """Node a drains before any node linked to it; node b's route to a's tunnel, made afterwards,
    is stale as soon as its link is up (otherwise it would be trusted for ``route_cache_ttl``
    after the tunnel moved)."""
    async def body():
        with RedisServer() as redis:
            nodes = [Node(n, redis.url) for n in ("a", "b")]
            apps, tasks = [], []
            try:
                for n in nodes:
                    await n.start()
                app, addr = await _name_app("app0")
                apps.append(app)
                c = ft.TunnelClient("%s:%d" % nodes[0].server.address, TOKEN, tunnel_id="t0",
                                    config=ft.ClientConfig(local_addr=addr))
                tasks.append(asyncio.create_task(c.connect_and_run()))
                await nodes[0].server.wait_for_session("t0", timeout=10)
                await nodes[0].node.drain()
                assert nodes[1].node.links_out.links() == {}  # nobody was linked to a when it drained
                # the client has not moved (nobody asked it): a still serves t0, through b too
                assert (await _get(nodes[1].http.address, "t0", "/x")).startswith(b"HTTP/1.1 200")
                route = await nodes[1].node.registry.lookup("t0")
                assert route is not None and getattr(route, "node_id", None) == "a"
                async with asyncio.timeout(10):
                    while not route.stale:
                        await asyncio.sleep(0.01)
            finally:
                await _teardown(tasks, nodes, apps)
    run(body, timeout=60)
