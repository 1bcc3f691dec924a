"""What a failed connection attempt most likely means, in words that name the fix: exception
descriptions, TLS record sniffing and OpenSSL reasons grouped by cause."""

from __future__ import annotations

import ssl
from typing import Optional

__all__ = ["describe_error", "looks_like_tls", "ssl_reason", "client_cert_hint"]


# An exception that came without a message (``ConnectionResetError()`` from a TLS handshake the
# peer cut short, a bare ``TimeoutError()``) is shown as its type and what it usually means.
NO_MESSAGE = {
    ssl.SSLEOFError: "the TLS connection was closed in the middle of a record or handshake",
    ConnectionResetError: "the connection was reset",
    ConnectionAbortedError: "the connection was aborted",
    BrokenPipeError: "the connection was closed while we were sending",
    TimeoutError: "no answer in time",
    EOFError: "the connection was closed",
}


def describe_error(exc: BaseException) -> str:
    """``str(exc)``, or, when that is empty, the exception's type and what it usually means:
    never an empty reason."""
    text = str(exc)
    if text.strip() not in ("", "()", "None"):  # an SSLError without arguments says "()"
        return text
    for cls, meaning in NO_MESSAGE.items():
        if isinstance(exc, cls):
            return f"{type(exc).__name__}: {meaning}, no details given"
    return f"{type(exc).__name__}, no details given: run with --log-level debug and see the server's log"


#: The first bytes of a TLS record: content type 20-23 (ChangeCipherSpec, Alert, Handshake,
#: ApplicationData), then major version 3. A HandshakeAck starts with a small length prefix
#: (0x00 0x00 ...), so these two bytes cannot begin one.
TLS_RECORD_TYPES = frozenset((0x14, 0x15, 0x16, 0x17))


def looks_like_tls(head: bytes) -> bool:
    return len(head) >= 2 and head[0] in TLS_RECORD_TYPES and head[1] == 0x03


# OpenSSL reasons, as ``ssl.SSLError.reason``.
SSL_PLAINTEXT_ANSWER = frozenset(("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                                   "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
                                   "RECORD_LENGTH_MISMATCH", "BAD_RECORD_TYPE", "WRONG_SSL_VERSION"))
SSL_CLOSED = frozenset(("UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL"))
SSL_CLIENT_CERT_REQUIRED = frozenset(("TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"))
SSL_CLIENT_CERT_REFUSED = frozenset((
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_DECRYPT_ERROR", "SSLV3_ALERT_HANDSHAKE_FAILURE"))
SSL_OLD_VERSION = frozenset(("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE",
                              "TLSV1_ALERT_INAPPROPRIATE_FALLBACK"))

HINT_NO_TLS = "drop --tls, or start the server with --tls-cert/--tls-key"
HINT_ADD_TLS = "add --tls (and --tls-ca if its certificate is self-signed)"
HINT_CLIENT_CERT = ("give the client a certificate signed by the CA the server's --tls-ca names: --tls-cert and "
                     "--tls-key (ferrotunnel certs --client writes client.pem and client.key)")


def ssl_reason(exc: Optional[BaseException]) -> str:
    return (getattr(exc, "reason", None) or "") if isinstance(exc, ssl.SSLError) else ""


def client_cert_hint(exc: Optional[BaseException]) -> Optional[str]:
    """What to do when the server refused this client at the TLS layer (mutual TLS), or None."""
    reason = ssl_reason(exc)
    if reason in SSL_CLIENT_CERT_REQUIRED:
        return f"the server requires a client certificate ({reason}): {HINT_CLIENT_CERT}"
    if reason in SSL_CLIENT_CERT_REFUSED:
        return (f"the server refused the TLS connection ({reason}), most likely the client certificate (missing, "
                f"or not signed by a CA it trusts): {HINT_CLIENT_CERT}")
    return None
