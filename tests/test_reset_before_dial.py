"""A stream reset before the client's handler got to it is not forwarded: no connection to the
local service for a visitor that came and went (before, every such stream still connected and
was then cut, and a burst of them left thousands of connects in flight)."""

from __future__ import annotations

import asyncio

import ferrotunnel as ft

from conftest import tunnel

TOKEN = "reset-before-dial-token"


def test_a_stream_reset_before_its_handler_ran_is_not_dialed(run) -> None:
    accepted = [0]

    async def backend_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except ConnectionError:
            pass
        writer.close()

    async def body() -> None:
        backend = await asyncio.start_server(backend_conn, "127.0.0.1", 0, backlog=1024)
        cfg = ft.ClientConfig(local_addr=backend.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg, tunnel_id="rb", token=TOKEN) as (_, client, session):
            conn = client.session.connection
            # the client reads nothing while 200 streams are opened and then reset: it gets each
            # OpenStream and its reset in one read, before its handler task for the stream starts
            conn.hold_reading()
            streams = [session.open_stream_nowait() for _ in range(200)]
            await asyncio.sleep(0.05)  # the OpenStreams leave
            for st in streams:
                st.abort()
            await asyncio.sleep(0.05)  # the resets leave
            conn.release_reading()
            # a stream that stays open behind them is forwarded as usual (the frames are in order)
            s = session.open_stream_nowait()
            s.write(b"ping")
            assert await asyncio.wait_for(s.readexactly(4), 10) == b"ping"
            s.close()
            async with asyncio.timeout(10):
                while conn._tasks:  # every handler ran
                    await asyncio.sleep(0.01)
            assert accepted[0] == 1  # the open stream's connection only
        backend.close()

    run(body)
