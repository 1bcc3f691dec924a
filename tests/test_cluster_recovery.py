"""A Redis that lost its records while the nodes kept their connections (restarted empty between two
commands, flushed): the nodes notice at their next liveness write and re-assert their claims; until
then a claim of an id Redis no longer knows is "handover pending" (never a second owner) and a
visitor of such an id gets 503, not 404. Also: the recovery after an outage is visible from the
moment the outage ends. A real redis-server; sessions are stand-ins. Bounds only catch hangs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ferrotunnel.cluster import RedisRegistry
from test_cluster_registry import StubSession, _route_to, cfg, raw, redis, wait_for  # noqa: F401 (fixture)

RECOVERING = "the cluster registry is recovering lost records (Redis restarted)"


def test_records_lost_without_an_outage_are_reasserted_and_never_get_a_second_owner(run, redis, caplog):
    caplog.set_level(logging.INFO, "ferrotunnel.cluster")
    # a writes its liveness key every 2 s: the test acts inside that gap. Claims are refreshed
    # rarely (refresh re-creates a missing claim of its own, which would hide the detection)
    slow = dict(node_ttl=10.0, node_refresh=2.0, claim_ttl=30.0, claim_refresh=10.0, recovery_window=5.0)

    async def body():
        r = await raw(redis.url)
        async with RedisRegistry(cfg(redis.url, "a", **slow), remote_route=_route_to) as a, \
                RedisRegistry(cfg(redis.url, "b", port=7001, **slow), remote_route=_route_to) as b:
            sa = StubSession("t1")
            assert (await a.claim("t1", sa)).granted
            assert (await b.lookup("t1")) is not None
            b.invalidate("t1")
            await r.flushall()  # what a restart between two commands leaves: nothing

            # before a has noticed: a visitor on b hears "recovering" (503), not "no such tunnel"
            assert await b.lookup("t1") is None
            assert b.why_missing("t1") == RECOVERING
            # another client claiming t1 on b is asked to retry: it is not a second owner
            claim = await b.claim("t1", StubSession("t1"))
            assert not claim.granted and claim.retry_after and "re-asserting" in claim.reason, claim
            # a claim record without its node key (a refresh came first) is not a dead node's either
            assert await a.refresh("t1", sa)
            claim = await b.claim("t1", StubSession("t1"))
            assert not claim.granted and claim.retry_after, claim

            # a's next liveness write finds its key gone: it re-asserts at once
            await wait_for(lambda: a.stats.reasserts == 1, timeout=10)
            await wait_for(lambda: not a._background, timeout=10)
            assert (await r.hgetall("test:tunnel:t1"))["session"] == sa.id.hex
            assert await r.exists("test:node:a") and not sa.is_closed
            assert "Redis lost its records" in caplog.text
            b.invalidate("t1")
            assert (await b.lookup("t1")) is not None
            claim = await b.claim("t1", StubSession("t1"))
            assert not claim.granted and not claim.retry_after  # held by a live node: TunnelIdTaken
            assert b.stats.takeovers == 0 and a.stats.lost == 0 and a.stats.conflicts == 0
        await r.aclose()

    run(body)


def test_a_fresh_cluster_is_not_taken_for_one_that_lost_its_records(run, redis):
    async def body():
        r = await raw(redis.url)
        async with RedisRegistry(cfg(redis.url, "a")) as a:
            assert (await a.claim("t1", StubSession("t1"))).granted  # no "pending" on a new cluster
            assert await a.lookup("nope") is None and a.why_missing("nope") is None  # a plain 404
            assert not await r.exists("test:recovering") and await r.get("test:cluster") == "a"
            assert a.stats.reasserts == 0
        await r.aclose()

    run(body)


def test_the_recovery_after_an_outage_shows_from_the_moment_the_outage_ends(run, redis):
    async def body():
        async with RedisRegistry(cfg(redis.url, "c")) as c:
            seen: Any = []
            write = c._write_node

            async def watched(**kw: Any) -> None:  # a probe's write: the outage is over while it runs
                if kw.get("probing"):
                    seen.append((c.outage, c.why_missing("nope")))
                await write(**kw)

            c._write_node = watched  # type: ignore[method-assign]
            redis.stop()
            await wait_for(lambda: c.outage)
            redis.start()
            await wait_for(lambda: seen)
            assert seen[0] == (False, "the cluster registry is recovering from an outage"), seen

    run(body)
