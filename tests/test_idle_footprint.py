"""What an idle forwarded stream keeps (issue 14 row 5): both tunnel ends, through the TCP ingress.

Each visitor connection echoes one byte through the tunnel and stays open. Then every per-stream
object of both ends (``VirtualStream``, ``CoreStream``, the bridges) must be slotted (no
``__dict__``) and hold no buffer, container or future: read buffers, queues of tunnel payloads,
early-byte lists and header lists exist only while they hold something. The bridges define no
``data_received`` (an event loop keeps a bound method of each of ``data_received``,
``get_buffer`` and ``buffer_updated`` the protocol has, per connection), and their next read size
is one shared int object, not one per bridge.
"""

from __future__ import annotations

import asyncio
import collections
import gc

import ferrotunnel as ft
from ferrotunnel.aio import bridge as bridge_mod
from ferrotunnel.aio import sweeper as sweeper_mod
from ferrotunnel.aio.bridge import IdleSweeper, TcpBridge
from ferrotunnel.protocol.streams import CoreStream

TOKEN = "idle-footprint-token"
VISITORS = 20
#: What an idle per-stream object may not refer to.
HELD = (bytes, bytearray, memoryview, list, dict, set, collections.deque, asyncio.Future)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
    except ConnectionError:
        pass  # the tunnel closing at the end
    writer.close()


def per_stream_objects() -> dict:
    found: dict = {"VirtualStream": [], "CoreStream": [], "bridge": []}
    for obj in gc.get_objects():
        if isinstance(obj, ft.VirtualStream):
            found["VirtualStream"].append(obj)
        elif isinstance(obj, CoreStream):
            found["CoreStream"].append(obj)
        elif isinstance(obj, TcpBridge):
            found["bridge"].append(obj)
    return found


def held_by(obj: object) -> list:
    """What ``obj`` refers to that an idle stream should not keep (its own type aside)."""
    return [type(r).__name__ for r in gc.get_referents(obj) if isinstance(r, HELD) and r is not type(obj)]


def test_idle_forwarded_streams_keep_no_buffers_and_no_dicts(run):
    async def body():
        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        visitors = []
        async with backend, server, ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
            client = ft.TunnelClient(server.address, TOKEN, tunnel_id="idle",
                                     local_addr=backend.sockets[0].getsockname()[:2])
            task = asyncio.create_task(client.connect_and_run())
            try:
                await server.wait_for_session("idle", timeout=10)
                for i in range(VISITORS):
                    r, w = await asyncio.open_connection(*ingress.address)
                    w.write(b"%c" % (65 + i))
                    assert await asyncio.wait_for(r.readexactly(1), 10) == b"%c" % (65 + i)
                    visitors.append((r, w))
                await asyncio.sleep(0.2)  # the echoes' credit and flushes are done
                gc.collect()
                check(per_stream_objects())
            finally:
                for _, w in visitors:
                    w.close()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body)


def check(found: dict) -> None:
    # both ends: a stream each, and a bridge each (the ingress's and the client's forward)
    for kind in ("VirtualStream", "CoreStream", "bridge"):
        assert len(found[kind]) == 2 * VISITORS, (kind, len(found[kind]))
    kinds = {type(b).__name__ for b in found["bridge"]}
    assert kinds == {"TcpBridge", "_IngressBridge"}, kinds
    for objs in found.values():
        for obj in objs:
            assert not hasattr(obj, "__dict__"), f"{type(obj).__name__} has a __dict__"
            assert not held_by(obj), f"an idle {type(obj).__name__} holds {held_by(obj)}"
    for b in found["bridge"]:
        assert not hasattr(b, "data_received"), f"{type(b).__name__} defines data_received"
        # held while it pipes: by the ingress's idle sweeper, or (the client's) by the module
        assert (b.sweeper is not None) != (b in bridge_mod._PIPING), type(b).__name__
    sizes = {id(b._read_size) for b in found["bridge"]}
    assert len(sizes) == 1, "each bridge keeps an int object of its own for its next read size"
    # while a bridge pipes a stream, the session's state holds the stream itself: no weak
    # reference object (80 bytes) per stream
    streams = {id(vs) for vs in found["VirtualStream"]}
    for st in found["CoreStream"]:
        assert id(st.app) in streams, f"a piped stream's state holds a {type(st.app).__name__}"


def test_subclass_data_received_takes_the_copied_reads():
    """A bridge subclass that defines ``data_received`` gets the reads that are copied."""
    got = []

    class Taking(TcpBridge):
        __slots__ = ()

        def data_received(self, data: bytes) -> None:
            got.append(data)

    b = Taking()
    buf = b.get_buffer(-1)
    buf[:3] = b"abc"
    b.buffer_updated(3)
    assert got == [b"abc"]
    plain = TcpBridge()
    assert not hasattr(plain, "data_received")
    buf = plain.get_buffer(-1)
    buf[:2] = b"xy"
    plain.buffer_updated(2)  # no stream yet: kept for the stream that comes
    s = plain.stream
    assert s is None and not plain.finished


def test_a_sweeper_holds_its_bridges_until_they_finish(run):
    """Bridges in an idle sweeper are not in the module's set of piping bridges: the sweeper holds
    them, and is held itself while it has any (an ingress may be closed and dropped while its
    connections go on; the cyclic GC must not collect a paused transfer)."""
    async def body():
        sweeper = IdleSweeper(60.0)
        b = TcpBridge()
        sweeper.add(b)
        sweeper.close()  # as an ingress that closes (its sweeps go on while it holds a bridge)
        assert sweeper in sweeper_mod._SWEEPING  # what holds it, timer or not
        ident = id(b)
        del sweeper, b
        gc.collect()
        alive = [o for o in gc.get_objects() if id(o) == ident and isinstance(o, TcpBridge)]
        assert alive, "a bridge in a dropped sweeper was collected"
        bridge = alive[0]
        held = bridge.sweeper
        bridge.abort()  # finished: it leaves, and the sweeper is no longer held for it
        assert bridge.finished and bridge not in held.bridges
        assert held not in sweeper_mod._SWEEPING

    run(body)


def test_an_address_gets_its_ingress_slots_back(run):
    """The bridge keeps no host of its own for the connection caps: it leaves the gate under the
    host of ``peer_address``. After a full set of connections from one address closes, the same
    number is admitted again (a slot counted under another host would refuse them)."""
    cap = 4

    async def body():
        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=ft.ServerConfig(ingress_max_per_address=cap))
        async with backend, server, ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
            client = ft.TunnelClient(server.address, TOKEN, tunnel_id="caps",
                                     local_addr=backend.sockets[0].getsockname()[:2])
            task = asyncio.create_task(client.connect_and_run())
            try:
                await server.wait_for_session("caps", timeout=10)
                for _ in range(3):
                    conns = [await asyncio.open_connection(*ingress.address) for _ in range(cap)]
                    for r, w in conns:
                        w.write(b"x")
                        assert await asyncio.wait_for(r.readexactly(1), 10) == b"x"
                    for _, w in conns:
                        w.close()
                    async with asyncio.timeout(10):
                        while server.ingress_gate.open:
                            await asyncio.sleep(0.01)
                assert server.ingress_gate.refused.get("per_address", 0) == 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body)


def test_visitors_waiting_for_a_remote_lookup_are_let_go_when_the_ingress_closes(run):
    """A visitor whose tunnel is being looked up in a shared registry when the ingress closes is
    answered (closed), not left paused forever in a sweeper that holds its bridge."""
    from ferrotunnel.server.registry import LocalRegistry

    class NeverAnswers(LocalRegistry):
        local_only = False

        async def lookup(self, tunnel_id):
            await asyncio.sleep(3600)

    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, registry=NeverAnswers())
        ingress = ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="far")
        async with server:
            await ingress.start()
            visitors = [await asyncio.open_connection(*ingress.address) for _ in range(3)]
            for _, w in visitors:
                w.write(b"hello")
            async with asyncio.timeout(10):
                while len(ingress.sweeper.bridges) < 3:  # every visitor's bridge waits for the lookup
                    await asyncio.sleep(0.01)
            await ingress.close()
            for r, w in visitors:
                try:
                    assert await asyncio.wait_for(r.read(), 10) == b""
                except ConnectionResetError:
                    pass  # closed either way
                w.close()
            async with asyncio.timeout(10):
                while ingress.sweeper.bridges:
                    await asyncio.sleep(0.01)

    run(body)
