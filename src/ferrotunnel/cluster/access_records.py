"""A tunnel's access rules as its node publishes them in Redis for the other nodes (the ``access``
field of its claim), so that a node where a visitor lands checks them, basic auth included, before
anything crosses a node link.

The client's basic-auth digest (the SHA-256 of ``USER:PASSWORD``) is never published: the record
holds ``HMAC(auth key, SHA-256)``, the auth key being derived from the cluster secret and the
tunnel id, so Redis contents alone cannot be used to test passwords, nor tell that two tunnels
share one. The record is sealed by a tag (HMAC over the tunnel id, the owning node and the rules,
under another key derived from the secret): a record that does not verify (changed in Redis, or
written by a node without the secret) is not used, and the tunnel is not served from that node
(fail closed, 503). The node that holds the tunnel stays the authority: it enforces the allow list
and protocol on every stream a link carries, and takes a basic-auth tunnel's stream only when the
link stream's ``ft-access`` header is the tag of the rules it holds now (the ingress node checked
exactly those; the header is believed only on an authenticated node link).

A node says in its liveness key that it publishes rules (``rules`` = its epoch); a claim of a
node that does not (an older version, in a rolling upgrade) carries none, and that node guards
its tunnels itself as before. Record: ``"none"`` (no rules), ``"sealed"`` (rules this node could not publish, having no cluster
secret: other nodes refuse the tunnel's visitors), or ``"1." + tag + "." + JSON``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from functools import lru_cache
from typing import Any, Optional

from ..access import KINDS, KeyedAccess, TunnelAccess, access_from_capabilities, keyed_digest, parse_networks

__all__ = ["ACCESS_FIELD", "NO_RULES", "SEALED", "MAX_RECORD", "AccessKeys", "Published", "UnreadableRules", "labelled_mac"]

log = logging.getLogger("ferrotunnel.cluster")

#: The claim hash's field that holds the record.
ACCESS_FIELD = "access"
NO_RULES = "none"
SEALED = "sealed"
#: The longest record read back from Redis (16 networks and a MAC fit in well under 2 KiB).
MAX_RECORD = 4096
_VERSION = "1"


class UnreadableRules(ValueError):
    """A published record that is missing, malformed or does not verify under the cluster secret."""


def labelled_mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 under ``key`` of ``label`` then each part with its 4-byte length (no two
    part lists give the same message); the node links use it too."""
    msg = bytearray(label)
    for p in parts:
        msg += len(p).to_bytes(4, "big") + p
    return hmac.new(key, bytes(msg), hashlib.sha256).digest()


class Published:
    """Rules another node published: ``access`` (a ``KeyedAccess``, or None: the tunnel has none)
    and ``tag``, which the stream over the link carries to say they were checked."""

    __slots__ = ("access", "tag")

    def __init__(self, access: Optional[KeyedAccess], tag: str) -> None:
        self.access = access
        self.tag = tag

    def __repr__(self) -> str:
        return f"<Published {self.access!r}>"


class AccessKeys:
    """The keys derived from the cluster secret, and the records made and read with them. An empty
    secret makes a node that publishes rules as ``SEALED`` and verifies none."""

    def __init__(self, secret: str) -> None:
        raw = secret.encode()
        self.enabled = bool(raw)
        self._tag_key = labelled_mac(raw, b"ferrotunnel access rules tag")
        self._auth_key = labelled_mac(raw, b"ferrotunnel access auth key")

    def __repr__(self) -> str:
        return f"<AccessKeys {'on' if self.enabled else 'off'}>"

    def auth_key(self, tunnel_id: str) -> bytes:
        """The key of one tunnel's published basic-auth MAC."""
        return labelled_mac(self._auth_key, b"tunnel", tunnel_id.encode())

    def tag(self, tunnel_id: str, node_id: str, body: str) -> str:
        return labelled_mac(self._tag_key, b"rules", tunnel_id.encode(), node_id.encode(), body.encode()).hex()

    def body(self, tunnel_id: str, access: TunnelAccess) -> str:
        auth = None
        if access.digest is not None:
            sha = base64.urlsafe_b64decode(access.digest + "=")
            auth = keyed_digest(self.auth_key(tunnel_id), sha)
        return json.dumps({"only": access.only, "auth": auth, "allow": [str(n) for n in access.allow]},
                          sort_keys=True, separators=(",", ":"))

    def record(self, tunnel_id: str, node_id: str, access: Optional[TunnelAccess]) -> str:
        """What the owning node writes in its claim for a session with ``access``."""
        if access is None or access.empty:
            return NO_RULES
        if not self.enabled:
            return SEALED
        return _record(self, tunnel_id, node_id, access)

    def session_record(self, node_id: str, session: Any) -> str:
        """``record`` for a local session (its rules from its handshake capabilities)."""
        caps = getattr(session, "capabilities", None)
        try:
            access = access_from_capabilities(tuple(caps)) if caps else None
        except ValueError:  # (a server refuses such a handshake) not published: other nodes refuse
            return SEALED
        return self.record(session.tunnel_id, node_id, access)

    def checked_tag(self, tunnel_id: str, node_id: str, access: Optional[TunnelAccess]) -> Optional[str]:
        """The tag an ingress node sends with a stream for a tunnel with ``access`` held here (None
        for no rules or no secret): what this node expects in ``ft-access``."""
        record = self.record(tunnel_id, node_id, access)
        return record.split(".", 2)[1] if record.startswith(_VERSION + ".") else None

    def read(self, tunnel_id: str, node_id: str, record: Any, publishes: bool = True) -> Published:
        """The rules ``node_id`` published for ``tunnel_id``; UnreadableRules when they are missing,
        malformed or do not verify (the caller then does not serve the tunnel). ``publishes``: that
        node says it publishes rules; one that does not (an older version) guards its tunnels
        itself, as before: none are checked here, and it refuses every basic-auth link stream."""
        text = record.decode("utf-8", "replace") if isinstance(record, bytes) else record
        if text == NO_RULES or (not text and not publishes):
            return Published(None, "")
        if not isinstance(text, str) or not text:
            raise UnreadableRules("no access rules were published with the claim")
        if text == SEALED:
            raise UnreadableRules("its node could not publish the access rules (no cluster secret)")
        if not self.enabled:
            raise UnreadableRules("this node has no cluster secret to verify the access rules with")
        if len(text) > MAX_RECORD:
            raise UnreadableRules(f"the published access rules are longer than {MAX_RECORD} characters")
        return _read(self, tunnel_id, node_id, text)


@lru_cache(maxsize=4096)
def _record(keys: AccessKeys, tunnel_id: str, node_id: str, access: TunnelAccess) -> str:
    body = keys.body(tunnel_id, access)
    return f"{_VERSION}.{keys.tag(tunnel_id, node_id, body)}.{body}"


@lru_cache(maxsize=4096)
def _read(keys: AccessKeys, tunnel_id: str, node_id: str, text: str) -> Published:
    version, _, rest = text.partition(".")
    tag, _, body = rest.partition(".")
    if version != _VERSION or len(tag) != 64 or not _is_hex(tag):
        raise UnreadableRules("the published access rules are malformed")
    if not hmac.compare_digest(tag, keys.tag(tunnel_id, node_id, body)):
        raise UnreadableRules("the published access rules do not verify under the cluster secret")
    try:
        fields = json.loads(body)
        only, auth, allow = fields["only"], fields["auth"], fields["allow"]
        if only is not None and only not in KINDS:
            raise ValueError(f"protocol {only!r}")
        if auth is not None and not (isinstance(auth, str) and len(auth) == 64 and _is_hex(auth)):
            raise ValueError("basic-auth MAC")
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise ValueError("allow list")
        access = KeyedAccess(only, auth, parse_networks(allow), key=keys.auth_key(tunnel_id))
    except (ValueError, KeyError, TypeError):  # (what Redis held is not repeated to visitors)
        raise UnreadableRules("the published access rules are malformed") from None
    return Published(None if access.empty else access, tag)


def _is_hex(text: str) -> bool:
    return text.isascii() and all(c in "0123456789abcdef" for c in text)

