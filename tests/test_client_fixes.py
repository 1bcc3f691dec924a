"""Client defects an audit found, each with a test that failed before its fix:

* the give-up count survived a successful session: after a long healthy session, one TunnelIdTaken
  ended the client ("refused 3 times in a row");
* SIGTERM during a hand-over (the CLI's ``--grace``) counted only the live session's streams, so
  the downloads still in flight on the session being replaced were cut at once;
* a TLS client whose server accepts and closes (a balancer doing TLS passthrough with its backend
  down) gave up after about 12 s, where a plaintext client retries;
* the config file's size limit was checked with stat (0 for a pipe), and deeply nested TOML ended
  in a RecursionError traceback.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time

import pytest

import ferrotunnel as ft
import ferrotunnel.client.client as client_mod
from ferrotunnel.cli.common import UsageError
from ferrotunnel.cli.config_file import MAX_CONFIG_BYTES, load_client_file
from ferrotunnel.cli.config_run import _grace
from test_drain import TOKEN, _two_servers

#: Half a second between attempts: time enough for another client to take the id first, even on
#: a loaded machine (the test's own steps take milliseconds).
FAST = ft.ClientConfig(backoff=ft.BackoffConfig(base=0.5, factor=1.0, jitter=0))


def test_a_session_starts_the_give_up_count_afresh(run, monkeypatch):
    # (1.5 s: the phase before the session tolerates one refusal more than planned on a slow machine)
    monkeypatch.setattr(client_mod, "SUSPECT_WINDOW", 1.5)

    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            addr = "%s:%d" % server.address
            holder = ft.TunnelClient(addr, TOKEN, tunnel_id="x")
            await holder.connect()
            b = ft.TunnelClient(addr, TOKEN, tunnel_id="x", config=FAST)
            task = asyncio.create_task(b.connect_and_run(lambda s: asyncio.sleep(60)))
            await asyncio.sleep(0.7)  # b refused (TunnelIdTaken) twice: one short of giving up ...
            assert not task.done()
            await holder.close()
            async with asyncio.timeout(10):
                while b.session is None:  # ... then connected
                    await asyncio.sleep(0.01)
            await asyncio.sleep(1.7)  # a healthy session, longer than the window
            other = ft.TunnelClient(addr, TOKEN, tunnel_id="x")
            b.session.close()  # b's connection drops and another client takes the id meanwhile
            async with asyncio.timeout(10):
                while True:
                    try:
                        await other.connect()  # (as soon as the server has seen b's session end)
                        break
                    except ft.HandshakeError:
                        await asyncio.sleep(0.01)
            # before the fix the count went on from 2: the first refusal, 0.5 s after the drop, ended
            # b; a fresh count needs 3 refusals over the 1.5 s window (2 s after the drop)
            await asyncio.sleep(0.9)
            assert not task.done(), task.exception() if task.done() else None
            async with asyncio.timeout(10):  # and once over the window, it gives up as it should
                with pytest.raises(ft.HandshakeError, match="held by another client"):
                    await task
            await other.close()

    run(body)


def test_grace_waits_for_the_streams_of_a_session_being_replaced(run):
    size = 8 * 1024 * 1024

    async def body():
        async def serve(r, w):
            w.write(b"x" * size)
            await w.drain()
            w.close()

        local = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with _two_servers() as (a, b, ing_a, ing_b, front):
            client = ft.TunnelClient("%s:%d" % front, TOKEN, tunnel_id="web",
                                     local_addr=local.sockets[0].getsockname()[:2])
            task = asyncio.create_task(client.connect_and_run())  # the CLI's handler: forward
            await a.wait_for_session("web", timeout=10)
            started = asyncio.Event()

            async def visitor():
                r, w = await asyncio.open_connection(*ing_a.address)
                got = 0
                while data := await asyncio.wait_for(r.read(65536), 20):
                    got += len(data)
                    started.set()
                    await asyncio.sleep(0.005)  # slow: still in flight when the hand-over comes
                w.close()
                return got

            down = asyncio.create_task(visitor())
            await asyncio.wait_for(started.wait(), 10)
            leaving = asyncio.create_task(a.shutdown(60, handover=True))
            await b.wait_for_session("web", timeout=10)
            assert client.open_streams == 1  # the download, on the session being replaced
            await _grace([client], [task], 30)  # what SIGTERM does in the CLI (--grace 30)
            assert await asyncio.wait_for(down, 30) == size
            task.cancel()
            await asyncio.gather(task, leaving, return_exceptions=True)
        local.close()

    run(body, timeout=120)


def test_a_tls_server_that_closes_before_answering_is_retried(run):
    """As for plaintext: a balancer whose backend is down accepts and closes; that is retried
    (until max_attempts here), not taken for a setting that does not match."""
    async def body():
        async def close(reader, writer):
            writer.close()

        srv = await asyncio.start_server(close, "127.0.0.1", 0)
        where = "%s:%d" % srv.sockets[0].getsockname()[:2]
        ctx = ssl.create_default_context()
        client = ft.TunnelClient(where, TOKEN, tls=ctx, config=ft.ClientConfig(handshake_timeout=2))
        with pytest.raises(ft.ConnectionLostError) as ei:
            await client.connect(lambda s: asyncio.sleep(0))
        assert type(ei.value) is ft.ConnectionLostError, type(ei.value)  # not SuspectedMisconfiguration
        assert "balancer" in str(ei.value) and "drop --tls" in str(ei.value)
        cfg = ft.ClientConfig(backoff=ft.BackoffConfig(base=0.01, factor=1.0, jitter=0, max_attempts=6))
        client = ft.TunnelClient(where, TOKEN, tls=ctx, config=cfg)
        with pytest.raises(ft.FerroTunnelError, match=r"giving up after 6 retries \(7 attempts\)"):
            await client.connect_and_run(lambda s: asyncio.sleep(0))
        srv.close()

    run(body)


def test_a_config_file_read_from_a_pipe_keeps_its_size_limit(tmp_path):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            try:
                f.write(b"# " + b"x" * (MAX_CONFIG_BYTES + 10) + b"\n")
            except BrokenPipeError:
                pass  # the reader stopped at the limit

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="byte limit"):
        load_client_file(str(fifo))
    writer.join(10)
    assert time.monotonic() - t0 < 30


def test_deeply_nested_toml_is_a_clear_error(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UsageError, match="nested too deeply"):
        load_client_file(str(deep))
