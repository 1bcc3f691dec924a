"""Names and text at the HTTP ingress: a Host (or an absolute-form authority) to a tunnel id,
visitor input escaped for logs and error bodies, and the ingress's own small answers."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional, Tuple, Union

from .guard import challenge

__all__ = ["normalize_host", "printable", "parse_authority", "response", "is_health", "why_missing", "route_name", "no_route", "strip_suffix",
           "ABSOLUTE_FORM", "PRINTABLE_LIMIT"]

#: At most this many bytes of visitor input go into one log line or error body (escaped).
PRINTABLE_LIMIT = 200


def normalize_host(value: str) -> str:
    """Host header to tunnel id: trim, drop the port (keep a bare IPv6 address), lower-case,
    drop one trailing dot."""
    host = value.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    return host


# -------------------------------------------------------------------- escaping visitor input

_UNSAFE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # control bytes, DEL, non-ASCII and the backslash


def _hex(m: "re.Match[bytes]") -> bytes:
    return b"\\x%02x" % m[0][0]


def printable(data: Union[bytes, bytearray, memoryview, str], limit: int = PRINTABLE_LIMIT) -> str:
    """Visitor input for a log line or an error body: printable ASCII as it is, every other byte
    (control bytes, DEL, non-ASCII, the backslash) as ``\\xNN``; at most ``limit`` input bytes,
    then ``...``."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
    cut = len(raw) > limit
    if cut:
        raw = raw[:limit]
    text = _UNSAFE.sub(_hex, raw).decode("ascii")
    return text + "..." if cut else text


# -------------------------------------------------------------------- RFC 9112 checks

#: reg-name / IPv4address of RFC 3986: unreserved, sub-delims and pct-encoded, at least one.
_REG_NAME = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_IPV6 = re.compile(rb"[0-9A-Fa-f:.]+")
#: The start of an absolute-form target: scheme "://" authority (up to "/", "?" or "#").
ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")


def parse_authority(raw: bytes) -> Optional[str]:
    """A Host field value or the authority of an absolute-form target to a tunnel id, or None when
    it is invalid (RFC 9112 §3.2, RFC 3986 §3.2.2): empty, a character outside reg-name (so no
    userinfo, no space, nothing raw), a bad IPv6 literal or a port that is not 0..65535."""
    value = raw.strip(b" \t")
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return None
        literal, rest = value[1:end], value[end + 1:]
        if not _IPV6.fullmatch(literal):
            return None
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return None
    else:
        host, sep, port = value.partition(b":")
        if not _REG_NAME.fullmatch(host):
            return None
        rest = sep + port
    if rest:
        port = rest[1:]
        if rest[:1] != b":" or (port and (not port.isdigit() or len(port) > 5 or int(port) > 65535)):
            return None
    return normalize_host(value.decode("ascii"))


def why_missing(registry: Any, tunnel_id: str) -> Optional[str]:
    """Why a cluster registry found no route other than "no such tunnel" (Redis or the owning
    node unreachable), or None."""
    why = getattr(registry, "why_missing", None)
    return why(tunnel_id) if why is not None else None

def strip_suffix(name: str, suffix: str) -> str:
    """``name`` without ``suffix`` (``.<domain>``) when it ends with it and is longer."""
    if suffix and name.endswith(suffix) and len(name) > len(suffix):
        return name[:-len(suffix)]
    return name


def no_route(registry: Any, tunnel_id: str, health: bool) -> Tuple[str, str]:
    """The ingress's answer (status, body) to a request no tunnel takes: its own /health, a 503
    from a cluster node that could not tell (``why_missing``), else a 404."""
    if health:
        return "200 OK", "ok\n"
    why = why_missing(registry, tunnel_id)
    if why is not None:
        return ("503 Service Unavailable",
                f"tunnel {printable(tunnel_id)} is not on this node and {why}; try again shortly\n")
    return "404 Not Found", f"no tunnel is connected for {printable(tunnel_id)}\n"


def response(status: str, body: str, bodiless: bool = False) -> bytes:
    """The ingress's own answer; ``bodiless`` (to a HEAD request): its head only, Content-Length
    still that of the body it would have had (RFC 9110 §9.3.2)."""
    data = body.encode("ascii", "backslashreplace")
    extra = challenge() if status.startswith("401") else ""
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + (b"" if bodiless else data)


def is_health(path: bytes) -> bool:
    return path == b"/health" or path.startswith(b"/health?")


def route_name(req: Any) -> Tuple[Optional[str], bytes, bytes, bool]:
    """Where a parsed request (``http1.Request``) goes: (the normalised name or None, the Host or
    authority as sent, the target, whether its path is /health). An absolute-form target's
    authority wins over Host (RFC 9112 §3.2.2). HeadError (400) for an invalid Host, authority or
    scheme."""
    from .http1 import HeadError

    name: Optional[str] = None
    host = b""
    if req.hosts:
        host = req.hosts[0]
        name = parse_authority(host)
        if name is None:
            raise HeadError("400 Bad Request", f"invalid Host header: {printable(host)}")
    target = path = req.url
    absolute = ABSOLUTE_FORM.match(target)
    if absolute is not None:
        if absolute[1].lower() not in (b"http", b"https"):
            raise HeadError("400 Bad Request", "unsupported scheme in the request target")
        host = absolute[2]
        name = parse_authority(host)
        if name is None:
            raise HeadError("400 Bad Request", f"invalid authority in the request target: {printable(host)}")
        path = target[absolute.end():] or b"/"
    return name, host, target, is_health(path)
