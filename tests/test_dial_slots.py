"""``ClientConfig.max_connects_in_flight``: the client's connects to its local service at once.

The local service here is a real listening socket that never accepts, its queue full: the kernel
drops further SYNs, so each connect stays in flight (SYN_SENT in /proc/net/tcp) until the SYN is
sent again about a second later. Before the limit, every stream the server opened made its connect
at once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Iterator, List, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel.aio.dial import DialSlots

from conftest import tunnel

TOKEN = "dial-slots-token"


@contextlib.contextmanager
def full_listener() -> Iterator[Tuple[socket.socket, int]]:
    """A listening socket whose accept queue is full (one connection queued, backlog 0)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield lsock, port
    finally:
        filler.close()
        lsock.close()


@contextlib.asynccontextmanager
async def slotted(port: int, limit: int, tunnel_id: str):
    """A tunnel whose client forwards to 127.0.0.1:``port`` with ``limit`` connects in flight:
    (client, the server's session)."""
    cfg = ft.ClientConfig(local_addr=("127.0.0.1", port), max_connects_in_flight=limit)
    async with tunnel(None, client_config=cfg, tunnel_id=tunnel_id, token=TOKEN) as (_, client, session):
        yield client, session


def syn_sent_to(port: int) -> int:
    """Connects to 127.0.0.1:``port`` still in flight on this host (state SYN_SENT)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "02":
                n += 1
    return n


async def until(cond, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_connects_in_flight_are_bounded_and_streams_reset_in_line_are_never_dialed(run) -> None:
    async def body() -> None:
        with full_listener() as (lsock, port):
            async with slotted(port, 3, "ds") as (client, session):
                slots = client.dial_slots
                streams = [session.open_stream_nowait() for _ in range(12)]
                await until(lambda: slots.busy == 3 and slots.waiting == 9, "3 connects, 9 in line")
                await asyncio.sleep(0.2)  # (time for more connects, were they made)
                assert syn_sent_to(port) == 3
                assert (slots.busy, slots.waiting) == (3, 9)
                for st in streams:
                    st.abort()
                core = client.session.connection.core
                await until(lambda: not core.streams, "the client saw the resets")
                # the service starts accepting: the connects in flight get through when their SYN is
                # sent again; the nine streams in line were reset and are never dialed
                lsock.close()
                accepted: List[int] = []

                def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    accepted.append(1)
                    writer.close()

                service = await asyncio.start_server(count, "127.0.0.1", port, reuse_address=True)
                try:
                    await until(lambda: slots.busy == 0, "every slot given back", timeout=30)
                    assert slots.waiting == 0
                    await asyncio.sleep(0.3)
                    assert len(accepted) <= 3
                    assert syn_sent_to(port) == 0
                finally:
                    service.close()

    run(body)


def test_streams_in_line_are_served_in_turn(run) -> None:
    order: List[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(3)
        order.append(first)
        writer.write(first)
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def body() -> None:
        backend = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=256)
        cfg = ft.ClientConfig(local_addr=backend.sockets[0].getsockname()[:2], max_connects_in_flight=2)
        async with tunnel(None, client_config=cfg, tunnel_id="dt", token=TOKEN) as (_, client, session):
            streams = [session.open_stream_nowait() for _ in range(40)]
            for i, st in enumerate(streams):
                st.write(b"%03d" % i)
            for i, st in enumerate(streams):
                assert await asyncio.wait_for(st.readexactly(3), 10) == b"%03d" % i
                st.close()
            slots = client.dial_slots
            await until(lambda: slots.busy == 0, "every slot given back")
            assert slots.waiting == 0
            # in turn: the line is first in, first out (2 connects at once may swap, no more)
            got = [int(b) for b in order]
            assert sorted(got) == list(range(40))
            assert all(abs(pos - i) <= 1 for pos, i in enumerate(got)), got
        backend.close()

    run(body)


def test_a_session_lost_with_connects_in_line_gives_every_slot_back(run) -> None:
    async def body() -> None:
        with full_listener() as (_, port):
            async with slotted(port, 2, "dl") as (client, session):
                slots = client.dial_slots
                for _ in range(6):
                    session.open_stream_nowait()
                await until(lambda: slots.busy == 2 and slots.waiting == 4, "2 connects, 4 in line")
                client.session.connection.close()  # the handler tasks are cancelled: those dialing, those in line
                await until(lambda: slots.busy == 0, "every slot given back")
                assert slots.waiting == 0
                assert syn_sent_to(port) == 0

    run(body)


def test_the_line_is_swept_of_streams_reset_while_they_waited(run) -> None:
    async def body() -> None:
        with full_listener() as (_, port):
            async with slotted(port, 2, "dw") as (client, session):
                slots = client.dial_slots
                core = client.session.connection.core
                for _ in range(10):  # 400 streams through the line, all reset while they wait
                    streams = [session.open_stream_nowait() for _ in range(40)]
                    await until(lambda: len(core.streams) >= 40, "the client has the streams")
                    for _ in range(3):  # their handler tasks run (to the line, where they wait) a turn later
                        await asyncio.sleep(0)
                    for st in streams:
                        st.abort()
                    await until(lambda: not core.streams, "the client saw the resets")
                # never swept, the line would hold about 398; swept, at most about twice the streams
                # of a round (each sweep leaves only live ones, the next waits for it to double)
                assert slots.waiting <= 2 * 40 + 40
                assert slots.busy == 2
                assert len(client.session.connection._tasks) <= 2 + 2 * 40 + 40  # their tasks ended too

    run(body)


def test_the_limit_is_checked() -> None:
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="max_connects_in_flight"):
            ft.ClientConfig(max_connects_in_flight=bad)
        with pytest.raises(ValueError, match="max_connects_in_flight"):
            DialSlots(bad)
    assert ft.ClientConfig().max_connects_in_flight == 256


class _Stream:
    """What DialSlots reads of a stream: its ``exception`` (None while it is open)."""

    def __init__(self) -> None:
        self.exception = None


def test_a_slot_handed_to_a_cancelled_waiter_goes_on_to_the_next(run) -> None:
    async def body() -> None:
        slots = DialSlots(1)
        slots.busy = 1  # the one slot is taken
        first, second = _Stream(), _Stream()
        t1 = asyncio.ensure_future(slots.wait_turn(first))
        t2 = asyncio.ensure_future(slots.wait_turn(second))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        slots.give_back()  # handed to t1 ...
        t1.cancel()  # ... which is cancelled before it runs: the slot must reach t2
        assert await asyncio.wait_for(t2, 5) is True
        with pytest.raises(asyncio.CancelledError):
            await t1
        assert (slots.busy, slots.waiting) == (1, 0)
        slots.give_back()
        assert slots.busy == 0
        # a waiter cancelled before its turn is skipped; a reset one is told False
        slots.busy = 1
        gone, reset, live = _Stream(), _Stream(), _Stream()
        ts = [asyncio.ensure_future(slots.wait_turn(s)) for s in (gone, reset, live)]
        await asyncio.sleep(0)
        ts[0].cancel()
        reset.exception = ConnectionResetError()
        await asyncio.sleep(0)
        slots.give_back()
        assert await asyncio.wait_for(ts[1], 5) is False
        assert await asyncio.wait_for(ts[2], 5) is True
        assert (slots.busy, slots.waiting) == (1, 0)

    run(body)


def test_the_sweep_follows_the_line_down_after_a_peak(run) -> None:
    """After 1,000 streams waited at once and were served, the line sweeps as often as a short
    line needs: 1,000 streams that join and are reset while one live one waits leave at most
    about twice a batch in it (before, the sweep mark stayed at the peak's 2,048)."""
    async def body() -> None:
        slots = DialSlots(2)
        slots.busy = 2
        peak = [asyncio.ensure_future(slots.wait_turn(_Stream())) for _ in range(1000)]
        await asyncio.sleep(0)
        assert slots.waiting == 1000
        for _ in range(1000):
            slots.give_back()  # each hands its slot to the next in line
        assert await asyncio.wait_for(asyncio.gather(*peak), 5) == [True] * 1000
        assert (slots.busy, slots.waiting) == (2, 0)
        pending = []
        for _ in range(10):
            batch = [_Stream() for _ in range(100)]
            pending += [asyncio.ensure_future(slots.wait_turn(s)) for s in batch]
            await asyncio.sleep(0)
            for s in batch:
                s.exception = ConnectionResetError()
        pending.append(asyncio.ensure_future(slots.wait_turn(_Stream())))
        await asyncio.sleep(0)
        assert slots.waiting <= 2 * 100 + 2
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    run(body)
