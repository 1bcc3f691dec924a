"""Token helpers. The token is a secret: nothing here logs it or puts it in an exception."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["MAX_TOKEN_LENGTH", "MIN_SERVER_TOKEN_LENGTH", "NEW_TOKEN_COMMAND", "TokenFormatError", "constant_time_eq",
           "validate_token_format", "hash_token", "verify_token_hash"]

#: Longest token the protocol accepts (PROTOCOL.md 3.2/3.3).
MAX_TOKEN_LENGTH = 256
#: Fewest characters of a token a ``ferrotunnel server`` accepts clients with: its shared token
#: (``--token``, ``--token-file``, ``FERROTUNNEL_TOKEN``...), as each ``--client-tokens`` entry.
#: The protocol (and the library's ``TunnelServer``) takes any length from 1.
MIN_SERVER_TOKEN_LENGTH = 16
#: A command that prints a new random token (32 characters), for messages that ask for one.
NEW_TOKEN_COMMAND = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"


class TokenFormatError(ValueError):
    """The token is empty, too long, or has characters outside printable ASCII."""


def constant_time_eq(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets in time independent of where they differ (and of their lengths' match)."""
    ab = a.encode("utf-8") if isinstance(a, str) else bytes(a)
    bb = b.encode("utf-8") if isinstance(b, str) else bytes(b)
    # hashing first makes the comparison length-independent too
    return hmac.compare_digest(hashlib.sha256(ab).digest(), hashlib.sha256(bb).digest())


def validate_token_format(token: str, max_len: int = MAX_TOKEN_LENGTH) -> None:
    """Raise TokenFormatError unless the token is 1..max_len printable ASCII characters."""
    if not token:
        raise TokenFormatError("token is empty")
    if len(token.encode("utf-8")) > max_len:
        raise TokenFormatError(f"token is longer than {max_len} bytes")
    if any(not 0x20 <= ord(c) <= 0x7E for c in token):
        raise TokenFormatError("token must contain only printable ASCII characters (0x20-0x7E)")


def hash_token(token: str) -> str:
    """SHA-256 of the token as lowercase hex (for storing a token without keeping it)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def verify_token_hash(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash.lower())
