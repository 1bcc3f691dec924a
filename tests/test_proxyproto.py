"""PROXY protocol v2: the incremental reader, its limits, the builder, and the trusted-proxy list."""

from __future__ import annotations

import struct
from typing import List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrotunnel import frames as F
from ferrotunnel.protocol.proxyproto import (
    MAX_PROXY_HEADER,
    PROXY_V2_SIGNATURE,
    NotProxyV2,
    ProxyHeader,
    ProxyProtocolError,
    ProxyV2Reader,
    TrustedProxies,
    encode_v2,
    maybe_header,
)

SIG = PROXY_V2_SIGNATURE
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def raw(ver_cmd: int, fam: int, body: bytes, length: Optional[int] = None) -> bytes:
    """A header built by hand, without the encoder (so the reader is not tested against itself)."""
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body) if length is None else length) + body


def read_all(data: bytes, chunks: List[int]) -> tuple:
    """Feed data cut at the given sizes; (header, leftover). Bytes after the header go to leftover."""
    reader, got, pos = ProxyV2Reader(), None, 0
    for size in chunks + [len(data)]:
        piece = data[pos:pos + size]
        pos += len(piece)
        got = reader.feed(piece)
        assert reader.buffered <= MAX_PROXY_HEADER
        if got is not None:
            return got, reader.leftover + data[pos:]
    return got, b""


V4 = (("192.0.2.7", 51234), ("10.1.2.3", 7000))
V6 = (("2001:db8::1", 443), ("2001:db8::2", 7000))
TLVS = ((0x01, b"h2"), (0x02, b"tunnel.example"), (0xE0, b"\x00" * 40), (0x04, b""))
CASES = [
    pytest.param(V4[0], V4[1], "proxy", (), V4[0], V4[1], id="ipv4"),
    pytest.param(V4[0], V4[1], "proxy", TLVS, V4[0], V4[1], id="ipv4-tlvs"),
    pytest.param(V6[0], V6[1], "proxy", (), V6[0], V6[1], id="ipv6"),
    pytest.param(V6[0], V6[1], "proxy", TLVS, V6[0], V6[1], id="ipv6-tlvs"),
    pytest.param(("::ffff:10.0.0.1", 1), ("::1", 2), "proxy", (), ("::ffff:10.0.0.1", 1), ("::1", 2), id="mapped"),
    pytest.param(None, None, "local", (), None, None, id="local"),
    pytest.param(None, None, "local", TLVS, None, None, id="local-tlvs"),
    pytest.param(V4[0], V4[1], "local", TLVS, None, None, id="local-with-addresses-ignored"),
    pytest.param(None, None, "proxy", (), None, None, id="unspec"),
    pytest.param(None, None, "proxy", TLVS, None, None, id="unspec-tlvs"),
]


@pytest.mark.parametrize("src,dst,command,tlvs,want_src,want_dst", CASES)
def test_round_trip(src, dst, command, tlvs, want_src, want_dst):
    wire = encode_v2(src, dst, command, tlvs)
    reader = ProxyV2Reader()
    header = reader.feed(wire + b"STREAM")
    assert header == ProxyHeader(command, want_src, want_dst, tuple(tlvs), len(wire))
    assert reader.leftover == b"STREAM" and reader.buffered == 0 and reader.header is header


def test_hand_built_headers_decode():
    body = bytes([127, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 8080, 80) + b"\x01\x00\x02h2"
    header = ProxyV2Reader().feed(raw(0x21, 0x11, body))
    assert header == ProxyHeader("proxy", ("127.0.0.1", 8080), ("10.0.0.2", 80), ((1, b"h2"),), 16 + 17)
    assert header.tlv(1) == b"h2" and header.tlv(2) is None
    assert encode_v2(("127.0.0.1", 8080), ("10.0.0.2", 80), tlvs=[(1, b"h2")]) == raw(0x21, 0x11, body)
    v6 = bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 1, 2)
    assert ProxyV2Reader().feed(raw(0x21, 0x21, v6)).source == ("::1", 1)
    # HAProxy's check-send-proxy: LOCAL, AF_UNSPEC, no body.
    assert ProxyV2Reader().feed(raw(0x20, 0x00, b"")) == ProxyHeader("local", None, None, (), 16)


def test_udp_and_unix_families_never_crash():
    v4 = bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2])
    assert ProxyV2Reader().feed(raw(0x21, 0x12, v4)).source == ("1.2.3.4", 1)
    unix = b"/run/haproxy.sock".ljust(108, b"\x00") + b"/run/ft.sock".ljust(108, b"\x00")
    for fam in (0x31, 0x32):
        header = ProxyV2Reader().feed(raw(0x21, fam, unix + b"\x03\x00\x01z"))
        assert header == ProxyHeader("proxy", None, None, ((3, b"z"),), 16 + 216 + 4)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_split_gives_the_same_result(case):
    src, dst, command, tlvs = CASES[case].values[:4]
    data = encode_v2(src, dst, command, tlvs) + b"\x00\x00\x00\x07rest"
    whole, left = read_all(data, [])
    assert left == b"\x00\x00\x00\x07rest"
    assert read_all(data, [1] * len(data)) == (whole, left)
    for i in range(len(data) + 1):
        assert read_all(data, [i]) == (whole, left), i


@FUZZ
@given(case=st.integers(0, len(CASES) - 1), tail=st.binary(max_size=40),
       cuts=st.lists(st.integers(0, 64), max_size=30))
def test_random_chunks_give_the_same_result(case, tail, cuts):
    src, dst, command, tlvs = CASES[case].values[:4]
    wire = encode_v2(src, dst, command, tlvs)
    header, left = read_all(wire + tail, cuts)
    assert header is not None and header.header_length == len(wire) and left == tail


def _reject_early(data: bytes) -> ProxyV2Reader:
    reader = ProxyV2Reader()
    for i in range(len(data)):
        try:
            reader.feed(data[i:i + 1])
        except NotProxyV2 as exc:
            assert i < 12 and "signature does not match" in str(exc)
            assert reader.leftover == data[:i + 1] and reader.buffered == 0
            return reader
        assert maybe_header(data[:i + 1])
    raise AssertionError("not rejected")


HANDSHAKE = F.encode(F.Handshake(token="t0k", tunnel_id="tid", min_version=1, max_version=1, capabilities=[]))


@pytest.mark.parametrize("data", [HANDSHAKE, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", SIG[:11] + b"X" + bytes(20),
                                  b"\r\n\r\n\x00\r\nQUIT\r"])
def test_no_header_is_known_within_12_bytes(data):
    assert not maybe_header(data)
    _reject_early(data)
    reader = ProxyV2Reader()  # in one chunk: every byte fed comes back as the stream
    with pytest.raises(NotProxyV2):
        reader.feed(data)
    assert reader.leftover == data


@FUZZ
@given(st.binary(min_size=12, max_size=40).filter(lambda b: not b.startswith(SIG)))
def test_random_bytes_are_rejected_within_12_bytes(data):
    _reject_early(data)


def test_maybe_header():
    assert maybe_header(b"") and maybe_header(b"\r\n") and maybe_header(SIG) and maybe_header(SIG + b"\xff" * 5)
    assert maybe_header(bytearray(SIG[:5])) and maybe_header(memoryview(SIG + b"!"))
    assert not maybe_header(b"\r\r") and not maybe_header(b"G") and not maybe_header(HANDSHAKE[:1])


@pytest.mark.parametrize("length", [MAX_PROXY_HEADER - 16 + 1, 0xFFFF])
def test_length_over_the_bound_is_refused_from_the_prefix(length):
    prefix = raw(0x21, 0x11, b"", length=length)
    reader = ProxyV2Reader()
    assert reader.feed(prefix[:15]) is None and reader.buffered == 15
    with pytest.raises(ProxyProtocolError, match=f"header of {16 + length} bytes is over the 528-byte limit"):
        reader.feed(prefix[15:] + b"\x00" * 4096)
    assert reader.buffered <= 16
    reader = ProxyV2Reader()
    with pytest.raises(ProxyProtocolError, match="over the 528-byte limit"):
        reader.feed(prefix + b"\x00" * 70000)
    assert reader.buffered <= 16


def test_a_header_of_exactly_the_limit_is_read_and_custom_limits():
    wire = encode_v2(*V4, tlvs=[(0xEE, b"x" * (MAX_PROXY_HEADER - 16 - 12 - 3))])
    assert len(wire) == MAX_PROXY_HEADER and ProxyV2Reader().feed(wire).source == V4[0]
    assert ProxyV2Reader(limit=28).feed(encode_v2(*V4)).source == V4[0]
    with pytest.raises(ProxyProtocolError, match="header of 31 bytes is over the 28-byte limit"):
        ProxyV2Reader(limit=28).feed(encode_v2(*V4, tlvs=[(1, b"")]))
    for bad in (15, 16 + 0x10000):
        with pytest.raises(ValueError, match="limit"):
            ProxyV2Reader(limit=bad)


@pytest.mark.parametrize("fam,body,family,have", [
    (0x11, bytes(8), "AF_INET", 8), (0x11, b"", "AF_INET", 0), (0x21, bytes(20), "AF_INET6", 20),
    (0x22, bytes(35), "AF_INET6", 35), (0x31, bytes(100), "AF_UNIX", 100)])
def test_truncated_address_blocks(fam, body, family, have):
    for cmd in (0x21, 0x20):
        with pytest.raises(ProxyProtocolError, match=f"address block too short for {family} \\({have} of"):
            ProxyV2Reader().feed(raw(cmd, fam, body))


@pytest.mark.parametrize("ver_cmd,fam,message", [
    (0x31, 0x11, "unsupported version 3"), (0x11, 0x11, "unsupported version 1"), (0x01, 0x00, "version 0"),
    (0x22, 0x11, "unsupported command 0x2"), (0x2F, 0x11, "unsupported command 0xf"),
    (0x21, 0x13, "family/transport byte 0x13"), (0x21, 0x10, "byte 0x10"), (0x21, 0x01, "byte 0x01"),
    (0x21, 0x41, "byte 0x41"), (0x21, 0xFF, "byte 0xff")])
def test_bad_version_command_family_are_refused_as_they_arrive(ver_cmd, fam, message):
    prefix = raw(ver_cmd, fam, b"", length=12)
    reader = ProxyV2Reader()
    assert reader.feed(prefix[:12]) is None
    stop = 13 if "version" in message or "command" in message else 14
    if stop == 14:
        assert reader.feed(prefix[12:13]) is None
    with pytest.raises(ProxyProtocolError, match=message):
        reader.feed(prefix[stop - 1:stop])
    assert reader.buffered <= stop


def test_local_ignores_an_unknown_family():
    header = ProxyV2Reader().feed(raw(0x20, 0x45, b"opaque bytes"))
    assert header == ProxyHeader("local", None, None, (), 16 + 12)


@pytest.mark.parametrize("tail,message", [
    (b"\x01\x00\x0ahi", "TLV type 0x01 at body offset 12 claims 10 bytes, only 2 remain"),
    (b"\x01\x00\x02hi\x05\xff\xff", "TLV type 0x05 at body offset 17 claims 65535 bytes, only 0 remain"),
    (b"\x01", "truncated TLV at body offset 12 \\(1 bytes"),
    (b"\x01\x00\x00\x07\x00", "truncated TLV at body offset 15")])
def test_tlv_overruns(tail, message):
    body = bytes(12) + tail
    for cmd in (0x21, 0x20):
        with pytest.raises(ProxyProtocolError, match=message):
            ProxyV2Reader().feed(raw(cmd, 0x11, body))


def test_the_reader_after_a_failure_and_after_the_header():
    reader = ProxyV2Reader()
    with pytest.raises(ProxyProtocolError, match="version 3"):
        reader.feed(SIG + b"\x31")
    with pytest.raises(ProxyProtocolError, match="already failed"):
        reader.feed(b"more")
    reader = ProxyV2Reader()
    with pytest.raises(NotProxyV2):
        reader.feed(b"GET")
    with pytest.raises(NotProxyV2, match="already failed"):
        reader.feed(b" /")
    assert reader.leftover == b"GET"
    reader = ProxyV2Reader()
    assert reader.feed(encode_v2(*V4)) is not None
    with pytest.raises(RuntimeError, match="complete"):
        reader.feed(b"x")
    assert ProxyV2Reader().feed(b"") is None


def _fuzz_feed(data: bytes, cuts: List[int]) -> None:
    """Only ProxyProtocolError may come out; the buffer stays bounded; a header accounts for every byte."""
    reader, pos = ProxyV2Reader(), 0
    try:
        for size in cuts + [len(data)]:
            piece, pos = data[pos:pos + size], pos + len(data[pos:pos + size])
            header = reader.feed(piece)
            assert reader.buffered <= MAX_PROXY_HEADER
            if header is None:  # pending: every byte fed is header, and the header is not complete
                assert reader.buffered == pos
                assert pos < 16 or pos < 16 + int.from_bytes(data[14:16], "big")
            else:
                assert header.header_length <= MAX_PROXY_HEADER and reader.buffered == 0
                assert header.header_length + len(reader.leftover) == pos
                assert (header.source is None) == (header.destination is None)
                tlvs = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in header.tlvs)
                assert data[:header.header_length].endswith(tlvs)
                return
    except ProxyProtocolError:
        assert reader.buffered <= MAX_PROXY_HEADER


CUTS = st.lists(st.integers(0, 1000), max_size=20)


@st.composite
def near_headers(draw) -> bytes:
    """A valid signature, then mostly plausible prefixes, a body about as long as it claims."""
    ver_cmd = draw(st.sampled_from([0x21, 0x21, 0x21, 0x20, 0x20, 0x22, 0x11]))
    fam = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x45]))
    length = draw(st.integers(0, 40) | st.sampled_from([12, 36, 216, 512, 513, 0xFFFF]) | st.integers(0, 0xFFFF))
    size = min(1200, max(0, length + draw(st.integers(-16, 16))))
    body = draw(st.binary(min_size=size, max_size=size) | st.just(bytes(size)))
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", length) + body


@FUZZ
@given(st.binary(max_size=600), CUTS)
def test_fuzz_random_bytes(data, cuts):
    _fuzz_feed(data, cuts)


@FUZZ
@given(near_headers(), CUTS)
def test_fuzz_after_a_valid_signature(data, cuts):
    _fuzz_feed(data, cuts)


@FUZZ
@given(st.integers(0, len(CASES) - 1),
       st.lists(st.tuples(st.integers(0, 40) | st.integers(0, 400), st.integers(0, 255)), max_size=4),
       st.binary(max_size=600), CUTS)
def test_fuzz_mutated_headers(case, flips, tail, cuts):
    wire = bytearray(encode_v2(*CASES[case].values[:4]))
    for at, value in flips:
        wire[at % len(wire)] = value
    _fuzz_feed(bytes(wire) + tail, cuts)


@pytest.mark.parametrize("args,message", [
    ((V4[0], V4[1], "relay"), "command must be"), ((V4[0], None), "both"), ((None, V4[1]), "both"),
    ((V4[0], V6[1]), "not the same IP version"), ((("example.com", 1), V4[1]), "not an IP address"),
    ((("1.2.3.4", 70000), V4[1]), "port 70000"), ((("1.2.3.4", True), V4[1]), "port True"),
    ((("1.2.3.4", -1), V4[1]), "port -1"), (("1.2.3.4", V4[1]), "tuple"), (((1, 2), V4[1]), "tuple"),
    ((V4[0], V4[1], "proxy", [(256, b"")]), "TLV type 256"), ((V4[0], V4[1], "proxy", [(1, "str")]), "must be bytes"),
    ((V4[0], V4[1], "proxy", [(1, b"x" * 0x10000)]), "must be bytes of at most"),
    ((V4[0], V4[1], "proxy", [(1, b"x" * 0xFFF0)] * 2), "does not fit the 16-bit length")])
def test_encode_validates_its_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        encode_v2(*args)


def test_trusted_proxies_match():
    trusted = TrustedProxies(["10.0.0.0/8", " 192.168.1.5 ", "::1/128", "2001:db8::/32"])
    assert "10.200.3.4" in trusted and trusted.trusts("10.0.0.1") and "192.168.1.5" in trusted
    assert "192.168.1.6" not in trusted and "11.0.0.1" not in trusted
    assert "::1" in trusted and "2001:db8:5::9" in trusted and "2001:db9::1" not in trusted
    assert "::ffff:10.0.0.1" in trusted and "::ffff:192.168.1.5" in trusted and "::ffff:11.0.0.1" not in trusted
    assert "::ffff:7f00:1" not in TrustedProxies(["::1"])
    assert "localhost" not in trusted and "" not in trusted and 10 not in trusted and "10.0.0.0/8" not in trusted
    assert "fe80::1%eth0" in TrustedProxies(["fe80::/10"])
    assert bool(trusted)
    assert repr(trusted) == "TrustedProxies(['10.0.0.0/8', '192.168.1.5/32', '::1/128', '2001:db8::/32'])"
    mapped_net = TrustedProxies(["::ffff:10.0.0.0/104"])
    assert "::ffff:10.1.1.1" in mapped_net


def test_an_empty_list_trusts_nobody():
    for empty in (TrustedProxies([]), TrustedProxies(), TrustedProxies(iter(()))):
        assert not empty and "127.0.0.1" not in empty and "::1" not in empty and repr(empty) == "TrustedProxies([])"


@pytest.mark.parametrize("cidr,message", [
    ("10.0.0.0/33", "'10.0.0.0/33' is not a valid CIDR"), ("localhost", "'localhost'"), ("", "''"),
    ("10.0.0.1/8", "did you mean 10.0.0.0/8"), ("::1/129", "'::1/129'"), (None, "None")])
def test_bad_cidrs_are_named(cidr, message):
    with pytest.raises(ValueError, match=message):
        TrustedProxies(["127.0.0.1", cidr])
    with pytest.raises(ValueError, match="not the string"):
        TrustedProxies("10.0.0.0/8")
