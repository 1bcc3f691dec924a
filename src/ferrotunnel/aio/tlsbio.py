"""TLS for the server end of a tunnel connection, over memory BIOs.

The handshake runs inside our own protocol, so it counts as a pending handshake, obeys the
handshake timeout, never blocks accepting, and each failure is seen (and logged) by us. Records
are decrypted into pooled buffers.
"""

from __future__ import annotations

import ssl
from typing import Any, Callable, Iterable, List, cast

from ..errors import ConnectionLostError
from ..pool import acquire_bytes, release_bytes

__all__ = ["ServerTls", "TlsHandshakeFailed", "RECORD_SIZE", "OUTPUT_PIECE"]

#: The largest TLS record's plaintext: ``encrypt_many`` fills records to this size.
RECORD_SIZE = 16 * 1024
#: ``encrypt_many`` hands its output back in pieces of about this many bytes: below glibc's
#: mmap threshold (128 KiB), so the buffers come from the heap and not from fresh pages.
OUTPUT_PIECE = 64 * 1024


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
            # Every record that is already here goes into one buffer before it is delivered: one
            # pass of the frame decoder per read, not one per 16 KiB record.
            buf = acquire_bytes(size)
            view = memoryview(buf)
            filled = 0
            ended = False
            try:
                try:
                    while filled < size:
                        n = cast(int, self.obj.read(size - filled, view[filled:]))  # with a buffer: the count
                        if n == 0:  # what a read into a buffer returns for close_notify
                            ended = True
                            break
                        filled += n
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    ended = True
                except (ssl.SSLError, OSError) as exc:
                    raise ConnectionLostError(f"TLS error: {exc}") from None
                if filled:
                    data = view[:filled]
                    try:
                        deliver(data)
                    finally:
                        data.release()
            finally:
                view.release()
                release_bytes(buf)  # refused by the pool if a payload view escaped
            if ended:
                return True
            if filled < size:  # nothing more buffered now
                return False
        return False

    def encrypt(self, data: Any) -> bytes:
        view = memoryview(data)
        while view:
            n = self.obj.write(view)
            view = view[n:]
        return self.outgoing.read()

    def encrypt_many(self, bufs: Iterable[Any]) -> List[bytes]:
        """Encrypt ``bufs`` (frames as ``drain`` returns them: small pieces and whole payloads) as
        one byte stream; returns the TLS records in pieces of at most about OUTPUT_PIECE bytes,
        for ``writelines``. Records are filled to RECORD_SIZE: short pieces are copied together
        (at most one record's worth), long payloads are encrypted from where they lie, not joined
        first, and no piece of output is as large as a payload (a fresh allocation that large
        costs page faults each time)."""
        out: List[bytes] = []
        pending = bytearray()
        for buf in bufs:
            view = memoryview(buf)
            if len(pending) + len(view) < RECORD_SIZE:
                pending += view
                continue
            if pending:
                k = RECORD_SIZE - len(pending)
                pending += view[:k]
                view = view[k:]
                self._write(pending, out)
                pending = bytearray()
            whole = len(view) - len(view) % RECORD_SIZE
            pos = 0
            while pos < whole:
                step = min(OUTPUT_PIECE, whole - pos)
                self._write(view[pos:pos + step], out)
                pos += step
            if pos < len(view):
                pending += view[pos:]
        if pending:
            self._write(pending, out)
        if self.outgoing.pending:
            out.append(self.outgoing.read())
        return out

    def _write(self, data: Any, out: List[bytes]) -> None:
        outgoing = self.outgoing
        if outgoing.pending and outgoing.pending + len(data) > OUTPUT_PIECE:
            out.append(outgoing.read())
        view = memoryview(data)
        while view:  # a memory BIO takes any amount: one call, unless OpenSSL says otherwise
            view = view[self.obj.write(view):]
