"""A network partition between two cluster nodes that both still reach Redis: node a's link
address sits behind a proxy that can freeze (packets dropped: connections stay open, nothing
passes, new ones are accepted and then hang). Visitors on a's own ingress are unaffected;
visitors on b for a's tunnel get a 503 that says the tunnel's node cannot be reached (never a
404: the tunnel exists) once b's link to a is declared dead, and are served again soon after the
partition heals. The times are printed for docs/cluster.md's failure table."""

from __future__ import annotations

import asyncio
import time
from typing import Any, List, Optional, Tuple

import ferrotunnel as ft

from redis_server import RedisServer
from test_cluster_nodes import TOKEN, Node, _name_app


class FreezingProxy:
    """TCP proxy to ``target``; ``frozen`` stops all forwarding without closing anything."""

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        self.frozen = False
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.server: Optional[asyncio.base_events.Server] = None
        self.tasks: "set[asyncio.Task[Any]]" = set()

    async def start(self) -> Tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    def freeze(self, on: bool) -> None:
        self.frozen = on
        (self.thawed.clear if on else self.thawed.set)()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                await self.thawed.wait()  # frozen: the bytes go nowhere (yet)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await self.thawed.wait()  # a connection made during the partition hangs before reaching a
        try:
            br, bw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        for t in (asyncio.ensure_future(self._pump(r, bw)), asyncio.ensure_future(self._pump(br, w))):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self.tasks):
            t.cancel()


async def _status(addr: Tuple[str, int], host: str, timeout: float = 30) -> Tuple[bytes, bytes]:
    r, w = await asyncio.open_connection(*addr)
    w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        data = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    return data.split(b"\r\n", 1)[0], data.rpartition(b"\r\n\r\n")[2]


def test_a_partition_between_nodes_gives_503_across_and_heals(run):
    async def body():
        with RedisServer() as redis:
            a, b = Node("a", redis.url), Node("b", redis.url)
            apps: List[Any] = []
            task = None
            proxy: Optional[FreezingProxy] = None
            try:
                await a.start()
                await b.start()
                proxy = FreezingProxy(a.node.link_address)
                a.node.registry.advertise = await proxy.start()  # b reaches a's links only through it
                await asyncio.sleep(2 * a.node.config.node_refresh)  # the liveness key names the proxy now
                app, addr = await _name_app("app0")
                apps.append(app)
                client = ft.TunnelClient("%s:%d" % a.server.address, TOKEN, tunnel_id="t0",
                                         config=ft.ClientConfig(local_addr=addr))
                task = asyncio.create_task(client.connect_and_run())
                await a.server.wait_for_session("t0", timeout=10)
                assert (await _status(b.http.address, "t0"))[0] == b"HTTP/1.1 200 OK"  # across the link
                assert b.node.links_out.links().keys() == {"a"}

                proxy.freeze(True)
                t0 = time.monotonic()
                seen: List[Tuple[float, bytes]] = []
                while True:
                    assert (await _status(a.http.address, "t0"))[0] == b"HTTP/1.1 200 OK"  # local: unaffected
                    status, text = await _status(b.http.address, "t0")
                    seen.append((time.monotonic() - t0, status))
                    assert b"404" not in status, text  # the tunnel exists: never "no such tunnel"
                    if status.startswith(b"HTTP/1.1 503"):
                        assert b"its node (a) cannot be reached from this node" in text, text
                        break
                    assert time.monotonic() - t0 < 40, seen
                first_503 = time.monotonic() - t0
                t2 = time.monotonic()  # the next visitors are answered at once, not after a dial each
                status, text = await _status(b.http.address, "t0")
                at_once = time.monotonic() - t2
                assert status.startswith(b"HTTP/1.1 503") and at_once < 1.0, (status, at_once)

                proxy.freeze(False)
                t1 = time.monotonic()
                while (await _status(b.http.address, "t0"))[0] != b"HTTP/1.1 200 OK":
                    assert time.monotonic() - t1 < 20, "not served again after the partition healed"
                    await asyncio.sleep(0.05)
                healed = time.monotonic() - t1
                print(f"partition: first 503 across after {first_503:.1f} s ({len(seen)} requests: "
                      f"{[(round(t, 1), s.decode()) for t, s in seen]}); the next in {at_once * 1000:.0f} ms; served again {healed:.2f} s after it healed")
            finally:
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                if proxy is not None:
                    proxy.close()
                for n in (a, b):
                    await n.close()
                for x in apps:
                    x.close()

    run(body, timeout=120)
