"""Failover of a cluster with default settings: three CLI nodes behind a real HAProxy
(``deploy/haproxy.cfg`` on loopback ports), one real redis-server, tunnel clients in this process
connected through the balancer.

* kill -9 of the node that owns two tunnels (one ferrotunnel client, one client without
  extensions, as a Rust FerroTunnel client): the time until a visitor through HAProxy reaches each
  app again; afterwards each id has exactly one owner, a live node, in the logs and in Redis.
* Redis stopped for 10 s, then restarted empty on the same port: visitors on the owning node keep
  being served, visitors on another node get 503 (saying why) once the cached route expired, and
  are served again shortly after Redis is back; the claims are re-asserted, one owner per id.

The bounds asserted are hang-catchers; the measured times are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Dict, List, Optional, Tuple

import ferrotunnel as ft

from cluster_procs import TOKEN, Cluster, NodeProc, http_get, redis_claims, status
from redis_server import RedisServer
from test_cluster_nodes import _name_app


def _served(answer: bytes, tunnel_id: str, path: str) -> bool:
    """The app of ``tunnel_id`` answered this very request (byte-exact body)."""
    return answer.startswith(b"HTTP/1.1 200") and answer.endswith(f"app-{tunnel_id} {path}".encode())


class Tunnels:
    """In-process tunnel clients through HAProxy's tunnel frontend, each with its own app."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.apps: List[asyncio.AbstractServer] = []
        self.tasks: List["asyncio.Task[None]"] = []
        self.clients: Dict[str, ft.TunnelClient] = {}
        #: per tunnel id, when each of its sessions came up (time.monotonic())
        self.connected: Dict[str, List[float]] = collections.defaultdict(list)

    async def connect(self, tunnel_id: str, *, extensions: bool) -> NodeProc:
        """Connect a client (and wait for its session); the node that accepted it."""
        app, addr = await _name_app(f"app-{tunnel_id}")
        self.apps.append(app)
        client = ft.TunnelClient(f"127.0.0.1:{self.cluster.fronts[7835]}", TOKEN, tunnel_id=tunnel_id,
                                 config=ft.ClientConfig(local_addr=addr, extensions=extensions))
        self.clients[tunnel_id] = client
        up = asyncio.Event()

        def on_connected(session: ft.Session) -> None:
            self.connected[tunnel_id].append(time.monotonic())
            up.set()

        self.tasks.append(asyncio.create_task(client.connect_and_run(on_connected=on_connected)))
        await asyncio.wait_for(up.wait(), 15)
        assert client.session is not None and client.session.flow_control == extensions
        return await self.cluster.owner(tunnel_id)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for a in self.apps:
            a.close()


async def _until_served(addr: Tuple[str, int], tunnel_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answer = await http_get(addr, tunnel_id, "/ready")
        if _served(answer, tunnel_id, "/ready"):
            return
        assert time.monotonic() < deadline, (addr, tunnel_id, answer[:300])
        await asyncio.sleep(0.05)


async def _one_owner_each(cluster: Cluster, redis_url: str, owners: Dict[str, NodeProc]) -> None:
    """Each tunnel id has exactly one owner: one session accepted on a live node (the expected
    one), and Redis's claim names that node in its current epoch; no other claims."""
    claims, nodes = await redis_claims(redis_url)
    assert set(claims) == set(owners), (claims, owners)
    live = cluster.live()
    for tid, owner in owners.items():
        accepted = {n.name: n.established(tid) for n in live if n.established(tid)}
        assert accepted == {owner.name: 1}, (tid, accepted)
        claim = claims[tid]
        assert claim["node"] == owner.name and owner.alive, (tid, claim)
        assert claim["epoch"] == nodes[owner.name]["epoch"], (tid, claim, nodes)


def test_kill_9_of_the_owning_node_fails_its_tunnels_over(run, tmp_path):
    with RedisServer() as redis, Cluster(tmp_path, redis.url) as cluster:
        front = ("127.0.0.1", cluster.fronts[80])

        async def body() -> None:
            tunnels = Tunnels(cluster)
            try:
                # a ferrotunnel client, then clients without extensions until one lands on the same
                # node (the balancer's round robin: within three); the others stay as bystanders
                victim = await tunnels.connect("ft", extensions=True)
                plain: Optional[str] = None
                bystanders: Dict[str, NodeProc] = {}
                for k in range(6):
                    owner = await tunnels.connect(f"rs{k}", extensions=False)
                    if owner is victim:
                        plain = f"rs{k}"
                        break
                    bystanders[f"rs{k}"] = owner
                assert plain is not None, f"no second tunnel on node {victim.name}: {bystanders}"
                for tid in tunnels.clients:
                    await _until_served(front, tid)

                victim.kill9()
                t_kill = time.monotonic()

                async def measure(tid: str, limit: float) -> Tuple[Optional[float], collections.Counter]:
                    """Seconds from the kill until the app answers through HAProxy (None: not
                    within ``limit``), and what the visitors got meanwhile."""
                    seen: collections.Counter = collections.Counter()
                    k = 0
                    while time.monotonic() - t_kill < limit:
                        k += 1
                        answer = await http_get(front, tid, f"/after/{k}")
                        if _served(answer, tid, f"/after/{k}"):
                            return time.monotonic() - t_kill, seen
                        seen[status(answer)[:60]] += 1
                        await asyncio.sleep(0.05)
                    return None, seen

                async def bystander(tid: str, node: NodeProc) -> bool:
                    """A tunnel on a surviving node: served on its node's ingress throughout."""
                    answer = await http_get(node.http, tid, "/bystander")
                    return _served(answer, tid, "/bystander")

                (t_ft, seen_ft), (t_rs, seen_rs), *others = await asyncio.gather(
                    measure("ft", 20), measure(plain, 30), *(bystander(t, n) for t, n in bystanders.items()))
                again = {tid: round(tunnels.connected[tid][-1] - t_kill, 2) for tid in ("ft", plain)}
                print(f"\n[{run.loop_name}] kill -9 of node {victim.name} (tunnels ft and {plain}): "
                      f"ferrotunnel client reconnected after {again['ft']} s, served through HAProxy after "
                      f"{t_ft if t_ft is None else round(t_ft, 2)} s (meanwhile {dict(seen_ft)}); "
                      f"extensions-off client reconnected after {again[plain]} s, served after "
                      f"{t_rs if t_rs is None else round(t_rs, 2)} s (meanwhile {dict(seen_rs)})")
                assert t_ft is not None and t_ft <= 20, (t_ft, seen_ft)
                assert t_rs is not None and t_rs <= 30, (t_rs, seen_rs)
                assert all(others), dict(zip(bystanders, others))
                # meanwhile the visitors were told the tunnel's node is gone (503), never "no such tunnel"
                assert not any("404" in k for k in (*seen_ft, *seen_rs)), (seen_ft, seen_rs)

                # one owner per id: the clients connected once more each (bystanders: not again),
                # on a live node, which Redis names; the dead node's liveness key is gone
                assert {t: len(v) for t, v in tunnels.connected.items()} == {
                    "ft": 2, plain: 2, **{t: 1 for t in bystanders}}
                for tid in ("ft", plain):
                    survivors = [n for n in cluster.live() if n.established(tid)]
                    assert len(survivors) == 1, (tid, [n.name for n in survivors])
                owners = {tid: next(n for n in cluster.live() if n.established(tid)) for tid in ("ft", plain)}
                await _one_owner_each(cluster, redis.url, {**owners, **bystanders})
                _, nodes = await redis_claims(redis.url)
                assert victim.name not in nodes
                for tid, node in owners.items():
                    assert f"tunnel {tid} taken over from node {victim.name} (dead)" in node.text(), tid
            finally:
                await tunnels.close()

        run(body, timeout=90)
    cluster.check_exits()


def test_a_redis_outage_keeps_local_visitors_and_answers_503_across_nodes(run, tmp_path):
    with RedisServer() as redis, Cluster(tmp_path, redis.url) as cluster:

        async def body() -> None:
            tunnels = Tunnels(cluster)
            try:
                owner_x = await tunnels.connect("x", extensions=True)
                y, owner_y = None, None
                owners = {"x": owner_x}
                for k in range(6):  # a second tunnel on another node (round robin: the next one)
                    tid = f"y{k}"
                    owners[tid] = await tunnels.connect(tid, extensions=False)
                    if owners[tid] is not owner_x:
                        y, owner_y = tid, owners[tid]
                        break
                assert y is not None and owner_y is not None, owners
                local = [("x", owner_x), (y, owner_y)]
                cross = [("x", owner_y), (y, owner_x)]  # each visitor on the other tunnel's node
                for tid, node in local + cross:
                    await _until_served(node.http, tid)

                await asyncio.to_thread(redis.stop)
                t_stop = time.monotonic()
                outage = 10.0
                local_ok = collections.Counter()
                first_503: Dict[str, float] = {}
                seen: Dict[str, List[Tuple[float, str]]] = {tid: [] for tid, _ in cross}
                k = 0
                while time.monotonic() - t_stop < outage:
                    k += 1
                    path = f"/outage/{k}"
                    answers = await asyncio.gather(*(http_get(n.http, tid, path) for tid, n in local + cross))
                    now = time.monotonic() - t_stop
                    for (tid, node), answer in zip(local, answers[:2]):
                        assert _served(answer, tid, path), (f"local visitor of {tid} on node {node.name} "
                                                            f"at {now:.2f} s into the outage", answer[:300])
                        local_ok[tid] += 1
                    for (tid, node), answer in zip(cross, answers[2:]):
                        seen[tid].append((round(now, 2), status(answer)))
                        if _served(answer, tid, path):
                            # a cached route (route_cache_ttl): only before the first 503
                            assert tid not in first_503, (tid, seen[tid])
                        else:
                            assert answer.startswith(b"HTTP/1.1 503"), (tid, node.name, now, answer[:300])
                            assert b"cluster registry is unreachable" in answer, answer
                            first_503.setdefault(tid, now)
                    await asyncio.sleep(0.25)
                assert all(n >= 10 for n in local_ok.values()) and len(local_ok) == 2, local_ok
                assert set(first_503) == {tid for tid, _ in cross}, seen

                await asyncio.to_thread(redis.start)  # the same port, empty
                t_back = time.monotonic()

                recovering: Dict[str, collections.Counter] = {tid: collections.Counter() for tid, _ in cross}

                async def until_served_again(tid: str, node: NodeProc) -> float:
                    k = 0
                    while True:
                        k += 1
                        answer = await http_get(node.http, tid, f"/back/{k}")
                        if _served(answer, tid, f"/back/{k}"):
                            return time.monotonic() - t_back
                        # 503 until this node probed Redis again, and while the owner has not
                        # re-asserted its claim yet (each node probes every second): never a 404
                        assert answer.startswith(b"HTTP/1.1 503"), (tid, node.name, answer[:300])
                        recovering[tid][status(answer)] += 1
                        assert time.monotonic() - t_back < 10, f"{tid} not served on node {node.name} again"
                        await asyncio.sleep(0.05)

                back = await asyncio.gather(*(until_served_again(tid, n) for tid, n in cross))
                print(f"\n[{run.loop_name}] Redis down {t_back - t_stop:.2f} s (tunnels x on node {owner_x.name}, "
                      f"{y} on node {owner_y.name}): local visitors served {dict(local_ok)} times meanwhile; "
                      f"cross-node visitors got 503 from {first_503['x']:.2f} s (x) and {first_503[y]:.2f} s "
                      f"({y}) into the outage; served again {back[0]:.2f} s (x) and {back[1]:.2f} s ({y}) after "
                      f"Redis was back (meanwhile {({t: dict(c) for t, c in recovering.items()})})")
                for tid, node in local:
                    assert _served(await http_get(node.http, tid, "/end"), tid, "/end")

                # nothing reconnected; every claim is back in Redis, one owner each, the nodes alive
                assert {t: len(v) for t, v in tunnels.connected.items()} == {t: 1 for t in owners}
                for node in cluster.nodes.values():  # each node probes Redis every second
                    await node.wait_for_async("is back; re-asserting", 10)
                await _one_owner_each(cluster, redis.url, owners)
            finally:
                await tunnels.close()

        run(body, timeout=90)
    cluster.check_exits()
