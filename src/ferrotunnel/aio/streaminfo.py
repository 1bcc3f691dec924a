"""What a ``VirtualStream`` says about itself (``get_extra_info``, the visitor's address) and the
types of its seam: ``BytesLike`` and ``StreamSink``, the typed protocol through which a consumer
such as a TCP bridge takes a stream's data directly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol as TypingProtocol, Tuple, Union

from ..errors import FerroTunnelError
from ..protocol.extensions import VISITOR_HEADER

if TYPE_CHECKING:
    from .stream import VirtualStream

__all__ = ["BytesLike", "StreamSink", "EXTRA_INFO_KEYS", "check_limit", "visitor_address", "extra_info"]

#: What ``VirtualStream.write`` and friends take.
BytesLike = Union[bytes, bytearray, memoryview]

#: The names ``VirtualStream.get_extra_info`` knows.
EXTRA_INFO_KEYS = ("peername", "tunnel_id", "session_id", "protocol", "stream_id", "priority", "headers")


class StreamSink(TypingProtocol):
    """Takes a stream's events instead of its read buffer, once ``VirtualStream.attach_sink``
    is called. Tunnel data arrives as views of the tunnel's read buffer: a sink copies what it
    keeps past the call, and returns credit with ``VirtualStream.consumed`` when the bytes are
    gone. ``flush_out`` runs once after each tunnel read that gave it data (see ``defer_flush``)."""

    def tunnel_data(self, payload: memoryview) -> None:
        """Bytes of the stream, a view valid only during the call."""

    def tunnel_eof(self) -> None:
        """The peer half-closed the stream."""

    def tunnel_reset(self, exc: BaseException) -> None:
        """The stream was reset or its connection lost (``exc`` says which)."""

    def tunnel_writable(self) -> None:
        """The stream's send buffer has room again (after ``request_writable``)."""

    def flush_out(self) -> None:
        """Write out what the tunnel reads just delivered (once per read)."""


def check_limit(value: Any) -> int:
    """``value`` if it is a positive int (a read cap), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"limit must be a positive int, got {value!r}")
    return value


def visitor_address(headers: Iterable[Tuple[str, str]]) -> Optional[Tuple[str, int]]:
    """The visitor's ``(host, port)`` from an OpenStream's ``ft-visitor`` header (``HOST:PORT``,
    an IPv6 host with or without brackets), or None."""
    for name, value in headers:
        if name == VISITOR_HEADER:
            host, _, port = value.rpartition(":")
            if host and port.isdigit():
                return host.strip("[]"), int(port)
    return None


def extra_info(stream: "VirtualStream", name: str, default: Any = None) -> Any:
    """``stream.get_extra_info(name, default)``: see ``EXTRA_INFO_KEYS``."""
    if name == "peername":
        value: Any = stream.peername
    elif name == "protocol":
        value = stream.protocol
    elif name == "stream_id":
        value = stream.stream_id
    elif name == "priority":
        value = stream.priority
    elif name == "headers":
        value = stream.headers
    elif name in ("tunnel_id", "session_id"):
        try:
            session = stream.session
        except FerroTunnelError:  # the session is gone
            return default
        value = session.tunnel_id if name == "tunnel_id" else session.id
    else:
        return default
    return default if value is None else value
