"""aio.dial: the forwarded stream's local connect, with asyncio.timeout's rule for its timeout (its
own expiry is TimeoutError; a cancellation from anyone else goes on as CancelledError)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from ferrotunnel.aio.dial import dial


class _Proto(asyncio.Protocol):
    made = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.made += 1
        self.transport = transport


@contextlib.contextmanager
def _black_hole():
    """An address whose connects hang: a listener with a full accept queue (SYNs are dropped)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(hole.getsockname())
        fillers.append(f)
    try:
        yield hole.getsockname()
    finally:
        for f in fillers:
            f.close()
        hole.close()


def test_dial_connects(run) -> None:
    async def body() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        p = _Proto()
        assert await dial(p, host, port, 5.0) is None
        assert p.made == 1
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        p.transport.close()
        server.close()

    run(body)


def test_dial_refused_returns_a_fresh_error(run) -> None:
    async def body() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nobody listens there
        err = await dial(_Proto(), "127.0.0.1", port, 5.0)
        assert isinstance(err, ConnectionRefusedError)
        assert err.__traceback__ is None  # a new exception, not the loop's (which sits in a cycle)

    run(body)


def test_dial_times_out_and_leaves_the_task_uncancelled(run) -> None:
    async def body() -> None:
        with _black_hole() as (host, port):
            err = await dial(_Proto(), host, port, 0.05)
            assert type(err) is TimeoutError
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
            await asyncio.sleep(0)  # no cancellation left pending for the caller

    run(body)


def test_a_cancellation_from_outside_is_not_a_timeout(run) -> None:
    async def body() -> None:
        with _black_hole() as (host, port):
            task = asyncio.create_task(dial(_Proto(), host, port, 30.0))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                raise AssertionError(f"the caller's cancellation was swallowed: {task.result()!r}")

    run(body)


def test_an_outer_timeout_still_fires_through_dial(run) -> None:
    """Nested under the caller's own asyncio.timeout (shorter than dial's), the caller's wins."""
    async def body() -> None:
        with _black_hole() as (host, port):
            try:
                async with asyncio.timeout(0.05):
                    await dial(_Proto(), host, port, 30.0)
            except TimeoutError:
                return
            raise AssertionError("the outer timeout did not fire")

    run(body)
