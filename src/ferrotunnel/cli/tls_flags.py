"""The TLS flags of ``server`` and ``client``: the SSL contexts they describe, a usage error (exit
2) naming the file and the likely mistake for files that cannot work (a certificate and key
swapped or from different pairs, a CA file without a certificate), and the banner lines that say
the TLS mode exactly and which flag or variable supplied each file."""

from __future__ import annotations

import argparse
import ssl
from typing import Any, Dict, List, Optional, Tuple

from .common import UsageError, existing_file

__all__ = ["server_tls", "client_tls"]


def _from(sources: Dict[str, str], dest: str) -> str:
    return f" (from {sources[dest]})" if dest in sources else ""


def _why(exc: BaseException) -> str:
    text = str(exc)
    if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
        return "the key does not belong to the certificate (two different pairs?)"
    if "PEM" in text or "NO_START_LINE" in text or "no start line" in text:
        return "not the PEM file expected (a certificate and a key swapped?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return text or type(exc).__name__


def _load(make: Any, what: str) -> Any:
    try:
        return make()
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise UsageError(f"{what}: {_why(exc)}") from None


def _ca_check(path: Optional[str], flag: str) -> None:
    if path is None:
        return
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise UsageError(f"{flag} {path}: no CA certificate could be read from it ({_why(exc)})") from None


def server_tls(args: argparse.Namespace, sources: Dict[str, str]) -> Tuple[Any, List[str]]:
    """(SSL context or None, banner lines) for the tunnel port."""
    from .. import tls

    cert, key = args.tls_cert, args.tls_key
    if not cert and not key:
        if args.tls_ca or args.tls_client_auth:
            raise UsageError("--tls-ca and --tls-client-auth need --tls-cert and --tls-key")
        return None, ["TLS: off (tunnel clients connect in plaintext)"]
    if not (cert and key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    existing_file(cert, "--tls-cert")
    existing_file(key, "--tls-key")
    existing_file(args.tls_ca, "--tls-ca")
    if args.tls_client_auth and not args.tls_ca:
        raise UsageError("--tls-client-auth needs --tls-ca (the CA that signs client certificates)")
    _ca_check(args.tls_ca, "--tls-ca")
    # as in the original, a CA means client certificates are required (mutual TLS)
    ctx = _load(lambda: tls.server_context(cert, key, args.tls_ca, require_client_cert=bool(args.tls_ca)),
                f"--tls-cert {cert} with --tls-key {key}")
    mode = "TLS 1.3, client certificates required" if args.tls_ca else "TLS 1.3"
    lines = [f"TLS: {mode}", f"  certificate {cert}{_from(sources, 'tls_cert')}",
             f"  key {key}{_from(sources, 'tls_key')}"]
    if args.tls_ca:
        lines.append(f"  client CA {args.tls_ca}{_from(sources, 'tls_ca')}")
    return ctx, lines


def client_tls(args: argparse.Namespace, sources: Dict[str, str]) -> Tuple[Any, List[str]]:
    """(SSL context or None, banner lines; a warning line starts with "warning:")."""
    from .. import tls

    wants = args.tls or args.tls_ca or args.tls_skip_verify or args.tls_cert or args.tls_key or args.tls_server_name
    if not wants:
        return None, ["TLS: off (the tunnel connection is plaintext)"]
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("a client certificate needs both --tls-cert and --tls-key")
    existing_file(args.tls_ca, "--tls-ca")
    existing_file(args.tls_cert, "--tls-cert")
    existing_file(args.tls_key, "--tls-key")
    _ca_check(args.tls_ca, "--tls-ca")
    what = (f"--tls-cert {args.tls_cert} with --tls-key {args.tls_key}" if args.tls_cert
            else f"--tls-ca {args.tls_ca}" if args.tls_ca else "TLS")
    # unlike the original, no CA means the system trust store, never silently no verification
    ctx = _load(lambda: tls.client_context(args.tls_ca, skip_verify=args.tls_skip_verify, certfile=args.tls_cert,
                                           keyfile=args.tls_key), what)
    lines = []
    if args.tls_skip_verify:
        lines.append(f"TLS: on, server certificate NOT verified{_from(sources, 'tls_skip_verify')}")
        lines.append("warning: --tls-skip-verify: anyone on the path can pose as the server and read the tunnel")
    elif args.tls_ca:
        lines.append(f"TLS: on, server verified against CA {args.tls_ca}{_from(sources, 'tls_ca')}")
    else:
        lines.append("TLS: on, server verified against the system trust store")
    if args.tls_cert:
        lines.append(f"  client certificate {args.tls_cert}{_from(sources, 'tls_cert')}, "
                     f"key {args.tls_key}{_from(sources, 'tls_key')}")
    return ctx, lines
