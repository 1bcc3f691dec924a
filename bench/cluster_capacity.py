"""Capacity of cluster mode: what each tunnel costs Redis and a node's registry (docs/cluster.md).

    python bench/cluster_capacity.py [--tunnels 100000] [--quick] [--concurrency 64] [--json FILE]

One real ``redis-server`` (tests/redis_server.py) and the project's real ``RedisRegistry`` with the
default ``ClusterConfig`` (node_refresh 1 s, claim_refresh 3 s, claim_ttl 15 s, route_cache_ttl 2 s),
in this process under uvloop as the CLI runs it. Sessions are stand-ins (what the registry reads of
a Session); Redis, the Lua scripts, the pipelines and the registry's own refresh loop are real.

1. Claims: node ``a`` claims N tunnel ids, the first half one at a time, the second half with K
   concurrent claimers: claims/s, p50/p99 latency. Node a's refresh loop runs meanwhile.
2. Memory: Redis ``used_memory`` after minus before the claims, over N; ``MEMORY USAGE`` of one key.
3. Steady state: three refresh periods of node a (each: ``claim_refresh`` of sleep, then one pass
   refreshing every claim, one script call per 500 claims), from the end of one pass to the end of the third
   after it: Redis CPU (``INFO cpu``), ``evalsha`` calls and usec (``INFO commandstats``), this
   process's CPU (``time.process_time``), each pass's duration.
4. Shutdown: ``close()`` of node a (releases its claims, one script call per 500); claim keys left behind.
5. Lookups: node ``b`` (remote_route: a stub) looks up the ids of a node ``c`` that holds up to
   20,000 (its passes stay short): cold (distinct ids, K at once, then one at a time) and hot (one
   id repeated: served from the route cache).
Throughout, Redis keyspace notifications count claim keys that expired (a live claim not refreshed
within ``claim_ttl``: a registry that does not keep up). Then a model extrapolated from the figures.

``--quick``: 10,000 tunnels. Redis is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the real redis-server helper
import redis.asyncio as aioredis  # noqa: E402
import uvloop  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from ferrotunnel.cluster import RedisRegistry  # noqa: E402
from ferrotunnel.config import ClusterConfig  # noqa: E402
from ferrotunnel.server.registry import Route  # noqa: E402

CLAIM_KEY = ClusterConfig.key_prefix + "tunnel:"  # the default prefix, "ferrotunnel:"


class StubSession:
    """What the registry reads of a Session."""

    multiplexer = ()  # len() of it is logged when a draining node's tunnel moves

    def __init__(self, tunnel_id: str) -> None:
        self.id, self.tunnel_id = uuid.uuid4(), tunnel_id
        self.established, self.is_closed = True, False

    def silent_for(self, now: float) -> float:
        return 0.0

    def close(self, exc: Optional[BaseException] = None, *, tell_peer: bool = False) -> None:
        self.is_closed = True


async def remote_route(node_id: str, addr: Any, tunnel_id: str) -> Route:
    return Route()  # a route over the node link to node_id, in a real node


def config(url: str, node: str, port: int) -> ClusterConfig:
    return ClusterConfig(redis_url=url, node_id=node, node_advertise=("127.0.0.1", port))


async def claim_keys(r: Any) -> int:
    """Node a's claim keys in Redis (its ids start with "t")."""
    return len([key async for key in r.scan_iter(CLAIM_KEY + "t*", 10000)])


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def snapshot(r: Any) -> Dict[str, float]:
    cpu, stats = await r.info("cpu"), await r.info("commandstats")
    ev = stats.get("cmdstat_evalsha", {})
    return {"cpu": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), "t": time.perf_counter(),
            "evalsha": ev.get("calls", 0), "evalsha_usec": ev.get("usec", 0),
            "calls": sum(v["calls"] for v in stats.values()), "proc_cpu": time.process_time()}


class Watch:
    """Node a's refresh passes (wraps what its loop calls, ``_refresh_all``) and expired claim keys."""

    def __init__(self, reg: RedisRegistry) -> None:
        self.t0 = time.perf_counter()
        self.passes: List[Dict[str, float]] = []
        self.expired: List[Any] = []  # (seconds since start, key)
        self.ended, self.subscribed = asyncio.Event(), asyncio.Event()
        inner = reg._refresh_all

        async def timed() -> None:
            t0, c0, claims = time.perf_counter(), time.process_time(), len(reg.local_sessions())
            try:
                await inner()
            finally:
                self.passes.append({"at": t0 - self.t0, "seconds": time.perf_counter() - t0,
                                    "cpu": time.process_time() - c0, "claims": claims})
                self.ended.set()

        reg._refresh_all = timed  # type: ignore[method-assign]

    async def watch_expiry(self, r: Any) -> None:
        await r.config_set("notify-keyspace-events", "Ex")
        async with r.pubsub() as ps:
            await ps.subscribe("__keyevent@0__:expired")
            self.subscribed.set()
            async for msg in ps.listen():
                if msg["type"] == "message" and msg["data"].startswith(CLAIM_KEY.encode() + b"t"):
                    self.expired.append((time.perf_counter() - self.t0, msg["data"]))

    async def next_pass_end(self) -> None:
        self.ended.clear()
        await self.ended.wait()

    def now(self) -> float:
        return time.perf_counter() - self.t0


async def run_ops(op: Any, items: List[str], concurrency: int) -> Dict[str, Any]:
    """``op(item)`` for every item by ``concurrency`` workers: rate, latency."""
    latencies: List[float] = []
    it = iter(items)

    async def worker() -> None:
        for item in it:
            t0 = time.perf_counter()
            await op(item)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"count": len(items), "concurrency": concurrency, "seconds": wall, "per_s": len(items) / wall,
            "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99)}


async def claims(r: Any, a: RedisRegistry, ids: List[str], k: int, out: Dict[str, Any]) -> None:
    """1 + 2: node a claims every id, half one at a time, half k at once; Redis memory per claim."""
    async def claim(tid: str) -> None:
        granted = (await a.claim(tid, StubSession(tid))).granted  # type: ignore[arg-type]
        if not granted:
            raise RuntimeError(f"claim of {tid} refused")

    await r.memory_purge()
    mem0 = (await r.info("memory"))["used_memory"]
    s0 = await snapshot(r)
    out["claim_sequential"] = await run_ops(claim, ids[: len(ids) // 2], 1)
    out["claim_concurrent"] = await run_ops(claim, ids[len(ids) // 2:], k)
    s1 = await snapshot(r)
    out["claim_cpu_us"] = {"redis": 1e6 * (s1["cpu"] - s0["cpu"]) / len(ids),
                           "node": 1e6 * (s1["proc_cpu"] - s0["proc_cpu"]) / len(ids)}
    await r.memory_purge()
    mem1, keys = (await r.info("memory"))["used_memory"], await claim_keys(r)  # keys: some may have expired
    out["memory"] = {"used_before": mem0, "used_after": mem1, "bytes_per_claim": (mem1 - mem0) / max(1, keys),
                     "memory_usage_one_key": await r.memory_usage(CLAIM_KEY + ids[-1], samples=0),
                     "claim_keys_after_claims": keys}


async def steady(r: Any, a: RedisRegistry, watch: Watch, n: int) -> Dict[str, Any]:
    """3: from the end of a pass (every claim made) to the end of the third after it."""
    await watch.next_pass_end()
    s0, ops0, t0 = await snapshot(r), a.stats.ops, watch.now()
    for _ in range(3):
        await watch.next_pass_end()
    s1 = await snapshot(r)
    window, evalsha = s1["t"] - s0["t"], s1["evalsha"] - s0["evalsha"]
    passes = [p for p in watch.passes if p["at"] >= t0]
    return {"from_s": t0, "window_s": window, "period_s": window / len(passes),
            "pass_s": [round(p["seconds"], 3) for p in passes], "pass_cpu_s": [round(p["cpu"], 3) for p in passes],
            "node_cpu_us_per_refresh": 1e6 * statistics.mean(p["cpu"] / p["claims"] for p in passes),
            "evalsha_per_s": evalsha / window, "refreshes_per_s": sum(p["claims"] for p in passes) / window,
            "refreshes_per_tunnel_per_s": sum(p["claims"] for p in passes) / window / n,
            "evalsha_usec_per_call": (s1["evalsha_usec"] - s0["evalsha_usec"]) / max(1, evalsha),
            "redis_commands_per_s": (s1["calls"] - s0["calls"]) / window,
            "node_round_trips_per_s": (a.stats.ops - ops0) / window,
            "redis_cpu_s_per_s": (s1["cpu"] - s0["cpu"]) / window,
            "redis_cpu_s_per_s_per_100k": (s1["cpu"] - s0["cpu"]) / window * 100000 / n,
            "node_cpu_s_per_s": (s1["proc_cpu"] - s0["proc_cpu"]) / window,
            "claim_keys_at_end": await claim_keys(r),
            "claim_refresh_s": a.config.claim_refresh, "claim_ttl_s": a.config.claim_ttl}


async def lookups(b: RedisRegistry, c: RedisRegistry, n: int, k: int, out: Dict[str, Any]) -> None:
    """5: node b looks up the ids of node c (up to 20,000: c's passes stay short); cold, then hot."""
    remote = [f"c{i:07d}" for i in range(min(n, 20000))]
    for tid in remote:
        await c.claim(tid, StubSession(tid))  # type: ignore[arg-type]

    async def lookup(tid: str) -> None:
        if await b.lookup(tid) is None:
            raise RuntimeError(f"no route to {tid}")

    for name, items, conc in (("lookup_cold_concurrent", remote, k), ("lookup_cold_sequential", remote, 1),
                              ("lookup_hot", [remote[0]] * 200000, 1)):
        await asyncio.sleep(b.config.route_cache_ttl + 0.1)  # every cached route expired: cold
        ops0 = b.stats.ops
        out[name] = await run_ops(lookup, items, conc)
        out[name]["redis_ops"] = b.stats.ops - ops0
        out[name]["cache_entries_after"] = len(b._cache)


async def bench(url: str, n: int, k: int) -> Dict[str, Any]:
    r, r_sub = aioredis.from_url(url), aioredis.from_url(url)  # INFO and such; the expiry subscriber
    a = RedisRegistry(config(url, "a", 7001))
    b = RedisRegistry(config(url, "b", 7002), remote_route=remote_route)
    c = RedisRegistry(config(url, "c", 7003))
    watch = Watch(a)
    expiry = asyncio.ensure_future(watch.watch_expiry(r_sub))
    out: Dict[str, Any] = {"tunnels": n, "concurrency": k}
    phases: Dict[str, List[float]] = {}
    try:
        await asyncio.wait_for(watch.subscribed.wait(), 5)
        for reg in (a, b, c):
            await reg.start()
        t0 = watch.now()
        await claims(r, a, [f"t{i:07d}" for i in range(n)], k, out)
        phases["claims"], errors = [t0, watch.now()], a.stats.errors
        out["steady"] = await steady(r, a, watch, n)
        phases["steady"] = [out["steady"]["from_s"], watch.now()]
        out["registry_errors"] = {"claims": errors, "steady": a.stats.errors - errors}

        # 4. shutdown: node a releases its claims (one pipeline, within redis_timeout)
        errors, t0 = a.stats.errors, time.perf_counter()
        await a.close()
        out["close"] = {"seconds": time.perf_counter() - t0, "node_key_left": await r.exists(a._node_key),
                        "claim_keys_left": await claim_keys(r),
                        "redis_timeout_s": a.config.redis_timeout, "registry_errors": a.stats.errors - errors}
        await lookups(b, c, n, k, out)
    finally:
        for reg in (a, b, c):
            if not reg._closed:
                await reg.close(release=False)
        expiry.cancel()
        await asyncio.wait([expiry], timeout=1)
        await r.aclose()
        await r_sub.aclose()
    out["passes"] = watch.passes
    out["expired"] = {}  # node a's claim keys that expired while it held them (its passes too slow)
    for name, (lo, hi) in phases.items():
        keys = [key for t, key in watch.expired if lo <= t <= hi]
        out["expired"][name] = {"events": len(keys), "distinct_ids": len(set(keys))}
    live = [t for t, _ in watch.expired if t <= phases.get("steady", [0, 0])[1]]  # not those close() left
    out["expired_first_at_s"] = round(live[0], 1) if live else None
    return out


def model(m: Dict[str, Any]) -> Dict[str, Any]:
    """Linear. Redis CPU per claim refresh (steady CPU over claims refreshed, its background work included)
    at the designed rate, one refresh per tunnel per claim_refresh: an upper bound. A node's pass
    takes d = (wall s per claim) x its tunnels; a claim is refreshed every claim_refresh + d (fresh
    to other nodes while <= 2 x claim_refresh); one made just after a pass began waits up to
    d + claim_refresh + d for its first refresh (it expires if that exceeds claim_ttl)."""
    st, n = m["steady"], m["tunnels"]
    refresh, ttl = st["claim_refresh_s"], st["claim_ttl_s"]
    cpu_per_op = st["redis_cpu_s_per_s"] / st["refreshes_per_s"]
    per_claim_s = statistics.mean(st["pass_s"]) / n
    fresh = int(refresh / per_claim_s)
    return {"redis_cpu_us_per_refresh": 1e6 * cpu_per_op,
            "tunnels_per_redis_at_cpu": {f"{x}%": int(x / 100 * refresh / cpu_per_op) for x in (25, 50, 80, 100)},
            "tunnels_per_redis_at_memory": {f"{g} GiB": int(g * 2**30 / m["memory"]["bytes_per_claim"])
                                            for g in (1, 4, 16)},
            "node_links": {nodes: nodes * (nodes - 1) for nodes in (2, 3, 5, 10, 20, 50)},
            "refreshes_per_s_1M": 1e6 / refresh, "redis_cpu_s_per_s_1M": 1e6 / refresh * cpu_per_op,
            "script_calls_per_s_1M": 1e6 / refresh / 500,
            "node_pass_us_per_claim": 1e6 * per_claim_s,
            "tunnels_per_node_fresh": fresh,
            "tunnels_per_node_new_claims_survive": int((ttl - refresh) / 2 / per_claim_s),
            "tunnels_per_node_claims_survive": int((ttl - refresh) / per_claim_s),
            "nodes_for_1M_tunnels": -(-1000000 // fresh)}


def report(m: Dict[str, Any]) -> None:
    st, md, mem, ex, cl = m["steady"], m["model"], m["memory"], m["expired"], m["close"]
    print(f"\n== measured: {m['tunnels']:,} tunnels on node a, one redis-server, default ClusterConfig; "
          f"load average {m['load_avg'][0]:.2f} before, {m['load_avg'][1]:.2f} after, {os.cpu_count()} CPUs ==")
    for name in ("claim_sequential", "claim_concurrent", "lookup_cold_concurrent", "lookup_cold_sequential",
                 "lookup_hot"):
        c = m[name]
        print(f"{name:23} {c['count']:>7,} x{c['concurrency']:<2}: {c['per_s']:>9,.0f}/s  p50 {c['p50_ms']:7.3f} ms"
              f"  p99 {c['p99_ms']:8.3f} ms" + (f"  Redis ops {c['redis_ops']:,}" if "redis_ops" in c else ""))
    cpu = m["claim_cpu_us"]
    print(f"per claim               Redis CPU {cpu['redis']:.1f} us, node CPU {cpu['node']:.1f} us (passes during "
          f"the claims included); Redis memory {mem['bytes_per_claim']:.0f} B (used_memory "
          f"{mem['used_before']:,} -> {mem['used_after']:,}, over the claim keys present), "
          f"MEMORY USAGE of one key {mem['memory_usage_one_key']} B")
    print(f"route cache             hot hit rate {1 - m['lookup_hot']['redis_ops'] / m['lookup_hot']['count']:.5f}")
    print(f"steady state            period {st['period_s']:.2f} s (claim_refresh {st['claim_refresh_s']} s + pass); "
          f"passes {st['pass_s']} s wall, {st['pass_cpu_s']} s node CPU ({st['node_cpu_us_per_refresh']:.1f} us/claim)")
    print(f"  Redis                 {st['refreshes_per_s']:,.0f} claim refreshes/s = {st['refreshes_per_tunnel_per_s']:.3f}"
          f" per tunnel per s, in {st['evalsha_per_s']:,.0f} evalsha/s of {st['evalsha_usec_per_call']:.1f} us each; "
          f"{st['redis_commands_per_s']:,.0f} commands/s (Lua's own counted); {st['node_round_trips_per_s']:.1f} "
          f"round trips/s")
    print(f"  CPU                   Redis {st['redis_cpu_s_per_s']:.4f} s/s = {st['redis_cpu_s_per_s_per_100k']:.4f} "
          f"s/s per 100k tunnels; node process {st['node_cpu_s_per_s']:.4f} s/s")
    print(f"claim keys of a         {mem['claim_keys_after_claims']:,} after the claims, "
          f"{st['claim_keys_at_end']:,} after the steady state; expired while held: "
          f"{ex['claims']['distinct_ids']:,} ids during the claims, "
          f"{ex['steady']['distinct_ids']:,} during the steady state (first at {m['expired_first_at_s']} s)")
    print(f"registry errors         {m['registry_errors']} (an operation over redis_timeout: an outage)")
    print(f"close() of node a       {cl['seconds']:.2f} s; claim keys left {cl['claim_keys_left']:,}, node key left "
          f"{bool(cl['node_key_left'])} (redis_timeout {cl['redis_timeout_s']} s; errors {cl['registry_errors']})")
    print("passes of a (start s, wall s, claims): " + ", ".join(
        f"({p['at']:.1f}, {p['seconds']:.2f}, {p['claims']})" for p in m["passes"]))
    print("\n== MODEL: extrapolated linearly from the figures above, not measured ==")
    print(f"Redis CPU per claim refresh {md['redis_cpu_us_per_refresh']:.1f} us; one refresh per tunnel per "
          f"claim_refresh: tunnels one Redis holds at X % of one core {md['tunnels_per_redis_at_cpu']}")
    print(f"tunnels one Redis holds, claim keys only: {md['tunnels_per_redis_at_memory']}")
    print(f"1M tunnels: {md['refreshes_per_s_1M']:,.0f} claim refreshes/s, Redis CPU {md['redis_cpu_s_per_s_1M']:.2f} "
          f"s/s, {md['script_calls_per_s_1M']:,.0f} script calls/s; + nodes / node_refresh liveness writes; + per node at "
          f"most one lookup per remote id visited per route_cache_ttl")
    print(f"node links, N*(N-1) directed (dialled on demand): {md['node_links']}")
    print(f"a node's pass takes {md['node_pass_us_per_claim']:.0f} us per claim (wall): claims fresh to other nodes "
          f"(refreshed within 2 x claim_refresh) up to ~{md['tunnels_per_node_fresh']:,} tunnels per node; new claims "
          f"expire before their first refresh beyond ~{md['tunnels_per_node_new_claims_survive']:,}, every claim "
          f"beyond ~{md['tunnels_per_node_claims_survive']:,}; 1M fresh tunnels need >= "
          f"{md['nodes_for_1M_tunnels']} nodes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tunnels", type=int, default=100000, help="tunnel claims on node a (default 100,000)")
    ap.add_argument("--quick", action="store_true", help="10,000 tunnels")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent claimers / lookups (default 64)")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  [log during the run] %(name)s: %(message)s")
    load = os.getloadavg()
    server = RedisServer()
    server.start()
    try:
        figures = uvloop.run(bench(server.url, 10000 if args.quick else args.tunnels, args.concurrency))
    finally:
        server.stop()  # SIGTERM by PID, SIGKILL after 5 s
        server._dir.cleanup()  # its temporary directory, as RedisServer's __exit__ does
    figures["load_avg"] = [load[0], os.getloadavg()[0]]
    figures["model"] = model(figures)
    report(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
