"""PROXY protocol v2 headers, sans-IO: a bounded incremental reader, a builder, and the list of
proxies allowed to send one.

A load balancer (HAProxy ``send-proxy-v2``) in front of a listener opens each connection with a
binary header naming the client it relays for. Listeners will take the header as *optional, and
only from trusted addresses* (``--trusted-proxy CIDR``, a ``TrustedProxies``):

* a trusted peer: while ``maybe_header`` holds for the first bytes, feed them to a
  ``ProxyV2Reader``. ``NotProxyV2`` means no header (``reader.leftover`` is the stream as sent);
  any other ``ProxyProtocolError`` closes the connection; a header's ``source`` replaces the
  peer address for logs, throttles and caps, and ``reader.leftover`` starts the stream. LOCAL
  (HAProxy's ``check-send-proxy`` health checks), AF_UNSPEC and AF_UNIX headers carry no usable
  address: ``source`` is None and the real peer address stays.
* any other peer: a header (12 bytes matching the signature) is refused, never believed.

Limits: the signature is checked as it arrives, so a peer sending no header is known within 12
bytes; version, command and family are checked as they arrive; the length is checked from the
16-byte prefix, before any of the body is buffered, and the reader never holds more than
``limit`` (default ``MAX_PROXY_HEADER``) bytes. TLVs are kept as (type, value) pairs, unknown
types included, uninterpreted (no CRC32C check). Addresses are IP strings as the OS prints a peer
address: an IPv4-mapped IPv6 source stays ``"::ffff:a.b.c.d"`` (it is not unmapped).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

__all__ = [
    "PROXY_V2_SIGNATURE", "PROXY_V2_PREFIX", "MAX_PROXY_HEADER", "ProxyProtocolError", "NotProxyV2",
    "ProxyHeader", "ProxyV2Reader", "maybe_header", "encode_v2", "TrustedProxies",
]

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command byte, family/transport byte, 2-byte body length.
PROXY_V2_PREFIX = 16
#: Bound on a whole header. The largest address block is AF_UNIX's 216 bytes (AF_INET6: 36), so
#: 512 body bytes leave room for the TLVs HAProxy sends (ALPN, an authority of at most 255 bytes,
#: a unique id of at most 128, SSL details, CRC32C) while keeping a peer from making a listener
#: buffer the 64 KiB the 16-bit length field allows.
MAX_PROXY_HEADER = PROXY_V2_PREFIX + 512

Address = Tuple[str, int]

_VERSION = 2
_COMMANDS = {0: "local", 1: "proxy"}
#: Valid family/transport bytes (high nibble family, low nibble transport) by family name.
_FAMILIES = {0x00: "AF_UNSPEC", 0x11: "AF_INET", 0x12: "AF_INET", 0x21: "AF_INET6", 0x22: "AF_INET6",
             0x31: "AF_UNIX", 0x32: "AF_UNIX"}
#: Address block size by family: two addresses, then two ports for the IP families.
_ADDRESS_BLOCK = {"AF_UNSPEC": 0, "AF_INET": 4 + 4 + 2 + 2, "AF_INET6": 16 + 16 + 2 + 2, "AF_UNIX": 108 + 108}
_TLV_HEAD = 3


class ProxyProtocolError(ValueError):
    """A PROXY v2 header is malformed, unsupported, or over the limit: close the connection."""


class NotProxyV2(ProxyProtocolError):
    """The first bytes are not the PROXY v2 signature: there is no header at all."""


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded header. ``source``/``destination`` are None for LOCAL, AF_UNSPEC and AF_UNIX
    (use the real connection's addresses). ``header_length`` counts the whole header."""

    command: str
    source: Optional[Address]
    destination: Optional[Address]
    tlvs: Tuple[Tuple[int, bytes], ...]
    header_length: int

    def tlv(self, kind: int) -> Optional[bytes]:
        """The value of the first TLV of this type, or None."""
        return next((value for t, value in self.tlvs if t == kind), None)


def maybe_header(first_bytes: Union[bytes, bytearray, memoryview]) -> bool:
    """Whether bytes received so far could still start a PROXY v2 header (True for b"").
    Once 12 bytes match, it is a header: a later fault is an error, not "no header"."""
    return PROXY_V2_SIGNATURE.startswith(bytes(first_bytes[:len(PROXY_V2_SIGNATURE)]))


def _check_prefix(buf: bytearray, limit: int) -> int:
    """Check the part of the 16-byte prefix present; the whole header's size once known, else 0."""
    if not maybe_header(buf):
        at = next(i for i, (a, b) in enumerate(zip(buf, PROXY_V2_SIGNATURE)) if a != b)
        raise NotProxyV2(f"not a PROXY v2 header: the signature does not match (byte {at})")
    if len(buf) > 12:
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != _VERSION:
            raise ProxyProtocolError(f"PROXY v2: unsupported version {version}")
        if command not in _COMMANDS:
            raise ProxyProtocolError(f"PROXY v2: unsupported command {command:#x}")
        # The family byte of a LOCAL header is to be ignored: only a PROXY header must name a valid one.
        if len(buf) > 13 and command == 1 and buf[13] not in _FAMILIES:
            raise ProxyProtocolError(f"PROXY v2: unsupported address family/transport byte {buf[13]:#04x}")
    if len(buf) < PROXY_V2_PREFIX:
        return 0
    total: int = PROXY_V2_PREFIX + buf[14] * 256 + buf[15]
    if total > limit:
        raise ProxyProtocolError(f"PROXY v2 header of {total} bytes is over the {limit}-byte limit")
    return total


def _host(packed: bytes) -> str:
    """An IP as the OS prints a peer address (a mapped IPv4 as "::ffff:a.b.c.d", on every Python)."""
    ip = ipaddress.ip_address(packed)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def _ip_pair(block: bytes, size: int) -> Tuple[Address, Address]:
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    return (_host(block[:size]), sport), (_host(block[size:2 * size]), dport)


def _parse_tlvs(body: bytes, offset: int) -> Tuple[Tuple[int, bytes], ...]:
    out = []
    while offset < len(body):
        if len(body) - offset < _TLV_HEAD:
            raise ProxyProtocolError(f"PROXY v2: truncated TLV at body offset {offset} "
                                     f"({len(body) - offset} bytes, a TLV needs at least {_TLV_HEAD})")
        kind, length = body[offset], struct.unpack_from("!H", body, offset + 1)[0]
        start = offset + _TLV_HEAD
        if start + length > len(body):
            raise ProxyProtocolError(f"PROXY v2: TLV type {kind:#04x} at body offset {offset} claims "
                                     f"{length} bytes, only {len(body) - start} remain in the header")
        out.append((kind, body[start:start + length]))
        offset = start + length
    return tuple(out)


def _decode(header: bytes) -> ProxyHeader:
    """Decode one complete header (prefix already checked): exactly ``16 + length`` bytes."""
    command = _COMMANDS[header[12] & 0x0F]
    family = _FAMILIES.get(header[13])
    body = bytes(header[PROXY_V2_PREFIX:])
    if family is None:  # only reachable for LOCAL: the block is opaque, discard it
        return ProxyHeader(command, None, None, (), len(header))
    need = _ADDRESS_BLOCK[family]
    if len(body) < need:
        raise ProxyProtocolError(f"PROXY v2: address block too short for {family} ({len(body)} of {need} bytes)")
    source = destination = None
    if command == "proxy" and family in ("AF_INET", "AF_INET6"):
        source, destination = _ip_pair(body, 4 if family == "AF_INET" else 16)
    return ProxyHeader(command, source, destination, _parse_tlvs(body, need), len(header))


class ProxyV2Reader:
    """Reads one PROXY v2 header from the start of a connection, incrementally and bounded."""

    __slots__ = ("limit", "_pp_buf", "_pp_total", "_pp_header", "_pp_leftover", "_pp_failed")

    def __init__(self, limit: int = MAX_PROXY_HEADER) -> None:
        if not PROXY_V2_PREFIX <= limit <= PROXY_V2_PREFIX + 0xFFFF:
            raise ValueError(f"PROXY v2 header limit must be 16..65551 bytes, not {limit}")
        self.limit = limit
        self._pp_buf = bytearray()
        self._pp_total = 0  # the whole header's size, once the prefix is in
        self._pp_header: Optional[ProxyHeader] = None
        self._pp_leftover = b""
        self._pp_failed: Optional[ProxyProtocolError] = None

    @property
    def buffered(self) -> int:
        """Header bytes held so far (never over ``limit``)."""
        return len(self._pp_buf)

    @property
    def needed(self) -> int:
        """Bytes the header still lacks: the rest of the 16-byte prefix until its length field is
        in, then the rest of the header (a socket reader asks for exactly this many, so it never
        takes the stream's first bytes)."""
        return (self._pp_total or PROXY_V2_PREFIX) - len(self._pp_buf)

    @property
    def header(self) -> Optional[ProxyHeader]:
        return self._pp_header  # None until complete

    @property
    def leftover(self) -> bytes:
        """Bytes after the header: the start of the real stream. After ``NotProxyV2``: every
        byte fed, since there was no header."""
        return self._pp_leftover

    def feed(self, data: bytes) -> Optional[ProxyHeader]:
        """Add bytes; the header once complete, else None. Raises ProxyProtocolError (NotProxyV2
        when the signature does not match); it is raised again for any later feed."""
        if self._pp_failed is not None:
            raise type(self._pp_failed)(f"{self._pp_failed} (the reader already failed)")
        if self._pp_header is not None:
            raise RuntimeError("the PROXY v2 header is complete: pass further bytes to the stream")
        view = memoryview(data)
        try:
            while view and self._pp_header is None:
                # Take only what the current step needs: the prefix, then the rest of the header.
                want = (self._pp_total or PROXY_V2_PREFIX) - len(self._pp_buf)
                self._pp_buf += view[:want]
                view = view[want:]
                if not self._pp_total:
                    self._pp_total = _check_prefix(self._pp_buf, self.limit)
                if self._pp_total and len(self._pp_buf) == self._pp_total:
                    self._pp_header = _decode(bytes(self._pp_buf))
        except ProxyProtocolError as exc:
            if isinstance(exc, NotProxyV2):  # no header: what was fed is the stream itself
                self._pp_leftover = bytes(self._pp_buf) + bytes(view)
                self._pp_buf.clear()
            self._pp_failed = exc
            raise
        if self._pp_header is not None:
            self._pp_leftover = bytes(view)
            self._pp_buf.clear()
        return self._pp_header


def _address(addr: Address, what: str) -> Tuple[Union[ipaddress.IPv4Address, ipaddress.IPv6Address], int]:
    if not (isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[0], str)):
        raise ValueError(f"PROXY v2 {what} must be a (host, port) tuple, not {addr!r}")
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"PROXY v2 {what} host {host!r} is not an IP address") from None
    if getattr(ip, "scope_id", None) is not None:  # a zone is local to a host: not an address to send
        raise ValueError(f"PROXY {what} host {host!r} has a zone (scope id); give the address without it")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"PROXY v2 {what} port {port!r} is not 0..65535")
    return ip, port


def encode_v2(source: Optional[Address], destination: Optional[Address], command: str = "proxy",
              tlvs: Sequence[Tuple[int, bytes]] = ()) -> bytes:
    """Build a header (TCP over IPv4/IPv6; AF_UNSPEC when both addresses are None). Raises
    ValueError for a bad command, address, port or TLV, or a body over 65535 bytes."""
    codes = {name: code for code, name in _COMMANDS.items()}
    if command not in codes:
        raise ValueError(f"PROXY v2 command must be 'local' or 'proxy', not {command!r}")
    if (source is None) != (destination is None):
        raise ValueError("PROXY v2 needs both a source and a destination address, or neither")
    block, family = b"", 0x00
    if source is not None and destination is not None:
        (src, sport), (dst, dport) = _address(source, "source"), _address(destination, "destination")
        if src.version != dst.version:
            raise ValueError(f"PROXY v2 source {src} and destination {dst} are not the same IP version")
        family = 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    parts = [block]
    for kind, value in tlvs:
        if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 0xFF:
            raise ValueError(f"PROXY v2 TLV type {kind!r} is not 0..255")
        if not isinstance(value, (bytes, bytearray)) or len(value) > 0xFFFF:
            raise ValueError(f"PROXY v2 TLV {kind:#04x} value must be bytes of at most 65535")
        parts.append(struct.pack("!BH", kind, len(value)) + bytes(value))
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 body of {len(body)} bytes does not fit the 16-bit length")
    return PROXY_V2_SIGNATURE + bytes([_VERSION << 4 | codes[command], family]) + struct.pack("!H", len(body)) + body


def encode_v1(source: Optional[Address], destination: Optional[Address]) -> bytes:
    """A PROXY protocol v1 (text) header: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT``, or ``PROXY
    UNKNOWN`` when the addresses are not known or not of one IP version."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = _address(source, "source"), _address(destination, "destination")
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()


def header_for(version: str, visitor: Optional[str], local: Address) -> bytes:
    """The PROXY header (``version`` "v1" or "v2") a client sends its local service before a
    stream's bytes: the visitor (``"HOST:PORT"`` as the server sent it) as the source, the local
    service as the destination (its port on the unspecified address of the visitor's family when
    it is a host name or of the other family); without a usable visitor, v1 ``UNKNOWN`` / a v2
    ``LOCAL`` header."""
    source: Optional[Address] = None
    if visitor:
        host, _, port = visitor.rpartition(":")
        try:
            # without its zone ("%eth0"): local to the server's host, and free text that would
            # go into the text header as it is
            ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            if port.isdigit() and int(port) <= 65535:
                source = (str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip), int(port))
        except ValueError:
            source = None
    destination: Address = (local[0].split("%", 1)[0], local[1])  # (a zone is the host's own, as above)
    if source is not None:
        try:
            dst = ipaddress.ip_address(local[0])
        except ValueError:  # a host name (localhost): the destination is its port on "any" address
            dst = None
        family = ipaddress.ip_address(source[0]).version
        if dst is None or dst.version != family:
            destination = ("0.0.0.0" if family == 4 else "::", local[1])
    if version == "v1":
        return encode_v1(source, destination if source is not None else None)
    if source is None:
        return encode_v2(None, None, command="local")
    return encode_v2(source, destination)


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _network(cidr: str) -> Network:
    if not isinstance(cidr, str) or not cidr.strip():
        raise ValueError(f"trusted proxy {cidr!r} is not a CIDR")
    try:
        return ipaddress.ip_network(cidr.strip())
    except ValueError as exc:
        loose = ipaddress.ip_network(cidr.strip(), strict=False) if "host bits set" in str(exc) else None
        hint = f"; did you mean {loose}?" if loose else ""
        raise ValueError(f"trusted proxy {cidr!r} is not a valid CIDR ({exc}){hint}") from None


class TrustedProxies:
    """Networks whose peers may send a PROXY header. "127.0.0.1" means /32; empty trusts nobody.
    An IPv4-mapped IPv6 peer ("::ffff:10.0.0.1") matches the IPv4 networks too."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        if isinstance(cidrs, str):
            raise ValueError(f"trusted proxies must be a list of CIDRs, not the string {cidrs!r}")
        self.networks: Tuple[Network, ...] = tuple(_network(c) for c in cidrs)

    def trusts(self, host: str) -> bool:
        """Whether a peer address string is in one of the networks (not an IP: False)."""
        if not isinstance(host, str):
            return False
        try:
            ip = ipaddress.ip_address(host)  # a scoped "fe80::1%eth0" parses too
        except ValueError:
            return False
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and self.trusts(host)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"
