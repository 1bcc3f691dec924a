"""TLS for the server end of a tunnel connection, over memory BIOs.

The handshake runs inside our own protocol, so it counts as a pending handshake, obeys the
handshake timeout, never blocks accepting, and each failure is seen (and logged) by us. Records
are decrypted into pooled buffers.
"""

from __future__ import annotations

import ssl
from typing import Any, Callable, cast

from ..errors import ConnectionLostError
from ..pool import acquire_bytes, release_bytes

__all__ = ["ServerTls", "TlsHandshakeFailed"]


class TlsHandshakeFailed(Exception):
    """The client's TLS handshake failed; ``cause`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ServerTls:
    __slots__ = ("obj", "incoming", "outgoing", "established", "stopped", "seen")

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False
        #: Set when the connection closes: decrypting stops at the next record.
        self.stopped = False
        #: Any byte arrived (a connection closed before its first byte is a health check).
        self.seen = False

    @property
    def version(self) -> Any:
        return self.obj.version()

    def pending_output(self) -> bytes:
        return self.outgoing.read()

    def receive(self, data: Any, size: int, deliver: Callable[[memoryview], None]) -> bool:
        """Take encrypted bytes; hand each decrypted chunk to ``deliver``. Returns True when the
        client ended TLS (close_notify). Raises TlsHandshakeFailed while the handshake fails and
        ConnectionLostError for a TLS error after it. The caller sends ``pending_output()``."""
        self.incoming.write(data)
        self.seen = True
        if not self.established:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            except (ssl.SSLError, OSError) as exc:
                raise TlsHandshakeFailed(exc) from None
            self.established = True
        while not self.stopped:
            buf = acquire_bytes(size)
            try:
                n = cast(int, self.obj.read(size, buf))  # with a buffer: the count read
            except ssl.SSLWantReadError:
                release_bytes(buf)
                return False
            except ssl.SSLZeroReturnError:
                release_bytes(buf)
                return True
            except (ssl.SSLError, OSError) as exc:
                release_bytes(buf)
                raise ConnectionLostError(f"TLS error: {exc}") from None
            view = memoryview(buf)[:n]
            try:
                deliver(view)
            finally:
                view.release()
                release_bytes(buf)  # refused by the pool if a payload view escaped
            if n == 0:
                return False
        return False

    def encrypt(self, data: Any) -> bytes:
        view = memoryview(data)
        while view:
            n = self.obj.write(view)
            view = view[n:]
        return self.outgoing.read()
