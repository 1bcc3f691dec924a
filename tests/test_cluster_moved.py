"""A client that moves to another node without a drain (it restarted, or a blip sent it through the
balancer elsewhere) while a third node still has its old route cached: the old node answers the
link stream "no session here" (SESSION_NOT_FOUND), the third node forgets the route and tells the
visitor 503 "moved" (not 502, which blames the local service), and the next visitor reaches the
client on its new node. In-process nodes on a real redis-server."""

from __future__ import annotations

import asyncio

import ferrotunnel as ft

from inproc_nodes import InProcessNode
from redis_server import RedisServer
from test_cluster_nodes import _get, _name_app, _teardown

TOKEN = "cluster-moved-token-0123456789"
SECRET = "cluster-moved-secret"


async def _echo(addr, data: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(b"ECHO" + data)
    w.write_eof()
    try:
        return await asyncio.wait_for(r.read(), 15)
    except ConnectionError:
        return b""
    finally:
        w.close()


def test_a_route_to_a_node_the_client_left_gives_503_then_the_new_node(run):
    async def body():
        with RedisServer() as redis:
            # a long route cache: without the fix c trusts its route to a for all of it
            nodes = [InProcessNode(n, redis.url, token=TOKEN, secret=SECRET, route_cache_ttl=60.0) for n in "abc"]
            a, b, c = nodes
            app, addr = await _name_app("app")
            tasks, ing = [], None
            try:
                for n in nodes:
                    await n.start()
                ing = ft.TcpIngress(c.server, ("127.0.0.1", 0), tunnel_id="mv2")
                await ing.start()

                async def attach(node, tunnel_id):
                    client = ft.TunnelClient("%s:%d" % node.server.address, TOKEN, tunnel_id=tunnel_id,
                                             config=ft.ClientConfig(local_addr=addr))
                    task = asyncio.create_task(client.connect_and_run())
                    tasks.append(task)
                    await node.server.wait_for_session(tunnel_id, timeout=15)
                    return task

                old = [await attach(a, "mv1"), await attach(a, "mv2")]
                assert (await _get(c.http.address, "mv1", "/before")).endswith(b"app /before")  # c caches a
                assert await _echo(ing.address, b"hello") == b"hello"
                for task in old:  # both clients go; they come back on b
                    task.cancel()
                await asyncio.gather(*old, return_exceptions=True)
                for tid in ("mv1", "mv2"):
                    while a.node.registry.local_session(tid) is not None:
                        await asyncio.sleep(0.02)
                await attach(b, "mv1")
                await attach(b, "mv2")
                joined_before = b.node.links_in.streams["joined"]

                # TCP: the first visitor's stream is refused by a; c forgets the route
                assert await _echo(ing.address, b"lost") == b""
                assert a.node.links_in.streams["no_session"] == 1
                assert await _echo(ing.address, b"again") == b"again"  # through b now

                # HTTP: 503 saying what happened, then the new node
                answer = await _get(c.http.address, "mv1", "/after")
                assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
                assert b"moved to another node" in answer, answer[:300]
                assert (await _get(c.http.address, "mv1", "/again")).endswith(b"app /again")
                assert a.node.links_in.streams["no_session"] == 2
                assert b.node.links_in.streams["joined"] - joined_before == 2
            finally:
                if ing is not None:
                    await ing.close()
                await _teardown(tasks, nodes, [app])
    run(body, timeout=120)


def test_a_tunnel_client_that_resets_with_session_not_found_is_not_taken_for_a_moved_route(run):
    """Only a node link's "no session here" means the route moved: a tunnel client whose streams
    are reset with SESSION_NOT_FOUND is a local service that failed (502 over HTTP), and the
    server's routes are left as they are (the registry is not asked to forget them)."""
    async def body():
        forgotten = []

        async def handler(stream):
            await stream.read(1)
            stream.abort(ft.ErrorCode.SESSION_NOT_FOUND, "no session here")

        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with server:
            server.registry.invalidate = forgotten.append  # what a cluster registry would be told
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="liar")
            task = asyncio.create_task(client.connect_and_run(handler))
            try:
                await server.wait_for_session("liar", timeout=15)
                async with ft.HttpIngress(server, ("127.0.0.1", 0)) as http:
                    r, w = await asyncio.open_connection(*http.address)
                    w.write(b"GET / HTTP/1.1\r\nHost: liar\r\n\r\n")
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 15)
                    w.close()
                    assert head.startswith(b"HTTP/1.1 502 "), head
                async with ft.TcpIngress(server, ("127.0.0.1", 0), "liar") as tcp:
                    assert await _echo(tcp.address, b"x") == b""
                assert forgotten == []
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body, timeout=60)
