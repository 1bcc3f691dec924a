"""The floor of a reverse tunnel written in Python on uvloop: a minimal multiplexer with none of
ferrotunnel's protocol (no handshake, no flow control, no priorities, no limits, no logging, no
error handling beyond dropping a stream), run as two processes like any reverse tunnel.

    python bench/pymux.py server TUNNEL_PORT INGRESS_PORT   # prints "ready" once the client is in
    python bench/pymux.py client TUNNEL_PORT BACKEND_PORT

Frames on the one tunnel connection: u32 length (of what follows), u8 type, u32 stream id, then
the payload; types OPEN (server -> client: a visitor arrived), DATA, EOF (a half-close) and
CLOSE (the stream is gone). A visitor's bytes become one DATA frame per read; the client dials
the backend per OPEN, like ferrotunnel's client does.

It exists to measure, in the same run as ``relay2`` and the real tunnel (``bench/speed.py`` and
``bench/pyfloor.py``), what Python itself costs per message and per stream open: the per-hop
work every tunnel written as uvloop protocols pays (a callback, a header, a dict lookup, a
write), so the tunnel's ratios to relay2 can be split into "Python's floor" and "ferrotunnel's
own work". It is not a tunnel anyone should run.
"""

from __future__ import annotations

import asyncio
import struct
import sys

import uvloop

HDR = struct.Struct(">IBI")  # length of (type + id + payload), type, stream id
OPEN, DATA, EOF, CLOSE = 0, 1, 2, 3


class _Mux(asyncio.Protocol):
    """One end of the tunnel connection: parses frames and hands them to ``streams``."""

    def __init__(self) -> None:
        self.t = None
        self.rest = b""
        self.streams: dict = {}

    def connection_made(self, t) -> None:
        self.t = t

    def send(self, typ: int, sid: int, payload: bytes = b"") -> None:
        if len(payload) >= 16384:  # a big payload is not copied
            self.t.writelines((HDR.pack(5 + len(payload), typ, sid), payload))
        elif payload:  # a small one leaves with its header in one write, as ferrotunnel's do
            self.t.write(HDR.pack(5 + len(payload), typ, sid) + payload)
        else:
            self.t.write(HDR.pack(5, typ, sid))

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
        n, pos = len(data), 0
        view = memoryview(data)
        streams = self.streams
        while n - pos >= 9:
            length, typ, sid = HDR.unpack_from(data, pos)
            end = pos + 4 + length
            if end > n:
                break
            st = streams.get(sid)
            if typ == DATA:
                if st is not None:
                    st.from_tunnel(view[pos + 9:end])
            elif typ == OPEN:
                self.opened(sid)
            elif st is not None:
                if typ == EOF:
                    st.tunnel_eof()
                else:
                    st.tunnel_close()
            pos = end
        self.rest = bytes(view[pos:]) if pos < n else b""

    def opened(self, sid: int) -> None:
        raise NotImplementedError  # (the client's; a server never gets OPEN)


class _Stream(asyncio.Protocol):
    """A visitor (server) or backend (client) connection joined to one stream id."""

    def __init__(self, mux: _Mux, sid: int) -> None:
        self.mux, self.sid, self.t = mux, sid, None
        self.early: list = []  # tunnel bytes before the connection exists (client)
        self.eofs = 0  # 1: the TCP side ended; 2: the tunnel side ended

    def connection_made(self, t) -> None:
        self.t = t
        for chunk in self.early:
            t.write(chunk)
        self.early = []
        if self.eofs & 2:
            t.write_eof()

    def data_received(self, data: bytes) -> None:
        self.mux.send(DATA, self.sid, data)

    def eof_received(self):
        self.eofs |= 1
        self.mux.send(EOF, self.sid)
        if self.eofs == 3:
            self.t.close()
        return True

    def connection_lost(self, exc) -> None:
        if self.mux.streams.pop(self.sid, None) is not None:
            self.mux.send(CLOSE, self.sid)

    def from_tunnel(self, payload) -> None:
        if self.t is None:
            self.early.append(bytes(payload))
        else:
            self.t.write(payload)

    def tunnel_eof(self) -> None:
        self.eofs |= 2
        if self.t is not None:
            if self.eofs == 3:
                self.t.close()
            else:
                self.t.write_eof()

    def tunnel_close(self) -> None:
        self.mux.streams.pop(self.sid, None)
        if self.t is not None:
            self.t.close()


class _ClientMux(_Mux):
    def __init__(self, backend_port: int) -> None:
        super().__init__()
        self.backend_port = backend_port
        self.loop = asyncio.get_running_loop()

    def opened(self, sid: int) -> None:
        st = self.streams[sid] = _Stream(self, sid)
        self.loop.create_task(self._dial(st))

    async def _dial(self, st: _Stream) -> None:
        try:
            transport, _ = await self.loop.create_connection(lambda: st, "127.0.0.1", self.backend_port)
        except OSError:
            if self.streams.pop(st.sid, None) is not None:
                self.send(CLOSE, st.sid)
            return
        if self.streams.get(st.sid) is not st:  # closed by the server while we dialled
            transport.close()


async def server(tunnel_port: int, ingress_port: int) -> None:
    loop = asyncio.get_running_loop()
    joined = loop.create_future()
    mux = _Mux()

    def tunnel_made():
        if not joined.done():
            joined.set_result(None)
        return mux

    await loop.create_server(tunnel_made, "127.0.0.1", tunnel_port)
    await joined
    next_id = iter(range(1, 1 << 32))

    def visitor():
        sid = next(next_id)
        st = mux.streams[sid] = _Stream(mux, sid)
        mux.send(OPEN, sid)
        return st

    await loop.create_server(visitor, "127.0.0.1", ingress_port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def client(tunnel_port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: _ClientMux(backend_port), "127.0.0.1", tunnel_port)
    await asyncio.Event().wait()


def main(argv: list) -> None:
    role, a, b = argv[0], int(argv[1]), int(argv[2])
    uvloop.run(server(a, b) if role == "server" else client(a, b))


if __name__ == "__main__":
    main(sys.argv[1:])
