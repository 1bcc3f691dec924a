"""``session_recv_limit``: with flow control every new stream starts with ``initial_window`` of
credit, so credit alone let a peer make a session hold ``max_streams_per_session`` times that
unread (2.5 GiB with the defaults). The limit bounds it: a Data frame that would pass it resets
its stream, whatever credit the stream had, and the others go on."""

from __future__ import annotations

import pytest

from ferrotunnel import frames as F
from ferrotunnel.config import ServerConfig, StreamConfig
from ferrotunnel.errors import LimitExceededError, StreamResetError
from ferrotunnel.protocol import EXT_CAPABILITY, SessionCore, flow_capability
from ferrotunnel.protocol.flow import decode_credit

from test_core_fixes import Recorder, sent

KiB = 1024
WINDOW = 64 * KiB
FLOW_PEER = ("basic", "tcp", EXT_CAPABILITY, flow_capability(WINDOW))


def core_with(limit: int, budget: int = WINDOW, max_window: int = WINDOW):
    rec = Recorder()
    config = StreamConfig(initial_window=WINDOW, max_window=max_window, session_recv_budget=budget,
                          session_recv_limit=limit)
    core = SessionCore(is_client=False, config=config, listener=rec, now=0.0, peer_capabilities=FLOW_PEER)
    assert core.flow
    return core, rec


def data(sid: int, n: int) -> bytes:
    return F.encode(F.Data(sid, b"d" * n))


def test_a_frame_that_would_pass_the_limit_resets_only_its_stream():
    core, rec = core_with(limit=100 * KiB)
    a, b, c = core.open_stream(), core.open_stream(), core.open_stream()
    sent(core)
    core.receive(data(a.id, WINDOW), 1.0)  # a full window, within the limit: kept
    core.receive(data(b.id, 30 * KiB), 1.0)  # 94 KiB in all: kept
    assert core.total_unread == 94 * KiB and not rec.resets
    core.receive(data(c.id, 10 * KiB), 1.0)  # within c's credit, but 104 KiB would pass the limit
    assert isinstance(rec.resets.get(c.id), LimitExceededError)
    assert "session_recv_limit" in str(rec.resets[c.id])
    assert core.total_unread == 94 * KiB  # the refused bytes are not held
    assert c.id not in core.streams and a.id in core.streams and b.id in core.streams
    # the peer is told, with a code that is not a protocol error: it kept to its window
    errors = [f for f in sent(core) if isinstance(f, F.Error)]
    assert [(e.stream_id, e.code) for e in errors] == [(c.id, F.ErrorCode.SERVICE_UNAVAILABLE)]
    # once the application reads, the session takes data again
    core.consumed(a, WINDOW)
    core.receive(data(b.id, 20 * KiB), 1.0)
    assert core.total_unread == 50 * KiB and b.id in core.streams


def test_many_streams_each_within_credit_cannot_pass_the_limit():
    limit = 8 * WINDOW
    core, rec = core_with(limit=limit)
    streams = [core.open_stream() for _ in range(40)]  # credit for 40 windows: 2.5 MiB
    sent(core)
    for st in streams:
        core.receive(data(st.id, WINDOW), 1.0)
    assert core.total_unread <= limit
    assert len(rec.resets) == 40 - 8  # each stream past the eighth was reset
    assert all(isinstance(e, LimitExceededError) for e in rec.resets.values())


def test_a_window_overrun_is_still_a_protocol_error():
    core, rec = core_with(limit=100 * KiB)
    st = core.open_stream()
    sent(core)
    core.receive(data(st.id, WINDOW + 1), 1.0)
    assert isinstance(rec.resets[st.id], StreamResetError)
    assert not isinstance(rec.resets[st.id], LimitExceededError)
    assert [(f.stream_id, f.code) for f in sent(core) if isinstance(f, F.Error)] == [
        (st.id, F.ErrorCode.PROTOCOL_ERROR)]


@pytest.mark.parametrize("cfg", [dict(session_recv_limit=1), dict(session_recv_limit=63 * 1024 * 1024),
                                 dict(initial_window=512 * KiB, session_recv_budget=256 * KiB,
                                      session_recv_limit=384 * KiB)])
def test_a_limit_below_the_budget_or_the_initial_window_is_refused(cfg):
    with pytest.raises(ValueError, match="session_recv_limit"):
        ServerConfig(**cfg)


def test_the_default_limit():
    assert StreamConfig().session_recv_limit == 256 * 1024 * 1024


def test_an_honest_peer_whose_windows_grew_never_meets_the_limit(run):
    """Readers that kept up (their windows grew toward max_window) and then stall: grants and
    top-ups count the credit the peer already holds, so unread bytes plus credit stay within the
    limit all along and a peer that keeps to its credit is never reset. With every stream open
    from the start (12 first windows, 768 KiB, fit in the 1 MiB limit) that holds at every step.
    (This reset a stream before 012db12: a top-up over the budget promised what another stream's
    growth had taken.)"""
    import asyncio

    import ferrotunnel as ft
    from conftest import tunnel

    limit = 1024 * KiB
    cfg = dict(initial_window=64 * KiB, max_window=256 * KiB, session_recv_budget=256 * KiB,
               session_recv_limit=limit)

    async def body():
        async def handler(stream):  # the local service: an endless download
            try:
                while True:
                    stream.write(b"z" * 16384)
                    await stream.drain()
            except ft.FerroTunnelError:
                pass

        async with tunnel(handler, server_config=ft.ServerConfig(**cfg), client_config=ft.ClientConfig(**cfg)) as (
                server, client, session):
            core = session.connection.core
            streams = [await session.open_stream() for _ in range(12)]
            for s in streams:
                s.write(b"GET")
            worst = 0

            async def keep_up(s):
                nonlocal worst
                got = 0
                while got < 1024 * KiB:
                    got += len(await s.read(65536))
                    worst = max(worst, core.total_unread + core.windows.credit_out)

            await asyncio.wait_for(asyncio.gather(*(keep_up(s) for s in streams)), 60)
            assert max(core.streams[s.stream_id].window for s in streams) > 64 * KiB  # they grew
            await asyncio.sleep(1.0)  # the readers stall; the peer sends what its credit allows
            assert [s.exception for s in streams if s.exception is not None] == []
            assert worst <= limit and core.total_unread + core.windows.credit_out <= limit
            for s in streams:
                s.abort()

    run(body)


def test_the_limit_is_logged_once_a_session(caplog):
    import logging

    core, rec = core_with(limit=100 * KiB)
    streams = [core.open_stream() for _ in range(5)]
    sent(core)
    core.receive(data(streams[0].id, WINDOW), 1.0)
    with caplog.at_level(logging.DEBUG, logger="ferrotunnel.core"):
        for st in streams[1:]:
            core.receive(data(st.id, 40 * KiB), 1.0)
    said = [r for r in caplog.records if "session_recv_limit" in r.getMessage()]
    assert len(rec.resets) == 4 and len(said) == 4
    assert [r.levelno for r in said] == [logging.WARNING] + [logging.DEBUG] * 3


def test_the_peers_end_of_a_stream_gives_its_credit_back_to_the_limit():
    """Credit on a stream the peer ended can never be used: it no longer counts against the limit
    (before, half-closed streams' credit held every other stream to its first window)."""
    core, rec = core_with(limit=1024 * KiB)
    a, b = core.open_stream(), core.open_stream()
    core.open_stream()  # one the peer keeps open
    sent(core)
    assert core.windows.credit_out == 3 * WINDOW
    core.receive(F.encode(F.CloseStream(a.id, F.CloseReason.NORMAL)), 1.0)
    core.receive(F.encode(F.CloseStream(b.id, F.CloseReason.NORMAL)), 1.0)
    assert core.windows.credit_out == WINDOW and a.id in core.streams  # (still ours to end)


def test_a_window_grows_as_far_as_the_limit_leaves_room():
    """When the owed credit fits under the limit but a doubled window does not, the stream gets
    what it owes and as much growth as fits (before: only a top-up to its first window)."""
    core, rec = core_with(limit=160 * KiB, budget=128 * KiB, max_window=256 * KiB)
    bulk = core.open_stream()
    core.open_stream()  # an idle one, whose 64 KiB of credit the peer holds
    sent(core)
    core.receive(data(bulk.id, WINDOW), 1.0)
    core.consumed(bulk, WINDOW)  # the reader keeps up: owed 64 KiB, room for 32 KiB more
    assert (bulk.window, bulk.recv_avail) == (96 * KiB, 96 * KiB)
    assert core.windows.credit_out + core.total_unread <= 160 * KiB



def test_a_top_up_to_the_first_window_stays_within_the_limit():
    """Over the budget a stream is topped up to its first window; that top-up must come out of
    what the limit leaves, or a peer that keeps to its credit can pass the limit: here another
    stream's grant took the room that a stream's own reading had freed, and a top-up of 32 KiB
    would have promised 16 KiB the session cannot hold (an honest stream was reset for it once)."""
    core, rec = core_with(limit=256 * KiB, budget=128 * KiB, max_window=256 * KiB)
    a, b, c, d = (core.open_stream() for _ in range(4))  # 4 first windows: the whole limit
    sent(core)
    core.receive(data(a.id, WINDOW), 1.0)
    core.consumed(a, 16 * KiB)  # too little to grant yet: 16 KiB freed, owed to a
    core.receive(data(b.id, WINDOW), 1.0)
    core.consumed(b, WINDOW)  # b's grant and growth take all the room there is
    core.receive(data(c.id, WINDOW), 1.0)
    core.receive(data(d.id, WINDOW), 1.0)  # now over the budget
    core.consumed(a, 16 * KiB)  # a is owed 32 KiB; its top-up may only use what is left
    limit = core.config.session_recv_limit
    assert core.total_unread + core.windows.credit_out <= limit
    for st in (a, b):  # the peer sends all the credit it holds
        core.receive(data(st.id, st.recv_avail), 1.0)
    assert not rec.resets and core.total_unread <= limit


def test_bytes_dropped_unread_let_credit_held_back_for_the_budget_go():
    """``consumed(st, 0)`` after ``drop_unread`` (an abandoned stream, a failed sink): the budget
    they held is free again, and credit deferred for it goes at once rather than on some other
    stream's next read (before, a count of 0 returned before looking)."""
    core, rec = core_with(limit=2 * WINDOW)
    a, b = core.open_stream(), core.open_stream()
    sent(core)
    core.receive(data(a.id, WINDOW), 1.0)  # a holds a window, unread
    c = core.open_stream()  # a first window of credit, whatever the limit leaves
    core.receive(data(b.id, WINDOW), 1.0)
    core.consumed(b, WINDOW)  # b read its window; a's unread and c's credit fill the limit: held back
    assert not [f for f in sent(core) if isinstance(f, F.PluginData)] and b in core.windows.deferred
    core.windows.drop_unread(a)  # nobody will read a's bytes
    core.consumed(a, 0)
    credit = [f for f in sent(core) if isinstance(f, F.PluginData)]
    assert len(credit) == 1 and core.total_unread == 0 and c.id in core.streams


# ------------------------------------------------------------------ server_recv_limit


def test_the_server_limit_bounds_what_all_sessions_hold_together():
    """Each session within its own limit, together past the server's: the frame that would take
    the server over resets its stream (the server's limit named), the others go on, and bytes
    read anywhere make room again."""
    from ferrotunnel.protocol.flow import RecvAccount

    account = RecvAccount(100 * KiB)
    cores = []
    for _ in range(2):
        rec = Recorder()
        config = StreamConfig(initial_window=WINDOW, max_window=WINDOW, session_recv_budget=WINDOW,
                              session_recv_limit=1024 * KiB)
        core = SessionCore(is_client=False, config=config, listener=rec, now=0.0, peer_capabilities=FLOW_PEER,
                           recv_account=account)
        cores.append((core, rec))
    (one, rec1), (two, rec2) = cores
    a = one.open_stream()
    b, c = two.open_stream(), two.open_stream()
    sent(one), sent(two)
    one.receive(data(a.id, WINDOW), 1.0)
    two.receive(data(b.id, 30 * KiB), 1.0)
    assert account.unread == 94 * KiB and not rec1.resets and not rec2.resets
    two.receive(data(c.id, 10 * KiB), 1.0)  # within c's credit and its session's limit: the server's
    assert isinstance(rec2.resets.get(c.id), LimitExceededError)
    assert "server_recv_limit" in str(rec2.resets[c.id])
    assert [(e.stream_id, e.code) for e in sent(two) if isinstance(e, F.Error)] == [
        (c.id, F.ErrorCode.SERVICE_UNAVAILABLE)]
    assert account.unread == 94 * KiB and b.id in two.streams
    one.consumed(a, WINDOW)  # read on the other session: room again
    assert account.unread == 30 * KiB
    two.receive(data(b.id, 20 * KiB), 1.0)
    assert account.unread == 50 * KiB and b.id in two.streams
    two.windows.drop_unread(b)
    assert account.unread == 0


def test_the_server_limit_default_and_check():
    from ferrotunnel.config import ServerConfig

    assert ServerConfig().server_recv_limit == 1024 * 1024 * 1024
    with pytest.raises(ValueError, match="server_recv_limit"):
        ServerConfig(server_recv_limit=128 * 1024 * 1024)  # below session_recv_limit (256 MiB)
    ServerConfig(server_recv_limit=64 * 1024 * 1024, session_recv_limit=64 * 1024 * 1024)


def test_two_clients_together_meet_the_server_limit_and_the_count_returns_to_zero(run):
    """End to end: two clients each write within their credit to a server that does not read;
    together they would pass server_recv_limit, so streams past it are reset with the server's
    limit named. Once the server side reads, closes or loses its streams, the account is 0."""
    import asyncio

    import ferrotunnel as ft

    cfg = dict(initial_window=256 * KiB, max_window=256 * KiB, session_recv_budget=256 * KiB,
               session_recv_limit=1024 * KiB)
    server_cfg = ft.ServerConfig(server_recv_limit=1024 * KiB, **cfg)
    held = []

    async def server_handler(stream):  # holds every stream unread
        held.append(stream)
        await asyncio.sleep(60)

    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), "tok", config=server_cfg, stream_handler=server_handler)
        async with server:
            host, port = server.address
            clients, tasks = [], []
            for tid in ("one", "two"):
                c = ft.TunnelClient(f"{host}:{port}", "tok", tunnel_id=tid, config=ft.ClientConfig(**cfg))
                tasks.append(asyncio.create_task(c.connect_and_run(lambda s: asyncio.sleep(60))))
                await server.wait_for_session(tid, timeout=10)
                clients.append(c)
            streams = []
            for c in clients:
                while c.session is None:
                    await asyncio.sleep(0.01)
                for _ in range(3):
                    s = await c.session.open_stream()
                    s.write(b"x" * (256 * KiB))  # within its first window: an honest peer
                    streams.append(s)
            # 6 x 256 KiB offered, 1 MiB may be held: at least two streams are reset
            async with asyncio.timeout(20):
                while sum(s.exception is not None for s in streams) < 2:
                    await asyncio.sleep(0.02)
            errors = [s.exception for s in streams if s.exception is not None]
            assert server.recv_account.unread <= 1024 * KiB
            assert any("server" in str(e) for e in errors), errors
            # reading some, closing some, and the sessions' end: nothing stays counted
            assert await held[0].read(1000)
            held[1].close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            async with asyncio.timeout(10):
                while server.recv_account.unread:
                    import gc
                    gc.collect()
                    await asyncio.sleep(0.02)

    run(body)


def test_a_stream_goes_on_when_idle_streams_credit_alone_passes_the_limit():
    """Many idle streams (their first windows alone pass the limit: 9,990 on a default session)
    must not stop the one stream in use once it used its first window: it is topped up again as
    it reads. (Since the top-up was capped by the credit out, the benchmark's ping-pong with 9,990
    idle streams stopped for good after 256 KiB.)"""
    core, rec = core_with(limit=8 * WINDOW)
    idle = [core.open_stream() for _ in range(20)]  # 20 first windows: 2.5 x the limit
    busy = core.open_stream()
    sent(core)
    for _ in range(5):  # five windows' worth, read as they come
        core.receive(data(busy.id, WINDOW), 1.0)
        core.consumed(busy, WINDOW)
        credit = sum(inc for f in sent(core) if isinstance(f, F.PluginData)
                     for sid, inc in decode_credit(f.data) or () if sid == busy.id)
        assert credit == WINDOW and busy.recv_avail == WINDOW, credit
    assert not rec.resets and core.total_unread == 0 and len(idle) == 20


def test_a_session_with_idle_streams_past_the_limit_still_carries_a_busy_one(run):
    """End to end, real sockets: a server whose session_recv_limit is passed by its idle streams'
    first windows alone still takes, and a busy stream still moves, many windows of data."""
    import asyncio

    import ferrotunnel as ft
    from test_cluster_links import _echo_app

    async def body():
        backend, baddr = await _echo_app()
        cfg = ft.ServerConfig(initial_window=64 * KiB, max_window=64 * KiB, session_recv_budget=128 * KiB,
                              session_recv_limit=256 * KiB)
        server = ft.TunnelServer(("127.0.0.1", 0), "recv-limit-token-0123", config=cfg)
        async with server, ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="rl") as ingress:
            client = ft.TunnelClient("%s:%d" % server.address, "recv-limit-token-0123", tunnel_id="rl",
                                     config=ft.ClientConfig(local_addr=baddr))
            task = asyncio.create_task(client.connect_and_run())
            await server.wait_for_session("rl", timeout=10)
            idle = [await asyncio.open_connection(*ingress.address) for _ in range(8)]  # 8 windows: 2 x the limit
            for _, w in idle:
                w.write(b"i")
            r, w = await asyncio.open_connection(*ingress.address)
            for _ in range(40):  # 40 windows each way through one stream
                w.write(b"p" * (64 * KiB))
                assert await asyncio.wait_for(r.readexactly(64 * KiB), 10) == b"p" * (64 * KiB)
            w.close()
            for _, iw in idle:
                iw.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        backend.close()

    run(body)

