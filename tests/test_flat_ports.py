"""Issue 14 row 8: the URLs told to a new session (after its handshake, or a Register) name its
ports on request from an index by tunnel id (``IndexedPortLeases``), not from a walk over every
port leased to every other session. Real sessions over real sockets on 127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
import collections

import ferrotunnel as ft
from ferrotunnel.server.public import public_urls
from test_remote_ports import TOK, _released, _start, _stop, free_range

#: How often the leased ports' table was walked (iterated), by how.
WALKS: "collections.Counter[str]" = collections.Counter()


class Walked(dict):
    """The ``PortLeases.ingresses`` table, counting every walk over it (lookups by port are free)."""

    def __iter__(self):
        WALKS["iter"] += 1
        return super().__iter__()

    def items(self):
        WALKS["items"] += 1
        return super().items()

    def values(self):
        WALKS["values"] += 1
        return super().values()

    def keys(self):
        WALKS["keys"] += 1
        return super().keys()


def _walked_urls(server, tunnel_id, caps=("tcp",)):
    """What the URLs were before the index: every leased port's endpoint, filtered."""
    return public_urls(server.public_endpoints + server.ports.endpoints(), tunnel_id, caps, server.domain)


def test_a_new_session_is_told_its_port_without_walking_the_others(run):
    async def body():
        others = 20
        lo, hi = free_range(others + 3)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(lo, hi)) as server:
            tasks = []
            try:
                for i in range(others):
                    client, task, seen = await _start(server, f"other{i}", ft.ClientConfig(remote_port=0))
                    tasks.append(task)
                    assert seen == [(f"tcp://127.0.0.1:{client.remote_port}",)]
                assert len(server.ports.ingresses) == others and server.ports.indexed() == others
                server.ports.ingresses = Walked(server.ports.ingresses)
                WALKS.clear()
                client, task, seen = await _start(server, "New", ft.ClientConfig(remote_port=0))
                tasks.append(task)
                port = client.remote_port
                assert lo <= port <= hi and seen == [(f"tcp://127.0.0.1:{port}",)]
                assert sum(WALKS.values()) == 0, f"the leased ports were walked: {dict(WALKS)}"
                assert server.public_urls("new") == (f"tcp://127.0.0.1:{port}",) and sum(WALKS.values()) == 0

                # the same answers as the walk gave, for every tunnel id (and one without a port)
                for tid in [f"other{i}" for i in range(others)] + ["new", "nobody"]:
                    assert server.public_urls(tid) == _walked_urls(server, tid), tid
                    assert server.public_urls(tid.upper()) == _walked_urls(server, tid), tid

                await _stop(task)  # its port is released: gone from the index too
                tasks.remove(task)
                await _released(port)
                assert server.public_urls("new") == () and server.ports.indexed() == others
            finally:
                for t in tasks:
                    await _stop(t)
            for _ in range(200):
                if not server.ports.ports:
                    break
                await asyncio.sleep(0.01)
            assert server.ports.ports == {} and server.ports.indexed() == 0

    run(body)


def test_the_ports_index_follows_a_replaced_session_and_server_close(run):
    """A reconnecting client's new session takes over its old (stale) one's port: the URL it is
    told is that port, once; closing the server empties the index."""
    async def body():
        lo, hi = free_range(2)
        cfg = ft.ServerConfig(stale_session_after=0.2)
        server = ft.TunnelServer(("127.0.0.1", 0), TOK, config=cfg, tcp_port_range=(lo, hi))
        await server.start()
        try:
            slow = ft.BackoffConfig(base=30.0)
            _, task, _ = await _start(server, "db", ft.ClientConfig(remote_port=lo, backoff=slow))
            await asyncio.sleep(0.4)  # no heartbeat for a while: the old session counts as stale
            new, task2, seen = await _start(server, "db", ft.ClientConfig(remote_port=lo))
            assert new.remote_port == lo and seen == [(f"tcp://127.0.0.1:{lo}",)]
            assert server.public_urls("db") == (f"tcp://127.0.0.1:{lo}",) == _walked_urls(server, "db")
            assert server.ports.indexed() == 1
            await _stop(task)
        finally:
            await server.close()
        assert server.ports.indexed() == 0 and server.public_urls("db") == ()
        await _stop(task2)
        await _released(lo)

    run(body)
