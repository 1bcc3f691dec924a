"""The server command's public side: --domain / --public-* flags, the HTTPS ingress of
--https-bind, and where visitors reach each ingress (the URLs clients are told and print)."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence, Tuple

from .common import UsageError, existing_file, parse_addr

__all__ = ["public_flags", "public_endpoints", "https_ingress"]


def public_flags(args: argparse.Namespace) -> Tuple[Optional[str], Optional[str], Optional[int]]:
    """--domain (normalised), --public-host and --public-http-port; UsageError for bad ones."""
    from ..server.public import normalize_domain

    try:
        domain = normalize_domain(args.domain) if args.domain else None
    except ValueError as exc:
        raise UsageError(f"--domain: {exc}") from None
    host = args.public_host or None
    if host is not None and (any(c.isspace() or c in "/@?#" for c in host) or not host.isprintable()):
        raise UsageError(f"--public-host must be a host name or address (no scheme, port or path), got {host!r}")
    port = args.public_http_port
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--public-http-port must be a port in 1..65535, got {port!r}")
    return domain, (host.strip("[]") if host else domain), int(port) if port else None


def public_endpoints(ingresses: Sequence[Any], public_host: Optional[str], http_port: Optional[int],
                     https_port: Optional[int] = None) -> Any:
    """Where visitors reach each bound ingress: ``public_host`` (default: the ingress's bind host)
    and its bound port (``http_port`` / ``https_port`` for HTTP / HTTPS when given)."""
    import ferrotunnel as ft
    from ..server.https import HttpsIngress
    from ..server.public import PublicEndpoint

    out = []
    for ing in ingresses:
        host, port = ing.address
        if isinstance(ing, HttpsIngress):
            out.append(PublicEndpoint("https", public_host or host, https_port or port))
        elif isinstance(ing, ft.HttpIngress):
            out.append(PublicEndpoint("http", public_host or host, http_port or port))
        else:
            out.append(PublicEndpoint("tcp", public_host or host, port, ing.tunnel_id))
    return tuple(sorted(out, key=lambda ep: ("http", "https", "tcp").index(ep.scheme)))  # as they are printed


def https_ingress(args: argparse.Namespace, server: Any) -> Any:
    """The HTTPS ingress of --https-bind with --https-cert/--https-key; UsageError for bad ones."""
    import ssl

    from ..server.https import HttpsIngress

    bind = parse_addr(args.https_bind, "--https-bind")
    if not args.https_cert or not args.https_key:
        raise UsageError("--https-bind needs --https-cert and --https-key (e.g. wildcard.pem and wildcard.key "
                         "from ferrotunnel certs --out DIR --domain DOMAIN)")
    existing_file(args.https_cert, "--https-cert")
    existing_file(args.https_key, "--https-key")
    try:
        return HttpsIngress(server, bind, args.https_cert, args.https_key, domain=server.domain)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UsageError(f"cannot load --https-cert {args.https_cert} with --https-key {args.https_key}: "
                         f"{getattr(exc, 'reason', None) or exc}") from None
