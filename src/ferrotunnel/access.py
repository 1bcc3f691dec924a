"""Per-tunnel access (the ``access/1`` extension): which ingress kind may reach a tunnel, which
visitor addresses, and the HTTP basic-auth credentials visitors must send.

A client that wants any of it announces, in its handshake capabilities, one entry per rule:

* ``access/1=only:http`` or ``access/1=only:tcp`` — the tunnel is served by that kind of ingress
  alone (``http`` covers the HTTP and HTTPS ingresses);
* ``access/1=auth:DIGEST`` — visitors must send ``Authorization: Basic`` credentials whose
  SHA-256 is ``DIGEST`` (43 characters of unpadded base64url). The secret never leaves the client;
  the server compares digests in constant time;
* ``access/1=allow:CIDR`` — one per allowed network; with any, a visitor from elsewhere is
  refused (at most ``MAX_ALLOW`` of them).

A server that enforces them answers ``access/1`` in its HandshakeAck; a server that does not know
the extension (a Rust one) answers without it, and the client stops rather than serve unguarded.
What the peer sends is bounded: each capability is at most ``MAX_CAPABILITY_LEN`` bytes
(``keep_capabilities``), and a malformed entry makes the server refuse the handshake with the
reason."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional, Sequence, Tuple, Union

__all__ = ["ACCESS_CAPABILITY", "DROPPED_RULE", "MAX_ALLOW", "KINDS", "TunnelAccess", "KeyedAccess", "access_from_capabilities",
           "basic_auth_digest", "keyed_digest", "check_basic_auth_value", "parse_networks"]

ACCESS_CAPABILITY = "access/1"
_PREFIX = ACCESS_CAPABILITY + "="
#: What a peer's capabilities carry, as a server keeps them, in place of access rules it had to
#: leave out (``protocol.extensions.keep_capabilities``): the tunnel is refused, never served with
#: fewer rules than it asked for.
DROPPED_RULE = _PREFIX + "dropped"
#: The most ``allow`` networks one tunnel may name (they travel as handshake capabilities).
MAX_ALLOW = 16
#: Ingress kinds a tunnel may be restricted to.
KINDS = ("http", "tcp")
_DIGEST_LEN = 43  # unpadded base64url of 32 bytes

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def check_basic_auth_value(value: str) -> str:
    """``USER:PASSWORD`` as a client takes it: a non-empty user without ':' and a non-empty
    password, printable ASCII or not, without control characters. Raises ValueError (the message
    never repeats the password)."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("basic auth must be USER:PASSWORD (both non-empty)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("basic auth must not contain control characters")
    return value


def basic_auth_digest(credentials: Union[str, bytes]) -> str:
    """The digest that stands for ``USER:PASSWORD`` on the wire (unpadded base64url SHA-256)."""
    raw = credentials.encode("utf-8") if isinstance(credentials, str) else bytes(credentials)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode("ascii")


def keyed_digest(key: bytes, sha256: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the SHA-256 of ``USER:PASSWORD`` (hex): what a cluster node
    publishes for the other nodes instead of the client's digest (see ``KeyedAccess``)."""
    return hmac.new(key, sha256, hashlib.sha256).hexdigest()


def _basic_credentials(header_value: Optional[bytes]) -> Optional[bytes]:
    """The decoded ``USER:PASSWORD`` of an ``Authorization: Basic`` value, or None."""
    if not header_value:
        return None
    scheme, _, encoded = header_value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_networks(entries: Iterable[str]) -> Tuple[Network, ...]:
    """CIDR strings (or bare addresses) as networks; ValueError naming the bad one."""
    out = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(str(entry).strip(), strict=False)
        except ValueError:
            raise ValueError(f"{str(entry)[:60]!r} is not an address or network in CIDR form "
                             "(e.g. 10.0.0.0/8 or 2001:db8::/32)") from None
        if getattr(net.network_address, "scope_id", None) is not None:  # (never equal to a visitor's address)
            raise ValueError(f"{str(entry)[:60]!r} has a zone (%...): give the network without it, e.g. fe80::/10")
        out.append(net)
    if len(out) > MAX_ALLOW:
        raise ValueError(f"at most {MAX_ALLOW} allowed networks per tunnel (MAX_ALLOW), got {len(out)}")
    return tuple(out)


@dataclass(frozen=True)
class TunnelAccess:
    """One tunnel's access rules. ``only``: "http", "tcp" or None (both); ``digest``: the basic-auth
    digest or None; ``allow``: networks visitors must come from (empty: any)."""

    only: Optional[str] = None
    digest: Optional[str] = None
    allow: Tuple[Network, ...] = ()

    def __repr__(self) -> str:  # the digest stays out
        return (f"TunnelAccess(only={self.only!r}, basic_auth={'on' if self.digest else 'off'}, "
                f"allow={[str(n) for n in self.allow]})")

    @classmethod
    def build(cls, only: Optional[str] = None, basic_auth: Optional[str] = None,
              allow: Sequence[str] = ()) -> "TunnelAccess":
        """From a client's settings; ValueError on a bad one."""
        if only is not None and only not in KINDS:
            raise ValueError(f"protocol must be 'http' or 'tcp', got {only!r}")
        digest = basic_auth_digest(check_basic_auth_value(basic_auth)) if basic_auth is not None else None
        return cls(only, digest, parse_networks(allow))

    @property
    def empty(self) -> bool:
        return self.only is None and self.digest is None and not self.allow

    def capabilities(self) -> Tuple[str, ...]:
        caps = []
        if self.only is not None:
            caps.append(f"{_PREFIX}only:{self.only}")
        if self.digest is not None:
            caps.append(f"{_PREFIX}auth:{self.digest}")
        caps.extend(f"{_PREFIX}allow:{net}" for net in self.allow)
        return tuple(caps)

    def serves(self, kind: str) -> bool:
        """Whether an ingress of ``kind`` ("http" or "tcp") may reach the tunnel."""
        return self.only is None or self.only == kind

    def admits(self, visitor: object) -> bool:
        """Whether the visitor address (a (host, port) tuple) is allowed; unknown addresses are not
        when there is an allow list."""
        if not self.allow:
            return True
        if not isinstance(visitor, tuple) or not visitor:
            return False
        try:
            addr = ipaddress.ip_address(str(visitor[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.allow)

    def authorized(self, header_value: Optional[bytes]) -> bool:
        """Whether an ``Authorization`` header value carries the right basic credentials (always
        True without basic auth). Compared as digests, in constant time."""
        if self.digest is None:
            return True
        raw = _basic_credentials(header_value)
        return raw is not None and hmac.compare_digest(self.expected(raw), self.digest)

    def expected(self, credentials: bytes) -> str:
        """What ``digest`` would be for these credentials."""
        return basic_auth_digest(credentials)


@dataclass(frozen=True)
class KeyedAccess(TunnelAccess):
    """A tunnel's rules as another cluster node published them: ``digest`` is ``keyed_digest(key,
    SHA-256(USER:PASSWORD))``, never the client's digest itself, so whoever reads the published
    rules without ``key`` cannot test passwords against them. ``key`` stays out of the repr."""

    key: bytes = b""

    def __repr__(self) -> str:
        return "Keyed" + super().__repr__()

    def expected(self, credentials: bytes) -> str:
        return keyed_digest(self.key, hashlib.sha256(credentials).digest())


def _parse(caps: Tuple[str, ...]) -> Optional[TunnelAccess]:
    only = digest = None
    allow = []
    for cap in caps:
        if not cap.startswith(_PREFIX):
            continue
        kind, _, value = cap[len(_PREFIX):].partition(":")
        if kind == "only" and value in KINDS and only is None:
            only = value
        elif kind == "auth" and digest is None and len(value) == _DIGEST_LEN and value.isascii() \
                and all(c.isalnum() or c in "-_" for c in value):
            digest = value
        elif kind == "allow":
            allow.append(value)
        elif cap == DROPPED_RULE:
            raise ValueError("an access rule did not fit in the handshake (longer than a server keeps a capability, "
                             "or past the number it keeps): refused rather than served with fewer rules")
        else:
            raise ValueError(f"malformed or repeated access rule {cap[:64]!r}")
    if only is None and digest is None and not allow:
        return None
    return TunnelAccess(only, digest, parse_networks(allow))


@lru_cache(maxsize=1024)
def access_from_capabilities(caps: Tuple[str, ...]) -> Optional[TunnelAccess]:
    """The access rules a client announced (None: none). ValueError on a malformed entry; a server
    refuses such a handshake, so sessions it accepted parse cleanly."""
    return _parse(tuple(caps))
