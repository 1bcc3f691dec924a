"""Per-client tokens: ``ferrotunnel server --client-tokens FILE.toml``, each token with the tunnel
ids it may claim (globs)::

    [[token]]
    token = "a-long-secret-for-alice"       # or sha256 = "<hex of the token's SHA-256>"
    tunnels = ["alice-*", "web"]

A handshake whose token is one of these may claim only an id its list matches (lower case,
``fnmatch`` globs); any other id is refused with the reason "tunnel id 'X' is not allowed for this
token" (``InvalidToken`` with the reject-reason extension; a Rust client sees InvalidToken), and
that refusal does not count toward the failed-login throttle: the token was right. The shared
``--token`` still works when given, for any id. Tokens are compared as SHA-256 digests in
constant time, against every entry. ``PolicyServer.reload_tokens()`` re-reads the file (the CLI
does on SIGHUP) and closes the sessions of tokens no longer in it, or no longer allowing their ids;
a file that does not load keeps the tokens already in force.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import tomllib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from ..addr import format_peer
from ..aio.session import TunnelAlias
from ..errors import ConnectionLostError
from ..frames import HandshakeStatus
from .admission import shown_id
from .server import TunnelServer

__all__ = ["ClientTokens", "TokenEntry", "PolicyServer", "MAX_CLIENT_TOKENS", "MAX_TOKENS_FILE_BYTES"]

log = logging.getLogger("ferrotunnel.server")

#: At most this many ``[[token]]`` entries, and this many bytes of file.
MAX_CLIENT_TOKENS = 10_000
MAX_TOKENS_FILE_BYTES = 4 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class TokensFileError(ValueError):
    """The tokens file is unreadable or wrong; the message names the file, the entry and the key
    (never a token)."""


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    tunnels: Tuple[str, ...]

    def allows(self, tunnel_id: str) -> bool:
        tid = tunnel_id.lower()
        return any(fnmatch.fnmatchcase(tid, pattern) for pattern in self.tunnels)

    def __repr__(self) -> str:
        return f"<TokenEntry tunnels={list(self.tunnels)}>"


def load_tokens(path: str) -> Tuple[TokenEntry, ...]:
    def fail(where: str, why: str) -> TokensFileError:
        return TokensFileError(f"client tokens file {path}: {where}{why}")

    try:
        if os.path.getsize(path) > MAX_TOKENS_FILE_BYTES:
            raise fail("", f"over {MAX_TOKENS_FILE_BYTES} bytes")
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise fail("", f"cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise fail("", f"not valid TOML ({exc})") from None
    extra = set(data) - {"token"}
    if extra:
        raise fail("", f"unknown key {sorted(extra)[0]!r} (known: token)")
    raw = data.get("token", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise fail("", "key 'token': must be tables ([[token]])")
    if len(raw) > MAX_CLIENT_TOKENS:
        raise fail("", f"{len(raw)} tokens, over the limit of {MAX_CLIENT_TOKENS}")
    entries: List[TokenEntry] = []
    for i, t in enumerate(raw, 1):
        where = f"token[{i}]: "
        extra = set(t) - {"token", "sha256", "tunnels"}
        if extra:
            raise fail(where, f"unknown key {sorted(extra)[0]!r} (known: sha256, token, tunnels)")
        if ("token" in t) == ("sha256" in t):
            raise fail(where, "give exactly one of token and sha256")
        if "token" in t:
            if not isinstance(t["token"], str) or len(t["token"]) < 16:
                raise fail(where, "key 'token': must be a string of at least 16 characters")
            digest = hashlib.sha256(t["token"].encode()).digest()
        else:
            if not isinstance(t["sha256"], str) or not _HEX64.fullmatch(t["sha256"]):
                raise fail(where, "key 'sha256': must be 64 hex digits (the token's SHA-256)")
            digest = bytes.fromhex(t["sha256"])
        tunnels = t.get("tunnels")
        if (not isinstance(tunnels, list) or not tunnels
                or not all(isinstance(p, str) and 0 < len(p) <= 255 for p in tunnels)):
            raise fail(where, "key 'tunnels': must be a non-empty list of ids or globs (e.g. [\"app-*\"])")
        entries.append(TokenEntry(digest, tuple(p.lower() for p in tunnels)))
    return tuple(entries)


class ClientTokens:
    """The tokens of a file, reloadable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries = load_tokens(path)  # TokensFileError at start: the command's usage error

    def match(self, token: str) -> Optional[TokenEntry]:
        """The entry of ``token`` or None; every entry is compared (constant time per entry)."""
        return self.match_digest(hashlib.sha256(token.encode()).digest())

    def match_digest(self, digest: bytes) -> Optional[TokenEntry]:
        """``match`` for a token's SHA-256 digest."""
        found: Optional[TokenEntry] = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry
        return found

    def reload(self) -> bool:
        """Re-read the file; on an error the tokens in force stay (logged). True if reloaded."""
        try:
            self.entries = load_tokens(self.path)
        except TokensFileError as exc:
            log.error("%s; keeping the %d tokens loaded before", exc, len(self.entries))
            return False
        log.info("client tokens reloaded from %s: %d tokens", self.path, len(self.entries))
        return True

    def __repr__(self) -> str:
        return f"<ClientTokens {self.path!r} {len(self.entries)} tokens>"


class PolicyServer(TunnelServer):
    """A ``TunnelServer`` that also admits the per-client tokens of ``client_tokens``, each for its
    own tunnel ids. ``token`` (the shared one) may be None: then only those tokens admit."""

    def __init__(self, address: Tuple[str, int], token: Optional[str], *, client_tokens: ClientTokens,
                 **kwargs: Any) -> None:
        self.shared = token is not None
        super().__init__(address, token if token is not None else os.urandom(32).hex(), **kwargs)
        self.client_tokens = client_tokens
        #: handshakes refused because the id is outside the token's list
        self.refused_ids = 0
        #: the sessions a per-client token admitted, with its digest (weakly: a session that ends goes)
        self._admitted: "weakref.WeakKeyDictionary[Any, bytes]" = weakref.WeakKeyDictionary()
        #: sessions closed by ``reload_tokens`` because their token went or no longer covers their ids
        self.revoked_sessions = 0

    def reload_tokens(self) -> bool:
        """Re-read the tokens file (what SIGHUP does); then every session whose token is no longer
        in it, or whose tunnel ids it no longer allows, is closed (its client, if it retries, is
        refused with the reason). On a file that does not load, nothing changes. True if reloaded."""
        if not self.client_tokens.reload():
            return False
        for session, digest in list(self._admitted.items()):
            entry = self.client_tokens.match_digest(digest)
            ids = [session.tunnel_id] + [s.tunnel_id for s in self.registry.local_sessions()
                                         if isinstance(s, TunnelAlias) and s.primary is session]
            gone = [tid for tid in ids if entry is None or not entry.allows(tid)]
            if gone and not session.is_closed:
                self.revoked_sessions += 1
                why = "its token was revoked" if entry is None else "its token no longer allows tunnel id " + \
                    ", ".join(shown_id(t) for t in gone)
                log.warning("session %s (tunnel %s) from %s closed: %s", session.id, shown_id(session.tunnel_id),
                            format_peer(session.peer_address), why)
                session.close(ConnectionLostError(f"closed by the server: {why}"))
        return True

    def token_ok(self, token: str) -> bool:
        return (self.shared and super().token_ok(token)) or self.client_tokens.match(token) is not None

    def claim_policy(self, token: str) -> Callable[[str], Optional[str]]:
        if self.shared and super().token_ok(token):
            return super().claim_policy(token)

        def why(tunnel_id: str) -> Optional[str]:  # matched at each use: SIGHUP may have re-read the file
            entry = self.client_tokens.match(token)
            if entry is None or not entry.allows(tunnel_id):
                self.refused_ids += 1
                return f"tunnel id {tunnel_id[:70]!r} is not allowed for this token"
            return None
        return why

    async def authorize(self, conn: Any, req: Any) -> None:
        # a throttled address gets RateLimited from the base policy first: the reason below would
        # otherwise tell a right token from a wrong one at full speed
        if not conn.closed and not self.throttled(conn.peer_address) and not (self.shared and super().token_ok(req.token)):
            entry = self.client_tokens.match(req.token) if isinstance(req.token, str) else None
            tid = (req.tunnel_id or "").lower()
            if entry is not None and not entry.allows(tid):
                why = f"tunnel id {tid[:70]!r} is not allowed for this token"
                log.info("handshake from %s refused (INVALID_TOKEN): %s", conn.peer_address, why)
                self.handshake_failures[HandshakeStatus.INVALID_TOKEN.name] += 1
                self.refused_ids += 1
                conn.reject(HandshakeStatus.INVALID_TOKEN, why)  # not a failed login: no throttle
                return
            if entry is not None:
                await super().authorize(conn, req)
                if conn.opened and not conn.closed:  # admitted by this token: closed if it is revoked
                    self._admitted[conn.session] = entry.digest
                return
        await super().authorize(conn, req)
