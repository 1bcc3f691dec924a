"""A client must not hammer a server that keeps ending its sessions: each test here failed before
its fix.

* a server that sent every new session away (a drain notice at once) got a new session at once,
  each time, forever: hundreds of handshakes a second, and every sent-away session kept beside
  the live one;
* a server that took the handshake and hung up got a reconnect after the base delay every time
  (the backoff started over with each handshake), about one a second forever;
* a frame that ended the session right behind the HandshakeAck raised InvalidStateError inside
  the protocol, and connect() blamed the handshake.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import ferrotunnel as ft
import ferrotunnel.client.client as client_mod

TOKEN = "storm-token-0123456789"


async def _each_new_session(server: ft.TunnelServer, act, seconds: float) -> list:
    """Call ``act(session)`` once for each new server-side session for ``seconds``; the sessions seen."""
    seen: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for s in list(server.sessions):
            if s not in seen and not s.is_closed:
                seen.append(s)
                act(s)
        await asyncio.sleep(0.002)
    return seen


async def _client_meets(backoff: ft.BackoffConfig, tunnel_id: str, act, seconds: float, check=None) -> list:
    """A server, and a client with ``backoff`` running ``connect_and_run`` against it while
    ``act(session)`` runs for each new server-side session for ``seconds``; the sessions seen.
    ``check(client, task)`` runs before the client is stopped."""
    async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
        client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=tunnel_id,
                                 config=ft.ClientConfig(backoff=backoff))
        task = asyncio.create_task(client.connect_and_run())
        try:
            seen = await _each_new_session(server, lambda s: act(client, s), seconds)
            if check is not None:
                check(client, task)
            return seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()


def test_a_server_sending_every_session_away_gets_no_reconnect_storm(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel.client")
    retiring_max = []

    async def body():
        def away(client, s):
            assert s.send_drain()
            retiring_max.append(len(client._retiring))

        def still_running(client, task):
            assert not task.done(), task.exception()

        # (max_attempts=1: a drain is no failed attempt, the client never gives up for drains)
        seen = await _client_meets(ft.BackoffConfig(base=0.2, factor=2, jitter=0, max_attempts=1), "storm", away,
                                   3.0, still_running)
        # DRAIN_MOVES_AT_ONCE sessions at once, then 0.2, 0.4, 0.8, 1.6 s apart: about 7 in 3 s
        assert 4 <= len(seen) <= 12, f"{len(seen)} sessions in 3 s"
        assert max(retiring_max) <= client_mod.MAX_RETIRING, retiring_max

    run(body, timeout=60)
    assert re.search(r"sent \d+ sessions in a row away \(drain\).*reconnecting in 0\.2s", caplog.text), caplog.text


def test_sessions_that_end_at_once_let_the_backoff_grow(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel.client")

    async def body():
        seen = await _client_meets(ft.BackoffConfig(base=0.1, factor=2, jitter=0, stable_after=5), "short",
                                   lambda client, s: s.close(), 2.5)
        assert 3 <= len(seen) <= 6, f"{len(seen)} sessions in 2.5 s"  # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s

    run(body, timeout=60)
    delays = re.findall(r"reconnecting in ([0-9.]+)s", caplog.text)
    assert delays[:4] == ["0.1", "0.2", "0.4", "0.8"], delays
    assert re.search(r"s after the handshake; reconnecting in 0\.2s", caplog.text), caplog.text


def test_a_session_that_lasted_starts_the_delays_over(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel.client")

    async def body():
        loop = asyncio.get_running_loop()
        await _client_meets(ft.BackoffConfig(base=0.1, factor=4, jitter=0, stable_after=0.3), "steady",
                            lambda client, s: loop.call_later(0.4, s.close), 2.0)

    run(body, timeout=60)
    delays = re.findall(r"reconnecting in ([0-9.]+)s", caplog.text)
    assert len(delays) >= 3 and set(delays) == {"0.1"}, delays


def test_a_frame_that_ends_the_session_right_behind_the_ack_is_no_internal_error(run, caplog):
    """A HandshakeAck with a malformed frame behind it in the same read: the session opened and
    ended in one call. Before, setting the ack's result then raised InvalidStateError inside
    data_received (asyncio's "Fatal error" line) and connect() said the server closed the
    connection before answering the handshake."""
    import uuid

    from ferrotunnel import frames as F

    caplog.set_level(logging.DEBUG)

    async def body():
        async def serve(reader, writer):
            await reader.read(65536)  # the Handshake
            ack = F.HandshakeAck(session_id=uuid.uuid4(), status=F.HandshakeStatus.SUCCESS, version=1,
                                 server_capabilities=["basic", "tcp"])
            writer.write(F.encode(ack) + b"\x00\x00\x00\x05\xee\xee\xee\xee\xee")  # an unknown frame type
            await writer.drain()
            await asyncio.sleep(1)
            writer.close()

        fake = await asyncio.start_server(serve, "127.0.0.1", 0)
        try:
            client = ft.TunnelClient("127.0.0.1:%d" % fake.sockets[0].getsockname()[1], TOKEN, tunnel_id="x")
            try:
                session = await asyncio.wait_for(client.connect(), 10)
            except ft.FerroTunnelError as exc:
                said = str(exc)
            else:
                await asyncio.wait_for(session.wait_closed(), 10)
                said = str(session.connection.close_exc)
            await client.close()
        finally:
            fake.close()
        assert "before answering the handshake" not in said, said

    run(body, timeout=30)
    assert "InvalidStateError" not in caplog.text and "Fatal error" not in caplog.text, caplog.text
