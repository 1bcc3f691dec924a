"""The HTTP ingress's answer to a request whose chunked body is malformed, for ``HttpBridge``
(``http_bridge.py``), and the bridge's states: a request body that can never be whole must not
hold the visitor until the idle timeout, nor reach the app looking whole."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..addr import format_peer
from .http_names import printable

__all__ = ["BadBodyMixin", "HEAD", "LENGTH", "CHUNKED", "RAW", "WAIT", "DISCARD"]

log = logging.getLogger("ferrotunnel.http")

#: An ``HttpBridge``'s states: reading a head, a Content-Length body, a chunked body, a raw pipe,
#: waiting (reading paused until the current stream's owed responses are out), discarding.
HEAD, LENGTH, CHUNKED, RAW, WAIT, DISCARD = range(6)


class BadBodyMixin:
    """``HttpBridge``'s methods for a malformed body (``self`` is the bridge)."""

    __slots__ = ()

    def bad_body(self: Any, status: str, reason: str) -> None:
        """The current request's chunked body is malformed. It can never be whole, so the app,
        waiting for the rest of it, would never answer, and waiting for that answer (as a bad
        later head does) would hold the visitor until the idle timeout. Reading stops for good;
        once the responses owed to the earlier requests on the stream are out, the stream is
        reset, so the app sees a cut request and never one that looks whole, and the visitor
        gets the 400 (``_settle_bad_body``); then the connection closes."""
        self._state = WAIT
        self._next = ("bad body", status, reason)
        self.stash.clear()  # nothing after it is forwarded
        self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self.settle_bad_body)

    def settle_bad_body(self: Any, final: bool = False) -> bool:
        """The answer to a malformed body (``_bad_body``), once the responses owed before it are
        out: the 400 if the app has not begun to answer the request; if it has, the visitor's
        connection is aborted (what began cannot end now, and a FIN would make it look whole);
        if it answered it whole, that answer stands and the connection closes. ``final``: the
        stream ended or was reset, and only the 400 is decided here (otherwise the caller goes
        on as for any stream that ends). True if it settled."""
        action = self._next
        if self.finished or self._state != WAIT or action is None or action[0] != "bad body":
            return False
        tracker = self.tracker
        owed = len(tracker.pending) if tracker is not None else 0
        lost = tracker is not None and (tracker.lost or tracker.raw)
        unanswered = tracker is None or (owed == 1 and not tracker.state and not tracker.head and not lost)
        if final and not unanswered:
            return False
        if not final and owed > 1 and not lost:
            return False  # tunnel_data calls again once the earlier answers are out
        self._next = None
        _, status, reason = action
        method, target, tunnel_id = self.request
        if self.stream is not None:
            # a reset, before anything that could pass for the request's end; what the stream
            # says after it (the reset itself, told back to its sink) is not news: dropped
            self._leaving = True
            self.stream.abort()
        if unanswered:
            log.info("http ingress: %s for %s: %s, in the body of %s %s to tunnel %s; its stream is reset",
                     status.split()[0], format_peer(self.peer_address), reason, printable(method), printable(target),
                     printable(tunnel_id))
            self.reply(status, reason + "\n")
        elif tracker is not None and tracker.idle:
            self.leave_stream()
            self.close()
        else:
            log.info("http ingress: %s from %s to tunnel %s: %s in its body after its response began; aborting "
                     "the visitor's connection", printable(method), format_peer(self.peer_address),
                     printable(tunnel_id), reason)
            self.abort()
        return True
