"""The local connect of a forwarded stream, with its timeout and without reference cycles."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

__all__ = ["dial"]


async def dial(bridge: asyncio.BaseProtocol, host: str, port: int, timeout: float) -> Optional[BaseException]:
    """Connect ``bridge`` to ``host:port``; the error, or None. A failed connect leaves the loop's
    exception, its traceback and futures in a reference cycle (a timeout: the cancellation's too),
    holding every frame it passed through until the cyclic GC runs. So this frame knows no stream,
    the bridge is reached through a box that a failure empties, and the caller gets a fresh error.
    The timeout is ``asyncio.timeout``'s rule (a cancellation of ours becomes TimeoutError, anyone
    else's goes on) with one timer handle: the context manager cost ~30,000 instructions per stream open."""
    box = [bridge]
    del bridge
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)  # (given the loop it is not looked up again: a getpid() call less)
    assert task is not None
    cancelling = task.cancelling()
    expired: list = []
    timer = loop.call_later(timeout, _expire, task, expired)
    try:
        await loop.create_connection(lambda: box[0], host, port)
    except OSError as exc:
        box.clear()
        return type(exc)(*exc.args)
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:
            box.clear()
            return TimeoutError()
        raise
    finally:
        timer.cancel()
    if expired:  # the connection was made as the time ran out: the cancellation is ours, not the caller's
        task.uncancel()
    return None


def _expire(task: "asyncio.Task[Any]", expired: list) -> None:
    expired.append(True)
    task.cancel()
