"""The handshake of both sides, sans-IO: bytes in, a request or a result out, ack bytes out.

The server side::

    hs = ServerHandshake(config)
    hs.receive_data(data)          # FrameError: not a Handshake (refused from its first bytes)
    if hs.request is not None:     # a whole Handshake arrived
        ...                        # the server's policy decides (token, limits, tunnel id); may await
        wire = hs.accept()         # or hs.reject(HandshakeStatus.INVALID_TOKEN, "wrong token")
        # hs.leftover: bytes pipelined behind the Handshake, for the session core

The client side::

    hs = ClientHandshake(token, tunnel_id, config)
    send(hs.data_to_send())
    hs.receive_data(data)          # HandshakeError (with .status) when the server refused
    if hs.result is not None: ...  # accepted: session id, server capabilities, what was negotiated

Neither side allocates from a length the peer claims: the first frame's length prefix, type
byte and control variant are checked as they arrive, and a frame longer than
``max_handshake_frame`` is refused from its length prefix, before its body is buffered.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

from ..config import ClientConfig, ServerConfig, StreamConfig
from ..errors import AuthenticationError, FrameError, HandshakeError, RetryableHandshakeError
from ..frames import (
    FRAME_PREFIX_SIZE,
    FRAME_TYPE_CONTROL,
    PROTOCOL_VERSION,
    VARIANT_HANDSHAKE,
    VARIANT_HANDSHAKE_ACK,
    Handshake,
    HandshakeAck,
    HandshakeStatus,
    decode_control,
    encode,
)
from .extensions import (
    BASE_CLIENT_CAPABILITIES,
    REASON_CAPABILITY,
    Negotiated,
    client_capabilities,
    keep_capabilities,
    negotiate,
    server_capabilities,
)

__all__ = ["ServerHandshake", "ClientHandshake", "HandshakeRequest", "HandshakeResult", "MAX_REASON_LEN", "printable"]

#: Longest reason sent with a refusal (it travels as one capability string).
MAX_REASON_LEN = 200
_REASON_PREFIX = "reason="
_NIL = uuid.UUID(int=0)
#: Control variants by wire index, for saying what a wrong first frame was.
_VARIANTS = ("Handshake", "HandshakeAck", "Register", "RegisterAck", "OpenStream", "StreamAck", "Data",
             "CloseStream", "Heartbeat", "HeartbeatAck", "Error", "PluginData")
#: First bytes of a TLS record (alert, handshake) where a plaintext frame was expected.
_TLS_RECORD_TYPES = (0x15, 0x16)
_TLS_HINT = {
    VARIANT_HANDSHAKE: "the client speaks TLS but this server is plaintext: start the server with "
                       "--tls-cert/--tls-key, or connect without --tls",
    VARIANT_HANDSHAKE_ACK: "the server answered with TLS: connect with --tls (and --tls-ca if its "
                           "certificate is not in the system trust store)",
}
_HEAD = FRAME_PREFIX_SIZE + 2  # length prefix, type byte, first byte of the variant index
_LEN = struct.Struct(">I")


class _FirstFrame:
    """Collects one control frame of one variant, checking each header byte as it arrives."""

    __slots__ = ("variant", "limit", "buf", "need", "leftover")

    def __init__(self, variant: int, limit: int) -> None:
        self.variant = variant
        self.limit = limit
        self.buf = bytearray()
        self.need = 0  # whole frame size, known once the prefix is in
        self.leftover = b""

    def feed(self, data: Any) -> Optional[bytes]:
        """Returns the control body once the frame is complete; FrameError if it cannot be one."""
        view = memoryview(data)
        buf = self.buf
        if len(buf) < _HEAD:
            take = _HEAD - len(buf)
            buf += view[:take]
            view = view[take:]
            self._check_head()
            if len(buf) < _HEAD:
                return None
        take = self.need - len(buf)
        buf += view[:take]
        if len(buf) < self.need:
            return None
        self.leftover = bytes(view[take:])
        body = bytes(buf[FRAME_PREFIX_SIZE + 1:])
        self.buf = bytearray()  # done: hold nothing more than the caller needs
        return body

    def _check_head(self) -> None:
        buf = self.buf
        want = _VARIANTS[self.variant]
        if len(buf) >= 2 and buf[0] in _TLS_RECORD_TYPES and buf[1] == 3:  # a TLS record, not a frame
            raise FrameError(_TLS_HINT[self.variant])
        if len(buf) >= FRAME_PREFIX_SIZE and not self.need:
            (length,) = _LEN.unpack_from(buf)
            if length < 2:
                raise FrameError(f"first frame has length {length}; a {want} is longer")
            if length > self.limit:
                raise FrameError(f"first frame claims {length} bytes; a {want} is at most {self.limit} "
                                 "(max_handshake_frame)")
            self.need = FRAME_PREFIX_SIZE + length
        if len(buf) > FRAME_PREFIX_SIZE and buf[FRAME_PREFIX_SIZE] != FRAME_TYPE_CONTROL:
            raise FrameError(f"first frame is a data frame, not a {want}")
        if len(buf) > FRAME_PREFIX_SIZE + 1 and buf[FRAME_PREFIX_SIZE + 1] != self.variant:
            idx = buf[FRAME_PREFIX_SIZE + 1]
            name = _VARIANTS[idx] if idx < len(_VARIANTS) else f"control variant {idx}"
            raise FrameError(f"first frame is {name}, not a {want}")


def _limit(config: StreamConfig) -> int:
    return min(config.max_handshake_frame, config.max_frame_size)


@dataclass(frozen=True)
class HandshakeRequest:
    """What a client asked for. The token is a secret: it is left out of the repr."""

    token: str = field(repr=False)
    tunnel_id: Optional[str]
    min_version: int
    max_version: int
    capabilities: Tuple[str, ...]

    @property
    def version_ok(self) -> bool:
        """The client's version range includes ours (and is a range at all)."""
        return self.min_version <= PROTOCOL_VERSION <= self.max_version


@dataclass(frozen=True)
class HandshakeResult:
    """An accepted handshake, as the client sees it."""

    session_id: uuid.UUID
    version: int
    server_capabilities: Tuple[str, ...]
    negotiated: Negotiated


class ServerHandshake:
    """The server's side of one handshake."""

    def __init__(self, config: ServerConfig = ServerConfig()) -> None:
        self.config = config
        self._frame = _FirstFrame(VARIANT_HANDSHAKE, _limit(config))
        self.request: Optional[HandshakeRequest] = None
        #: Set by ``accept``: the session id and what both ends agreed on.
        self.session_id: Optional[uuid.UUID] = None
        self.negotiated: Optional[Negotiated] = None
        self._answered = False

    @property
    def leftover(self) -> bytes:
        """Bytes that followed the Handshake (frames the client pipelined)."""
        return self._frame.leftover

    @property
    def buffered(self) -> int:
        """Bytes of the first frame held so far (bounded by ``max_handshake_frame``; 0 once the
        frame is complete)."""
        return len(self._frame.buf)

    def take_leftover(self) -> bytes:
        """``leftover``, handed over: the handshake keeps no copy."""
        out, self._frame.leftover = self._frame.leftover, b""
        return out

    def receive_data(self, data: Any) -> None:
        """Feed bytes from the client (any bytes-like object, in pieces of any size). Once a whole
        Handshake has arrived ``request`` is set; bytes after it, and all fed later, go to
        ``leftover``. FrameError as soon as the first bytes cannot begin a Handshake: a data frame,
        another control frame, a length over ``max_handshake_frame``, or a TLS record (the message
        says how to fix the TLS mismatch)."""
        if self.request is not None:
            self._frame.leftover += bytes(data)
            return
        body = self._frame.feed(data)
        if body is None:
            return
        hs = decode_control(body)
        assert type(hs) is Handshake  # the variant was checked from its first byte
        self.request = HandshakeRequest(hs.token, hs.tunnel_id, hs.min_version, hs.max_version,
                                        keep_capabilities(hs.capabilities))

    def _answer(self) -> HandshakeRequest:
        if self.request is None:
            raise RuntimeError("no Handshake has arrived yet")
        if self._answered:
            raise RuntimeError("this handshake was already answered")
        self._answered = True
        return self.request

    def accept(self, session_id: Optional[uuid.UUID] = None, extra_capabilities: Sequence[str] = ()) -> bytes:
        """The Success ack (a fresh session id when none is given); sets ``negotiated``.
        ``extra_capabilities`` answer this client's requests (e.g. the port granted by the
        ports-on-request extension, which only a client that asked for one gets)."""
        req = self._answer()
        self.session_id = session_id or uuid.uuid4()
        self.negotiated = negotiate(self.config, req.capabilities)
        return encode(HandshakeAck(self.session_id, HandshakeStatus.SUCCESS, PROTOCOL_VERSION,
                                   server_capabilities(self.config) + list(extra_capabilities)))

    def reject(self, status: HandshakeStatus, reason: Optional[str] = None) -> bytes:
        """The refusal ack. The reason travels only to a client that announced it understands one."""
        req = self._answer()
        if status == HandshakeStatus.SUCCESS:
            raise ValueError("reject() needs a failure status")
        caps = []
        if reason and REASON_CAPABILITY in req.capabilities:
            caps.append(_REASON_PREFIX + printable(reason)[:MAX_REASON_LEN])
        # as the Rust server: a fresh id for TunnelIdTaken, the nil uuid otherwise
        sid = uuid.uuid4() if status == HandshakeStatus.TUNNEL_ID_TAKEN else _NIL
        return encode(HandshakeAck(sid, status, 0, caps))


def plaintext_refusal(reason: str) -> bytes:
    """A refusal ack (UnsupportedVersion, with ``reason``) for a client whose Handshake arrived in
    plaintext at a port that speaks TLS: sent in plaintext, so the client can read why and stop."""
    return encode(HandshakeAck(_NIL, HandshakeStatus.UNSUPPORTED_VERSION, 0,
                               [_REASON_PREFIX + printable(reason)[:MAX_REASON_LEN]]))


def printable(text: str) -> str:
    """``text`` with every character outside printable ASCII replaced by "?" (what a peer said,
    before it reaches a terminal or a log)."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)


class ClientHandshake:
    """The client's side of one handshake."""

    def __init__(self, token: str, tunnel_id: Optional[str] = None, config: ClientConfig = ClientConfig()) -> None:
        self.config = config
        self.capabilities = (client_capabilities(config, config.capabilities) if config.extensions
                             else list(BASE_CLIENT_CAPABILITIES) + list(config.capabilities))
        self._hello: Optional[bytes] = encode(Handshake(token, tunnel_id, PROTOCOL_VERSION, PROTOCOL_VERSION,
                                                        self.capabilities))
        self._frame = _FirstFrame(VARIANT_HANDSHAKE_ACK, _limit(config))
        self.result: Optional[HandshakeResult] = None

    def __repr__(self) -> str:  # the token stays out
        return f"<ClientHandshake result={self.result!r}>"

    @property
    def leftover(self) -> bytes:
        """Bytes that followed the HandshakeAck (frames the server sent right after it)."""
        return self._frame.leftover

    def data_to_send(self) -> bytes:
        """The Handshake frame, once; then nothing."""
        out, self._hello = self._hello, None
        return out or b""

    def receive_data(self, data: Any) -> None:
        """Feed bytes from the server (any bytes-like object, in pieces of any size). Once a whole
        HandshakeAck has arrived and it accepts, ``result`` is set; bytes after it, and all fed
        later, go to ``leftover``. Raises AuthenticationError for a rejected token,
        RetryableHandshakeError for RateLimited or TunnelIdTaken (``retry_after``: the server's
        hint, if any), and HandshakeError for any other refusal (with the server's reason when it
        sent one), a reply that is not a HandshakeAck (e.g. TLS to a plaintext client), or an
        acceptance without what this client's config requires (a remote port, access rules, a pool)."""
        if self.result is not None:
            self._frame.leftover += bytes(data)
            return
        try:
            body = self._frame.feed(data)
            if body is None:
                return
            ack = decode_control(body)
        except FrameError as exc:
            raise HandshakeError(f"malformed reply to the handshake: {exc}") from None
        assert type(ack) is HandshakeAck
        caps = tuple(ack.server_capabilities)
        if ack.status != HandshakeStatus.SUCCESS:
            raise _refusal(ack.status, _reason(caps))
        # what is agreed on comes from the capabilities a server keeps of a client's (bounded in
        # number and length), so both ends read the same ones; a reason is longer, read whole above
        kept = keep_capabilities(caps)
        negotiated = negotiate(self.config, kept) if self.config.extensions else Negotiated({})
        if self.config.remote_port is not None and "remote_port" not in negotiated:
            # the server (a Rust one, or one of an older version) accepted without the port asked for
            raise HandshakeError(f"the server does not give ports on request (remote port {self.config.remote_port} "
                                 "asked for): it needs --tcp-port-range and a ferrotunnel version that supports it",
                                 ack.status, None)
        if self.config.access is not None and "access" not in negotiated:  # never serve unguarded
            raise HandshakeError("the server does not enforce per-tunnel access (protocol, basic_auth, allow were "
                                 "asked for): it needs a ferrotunnel server version that supports them",
                                 ack.status, None)
        if self.config.pool and "pool" not in negotiated:
            raise HandshakeError("the server does not support pools (--pool): it needs a ferrotunnel server "
                                 "version that supports them", ack.status, None)
        self.result = HandshakeResult(ack.session_id, ack.version, kept, negotiated)


#: In a refusal's reason, "retry-after=SECONDS" asks the client to try again that soon (at most
#: MAX_RETRY_AFTER): how a cluster node says "handover pending" (reject-reason/1 peers only).
RETRY_AFTER_KEY = "retry-after="
MAX_RETRY_AFTER = 5.0


def retry_after_hint(reason: Optional[str]) -> Optional[float]:
    """The "retry-after=SECONDS" a refusal's reason carries, bounded; None without one."""
    if not reason or RETRY_AFTER_KEY not in reason:
        return None
    words = reason.split(RETRY_AFTER_KEY, 1)[1].split()
    if not words:  # nothing after it: a reason cut at MAX_REASON_LEN can end just there
        return None
    try:
        value = float(words[0].rstrip(";,)"))
    except ValueError:
        return None
    return min(max(value, 0.05), MAX_RETRY_AFTER) if value == value else None


def _reason(caps: Sequence[str]) -> Optional[str]:
    for cap in caps:
        if cap.startswith(_REASON_PREFIX):
            return printable(cap[len(_REASON_PREFIX):])[:MAX_REASON_LEN]
    return None


def _refusal(status: HandshakeStatus, reason: Optional[str]) -> HandshakeError:
    if status == HandshakeStatus.INVALID_TOKEN:
        said = f": {reason}" if reason else ""
        return AuthenticationError(
            f"the server rejected the token (InvalidToken{said}): check the token you configured", status, reason)
    said = f" ({reason})" if reason else ""
    if status in (HandshakeStatus.RATE_LIMITED, HandshakeStatus.TUNNEL_ID_TAKEN):
        err = RetryableHandshakeError(f"the server refused this attempt ({status.name}){said}; will retry",
                                      status, reason)
        err.retry_after = retry_after_hint(reason)
        return err
    if reason:  # the server's own words first: they name what to change
        return HandshakeError(f"the server refused the handshake: {reason} ({status.name})", status, reason)
    why = "incompatible protocol versions"
    if status == HandshakeStatus.UNSUPPORTED_VERSION:  # a Rust-style client hears no reason
        why += ", or a tunnel id it does not accept (with a domain: 1..63 of a-z, 0-9 and '-')"
    return HandshakeError(f"the server refused the handshake ({status.name}): {why}", status, reason)
