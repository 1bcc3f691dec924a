"""Client failures as errors that name the likely cause and the flag that fixes it."""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Optional

from ..errors import (ConnectionLostError, FerroTunnelError, HandshakeError, SuspectedMisconfiguration,
                      TlsVerificationError, TunnelTimeoutError)
from .diagnose import (HINT_ADD_TLS, HINT_NO_TLS, SSL_CLOSED, SSL_OLD_VERSION, SSL_PLAINTEXT_ANSWER,
                       client_cert_hint, describe_error, ssl_reason)
from .reconnect import os_error

if TYPE_CHECKING:
    from .client import TunnelClient
    from .connection import ClientConnection

__all__ = ["explain", "verify_error"]


def explain(client: "TunnelClient", exc: BaseException, conn: Optional["ClientConnection"]) -> Optional[BaseException]:
    """The failure of one connect() as an error that names the likely cause and the flag that
    fixes it, of a class that keeps its retry semantics (see ``connect_and_run``); None to
    raise ``exc`` as it is (it says enough already, or it is not a failure: a cancellation)."""
    addr, tls = client.address, client.transport.is_tls
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verify_error(exc, client.server_name, client.address)
    if isinstance(exc, TimeoutError) and not isinstance(exc, TunnelTimeoutError):
        t = client.config.handshake_timeout
        # (uvloop makes the protocol before the TCP connection is up, asyncio after: for TLS
        # the two stages cannot be told apart here)
        if tls and (conn is None or not conn.made):
            return TunnelTimeoutError(
                f"the connection to {addr} and its TLS handshake did not complete within {t}s: either the host "
                f"does not answer (it is down, or a firewall drops the packets: check --server), or the server "
                f"does not speak TLS ({HINT_NO_TLS})")
        if conn is None or not conn.made:
            return TunnelTimeoutError(
                f"cannot connect to {addr} within {t}s: no answer to the connection attempt — the host may be "
                f"down or a firewall may drop the packets; check --server")
        hint = "" if tls else f"; if the server uses TLS, {HINT_ADD_TLS}"
        return TunnelTimeoutError(
            f"no handshake answer from {addr} within {t}s: the server accepted the connection but did not "
            f"answer — check that {client.port} is its tunnel port (server --bind), not an ingress port{hint}")
    if isinstance(exc, FerroTunnelError) or not isinstance(exc, Exception):
        return None  # ours (ClientConnection explained it), or a cancellation
    in_tls_handshake = tls and (conn is None or not conn.made)
    if isinstance(exc, ssl.SSLError):
        reason = ssl_reason(exc)
        where = f"TLS handshake with {addr} failed ({reason or describe_error(exc)})"
        if reason in SSL_PLAINTEXT_ANSWER:
            # not retried: the server demonstrably does not speak TLS
            return HandshakeError(f"{where}: the server does not speak TLS (it answered in plaintext): "
                                  f"{HINT_NO_TLS}")
        if reason in SSL_CLOSED or isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            # retried, never given up for: a balancer whose backend is down closes the same way
            return ConnectionLostError(f"{where}: the server closed the connection during the TLS handshake "
                                       f"(so does a balancer whose backend is down); if the server does not "
                                       f"speak TLS, {HINT_NO_TLS}")
        cert = client_cert_hint(exc)
        if cert is not None:
            return SuspectedMisconfiguration(f"{where}: {cert}")
        if reason in SSL_OLD_VERSION:
            return SuspectedMisconfiguration(f"{where}: the server does not accept TLS 1.3, which ferrotunnel "
                                       f"requires: upgrade the server's TLS library or configuration")
        return ConnectionLostError(f"{where}: check that the server uses TLS (server --tls-cert/--tls-key) "
                                   f"and the client's --tls-ca and --tls-server-name")
    if isinstance(exc, ConnectionRefusedError):
        return os_error(exc, f"cannot connect to {addr}: connection refused — is the server running, and is "
                              f"{client.port} its tunnel port (server --bind)?")
    if isinstance(exc, socket.gaierror):
        return os_error(exc, f"cannot resolve {client.host!r} ({describe_error(exc)}): check the host name "
                              f"in --server")
    if isinstance(exc, ConnectionError) and in_tls_handshake:  # (retried: see SSL_CLOSED above)
        return ConnectionLostError(
            f"the server at {addr} closed the connection during the TLS handshake ({describe_error(exc)}; so "
            f"does a balancer whose backend is down); if the server does not speak TLS, {HINT_NO_TLS}")
    if isinstance(exc, ConnectionError):
        return os_error(exc, f"the connection to {addr} failed: {describe_error(exc)}; the server's log may "
                              f"say why")
    if isinstance(exc, OSError):
        why = exc.strerror or describe_error(exc)
        return os_error(exc, f"cannot connect to {addr}: {why} — check --server and that the host is "
                              f"reachable from here")
    return None


def verify_error(exc: ssl.SSLCertVerificationError, name: str, address: str) -> TlsVerificationError:
    code = exc.verify_code
    msg = (exc.verify_message or exc.reason or describe_error(exc)).rstrip(".")
    if code in (62, 64) or "mismatch" in msg.lower():  # X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH
        hint = (f"the certificate is not valid for {name!r} — connect with a name on the certificate "
                f"(--server NAME:PORT) or set --tls-server-name to one of its names")
    elif code in (2, 18, 19, 20, 21):  # no trusted issuer / self-signed
        hint = ("the certificate is not signed by a CA this client trusts — pass the CA that signed it with "
                "--tls-ca (ferrotunnel certs writes it as ca.pem)")
    elif code == 10:
        hint = "the server's certificate has expired — renew it on the server (e.g. ferrotunnel certs)"
    elif code == 9:
        hint = "the server's certificate is not valid yet — check the clocks of both machines"
    else:
        hint = "check the CA (--tls-ca) and the server name (--tls-server-name)"
    return TlsVerificationError(f"the TLS certificate of {name} ({address}) failed verification: "
                                f"{msg}: {hint}")
