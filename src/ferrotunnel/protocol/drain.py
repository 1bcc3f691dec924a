"""The drain extension ("drain/1"): a server node that is leaving hands its clients over.

Both ends send one ``PluginData`` with plugin id ``ft.drain/1`` and no payload:

1. the server, when its node is leaving: "open a new session now (through the balancer, to
   another node); the streams in flight finish on this one";
2. the client, on the old session, once its new session is up: "moved". From then on the server
   closes the old session as soon as none of its streams is open (it knows when the last byte of
   each went out; the client cannot), or at the end of its grace period.

A notice the server did not ask for is ignored. A Rust peer never announces the capability, so it
never sees the frame (it is cut off when the node exits)."""

from __future__ import annotations

import logging
from typing import Any

from ..frames import Error, ErrorCode, PluginData
from .extensions import DRAIN_PLUGIN_ID, Negotiated
from .listener import CoreListener

__all__ = ["DrainMixin"]

log = logging.getLogger("ferrotunnel.core")

#: Longest reason sent in a goodbye (a control frame: well under max_control_frame).
MAX_GOODBYE = 400


class DrainMixin:
    """The drain extension's part of ``SessionCore``."""

    is_client: bool
    closed: bool
    negotiated: Negotiated
    listener: CoreListener
    #: Client: the server asked this session to move. Server: the client said it moved.
    peer_draining = False
    #: Server: this session was asked to move.
    drain_sent = False

    def _control(self, frame: Any) -> None:  # pragma: no cover - SessionCore's
        raise NotImplementedError

    def on_drain(self, data: Any) -> None:
        """PluginData of the drain extension (see the module doc)."""
        if not self.is_client and not self.drain_sent:
            log.debug("ignoring a drain notice the server did not ask for")
            return
        if not self.peer_draining:
            self.peer_draining = True
            self.listener.on_peer_draining()

    def send_drain(self) -> bool:
        """Server: ask the client to move. Client: say it moved (only after being asked). False
        when the peer did not negotiate the extension, the session is closed, or (client) nobody
        asked."""
        if self.closed or "drain" not in self.negotiated or (self.is_client and not self.peer_draining):
            return False
        if not self.is_client:
            self.drain_sent = True
        self._control(PluginData(DRAIN_PLUGIN_ID, b""))
        return True

    def send_goodbye(self, message: str) -> None:
        """Say why the session is about to end (a session-level ``Error``, SERVICE_UNAVAILABLE; any
        peer, a Rust one too, reads it as the session's end), e.g. "another node holds this tunnel
        id". The caller closes the connection after it."""
        if not self.closed:
            self._control(Error(None, ErrorCode.SERVICE_UNAVAILABLE, message[:MAX_GOODBYE]))
