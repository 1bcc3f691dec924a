"""RedisRegistry against a real redis-server (tests/redis_server.py): claims, one winner between
two nodes, owner-only release, takeover from restarted / dead / draining nodes, "handover pending",
lookups through a remote_route callback, a password kept out of logs, and a Redis outage with its
reconciliation. Sessions are small stand-ins; Redis is real. Short TTLs; bounds only catch hangs."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from typing import Any, Awaitable, Callable, List, Optional, Tuple

import pytest

from ferrotunnel.cluster import RedisRegistry
from ferrotunnel.config import ClusterConfig
from ferrotunnel.errors import ConnectionLostError
from ferrotunnel.server.registry import LocalRoute, Route
from redis_server import RedisServer, redis_binary

PW = "s3cret-Redis-pw"


class StubSession:
    """What the registry reads of a Session: id, tunnel_id, is_closed, established, silent_for, close."""

    def __init__(self, tunnel_id: str) -> None:
        self.id = uuid.uuid4()
        self.tunnel_id = tunnel_id
        self.established = True
        self.silent = 0.0
        self.closed_with: Optional[BaseException] = None

    @property
    def is_closed(self) -> bool:
        return self.closed_with is not None

    def silent_for(self, now: float) -> float:
        return self.silent

    def close(self, exc: Optional[BaseException] = None, *, tell_peer: bool = False) -> None:
        self.closed_with = exc if exc is not None else ConnectionLostError("closed")
        self.told = tell_peer

    def __repr__(self) -> str:
        return f"<StubSession {self.tunnel_id}>"


class FakeRoute(Route):
    def __init__(self, node: str) -> None:
        self.node = node


def cfg(url: str, node: str, port: int = 7000, **kw: Any) -> ClusterConfig:
    # redis_timeout is generous: under CI's load a command that outlives a short bound counts as an
    # outage (the claim is then granted locally and Redis misses it); the test of a paused Redis
    # passes its own short one. A stopped Redis refuses at once, whatever the bound.
    base = dict(node_ttl=0.6, node_refresh=0.2, claim_ttl=1.0, claim_refresh=0.3, route_cache_ttl=0.5,
                redis_timeout=2.0, redis_probe_interval=0.2, handover_retry=0.5, key_prefix="test:")
    base.update(kw)
    return ClusterConfig(redis_url=url, node_id=node, node_advertise=("127.0.0.1", port), **base)  # type: ignore[arg-type]


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def raw(url: str) -> Any:
    import redis.asyncio as aioredis
    return aioredis.from_url(url, decode_responses=True)


@pytest.fixture
def redis() -> Any:
    with RedisServer() as r:
        yield r


def test_claim_refresh_release(run, redis):
    async def body():
        r = await raw(redis.url)
        async with RedisRegistry(cfg(redis.url, "a")) as a:
            s = StubSession("t1")
            claim = await a.claim("t1", s)
            assert claim.granted and claim.replaced is None
            held = await r.hgetall("test:tunnel:t1")
            assert held["node"] == "a" and held["epoch"] == a.epoch and held["session"] == s.id.hex
            assert 0 < await r.pttl("test:tunnel:t1") <= 1000
            node = await r.hgetall("test:node:a")
            assert node["epoch"] == a.epoch and node["state"] == "up" and node["addr"] == "127.0.0.1:7000"
            assert await a.refresh("t1", s)
            await asyncio.sleep(2.0)  # twice claim_ttl: alive only because the task refreshes it
            assert (await r.hgetall("test:tunnel:t1"))["session"] == s.id.hex
            await r.delete("test:tunnel:t1")  # gone (expired, flushed): the owner's refresh re-creates it
            await wait_for_async(lambda: r.exists("test:tunnel:t1"), timeout=2)
            ops = a.stats.ops
            other = StubSession("t1")
            assert not (await a.claim("t1", other, lambda h: False)).granted  # live local holder
            assert a.stats.ops == ops  # ...answered without Redis
            claim = await a.claim("t1", other, lambda h: True)  # a stale local holder is replaced
            assert claim.granted and claim.replaced is s
            assert (await r.hgetall("test:tunnel:t1"))["session"] == other.id.hex
            assert not await a.refresh("t1", s)
            await a.release("t1", other)
            assert await r.exists("test:tunnel:t1") == 0
            s3 = StubSession("t3")
            assert (await a.claim("t3", s3)).granted
            a.session_ended(s3)  # released in the background
            await wait_for(lambda: a.local_session("t3") is None)
            await asyncio.sleep(0.2)
            assert await r.exists("test:tunnel:t3") == 0
            assert (await a.claim("t4", StubSession("t4"))).granted
        assert await r.exists("test:tunnel:t4", "test:node:a") == 0  # close() released both
        assert a.stats.ops > 0 and a.stats.errors == 0 and a.stats.op_seconds > 0
        await r.aclose()
    run(body)


def test_two_nodes_claiming_one_id_at_once_one_wins(run, redis):
    async def body():
        r = await raw(redis.url)
        async with RedisRegistry(cfg(redis.url, "a")) as a, RedisRegistry(cfg(redis.url, "b")) as b:
            for i in range(20):
                tid = f"race-{i}-{uuid.uuid4().hex[:6]}"
                sa, sb = StubSession(tid), StubSession(tid)
                ca, cb = await asyncio.gather(a.claim(tid, sa), b.claim(tid, sb))
                assert [ca.granted, cb.granted].count(True) == 1, (ca, cb)
                loser = cb if ca.granted else ca
                assert loser.retry_after is None and loser.reason == f"held by node {'a' if ca.granted else 'b'}"
                winner = sa if ca.granted else sb
                assert (await r.hgetall(f"test:tunnel:{tid}"))["session"] == winner.id.hex
            for i in range(5):  # two clients on one node: the same
                tid = f"local-{i}"
                s1, s2 = StubSession(tid), StubSession(tid)
                c1, c2 = await asyncio.gather(a.claim(tid, s1), a.claim(tid, s2))
                assert [c1.granted, c2.granted] == [True, False]
                assert a.local_session(tid) is s1 and (await r.hgetall(f"test:tunnel:{tid}"))["session"] == s1.id.hex
        await r.aclose()
    run(body)


def test_only_the_owner_releases(run, redis):
    async def body():
        r = await raw(redis.url)
        slow = dict(claim_refresh=2.0, claim_ttl=5.0)  # no refresh notices the takeover below
        async with RedisRegistry(cfg(redis.url, "a", **slow)) as a, RedisRegistry(cfg(redis.url, "b", **slow)) as b:
            s = StubSession("t1")
            assert (await a.claim("t1", s)).granted
            stranger = StubSession("t1")
            await b.release("t1", stranger)
            b.session_ended(stranger)
            await a.release("t1", StubSession("t1"))  # this node, another session
            await asyncio.sleep(0.1)
            assert (await r.hgetall("test:tunnel:t1"))["session"] == s.id.hex
            assert not (await b.claim("t1", StubSession("t1"))).granted
            await a.drain()
            sb = StubSession("t1")
            assert (await b.claim("t1", sb)).granted  # taken over; a does not know yet
            assert a.local_session("t1") is s
            await a.release("t1", s)  # a's old claim: compare-and-delete deletes nothing of b's
            assert (await r.hgetall("test:tunnel:t1"))["session"] == sb.id.hex
        await r.aclose()
    run(body)


def test_a_restarted_node_takes_its_predecessors_claims_over(run, redis):
    async def body():
        r = await raw(redis.url)
        old = RedisRegistry(cfg(redis.url, "a", claim_ttl=30, node_ttl=30))
        await old.start()
        assert (await old.claim("t1", StubSession("t1"))).granted
        await old.close(release=False)  # a crash: its claim and liveness key stay
        async with RedisRegistry(cfg(redis.url, "a", claim_ttl=30, node_ttl=30)) as new:
            assert new.epoch != old.epoch
            # until the client comes back, a visitor of the restarted node hears why (a 503), not a
            # 404 for a tunnel that exists
            assert await new.lookup("t1") is None
            assert new.why_missing("t1") == "its node (a) has restarted; the tunnel reconnects shortly"
            s = StubSession("t1")
            claim = await new.claim("t1", s)
            assert claim.granted and new.stats.takeovers == 1
            assert (await r.hgetall("test:tunnel:t1"))["epoch"] == new.epoch
        await r.aclose()
    run(body)


def test_a_dead_nodes_claim_is_pending_then_taken_over(run, redis):
    async def body():
        a = RedisRegistry(cfg(redis.url, "a", node_ttl=1.0, claim_ttl=10))
        await a.start()
        assert (await a.claim("t1", StubSession("t1"))).granted
        await a.close(release=False)  # stops refreshing; its liveness key expires within node_ttl
        stopped = time.monotonic()
        async with RedisRegistry(cfg(redis.url, "b", node_ttl=1.0, claim_ttl=10)) as b:
            await asyncio.sleep(0.45)  # > 2 x node_refresh, < node_ttl
            pending = await b.claim("t1", StubSession("t1"))
            assert not pending.granted and pending.retry_after == 0.5
            assert pending.reason.startswith("handover pending: node a") and "silent" in pending.reason
            s = StubSession("t1")
            while not (claim := await b.claim("t1", s)).granted:
                assert claim.retry_after is not None and time.monotonic() - stopped < 5
                await asyncio.sleep(0.05)
            assert time.monotonic() - stopped < 1.6 and b.stats.takeovers == 1
    run(body)


def test_draining_node_is_taken_over_at_once_and_its_session_finishes(run, redis):
    async def body():
        async with RedisRegistry(cfg(redis.url, "a")) as a, RedisRegistry(cfg(redis.url, "b")) as b:
            sa = StubSession("t1")
            assert (await a.claim("t1", sa)).granted
            assert not (await b.claim("t1", StubSession("t1"))).granted
            await a.drain()
            assert a.draining
            assert (await b.claim("t1", StubSession("t1"))).granted and b.stats.takeovers == 1
            # a's next refresh finds the claim gone: the old session is handed over, not cut (its
            # streams in flight finish; its client closes it), and a stops refreshing it
            await wait_for(lambda: a.stats.handovers == 1)
            assert not sa.is_closed and a.stats.lost == 0
            assert a.local_session("t1") is sa  # streams still reaching a (stale routes) are served
            await asyncio.sleep(2.5 * a.config.claim_refresh)
            assert a.stats.handovers == 1 and not sa.is_closed
            assert (await b.lookup("t1")) is not None  # b's claim stands: a never took it back
    run(body)


def test_a_node_that_is_not_draining_closes_a_session_whose_id_was_taken(run, redis):
    async def body():
        # a refreshes only when told to here, so nothing re-creates the claim in between
        async with RedisRegistry(cfg(redis.url, "a", claim_refresh=60, claim_ttl=120)) as a, \
                RedisRegistry(cfg(redis.url, "b")) as b:
            sa = StubSession("t1")
            assert (await a.claim("t1", sa)).granted
            r = await raw(redis.url)
            await r.delete("test:tunnel:t1")  # lost in Redis (an outage, a flush)
            await r.aclose()
            assert (await b.claim("t1", StubSession("t1"))).granted
            assert not await a.refresh("t1", sa)  # a's refresh finds another holder
            assert isinstance(sa.closed_with, ConnectionLostError)
            assert str(sa.closed_with) == "tunnel id t1 was taken over by node b"
            assert a.local_session("t1") is None and a.stats.lost == 1 and a.stats.handovers == 0
    run(body)


def test_a_stale_holder_means_handover_pending(run, redis):
    async def body():
        stale = lambda s: s.silent > 1  # noqa: E731
        async with RedisRegistry(cfg(redis.url, "a", claim_ttl=3)) as a, RedisRegistry(cfg(redis.url, "b")) as b:
            sa = StubSession("t1")
            assert (await a.claim("t1", sa, stale)).granted
            await asyncio.sleep(0.8)  # refreshed all along: a live holder
            held = await b.claim("t1", StubSession("t1"))
            assert not held.granted and held.retry_after is None and held.reason == "held by node a"
            sa.silent = 100.0  # a stops refreshing its claim (its node stays alive)
            await asyncio.sleep(0.8)  # > 2 x claim_refresh
            pending = await b.claim("t1", StubSession("t1"))
            assert not pending.granted and pending.retry_after == 0.5
            assert "not refreshed" in pending.reason and "node a" in pending.reason
            assert not sa.is_closed and a.local_session("t1") is sa
    run(body)


def test_lookup_local_remote_cached_and_invalidated(run, redis):
    async def body():
        calls: List[Tuple[str, Tuple[str, int], str]] = []

        async def remote_route(node: str, address: Tuple[str, int], tunnel_id: str) -> Optional[Route]:
            calls.append((node, address, tunnel_id))
            await asyncio.sleep(0.01)
            return FakeRoute(node)

        a = RedisRegistry(cfg(redis.url, "a", port=0))
        a.advertise = ("::1", 7001)  # known once the link listener is bound
        async with a, RedisRegistry(cfg(redis.url, "b", port=7002), remote_route=remote_route) as b:
            sa = StubSession("t1")
            assert (await a.claim("t1", sa)).granted
            local = await a.lookup("t1")
            assert isinstance(local, LocalRoute) and local.session is sa and a.lookup_local("t1") is local
            routes = await asyncio.gather(*(b.lookup("t1") for _ in range(10)))  # one question for all
            assert all(isinstance(x, FakeRoute) and x.node == "a" for x in routes)
            assert calls == [("a", ("::1", 7001), "t1")]
            assert isinstance(await b.lookup("t1"), FakeRoute) and len(calls) == 1  # cached
            b.invalidate("t1")
            assert isinstance(await b.lookup("t1"), FakeRoute) and len(calls) == 2
            quiet = dict(node_ttl=30.0, node_refresh=10.0, claim_ttl=30.0, claim_refresh=10.0)  # no background ops
            for name, miss, asks in (("c", 0.0, 2), ("d", 5.0, 1)):
                async with RedisRegistry(cfg(redis.url, name, port=7003, miss_cache_ttl=miss, **quiet)) as r:
                    await asyncio.sleep(0.1)  # the first rounds of the background loops
                    ops = r.stats.ops
                    assert await r.lookup("nope") is None and await r.lookup("nope") is None
                    assert r.stats.ops == ops + asks  # "none" remembered only with a miss_cache_ttl
            sn = StubSession("nope")  # and without one, a tunnel that just came is seen at once
            assert await b.lookup("nope") is None
            assert (await a.claim("nope", sn)).granted
            assert isinstance(await b.lookup("nope"), FakeRoute)
            await a.release("nope", sn)
            b.invalidate("nope")
            calls.pop()
            await a.release("t1", sa)
            assert isinstance(await b.lookup("t1"), FakeRoute)  # still the cached answer...
            await asyncio.sleep(0.6)
            assert await b.lookup("t1") is None and len(calls) == 2  # ...corrected after route_cache_ttl
            sb = StubSession("t2")
            assert (await b.claim("t2", sb)).granted
            assert isinstance(await b.lookup("t2"), LocalRoute) and await a.lookup("t2") is None  # a: no callback
    run(body)


def test_password_works_and_stays_out_of_logs_and_reprs(run, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wr0ng-Redis-pw"

    async def body():
        with RedisServer(password=PW) as r:
            assert PW in r.url
            async with RedisRegistry(cfg(r.url, "a")) as a:
                assert (await a.claim("t1", StubSession("t1"))).granted and not a.outage
                texts = [repr(a), repr(a.config), str(a.config)]
                bad_url = r.url.replace(PW, wrong)
                async with RedisRegistry(cfg(bad_url, "b")) as b:
                    assert b.outage  # refused: logged as an outage
                    assert (await b.claim("t2", StubSession("t2"))).granted  # served locally
                    texts += [repr(b), repr(b.config)]
                r.stop()
                await wait_for(lambda: a.outage)
                r.start()
                await wait_for(lambda: not a.outage)
        texts += [rec.getMessage() for rec in caplog.records]
        assert any("unreachable" in t and ":***@127.0.0.1" in t for t in texts)
        assert any("is back" in t for t in texts)
        leaks = [t for t in texts if PW in t or wrong in t]
        assert leaks == []
    run(body)


def test_redis_outage_local_service_then_reconciliation(run, redis, caplog):
    caplog.set_level(logging.INFO, logger="ferrotunnel.cluster")
    slow = dict(claim_refresh=10.0, claim_ttl=30.0)  # no claim refresh runs in this test: recovery re-asserts

    async def body():
        r = await raw(redis.url)
        async with RedisRegistry(cfg(redis.url, "a", **slow), remote_route=_route_to) as a, \
                RedisRegistry(cfg(redis.url, "b", **slow), remote_route=_route_to) as b:
            sa1, sb9 = StubSession("t1"), StubSession("t9")
            assert (await a.claim("t1", sa1)).granted and (await b.claim("t9", sb9)).granted
            redis.stop()
            sa2, sb1 = StubSession("t2"), StubSession("t1")
            t0 = time.monotonic()
            assert (await a.claim("t2", sa2)).granted and a.outage  # granted locally
            assert (await b.claim("t1", sb1)).granted and b.outage  # a duplicate of a's t1, unknowable now
            assert time.monotonic() - t0 < 2.0
            assert await a.lookup("t9") is None  # remote: not while Redis is away
            assert isinstance(await a.lookup("t1"), LocalRoute)  # local: served
            await asyncio.sleep(1.5)  # past node_ttl: nothing local is dropped
            assert not any(s.is_closed for s in (sa1, sa2, sb1, sb9))
            assert a.local_session("t2") is sa2 and b.local_session("t1") is sb1
            redis.start()  # empty
            await wait_for(lambda: not a.outage and not b.outage)
            back = time.monotonic()
            await wait_for(lambda: sa1.is_closed or sb1.is_closed, timeout=1.0)
            keys = ("test:tunnel:t2", "test:tunnel:t9", "test:node:a", "test:node:b")
            await wait_for_async(lambda: _all_exist(r, *keys), timeout=1.0)
            assert time.monotonic() - back < 1.0
            await asyncio.sleep(0.5)  # the answer holds
            assert [sa1.is_closed, sb1.is_closed].count(True) == 1
            survivor, closed = ("a", sb1) if sb1.is_closed else ("b", sa1)
            assert (await r.hgetall("test:tunnel:t1"))["node"] == survivor
            assert f"is held by node {survivor}" in str(closed.closed_with)
            assert "one owner remains" in str(closed.closed_with) and closed.told  # its client is told why
            assert a.stats.conflicts + b.stats.conflicts == 1
            assert (await r.hgetall("test:tunnel:t2"))["node"] == "a"
            assert (await r.hgetall("test:tunnel:t9"))["node"] == "b"
            assert (await r.hgetall("test:node:a"))["epoch"] == a.epoch
            assert not sa2.is_closed and not sb9.is_closed
            assert isinstance(await a.lookup("t9"), FakeRoute)
        msgs = [rec.getMessage() for rec in caplog.records]
        down = [m for m in msgs if "serving local tunnels only" in m]
        back = [m for m in msgs if "is back" in m]
        assert len(down) == 2 and len(back) == 2, msgs  # once each, per node
        assert all("unreachable" in m for m in down) and all("re-asserting" in m for m in back)
        assert a.stats.errors > 0
        await r.aclose()
    run(body)


def test_a_paused_redis_times_out_and_ended_sessions_are_released_after(run, redis, caplog):
    async def body():
        r = await raw(redis.url)
        import redis.asyncio as aioredis
        patient = aioredis.from_url(redis.url, socket_timeout=10)  # only the registry's own bound applies
        async with RedisRegistry(cfg(redis.url, "a", claim_ttl=30, redis_timeout=0.3), client=patient) as a:
            s1, s2 = StubSession("t1"), StubSession("t2")
            assert (await a.claim("t1", s1)).granted and (await a.claim("t2", s2)).granted
            await r.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # every command waits: timeouts
            t0 = time.monotonic()
            assert (await a.claim("t3", StubSession("t3"))).granted and a.outage
            assert time.monotonic() - t0 < 1.0  # redis_timeout (0.3 s), not the pause
            a.session_ended(s1)  # while Redis is away: released when it is back
            assert a.local_session("t1") is None
            s2.silent = 100.0  # a new client for t2 replaces the stale session here, unknown to Redis
            s2new = StubSession("t2")
            assert (await a.claim("t2", s2new, lambda s: s.silent > 1)).replaced is s2
            await wait_for(lambda: not a.outage)
            await wait_for_async(lambda: _gone(r, "test:tunnel:t1"))
            await wait_for_async(lambda: _session_is(r, "test:tunnel:t2", s2new))  # this node's own older claim
            await asyncio.sleep(0.7)  # refresh rounds: the new session keeps it
            assert not s2new.is_closed and a.local_session("t2") is s2new
            assert (await r.hgetall("test:tunnel:t2"))["session"] == s2new.id.hex
            assert (await r.hgetall("test:tunnel:t3"))["node"] == "a"
        down = [rec.getMessage() for rec in caplog.records if "unreachable" in rec.getMessage()]
        assert len(down) == 1 and "no answer within 0.3 s" in down[0], down
        await r.aclose()
        await patient.aclose()
    run(body)


async def _session_is(r: Any, key: str, session: StubSession) -> bool:
    return (await r.hget(key, "session")) == session.id.hex


async def _gone(r: Any, key: str) -> bool:
    return await r.exists(key) == 0


async def _all_exist(r: Any, *keys: str) -> bool:
    return await r.exists(*keys) == len(keys)


async def _route_to(node: str, address: Tuple[str, int], tunnel_id: str) -> Optional[Route]:
    return FakeRoute(node)


def test_redis_down_at_start(run, redis):
    async def body():
        redis.stop()
        async with RedisRegistry(cfg(redis.url, "a")) as a:
            assert a.outage
            s = StubSession("t1")
            assert (await a.claim("t1", s)).granted
            redis.start()
            await wait_for(lambda: not a.outage)
            r = await raw(redis.url)
            await wait_for_async(lambda: r.exists("test:tunnel:t1"))
            assert (await r.hgetall("test:node:a"))["state"] == "up"
            await r.aclose()
    run(body)


async def wait_for_async(pred: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_missing_redis_py_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"pip install 'ferrotunnel\[cluster\]'"):
        RedisRegistry(cfg("redis://127.0.0.1:1/0", "a"))


def test_the_helper_restarts_redis_empty_on_the_same_port():
    assert redis_binary().endswith("redis-server")
    with RedisServer(password=PW) as r:
        port, pid = r.port, r.proc.pid
        assert r.ping() and r.url == f"redis://:{PW}@127.0.0.1:{port}/0"
        import redis as sync_redis
        sync_redis.Redis.from_url(r.url).set("k", "v")
        r.stop()
        assert not r.ping() and r.proc is None
        r.start()
        assert r.port == port and r.proc.pid != pid and r.ping()
        assert sync_redis.Redis.from_url(r.url).get("k") is None  # back empty


def test_why_missing_names_a_dead_node_an_unreachable_one_and_a_recovering_registry(run, redis):
    async def unreachable(node: str, address: Tuple[str, int], tunnel_id: str) -> Optional[Route]:
        return None  # the link could not be dialled

    async def body():
        r = await raw(redis.url)
        async with RedisRegistry(cfg(redis.url, "b"), remote_route=_route_to) as b, \
                RedisRegistry(cfg(redis.url, "c"), remote_route=unreachable) as c:
            a = RedisRegistry(cfg(redis.url, "a"))
            await a.start()
            assert (await a.claim("t1", StubSession("t1"))).granted
            assert await b.lookup("nope") is None and b.why_missing("nope") is None  # no such tunnel: 404
            assert await c.lookup("t1") is None
            assert c.why_missing("t1") == "its node (a) cannot be reached from this node"
            await a.close(release=False)  # a dies: its liveness key expires, its claim stays a while
            await wait_for_async(lambda: _none_exist(r, "test:node:a"))
            assert await b.lookup("t1") is None
            assert b.why_missing("t1") == "its node (a) has stopped; the tunnel reconnects to another node shortly"
            assert (await b.claim("t1", StubSession("t1"))).granted  # the client came back on b
            assert isinstance(await b.lookup("t1"), LocalRoute) and b.why_missing("t1") is None

            redis.stop()
            await wait_for(lambda: c.outage)
            assert c.why_missing("nope") == "the cluster registry is unreachable"
            redis.start()  # empty: b has yet to re-assert t1 when c is back
            await wait_for(lambda: not c.outage)
            assert c.why_missing("nope") == "the cluster registry is recovering from an outage"
            await asyncio.sleep(c.config.redis_probe_interval + c.config.node_refresh + 0.1)
            assert c.why_missing("nope") is None  # every node re-asserted by now: a plain 404
        await r.aclose()

    run(body)


async def _none_exist(r: Any, *keys: str) -> bool:
    return await r.exists(*keys) == 0


def test_a_lookup_racing_a_claim_on_the_same_node_finds_the_new_session(run, redis):
    """Redis already names this node while the claim has yet to register the session locally: the
    lookup waits for the claim (its gate) instead of answering "no session"."""
    async def body():
        async with RedisRegistry(cfg(redis.url, "c")) as c:
            s = StubSession("t1")
            gate = c._gate("t1")
            async with gate:  # what claim() holds between its Redis write and its local grant
                await c._call(c._script("claim", *c._claim_call(s, True)))
                lookup = asyncio.ensure_future(c.lookup("t1"))
                await asyncio.sleep(0.2)
                assert not lookup.done()  # it waits for the claim
                c._local.claim_nowait("t1", s, lambda old: True)
            route = await asyncio.wait_for(lookup, 5)
            assert isinstance(route, LocalRoute)
            c._local.session_ended(s)  # the session ends: nothing cached keeps routing to it
            assert c.lookup_local("t1") is None
    run(body)


def test_a_redis_that_answers_with_errors_grants_no_claim_and_is_said_once(run, redis, caplog):
    """Redis reachable but refusing writes (a demoted primary: READONLY; the same for maxmemory
    with noeviction): no outage (which grants every id locally on every node, and flapped: each
    probe's PING answered), but claims refused with a retry hint; one line when it starts, one
    when writes go through again, and then the claim is granted."""
    caplog.set_level(logging.INFO, logger="ferrotunnel.cluster")

    async def body():
        r = await raw(redis.url)
        try:
            # (node keys outlive the episode here: one that expired while writes were refused would
            # make its node look dead afterwards, until its next liveness write; see the note)
            slow = dict(node_ttl=5.0, claim_ttl=10.0)
            async with RedisRegistry(cfg(redis.url, "a", **slow)) as a, RedisRegistry(cfg(redis.url, "b", **slow)) as b:
                await r.execute_command("REPLICAOF", "127.0.0.1", "1")  # read-only from now
                sa, sb = StubSession("dup"), StubSession("dup")
                ca, cb = await a.claim("dup", sa), await b.claim("dup", sb)
                assert not ca.granted and not cb.granted and ca.retry_after and cb.retry_after
                assert "refuses" in ca.reason and not a.outage and not b.outage
                assert a.local_session("dup") is None and b.local_session("dup") is None
                await asyncio.sleep(1.0)  # liveness writes keep failing: still no outage, no more lines
                assert not a.outage and not b.outage
                await r.execute_command("REPLICAOF", "NO", "ONE")
                async with asyncio.timeout(10):
                    while True:
                        ca = await a.claim("dup", sa)
                        if ca.granted:
                            break
                        await asyncio.sleep(0.1)
                assert not (await b.claim("dup", sb)).granted  # one owner
                await asyncio.sleep(0.5)  # b's liveness write goes through too
        finally:
            await r.execute_command("REPLICAOF", "NO", "ONE")
            await r.aclose()

    run(body)
    lines = [m.getMessage() for m in caplog.records]
    refused = sum("refuses" in m for m in lines)
    accepted = sum(m.endswith("accepts writes again") and "refuses" not in m for m in lines)
    # once per node, and a few more while REPLICAOF NO ONE takes effect: not one per operation (the
    # outage handling this replaces logged about 18 lines a second, flapping with each probe)
    assert 2 <= refused <= 8 and 1 <= accepted <= refused, (refused, accepted, lines)
    assert not any("unreachable" in m or "is back" in m for m in lines), lines


def test_a_claim_released_while_redis_refused_writes_is_released_when_it_accepts_them(run, redis, caplog):
    """A session that ends while Redis refuses writes cannot release its claim then; once a
    liveness write goes through again, the node releases it (before, only the recovery from a
    real outage did, so the claim stayed until it expired and the id looked held meanwhile)."""
    caplog.set_level(logging.INFO, logger="ferrotunnel.cluster")

    async def body():
        r = await raw(redis.url)
        try:
            async with RedisRegistry(cfg(redis.url, "a", node_ttl=5.0, claim_ttl=30.0)) as a:
                sa = StubSession("gone")
                assert (await a.claim("gone", sa)).granted
                assert await r.exists("test:tunnel:gone")
                await r.execute_command("REPLICAOF", "127.0.0.1", "1")  # read-only from now
                a.session_ended(sa)  # its release is refused
                await asyncio.sleep(0.5)
                assert await r.exists("test:tunnel:gone")
                await r.execute_command("REPLICAOF", "NO", "ONE")
                async with asyncio.timeout(10):  # released within a liveness refresh or two, not claim_ttl
                    while await r.exists("test:tunnel:gone"):
                        await asyncio.sleep(0.05)
        finally:
            await r.execute_command("REPLICAOF", "NO", "ONE")
            await r.aclose()

    run(body)


def test_a_redis_that_may_evict_keys_is_warned_about_once_at_start(run, caplog):
    """maxmemory with an evicting policy can drop claims and node keys (the nodes would take that
    for dead nodes or an emptied Redis): the node says so at start, naming the fix; with
    noeviction, or no maxmemory, it says nothing."""
    import redis.asyncio as aioredis

    async def body():
        with RedisServer() as redis:
            admin = aioredis.from_url(redis.url)
            try:
                caplog.set_level(logging.WARNING, logger="ferrotunnel.cluster")
                async with RedisRegistry(cfg(redis.url, "a")):  # the default: maxmemory 0
                    pass
                await admin.config_set("maxmemory", "100mb")
                async with RedisRegistry(cfg(redis.url, "b")):  # noeviction (the default policy)
                    pass
                assert not [r for r in caplog.records if "may evict" in r.getMessage()]
                await admin.config_set("maxmemory-policy", "volatile-lru")  # claims have TTLs: evictable too
                async with RedisRegistry(cfg(redis.url, "c")):
                    pass
                said = [r.getMessage() for r in caplog.records if "may evict" in r.getMessage()]
                assert len(said) == 1 and "maxmemory-policy volatile-lru" in said[0] and "noeviction" in said[0], said
            finally:
                await admin.aclose()

    run(body, timeout=60)
