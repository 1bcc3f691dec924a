"""ServerTls (TLS over memory BIOs, the server end): what it encrypts and decrypts, record by record,
against a client SSLObject of Python's ssl."""

from __future__ import annotations

import os
import random
import ssl

import pytest

from ferrotunnel import tls
from ferrotunnel.aio.tlsbio import OUTPUT_PIECE, RECORD_SIZE, ServerTls
from ferrotunnel.errors import ConnectionLostError

RECORD_OVERHEAD = 5 + 1 + 16  # TLS 1.3 record header, inner content type, AEAD tag


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    paths = tls.generate_certs(d)
    return tls.server_context(paths["server.pem"], paths["server.key"]), tls.client_context(paths["ca.pem"])


class Pair:
    """A ServerTls and a client SSLObject, handshaken over memory."""

    def __init__(self, contexts, size: int = 256 * 1024) -> None:
        sctx, cctx = contexts
        self.server = ServerTls(sctx)
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = cctx.wrap_bio(self.cin, self.cout, server_hostname="localhost")
        self.size = size
        self.delivered: list = []
        for _ in range(10):
            try:
                self.client.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            self.to_server(self.cout.read())
            self.cin.write(self.server.pending_output())
            if done and self.server.established:
                break
        assert self.server.established
        self.delivered.clear()

    def to_server(self, data: bytes) -> bool:
        return self.server.receive(data, self.size, lambda v: self.delivered.append(bytes(v)))

    def client_reads(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk


def records(data: bytes) -> list:
    """The lengths of the TLS records in ``data`` (application data records only)."""
    out, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x17, "not an application data record"
        n = int.from_bytes(data[pos + 3:pos + 5], "big")
        out.append(n)
        pos += 5 + n
    assert pos == len(data)
    return out


def test_encrypt_many_fills_records_and_keeps_pieces_small(contexts):
    pair = Pair(contexts)
    pair.client_reads()  # session tickets
    rng = random.Random(7)
    sent = bytearray()
    for _ in range(60):
        bufs = [os.urandom(rng.choice([0, 1, 8, 300, 5000, RECORD_SIZE - 1, RECORD_SIZE, RECORD_SIZE + 1,
                                       40000, 70000, 262144])) for _ in range(rng.randint(1, 6))]
        bufs = [bytearray(b) if i % 2 else memoryview(b) for i, b in enumerate(bufs)]
        for b in bufs:
            sent += b
        pieces = pair.server.encrypt_many(bufs)
        assert all(type(p) is bytes for p in pieces)
        # no piece of output as large as a payload: each is about OUTPUT_PIECE at most
        assert max(map(len, pieces), default=0) <= OUTPUT_PIECE + 4 * RECORD_OVERHEAD
        lengths = records(b"".join(pieces))
        total = sum(map(len, bufs))
        # every record full but the last: frames are not each sent in records of their own
        assert all(n == RECORD_SIZE + 17 for n in lengths[:-1]), lengths
        assert len(lengths) == -(-total // RECORD_SIZE)
        pair.cin.write(b"".join(pieces))
    assert pair.client_reads() == bytes(sent)


def test_encrypt_many_of_nothing(contexts):
    pair = Pair(contexts)
    assert pair.server.encrypt_many([]) == [] and pair.server.encrypt_many([b""]) == []


def test_receive_delivers_many_records_at_once(contexts):
    pair = Pair(contexts)
    data = os.urandom(1_000_000)  # 62 records
    pair.client.write(data)
    encrypted = pair.cout.read()
    for i in range(0, len(encrypted), 300_000):
        assert pair.to_server(encrypted[i:i + 300_000]) is False
    assert b"".join(pair.delivered) == data
    # one delivery per buffer filled, not one per 16 KiB record
    assert len(pair.delivered) <= 8, [len(d) for d in pair.delivered]
    assert max(map(len, pair.delivered)) > RECORD_SIZE


def test_receive_with_a_buffer_smaller_than_a_record(contexts):
    pair = Pair(contexts, size=1000)
    data = os.urandom(50_000)
    pair.client.write(data)
    assert pair.to_server(pair.cout.read()) is False
    assert b"".join(pair.delivered) == data and max(map(len, pair.delivered)) <= 1000


def test_receive_stops_when_stopped(contexts):
    pair = Pair(contexts, size=RECORD_SIZE)
    pair.client.write(os.urandom(10 * RECORD_SIZE))
    got = []

    def deliver(view):
        got.append(len(view))
        pair.server.stopped = True  # the connection closed while handling the first chunk

    assert pair.server.receive(pair.cout.read(), RECORD_SIZE, deliver) is False
    assert got == [RECORD_SIZE]


def test_receive_close_notify_and_garbage(contexts):
    pair = Pair(contexts)
    pair.client.write(b"last words")
    try:
        pair.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    ended = pair.to_server(pair.cout.read())
    assert b"".join(pair.delivered) == b"last words"
    assert ended is True
    other = Pair(contexts)
    with pytest.raises(ConnectionLostError, match="TLS error"):
        other.to_server(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a record that does not decrypt
