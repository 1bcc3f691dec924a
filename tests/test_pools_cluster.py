"""Tunnel pools across cluster nodes (issue 12, point 9): RedisRegistry against a real
redis-server with stand-in sessions (every member node recorded in Redis, pool/solo mismatches
refused across nodes, a node prefers its own members and otherwise spreads over the other member
nodes, the last member leaving takes its node off the record, dead nodes are skipped and taken
over), then two real cluster nodes with a pool member each, reached through their HTTP ingresses.
Short TTLs; bounds only catch hangs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Dict, List, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel.cluster import RedisRegistry
from ferrotunnel.frames import Protocol, StreamPriority
from ferrotunnel.server.registry import POOL_REFUSAL, SOLO_REFUSAL, PoolRoute, Route
from inproc_nodes import InProcessNode
from redis_server import RedisServer
from test_cluster_registry import cfg, raw, wait_for, wait_for_async
from test_pools import StubSession, opens


class NodeRoute(Route):
    """A route "to another node": each stream opened on it answers that node's name."""

    def __init__(self, node: str) -> None:
        self.node = node

    def open_stream_nowait(self, protocol: Any, priority: Any, visitor: Any = None, host: Any = None) -> Any:
        return f"node {self.node}"


class Links:
    """A ``remote_route`` factory that records the nodes it was asked for."""

    def __init__(self) -> None:
        self.asked: List[Tuple[str, Tuple[str, int]]] = []

    async def __call__(self, node: str, addr: Tuple[str, int], tunnel_id: str) -> Route:
        self.asked.append((node, addr))
        return NodeRoute(node)


def members(record: Dict[str, str]) -> List[str]:
    return sorted(k[2:] for k in record if k.startswith("m:"))


@pytest.fixture
def redis() -> Any:
    with RedisServer() as r:
        yield r


def test_a_pool_spans_nodes_and_refuses_solo_claims_everywhere(run, redis):
    async def body():
        r = await raw(redis.url)
        # (a generous redis_timeout: a claim that outlived the short one counts as an outage, is
        # granted locally and reaches Redis only later, which this test does not look at)
        slow = dict(redis_timeout=3.0)
        async with RedisRegistry(cfg(redis.url, "a", 7001, **slow)) as a, \
                RedisRegistry(cfg(redis.url, "b", 7002, **slow)) as b, RedisRegistry(cfg(redis.url, "c", 7003, **slow)) as c:
            sa1, sa2, sb = StubSession(name="a1"), StubSession(name="a2"), StubSession(name="b1")
            assert (await a.claim("web", sa1, pool=True)).granted
            assert (await a.claim("web", sa2, pool=True)).granted  # a second member on the same node
            assert (await b.claim("web", sb, pool=True)).granted  # and one on another node
            record = await r.hgetall("test:tunnel:web")
            assert record["pool"] == "1" and members(record) == ["a", "b"]
            assert record["m:a"] == a.epoch and record["m:b"] == b.epoch and "node" not in record
            assert 0 < await r.pttl("test:tunnel:web") <= 1000
            # a client that is not in the pool is refused on every node, with what to do
            for reg in (a, b, c):
                refused = await reg.claim("web", StubSession(name="solo"), lambda s: False)
                assert not refused.granted and refused.retry_after is None
                assert refused.reason.startswith(POOL_REFUSAL), refused.reason
            # and a pool client cannot join a solo client's id, on its node or another
            solo = StubSession("api", "solo")
            assert (await a.claim("api", solo)).granted
            for reg in (a, b):
                refused = await reg.claim("api", StubSession("api", "p"), lambda s: False, pool=True)
                assert not refused.granted and refused.reason.startswith(SOLO_REFUSAL), refused.reason
            assert (await r.hgetall("test:tunnel:api"))["session"] == solo.id.hex
            # one of a's two members leaves: a stays a member node
            await a.release("web", sa1)
            assert members(await r.hgetall("test:tunnel:web")) == ["a", "b"] and a.members("web") == [sa2]
            # refreshed with the claims: the record outlives claim_ttl, with both member nodes
            await asyncio.sleep(2.0)
            assert members(await r.hgetall("test:tunnel:web")) == ["a", "b"]
            assert await a.refresh("web", sa2) and await b.refresh("web", sb) and not await a.refresh("web", sa1)
            assert not await c.refresh("web", sb)
        assert await r.exists("test:tunnel:web", "test:tunnel:api") == 0  # close() left them
        await r.aclose()
    run(body)


def test_a_node_prefers_its_own_members_else_spreads_over_the_others(run, redis):
    async def body():
        r = await raw(redis.url)
        links = {n: Links() for n in "abc"}
        regs = [RedisRegistry(cfg(redis.url, n, 7000 + i, route_cache_ttl=0.2, redis_timeout=3.0), remote_route=links[n])
                for i, n in enumerate("abc")]
        a, b, c = regs
        async with a, b, c:
            sa, sb = StubSession(name="a1"), StubSession(name="b1")
            assert (await a.claim("web", sa, pool=True)).granted
            assert (await b.claim("web", sb, pool=True)).granted
            route = await a.lookup("web")
            assert isinstance(route, PoolRoute) and opens(route, 3) == ["a1"] * 3  # its own member
            assert opens(await b.lookup("web"), 2) == ["b1"] * 2
            assert links["a"].asked == [] and links["b"].asked == []  # never asked Redis about others
            spread = await c.lookup("web")  # no member on c: both member nodes, in turn
            assert sorted(opens(spread, 4)) == ["node a", "node a", "node b", "node b"]
            assert sorted(links["c"].asked) == [("a", ("127.0.0.1", 7000)), ("b", ("127.0.0.1", 7001))]
            # the member on a leaves: a is taken off the record, and a's visitors go to b
            a.session_ended(sa)
            await wait_for_async(lambda: _not_member(r, "a"))
            assert members(await r.hgetall("test:tunnel:web")) == ["b"]
            assert opens(await a.lookup("web"), 2) == ["node b", "node b"]
            assert links["a"].asked == [("b", ("127.0.0.1", 7001))]
            await asyncio.sleep(0.3)  # c's cached spread expires
            assert opens(await c.lookup("web"), 2) == ["node b", "node b"]
            # the last member leaves: the id is free for anyone, a solo client included
            await b.release("web", sb)
            assert await r.exists("test:tunnel:web") == 0
            assert (await c.claim("web", StubSession(name="solo"))).granted
        await r.aclose()
    run(body)


async def _not_member(r: Any, node: str, prefix: str = "test:") -> bool:
    return f"m:{node}" not in await r.hgetall(f"{prefix}tunnel:web")


def test_dead_and_draining_member_nodes(run, redis):
    async def body():
        links = Links()
        a = RedisRegistry(cfg(redis.url, "a", 7001, node_ttl=0.6))
        await a.start()
        async with RedisRegistry(cfg(redis.url, "b", 7002)) as b, \
                RedisRegistry(cfg(redis.url, "c", 7003, route_cache_ttl=0.1), remote_route=links) as c:
            assert (await a.claim("web", StubSession(name="a1"), pool=True)).granted
            assert (await b.claim("web", StubSession(name="b1"), pool=True)).granted
            await b.drain()  # draining: used only when no member node is up
            assert opens(await c.lookup("web"), 2) == ["node a", "node a"]
            await a.close(release=False)  # a crash: its membership stays, in its old epoch
            async with RedisRegistry(cfg(redis.url, "a", 7001)):  # a restarts, with no member yet
                await asyncio.sleep(0.15)  # c's cached route expires
                assert opens(await c.lookup("web"), 2) == ["node b", "node b"]
            await wait_for_async(lambda: _node_gone(c, "a"))
            await asyncio.sleep(0.15)
            assert opens(await c.lookup("web"), 2) == ["node b", "node b"]
            # with no member node up, a solo claim takes the id over (the pool is leaving)
            claim = await c.claim("web", StubSession(name="solo"))
            assert claim.granted and c.stats.takeovers == 1
    run(body)


async def _node_gone(reg: RedisRegistry, node: str) -> bool:
    r = await raw(reg.config.redis_url)
    try:
        return not await r.exists(f"test:node:{node}")
    finally:
        await r.aclose()


# ---------------------------------------------------------------- two real nodes, a member on each

TOKEN = "pool-cluster-token"
SECRET = "pool-cluster-secret"


class Node(InProcessNode):
    def __init__(self, name: str, redis_url: str) -> None:
        super().__init__(name, redis_url, token=TOKEN, secret=SECRET, route_cache_ttl=0.5)


def test_pool_members_on_two_nodes_each_node_prefers_its_own_then_the_other(run):
    from test_pools import established, get, name_app, running, served_by, until

    async def body():
        with RedisServer() as redis:
            r = await raw(redis.url)
            a, b = Node("a", redis.url), Node("b", redis.url)
            (app_a, addr_a), (app_b, addr_b) = await name_app("app-a"), await name_app("app-b")
            try:
                await a.start()
                await b.start()
                member_a = ft.TunnelClient("%s:%d" % a.server.address, TOKEN, tunnel_id="web",
                                           config=ft.ClientConfig(pool=True, local_addr=addr_a))
                member_b = ft.TunnelClient("%s:%d" % b.server.address, TOKEN, tunnel_id="web",
                                           config=ft.ClientConfig(pool=True, local_addr=addr_b))
                async with running(member_a) as on_a, running(member_b):
                    await until(lambda: established(a.server, "web") and established(b.server, "web"))
                    record = await r.hgetall("ferrotunnel:tunnel:web")
                    assert record["pool"] == "1" and members(record) == ["a", "b"]
                    # a visitor at each node reaches its own node's member, never crossing a link
                    for node, app in ((a, "app-a"), (b, "app-b")):
                        for i in range(3):
                            assert served_by(await get(node.http.address, "web", f"/{i}")) == app
                    assert a.node.links_in.streams["joined"] == b.node.links_in.streams["joined"] == 0
                    # a client not in the pool is refused at either node
                    for node in (a, b):
                        solo = ft.TunnelClient("%s:%d" % node.server.address, TOKEN, tunnel_id="web",
                                               config=ft.ClientConfig(local_addr=addr_a))
                        with pytest.raises(ft.HandshakeError) as refused:
                            await solo.connect()
                        assert "pass --pool to join it" in str(refused.value)
                    # the member on a leaves: a's visitors cross to b's member
                    on_a[0].cancel()
                    await until(lambda: not established(a.server, "web"))
                    await wait_for_async(lambda: _not_member(r, "a", "ferrotunnel:"))
                    for i in range(3):
                        assert served_by(await get(a.http.address, "web", f"/x{i}")) == "app-b"
                    # a, without a member now, still refuses a client not in the pool (Redis says why)
                    solo = ft.TunnelClient("%s:%d" % a.server.address, TOKEN, tunnel_id="web",
                                           config=ft.ClientConfig(local_addr=addr_a))
                    with pytest.raises(ft.HandshakeError) as refused:
                        await solo.connect()
                    assert "pass --pool to join it" in str(refused.value) and "node b" in str(refused.value)
                    assert b.node.links_in.streams["joined"] == 3
                    assert served_by(await get(b.http.address, "web")) == "app-b"
            finally:
                for n in (a, b):
                    with contextlib.suppress(Exception):
                        await n.close()
                app_a.close()
                app_b.close()
                await r.aclose()
    run(body, timeout=120)


def test_pools_through_a_redis_outage_are_rejoined_and_a_solo_conflict_leaves_one_owner(run, redis):
    slow = dict(claim_refresh=10.0, claim_ttl=30.0)  # no claim refresh runs here: the recovery re-asserts

    async def body():
        r = await raw(redis.url)
        # a probes Redis seldom, so b (whose claims came first) re-asserts first after the outage
        async with RedisRegistry(cfg(redis.url, "a", 7001, redis_probe_interval=2.0, **slow)) as a, \
                RedisRegistry(cfg(redis.url, "b", 7002, **slow)) as b:
            pa1, pb1 = StubSession(name="a1"), StubSession(name="b1")
            solo_b, pool_b = StubSession("api", "solo-b"), StubSession("db", "pool-b")
            assert (await a.claim("web", pa1, pool=True)).granted and (await b.claim("web", pb1, pool=True)).granted
            assert (await b.claim("api", solo_b)).granted and (await b.claim("db", pool_b, pool=True)).granted
            redis.stop()
            pa2, pool_a, solo_a = StubSession(name="a2"), StubSession("api", "pool-a"), StubSession("db", "solo-a")
            assert (await a.claim("web", pa2, pool=True)).granted and a.outage  # joins locally
            assert (await a.claim("api", pool_a, pool=True)).granted  # b's ids: unknowable now
            assert (await a.claim("db", solo_a)).granted
            assert opens(a.lookup_local("web"), 2) == ["a1", "a2"]
            await wait_for(lambda: b.outage)  # b's liveness refresh finds Redis gone too
            redis.start()  # empty
            await wait_for(lambda: not a.outage and not b.outage)
            await wait_for_async(lambda: _members_are(r, "web", ["a", "b"]), timeout=3)
            await wait_for(lambda: pool_a.is_closed and solo_a.is_closed, timeout=3)
            # b re-asserted first: its solo client keeps "api", its pool keeps "db"
            assert (await r.hgetall("test:tunnel:api"))["node"] == "b" and not solo_b.is_closed
            assert "not in a pool on node b" in str(pool_a.closed_with)
            assert "one owner remains" in str(pool_a.closed_with)
            assert members(await r.hgetall("test:tunnel:db")) == ["b"] and not pool_b.is_closed
            assert "is held by node b" in str(solo_a.closed_with)
            assert a.members("api") == a.members("db") == [] and a.stats.conflicts == 2
            assert not any(s.is_closed for s in (pa1, pa2, pb1))
            assert opens(a.lookup_local("web"), 2) == ["a1", "a2"]
        await r.aclose()
    run(body)


async def _members_are(r: Any, tunnel_id: str, nodes: List[str]) -> bool:
    return members(await r.hgetall(f"test:tunnel:{tunnel_id}")) == nodes


def test_a_pool_member_with_access_rules_is_refused_on_a_cluster_node(run):
    """Members' rules are compared on one node only: on a cluster node a pool member with access
    rules is refused (a member without them elsewhere would serve the pool unguarded)."""
    async def body():
        with RedisServer() as redis:
            a = Node("a", redis.url)
            try:
                await a.start()
                for cfg in (ft.ClientConfig(pool=True, basic_auth="alice:s3cret"),
                            ft.ClientConfig(pool=True, allow=("10.0.0.0/8",))):
                    member = ft.TunnelClient("%s:%d" % a.server.address, TOKEN, tunnel_id="web", config=cfg)
                    with pytest.raises(ft.HandshakeError, match="cannot span cluster nodes"):
                        await member.connect()
                    await member.close()
                plain = ft.TunnelClient("%s:%d" % a.server.address, TOKEN, tunnel_id="web",
                                        config=ft.ClientConfig(pool=True))
                await plain.connect()  # without rules: a member as usual
                await plain.close()
            finally:
                await a.close()
    run(body, timeout=60)
