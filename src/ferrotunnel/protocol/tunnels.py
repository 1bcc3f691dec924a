"""The tunnels extension ("tunnels/1"): more tunnel ids on one session, with the protocol's own
``Register`` and ``RegisterAck`` frames (PROTOCOL.md: defined, never sent by a 1.0.2 peer).

A client that serves several tunnels announces ``tunnels/1``; a server that can carry them
answers it. After the HandshakeAck (which gave the session its first tunnel id) the client sends
one ``Register`` per further tunnel:

- ``service_name``: the tunnel id;
- ``protocol``: HTTP or TCP (informative; the rules travel in the capabilities);
- ``metadata``: one entry, ``"caps"``, the capabilities a session of its own for this tunnel
  would announce (``access/1=...``, ``remote-port/1=N``, ``pool/1``, ``visitor-addr/1``, ...),
  separated by newlines, kept as ``keep_capabilities`` keeps a handshake's.

The server answers each, in the order they came, with one ``RegisterAck``: ``Success`` with the
tunnel's public URLs in ``public_url`` (separated by spaces; empty when it knows none), or a
refusal with the reason in ``public_url``: ``ServiceNameTaken`` (the id is held elsewhere;
``retry-after=S`` in the reason when a cluster handover is pending), ``InvalidServiceName`` (the
id may not be claimed: the client stops) or ``QuotaExceeded`` (``max_tunnels_per_session``).

Each stream the server opens for such a tunnel carries the header ``("ft-tunnel", ID)``; a stream
without it belongs to the handshake's tunnel. A client takes only ids it registered.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Deque, Optional, Sequence, Tuple

from ..frames import Protocol, Register, RegisterAck, RegisterStatus
from .extensions import Negotiated, keep_capabilities
from .handshake import printable
from .listener import CoreListener

__all__ = ["TunnelsMixin", "TUNNEL_HEADER", "CAPS_KEY", "MAX_REASON", "clean_text"]

log = logging.getLogger("ferrotunnel.core")

#: The OpenStream header that names the tunnel of a stream (absent: the handshake's tunnel).
TUNNEL_HEADER = "ft-tunnel"
#: The Register metadata key holding the tunnel's capabilities.
CAPS_KEY = "caps"
#: Longest reason or URL list a client keeps from a RegisterAck (it goes to a terminal).
MAX_REASON = 2000


def clean_text(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters, in printable ASCII (``handshake.printable``)."""
    return printable(text[:limit])


class TunnelsMixin:
    """The tunnels extension's part of ``SessionCore``."""

    is_client: bool
    closed: bool
    negotiated: Negotiated
    listener: CoreListener
    #: Client: the ids of the Registers sent and not answered yet, oldest first.
    _registering: Optional[Deque[str]] = None

    def _control(self, frame: Any) -> None:  # pragma: no cover - SessionCore's
        raise NotImplementedError

    @property
    def tunnels(self) -> bool:
        """Whether both ends negotiated the extension (more tunnel ids on this session)."""
        return "tunnels" in self.negotiated

    def send_register(self, tunnel_id: str, protocol: Protocol, capabilities: Sequence[str]) -> bool:
        """Client: ask to serve ``tunnel_id`` on this session too; the answer comes to the
        listener's ``on_register_ack``. False when the extension is off or the session closed."""
        if not self.is_client or self.closed or not self.tunnels:
            return False
        if self._registering is None:
            self._registering = deque()
        self._registering.append(tunnel_id)
        self._control(Register(tunnel_id, protocol, {CAPS_KEY: "\n".join(capabilities)}))
        return True

    def send_register_ack(self, status: RegisterStatus, text: str) -> bool:
        """Server: answer the oldest unanswered Register (``text``: the URLs, or the reason)."""
        if self.is_client or self.closed or not self.tunnels:
            return False
        self._control(RegisterAck(text, status))
        return True

    def on_other_frame(self, frame: Any) -> None:
        """A control frame the core itself does not act on: Register and RegisterAck when the
        extension is on; anything else (StreamAck, a late handshake) is ignored."""
        t = type(frame)
        if self.tunnels and t is Register and not self.is_client:
            raw = frame.metadata.get(CAPS_KEY, "") if isinstance(frame.metadata, dict) else ""
            caps: Tuple[str, ...] = keep_capabilities(raw.split("\n")) if raw else ()
            on_register: Any = getattr(self.listener, "on_register", None)
            if on_register is not None:
                on_register(frame.service_name, frame.protocol, caps)
            return
        if self.tunnels and t is RegisterAck and self.is_client and self._registering:
            tunnel_id = self._registering.popleft()
            on_ack: Any = getattr(self.listener, "on_register_ack", None)
            if on_ack is not None:
                on_ack(tunnel_id, frame.status, clean_text(frame.public_url))
            return
        log.debug("ignoring %s frame", t.__name__)
