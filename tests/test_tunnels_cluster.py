"""Several tunnels on one connection in cluster mode (issue 12 point 5 with issue 11): a client
on node b serves "web" and registers "api" (with basic auth) on the same connection; both ids are
claimed in a real Redis for node b, visitors at node a reach both apps over the node link (the
registered tunnel's rules checked at node a), a client on node a cannot register an id node b
holds, and the connection's end releases both claims. Short TTLs; bounds only catch hangs."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import pytest

import ferrotunnel as ft
from ferrotunnel.errors import RetryableHandshakeError
from redis_server import RedisServer
from test_cluster_registry import raw, wait_for_async
from test_pools import get, name_app, running, served_by, until
from test_pools_cluster import TOKEN, Node


def _ids(server) -> list:
    return sorted(s.tunnel_id for s in server.sessions if s.established and not s.is_closed)


def test_registered_tunnels_are_claimed_for_their_node_and_reached_from_another(run):
    async def body():
        with RedisServer() as redis:
            r = await raw(redis.url)
            a, b = Node("a", redis.url), Node("b", redis.url)
            (web, web_addr), (api, api_addr) = await name_app("web-app"), await name_app("api-app")
            try:
                await a.start()
                await b.start()
                at_b = "%s:%d" % b.server.address
                api_tunnel = ft.Tunnel("api", ft.ClientConfig(local_addr=api_addr, basic_auth="ann:pw-1"))
                c = ft.TunnelClient(at_b, TOKEN, tunnel_id="web", config=ft.ClientConfig(local_addr=web_addr),
                                    more_tunnels=[api_tunnel])
                async with running(c) as tasks:
                    # (the server counts a tunnel before its answer reaches the client)
                    await until(lambda: _ids(b.server) == ["api", "web"] and c.carries_more_tunnels)
                    for tid in ("web", "api"):
                        record = await r.hgetall(f"ferrotunnel:tunnel:{tid}")
                        assert record["node"] == "b", record
                    # visitors at node a: over the link to node b, each to its own app
                    assert served_by(await get(a.http.address, "web", "/w")) == "web-app"
                    assert (await get(a.http.address, "api", "/a")).startswith(b"HTTP/1.1 401")
                    cred = base64.b64encode(b"ann:pw-1").decode()
                    rd, wr = await asyncio.open_connection(*a.http.address)
                    wr.write(f"GET /a HTTP/1.1\r\nHost: api\r\nAuthorization: Basic {cred}\r\n\r\n".encode())
                    answer = await asyncio.wait_for(rd.read(), 15)
                    wr.close()
                    assert served_by(answer) == "api-app"
                    # a client on node a cannot register an id node b holds
                    other = ft.TunnelClient("%s:%d" % a.server.address, TOKEN, tunnel_id="other",
                                            config=ft.ClientConfig(local_addr=web_addr),
                                            more_tunnels=[ft.Tunnel("api", ft.ClientConfig(local_addr=api_addr))])
                    with pytest.raises(RetryableHandshakeError) as taken:
                        await other.connect()
                    assert "'api'" in str(taken.value) and "node b" in str(taken.value), taken.value
                    await until(lambda: not _ids(a.server))  # its own id went with the connection
                    # the connection ends: both claims are released in Redis
                    tasks[0].cancel()
                    await until(lambda: not _ids(b.server))
                    for tid in ("web", "api"):
                        await wait_for_async(lambda tid=tid: _gone(r, tid))
                    # (node a's cached route to it lasts route_cache_ttl at most)
                    for _ in range(100):
                        if (await get(a.http.address, "api")).startswith(b"HTTP/1.1 404"):
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError("node a still routes to the released tunnel")
            finally:
                for n in (a, b):
                    with contextlib.suppress(Exception):
                        await n.close()
                web.close()
                api.close()
                await r.aclose()
    run(body, timeout=120)


async def _gone(r, tunnel_id: str) -> bool:
    return not await r.exists(f"ferrotunnel:tunnel:{tunnel_id}")
